"""A rank whose descendants try to outlive the job: `escape.py [--local_rank=N] MODE`.

Every rank starts a child in a new session (`start_new_session=True`, as `setsid` does; it keeps the
rank's stdout) and a classic double-forked daemon (fork, setsid, fork, stdio on /dev/null), waits
until both run, and records the three pids and its own cgroup v2 path in
$DSRUN_TEST_OUT/pids<RANK>.json. Then, by MODE:
  end    exit 0 (the job ends normally, leaving both behind)
  fail   rank 1 exits 3 once rank 0 has recorded its pids, rank 0 sleeps
  sleep  sleep a minute (the test kills dsrun)
"""
import json
import os
import subprocess
import sys
import time

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank=")]
mode = args[0]
rank = int(os.environ["RANK"])
out_dir = os.environ["DSRUN_TEST_OUT"]

DAEMON = """
import os, sys, time
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
path = sys.argv[1]
with open(path + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(path + ".tmp", path)
time.sleep(300)
"""


def record(name, data):
    tmp = os.path.join(out_dir, f".{name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(out_dir, name))


setsid_child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
daemon_file = os.path.join(out_dir, f"daemon{rank}.pid")
subprocess.run([sys.executable, "-c", DAEMON, daemon_file], check=True)  # returns once the first fork exits
while not os.path.exists(daemon_file):
    time.sleep(0.01)
with open(daemon_file) as f:
    daemon = int(f.read())
with open("/proc/self/cgroup") as f:
    cgroup = next((line[3:].strip() for line in f if line.startswith("0::")), None)
record(f"pids{rank}.json", {"pids": {"rank": os.getpid(), "setsid": setsid_child.pid, "daemon": daemon},
                            "cgroup": cgroup})
if mode == "end":
    sys.exit(0)
if mode == "fail" and rank == 1:
    while not os.path.exists(os.path.join(out_dir, "pids0.json")):  # or rank 0 dies before recording
        time.sleep(0.01)
    sys.exit(3)
time.sleep(60)

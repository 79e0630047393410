"""Real transports on loopback: sshd answering on 127.0.0.1 and 127.0.0.2 as two nodes, pdsh, mpirun.

Each test runs `dsrun` as a child process (its own signal handlers, exit code and HOME), with a two-rank
gloo all-reduce. Skipped with the reason when a binary is missing; CI installs them all (.ci/run).
"""
import json
import subprocess
import sys
import time

import psutil
import pytest

from .conftest import require

pytestmark = pytest.mark.slow

ALLREDUCE = """
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
words = [dist.get_rank(), dist.get_world_size(), t.item(), os.environ["NODE_RANK"], os.environ.get("X"),
         os.environ.get("Y"), sys.argv[1:]]
sys.stdout.write("RESULT " + " ".join(map(str, words)) + "\\n")  # one write: mpirun interleaves pieces
dist.destroy_process_group()
"""

FAIL_ON_NODE_2 = """
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
if os.environ["NODE_RANK"] == "1":
    sys.exit(7)
dist.all_reduce(torch.ones(1))  # rank 0 would wait here for the gloo timeout; dsrun must end it
time.sleep(120)
"""

MPI_DISCOVERY = """
import torch, torch.distributed as dist
import dsrun
dsrun.init_distributed(dist_backend="gloo")  # must find rank, world and master from Open MPI's variables
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
import sys
sys.stdout.write(f"RESULT {dist.get_rank()} {dist.get_world_size()} {t.item()}\\n")
dist.destroy_process_group()
"""


SECRET = "hf_" + "Zq9" * 8
# Checks, while every launcher process of the job is alive, that no process on this machine (dsrun,
# pdsh, its relays, ssh clients, sshd sessions, agents, ranks: both "nodes") has the secret in its
# argv, plain or inside a base64 word; and that 300 KB of variables arrived whole (three of 100 KB:
# Linux caps one variable at 128 KiB when the rank itself is exec'd).
CHECK_ARGV = """
import base64, os, sys, torch, torch.distributed as dist
secret = os.environ["HF_TOKEN"].encode()
def leaked(data):
    if secret in data:
        return True
    for word in data.split(b"\\0"):
        if len(word) > 64:
            try:
                if secret in base64.urlsafe_b64decode(word + b"=" * (-len(word) % 4)):
                    return True
            except ValueError:
                pass
    return False
leaks = []
for pid in os.listdir("/proc"):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if pid.isdigit() and leaked(f.read()):
                leaks.append(pid)
    except OSError:
        pass
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
size = sum(len(os.environ[f"BIG_{i}"]) for i in range(3))
sys.stdout.write(f"RESULT {dist.get_rank()} {t.item()} {size} leaks={leaks}\\n")
dist.destroy_process_group()
"""

SLEEP = """
import os, sys, time
sys.stdout.write(f"STARTED {os.environ['RANK']}\\n")
sys.stdout.flush()
time.sleep(300)
"""


def dsrun(job_dir, env, *args, timeout=90):
    return subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "-H", str(job_dir / "hostfile"), *args],
                          cwd=str(job_dir), env=env, capture_output=True, text=True, timeout=timeout)


def results(stdout):
    return sorted(line.split("RESULT", 1)[1].split() for line in stdout.splitlines() if "RESULT" in line)


def job_processes(job_id):
    """Every process on this machine (both 'nodes') that belongs to the job: by env or agent spec."""
    from dsrun.launcher.transports.node_entry import agent_job_id
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if agent_job_id(proc.info["cmdline"] or []) == job_id or proc.environ().get("DSRUN_JOB_ID") == job_id:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def assert_no_job_processes(job_id, within=5.0):
    deadline = time.monotonic() + within
    while job_processes(job_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not job_processes(job_id), f"processes of {job_id} left behind"


def job_id_of(text):
    for word in text.replace(":", " ").split():
        if word.startswith("dsrun-") and len(word) == 14:
            return word
    raise AssertionError(f"no job id in: {text[-2000:]}")


def test_ssh_two_node_allreduce_with_literal_env(sshd, job_dir, clean_env):
    pwned = job_dir / "pwned"
    (job_dir / "ar.py").write_text(ALLREDUCE)
    (job_dir / ".deepspeed_env").write_text(f"X=$(touch {pwned})\nY=a b \"c\"\n")
    dry = json.loads(dsrun(job_dir, clean_env, "--dry_run", "ar.py").stdout)
    out = dsrun(job_dir, clean_env, "--master_port", "29651", "ar.py", "--flag", "two words")
    assert out.returncode == 0, out.stderr + out.stdout
    rows = results(out.stdout)
    assert [r[:5] for r in rows] == [["0", "2", "3.0", "0", "$(touch"], ["1", "2", "3.0", "1", "$(touch"]]
    assert all(" ".join(r).endswith("'--flag', 'two words']") for r in rows), rows
    assert dry["env"]["X"] == f"$(touch {pwned})" and " ".join(rows[0][6:]).startswith(dry["env"]["Y"].split()[0])
    assert f"{dry['env']['Y']}" in out.stdout
    assert not pwned.exists(), ".deepspeed_env value was executed by a shell"


def test_ssh_failing_rank_on_node_2_ends_everything(sshd, job_dir, clean_env):
    (job_dir / "fail.py").write_text(FAIL_ON_NODE_2)
    start = time.monotonic()
    out = dsrun(job_dir, clean_env, "--master_port", "29652", "--grace_period", "2", "--log_dir", "logs", "fail.py")
    assert out.returncode == 7, out.stderr + out.stdout
    assert time.monotonic() - start < 60
    assert_job_record(job_dir, out.stderr)
    assert_no_job_processes(job_id_of(out.stderr))


def assert_job_record(job_dir, stderr):
    """One job-level summary (the local renderer) and failure.json on the launching machine."""
    summary = stderr[stderr.rindex("dsrun: job "):]
    assert "Root cause (first failure): rank 1 (local_rank 0) on 127.0.0.2" in summary, stderr
    record = json.loads((job_dir / "logs" / "failure.json").read_text())
    assert record["node_rank"] is None and record["exitcode"] == 7
    assert (record["root_cause"]["rank"], record["root_cause"]["host"]) == (1, "127.0.0.2")
    assert str(job_dir / "logs" / "failure.json") in summary


@pytest.mark.parametrize("launcher", ["ssh", "pdsh"])
def test_large_env_and_secrets_stay_out_of_argv(sshd, job_dir, clean_env, launcher):
    (job_dir / "check.py").write_text(CHECK_ARGV)
    big = "".join(f"BIG_{i}={str(i) * 100_000}\n" for i in range(3))
    (job_dir / ".deepspeed_env").write_text(f"{big}WANDB_API_KEY={SECRET}k\n")
    env = {**pdsh_env(clean_env, sshd), "HF_TOKEN": SECRET}
    dry = dsrun(job_dir, env, "--launcher", launcher, "--dry_run", "check.py", SECRET)
    assert dry.returncode == 0 and SECRET not in dry.stdout and json.loads(dry.stdout)["env"]["HF_TOKEN"] == "***"
    out = dsrun(job_dir, env, "--launcher", launcher, "--master_port", "29657", "check.py")
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert sorted(r[:4] for r in results(out.stdout)) == [["0", "3.0", "300000", "leaks=[]"],
                                                          ["1", "3.0", "300000", "leaks=[]"]], out.stdout[-2000:]


def test_ssh_connect_errors_name_every_host(sshd, job_dir, clean_env):
    (job_dir / "hostfile").write_text("127.0.0.3 slots=1\n127.0.0.4 slots=1\n")
    (job_dir / "ar.py").write_text(ALLREDUCE)
    out = dsrun(job_dir, clean_env, "--ssh_port", str(sshd.port), "--ssh_connect_timeout", "3", "ar.py")
    assert out.returncode == 2
    assert "could not connect to 2 of 2 hosts" in out.stderr and "127.0.0.3" in out.stderr and "127.0.0.4" in out.stderr


def test_ssh_unknown_host_key_refused(sshd, job_dir, clean_env, tmp_path):
    config = open(sshd.config).read().replace(sshd.known_hosts, str(tmp_path / "empty_known_hosts"))
    home = tmp_path / "home2"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(config)
    (job_dir / "ar.py").write_text(ALLREDUCE)
    out = dsrun(job_dir, {**clean_env, "HOME": str(home)}, "ar.py")
    assert out.returncode == 2 and "host key unknown" in out.stderr and "--ssh_accept_unknown_hosts" in out.stderr


def pdsh_env(clean_env, sshd):
    return {**clean_env, "PDSH_SSH_ARGS_APPEND": sshd.ssh_args}


def test_pdsh_two_node_allreduce(sshd, job_dir, clean_env):
    require("pdsh")
    (job_dir / "ar.py").write_text(ALLREDUCE)
    out = dsrun(job_dir, pdsh_env(clean_env, sshd), "--launcher", "pdsh", "--master_port", "29653", "ar.py")
    assert out.returncode == 0, out.stderr + out.stdout
    assert [r[:4] for r in results(out.stdout)] == [["0", "2", "3.0", "0"], ["1", "2", "3.0", "1"]]


def test_pdsh_failing_rank_on_node_2_ends_everything(sshd, job_dir, clean_env):
    require("pdsh")
    (job_dir / "fail.py").write_text(FAIL_ON_NODE_2)
    out = dsrun(job_dir, pdsh_env(clean_env, sshd), "--launcher", "pdsh", "--master_port", "29654",
                "--grace_period", "2", "--log_dir", "logs", "fail.py")
    assert out.returncode == 7, out.stderr + out.stdout
    assert_job_record(job_dir, out.stderr)
    assert_no_job_processes(job_id_of(out.stderr))


def test_pdsh_unreachable_node_fails_fast_naming_it(sshd, job_dir, clean_env):
    require("pdsh")
    (job_dir / "hostfile").write_text("127.0.0.1 slots=1\n127.0.0.3 slots=1\n")  # nothing listens on .3
    (job_dir / "ar.py").write_text(ALLREDUCE)
    start = time.monotonic()
    out = dsrun(job_dir, pdsh_env(clean_env, sshd), "--launcher", "pdsh", "--ssh_port", str(sshd.port),
                "--master_port", "29658", "--grace_period", "2", "ar.py")
    assert out.returncode == 2, out.stderr + out.stdout
    assert time.monotonic() - start < 30  # not torch's 30-minute rendezvous timeout
    assert "Node 127.0.0.3 (node_rank 1) ended without a report: ssh could not connect" in out.stderr
    assert_no_job_processes(job_id_of(out.stderr))


def test_pdsh_sigkill_of_dsrun_leaves_no_orphans(sshd, job_dir, clean_env):
    require("pdsh")
    (job_dir / "sleep.py").write_text(SLEEP)
    log = job_dir / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dsrun.launcher.cli", "-H", str(job_dir / "hostfile"),
                                 "--launcher", "pdsh", "--grace_period", "2", "sleep.py"], cwd=str(job_dir),
                                env=pdsh_env(clean_env, sshd), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("STARTED") < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert log.read_text().count("STARTED") == 2, log.read_text()
        launched = psutil.Process(proc.pid).children(recursive=True)  # pdsh, ssh clients, relay feeders
        words = [w for p in launched for w in " ".join(p.cmdline()).split()]
        assert words.count("pdsh") == 1, words
        job_id = next(w for w in words if w.startswith("dsrun-"))
    finally:
        proc.kill()
        proc.wait()
    assert_no_job_processes(job_id, within=10.0)
    gone, alive = psutil.wait_procs(launched, timeout=10)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


def mpi_env(clean_env):
    # As root, Open MPI refuses to start without these (CI runs as root).
    return {**clean_env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def test_openmpi_two_node_allreduce(sshd, job_dir, clean_env):
    require("mpirun")
    require("ompi_info")
    (job_dir / "ar.py").write_text(ALLREDUCE)
    args = f"--oversubscribe --mca plm_rsh_args '{sshd.ssh_args}'"
    out = dsrun(job_dir, mpi_env(clean_env), "--launcher", "openmpi", "--launcher_args", args,
                "--master_port", "29655", "ar.py")
    assert out.returncode == 0, out.stderr + out.stdout
    assert [r[:4] for r in results(out.stdout)] == [["0", "2", "3.0", "0"], ["1", "2", "3.0", "1"]]


def test_plain_mpirun_discovers_ranks(tmp_path, clean_env):
    require("mpirun")
    (tmp_path / "mpi.py").write_text(MPI_DISCOVERY)
    env = {k: v for k, v in mpi_env(clean_env).items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["MASTER_PORT"] = "29656"
    out = subprocess.run(["mpirun", "--oversubscribe", "-x", "MASTER_PORT", "-np", "3", sys.executable, "mpi.py"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr + out.stdout
    assert results(out.stdout) == [["0", "3", "6.0"], ["1", "3", "6.0"], ["2", "3", "6.0"]]

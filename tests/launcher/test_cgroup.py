"""Descendants that leave their rank's process group (`setsid`, a double fork) end with the job.

Through the real CLI (`python -m dsrun.launcher.cli --num_gpus 2`, CPU ranks): each rank of
scripts/escape.py starts a child in a new session and a double-forked daemon. Whatever happens to the
job (it ends normally, a rank fails, dsrun is SIGKILLed) none of them may survive it. Every scenario
runs twice: with the job cgroup where this machine allows one (`auto`; launcher/cgroup.py) and with
the process-group fallback forced by `DSRUN_CGROUP=off` (launcher/procs.py, [Note: no orphans]).
The agent's debug note says which one it used, and each rank records the cgroup it ran in. Both ways
of killing a job cgroup (`cgroup.kill`; freeze and SIGKILL on older kernels) are tested on their own.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

ESCAPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "escape.py")
MODES = ["auto", "off"]


def start(tmp_path, mode, script_mode):
    """dsrun in the background; its stderr goes to a file the test can read while it runs."""
    err = open(tmp_path / "dsrun.err", "w")
    env = {**os.environ, "DSRUN_TEST_OUT": str(tmp_path), "DSRUN_CGROUP": mode}
    try:
        return subprocess.Popen([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", "--log_level",
                                 "debug", "--grace_period", "2", ESCAPE, script_mode],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    finally:
        err.close()


def stderr_of(tmp_path):
    return (tmp_path / "dsrun.err").read_text()


def records(tmp_path, timeout=30.0):
    """Both ranks' records, once written."""
    deadline = time.monotonic() + timeout
    files = [tmp_path / f"pids{r}.json" for r in range(2)]
    while not all(f.exists() for f in files):
        assert time.monotonic() < deadline, f"ranks did not start in time:\n{stderr_of(tmp_path)}"
        time.sleep(0.05)
    return [json.loads(f.read_text()) for f in files]


def job_cgroup(tmp_path):
    """The job cgroup dsrun reported using, or None."""
    found = re.search(r"supervision: job cgroup (\S+)", stderr_of(tmp_path))
    return found.group(1) if found else None


def check_supervision(tmp_path, mode, recs):
    """The agent said which supervision it used, `off` forced the fallback, and the ranks ran in the
    cgroup it named (or in none of dsrun's)."""
    err = stderr_of(tmp_path)
    path = job_cgroup(tmp_path)
    if mode == "off":
        assert "supervision: process groups (DSRUN_CGROUP=off)" in err, err
    assert path is not None or "supervision: process groups" in err, err
    for rec in recs:
        if path is not None:
            assert path.endswith(rec["cgroup"]), (path, rec["cgroup"])
        else:
            assert "/dsrun-" not in (rec["cgroup"] or ""), rec["cgroup"]
    return path


def alive(pids):
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def assert_all_gone(recs, cgroup_path, within=3.0):
    pids = [pid for rec in recs for pid in rec["pids"].values()]
    deadline = time.monotonic() + within
    while (alive(pids) or (cgroup_path and os.path.exists(cgroup_path))) and time.monotonic() < deadline:
        time.sleep(0.02)
    survivors = alive(pids)
    for pid in survivors:  # clean up before failing, so one bad test does not poison the others
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"escaped processes survived: {survivors}"
    assert not (cgroup_path and os.path.exists(cgroup_path)), f"job cgroup {cgroup_path} left behind"


@pytest.mark.parametrize("mode", MODES)
def test_normal_end_leaves_nothing_running(tmp_path, mode):
    proc = start(tmp_path, mode, "end")
    assert proc.wait(timeout=60) == 0, stderr_of(tmp_path)
    recs = records(tmp_path, timeout=0)
    assert_all_gone(recs, job_cgroup(tmp_path), within=0.5)
    check_supervision(tmp_path, mode, recs)
    assert "the ranks have exited; ending what they left running" in stderr_of(tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_failure_leaves_nothing_running(tmp_path, mode):
    proc = start(tmp_path, mode, "fail")
    assert proc.wait(timeout=60) == 3, stderr_of(tmp_path)
    recs = records(tmp_path, timeout=0)
    assert_all_gone(recs, job_cgroup(tmp_path), within=0.5)
    check_supervision(tmp_path, mode, recs)


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_of_dsrun_leaves_nothing_running(tmp_path, mode):
    proc = start(tmp_path, mode, "sleep")
    try:
        recs = records(tmp_path)
        path = job_cgroup(tmp_path)
        if path is None and "supervision: process groups" in stderr_of(tmp_path):
            # the fallback: the guardian only knows the groups the agent's scan has handed it
            groups = {os.getpgid(pid) for rec in recs for key, pid in rec["pids"].items() if key != "rank"}
            deadline = time.monotonic() + 10.0
            while not all(f"watching process group {g} " in stderr_of(tmp_path) for g in groups):
                assert time.monotonic() < deadline, f"groups {groups} never watched:\n{stderr_of(tmp_path)}"
                time.sleep(0.05)
        proc.kill()
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert_all_gone(recs, path)
    check_supervision(tmp_path, mode, recs)


def cgroup_v2_writable():
    """This test's own probe (not dsrun's): can we create a cgroup below our own in a cgroup2 mount?"""
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[2:3] == ["cgroup2"]]
    with open("/proc/self/cgroup") as f:
        own = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    if not mounts or own is None:
        return False
    probe = os.path.join(mounts[0] + own, f"dsrun-test-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def test_job_cgroup_is_used_where_cgroup_v2_is_writable(tmp_path):
    """CI runs as root: where this machine has a writable cgroup v2, the cgroup path is the one tested."""
    proc = start(tmp_path, "auto", "end")
    assert proc.wait(timeout=60) == 0, stderr_of(tmp_path)
    path = job_cgroup(tmp_path)
    assert_all_gone(records(tmp_path, timeout=0), path, within=0.5)
    assert (path is not None) == cgroup_v2_writable(), stderr_of(tmp_path)


def test_in_process_agent_reaps_what_it_adopted_and_restores_the_subreaper(tmp_path):
    """Without a cgroup, an in-process agent (as `dsrun` runs one) adopts orphans; it must leave its
    host process as it found it: no zombie children, not a subreaper."""
    import ctypes
    import io

    from dsrun.launcher.agent import NodeAgent
    from dsrun.launcher.spec import AgentSpec, WorkerOptions

    worker = WorkerOptions(script=ESCAPE, script_args=("end",), python=sys.executable, grace_period=2.0,
                           log_level="debug", log_dir=str(tmp_path / "logs"))
    spec = AgentSpec(job_id="adopt-job", world_info={"localhost": [0, 1]}, node_rank=0, master_addr="127.0.0.1",
                     master_port=29500, env={"DSRUN_TEST_OUT": str(tmp_path)}, worker=worker, cwd=str(tmp_path),
                     devices=())
    err = io.StringIO()
    before = {p.pid for p in psutil.Process().children()}
    code = NodeAgent(spec, out=io.StringIO(), err=err, environ={**os.environ, "DSRUN_CGROUP": "off"}).run()
    assert code == 0, err.getvalue()
    assert "supervision: process groups (DSRUN_CGROUP=off)" in err.getvalue()
    assert_all_gone(records(tmp_path, timeout=0), None, within=0.5)
    new = [p for p in psutil.Process().children() if p.pid not in before]
    assert not new, [(p.pid, p.status()) for p in new]
    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(-1)
    assert libc.prctl(37, ctypes.byref(flag), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
    assert flag.value == 0


FORKER = """
import os, time
while True:  # a new process in a new session every few milliseconds, until killed
    if os.fork() == 0:
        os.setsid()
        time.sleep(300)
        os._exit(0)
    time.sleep(0.005)
"""


@pytest.mark.parametrize("use_kill_file", [True, False], ids=["cgroup.kill", "freeze-and-kill"])
def test_kill_tree_ends_a_forking_tree(tmp_path, use_kill_file):
    """Both ways of killing a job cgroup (`cgroup.kill`, and freeze + SIGKILL for kernels before 5.14)
    end a tree that keeps forking into new sessions while it is being killed."""
    from dsrun.launcher import cgroup, procs

    if not cgroup_v2_writable():
        pytest.skip("this machine has no writable cgroup v2; the fallback tests above cover it")
    job, why = cgroup.create_job_cgroup("kill-tree-test", 0, {})
    assert job is not None, why
    try:
        root = subprocess.Popen([sys.executable, "-c", FORKER],
                                preexec_fn=procs.preexec_tied_to(os.getpid(), cgroup_procs=job.procs_file))
        deadline = time.monotonic() + 10.0
        while len(job.members()) < 10:
            assert time.monotonic() < deadline, job.members()
            time.sleep(0.02)
        members = job.members()
        assert cgroup.kill_tree(job.path, use_kill_file=use_kill_file)
        assert not job.populated() and job.members() == []
        assert not alive(members)
        root.wait(timeout=5)
    finally:
        job.remove()
    assert not os.path.exists(job.path)

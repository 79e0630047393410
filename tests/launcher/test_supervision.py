"""Supervision with real processes: nothing survives a failure, a signal or a SIGKILL of the agent.

Each test starts `python -m dsrun.launcher.agent` (the process a user or a transport would signal),
waits until every rank has recorded its pids (and its grandchild's), acts, and then checks with psutil
that every recorded process is gone.
"""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from dsrun.launcher.agent import pid_file_path
from dsrun.launcher.failure import parse_marker_line
from dsrun.launcher.spec import AgentSpec, WorkerOptions

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "worker.py")


def make_spec(tmp_path, *script_args, nproc=2, **worker_kw):
    worker_kw.setdefault("grace_period", 2.0)
    worker_kw.setdefault("log_dir", str(tmp_path / "logs"))
    worker = WorkerOptions(script=WORKER, script_args=tuple(script_args), python=sys.executable, **worker_kw)
    return AgentSpec(job_id="sup-job", world_info={"localhost": list(range(nproc))}, node_rank=0,
                     master_addr="127.0.0.1", master_port=29500, env={"DSRUN_TEST_OUT": str(tmp_path)},
                     worker=worker, cwd=str(tmp_path), devices=())


def start_agent(spec, *extra, stdin=subprocess.DEVNULL):
    """The agent as transports start it: the spec as one line on stdin, which stays open only when the
    caller asks for a pipe (a lifeline)."""
    proc = subprocess.Popen([sys.executable, "-m", "dsrun.launcher.agent", "--job_id", spec.job_id, *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(spec.to_json() + "\n")
    proc.stdin.flush()
    if stdin is not subprocess.PIPE:
        proc.stdin.close()
        proc.stdin = None
    return proc


def marker(out):
    """The failure report a remote agent prints as its last stdout line for its driver (it prints no panel)."""
    reports = [parse_marker_line(line) for line in out.splitlines()]
    reports = [r for r in reports if r is not None]
    assert reports, out
    return reports[-1]


def wait_for_pids(tmp_path, nproc=2, timeout=30.0):
    """Every pid the ranks recorded (ranks and grandchildren), once all ranks have written theirs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [tmp_path / f"pids{r}.json" for r in range(nproc)]
        if all(f.exists() for f in files):
            return [pid for f in files for pid in json.loads(f.read_text()).values()]
        time.sleep(0.05)
    raise AssertionError("ranks did not start in time")


def alive(pids):
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def assert_all_gone(pids, within=1.0):
    deadline = time.monotonic() + within
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    survivors = alive(pids)
    for pid in survivors:  # clean up before failing, so one bad test does not poison the others
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"orphans survived: {survivors}"


def finish(proc, timeout=30):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_failure_with_grandchildren_leaves_nothing(tmp_path):
    proc = start_agent(make_spec(tmp_path, "tree", "1", "4"))
    pids = wait_for_pids(tmp_path)
    rc, out, err = finish(proc)
    assert rc == 4, err
    assert_all_gone(pids)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_to_the_agent_stops_everything(tmp_path, sig):
    proc = start_agent(make_spec(tmp_path, "sleep", "60", save_pid=True))
    pids = wait_for_pids(tmp_path)
    assert os.path.exists(pid_file_path(proc.pid))
    started = time.monotonic()
    proc.send_signal(sig)
    rc, out, err = finish(proc)
    assert rc == 128 + sig, err
    assert time.monotonic() - started < 2.0  # the ranks obey SIGTERM/SIGINT: no need to wait for the grace
    assert_all_gone(pids)
    assert not os.path.exists(pid_file_path(proc.pid)), "--save_pid file left behind on the signal path"
    assert marker(out)["signal"] == signal.Signals(sig).name  # a remote agent reports to its driver


def test_sigkill_of_the_agent_leaves_no_orphans(tmp_path):
    proc = start_agent(make_spec(tmp_path, "sleep", "60"))
    pids = wait_for_pids(tmp_path)
    proc.kill()
    proc.wait(timeout=10)
    proc.communicate()
    assert_all_gone(pids, within=1.0)


def test_a_rank_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
    started = time.monotonic()
    proc = start_agent(make_spec(tmp_path, "ignore_term", "3", grace_period=1.0, save_pid=True))
    pids = wait_for_pids(tmp_path)
    rc, out, err = finish(proc)
    elapsed = time.monotonic() - started
    assert rc == 3, err
    assert 1.0 <= elapsed < 10.0
    assert {"rank": 0, "how": "SIGKILL after 1s grace"}.items() <= marker(out)["terminated"][0].items()
    assert_all_gone(pids)
    assert not os.path.exists(pid_file_path(proc.pid)), "--save_pid file left behind after a failure"


def test_failure_is_seen_within_a_tenth_of_a_second(tmp_path):
    proc = start_agent(make_spec(tmp_path, "exit", "1", "3", "0.5"))
    rc, out, err = finish(proc)
    exited = time.time()
    death = json.loads((tmp_path / "death1.json").read_text())["time"]
    assert rc == 3, err
    # death -> agent exit includes the survivor's SIGTERM handling and our reap; on a loaded 2-core
    # box that is well under a second (benchmarks/launcher_bench.py measures it properly)
    assert exited - death < 1.0, exited - death
    record = json.loads((tmp_path / "logs" / "failure.json").read_text())
    assert record["root_cause"]["timestamp"] - death < 0.1


def test_lifeline_eof_tears_the_node_down(tmp_path):
    proc = start_agent(make_spec(tmp_path, "sleep", "60"), "--lifeline", "stdin", stdin=subprocess.PIPE)
    pids = wait_for_pids(tmp_path)
    proc.stdin.close()  # the ssh connection dropped
    proc.stdin = None  # so that communicate() does not flush it
    rc, out, err = finish(proc)
    assert rc == 128 + signal.SIGHUP, err
    assert_all_gone(pids)
    assert marker(out)["signal"] == "lifeline EOF"


def test_second_signal_kills_at_once(tmp_path):
    proc = start_agent(make_spec(tmp_path, "ignore_term", "0", grace_period=30.0))
    pids = wait_for_pids(tmp_path)
    time.sleep(0.7)  # rank 1 has exited 0; rank 0 ignores SIGTERM
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = finish(proc)
    assert rc == 128 + signal.SIGTERM, err
    assert time.monotonic() - started < 5.0
    assert_all_gone(pids)


def test_sigkill_of_the_dsrun_command_leaves_no_orphans(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", WORKER, "sleep", "60"],
                            cwd=tmp_path,
                            env={**os.environ, "DSRUN_TEST_OUT": str(tmp_path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = wait_for_pids(tmp_path)
    proc.kill()
    proc.wait(timeout=10)
    assert_all_gone(pids, within=1.0)

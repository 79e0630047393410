"""The node agent with real processes: worker environment, argv, exit codes, output, records, restarts.

Most tests run `NodeAgent` in process (as `dsrun` does for local jobs) with output captured into
strings; a few run `python -m dsrun.launcher.agent` (as remote transports do) or the `dsrun` command.
Supervision under signals lives in test_supervision.py.
"""
import io
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from dsrun.errors import LaunchError
from dsrun.launcher.agent import NodeAgent, pid_file_path, worker_env
from dsrun.launcher.failure import FAILURE_MARKER, FailureReport, RankFailure, parse_marker_line
from dsrun.launcher.output import print_failure
from dsrun.launcher.spec import AgentSpec, LaunchPlan, WorkerOptions

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
WORKER = os.path.join(SCRIPTS, "worker.py")


def make_spec(tmp_path, *script_args, nproc=2, script=WORKER, world_info=None, node_rank=0, env=None,
              master_port=29500, **worker_kw):
    worker_kw.setdefault("grace_period", 2.0)
    worker_kw.setdefault("log_dir", str(tmp_path / "logs"))
    worker = WorkerOptions(script=script, script_args=tuple(script_args), python=sys.executable, **worker_kw)
    return AgentSpec(job_id="test-job", world_info=world_info or {"localhost": list(range(nproc))},
                     node_rank=node_rank, master_addr="127.0.0.1", master_port=master_port,
                     env={"DSRUN_TEST_OUT": str(tmp_path), **(env or {})}, worker=worker, cwd=str(tmp_path),
                     devices=())


def run_in_process(spec):
    out, err = io.StringIO(), io.StringIO()
    agent = NodeAgent(spec, out=out, err=err)
    code = agent.run()
    return code, out.getvalue(), err.getvalue(), agent


def read_json(path):
    with open(path) as f:
        return json.load(f)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ environment contract
def test_worker_env_is_a_new_dict_with_the_contract(tmp_path):
    spec = make_spec(tmp_path, world_info={"a": [0, 1, 2], "b": [4, 5]}, node_rank=1, env={"FROM_SPEC": "1"})
    spec = AgentSpec(**{**spec.__dict__, "devices": None})
    base = {"PATH": "/bin", "RANK": "stale"}
    env = worker_env(spec, 1, restart_count=2, base=base, has_gpus=True)
    assert base == {"PATH": "/bin", "RANK": "stale"}
    expected = {"RANK": "4", "LOCAL_RANK": "1", "WORLD_SIZE": "5", "LOCAL_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                "NODE_RANK": "1", "GROUP_RANK": "1", "CROSS_RANK": "1", "CROSS_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "DSRUN_JOB_ID": "test-job",
                "TORCHELASTIC_RUN_ID": "test-job", "DSRUN_RESTART_COUNT": "2", "TORCHELASTIC_RESTART_COUNT": "2",
                "TORCHELASTIC_MAX_RESTARTS": "0", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "4,5",
                "FROM_SPEC": "1", "PATH": "/bin"}
    assert {k: env.get(k) for k in expected} == expected


@pytest.mark.parametrize("devices, has_gpus, expected", [
    (None, False, None),  # CPU node, agent decides: leave it alone
    (None, True, "0,1"),  # GPU node, agent decides: the slot ids (DeepSpeed)
    ((), True, None),  # planner says no GPUs
    (("3", "GPU-abc"), False, "3,GPU-abc"),  # planner mapped slots onto the user's mask
])
def test_cuda_visible_devices(tmp_path, devices, has_gpus, expected):
    spec = AgentSpec(**{**make_spec(tmp_path).__dict__, "devices": devices})
    assert worker_env(spec, 0, base={}, has_gpus=has_gpus).get("CUDA_VISIBLE_DEVICES") == expected


def test_bind_cores_sets_omp_threads(tmp_path):
    spec = make_spec(tmp_path, bind_cores_to_rank=True, bind_core_list=(0, 1, 2, 3, 4))
    assert worker_env(spec, 1, base={}).get("OMP_NUM_THREADS") == "2"


def test_environment_reaches_each_rank(tmp_path):
    spec = make_spec(tmp_path, "env", save_pid=True)
    code, out, err, _ = run_in_process(spec)
    assert code == 0, err
    for local_rank in (0, 1):
        data = read_json(tmp_path / f"rank{local_rank}.json")
        env = data["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == \
            (str(local_rank), str(local_rank), "2", "2")
        assert env["NODE_RANK"] == env["CROSS_RANK"] == env["GROUP_RANK"] == "0"
        assert env["DSRUN_JOB_ID"] == "test-job" and env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["PYTHONUNBUFFERED"] == "1" and env["DSRUN_TEST_OUT"] == str(tmp_path)
        assert data["argv"][1:] == [f"--local_rank={local_rank}", "env"]
        assert os.path.realpath(data["cwd"]) == os.path.realpath(tmp_path)
        assert data["pid_file_exists"], "--save_pid file must exist while the job runs"
    assert not os.path.exists(pid_file_path(os.getpid())), "--save_pid file left behind after success"
    assert "RANK" not in os.environ


ODD_ARGS = ["I am 6' tall", 'I am 72" tall', '"translate English to Romanian: "',
            'I\'m going to tell them "DeepSpeed is the best"', "a  b", "$HOME", "--flag=x y", ""]


def test_user_args_reach_the_script_unchanged_in_process(tmp_path):
    code, out, err, _ = run_in_process(make_spec(tmp_path, "echo", *ODD_ARGS, nproc=1))
    assert code == 0, err
    assert out.startswith("[rank 0] ")
    assert json.loads(out[len("[rank 0] "):]) == ["--local_rank=0", "echo", *ODD_ARGS]


def test_user_args_reach_the_script_through_the_module_entry(tmp_path):
    spec = make_spec(tmp_path, "echo", *ODD_ARGS, nproc=1)
    proc = subprocess.run([sys.executable, "-m", "dsrun.launcher.agent", "--job_id", spec.job_id],
                          input=spec.to_json() + "\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.split(" ", 2)[2]) == ["--local_rank=0", "echo", *ODD_ARGS]


def test_user_args_through_the_dsrun_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", WORKER, "echo", *ODD_ARGS], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert [json.loads(line.split(" ", 2)[2]) for line in lines] == \
        [[f"--local_rank={r}", "echo", *ODD_ARGS] for r in (0, 1)]


def test_dsrun_command_propagates_the_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", WORKER, "exit", "1", "5"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env={**os.environ, "DSRUN_TEST_OUT": str(tmp_path)})
    assert proc.returncode == 5, proc.stderr
    assert "Root cause (first failure): rank 1" in proc.stderr


# ------------------------------------------------------------------ exit codes and failure records
@pytest.mark.parametrize("args, code, signame", [
    (("exit", "1", "3"), 3, None),
    (("exit", "0", "5"), 5, None),
    (("kill", "1", "9"), 137, "SIGKILL"),
])
def test_exit_code_is_the_root_cause_ranks(tmp_path, args, code, signame):
    rc, out, err, agent = run_in_process(make_spec(tmp_path, *args))
    assert rc == code, err
    failing = int(args[1])
    record = read_json(tmp_path / "logs" / "failure.json")
    root = record["root_cause"]
    assert (root["rank"], root["exitcode"], root["signal"], root["host"]) == (failing, code, signame, "localhost")
    assert root["pid"] == read_json(tmp_path / f"pids{failing}.json")["rank"]
    assert f"rank {failing} failing now" in root["tail"]
    assert [t["rank"] for t in record["terminated"]] == [1 - failing]
    assert err.index("Root cause (first failure): rank %d" % failing) >= 0
    assert str(tmp_path / "logs" / "failure.json") in err
    if signame == "SIGKILL":
        assert "OOM" in err
    assert FAILURE_MARKER not in out  # the marker line is for remote agents only


def test_module_entry_prints_the_failure_marker_last(tmp_path):
    spec = make_spec(tmp_path, "exit", "1", "3")
    proc = subprocess.run([sys.executable, "-m", "dsrun.launcher.agent", "--job_id", spec.job_id],
                          input=spec.to_json() + "\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    last = proc.stdout.splitlines()[-1]
    assert last.startswith(FAILURE_MARKER + " ")
    record = parse_marker_line(last)
    assert record["root_cause"]["rank"] == 1 and record["exitcode"] == 3 and record["job_id"] == "test-job"


def test_a_rank_that_cannot_start_is_reported_and_not_restarted(tmp_path):
    spec = make_spec(tmp_path, script=str(tmp_path / "missing-program"), no_python=True, max_restarts=3)
    rc, out, err, agent = run_in_process(spec)
    assert rc == 127
    assert agent.restart_count == 0
    assert "could not start" in err


def test_failure_panel_on_a_terminal_is_a_rich_panel():
    report = FailureReport(job_id="j", host="h", node_rank=0, failures=[
        RankFailure(rank=3, local_rank=1, host="h", pid=42, exitcode=137, signal="SIGKILL", timestamp=2.0,
                    tail=["[not markup] boom"]),
        RankFailure(rank=0, local_rank=0, host="h", pid=41, exitcode=1, signal=None, timestamp=3.0)])
    stream = io.StringIO()
    print_failure(report, "/x/failure.json", stream=stream, colour=True)
    text = stream.getvalue()
    assert "\x1b[" in text and "╭" in text
    assert "[not markup] boom" in text
    assert text.index("rank 3") < text.index("Other failed ranks") < text.index("rank 0 (local_rank 0)")


# ------------------------------------------------------------------ output
def test_lines_are_prefixed_and_never_interleaved(tmp_path):
    rc, out, err, _ = run_in_process(make_spec(tmp_path, "spam", "400"))
    assert rc == 0
    for stream, word, fill in ((out, "out", "x"), (err, "err", "y")):
        lines = stream.splitlines()
        assert len(lines) == 800
        pattern = re.compile(rf"^\[rank ([01])\] {word} (\d+) {fill}{{50}}$")
        assert all(pattern.match(line) for line in lines), [l for l in lines if not pattern.match(l)][:3]
        for rank in "01":  # each rank's lines in order
            numbers = [int(m.group(2)) for m in map(pattern.match, lines) if m.group(1) == rank]
            assert numbers == list(range(400))


def test_host_in_the_prefix_for_multi_node_jobs(tmp_path):
    spec = make_spec(tmp_path, "echo", world_info={"localhost": [0], "other": [0]})
    rc, out, err, _ = run_in_process(spec)
    assert rc == 0 and out.startswith("[localhost:rank 0] ")


def test_each_rank_log_goes_to_files_only(tmp_path):
    logs = tmp_path / "ranks"
    rc, out, err, _ = run_in_process(make_spec(tmp_path, "spam", "3", each_rank_log_dir=str(logs)))
    assert rc == 0 and out == ""
    names = sorted(os.listdir(logs))
    assert [re.sub(r"^\d{14}_", "", n) for n in names] == ["rank0.test-job.log", "rank1.test-job.log"]
    text = (logs / names[0]).read_text()
    assert "out 2 " in text and "err 2 " in text and "[rank" not in text


def test_each_rank_log_that_is_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "afile"
    target.write_text("")
    with pytest.raises(LaunchError, match="should be a directory"):
        run_in_process(make_spec(tmp_path, "echo", each_rank_log_dir=str(target)))


def test_failure_tail_comes_from_the_rank_log_file(tmp_path):
    spec = make_spec(tmp_path, "exit", "1", "3", each_rank_log_dir=str(tmp_path / "ranks"), log_dir=None)
    rc, out, err, _ = run_in_process(spec)
    assert rc == 3
    record = read_json(tmp_path / "ranks" / "test-job" / "failure.json")  # job-scoped: the folder may be shared
    assert record["root_cause"]["tail"] == ["rank 1 failing now"]
    assert record["root_cause"]["log_file"].endswith("_rank1.test-job.log")


# ------------------------------------------------------------------ restarts
def test_restarts_rerun_the_whole_group_with_the_count(tmp_path):
    rc, out, err, agent = run_in_process(make_spec(tmp_path, "restart", "2", max_restarts=2))
    assert rc == 0, err
    assert agent.restart_count == 2
    for attempt in range(2):  # a failed attempt is torn down at its first failure: one rank may not print
        assert re.search(rf"^\[rank [01]\] attempt {attempt}$", out, re.M)
    assert "[rank 0] attempt 2" in out and "[rank 1] attempt 2" in out
    assert "restarting, attempt 2 of 3" in err


def test_restarts_exhausted_returns_the_rank_code(tmp_path):
    rc, out, err, agent = run_in_process(make_spec(tmp_path, "restart", "5", max_restarts=1))
    assert rc == 7 and agent.restart_count == 1
    assert read_json(tmp_path / "logs" / "failure.json")["root_cause"]["restart_count"] == 1


# ------------------------------------------------------------------ torch.distributed and execute()
def test_two_rank_gloo_all_reduce(tmp_path):
    spec = make_spec(tmp_path, script=os.path.join(SCRIPTS, "allreduce.py"), no_local_rank=True,
                     master_port=free_port())
    rc, out, err, _ = run_in_process(spec)
    assert rc == 0, err
    assert "[rank 0] sum=3" in out


def test_execute_runs_a_local_plan_in_process(tmp_path, capfd):
    from dsrun.launcher.execute import execute, runs_in_process

    spec = make_spec(tmp_path, "exit", "0", "4")
    plan = LaunchPlan(world_info=spec.world_info, master_addr=spec.master_addr, master_port=spec.master_port,
                      launcher="local", node_rank=None, env=spec.env, commands=(), agents=(spec,),
                      job_id=spec.job_id, worker=spec.worker)
    assert runs_in_process(plan)
    assert execute(plan) == 4
    assert "Root cause (first failure): rank 0" in capfd.readouterr().err

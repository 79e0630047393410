"""Hostile and careless input through the real CLI (issue 10, defects 7-11): each is exit 2 with a message
naming the file:line or flag, no traceback, quickly; concurrent jobs never mix; planning is O(hosts).

Validation runs through click's CliRunner on `dsrun.launcher.cli` (nothing stubbed); what happens in
ranks runs `python -m dsrun.launcher.cli` as a subprocess, with PYTHONPATH pointing at this checkout.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import types

import pytest
from click.testing import CliRunner

from dsrun.launcher.cli import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def box(tmp_path, monkeypatch):
    """An isolated working directory and HOME, no GPUs, no default hostfile."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    (work / "t.py").write_text("")  # dsrun checks that the script exists before launching
    env = {"CUDA_VISIBLE_DEVICES": "", "DLTS_HOSTFILE": str(tmp_path / "no-hostfile"), "HOME": str(home),
           "DS_ENV_FILE": None}
    return types.SimpleNamespace(work=work, home=home, env=env, tmp=tmp_path)


def run(box, *args):
    return CliRunner().invoke(cli, list(args), env=box.env, prog_name="dsrun")


def write(box, name, text):
    path = box.tmp / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return str(path)


def assert_usage_error(result, *fragments):
    """exit 2, every fragment in the message, no traceback."""
    output = result.output if hasattr(result, "output") else result.stdout + result.stderr
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 2, output
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in output, (fragment, output)


def dsrun_env(box, **extra):
    env = {k: v for k, v in os.environ.items() if k != "DS_ENV_FILE"}
    env.update({k: v for k, v in box.env.items() if v is not None})
    env["PYTHONPATH"] = REPO  # this checkout, in dsrun and (through dsrun's export) in every rank
    env.update(extra)
    return env


def dsrun_cmd(*args):
    return [sys.executable, "-m", "dsrun.launcher.cli", *args]


# ------------------------------------------------------------------ 7: zero slots
def test_a_hostfile_without_any_slot_is_an_error_not_an_empty_success(box):
    for name, text in (("hf", "a slots=0\nb slots=0\n"), ("hf.yaml", "hosts:\n  - {host: a, slots: 0}\n")):
        path = write(box, name, text)
        assert_usage_error(run(box, "-H", path, "t.py"), path, "no host has any slots")
    path = write(box, "hf2", "a slots=0\nb slots=2\n")
    assert_usage_error(run(box, "-H", path, "-i", "a", "t.py"), "--include")


def test_the_master_is_the_first_host_that_runs_ranks(box):
    path = write(box, "hf", "idle slots=0\nw1 slots=2\nw2 slots=1\n")
    result = run(box, "--dry_run", "-H", path, "t.py")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["master_addr"] == "w1"
    assert out["world_info"] == {"w1": [0, 1], "w2": [0]} and out["world_size"] == 3
    assert [c["host"] for c in out["commands"]] == ["w1", "w2"]


# ------------------------------------------------------------------ 9: tracebacks and hangs
@pytest.mark.parametrize("text, line", [
    ("w0 slots=1\nw1 slots=100000000\n", 2),
    ("w0 slots=" + "9" * 10000 + "\n", 1),
    ("hosts:\n  - {host: w0, slots: 1}\n  - {host: w1, slots: 100000000}\n", 3),
])
def test_huge_slot_counts_are_refused_fast(box, text, line):
    path = write(box, "hf.yaml" if text.startswith("hosts") else "hf", text)
    started = time.monotonic()
    assert_usage_error(run(box, "--dry_run", "-H", path, "t.py"), f"{path}:{line}", "at most 65536 slots per host")
    assert time.monotonic() - started < 5


def test_a_hostfile_above_the_world_size_limit_is_refused(box):
    path = write(box, "hf", "".join(f"w{i} slots=65536\n" for i in range(17)))
    assert_usage_error(run(box, "--dry_run", "-H", path, "t.py"), f"{path}:17", "at most 1048576 in total")


@pytest.mark.parametrize("args, where", [
    (["--bind_cores_to_rank", "--bind_core_list", "0-99999999999"], "--bind_core_list: core 99999999999"),
    (["--bind_cores_to_rank", "--bind_core_list", "0,70000"], "--bind_core_list: core 70000"),
    (["--grace_period", "nan"], "--grace_period"),
    (["--grace_period", "inf"], "--grace_period"),
    (["--ssh_connect_timeout", "nan"], "--ssh_connect_timeout"),
    (["--num_gpus", "-5"], "--num_gpus: -5 is out of range"),
    (["--num_gpus", "100000000"], "--num_gpus: 100000000 is out of range"),
    (["--num_nodes", "-3"], "--num_nodes: -3 is out of range"),
])
def test_flag_values_out_of_range(box, args, where):
    started = time.monotonic()
    assert_usage_error(run(box, "--dry_run", *args, "t.py"), where)
    assert time.monotonic() - started < 5


def test_minus_one_still_means_not_given(box):
    result = run(box, "--dry_run", "--num_gpus", "-1", "--num_nodes", "-1", "--grace_period", "0", "t.py")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name, text, line, fragment", [
    ("hf.yaml", "hosts:\n  - {host: a, slots: 1}\nhosts:\n  - {host: b, slots: 1}\n", 3, "`hosts:` is given twice"),
    ("hf.yaml", "hosts:\n  - host: a\n    slots: 1\n    slots: 4\n", 4, "`slots` is given twice"),
    ("hf.yaml", "hosts:\n  - host: a\n    host: b\n    slots: 1\n", 3, "`host` is given twice"),
    ("hf", "ok slots=1\n-oProxyCommand slots=1\n", 2, "starts with '-'"),
    ("hf", "ok slots=1\nuser@-x slots=1\n", 2, "starts with '-'"),
    ("hf.yaml", "hosts:\n  - {host: ok, slots: 1}\n  - {host: -x, slots: 1}\n", 3, "starts with '-'"),
    ("hf", "a,b slots=1\n", 1, "contains ','"),
    ("hf", "ok slots=1\na\x00b slots=1\n", 2, "control character"),
])
def test_hostfile_entries_that_would_be_misread(box, name, text, line, fragment):
    path = write(box, name, text)
    assert_usage_error(run(box, "--dry_run", "-H", path, "--launcher", "pdsh", "t.py"), f"{path}:{line}", fragment)


def test_a_nul_byte_in_deepspeed_env_is_a_located_error(box):
    (box.work / ".deepspeed_env").write_bytes(b"GOOD=1\n# fine\nBAD=a\x00b\n")
    script = write(box, "never.py", "raise SystemExit('must not run')\n")
    result = run(box, "--num_gpus", "1", script)  # a real run: the NUL used to reach exec as a ValueError
    assert_usage_error(result, f"{box.work / '.deepspeed_env'}:3", "NUL byte")
    assert "must not run" not in result.output


def test_a_non_utf8_config_names_file_line_and_offset(box):
    config = write(box, "ds.json", b'{\n  "train_batch_size": 2,\n  "note": "caf\xe9"\n}\n')
    script = write(box, "load.py", textwrap.dedent("""\
        import sys
        from dsrun.runtime.api import install_excepthook
        from dsrun.runtime.config import load_config
        install_excepthook()
        load_config(sys.argv[1])
        """))
    done = subprocess.run(dsrun_cmd("--num_gpus", "1", "--no_local_rank", script, config), capture_output=True,
                          text=True, env=dsrun_env(box), cwd=box.work, timeout=120)
    assert_usage_error(done, f"{config}:3:", "not valid UTF-8", "byte offset 41 (line 3, column 15)")
    assert "UnicodeDecodeError" not in done.stderr


# ------------------------------------------------------------------ 9 and 11: --save_pid
# dsrun's pid is only known once it runs: this wrapper plants things at the pid file's predictable names
# (and at the temp name older versions used), records them, then execs dsrun under the same pid.
_PLANT_THEN_EXEC = textwrap.dedent("""\
    import os, sys
    mode, target, record = sys.argv[1:4]
    path = f"/tmp/{os.getpid()}.deepspeed"
    planted = [path, f"{path}.{os.getpid()}.tmp"]
    with open(record, "w") as f:
        f.write("\\n".join(planted))
    if mode == "dir":
        os.mkdir(path)
    else:
        for name in planted:
            os.symlink(target, name)
    os.execv(sys.executable, [sys.executable, "-m", "dsrun.launcher.cli"] + sys.argv[4:])
    """)


def _run_planted(box, mode, target, *args):
    record = box.tmp / "planted"
    try:
        return subprocess.run([sys.executable, "-c", _PLANT_THEN_EXEC, mode, str(target), str(record), *args],
                              capture_output=True, text=True, env=dsrun_env(box), cwd=box.work, timeout=120)
    finally:
        for name in record.read_text().splitlines() if record.exists() else ():
            if os.path.isdir(name) and not os.path.islink(name):
                shutil.rmtree(name)
            elif os.path.lexists(name):
                os.unlink(name)


def test_save_pid_onto_a_directory_is_a_clear_error(box):
    script = write(box, "never.py", "raise SystemExit('must not run')\n")
    done = _run_planted(box, "dir", "-", "--save_pid", "--num_gpus", "1", script)
    assert_usage_error(done, "--save_pid", "is a directory")
    assert "must not run" not in done.stdout + done.stderr


def test_save_pid_never_follows_a_planted_symlink(box):
    precious = box.tmp / "precious"
    precious.write_text("keep me\n")
    script = write(box, "look.py", textwrap.dedent("""\
        import os
        path = f"/tmp/{os.getppid()}.deepspeed"
        print("link" if os.path.islink(path) else "file", open(path).read() == str(os.getppid()))
        """))
    done = _run_planted(box, "symlink", precious, "--save_pid", "--num_gpus", "1", "--no_local_rank", script)
    assert done.returncode == 0, done.stderr
    assert precious.read_text() == "keep me\n"
    assert "file True" in done.stdout


# ------------------------------------------------------------------ 8: concurrent jobs
_TAGGED_ALLREDUCE = textwrap.dedent("""\
    import os, sys, time
    import torch
    import torch.distributed as dist
    import dsrun
    from dsrun.runtime.api import install_excepthook

    install_excepthook()
    rank = int(os.environ["RANK"])
    hold = os.environ.get(f"HOLD_RANK{rank}")  # wait for this file before joining
    deadline = time.monotonic() + 60
    while hold and not os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.05)
    dsrun.init_distributed(dist_backend="gloo")
    tag = float(os.environ["TAG"])
    total = torch.tensor([tag])
    dist.all_reduce(total)
    print(f"sum={total.item():g}", flush=True)
    expected = tag * dist.get_world_size()
    dist.destroy_process_group()
    sys.exit(0 if total.item() == expected else 1)
    """)


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_jobs_on_one_port_never_mix(box):
    """Job B's rank 0 never binds and its rank 1 joins at once; job A's rank 0 binds and its rank 1
    waits. Without the check, A's rank 0 and B's rank 1 form a world and all_reduce together."""
    script = write(box, "tagged.py", _TAGGED_ALLREDUCE)
    port, go = _free_port(), box.tmp / "go"
    args = dsrun_cmd("--num_gpus", "2", "--master_port", str(port), "--grace_period", "1", script)
    common = {"DEEPSPEED_TIMEOUT": "1"}
    # B first: both launchers check the port before A's rank 0 has bound it (as when started together).
    job_b = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=box.work,
                             env=dsrun_env(box, TAG="1000", HOLD_RANK0=str(box.tmp / "never"), **common))
    job_a = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=box.work,
                             env=dsrun_env(box, TAG="1", HOLD_RANK1=str(go), **common))
    try:
        b_out, b_err = job_b.communicate(timeout=120)
        go.touch()
        a_out, a_err = job_a.communicate(timeout=120)
    finally:
        for job in (job_a, job_b):
            if job.poll() is None:
                job.kill()
                job.communicate()
    assert job_a.returncode == 0, a_out + a_err
    assert a_out.count("sum=2") == 2, a_out
    assert "sum=1001" not in a_out + b_out
    assert job_b.returncode == 2, b_out + b_err
    ids = re.search(r"belongs to job (dsrun-[0-9a-f]{8}), but this is rank 1 of job (dsrun-[0-9a-f]{8}): "
                    rf"two jobs share port {port}", b_err)
    assert ids and ids.group(1) != ids.group(2), b_err
    assert "Traceback" not in b_err


def test_jobs_sharing_a_rank_log_folder_keep_their_logs_and_records_apart(box):
    logs = box.tmp / "ranks"
    script = write(box, "fail.py", textwrap.dedent("""\
        import os, sys, time
        job = os.environ["DSRUN_JOB_ID"]
        print("job", job, flush=True)
        if os.environ["RANK"] == "0":
            open(job + ".printed", "w").close()
            sys.exit(0)
        deadline = time.monotonic() + 60  # fail only once rank 0 has printed: teardown must not race it
        while not os.path.exists(job + ".printed") and time.monotonic() < deadline:
            time.sleep(0.02)
        sys.exit(3)
        """))
    for _ in range(2):
        done = subprocess.run(dsrun_cmd("--num_gpus", "2", "--enable_each_rank_log", str(logs), "--grace_period", "1",
                                        "--no_local_rank", script), capture_output=True, text=True,
                              env=dsrun_env(box), cwd=box.work, timeout=120)
        assert done.returncode == 3, done.stderr
    ids = {m.group(1) for m in map(re.compile(r"^\d{14}_rank\d\.(dsrun-[0-9a-f]{8})\.log$").match,
                                   os.listdir(logs)) if m}
    assert len(ids) == 2, os.listdir(logs)
    names = sorted(os.listdir(logs))
    for job_id in ids:
        mine = [n for n in names if n.endswith(f".{job_id}.log")]
        assert [re.sub(r"^\d{14}_", "", n) for n in mine] == [f"rank0.{job_id}.log", f"rank1.{job_id}.log"]
        for name in mine:
            assert (logs / name).read_text().strip() == f"job {job_id}"
        record = json.loads((logs / job_id / "failure.json").read_text())
        assert record["job_id"] == job_id and record["root_cause"]["rank"] == 1
    assert not (logs / "failure.json").exists()


# ------------------------------------------------------------------ 10: planning is O(hosts)
@pytest.mark.parametrize("launcher", ["ssh", "pdsh", "openmpi"])
def test_a_3000_host_dry_run_is_fast_and_linear(box, launcher):
    sizes = {}
    for hosts in (1000, 3000):
        path = write(box, f"hf{hosts}", "".join(f"worker-{i} slots=8\n" for i in range(hosts)))
        started = time.monotonic()
        result = run(box, "--dry_run", "-H", path, "--launcher", launcher, "t.py")
        elapsed = time.monotonic() - started
        assert result.exit_code == 0, result.output[-2000:]
        assert json.loads(result.stdout)["world_size"] == 8 * hosts
        sizes[hosts] = len(result.stdout)
    assert elapsed < 10, elapsed  # the 3000-host run; hosts² planning took minutes
    assert sizes[3000] < 3.5 * sizes[1000], sizes  # linear: 3x the hosts, 3x the plan


_JOIN = textwrap.dedent("""\
    from dsrun.runtime.api import install_excepthook
    from dsrun.runtime.dist import init_distributed
    install_excepthook()
    init_distributed(dist_backend="gloo")
    raise SystemExit("joined a foreign store")
    """)


def test_a_rank_never_joins_a_store_that_is_not_its_jobs(box):
    """Rank 0 that finds the store (here torchrun-style: hosted elsewhere) owned by another job, a rank 1
    whose store never gets a job id, and a rank 0 whose port is taken all stop with a LaunchError."""
    import datetime

    import torch.distributed as dist

    foreign = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=30))
    lonely = None
    try:
        foreign.set("dsrun/job_id", "other-job")
        env = dsrun_env(box, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(foreign.port), WORLD_SIZE="2",
                        LOCAL_RANK="0", DSRUN_JOB_ID="this-job", TORCHELASTIC_USE_AGENT_STORE="True")
        rank0 = subprocess.Popen([sys.executable, "-c", _JOIN], env={**env, "RANK": "0"}, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=box.work)
        lonely = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=30))  # no rank 0 in it
        env1 = {**env, "RANK": "1", "MASTER_PORT": str(lonely.port), "DEEPSPEED_TIMEOUT": "0.05"}
        env1.pop("TORCHELASTIC_USE_AGENT_STORE")
        rank1 = subprocess.run([sys.executable, "-c", _JOIN], env=env1, capture_output=True, text=True,
                               cwd=box.work, timeout=120)
        out0, err0 = rank0.communicate(timeout=120)
        env0 = {**env, "RANK": "0", "MASTER_PORT": str(lonely.port)}  # the port is taken: rank 0 cannot host
        env0.pop("TORCHELASTIC_USE_AGENT_STORE")
        taken = subprocess.run([sys.executable, "-c", _JOIN], env=env0, capture_output=True, text=True,
                               cwd=box.work, timeout=120)
    finally:
        foreign = lonely = None  # closes both servers
    assert rank0.returncode == 2, err0
    assert f"127.0.0.1:{env['MASTER_PORT']} belongs to job other-job, but this is rank 0 of job this-job" in err0
    assert rank1.returncode == 2, rank1.stderr
    assert "no rank 0 published a job id" in rank1.stderr and "Traceback" not in rank1.stderr
    assert taken.returncode == 2, taken.stderr
    assert f"cannot host the rendezvous on port {env0['MASTER_PORT']}: the port is already in use" in taken.stderr

"""The dsrun CLI: spellings, errors (exit 2, located, no traceback), dry-run JSON, ports, no torch."""
import json
import os
import socket
import subprocess
import sys
import types

import pytest
from click.testing import CliRunner

from dsrun.launcher.cli import cli

DRY_RUN_KEYS = {"world_info", "world_size", "master_addr", "master_port", "launcher", "node_rank", "commands",
                "env", "job_id"}


@pytest.fixture
def box(tmp_path, monkeypatch):
    """An isolated working directory and HOME, no GPUs, no default hostfile."""
    work = tmp_path / "work"
    home = tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    for script in ("train.py", "t.py"):  # dsrun checks that the script exists before launching
        (work / script).write_text("")
    env = {"CUDA_VISIBLE_DEVICES": "", "DLTS_HOSTFILE": str(tmp_path / "no-hostfile"), "HOME": str(home),
           "DS_ENV_FILE": None, "PYTHONPATH": None}
    return types.SimpleNamespace(work=work, home=home, env=env, tmp=tmp_path)


def run(box, *args, env=None):
    return CliRunner().invoke(cli, list(args), env={**box.env, **(env or {})}, prog_name="dsrun")


def dry(box, *args, env=None):
    result = run(box, "--dry_run", *args, env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def hostfile(box, text="worker-0 slots=2\nworker-1 slots=2\n", name="hostfile"):
    path = box.tmp / name
    path.write_text(text)
    return str(path)


def test_help(box):
    result = run(box, "--help")
    assert result.exit_code == 0
    for flag in ("--hostfile", "--num_gpus", "--launcher_args", "--dry_run", "--ssh_max_parallel", "--bind_core_list"):
        assert flag in result.stdout


def test_dry_run_shape_local(box):
    out = dry(box, "--num_gpus", "2", "train.py", "--lr", "1")
    assert set(out) == DRY_RUN_KEYS
    assert out["world_info"] == {"localhost": [0, 1]} and out["world_size"] == 2
    assert out["launcher"] == "local" and out["node_rank"] is None and out["master_addr"] == "127.0.0.1"
    assert 1024 <= out["master_port"] <= 65535
    assert out["commands"] == [{"host": None, "argv": [sys.executable, "-u", "train.py", f"--local_rank={i}",
                                                       "--lr", "1"]} for i in range(2)]
    assert out["env"]["PYTHONPATH"] == str(box.work)
    assert out["job_id"].startswith("dsrun-") and len(out["job_id"]) == len("dsrun-") + 8


def test_dry_run_multinode(box):
    out = dry(box, "-H", hostfile(box), "train.py")
    assert out["world_info"] == {"worker-0": [0, 1], "worker-1": [0, 1]}
    assert out["launcher"] == "ssh" and out["master_addr"] == "worker-0" and out["master_port"] == 29500
    assert [c["host"] for c in out["commands"]] == ["worker-0", "worker-1"]
    assert all(c["argv"][0] == "ssh" and f"--job_id {out['job_id']}" in c["argv"][-1] for c in out["commands"])
    mpi = dry(box, "-H", hostfile(box), "--launcher", "openmpi", "--launcher_arg", "-mca btl_tcp_if_include eth1",
              "train.py")
    assert "eth1" in mpi["commands"][0]["argv"] and "eth0" not in mpi["commands"][0]["argv"]
    result = run(box, "--dry_run", "-H", hostfile(box), "--launcher_args", "-o X=y", "train.py")
    assert result.exit_code == 2 and "--launcher_args: --launcher_args is not used by the ssh launcher" in result.stderr


@pytest.mark.parametrize("flag", ["--num_gpus", "--num-gpus", "--num_g", "--num-g", "--num_accelerators",
                                  "--num-accelerators"])
def test_spellings_and_prefixes(box, flag):
    assert dry(box, flag, "3", "t.py")["world_size"] == 3
    assert dry(box, f"{flag}=2", "t.py")["world_size"] == 2


def test_script_args_untouched(box):
    args = ["--dry_run", "--num_gpus", "9", "-H", "/nope", "--", "I am 6' tall", 'say "hi"', "--foo=bar"]
    out = dry(box, "t.py", *args)
    assert out["world_size"] == 1
    assert out["commands"][0]["argv"][3:] == ["--local_rank=0", *args]
    out = dry(box, "--no_local_rank", "--", "t.py", "-x")
    assert out["commands"][0]["argv"][2:] == ["t.py", "-x"]


def test_module_no_python_and_yaml_hostfile(box):
    assert dry(box, "--module", "pkg.train")["commands"][0]["argv"][1:4] == ["-u", "-m", "pkg.train"]
    assert dry(box, "--no_python", "./run.sh")["commands"][0]["argv"][0] == "./run.sh"
    path = hostfile(box, "hosts:\n  - {host: a, slots: 1}\n  - {host: b, slots: 3}\n", "hf.yaml")
    assert dry(box, "-H", path, "t.py")["world_info"] == {"a": [0], "b": [0, 1, 2]}


def test_bundled_short_options_and_equals(box):
    path = hostfile(box)
    assert dry(box, "-qH", path, "t.py")["world_size"] == 4
    assert dry(box, f"-H{path}", "-iworker-1", "t.py")["world_info"] == {"worker-1": [0, 1]}
    assert dry(box, f"--hostfile={path}", "--exclude=worker-1:0", "t.py")["world_size"] == 3


def test_default_hostfile_from_dlts(box):
    path = hostfile(box)
    out = dry(box, "t.py", env={"DLTS_HOSTFILE": path})
    assert out["world_size"] == 4 and out["launcher"] == "ssh"


def test_launcher_choice(box):
    path = hostfile(box)
    assert dry(box, "-H", path, "--launcher", "PDSH", "t.py")["launcher"] == "pdsh"
    assert dry(box, "--launcher", "openmpi", "t.py")["launcher"] == "local"  # one node runs locally
    assert dry(box, "--force_multi", "--launcher", "pdsh", "t.py")["world_info"] == {"localhost": [0]}


def test_deepspeed_env_files(box):
    (box.home / ".deepspeed_env").write_text("A=home\nB=home\n")
    (box.work / ".deepspeed_env").write_text("# comment\nexport B='from cwd'\nC=$(touch /tmp/x)\n")
    env = dry(box, "t.py", env={"NCCL_DEBUG": "INFO"})["env"]
    assert env["A"] == "home" and env["B"] == "from cwd" and env["C"] == "$(touch /tmp/x)"
    assert env["NCCL_DEBUG"] == "INFO"
    (box.tmp / "custom.env").write_text("D=1\n")
    env = dry(box, "t.py", env={"DS_ENV_FILE": str(box.tmp / "custom.env")})["env"]
    assert env["D"] == "1" and "A" not in env


@pytest.mark.parametrize("args, where", [
    (["-H", "/no/such/hostfile", "t.py"], "--hostfile: hostfile '/no/such/hostfile' does not exist"),
    (["-i", "localhost:a", "t.py"], "--include: bad node spec"),
    (["-e", "localhost:", "t.py"], "--exclude: bad node spec"),
    (["-i", "jeff", "t.py"], "--include: host 'jeff' is not in the hostfile"),
    (["-i", "localhost", "-e", "localhost", "t.py"], "mutually exclusive"),
    (["-i", "localhost", "--num_gpus", "1", "t.py"], "--num_gpus: --num_gpus cannot be combined"),
    (["--num_nodes", "2", "t.py"], "--num_nodes:"),
    (["--launcher", "bogus", "t.py"], "--launcher: unknown launcher 'bogus'"),
    (["--master", "1", "t.py"], "ambiguous option: could match --master_addr, --master_port"),
    (["--module", "--no_python", "t.py"], "--module: --module and --no_python"),
    (["--bind_core_list", "3,1", "t.py"], "--bind_core_list: bad range"),
    (["--no_ssh", "t.py"], "--node_rank:"),
    (["--autotuning", "run", "t.py"], "--autotuning:"),
])
def test_usage_errors(box, args, where):
    result = run(box, "--dry_run", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("dsrun: error: ")
    assert where in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_hostfile_and_envfile_errors_name_file_and_line(box):
    bad = hostfile(box, "worker-0 slots=2\nworker-1 slots=2abc\n")
    result = run(box, "--dry_run", "-H", bad, "t.py")
    assert result.exit_code == 2 and f"{bad}:2: bad entry" in result.stderr and "hint:" in result.stderr
    (box.work / ".deepspeed_env").write_text("A=1\n\nnot a pair\n")
    result = run(box, "--dry_run", "t.py")
    assert result.exit_code == 2 and f"{box.work / '.deepspeed_env'}:3: no '='" in result.stderr


@pytest.mark.parametrize("args", [["--foo", "t.py"], [], ["--max_restarts", "-1", "t.py"],
                                  ["--master_port", "70000", "t.py"], ["--log_level", "loud", "t.py"]])
def test_click_errors_exit_2(box, args):
    result = run(box, *args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_explicit_port_in_use(box):
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen(1)
        port = held.getsockname()[1]
        result = run(box, "--dry_run", "--master_port", str(port), "t.py")
        assert result.exit_code == 2
        assert f"--master_port: port {port} is already in use" in result.stderr
        # multi-node and --no_ssh on another node: rank 0 is elsewhere, nothing to check here
        assert dry(box, "-H", hostfile(box), "--master_port", str(port), "t.py")["master_port"] == port
        out = dry(box, "-H", hostfile(box), "--no_ssh", "--node_rank", "1", "--master_addr", "w0",
                  "--master_port", str(port), "t.py")
        assert out["node_rank"] == 1
        result = run(box, "--dry_run", "-H", hostfile(box), "--no_ssh", "--node_rank", "0", "--master_addr", "w0",
                     "--master_port", str(port), "t.py")
        assert result.exit_code == 2


def test_without_dry_run_executes(box):
    (box.work / "t.py").write_text("import os, sys\nprint('rank', os.environ['RANK'])\nsys.exit(3)\n")
    result = run(box, "--num_gpus", "2", "--log_dir", str(box.tmp / "logs"), "t.py")
    assert result.exit_code == 3, result.output
    assert json.loads((box.tmp / "logs" / "failure.json").read_text())["root_cause"]["exitcode"] == 3


# -- real processes: the entry point as users run it --

def _subprocess_env(box):
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ENV_FILE", "PYTHONPATH")}
    env.update({k: v for k, v in box.env.items() if v is not None})
    return env


def test_subprocess_dry_run_and_error(box):
    cmd = [sys.executable, "-m", "dsrun.launcher.cli"]
    ok = subprocess.run(cmd + ["--dry_run", "--num-gpus", "2", "t.py", "--x"], capture_output=True, text=True,
                        env=_subprocess_env(box), timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["world_size"] == 2
    bad = subprocess.run(cmd + ["--dry_run", "-i", "w:", "t.py"], capture_output=True, text=True,
                         env=_subprocess_env(box), timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.startswith("dsrun: error: --include:") and "Traceback" not in bad.stderr


def test_launch_path_never_imports_torch(box):
    code = ("import sys\n"
            "from dsrun.launcher import cli\n"
            "for argv in (['--help'], ['--dry_run', '--num_gpus', '2', 't.py']):\n"
            "    try:\n"
            "        cli.main(argv)\n"
            "    except SystemExit as done:\n"
            "        assert done.code in (0, None), done.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_subprocess_env(box),
                          timeout=60)
    assert done.returncode == 0, done.stderr

"""The launcher as a person meets it: -h, --version, `python -m dsrun`, the hint for a script flag put
before the script, the config and script checked before launch (nothing started), the --dry_run summary,
`--deepspeed PATH`, and the start and end lines. Through the real CLI: CliRunner and real processes."""
import json
import os
import subprocess
import sys
import tempfile

import pytest
from click.testing import CliRunner

import dsrun
from dsrun.launcher.cli import cli
from dsrun.launcher.failure import default_log_dir
from dsrun.launcher.preflight import find_config

BAD_CONFIG = '{\n  "train_batch_size": 8,\n  "zero_optimization": {\n    "stage": 2,\n' \
             '    "offload_optimizer": {"devcie": "cpu"}\n  }\n}\n'
MARKER_SCRIPT = "import os, sys\nopen(os.path.join(sys.argv[0] + '.ran.' + os.environ['RANK']), 'w').close()\n"
DS_SCRIPT = """\
import argparse, json, os, sys
import torch
import dsrun
parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=-1)
args = dsrun.add_config_arguments(parser).parse_args()
model = torch.nn.Linear(4, 2)
engine, _, _, _ = dsrun.initialize(args=args, model=model, model_parameters=model.parameters())
loss = engine(torch.ones(2, 4)).sum()
engine.backward(loss)
engine.step()
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"seen.{engine.global_rank}"), "w") as f:
    json.dump({"deepspeed": args.deepspeed, "train_batch_size": engine.train_batch_size()}, f)
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _env(tmp_path):
    """This environment (PYTHONPATH included: the ranks import the dsrun under test), no GPUs, no default
    hostfile, and a private temp folder so that default failure records land under tmp_path."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ENV_FILE"}
    env.update({"CUDA_VISIBLE_DEVICES": "", "DLTS_HOSTFILE": str(tmp_path / "no-hostfile"), "TMPDIR": str(tmp_path)})
    return env


def dsrun_proc(tmp_path, *args, module="dsrun.launcher.cli", timeout=120):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=tmp_path,
                          env=_env(tmp_path), timeout=timeout)


def invoke(tmp_path, *args):
    return CliRunner().invoke(cli, list(args), env={"CUDA_VISIBLE_DEVICES": "", "DLTS_HOSTFILE": str(tmp_path / "x")},
                              prog_name="dsrun")


# -- help, version, python -m dsrun --

@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_flags(work, flag):
    result = invoke(work, flag)
    assert result.exit_code == 0, result.output
    assert "Usage: dsrun [OPTIONS] SCRIPT" in result.stdout and "Examples:" in result.stdout
    assert "[default: 5.0]" in result.stdout  # --grace_period states its default


def test_help_after_options_and_short_bundles_still_parse(work):
    assert invoke(work, "--num-g", "2", "-h").exit_code == 0
    (work / "t.py").write_text("")
    result = invoke(work, "-q", "--dry-run", "--num_g=2", "t.py", "-h", "--num_gpus", "9")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["world_size"] == 2 and plan["commands"][0]["argv"][-3:] == ["-h", "--num_gpus", "9"]


def test_version(work):
    result = invoke(work, "--version")
    assert result.exit_code == 0
    assert f"dsrun {dsrun.__version__} from {os.path.dirname(os.path.abspath(dsrun.__file__))}" in result.stdout
    assert "torch " in result.stdout


def test_version_and_help_never_import_torch(work):
    code = ("import sys\nfrom dsrun.launcher import cli\n"
            "for argv in (['--version'], ['-h']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit as done:\n        assert done.code in (0, None)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(work), timeout=60)
    assert done.returncode == 0, done.stderr


def test_python_dash_m_dsrun(work):
    assert "Usage: dsrun" in dsrun_proc(work, "-h", module="dsrun").stdout
    done = dsrun_proc(work, "--version", module="dsrun")
    assert done.returncode == 0 and done.stdout.startswith(f"dsrun {dsrun.__version__} from ")


# -- script flags before the script --

def test_script_flag_before_script_gets_a_hint(work):
    (work / "x.json").write_text("{}")  # an existing value file is not taken for the script
    result = invoke(work, "--num_gpus", "2", "--deepspeed_config", "x.json", "train.py", "--lr", "1")
    assert result.exit_code == 2
    assert ("--deepspeed_config is not a dsrun option; script arguments go after the script: "
            "dsrun [OPTIONS] train.py --deepspeed_config x.json") in result.stderr
    assert "dsrun --num_gpus 2 train.py --deepspeed_config x.json --lr 1" in result.stderr
    assert "Traceback" not in result.output


def test_typo_of_a_dsrun_option_suggests_it(work):
    result = invoke(work, "--num_gpsu", "2", "train.py")
    assert result.exit_code == 2 and "did you mean --num_gpus" in result.stderr


# -- preflight: nothing started --

@pytest.mark.parametrize("form", [["--deepspeed_config", "bad.json"], ["--deepspeed_config=bad.json"],
                                  ["--deepspeed", "bad.json"], ["--deepspeed=bad.json"],
                                  ["--deepspeed", "--deepscale_config", "bad.json"]])
def test_find_config_forms(form):
    assert find_config(["--lr", "1", *form, "--x"]) == "bad.json"


def test_find_config_bare_deepspeed_is_no_config():
    assert find_config(["--deepspeed", "--lr", "1"]) is None and find_config(["--deepspeed"]) is None


def test_bad_config_found_before_any_rank_starts(work):
    (work / "train.py").write_text(MARKER_SCRIPT)
    (work / "bad.json").write_text(BAD_CONFIG)
    done = dsrun_proc(work, "--num_gpus", "2", "train.py", "--deepspeed", "bad.json")
    assert done.returncode == 2, done.stderr
    assert "bad.json:5: zero_optimization.offload_optimizer.devcie: unknown key 'devcie'" in done.stderr
    assert "Traceback" not in done.stderr and "starting" not in done.stderr
    assert not list(work.glob("train.py.ran.*")), "a rank was started"


def test_missing_script_is_found_before_launch(work):
    result = invoke(work, "--num_gpus", "2", "nope.py")
    assert result.exit_code == 2 and "script 'nope.py' does not exist" in result.stderr


def test_auto_values_pass_preflight(work):
    (work / "t.py").write_text("")
    (work / "auto.json").write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "zero_optimization": {"stage": 2},
        "bf16": {"enabled": "auto"}, "gradient_clipping": "auto"}))
    result = invoke(work, "--dry_run", "--num_gpus", "2", "t.py", "--deepspeed_config", "auto.json")
    assert result.exit_code == 0, result.output


def test_base64_config_and_model_parallel_batch_note(work):
    import base64

    (work / "t.py").write_text("")
    config = base64.urlsafe_b64encode(b'{"train_batch_size": 6}').decode()
    result = invoke(work, "--dry_run", "--num_gpus", "4", "t.py", "--deepspeed_config", config)
    assert result.exit_code == 0, result.output
    assert "do not fit 4 data-parallel ranks" in result.stderr and "they fit 2" in result.stderr


def test_dry_run_summary_on_stderr_json_on_stdout(work):
    (work / "t.py").write_text("")
    (work / "ds.json").write_text('{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2}')
    done = dsrun_proc(work, "--dry_run", "--num_gpus", "2", "t.py", "--deepspeed", "ds.json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["world_size"] == 2  # stdout is the JSON alone
    assert "config ds.json: valid; train_batch_size 8 = micro 2 x accumulation 2 x 2 rank(s)" in done.stderr
    assert "nothing started" in done.stderr and "dsrun: starting" not in done.stderr


def test_quiet_dry_run_prints_the_json_alone(work):
    (work / "t.py").write_text("")
    result = invoke(work, "-q", "--dry_run", "--log-level", "WARNING", "t.py")
    assert result.exit_code == 0 and result.stderr == "" and json.loads(result.stdout)["world_size"] == 1


# -- real runs: --deepspeed PATH, start and end lines --

@pytest.mark.slow
def test_deepspeed_path_in_a_two_rank_cpu_run(work):
    (work / "train.py").write_text(DS_SCRIPT)
    (work / "ds.json").write_text('{"train_batch_size": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}')
    done = dsrun_proc(work, "--num_gpus", "2", "train.py", "--deepspeed", "ds.json", timeout=180)
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        seen = json.loads((work / f"seen.{rank}").read_text())
        assert seen == {"deepspeed": "ds.json", "train_batch_size": 4}
    assert "dsrun: starting dsrun-" in done.stderr and "2 ranks (localhost: 2), backend gloo" in done.stderr


def test_start_and_end_lines(work):
    (work / "ok.py").write_text("print('hi')\n")
    done = dsrun_proc(work, "--num_gpus", "2", "ok.py")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    start = [line for line in lines if line.startswith("dsrun: starting dsrun-")]
    assert len(start) == 1 and "2 ranks (localhost: 2), backend gloo, master 127.0.0.1:" in start[0]
    job = start[0].split()[2].rstrip(":")
    assert start[0].endswith(f"logs {work / job}")  # TMPDIR is work: <tmp>/<job id>, no doubled dsrun-
    assert lines[-1].startswith(f"dsrun: {job} finished: exit code 0 after ")
    assert dsrun_proc(work, "-q", "--num_gpus", "1", "ok.py").stderr == ""


def test_quiet_keeps_the_failure_line(work):
    (work / "bad.py").write_text("import sys\nsys.exit(3)\n")
    done = dsrun_proc(work, "-q", "--num_gpus", "1", "bad.py")
    assert done.returncode == 3
    assert "dsrun: starting" not in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("dsrun: dsrun-") and " failed: exit code 3 after " in last
    record = last.split("failure record ")[1]
    assert os.path.isfile(record) and os.path.dirname(os.path.dirname(record)) == str(work)
    assert "dsrun-dsrun-" not in record


def test_default_log_dir_is_not_doubled():
    assert default_log_dir("dsrun-1a2b") == os.path.join(tempfile.gettempdir(), "dsrun-1a2b")
    assert default_log_dir("job7") == os.path.join(tempfile.gettempdir(), "dsrun-job7")

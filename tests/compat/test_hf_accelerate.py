"""Accelerate with a DeepSpeed plugin on dsrun, through the opt-in `deepspeed` alias distribution
(compat/deepspeed_dist) installed in a fresh venv (the fixture of test_hf_trainer.py).

tests/compat/scripts/hf_accelerate.py trains a tiny GPT-2 with `Accelerator(deepspeed_plugin=...)`, saves
with `accelerator.save_state` (DeepSpeed's checkpoint through the engine), trains on, and loads the state
back, at ZeRO-3, under `accelerate launch --use_deepspeed`: Accelerate starts the ranks itself, through
torch.distributed.run, and dsrun joins them. (An Accelerator under `dsrun` is what the Trainer test runs.)
"""
import json
import os

import pytest

import accelerate  # noqa: E402,F401  (the test extra installs both; missing is a failure, not a skip)
import transformers  # noqa: E402,F401

from test_hf_trainer import REPO, alias_venv, hf_env  # noqa: E402,F401  (alias_venv: the shared fixture)

SCRIPT = os.path.join(REPO, "tests", "compat", "scripts", "hf_accelerate.py")


def _run(command, tmp_path):
    import subprocess
    home = tmp_path / "home"  # no Accelerate config file of the user's
    home.mkdir()
    done = subprocess.run(command, cwd=tmp_path, env=hf_env(HOME=str(home)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if "ACC_RESULT " in line]
    assert len(lines) == 1, done.stdout[-4000:] + done.stderr[-2000:]
    return json.loads(lines[0].split("ACC_RESULT ", 1)[1])


def _check(result, venv_python):
    assert result["is_deepspeed_engine"] and result["engine"] == "dsrun.runtime.engine.Engine"
    assert result["distributed_type"] == "DistributedType.DEEPSPEED" and result["num_processes"] == 2
    assert result["deepspeed"].startswith(os.path.dirname(os.path.dirname(venv_python)))
    losses = result["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2, losses
    assert result["saved_steps"] == result["restored_steps"] == 6
    assert result["weights_moved"] and result["weights_restored"]


@pytest.mark.slow
def test_accelerate_launch_use_deepspeed_zero3(alias_venv, tmp_path):
    """The script's own DeepSpeedPlugin (ZeRO-3) takes precedence over the launch flags, as in Accelerate."""
    result = _run([alias_venv, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3",
                   "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                   "no", SCRIPT, "--output_dir", "state", "--zero_stage", "3"], tmp_path)
    _check(result, alias_venv)
    assert {"pytorch_model", "latest"} <= set(os.listdir(tmp_path / "state"))

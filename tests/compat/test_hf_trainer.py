"""Hugging Face's Trainer with `TrainingArguments(deepspeed=cfg)` on dsrun, through the opt-in `deepspeed`
alias distribution (compat/deepspeed_dist), installed in a fresh venv as a user would install it.

The venv sees the system's torch, transformers and Accelerate (--system-site-packages); dsrun comes from
this checkout through PYTHONPATH. One launch trains 8 steps and saves at steps 4 and 8; a second one
resumes from checkpoint-4 and must continue at step 5 with the same losses the first run had.
"""
import json
import os
import shutil
import site
import subprocess
import sys

import pytest

import accelerate  # noqa: E402,F401  (the test extra installs both; missing is a failure, not a skip)
import transformers  # noqa: E402,F401

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALIAS_DIST = os.path.join(REPO, "compat", "deepspeed_dist")
SCRIPT = os.path.join(REPO, "tests", "compat", "scripts", "hf_trainer.py")


@pytest.fixture(scope="session")
def alias_venv(tmp_path_factory):
    """A venv over the system's packages with only the alias installed: offline, no build dependencies."""
    venv = tmp_path_factory.mktemp("hf") / "venv"  # session scope: test_hf_accelerate.py uses it too
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    if sys.prefix != sys.base_prefix:
        # pytest runs inside a venv: `--system-site-packages` reaches the base interpreter's packages, not this
        # venv's (torch, transformers may be only here); a .pth file adds them behind the new venv's own.
        purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        outer = [p for p in site.getsitepackages() if p.startswith(sys.prefix)]
        with open(os.path.join(purelib, "_outer_venv.pth"), "w") as f:
            f.writelines(f"import site; site.addsitedir({p!r})\n" for p in outer)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", ALIAS_DIST], check=True,
                   env=hf_env(), capture_output=True, timeout=120)
    return python


def hf_env(**extra):
    """The environment of a command run with the venv: dsrun from this checkout, one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ENV_FILE", "CUDA_VISIBLE_DEVICES", "PYTHONHOME")}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def test_alias_is_dsrun(alias_venv, tmp_path):
    """`deepspeed` and its submodules are dsrun's module objects; the metadata passes the libraries' checks."""
    probe = """
import importlib.metadata, importlib.util, json, sys
import deepspeed, dsrun
import deepspeed.comm, deepspeed.runtime.lr_schedules
from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
from deepspeed.utils import logger
from deepspeed.runtime.zero import partition_parameters
from deepspeed.launcher.runner import DEEPSPEED_ENVIRONMENT_NAME
import torch
from transformers.integrations.deepspeed import is_deepspeed_available
from accelerate.utils import compare_versions, is_deepspeed_available as accelerate_sees_it
print(json.dumps({
    "spec": importlib.util.find_spec("deepspeed") is not None,
    "version": importlib.metadata.version("deepspeed"), "module_version": deepspeed.__version__,
    "transformers": is_deepspeed_available(), "accelerate": accelerate_sees_it(),
    "new_enough": compare_versions("deepspeed", ">=", "0.16.4"),
    "same_comm": deepspeed.comm is dsrun.comm and sys.modules["deepspeed.comm"] is dsrun.comm,
    "comm_spec": dsrun.comm.__spec__.name,
    "engine": deepspeed.DeepSpeedEngine is dsrun.DeepSpeedEngine,
    "initialize": deepspeed.initialize is dsrun.initialize,
    "schedules": "WarmupLR" in deepspeed.runtime.lr_schedules.VALID_LR_SCHEDULES,
    "partition_parameters": partition_parameters._orig_torch_arange is torch.arange,
    "env_file": DEEPSPEED_ENVIRONMENT_NAME == ".deepspeed_env",
    "dsrun": dsrun.__file__, "logger": logger is dsrun.utils.logger,
}))
"""
    done = subprocess.run([alias_venv, "-c", probe], env=hf_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got.pop("version") == got.pop("module_version") == "0.19.8+dsrun"
    assert got.pop("comm_spec") == "dsrun.comm"  # the alias import leaves dsrun's own spec in place
    assert got.pop("dsrun").startswith(os.path.join(REPO, "dsrun"))
    assert all(got.values()), got
    # The distribution's `deepspeed` command is dsrun's launcher (Accelerate's multi-node launch runs it).
    launcher = subprocess.run([os.path.join(os.path.dirname(alias_venv), "deepspeed"), "--version"], env=hf_env(),
                              capture_output=True, text=True, timeout=120)
    assert launcher.returncode == 0 and launcher.stdout.startswith("dsrun "), launcher.stdout + launcher.stderr


def test_engine_signatures_have_the_keywords_transformers_looks_for():
    """The Trainer passes `exclude_frozen_parameters` (PEFT models) only when save_checkpoint's signature
    names it, and calls load_checkpoint with DeepSpeed's keywords."""
    import inspect

    from dsrun.runtime.engine import Engine
    assert "exclude_frozen_parameters" in inspect.signature(Engine.save_checkpoint).parameters
    assert "exclude_frozen_parameters" in inspect.signature(Engine._zero3_consolidated_16bit_state_dict).parameters
    assert "is_boundary" in inspect.signature(Engine.set_gradient_accumulation_boundary).parameters
    load = inspect.signature(Engine.load_checkpoint).bind(None, "path", load_module_strict=False,
                                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    assert load.arguments["load_dir"] == "path"


def _whole_weights(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def _launch(python, tmp_path, *args):
    done = subprocess.run([python, "-m", "dsrun.launcher.cli", "--num_gpus", "2", SCRIPT, "--output_dir", "out",
                           *args], cwd=tmp_path, env=hf_env(HOME=str(tmp_path)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if "HF_RESULT " in line]
    assert len(lines) == 1, done.stdout[-4000:]
    return json.loads(lines[0].split("HF_RESULT ", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_trains_saves_and_resumes(alias_venv, tmp_path, stage):
    """At stage 3 the model is built inside `deepspeed.zero.Init` (from_config, then from_pretrained) and
    saving gathers the 16-bit weights (`zero_gather_16bit_weights_on_model_save`,
    `_zero3_consolidated_16bit_state_dict`)."""
    steps = ("--zero_stage", str(stage), "--max_steps", "8", "--save_steps", "4")
    first = _launch(alias_venv, tmp_path, *steps)
    assert first["deepspeed"].startswith(os.path.dirname(os.path.dirname(alias_venv)))  # the venv's alias
    assert first["global_step"] == 8 and len(first["losses"]) == 8
    assert first["losses"][-1] < first["losses"][0] - 0.2, first["losses"]
    for step in (4, 8):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        assert (folder / "latest").read_text().strip() == f"global_step{step}"
        assert (folder / f"global_step{step}").is_dir() and (folder / "trainer_state.json").is_file()
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(folder))
        assert _whole_weights(folder)["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)

    shutil.rmtree(tmp_path / "out" / "checkpoint-8")
    # At stage 3 the resumed run starts as fine-tuning does: from_pretrained (under zero.Init) of the
    # checkpoint's model.safetensors, then the engine checkpoint on top.
    pretrained = ("--from_pretrained", "out/checkpoint-4") if stage == 3 else ()
    resumed = _launch(alias_venv, tmp_path, *steps, *pretrained, "--resume", "--evaluate")
    assert resumed["resumed_from"] == 4 and resumed["global_step"] == 8 and resumed["engine"] == "Engine"
    assert resumed["eval_loss"] < first["losses"][0], resumed  # trainer.evaluate() through the engine
    # Steps 5-8 again, from the restored weights, optimizer, scheduler, RNG and data position.
    assert resumed["losses"] == pytest.approx(first["losses"][4:], rel=1e-3), (first["losses"], resumed["losses"])

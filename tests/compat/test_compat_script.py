"""A DeepSpeed-style script (tests/compat/scripts/deepspeed_style_train.py) under the dsrun launcher with 2
ranks, with a DeepSpeed config written in hjson syntax carrying keys dsrun ignores."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "deepspeed_style_train.py")

CONFIG = """{
  // as Accelerate and real DeepSpeed users write them: comments, bare keys, Infinity, inert keys
  "train_micro_batch_size_per_gpu": 4,
  gradient_accumulation_steps: 2,
  "steps_per_print": Infinity,
  "cuda_visible_devices": "0,1",
  "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": true}},
  "zero_optimization": {"stage": 1},
}
"""


def test_deepspeed_style_script_runs_under_dsrun(tmp_path):
    (tmp_path / "ds_config.json").write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ENV_FILE", "CUDA_VISIBLE_DEVICES")}
    env.update(PYTHONPATH=REPO, HOME=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", SCRIPT, "--deepspeed",
                           "--deepspeed_config", "ds_config.json", "--steps", "6"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = re.search(r"RESULT global_steps=(\d+) first=([\d.]+) final=([\d.]+) accelerator=(\w+)", done.stdout)
    assert result, done.stdout[-3000:]
    steps, first, final, accelerator = int(result[1]), float(result[2]), float(result[3]), result[4]
    assert steps == 6 and final < first and accelerator == "cpu"
    output = done.stdout + done.stderr
    assert "cuda_visible_devices: accepted for DeepSpeed compatibility but ignored by dsrun" in output

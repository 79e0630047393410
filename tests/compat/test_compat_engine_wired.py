"""Engine wired to EngineCompat (apply /tmp/compat_engine_edit.diff first): DeepSpeedEngine is an nn.Module,
unknown attributes name it, initialize returns the optimizer view, data_types.buffer_dtype casts buffers."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "runtime"))
from _dist import run_ranks  # noqa: E402

import torch._dynamo  # noqa: E402,F401  (see test_compat_engine.py)


def _wired(rank, world):
    import dsrun
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    engine, opt, _, _ = dsrun.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}, "data_types": {"buffer_dtype": "bf16"},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    engine.backward(engine(torch.randn(4, 4).bfloat16()).float().sum())  # before: fp32 BN stats vs bf16 weights
    engine.step()
    with pytest.raises(AttributeError, match="'DeepSpeedEngine' object has no attribute 'nope'"):
        engine.nope
    engine.eval()
    modes = (engine.training, engine.module.training)
    from dsrun.runtime.engine import DeepSpeedEngine
    return (isinstance(engine, torch.nn.Module), isinstance(engine, DeepSpeedEngine), engine.global_steps,
            isinstance(opt, torch.optim.AdamW), opt.overflow, opt.cur_scale, modes,
            len(list(engine.parameters())))


def test_engine_as_wired():
    for out in run_ranks(_wired, world_size=2):
        assert out == (True, True, 1, True, False, 1.0, (False, False), 6)

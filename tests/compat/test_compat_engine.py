"""The engine's DeepSpeed surface (issue 16 part 2) and the data_types defects (part 3) on 2 gloo ranks."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "runtime"))
from _dist import run_ranks  # noqa: E402

# The first optimizer a process builds imports torch._dynamo (~10 s on a loaded 2-core machine). Import it
# here, once, so that the forked ranks of every test below inherit it instead of each paying for it.
import torch._dynamo  # noqa: E402,F401


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _engine(config, seed=0, model=None):
    import dsrun
    base = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    base.update(config)
    engine, *_ = dsrun.initialize(model=model or _model(seed), config=base)
    return engine


def _batch(rank, i, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 * rank + i)
    return torch.randn(2, 4, generator=g).to(dtype)


def _weights(engine):
    return torch.cat([p.detach().float().reshape(-1) for p in engine.module.parameters()])


def _no_sync_matches_one_backward(rank, stage):
    a = _engine({"zero_optimization": {"stage": stage}})
    with a.no_sync():
        a.backward(a(_batch(rank, 0)).sum())
    a.backward(a(_batch(rank, 1)).sum())
    a.step()
    b = _engine({"zero_optimization": {"stage": stage}})
    b.backward(b(_batch(rank, 0)).sum() + b(_batch(rank, 1)).sum())
    b.step()
    return torch.allclose(_weights(a), _weights(b), atol=1e-6), a.global_steps


def _surface(rank, world):
    from dsrun.runtime.engine_compat import compat_getattr, optimizer_view
    out = {}
    for stage in (0, 1):
        out[f"no_sync_{stage}"] = _no_sync_matches_one_backward(rank, stage)
    e = _engine({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2, "steps_per_print": 10})
    with pytest.raises(AssertionError, match="incompatible with gradient partitioning logic of ZeRO stage 2"):
        with e.no_sync():
            pass
    out["batch"] = e.get_batch_info()
    out["getters"] = (e.steps_per_print(), e.zero_optimization(), e.zero_optimization_partition_gradients(),
                      e.dynamic_loss_scale(), e.get_data_types())
    e.set_train_batch_size(8)
    out["batch_after"] = (e.get_batch_info(), e.config["gradient_accumulation_steps"])
    with pytest.raises(ValueError, match="divisible by micro-batch data parallelism"):
        e.set_train_batch_size(6)
    e.set_train_micro_batch_size(1)
    out["micro_after"] = e.get_batch_info()
    e.module[0].bias.requires_grad_(False)
    out["state_keys"] = sorted(e.module_state_dict(exclude_frozen_parameters=True))
    with pytest.raises(AttributeError, match="'DeepSpeedEngine' object has no attribute 'no_such_thing'"):
        compat_getattr(e, "no_such_thing")
    out["forwarded"] = compat_getattr(e, "training")

    f = _engine({"fp16": {"enabled": True, "initial_scale_power": 4}, "zero_optimization": {"stage": 1}})
    view = optimizer_view(f.optimizer, f)
    assert optimizer_view(view, f) is view  # Engine may already hand out the view
    out["view_types"] = (isinstance(view, torch.optim.SGD), isinstance(view, torch.optim.Optimizer),
                         view.optimizer is f.basic_optimizer, view.param_groups is f.basic_optimizer.param_groups)
    with f.no_sync():
        with pytest.raises(AssertionError, match="illegal to call Engine.step"):
            f.step()
    bad = _batch(rank, 0, torch.float16)
    bad[0, 0] = float("inf")
    f.backward(f(bad).float().sum())
    f.step()
    out["overflow"] = (view.overflow, view.cur_scale, view.dynamic_loss_scale, view.loss_scaler is f.loss_scaler)
    f.backward(f(_batch(rank, 1, torch.float16)).float().sum())
    f.step()
    out["after_good_step"] = view.overflow
    sched = torch.optim.lr_scheduler.StepLR(view, step_size=1, gamma=0.5)
    sched.step()
    out["lr"] = f.get_lr()
    return out


def test_engine_deepspeed_surface_on_two_ranks():
    for out in run_ranks(_surface, world_size=2):
        assert out["no_sync_0"] == (True, 1) and out["no_sync_1"] == (True, 1)
        assert out["batch"] == (8, 2, 2)
        assert out["getters"] == (10, True, True, True, (torch.float32, torch.float32))
        assert out["batch_after"] == ((8, 2, 2), 2)
        assert out["micro_after"] == (4, 1, 2)
        assert out["state_keys"] == ["0.weight", "2.bias", "2.weight"]
        assert out["forwarded"] is True
        assert out["view_types"] == (True, True, True, True)
        assert out["overflow"] == (True, 16.0, True, True)
        assert out["after_good_step"] is False
        assert out["lr"] == [pytest.approx(0.05)]


def _accum_dtypes(rank, world):
    import warnings
    results = []
    for config in ({"fp16": {"enabled": True, "initial_scale_power": 4}, "data_types": {"grad_accum_dtype": "fp16"}},
                   {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "bf16"}},
                   {"data_types": {"grad_accum_dtype": "bf16"}},
                   {"zero_optimization": {"stage": 1},
                    "bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = _engine(dict(config, gradient_accumulation_steps=2))
        dtype = next(e.module.parameters()).dtype
        before = _weights(e)
        for i in range(2):
            e.backward(e(_batch(rank, i, dtype)).float().sum())
            e.step()
        results.append((e.global_steps, bool(torch.isfinite(_weights(e)).all()), not torch.equal(before, _weights(e))))
        e.destroy()
    return results


def test_grad_accum_dtype_configs_train():
    """Before: torch refused to attach a 16-bit gradient to the fp32 masters (and an fp32 model refused the key)."""
    for results in run_ranks(_accum_dtypes, world_size=2):
        assert results == [(1, True, True)] * 4


def test_unknown_attribute_names_the_engine_also_as_an_nn_module():
    """compat_getattr on an engine laid out as a torch.nn.Module (the module registered in `_modules`)."""
    from dsrun.runtime.engine_compat import EngineCompat, compat_getattr

    class ModuleEngine(EngineCompat, torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.module = model

        def __getattr__(self, name):
            return compat_getattr(self, name)

    engine = ModuleEngine(_model())
    assert isinstance(engine.module, torch.nn.Sequential)
    assert engine.training is True and engine.__len__() == 3  # nn.Module's own attribute; the model's method
    with pytest.raises(AttributeError, match="'DeepSpeedEngine' object has no attribute 'no_sync_please'"):
        engine.no_sync_please
    assert len(list(engine.parameters())) == 4

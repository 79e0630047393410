"""DeepSpeed's own unit-test patterns (tests/unit/ of deepspeedai/DeepSpeed: test_ds_initialize.py,
checkpoint/common.py's checkpoint_correctness_verification, test_lr_schedulers.py, half_precision/
test_bf16.py and test_fp16.py, test_no_sync_ctxt.py, multiple models), written as those tests write them
(`import deepspeed`, a SimpleModel, the engine's dataloader) with only the import changed, on 2 gloo ranks
in one process group. What tests/compat/test_compat_engine.py (no_sync, overflow, batch info) and
tests/runtime/ already cover is not repeated here."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "runtime"))
from _dist import run_ranks  # noqa: E402

import torch._dynamo  # noqa: E402,F401  (the ranks inherit it: test_compat_engine.py says why)

HIDDEN = 8


class SimpleModel(torch.nn.Module):  # DeepSpeed's tests/unit/simple_model.py, with an unused parameter option
    def __init__(self, hidden_dim=HIDDEN, empty_grad=False):
        super().__init__()
        self.linears = torch.nn.ModuleList([torch.nn.Linear(hidden_dim, hidden_dim) for _ in range(2)])
        if empty_grad:
            self.unused = torch.nn.Linear(hidden_dim, hidden_dim)
        self.cross_entropy_loss = torch.nn.CrossEntropyLoss()

    def forward(self, x, y):
        for layer in self.linears:
            x = layer(x)
        return self.cross_entropy_loss(x, y)


def random_dataset(total_samples, hidden_dim=HIDDEN, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(total_samples, hidden_dim, generator=g).to(dtype)
    return torch.utils.data.TensorDataset(x, torch.randint(0, hidden_dim, (total_samples,), generator=g))


def _config(stage=0, dtype=None, **extra):
    config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1,
              "optimizer": {"type": "Adam", "params": {"lr": 0.01}}, "zero_optimization": {"stage": stage}}
    if dtype is not None:
        config[dtype] = {"enabled": True, **({"initial_scale_power": 8} if dtype == "fp16" else {})}
    config.update(extra)
    return config


def _train(engine, steps, dtype=torch.float32, seed=0):
    data = random_dataset(steps * 2 * engine.world_size, dtype=dtype, seed=seed)
    losses = []
    for x, y in engine.deepspeed_io(data):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _dtype_cocktail(rank, world):
    """test_bf16.py / test_fp16.py: ZeRO stages x half precision x communication dtype train, and an
    unused parameter (TestZeroEmptyGrad) does not hang the reduction."""
    import dsrun as deepspeed
    out = {}
    for stage in (0, 1, 2):
        for dtype, comm in (("bf16", None), ("bf16", "fp32"), ("fp16", None)):
            extra = {"communication_data_type": comm} if comm else {}
            model = SimpleModel(empty_grad=True)
            engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                           config=_config(stage, dtype, **extra))
            half = torch.bfloat16 if dtype == "bf16" else torch.float16
            losses = _train(engine, 2, dtype=half)
            out[(stage, dtype, comm)] = (len(losses), all(map(torch.isfinite, map(torch.tensor, losses))),
                                         next(engine.module.parameters()).dtype == half,
                                         engine.bfloat16_enabled(), engine.fp16_enabled())
            engine.destroy()
    return out


def _initialize_and_schedules(rank, world):
    """test_ds_initialize.py's client optimizer / scheduler callables and test_lr_schedulers.py's
    TestGetLrBeforeTrain and TestSchedulerOptimizerParity."""
    import dsrun as deepspeed
    from dsrun.runtime.lr_schedules import WARMUP_LR, WarmupLR
    out = {}
    model = SimpleModel()
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config={"train_micro_batch_size_per_gpu": 2},
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    _train(engine, 2)
    out["callables"] = (isinstance(engine.basic_optimizer, torch.optim.AdamW),
                        isinstance(scheduler, torch.optim.lr_scheduler.StepLR), engine.get_lr())
    engine.destroy()
    config = _config(1, scheduler={"type": WARMUP_LR, "params": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01,
                                                                    "warmup_num_steps": 4, "warmup_type": "linear"}})
    model = SimpleModel()
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                           config=config)
    parity = [(engine.get_lr(), scheduler.get_lr(), [g["lr"] for g in optimizer.param_groups])]
    for _ in range(3):
        _train(engine, 1)
        parity.append((engine.get_lr(), scheduler.get_lr(), [g["lr"] for g in optimizer.param_groups]))
    out["schedule"] = (isinstance(scheduler, WarmupLR), parity)
    engine.destroy()
    return out


def _checkpoint_correctness(rank, world, save_dir):
    """checkpoint/common.py's checkpoint_correctness_verification: train, save, load into an engine built
    from another seed, compare module, optimizer state and scheduler, then both continue alike."""
    import dsrun as deepspeed
    config = _config(2, "bf16", scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": 10,
                                                                             "warmup_num_steps": 2}})
    engines = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = SimpleModel()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        engines.append(engine)
    trained, loaded = engines
    _train(trained, 3, dtype=torch.bfloat16)
    trained.save_checkpoint(save_dir, client_state={"epoch": 7})
    path, client = loaded.load_checkpoint(save_dir)
    same = all(torch.equal(a, b) for a, b in zip(trained.module.parameters(), loaded.module.parameters()))
    state = (loaded.global_steps == trained.global_steps, client.get("epoch") == 7,
             loaded.lr_scheduler.state_dict() == trained.lr_scheduler.state_dict())
    more = _train(trained, 2, dtype=torch.bfloat16, seed=5), _train(loaded, 2, dtype=torch.bfloat16, seed=5)
    return same, state, more[0] == more[1]


def _direct_backward(rank, world):
    """A plain `loss.backward()` before `engine.step()` (DeepSpeed's engines take it at ZeRO stages): the
    gradients are reduced at the step (runtime/zero/reducer.py's [Note: stray gradients]); with gradient
    accumulation the script divides by it, as `engine.backward` does."""
    import dsrun as deepspeed
    out = {}
    for stage in (0, 1, 2):
        for gas in (1, 2):
            weights = []
            for direct in (False, True):
                torch.manual_seed(0)
                model = SimpleModel()
                engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                  config=_config(stage, gradient_accumulation_steps=gas))
                x, y = random_dataset(8, seed=rank)[:]
                for i in range(4):
                    loss = engine(x[i * 2:(i + 1) * 2], y[i * 2:(i + 1) * 2])
                    (loss / gas).backward() if direct else engine.backward(loss)
                    engine.step()
                weights.append(torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()]))
                engine.destroy()
            out[(stage, gas)] = torch.allclose(weights[0], weights[1], atol=1e-6)
    return out


def _all(rank, world, save_dir):
    return {"cocktail": _dtype_cocktail(rank, world), "init": _initialize_and_schedules(rank, world),
            "checkpoint": _checkpoint_correctness(rank, world, save_dir), "direct": _direct_backward(rank, world)}


def test_deepspeed_unit_test_patterns(tmp_path):
    for out in run_ranks(_all, world_size=2, args=(str(tmp_path),), timeout=240):
        for key, (steps, finite, half, bf16, fp16) in out["cocktail"].items():
            assert (steps, finite, half, bf16, fp16) == (2, True, True, key[1] == "bf16", key[1] == "fp16"), key
        callables_ok, step_lr_ok, lr = out["init"]["callables"]
        assert callables_ok and step_lr_ok and lr == [pytest.approx(0.0025)]
        is_warmup, parity = out["init"]["schedule"]
        assert is_warmup and parity[0][0] == [pytest.approx(0.001)]  # TestGetLrBeforeTrain
        for engine_lr, scheduler_lr, optimizer_lr in parity:
            assert engine_lr == scheduler_lr == optimizer_lr
        # DeepSpeed's WarmupLR: the k-th step sets iteration k-1, whose linear gamma is (k-1)/4
        assert [p[0][0] for p in parity] == pytest.approx([0.001, 0.001, 0.00325, 0.0055]), parity
        assert out["checkpoint"] == (True, (True, True, True), True)
        assert out["direct"] == {(stage, gas): True for stage in (0, 1, 2) for gas in (1, 2)}

"""initialize / add_config_arguments / Engine API: argument cases, errors, counters, client objects."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _dist import run_ranks  # noqa: E402

import dsrun  # noqa: E402
from dsrun.errors import ConfigError  # noqa: E402
from dsrun.runtime.api import _config_source  # noqa: E402


def parser(with_ds=True):
    p = argparse.ArgumentParser()
    p.add_argument("--num_epochs", type=int)
    return dsrun.add_config_arguments(p) if with_ds else p


def test_ds_arguments_cases():  # reference deepspeed-launcher.md 7.3
    args = parser(False).parse_args(["--num_epochs", "2"])
    assert not hasattr(args, "deepspeed") and not hasattr(args, "deepspeed_config")
    args = parser().parse_args([])
    assert args.deepspeed is False and args.deepspeed_config is None
    args = parser().parse_args(["--deepspeed_config", "foo.json"])
    assert args.deepspeed is False and args.deepspeed_config == "foo.json"
    args = parser().parse_args(["--deepspeed"])
    assert args.deepspeed is True and args.deepspeed_config is None
    with pytest.raises(SystemExit):
        parser(False).parse_args(["--deepspeed"])
    args = parser().parse_args(["--deepspeed", "--deepspeed_config", "foo.json"])
    assert args.deepspeed is True and args.deepspeed_config == "foo.json"
    args = parser().parse_args(["--deepscale", "--deepscale_config", "old.json"])
    assert args.deepscale is True and _config_source(args, None, None) == "old.json"


def test_config_source_rules():
    args = argparse.Namespace(deepspeed_config="a.json")
    with pytest.raises(ConfigError, match="twice"):
        _config_source(args, {"train_batch_size": 1}, None)
    assert _config_source(None, None, {"x": 1}) == {"x": 1}
    with pytest.raises(ConfigError, match="no DeepSpeed config"):
        _config_source(argparse.Namespace(deepspeed_config=None), None, None)


def test_model_none_is_a_config_error():
    with pytest.raises(ConfigError, match="requires a model") as info:
        dsrun.initialize(model=None, config={"train_batch_size": 1})
    assert info.value.exit_code == 2


def test_uncaught_dsrun_error_prints_one_line_and_exits_2():
    code = ("import dsrun\nfrom dsrun.runtime.api import install_excepthook\ninstall_excepthook()\n"
            "from dsrun.errors import ConfigError\nraise ConfigError('bad thing', where='optimizer.type')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "optimizer.type: bad thing" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "from dsrun.runtime.api import install_excepthook\n"
                           "install_excepthook()\nraise KeyError('x')\n"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def _engine_job(rank, world):
    import dsrun
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 2))
    lrs = []
    engine, opt, loader, sched = dsrun.initialize(
        model=model, optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), training_data=data,
        config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 1}})
    assert isinstance(opt, torch.optim.SGD) and sched is engine.lr_scheduler and len(loader) == 4
    boundaries = []
    for x, y in loader:
        boundaries.append(engine.is_gradient_accumulation_boundary())
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
        lrs.append(engine.get_lr()[0])
    info = dict(steps=engine.global_steps, samples=engine.global_samples, micro=engine.micro_steps,
                boundaries=boundaries, lrs=lrs, tbs=engine.train_batch_size(), gas=engine.gradient_accumulation_steps(),
                stage=engine.zero_optimization_stage(), dp=engine.dp_world_size, rank=engine.global_rank,
                weight_attr=tuple(engine.weight.shape))
    engine.destroy()
    return info


def test_counters_client_objects_and_dataloader():
    for rank, info in enumerate(run_ranks(_engine_job, world_size=2)):
        assert info["boundaries"] == [False, True, False, True]
        assert (info["steps"], info["samples"], info["micro"]) == (2, 16, 4)
        assert info["lrs"] == [0.1, 0.05, 0.05, 0.025]
        assert (info["tbs"], info["gas"], info["stage"], info["dp"], info["rank"]) == (8, 2, 1, 2, rank)
        assert info["weight_attr"] == (2, 4)  # unknown attributes fall through to the module


def _mismatch_job(rank, world):
    import dsrun
    try:
        dsrun.initialize(model=torch.nn.Linear(2, 2), config={"train_batch_size": 2, "gradient_clipping": 1.0 + rank})
    except ConfigError as exc:
        return str(exc)
    return None


def test_config_must_match_on_every_rank():
    for message in run_ranks(_mismatch_job, world_size=2):
        assert message and "differs between ranks" in message


def _no_optimizer_job(rank, world):
    import dsrun
    engine, opt, _, _ = dsrun.initialize(model=torch.nn.Linear(2, 2), config={"train_batch_size": 1,
                                                                              "bf16": {"enabled": True}})
    assert opt is None and engine.module.weight.dtype == torch.bfloat16
    try:
        engine.backward(engine(torch.ones(1, 2, dtype=torch.bfloat16)).sum())
    except ConfigError as exc:
        return str(exc)


def test_backward_without_optimizer_is_a_clear_error():
    assert "needs an optimizer" in run_ranks(_no_optimizer_job, world_size=1)[0]


def _cuda_bf16_zero2_job(rank, world):
    import dsrun
    torch.manual_seed(0)
    engine, *_ = dsrun.initialize(model=torch.nn.Linear(64, 64), config={
        "train_batch_size": 4 * world, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    assert engine.device.type == "cuda" and engine.module.weight.is_cuda
    losses = []
    for _ in range(5):
        x = torch.randn(4, 64, device=engine.device, dtype=torch.bfloat16)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.destroy()
    return losses


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2])
def test_cuda_bf16_zero2_trains(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    for losses in run_ranks(_cuda_bf16_zero2_job, world_size=world, start_method="spawn", backend="nccl"):
        assert all(l == l for l in losses) and losses[-1] < losses[0]


def _cuda_paths_job(rank, world):
    """bf16 ZeRO-1/2 on NCCL through every step path: 16-bit all-to-all reduction, FusedAdam per bucket, the
    side-stream update and all-gathers left running into the next forward (overlap_param_gather), all-gathers
    by copy engines (the default on one node) or by NCCL, and an overflowing step skipped on the device."""
    import dsrun
    out = {}
    for name, stage, zero_extra, gas in (("z2", 2, {}, 1), ("z2-pg", 2, {"overlap_param_gather": True}, 1),
                                         ("z2-nccl", 2, {"copy_engine_comm": False}, 1),
                                         ("z2-pg-nccl", 2, {"overlap_param_gather": True, "copy_engine_comm": False}, 1),
                                         ("z2-overflow", 2, {"overlap_param_gather": True}, 1),
                                         ("z1-pg-gas2", 1, {"overlap_param_gather": True}, 2),
                                         ("z1-gas2", 1, {}, 2)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        engine, *_ = dsrun.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "gradient_clipping": 0.5,
            "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": dict(stage=stage, reduce_bucket_size=5000, overlap_comm=True, **zero_extra)})
        g = torch.Generator().manual_seed(rank)
        for i in range(6 * gas):
            x = torch.randn(4, 64, generator=g).to(engine.device, torch.bfloat16)
            loss = engine(x).float().pow(2).mean()
            if name == "z2-overflow" and i == 2:  # an extra, overflowing step: skipped on the device
                engine.backward(loss * (float("inf") if rank == 0 else 1.0))
                engine.step()
                loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        engine.wait_params()
        out[name] = [p.detach().float().cpu() for p in engine.module.parameters()]
        out[name + ":meta"] = (engine.zero.gather_engine is not None, engine.skipped_steps)
        engine.destroy()
    return out


@pytest.mark.gpu
def test_cuda_step_paths_agree_across_ranks_and_options():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    r0, r1 = run_ranks(_cuda_paths_job, world_size=2, start_method="spawn", backend="nccl")
    for name in r0:
        if name.endswith(":meta"):
            copy_engine, skipped = r0[name]
            assert copy_engine == ("nccl" not in name) and skipped == (name == "z2-overflow:meta"), name
            continue
        for a, b in zip(r0[name], r1[name]):
            assert torch.equal(a, b), name  # every rank ends with the same weights
    # overlapping the all-gather, moving it to NCCL, or skipping an overflow on the device change nothing else
    for other in ("z2-pg", "z2-nccl", "z2-pg-nccl", "z2-overflow"):
        for a, b in zip(r0["z2"], r0[other]):
            assert torch.equal(a, b), other
    for a, b in zip(r0["z1-gas2"], r0["z1-pg-gas2"]):
        assert torch.equal(a, b)


def test_build_optimizer_type_matrix():
    from types import SimpleNamespace

    from dsrun.runtime.config.policies import OffloadPolicy
    from dsrun.runtime.optim import build_optimizer
    params = [torch.nn.Parameter(torch.zeros(2))]

    def build(kind, **kw):
        return build_optimizer(SimpleNamespace(type=kind, params=kw), params, offload=OffloadPolicy(), device="cpu")
    assert type(build("Adam")) is torch.optim.AdamW  # adam_w_mode defaults to true, as DeepSpeed
    assert type(build("adam", adam_w_mode=False)) is torch.optim.Adam
    assert type(build("AdamW", torch_adam=True)) is torch.optim.AdamW
    assert type(build("sgd", lr=0.1)) is torch.optim.SGD
    assert type(build("RMSprop")) is torch.optim.RMSprop
    from dsrun.runtime.lamb import Lamb
    assert type(build("Lamb", lr=1e-3)) is Lamb
    with pytest.raises(ConfigError, match="unknown optimizer"):
        build("Adamm")
    with pytest.raises(ConfigError, match="gradient_clipping"):
        build("Adam", max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="bad parameters"):
        build("SGD", lr=0.1, nope=1)


def test_lamb_matches_hand_computed_first_step():
    from dsrun.runtime.lamb import Lamb
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([0.5, -1.0])
    Lamb([w], lr=0.1, weight_decay=0.0).step()
    # step 1 with bias correction: update = g / (|g| + eps) = sign(g); trust = ||w|| / ||update|| = 5 / sqrt(2)
    expected = torch.tensor([3.0, 4.0]) - 0.1 * (5 / 2 ** 0.5) * torch.tensor([1.0, -1.0])
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-5)


def _lamb_config_job(rank, world):
    import dsrun
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    engine, *_ = dsrun.initialize(model=model, config={
        "train_batch_size": 8 * world, "optimizer": {"type": "Lamb", "params": {"lr": 1e-2}}})
    x, y = torch.randn(8, 8), torch.randn(8, 1)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.destroy()
    return losses


def test_lamb_from_config_trains():
    losses = run_ranks(_lamb_config_job, world_size=1)[0]
    assert losses[-1] < losses[0]

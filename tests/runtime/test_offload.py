"""Optimizer offload to the CPU (`zero_optimization.offload_optimizer: {device: cpu}`, runtime/zero/offload.py).

- stages 1, 2, 3 with the optimizer offloaded train like plain PyTorch (fp32 AdamW, clipping, GAS 2) on
  2 gloo ranks, for each host step: the config's AdamW (CPUAdam kernel), a client torch.optim.AdamW (run as
  the fused CPU Adam), and a client torch.optim.SGD (its own step on the host masters);
- a checkpoint saved with offload on 2 ranks loads without offload on 1 rank and the next step matches;
- the host budget check refuses what cannot fit, naming bytes needed, available and the setting;
- the issue's two founding configs, verbatim, train under `dsrun --num_gpus 2`.
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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, MICRO, GAS, LR, CLIP = 4, 2, 2, 0.05, 0.5


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3))


def make_data(world, steps=STEPS):
    g = torch.Generator().manual_seed(1)
    n = MICRO * GAS * world
    return [(torch.randn(n, 8, generator=g), torch.randn(n, 3, generator=g)) for _ in range(steps)]


def config(stage, world, offload=True, optimizer=True):
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
           "train_batch_size": MICRO * GAS * world, "gradient_clipping": CLIP,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 60}}
    if optimizer:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return cfg


def reference(world, opt_name):
    model = make_model()
    opt = (torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9) if opt_name == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01))
    for x, y in make_data(world):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def train(engine, rank, world, data):
    for x, y in data:
        for k in range(GAS):
            rows = slice((k * world + rank) * MICRO, (k * world + rank + 1) * MICRO)
            engine.backward(torch.nn.functional.mse_loss(engine(x[rows]), y[rows]))
            engine.step()


def _client(opt_name):
    if opt_name == "torch-adamw":
        return lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    if opt_name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9)
    return None


def _train_cells(rank, world):
    import dsrun
    from dsrun.runtime.zero.updater import HostOffloadUpdater
    out = {}
    for stage in (1, 2, 3):
        for opt_name in ("config-adamw", "torch-adamw", "sgd"):
            client = _client(opt_name)
            engine, *_ = dsrun.initialize(model=make_model(), optimizer=client,
                                          config=config(stage, world, optimizer=client is None))
            updater = engine.zero.updater
            assert isinstance(updater, HostOffloadUpdater)
            assert updater.kind == ("torch" if opt_name == "sgd" else "adam")
            train(engine, rank, world, make_data(world))
            out[stage, opt_name] = [v.clone() for v in engine.module_state_dict().values()]  # whole at stage 3 too
            engine.destroy()
    return out


@pytest.fixture(scope="module")
def cells():
    return run_ranks(_train_cells, world_size=2, timeout=300)


@pytest.mark.parametrize("stage", (1, 2, 3))
@pytest.mark.parametrize("opt_name", ("config-adamw", "torch-adamw", "sgd"))
def test_offloaded_optimizer_matches_pytorch(cells, stage, opt_name):
    want = reference(2, opt_name)
    for per_rank in cells:
        for p, q in zip(per_rank[stage, opt_name], want):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    for a, b in zip(cells[0][stage, opt_name], cells[1][stage, opt_name]):
        assert torch.equal(a, b)


def _save(rank, world, path):
    import dsrun
    data = make_data(world, STEPS + 1)
    engine, *_ = dsrun.initialize(model=make_model(), config=config(2, world))
    train(engine, rank, world, data[:STEPS])
    engine.save_checkpoint(path, tag="t")
    train(engine, rank, world, data[STEPS:])
    state = {k: v.clone() for k, v in engine.module_state_dict().items()}
    engine.destroy()
    return state


def _load(rank, world, path, offload):
    import dsrun
    engine, *_ = dsrun.initialize(model=make_model(), config=config(1, world, offload=offload))
    engine.load_checkpoint(path, tag="t")
    x, y = make_data(2, STEPS + 1)[STEPS]  # the same global batch the 2-rank run took
    for k in range(GAS):
        rows = slice(k * 2 * MICRO, (k + 1) * 2 * MICRO)  # two ranks' micro-batches of micro-step k
        engine.backward(torch.nn.functional.mse_loss(engine(x[rows]), y[rows]))
        engine.step()
    state = {k: v.clone() for k, v in engine.module_state_dict().items()}
    engine.destroy()
    return state


@pytest.mark.parametrize("offload", (False, True), ids=("load-without-offload", "load-with-offload"))
def test_checkpoint_with_offload_loads_at_another_world_size(tmp_path, offload):
    saved = run_ranks(_save, world_size=2, args=(str(tmp_path),), timeout=120)[0]
    loaded = run_ranks(_load, world_size=1, args=(str(tmp_path), offload), timeout=120)[0]
    assert saved.keys() == loaded.keys()
    for k in saved:
        torch.testing.assert_close(loaded[k], saved[k], rtol=1e-4, atol=1e-6)


def _bf16_pair(rank, world):
    import dsrun
    out = []
    for offload in (True, False):
        cfg = config(2, world, offload=offload)
        cfg["bf16"] = {"enabled": True}
        engine, *_ = dsrun.initialize(model=make_model(), config=cfg)
        for x, y in make_data(world):
            for k in range(GAS):
                rows = slice((k * world + rank) * MICRO, (k * world + rank + 1) * MICRO)
                loss = torch.nn.functional.mse_loss(engine(x[rows].bfloat16()).float(), y[rows])
                engine.backward(loss)
                engine.step()
        out.append(torch.cat([v.float().reshape(-1) for v in engine.module_state_dict().values()]))
        engine.destroy()
    return out


def test_bf16_offload_tracks_bf16_without_offload():
    """bf16 working weights written by the CPU kernel's fused cast, against the same run without offload."""
    for with_offload, without in run_ranks(_bf16_pair, world_size=2, timeout=120):
        assert (with_offload - without).norm() / without.norm() < 1e-2


def test_host_budget_check_refuses_what_cannot_fit():
    from dsrun.errors import ConfigError
    from dsrun.runtime.zero.offload import check_host_budget, host_bytes_needed
    # 1B parameters over 8 ranks, 8 per node, bf16 on an accelerator: 4 master + 8 Adam bytes per owned
    # element, and the pipelined step's ring; another optimizer's own step: + a 4-byte gradient buffer
    from dsrun.runtime.zero.host_pipeline import ring_bytes
    needed = host_bytes_needed(10**9 // 8, local_ranks=8, state_elems=2, param_bytes=2, pipelined=True)
    assert needed == (10**9 // 8 * 12 + ring_bytes(10**9 // 8, 2)) * 8
    assert host_bytes_needed(10**9 // 8, local_ranks=8, state_elems=2, param_bytes=2) == 10**9 // 8 * 16 * 8
    check_host_budget(needed, needed, local_ranks=8)
    with pytest.raises(ConfigError) as err:
        check_host_budget(needed, 8 << 30, local_ranks=8)
    msg = str(err.value)
    assert str(needed) in msg and str(8 << 30) in msg and "offload_optimizer" in msg
    assert err.value.exit_code == 2


FOUNDING = [
    {"train_batch_size": 32, "gradient_accumulation_steps": 2, "fp16": {"enabled": True},
     "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "allgather_partitions": True},
     "activation_checkpointing": {"partition_activations": True, "contiguous_memory_optimization": True}},
    {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                           "allgather_partitions": True, "allgather_bucket_size": 2e8, "reduce_scatter": True,
                           "reduce_bucket_size": 2e8, "overlap_comm": True, "contiguous_gradients": True},
     "bf16": {"enabled": True}, "gradient_accumulation_steps": 8, "gradient_clipping": 1.0,
     "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False},
]

FOUNDING_SCRIPT = textwrap.dedent("""
    import argparse
    import torch
    import dsrun

    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    dsrun.add_config_arguments(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = dsrun.initialize(args=args, model=model, optimizer=optimizer)
    dtype = next(engine.module.parameters()).dtype
    for _ in range(2 * engine.gradient_accumulation_steps()):
        x = torch.randn(engine.train_micro_batch_size_per_gpu(), 8).to(engine.device, dtype)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    print(f"rank {engine.global_rank} trained {engine.global_steps} steps in {dtype}", flush=True)
""")


@pytest.mark.parametrize("index", (0, 1), ids=("fp16-zero2-offload", "bf16-zero2-pinned-offload-auto"))
def test_founding_configs_train_under_the_launcher(tmp_path, index):
    (tmp_path / "train.py").write_text(FOUNDING_SCRIPT)
    (tmp_path / "ds.json").write_text(json.dumps(FOUNDING[index]))
    env = {k: v for k, v in os.environ.items() if k != "DS_ENV_FILE"}
    env["PYTHONPATH"] = REPO
    done = subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", "train.py",
                           "--deepspeed_config", "ds.json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0 trained 2 steps" in done.stdout and "rank 1 trained 2 steps" in done.stdout


def _adagrad_and_budget(rank, world):
    import dsrun
    from dsrun.errors import ConfigError
    from dsrun.runtime.zero.offload import check_layout_budget
    cfg = config(2, world)
    cfg["optimizer"] = {"type": "Adagrad", "params": {"lr": LR}}
    engine, *_ = dsrun.initialize(model=make_model(), config=cfg)
    kind = engine.zero.updater.kind
    train(engine, rank, world, make_data(world))
    state = [v.clone() for v in engine.module_state_dict().values()]
    owned = sum(b.own_end - b.own_start for b in engine.zero.layout.buckets)
    try:  # the same check the engine ran before allocating, with the host's memory taken as 1 KiB
        check_layout_budget(engine.zero.layout, engine.basic_optimizer, device="cpu", param_dtype=torch.float32,
                            available=1024, local_ranks=2)
        refused = None
    except ConfigError as exc:
        refused = str(exc)
    engine.destroy()
    return kind, state, owned, refused


def test_adagrad_runs_the_cpu_kernel_and_a_real_layout_over_budget_is_refused():
    model = make_model()
    opt = torch.optim.Adagrad(model.parameters(), lr=LR)
    for x, y in make_data(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    for kind, state, owned, refused in run_ranks(_adagrad_and_budget, world_size=2, timeout=120):
        assert kind == "adagrad"
        for p, q in zip(state, model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-4, atol=1e-6)
        needed = owned * (4 + 4) * 2  # fp32 master + Adagrad's sum, 2 local ranks, the master is the weight
        assert refused is not None and f"needs {needed} bytes" in refused and "1024 bytes" in refused


@pytest.mark.parametrize("device", ("cpu", "nvme"))
def test_parameter_offload_alone_offloads_the_optimizer_too(device, tmp_path):
    """DeepSpeed takes offload_param without offload_optimizer; dsrun runs it with the optimizer offloaded to
    the same device (its host step updates the offloaded shards), saying so once."""
    import warnings

    from dsrun.runtime.config import load_config
    from dsrun.runtime.config.policies import Device
    from dsrun.runtime.engine import Engine
    param = {"device": device, **({"nvme_path": str(tmp_path)} if device == "nvme" else {})}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "offload_param": param}},
                          world_size=1)
    assert cfg.offload.optimizer is Device(device) and cfg.offload.params is Device(device)
    Engine._check_supported(cfg)
    [w] = [w for w in caught if "without offload_optimizer" in str(w.message)]
    assert w.filename == "dsrun config" and str(w.message).startswith("zero_optimization.offload_param")


@pytest.mark.parametrize("zero,where,says", [
    ({"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/tmp"},
      "offload_optimizer": {"device": "cpu"}}, "zero_optimization.offload_param.device",
     "needs offload_optimizer on NVMe")])
def test_unsupported_parameter_offload_is_refused_clearly(zero, where, says):
    from dsrun.errors import ConfigError
    from dsrun.runtime.config import load_config
    from dsrun.runtime.engine import Engine
    cfg = load_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}, world_size=1)
    with pytest.raises(ConfigError) as err:
        Engine._check_supported(cfg)
    assert err.value.where == where and says in err.value.message


def test_plan_chunks_cuts_buckets_in_order():
    from dsrun.runtime.zero.host_pipeline import plan_chunks
    assert plan_chunks([(2, 5), (1, 0), (0, 4)], 2) == [(2, 0, 2), (2, 2, 4), (2, 4, 5), (0, 0, 2), (0, 2, 4)]
    assert plan_chunks([(0, 3)], 8) == [(0, 0, 3)]
    with pytest.raises(ValueError):
        plan_chunks([(0, 3)], 0)


def _cuda_cells(rank, world):
    """The offloaded step on CUDA goes through the pipelined host step ([Note: pipelined host step]) with
    7-element chunks: many chunks per bucket, buckets cut mid-chunk, ring slots reused many times."""
    import dsrun
    from dsrun.runtime.zero import host_pipeline
    host_pipeline.CHUNK_ELEMS = 7
    out = {}
    for stage in (1, 2, 3):
        for opt_name in ("config-adamw", "torch-adamw"):
            client = _client(opt_name)
            engine, *_ = dsrun.initialize(model=make_model(), optimizer=client,
                                          config=config(stage, world, optimizer=client is None))
            train(engine, rank, world, [(x.cuda(), y.cuda()) for x, y in make_data(world)])
            assert engine.zero.updater._pipeline is not None
            out[stage, opt_name] = [v.cpu() for v in engine.module_state_dict().values()]
            engine.destroy()
    # [Note: partial offload]: ratio 0.5 keeps the first layers' buckets (masters, Adam state) on the GPU
    cfg = config(3, world)
    cfg["zero_optimization"]["offload_optimizer"]["ratio"] = 0.5
    engine, *_ = dsrun.initialize(model=make_model(), config=cfg)
    devices = {m.device.type for m in engine.zero.masters}
    assert devices == {"cuda", "cpu"}, devices
    train(engine, rank, world, [(x.cuda(), y.cuda()) for x, y in make_data(world)])
    out[3, "config-adamw", "ratio"] = [v.cpu() for v in engine.module_state_dict().values()]
    engine.destroy()
    return out


@pytest.mark.gpu
def test_cuda_offload_pipelined_step_matches_pytorch():
    world = min(torch.cuda.device_count(), 2)
    cells = run_ranks(_cuda_cells, world_size=world, start_method="spawn", backend="nccl")
    for key in cells[0]:
        want = reference(world, key[1])
        for per_rank in cells:
            for p, q in zip(per_rank[key], want):
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_partial_offload_keeps_the_first_layers_buckets_on_the_device():
    from types import SimpleNamespace as B

    from dsrun.runtime.zero.offload import device_buckets
    # buckets in backward order: index 3 holds the first layers
    layout = B(buckets=[B(index=i, start=10 * i, end=10 * i + 10) for i in range(4)])
    assert device_buckets(layout, 1.0) == set()
    assert device_buckets(layout, 0.5) == {3, 2}
    assert device_buckets(layout, 0.6) == {3}  # never more than (1 - ratio) of the elements
    assert device_buckets(layout, 0.0) == {0, 1, 2, 3}

"""ZeRO-3 on gloo ranks: equivalence with plain PyTorch (fp32 1e-5, bf16 tracking, a Hugging Face GPT-2 1e-4),
uneven shards on 3 ranks, zero.Init memory, GatheredParameters edits, checkpoints across stages and world
sizes, 16-bit model saving, and one run through the real launcher.

Every check of one world size runs inside one job (spawning per check would cost seconds each); the
tests read the cached results.
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
import test_engine_equivalence as eq  # noqa: E402

import dsrun  # noqa: E402,F401  (imported before the ranks fork, so that they share it)

try:  # imported once here for the same reason; the GPT-2 test needs it (pyproject's `test` extra)
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    HAVE_TRANSFORMERS = True
except ImportError:
    HAVE_TRANSFORMERS = False

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLOBAL = 6  # rows per step for the checkpoint run: 3 per rank on 2 ranks, 2 per rank on 3


def z3_config(precision, gas, world, **zero):
    cfg = eq.cell_config(precision, 3, gas, world, 1)
    cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0, **zero})
    return cfg


def train_cell(engine, rank, world, gas):
    """eq's training loop; returns (losses, whole weights, skipped, steps) as eq.check_cell reads them."""
    import torch.distributed as dist
    losses = []
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    for x, y in eq.make_data(world, gas):
        total = 0.0
        for k in range(gas):
            rows = slice((k * world + rank) * eq.MICRO, (k * world + rank + 1) * eq.MICRO)
            loss = torch.nn.functional.mse_loss(engine(x[rows].to(dtype)).float(), y[rows])
            engine.backward(loss)
            engine.step()
            total += loss.item()
        t = torch.tensor(total / gas)
        dist.all_reduce(t)
        losses.append(t.item() / world)
    assert all(p.grad is None for p in engine.module.parameters())
    weights = [v.float() for v in engine.module_state_dict().values()]
    return losses, weights, engine.skipped_steps, engine.global_steps


# -- checkpoint run: fixed global batch, so a run continues identically at any world size -------------

def ckpt_config(stage, world):
    return {"train_batch_size": GLOBAL, "train_micro_batch_size_per_gpu": GLOBAL // world, "gradient_clipping": 0.5,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "weight_decay": 0.01}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def ckpt_batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL, 8, generator=g), torch.randn(GLOBAL, 3, generator=g)) for _ in range(n)]


def ckpt_steps(engine, rank, world, batches):
    import torch.distributed as dist
    out, m = [], GLOBAL // world
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(engine(x[rank * m:(rank + 1) * m]), y[rank * m:(rank + 1) * m])
        engine.backward(loss)
        engine.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        out.append(t.item() / world)
    return out


def save_then_continue(rank, world, stage, path):
    """Two steps, a checkpoint, two more steps: (losses after the checkpoint)."""
    engine, *_ = dsrun.initialize(model=eq.make_model(), config=ckpt_config(stage, world))
    batches = ckpt_batches()
    ckpt_steps(engine, rank, world, batches[:2])
    engine.save_checkpoint(path, tag="t")
    rest = ckpt_steps(engine, rank, world, batches[2:])
    engine.destroy()
    return rest


def load_and_continue(rank, world, stage, path):
    engine, *_ = dsrun.initialize(model=eq.make_model(), config=ckpt_config(stage, world))
    engine.load_checkpoint(path, tag="t")
    rest = ckpt_steps(engine, rank, world, ckpt_batches()[2:])
    steps = engine.global_steps
    engine.destroy()
    return rest, steps


# -- zero.Init and GatheredParameters -----------------------------------------------------------------

def init_and_gather(rank, world):
    """Bytes each rank holds after zero.Init, GatheredParameters edits, then training from the edited model."""
    cfg = z3_config("fp32", 1, world)
    with dsrun.zero.Init(config_dict_or_path=cfg):
        model = eq.make_model()
    held = sum((p.data.numel() + (p.ds_tensor.numel() if p.ds_tensor is not None else 0)) * p.element_size()
               for p in model.parameters())
    whole = sum(p.ds_numel * p.element_size() for p in model.parameters())
    attrs = [(tuple(p.ds_shape), p.ds_numel, p.ds_status, p.data.numel()) for p in model.parameters()]
    with dsrun.zero.GatheredParameters(list(model.parameters())):
        before_engine = [p.detach().clone() for p in model.parameters()]
    engine, *_ = dsrun.initialize(model=model, config=cfg)
    first = model[0].weight
    with dsrun.zero.GatheredParameters(first, modifier_rank=0):
        gathered_shape = tuple(first.shape)
        if rank == 0:
            first.data.fill_(0.25)
    with dsrun.zero.GatheredParameters([first]):
        seen = first.detach().clone()
    losses = train_cell(engine, rank, world, 1)[0]
    engine.destroy()
    return held, whole, attrs, before_engine, gathered_shape, seen, losses


def init_reference(world):
    """eq.reference with the first layer's weight set to 0.25 before training."""
    model = eq.make_model()
    with torch.no_grad():
        model[0].weight.fill_(0.25)
    opt = torch.optim.AdamW(model.parameters(), lr=eq.LR, weight_decay=0.01)
    losses = []
    for x, y in eq.make_data(world, 1):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), eq.CLIP)
        opt.step()
    return losses


# -- Hugging Face GPT-2 ------------------------------------------------------------------------------

def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0))


def gpt2_batches(world, steps=3):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 96, (2 * world, 12), generator=g) for _ in range(steps)]


def gpt2_job(rank, world, out_dir):
    import torch.distributed as dist
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.01}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100,
                                 "stage3_gather_16bit_weights_on_model_save": True}}
    engine, *_ = dsrun.initialize(model=gpt2(), config=cfg)
    units = [(u.name, u.persistent) for u in engine.zero.weights.units]
    losses = []
    for ids in gpt2_batches(world):
        mine = ids[2 * rank:2 * rank + 2]
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world)
    tied = engine.module.lm_head.weight is engine.module.transformer.wte.weight
    engine.save_16bit_model(out_dir)
    engine.save_checkpoint(os.path.join(out_dir, "ckpt"))
    engine.destroy()
    return units, losses, tied


def gpt2_reference(world):
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    losses = []
    for ids in gpt2_batches(world):
        loss = sum(model(input_ids=ids[2 * r:2 * r + 2], labels=ids[2 * r:2 * r + 2]).loss for r in range(world)) / world
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    return losses, model.state_dict()


# -- a model that changes its module order, reuses a block and has a frozen weight ---------------------

class Shuffled(torch.nn.Module):
    """Blocks run in the order given each step, the first of them twice; a frozen weight before the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.weight.requires_grad_(False)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x, order):
        for i in order:
            x = torch.tanh(self.blocks[i](x))
        x = self.blocks[order[0]](x)
        return self.head(self.frozen(x))


ORDERS = ([0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1])


def shuffled_engine(world):
    model = Shuffled()
    params = [p for p in model.parameters() if p.requires_grad]
    return dsrun.initialize(model=model, model_parameters=params, config=z3_config("fp32", 1, world))[0]


def shuffled_job(rank, world, path):
    import torch.distributed as dist
    engine = shuffled_engine(world)
    frozen = engine.module.frozen.weight
    sharded = (frozen.data.numel(), frozen.ds_tensor.numel(), frozen.ds_numel)
    units = sorted(u.name for u in engine.zero.weights.units)
    losses = []
    for (x, y), order in zip(eq.make_data(world, 1), ORDERS):
        rows = slice(rank * eq.MICRO, (rank + 1) * eq.MICRO)
        loss = torch.nn.functional.mse_loss(engine(x[rows], order), y[rows])
        engine.backward(loss)
        engine.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world)
    weights = {k: v.clone() for k, v in engine.module_state_dict().items()}
    engine.save_checkpoint(path, tag="t")
    # without stage3_gather_16bit_weights_on_model_save nothing is written (DeepSpeed's behaviour)
    no_16bit = (engine.save_16bit_model(path + "-16bit"), os.path.exists(path + "-16bit"))
    engine.destroy()
    fresh = shuffled_engine(world)
    fresh.load_checkpoint(path, tag="t")
    reloaded = {k: v.clone() for k, v in fresh.module_state_dict().items()}
    fresh.destroy()
    return units, losses, weights, sharded, reloaded, no_16bit


def shuffled_reference(world):
    model = Shuffled()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=eq.LR, weight_decay=0.01)
    losses = []
    for (x, y), order in zip(eq.make_data(world, 1), ORDERS):
        loss = torch.nn.functional.mse_loss(model(x, order), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), eq.CLIP)
        opt.step()
    return losses, model.state_dict()


# -- the stage3_* keys: what stays gathered ------------------------------------------------------------

def live_after_forward(rank, world):
    """Units gathered after one forward (with grad) and after backward, under each knob."""
    out = {}
    for name, zero in (("default", {}), ("reuse0", {"stage3_max_reuse_distance": 0}),
                       ("live", {"stage3_max_live_parameters": 300}), ("noprefetch", {"stage3_prefetch_bucket_size": 0}),
                       ("pieces", {"sub_group_size": 64, "reduce_bucket_size": 10 ** 6})):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Linear(10, 10) for _ in range(4)))
        engine, *_ = dsrun.initialize(model=model, config=z3_config("fp32", 1, world, **zero))
        weights = engine.zero.weights
        engine.backward(engine(torch.randn(2, 10)).sum())  # records the order (prefetch needs one step)
        engine.step()
        seen = []  # live units as each layer's forward starts (after dsrun's own pre-hook)
        for layer in model:
            layer.register_forward_pre_hook(lambda m, args: seen.append(len(weights._live)))
        loss = engine(torch.randn(2, 10)).sum()
        live = sorted(weights.units[u].name for u in weights._live)
        engine.backward(loss)
        engine.step()
        out[name] = (live, seen, weights.live_numel, [len(u.buckets) for u in weights.units])
        engine.destroy()
    return out


# -- memory held between steps -------------------------------------------------------------------------

def held_between_steps(engine):
    """(bytes of per-rank state, this rank's trainable elements) after a step: shards, masters, optimizer
    state, gradient chunks and staging buffers."""
    zero = engine.zero
    weights, reducer = zero.weights, zero.reducer
    tensors = [t for t in weights.shards[:weights.num_trainable] + list(zero.masters) + list(reducer.grads)
               + list(reducer._free) + [reducer.part] if t is not None]
    tensors += [v for st in zero.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    seen, total = set(), 0
    for t in tensors:  # masters alias the shards in fp32: count each storage once
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total, sum(m.numel() for m in zero.masters)


# -- the jobs ------------------------------------------------------------------------------------------

CELLS = {2: (("fp32", 1), ("fp32", 2), ("bf16", 2)), 3: (("fp32", 2),)}


def job(rank, world, ckpt_dir, out_dir):
    out = {}
    for precision, gas in CELLS[world]:
        engine, *_ = dsrun.initialize(model=eq.make_model(), config=z3_config(precision, gas, world))
        out[precision, gas] = train_cell(engine, rank, world, gas)
        out["held", precision, gas] = held_between_steps(engine)
        engine.destroy()
    out["init"] = init_and_gather(rank, world)
    if world == 2:
        out["shuffled"] = shuffled_job(rank, world, os.path.join(ckpt_dir, "shuffled"))
        out["knobs"] = live_after_forward(rank, world)
        out["saved"] = save_then_continue(rank, world, 3, os.path.join(ckpt_dir, "z3"))
        out["saved-z2"] = save_then_continue(rank, world, 2, os.path.join(ckpt_dir, "z2"))
        out["at-z2"] = load_and_continue(rank, world, 2, os.path.join(ckpt_dir, "z3"))
        out["z2-at-z3"] = load_and_continue(rank, world, 3, os.path.join(ckpt_dir, "z2"))
        if HAVE_TRANSFORMERS:
            out["gpt2"] = gpt2_job(rank, world, out_dir)
    else:
        out["at-world3"] = load_and_continue(rank, world, 3, os.path.join(ckpt_dir, "z3"))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    ckpt, out = tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("out")
    two = run_ranks(job, world_size=2, args=(str(ckpt), str(out)), timeout=300)
    three = run_ranks(job, world_size=3, args=(str(ckpt), str(out)), timeout=300)
    return {2: two, 3: three, "ckpt": str(ckpt), "out": str(out)}


@pytest.mark.parametrize("world,precision,gas", [(w, p, g) for w, cells in CELLS.items() for p, g in cells])
def test_matches_pytorch(results, world, precision, gas):
    eq.check_cell(results[world], (precision, gas), world, precision, gas)


@pytest.mark.parametrize("world,precision,gas", [(w, p, g) for w, cells in CELLS.items() for p, g in cells])
def test_between_steps_a_rank_holds_only_masters_and_adam_state(results, world, precision, gas):
    # no 16-bit shard beside the fp32 master, no gradient partition or staging buffer kept between steps
    # (unit_weights.py's [Note: the master is the shard], reducer.py's [Note: transient gradient storage])
    for res in results[world]:
        held, owned = res["held", precision, gas]
        assert held == 12 * owned, (held, owned)


@pytest.mark.parametrize("world", (2, 3))
def test_init_shards_at_construction_and_gathered_edits_reach_every_rank(results, world):
    per_rank = results[world]
    for rank, res in enumerate(per_rank):
        held, whole, attrs, before, gathered_shape, seen, losses = res["init"]
        # 1/world of every parameter, padded by fewer than `world` elements each (6 parameters, fp32)
        assert held <= whole / world + 6 * world * 4, (held, whole)
        shapes = [tuple(p.shape) for p in eq.make_model().parameters()]
        assert [a[0] for a in attrs] == shapes and all(a[2] == "NOT_AVAILABLE" and a[3] == 0 for a in attrs)
        for got, want in zip(before, eq.make_model().parameters()):  # rank 0's initial weights
            assert torch.equal(got, want.detach())
        assert gathered_shape == shapes[0]
        assert torch.equal(seen, torch.full(shapes[0], 0.25))  # rank 0's edit, on every rank
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(init_reference(world)), rtol=1e-5, atol=1e-7)


def test_changing_order_reused_block_and_frozen_weight(results):
    ref_losses, ref_state = shuffled_reference(2)
    for units, losses, weights, sharded, reloaded, no_16bit in (r["shuffled"] for r in results[2]):
        assert no_16bit == (False, False)
        assert units == ["", "blocks.0", "blocks.1", "blocks.2"]  # the head's parameters in the root unit
        assert sharded == (0, 32, 64)  # the frozen weight is sharded too (half of its 64 elements each)
        assert all(torch.equal(reloaded[k], v) for k, v in weights.items())  # checkpoint round trip
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
        for k, v in ref_state.items():
            torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-5)


def test_stage3_keys_decide_what_stays_gathered(results):
    knobs = results[2][0]["knobs"]
    # 4 units of 110 elements (128 padded): by default every finished unit stays for backward (1e9 reuse)
    assert knobs["default"][0] == ["0", "1", "2", "3"]
    assert knobs["reuse0"][0] == ["3"]  # only the unit that finished last
    # the previous step's order prefetches what follows (all of it within 5e7 elements); with prefetching
    # off a unit is gathered where it is used; stage3_max_live_parameters bounds both
    assert knobs["reuse0"][1] == [4, 4, 3, 2]  # all gathered at the start; each released once the next finished
    assert knobs["noprefetch"][1] == [1, 2, 3, 4]  # gathered one by one (kept for reuse: the default 1e9)
    live, seen, _, _ = knobs["live"]
    assert max(seen) * 128 <= 300 and len(live) * 128 <= 300
    assert knobs["default"][2] == 0  # everything released after backward
    # reduce_bucket_size (60 in these configs) and sub_group_size cut each unit's 110 elements into pieces
    assert knobs["default"][3] == [2, 2, 2, 2] and knobs["pieces"][3] == [2, 2, 2, 2]


def test_checkpoint_continues_across_stages_and_world_sizes(results):
    rest = results[2][0]["saved"]
    for world, key in ((2, "at-z2"), (3, "at-world3")):
        for losses, steps in (r[key] for r in results[world]):
            assert steps == 4
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(rest), rtol=1e-5, atol=1e-7)
    losses, steps = results[2][0]["z2-at-z3"]  # and a stage-2 checkpoint continues at stage 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(results[2][0]["saved-z2"]), rtol=1e-5, atol=1e-7)
    from dsrun.runtime.checkpoint.to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    state = get_fp32_state_dict_from_zero_checkpoint(os.path.join(results["ckpt"], "z3"), tag="t")
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape)
                                                             for k, v in eq.make_model().state_dict().items()}


def test_hugging_face_gpt2_matches_pytorch(results):
    if not HAVE_TRANSFORMERS:
        pytest.skip("transformers is not installed (pip install dsrun[test])")
    ref_losses, ref_state = gpt2_reference(2)
    saved = torch.load(os.path.join(results["out"], "pytorch_model.bin"))
    for units, losses, tied in (r["gpt2"] for r in results[2]):
        # one unit per block, the root (embeddings tied to the head, final norm), the small parameters
        assert units == [("transformer.h.0", False), ("transformer.h.1", False), ("", False), ("<persistent>", True)]
        assert tied
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)
    from dsrun.runtime.checkpoint.to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    fp32 = get_fp32_state_dict_from_zero_checkpoint(os.path.join(results["out"], "ckpt"))
    assert set(saved) == set(ref_state) == set(fp32)
    for k, v in ref_state.items():
        torch.testing.assert_close(saved[k].float(), v, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fp32[k], v, rtol=1e-4, atol=1e-4)  # the tied head too


TRAIN_SCRIPT = textwrap.dedent("""
    import argparse
    import torch
    import dsrun

    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    dsrun.add_config_arguments(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    engine, *_ = dsrun.initialize(args=args, model=model)
    assert engine.zero_optimization_stage() == 3
    for step in range(3):
        x = torch.randn(2, 8)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    assert all(p.ds_status == "NOT_AVAILABLE" for p in model.parameters())
    print(f"rank {engine.global_rank} trained {engine.global_steps} steps", flush=True)
""")


def test_stage3_through_the_launcher(tmp_path):
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    (tmp_path / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    env = {k: v for k, v in os.environ.items() if k != "DS_ENV_FILE"}
    env["PYTHONPATH"] = REPO
    done = subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", "train.py",
                           "--deepspeed_config", "ds.json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0 trained 3 steps" in done.stdout and "rank 1 trained 3 steps" in done.stdout


def _cuda_job(rank, world):
    """bf16 on NCCL: ZeRO-3 (FusedAdam flat kernel on the masters, async per-unit gathers cast from them with
    prefetch, a persistent unit, 16-bit all-to-all gradient reduction) against ZeRO-2 from the same start."""
    out = {}
    for name, stage in (("z2", 2), ("z3", 3)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                                                          torch.nn.Linear(256, 64), torch.nn.LayerNorm(64))
                                      for _ in range(3)))
        engine, *_ = dsrun.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
            "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "overlap_comm": True, "stage3_param_persistence_threshold": 100,
                                  "stage3_prefetch_bucket_size": 20000, "stage3_max_reuse_distance": 0}})
        g = torch.Generator().manual_seed(rank)
        for _ in range(8):
            x = torch.randn(4, 64, generator=g).to(engine.device, torch.bfloat16)
            engine.backward(engine(x).float().pow(2).mean())
            engine.step()
        out[name] = [v.float().cpu() for v in engine.module_state_dict().values()]
        if stage == 3:
            weights = engine.zero.weights
            out["live"] = (weights.live_numel, sum(u.numel for u in weights.units if u.persistent))
        engine.destroy()
    return out


@pytest.mark.gpu
def test_cuda_zero3_tracks_zero2():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    for res in run_ranks(_cuda_job, world_size=2, start_method="spawn", backend="nccl"):
        got = torch.cat([w.reshape(-1) for w in res["z3"]])
        want = torch.cat([w.reshape(-1) for w in res["z2"]])
        assert (got - want).norm() / want.norm() < 1e-2
        live, persistent = res["live"]
        assert live == persistent > 0  # after a step only the persistent unit (LayerNorms, small biases) is whole

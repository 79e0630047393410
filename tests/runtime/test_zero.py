"""ZeRO-1/2 specifics on 2 gloo ranks: optimizer-state memory, gradient partitioning, the gloo
fallback collectives, overflow skips, checkpoint shard tiling, destroy()."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _dist import run_ranks  # noqa: E402

from dsrun.runtime.zero.layout import build_layout  # noqa: E402


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def config(stage, **extra):
    cfg = {"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-2}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 16}}
    cfg.update(extra)
    return cfg


def train(engine, rank, steps=2):
    for i in range(steps):
        x = torch.randn(1, 6, generator=torch.Generator().manual_seed(10 * i + rank))
        engine.backward(engine(x.to(next(engine.module.parameters()).dtype)).float().pow(2).sum())
        engine.step()


def test_layout_tiles_every_parameter_once():
    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(n))) for i, n in enumerate((5, 17, 3, 40, 1))]
    for world in (1, 2, 3):
        owned = {name: [] for name, _ in params}
        for rank in range(world):
            layout = build_layout([params], bucket_numel=16, world_size=world, rank=rank, sharded=True)
            for b in layout.buckets:
                assert b.numel % world == 0 and b.own_numel == b.numel // world
                for s in b.slots:
                    lo, hi = b.owned_range(s)
                    if hi > lo:
                        owned[s.name].append((lo, hi))
        for name, p in params:
            ranges = sorted(owned[name])
            assert ranges[0][0] == 0 and ranges[-1][1] == p.numel()
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def _memory_job(rank, world):
    import dsrun
    out = {}
    for stage, gas in ((0, 1), (1, 1), (1, 2), (2, 1), (2, 2)):
        engine, *_ = dsrun.initialize(model=model(), config=config(stage, train_batch_size=2 * gas,
                                                                     gradient_accumulation_steps=gas))
        train(engine, rank)
        z = engine.zero
        out[stage, gas] = {"state": z.optimizer_state_numel(), "total": z.layout.numel, "mode": z.reducer.mode,
                           "full_accum": z.reducer.accum is not None}
        engine.destroy()
    return out


def test_optimizer_state_is_one_over_world():
    r0, r1 = run_ranks(_memory_job, world_size=2)
    for res in (r0, r1):
        # Adam: exp_avg + exp_avg_sq over every (padded) element, or over this rank's half of them
        assert res[0, 1]["state"] == 2 * res[0, 1]["total"]
        for key in ((1, 1), (1, 2), (2, 1), (2, 2)):
            assert res[key]["state"] == 2 * res[key]["total"] // 2
        assert res[0, 1]["mode"] == "replicated"
        # ZeRO-1 accumulates in a full buffer and reduces at the boundary only when there is something to
        # accumulate; without accumulation it reduces bucket by bucket as ZeRO-2 does, with no full buffer.
        assert res[1, 2]["mode"] == "shard_at_boundary" and res[1, 2]["full_accum"]
        for key in ((1, 1), (2, 1), (2, 2)):
            assert res[key]["mode"] == "shard_every_step" and not res[key]["full_accum"]


def _fallback_job(rank, world, native):
    import dsrun
    results = []
    for stage, extra in ((1, {}), (2, {}), (2, {"bf16": {"enabled": True}})):  # bf16: 16-bit all-to-all
        engine, *_ = dsrun.initialize(model=model(), config=config(stage, **extra))
        assert engine.zero.reducer.sum_locally == bool(extra)
        engine.zero.comm.native_reduce_scatter = native
        engine.zero.comm.native_all_gather = native
        engine.zero.comm.native_all_to_all = native
        train(engine, rank, steps=3)
        results.append([p.detach().clone() for p in engine.module.parameters()])
        engine.destroy()
    return results


def test_gloo_fallback_matches_native_collectives():
    native = run_ranks(_fallback_job, world_size=2, args=(True,))
    fallback = run_ranks(_fallback_job, world_size=2, args=(False,))
    for a, b in zip(native[0], fallback[0]):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _overflow_job(rank, world, stage):
    import dsrun
    engine, opt, _, sched = dsrun.initialize(
        model=model(), config=config(stage, fp16={"enabled": True, "initial_scale_power": 4, "hysteresis": 1},
                                     scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10}}))
    before = [p.detach().clone() for p in engine.module.parameters()]
    sched_start = sched.last_batch_iteration
    x = torch.randn(1, 6).half()
    bad = engine(x).float().sum() * (float("inf") if rank == 1 else 1.0)  # one rank overflows: all skip
    engine.backward(bad)
    engine.step()
    skipped = (engine.skipped_steps, engine.global_steps, engine.was_step_applied(), engine.loss_scale,
               sched.last_batch_iteration if hasattr(sched, "last_batch_iteration") else None,
               all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters())))
    engine.backward(engine(x).float().sum())
    engine.step()
    applied = (engine.skipped_steps, engine.global_steps, engine.was_step_applied(),
               sched.last_batch_iteration - sched_start)
    return skipped, applied, sched_start


@pytest.mark.parametrize("stage", (0, 2))
def test_overflow_skips_step_and_scheduler_on_every_rank(stage):
    for skipped, applied, sched_start in run_ranks(_overflow_job, world_size=2, args=(stage,)):
        n_skipped, steps, was_applied, scale, sched_iter, unchanged = skipped
        assert (n_skipped, steps, was_applied, scale, unchanged) == (1, 1, False, 8.0, True)
        assert sched_iter == sched_start  # the skipped step did not advance the schedule
        assert applied == (1, 2, True, 1)  # the applied one advanced it once


def _shards_job(rank, world, stage):
    import dsrun
    engine, *_ = dsrun.initialize(model=model(), config=config(stage, bf16={"enabled": True}))
    train(engine, rank)
    shards = {s.name: (s.start, s.end, s.master.clone(), {k: v.clone() for k, v in s.optim.items()}, s.shape)
              for s in engine.checkpoint_shards()}
    full = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    scalars = engine.checkpoint_scalar_state()
    # reload into a fresh engine: the shards of this rank, read back through the read() contract
    fresh, *_ = dsrun.initialize(model=model(), config=config(stage, bf16={"enabled": True}))
    fresh.load_checkpoint_shards(lambda name, key, a, b: (shards[name][2] if key == "master" else
                                                          shards[name][3][key])[a - shards[name][0]:b - shards[name][0]])
    fresh.load_checkpoint_scalar_state(scalars)
    reloaded = {n: p.detach().float() for n, p in fresh.module.named_parameters()}
    same = all(torch.equal(full[n], reloaded[n]) for n in full)
    train(engine, rank)
    train(fresh, rank)
    same_after = all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), fresh.module.parameters()))
    hooks_before = sum(len(p._post_accumulate_grad_hooks or {}) for p in fresh.module.parameters())
    fresh.destroy()
    hooks_after = sum(len(p._post_accumulate_grad_hooks or {}) for p in fresh.module.parameters())
    engine.destroy()
    ranges = {n: (v[0], v[1], v[4]) for n, v in shards.items()}
    return ranges, same, same_after, scalars["counters"], hooks_before, hooks_after, fresh.zero is None


@pytest.mark.parametrize("stage", (0, 1, 2))
def test_checkpoint_shards_round_trip_and_destroy(stage):
    results = run_ranks(_shards_job, world_size=2, args=(stage,))
    for ranges, same, same_after, counters, hooks_before, hooks_after, gone in results:
        assert same and same_after
        assert counters == {"global_steps": 2, "global_samples": 4, "micro_steps": 2, "skipped_steps": 0}
        assert hooks_before == 4 and hooks_after == 0 and gone
    names = results[0][0].keys()
    for name in names:
        numel = 1
        for d in results[0][0][name][2]:
            numel *= d
        spans = sorted((r[0][name][0], r[0][name][1]) for r in results)
        if stage == 0:
            assert spans == [(0, numel), (0, numel)]
        else:
            covered = sum(b - a for a, b in spans)
            assert covered == numel and max(b for _, b in spans) == numel


def _gather_overlap_job(rank, world):
    import dsrun
    cfg = config(2, zero_optimization={"stage": 2, "reduce_bucket_size": 16, "overlap_comm": True,
                                       "overlap_param_gather": True})
    engine, *_ = dsrun.initialize(model=model(), config=cfg)
    hooks = sum(len(m._forward_pre_hooks) for m in engine.module.modules())
    train(engine, rank)
    pending_after_step = engine.zero.gate.pending
    state = {k: v.clone() for k, v in engine.module.state_dict().items()}  # waits
    engine.destroy()
    left = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in engine.module.modules())
    return hooks, pending_after_step, state, left


def test_overlap_param_gather_waits_in_state_dict_and_cleans_up():
    r0, r1 = run_ranks(_gather_overlap_job, world_size=2)
    for hooks, pending, _, left in (r0, r1):
        assert hooks == 2  # one per Linear (the modules that own parameters)
        assert pending  # step() returned with gathers in flight
        assert left == 0
    for k in r0[2]:
        assert torch.equal(r0[2][k], r1[2][k]), k


def _overlapped_update_job(rank, world):
    """overlap_param_gather with FusedAdam (per-bucket updates, gathers left running) and a scheduler that
    moves the learning rate every step: the same weights as without the option."""
    import dsrun
    from dsrun.kernels import FusedAdam
    out = []
    for gather in (False, True):
        cfg = config(2, zero_optimization={"stage": 2, "reduce_bucket_size": 16, "overlap_comm": True,
                                           "overlap_param_gather": gather},
                     scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 3, "warmup_max_lr": 0.1}})
        engine, *_ = dsrun.initialize(model=model(), config=cfg,
                                      optimizer=lambda ps: FusedAdam(ps, lr=0.1, weight_decay=0.01))
        train(engine, rank, steps=4)
        engine.wait_params()
        out.append([p.detach().clone() for p in engine.module.parameters()])
        engine.destroy()
    return out


def test_overlapped_updates_match_with_a_scheduler():
    for plain, overlapped in run_ranks(_overlapped_update_job, world_size=2):
        for a, b in zip(plain, overlapped):
            assert torch.equal(a, b)



def _device_skip_job(rank, world, stage):
    """bf16 with FusedAdam settles overflow on the device ([Note: deferred overflow accounting]): a run with
    an overflowing step in the middle must end exactly where the run without that step ends, with the
    scheduler, step counts and counters settled as the host check would leave them."""
    import dsrun
    from dsrun.kernels import FusedAdam
    sched = {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 0.1}}
    runs = {}
    for name, batches in (("clean", (0, 2, 3)), ("overflow", (0, None, 2, 3))):
        engine, *_ = dsrun.initialize(model=model(), config=config(stage, bf16={"enabled": True}, scheduler=sched,
                                                                   gradient_clipping=1.0),
                                      optimizer=lambda ps: FusedAdam(ps, lr=0.1, weight_decay=0.01))
        assert engine._skip_on_device
        lrs, applied = [], []
        for i in batches:
            if i is None:  # one rank overflows: every rank skips
                loss = engine(torch.randn(1, 6).bfloat16()).float().sum() * (float("inf") if rank == 1 else 1.0)
            else:
                x = torch.randn(1, 6, generator=torch.Generator().manual_seed(10 * i + rank)).bfloat16()
                loss = engine(x).float().pow(2).sum()
            engine.backward(loss)
            engine.step()
            applied.append(engine.was_step_applied())
            lrs.append(engine.get_lr()[0])
        state = engine.checkpoint_scalar_state()
        steps = {v["step"] for v in engine.zero.optimizer.state.values()}
        runs[name] = ([p.detach().clone() for p in engine.module.parameters()], lrs, applied, state, steps)
        engine.destroy()
    static, *_ = dsrun.initialize(model=model(), config=config(stage, fp16={"enabled": True, "loss_scale": 128}),
                                  optimizer=lambda ps: FusedAdam(ps, lr=0.1))
    dynamic, *_ = dsrun.initialize(model=model(), config=config(stage, fp16={"enabled": True}),
                                   optimizer=lambda ps: FusedAdam(ps, lr=0.1))
    return runs, static._skip_on_device, dynamic._skip_on_device


@pytest.mark.parametrize("stage", (0, 2))
def test_device_side_overflow_skip_matches_a_run_without_the_step(stage):
    for runs, static, dynamic in run_ranks(_device_skip_job, world_size=2, args=(stage,)):
        clean_w, clean_lrs, clean_applied, clean_state, clean_steps = runs["clean"]
        w, lrs, applied, state, steps = runs["overflow"]
        assert all(torch.equal(a, b) for a, b in zip(w, clean_w))
        assert applied == [True, False, True, True] and clean_applied == [True] * 3
        assert lrs == clean_lrs[:1] + clean_lrs  # the skipped step did not move the scheduler
        assert steps == clean_steps == {3}  # nor count as an Adam step
        assert state["lr_scheduler"] == clean_state["lr_scheduler"]
        assert state["counters"]["skipped_steps"] == 1 and state["counters"]["global_steps"] == 4
        assert state["loss_scaler"]["cur_iter"] == clean_state["loss_scaler"]["cur_iter"] + 1
        assert static and not dynamic  # a dynamic fp16 scale needs the outcome before the next backward


def _two_backwards_job(rank, world):
    """Two engine.backward() calls before one step() (a GAN does this): the update uses g1 + g2 at every stage."""
    import dsrun
    out = {}
    for stage in (0, 1, 2, 3):
        cfg = config(stage, optimizer={"type": "SGD", "params": {"lr": 1.0}}, gradient_clipping=0.0)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        engine, *_ = dsrun.initialize(model=model(), config=cfg)
        for i in range(2):
            x = torch.randn(1, 6, generator=torch.Generator().manual_seed(10 * i + rank))
            engine.backward(engine(x).pow(2).sum())
        engine.step()
        out[stage] = [v.clone() for v in engine.module_state_dict().values()]
        engine.destroy()
    return out


def test_several_backwards_before_one_step_sum_their_gradients():
    reference = model()
    for i in range(2):  # the mean over ranks of each rank's two gradients, one SGD step of lr 1
        for r in range(2):
            x = torch.randn(1, 6, generator=torch.Generator().manual_seed(10 * i + r))
            (reference(x).pow(2).sum() / 2).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= p.grad
    want = list(reference.state_dict().values())
    for res in run_ranks(_two_backwards_job, world_size=2):
        for stage, got in res.items():
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"stage {stage}")

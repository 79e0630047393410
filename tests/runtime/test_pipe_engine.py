"""The pipeline engine on gloo ranks against the same layers run as one sequential model in one process
(pipe_cases.py): 2 and 4 stages, 2 x 2 pipeline x data parallel with ZeRO-1, tied layers, activation
checkpointing, train/eval/train, bf16, and a checkpoint saved at 4 stages reloaded at 2. fp32 runs
match the reference within 1e-5 relative with gradient clipping active (the global norm is above the
clip threshold). Plus the pure planning pieces: partitions, topology, ZeRO-1 ownership, p2p meta.

Every case of one world size runs inside one job (spawning per case would cost seconds each).
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _dist import run_ranks  # noqa: E402
import pipe_cases as pc  # noqa: E402

import dsrun  # noqa: E402,F401  (imported before the ranks fork)
from dsrun.errors import ConfigError, UsageError  # noqa: E402
from dsrun.runtime.pipe.engine import PipelineError  # noqa: E402
from dsrun.runtime.pipe.p2p import TensorMeta  # noqa: E402
from dsrun.runtime.pipe.partition import LayerInfo, partition_balanced, partition_uniform, plan_partition  # noqa: E402
from dsrun.runtime.pipe.stage_optimizer import assign_owners  # noqa: E402
from dsrun.runtime.pipe.topology import PipeDataParallelTopology, ProcessTopology  # noqa: E402

STEPS = 3


# -- pure pieces ---------------------------------------------------------------------------------------

def test_partition_uniform_and_balanced():
    assert partition_uniform(10, 4) == [0, 3, 6, 8, 10]
    assert partition_uniform(8, 4) == [0, 2, 4, 6, 8]
    assert partition_uniform(2, 4) == [0, 1, 2, 2, 2]
    assert partition_balanced([1, 1, 4, 1, 1], 2) == [0, 3, 5]
    assert partition_balanced([5, 1, 1, 1, 1, 1], 2) == [0, 1, 6]
    assert partition_balanced([0, 1, 0, 1, 0, 1, 0, 1], 4) == [0, 3, 5, 7, 8]  # weightless items join the part before
    parts = partition_balanced([3, 1, 4, 1, 5, 9, 2, 6], 3)
    assert parts[0] == 0 and parts[-1] == 8 and all(a < b for a, b in zip(parts, parts[1:]))
    assert max(sum([3, 1, 4, 1, 5, 9, 2, 6][a:b]) for a, b in zip(parts, parts[1:])) == 14  # the optimum


def test_plan_partition_methods():
    layers = [LayerInfo("Embedding", 100), LayerInfo("Block", 10), LayerInfo("Block", 10), LayerInfo("Block", 10),
              LayerInfo("Block", 10), LayerInfo("Head", 0)]
    assert plan_partition("uniform", layers, 2) == [0, 3, 6]
    assert plan_partition("parameters", layers, 2) == [0, 1, 6]
    assert plan_partition("type:block", layers, 2) == [0, 3, 6]  # case-insensitive, 2 blocks each
    with pytest.raises(ValueError, match="matches no layer"):
        plan_partition("type:Conv", layers, 2)
    with pytest.raises(ValueError, match="unknown partition_method"):
        plan_partition("best", layers, 2)


def test_topology_as_deepspeed():
    topo = PipeDataParallelTopology(num_pp=2, num_dp=2)
    assert topo.get_axis_names() == ["pipe", "data"]
    assert topo.get_rank(pipe=1, data=0) == 2
    assert topo.get_coord(3) == topo.ProcessCoord(pipe=1, data=1)
    assert topo.get_axis_comm_lists("data") == [[0, 1], [2, 3]]
    assert topo.get_axis_comm_lists("pipe") == [[0, 2], [1, 3]]
    assert topo.filter_match(pipe=0) == [0, 1] and topo.get_axis_list("data", 1) == [1, 3]
    assert topo.get_dim("model") == 0 and topo.world_size() == 4
    mp = ProcessTopology(axes=["pipe", "data", "model"], dims=[2, 1, 2])
    assert mp.get_rank_repr(3) == "model_01"


def test_zero1_owners_and_p2p_meta():
    assert assign_owners([10, 10, 1, 1], 2) == [0, 1, 0, 1]
    assert assign_owners([4, 3, 2], 1) == [0, 0, 0]
    msg = (torch.zeros(2, 3, requires_grad=True), torch.ones(4, dtype=torch.int64))
    meta = TensorMeta.decode(TensorMeta.of(msg).encode())
    assert meta.as_tuple and meta.specs == [(torch.Size([2, 3]), torch.float32, True),
                                            (torch.Size([4]), torch.int64, False)]
    with pytest.raises(TypeError, match="only tensors"):
        TensorMeta.of((torch.zeros(1), 3))


# -- multi-process runs ----------------------------------------------------------------------------------

def _world4(rank, world, ckpt_dir):
    out = {}
    data = pc.batches(STEPS, 1, 4)
    engine = pc.make_engine(pc.mlp_specs(), 4, 1, 4)  # 7 layers: 2/2/2/1
    losses = pc.train_steps(engine, data[:2])
    engine.save_checkpoint(ckpt_dir, client_state={"note": "four"})
    losses += pc.train_steps(engine, data[2:])
    out["four"] = (losses, pc.stage_weights(engine), engine.get_global_grad_norm())
    # a second PipelineModule in the same job: 2 stages x 2 data-parallel ranks, ZeRO-1
    data = pc.batches(STEPS, 2, 2)
    engine = pc.make_engine(pc.mlp_specs(), 2, 2, 2, zero_stage=1, partition_method="parameters")
    out["2x2"] = (pc.train_steps(engine, data), pc.stage_weights(engine), engine.get_global_grad_norm(),
                  sum(v.numel() for st in engine.optimizer.state.values() for v in st.values() if v.dim() > 0),
                  sum(p.numel() for p in engine.module.parameters()))
    # fp16 with ZeRO-1 over data parallelism: at 2^18 (hysteresis 1) the first steps overflow, then it trains
    engine = pc.make_engine(pc.mlp_specs(), 2, 2, 2, zero_stage=1, fp16={"initial_scale_power": 18, "hysteresis": 1})
    engine.set_batch_fn(lambda batch: tuple(t.half() for t in batch))
    out["2x2-fp16"] = (pc.train_steps(engine, data), pc.stage_weights(engine), engine.skipped_steps,
                       engine.loss_scaler.loss_scale)
    engine = pc.make_engine(pc.mlp_specs(), 2, 2, 2, num_chunks=2)  # interleaved with data parallelism
    out["2x2-interleaved"] = (pc.train_steps(engine, data), pc.stage_weights(engine))
    engine = pc.make_engine(pc.mlp_specs(), 4, 1, 4, extra_warmup=2)  # ordered 1F1B, two more warm-up forwards
    out["four-xw"] = (pc.train_steps(engine, pc.batches(STEPS, 1, 4)), pc.stage_weights(engine))
    # 4 stages x 2 chunks: the last stage's activations go around to stage 0 on a channel of its own
    engine = pc.make_engine(pc.mlp_specs(8), 4, 1, 4, num_chunks=2)
    out["four-interleaved"] = (pc.train_steps(engine, pc.batches(STEPS, 1, 4)), pc.stage_weights(engine),
                               sorted(engine.p2p.groups))
    return out


def _world2(rank, world, ckpt_dir):
    out = {}
    data = pc.batches(STEPS, 1, 4)
    engine = pc.make_engine(pc.mlp_specs(), 2, 1, 4, activation_checkpoint_interval=1)
    losses = pc.train_steps(engine, data[:1])
    eval_loss = engine.eval_batch(iter(data[0][0])).item()
    eval_logits = engine.eval_batch(iter(data[0][0]), return_logits=True)[1]
    per_mb = engine.eval_batch(iter(data[0][0]), reduce_output=None)
    mean_out = engine.eval_batch(iter(data[0][0]), compute_loss=False)
    losses += pc.train_steps(engine, data[1:])
    out["two"] = (losses, pc.stage_weights(engine), eval_loss, eval_logits is not None)
    out["eval_forms"] = (None if per_mb is None else [t.item() for t in per_mb],
                         None if mean_out is None else tuple(mean_out.shape))
    with pytest.raises(PipelineError, match="Only train_batch"):
        engine(data[0][0][0][0])
    for bad, where in (({"zero_stage": 2}, "zero_optimization.stage"),
                       ({"extra_warmup": 1, "num_chunks": 2}, "pipeline.extra_warmup")):
        with pytest.raises(ConfigError, match=where):
            pc.make_engine(pc.mlp_specs(), 2, 1, 4, **bad)
    from dsrun.pipe import LayerSpec
    with pytest.raises(UsageError, match=r"stage 1 \(layers 1-1\) holds no trainable parameter"):  # on every rank
        pc.make_engine([LayerSpec(torch.nn.Linear, pc.WIDTH, pc.WIDTH), LayerSpec(pc.Scale)], 2, 1, 2)
    from dsrun.pipe import TiedLayerSpec
    bad_tie = [TiedLayerSpec("embed", torch.nn.Linear, pc.WIDTH, pc.WIDTH, bias=False, tied_weight_attr="kernel"),
               *pc.tied_specs()[1:-1], TiedLayerSpec("embed", torch.nn.Linear, pc.WIDTH, pc.WIDTH, bias=False,
                                                     tied_weight_attr="kernel", forward_fn=pc._transposed)]
    with pytest.raises(UsageError, match=r"TiedLayerSpec 'embed': Linear has no parameter 'kernel' to tie"):
        pc.make_engine(bad_tie, 2, 1, 2)  # both stages hold the tied module: both stop, before any tie group
    tied_data = pc.batches(STEPS, 1, 2)
    engine = pc.make_engine(pc.tied_specs(), 2, 1, 2)
    out["tied"] = (pc.train_steps(engine, tied_data), pc.stage_weights(engine), engine.get_global_grad_norm())
    engine = pc.make_engine(pc.mlp_specs(), 2, 1, 4)
    path, client = engine.load_checkpoint(ckpt_dir)
    out["reload"] = (pc.train_steps(engine, data[2:]), pc.stage_weights(engine), client, engine.global_steps)
    engine = pc.make_engine(pc.mlp_specs(), 2, 1, 4, num_chunks=2)  # interleaved: virtual stages 0,2 | 1,3
    losses = pc.train_steps(engine, data[:1])
    eval_loss = engine.eval_batch(iter(data[0][0])).item()
    losses += pc.train_steps(engine, data[1:])
    out["interleaved"] = (losses, pc.stage_weights(engine), eval_loss, engine.module.parts)
    engine = pc.make_engine(pc.tuple_specs(), 2, 1, 2)  # tuples: float no-grad, int64 and bool (mask) parts
    engine.set_has_attention_mask(True)  # Megatron-DeepSpeed's call: accepted, nothing to cast here
    out["tuple"] = (pc.train_steps(engine, tied_data), pc.stage_weights(engine))
    out["batch_size"] = _rebatched(data)
    one_data = pc.batches(STEPS, 2, 2)
    engine = pc.make_engine(pc.mlp_specs(), 1, 2, 2)  # one stage, two data-parallel ranks
    out["one"] = (pc.train_steps(engine, one_data), pc.stage_weights(engine))
    engine = pc.make_engine(pc.mlp_specs(), 2, 1, 4, bf16=True)
    engine.set_batch_fn(lambda batch: tuple(t.to(torch.bfloat16) for t in batch))  # inputs are never cast
    out["bf16"] = (pc.train_steps(engine, data), {n: p.dtype for n, p in engine.module.named_parameters()})
    out.update(_fp16_cases(data, os.path.join(ckpt_dir, "fp16")))
    return out


def _rebatched(data):
    """set_train_batch_size on a running engine (DeepSpeed's method): the next batch runs the new number of
    micro-batches; bad sizes are refused and change nothing."""
    engine = pc.make_engine(pc.mlp_specs(), 2, 1, 4)
    pc.train_steps(engine, data[:1])
    engine.set_train_batch_size(pc.MICRO * 2)
    two = engine.train_batch(iter(data[1][0][:2])).item()  # exactly two micro-batches: a third would fail
    with pytest.raises(ValueError, match="divisible"):
        engine.set_train_batch_size(pc.MICRO * 2 + 1)
    interleaved = pc.make_engine(pc.mlp_specs(), 2, 1, 4, num_chunks=2)
    with pytest.raises(ConfigError, match="multiple of the number of stages"):
        interleaved.set_train_batch_size(pc.MICRO * 3)
    with pytest.raises(TypeError):
        engine.set_has_attention_mask("yes")
    attributes = (engine.prev_stage, engine.next_stage, engine.is_pipe_parallel, engine.is_data_parallel,
                  engine.is_model_parallel, engine.micro_batch_size, engine.dynamic_shape)
    return (engine.micro_batches, engine.get_batch_info(), interleaved.micro_batches, interleaved.train_batch_size(),
            engine.get_pipeline_parallel_rank() == engine.stage_id, math.isfinite(two),
            attributes == (engine.stage_id - 1, engine.stage_id + 1, True, False, False, pc.MICRO, False))


def _fp16_cases(data, ckpt_dir):
    """fp16 with a loss scale that fits (trains as fp32 does) and one that overflows every step (each
    step skipped on every stage, the scale halved each time), saved and reloaded."""
    def half(batch):
        return tuple(t.half() for t in batch)
    out = {}
    engine = pc.make_engine(pc.mlp_specs(), 2, 1, 4, fp16={"initial_scale_power": 8})
    engine.set_batch_fn(half)
    out["fp16"] = (pc.train_steps(engine, data), {n: p.dtype for n, p in engine.module.named_parameters()},
                   engine.skipped_steps, engine.loss_scaler.loss_scale)
    engine = pc.make_engine(pc.mlp_specs(), 2, 1, 4, fp16={"initial_scale_power": 40, "hysteresis": 1})
    engine.set_batch_fn(half)
    before = pc.stage_weights(engine)
    losses = pc.train_steps(engine, data)
    unchanged = all(torch.equal(before[n], w) for n, w in pc.stage_weights(engine).items())
    engine.save_checkpoint(ckpt_dir)
    reloaded = pc.make_engine(pc.mlp_specs(), 2, 1, 4, fp16={"initial_scale_power": 8})
    reloaded.load_checkpoint(ckpt_dir)
    view = engine.optimizer  # DeepSpeed's wrapper attributes
    out["fp16_overflow"] = (losses, unchanged, engine.skipped_steps, engine.global_steps, engine.loss_scaler.loss_scale,
                            reloaded.loss_scaler.loss_scale, reloaded.skipped_steps,
                            (view.overflow, view.cur_scale, isinstance(view, torch.optim.Adam), engine.was_step_applied()))
    return out


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pipe_ckpt"))


@pytest.fixture(scope="module")
def world4(ckpt_dir):
    return run_ranks(_world4, world_size=4, args=(ckpt_dir,), timeout=240)


@pytest.fixture(scope="module")
def world2(world4, ckpt_dir):
    return run_ranks(_world2, world_size=2, args=(ckpt_dir,), timeout=240)


def _merged(results, case):
    """Every rank's stage weights of `case`, merged into one {name: weight}."""
    merged = {}
    for r in results:
        merged.update(r[case][1])
    return merged


def _assert_close(weights, ref, rel=1e-5):
    assert set(weights) == set(ref), (sorted(weights), sorted(ref))
    for name, w in weights.items():
        err = ((w - ref[name]).abs().max() / ref[name].abs().max()).item()
        assert err < rel, f"{name}: relative error {err:.2e}"


def _assert_losses(results, case, ref_losses, rel=1e-5):
    for r in results:  # every rank returns the same loss
        assert r[case][0] == pytest.approx(ref_losses, rel=rel)


def _assert_matches_sequential(results, case, specs, data, **kw):
    """Losses and merged weights of `case` equal the sequential model's on `data`; returns that reference
    (losses, weights, eval losses)."""
    ref = pc.reference_run(specs, data, **kw)
    _assert_losses(results, case, ref[0])
    _assert_close(_merged(results, case), ref[1])
    return ref


def test_four_stages_match_sequential(world4):
    _, ref_weights, _ = _assert_matches_sequential(world4, "four", pc.mlp_specs(), pc.batches(STEPS, 1, 4))
    assert world4[0]["four"][2] > pc.CLIP  # clipping was active
    held = [set(r["four"][1]) for r in world4]  # each rank built only its own stage's layers
    assert sum(len(h) for h in held) == len(set().union(*held)) == len(ref_weights)


def test_four_stages_with_extra_warmup_match_sequential(world4):
    _assert_matches_sequential(world4, "four-xw", pc.mlp_specs(), pc.batches(STEPS, 1, 4))


def test_four_stages_interleaved_match_sequential(world4):
    _assert_matches_sequential(world4, "four-interleaved", pc.mlp_specs(8), pc.batches(STEPS, 1, 4))
    # [Note: p2p channels]: per stage one channel per kind and direction, shared by both chunks
    assert [r["four-interleaved"][2] for r in world4] == [
        [("act", 0), ("act", 3), ("grad", 0), ("grad", 1)], [("act", 0), ("act", 1), ("grad", 1), ("grad", 2)],
        [("act", 1), ("act", 2), ("grad", 2), ("grad", 3)], [("act", 2), ("act", 3), ("grad", 0), ("grad", 3)]]


def test_two_by_two_zero1_matches_sequential(world4):
    _assert_matches_sequential(world4, "2x2", pc.mlp_specs(), pc.batches(STEPS, 2, 2))
    assert world4[0]["2x2"][2] > pc.CLIP
    for stage in (0, 1):  # ZeRO-1: the two data-parallel ranks of a stage split its Adam state (2 per element)
        (_, _, _, state_a, numel), (_, _, _, state_b, _) = (world4[2 * stage]["2x2"], world4[2 * stage + 1]["2x2"])
        assert state_a + state_b == 2 * numel and 0 < state_a < 2 * numel


def test_two_by_two_zero1_fp16_skips_together(world4):
    """Every rank of every stage skips the same overflowing steps, then the data-parallel replicas stay
    equal (ZeRO-1 publishes each owner's update)."""
    skipped = {(r["2x2-fp16"][2], r["2x2-fp16"][3]) for r in world4}
    assert len(skipped) == 1 and 1 <= next(iter(skipped))[0] < STEPS, skipped  # some skipped, some trained
    for stage in (0, 1):
        a, b = world4[2 * stage]["2x2-fp16"][1], world4[2 * stage + 1]["2x2-fp16"][1]
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_two_by_two_interleaved_matches_sequential(world4):
    _assert_matches_sequential(world4, "2x2-interleaved", pc.mlp_specs(), pc.batches(STEPS, 2, 2))


def test_two_stages_train_eval_train_with_activation_checkpointing(world2):
    _, _, ref_eval = _assert_matches_sequential(world2, "two", pc.mlp_specs(), pc.batches(STEPS, 1, 4),
                                                eval_after={0})
    for r in world2:
        assert r["two"][2] == pytest.approx(ref_eval[0], rel=1e-5)
    assert [r["two"][3] for r in world2] == [False, True]  # logits on the last stage only
    per_mb, mean_out = world2[1]["eval_forms"]  # DeepSpeed's forms, last stage only
    assert len(per_mb) == 4 and sum(per_mb) / 4 == pytest.approx(ref_eval[0], rel=1e-5)
    assert mean_out == (pc.MICRO, pc.WIDTH) and world2[0]["eval_forms"] == (None, None)


def test_interleaved_train_eval_train_matches_sequential(world2):
    _, _, ref_eval = _assert_matches_sequential(world2, "interleaved", pc.mlp_specs(), pc.batches(STEPS, 1, 4),
                                                eval_after={0})
    for r in world2:
        assert r["interleaved"][2] == pytest.approx(ref_eval[0], rel=1e-5)
    assert world2[0]["interleaved"][3] == [0, 2, 4, 6, 7]


def test_interleaved_inference_schedule_forwards_in_train_order():
    from dsrun.runtime.pipe.schedule import InterleavedInferenceSchedule, InterleavedTrainSchedule
    from dsrun.runtime.pipe.simulate import simulate
    assert InterleavedInferenceSchedule(4, 2, 0, 2).compact() == "F0.0 F1.0 F0.1 F1.1 F2.0 F3.0 F2.1 F3.1"
    assert str(InterleavedInferenceSchedule(2, 2, 1, 2)) == "rA0 F0 sA0 | rA1 F1 sA1 | rA0 L0 F0 | rA1 L1 F1"
    for stages, chunks, micro_batches in [(2, 2, 4), (4, 2, 8), (3, 3, 6)]:
        train = [InterleavedTrainSchedule(micro_batches, stages, s, chunks) for s in range(stages)]
        infer = [InterleavedInferenceSchedule(micro_batches, stages, s, chunks) for s in range(stages)]
        simulate(infer)  # no deadlock, every send received in order
        for t, i in zip(train, infer):
            assert [x for x in t.instructions() if x.op == "F"] == [x for x in i.instructions() if x.op == "F"]


def test_one_stage_data_parallel_matches_sequential(world2):
    ref_losses, ref_weights, _ = pc.reference_run(pc.mlp_specs(), pc.batches(STEPS, 2, 2))
    _assert_losses(world2, "one", ref_losses)
    for r in world2:
        _assert_close(r["one"][1], ref_weights)


def test_tuple_activations_match_sequential(world2):
    _assert_matches_sequential(world2, "tuple", pc.tuple_specs(), pc.batches(STEPS, 1, 2))


def test_tied_layers_match_sequential(world2):
    ref_losses, ref_weights, _ = pc.reference_run(pc.tied_specs(), pc.batches(STEPS, 1, 2))
    _assert_losses(world2, "tied", ref_losses)
    for r in world2:  # both stages hold the tied weight, and it equals the reference's single copy
        _assert_close({n: w for n, w in r["tied"][1].items() if n.startswith("tied_modules")},
                      {n: w for n, w in ref_weights.items() if n.startswith("tied_modules")})
    _assert_close(_merged(world2, "tied"), ref_weights)
    assert world2[0]["tied"][2] > pc.CLIP


def test_checkpoint_at_four_stages_reloads_at_two(world4, world2, ckpt_dir):
    assert os.path.isfile(os.path.join(ckpt_dir, "latest"))
    names = os.listdir(os.path.join(ckpt_dir, "global_step2"))
    assert {f"layer_{i:02d}-model_states.pt" for i in range(7)} <= set(names)
    assert not [n for n in os.listdir(ckpt_dir) if ".tmp-" in n]
    for r in world2:
        losses, _, client, steps = r["reload"]
        assert client == {"note": "four"} and steps == STEPS
        assert losses == pytest.approx(world4[0]["four"][0][2:], rel=1e-5)
    _assert_close(_merged(world2, "reload"), _merged(world4, "four"))


def test_set_train_batch_size_and_deepspeed_engine_methods(world2):
    for r in world2:
        assert r["batch_size"] == (2, (pc.MICRO * 2, pc.MICRO, 2), 4, pc.MICRO * 4, True, True, True)


def test_fp16_trains_with_loss_scaling(world2):
    ref_losses, _, _ = pc.reference_run(pc.mlp_specs(), pc.batches(STEPS, 1, 4))
    for r in world2:
        losses, dtypes, skipped, scale = r["fp16"]
        assert losses == pytest.approx(ref_losses, rel=5e-3)
        assert set(dtypes.values()) == {torch.float16} and skipped == 0 and scale == 2.0 ** 8


def test_fp16_overflow_skips_the_step_on_every_stage(world2):
    """Scaled by 2^40 every fp16 gradient overflows: each step is skipped on both stages (weights
    unchanged, the step still counted), the scale halves per step (hysteresis 1), and a checkpoint carries
    the scale and the skip count."""
    for r in world2:
        losses, unchanged, skipped, steps, scale, reloaded_scale, reloaded_skipped, view = r["fp16_overflow"]
        assert view == (True, scale, True, False)  # engine.optimizer.overflow / cur_scale, as DeepSpeed's
        assert unchanged and skipped == steps == STEPS
        assert scale == reloaded_scale == 2.0 ** (40 - STEPS) and reloaded_skipped == STEPS
        assert all(math.isfinite(loss) for loss in losses)  # the forward is fp16 too; only gradients overflow


def test_bf16_trains_with_fp32_accumulation(world2):
    ref_losses, _, _ = pc.reference_run(pc.mlp_specs(), pc.batches(STEPS, 1, 4))
    for r in world2:
        losses, dtypes = r["bf16"]
        assert losses == pytest.approx(ref_losses, rel=2e-2)
        assert set(dtypes.values()) == {torch.bfloat16}


TRAIN_SCRIPT = """
import argparse
import torch
import dsrun
from dsrun.pipe import LayerSpec, PipelineModule

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=0)
parser.add_argument("--empty_last_stage", action="store_true")
parser.add_argument("--dtype", default="float32", help="of the data: float16 or bfloat16 for those configs")
parser.add_argument("--bad_tie", action="store_true", help="a tied layer whose tied_weight_attr names nothing")
dsrun.add_config_arguments(parser)
args = parser.parse_args()
g = torch.Generator().manual_seed(0)
data = [(torch.randn(8, generator=g), torch.randn(3, generator=g)) for _ in range(32)]
dtype = getattr(torch, args.dtype)
data = [(x.to(dtype), y.to(dtype)) for x, y in data]
layers = [LayerSpec(torch.nn.Linear, 8, 16), torch.nn.Tanh(), LayerSpec(torch.nn.Linear, 16, 3)]
if args.empty_last_stage:
    layers = [LayerSpec(torch.nn.Linear, 8, 3), torch.nn.Tanh()]
if args.bad_tie:
    from dsrun.pipe import TiedLayerSpec
    layers = [TiedLayerSpec("proj", torch.nn.Linear, 8, 8, tied_weight_attr="kernel"), torch.nn.Tanh(),
              TiedLayerSpec("proj", torch.nn.Linear, 8, 8, tied_weight_attr="kernel")]
model = PipelineModule(layers, num_stages=2, loss_fn=torch.nn.functional.mse_loss, partition_method="uniform")
engine, optimizer, loader, _ = dsrun.initialize(args=args, model=model, training_data=data)
losses = [engine.train_batch().item() for _ in range(3)]
evaluated = engine.eval_batch(iter(loader)).item()
print(f"rank {engine.global_rank} stage {engine.stage_id} steps {engine.global_steps} losses {losses} "
      f"eval {evaluated:.6f} skipped {engine.skipped_steps}", flush=True)
"""


def _launch_train_script(tmp_path, *script_args, pipeline=None, **sections):
    import json
    import subprocess
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    (tmp_path / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "hang_watchdog": {"enabled": False},
        **({"pipeline": pipeline} if pipeline else {}), **sections}))
    env = {k: v for k, v in os.environ.items() if k != "DS_ENV_FILE"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", "train.py",
                           "--deepspeed_config", "ds.json", *script_args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.mark.parametrize("extra_warmup", [0, 1])
def test_pipeline_through_the_launcher(tmp_path, extra_warmup):
    """initialize(args=...) with a config file, training_data, the config's optimizer, on ranks started
    by dsrun itself (DeepSpeed's lock-step 1F1B, and the ordered one with an extra warm-up forward);
    every rank reports the same losses."""
    import re
    done = _launch_train_script(tmp_path, pipeline={"extra_warmup": extra_warmup})
    assert done.returncode == 0, done.stdout + done.stderr
    reports = re.findall(r"rank (\d) stage (\d) steps 3 losses (\[.*?\]) eval (\S+)", done.stdout)
    assert sorted((r, s) for r, s, _, _ in reports) == [("0", "0"), ("1", "1")], done.stdout
    assert reports[0][2:] == reports[1][2:]


def test_fp16_pipeline_through_the_launcher_reports_skipped_steps(tmp_path):
    """A DeepSpeed fp16 config under dsrun: at a loss scale of 2^40 every step overflows and is skipped on
    both stages (the weights stay: the evaluation after three steps gives the first step's loss), and the
    user sees DeepSpeed's OVERFLOW line once per step, from rank 0, with the scale halving."""
    import re
    done = _launch_train_script(tmp_path, "--dtype", "float16", fp16={"enabled": True, "initial_scale_power": 40,
                                                          "hysteresis": 1})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    reports = re.findall(r"rank (\d) stage (\d) steps 3 losses \[(\S+?),.*?\] eval (\S+) skipped (\d)", done.stdout)
    assert len(reports) == 2 and reports[0][2:] == reports[1][2:], out
    first_loss, evaluated, skipped = reports[0][2:]
    assert skipped == "3" and float(evaluated) == pytest.approx(float(first_loss), abs=1e-6), out
    overflows = re.findall(r"\[rank (\d)\] step (\d): OVERFLOW! Skipping step\. Attempted loss scale: (\S+),", out)
    assert overflows == [("0", "0", "1.09951e+12"), ("0", "1", "5.49756e+11"), ("0", "2", "2.74878e+11")], out


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_pipeline_on_two_gpus(tmp_path, dtype):
    """The launcher test on NCCL, in each precision: p2p of fp32/bf16/fp16 activations and gradients,
    the loss scale on GPU; both ranks report the same losses, no step skipped."""
    import re
    sections = {"bfloat16": {"bf16": {"enabled": True}},
                "float16": {"fp16": {"enabled": True, "initial_scale_power": 8}}}.get(dtype, {})
    done = _launch_train_script(tmp_path, "--dtype", dtype, **sections)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "backend nccl" in out, out
    reports = re.findall(r"rank (\d) stage (\d) steps 3 losses (\[.*?\]) eval (\S+) skipped (\d)", done.stdout)
    assert len(reports) == 2 and reports[0][2:] == reports[1][2:] and reports[0][4] == "0", out


def test_a_misnamed_tied_weight_stops_the_launch_with_one_clear_error(tmp_path):
    done = _launch_train_script(tmp_path, "--bad_tie")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "TiedLayerSpec 'proj': Linear has no parameter 'kernel' to tie (tied_weight_attr)" in out, out
    assert "its parameters: weight, bias" in out and "Traceback" not in out, out


def test_a_stage_without_parameters_stops_the_launch_with_one_clear_error(tmp_path):
    done = _launch_train_script(tmp_path, "--empty_last_stage")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "pipeline stage 1 (layers 1-1) holds no trainable parameter" in out, out
    assert "Traceback" not in out, out

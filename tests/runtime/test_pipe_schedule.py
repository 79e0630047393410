"""Pipeline schedules as data: golden strings (DeepSpeed's S=4, M=4 TrainSchedule stream from
reference/deepspeed-runtime.md 5.2, compact 1F1B/interleaved/inference forms), DeepSpeed's schedule unit
checks (reference 6.2) and invariants checked by simulating all stages together: every micro-batch
forwarded and backwarded once per stage, sends matched in order by receives across adjacent stages, no
deadlock, in-flight activations bounded, and the bubble equal to its formula."""
import pytest

from dsrun.pipe import InferenceSchedule, Instruction, InterleavedTrainSchedule, LayerSpec, TiedLayerSpec, \
    TrainSchedule
from dsrun.runtime.pipe.schedule import InterleavedInferenceSchedule
from dsrun.runtime.pipe.simulate import ScheduleDeadlock, simulate

# reference/deepspeed-runtime.md 5.2, buffer ids, '·' between steps (normalised: "L0F0" -> "L0 F0").
DEEPSPEED_S4_M4 = [
    "L0 F0 · sA0 · L1 F1 · sA1 · L2 F2 · sA2 · L3 F3 · rG0 sA3 B0 · – · rG1 B1 · – · rG2 B2 · – · rG3 B3 RT RG OPT",
    "– · rA0 F0 · sA0 · rA1 F1 · sA1 · rA2 F2 · rG0 sA2 B0 · sG0 rA0 F0 · rG1 sA0 B1 · sG1 · rG2 B2 · sG2 · "
    "rG0 B0 · sG0 RT RG OPT",
    "– · – · rA0 F0 · sA0 · rA1 F1 · rG0 sA1 B0 · sG0 rA0 F0 · rG1 sA0 B1 · sG1 rA1 F1 · rG0 sA1 B0 · sG0 · "
    "rG1 B1 · sG1 · RT RG OPT",
    "– · – · – · rA0 L0 F0 · B0 · sG0 rA1 L1 F1 · B1 · sG1 rA0 L0 F0 · B0 · sG0 rA1 L1 F1 · B1 · sG1 · – · "
    "RT RG OPT",
]


@pytest.mark.parametrize("stage", range(4))
def test_train_schedule_matches_deepspeed_stream(stage):
    schedule = TrainSchedule(micro_batches=4, stages=4, stage_id=stage)
    assert str(schedule) == DEEPSPEED_S4_M4[stage].replace(" · ", " | ").replace("–", "-")
    assert schedule.num_pipe_buffers() == [4, 3, 2, 2][stage]


GOLDEN_COMPACT = {
    ("train", 2, 4, 0): "F0 F1 B0 F2 B1 F3 B2 B3 RT RG OPT",
    ("train", 2, 4, 1): "F0 B0 F1 B1 F2 B2 F3 B3 RT RG OPT",
    ("train", 4, 4, 0): "F0 F1 F2 F3 B0 B1 B2 B3 RT RG OPT",
    ("train", 4, 4, 2): "F0 F1 B0 F2 B1 F3 B2 B3 RT RG OPT",
    ("inference", 2, 3, 1): "F0 F1 F2",
    ("interleaved", 2, 4, 0): "F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1 B2.0 B3.0 "
                              "RT RG OPT",
    ("interleaved", 2, 4, 1): "F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1 B2.0 B3.0 "
                              "RT RG OPT",
}


def _make(kind, stages, micro_batches, stage, chunks=2):
    if kind == "interleaved":
        return InterleavedTrainSchedule(micro_batches, stages, stage, chunks)
    return (TrainSchedule if kind == "train" else InferenceSchedule)(micro_batches, stages, stage)


@pytest.mark.parametrize("key", GOLDEN_COMPACT, ids=lambda k: "-".join(map(str, k)))
def test_compact_golden(key):
    assert _make(*key).compact() == GOLDEN_COMPACT[key]


def test_inference_stream_and_stage_prefixed_form():
    # DeepSpeed's order (load, then exchange, then forward) and its two alternating buffers
    assert str(InferenceSchedule(3, 2, 0)) == "L0 F0 | L1 sA0 F1 | L0 sA1 F0 | sA0"
    assert str(InferenceSchedule(3, 2, 1)) == "- | L0 rA0 F0 | L1 rA1 F1 | L0 rA0 F0"
    steps = TrainSchedule(2, 2, 1).instructions()
    assert [i.stage_str(1) for i in steps if i.op in ("F", "B")] == ["1F0", "1B0", "1F1", "1B1"]
    assert str(Instruction("OPT")) == "OPT"


@pytest.mark.parametrize("micro_batches", [1, 3, 8, 10])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_deepspeed_unit_checks(micro_batches, stages):
    """reference 6.2: 2*(M+S-1) train steps, M+S-1 inference steps; first stage never sG/rA, last never
    sA/rG; buffer ids < num_pipe_buffers; one stage: [L, F] or [B] (+ RT RG OPT at the end)."""
    for stage in range(stages):
        train, infer = TrainSchedule(micro_batches, stages, stage), InferenceSchedule(micro_batches, stages, stage)
        steps = list(train.steps())
        assert len(steps) == 2 * (micro_batches + stages - 1)
        assert len(list(infer.steps())) == micro_batches + stages - 1
        for schedule in (train, infer):
            ops = schedule.instructions()
            if stage == 0:
                assert not {"sG", "rA"} & {i.op for i in ops}
            if stage == stages - 1:
                assert not {"sA", "rG"} & {i.op for i in ops}
            assert all(i.buffer < schedule.num_pipe_buffers() for i in ops if i.buffer is not None)
        if stages == 1:
            body = [[i.op for i in step] for step in steps]
            assert body[-1][-3:] == ["RT", "RG", "OPT"]
            body[-1] = body[-1][:-3]
            assert all(step in (["L", "F"], ["B"]) for step in body)


CASES = [("train", s, m, 1) for s in (1, 2, 3, 4) for m in (1, 2, 5, 8)] + \
        [("inference", s, m, 1) for s in (1, 2, 4) for m in (1, 3, 8)] + \
        [("interleaved", s, m, v) for s, m, v in [(2, 2, 2), (2, 4, 2), (4, 8, 2), (4, 8, 4), (2, 8, 3), (3, 6, 1)]]


@pytest.mark.parametrize("kind,stages,micro_batches,chunks", CASES)
def test_invariants_and_bubble(kind, stages, micro_batches, chunks):
    schedules = [_make(kind, stages, micro_batches, s, chunks) for s in range(stages)]
    for schedule in schedules:
        ops = schedule.instructions()
        for op in ("F",) + (("B",) if kind != "inference" else ()):
            done = sorted((i.micro_batch, i.chunk) for i in ops if i.op == op)
            assert done == sorted((m, c) for m in range(micro_batches) for c in range(chunks)), (op, done)
        in_flight, most, live_buffers = 0, 0, set()
        for i in ops:
            if i.op == "F" and kind != "inference":
                in_flight += 1
                assert (i.buffer, i.chunk) not in live_buffers, f"buffer {i.buffer} reused while in flight"
                live_buffers.add((i.buffer, i.chunk))
            elif i.op == "B":
                in_flight -= 1
                live_buffers.discard((i.buffer, i.chunk))
            most = max(most, in_flight)
        if kind == "train":
            assert most <= min(stages - schedule.stage_id, micro_batches) <= stages
        if kind != "inference":
            step_ops = [i.op for i in ops if i.op in ("RT", "RG", "OPT")]
            assert step_ops == ["RT", "RG", "OPT"] and [i.op for i in ops[-3:]] == step_ops
    result = simulate(schedules, backward_time=0.0 if kind == "inference" else 1.0)  # raises on a mismatch
    assert result.bubble == pytest.approx((stages - 1) / (chunks * micro_batches + stages - 1))


def test_extra_warmup_order_and_memory():
    """[Note: extra warm-up]: one chunk is plain 1F1B, ordered; each extra forward holds one more micro-batch."""
    assert InterleavedTrainSchedule(4, 2, 0, 1).compact() == TrainSchedule(4, 2, 0).compact()
    assert InterleavedTrainSchedule(4, 2, 0, 1, extra_warmup=1).compact() == "F0 F1 F2 B0 F3 B1 B2 B3 RT RG OPT"
    assert InterleavedTrainSchedule(4, 2, 1, 1, extra_warmup=1).compact() == TrainSchedule(4, 2, 1).compact()
    for stages, micro_batches, extra in [(2, 16, 1), (2, 16, 2), (4, 8, 1), (4, 8, 3), (3, 5, 9)]:
        for stage in range(stages):
            ops = InterleavedTrainSchedule(micro_batches, stages, stage, 1, extra_warmup=extra).instructions()
            in_flight, most = 0, 0
            for i in ops:
                in_flight += {"F": 1, "B": -1}.get(i.op, 0)
                most = max(most, in_flight)
            later = stages - stage - 1
            assert most == min(later + 1 + (extra if later else 0), micro_batches)
    with pytest.raises(ValueError, match="extra_warmup"):
        InterleavedTrainSchedule(4, 2, 0, 1, extra_warmup=-1)
    with pytest.raises(ValueError, match="0 with chunks > 1"):
        InterleavedTrainSchedule(4, 2, 0, 2, extra_warmup=1)


@pytest.mark.parametrize("stages", [2, 3, 4, 8])
def test_chunks_of_a_stage_share_its_channels(stages):
    """[Note: p2p channels]: one channel per (kind, sending stage) for all chunks; simulate() matches each
    receive with the first message on its stage's channel and checks micro-batch and chunk, for every
    schedule, unequal stages included."""
    unequal = [1.0 + 0.3 * s for s in range(stages)]
    for chunks in (1, 2, 3, 4):
        for micro_batches in (stages, 2 * stages, 3 * stages):
            for f in (1.0, unequal):
                simulate([InterleavedTrainSchedule(micro_batches, stages, s, chunks) for s in range(stages)], f, 2.0)
            simulate([InterleavedInferenceSchedule(micro_batches, stages, s, chunks) for s in range(stages)], 1.0, 0.0)
        simulate([InterleavedTrainSchedule(2 * stages, stages, s, 1, extra_warmup=3) for s in range(stages)],
                 unequal, 2.0)
    for micro_batches in (1, 2, 5, 9):
        simulate([TrainSchedule(micro_batches, stages, s) for s in range(stages)], unequal, 2.0)
        simulate([InferenceSchedule(micro_batches, stages, s) for s in range(stages)], 1.0, 0.0)


def test_extra_warmup_fills_the_waits_of_a_heavier_first_stage():
    """B3 on 2 stages (RESULTS.md, ms per micro-batch): stage 0 = embedding + 12 blocks, stage 1 = 10 blocks +
    the LM head. 1F1B makes the heavier stage 0 wait at the start and at the end; two extra warm-up forwards
    make its busy time the batch time. Equal stages: the extra forwards change nothing."""
    f, b, m = [25.5, 23.2], [51.0, 46.5], 16
    plain = simulate([TrainSchedule(m, 2, s) for s in range(2)], f, b)
    ordered = simulate([InterleavedTrainSchedule(m, 2, s, 1) for s in range(2)], f, b)
    assert ordered.makespan == pytest.approx(plain.makespan)
    spans = [simulate([InterleavedTrainSchedule(m, 2, s, 1, extra_warmup=e) for s in range(2)], f, b).makespan
             for e in (1, 2, 3)]
    assert plain.makespan > spans[0] > spans[1] == pytest.approx(m * (f[0] + b[0])) == spans[2]
    for stages, micro_batches in [(2, 8), (4, 8), (4, 16)]:
        even = [simulate([InterleavedTrainSchedule(micro_batches, stages, s, 1, extra_warmup=e) for s in
                          range(stages)], 1.0, 2.0) for e in (0, 2)]
        assert even[0].makespan == pytest.approx(even[1].makespan)
        assert even[1].bubble == pytest.approx((stages - 1) / (micro_batches + stages - 1))


def test_lock_step_pairs_sends_with_receives_in_the_same_step():
    for stages, micro_batches in [(2, 4), (4, 4), (3, 7)]:
        for kind in ("train", "inference"):
            steps = [list(_make(kind, stages, micro_batches, s).steps()) for s in range(stages)]
            for s in range(stages - 1):
                def at(stage, op):
                    return {(n, i.micro_batch) for n, step in enumerate(steps[stage]) for i in step if i.op == op}
                assert at(s, "sA") == at(s + 1, "rA")
                assert at(s + 1, "sG") == at(s, "rG")


def test_simulation_catches_a_deadlock():
    bad = [TrainSchedule(2, 2, 0), InferenceSchedule(2, 2, 1)]  # stage 0 waits for gradients never sent
    with pytest.raises(ScheduleDeadlock, match="stage 0"):
        simulate(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of stages"):
        InterleavedTrainSchedule(3, 2, 0, 2)
    with pytest.raises(ValueError, match="stage_id"):
        TrainSchedule(2, 2, 2)


def test_layer_specs():
    import torch
    spec = LayerSpec(torch.nn.Linear, 2, 3, bias=False)
    layer = spec.build()
    assert isinstance(layer, torch.nn.Linear) and layer.bias is None and layer.weight.shape == (3, 2)
    assert spec == LayerSpec(torch.nn.Linear, 2, 3, bias=False)
    assert repr(spec) == "LayerSpec(Linear, 2, 3, bias=False)"
    tied = TiedLayerSpec("embed", torch.nn.Embedding, 10, 4)
    assert tied.key == "embed" and tied.tied_weight_attr == ["weight"] and tied.build().weight.shape == (10, 4)
    with pytest.raises(RuntimeError, match="only supports torch.nn.Module"):
        LayerSpec(len)

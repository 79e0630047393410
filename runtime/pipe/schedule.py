"""Pipeline schedules as data (shared/style.md rule 10): for one stage, the list of steps, each a list of
`Instruction`s, that an executor would run through a dispatch table keyed by `Instruction.op`.

    TrainSchedule(micro_batches=4, stages=2, stage_id=0).compact()
        -> "F0 F1 B0 F2 B1 F3 B2 B3 RT RG OPT"                      (compute and step ops, micro-batch ids)
    str(TrainSchedule(4, 2, 0))  -> "L0F0 | sA0 | L1F1 | rG0 sA1 B0 | ..."   (every op, buffer ids, '-' idle)

Ops: L load micro-batch, F forward, B backward, sA/rA send/recv activation, sG/rG send/recv gradient,
RT reduce tied grads, RG reduce grads, OPT optimizer step. Each instruction carries its micro-batch id,
its buffer slot (micro_batch % num_pipe_buffers(), as DeepSpeed's engine indexes its buffers) and, for
interleaved schedules, its model chunk; `stage_str` prefixes the stage as in `1F0`, `0B3`.

`TrainSchedule` and `InferenceSchedule` reproduce DeepSpeed's `deepspeed.runtime.pipe.schedule` step for
step (lock-step: steps of adjacent stages with the same index pair a send with its receive).
`InterleavedTrainSchedule` is Megatron's interleaved 1F1B over `chunks` model chunks per stage (virtual
stage `chunk * stages + stage`); it is ordered, not lock-stepped: one compute op per step, with its
sends and receives, and blocking point-to-point matching in order (tests simulate it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional

__all__ = ["Instruction", "PipeSchedule", "TrainSchedule", "InferenceSchedule", "InterleavedTrainSchedule",
           "InterleavedInferenceSchedule", "COMPUTE_OPS", "STEP_OPS"]

COMPUTE_OPS = ("F", "B")
STEP_OPS = ("RT", "RG", "OPT")


@dataclass(frozen=True)
class Instruction:
    """One pipeline instruction. `micro_batch`/`buffer` are None for the step ops (RT, RG, OPT)."""

    op: str
    micro_batch: Optional[int] = None
    buffer: Optional[int] = None
    chunk: int = 0

    def __str__(self) -> str:
        return self.op if self.micro_batch is None else f"{self.op}{self.micro_batch}"

    def buffer_str(self) -> str:
        """DeepSpeed's view: buffer slot instead of micro-batch id (its instructions carry only that)."""
        return self.op if self.buffer is None else f"{self.op}{self.buffer}"

    def stage_str(self, stage_id: int) -> str:
        return f"{stage_id}{self}"


class PipeSchedule:
    """The steps one stage runs for one batch of `micro_batches` micro-batches over `stages` stages."""

    def __init__(self, micro_batches: int, stages: int, stage_id: int):
        if micro_batches < 1 or stages < 1 or not 0 <= stage_id < stages:
            raise ValueError(f"need micro_batches >= 1, stages >= 1, 0 <= stage_id < stages; got "
                             f"{micro_batches}, {stages}, {stage_id}")
        self.micro_batches, self.stages, self.stage_id = micro_batches, stages, stage_id
        self.prev_stage, self.next_stage = stage_id - 1, stage_id + 1
        self.is_first_stage, self.is_last_stage = stage_id == 0, stage_id == stages - 1

    def steps(self) -> Iterator[List[Instruction]]:
        raise NotImplementedError

    def __iter__(self):
        return self.steps()

    def num_pipe_buffers(self) -> int:
        return self.micro_batches

    def _valid_micro_batch(self, mb: int) -> bool:
        return 0 <= mb < self.micro_batches

    def _valid_stage(self, stage: int) -> bool:
        return 0 <= stage < self.stages

    def _ins(self, op: str, mb: int, buffer: Optional[int] = None) -> Instruction:
        return Instruction(op, mb, mb % self.num_pipe_buffers() if buffer is None else buffer)

    def instructions(self) -> List[Instruction]:
        return [ins for step in self.steps() for ins in step]

    def compact(self) -> str:
        """Compute and step ops in order, by micro-batch id: "F0 F1 B0 F2 B1 ..."."""
        return " ".join(str(i) for i in self.instructions() if i.op in COMPUTE_OPS + STEP_OPS)

    def __str__(self) -> str:
        """Every step, ops by buffer slot as DeepSpeed prints them, steps separated by ' | ', '-' idle."""
        return " | ".join(" ".join(i.buffer_str() for i in step) or "-" for step in self.steps())


class TrainSchedule(PipeSchedule):
    """DeepSpeed's synchronous 1F1B: 2*(M+S-1) steps; even stages forward on even steps, odd stages on odd
    steps; the last step adds RT, RG, OPT."""

    def num_pipe_buffers(self) -> int:
        return max(2, min(self.stages - self.stage_id, self.micro_batches))

    def _step_to_micro_batch(self, step: int):
        stage, s = self.stage_id, self.stages
        if step % 2 == stage % 2:  # forward step for this stage
            return (step - stage % 2) // 2 - stage // 2, True
        if step % 2 == 0:  # odd stage, even step
            return step // 2 - s + (stage + 1) // 2, False
        return (step - 1) // 2 - s + 1 + stage // 2, False

    def steps(self):
        prev_mb = -1
        total = 2 * (self.micro_batches + self.stages - 1)
        for step in range(total):
            mb, forward = self._step_to_micro_batch(step)
            valid, prev_valid = self._valid_micro_batch(mb), self._valid_micro_batch(prev_mb)
            cmds = []
            if forward:
                if prev_valid and self._valid_stage(self.prev_stage):
                    cmds.append(self._ins("sG", prev_mb))
                if valid and self._valid_stage(self.prev_stage):
                    cmds.append(self._ins("rA", mb))
            else:
                if valid and self._valid_stage(self.next_stage):
                    cmds.append(self._ins("rG", mb))
                if prev_valid and self._valid_stage(self.next_stage):
                    cmds.append(self._ins("sA", prev_mb))
            if (self.is_first_stage or self.is_last_stage) and forward and valid:
                cmds.append(self._ins("L", mb))
            if valid:
                cmds.append(self._ins("F" if forward else "B", mb))
            if step == total - 1:
                cmds.extend(Instruction(op) for op in STEP_OPS)
            prev_mb = mb
            yield cmds


class InferenceSchedule(PipeSchedule):
    """DeepSpeed's forward-only schedule: M+S-1 steps, two alternating buffers."""

    def num_pipe_buffers(self) -> int:
        return 2

    def steps(self):
        for step in range(self.micro_batches + self.stages - 1):
            mb = step - self.stage_id
            even = self.stage_id % 2 == 0
            recv_buf, send_buf = (step % 2, (step + 1) % 2) if even else ((step + 1) % 2, step % 2)
            cmds = []
            if (self.is_first_stage or self.is_last_stage) and self._valid_micro_batch(mb):
                cmds.append(self._ins("L", mb, recv_buf))
            send = (self._valid_stage(self.next_stage) and self._valid_micro_batch(mb - 1))
            recv = self._valid_stage(self.prev_stage) and self._valid_micro_batch(mb)
            if even and send:
                cmds.append(self._ins("sA", mb - 1, send_buf))
            if recv:
                cmds.append(self._ins("rA", mb, recv_buf))
            if not even and send:
                cmds.append(self._ins("sA", mb - 1, send_buf))
            if self._valid_micro_batch(mb):
                cmds.append(self._ins("F", mb, recv_buf))
            yield cmds


class InterleavedTrainSchedule(PipeSchedule):
    """Interleaved 1F1B (Megatron-LM): each stage holds `chunks` model chunks; forward k of a stage runs
    chunk (k // S) % v on micro-batch (k // (S*v)) * S + k % S, backwards the chunks in reverse. Warm-up
    is 2*(S - stage - 1) + (v - 1)*S forwards (S - stage - 1 with one chunk: plain 1F1B, ordered, plus
    `extra_warmup` on every stage but the last), at most M*v; then one forward and one backward alternate.
    With v > 1, M must be a multiple of S. Bubble: (S-1)/(v*M + S-1) of the step time, v times smaller
    than 1F1B's.

    [Note: extra warm-up] The bubble formula assumes equal stages. When the stages differ (a partition
    cannot split a model of whole layers evenly: on B3, the first stage's 12 blocks and embedding against
    10 blocks and the LM head), the heavier first stage idles twice in 1F1B: after its warm-up forwards
    it waits for the first gradient, which comes after the later stages' forward and backward of
    micro-batch 0, and at the end it waits for the last one. Each extra warm-up forward fills one
    micro-batch of that wait, for one more micro-batch of activations held on the stage; on 2 stages two
    extra forwards take both waits off a first stage that is the slowest (its busy time becomes the
    batch time; simulate() with per-stage costs shows it). With equal stages it changes nothing: the
    stage only waits later instead. On 2 H200 (B3, m=16, RESULTS.md 2026-11-30) 1F1B went from 0.906 of
    the unpipelined rate to 0.926 with one extra forward and 0.938 with two. The engine takes it for
    1F1B only: the interleaved schedule already warms up over all its chunks, and there one extra
    forward measured no faster (0.915 against 0.919) and two made it far slower (0.70): each extra
    forward's activations are sent long before the next stage receives them.
    """

    def __init__(self, micro_batches: int, stages: int, stage_id: int, chunks: int = 2, extra_warmup: int = 0):
        super().__init__(micro_batches, stages, stage_id)
        if chunks < 1 or (chunks > 1 and micro_batches % stages):
            raise ValueError(f"interleaved 1F1B needs chunks >= 1 and micro_batches ({micro_batches}) "
                             f"a multiple of stages ({stages})")
        if extra_warmup < 0 or (extra_warmup and chunks > 1):
            raise ValueError(f"extra_warmup must be >= 0, and 0 with chunks > 1 (the interleaved warm-up already "
                             f"spans every chunk; more can deadlock: simulate() finds it); got {extra_warmup} "
                             f"with {chunks} chunks")
        self.chunks, self.extra_warmup = chunks, extra_warmup

    def warmup(self) -> int:
        """Forwards before the first backward ([Note: extra warm-up])."""
        later = self.stages - self.stage_id - 1
        base = later if self.chunks == 1 else 2 * later + (self.chunks - 1) * self.stages
        return min(self.micro_batches * self.chunks, base + (self.extra_warmup if later else 0))

    def num_pipe_buffers(self) -> int:
        return self.micro_batches

    def _unit(self, k: int, forward: bool) -> Instruction:
        s, v = self.stages, self.chunks
        chunk = (k // s) % v
        chunk = chunk if forward else v - 1 - chunk
        mb = (k // (s * v)) * s + k % s
        return Instruction("F" if forward else "B", mb, mb, chunk)

    def _with_comm(self, ins: Instruction) -> List[Instruction]:
        """The compute op with its receive before and its send after; the first virtual stage has no
        activation to receive, the last none to send (and the mirror for gradients)."""
        virtual = ins.chunk * self.stages + self.stage_id
        first, last = virtual == 0, virtual == self.chunks * self.stages - 1
        mb, buf, c = ins.micro_batch, ins.buffer, ins.chunk
        if ins.op == "F":
            pre = [Instruction("L", mb, buf, c)] if first or last else []
            pre = ([] if first else [Instruction("rA", mb, buf, c)]) + pre
            return pre + [ins] + ([] if last else [Instruction("sA", mb, buf, c)])
        return ([] if last else [Instruction("rG", mb, buf, c)]) + [ins] + \
            ([] if first else [Instruction("sG", mb, buf, c)])

    def compute_order(self) -> List[Instruction]:
        total, warmup = self.micro_batches * self.chunks, self.warmup()
        order = [self._unit(k, True) for k in range(warmup)]
        for k in range(total - warmup):
            order += [self._unit(warmup + k, True), self._unit(k, False)]
        order += [self._unit(k, False) for k in range(total - warmup, total)]
        return order

    def steps(self):
        order = self.compute_order()
        for i, ins in enumerate(order):
            cmds = self._with_comm(ins)
            if i == len(order) - 1:
                cmds.extend(Instruction(op) for op in STEP_OPS)
            yield cmds

    def compact(self) -> str:
        """As PipeSchedule.compact, with the chunk after a dot when there is more than one: "F0.1"."""
        def text(i):
            return str(i) if self.chunks == 1 or i.micro_batch is None else f"{i}.{i.chunk}"
        return " ".join(text(i) for i in self.instructions() if i.op in COMPUTE_OPS + STEP_OPS)


class InterleavedInferenceSchedule(InterleavedTrainSchedule):
    """Forward-only interleaved schedule (evaluation of a model split into chunks): the forwards of
    InterleavedTrainSchedule in the same order, with their loads and activation exchanges, nothing else."""

    def steps(self):
        for ins in self.compute_order():
            if ins.op == "F":
                yield self._with_comm(ins)

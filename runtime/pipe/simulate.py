"""Run the schedules of all stages against each other, without tensors: point-to-point messages match
in order per channel, receives wait for their send, each compute op takes a fixed time. Used to check a
schedule (no deadlock, every receive matched) and to measure its bubble.

    result = simulate([TrainSchedule(8, 4, s) for s in range(4)])
    result.bubble   # idle fraction of stage-time: (S-1)/(M+S-1) for 1F1B with equal forward/backward
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

from .schedule import PipeSchedule

__all__ = ["simulate", "Simulation", "ScheduleDeadlock"]

_PEER = {"sA": ("rA", 1), "sG": ("rG", -1)}  # send op -> (matching receive op, virtual-stage direction)


class ScheduleDeadlock(RuntimeError):
    """Every stage waits on a receive that no send will match."""


@dataclass
class Simulation:
    makespan: float
    busy: List[float]  # compute time per stage

    @property
    def bubble(self) -> float:
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def _virtual(schedule: PipeSchedule, chunk: int) -> int:
    return chunk * schedule.stages + schedule.stage_id


def simulate(schedules: Sequence[PipeSchedule], forward_time: Union[float, Sequence[float]] = 1.0,
             backward_time: Union[float, Sequence[float]] = 1.0) -> Simulation:
    """Schedules of stages 0..S-1 (one batch). A model chunk's compute costs forward_time/chunks
    (backward_time/chunks), so interleaving splits the same work into smaller pieces. Either time may be
    one value per stage (unequal stages).

    Raises:
        ScheduleDeadlock: some stage can never proceed.
        AssertionError: a receive would get another message (micro-batch or chunk) than the one sent
            first on its channel, or a send is never received.
    """
    per_stage = {op: list(t) if isinstance(t, (list, tuple)) else [t] * len(schedules)
                 for op, t in (("F", forward_time), ("B", backward_time))}
    programs = [deque(s.instructions()) for s in schedules]
    chunks = getattr(schedules[0], "chunks", 1)
    clock = [0.0] * len(schedules)
    busy = [0.0] * len(schedules)
    # as the engine's channels ([Note: p2p channels] in p2p.py): (recv op, receiving stage) -> messages
    # (micro-batch, receiving virtual stage, time), matched in order whatever the chunk
    channels: Dict[tuple, deque] = defaultdict(deque)
    stages = len(schedules)
    while any(programs):
        progressed = False
        for stage, program in enumerate(programs):
            while program:
                ins = program[0]
                virtual = _virtual(schedules[stage], ins.chunk)
                if ins.op in _PEER:
                    recv, step = _PEER[ins.op]
                    channels[(recv, (virtual + step) % stages)].append((ins.micro_batch, virtual + step, clock[stage]))
                elif ins.op in ("rA", "rG"):
                    queue = channels[(ins.op, stage)]
                    if not queue:
                        break
                    mb, target, sent_at = queue.popleft()
                    assert (mb, target) == (ins.micro_batch, virtual), \
                        f"stage {stage} {ins} (virtual stage {virtual}) received micro-batch {mb} for virtual stage {target}"
                    clock[stage] = max(clock[stage], sent_at)
                elif ins.op in ("F", "B"):
                    cost = per_stage[ins.op][stage] / chunks
                    clock[stage] += cost
                    busy[stage] += cost
                program.popleft()
                progressed = True
        if not progressed:
            raise ScheduleDeadlock("stuck at " + ", ".join(f"stage {s}: {p[0]}" for s, p in enumerate(programs) if p))
    left = {k: list(v) for k, v in channels.items() if v}
    assert not left, f"sends never received: {left}"
    return Simulation(max(clock), busy)

"""`PipeComm`: the one object the pipeline engine's transfers go through (the point-to-point sends and
receives between stages, the data-parallel gradient all-reduce, the tied-weight sums, the ZeRO-1 weight
broadcasts, the norm and loss reductions). The monitor taps it (runtime/monitor/comms_logger.py's
`CommTap`) as it taps runtime/zero/comm.py's `Comm` for the plain engine: `comms_logger`, the hang
watchdog's last collective and `wall_clock_breakdown`'s communication time see the pipeline's traffic.

Every method returns a handle to `wait()`, already complete. Sends in ordered mode ([Note: p2p channels]
in p2p.py) are `isend`s kept here until `wait_sends()`; their handle is complete at once too, so a timed
tap measures the issue and never makes a send wait for its receive (which could deadlock the interleaved
schedule). A timed receive includes the wait for its sender, as in DeepSpeed's comms logger.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

__all__ = ["PipeComm"]


class _Done:
    def wait(self):
        return True


_DONE = _Done()


class PipeComm:
    def __init__(self):
        self._pending: List = []  # (work, tensor): the tensor stays alive until its isend completes

    def all_reduce(self, tensor: torch.Tensor, *, group=None) -> _Done:
        dist.all_reduce(tensor, group=group)
        return _DONE

    def broadcast(self, tensor: torch.Tensor, *, src: int, group=None) -> _Done:
        dist.broadcast(tensor, src=src, group=group)
        return _DONE

    def send(self, tensor: torch.Tensor, *, dst: int, group=None, ordered: bool = False) -> _Done:
        if ordered:
            self._pending.append((dist.isend(tensor, dst, group=group), tensor))
        else:
            dist.send(tensor, dst, group=group)
        return _DONE

    def recv(self, tensor: torch.Tensor, *, src: int, group=None) -> _Done:
        dist.recv(tensor, src, group=group)
        return _DONE

    def wait_sends(self) -> None:
        """Complete every outstanding ordered-mode send."""
        for work, _ in self._pending:
            work.wait()
        self._pending = []

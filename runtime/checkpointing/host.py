"""Checkpoint inputs kept in host memory (`cpu_checkpointing`) on a CUDA device, copied out and back without
stopping the GPU.

[Note: host checkpoints] A plain `.to("cpu")` of a GPU tensor lands in pageable memory and makes the host
wait for every kernel queued before it; `.to(device)` back from pageable memory waits again, so the GPU
idles at every checkpoint while the host catches up (B3 on an H200 ran 6.5x slower than without
`cpu_checkpointing`, RESULTS.md 2026-11-30). Here:
- out: the copy into pinned host memory runs on a copy stream of the device, ordered after the kernels
  that produced the input; the GPU tensor is marked as used by that stream (`record_stream`), so the
  caching allocator does not hand its memory out again before the copy has read it.
- back: backward recomputes the checkpoints of a sequential model in the reverse order of their forwards.
  Restoring one issues its own copy back (if not issued yet), then the copy of the checkpoint before it,
  the next one backward will need, on the copy stream, so that transfer runs under this checkpoint's
  recompute and backward. The compute stream waits for a copy only where its tensor is used. Another
  order is just as correct: a restore waits for its copy.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["HostCopy"]

_STREAMS: Dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


class HostCopy:
    """One CUDA tensor held in pinned host memory from a checkpoint's forward to its backward."""

    _pending: List["weakref.ref[HostCopy]"] = []  # forward order; restored or collected ones leave it

    def __init__(self, data: torch.Tensor):
        self.device = data.device
        stream = _copy_stream(data.device)
        stream.wait_stream(torch.cuda.current_stream(data.device))
        with torch.cuda.stream(stream):
            self.host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            self.host.copy_(data, non_blocking=True)
            self._out = torch.cuda.Event()
            self._out.record(stream)
        data.record_stream(stream)
        self._back: Optional[Tuple[torch.Tensor, torch.cuda.Event]] = None
        if len(HostCopy._pending) >= 256:  # forwards whose graph was dropped without a backward
            HostCopy._pending = [ref for ref in HostCopy._pending if ref() is not None]
        HostCopy._pending.append(weakref.ref(self))

    def _fetch(self) -> None:
        """Issue the copy back on the copy stream (once)."""
        if self._back is not None:
            return
        stream = _copy_stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self._out)
            data = self.host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self._back = (data, done)

    def restore(self) -> torch.Tensor:
        """The tensor on its device, usable on the current stream; starts fetching the previous copy."""
        self._fetch()
        pending = [ref for ref in HostCopy._pending if ref() is not None]
        index = next((i for i, ref in enumerate(pending) if ref() is self), None)
        if index is not None:
            del pending[index]
            if index:
                pending[index - 1]()._fetch()  # the next one a sequential backward restores
        HostCopy._pending = pending
        data, done = self._back
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        data.record_stream(current)  # allocated on the copy stream, used and freed on this one
        self.host, self._back = None, None
        return data

"""The pipelined host step of optimizer offload on an accelerator ([Note: pipelined host step]).

With `offload_optimizer` the step moves every reduced gradient to the host, runs the CPU optimizer and
moves the updated 16-bit weights back. Done bucket by bucket and in order that is three serial passes
(copy down, step, copy up). Here each bucket is cut into chunks of `chunk_elems` elements that flow
through a ring of `slots` pinned buffers per direction:

    copy-in stream:   D2H c0  D2H c1  D2H c2 ...
    host (CPU step):          step c0 step c1 step c2 ...
    copy-out stream:                  H2D c0  H2D c1 ...

so both copies run under the CPU step of a neighbouring chunk and the step time is the CPU step's plus
one chunk's copy at each end. A chunk's gradient buffer is refilled only after the host has stepped the
chunk that used it (the host issues the refill itself, after that step), and its weight buffer only
after the copy-out that read it has finished (an event wait). A bucket is published on the compute
stream once its last chunk is back on the device. The ring costs `slots * chunk_elems * (4 + 2)` pinned
bytes whatever the model size, so host memory holds only the masters and optimizer states.

`plan_chunks` is the pure plan; `HostStepPipeline.run` the side effects. The pipeline runs on the host
thread that called step(): the CPU kernel releases the GIL but uses every core of the rank's slice.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

__all__ = ["plan_chunks", "HostStepPipeline", "CHUNK_ELEMS", "SLOTS", "chunk_size", "ring_bytes"]

# A chunk is 1/16 of the rank's step, within [MIN_CHUNK_ELEMS, CHUNK_ELEMS]. Each chunk costs ~0.25 ms of
# host work (views, events, the kernel call) and the first and last chunk's copies are not overlapped:
# on one H200 with 16 cores (B3, 1.26B, RESULTS.md 2026-11-30) 4 Mi-element chunks made the step 375 ms,
# 16 Mi 325 ms, 64 Mi 312 ms, against 295 ms of CPU kernel.
CHUNK_ELEMS = 1 << 26  # 64 Mi elements: 256 MiB of fp32 gradient, ~4.6 ms on PCIe 5, ~15 ms of 16-core CPU Adam
MIN_CHUNK_ELEMS = 1 << 22
SLOTS = 3


def chunk_size(total_elems: int) -> int:
    """Elements per chunk for a rank stepping `total_elems` elements (see above)."""
    return min(CHUNK_ELEMS, max(MIN_CHUNK_ELEMS, total_elems // 16))


def ring_bytes(total_elems: int, weight_bytes: int, slots: int = SLOTS) -> int:
    """Pinned host bytes of the ring of a rank stepping `total_elems` elements: per slot an fp32 gradient
    chunk and a weight chunk."""
    return slots * chunk_size(total_elems) * (4 + weight_bytes)

Chunk = Tuple[int, int, int]  # (bucket, start, end)


def plan_chunks(buckets: Sequence[Tuple[int, int]], chunk_elems: int) -> List[Chunk]:
    """The chunks of `buckets` ((index, numel) in processing order): each bucket cut into pieces of at
    most `chunk_elems` elements, in order; empty buckets give no chunk."""
    if chunk_elems <= 0:
        raise ValueError(f"chunk_elems must be positive, got {chunk_elems}")
    out: List[Chunk] = []
    for b, numel in buckets:
        for lo in range(0, numel, chunk_elems):
            out.append((b, lo, min(lo + chunk_elems, numel)))
    return out


class HostStepPipeline:
    """Runs one offloaded step over device gradients with the copies under the CPU step (module doc)."""

    def __init__(self, device: torch.device, *, pin: bool, chunk_elems: int = 0, slots: int = SLOTS):
        if slots < 2:
            raise ValueError("the ring needs at least 2 slots to overlap")
        self.device, self.pin, self.chunk_elems, self.slots = device, pin, chunk_elems, slots
        self._copy_in = torch.cuda.Stream(device=device)
        self._copy_out = torch.cuda.Stream(device=device)
        self._rings: Dict[Tuple[str, torch.dtype], List[torch.Tensor]] = {}

    def _slot(self, kind: str, dtype: torch.dtype, i: int) -> torch.Tensor:
        ring = self._rings.get((kind, dtype))
        if ring is None:
            from .offload import host_tensor
            ring = self._rings[(kind, dtype)] = [
                host_tensor(torch.empty(self.chunk_elems, dtype=dtype), pin=self.pin) for _ in range(self.slots)]
        return ring[i % self.slots]

    def run(self, order: Sequence[int], grads: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
            step_chunk: Callable[[int, int, int, torch.Tensor, torch.Tensor], None],
            publish: Callable[[int], None]) -> None:
        """Step the buckets in `order`: `grads[b]` (flat, on the device, already unscaled and clipped) go
        down chunk by chunk; `step_chunk(b, lo, hi, host_grad, host_out)` updates elements [lo, hi) of
        bucket b's master and writes the new weights into `host_out`; those go up into `targets[b][lo:hi]`;
        `publish(b)` runs on the compute stream once bucket b is back on the device. A target on the host
        (or None: the host master is itself the weight) takes the kernel's output directly, nothing goes
        up (ZeRO-3 parameter offload, whose shards live in host memory)."""
        if not self.chunk_elems:  # fixed at the first step (the ring's size); read here so a test can shrink it
            self.chunk_elems = chunk_size(sum(grads[b].numel() for b in order))
        chunks = plan_chunks([(b, grads[b].numel()) for b in order], self.chunk_elems)
        compute = torch.cuda.current_stream(self.device)
        self._copy_in.wait_stream(compute)  # the gradients (and their scaling) are final on the compute stream
        self._copy_out.wait_stream(compute)  # the previous forward no longer reads the weights it overwrites
        last_of = {b: i for i, (b, _, _) in enumerate(chunks)}
        pending = list(order)  # publishing is collective: every rank publishes in `order`, empty buckets too
        down: List[torch.cuda.Event] = []
        up: List[torch.cuda.Event] = []

        def copy_down(i: int) -> None:
            b, lo, hi = chunks[i]
            buf = self._slot("grad", torch.float32, i)[:hi - lo]
            with torch.cuda.stream(self._copy_in):
                buf.copy_(grads[b][lo:hi], non_blocking=True)
                down.append(torch.cuda.Event())
                down[-1].record(self._copy_in)

        def publish_through(b) -> None:
            while pending and (b is None or pending[0] not in last_of or pending[0] == b):
                done = pending.pop(0)
                publish(done)
                if done == b:
                    return

        for i in range(min(self.slots - 1, len(chunks))):
            copy_down(i)
        for i, (b, lo, hi) in enumerate(chunks):
            if i + self.slots - 1 < len(chunks):
                copy_down(i + self.slots - 1)  # into the slot chunk i-1 used: the host has stepped it
            down[i].synchronize()
            if i >= self.slots and up[i - self.slots] is not None:
                up[i - self.slots].synchronize()  # the copy-out that read this weight slot is done
            target, grad = targets[b], self._slot("grad", torch.float32, i)[:hi - lo]
            if target is None or target.device.type == "cpu":  # parameter offload: the weights stay here
                step_chunk(b, lo, hi, grad, None if target is None else target[lo:hi])
                up.append(None)
            else:
                out = self._slot("out", target.dtype, i)[:hi - lo]
                step_chunk(b, lo, hi, grad, out)
                with torch.cuda.stream(self._copy_out):
                    target[lo:hi].copy_(out, non_blocking=True)
                    up.append(torch.cuda.Event())
                    up[-1].record(self._copy_out)
            if last_of[b] == i:
                if up[-1] is not None:
                    compute.wait_event(up[-1])
                publish_through(b)
        publish_through(None)

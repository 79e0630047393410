"""ZeRO's collectives by copy engines over CUDA symmetric memory: the weight all-gather and the 16-bit
gradient all-to-all.

[Note: copy-engine collectives] An NCCL collective runs as a kernel on ~16-32 SMs for as long as the
transfer takes, and the compute it overlaps loses those SMs: on 4 H200 a GEMM loop ran 31% slower
beside a stream of 128 MB NCCL all-gathers, but 10% slower beside the same gathers done as peer
copies (which alone were faster too: 0.31 vs 0.36 ms; RESULTS.md B3, 2026-11-22). Both of ZeRO-1/2's
bulk collectives only move data (the gradient sums happen at the owner: reducer.py's [Note: 16-bit
wire, fp32 sums]), so on one node they can be plain device copies between buffers in *symmetric
memory* (torch.distributed._symmetric_memory: every rank maps every other rank's buffer), which the
DMA copy engines execute over NVLink without any SM. Ranks agree on when a buffer may be read or
overwritten through `barrier` kernels (one CTA each). Each engine issues its copies on its own
stream; the work handles it returns make the caller's stream wait for them, like NCCL's.

- `CopyEngineGather` owns the flat working buffer. Per bucket: wait for this rank's update of the
  bucket (stream order), barrier (every rank's chunk is updated), copy each peer's chunk in. No barrier
  is needed *after* the copies: a rank rewrites its chunk only in the next step's update, which
  follows that step's gradient reduction, in which a peer takes part only after its forward, which
  waited for these copies. `fence()` adds that barrier where no reduction follows (`publish()`).
- `CopyEngineAllToAll` owns `slots` receive buffers. Per bucket (every rank launches buckets in the
  same order, so they agree on the slot): wait until this rank has consumed the slot's previous
  contents, barrier (every rank's slot is free), push chunk r of the bucket into rank r's slot at this
  rank's index, barrier (everything pushed to every rank has landed).

`copy_engines_usable` decides once for all ranks (an all-reduce of the local verdicts): one node's
GPUs under NCCL with symmetric memory available; otherwise everything stays on NCCL.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["copy_engines_usable", "CopyEngineGather", "CopyEngineAllToAll"]

log = logging.getLogger("dsrun")


class _EventWork:
    """A work handle: `wait()` makes the current stream wait for the copies."""

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def wait(self):
        torch.cuda.current_stream().wait_event(self.event)
        return True


def _local_verdict(comm, device) -> Optional[str]:
    """Why this rank of a multi-GPU CUDA group cannot use copy engines, or None."""
    if dist.get_backend(comm.group) != "nccl":
        return "backend is not nccl"
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is None or int(local) != dist.get_world_size():
        return "the job spans more than one node (or LOCAL_WORLD_SIZE is unset)"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except Exception as e:  # an old torch, or one built without it
        return f"torch.distributed._symmetric_memory unavailable ({type(e).__name__})"
    return None


def copy_engines_usable(comm, device) -> bool:
    """Whether every rank of `comm` can use copy-engine collectives (collective on multi-GPU CUDA groups)."""
    if device.type != "cuda" or comm.world_size == 1:
        return False
    reason = _local_verdict(comm, device)
    ok = torch.tensor([0 if reason else 1], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=comm.group)
    if not int(ok.item()):
        log.info("[dsrun] ZeRO collectives use NCCL kernels: %s", reason or "another rank cannot use copy engines")
        return False
    return True


class _Symmetric:
    """One symmetric buffer: this rank's tensor, every rank's view of it, a copy stream.

    The copies of one collective run one after another on that stream. Spreading them over one stream
    per peer (several copy engines at once) measured slower on 4 H200 (B3 dsrun-z2 +3 ms a step, -pg
    no better; RESULTS.md, 2026-11-22): the parallel copies take more memory bandwidth from the compute
    they overlap."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device, comm):
        import torch.distributed._symmetric_memory as symm_mem
        self.rank, self.world = comm.rank, comm.world_size
        self.buffer = symm_mem.empty(numel, dtype=dtype, device=device)
        group = comm.group if comm.group is not None else dist.group.WORLD
        self.handle = symm_mem.rendezvous(self.buffer, group.group_name)
        self.peers: List[torch.Tensor] = [self.handle.get_buffer(r, (numel,), dtype) for r in range(self.world)]
        self.stream = torch.cuda.Stream(device=device)

    def _copies(self, pairs) -> None:
        """`dst.copy_(src)` for each pair, in order, on `self.stream`."""
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src)

    def _done(self) -> _EventWork:
        event = torch.cuda.Event()
        event.record(self.stream)
        return _EventWork(event)


class CopyEngineGather(_Symmetric):
    """The flat working buffer, in symmetric memory; see [Note: copy-engine collectives]."""

    def all_gather(self, start: int, end: int) -> _EventWork:
        """Fill bucket [start, end) from every peer's own chunk of it."""
        chunk = (end - start) // self.world
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.handle.barrier(channel=0)
        pairs = []
        for j in range(1, self.world):
            r = (self.rank + j) % self.world  # stagger the sources
            lo = start + r * chunk
            pairs.append((self.buffer[lo:lo + chunk], self.peers[r][lo:lo + chunk]))
        self._copies(pairs)
        return self._done()

    def fence(self) -> None:
        """Every rank has finished reading every other rank's chunks (the caller waited for its copies)."""
        self.handle.barrier(channel=0)


class CopyEngineAllToAll(_Symmetric):
    """`slots` receive buffers of `slot_numel` elements; see [Note: copy-engine collectives]."""

    def __init__(self, slot_numel: int, slots: int, dtype: torch.dtype, device: torch.device, comm):
        super().__init__(slot_numel * slots, dtype, device, comm)
        self.slot_numel, self.slots = slot_numel, slots
        self._next = 0
        self._consumed: List[Optional[torch.cuda.Event]] = [None] * slots

    def all_to_all(self, src: torch.Tensor) -> Tuple[torch.Tensor, int, _EventWork]:
        """Chunk r of `src` lands in rank r's receive slot at this rank's index. Returns (this rank's
        received view, its slot, work); call `release(slot)` once the view has been read."""
        slot, self._next = self._next, (self._next + 1) % self.slots
        n = src.numel()
        chunk, base = n // self.world, slot * self.slot_numel
        self.stream.wait_stream(torch.cuda.current_stream())
        if self._consumed[slot] is not None:
            self.stream.wait_event(self._consumed[slot])
        with torch.cuda.stream(self.stream):
            self.handle.barrier(channel=0)
        lo, pairs = base + self.rank * chunk, []
        for j in range(self.world):
            r = (self.rank + j) % self.world
            pairs.append((self.peers[r][lo:lo + chunk], src[r * chunk:(r + 1) * chunk]))
        self._copies(pairs)
        with torch.cuda.stream(self.stream):
            self.handle.barrier(channel=0)
        return self.buffer[base:base + n], slot, self._done()

    def release(self, slot: int) -> None:
        """The current stream has queued its last read of `slot`."""
        event = torch.cuda.Event()
        event.record()
        self._consumed[slot] = event

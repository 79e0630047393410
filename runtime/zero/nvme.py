"""NVMe optimizer offload (`offload_optimizer: {device: nvme}`): masters and states in files, per bucket.

On top of the CPU offload (offload.py: the step runs on the CPU, bucket by bucket), each bucket's fp32
master and its per-element optimizer states (Adam's `exp_avg`/`exp_avg_sq`, Adagrad's `sum`) live in
files (swap.py) and are in host memory only around that bucket's step ([Note: NVMe residency]). The
tensors themselves stay the same objects: the optimizer's param groups and state dict keep pointing at
them, only their storage is freed (`free_storage`) between uses, so checkpoints, `state_dict` and the
step counts work unchanged once the tensors are resident.

[Note: NVMe residency] `resident(master)` (the host updater's hook around one bucket's CPU step):
1. the bucket's tensors are made resident: a read prefetched by the previous bucket is waited for, a
   write still in flight is waited for (its memory is still there: no read), else they are read now;
2. the next bucket in step order is prefetched (`overlap_events`), so its read runs under this step
   (the first bucket's read starts when the backward of the accumulation boundary begins);
3. after the step, the tensors (new states included) are written back asynchronously; their memory is
   freed once the write is done, checked at the next bucket. At most `buffer_count` buckets are held
   (being stepped, prefetched or written); beyond that the oldest write is waited for.
Checkpoints swap everything in (`swap_in_all`): saving and loading need host memory for this rank's
whole optimizer state for a moment; the next step writes the buckets out again.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List

import torch

from .swap import Pending, TensorSwapper, alloc_storage, free_storage

__all__ = ["NvmeOptimizerState", "nvme_bytes_needed", "nvme_host_bytes_needed", "nvme_optimizer_offload"]


def nvme_bytes_needed(owned_numel: int, *, state_elems: int, local_ranks: int) -> int:
    """Disk bytes of optimizer offload to NVMe on one node: per local rank, the fp32 master and
    `state_elems` fp32 states of each owned element."""
    return owned_numel * 4 * (1 + state_elems) * local_ranks


class NvmeOptimizerState:
    """Per bucket, the master and its optimizer states in files, resident around the bucket's step."""

    def __init__(self, swapper: TensorSwapper, optimizer, device_masters: List[torch.Tensor], *,
                 prefetch: bool = True, buffer_count: int = 4):
        self.swapper, self.optimizer = swapper, optimizer
        self.prefetch, self.max_held = prefetch, max(2, buffer_count)
        self.masters: List[torch.Tensor] = []
        self._index: Dict[int, int] = {}
        self._reading: Dict[int, Pending] = {}
        self._writing: Dict[int, Pending] = {}  # oldest first
        self._resident = set()
        for b, m in enumerate(device_masters):  # one bucket at a time on the host: its copy, written, freed
            host = m.detach().to("cpu", torch.float32, copy=True).contiguous()
            self.masters.append(host)
            self._index[id(host)] = b
            if host.numel():
                self.swapper.write(self._key(b, "master"), host).wait()
                free_storage(host)

    # -- one bucket ----------------------------------------------------------------------------------

    @staticmethod
    def _key(b: int, name: str) -> str:
        return f"bucket{b}.{name}"

    def _tensors(self, master: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The master and its per-element states (what is swapped), by file name."""
        out = {"master": master}
        for k, v in self.optimizer.state.get(master, {}).items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape == master.shape:
                out[k] = v
        return out

    def _start_read(self, b: int) -> None:
        m = self.masters[b]
        if b in self._resident or b in self._reading or b in self._writing or not m.numel():
            return
        futures = []
        for name, t in self._tensors(m).items():
            if not self.swapper.has(self._key(b, name)):  # made since the last write: still in memory
                continue
            alloc_storage(t)
            futures.append(self.swapper.read(self._key(b, name), t))
        self._reading[b] = _All(futures)

    def _make_resident(self, b: int) -> None:
        if b in self._writing:  # its memory was not freed yet: the data is current once the write is done
            self._writing.pop(b).wait()
        else:
            self._start_read(b)
            pending = self._reading.pop(b, None)
            if pending is not None:
                pending.wait()
        self._resident.add(b)

    def _release(self, b: int) -> None:
        m = self.masters[b]
        self._resident.discard(b)
        self._writing[b] = _All([self.swapper.write(self._key(b, name), t) for name, t in self._tensors(m).items()])

    def _reap(self, *, limit: int) -> None:
        """Free the memory of finished writes; wait for the oldest while more than `limit` buckets are held."""
        for b in [b for b, p in self._writing.items() if p.done()]:
            self._finish_write(b)
        while self._writing and len(self._writing) + len(self._reading) + len(self._resident) > limit:
            self._finish_write(next(iter(self._writing)))

    def _finish_write(self, b: int) -> None:
        self._writing.pop(b).wait()
        for t in self._tensors(self.masters[b]).values():
            free_storage(t)

    @contextmanager
    def resident(self, master: torch.Tensor):
        """`master` and its states are in host memory inside the block ([Note: NVMe residency])."""
        b = self._index[id(master)]
        if not master.numel():
            yield
            return
        self._reap(limit=self.max_held)
        self._make_resident(b)
        if self.prefetch:
            nxt = self._next(b)
            if nxt is not None:
                self._start_read(nxt)
        yield
        self._release(b)

    def prefetch_first(self) -> None:
        """Start reading the bucket the next step takes first (called as the boundary's backward begins,
        so the read runs under the backward)."""
        self._reap(limit=self.max_held)
        first = self._next(len(self.masters))
        if self.prefetch and first is not None:
            self._start_read(first)

    def _next(self, b: int):
        """The bucket stepped after `b` (the host updater goes from the last bucket to the first)."""
        for c in range(b - 1, -1, -1):
            if self.masters[c].numel():
                return c
        return None

    # -- parameter offload to NVMe: the masters are the shards (unit_weights.py) -----------------------

    def make_resident(self, master: torch.Tensor) -> None:
        """`master` (and its states) in memory until its next step."""
        if master.numel():
            self._make_resident(self._index[id(master)])

    def copy_master(self, master: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy (casting) `master` into `dst`: from memory when it is there, else read from its file into
        memory that is freed right after (a synchronous copy, so `dst` may be on an accelerator)."""
        b = self._index[id(master)]
        if not master.numel():
            return
        pending = self._reading.pop(b, None)
        if pending is not None:
            pending.wait()
            self._resident.add(b)
        if b in self._resident or b in self._writing:  # a write in flight leaves the memory as it is
            dst.copy_(master)
            return
        alloc_storage(master)
        try:
            self.swapper.read(self._key(b, "master"), master).wait()
            dst.copy_(master)
        finally:
            free_storage(master)

    # -- everything at once (checkpoints) --------------------------------------------------------------

    def swap_in_all(self) -> None:
        """Every bucket resident until its next step (checkpoint save and load)."""
        for b, m in enumerate(self.masters):
            if m.numel():
                self._make_resident(b)

    def flush(self) -> None:
        """Wait for every read and write in flight; free written buckets."""
        for b in list(self._reading):
            self._reading.pop(b).wait()
            self._resident.add(b)
        for b in list(self._writing):
            self._finish_write(b)

    def close(self) -> None:
        """Wait for the I/O in flight, then remove the files (the swapper's folder)."""
        try:
            self.flush()
        finally:
            self.swapper.close()


class _All:
    """Several `Pending`s as one."""

    def __init__(self, pendings: List[Pending]):
        self._pendings = pendings

    def done(self) -> bool:
        return all(p.done() for p in self._pendings)

    def wait(self) -> None:
        pendings, self._pendings = self._pendings, []
        first = None
        for p in pendings:
            try:
                p.wait()
            except BaseException as exc:  # wait for all of them before raising: none may write freed memory
                first = first or exc
        if first is not None:
            raise first


def nvme_host_bytes_needed(layout, *, state_elems: int, buffer_count: int, local_ranks: int,
                           device_is_host: bool, param_bytes: int = 4) -> int:
    """Host bytes of optimizer offload to NVMe on one node: per local rank, `buffer_count` of the largest
    owned bucket's master and states, plus (on an accelerator) the fp32 gradient buffer and, for 16-bit
    weights, the staging buffer of every owned element (as offload.py's `host_bytes_needed`)."""
    owned = [b.own_end - b.own_start for b in layout.buckets]
    resident = max(owned, default=0) * 4 * (1 + state_elems) * max(2, buffer_count)
    copies = 0 if device_is_host else sum(owned) * (4 + (param_bytes if param_bytes < 4 else 0))
    return (resident + copies) * local_ranks


def nvme_optimizer_offload(layout, optimizer, *, policy, rank: int, device, param_dtype, local_ranks=None,
                           free=None):
    """What `ZeroOptimizer` takes as `nvme=`: a function (optimizer, masters) -> `NvmeOptimizerState`,
    after checking, before anything is allocated, that `policy.nvme_path` exists, is writable and has
    room for every local rank's masters and states, and that host memory holds the buffers
    (ConfigError otherwise)."""
    import os

    import psutil
    import torch

    from dsrun.errors import ConfigError

    from .offload import HOST_STATE_ELEMS, check_host_budget, offload_kind
    from .swap import check_disk_budget, check_nvme_path
    where = "zero_optimization.offload_optimizer.nvme_path"
    kind = offload_kind(optimizer)
    if kind == "torch":
        raise ConfigError(f"offload to NVMe steps the optimizer bucket by bucket with a fused CPU kernel; "
                          f"{type(optimizer).__name__} has none", where="zero_optimization.offload_optimizer.device",
                          hint="use Adam, AdamW or Adagrad, or device \"cpu\"")
    check_nvme_path(policy.nvme_path, where)
    owned = sum(b.own_end - b.own_start for b in layout.buckets)
    local_ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    needed = nvme_bytes_needed(owned, state_elems=HOST_STATE_ELEMS[kind], local_ranks=local_ranks)
    check_disk_budget(policy.nvme_path, needed, local_ranks=local_ranks, where=where, free=free)
    host = nvme_host_bytes_needed(layout, state_elems=HOST_STATE_ELEMS[kind], buffer_count=policy.buffer_count,
                                  local_ranks=local_ranks, device_is_host=torch.device(device).type == "cpu",
                                  param_bytes=torch.finfo(param_dtype).bits // 8)
    check_host_budget(host, psutil.virtual_memory().available, local_ranks=local_ranks)
    io = policy.io
    swapper = TensorSwapper(policy.nvme_path, rank=rank, block_size=io.block_size, queue_depth=io.queue_depth,
                            thread_count=io.thread_count, where=where)

    def build(opt, masters):
        return NvmeOptimizerState(swapper, opt, masters, prefetch=io.overlap_events, buffer_count=policy.buffer_count)
    return build

"""UnitWeights: the weight store of ZeRO-3. Parameters live as 1/world shards and are gathered per unit.

Each bucket of the unit layout (units.py) has a persistent shard in `param_dtype` on this rank (the owned
chunk, `owned(b)`). A unit is *gathered* by one all-gather per bucket into a fresh buffer that its
parameters then view; *released*, its parameters point at an empty placeholder again (DeepSpeed's
`param.data` convention: `ds_shape`/`ds_numel` keep the real shape) and the buffer is freed.
The whole model is never materialised on one device: at construction each bucket is assembled on its
own, and at any time only the units in use (plus prefetched and kept ones) are whole. When to gather and
release is UnitSchedule's business (unit_schedule.py: [Note: ZeRO-3 gather and release]).

[Note: the master is the shard] With 16-bit working weights and fp32 masters, a trainable bucket keeps no
16-bit shard: a gather casts this rank's fp32 master chunk straight into its own chunk of the gathered
buffer and all-gathers in place (FSDP2 does the same cast in its all-gather copy-in). A separate 16-bit
shard would only ever hold the master's cast, and costs 2 bytes per parameter / world (1.17 GiB per rank
on the 1.26B B3 model over 2 ranks); the cast is one elementwise pass over the shard per gather. So
`owned(b)` is None for such a bucket (the updaters then write only the master) and a parameter's
`ds_tensor` is its fp32 master slice. Frozen buckets (no master) keep their 16-bit shards.

[Note: parameter offload] With `offload_param: {device: cpu}` (`host_shards`) every shard lives in host
memory (pinned per `pin_memory`); the optimizer is offloaded too, so the host step writes the new weights
into them (the pipelined host step's output is the host shard itself). With 16-bit weights a trainable
bucket keeps its 16-bit shard beside the fp32 master, against the note above: the shard is what crosses
PCIe at every gather, and 2 bytes per element instead of the master's 4 halves that traffic (on the B3
model, ~2.5 GB per forward and again per backward instead of ~5 GB), for 2 bytes per element of host
memory. A gather copies this rank's shard into its chunk of the device buffer, then all-gathers in place,
both on an upload stream of their own: the unit schedule's prefetch launches them while earlier layers are
still queued on the compute stream, and the copy runs under those layers instead of between them (the
compute stream waits for it only where the unit is used). The device holds only the units in use.

With `offload_param: {device: nvme}` (`swapped`, with the optimizer on NVMe too) a trainable bucket's
shard is its fp32 master in the optimizer's swap file (nvme.py): `adopt_swapped_masters` takes those
masters and a gather reads the master (from memory when it is resident, else from its file) straight
into the device buffer, casting. Frozen shards stay in host memory.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch

from .comm import Comm
from .flat_weights import broadcast_from_first
from .layout import FlatLayout
from .units import Unit

__all__ = ["UnitWeights", "ZeroParamStatus"]


class ZeroParamStatus:
    """DeepSpeed's `ds_status` values (strings here; compared by name in user code)."""

    AVAILABLE = "AVAILABLE"
    NOT_AVAILABLE = "NOT_AVAILABLE"
    INFLIGHT = "INFLIGHT"


class _Uploaded:
    """The work of a gather whose host shard went up on the upload stream: waiting makes the current
    stream wait for the copy, then for the all-gather."""

    def __init__(self, event, work):
        self.event, self.work = event, work

    def wait(self):
        torch.cuda.current_stream().wait_event(self.event)
        return self.work.wait()


class UnitWeights:
    def __init__(self, module: torch.nn.Module, layout: FlatLayout, units: List[Unit], *, param_dtype: torch.dtype,
                 comm: Comm, device: torch.device, frozen, zero_config, frozen_layout: Optional[FlatLayout] = None,
                 host_shards: bool = False, pin: bool = False, swapped: bool = False):
        self.module, self.layout, self.units, self.comm, self.device = module, layout, units, comm, device
        # [Note: parameter offload]: shards in host memory; `swapped`: trainable ones in NVMe files
        self.host_shards, self.pin, self.swapped = host_shards or swapped, pin, swapped
        self._swap = None  # the optimizer's NvmeOptimizerState once `adopt_swapped_masters` ran
        self._upload = None  # the CUDA stream host shards go up on
        # bucket indices: the trainable layout's, then the frozen layout's shifted by `num_trainable`
        self.num_trainable = len(layout.buckets)
        self.buckets = list(layout.buckets) + list(frozen_layout.buckets if frozen_layout else [])
        self.gathered = {u.index: u.buckets + [self.num_trainable + b for b in u.frozen_buckets] for u in units}
        self.param_dtype = param_dtype
        self.sharded = True
        self.overlaps_forward = False
        self.unit_of_bucket = {b: u for u, bs in self.gathered.items() for b in bs}
        self.slots_of_unit = {u: [s for b in bs for s in self.buckets[b].slots] for u, bs in self.gathered.items()}
        self.unit_of_param = {s.param: u for u, slots in self.slots_of_unit.items() for s in slots}
        self._frozen_slot = {s.param: s for b in self.buckets[self.num_trainable:] for s in b.slots}
        self._placeholder = torch.empty(0, dtype=param_dtype, device=device)
        self.shards: List[torch.Tensor] = []
        self._init_masters: List[torch.Tensor] = []
        self.masters: List[torch.Tensor] = []
        self._full: Dict[int, torch.Tensor] = {}  # bucket -> gathered buffer
        self._storage: Dict[int, int] = {}  # data_ptr of a gathered buffer -> bucket
        self._pending: Dict[int, list] = {}  # unit -> in-flight all-gathers
        self._live: Dict[int, None] = {}  # gathered (or in flight) units, oldest first
        self.live_numel = 0
        self._publishes: List = []
        self._ids: List = []  # ds_id -> parameter
        self._build(frozen)
        from .unit_schedule import UnitSchedule
        self.schedule = UnitSchedule(self, zero_config)

    # -- construction --------------------------------------------------------------------------------

    def _build(self, frozen) -> None:
        from .context import full_value, mark_zero3
        with torch.no_grad():
            for b, bucket in enumerate(self.buckets):
                full = torch.zeros(bucket.numel, dtype=torch.float32, device=self.device)
                for s in bucket.slots:
                    full[s.offset - bucket.start:s.offset - bucket.start + s.numel].copy_(full_value(s.param).reshape(-1))
                broadcast_from_first(full, self.comm)
                own = self._place(full[bucket.own_start - bucket.start:bucket.own_end - bucket.start].clone())
                if b < self.num_trainable:
                    self._init_masters.append(own)
                self.shards.append(own if self.param_dtype == torch.float32 else self._place(own.to(self.param_dtype)))
                del full
            for s in self.slots_of_all():
                s.param.data = self._placeholder
            for _, p in frozen:
                if p in self._frozen_slot:
                    continue
                data = full_value(p).to(self.device, self.param_dtype if p.is_floating_point() else p.dtype)
                broadcast_from_first(data, self.comm)
                p.data = data
        for b, bucket in enumerate(self.buckets):
            for s in bucket.slots:
                lo, hi = bucket.owned_range(s)
                a = s.offset + lo - bucket.own_start if hi > lo else 0
                unit = self.units[self.unit_of_param[s.param]]
                mark_zero3(s.param, shape=s.shape, ds_id=len(self._ids), owner=self, persist=unit.persistent,
                           shard=self.shards[b][a:a + hi - lo])
                self._ids.append(s.param)
        for u in self.units:
            if u.persistent:
                self.ensure(u.index)

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        """Where a shard lives: on the device, or in (pinned) host memory ([Note: parameter offload])."""
        if not self.host_shards:
            return t
        from .offload import host_tensor
        return host_tensor(t, pin=self.pin)

    def slots_of_all(self):
        return [s for bucket in self.buckets for s in bucket.slots]

    def attach(self, reducer) -> None:
        """Release each unit once the reducer has taken all its gradients (see the note above)."""
        reducer.on_bucket_ready = self.schedule.bucket_ready

    # -- gather and release --------------------------------------------------------------------------

    def _gather_into(self, b: int, full: torch.Tensor):
        """Launch bucket b's all-gather into `full` ([Note: the master is the shard])."""
        src = self.shards[b]
        if src is None or self.host_shards:
            bucket = self.buckets[b]
            chunk = full[bucket.own_start - bucket.start:bucket.own_end - bucket.start]
            if src is not None and full.is_cuda:  # a host shard ([Note: parameter offload])
                return self._upload_and_gather(full, chunk, src)
            if src is not None:
                chunk.copy_(src)
            elif self._swap is not None:  # the master in its swap file (or resident)
                self._swap.copy_master(self.masters[b], chunk)
            elif self.host_shards:  # a host master: one casting copy to the device
                chunk.copy_(self.masters[b], non_blocking=True)
            else:  # the foreach copy casts vectorized on CUDA (a casting copy_ does not: reducer.py's _take)
                torch._foreach_copy_([chunk], [self.masters[b]])
            src = chunk
        return self.comm.all_gather(full, src, async_op=True)

    def _upload_and_gather(self, full: torch.Tensor, chunk: torch.Tensor, host: torch.Tensor) -> "_Uploaded":
        """Copy a host shard into its chunk of `full` and all-gather, both on the upload stream, so the copy
        runs under the compute queued before it ([Note: parameter offload]). The upload stream first waits
        for the compute stream (`full` may reuse memory a released unit's kernels still read); the
        compute stream waits for the upload where the unit is used or released (`_Uploaded.wait`)."""
        if self._upload is None:
            self._upload = torch.cuda.Stream(device=full.device)
        self._upload.wait_stream(torch.cuda.current_stream(full.device))
        with torch.cuda.stream(self._upload):
            chunk.copy_(host, non_blocking=True)
            work = self.comm.all_gather(full, chunk, async_op=True)
            event = torch.cuda.Event()
            event.record(self._upload)
        return _Uploaded(event, work)

    def launch(self, u: int) -> None:
        """Start gathering unit `u` (asynchronously; `ensure` waits)."""
        if u in self._live:
            return
        works = []
        for b in self.gathered[u]:
            full = torch.empty(self.buckets[b].numel, dtype=self.param_dtype, device=self.device)
            works.append(self._gather_into(b, full))
            self._full[b] = full
        self._pending[u] = works
        self._live[u] = None
        self.live_numel += self.units[u].numel
        for s in self.slots_of_unit[u]:
            s.param.ds_status = ZeroParamStatus.INFLIGHT

    def ensure(self, u: int) -> None:
        """Unit `u` is gathered and its parameters view the gathered buffers (collective if not yet)."""
        if u not in self._live:
            self.launch(u)
        works = self._pending.pop(u, None)
        if works is None:
            return
        for w in works:
            w.wait()
        for b in self.gathered[u]:
            bucket, full = self.buckets[b], self._full[b]
            self._storage[full.untyped_storage().data_ptr()] = b
            for s in bucket.slots:
                s.param.data = full[s.offset - bucket.start:s.offset - bucket.start + s.numel].view(s.shape)
                s.param.ds_status = ZeroParamStatus.AVAILABLE

    def is_live(self, u: int) -> bool:
        """Gathered, or being gathered."""
        return u in self._live

    def is_ready(self, u: int) -> bool:
        """Gathered, and its parameters view the gathered buffers."""
        return u in self._live and u not in self._pending

    def bucket_of(self, t: torch.Tensor) -> Optional[int]:
        """The bucket whose gathered buffer `t` views, or None."""
        return self._storage.get(t.untyped_storage().data_ptr()) if self._storage else None

    def gathered_buffer(self, b: int) -> torch.Tensor:
        return self._full[b]

    def release(self, u: int) -> None:
        unit = self.units[u]
        if unit.persistent or u not in self._live:
            return
        for w in self._pending.pop(u, ()):
            w.wait()
        for b in self.gathered[u]:
            full = self._full.pop(b)
            self._storage.pop(full.untyped_storage().data_ptr(), None)
        for s in self.slots_of_unit[u]:
            s.param.data = self._placeholder
            s.param.ds_status = ZeroParamStatus.NOT_AVAILABLE
        del self._live[u]
        self.live_numel -= unit.numel

    def release_all(self) -> None:
        for u in list(self._live):
            self.release(u)

    # -- the weight-store interface (flat_weights.py) -------------------------------------------------

    def make_masters(self, master_dtype: torch.dtype, aliased: bool) -> List[torch.Tensor]:
        init, self._init_masters = self._init_masters, []
        self.masters = self.shards[:self.num_trainable] if aliased else [m.to(master_dtype) for m in init]
        # [Note: the master is the shard]; with parameter offload to host memory a 16-bit shard stays: it is
        # what goes up at each gather (2 bytes per element, not the master's 4), the host step writes it
        master_is_shard = not aliased and master_dtype == torch.float32 and not self.host_shards
        if master_is_shard or self.swapped:
            for b in range(self.num_trainable):
                self.shards[b] = None
            self._point_ds_tensors()
        return self.masters

    def _point_ds_tensors(self) -> None:
        for b in range(self.num_trainable):
            bucket = self.buckets[b]
            for s in bucket.slots:
                lo, hi = bucket.owned_range(s)
                a = s.offset + lo - bucket.own_start if hi > lo else 0
                s.param.ds_tensor = self.masters[b][a:a + hi - lo]

    def adopt_swapped_masters(self, swap) -> None:
        """Parameter offload to NVMe: the masters of `swap` (nvme.py's NvmeOptimizerState) are the shards;
        `ds_tensor` views them (readable while they are resident)."""
        from .swap import alloc_storage, free_storage
        self.masters, self._swap = swap.masters, swap
        for m in self.masters:  # a view needs memory to be made; it follows the storage's later resizes
            alloc_storage(m)
        self._point_ds_tensors()
        for m in self.masters:
            free_storage(m)

    def owned(self, b: int) -> Optional[torch.Tensor]:
        """Bucket b's working shard; None when the master is the shard ([Note: the master is the shard])."""
        return self.shards[b]

    def publish(self, b: int) -> None:
        """Bucket b's shard was updated: the persistent unit re-gathers it; any other unit is gathered
        from the new shard the next time it is used."""
        u = self.unit_of_bucket[b]
        if self.units[u].persistent:
            self._publishes.append(self._gather_into(b, self._full[b]))
        elif u in self._live:
            self.release(u)

    def wait(self) -> None:
        publishes, self._publishes = self._publishes, []
        for w in publishes:
            w.wait()

    def fence(self) -> None:
        pass

    def before_backward(self) -> None:
        self.schedule.before_backward()

    def after_backward(self) -> None:
        self.schedule.after_backward()

    # -- whole parameters on request (GatheredParameters, state dicts) --------------------------------

    def gather_units(self, units: Iterable[int]) -> List[int]:
        """Gather `units` (in index order, so every rank issues the same collectives); returns those that
        were not gathered before (the caller releases them)."""
        fresh = []
        for u in sorted(set(units)):
            if u not in self._live:
                fresh.append(u)
            self.ensure(u)
        return fresh

    @torch.no_grad()
    def publish_edits(self, units: Iterable[int], src_rank: int) -> None:
        """Every rank takes rank `src_rank`'s (group rank) gathered values of `units`: masters and shards too."""
        import torch.distributed as dist
        for u in sorted(set(units)):
            for b in self.gathered[u]:
                full, bucket = self._full[b], self.buckets[b]
                if self.comm.world_size > 1:
                    src = dist.get_global_rank(self.comm.group, src_rank) if self.comm.group else src_rank
                    dist.broadcast(full, src=src, group=self.comm.group)
                own = full[bucket.own_start - bucket.start:bucket.own_end - bucket.start]
                if b < len(self.masters) and self.masters[b] is not self.shards[b]:
                    if self._swap is not None:  # resident until its next step writes it back
                        self._swap.make_resident(self.masters[b])
                    self.masters[b].copy_(own)
                if self.shards[b] is not None:
                    self.shards[b].copy_(own)

    def full_state_dict(self, module: torch.nn.Module) -> dict:
        """`module.state_dict()` with every parameter whole (gathers unit by unit; collective)."""
        self.wait()
        keys: Dict[torch.nn.Parameter, List[str]] = {}
        for key, t in module.state_dict(keep_vars=True).items():
            if isinstance(t, torch.nn.Parameter):
                keys.setdefault(t, []).append(key)
        state = {k: v for k, v in module.state_dict().items()}
        for u in range(len(self.units)):
            fresh = self.gather_units([u])
            for s in self.slots_of_unit[u]:
                for key in keys.get(s.param, ()):
                    state[key] = s.param.detach().clone()
            for v in fresh:
                self.release(v)
        return state

    def _frozen_view(self, p):
        slot = self._frozen_slot[p]
        b = self.num_trainable + slot.bucket
        bucket = self.buckets[b]
        lo, hi = bucket.owned_range(slot)
        a = slot.offset + lo - bucket.own_start if hi > lo else 0
        return slot, lo, hi, self.shards[b][a:a + hi - lo]

    def frozen_shard(self, name: str, p):
        """The checkpoint view (`ParamShard`) of a sharded frozen parameter, or None for a whole one."""
        if p not in self._frozen_slot:
            return None
        from ..shard_state import ParamShard
        slot, lo, hi, view = self._frozen_view(p)
        return ParamShard(name, slot.shape, self.param_dtype, lo, hi, view.float(), {}, frozen=True)

    @torch.no_grad()
    def load_frozen(self, p, shard) -> None:
        """Take a frozen parameter's loaded `shard.master` (this rank's range of it)."""
        if p in self._frozen_slot:
            self._frozen_view(p)[3].copy_(shard.master)
        else:
            p.copy_(shard.master.view(p.shape))

    def destroy(self) -> None:
        """Remove hooks and free the shards; parameters keep placeholders (the engine cannot train afterwards)."""
        self.wait()
        self.schedule.remove()
        self.release_all()
        self._full, self.shards, self.masters = {}, [], []

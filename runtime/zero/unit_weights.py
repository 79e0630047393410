"""UnitWeights: the weight store of ZeRO-3. Parameters live as 1/world shards and are gathered per unit.

Each bucket of the unit layout (units.py) has a persistent shard in `param_dtype` on this rank (the owned
chunk, `owned(b)`). A unit is *gathered* by one all-gather per bucket into a fresh buffer that its
parameters then view; *released*, its parameters point at an empty placeholder again (DeepSpeed's
`param.data` convention: `ds_shape`/`ds_numel` keep the real shape) and the buffer is freed.
The whole model is never materialised on one device: at construction each bucket is assembled on its
own, and at any time only the units in use (plus prefetched and kept ones) are whole.

[Note: ZeRO-3 gather and release]
- forward: the root's pre-hook gathers the root unit and installs saved-tensor hooks; each unit's
  pre-hook gathers it (waiting for its prefetch) and prefetches the units that followed it in the
  previous step's forward, up to `prefetch_bucket_size` elements and while `max_live_parameters`
  allows; its post-hook registers a gradient hook on its outputs and releases it, except for the most
  recently finished units whose reuse distance (the elements of the units that finished after them) is
  at most `max_reuse_distance` (they are needed first in backward). Without grad (eval) a unit is
  released right after its forward.
- saved tensors: an op that saves a view of gathered weights for backward (F.linear saves `weight.t()`)
  would keep the whole buffer alive until backward. The saved-tensor hooks store such a tensor as
  (bucket, offset, size, stride) instead and rebuild it in backward from the re-gathered buffer, so
  releasing frees memory and backward always finds the unit gathered.
- backward: the gradient hook on a unit's outputs gathers it before its backward ops run and prefetches
  the units before it in this step's forward order; a unit is released once the gradients of all its
  parameters have arrived (they are then reduce-scattered by the reducer, bucket by bucket); whatever is
  still gathered is released at the end of backward.
- Order changes from step to step only cost prefetches that do not match; every gather is waited for
  where it is used. All ranks must run the same units in the same order within a step (as DeepSpeed
  and FSDP): gathers are collectives.
- CUDA: all-gathers are launched asynchronously (NCCL runs them on its own stream); `wait()` on the
  work makes the compute stream wait for it, so prefetch overlaps compute with no host sync.
- The persistent unit (small parameters) is gathered once and all-gathered again after every update.
"""
from __future__ import annotations

from collections import deque
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


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _tensors(obj) -> Iterable[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class UnitWeights:
    def __init__(self, module: torch.nn.Module, layout: FlatLayout, units: List[Unit], *, param_dtype: torch.dtype,
                 comm: Comm, device: torch.device, frozen, zero_config, frozen_layout: Optional[FlatLayout] = None):
        self.module, self.layout, self.units, self.comm, self.device = module, layout, units, comm, device
        # bucket indices: the trainable layout's, then the frozen layout's shifted by `num_trainable`
        self.num_trainable = len(layout.buckets)
        self.buckets = list(layout.buckets) + list(frozen_layout.buckets if frozen_layout else [])
        self.gathered = {u.index: u.buckets + [self.num_trainable + b for b in u.frozen_buckets] for u in units}
        self.param_dtype = param_dtype
        self.sharded = True
        self.overlaps_forward = False
        self.prefetch_numel = int(getattr(zero_config, "prefetch_bucket_size", 50_000_000))
        self.max_live = int(getattr(zero_config, "max_live_parameters", 1_000_000_000))
        self.max_reuse = int(getattr(zero_config, "max_reuse_distance", 1_000_000_000))
        self.unit_of_bucket = {b: u for u, bs in self.gathered.items() for b in bs}
        self.slots_of_unit = {u: [s for b in bs for s in self.buckets[b].slots] for u, bs in self.gathered.items()}
        self.unit_of_param = {s.param: u for u, slots in self.slots_of_unit.items() for s in slots}
        self._frozen_slot = {s.param: s for b in self.buckets[self.num_trainable:] for s in b.slots}
        self._root_unit = next((u.index for u in units if u.module is module), None)
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
        self._order: List[int] = []  # units in this step's forward order
        self._prev_order: List[int] = []
        self._bwd_pos = None
        self._tail: deque = deque()  # units finished in forward and kept for backward, oldest first
        self._ready = [0] * len(units)
        self._saved_hooks = None
        self._depth = 0
        self._handles: List = []
        self._ids: List = []  # ds_id -> parameter
        self._build(frozen)
        self._install_hooks()

    # -- construction --------------------------------------------------------------------------------

    def _build(self, frozen) -> None:
        from .context import full_value, mark_zero3
        with torch.no_grad():
            for b, bucket in enumerate(self.buckets):
                full = torch.zeros(bucket.numel, dtype=torch.float32, device=self.device)
                for s in bucket.slots:
                    full[s.offset - bucket.start:s.offset - bucket.start + s.numel].copy_(full_value(s.param).reshape(-1))
                broadcast_from_first(full, self.comm)
                own = full[bucket.own_start - bucket.start:bucket.own_end - bucket.start].clone()
                if b < self.num_trainable:
                    self._init_masters.append(own)
                self.shards.append(own if self.param_dtype == torch.float32 else own.to(self.param_dtype))
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

    def slots_of_all(self):
        return [s for bucket in self.buckets for s in bucket.slots]

    def _install_hooks(self) -> None:
        root = self.module
        self._handles.append(root.register_forward_pre_hook(self._root_pre))
        self._handles.append(root.register_forward_hook(self._root_post, always_call=True))
        for u in self.units:
            if u.module is not None and u.module is not root:
                self._handles.append(u.module.register_forward_pre_hook(self._unit_pre(u.index)))
                self._handles.append(u.module.register_forward_hook(self._unit_post(u.index), always_call=True))
        for s in self.layout.slots:  # a gradient must never reach a released parameter
            unit = self.unit_of_param[s.param]
            self._handles.append(s.param.register_hook(self._param_grad_hook(unit)))

    def attach(self, reducer) -> None:
        """Release each unit once the reducer has taken all its gradients (see the note above)."""
        reducer.on_bucket_ready = self._bucket_ready

    # -- gather and release --------------------------------------------------------------------------

    def _launch(self, u: int) -> None:
        if u in self._live:
            return
        works = []
        for b in self.gathered[u]:
            full = torch.empty(self.buckets[b].numel, dtype=self.param_dtype, device=self.device)
            works.append(self.comm.all_gather(full, self.shards[b], async_op=True))
            self._full[b] = full
        self._pending[u] = works
        self._live[u] = None
        self.live_numel += self.units[u].numel
        for s in self.slots_of_unit[u]:
            s.param.ds_status = ZeroParamStatus.INFLIGHT

    def ensure(self, u: int) -> None:
        """Unit `u` is gathered and its parameters view the gathered buffers (collective if not yet)."""
        if u not in self._live:
            self._make_room(self.units[u].numel)
            self._launch(u)
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
        self._tail.clear()

    def _make_room(self, numel: int) -> None:
        """Release units kept for reuse, oldest first, while `max_live_parameters` would be exceeded."""
        while self._tail and self.live_numel + numel > self.max_live:
            self.release(self._tail.popleft())

    def _prefetch(self, order: List[int], start: int, step: int) -> None:
        """Launch the gathers of order[start], order[start+step], ... within the prefetch budget."""
        if self.prefetch_numel <= 0:
            return
        budget, i = 0, start
        while 0 <= i < len(order) and budget < self.prefetch_numel:
            v = order[i]
            i += step
            if v in self._live:
                continue
            if self.live_numel + self.units[v].numel > self.max_live:
                break
            self._launch(v)
            budget += self.units[v].numel

    # -- hooks ---------------------------------------------------------------------------------------

    def _root_pre(self, module, args):
        self._depth += 1
        if self._depth > 1:
            return
        if self._root_unit is not None:
            self.ensure(self._root_unit)
        if torch.is_grad_enabled() and not _in_backward():
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._saved_hooks.__enter__()

    def _root_post(self, module, args, output):
        self._depth -= 1
        if self._depth > 0:
            return
        if self._saved_hooks is not None:
            hooks, self._saved_hooks = self._saved_hooks, None
            hooks.__exit__(None, None, None)
        if not torch.is_grad_enabled() and not _in_backward():
            self.release_all()  # nothing will run backward through this forward
            self._order = []

    def _unit_pre(self, u: int):
        def hook(module, args):
            if _in_backward():  # recomputation under activation checkpointing
                self.ensure(u)
                return
            i = len(self._order)
            self._order.append(u)
            self.ensure(u)
            if i < len(self._prev_order) and self._prev_order[i] == u:
                self._prefetch(self._prev_order, i + 1, 1)
        return hook

    def _unit_post(self, u: int):
        def hook(module, args, output):
            if _in_backward():
                return
            if not torch.is_grad_enabled():
                self.release(u)
                return
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(self._output_grad_hook(u))
            self._keep_for_reuse(u)
        return hook

    def _keep_for_reuse(self, u: int) -> None:
        """[Note: ZeRO-3 gather and release] keep the units that finished last while their reuse distance allows."""
        if u in self._tail:
            self._tail.remove(u)
        self._tail.append(u)
        later = 0
        for v in reversed(list(self._tail)):
            if later > self.max_reuse:
                self._tail.remove(v)
                self.release(v)
            later += self.units[v].numel
        self._make_room(0)

    def _output_grad_hook(self, u: int):
        def hook(grad):
            self._pre_backward(u)
            return grad
        return hook

    def _param_grad_hook(self, u: int):
        def hook(grad):
            if u not in self._live or u in self._pending:
                self.ensure(u)
            return grad
        return hook

    def _pre_backward(self, u: int) -> None:
        self.ensure(u)
        order = self._order
        pos = len(order) if self._bwd_pos is None else self._bwd_pos + 1  # a unit may run twice in a row
        for i in range(min(pos, len(order)) - 1, -1, -1):
            if order[i] == u:
                self._bwd_pos = i
                self._prefetch(order, i - 1, -1)
                return

    def _pack(self, t: torch.Tensor):
        if t.device != self.device or not self._storage:
            return t
        b = self._storage.get(t.untyped_storage().data_ptr())
        if b is None:
            return t
        return (b, t.storage_offset(), tuple(t.shape), t.stride())

    def _unpack(self, packed):
        if torch.is_tensor(packed):
            return packed
        b, offset, shape, stride = packed
        self.ensure(self.unit_of_bucket[b])
        return self._full[b].as_strided(shape, stride, offset)

    def _bucket_ready(self, b: int) -> None:
        u = self.unit_of_bucket[b]
        self._ready[u] += 1
        if self._ready[u] == len(self.units[u].buckets):
            self._ready[u] = 0
            if u in self._tail:
                self._tail.remove(u)
            self.release(u)

    # -- the weight-store interface (flat_weights.py) -------------------------------------------------

    def make_masters(self, master_dtype: torch.dtype, aliased: bool) -> List[torch.Tensor]:
        init, self._init_masters = self._init_masters, []
        self.masters = self.shards[:self.num_trainable] if aliased else [m.to(master_dtype) for m in init]
        return self.masters

    def owned(self, b: int) -> torch.Tensor:
        return self.shards[b]

    def publish(self, b: int) -> None:
        """Bucket b's shard was updated: the persistent unit re-gathers it; any other unit is gathered
        from the new shard the next time it is used."""
        u = self.unit_of_bucket[b]
        if self.units[u].persistent:
            self._publishes.append(self.comm.all_gather(self._full[b], self.shards[b], async_op=True))
        elif u in self._live:
            self.release(u)

    def wait(self) -> None:
        publishes, self._publishes = self._publishes, []
        for w in publishes:
            w.wait()

    def fence(self) -> None:
        pass

    def before_backward(self) -> None:
        self._ready = [0] * len(self.units)
        self._bwd_pos = None

    def after_backward(self) -> None:
        """End of a backward: release every gathered unit; this forward's order predicts the next one's."""
        self.release_all()
        self._ready = [0] * len(self.units)
        self._bwd_pos = None
        if self._order:
            self._prev_order, self._order = self._order, []

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
                    self.masters[b].copy_(own)
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
        for h in self._handles:
            h.remove()
        self._handles = []
        self.release_all()
        self._full, self.shards, self.masters = {}, [], []

"""UnitSchedule: when ZeRO-3 gathers and releases each unit (the hooks); UnitWeights (unit_weights.py) does it.

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
from typing import Iterable, List

import torch

__all__ = ["UnitSchedule"]


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


class UnitSchedule:
    """Module, tensor and saved-tensor hooks over a `UnitWeights` store (see the module doc)."""

    def __init__(self, store, zero_config):
        self.store, self.units, self.device = store, store.units, store.device
        self.prefetch_numel = int(getattr(zero_config, "prefetch_bucket_size", 50_000_000))
        self.max_live = int(getattr(zero_config, "max_live_parameters", 1_000_000_000))
        self.max_reuse = int(getattr(zero_config, "max_reuse_distance", 1_000_000_000))
        self._root_unit = next((u.index for u in self.units if u.module is store.module), None)
        self._order: List[int] = []  # units in this step's forward order
        self._prev_order: List[int] = []
        self._bwd_pos = None
        self._tail: deque = deque()  # units finished in forward and kept for backward, oldest first
        self._ready = [0] * len(self.units)
        self._saved_hooks = None
        self._depth = 0
        self._handles: List = []
        self._install_hooks()

    def gather(self, u: int) -> None:
        """`store.ensure(u)`, first releasing units kept for reuse if `max_live_parameters` needs room."""
        if not self.store.is_live(u):
            self._make_room(self.units[u].numel)
        self.store.ensure(u)

    def _install_hooks(self) -> None:
        root = self.store.module
        self._handles.append(root.register_forward_pre_hook(self._root_pre))
        self._handles.append(root.register_forward_hook(self._root_post, always_call=True))
        for u in self.units:
            if u.module is not None and u.module is not root:
                self._handles.append(u.module.register_forward_pre_hook(self._unit_pre(u.index)))
                self._handles.append(u.module.register_forward_hook(self._unit_post(u.index), always_call=True))
        for s in self.store.layout.slots:  # a gradient must never reach a released parameter
            unit = self.store.unit_of_param[s.param]
            self._handles.append(s.param.register_hook(self._param_grad_hook(unit)))

    def _make_room(self, numel: int) -> None:
        """Release units kept for reuse, oldest first, while `max_live_parameters` would be exceeded."""
        while self._tail and self.store.live_numel + numel > self.max_live:
            self.store.release(self._tail.popleft())

    def _prefetch(self, order: List[int], start: int, step: int) -> None:
        """Launch the gathers of order[start], order[start+step], ... within the prefetch budget."""
        if self.prefetch_numel <= 0:
            return
        budget, i = 0, start
        while 0 <= i < len(order) and budget < self.prefetch_numel:
            v = order[i]
            i += step
            if self.store.is_live(v):
                continue
            if self.store.live_numel + self.units[v].numel > self.max_live:
                break
            self.store.launch(v)
            budget += self.units[v].numel

    # -- hooks ---------------------------------------------------------------------------------------

    def _root_pre(self, module, args):
        self._depth += 1
        if self._depth > 1:
            return
        if self._root_unit is not None:
            self.gather(self._root_unit)
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
                self.gather(u)
                return
            i = len(self._order)
            self._order.append(u)
            self.gather(u)
            if i < len(self._prev_order) and self._prev_order[i] == u:
                self._prefetch(self._prev_order, i + 1, 1)
        return hook

    def _unit_post(self, u: int):
        def hook(module, args, output):
            if _in_backward():
                return
            if not torch.is_grad_enabled():
                self.store.release(u)
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
                self.store.release(v)
            later += self.units[v].numel
        self._make_room(0)

    def _output_grad_hook(self, u: int):
        def hook(grad):
            self._pre_backward(u)
            return grad
        return hook

    def _param_grad_hook(self, u: int):
        def hook(grad):
            if not self.store.is_ready(u):
                self.gather(u)
            return grad
        return hook

    def _pre_backward(self, u: int) -> None:
        self.gather(u)
        order = self._order
        pos = len(order) if self._bwd_pos is None else self._bwd_pos + 1  # a unit may run twice in a row
        for i in range(min(pos, len(order)) - 1, -1, -1):
            if order[i] == u:
                self._bwd_pos = i
                self._prefetch(order, i - 1, -1)
                return

    def _pack(self, t: torch.Tensor):
        b = self.store.bucket_of(t) if t.device == self.device else None
        if b is None:
            return t
        return (b, t.storage_offset(), tuple(t.shape), t.stride())

    def _unpack(self, packed):
        if torch.is_tensor(packed):
            return packed
        b, offset, shape, stride = packed
        self.gather(self.store.unit_of_bucket[b])
        return self.store.gathered_buffer(b).as_strided(shape, stride, offset)

    def bucket_ready(self, b: int) -> None:
        """The reducer has taken every gradient of bucket b: release its unit once all its buckets are done."""
        u = self.store.unit_of_bucket[b]
        self._ready[u] += 1
        if self._ready[u] == len(self.units[u].buckets):
            self._ready[u] = 0
            if u in self._tail:
                self._tail.remove(u)
            self.store.release(u)


    def release_all(self) -> None:
        self.store.release_all()
        self._tail.clear()

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

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

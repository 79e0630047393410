"""FlatWeights: the weight store of ZeRO-0/1/2, one flat working buffer that every parameter views.

After broadcasting rank 0's initial weights, every trainable parameter becomes a view of one flat buffer
in `param_dtype` laid out by layout.py. Each rank updates its own chunk of each bucket; `publish(b)`
all-gathers bucket b so every rank has the new weights (nothing to gather when not sharded). Under
`overlap_param_gather` the gathers are left running into the next forward ([Note: param gather overlap]
in param_gather.py); with copy engines the buffer lives in symmetric memory ([Note: copy-engine
collectives] in copy_engine.py).

A weight store answers the optimizer (optimizer.py) these questions, and UnitWeights (unit_weights.py,
ZeRO-3) answers them too: where bucket b's updated chunk goes (`owned(b)`), how the update becomes
visible (`publish(b)`, `wait()`), what the masters start from (`make_masters`).
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from .comm import Comm
from .copy_engine import CopyEngineGather, copy_engines_usable
from .layout import FlatLayout
from .param_gather import ForwardGate

__all__ = ["FlatWeights", "broadcast_from_first"]


def broadcast_from_first(tensor: torch.Tensor, comm: Comm) -> None:
    """Broadcast `tensor` from the group's first rank, in place (no-op on one rank)."""
    if comm.world_size > 1:
        dist.broadcast(tensor, src=dist.get_global_rank(comm.group, 0) if comm.group else 0, group=comm.group)


class FlatWeights:
    def __init__(self, module: torch.nn.Module, layout: FlatLayout, *, param_dtype: torch.dtype, comm: Comm,
                 comm_policy, device: torch.device, frozen):
        self.layout, self.comm, self.device = layout, comm, device
        self.sharded = layout.sharded and comm.world_size > 1
        full = torch.zeros(layout.numel, dtype=torch.float32, device=device)
        with torch.no_grad():
            for s in layout.slots:
                full[s.offset:s.offset + s.numel].copy_(s.param.detach().reshape(-1))
            broadcast_from_first(full, comm)
        # [Note: copy-engine collectives] in copy_engine.py: the working buffer then lives in symmetric memory
        copy_engines = self.sharded and comm_policy.copy_engine_comm and copy_engines_usable(comm, device)
        self.copy_engines = copy_engines
        self.gather_engine = CopyEngineGather(layout.numel, param_dtype, device, comm) if copy_engines else None
        if self.gather_engine is not None:
            self.flat = self.gather_engine.buffer
            self.flat.copy_(full)
        else:
            self.flat = full if param_dtype == torch.float32 else full.to(param_dtype)
        self._full32 = full  # released by make_masters
        with torch.no_grad():
            for s in layout.slots:
                s.param.data = self.flat[s.offset:s.offset + s.numel].view(s.shape)
            for _, p in frozen:
                data = p.data.to(device, param_dtype if p.is_floating_point() else p.dtype)
                broadcast_from_first(data, comm)
                p.data = data
        self._gathers: List = []
        # [Note: param gather overlap] in param_gather.py
        self.gate = (ForwardGate(module, {s.param: s.bucket for s in layout.slots})
                     if self.sharded and comm_policy.overlap_param_gather else None)

    @property
    def overlaps_forward(self) -> bool:
        """Publishing may still run when the step returns (the next forward waits per bucket)."""
        return self.gate is not None

    def make_masters(self, master_dtype: torch.dtype, aliased: bool) -> List[torch.Tensor]:
        """The initial master chunk of every bucket: the owned view of the working buffer itself when
        `aliased` (fp32 everywhere), else an fp32 (`master_dtype`) copy of rank 0's weights."""
        full, self._full32 = self._full32, None
        return [self.flat[b.own_start:b.own_end] if aliased else full[b.own_start:b.own_end].to(master_dtype).clone()
                for b in self.layout.buckets]

    def owned(self, b: int) -> torch.Tensor:
        bucket = self.layout.buckets[b]
        return self.flat[bucket.own_start:bucket.own_end]

    def publish(self, b: int) -> None:
        """Bucket b's owned chunk was updated: all-gather it (asynchronously) when sharded."""
        if not self.sharded:
            return
        bucket = self.layout.buckets[b]
        if self.gather_engine is not None:
            work = self.gather_engine.all_gather(bucket.start, bucket.end)
        else:
            work = self.comm.all_gather(self.flat[bucket.start:bucket.end], self.flat[bucket.own_start:bucket.own_end],
                                        async_op=True)
        if self.gate is not None:
            self.gate.add(b, work)
        else:
            self._gathers.append(work)

    def wait(self) -> None:
        """Every publish so far has landed (a stream dependency on GPU)."""
        gathers, self._gathers = self._gathers, []
        for w in gathers:
            w.wait()
        if self.gate is not None:
            self.gate.wait_all()

    def fence(self) -> None:
        """After a full publish that no gradient reduction follows ([Note: copy-engine collectives])."""
        if self.gather_engine is not None:
            self.gather_engine.fence()

    def before_backward(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def frozen_shard(self, name: str, p):
        """Frozen parameters are whole here: the optimizer's default checkpoint view applies."""
        return None

    @torch.no_grad()
    def load_frozen(self, p, shard) -> None:
        p.copy_(shard.master.view(p.shape))

    def full_state_dict(self, module: torch.nn.Module) -> dict:
        self.wait()
        return module.state_dict()

    def destroy(self) -> None:
        self.wait()
        if self.gate is not None:
            self.gate.remove()
            self.gate = None
        self.flat, self.gather_engine = None, None

"""ShardingStrategy: the one protocol through which the engine holds data parallelism.

The engine never reaches into a strategy (shared/style.md rule 3): it calls the methods below, in this
order within a step, and nothing else.

    before_backward(boundary)      before each micro-step's backward
    after_backward()               after it (flushes gradient reductions, releases gathered weights)
    step(...) -> StepResult        at the accumulation boundary; clears the accumulated gradients
    undo_step()                    a step the device skipped ([Note: device-side skip] in optimizer.py)
    wait_params()                  the module's weights are current (after an overlapped publish)
    checkpoint view                checkpoint_shards / load_checkpoint_shards / scalar_state / load_scalar_state
    full_state_dict()              the module's state dict with every parameter whole (collective)
    destroy()                      remove hooks, free buffers

Stages 0-2 and ZeRO-3 are the same `ZeroOptimizer` (optimizer.py) over different weight stores:
`FlatWeights` (flat_weights.py: every parameter is a view of one flat working buffer) and
`UnitWeights` (unit_weights.py: parameters live as 1/world shards and are gathered per unit).
A new technique (offload, pipeline) is a new implementation of this protocol, not a branch in the engine.
"""
from __future__ import annotations

from typing import Dict, List, Protocol, Sequence

import torch

from ..shard_state import ParamShard, ReadFn

__all__ = ["ShardingStrategy", "StepResult", "DeviceFlag"]


class StepResult:
    """`grad_norm` and `clip_coef` are floats, or 0-dim device tensors ([Note: sync-free step]).
    `overflow` is set when the overflow check ran on the device ([Note: device-side skip]): the step was
    launched as applied, and `overflow.read()` says later whether the device skipped it."""

    __slots__ = ("applied", "grad_norm", "clip_coef", "overflow")

    def __init__(self, applied: bool, grad_norm: float, clip_coef: float = 1.0, overflow=None):
        self.applied, self.grad_norm, self.clip_coef, self.overflow = applied, grad_norm, clip_coef, overflow


class DeviceFlag:
    """A 0-dim bool tensor read later without waiting for work queued after it: on CUDA it is copied
    to pinned memory right away and an event marks the copy, so `read()` waits for that event only
    (a plain `.item()` would wait for everything queued on the stream since, e.g. the next backward)."""

    def __init__(self, flag: torch.Tensor):
        self._event = None
        if flag.is_cuda:
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = flag

    def read(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return bool(self._host)


class ShardingStrategy(Protocol):
    """What the engine needs from data parallelism (see the module doc for the call order)."""

    #: True when ranks hold different parts of the training state (checkpoints need every rank's shards).
    sharded: bool
    #: True when an overflowing step can be skipped by the update kernels themselves.
    skips_on_device: bool

    def before_backward(self, boundary: bool) -> None: ...

    def after_backward(self) -> None: ...

    def step(self, *, loss_scale: float, max_norm: float, check_overflow: bool,
             skip_on_device: bool = False) -> StepResult: ...

    def undo_step(self) -> None: ...

    def wait_params(self) -> None: ...

    def checkpoint_shards(self) -> List[ParamShard]: ...

    def load_checkpoint_shards(self, read: ReadFn, *, load_optimizer_states: bool = True) -> None: ...

    def scalar_state(self) -> List[Dict]: ...

    def load_scalar_state(self, groups: Sequence[Dict]) -> None: ...

    def full_state_dict(self, *, to_cpu: bool = True) -> Dict[str, torch.Tensor]: ...

    def destroy(self) -> None: ...

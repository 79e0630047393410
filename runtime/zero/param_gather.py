"""ForwardGate: the post-step parameter all-gather of ZeRO-1/2, overlapped with the next forward.

[Note: param gather overlap] After the optimizer step each rank holds fresh weights only for the
chunks it owns; the rest arrive by one all-gather per bucket (runtime/zero/optimizer.py). DeepSpeed
waits for all of them before `step()` returns, which leaves the whole gather exposed (reference
deepspeed-runtime.md section 7 #13). With `zero_optimization.overlap_param_gather` the gathers are
launched in forward order (the last bucket holds the first layers) and `step()` returns at once;
each module waits, in a forward pre-hook, only for the buckets holding its own parameters, so the
gather of later layers runs under the compute of earlier ones (Megatron-LM's
`--overlap-param-gather` does the same). Waiting is a stream dependency, not a host sync.

Every other reader is covered by a wait for everything: the root module's forward post-hook,
`state_dict()` of any module, and the engine's own methods (backward, step, checkpoints,
`wait_params()`). What is *not* covered, and why the option is off by default: code that reads a
parameter between `step()` and the next forward through a tensor reference it kept (a hand-written
EMA over a saved `list(model.parameters())`), or a module that reads another module's parameter
before that module runs. Such code must call `engine.wait_params()` first.
"""
from __future__ import annotations

from typing import Dict, List

import torch

__all__ = ["ForwardGate"]


class ForwardGate:
    """Pending per-bucket all-gathers and the module hooks that wait for them."""

    def __init__(self, module: torch.nn.Module, bucket_of: Dict[torch.nn.Parameter, int]):
        self._pending: Dict[int, object] = {}  # bucket index -> work handle
        self._handles: List = []
        for m in module.modules():
            buckets = sorted({bucket_of[p] for p in m._parameters.values() if p is not None and p in bucket_of})
            if buckets:
                self._handles.append(m.register_forward_pre_hook(self._pre_hook(buckets)))
            self._handles.append(m.register_state_dict_pre_hook(lambda *args, **kwargs: self.wait_all()))
        self._handles.append(module.register_forward_hook(lambda *args: self.wait_all()))

    def _pre_hook(self, buckets: List[int]):
        def hook(module, args):
            if self._pending:
                for b in buckets:
                    work = self._pending.pop(b, None)
                    if work is not None:
                        work.wait()
        return hook

    def add(self, bucket: int, work) -> None:
        self._pending[bucket] = work

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def wait_all(self) -> None:
        pending, self._pending = self._pending, {}
        for work in pending.values():
            work.wait()

    def remove(self) -> None:
        self.wait_all()
        for h in self._handles:
            h.remove()
        self._handles = []

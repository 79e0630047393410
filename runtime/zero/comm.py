"""The collectives ZeRO-0/1/2 need, with fallbacks for backends that lack the tensor forms.

`reduce_scatter` and `all_gather` use `torch.distributed`'s single-tensor forms
(`reduce_scatter_single`/`all_gather_single` in torch >= 2.13, `*_tensor` before). Some gloo builds
lack them; the first failure switches that process to all_reduce + slice (reduce-scatter) and
list all_gather (all-gather) for good, which moves more bytes but gives identical results.
`all_to_all` falls back the same way to a list all_gather of every rank's whole input (gloo lacks
16-bit all-to-all).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Comm"]

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Done:
    """A work handle for an operation that already completed (world size 1, fallbacks)."""

    def wait(self):
        return True


class Comm:
    """Collectives over one data-parallel group. Every method returns a work handle to `wait()`."""

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        backend = dist.get_backend(group) if dist.is_initialized() else "none"
        self.in_place_all_gather = backend == "nccl"  # NCCL allows input to alias its chunk of output
        self.native_reduce_scatter = True
        self.native_all_gather = True
        self.native_all_to_all = True

    def _native(self, flag: str, collective, output, input, async_op: bool):
        """Run the tensor-form collective while `flag` holds; on the backend's refusal, clear it for good
        and return None (the caller falls back)."""
        if getattr(self, flag):
            try:
                work = collective(output, input, group=self.group, async_op=async_op)
                return work if async_op else _Done()
            except (RuntimeError, NotImplementedError, ValueError):
                setattr(self, flag, False)
        return None

    def all_reduce(self, tensor: torch.Tensor, *, async_op: bool):
        if self.world_size == 1:
            return _Done()
        work = dist.all_reduce(tensor, group=self.group, async_op=async_op)
        return work if async_op else _Done()

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, *, async_op: bool):
        """Sum `input` over ranks; this rank's chunk lands in `output`. `input` may be clobbered."""
        if self.world_size == 1:
            output.copy_(input)
            return _Done()
        work = self._native("native_reduce_scatter", _reduce_scatter, output, input, async_op)
        if work is not None:
            return work
        dist.all_reduce(input, group=self.group)
        n = output.numel()
        output.copy_(input[self.rank * n:(self.rank + 1) * n])
        return _Done()

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, *, async_op: bool):
        """Concatenate every rank's `input` into `output`; `input` may be a view of its chunk of `output`."""
        if self.world_size == 1:
            if input.data_ptr() != output.data_ptr():
                output.copy_(input)
            return _Done()
        if not self.in_place_all_gather:
            input = input.clone()
        work = self._native("native_all_gather", _all_gather, output, input, async_op)
        if work is not None:
            return work
        dist.all_gather(list(output.chunk(self.world_size)), input, group=self.group)
        return _Done()

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, *, async_op: bool):
        """Equal splits: this rank's r-th chunk of `input` lands in rank r's `output`, at this rank's index."""
        if self.world_size == 1:
            output.copy_(input)
            return _Done()
        work = self._native("native_all_to_all", dist.all_to_all_single, output, input, async_op)
        if work is not None:
            return work
        everything = [torch.empty_like(input) for _ in range(self.world_size)]
        dist.all_gather(everything, input.contiguous(), group=self.group)
        n = input.numel() // self.world_size
        for r, theirs in enumerate(everything):
            output[r * n:(r + 1) * n].copy_(theirs[self.rank * n:(self.rank + 1) * n])
        return _Done()

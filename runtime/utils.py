"""DeepSpeed's `deepspeed.runtime.utils` helpers that training scripts call.

`set_random_seed`, `see_memory_usage`, `clip_grad_norm_`, `RepeatingLoader`, `noop_context`,
`ensure_directory_exists`, `empty_cache`. Device queries go through `dsrun.accelerator`, so the same
script reports CUDA memory on a GPU rank and resident memory on a CPU rank.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import random

import torch
import torch.distributed as dist

__all__ = ["set_random_seed", "see_memory_usage", "clip_grad_norm_", "RepeatingLoader", "noop_context",
           "noop_decorator", "ensure_directory_exists", "empty_cache"]


def set_random_seed(seed: int) -> None:
    """Seed Python's `random`, numpy (when installed) and torch (every device)."""
    random.seed(seed)
    try:
        import numpy
        numpy.random.seed(seed % (2 ** 32))
    except ImportError:
        pass
    torch.manual_seed(seed % (2 ** 63))


def _gib(n: int) -> float:
    return round(n / 1024 ** 3, 2)


def see_memory_usage(message: str, force: bool = False) -> None:
    """Print `message` and the device and host memory in use, on rank 0, when `force` (as DeepSpeed)."""
    if not force or (dist.is_initialized() and dist.get_rank() != 0):
        return
    import psutil

    from dsrun.accelerator import get_accelerator

    gc.collect()
    acc = get_accelerator()
    print(message)
    print(f"MA {_gib(acc.memory_allocated())} GB         Max_MA {_gib(acc.max_memory_allocated())} GB         "
          f"CA {_gib(acc.memory_reserved())} GB         Max_CA {_gib(acc.max_memory_reserved())} GB ")
    vm = psutil.virtual_memory()
    print(f"CPU Virtual Memory:  used = {_gib(vm.total - vm.available)} GB, percent = {vm.percent}%")
    acc.reset_peak_memory_stats()


def clip_grad_norm_(parameters, max_norm, norm_type=2, mpu=None) -> torch.Tensor:
    """Clip the gradients of `parameters` in place to a global norm of `max_norm`; return the norm.

    As DeepSpeed's: the norm is summed (max for inf) over `mpu`'s model-parallel group when given, then
    averaged over all ranks when torch.distributed is initialised (a collective: every rank calls it).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = [p for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    device = parameters[0].grad.device if parameters else torch.device("cpu")
    if not parameters:
        total = torch.zeros((), device=device)
    elif math.isinf(norm_type):
        total = torch.stack([p.grad.detach().abs().max().float() for p in parameters]).max()
        if mpu is not None:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=mpu.get_model_parallel_group())
    else:
        total = torch.stack([p.grad.detach().float().norm(norm_type) for p in parameters]).pow(norm_type).sum()
        if mpu is not None:
            dist.all_reduce(total, group=mpu.get_model_parallel_group())
        total = total.pow(1.0 / norm_type)
    if dist.is_initialized():
        total = total / dist.get_world_size()
        dist.all_reduce(total)
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    for p in parameters:
        p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return total


class RepeatingLoader:
    """Wrap an iterable (a DataLoader) so that iteration restarts at its end instead of stopping."""

    def __init__(self, loader):
        self.loader = loader
        self.data_iter = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            return next(self.data_iter)


def noop_context():
    return contextlib.nullcontext()


def noop_decorator(func):
    return func


def ensure_directory_exists(filename: str) -> None:
    """Create the folder that will hold `filename`."""
    os.makedirs(os.path.dirname(filename) or ".", exist_ok=True)


def empty_cache() -> None:
    from dsrun.accelerator import get_accelerator

    get_accelerator().empty_cache()
    get_accelerator().reset_peak_memory_stats()

"""CPU optimizer offload (`zero_optimization.offload_optimizer: {device: cpu}`): host masters, host step.

With the optimizer offloaded, the fp32 masters of the owned chunks and every optimizer state live in host
memory and the step runs on the CPU; the device keeps only the working (16-bit or fp32) weights and the
reduced gradients. Per bucket, `HostOffloadUpdater` (updater.py's third implementation) copies the owned
gradient chunk into a host buffer, applies the unscale-and-clip coefficient there, runs the CPU step and
copies the updated weights back into the working buffer before publishing the bucket. On a CPU device
the "copies" are aliases or plain copies.

The CPU step is dsrun's fused CPU Adam kernel (kernels/cpu_ops.py) for `CPUAdam`, and also for a client
`torch.optim.Adam`/`AdamW` (same hyperparameters, read from its param groups at every step so a scheduler
still drives it; state kept in torch's layout: 'step', 'exp_avg', 'exp_avg_sq'); `CPUAdagrad` runs the
fused Adagrad kernel; any other optimizer runs its own `step()` on the host masters (one warning: slow).

`host_bytes_needed` / `check_host_budget` are the budget check done before anything is allocated.
"""
from __future__ import annotations

from typing import List

import torch

from dsrun.errors import ConfigError

__all__ = ["host_tensor", "host_bytes_needed", "check_host_budget", "offload_kind", "device_buckets",
           "HOST_STATE_ELEMS"]

# fp32 elements of optimizer state per parameter element, by optimizer kind (host budget)
HOST_STATE_ELEMS = {"adam": 2, "adagrad": 1, "torch": 2}
_PIN_WARNED = []


def host_tensor(t: torch.Tensor, *, pin: bool, dtype=None) -> torch.Tensor:
    """A host copy of `t` (in `dtype`), pinned when `pin` and CUDA exists; if pinning fails, pageable
    memory with one warning per process."""
    out = t.detach().to("cpu", dtype=dtype or t.dtype, copy=True).contiguous()
    if pin and torch.cuda.is_available():
        try:
            return out.pin_memory()
        except RuntimeError as exc:
            if not _PIN_WARNED:
                _PIN_WARNED.append(True)
                from ..log import get_logger
                get_logger().warning("offload_optimizer.pin_memory: pinning host memory failed (%s); using "
                                     "pageable memory (slower copies)", exc)
    return out


def offload_kind(optimizer) -> str:
    """How the host step runs for `optimizer`: 'adam' (fused CPU Adam kernel), 'adagrad' (fused CPU
    Adagrad kernel) or 'torch' (the optimizer's own step on the host masters)."""
    try:
        from dsrun.kernels.cpu_adam import CPUAdagrad, CPUAdam
    except Exception:  # kernels package broken: every optimizer still runs as given
        return "torch"
    if type(optimizer) is CPUAdam:
        return "adam"
    if type(optimizer) is CPUAdagrad:
        return "adagrad"
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        d = optimizer.defaults
        if not (d.get("amsgrad") or d.get("maximize") or d.get("capturable") or d.get("differentiable")):
            return "adam"
    return "torch"


def host_bytes_needed(owned_numel: int, *, local_ranks: int, state_elems: int = 2, param_bytes: int = 4,
                      device_is_host: bool = False, pipelined: bool = False) -> int:
    """Host bytes that optimizer offload allocates on one node: per local rank, fp32 masters
    (4 B/element) and `state_elems` fp32 states; on an accelerator also the copy buffers. With the
    pipelined host step (fused CPU kernels, host_pipeline.py) those are a fixed ring of pinned chunks;
    otherwise (another optimizer's own step) a whole fp32 gradient buffer. `owned_numel` is one rank's
    owned elements (the whole model / data-parallel world size)."""
    per_elem = 4 + 4 * state_elems
    fixed = 0
    if not device_is_host and pipelined:
        from .host_pipeline import ring_bytes
        fixed = ring_bytes(owned_numel, param_bytes)
    elif not device_is_host:
        per_elem += 4
    return (owned_numel * per_elem + fixed) * local_ranks


def check_host_budget(needed: int, available: int, *, local_ranks: int) -> None:
    """ConfigError when `needed` host bytes (all local ranks) exceed `available`."""
    if needed > available:
        gib = 1 << 30
        raise ConfigError(f"optimizer offload needs {needed} bytes ({needed / gib:.2f} GiB) of host memory for "
                          f"{local_ranks} local rank(s), but only {available} bytes ({available / gib:.2f} GiB) "
                          "are available", where="zero_optimization.offload_optimizer.device",
                          hint="use fewer ranks per node, more nodes (more data-parallel ranks), a smaller model, "
                               "or remove offload_optimizer")


def host_masters(masters: List[torch.Tensor], *, pin: bool) -> List[torch.Tensor]:
    """fp32 host copies of the initial masters (pinned per `pin`)."""
    return [host_tensor(m, pin=pin, dtype=torch.float32) for m in masters]


def device_buckets(layout, ratio: float) -> set:
    """[Note: partial offload] The buckets whose masters and optimizer state stay on the accelerator when
    `offload_optimizer.ratio` < 1: as DeepSpeed's stage 3 keeps its first (1 - ratio) sub-groups there,
    the buckets holding the model's first parameters (the highest bucket indices: buckets are laid out in
    backward order), while their elements stay within (1 - ratio) of the model's. Whole-bucket sizes, so
    every rank picks the same buckets (publishing is collective and goes in the same order everywhere)."""
    if ratio >= 1.0:
        return set()
    owned = [(b.index, b.end - b.start) for b in layout.buckets]
    budget = (1.0 - ratio) * sum(n for _, n in owned)
    keep, used = set(), 0
    for b, n in sorted(owned, reverse=True):
        if used + n > budget:
            break
        keep.add(b)
        used += n
    return keep


def check_layout_budget(layout, optimizer, *, device, param_dtype, available=None, local_ranks=None,
                        ratio: float = 1.0) -> None:
    """The budget check for one rank's `layout` (owned elements) and `optimizer`, before allocating:
    all local ranks (LOCAL_WORLD_SIZE) together against psutil's available host memory. With `ratio`
    < 1 only the offloaded buckets count ([Note: partial offload])."""
    import os

    import psutil
    kind = offload_kind(optimizer)
    on_device = device_buckets(layout, ratio) if kind == "adam" and torch.device(device).type != "cpu" else set()
    owned = sum(b.own_end - b.own_start for b in layout.buckets if b.index not in on_device)
    local_ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    available = psutil.virtual_memory().available if available is None else available
    needed = host_bytes_needed(owned, local_ranks=local_ranks, state_elems=HOST_STATE_ELEMS[kind],
                               param_bytes=torch.finfo(param_dtype).bits // 8,
                               device_is_host=torch.device(device).type == "cpu", pipelined=kind != "torch")
    check_host_budget(needed, available, local_ranks=local_ranks)

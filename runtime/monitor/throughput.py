"""What one optimizer step is worth: tokens from the batch shape, FLOPs, device peak, memory in use.

[Note: FLOPs estimate] Training a dense model costs about 6 FLOPs per parameter per token (2 in the
forward, 4 in the backward; Kaplan et al. 2020, the formula torchtitan and Megatron report MFU with).
A batch counts tokens when the module's first positional input (or `input_ids=`) is an integer tensor
of two or more dimensions: its element count is the micro-batch's tokens. Otherwise each sample counts
as one token, which is exact for a plain MLP. `metrics.flops_per_sample` overrides the estimate.
MFU divides the achieved FLOP/s per device by the device's dense bf16/fp16 peak: from the table below,
or `metrics.peak_tflops`; unknown devices (and CPUs) get no MFU.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["count_tokens", "peak_flops", "memory_bytes", "peak_memory_bytes", "PEAK_TFLOPS"]

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H800": 989.0,
    "GH200": 989.0, "B200": 2250.0, "B100": 1750.0, "A100": 312.0, "A800": 312.0, "A10G": 70.0, "A10": 125.0,
    "L40S": 362.0, "L4": 121.0, "V100": 125.0, "MI300X": 1307.0, "MI250X": 383.0,
}


def count_tokens(args, kwargs) -> Optional[int]:
    """Tokens in one forward's inputs, or None when the inputs carry no token dimension."""
    x = kwargs.get("input_ids") if kwargs else None
    if x is None and args:
        x = args[0]
    if torch.is_tensor(x) and x.dim() >= 2 and not x.is_floating_point() and not x.is_complex() \
            and x.dtype != torch.bool:
        return x.numel()
    return None


def peak_flops(device: torch.device, override_tflops: Optional[float] = None) -> Optional[float]:
    """The device's dense peak in FLOP/s, or None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    try:
        name = torch.cuda.get_device_name(device)
    except Exception:  # a query that fails only loses MFU
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_TFLOPS[key] * 1e12
    return None


def memory_bytes(device: torch.device) -> int:
    """Memory in use now: allocated device memory on CUDA (a host-side counter, no sync), else the
    process's resident set size."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    import psutil
    return psutil.Process().memory_info().rss


def peak_memory_bytes(device: torch.device) -> int:
    """Peak of `memory_bytes`: CUDA's peak allocation, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux

"""Casting a module's floating buffers to `PrecisionPolicy.buffer_dtype` (`data_types.buffer_dtype`).

DeepSpeed 0.19 casts parameters to the fp16/bf16 working dtype and keeps buffers as loaded (an fp32
rotary `inv_freq` stays fp32) unless `data_types.buffer_dtype` names a dtype; then every floating
buffer is cast to it. A BatchNorm model under fp16/bf16 needs that: its running statistics must match
its 16-bit weights. Parameters are cast by the sharding layer, which owns the flat working weights.
"""
from __future__ import annotations

import torch

__all__ = ["cast_buffers"]


def cast_buffers(module: torch.nn.Module, precision) -> int:
    """Cast `module`'s floating buffers to `precision.buffer_dtype` in place (no-op when it is None).

    Returns the number of buffers cast. Integer buffers (BatchNorm's `num_batches_tracked`) stay.
    """
    if precision.buffer_dtype is None:
        return 0
    from dsrun.runtime.config.policies import torch_dtype

    dtype = torch_dtype(precision.buffer_dtype)
    cast = 0
    with torch.no_grad():
        for buf in module.buffers():
            if buf.is_floating_point() and buf.dtype != dtype:
                buf.data = buf.data.to(dtype)
                cast += 1
    return cast

"""Mixed precision: loss scaling and working-weight casting.

The roles of each dtype come from `PrecisionPolicy` (runtime/config/policies.py). fp32 master weights
and fp32 gradient accumulation live in the sharding layer (runtime/zero/), which owns the flat
buffers; this package decides scales and casts.
"""
from .loss_scaler import (DynamicLossScaler, LossScaleAtMinimum, LossScaler, StaticLossScaler,  # noqa: F401
                          build_loss_scaler)
from .cast import cast_buffers  # noqa: F401

__all__ = ["LossScaler", "StaticLossScaler", "DynamicLossScaler", "LossScaleAtMinimum", "build_loss_scaler",
           "checks_overflow", "cast_buffers"]


def checks_overflow(precision, *, bf16_check: bool = True) -> bool:
    """Whether a non-finite gradient norm skips the step: fp16 always, bf16 when `bf16.check_grad_overflow`
    (default true, as DeepSpeed), fp32 never (DeepSpeed applies such a step; we follow it)."""
    if precision.param_dtype == "fp16":
        return True
    if precision.param_dtype == "bf16":
        return bf16_check
    return False

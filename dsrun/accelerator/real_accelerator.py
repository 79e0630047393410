"""Choosing this process's accelerator (see the package docstring)."""
from __future__ import annotations

import os
from typing import Optional

from .abstract_accelerator import DeepSpeedAccelerator

__all__ = ["get_accelerator", "set_accelerator", "is_current_accelerator_supported", "SUPPORTED_ACCELERATOR_LIST"]

SUPPORTED_ACCELERATOR_LIST = ["cuda", "cpu"]

_current: Optional[DeepSpeedAccelerator] = None


def _detect() -> DeepSpeedAccelerator:
    name = os.environ.get("DS_ACCELERATOR", "").strip().lower()
    if name and name not in SUPPORTED_ACCELERATOR_LIST:
        raise ValueError(f"DS_ACCELERATOR={name!r} is not supported by dsrun; use one of "
                         f"{', '.join(SUPPORTED_ACCELERATOR_LIST)}")
    import torch

    if name == "cuda" or (not name and torch.cuda.is_available()):
        from .cuda_accelerator import CUDA_Accelerator
        return CUDA_Accelerator()
    from .cpu_accelerator import CPU_Accelerator
    return CPU_Accelerator()


def get_accelerator() -> DeepSpeedAccelerator:
    """The accelerator of this process, chosen once (CUDA if available, else CPU; `DS_ACCELERATOR` overrides)."""
    global _current
    if _current is None:
        _current = _detect()
    return _current


def set_accelerator(accel_obj: DeepSpeedAccelerator) -> None:
    global _current
    _current = accel_obj


def is_current_accelerator_supported() -> bool:
    return get_accelerator().device_name() in SUPPORTED_ACCELERATOR_LIST

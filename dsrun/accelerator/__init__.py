"""`dsrun.accelerator`: DeepSpeed's accelerator abstraction, for CUDA and CPU.

    from dsrun.accelerator import get_accelerator
    device = get_accelerator().current_device_name()   # "cuda:0" on a GPU rank, "cpu" otherwise

`get_accelerator()` picks CUDA when torch sees a GPU, else CPU; `DS_ACCELERATOR=cuda|cpu` forces one
(as in DeepSpeed). `set_accelerator(acc)` replaces the choice for this process.
"""
from .abstract_accelerator import DeepSpeedAccelerator
from .real_accelerator import get_accelerator, is_current_accelerator_supported, set_accelerator

__all__ = ["get_accelerator", "set_accelerator", "is_current_accelerator_supported", "DeepSpeedAccelerator"]

"""`dsrun.checkpoint`: DeepSpeed's `deepspeed.checkpoint` helpers that scripts import (`utils`)."""
from . import utils  # noqa: F401
from .utils import clone_tensors_for_torch_save

__all__ = ["utils", "clone_tensors_for_torch_save"]

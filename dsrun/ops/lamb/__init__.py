"""`dsrun.ops.lamb`: DeepSpeed's `FusedLamb`, which is dsrun's Lamb (runtime/lamb.py, PyTorch ops)."""
from dsrun.runtime.lamb import Lamb as FusedLamb

__all__ = ["FusedLamb"]

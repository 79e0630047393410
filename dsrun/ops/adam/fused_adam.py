"""`FusedAdam` (GPU multi-tensor Adam/AdamW; PyTorch fallback on CPU): dsrun.kernels.FusedAdam."""
from dsrun.kernels import FusedAdam

__all__ = ["FusedAdam"]

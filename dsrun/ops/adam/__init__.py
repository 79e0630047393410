"""`dsrun.ops.adam`: DeepSpeed's Adam optimizers, which are dsrun's kernels (`dsrun.kernels`)."""
from .cpu_adam import DeepSpeedCPUAdam
from .fused_adam import FusedAdam

__all__ = ["FusedAdam", "DeepSpeedCPUAdam"]

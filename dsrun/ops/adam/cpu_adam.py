"""`DeepSpeedCPUAdam` (SIMD Adam on CPU tensors): dsrun.kernels.CPUAdam under DeepSpeed's name."""
from dsrun.kernels import CPUAdam as DeepSpeedCPUAdam

__all__ = ["DeepSpeedCPUAdam"]

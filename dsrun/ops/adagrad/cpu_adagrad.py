"""`DeepSpeedCPUAdagrad`: dsrun.kernels.CPUAdagrad under DeepSpeed's name."""
from dsrun.kernels import CPUAdagrad as DeepSpeedCPUAdagrad

__all__ = ["DeepSpeedCPUAdagrad"]

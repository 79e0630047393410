"""`dsrun.ops.adagrad`: DeepSpeed's `DeepSpeedCPUAdagrad`, which is dsrun.kernels.CPUAdagrad."""
from .cpu_adagrad import DeepSpeedCPUAdagrad

__all__ = ["DeepSpeedCPUAdagrad"]

"""`dsrun.ops`: DeepSpeed's `deepspeed.ops` names over dsrun's kernels (`dsrun.kernels`).

`ops.adam` (FusedAdam, DeepSpeedCPUAdam), `ops.adagrad` (DeepSpeedCPUAdagrad), `ops.lamb` (FusedLamb),
`ops.lion` (not implemented: constructing one raises), `ops.op_builder` (the *Builder names), and
`__compatible_ops__` (op name -> whether dsrun can run it on this machine).
"""
from . import adagrad, adam, lamb, lion, op_builder  # noqa: F401
from .op_builder import compatible_ops as __compatible_ops__  # noqa: F401

__all__ = ["adam", "adagrad", "lamb", "lion", "op_builder"]

"""ZeRO data parallelism (stages 0-2 now; ZeRO-3 entry points are documented no-ops).

`apply_sharding` is the one entry point the engine uses: given the model, its optimizer and the
policies, it returns a `ZeroOptimizer` that owns flat buffers, gradient hooks and the step.
"""
from __future__ import annotations

from .comm import Comm
from .context import GatheredParameters, Init, register_external_parameter
from .optimizer import StepResult, ZeroOptimizer

__all__ = ["Init", "GatheredParameters", "register_external_parameter", "apply_sharding", "ZeroOptimizer",
           "StepResult", "Comm"]


def apply_sharding(module, *, optimizer, sharding, precision, comm_policy, group, device, dtype_of,
                   accumulation_steps: int = 1) -> ZeroOptimizer:
    """Flatten `module`'s trainable parameters and shard optimizer state/gradients per `sharding`.

    Args:
        module: the model, already on `device`.
        optimizer: a torch optimizer over (a subset of) the module's parameters; rewired in place.
        sharding: `ShardingPolicy` (optimizer_state, gradients; parameters is rejected upstream).
        precision: `PrecisionPolicy` (working, master, accumulation and reduction dtypes).
        comm_policy: `CommPolicy` (bucket sizes, overlap, mean/sum).
        group: the data-parallel process group (None = world).
        device: where buffers live.
        dtype_of: maps a dtype name ("fp32", "bf16", "fp16") to a torch dtype.
        accumulation_steps: gradient accumulation steps (1 lets ZeRO-1 skip its full gradient buffer).
    """
    return ZeroOptimizer(module, optimizer, sharding=sharding, precision=precision, comm_policy=comm_policy,
                         comm=Comm(group), device=device, dtype_of=dtype_of, accumulation_steps=accumulation_steps)

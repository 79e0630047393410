"""ZeRO data parallelism, stages 0-3, behind one `ShardingStrategy` (strategy.py).

`build_strategy` is the one entry point the engine's composition (runtime/compose.py) uses: given the
model, its optimizer and the policies, it returns a `ZeroOptimizer` over the weight store the sharding
policy asks for (flat_weights.py for stages 0-2; unit_weights.py when parameters are sharded).
"""
from __future__ import annotations

from .comm import Comm
from .context import GatheredParameters, Init, register_external_parameter
from .optimizer import OVERLAP_BUCKET_NUMEL, StepResult, ZeroOptimizer, optimizer_groups
from .strategy import ShardingStrategy

__all__ = ["Init", "GatheredParameters", "register_external_parameter", "build_strategy", "ZeroOptimizer",
           "ShardingStrategy", "StepResult", "Comm"]


def build_strategy(module, *, optimizer, sharding, precision, comm_policy, group, device, dtype_of,
                   accumulation_steps: int = 1, zero_config=None, offload=None) -> ZeroOptimizer:
    """Lay out `module`'s trainable parameters and shard them per `sharding`.

    Args:
        module: the model; on `device` already unless parameters are sharded (then its parameters stay
            where they are and only shards move to `device`).
        optimizer: a torch optimizer over (a subset of) the module's parameters; rewired in place.
        sharding: `ShardingPolicy` (optimizer_state, gradients, parameters).
        precision: `PrecisionPolicy` (working, master, accumulation and reduction dtypes).
        comm_policy: `CommPolicy` (bucket sizes, overlap, mean/sum).
        group: the data-parallel process group (None = world).
        device: where buffers live.
        dtype_of: maps a dtype name ("fp32", "bf16", "fp16") to a torch dtype.
        accumulation_steps: gradient accumulation steps (1 lets ZeRO-1 skip its full gradient buffer).
        zero_config: the `zero_optimization` section (ZeRO-3's unit, prefetch and persistence keys).
        offload: `OffloadPolicy`; optimizer offload to the CPU keeps masters and optimizer state in host
            memory and steps there (offload.py), after checking the host has room for them; to NVMe
            keeps them in files between their buckets' steps (nvme.py), after checking the disk.
    """
    from .reducer import GradReducer
    comm = Comm(group)
    groups, frozen = optimizer_groups(module, optimizer)
    param_dtype = dtype_of(precision.param_dtype)
    if sharding.parameters:
        from .unit_weights import UnitWeights
        from .units import build_unit_layout
        layout, frozen_layout, units = build_unit_layout(module, groups, frozen=frozen, zero_config=zero_config,
                                                         world_size=comm.world_size, rank=comm.rank)
        host_shards = offload is not None and offload.params.value != "none"  # [Note: parameter offload]
        weights = UnitWeights(module, layout, units, param_dtype=param_dtype, comm=comm, device=device,
                              frozen=frozen, zero_config=zero_config, frozen_layout=frozen_layout,
                              host_shards=host_shards, pin=host_shards and offload.pin_memory,
                              swapped=offload is not None and offload.params.value == "nvme")
        copy_engines = False
    else:
        from .flat_weights import FlatWeights
        from .layout import build_layout
        layout = build_layout(groups, bucket_numel=min(comm_policy.reduce_bucket_size, comm_policy.allgather_bucket_size,
                                                       OVERLAP_BUCKET_NUMEL),
                              world_size=comm.world_size, rank=comm.rank, sharded=sharding.optimizer_state)
        weights = FlatWeights(module, layout, param_dtype=param_dtype, comm=comm, comm_policy=comm_policy,
                              device=device, frozen=frozen)
        copy_engines = weights.copy_engines
    reducer = GradReducer(layout, comm=comm, sharding=sharding, precision=precision, comm_policy=comm_policy,
                          device=device, dtype_of=dtype_of, accumulation_steps=accumulation_steps,
                          copy_engines=copy_engines, transient=sharding.parameters)
    if sharding.parameters:
        weights.attach(reducer)
    offload_pin, offload_ratio, nvme = None, 1.0, None
    if offload is not None and offload.optimizer.value == "cpu":
        from .offload import check_layout_budget
        offload_ratio = offload.ratio
        check_layout_budget(layout, optimizer, device=device, param_dtype=param_dtype, ratio=offload_ratio)
        offload_pin = offload.pin_memory
    elif offload is not None and offload.optimizer.value == "nvme":
        import torch.distributed as dist

        from .nvme import nvme_optimizer_offload
        nvme = nvme_optimizer_offload(layout, optimizer, policy=offload, device=device, param_dtype=param_dtype,
                                      rank=dist.get_rank() if dist.is_initialized() else 0)
        offload_pin = offload.pin_memory
    return ZeroOptimizer(module, optimizer, layout=layout, weights=weights, reducer=reducer, comm=comm,
                         precision=precision, dtype_of=dtype_of, frozen=frozen, offload_pin=offload_pin,
                         offload_ratio=offload_ratio, nvme=nvme)

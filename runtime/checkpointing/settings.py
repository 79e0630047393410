"""`configure`: the process-wide activation-checkpointing settings, from the `activation_checkpointing`
config section and/or explicit arguments (explicit arguments win), as DeepSpeed's
`deepspeed.checkpointing.configure`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from dsrun.errors import ConfigError

__all__ = ["Settings", "SETTINGS", "configure", "is_configured", "reset"]


@dataclass
class Settings:
    """What `checkpoint` applies. `mpu` (Megatron-style: `get_model_parallel_rank/world_size/group`)
    is used by `partition_activations` and `model_parallel_cuda_manual_seed`."""

    mpu: Any = None
    partition_activations: bool = False
    contiguous_memory_optimization: bool = False
    number_checkpoints: Optional[int] = None
    cpu_checkpointing: bool = False
    synchronize: bool = False
    profile: bool = False
    configured: bool = False

    def model_parallel_world_size(self) -> int:
        return self.mpu.get_model_parallel_world_size() if self.mpu is not None else 1

    def partitions(self) -> bool:
        """Whether saved inputs are really split: partition_activations with more than one model-parallel
        rank. With no mpu, or a model-parallel world of 1, partitioning is a no-op."""
        return self.partition_activations and self.model_parallel_world_size() > 1


SETTINGS = Settings()


def configure(mpu_, deepspeed_config=None, partition_activations=None, contiguous_checkpointing=None,
              num_checkpoints=None, checkpoint_in_cpu=None, synchronize=None, profile=None) -> None:
    """Configure activation checkpointing for this process.

    Args:
        mpu_: a model-parallel unit, or None (no model parallelism).
        deepspeed_config: a config dict / path / DsConfig; its `activation_checkpointing` section gives the
            defaults for the arguments below.
        partition_activations, contiguous_checkpointing, num_checkpoints, checkpoint_in_cpu, synchronize,
            profile: override the section's `partition_activations`, `contiguous_memory_optimization`,
            `number_checkpoints`, `cpu_checkpointing`, `synchronize_checkpoint_boundary`, `profile`.

    Raises:
        ConfigError: contiguous memory optimisation without `partition_activations` or without
            `number_checkpoints` (DeepSpeed asserts the same).
    """
    new = Settings(mpu=mpu_, configured=True)
    if deepspeed_config is not None:
        from dsrun.runtime.config import load_config
        section = load_config(deepspeed_config).activation_checkpointing
        new = replace(new, partition_activations=section.partition_activations,
                      contiguous_memory_optimization=section.contiguous_memory_optimization,
                      number_checkpoints=section.number_checkpoints, cpu_checkpointing=section.cpu_checkpointing,
                      synchronize=section.synchronize_checkpoint_boundary, profile=section.profile)
    overrides = {"partition_activations": partition_activations,
                 "contiguous_memory_optimization": contiguous_checkpointing,
                 "number_checkpoints": num_checkpoints, "cpu_checkpointing": checkpoint_in_cpu,
                 "synchronize": synchronize, "profile": profile}
    new = replace(new, **{k: v for k, v in overrides.items() if v is not None})
    if new.contiguous_memory_optimization and not new.partition_activations:
        raise ConfigError("contiguous_memory_optimization requires partition_activations",
                          where="activation_checkpointing.contiguous_memory_optimization")
    if new.contiguous_memory_optimization and new.number_checkpoints is None:
        raise ConfigError("contiguous_memory_optimization requires number_checkpoints",
                          where="activation_checkpointing.number_checkpoints")
    for name, value in vars(new).items():
        setattr(SETTINGS, name, value)


def is_configured() -> bool:
    """True once `configure` has been called (and until `reset`)."""
    return SETTINGS.configured


def reset() -> None:
    """Forget the configuration and the profile counters: `checkpoint` behaves as unconfigured (plain
    recompute, no partitioning, no CPU copies). DeepSpeed's `reset` frees its contiguous buffers; dsrun
    keeps no such buffers (see docs/pipeline.md), so this is the whole state there is."""
    for name, value in vars(Settings()).items():
        setattr(SETTINGS, name, value)
    from . import function
    function.PROFILE.clear()

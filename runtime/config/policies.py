"""Policies: what the rest of the runtime receives instead of stage numbers (shared/style.md rule 2).

`zero_optimization.stage`, `fp16`/`bf16`, `communication_data_type` and the offload sections are
resolved once, by the config layer, into these small frozen objects. Components take the policy they
need; nothing outside `runtime/config/` compares a stage number. Dtypes are names ("fp32", "bf16",
"fp16") so that config stays torch-free; `torch_dtype()` maps them at the edge.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

__all__ = ["Device", "ShardingPolicy", "OffloadPolicy", "AioPolicy", "LossScalePolicy", "PrecisionPolicy", "CommPolicy",
           "torch_dtype", "DTYPES"]

DTYPES = ("fp32", "fp16", "bf16")


class Device(str, Enum):
    NONE = "none"
    CPU = "cpu"
    NVME = "nvme"


@dataclass(frozen=True)
class ShardingPolicy:
    """What is partitioned across the data-parallel group."""

    optimizer_state: bool = False
    gradients: bool = False
    parameters: bool = False

    @classmethod
    def from_stage(cls, stage: int) -> "ShardingPolicy":
        return cls(optimizer_state=stage >= 1, gradients=stage >= 2, parameters=stage >= 3)

    @property
    def any(self) -> bool:
        return self.optimizer_state or self.gradients or self.parameters


@dataclass(frozen=True)
class OffloadPolicy:
    """Where optimizer state and parameters live when they are not in use."""

    optimizer: Device = Device.NONE
    params: Device = Device.NONE
    nvme_path: Optional[str] = None  # for whichever of the two is on nvme
    pin_memory: bool = False
    ratio: float = 1.0  # fraction of optimizer state offloaded (offload_optimizer.ratio)
    buffer_count: int = 4
    buffer_size: int = 100_000_000
    aio: "AioPolicy" = None  # NVMe I/O settings (the `aio` section); None -> AioPolicy()

    @property
    def io(self) -> "AioPolicy":
        return self.aio or AioPolicy()


@dataclass(frozen=True)
class AioPolicy:
    """DeepSpeed's `aio` section as dsrun's swapper uses it (runtime/zero/swap.py [Note: swap I/O])."""

    block_size: int = 1 << 20  # bytes per read or write call
    queue_depth: int = 8  # calls in flight per thread_count
    thread_count: int = 1
    overlap_events: bool = True  # prefetch the next bucket while one steps


@dataclass(frozen=True)
class LossScalePolicy:
    """fp16 loss scaling: a static scale, or dynamic with DeepSpeed's knobs."""

    dynamic: bool = True
    static_scale: float = 1.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0


@dataclass(frozen=True)
class PrecisionPolicy:
    """Dtypes of each role. fp16/bf16 keep fp32 master weights; bf16 accumulates and reduces in fp32 by
    default (a deliberate fix of DeepSpeed, reference deepspeed-runtime.md section 7 #22)."""

    param_dtype: str = "fp32"  # the module's working weights (forward/backward compute)
    master_dtype: str = "fp32"  # what the optimizer updates
    grad_accum_dtype: str = "fp32"  # gradients accumulated across micro-steps (= master_dtype: they are its .grad)
    reduce_dtype: str = "fp32"  # gradients on the wire (communication_data_type)
    loss_scale: Optional[LossScalePolicy] = None  # fp16 only
    buffer_dtype: Optional[str] = None  # floating module buffers are cast to it; None keeps them as loaded

    @property
    def mixed(self) -> bool:
        return self.param_dtype != self.master_dtype


@dataclass(frozen=True)
class CommPolicy:
    """Gradient and parameter communication knobs (sizes in elements, as DeepSpeed)."""

    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    overlap_param_gather: bool = False  # dsrun: post-step all-gather under the next forward (stages 1-2)
    copy_engine_comm: bool = True  # dsrun: gathers and 16-bit gradient all-to-alls by copy engines (one node)
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    allreduce_op: str = "mean"  # gradient_allreduce_op: "mean" | "sum"
    prescale_gradients: bool = False
    gradient_predivide_factor: float = 1.0


def torch_dtype(name: str):
    """Map a dtype name to the torch dtype (imports torch lazily)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]

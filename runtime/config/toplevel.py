"""The top level of a DeepSpeed config: every key DeepSpeed recognises (reference section 1), typed.

Core keys are typed sections or scalars. The "other recognised top-level keys" of reference 1.14
(`elasticity`, `compile`, `tensor_parallel`, ...) are accepted as plain objects and kept verbatim in
`DsConfig.raw` so that real DeepSpeed configs load; dsrun does not act on them, and says so once when
one is switched on ([Note: inert keys] in schema.py). Anything else is an error with a did-you-mean.

`steps_per_print` accepts infinity (`Infinity` in JSON or hjson, `"inf"`): Accelerate writes it to
mean "never", which is `None` here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from dsrun.errors import ConfigError

from .optim import OptimizerConfig, SchedulerConfig
from .precision import BF16Config, DataTypesConfig, FP16Config, TorchAutocastConfig
from .schema import ParseContext, Section, join, opt, warn_deprecated
from .sections import (ActivationCheckpointingConfig, AioConfig, CheckpointConfig, CometConfig, CommsLoggerConfig,
                       CSVMonitorConfig, FlopsProfilerConfig, HangWatchdogConfig, MetricsConfig, PipelineConfig,
                       TensorBoardConfig, WandbConfig)
from .zero import ZeroConfig

__all__ = ["TopLevelConfig", "PASSTHROUGH_KEYS"]

# Reference 1.14: recognised, stored verbatim, not acted on by dsrun.
PASSTHROUGH_KEYS = ("amp", "graph_harvesting", "eigenvalue", "quantize_training", "progressive_layer_drop",
                    "sparse_attention", "data_efficiency", "curriculum_learning", "compression_training",
                    "elasticity", "autotuning", "hybrid_engine", "compile", "tensor_parallel", "expert_parallel",
                    "weight_quantization", "nebula", "datastates", "timers")

_COMM_DTYPES = ("fp16", "bf16", "fp32")

# Why dsrun ignores a key ([Note: inert keys] in schema.py).
_FEATURE = "a DeepSpeed feature dsrun does not implement"
_NO_PARALLEL = "dsrun has data parallelism only: no sequence, tensor or expert parallel groups"


def _positive_or_none(value, where):
    if value is not None and value <= 0:
        raise ConfigError(f"must be > 0, got {value}", where=where)
    return value


def _non_negative(value, where):
    if value < 0:
        raise ConfigError(f"must be >= 0 (0 disables), got {value}", where=where)
    return value


@dataclass(frozen=True)
class TopLevelConfig(Section):
    # batch triple (reference 1.2); resolved by batch.py
    train_batch_size: Optional[int] = opt(None, check=_positive_or_none)
    train_micro_batch_size_per_gpu: Optional[int] = opt(None, check=_positive_or_none)
    gradient_accumulation_steps: Optional[int] = opt(None, check=_positive_or_none)
    managed_gradient_accumulation: bool = opt(True, inert="step() always applies the optimizer at the "
                                                           "gradient_accumulation_steps boundary")
    # sections
    optimizer: Optional[OptimizerConfig] = opt(None)
    scheduler: Optional[SchedulerConfig] = opt(None)
    fp16: FP16Config = opt(factory=FP16Config)
    bf16: BF16Config = opt(factory=BF16Config, aliases=("bfloat16",))
    data_types: DataTypesConfig = opt(factory=DataTypesConfig)
    torch_autocast: TorchAutocastConfig = opt(factory=TorchAutocastConfig,
                                              inert="use the fp16 or bf16 section for mixed precision")
    zero_optimization: ZeroConfig = opt(factory=ZeroConfig)
    activation_checkpointing: ActivationCheckpointingConfig = opt(factory=ActivationCheckpointingConfig)
    pipeline: PipelineConfig = opt(factory=PipelineConfig)
    checkpoint: CheckpointConfig = opt(factory=CheckpointConfig)
    tensorboard: TensorBoardConfig = opt(factory=TensorBoardConfig)
    csv_monitor: CSVMonitorConfig = opt(factory=CSVMonitorConfig)
    wandb: WandbConfig = opt(factory=WandbConfig)
    comet: CometConfig = opt(factory=CometConfig)
    flops_profiler: FlopsProfilerConfig = opt(factory=FlopsProfilerConfig, inert=_FEATURE)
    comms_logger: CommsLoggerConfig = opt(factory=CommsLoggerConfig)  # runtime/monitor/comms_logger.py
    aio: AioConfig = opt(factory=AioConfig)  # NVMe offload's I/O (runtime/zero/swap.py)
    # dsrun's own (docs/monitoring.md): the metrics folder and the hang watchdog
    metrics: MetricsConfig = opt(factory=MetricsConfig)
    hang_watchdog: HangWatchdogConfig = opt(factory=HangWatchdogConfig)
    # gradients and communication (reference 1.7)
    gradient_clipping: float = opt(1.0, check=_non_negative)
    communication_data_type: Optional[str] = opt(None, choices=_COMM_DTYPES)
    seq_parallel_communication_data_type: str = opt("fp32", choices=_COMM_DTYPES, inert=_NO_PARALLEL)
    prescale_gradients: bool = opt(False)
    gradient_predivide_factor: float = opt(1.0)
    gradient_allreduce_op: str = opt("mean", choices=("mean", "sum"))
    sparse_gradients: bool = opt(False, inert="gradients are always reduced dense")
    disable_allgather: bool = opt(False, inert="a legacy DeepSpeed switch")
    zero_allow_untested_optimizer: bool = opt(False)
    zero_force_ds_cpu_optimizer: bool = opt(True)
    # logging (reference 1.12)
    steps_per_print: Optional[int] = opt(None)
    wall_clock_breakdown: bool = opt(False)
    memory_breakdown: bool = opt(False, inert=_FEATURE)
    dump_state: bool = opt(False, inert=_FEATURE)
    log_level: Optional[str] = opt(None)
    # misc (reference 1.14)
    dataloader_drop_last: bool = opt(False)
    vocabulary_size: Optional[int] = opt(None, inert="DeepSpeed only checks it is a multiple of 8")
    sequence_parallel_size: Optional[int] = opt(None, check=_positive_or_none, inert=_NO_PARALLEL)
    data_parallel_size: Optional[int] = opt(None, check=_positive_or_none, inert=_NO_PARALLEL)
    use_data_before_expert_parallelism: bool = opt(False, inert=_NO_PARALLEL)
    # passthrough sections (reference 1.14)
    amp: Optional[Dict[str, Any]] = opt(None, inert="Apex AMP; use the fp16 or bf16 section")
    graph_harvesting: Any = opt(None, inert=_FEATURE)
    eigenvalue: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    quantize_training: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    progressive_layer_drop: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    sparse_attention: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    data_efficiency: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    curriculum_learning: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    compression_training: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    elasticity: Optional[Dict[str, Any]] = opt(None)
    autotuning: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    hybrid_engine: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    compile: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    tensor_parallel: Optional[Dict[str, Any]] = opt(None, inert=_NO_PARALLEL)
    expert_parallel: Optional[Dict[str, Any]] = opt(None, inert=_NO_PARALLEL)
    weight_quantization: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    nebula: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    datastates: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)
    timers: Optional[Dict[str, Any]] = opt(None, inert=_FEATURE)

    _REMOVED = {
        "deepscale_config": "pass the config file with --deepspeed_config",
    }
    # accepted by DeepSpeed, which never reads them ([Note: inert keys] in schema.py)
    _INERT = {
        "cuda_visible_devices": "the launcher's --include/--num_gpus or CUDA_VISIBLE_DEVICES choose the devices",
    }

    @classmethod
    def _before(cls, data: Dict[str, Any], where: str, ctx: ParseContext) -> Dict[str, Any]:
        zero = data.get("zero_optimization")
        if isinstance(zero, bool):
            warn_deprecated("zero_optimization: 'true/false' is deprecated; use zero_optimization: {stage: N}")
            data["zero_optimization"] = {"stage": 1 if zero else 0}
        for key in ("zero_optimization", "fp16", "bf16", "bfloat16", "checkpoint", "pipeline",
                    "activation_checkpointing", "data_types"):
            if key in data and data[key] is None:
                del data[key]  # `null` section = defaults, as DeepSpeed's dict.get/pydantic do
        if _is_infinite(data.get("steps_per_print")):
            data["steps_per_print"] = None  # Accelerate's "never"
        elastic = data.get("elasticity")
        if isinstance(elastic, dict) and elastic.get("enabled"):
            raise ConfigError("elastic training is not supported by dsrun", where=join(where, "elasticity.enabled"),
                              hint="set elasticity.enabled to false and give the batch sizes explicitly")
        return data


def _is_infinite(value) -> bool:
    if isinstance(value, float):
        return math.isinf(value) and value > 0
    # hjson reads a bare `Infinity,` as the string "Infinity," (a quoteless string runs to the line's end)
    return isinstance(value, str) and value.strip().rstrip(",").strip().lower() in ("inf", "+inf", "infinity",
                                                                                    "+infinity")

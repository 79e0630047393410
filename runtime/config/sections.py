"""The smaller sections: `checkpoint`, `activation_checkpointing`, `pipeline`, monitors (`tensorboard`,
`csv_monitor`, `wandb`, `comet`), `flops_profiler`, `comms_logger`, `aio` (reference 1.9-1.13), and dsrun's
own `metrics` and `hang_watchdog` (docs/monitoring.md).

DeepSpeed reads several of these with `dict.get` and ignores unknown keys; dsrun is strict everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Union

from .schema import Section, non_negative, opt

__all__ = ["CheckpointConfig", "ParallelWriteConfig", "CheckpointWriterConfig", "ActivationCheckpointingConfig",
           "PipelineConfig", "TensorBoardConfig", "CSVMonitorConfig", "WandbConfig", "CometConfig",
           "FlopsProfilerConfig", "CommsLoggerConfig", "AioConfig", "MetricsConfig", "HangWatchdogConfig"]


@dataclass(frozen=True)
class ParallelWriteConfig(Section):
    pipeline_stage: bool = opt(False)


@dataclass(frozen=True)
class CheckpointWriterConfig(Section):
    type: str = opt("fast", choices=("mock", "python", "fast"))
    decoupled: bool = opt(False)
    io_buffer_size: int = opt(64 * 1024 * 1024)
    io_buffer_double: bool = opt(True)
    show_statistics: bool = opt(False)
    data_parallel: str = opt("replica", choices=("replica", "socket", "machine"))
    io_multiplier: int = opt(1)


@dataclass(frozen=True)
class CheckpointConfig(Section):
    tag_validation: str = opt("Warn", choices=("Ignore", "Warn", "Fail"))
    load_universal: bool = opt(False)
    use_node_local_storage: bool = opt(False)
    parallel_write: ParallelWriteConfig = opt(factory=ParallelWriteConfig)
    checkpoint_serialization: bool = opt(True)
    writer: Optional[CheckpointWriterConfig] = opt(None)


@dataclass(frozen=True)
class ActivationCheckpointingConfig(Section):
    partition_activations: bool = opt(False)
    contiguous_memory_optimization: bool = opt(False)
    number_checkpoints: Optional[int] = opt(None)
    cpu_checkpointing: bool = opt(False)
    synchronize_checkpoint_boundary: bool = opt(False)
    profile: bool = opt(False)


@dataclass(frozen=True)
class PipelineConfig(Section):
    """`stages`, `partition` and `seed_layers` are accepted and, as in DeepSpeed, ignored: the module's
    constructor arguments decide them. `extra_warmup` is dsrun's (0: DeepSpeed's schedule and memory)."""

    stages: Union[Literal["auto"], int] = opt("auto")
    partition: str = opt("best")
    seed_layers: bool = opt(False)
    activation_checkpoint_interval: int = opt(0)
    pipe_partitioned: bool = opt(True)
    grad_partitioned: bool = opt(True)
    use_reentrant: Optional[bool] = opt(None)
    # dsrun: forwards each stage but the last runs before its first backward, beyond 1F1B's own
    # ([Note: extra warm-up] in runtime/pipe/schedule.py); each holds one more micro-batch of activations
    extra_warmup: int = opt(0, check=non_negative)


@dataclass(frozen=True)
class TensorBoardConfig(Section):
    enabled: bool = opt(False)
    output_path: str = opt("")
    job_name: str = opt("DeepSpeedJobName")


@dataclass(frozen=True)
class CSVMonitorConfig(Section):
    enabled: bool = opt(False)
    output_path: str = opt("")
    job_name: str = opt("DeepSpeedJobName")


@dataclass(frozen=True)
class WandbConfig(Section):
    enabled: bool = opt(False)
    group: Optional[str] = opt(None)
    team: Optional[str] = opt(None)
    project: str = opt("deepspeed")


@dataclass(frozen=True)
class CometConfig(Section):
    enabled: bool = opt(False)
    samples_log_interval: int = opt(100)
    project: Optional[str] = opt(None)
    workspace: Optional[str] = opt(None)
    api_key: Optional[str] = opt(None)
    experiment_name: Optional[str] = opt(None)
    experiment_key: Optional[str] = opt(None)
    online: Optional[bool] = opt(None)
    mode: Optional[str] = opt(None)


@dataclass(frozen=True)
class FlopsProfilerConfig(Section):
    enabled: bool = opt(False)
    recompute_fwd_factor: float = opt(0.0)
    profile_step: int = opt(1)
    module_depth: int = opt(-1)
    top_modules: int = opt(1)
    detailed: bool = opt(True)
    output_file: Optional[str] = opt(None)


@dataclass(frozen=True)
class CommsLoggerConfig(Section):
    enabled: bool = opt(False)
    verbose: bool = opt(False)
    prof_all: bool = opt(True)
    debug: bool = opt(False)
    prof_ops: List[str] = opt(factory=list)


@dataclass(frozen=True)
class AioConfig(Section):
    """NVMe offload I/O (runtime/zero/swap.py [Note: swap I/O]): `block_size` bytes per call, `queue_depth`
    x `thread_count` calls in flight, `overlap_events` prefetches the next bucket. A thread pool has no
    separate submission step (`single_submit`) and no GPUDirect path (`use_gds`)."""

    block_size: int = opt(1_048_576, check=lambda v, w: _positive(v, w))
    queue_depth: int = opt(8, check=lambda v, w: _positive(v, w))
    intra_op_parallelism: int = opt(1, aliases=("thread_count",), check=lambda v, w: _positive(v, w))
    single_submit: bool = opt(False, inert="dsrun's thread pool submits each block as it goes")
    overlap_events: bool = opt(True)
    use_gds: bool = opt(False, inert="dsrun reads and writes NVMe through host memory (no GPUDirect Storage)")


def _positive(value, where):
    from dsrun.errors import ConfigError
    if value is not None and value <= 0:
        raise ConfigError(f"must be > 0, got {value}", where=where)
    return value


@dataclass(frozen=True)
class MetricsConfig(Section):
    """dsrun's metrics folder (docs/monitoring.md): rank 0 writes training_metrics.csv, training_curves.png,
    summary.json and deepspeed_config_auto.json under `output_path` (relative paths: under the working
    directory). `flops_per_sample` overrides the 6 x parameters x tokens estimate; `peak_tflops` (per
    device) enables MFU where the device is not in dsrun's table."""

    enabled: bool = opt(True)
    output_path: str = opt("output/deepspeed_metrics")
    flops_per_sample: Optional[float] = opt(None, check=_positive)
    peak_tflops: Optional[float] = opt(None, check=_positive)


@dataclass(frozen=True)
class HangWatchdogConfig(Section):
    """Report where every rank is when no optimizer step completes within `timeout_s` (it never kills)."""

    enabled: bool = opt(True)
    timeout_s: float = opt(300.0, check=_positive)

"""Pipeline parallelism: DeepSpeed's `deepspeed.pipe`, importable as `dsrun.pipe` (docs/pipeline.md).

Modules, one concept each: `module` (LayerSpec, TiedLayerSpec, PipelineModule), `partition` (which layers
each stage holds; pure), `topology` (process grids and their groups), `schedule` (schedules as data) and
`simulate` (running them against each other without tensors), `p2p` (activations and gradients between
stages), `comm` (the one object every transfer goes through, which the monitor taps), `stage_optimizer`
(tied and data-parallel reductions, global-norm clipping, ZeRO-1), `engine`
(PipelineEngine: train_batch/eval_batch interpret the schedules), `checkpoint` (per-layer files).
"""
from .module import LayerSpec, PipelineModule, TiedLayerSpec
from .schedule import (InferenceSchedule, Instruction, InterleavedInferenceSchedule, InterleavedTrainSchedule,
                       PipeSchedule, TrainSchedule)
from .topology import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology

__all__ = ["LayerSpec", "TiedLayerSpec", "PipelineModule", "PipeSchedule", "TrainSchedule", "InferenceSchedule",
           "InterleavedTrainSchedule", "InterleavedInferenceSchedule", "Instruction", "ProcessTopology",
           "PipeDataParallelTopology", "PipeModelDataParallelTopology"]


def __getattr__(name):
    if name in ("PipelineEngine", "PipelineError"):  # imported on use: the engine pulls in the runtime
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'dsrun.pipe' has no attribute {name!r}")

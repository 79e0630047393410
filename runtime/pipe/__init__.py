"""Pipeline parallelism: DeepSpeed's `deepspeed.pipe`, importable as `dsrun.pipe`.

What exists: the schedules as data (`schedule`: TrainSchedule, InferenceSchedule,
InterleavedTrainSchedule) and the layer descriptions (`LayerSpec`, `TiedLayerSpec`). The pipeline engine
does not: `PipelineModule(...)` raises NotImplementedError (docs/pipeline.md).
"""
from .module import LayerSpec, PipelineModule, TiedLayerSpec
from .schedule import InferenceSchedule, Instruction, InterleavedTrainSchedule, PipeSchedule, TrainSchedule

__all__ = ["LayerSpec", "TiedLayerSpec", "PipelineModule", "PipeSchedule", "TrainSchedule", "InferenceSchedule",
           "InterleavedTrainSchedule", "Instruction"]

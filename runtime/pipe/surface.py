"""PipelineSurface: the PipelineEngine's DeepSpeed methods that are not running a batch (engine.py runs
batches): stage queries, data sources, the methods DeepSpeed's pipeline refuses, batch re-sizing,
precision queries, and checkpoints (checkpoint.py does the work). Mixed into PipelineEngine, whose
attributes it reads (`stage_id`, `num_stages`, `num_chunks`, `micro_batches`, `module`, `p2p`, ...)."""
from __future__ import annotations

from typing import Optional

from dsrun.errors import ConfigError

__all__ = ["PipelineError", "PipelineSurface"]


class PipelineError(Exception):
    """Errors related to the use of the pipeline engine (DeepSpeed's class)."""


class PipelineSurface:
    """See the module docstring."""

    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def set_dataiterator(self, iterator) -> None:
        """Where train_batch() takes micro-batches from (used by the first and last stages only)."""
        if self.is_first_stage() or self.is_last_stage():
            self.data_iterator = iterator

    def set_dataloader(self, loader) -> None:
        if self.is_first_stage() or self.is_last_stage():
            from ..utils import RepeatingLoader
            self.data_iterator = iter(RepeatingLoader(loader))

    def set_batch_fn(self, fn) -> None:
        """`fn(batch)` is applied to each loaded batch before it is split into inputs and labels."""
        self._batch_fn = fn

    def set_has_attention_mask(self, value: bool) -> None:
        """DeepSpeed's flag for a boolean attention mask as the last tensor between stages (Megatron-DeepSpeed
        sets it). DeepSpeed needs it to cast the mask for NCCL; dsrun sends boolean tensors as they are, so
        it is only recorded."""
        if not isinstance(value, bool):
            raise TypeError(f"set_has_attention_mask takes a bool, not {type(value).__name__}")
        self.has_attention_mask = value

    def get_pipeline_parallel_rank(self) -> int:
        return self.stage_id

    # DeepSpeed's PipelineEngine attributes, derived here
    @property
    def prev_stage(self) -> int:
        return self.stage_id - 1

    @property
    def next_stage(self) -> int:
        return self.stage_id + 1

    @property
    def is_pipe_parallel(self) -> bool:
        return self.num_stages > 1

    @property
    def is_data_parallel(self) -> bool:
        return self.dp_world_size > 1

    @property
    def is_model_parallel(self) -> bool:
        return False  # no tensor-parallel axis in dsrun's pipeline

    @property
    def micro_batch_size(self) -> int:
        return self.train_micro_batch_size_per_gpu()

    @property
    def dynamic_shape(self) -> bool:
        return self.module.dynamic_shape

    def set_train_batch_size(self, train_batch_size: int) -> None:
        """More or fewer micro-batches per batch for the same micro-batch size (DeepSpeed's method); the next
        train_batch runs the new number."""
        before = self.config
        super().set_train_batch_size(train_batch_size)
        try:
            self._check_micro_batches(self.gradient_accumulation_steps(), where="set_train_batch_size")
        except ConfigError:
            self.config = before
            raise
        self.micro_batches = self.gradient_accumulation_steps()

    def _check_micro_batches(self, micro_batches: int, *, where: str) -> None:
        if self.num_chunks > 1 and micro_batches % self.num_stages:
            raise ConfigError(f"the interleaved schedule (num_chunks={self.num_chunks}) needs gradient_accumulation_steps "
                              f"({micro_batches}) to be a multiple of the number of stages ({self.num_stages})",
                              where=where)

    def get_additional_losses(self):
        """DeepSpeed's extra losses of MoE layers; none here (dsrun's pipeline has no MoE)."""
        return None

    def reset_activation_shape(self) -> None:
        """Exchange activation shapes again before the next send (call on every rank)."""
        self.p2p.reset()

    def forward(self, *args, **kwargs):
        raise PipelineError("Only train_batch() is accessible in pipeline mode.")

    __call__ = forward

    def backward(self, *args, **kwargs):
        raise PipelineError("Only train_batch() is accessible in pipeline mode.")

    def step(self, *args, **kwargs):
        raise PipelineError("Only train_batch() is accessible in pipeline mode.")

    def was_step_applied(self) -> bool:
        """Whether the last train_batch updated the weights (False after an fp16 overflow)."""
        return self._step_applied

    def is_gradient_accumulation_boundary(self) -> bool:
        return self._boundary

    def get_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> Optional[float]:
        return self.stage_optimizer.grad_norm

    def bfloat16_enabled(self) -> bool:
        return self.config.precision.param_dtype == "bf16"

    def fp16_enabled(self) -> bool:
        return self.config.precision.param_dtype == "fp16"

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    # -- checkpoints (checkpoint.py) ---------------------------------------------------------------------

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, **kwargs):
        """Per-layer files plus engine and optimizer state (checkpoint.py). Collective."""
        from .checkpoint import save
        return save(self, save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest)

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, **kwargs):
        """Returns (path, client_state), or (None, None) when there is nothing to load. Collective."""
        from .checkpoint import load
        return load(self, load_dir, tag=tag, strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                    load_lr_scheduler_states=load_lr_scheduler_states)

    def module_state_dict(self) -> dict:
        return self.module.state_dict()

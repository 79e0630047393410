"""ConfigQueries: DeepSpeed's engine methods that only read the resolved config, shared by every engine."""
from __future__ import annotations

__all__ = ["ConfigQueries"]


class ConfigQueries:
    """Mixed into an engine that has `self.config` (a resolved `DsConfig`)."""

    def train_batch_size(self) -> int:
        return self.config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation_steps

    def zero_optimization_stage(self) -> int:
        return self.config.zero.stage

    def gradient_clipping(self) -> float:
        return self.config.gradient_clipping

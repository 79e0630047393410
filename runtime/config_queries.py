"""ConfigQueries: DeepSpeed's engine methods that read the resolved config (and re-batch it), shared by every
engine."""
from __future__ import annotations

import dataclasses
from typing import Tuple

__all__ = ["ConfigQueries"]


class ConfigQueries:
    """Mixed into an engine that has `self.config` (a resolved `DsConfig`)."""

    def train_batch_size(self) -> int:
        return self.config.train_batch_size

    def get_batch_info(self) -> Tuple[int, int, int]:
        """(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)."""
        return self.train_batch_size(), self.train_micro_batch_size_per_gpu(), self.gradient_accumulation_steps()

    def set_train_batch_size(self, train_batch_size: int) -> None:
        """Change the global batch size by changing gradient accumulation steps (the micro batch stays).
        Needs `self.dp_world_size`.

        Raises ValueError unless `train_batch_size` is a multiple of micro batch x data-parallel size."""
        per_step = self.train_micro_batch_size_per_gpu() * self.dp_world_size
        if train_batch_size % per_step != 0:
            raise ValueError("Train batch size must be divisible by micro-batch data parallelism "
                             f"({self.train_micro_batch_size_per_gpu()} x {self.dp_world_size})")
        self._replace_batch(train_batch_size, self.train_micro_batch_size_per_gpu(), train_batch_size // per_step)

    def _replace_batch(self, train: int, micro: int, gas: int) -> None:
        raw = dict(self.config.raw, train_batch_size=train, train_micro_batch_size_per_gpu=micro,
                   gradient_accumulation_steps=gas)
        self.config = dataclasses.replace(self.config, train_batch_size=train, train_micro_batch_size_per_gpu=micro,
                                          gradient_accumulation_steps=gas, raw=raw)

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation_steps

    def zero_optimization_stage(self) -> int:
        return self.config.zero.stage

    def gradient_clipping(self) -> float:
        return self.config.gradient_clipping

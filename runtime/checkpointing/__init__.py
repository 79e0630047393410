"""Activation checkpointing: DeepSpeed's `deepspeed.checkpointing`, importable as `dsrun.checkpointing`.

    import dsrun
    dsrun.checkpointing.configure(mpu, deepspeed_config="ds_config.json")   # optional
    y = dsrun.checkpointing.checkpoint(block, x, mask)        # activations recomputed in backward

Modules: `function` (checkpoint, reentrant and non-reentrant), `settings` (configure/is_configured/reset,
the `activation_checkpointing` config section), `rng` (RNG tracker, model_parallel_cuda_manual_seed).
docs/pipeline.md has what each setting does here and the measured memory saving.
"""
from .function import checkpoint, non_reentrant_checkpoint
from .rng import (CudaRNGStatesTracker, MODEL_PARALLEL_RNG_TRACKER_NAME, get_cuda_rng_tracker,
                  model_parallel_cuda_manual_seed)
from .settings import configure, is_configured, reset

__all__ = ["checkpoint", "non_reentrant_checkpoint", "configure", "is_configured", "reset",
           "model_parallel_cuda_manual_seed", "get_cuda_rng_tracker", "CudaRNGStatesTracker",
           "MODEL_PARALLEL_RNG_TRACKER_NAME"]

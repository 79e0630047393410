"""Resolve parsed sections into the policies the runtime composes (shared/style.md rule 2).

This is the one place that reads `zero_optimization.stage`, `fp16`/`bf16`, `data_types` and
`communication_data_type`. Decisions, with the reasons:

- Sharding: `ShardingPolicy.from_stage(stage)`.
- Offload: `offload_optimizer.device` / `offload_param.device`; `pin_memory`, `nvme_path` and buffer
  sizes come from the offloaded section (the parameter section when both are offloaded, since its
  buffers are the ones sized by `buffer_count`/`buffer_size`; optimizer `ratio` always from
  `offload_optimizer`). Both on nvme with different `nvme_path`s is an error: the policy has one path.
  The `aio` section becomes the policy's `AioPolicy` (block size, queue depth, threads, overlap).
- Precision: fp32 by default. fp16 -> fp16 params, fp32 master and accumulation, fp16 reduction unless
  `communication_data_type`; loss scaling dynamic when `fp16.loss_scale == 0`, else static.
  bf16 -> bf16 params, fp32 master, fp32 accumulation and fp32 reduction by default (a deliberate fix
  of DeepSpeed's bf16 accumulation, reference 7 #22); `data_types.grad_accum_dtype` and
  `communication_data_type` overrides. `fp16_master_weights_and_grads` /
  `bf16_master_weights_and_grads` keep master weights (and their gradients) in 16 bits (ZeRO 1-3 only,
  as in DeepSpeed).
- Gradient accumulation dtype = the master weights' dtype: the accumulated gradients are the masters'
  `.grad`, which the optimizer reads, and torch requires a gradient of its tensor's dtype. Any other
  `data_types.grad_accum_dtype` is accepted with a warning and not used (DeepSpeed's separate 16-bit
  accumulation buffer only saves memory while costing precision; fp32 masters keep fp32 sums).
- `data_types.buffer_dtype`: floating module buffers are cast to it (None keeps them as loaded, as
  DeepSpeed); a BatchNorm model under fp16/bf16 needs it set to the same 16-bit dtype.
- Comm: bucket sizes, `overlap_comm` (default: true at stage 3 only), `gradient_allreduce_op`
  ("sum" is rejected at stage 3, as in DeepSpeed), pre-scaling knobs (rejected at stage 2 with
  `reduce_scatter` and "mean", where DeepSpeed asserts).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dsrun.errors import ConfigError

from .policies import AioPolicy, CommPolicy, Device, LossScalePolicy, OffloadPolicy, PrecisionPolicy, ShardingPolicy
from .schema import warn_adjusted, warn_ignored

if TYPE_CHECKING:
    from .toplevel import TopLevelConfig

__all__ = ["sharding_policy", "offload_policy", "precision_policy", "comm_policy"]


def sharding_policy(top: "TopLevelConfig") -> ShardingPolicy:
    return ShardingPolicy.from_stage(top.zero_optimization.stage)


def offload_policy(top: "TopLevelConfig") -> OffloadPolicy:
    zero = top.zero_optimization
    opt_cfg, param_cfg = zero.offload_optimizer, zero.offload_param
    opt_dev = Device(zero.offload_optimizer_device)
    param_dev = Device(zero.offload_param_device)
    if opt_dev is Device.NONE and param_dev is Device.NONE:
        return OffloadPolicy()
    if opt_dev is Device.NONE:  # DeepSpeed takes offload_param alone (its fp32 masters stay on the device)
        opt_dev, opt_cfg = param_dev, param_cfg
        warn_adjusted(f"zero_optimization.offload_param: without offload_optimizer, dsrun offloads the optimizer "
                      f"to {param_dev.value} too (the host step updates the offloaded parameter shards; same "
                      f"results, less device memory); add offload_optimizer to say so")
    if opt_dev is Device.NVME and param_dev is Device.NVME and opt_cfg.nvme_path != param_cfg.nvme_path:
        raise ConfigError("offload_optimizer and offload_param use different nvme_path values; dsrun swaps to one "
                          "directory", where="zero_optimization.offload_param.nvme_path",
                          hint=f"use {opt_cfg.nvme_path!r} for both")
    nvme_path = opt_cfg.nvme_path if opt_dev is Device.NVME else (param_cfg.nvme_path if param_dev is Device.NVME
                                                                 else None)
    primary = param_cfg if param_dev is not Device.NONE else opt_cfg
    buffer_size = param_cfg.buffer_size if param_cfg is not None else OffloadPolicy.buffer_size
    aio = top.aio
    io = AioPolicy(block_size=aio.block_size, queue_depth=aio.queue_depth, thread_count=aio.intra_op_parallelism,
                   overlap_events=aio.overlap_events)
    return OffloadPolicy(optimizer=opt_dev, params=param_dev, nvme_path=nvme_path, pin_memory=primary.pin_memory,
                         ratio=getattr(opt_cfg, "ratio", 1.0), buffer_count=primary.buffer_count,
                         buffer_size=buffer_size, aio=io)


def _check_param_dtype(top: "TopLevelConfig", mode: str) -> None:
    given = top.data_types.param_dtype
    if given is not None and given != mode:
        raise ConfigError(f"data_types.param_dtype {given!r} conflicts with the enabled precision ({mode})",
                          where="data_types.param_dtype", hint=f"remove it, or set it to {mode!r}")


def _accum_dtype(top: "TopLevelConfig", master: str) -> str:
    given = top.data_types.grad_accum_dtype
    if given is not None and given != master:
        warn_ignored("data_types.grad_accum_dtype", f"gradients accumulate in the master weights' dtype, {master}, "
                                                    "as the optimizer reads them")
    return master


def precision_policy(top: "TopLevelConfig") -> PrecisionPolicy:
    fp16, bf16, stage = top.fp16, top.bf16, top.zero_optimization.stage
    comm = top.communication_data_type
    buffers = top.data_types.buffer_dtype
    if fp16.enabled and bf16.enabled:
        raise ConfigError("fp16 and bf16 cannot both be enabled", where="bf16.enabled",
                          hint="set one of fp16.enabled / bf16.enabled to false")
    if fp16.enabled:
        _check_param_dtype(top, "fp16")
        if fp16.fp16_master_weights_and_grads and stage == 0:
            raise ConfigError("fp16_master_weights_and_grads is only supported with ZeRO stage 1, 2 or 3",
                              where="fp16.fp16_master_weights_and_grads")
        scale = LossScalePolicy(dynamic=fp16.dynamic_loss_scale, static_scale=fp16.loss_scale or 1.0,
                                initial_scale_power=fp16.initial_scale_power,
                                loss_scale_window=fp16.loss_scale_window, hysteresis=fp16.hysteresis,
                                consecutive_hysteresis=fp16.consecutive_hysteresis,
                                min_loss_scale=float(fp16.min_loss_scale))
        master = "fp16" if fp16.fp16_master_weights_and_grads else "fp32"
        return PrecisionPolicy(param_dtype="fp16", master_dtype=master, grad_accum_dtype=_accum_dtype(top, master),
                               reduce_dtype=comm or "fp16", loss_scale=scale, buffer_dtype=buffers)
    if bf16.enabled:
        _check_param_dtype(top, "bf16")
        if bf16.bf16_master_weights_and_grads and stage == 0:
            raise ConfigError("bf16_master_weights_and_grads is only supported with ZeRO stage 1, 2 or 3",
                              where="bf16.bf16_master_weights_and_grads")
        master = "bf16" if bf16.bf16_master_weights_and_grads else "fp32"
        return PrecisionPolicy(param_dtype="bf16", master_dtype=master, grad_accum_dtype=_accum_dtype(top, master),
                               reduce_dtype=comm or "fp32", buffer_dtype=buffers)
    _check_param_dtype(top, "fp32")
    return PrecisionPolicy(grad_accum_dtype=_accum_dtype(top, "fp32"), reduce_dtype=comm or "fp32",
                           buffer_dtype=buffers)


def comm_policy(top: "TopLevelConfig") -> CommPolicy:
    zero = top.zero_optimization
    op = top.gradient_allreduce_op  # normalised to lower case by the schema
    if op == "sum" and zero.stage == 3:
        raise ConfigError("gradient_allreduce_op 'sum' is not supported with ZeRO stage 3",
                          where="gradient_allreduce_op", hint="use 'mean', or ZeRO stage 0-2")
    if zero.stage == 2 and zero.reduce_scatter and op == "mean":
        if top.prescale_gradients:
            raise ConfigError("prescale_gradients is not supported with ZeRO stage 2 and reduce_scatter",
                              where="prescale_gradients",
                              hint="set it to false, or zero_optimization.reduce_scatter to false")
        if top.gradient_predivide_factor != 1.0:
            raise ConfigError("gradient_predivide_factor must be 1.0 with ZeRO stage 2 and reduce_scatter",
                              where="gradient_predivide_factor",
                              hint="remove it, or set zero_optimization.reduce_scatter to false")
    if top.gradient_predivide_factor <= 0:
        raise ConfigError(f"must be > 0, got {top.gradient_predivide_factor}", where="gradient_predivide_factor")
    return CommPolicy(reduce_bucket_size=zero.reduce_bucket_size, allgather_bucket_size=zero.allgather_bucket_size,
                      overlap_comm=zero.overlap, overlap_param_gather=zero.overlap_param_gather,
                      copy_engine_comm=zero.copy_engine_comm,
                      contiguous_gradients=zero.contiguous_gradients,
                      reduce_scatter=zero.reduce_scatter, allreduce_op=op,
                      prescale_gradients=top.prescale_gradients,
                      gradient_predivide_factor=top.gradient_predivide_factor)

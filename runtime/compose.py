"""Compose the parts of a training engine, each technique through one keyword-only `apply_*` function.

[Note: composition order] `compose()` applies, in this order and nowhere else (shared/style.md rule 3):

1. placement (`apply_placement`): the module moves to this rank's device; when parameters are sharded
   only its buffers move now (sharding moves each parameter's shard; the whole model never lands on the
   device), and floating buffers take `data_types.buffer_dtype`;
2. optimizer (`apply_optimizer`): the client's (instance or callable(params)) or `build_optimizer(config.optimizer)`;
3. precision (`apply_precision`): the loss scaler and whether an overflow skips the step;
4. sharding (`apply_sharding`): a `ShardingStrategy` (runtime/zero/strategy.py) owns working weights in
   `precision.param_dtype`, fp32 masters of the owned chunks, gradient hooks and the step; without an
   optimizer the module's floating parameters are only cast;
5. scheduler (`apply_scheduler`): the client's (instance or callable(optimizer)) or `build_scheduler(config.scheduler)`;
6. data (`apply_data`): a DistributedSampler loader when `training_data` is given.

Optimizer offload is part of sharding (the strategy's host updater, runtime/zero/offload.py), chosen
from `config.offload`. Pipeline split and activation checkpointing go before sharding when they land; a
pipeline engine reuses these functions for its stage's module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from dsrun.errors import ConfigError

from .config.policies import torch_dtype

__all__ = ["EngineParts", "compose", "apply_placement", "apply_optimizer", "apply_precision", "apply_sharding",
           "apply_scheduler", "apply_data"]


@dataclass
class EngineParts:
    optimizer: Optional[torch.optim.Optimizer]
    loss_scaler: Any
    check_overflow: bool
    sharding: Any  # a ShardingStrategy, or None without an optimizer
    lr_scheduler: Any
    training_dataloader: Any


def compose(model: torch.nn.Module, *, config, device: torch.device, group=None, optimizer=None,
            model_parameters=None, lr_scheduler=None, training_data=None, collate_fn=None) -> EngineParts:
    """Build every part of an engine for `model` in the documented order (see [Note: composition order])."""
    apply_placement(model, device=device, sharding=config.sharding, precision=config.precision)
    opt = apply_optimizer(model, client=optimizer, model_parameters=model_parameters, config=config, device=device)
    loss_scaler, check_overflow = apply_precision(config=config)
    strategy = apply_sharding(model, optimizer=opt, config=config, group=group, device=device)
    scheduler = apply_scheduler(client=lr_scheduler, optimizer=opt, config=config)
    loader = apply_data(training_data=training_data, config=config, group=group, collate_fn=collate_fn)
    return EngineParts(opt, loss_scaler, check_overflow, strategy, scheduler, loader)


def apply_placement(model: torch.nn.Module, *, device: torch.device, sharding, precision) -> None:
    """Move `model` to `device` (with sharded parameters, only its buffers: sharding places the rest) and
    cast floating buffers to `precision`'s buffer dtype."""
    if not sharding.parameters:
        model.to(device)
    else:
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(device)
    from .precision import cast_buffers
    cast_buffers(model, precision)  # data_types.buffer_dtype


def apply_optimizer(model: torch.nn.Module, *, client, model_parameters, config, device):
    """The client's optimizer (instance or callable(params)), else one built from `config.optimizer`, else None."""
    params = list(model_parameters) if model_parameters is not None else list(model.parameters())
    if client is not None:
        if isinstance(client, torch.optim.Optimizer):
            return client
        if callable(client):
            return client(params)
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer or a callable(params), not "
                          f"{type(client).__name__}", where="initialize(optimizer=...)")
    if config.optimizer is None:
        return None
    from .optim import build_optimizer
    return build_optimizer(config.optimizer, params, offload=config.offload, device=device)


def apply_precision(*, config):
    """(loss scaler, whether an overflowing step is skipped) for `config.precision`."""
    from .precision import build_loss_scaler, checks_overflow
    return (build_loss_scaler(config.precision),
            checks_overflow(config.precision, bf16_check=config.bf16.check_grad_overflow))


def apply_sharding(model: torch.nn.Module, *, optimizer, config, group, device: torch.device):
    """The sharding strategy over `model` and `optimizer` (runtime/zero/), or None without an optimizer
    (the module's floating parameters are then cast to the working dtype)."""
    if optimizer is None:
        dtype = torch_dtype(config.precision.param_dtype)
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(device, dtype)
        return None
    from .zero import build_strategy
    return build_strategy(model, optimizer=optimizer, sharding=config.sharding, precision=config.precision,
                          comm_policy=config.comm, group=group, device=device, dtype_of=torch_dtype,
                          accumulation_steps=config.gradient_accumulation_steps, zero_config=config.zero,
                          offload=config.offload)


def apply_scheduler(*, client, optimizer, config):
    """The client's scheduler (instance or callable(optimizer)), else one built from `config.scheduler`."""
    if client is not None:
        if callable(client) and not hasattr(client, "step"):
            return client(optimizer)
        return client
    if config.scheduler is None or optimizer is None:
        return None
    from .lr_schedules import build_scheduler
    return build_scheduler(config.scheduler, optimizer)


def apply_data(*, training_data, config, group, collate_fn):
    """A loader over `training_data` with a DistributedSampler over the data-parallel group, or None."""
    if training_data is None:
        return None
    from .dataloader import build_dataloader
    return build_dataloader(training_data, micro_batch_size=config.train_micro_batch_size_per_gpu,
                            rank=dist.get_rank(group), world_size=dist.get_world_size(group), collate_fn=collate_fn)

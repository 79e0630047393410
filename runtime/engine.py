"""Engine: the object `dsrun.initialize` returns; a thin composition of runtime pieces.

The engine holds its parts through small protocols: `compose()` (runtime/compose.py, [Note: composition
order]) builds them, and data parallelism is a `ShardingStrategy` (runtime/zero/strategy.py) that the
engine calls and never reaches into. After composing, the engine adds monitoring (`apply_monitoring`,
runtime/monitor/: progress, metrics folder, monitors, hang watchdog), called at backward, at each
optimizer step's end and in `destroy()`; it needs the engine itself, so it comes last.

Step contract (DeepSpeed's): call `engine(batch)`, `engine.backward(loss)`, `engine.step()` on every
micro-batch. `backward` scales the loss by loss_scale / GAS; gradients are reduced per the sharding
policy (runtime/zero/). `step` applies the optimizer only at the accumulation boundary;
an overflow (non-finite global norm under fp16, or bf16 with `check_grad_overflow`) skips the update
and the scheduler, counts a skipped step and logs an event, while `global_steps` still increments.
Inputs are never cast, except floating inputs under `fp16.auto_cast`.

[Note: deferred overflow accounting] When the loss scale cannot change (bf16, or fp16 with a static
scale) and the optimizer is dsrun's FusedAdam, the overflow check runs on the device and the update
kernels skip an overflowing step themselves (runtime/zero/optimizer.py's [Note: device-side skip]), so
`step()` never waits for the GPU. The host books the step as applied at once (step counts, the
scheduler's step) and learns the outcome later, at the next boundary step or when something asks:
`was_step_applied()`, `skipped_steps`, `get_lr()`, `get_mom()`, checkpoints and `destroy()` settle it
first (reading a flag copied to pinned memory when the step was queued, so only that step is waited
for). If the device skipped, the step counts go back, the scheduler and the param groups' hyperparameters
are restored from a snapshot taken before its step, and the skip is counted and logged. Reading the
scheduler or `optimizer.param_groups` directly right after `step()` therefore shows the advanced values
even for a step that the device is about to report as skipped. A dynamic fp16 loss scale has to know
the outcome before the next backward, so fp16 keeps the host check.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist

from dsrun.errors import ConfigError

from .config.policies import torch_dtype
from .config_queries import ConfigQueries
from .engine_compat import EngineCompat, compat_getattr, optimizer_view
from .log import get_logger, log_auto_resolved
from .shard_state import MASTER_KEY, ParamShard, ReadFn

__all__ = ["Engine", "DeepSpeedEngine"]

log = get_logger()


class Engine(ConfigQueries, EngineCompat, torch.nn.Module):
    def __init__(self, *, model: torch.nn.Module, config, optimizer=None, model_parameters=None,
                 lr_scheduler=None, training_data=None, collate_fn=None, dp_group=None):
        super().__init__()
        self.config = config
        self.module = model
        self.dp_group = dp_group
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.dp_world_size = dist.get_world_size(dp_group)
        from .dist import local_rank
        self.local_rank = local_rank()
        if torch.cuda.is_available():  # also when the caller initialised torch.distributed itself
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
        self._pending = None  # a step booked as applied until the device says ([Note: deferred overflow ...])
        self.global_steps = self.global_samples = self.micro_steps = self.skipped_steps = 0
        self._step_applied = False
        self._grad_norm: Optional[float] = None
        self._boundary_override: Optional[bool] = None
        self._check_supported(config)
        log_auto_resolved(config)  # on rank 0: what every "auto" became
        from .teardown import track_engine
        track_engine(self)  # destroyed at exit before the process groups ([Note: teardown at exit])
        from .compose import compose
        parts = compose(model, config=config, device=self.device, group=dp_group, optimizer=optimizer,
                        model_parameters=model_parameters, lr_scheduler=lr_scheduler, training_data=training_data,
                        collate_fn=collate_fn)
        self.optimizer = self.basic_optimizer = parts.optimizer
        self.precision = config.precision
        self.loss_scaler, self._check_overflow = parts.loss_scaler, parts.check_overflow
        self.zero = parts.sharding  # the ShardingStrategy (runtime/zero/strategy.py), None without an optimizer
        self.lr_scheduler = parts.lr_scheduler
        self.training_dataloader = parts.training_dataloader
        self._skip_on_device = (self._check_overflow and not self.loss_scaler.dynamic and self.zero is not None
                                and self.zero.skips_on_device)
        if self.basic_optimizer is not None:  # DeepSpeed's wrapper attributes (loss_scaler, overflow, ...)
            self.optimizer = optimizer_view(self.basic_optimizer, self)
        # after compose(): progress, metrics folder, monitors, hang watchdog (runtime/monitor/)
        from .monitor import apply_monitoring
        self.monitor = apply_monitoring(engine=self, config=config)

    # -- construction helpers ------------------------------------------------------------------------

    @staticmethod
    def _check_supported(config) -> None:
        if config.offload.params.value != "none" and config.offload.optimizer.value == "none":
            raise ConfigError("offload_param needs offload_optimizer too: dsrun updates offloaded parameter shards "
                              "with the host step", where="zero_optimization.offload_param",
                              hint="add \"offload_optimizer\": {\"device\": \"cpu\"} (or remove offload_param)")
        if config.offload.params.value == "nvme" and config.offload.optimizer.value != "nvme":
            raise ConfigError("offload_param to NVMe needs offload_optimizer on NVMe too: the parameter shards are "
                              "the optimizer's fp32 masters in its swap files",
                              where="zero_optimization.offload_param.device",
                              hint="set offload_optimizer.device to \"nvme\" with the same nvme_path, or "
                                   "offload_param.device to \"cpu\"")

    # -- the training loop -------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        if self.config.fp16.enabled and self.config.fp16.auto_cast:
            args, kwargs = _cast_floating((args, kwargs), torch.float16)
        return self.module(*args, **kwargs)

    def _require_optimizer(self, what: str) -> None:
        if self.zero is None:
            raise ConfigError(f"engine.{what}() needs an optimizer",
                              where="optimizer", hint="pass optimizer= to initialize or add an \"optimizer\" section")

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True):
        """Backpropagate `loss` scaled by loss_scale (and 1/GAS); returns the loss divided by GAS."""
        self._require_optimizer("backward")
        if loss.numel() != 1:
            raise ValueError(f"engine.backward expects a scalar loss, got shape {tuple(loss.shape)}")
        gas = self.gradient_accumulation_steps() if scale_wrt_gas else 1
        self.monitor.on_backward(loss)
        self.zero.before_backward(self.is_gradient_accumulation_boundary())
        (loss.float() * (self.loss_scaler.loss_scale / gas)).backward(retain_graph=retain_graph)
        self.zero.after_backward()
        return loss.detach() / gas

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scaler.loss_scale

    def step(self, lr_kwargs=None) -> None:
        """Apply the optimizer at the accumulation boundary; count the micro-step always."""
        self._require_optimizer("step")
        self._step_applied = False
        if self.is_gradient_accumulation_boundary():
            self._boundary_step(lr_kwargs)
        self.micro_steps += 1
        self._boundary_override = None

    def _boundary_step(self, lr_kwargs) -> None:
        self._settle()
        snapshot = self._snapshot() if self._skip_on_device else None
        result = self.zero.step(loss_scale=self.loss_scaler.loss_scale,
                                max_norm=float(self.config.gradient_clipping or 0.0),
                                check_overflow=self._check_overflow, skip_on_device=snapshot is not None)
        self._grad_norm = result.grad_norm
        if result.overflow is not None:
            self._pending = (result.overflow, snapshot, self.global_steps, result.grad_norm)
        elif self._check_overflow:
            self._account(overflowed=not result.applied, step=self.global_steps, grad_norm=result.grad_norm)
        if result.applied:
            self._step_applied = True
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(**(lr_kwargs or {}))
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        self.monitor.on_step(step=self.global_steps, samples=self.global_samples, grad_norm=result.grad_norm,
                             lr=self.optimizer.param_groups[0]["lr"], loss_scale=self.loss_scaler.loss_scale,
                             skipped_steps=self._skipped_steps)

    def _account(self, *, overflowed: bool, step: int, grad_norm) -> None:
        self.loss_scaler.record(overflowed, step=step, grad_norm=grad_norm, report=self.global_rank == 0)
        if overflowed:
            self._step_applied = False
            self._skipped_steps += 1

    def _snapshot(self):
        """What a step booked as applied changes besides step counts: the scheduler's state and the param
        groups' hyperparameters. None (the host check then runs) when the scheduler cannot be copied."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if self.lr_scheduler is None:
            return (None, groups)
        try:
            return (copy.deepcopy(self.lr_scheduler.state_dict()), groups)
        except Exception:  # a client scheduler holding something deepcopy refuses
            self._skip_on_device = False
            return None

    def _settle(self) -> None:
        """Learn whether the device skipped the step booked as applied ([Note: deferred overflow accounting])."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        flag, (sched_state, groups), step, grad_norm = pending
        overflowed = flag.read()
        if overflowed:
            self.zero.undo_step()
            if sched_state is not None:
                self.lr_scheduler.load_state_dict(sched_state)
            for group, saved in zip(self.optimizer.param_groups, groups):
                group.update(saved)
        self._account(overflowed=overflowed, step=step, grad_norm=grad_norm)

    @property
    def skipped_steps(self) -> int:
        self._settle()
        return self._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_steps = value

    def wait_params(self) -> None:
        """Make the module's weights current after `step()` under `zero_optimization.overlap_param_gather`
        (runtime/zero/param_gather.py: forward, `state_dict()` and engine methods already do this)."""
        if self.zero is not None:
            self.zero.wait_params()

    def zero_grad(self) -> None:
        """Drop `.grad` of module parameters (accumulated gradients live in the engine's buffers and are
        cleared by `step()` at the boundary)."""
        for p in self.module.parameters():
            p.grad = None

    # -- queries -----------------------------------------------------------------------------------

    def is_gradient_accumulation_boundary(self) -> bool:
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self._boundary_override = bool(is_boundary)

    def was_step_applied(self) -> bool:
        self._settle()
        return self._step_applied

    def get_global_grad_norm(self) -> Optional[float]:
        """The unscaled global gradient norm before clipping, from the last boundary step (read from the
        device on first request: the step itself does not wait for it)."""
        if torch.is_tensor(self._grad_norm):
            self._grad_norm = self._grad_norm.item()
        return self._grad_norm

    def get_lr(self):
        self._settle()
        return [g["lr"] for g in self.optimizer.param_groups] if self.optimizer is not None else []

    def get_mom(self):
        self._settle()
        return [g.get("betas", (g.get("momentum"),))[0] for g in self.optimizer.param_groups]

    @property
    def sharding_policy(self):
        """What is sharded across the data-parallel group (`ShardingPolicy`; checkpoints record it)."""
        return self.config.sharding

    def fp16_enabled(self) -> bool:
        return self.precision.param_dtype == "fp16"

    def bfloat16_enabled(self) -> bool:
        return self.precision.param_dtype == "bf16"

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale

    @property
    def cur_scale(self) -> float:
        return self.loss_scaler.loss_scale

    @property
    def communication_data_type(self):
        return torch_dtype(self.precision.reduce_dtype)

    def train(self, mode: bool = True):
        return torch.nn.Module.train(self, mode)  # recurses into self.module

    def eval(self):
        return self.train(False)

    def __getattr__(self, name):
        return compat_getattr(self, name)

    # -- checkpoint state (runtime/checkpoint/ writes the files; see runtime/shard_state.py) --------

    @property
    def shards_replicated(self) -> bool:
        """True when every rank holds the whole state (writing rank 0's shards suffices)."""
        return self.zero is None or not self.zero.sharded

    def checkpoint_shards(self) -> list:
        """One `ParamShard` per `module.named_parameters()` entry (see runtime/shard_state.py)."""
        if self.zero is not None:
            return self.zero.checkpoint_shards()
        return [ParamShard(name, tuple(p.shape), p.dtype, 0, p.numel(), p.detach().float().reshape(-1), {},
                           frozen=True) for name, p in self.module.named_parameters()]

    def load_checkpoint_shards(self, read: ReadFn, *, load_optimizer_states: bool = True) -> None:
        """Fill this rank's master (and optimizer) slices from `read(name, key, start, end)`, then
        refresh the working weights on every rank. Collective."""
        if self.zero is not None:
            self.zero.load_checkpoint_shards(read, load_optimizer_states=load_optimizer_states)
            return
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for shard in self.checkpoint_shards():
                p = params[shard.name]
                p.copy_(read(shard.name, MASTER_KEY, 0, p.numel()).reshape(p.shape))

    def checkpoint_scalar_state(self) -> dict:
        """Everything else a checkpoint needs: optimizer groups and scalar state, loss scaler, counters,
        scheduler. Plain Python values (and whatever the scheduler's state_dict holds)."""
        self._settle()
        return {
            "optimizer_groups": self.zero.scalar_state() if self.zero is not None else [],
            "loss_scaler": self.loss_scaler.state_dict(),
            "counters": {"global_steps": self.global_steps, "global_samples": self.global_samples,
                         "micro_steps": self.micro_steps, "skipped_steps": self.skipped_steps},
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
        }

    def load_checkpoint_scalar_state(self, state: dict, *, load_optimizer_states: bool = True,
                                     load_lr_scheduler_states: bool = True) -> None:
        if load_optimizer_states and self.zero is not None:
            self.zero.load_scalar_state(state["optimizer_groups"])
        self.loss_scaler.load_state_dict(state["loss_scaler"])
        for key, value in state["counters"].items():
            setattr(self, key, value)
        if load_lr_scheduler_states and self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True,
                        exclude_frozen_parameters=False):
        # The keyword is spelled out: the HF Trainer looks for it in this signature before passing it.
        from .checkpoint import engine_io
        self.wait_params()
        return engine_io.save(self, save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest,
                              exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        from .checkpoint import engine_io
        self._settle()
        self.wait_params()
        return engine_io.load(self, load_dir, tag=tag, **kwargs)

    # -- whole weights (ZeRO-3 gathers them; runtime/zero/strategy.py full_state_dict) -------------

    def consolidated_16bit_state_dict(self) -> dict:
        """The module's state dict with every parameter whole, in its working dtype. Collective."""
        if self.zero is None:
            return self.module.state_dict()
        self._settle()
        return self.zero.full_state_dict(to_cpu=True)

    def module_state_dict(self, destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        """DeepSpeed's `engine.module_state_dict()`: full weights at every stage (collective when parameters
        are sharded)."""
        state = self.consolidated_16bit_state_dict() if self.config.sharding.parameters else \
            self.module.state_dict(prefix=prefix, keep_vars=keep_vars)
        if exclude_frozen_parameters:
            frozen = {n for n, p in self.module.named_parameters() if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        if destination is not None:
            destination.update(state)
            return destination
        return state

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters=False):
        """DeepSpeed's name: the whole 16-bit state dict on rank 0, None on other ranks. Collective."""
        state = self.module_state_dict(exclude_frozen_parameters=exclude_frozen_parameters)
        return state if self.global_rank == 0 else None

    def save_16bit_model(self, save_dir, save_filename="pytorch_model.bin", exclude_frozen_parameters=False) -> bool:
        """Rank 0 writes the whole model in its working dtype to `save_dir/save_filename`. With sharded
        parameters this needs `zero_optimization.stage3_gather_16bit_weights_on_model_save` (as DeepSpeed:
        otherwise it logs a warning, writes nothing and returns False). Collective."""
        if self.config.sharding.parameters and not self.config.zero.gather_16bit_weights_on_model_save:
            if self.global_rank == 0:
                log.warning("save_16bit_model: nothing saved, because parameters are sharded and "
                            "zero_optimization.stage3_gather_16bit_weights_on_model_save is false; set it to true, "
                            "or save a checkpoint and convert it with dsrun-to-fp32")
            return False
        from .checkpoint import engine_io
        return engine_io.save_16bit_model(self, save_dir, save_filename=save_filename,
                                          exclude_frozen_parameters=exclude_frozen_parameters)

    # -- teardown ----------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Remove every hook and free gradient buffers, masters and optimizer state. The module keeps
        its (working) weights, except sharded parameters (ZeRO-3), which stay released: take
        `module_state_dict()` first. The engine cannot train afterwards."""
        self._settle()
        self.monitor.close()
        if self.zero is not None:
            self.zero.destroy()
            self.zero = None
        self.lr_scheduler = None
        self.training_dataloader = None


def _cast_floating(obj, dtype):
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floating(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floating(v, dtype) for k, v in obj.items()}
    return obj


DeepSpeedEngine = Engine  # `from deepspeed.runtime.engine import DeepSpeedEngine`

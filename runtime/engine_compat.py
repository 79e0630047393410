"""`EngineCompat`: the DeepSpeedEngine methods DeepSpeed scripts and Hugging Face call, as a mixin of Engine.

Engine (runtime/engine.py) composes the runtime; this mixin adds DeepSpeed's surface over it using the
engine's public members (`config`, `module`, `loss_scaler`, `zero_optimization_stage()`, ...; `no_sync`
also saves and restores the engine's `_boundary_override`):
config getters (`steps_per_print()`, `zero_optimization_partition_gradients()`, `get_batch_info()`,
`dynamic_loss_scale()`, ...), runtime batch-size setters, `module_state_dict()`, `deepspeed_io()`,
`no_sync()`, and the
pieces Engine wires in itself: `compat_getattr` (unknown attributes name the engine) and
`optimizer_view` (the optimizer as `engine.optimizer`, with DeepSpeed's wrapper attributes
`loss_scaler`, `cur_scale`, `overflow`, `dynamic_loss_scale`).

[Note: no_sync] DeepSpeed's `no_sync()` skips the gradient all-reduce of the backward passes inside it
(stages 0-1; stages 2-3 reduce as they go and refuse it), and `step()` inside it is an error. Here a
backward inside the context is not an accumulation boundary (the engine's boundary override), so
stage 0-1 gradients accumulate locally and the next boundary backward outside reduces their sum; and
`step` is shadowed on the instance by a function raising DeepSpeed's AssertionError until the context
exits. ZeRO-1 without gradient accumulation reduces every backward (runtime/zero/reducer.py's
`shard_every_step`); inside `no_sync` it still does, which gives the same sums.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Tuple

import torch

__all__ = ["EngineCompat", "DeepSpeedOptimizerView", "optimizer_view", "compat_getattr", "PUBLIC_NAME"]

PUBLIC_NAME = "DeepSpeedEngine"


def compat_getattr(engine, name: str) -> Any:
    """What Engine.__getattr__ should return: for an engine that is a torch.nn.Module, its registered
    submodules, parameters and buffers first (nn.Module's own lookup); then the wrapped module's attribute
    (as DeepSpeed); else an AttributeError naming the engine, not the user's model. `name` reaches here
    only because ordinary lookup on the engine failed."""
    if isinstance(engine, torch.nn.Module):
        try:
            return torch.nn.Module.__getattr__(engine, name)
        except AttributeError:
            pass
    module = engine.__dict__.get("module")
    if module is None:  # not `or`: an empty nn.Sequential is falsy
        module = (engine.__dict__.get("_modules") or {}).get("module")
    if module is not None and name != "module":
        try:
            return getattr(module, name)
        except AttributeError:
            pass
    raise AttributeError(f"'{PUBLIC_NAME}' object has no attribute {name!r}")


class EngineCompat:
    """DeepSpeed's engine surface over dsrun's Engine (see the module docstring)."""

    inside_no_sync_ctxt = False

    # -- batch configuration -----------------------------------------------------------------------------

    def set_train_micro_batch_size(self, micro_batch_size: int) -> None:
        """Change the micro batch size, keeping gradient accumulation steps (the global batch follows)."""
        gas = self.gradient_accumulation_steps()
        self._replace_batch(micro_batch_size * gas * self.dp_world_size, micro_batch_size, gas)

    # -- config getters ----------------------------------------------------------------------------------

    def steps_per_print(self) -> Optional[int]:
        """Progress-log interval; None when never (absent, 0 or Infinity), as DeepSpeed's default."""
        return self.config.steps_per_print or None

    def zero_optimization(self) -> bool:
        return self.config.sharding.any

    def zero_optimization_partition_gradients(self) -> bool:
        return self.config.sharding.gradients

    def zero_optimization_partition_weights(self) -> bool:
        return self.config.sharding.parameters

    def zero_offload_optimizer(self):
        return self.config.zero.offload_optimizer

    def zero_offload_param(self):
        return self.config.zero.offload_param

    def zero_cpu_offload(self) -> bool:
        return self.config.zero.offload_optimizer_device == "cpu"

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        """`zero_optimization.stage3_gather_16bit_weights_on_model_save`: whether saving the model may gather
        sharded parameters (Accelerate's `get_state_dict` asks before `_zero3_consolidated_16bit_state_dict`)."""
        return self.config.zero.gather_16bit_weights_on_model_save

    def zero_allow_untested_optimizer(self) -> bool:
        return self.config.zero_allow_untested_optimizer

    def dynamic_loss_scale(self) -> bool:
        """DeepSpeed's reading: `fp16.loss_scale == 0` (true also when fp16 is off)."""
        return self.config.fp16.loss_scale == 0

    def initial_dynamic_scale(self) -> float:
        return float(2 ** self.config.fp16.initial_scale_power)

    def dynamic_loss_scale_args(self) -> Optional[dict]:
        fp16 = self.config.fp16
        if not (fp16.enabled and fp16.dynamic_loss_scale):
            return None
        return {"init_scale": self.initial_dynamic_scale(), "scale_window": fp16.loss_scale_window,
                "delayed_shift": fp16.hysteresis, "consecutive_hysteresis": fp16.consecutive_hysteresis,
                "min_scale": fp16.min_loss_scale}

    def get_data_types(self) -> Tuple[torch.dtype, torch.dtype]:
        """(model dtype, gradient accumulation dtype)."""
        from .config.policies import torch_dtype
        return torch_dtype(self.config.precision.param_dtype), torch_dtype(self.config.precision.grad_accum_dtype)

    def wall_clock_breakdown(self) -> bool:
        return self.config.wall_clock_breakdown

    def memory_breakdown(self) -> bool:
        return bool(self.config.top.memory_breakdown)

    def optimizer_name(self) -> Optional[str]:
        return self.config.optimizer.type if self.config.optimizer is not None else None

    def optimizer_params(self) -> Optional[dict]:
        return dict(self.config.optimizer.params) if self.config.optimizer is not None else None

    def scheduler_name(self) -> Optional[str]:
        return self.config.scheduler.type if self.config.scheduler is not None else None

    def scheduler_params(self) -> Optional[dict]:
        return dict(self.config.scheduler.params) if self.config.scheduler is not None else None

    # -- module state ------------------------------------------------------------------------------------

    def module_state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False,
                          exclude_frozen_parameters: bool = False) -> dict:
        """The module's state_dict (current weights), optionally without frozen parameters."""
        self.wait_params()
        sd = self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if exclude_frozen_parameters:
            for name, p in self.module.named_parameters():
                if not p.requires_grad:
                    sd.pop(prefix + name, None)
        return sd

    # -- data ------------------------------------------------------------------------------------------

    def deepspeed_io(self, dataset, batch_size=None, route=None, pin_memory=True, data_sampler=None,
                     collate_fn=None, num_local_io_workers=None):
        """DeepSpeed's loader over `dataset` (its unit tests build theirs with it): `batch_size` (default the
        micro batch) samples per batch from `data_sampler`, else from this rank's DistributedSampler shard
        of the data-parallel group, as `initialize(training_data=...)` builds. Pinned only on a GPU."""
        import torch.distributed as dist
        from torch.utils.data import DataLoader
        from .dataloader import build_dataloader
        batch = batch_size or self.train_micro_batch_size_per_gpu()
        pin = bool(pin_memory) and self.device.type == "cuda"
        workers = num_local_io_workers or 0
        if data_sampler is not None:
            return DataLoader(dataset, batch_size=batch, sampler=data_sampler, collate_fn=collate_fn,
                              num_workers=workers, pin_memory=pin)
        return build_dataloader(dataset, micro_batch_size=batch, rank=dist.get_rank(self.dp_group),
                                world_size=self.dp_world_size, collate_fn=collate_fn, num_workers=workers,
                                pin_memory=pin)

    # -- no_sync -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate without reducing ([Note: no_sync]); stages 0-1 only."""
        assert not self.zero_optimization_partition_gradients(), (
            "no_sync context manager is incompatible with gradient partitioning logic of ZeRO stage "
            f"{self.zero_optimization_stage()}")
        assert not self.inside_no_sync_ctxt, "no_sync context manager reentry is unsupported"
        saved = getattr(self, "_boundary_override", None)
        self.inside_no_sync_ctxt = True
        self.step = _step_inside_no_sync
        self.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            del self.step
            self.inside_no_sync_ctxt = False
            self._boundary_override = saved


def _step_inside_no_sync(*args, **kwargs):
    raise AssertionError("It is illegal to call Engine.step() inside no_sync context manager")


_VIEW_CLASSES: dict = {}


def optimizer_view(optimizer: torch.optim.Optimizer, engine) -> "DeepSpeedOptimizerView":
    """`optimizer` as DeepSpeed scripts see `engine.optimizer`: a `DeepSpeedOptimizerView` that is also an
    instance of the optimizer's own class (`isinstance(view, torch.optim.SGD)` holds for an SGD). Engine
    keeps passing the optimizer itself to the sharding layer, which asks for its exact type."""
    if isinstance(optimizer, DeepSpeedOptimizerView):  # already a view: of this engine, or re-viewed
        return optimizer if optimizer._engine is engine else optimizer_view(optimizer.optimizer, engine)
    base = type(optimizer)
    cls = _VIEW_CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (DeepSpeedOptimizerView, base), {"__module__": __name__,
                                                                    "__qualname__": f"view of {base.__qualname__}"})
        _VIEW_CLASSES[base] = cls
    return cls(optimizer, engine)


class DeepSpeedOptimizerView(torch.optim.Optimizer):
    """The optimizer as DeepSpeed scripts see `engine.optimizer`: the torch optimizer itself (param groups,
    state, step, state_dict are its own) plus the loss-scaling attributes of DeepSpeed's wrappers,
    read live from the engine: `loss_scaler`, `cur_scale`, `dynamic_loss_scale`, and `overflow` (the last
    accumulation-boundary step was skipped). A torch Optimizer subclass, so LR schedulers accept it;
    its `__init__` is not torch's (nothing is copied)."""

    def __init__(self, optimizer: torch.optim.Optimizer, engine):  # not torch's __init__: nothing to register
        self.optimizer = optimizer  # as DeepSpeed's wrappers: `.optimizer` is the wrapped one
        self._engine = engine

    def __getattr__(self, name):
        # only for names the view lacks; attributes set on the view (an LR scheduler's step patch) stay on it
        if name in ("optimizer", "_engine"):
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    def __repr__(self) -> str:
        return f"DeepSpeedOptimizerView({self.optimizer!r})"

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def step(self, *args, **kwargs):
        return self.optimizer.step(*args, **kwargs)

    def zero_grad(self, set_to_none: bool = True):
        return self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        return self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group):
        return self.optimizer.add_param_group(param_group)

    @property
    def loss_scaler(self):
        return self._engine.loss_scaler

    @property
    def cur_scale(self) -> float:
        return self._engine.loss_scaler.cur_scale

    @property
    def dynamic_loss_scale(self) -> bool:
        return self._engine.loss_scaler.dynamic

    @property
    def overflow(self) -> bool:
        """Whether the last step() was an accumulation boundary whose update was skipped."""
        engine = self._engine
        steps = engine.micro_steps
        at_boundary = steps > 0 and steps % engine.gradient_accumulation_steps() == 0
        return at_boundary and not engine.was_step_applied()

"""DeepSpeed's learning-rate schedules: WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest.

Importable as `dsrun.runtime.lr_schedules`, so `from deepspeed.runtime.lr_schedules import WarmupLR`
becomes `from dsrun.runtime.lr_schedules import WarmupLR` (and `deepspeed.runtime.lr_schedules` works
after `import dsrun as deepspeed`). Parameter names, defaults and curves follow DeepSpeed
(reference/deepspeed-runtime.md section 1.4). Every schedule counts optimizer steps in
`last_batch_iteration` (-1 before the first `step()`), sets each param group's lr on construction and on
every `step()`, and saves `{'last_batch_iteration': n}` as its state.

Deliberate differences from DeepSpeed, each a fix of a DeepSpeed bug:
- `load_state_dict` re-applies the restored lr (and momentum) to the optimizer, so the optimizer agrees
  with `get_lr()` right after a resume even when optimizer states were not loaded.
- OneCycle cycles SGD's `momentum` too (DeepSpeed only knows Adam's `betas` and disables cycling
  otherwise), and keeps each group's own beta2 (DeepSpeed overwrites it with 0.99).

`build_scheduler(sched_config, optimizer)` is what the engine calls for the config's `scheduler`
section: a dsrun schedule by name, else a `torch.optim.lr_scheduler` class, with user errors raised as
`ConfigError` naming `scheduler.type` or `scheduler.params.<key>`.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import math
import numbers

import torch

from dsrun.errors import ConfigError
from dsrun.runtime.log import warn_once_rank0

logger = logging.getLogger(__name__)  # a child of dsrun's logger (runtime/log.py)

__all__ = ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest", "build_scheduler",
           "VALID_LR_SCHEDULES", "get_torch_optimizer"]

# DeepSpeed's public constant names (scripts import them).
LR_SCHEDULE = "lr_schedule"
LR_RANGE_TEST = "LRRangeTest"
ONE_CYCLE = "OneCycle"
WARMUP_LR = "WarmupLR"
WARMUP_DECAY_LR = "WarmupDecayLR"
WARMUP_COSINE_LR = "WarmupCosineLR"
VALID_LR_SCHEDULES = [LR_RANGE_TEST, ONE_CYCLE, WARMUP_LR, WARMUP_DECAY_LR, WARMUP_COSINE_LR]

LR_RANGE_TEST_MIN_LR = "lr_range_test_min_lr"
LR_RANGE_TEST_STEP_RATE = "lr_range_test_step_rate"
LR_RANGE_TEST_STEP_SIZE = "lr_range_test_step_size"
LR_RANGE_TEST_STAIRCASE = "lr_range_test_staircase"
CYCLE_FIRST_STEP_SIZE = "cycle_first_step_size"
CYCLE_FIRST_STAIR_COUNT = "cycle_first_stair_count"
CYCLE_SECOND_STEP_SIZE = "cycle_second_step_size"
CYCLE_SECOND_STAIR_COUNT = "cycle_second_stair_count"
DECAY_STEP_SIZE = "decay_step_size"
CYCLE_MIN_LR = "cycle_min_lr"
CYCLE_MAX_LR = "cycle_max_lr"
DECAY_LR_RATE = "decay_lr_rate"
CYCLE_MOMENTUM = "cycle_momentum"
CYCLE_MIN_MOM = "cycle_min_mom"
CYCLE_MAX_MOM = "cycle_max_mom"
DECAY_MOM_RATE = "decay_mom_rate"
WARMUP_MIN_LR = "warmup_min_lr"
WARMUP_MAX_LR = "warmup_max_lr"
WARMUP_NUM_STEPS = "warmup_num_steps"
WARMUP_TYPE = "warmup_type"
WARMUP_LOG_RATE = "log"
WARMUP_LINEAR_RATE = "linear"
WARMUP_MIN_RATIO = "warmup_min_ratio"
COS_MIN_RATIO = "cos_min_ratio"
TOTAL_NUM_STEPS = "total_num_steps"


class ScheduleParamError(ValueError):
    """A bad schedule parameter; `key` names it so `build_scheduler` can point at `scheduler.params.<key>`.
    A ValueError, as DeepSpeed raises for direct construction."""

    def __init__(self, key, message):
        self.key = key
        super().__init__(f"{key}: {message}")


def get_torch_optimizer(optimizer):
    """The object holding `param_groups`: the optimizer itself or the one a wrapper keeps in `.optimizer`."""
    if hasattr(optimizer, "param_groups"):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and hasattr(inner, "param_groups"):
        return inner
    raise TypeError(f"{type(optimizer).__name__} is not an optimizer (it has no param_groups)")


def _set_group_value(group, key, value):
    """Set `group[key]`, filling a tensor-valued entry in place so its identity, dtype and shape survive."""
    current = group.get(key)
    if torch.is_tensor(current):
        with torch.no_grad():
            current.fill_(value)
    else:
        group[key] = value


def _per_group(optimizer, value, name):
    groups = optimizer.param_groups
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ScheduleParamError(name, f"expected {len(groups)} values (one per param group), got {len(value)}")
        return list(value)
    return [value] * len(groups)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ScheduleParamError(name, f"must be a positive integer, got {value!r}")
    return int(value)


def _check_warmup_type(warmup_type):
    if warmup_type not in (WARMUP_LOG_RATE, WARMUP_LINEAR_RATE):
        warn_once_rank0("unknown warmup_type %r; using 'log' (choices: 'log', 'linear')", warmup_type, logger=logger)
        return WARMUP_LOG_RATE
    return warmup_type


def _as_float(x):
    return float(x.item()) if torch.is_tensor(x) else x


class _Schedule:
    """Shared stepping, state and optimizer-writing logic; subclasses implement `get_lr()`."""

    def __init__(self, optimizer, last_batch_iteration):
        self.optimizer = get_torch_optimizer(optimizer)
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = None

    def get_lr(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def get_last_lr(self):
        """The lrs written to the optimizer by the last `step()` (or by construction)."""
        assert self._last_lr is not None, "need to call step() first"
        return self._last_lr

    def step(self, last_batch_iteration=None):
        """Advance one optimizer step (or jump to `last_batch_iteration`) and write the new lr."""
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._apply()

    def _apply(self):
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            _set_group_value(group, "lr", lr)
        self._last_lr = [_as_float(lr) for lr in lrs]

    def state_dict(self):
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, sd):
        self.last_batch_iteration = sd["last_batch_iteration"]
        self._apply()


class LRRangeTest(_Schedule):
    """LR range test: `lr = min_lr * (1 + step_rate * interval)`, where `interval` is
    `(t + 1) / step_size`, floored when `lr_range_test_staircase`.

    Args:
        optimizer: the optimizer (or a wrapper holding it in `.optimizer`).
        lr_range_test_min_lr (float or list): starting lr per group. Default 1e-3.
        lr_range_test_step_size (int): steps per interval. Default 2000.
        lr_range_test_step_rate (float): growth per interval. Default 1.0.
        lr_range_test_staircase (bool): grow in whole intervals. Default False.
        last_batch_iteration (int): index of the last step taken; -1 starts fresh.
    """

    def __init__(self, optimizer, lr_range_test_min_lr=1e-3, lr_range_test_step_size=2000,
                 lr_range_test_step_rate=1.0, lr_range_test_staircase=False, last_batch_iteration=-1):
        super().__init__(optimizer, last_batch_iteration)
        self.step_size = _check_positive_int(LR_RANGE_TEST_STEP_SIZE, lr_range_test_step_size)
        self.min_lr = _per_group(self.optimizer, lr_range_test_min_lr, LR_RANGE_TEST_MIN_LR)
        self.step_rate = lr_range_test_step_rate
        self.staircase = bool(lr_range_test_staircase)
        if last_batch_iteration == -1:
            for group, lr in zip(self.optimizer.param_groups, self.min_lr):
                _set_group_value(group, "lr", lr)
            self._last_lr = list(self.min_lr)

    def _interval(self):
        interval = float(self.last_batch_iteration + 1) / self.step_size
        return math.floor(interval) if self.staircase else interval

    def get_lr(self):
        increase = 1 + self.step_rate * self._interval()
        return [lr * increase for lr in self.min_lr]


class OneCycle(_Schedule):
    """1Cycle: lr rises from `cycle_min_lr` to `cycle_max_lr` over `cycle_first_step_size` steps, falls back
    over `cycle_second_step_size`, then decays as `min_lr / (1 + decay_lr_rate * k / decay_step_size)`.
    Momentum (Adam's beta1 or SGD's momentum) moves inversely between `cycle_max_mom` and `cycle_min_mom`,
    then grows as `max_mom * (1 + decay_mom_rate * k / decay_step_size)`. Stair counts hold the value flat
    in that many stairs per half cycle (0: continuous). Parameters and defaults are DeepSpeed's.
    """

    def __init__(self, optimizer, cycle_min_lr, cycle_max_lr, decay_lr_rate=0., cycle_first_step_size=2000,
                 cycle_second_step_size=None, cycle_first_stair_count=0, cycle_second_stair_count=None,
                 decay_step_size=0, cycle_momentum=True, cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0.,
                 last_batch_iteration=-1):
        super().__init__(optimizer, last_batch_iteration)
        self._init_cycle(cycle_first_step_size, cycle_second_step_size, cycle_first_stair_count,
                         cycle_second_stair_count, decay_step_size)
        self.min_lrs = _per_group(self.optimizer, cycle_min_lr, CYCLE_MIN_LR)
        self.max_lrs = _per_group(self.optimizer, cycle_max_lr, CYCLE_MAX_LR)
        self.decay_lr_rate = decay_lr_rate
        self.skip_lr_decay = self.no_decay or math.isclose(decay_lr_rate, 0)
        self.min_moms = _per_group(self.optimizer, cycle_min_mom, CYCLE_MIN_MOM)
        self.max_moms = _per_group(self.optimizer, cycle_max_mom, CYCLE_MAX_MOM)
        self.decay_mom_rate = decay_mom_rate
        self.skip_mom_decay = self.no_decay or math.isclose(decay_mom_rate, 0)
        self.cycle_momentum = bool(cycle_momentum) and self._momentum_key() is not None
        if cycle_momentum and not self.cycle_momentum:
            warn_once_rank0("cycle_momentum is disabled: %s has neither 'betas' nor 'momentum' in its defaults",
                           type(self.optimizer).__name__, logger=logger)
        if last_batch_iteration == -1:
            # As DeepSpeed: start at the cycle's lower bounds (lr at min_lr, momentum at min_mom).
            for group, lr in zip(self.optimizer.param_groups, self.min_lrs):
                _set_group_value(group, "lr", lr)
            self._last_lr = list(self.min_lrs)
            if self.cycle_momentum:
                self._write_momentum(self.min_moms)

    def _init_cycle(self, first, second, first_stairs, second_stairs, decay_step_size):
        if isinstance(first, bool) or not isinstance(first, numbers.Real) or first <= 0:
            raise ScheduleParamError(CYCLE_FIRST_STEP_SIZE, f"must be a positive number of steps, got {first!r}")
        second = first if second is None else second
        if isinstance(second, bool) or not isinstance(second, numbers.Real) or second < 0:
            raise ScheduleParamError(CYCLE_SECOND_STEP_SIZE, f"must be a non-negative number of steps, got {second!r}")
        self.first_step_size = float(first)
        self.second_step_size = float(second)
        self.total_size = self.first_step_size + self.second_step_size
        self.step_ratio = self.first_step_size / self.total_size
        self.first_stair_count = first_stairs or 0
        self.second_stair_count = self.first_stair_count if second_stairs is None else second_stairs
        self.decay_step_size = decay_step_size
        self.no_decay = math.isclose(decay_step_size, 0)

    def _momentum_key(self):
        defaults = getattr(self.optimizer, "defaults", {}) or {}
        if "betas" in defaults:
            return "betas"
        if "momentum" in defaults:
            return "momentum"
        return None

    def _write_momentum(self, moms):
        key = self._momentum_key()
        for group, mom in zip(self.optimizer.param_groups, moms):
            if key == "betas":
                group["betas"] = (mom, group["betas"][1])
            else:
                group["momentum"] = mom

    def _scale_factor(self):
        t = self.last_batch_iteration + 1
        cycle = math.floor(1 + t / self.total_size)
        x = 1. + t / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:
            # Quantise from the integer position in the cycle, not from `scale`: at a half-cycle boundary the
            # float scale can sit 1e-16 under a whole stair and flooring it would drop a stair (or the peak).
            pos = t % self.total_size
            if pos <= self.first_step_size:
                position = pos * stairs / self.first_step_size
            else:
                position = (self.total_size - pos) * stairs / self.second_step_size
            scale = math.floor(position) / stairs
        return scale

    def get_lr(self):
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            return [lo + (hi - lo) * scale for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        k = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [lo / (1 + self.decay_lr_rate * k) for lo in self.min_lrs]

    def get_mom(self):
        """Per group `(beta1, beta2)` for Adam-like optimizers, or the momentum for SGD; None when not cycling."""
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            moms = [hi - (hi - lo) * scale for lo, hi in zip(self.min_moms, self.max_moms)]
        elif self.skip_mom_decay:
            moms = list(self.max_moms)
        else:
            k = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
            moms = [hi * (1 + self.decay_mom_rate * k) for hi in self.max_moms]
        if self._momentum_key() == "betas":
            return [(m, g["betas"][1]) for m, g in zip(moms, self.optimizer.param_groups)]
        return moms

    def _apply(self):
        super()._apply()
        if self.cycle_momentum:
            moms = self.get_mom()
            self._write_momentum([m[0] if isinstance(m, tuple) else m for m in moms])


class WarmupLR(_Schedule):
    """Warm the lr up from `warmup_min_lr` to `warmup_max_lr` over `warmup_num_steps`, then hold it.

    `lr = min + (max - min) * gamma`, `gamma = log(t + 1) / log(N)` ('log') or `t / N` ('linear') for
    `t < N`, else 1. `N` is clamped to at least 2. `warmup_max_lr=None` takes each group's current lr.
    """

    def __init__(self, optimizer, warmup_min_lr=0.0, warmup_max_lr=None, warmup_num_steps=1000,
                 warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        warmup_num_steps = _check_positive_int(WARMUP_NUM_STEPS, warmup_num_steps)
        super().__init__(optimizer, last_batch_iteration)
        if warmup_max_lr is None:
            warmup_max_lr = [_as_float(group["lr"]) for group in self.optimizer.param_groups]
        self.min_lrs = _per_group(self.optimizer, warmup_min_lr, WARMUP_MIN_LR)
        self.max_lrs = _per_group(self.optimizer, warmup_max_lr, WARMUP_MAX_LR)
        self.delta_lrs = [hi - lo for hi, lo in zip(self.max_lrs, self.min_lrs)]
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = _check_warmup_type(warmup_type)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        if last_batch_iteration == -1:
            self._apply()

    def _warmup_gamma(self):
        if self.warmup_type == WARMUP_LOG_RATE:
            return self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
        return self.last_batch_iteration / self.warmup_num_steps

    def _get_gamma(self):
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return 1.0

    def get_lr(self):
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._get_gamma()
        return [lo + delta * gamma for lo, delta in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at `total_num_steps`: `gamma = max(0, (T - t) / max(1, T - N))`.
    `warmup_max_lr` defaults to 0.001 (DeepSpeed's default for this schedule)."""

    def __init__(self, optimizer, total_num_steps, warmup_min_lr=0.0, warmup_max_lr=0.001, warmup_num_steps=1000,
                 warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        self.total_num_steps = _check_positive_int(TOTAL_NUM_STEPS, total_num_steps)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        if self.total_num_steps < self.warmup_num_steps:
            warn_once_rank0("total_num_steps %s is less than warmup_num_steps %s", total_num_steps, warmup_num_steps,
                            logger=logger)

    def _get_gamma(self):
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return max(0.0, float(self.total_num_steps - self.last_batch_iteration) /
                   float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_Schedule):
    """Ratio schedule on each group's initial lr: warm up from `warmup_min_ratio` to 1 over
    `warmup_num_steps` (log or linear), then cosine-decay to `cos_min_ratio` at `total_num_steps` and stay.
    """

    def __init__(self, optimizer, total_num_steps, warmup_min_ratio=0.0, warmup_num_steps=1000,
                 cos_min_ratio=0.0001, warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        warmup_num_steps = _check_positive_int(WARMUP_NUM_STEPS, warmup_num_steps)
        super().__init__(optimizer, last_batch_iteration)
        self.total_num_steps = _check_positive_int(TOTAL_NUM_STEPS, total_num_steps)
        self.cos_min_ratio = cos_min_ratio
        self.warmup_type = _check_warmup_type(warmup_type)
        self.warmup_min_ratio = warmup_min_ratio
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        if self.total_num_steps < self.warmup_num_steps:
            warn_once_rank0("total_num_steps %s is less than warmup_num_steps %s", total_num_steps, warmup_num_steps,
                            logger=logger)
        self.org_lrs = [_as_float(group["lr"]) for group in self.optimizer.param_groups]
        if last_batch_iteration == -1:
            self._apply()

    def get_lr_ratio(self):
        t = self.last_batch_iteration
        if t < 0:
            return 0.0
        if t < self.warmup_num_steps:
            if self.warmup_type == WARMUP_LOG_RATE:
                ratio = self.inverse_log_warm_up * math.log(t + 1)
            else:
                ratio = t / self.warmup_num_steps
            return self.warmup_min_ratio + ratio * (1. - self.warmup_min_ratio)
        progress = (t - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps)
        cosine = (1 + math.cos(math.pi * min(1.0, progress))) / 2
        return max(0.0, self.cos_min_ratio + (1. - self.cos_min_ratio) * cosine)

    def get_lr(self):
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.org_lrs]


_SCHEDULES = {cls.__name__: cls for cls in (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest)}


def _torch_schedules():
    from torch.optim import lr_scheduler

    return {name: obj for name, obj in vars(lr_scheduler).items()
            if inspect.isclass(obj) and issubclass(obj, lr_scheduler.LRScheduler) and not name.startswith("_")
            and name not in ("LRScheduler", "_LRScheduler")}


def _check_param_names(cls, params):
    signature = inspect.signature(cls.__init__)
    accepted = [name for name in signature.parameters if name not in ("self", "optimizer")]
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return
    for key in params:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"{cls.__name__} accepts: {', '.join(accepted)}"
            raise ConfigError(f"unknown parameter for {cls.__name__}", where=f"scheduler.params.{key}", hint=hint)
    required = [name for name, p in signature.parameters.items()
                if name not in ("self", "optimizer") and p.default is p.empty and p.kind is not p.VAR_POSITIONAL]
    for name in required:
        if name not in params:
            raise ConfigError(f"{cls.__name__} requires this parameter", where=f"scheduler.params.{name}")


def build_scheduler(sched_config, optimizer):
    """Build the config's scheduler: `sched_config.type` (a dsrun schedule or a `torch.optim.lr_scheduler`
    class name) with `sched_config.params` as keyword arguments. Returns None when there is no type.

    Raises ConfigError naming `scheduler.type` (unknown name, with a did-you-mean) or
    `scheduler.params.<key>` (unknown, missing, unresolved "auto" or invalid value).
    """
    if sched_config is None or getattr(sched_config, "type", None) is None:
        return None
    name = sched_config.type
    params = dict(getattr(sched_config, "params", None) or {})
    torch_schedules = _torch_schedules()
    cls = _SCHEDULES.get(name) or torch_schedules.get(name)
    if cls is None:
        choices = list(_SCHEDULES) + sorted(torch_schedules)
        close = difflib.get_close_matches(str(name), choices, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "choices: " + ", ".join(choices)
        raise ConfigError(f"unknown scheduler type {name!r}", where="scheduler.type", hint=hint)
    for key, value in params.items():
        if isinstance(value, str) and value == "auto":
            raise ConfigError('"auto" could not be resolved here; set a value', where=f"scheduler.params.{key}")
    if cls is not None and name in _SCHEDULES:
        for key in (WARMUP_NUM_STEPS, TOTAL_NUM_STEPS):
            if key in params and (isinstance(params[key], bool) or not isinstance(params[key], numbers.Integral)
                                  or params[key] <= 0):
                raise ConfigError(f"must be a positive integer, got {params[key]!r}", where=f"scheduler.params.{key}")
    _check_param_names(cls, params)
    target = optimizer if name in _SCHEDULES else _unwrap_torch_optimizer(optimizer)
    try:
        return cls(target, **params)
    except ScheduleParamError as err:
        raise ConfigError(str(err).split(": ", 1)[-1], where=f"scheduler.params.{err.key}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} rejected its params: {err}", where="scheduler.params") from None


def _unwrap_torch_optimizer(optimizer):
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    return optimizer

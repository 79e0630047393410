"""`optimizer` and `scheduler` sections (reference section 1.3, 1.4).

Optimizer `type` resolution (as DeepSpeed): a DeepSpeed name matches case-insensitively (`Adam`,
`AdamW`, `SGD`, `Adagrad`, `Lamb`); any other name must be a `torch.optim` class, matched
case-sensitively (`RMSprop`). DeepSpeed optimizers dsrun does not implement (1-bit Adam/Lamb, 0/1 Adam,
muP, Muon, Lion) are rejected with a message that says so. `OptimizerConfig.name` is the canonical
form: the lower-case DeepSpeed name, or the torch class name.

Scheduler `type`: a DeepSpeed schedule (`WarmupLR`, `WarmupDecayLR`, `WarmupCosineLR`, `OneCycle`,
`LRRangeTest`), else a `torch.optim.lr_scheduler` class; both case-sensitive, as in DeepSpeed.

torch is never imported here (see _TORCH_OPTIMIZERS).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict

from dsrun.errors import ConfigError

from .schema import Section, did_you_mean, join, opt

__all__ = ["OptimizerConfig", "SchedulerConfig", "DS_OPTIMIZERS", "UNSUPPORTED_OPTIMIZERS", "DS_SCHEDULERS"]

DS_OPTIMIZERS = ("adam", "adamw", "sgd", "adagrad", "lamb")
UNSUPPORTED_OPTIMIZERS = ("onebitadam", "zerooneadam", "onebitlamb", "muadam", "muadamw", "musgd", "muon", "lion")
DS_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest")
_DS_DISPLAY = ("Adam", "AdamW", "SGD", "Adagrad", "Lamb")


# torch 2.13's classes. Checked without importing torch, so that loading a config stays fast and
# torch-free; when torch is already imported (always, in a worker) its live class list is added, so a
# newer torch's classes are accepted too.
_TORCH_OPTIMIZERS = ("ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "Muon", "NAdam",
                     "RAdam", "RMSprop", "Rprop", "SGD", "SparseAdam")
_TORCH_SCHEDULERS = ("ChainedScheduler", "ConstantLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR",
                     "ExponentialLR", "LambdaLR", "LinearLR", "MultiStepLR", "MultiplicativeLR", "OneCycleLR",
                     "PolynomialLR", "ReduceLROnPlateau", "SequentialLR", "StepLR")


def _torch_names(module_name: str, base_name: str, static) -> list:
    module = sys.modules.get(module_name)
    base = getattr(module, base_name, None) if module is not None else None
    if base is None:
        return list(static)
    live = [n for n in dir(module) if not n.startswith("_") and isinstance(getattr(module, n), type)
            and issubclass(getattr(module, n), base) and getattr(module, n) is not base]
    return sorted(set(static) | set(live))


def _torch_optimizers():
    return _torch_names("torch.optim", "Optimizer", _TORCH_OPTIMIZERS)


def _torch_schedulers():
    return _torch_names("torch.optim.lr_scheduler", "LRScheduler", _TORCH_SCHEDULERS)


@dataclass(frozen=True)
class OptimizerConfig(Section):
    type: str = opt()
    params: Dict[str, Any] = opt(factory=dict)
    legacy_fusion: bool = opt(False, inert="a legacy DeepSpeed switch")

    # DeepSpeed reads `torch_adam` from `params` only ([Note: inert keys] in schema.py)
    _INERT = {"torch_adam": "DeepSpeed reads optimizer.params.torch_adam, not optimizer.torch_adam; move it into "
                            "params"}

    @property
    def name(self) -> str:
        """Canonical optimizer name: lower-case DeepSpeed name, or the torch.optim class name."""
        return self.type.lower() if self.type.lower() in DS_OPTIMIZERS else self.type

    @property
    def is_torch(self) -> bool:
        """True when `type` names a torch.optim class that is not one of DeepSpeed's names."""
        return self.type.lower() not in DS_OPTIMIZERS

    def _check(self, where: str) -> None:
        where_type = join(where, "type")
        lowered = self.type.lower()
        if lowered in UNSUPPORTED_OPTIMIZERS:
            raise ConfigError(f"optimizer '{self.type}' is a DeepSpeed optimizer that dsrun does not support",
                              where=where_type, hint="use one of " + ", ".join(_DS_DISPLAY)
                              + " or a torch.optim class name")
        if lowered not in DS_OPTIMIZERS and self.type not in _torch_optimizers():
            options = list(_DS_DISPLAY) + _torch_optimizers()
            guess = did_you_mean(self.type, options)
            suggestion = f" (did you mean '{guess}'?)" if guess else ""
            raise ConfigError(f"unknown optimizer type '{self.type}'{suggestion}", where=where_type,
                              hint="DeepSpeed names (any case): " + ", ".join(_DS_DISPLAY)
                              + "; or a torch.optim class name (exact case)")
        if "max_grad_norm" in self.params:
            raise ConfigError("'max_grad_norm' is not an optimizer parameter",
                              where=join(where, "params.max_grad_norm"),
                              hint="use the top-level 'gradient_clipping' key instead")


@dataclass(frozen=True)
class SchedulerConfig(Section):
    type: str = opt()
    params: Dict[str, Any] = opt(factory=dict)

    @property
    def is_torch(self) -> bool:
        return self.type not in DS_SCHEDULERS

    def _check(self, where: str) -> None:
        if self.type in DS_SCHEDULERS or self.type in _torch_schedulers():
            return
        guess = did_you_mean(self.type, list(DS_SCHEDULERS) + _torch_schedulers())
        raise ConfigError(f"unknown scheduler type '{self.type}'" + (f" (did you mean '{guess}'?)" if guess else ""),
                          where=join(where, "type"), hint="DeepSpeed schedules: " + ", ".join(DS_SCHEDULERS)
                          + "; or a torch.optim.lr_scheduler class name (exact case)")

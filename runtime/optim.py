"""build_optimizer: the one place a config `"optimizer"` section becomes an optimizer object.

Resolution (reference deepspeed-runtime.md 1.3): `adam`/`adamw` (case-insensitive) -> dsrun.kernels
FusedAdam on CUDA or CPUAdam when the optimizer is offloaded, if those kernels exist, else
`torch.optim.AdamW` (`adam_w_mode` true, the DeepSpeed default) or `torch.optim.Adam`, fused on CUDA;
`torch_adam: true` forces torch. `adagrad` with the optimizer offloaded -> CPUAdagrad. `lamb` -> runtime/lamb.py. `adagrad`, `sgd`, `lion`... : the case-insensitive DeepSpeed names we
support map to torch; any other `type` is looked up case-sensitively in `torch.optim`.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from dsrun.errors import ConfigError

__all__ = ["build_optimizer"]

_ADAM_EXTRA = ("torch_adam", "adam_w_mode", "fp32_optimizer_states")
_TORCH_NAMES = {"adagrad": "Adagrad", "sgd": "SGD", "rmsprop": "RMSprop", "adamax": "Adamax", "nadam": "NAdam",
                "radam": "RAdam"}


def _kernel(name: str):
    try:
        import dsrun.kernels as kernels
        return getattr(kernels, name, None)
    except Exception:  # kernels not built or broken: the torch fallback is always correct
        return None


def build_optimizer(opt_config, params, *, offload, device) -> torch.optim.Optimizer:
    """Build the optimizer named by `opt_config` (`.type`, `.params`) over `params`.

    Args:
        opt_config: the config's optimizer section.
        params: parameters or param-group dicts (as torch optimizers take them).
        offload: `OffloadPolicy`; optimizer offload selects CPUAdam when it exists.
        device: the training device (CUDA selects fused implementations).
    """
    kind = str(opt_config.type)
    kwargs: Dict[str, Any] = dict(opt_config.params or {})
    if "max_grad_norm" in kwargs:
        raise ConfigError("'max_grad_norm' is not an optimizer parameter",
                          where="optimizer.params.max_grad_norm", hint="use the top-level 'gradient_clipping'")
    cuda = torch.device(device).type == "cuda"
    lower = kind.lower()
    if lower in ("adam", "adamw"):
        torch_adam = bool(kwargs.pop("torch_adam", False))
        adam_w_mode = bool(kwargs.pop("adam_w_mode", True)) if lower == "adam" else True
        fp32_states = kwargs.pop("fp32_optimizer_states", True)
        bias_correction = kwargs.pop("bias_correction", True)
        offloaded = getattr(getattr(offload, "optimizer", None), "value", "none") != "none"
        if not torch_adam:
            cls = _kernel("CPUAdam" if offloaded else "FusedAdam") if (offloaded or cuda) else None
            if cls is not None:  # the kernels keep DeepSpeed's two spellings of the AdamW switch
                mode = ({"adamw_mode": adam_w_mode, "fp32_optimizer_states": fp32_states} if offloaded
                        else {"adam_w_mode": adam_w_mode})
                return _construct(cls, params, dict(kwargs, bias_correction=bias_correction, **mode), kind)
        cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
        if cuda and not offloaded:
            kwargs.setdefault("fused", True)
        return _construct(cls, params, kwargs, kind)
    if lower == "lamb":
        from .lamb import Lamb
        return _construct(Lamb, params, kwargs, kind)
    if lower == "adagrad" and getattr(getattr(offload, "optimizer", None), "value", "none") != "none":
        cls = _kernel("CPUAdagrad")  # the fused CPU kernel for the offloaded step
        if cls is not None:
            return _construct(cls, params, kwargs, kind)
    name = _TORCH_NAMES.get(lower, kind)
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"unknown optimizer type {kind!r}", where="optimizer.type",
                          hint="use Adam, AdamW, Adagrad, SGD or any torch.optim class name")
    return _construct(cls, params, kwargs, kind)


def _construct(cls, params, kwargs, kind):
    try:
        return cls(params, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for optimizer {kind!r}: {exc}", where="optimizer.params") from None

"""`dsrun.moe`: DeepSpeed's mixture-of-experts names. dsrun has no MoE: `MoE` raises `NotImplementedError`
when built, and the parameter-group helpers in `utils` work (and change nothing) on models without it."""
from . import layer, utils  # noqa: F401
from .layer import MoE

__all__ = ["MoE", "layer", "utils"]

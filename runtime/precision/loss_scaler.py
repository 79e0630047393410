"""Loss scalers for fp16: static, and dynamic with DeepSpeed's ZeRO-path semantics.

Dynamic rule (deepspeed/runtime/fp16/loss_scaler.py `DynamicLossScaler`, reference section 3.6):
- overflow: if hysteresis is exhausted (`cur_hysteresis == 1`, or hysteresis configured as 1) the
  scale halves, floored at `min_loss_scale` (already at the floor: `LossScaleAtMinimum`, unless
  `raise_at_min` is False); otherwise `cur_hysteresis -= 1` and the scale stays. The step is skipped
  either way.
- no overflow: `consecutive_hysteresis` refills hysteresis; after `loss_scale_window` stable iterations
  (`stable = cur_iter - last_overflow_iter - 1 > 0` and a multiple of the window) the scale doubles and
  hysteresis refills.
We use this one policy for every sharding mode (DeepSpeed's non-ZeRO fp16 path has none of the
hysteresis), so fp16 numerics do not depend on the ZeRO stage.
"""
from __future__ import annotations

import logging
from typing import Optional

__all__ = ["LossScaler", "StaticLossScaler", "DynamicLossScaler", "LossScaleAtMinimum", "build_loss_scaler"]

log = logging.getLogger("dsrun")


class LossScaleAtMinimum(RuntimeError):
    """fp16 gradients overflow even at `min_loss_scale`: training has diverged."""


class LossScaler:
    """Base: a fixed scale of 1 (fp32/bf16)."""

    dynamic = False

    def __init__(self, scale: float = 1.0):
        self.cur_scale = float(scale)
        self.cur_iter = 0

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update(self, overflow: bool) -> Optional[str]:
        """Record one optimizer-boundary outcome; returns a log message for an overflow, else None."""
        self.cur_iter += 1
        return f"OVERFLOW! Skipping step. Loss scale: {self.cur_scale:g}" if overflow else None

    def record(self, overflowed: bool, *, step: int, grad_norm, report: bool) -> None:
        """`update` with one boundary step's outcome; a skipped step logs DeepSpeed's OVERFLOW line where
        `report` (rank 0). Both engines account their steps through this."""
        message = self.update(overflowed)
        if overflowed and report:
            norm = grad_norm.item() if hasattr(grad_norm, "item") else grad_norm
            log.warning("step %d: %s (grad norm %s)", step, message, norm)

    def state_dict(self) -> dict:
        return {"cur_scale": self.cur_scale, "cur_iter": self.cur_iter}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class StaticLossScaler(LossScaler):
    """fp16 with `fp16.loss_scale > 0`: the scale never changes; overflowing steps are still skipped."""


class DynamicLossScaler(LossScaler):
    """fp16 with `fp16.loss_scale == 0` (see the module docstring for the rule)."""

    dynamic = True

    def __init__(self, *, init_scale: float, scale_window: int, min_scale: float, hysteresis: int,
                 consecutive_hysteresis: bool = False, raise_at_min: bool = True, scale_factor: float = 2.0):
        super().__init__(init_scale)
        self.last_overflow_iter = -1
        self.scale_factor = float(scale_factor)
        self.scale_window = int(scale_window)
        self.min_scale = float(min_scale)
        self.delayed_shift = int(hysteresis)
        self.cur_hysteresis = int(hysteresis)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.raise_at_min = raise_at_min

    def update(self, overflow: bool) -> Optional[str]:
        message = None
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_at_min:
                    raise LossScaleAtMinimum(
                        f"fp16 gradients overflow at the minimum loss scale {self.min_scale:g}; the run has "
                        "diverged (lower the learning rate, use bf16, or lower fp16.min_loss_scale)")
                next_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
                message = (f"OVERFLOW! Skipping step. Attempted loss scale: {self.cur_scale:g}, "
                           f"reducing to {next_scale:g}")
                self.cur_scale = next_scale
            else:
                message = (f"OVERFLOW! Skipping step. Attempted loss scale: {self.cur_scale:g}, but hysteresis "
                           f"is {self.cur_hysteresis}. Reducing hysteresis to {self.cur_hysteresis - 1}")
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            stable = self.cur_iter - self.last_overflow_iter - 1
            if stable > 0 and stable % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1
        return message

    def state_dict(self) -> dict:
        return {"cur_scale": self.cur_scale, "cur_iter": self.cur_iter,
                "last_overflow_iter": self.last_overflow_iter, "cur_hysteresis": self.cur_hysteresis}


def build_loss_scaler(precision) -> LossScaler:
    """The scaler for a `PrecisionPolicy`: dynamic/static for fp16 (`loss_scale` set), else a fixed 1."""
    policy = precision.loss_scale
    if policy is None:
        return LossScaler(1.0)
    if not policy.dynamic:
        return StaticLossScaler(policy.static_scale)
    return DynamicLossScaler(init_scale=2.0 ** policy.initial_scale_power, scale_window=policy.loss_scale_window,
                             min_scale=policy.min_loss_scale, hysteresis=policy.hysteresis,
                             consecutive_hysteresis=policy.consecutive_hysteresis,
                             raise_at_min=getattr(policy, "raise_error_at_min_scale", True))

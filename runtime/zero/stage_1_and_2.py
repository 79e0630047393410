"""DeepSpeed's import path for the ZeRO-2 memory estimators (`deepspeed.runtime.zero.stage_1_and_2`); the
formulas live in runtime/estimate.py."""
from dsrun.runtime.estimate import (estimate_zero2_model_states_mem_needs,  # noqa: F401
                                    estimate_zero2_model_states_mem_needs_all_cold,
                                    estimate_zero2_model_states_mem_needs_all_live)
from dsrun.runtime.estimate import model_to_params as _params_and_largest

__all__ = ["estimate_zero2_model_states_mem_needs", "estimate_zero2_model_states_mem_needs_all_live",
           "estimate_zero2_model_states_mem_needs_all_cold", "model_to_params"]


def model_to_params(model) -> int:
    """Total parameters, shared ones counted once (DeepSpeed's ZeRO-2 helper)."""
    return _params_and_largest(model)[0]

"""DeepSpeed's import path for the ZeRO-3 memory estimators (`deepspeed.runtime.zero.stage3`); the formulas
live in runtime/estimate.py."""
from dsrun.runtime.estimate import (estimate_zero3_model_states_mem_needs,  # noqa: F401
                                    estimate_zero3_model_states_mem_needs_all_cold,
                                    estimate_zero3_model_states_mem_needs_all_live, model_to_params)

__all__ = ["estimate_zero3_model_states_mem_needs", "estimate_zero3_model_states_mem_needs_all_live",
           "estimate_zero3_model_states_mem_needs_all_cold", "model_to_params"]

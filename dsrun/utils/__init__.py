"""`dsrun.utils`: DeepSpeed's `deepspeed.utils` names that scripts import.

`logger`, `log_dist`, `RepeatingLoader`, `groups` (dsrun has data parallelism only), the tensor-fragment
accessors (`safe_get_full_grad`, ...: see tensor_fragment.py for what dsrun supports), the ZeRO-3 leaf
module markers (`set_z3_leaf_modules`, ...) and `zero_to_fp32`.
"""
from dsrun.runtime.utils import RepeatingLoader

from . import groups, zero_to_fp32  # noqa: F401
from .logging import log_dist, log_dist_once, logger, set_log_level_from_string
from .tensor_fragment import (safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state,
                              safe_get_local_fp32_param, safe_get_local_grad, safe_get_local_optimizer_state,
                              safe_set_full_fp32_param, safe_set_full_grad, safe_set_full_optimizer_state,
                              safe_set_local_fp32_param, safe_set_local_grad, safe_set_local_optimizer_state)
from .z3_leaf_module import get_z3_leaf_modules, set_z3_leaf_modules, unset_z3_leaf_modules, z3_leaf_module

__all__ = ["logger", "log_dist", "log_dist_once", "set_log_level_from_string", "RepeatingLoader", "groups",
           "zero_to_fp32", "safe_get_full_fp32_param", "safe_get_full_grad", "safe_get_full_optimizer_state",
           "safe_set_full_fp32_param", "safe_set_full_grad", "safe_set_full_optimizer_state",
           "safe_get_local_fp32_param", "safe_get_local_grad", "safe_get_local_optimizer_state",
           "safe_set_local_fp32_param", "safe_set_local_grad", "safe_set_local_optimizer_state",
           "set_z3_leaf_modules", "unset_z3_leaf_modules", "get_z3_leaf_modules", "z3_leaf_module"]

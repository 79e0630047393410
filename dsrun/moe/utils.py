"""DeepSpeed's MoE parameter helpers (deepspeed/moe/utils.py), for models without experts.

A parameter is an expert parameter when it carries `allreduce=False` (DeepSpeed's marker). dsrun has no
expert parallelism, so `split_params_into_different_moe_groups_for_optimizer` returns the groups as a
list, unchanged, and raises `NotImplementedError` if it finds an expert parameter. Scripts such as
DeepSpeedExamples' cifar call it unconditionally.
"""
from typing import Any, Dict, List, Tuple, Union

import torch

__all__ = ["has_moe_layers", "is_moe_param", "is_moe_param_group", "split_params_into_shared_and_expert_params",
           "split_params_grads_into_shared_and_expert_params",
           "split_params_into_different_moe_groups_for_optimizer", "configure_moe_param_groups"]


def has_moe_layers(m: torch.nn.Module) -> Tuple[bool, int]:
    return False, 0


def is_moe_param(param: torch.Tensor) -> bool:
    return hasattr(param, "allreduce") and not param.allreduce


def is_moe_param_group(param_group) -> bool:
    return param_group.get("moe", False)


def split_params_into_shared_and_expert_params(params) -> Tuple[List, List]:
    shared, expert = [], []
    for p in params:
        (expert if is_moe_param(p) else shared).append(p)
    return shared, expert


def split_params_grads_into_shared_and_expert_params(group) -> Tuple[List, List]:
    shared, expert = [], []
    for p in group:
        if p.grad is not None:
            (expert if is_moe_param(p) else shared).append(p.grad.to(p.dtype))
    return shared, expert


def split_params_into_different_moe_groups_for_optimizer(
        param_groups: Union[Dict[str, Any], Tuple[Dict[str, Any], ...], List[Dict[str, Any]]],
        max_group_size=178956971) -> List[Dict[str, Any]]:
    """The param groups as a list (a dict or tuple is wrapped); `NotImplementedError` for expert parameters."""
    if isinstance(param_groups, tuple):
        param_groups = list(param_groups)
    elif isinstance(param_groups, dict):
        param_groups = [param_groups]
    elif not isinstance(param_groups, list):
        raise ValueError(f"Unknown param group type of {type(param_groups)}")
    for group in param_groups:
        if any(is_moe_param(p) for p in group["params"]):
            raise NotImplementedError("mixture-of-experts parameters (allreduce=False) are not supported by dsrun")
    return param_groups


def configure_moe_param_groups(model_parameters: List):
    """DeepSpeed splits MoE groups here; without experts the parameters are returned as given."""
    if model_parameters and isinstance(model_parameters[0], dict):
        return split_params_into_different_moe_groups_for_optimizer(model_parameters)
    return model_parameters

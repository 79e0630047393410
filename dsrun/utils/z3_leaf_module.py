"""DeepSpeed's ZeRO-3 leaf-module markers: a module marked as a leaf has its parameters fetched as one
unit. The mark is the `_z3_leaf` attribute, as in DeepSpeed; outside ZeRO-3 it has no effect."""
from typing import List, Type

import torch

__all__ = ["set_z3_leaf_modules", "unset_z3_leaf_modules", "get_z3_leaf_modules", "z3_leaf_module"]


def _mark(model: torch.nn.Module, leaf_module_classes, flag: bool) -> List[torch.nn.Module]:
    classes = tuple(leaf_module_classes)
    names = {c for c in classes if isinstance(c, str)}
    types = tuple(c for c in classes if isinstance(c, type))
    marked = []
    for module in model.modules():
        if (types and isinstance(module, types)) or type(module).__name__ in names:
            module._z3_leaf = flag
            marked.append(module)
    if not marked:
        raise ValueError(f"no module of the classes {list(leaf_module_classes)} found in the model")
    return marked


def set_z3_leaf_modules(model: torch.nn.Module, leaf_module_classes: List[Type]) -> List[torch.nn.Module]:
    """Mark every module of the given classes (types or class names) as a ZeRO-3 leaf; returns them."""
    return _mark(model, leaf_module_classes, True)


def unset_z3_leaf_modules(model: torch.nn.Module, leaf_module_classes: List[Type]) -> List[torch.nn.Module]:
    return _mark(model, leaf_module_classes, False)


def z3_leaf_module(model: torch.nn.Module) -> bool:
    return getattr(model, "_z3_leaf", False)


def get_z3_leaf_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    return [m for m in model.modules() if z3_leaf_module(m)]

"""Which layers each pipeline stage holds: pure planning functions (no processes, no tensors built).

A partition is a list `parts` of S+1 layer indices: stage s holds layers `parts[s]:parts[s+1]`.

    partition_uniform(10, 4)                 -> [0, 3, 6, 8, 10]     (the first stages take the remainder)
    partition_balanced([1, 1, 4, 1, 1], 2)   -> [0, 3, 5]            (the heaviest part as light as possible)
    plan_partition('type:linear', [...], 2)  -> balance the count of layers whose class name matches

`plan_partition(method, layers, num_stages)` resolves DeepSpeed's `partition_method` strings against layer
descriptions (`LayerInfo`: class name and trainable parameter count). Counting parameters does not build
the layers on this rank's device: module.py builds each LayerSpec on the meta device to count them
(DeepSpeed builds every layer on every rank just to count).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Sequence

__all__ = ["LayerInfo", "partition_uniform", "partition_balanced", "plan_partition"]


@dataclass(frozen=True)
class LayerInfo:
    """What planning knows of a layer: its class name and its trainable parameter count."""

    name: str
    num_params: int


def partition_uniform(num_items: int, num_parts: int) -> List[int]:
    """Equal counts; the first `num_items % num_parts` parts take one more. With fewer items than
    parts, the last parts are empty."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    base, extra = divmod(num_items, num_parts)
    parts = [0]
    for p in range(num_parts):
        parts.append(parts[-1] + base + (1 if p < extra else 0))
    return parts


def _fits(weights: Sequence[float], num_parts: int, limit: float) -> bool:
    parts, total = 1, 0.0
    for w in weights:
        if w > limit:
            return False
        if total + w > limit:
            parts, total = parts + 1, w
        else:
            total += w
    return parts <= num_parts


def partition_balanced(weights: Sequence[float], num_parts: int) -> List[int]:
    """Contiguous parts minimising the heaviest part's weight (exact for integer weights: binary search on
    the limit, greedy packing). Ties go to the layout that fills earlier parts first; every part is
    non-empty when there are at least as many items as parts."""
    n = len(weights)
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if n <= num_parts:
        return [min(p, n) for p in range(num_parts + 1)]
    lo, hi = max(weights), float(sum(weights))
    if all(float(w).is_integer() for w in weights):
        lo, hi = int(lo), int(hi)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _fits(weights, num_parts, mid) else (mid + 1, hi)
    else:
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if _fits(weights, num_parts, mid) else (mid, hi)
        lo = hi
    return _pack(weights, num_parts, lo)


def _pack(weights: Sequence[float], num_parts: int, limit: float) -> List[int]:
    """Greedy packing under `limit`, keeping enough items back that every later part gets at least one."""
    n, parts, total = len(weights), [0], 0.0
    for i, w in enumerate(weights):
        parts_left = num_parts - len(parts)  # parts still to open after the current one
        must_open = n - i <= parts_left
        if i > parts[-1] and (total + w > limit or must_open):
            parts.append(i)
            total = 0.0
        total += w
    parts.append(n)
    while len(parts) < num_parts + 1:  # only when weights had fewer items than parts (handled above)
        parts.insert(-1, n)
    return parts


def plan_partition(method: str, layers: Sequence[LayerInfo], num_stages: int) -> List[int]:
    """`parts` for DeepSpeed's `partition_method`: 'uniform', 'parameters', 'type:<regex>' (case-insensitive
    match of the class name). Raises ValueError naming the method for anything else, and for a type
    regex that matches no layer."""
    method = method.lower() if not method.lower().startswith("type:") else method
    if method == "uniform":
        return partition_uniform(len(layers), num_stages)
    if method == "parameters":
        return partition_balanced([info.num_params for info in layers], num_stages)
    if method.lower().startswith("type:"):
        pattern = re.compile(method[len("type:"):], re.IGNORECASE)
        weights = [1 if pattern.search(info.name) else 0 for info in layers]
        if not any(weights):
            raise ValueError(f"partition_method {method!r} matches no layer (classes: "
                             f"{sorted({info.name for info in layers})})")
        return partition_balanced(weights, num_stages)
    if method == "profile":
        raise ValueError("partition_method 'profile' is not implemented (neither is it in DeepSpeed); "
                         "use 'parameters', 'uniform' or 'type:<regex>'")
    raise ValueError(f"unknown partition_method {method!r}; use 'parameters', 'uniform' or 'type:<regex>'")

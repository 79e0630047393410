"""ZeRO-3 units: which parameters are gathered together, and their flat layout.

[Note: ZeRO-3 units] A unit is a module whose parameters are all-gathered as one piece before its
forward and released after it (unit_weights.py). Units never nest, except that the root module is a unit
for whatever no other unit holds. They are chosen once, at engine construction:

1. named by the user: `zero_optimization.leaf_module` (DeepSpeed's key) with `classes` (class names),
   `names` (module paths) and `name_suffixes`; each matching module, outermost first, is a unit;
2. otherwise the repeated blocks: the children of the outermost `nn.ModuleList`/`nn.Sequential`/
   `nn.ModuleDict` containers (a transformer's layer list; for a plain `nn.Sequential` model, its layers),
   or the root's children when the model has no container;
3. a candidate holding fewer than `stage3_module_granularity_threshold` shardable elements is left to
   the unit above it (fewer, larger gathers).

Parameters with fewer than `stage3_param_persistence_threshold` elements (smallest first, at most
`stage3_model_persistence_threshold` elements in all) are *persistent*: one extra unit that stays
gathered. A parameter reachable from two units (tied embeddings), registered with
`register_external_parameter`, or outside every unit belongs to the root unit, which is gathered for the
whole forward and backward. Frozen floating parameters are sharded in their unit too (in a layout of
their own, without masters or gradients); small frozen ones stay whole.

Layout: one bucket per (unit, optimizer group), split further at `min(sub_group_size,
reduce_bucket_size)` elements; each bucket padded to a multiple of `world_size * ALIGN`, and rank r owns
the r-th equal chunk (layout.py's [Note: bucket-major ownership]). Buckets are numbered in expected
backward order (blocks from last to first, then the root, then the persistent unit), because gradient
reductions launch in bucket order (reducer.py's [Note: bucket launch order]).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .layout import ALIGN, Bucket, FlatLayout, Slot

__all__ = ["Unit", "build_unit_layout", "choose_unit_modules", "numel_of_param", "shape_of_param"]

_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


@dataclass
class Unit:
    """A group of parameters gathered and released together."""

    index: int
    name: str  # module path ("" for the root); "<persistent>" for the persistent unit
    module: Optional[torch.nn.Module]
    buckets: List[int] = field(default_factory=list)  # in the trainable layout
    frozen_buckets: List[int] = field(default_factory=list)  # in the frozen layout
    numel: int = 0  # padded elements when gathered
    persistent: bool = False


def numel_of_param(p: torch.nn.Parameter) -> int:
    """Elements of `p`, also while it is a released ZeRO-3 parameter (context.py's `ds_numel`)."""
    return getattr(p, "ds_numel", None) or p.numel()


def shape_of_param(p: torch.nn.Parameter) -> Tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def _leaf_spec(zero_config) -> Tuple[set, set, tuple]:
    spec = dict(getattr(zero_config, "leaf_module", None) or {})
    return set(spec.get("classes", ())), set(spec.get("names", ())), tuple(spec.get("name_suffixes", ()))


def choose_unit_modules(root: torch.nn.Module, *, zero_config=None, numel_of=None) -> List[Tuple[str, torch.nn.Module]]:
    """The (path, module) of every non-root unit, in registration order ([Note: ZeRO-3 units]).
    `numel_of(module)` counts a module's shardable elements (default: all its parameters)."""
    numel_of = numel_of or (lambda m: sum(numel_of_param(p) for p in m.parameters()))
    threshold = int(getattr(zero_config, "module_granularity_threshold", 0) or 0)
    classes, names, suffixes = _leaf_spec(zero_config)
    if classes or names or suffixes:
        picked, taken = [], []
        for path, m in root.named_modules():
            if m is root or any(path.startswith(t + ".") for t in taken):
                continue
            if type(m).__name__ in classes or path in names or (suffixes and path.endswith(suffixes)):
                picked.append((path, m))
                taken.append(path)
        return picked

    def walk(prefix: str, m: torch.nn.Module, out: list) -> bool:
        """Adds units under `m`; True when a container was found."""
        if isinstance(m, _CONTAINERS):
            for name, child in m.named_children():
                if numel_of(child) >= max(threshold, 1):
                    out.append((prefix + name, child))
            return True
        found = False
        for name, child in m.named_children():
            found = walk(prefix + name + ".", child, out) or found
        return found

    out: List[Tuple[str, torch.nn.Module]] = []
    if not walk("", root, out):
        out = [(name, child) for name, child in root.named_children() if numel_of(child) >= max(threshold, 1)]
    return out


def _persistent(groups, zero_config) -> set:
    threshold = int(getattr(zero_config, "param_persistence_threshold", 100_000))
    budget = int(getattr(zero_config, "model_persistence_threshold", 1 << 62))
    small = sorted((numel_of_param(p), i, p) for i, (_, p) in enumerate(x for g in groups for x in g)
                   if numel_of_param(p) < threshold)
    keep, total = set(), 0
    for n, _, p in small:
        if total + n > budget:
            break
        keep.add(p)
        total += n
    return keep


def build_unit_layout(module: torch.nn.Module, groups: Sequence[Sequence[Tuple[str, torch.nn.Parameter]]], *,
                      frozen: Sequence[Tuple[str, torch.nn.Parameter]] = (), zero_config, world_size: int,
                      rank: int) -> Tuple[FlatLayout, FlatLayout, List[Unit]]:
    """Units over the trainable parameters in `groups` (per optimizer group, (name, param)) and the frozen
    floating parameters in `frozen`; the flat layout of the trainable buckets (what the reducer and the
    optimizer see) and of the frozen ones ([Note: ZeRO-3 units])."""
    persistent = _persistent([list(x for g in groups for x in g) + [x for x in frozen if x[1].is_floating_point()]],
                             zero_config)
    trainable = {p for g in groups for _, p in g}
    sharded_frozen = [(n, p) for n, p in frozen if p.is_floating_point() and p not in persistent]
    shardable = (trainable - persistent) | {p for _, p in sharded_frozen}

    def shardable_numel(m):
        return sum(numel_of_param(p) for p in m.parameters() if p in shardable)

    chosen = choose_unit_modules(module, zero_config=zero_config, numel_of=shardable_numel)
    home: Dict[torch.nn.Parameter, int] = {}  # param -> index into chosen, or -1 (root)
    for i, (_, m) in enumerate(chosen):
        for p in m.parameters():
            if p in shardable:
                home[p] = -1 if p in home and home[p] != i else i
    for sub in module.modules():  # used by a module outside its unit (register_external_parameter): shared
        for p in getattr(sub, "_dsrun_external_params", ()):
            if home.get(p, -1) >= 0 and not _contains(chosen[home[p]][1], sub):
                home[p] = -1
    units = [Unit(i, path, m) for i, (path, m) in enumerate(chosen)]
    units.append(Unit(len(units), "", module))
    units.append(Unit(len(units), "<persistent>", None, persistent=True))

    def members(named_groups, skip_persistent):
        out = {u.index: [[] for _ in named_groups] for u in units}
        for g, named in enumerate(named_groups):
            for name, p in named:
                if p in persistent:
                    if skip_persistent:
                        continue
                    u = len(units) - 1
                else:
                    u = home.get(p, -1) if home.get(p, -1) >= 0 else len(units) - 2
                out[u][g].append((name, p))
        return out

    cap = max(1, min(int(getattr(zero_config, "sub_group_size", 1 << 62)),
                     int(getattr(zero_config, "reduce_bucket_size", 1 << 62))))
    order = list(reversed(units[:-2])) + units[-2:]  # expected backward order
    layout = _lay_out(order, members(groups, False), len(groups), cap, world_size, rank, "buckets")
    # frozen persistent parameters stay whole, outside any layout (their values never change)
    frozen_layout = _lay_out(order, members([sharded_frozen], True), 1, cap, world_size, rank, "frozen_buckets")
    for unit in units:
        unit.numel = (sum(layout.buckets[b].numel for b in unit.buckets)
                      + sum(frozen_layout.buckets[b].numel for b in unit.frozen_buckets))
    kept = [u for u in units if u.buckets or u.frozen_buckets]
    for i, u in enumerate(kept):
        u.index = i
    return layout, frozen_layout, kept


def _lay_out(order: List[Unit], members, num_groups: int, cap: int, world_size: int, rank: int,
             attr: str) -> FlatLayout:
    """One flat layout: per unit (in `order`) and group, buckets of at most `cap` elements (a larger
    parameter gets its own); the bucket indices are appended to `unit.<attr>`."""
    slots: List[Slot] = []
    buckets: List[Bucket] = []
    offset = 0
    pad_to = world_size * ALIGN
    for unit in order:
        for g in range(num_groups):
            current = None
            for name, p in members[unit.index][g]:
                n = numel_of_param(p)
                if current is not None and offset + n - current.start > cap:
                    offset = _close(current, offset, pad_to, world_size, rank)
                    current = None
                if current is None:
                    current = Bucket(len(buckets), g, offset, offset, 0, 0)
                    buckets.append(current)
                    getattr(unit, attr).append(current.index)
                slot = Slot(len(slots), name, p, shape_of_param(p), offset, n, g, current.index)
                current.slots.append(slot)
                slots.append(slot)
                offset += n
            if current is not None:
                offset = _close(current, offset, pad_to, world_size, rank)
    return FlatLayout(slots, buckets, offset, num_groups, sharded=True)


def _contains(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _close(bucket: Bucket, offset: int, pad_to: int, world_size: int, rank: int) -> int:
    used = offset - bucket.start
    padded = max(-(-used // pad_to) * pad_to, pad_to)
    bucket.end = bucket.start + padded
    chunk = padded // world_size
    bucket.own_start = bucket.start + rank * chunk
    bucket.own_end = bucket.own_start + chunk
    return bucket.end

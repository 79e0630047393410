"""DeepSpeed's ZeRO-3 API: `dsrun.zero.Init`, `GatheredParameters`, `register_external_parameter`.

[Note: ZeRO-3 parameters] A sharded parameter looks as it does under DeepSpeed: `param.data` is an empty
tensor (of the working dtype) while it is released, and it carries `ds_shape` (the real shape), `ds_numel`,
`ds_id`, `ds_status` ("AVAILABLE", "NOT_AVAILABLE", "INFLIGHT"), `ds_persist` and `ds_tensor` (this rank's
piece). Each such parameter has an *owner* that knows how to make it whole: the `Init` context that
partitioned it at construction (one flat shard per parameter, 1/world each), or, once `dsrun.initialize`
has built a ZeRO-3 engine, that engine's weight store (unit_weights.py), which re-lays the parameters out
in per-unit buffers. `GatheredParameters` asks the owner, so it works before and after `initialize`.

All three are collective, as in DeepSpeed: every rank of the data-parallel group must enter
`GatheredParameters` for the same parameters in the same order.
"""
from __future__ import annotations

import functools
import json
import os
from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["Init", "GatheredParameters", "register_external_parameter", "full_value", "mark_zero3"]


def mark_zero3(p: torch.nn.Parameter, *, shape, ds_id: int, owner, persist: bool, shard=None) -> None:
    """Give `p` DeepSpeed's ZeRO-3 attributes ([Note: ZeRO-3 parameters])."""
    p.ds_shape = torch.Size(shape)
    p.ds_numel = int(torch.Size(shape).numel())
    p.ds_id = ds_id
    p.ds_persist = persist
    p.ds_status = "AVAILABLE" if persist else "NOT_AVAILABLE"
    p.ds_tensor = shard
    p._dsrun_owner = owner


def full_value(p: torch.nn.Parameter) -> torch.Tensor:
    """The whole value of `p`: its data, or gathered from its `Init` shards (collective in that case)."""
    owner = getattr(p, "_dsrun_owner", None)
    if isinstance(owner, _InitShards) and p.data.numel() != p.ds_numel:
        return owner.gather_full(p)
    return p.data


class _InitShards:
    """Owner of parameters partitioned by `Init`: one flat shard of ceil(numel / world) elements per parameter
    on each rank (the last rank's padded with zeros)."""

    def __init__(self, group, device: torch.device, dtype: Optional[torch.dtype], persistence_threshold: int):
        self.group, self.device, self.dtype = group, device, dtype
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.threshold = persistence_threshold
        from .comm import Comm
        self.comm = Comm(group)
        self._next_id = 0

    def _chunk(self, numel: int) -> int:
        return -(-numel // self.world)

    @torch.no_grad()
    def partition(self, p: torch.nn.Parameter) -> None:
        dtype = self.dtype if (self.dtype is not None and p.is_floating_point()) else p.dtype
        data = p.data.to(self.device, dtype)
        if self.world > 1:
            dist.broadcast(data, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        n = data.numel()
        if n < self.threshold:
            p.data = data
            mark_zero3(p, shape=data.shape, ds_id=self._take_id(), owner=self, persist=True)
            return
        chunk = self._chunk(n)
        flat = torch.zeros(chunk * self.world, dtype=dtype, device=self.device)
        flat[:n].copy_(data.reshape(-1))
        shard = flat[self.rank * chunk:(self.rank + 1) * chunk].clone()
        shape = data.shape
        del flat, data
        p.data = torch.empty(0, dtype=dtype, device=self.device)
        mark_zero3(p, shape=shape, ds_id=self._take_id(), owner=self, persist=False, shard=shard)

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def gather_full(self, p: torch.nn.Parameter) -> torch.Tensor:
        chunk = p.ds_tensor.numel()
        full = torch.empty(chunk * self.world, dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)
        self.comm.all_gather(full, p.ds_tensor, async_op=False)
        return full[:p.ds_numel].view(p.ds_shape)

    def gather(self, params: List[torch.nn.Parameter]) -> List[torch.nn.Parameter]:
        fresh = []
        for p in params:
            if not p.ds_persist and p.data.numel() != p.ds_numel:
                p.data = self.gather_full(p)
                p.ds_status = "AVAILABLE"
                fresh.append(p)
        return fresh

    @torch.no_grad()
    def release(self, params: List[torch.nn.Parameter], fresh: List[torch.nn.Parameter], modifier_rank) -> None:
        fresh_ids = {id(q) for q in fresh}
        for p in params:
            if modifier_rank is not None and self.world > 1:
                src = dist.get_global_rank(self.group, modifier_rank) if self.group else modifier_rank
                data = p.data.contiguous()
                dist.broadcast(data, src=src, group=self.group)
                p.data = data
            if p.ds_persist or id(p) not in fresh_ids:
                continue
            chunk = p.ds_tensor.numel()
            flat = p.data.reshape(-1)
            lo, hi = self.rank * chunk, min((self.rank + 1) * chunk, p.ds_numel)
            if hi > lo:
                p.ds_tensor[:hi - lo].copy_(flat[lo:hi])
            p.data = torch.empty(0, dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)
            p.ds_status = "NOT_AVAILABLE"


def _read_config(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    path = os.fspath(config)
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml
            return yaml.safe_load(f) or {}
        return json.load(f)


def _config_dtype(cfg: dict) -> torch.dtype:
    if (cfg.get("fp16") or {}).get("enabled") is True:
        return torch.float16
    if (cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled") is True:
        return torch.bfloat16
    return torch.float32


def _subclasses(cls) -> List[type]:
    out, todo = [], [cls]
    while todo:
        c = todo.pop()
        for sub in c.__subclasses__():
            if sub not in out:
                out.append(sub)
                todo.append(sub)
    return out


class Init:
    """Build a model with its parameters partitioned as they are created (DeepSpeed's `zero.Init`).

    Inside the context, each module's parameters are broadcast from rank 0 and partitioned right after
    the module's outermost `__init__` returns, so a rank never holds more than one module's parameters
    whole (plus its 1/world of the rest). Parameters with fewer than
    `zero_optimization.stage3_param_persistence_threshold` elements (1e5 by default) stay whole.
    `module=` partitions an already-built module instead. `dtype` (default: fp16/bf16 from the config,
    else fp32) is the dtype of the shards. Arguments DeepSpeed has and dsrun does not use are accepted.
    """

    def __init__(self, module=None, data_parallel_group=None, mem_efficient_linear=True, remote_device=None,
                 pin_memory=False, config_dict_or_path=None, config=None, enabled=True, dtype=None, mpu=None,
                 zero_param_parallel_group=None, zero_quantized_weights=False,
                 zero_quantized_nontrainable_weights=False, sequence_data_parallel_group=None,
                 param_swapper=None, **kwargs):
        self.module, self.enabled = module, enabled
        self._cfg = _read_config(config_dict_or_path if config_dict_or_path is not None else config)
        self.dtype = dtype or _config_dtype(self._cfg)
        self.group = data_parallel_group if data_parallel_group is not None else (
            mpu.get_data_parallel_group() if mpu is not None else None)
        self._saved = []
        self._owner = None
        if enabled and module is not None:
            owner = self._make_owner()
            for p in module.parameters():
                if not hasattr(p, "ds_id"):
                    owner.partition(p)

    def _make_owner(self) -> _InitShards:
        if self._owner is None:
            if not dist.is_initialized():
                from ..dist import init_distributed
                init_distributed()
            zero = self._cfg.get("zero_optimization") or {}
            threshold = zero.get("stage3_param_persistence_threshold", zero.get("param_persistence_threshold",
                                                                                 100_000))
            threshold = 100_000 if threshold == "auto" else int(threshold)
            device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                      else torch.device("cpu"))
            self._owner = _InitShards(self.group, device, self.dtype, threshold)
        return self._owner

    def _partition_module(self, module: torch.nn.Module) -> None:
        for p in module.parameters():
            if not hasattr(p, "ds_id"):
                self._owner.partition(p)

    def _wrap(self, cls) -> None:
        if "__init__" not in cls.__dict__ or getattr(cls.__dict__["__init__"], "_dsrun_wrapped", False):
            return
        original = cls.__dict__["__init__"]
        ctx = self

        @functools.wraps(original)
        def init(module, *args, **kwargs):
            depth = module.__dict__.get("_dsrun_init_depth", 0)
            module.__dict__["_dsrun_init_depth"] = depth + 1
            try:
                original(module, *args, **kwargs)
            finally:
                module.__dict__["_dsrun_init_depth"] = depth
            if depth == 0:
                del module.__dict__["_dsrun_init_depth"]
                ctx._partition_module(module)
        init._dsrun_wrapped = True
        cls.__init__ = init
        self._saved.append((cls, original))

    def __enter__(self):
        if not self.enabled:
            return self
        self._make_owner()
        for cls in [torch.nn.Module] + _subclasses(torch.nn.Module):
            self._wrap(cls)
        previous = torch.nn.Module.__dict__.get("__init_subclass__")
        ctx = self

        def init_subclass(cls, **kwargs):
            super(torch.nn.Module, cls).__init_subclass__(**kwargs)
            ctx._wrap(cls)
        torch.nn.Module.__init_subclass__ = classmethod(init_subclass)
        self._saved.append((torch.nn.Module, ("__init_subclass__", previous)))
        return self

    def __exit__(self, *exc):
        for cls, original in reversed(self._saved):
            if isinstance(original, tuple):
                name, previous = original
                if previous is None:
                    delattr(cls, name)
                else:
                    setattr(cls, name, previous)
            else:
                cls.__init__ = original
        self._saved = []
        return False


class GatheredParameters:
    """Make ZeRO-3 parameters whole inside the context (DeepSpeed's `zero.GatheredParameters`).

    `params`: a parameter or an iterable of them; parameters that are not ZeRO-3 parameters are left
    alone. With `modifier_rank` (a data-parallel group rank), the values that rank holds at exit are
    published to every rank (and, inside an engine, to the fp32 masters). Collective; see the module doc.
    `fwd_module` is accepted for compatibility.
    """

    def __init__(self, params=None, modifier_rank=None, fwd_module=None, enabled=True):
        if isinstance(params, torch.Tensor):
            params = [params]
        self.params = [p for p in (params or []) if hasattr(p, "_dsrun_owner")]
        self.modifier_rank, self.enabled = modifier_rank, enabled
        self._fresh = []

    def _by_owner(self):
        owners = {}
        for p in self.params:
            owners.setdefault(id(p._dsrun_owner), (p._dsrun_owner, []))[1].append(p)
        return list(owners.values())

    def __enter__(self):
        if not self.enabled:
            return self
        for owner, params in self._by_owner():
            if isinstance(owner, _InitShards):
                self._fresh.append((owner, owner.gather(params)))
            else:
                units = {owner.unit_of_param[p] for p in params}
                self._fresh.append((owner, owner.gather_units(units)))
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        fresh = dict((id(o), f) for o, f in self._fresh)
        for owner, params in self._by_owner():
            mine = fresh.get(id(owner), [])
            if isinstance(owner, _InitShards):
                owner.release(params, mine, self.modifier_rank)
                continue
            if self.modifier_rank is not None:
                owner.publish_edits({owner.unit_of_param[p] for p in params}, self.modifier_rank)
            for u in mine:
                owner.release(u)
        self._fresh = []
        return False


def register_external_parameter(module: torch.nn.Module, parameter: torch.nn.Parameter) -> None:
    """Declare that `module`'s forward uses `parameter`, which another module owns. Call it before
    `dsrun.initialize`: such a parameter then lives in the root unit, gathered for the whole forward and
    backward ([Note: ZeRO-3 units] in units.py)."""
    external = module.__dict__.setdefault("_dsrun_external_params", [])
    if all(p is not parameter for p in external):
        external.append(parameter)

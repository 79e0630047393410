"""Reading DeepSpeed 0.19.x checkpoint folders into dsrun's full-state view (any world size and ZeRO stage).

[Note: DeepSpeed checkpoint layout] (deepspeed/runtime/engine.py `_save_checkpoint`, `_save_zero_checkpoint`;
optimizer `state_dict()`s in runtime/zero/stage_1_and_2.py, stage3.py, bf16_optimizer.py, fp16/*.py):
```
<tag>/mp_rank_00_model_states.pt             stages 0-2, rank 0: `module` (working dtype), `buffer_names`,
                                             `optimizer` (stage 0 only), `param_shapes` ([{name: shape}] per
                                             group, flat order; ZeRO only), `frozen_param_shapes`/`_fragments`
                                             (stage 2+), `shared_params`, `lr_scheduler`, `global_steps`,
                                             `global_samples`, `skipped_steps`, `dp_world_size`, `ds_config`,
                                             `ds_version`, then the client state's keys at top level
<tag>/zero_pp_rank_{r}_mp_rank_00_model_states.pt   stage 3, every rank: as above, `module` holds empty
                                             placeholders and `frozen_param_fragments` are rank r's partitions
<tag>/[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt   ZeRO / BF16_Optimizer, every rank:
                                             {"optimizer_state_dict": ..., "ds_config", "ds_version"}
```
Optimizer states, by the optimizer DeepSpeed picked:
- torch optimizer (fp32, stage 0): `optimizer` is its state_dict; state indices count the parameters passed in.
- FP16_UnfusedOptimizer (fp16/bf16, stage 0, non-fused optimizer): `fp32_groups` (per-parameter masters),
  `optimizer_state_dict` indexed over them; loss scale in `cur_scale`, `cur_iter`, ...
- FP16_Optimizer (fused Adam): `fp32_groups_flat`, one flat master per group, no padding.
- ZeRO-1/2: per group the trainable parameters in `param_shapes` order, each followed by its
  `param_alignment_paddings` entry, padded at the end to a multiple of 2 x world size and cut in equal
  partitions; rank r keeps `single_partition_of_fp32_groups[g]` (end padding removed) and, in
  `base_optimizer_state`, the torch state_dict of the flat partitions (padding kept).
- BF16_Optimizer (bf16 with fp32 gradient accumulation, stages 0-1): as ZeRO-1/2 without parameter
  padding; the fp32 partitions keep their end padding.
- ZeRO-3: every parameter is cut into world-size partitions of ceil(numel / W) elements; rank r's
  `fp32_flat_groups` (one flat per sub-group) hold its partition of each parameter in `param_shapes` order,
  optimizer states laid out the same way.

`DeepSpeedCheckpoint` rebuilds every parameter's whole fp32 master weight and per-element optimizer
states (`exp_avg`, `exp_avg_sq`, ... under their torch names, which are dsrun's) and serves them through
the reader interface of `ShardReader` (`read(name, key, start, end)`), with a manifest and a model-states
dict shaped as dsrun's, so `engine_io.load` and `to_fp32` treat both formats alike. Files are unpickled
without DeepSpeed (ds_files.py).
"""
from __future__ import annotations

import itertools
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import torch

from dsrun.runtime.checkpoint import layout
from dsrun.runtime.checkpoint.ds_files import (STAGE3_MODEL_STATES, is_deepspeed_folder, load_deepspeed_file,
                                               optimizer_states, refuse_unsupported)
from dsrun.runtime.checkpoint.errors import CheckpointError

__all__ = ["is_deepspeed_folder", "DeepSpeedCheckpoint"]

# top-level model-states keys that are DeepSpeed's own; the rest is the client state (engine.py _load_checkpoint)
_DS_STATE_KEYS = {"module", "skipped_steps", "global_steps", "dp_world_size", "mp_world_size", "data_sampler",
                  "random_ltd", "lr_scheduler", "optimizer"}


def _numel(shape) -> int:
    return int(math.prod(tuple(shape)))


def _flat(value) -> torch.Tensor:
    return value.detach().reshape(-1)


class _Chain:
    """1-D tensors read as their concatenation, never concatenated. DeepSpeed keeps each flat buffer as one
    partition per rank, in files this reader memory-maps; joining them would put the whole model's fp32
    weights and optimizer states (12 bytes or more per parameter) in the memory of every rank of the
    loading job, which reads only its own ranges: 8 ranks of a node loading a 7B model's checkpoint would
    hold 8 copies of 84 GB. Slicing keeps views; `read()` copies only the elements it covers, in fp32."""

    def __init__(self, parts: Sequence[Union[torch.Tensor, "_Chain"]]):
        flat = [q for p in parts for q in (p.parts if isinstance(p, _Chain) else [_flat(p)])]
        self.parts = [p for p in flat if p.numel()]
        self.bounds = list(itertools.accumulate((p.numel() for p in self.parts), initial=0))

    def numel(self) -> int:
        return self.bounds[-1]

    def __getitem__(self, index: slice) -> "_Chain":
        start, end, _ = index.indices(self.numel())
        pieces = [part[max(start, lo) - lo:min(end, hi) - lo]
                  for part, lo, hi in zip(self.parts, self.bounds, self.bounds[1:]) if max(start, lo) < min(end, hi)]
        return _Chain(pieces)

    def read(self) -> torch.Tensor:
        """A new fp32 tensor of these elements."""
        if len(self.parts) == 1:
            return self.parts[0].to(torch.float32, copy=True)
        return torch.cat([p.to(torch.float32) for p in self.parts]) if self.parts else torch.empty(0)


def _scalar(value):
    return value.item() if torch.is_tensor(value) else value


def _is_state_tensor(value) -> bool:
    return torch.is_tensor(value) and value.dim() > 0


class DeepSpeedCheckpoint:
    """Every parameter of one DeepSpeed checkpoint folder, whole, in fp32, with its optimizer states.

    Args:
        tag_dir: the tag folder (`<save_dir>/global_step100`).
        trainable_names: names of the parameters the optimizer trains, in `named_parameters()` order.
            Needed only at ZeRO stage 0, whose files do not name the optimizer's parameters; without it
            they are matched by shape against the module's parameters in order.
    """

    def __init__(self, tag_dir: str, trainable_names: Optional[Sequence[str]] = None):
        self.tag_dir = tag_dir
        self.trainable_names = list(trainable_names) if trainable_names is not None else None
        stage3 = os.path.isfile(os.path.join(tag_dir, STAGE3_MODEL_STATES.format(0)))
        self.states_path = os.path.join(tag_dir, STAGE3_MODEL_STATES.format(0) if stage3 else layout.MODEL_STATES)
        self.model_states = load_deepspeed_file(self.states_path)
        if not isinstance(self.model_states, dict) or "module" not in self.model_states:
            raise CheckpointError("not a DeepSpeed model-states file (no 'module')", where=self.states_path)
        refuse_unsupported(tag_dir, self.model_states)
        self.module_state = self.model_states["module"]
        # name -> key ('master', 'exp_avg', ...) -> its elements in the memory-mapped files (_Chain)
        self.tensors: Dict[str, Dict[str, _Chain]] = {}
        self.shapes: Dict[str, tuple] = {}
        self.groups: List[dict] = []  # dsrun's optimizer_groups: hyperparameters and scalar state per group
        self.loss_scaler: dict = {}
        self.zero_stage = 0
        optim = optimizer_states(tag_dir, self.model_states)
        self.world_size = len(optim) or int(self.model_states.get("dp_world_size") or 1)
        self._parse(optim, stage3)
        self._add_untrained()
        self.aliases = dict(self.model_states.get("shared_params") or {}) or self._storage_aliases()
        self.manifest = self._manifest()

    # -- parameters -----------------------------------------------------------------------------------

    def _parse(self, optim: List[dict], stage3: bool) -> None:
        if stage3:
            if not optim:
                raise CheckpointError("ZeRO-3 DeepSpeed checkpoint without optimizer files", where=self.tag_dir)
            self.zero_stage = 3
            self._parse_zero3(optim)
        elif optim and "zero_stage" in optim[0]:
            self.zero_stage = int(optim[0]["zero_stage"])
            self._parse_partitioned(optim, param_padding=True)
        elif optim:  # BF16_Optimizer: ZeRO stage from the config (0 or 1)
            self.zero_stage = int((self._config().get("zero_optimization") or {}).get("stage", 0) or 0)
            self._parse_partitioned(optim, param_padding=False)
        else:
            self._parse_stage0(self.model_states.get("optimizer"))

    def _config(self) -> dict:
        """The DeepSpeed config as saved (`ds_config`): a dict, or {} where DeepSpeed kept a file path."""
        config = self.model_states.get("ds_config")
        return config if isinstance(config, dict) else {}

    def _param_names(self) -> List[str]:
        """The module's parameter names in state-dict order: no buffers, no tied aliases."""
        buffers = set(self.model_states.get("buffer_names") or [])
        aliases = set(self.model_states.get("shared_params") or {}) | set(self._storage_aliases())
        return [k for k in self.module_state if k not in buffers and k not in aliases]

    def _group_shapes(self) -> List["OrderedDict[str, tuple]"]:
        """`param_shapes` of the model states, or (stage 0) the trainable parameters as one group."""
        shapes = self.model_states.get("param_shapes")
        if shapes:
            return [OrderedDict((k, tuple(v)) for k, v in group.items()) for group in shapes]
        names = self.trainable_names or self._param_names()
        return [OrderedDict((k, tuple(self.module_state[k].shape)) for k in names)]

    def _match_names(self, shapes: List[tuple]) -> List[str]:
        """Names for the optimizer's parameters of `shapes` (in order): the trainable names when given,
        else the module's parameters, skipping those whose shape does not fit (frozen ones)."""
        if self.trainable_names is not None and len(self.trainable_names) == len(shapes):
            candidates, strict = self.trainable_names, True
        else:
            candidates, strict = self._param_names(), False
        names, pos = [], 0
        for shape in shapes:
            while pos < len(candidates) and (tuple(self.module_state[candidates[pos]].shape) != tuple(shape)):
                if strict:
                    break
                pos += 1
            if pos >= len(candidates) or tuple(self.module_state[candidates[pos]].shape) != tuple(shape):
                raise CheckpointError(f"the optimizer state of the DeepSpeed checkpoint (a parameter of shape "
                                      f"{tuple(shape)}) matches no parameter of the model", where=self.tag_dir,
                                      hint="load into the model it was saved from, or load_optimizer_states=False")
            names.append(candidates[pos])
            pos += 1
        return names

    def _put(self, name: str, shape, master, optim: Dict[str, _Chain]) -> None:
        """`master` and each `optim` value: a tensor or a _Chain, at least numel(shape) long."""
        n = _numel(shape)
        entry = {"master": _Chain([master])[:n]}
        entry.update({k: _Chain([v])[:n] for k, v in optim.items()})
        self.shapes[name] = tuple(shape)
        self.tensors[name] = entry

    def _add_group(self, hyper: dict, state: dict) -> None:
        self.groups.append({"hyperparameters": {k: v for k, v in hyper.items() if k != "params"},
                            "state": {k: _scalar(v) for k, v in state.items() if not _is_state_tensor(v)}})

    def _parse_stage0(self, opt) -> None:
        """Stage 0: the torch optimizer's state_dict, or an fp16/bf16 wrapper around it."""
        if not isinstance(opt, dict):
            return  # no optimizer: masters come from the module
        inner = opt.get("optimizer_state_dict", opt)
        if "fp32_groups_flat" in opt:  # FP16_Optimizer: one unpadded flat master per group
            shapes = [s for g in self._group_shapes() for s in g.values()]
            names = self._match_names(shapes)
            states = [inner["state"].get(g["params"][0], {}) for g in inner["param_groups"]]
            self._walk_flat(names, shapes, _Chain(opt["fp32_groups_flat"]), self._cat_states(states))
        else:
            masters = [t for group in opt.get("fp32_groups") or [] for t in group]  # FP16_UnfusedOptimizer
            index = [i for g in inner["param_groups"] for i in g["params"]]
            if masters:
                names = self._match_names([tuple(t.shape) for t in masters])
            else:  # plain torch optimizer over the module's own (fp32) parameters
                names = self._torch_optimizer_names(inner, index)
            for pos, (i, name) in enumerate(zip(index, names)):
                if name is None:
                    continue
                value = masters[pos] if masters else self.module_state[name]
                optim = {k: v for k, v in inner["state"].get(i, {}).items() if _is_state_tensor(v)}
                self._put(name, value.shape, value, optim)
        for g in inner["param_groups"]:
            self._add_group(g, inner["state"].get(g["params"][0], {}) if g["params"] else {})
        self._loss_scale(opt)

    def _torch_optimizer_names(self, inner, index) -> List[Optional[str]]:
        """Names of a torch optimizer's parameter indices: all module parameters or the trainable ones,
        whichever count fits; else by the shapes of the saved states (indices without state get None)."""
        params = self._param_names()
        for names in (params, self.trainable_names or []):
            if len(names) == len(index):
                return list(names)
        with_state = [i for i in index if inner["state"].get(i)]
        shapes = [tuple(next(v for v in inner["state"][i].values() if _is_state_tensor(v)).shape)
                  for i in with_state]
        named = dict(zip(with_state, self._match_names(shapes)))
        return [named.get(i) for i in index]

    def _cat_states(self, states: List[dict]) -> Dict[str, _Chain]:
        keys = [k for k, v in (states[0] if states else {}).items() if _is_state_tensor(v)]
        return {k: _Chain([s[k] for s in states]) for k in keys}

    def _walk_flat(self, names, shapes, master, optim, paddings=None) -> None:
        offset = 0
        for i, (name, shape) in enumerate(zip(names, shapes)):
            n = _numel(shape)
            self._put(name, shape, master[offset:offset + n], {k: v[offset:offset + n] for k, v in optim.items()})
            offset += n + (paddings[i] if paddings else 0)
        if offset > master.numel():
            raise CheckpointError(f"DeepSpeed flat weights hold {master.numel()} elements, the parameters need "
                                  f"{offset}", where=self.tag_dir, hint="the checkpoint is damaged or of another model")

    def _parse_partitioned(self, optim: List[dict], param_padding: bool) -> None:
        """ZeRO-1/2 and BF16_Optimizer: per group, equal partitions of one flat buffer."""
        first = optim[0]
        paddings = first.get("param_alignment_paddings") if param_padding else None
        for g, shapes in enumerate(self._group_shapes()):
            master = _Chain([sd["single_partition_of_fp32_groups"][g] for sd in optim])
            base = [sd["base_optimizer_state"] for sd in optim]
            if isinstance(base[0], dict):  # rigid: each rank's torch state_dict of its flat partitions
                states = [b["state"].get(b["param_groups"][g]["params"][0], {}) for b in base]
                hyper = base[0]["param_groups"][g]
            else:  # elastic: per group states without padding, step kept apart
                step = first.get("base_optimizer_state_step", 0)
                states, hyper = [dict(b[g], step=step) for b in base], {}
            self._walk_flat(list(shapes), list(shapes.values()), master, self._cat_states(states),
                            paddings[g] if paddings else None)
            self._add_group(hyper, states[0])
        self._loss_scale(first)

    def _parse_zero3(self, optim: List[dict]) -> None:
        """ZeRO-3: each parameter cut in `world` partitions of ceil(numel / world) elements."""
        world = len(optim)
        flats, states = [], []
        for sd in optim:
            flats.append(_Chain(sd["fp32_flat_groups"]))
            inner = sd["optimizer_state_dict"]
            order = [i for g in inner["param_groups"] for i in g["params"]]  # sub-groups in flat order
            states.append(self._cat_states([inner["state"].get(i, {}) for i in order]))
        offset = 0
        for group in self._group_shapes():
            for name, shape in group.items():
                part = math.ceil(_numel(shape) / world)
                whole = _Chain([f[offset:offset + part] for f in flats])
                optim_whole = {k: _Chain([s[k][offset:offset + part] for s in states]) for k in states[0]}
                self._put(name, shape, whole, optim_whole)
                offset += part
        inner = optim[0]["optimizer_state_dict"]
        for g in inner["param_groups"]:
            self._add_group(g, inner["state"].get(g["params"][0], {}) if g["params"] else {})
        self._loss_scale(optim[0])
        fragments = self.model_states.get("frozen_param_fragments") or {}
        if fragments:  # frozen parameters: each rank's model states hold its partition
            ranks = [self.model_states] + [load_deepspeed_file(os.path.join(self.tag_dir, STAGE3_MODEL_STATES.format(r)))
                                           for r in range(1, world)]
            for name, shape in (self.model_states.get("frozen_param_shapes") or {}).items():
                whole = _Chain([r["frozen_param_fragments"][name] for r in ranks])
                self._put(name, shape, whole, {})

    def _add_untrained(self) -> None:
        """Parameters outside the optimizer (frozen): from the saved fragments or the module state."""
        for name, value in (self.model_states.get("frozen_param_fragments") or {}).items():
            shape = (self.model_states.get("frozen_param_shapes") or {}).get(name, value.shape)
            if name not in self.tensors and value.numel() == _numel(shape):
                self._put(name, shape, value, {})
        for name in self._param_names():
            value = self.module_state[name]
            if name not in self.tensors and value.numel() > 0:
                self._put(name, value.shape, value, {})
        self.frozen = {n for n in self.tensors if set(self.tensors[n]) == {"master"}} - self._trained()

    def _trained(self) -> set:
        shapes = self.model_states.get("param_shapes")
        if shapes:
            return {k for group in shapes for k in group}
        if self.trainable_names is not None:
            return set(self.trainable_names)
        return {n for n, t in self.tensors.items() if len(t) > 1}

    def _storage_aliases(self) -> Dict[str, str]:
        """Tied weights in the module state (one storage under two names): alias -> first name."""
        seen, aliases = {}, {}
        for name, value in self.module_state.items():
            if not torch.is_tensor(value) or value.numel() == 0:
                continue
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if key in seen:
                aliases[name] = seen[key]
            else:
                seen[key] = name
        return aliases

    def _loss_scale(self, holder: dict) -> None:
        """The fp16 loss scale in dsrun's form (nothing for bf16/fp32, whose scale is fixed at 1). fp16 is
        told by the saved weights' dtype (ZeRO-3 placeholders keep it), which, unlike `ds_config`, is always
        there."""
        if not any(self.module_state[n].dtype == torch.float16 for n in self._param_names()):
            return
        scaler = holder.get("loss_scaler")
        source = vars(scaler) if scaler is not None else holder
        for key in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis"):
            if key in source:
                self.loss_scaler[key] = _scalar(source[key])

    # -- dsrun's views --------------------------------------------------------------------------------

    def _manifest(self) -> dict:
        params = {name: {"shape": list(shape), "numel": _numel(shape), "frozen": name in self.frozen,
                         "dtype": str(self.module_state.get(name, torch.empty(0)).dtype).replace("torch.", "")}
                  for name, shape in self.shapes.items()}
        return {"format": "deepspeed", "tag": os.path.basename(self.tag_dir), "params": params,
                "param_order": list(params), "shards": {}, "files": [],
                # DeepSpeed does not record exclude_frozen_parameters: a frozen parameter it left out keeps
                # the model's value, as DeepSpeed's own non-strict load would
                "excluded_frozen_parameters": True, "mid_accumulation": False,
                "topology": {"world_size": self.world_size, "zero_stage": self.zero_stage}}

    def _counters(self) -> dict:
        """DeepSpeed saves no micro-step count: a whole number of accumulation windows when the saved config
        tells the window, else 0 (DeepSpeed keeps its fresh engine's 0); either starts a new window."""
        states = self.model_states
        gas = self._config().get("gradient_accumulation_steps")
        steps = int(states.get("global_steps", 0))
        return {"global_steps": steps, "global_samples": int(states.get("global_samples", 0)),
                "skipped_steps": int(states.get("skipped_steps", 0)),
                "micro_steps": steps * gas if isinstance(gas, int) and gas > 0 else 0}

    def dsrun_states(self) -> dict:
        """The model-states dict `engine_io.load` expects of a dsrun checkpoint (see [Note: checkpoint
        format]); `client_state` holds every top-level key that is not DeepSpeed's own, as DeepSpeed returns."""
        states = self.model_states
        return {
            "module": self.module_state,
            "frozen_param_names": sorted(self.frozen),
            "shared_params": self.aliases,
            "scalar_state": {"optimizer_groups": self.groups, "loss_scaler": dict(self.loss_scaler),
                             "counters": self._counters(), "lr_scheduler": states.get("lr_scheduler")},
            "client_state": {k: v for k, v in states.items() if k not in _DS_STATE_KEYS},
        }

    # -- the ShardReader interface ----------------------------------------------------------------------

    def _entry(self, name: str) -> Dict[str, torch.Tensor]:
        name = self.aliases.get(name, name)
        if name not in self.tensors:
            raise KeyError(f"parameter {name!r} is not in the checkpoint")
        return self.tensors[name]

    def keys(self, name: str, start: int = 0, end=None) -> List[str]:
        return sorted(self._entry(name)) if self.aliases.get(name, name) in self.tensors else []

    def has(self, name: str, key: str = "master", start: int = 0, end=None) -> bool:
        return key in self.keys(name)

    def read(self, name: str, key: str, start: int, end: int) -> torch.Tensor:
        entry = self._entry(name)
        if key not in entry:
            raise KeyError(f"{name}: no {key!r} saved")
        return entry[key][start:end].read()

    def read_full(self, name: str, key: str = "master") -> torch.Tensor:
        return self.read(name, key, 0, _numel(self.shapes[self.aliases.get(name, name)])).view(
            self.shapes[self.aliases.get(name, name)])

    def files_for(self, ranges) -> list:
        return []  # everything was read when the checkpoint was opened

    def open_files(self, files) -> None:
        pass

    def close(self) -> None:
        self.tensors.clear()

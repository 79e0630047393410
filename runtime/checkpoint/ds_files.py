"""The files of a DeepSpeed checkpoint tag folder: which there are, and unpickling them without DeepSpeed.

Layout: [Note: DeepSpeed checkpoint layout] in deepspeed_format.py. DeepSpeed's files pickle a few of its own objects (the loss scaler, `ZeroStageEnum`, `fragment_address`
in `param_slice_mappings`), so a plain `torch.load` needs the `deepspeed` package. Here every
`deepspeed.*` class is replaced by a stand-in that keeps the object's attributes (`DeepSpeedObject`),
and every `deepspeed.*` enum by its value, so the tensors and plain values around them load with torch alone.
"""
from __future__ import annotations

import glob
import os
import pickle
import re
import types
from typing import List

import torch

from dsrun.runtime.checkpoint import layout
from dsrun.runtime.checkpoint.errors import CheckpointError

__all__ = ["DeepSpeedObject", "load_deepspeed_file", "is_deepspeed_folder", "refuse_unsupported",
           "optimizer_states", "STAGE3_MODEL_STATES"]

STAGE3_MODEL_STATES = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
_OPTIM_FILE = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_00_?optim_states\.pt$")


class DeepSpeedObject:
    """A DeepSpeed object read back from a checkpoint: its attributes, without its class (`ds_class`
    names it). Enough to read values such as `loss_scaler.cur_scale`."""

    ds_class = "deepspeed"

    def __init__(self, *args, **kwargs):
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __repr__(self):
        return f"<{self.ds_class} read without DeepSpeed>"


def _enum_value(value):
    return value


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "deepspeed" or module.startswith("deepspeed."):
            if name.endswith("Enum"):
                return _enum_value
            return type(name, (DeepSpeedObject,), {"ds_class": f"{module}.{name}"})
        return super().find_class(module, name)


# torch.load takes a module-like object whose `Unpickler` it subclasses
_PICKLE = types.SimpleNamespace(Unpickler=_Unpickler, load=pickle.load, __name__="dsrun_deepspeed_pickle")


def load_deepspeed_file(path: str, *, mmap: bool = True):
    """`torch.load` of one DeepSpeed checkpoint file on CPU; a failure becomes a CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=False, pickle_module=_PICKLE)
    except FileNotFoundError:
        raise CheckpointError("DeepSpeed checkpoint file not found", where=path,
                              hint="the checkpoint is incomplete; load another tag") from None
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, pickle or OSError errors
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"DeepSpeed checkpoint file cannot be read (truncated or corrupt?): {first_line}",
                              where=path, hint="the checkpoint is damaged; load another tag") from err


def is_deepspeed_folder(tag_dir: str) -> bool:
    """Whether `tag_dir` is a DeepSpeed checkpoint tag folder (model states and no dsrun manifest)."""
    if os.path.isfile(os.path.join(tag_dir, layout.MANIFEST)):
        return False
    return any(os.path.isfile(os.path.join(tag_dir, name))
               for name in (layout.MODEL_STATES, STAGE3_MODEL_STATES.format(0)))


def refuse_unsupported(tag_dir: str, model_states: dict) -> None:
    """Model-parallel, pipeline and MoE checkpoints split the model itself over files, universal ones keep
    it in another layout: not read."""
    names = os.listdir(tag_dir)
    kinds = [kind for kind, found in (
        ("tensor/model parallel (mp_rank_01...)", any(n.startswith("mp_rank_01") or "_mp_rank_01_" in n
                                                      for n in names)),
        ("pipeline (layer_*)", any(n.startswith("layer_") for n in names)),
        ("universal (zero/)", os.path.isdir(os.path.join(tag_dir, "zero"))),
        ("mixture of experts", "num_experts" in model_states or any(n.startswith("expp_rank_") for n in names)),
    ) if found]
    if kinds:
        raise CheckpointError(f"a DeepSpeed {kinds[0]} checkpoint: dsrun reads only data-parallel ones",
                              where=tag_dir)


def optimizer_states(tag_dir: str, model_states: dict) -> List[dict]:
    """Each rank's `optimizer_state_dict` from its `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`, in
    rank order; empty for a stage-0 checkpoint without them. Missing ranks' files raise a CheckpointError."""
    by_rank = {}
    for path in glob.glob(os.path.join(glob.escape(tag_dir), "*optim_states.pt")):
        match = _OPTIM_FILE.match(os.path.basename(path))
        if match:
            by_rank.setdefault(int(match.group(2)), path)
    if sorted(by_rank) != list(range(len(by_rank))):
        raise CheckpointError(f"DeepSpeed optimizer files for ranks {sorted(by_rank)}: some ranks' files are "
                              "missing", where=tag_dir, hint="the checkpoint is incomplete")
    states = []
    for rank in range(len(by_rank)):
        payload = load_deepspeed_file(by_rank[rank])
        if not isinstance(payload, dict) or not isinstance(payload.get("optimizer_state_dict"), dict):
            raise CheckpointError("not a DeepSpeed optimizer-states file (no 'optimizer_state_dict')",
                                  where=by_rank[rank])
        states.append(payload["optimizer_state_dict"])
    if states:
        count = states[0].get("partition_count", model_states.get("dp_world_size"))
        count = max(count) if isinstance(count, (list, tuple)) else count
        if isinstance(count, int) and count != len(states):
            raise CheckpointError(f"DeepSpeed checkpoint of {count} ranks has optimizer files of {len(states)}: "
                                  "the others are missing", where=tag_dir,
                                  hint="the checkpoint is incomplete; load another tag")
    return states

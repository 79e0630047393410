"""Unpickling DeepSpeed checkpoint files without DeepSpeed installed.

DeepSpeed's files pickle a few of its own objects (the loss scaler, `ZeroStageEnum`, `fragment_address`
in `param_slice_mappings`), so a plain `torch.load` needs the `deepspeed` package. Here every
`deepspeed.*` class is replaced by a stand-in that keeps the object's attributes (`DeepSpeedObject`),
and every `deepspeed.*` enum by its value, so the tensors and plain values around them load with torch alone.
"""
from __future__ import annotations

import pickle
import types

import torch

from dsrun.runtime.checkpoint.errors import CheckpointError

__all__ = ["DeepSpeedObject", "load_deepspeed_file"]


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

"""`dsrun.zero`: DeepSpeed's `deepspeed.zero` (`Init`, `GatheredParameters`, `register_external_parameter`).

The implementation is dsrun.runtime.zero; this module re-exports its public names, and any other name
is looked up there on first use, so new ZeRO entry points appear here without an edit.
"""
import importlib

from dsrun.runtime.zero import GatheredParameters, Init, register_external_parameter

__all__ = ["Init", "GatheredParameters", "register_external_parameter"]


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return getattr(importlib.import_module("dsrun.runtime.zero"), name)
    except AttributeError:
        raise AttributeError(f"module 'dsrun.zero' has no attribute {name!r}") from None

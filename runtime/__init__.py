"""dsrun.runtime: what each worker boots (config, distributed init, engine, ZeRO, ...).

Submodules import torch; nothing is imported eagerly here. As an attribute, a submodule is imported on
first use, so DeepSpeed-style `deepspeed.runtime.lr_schedules.WarmupLR` works after `import dsrun as
deepspeed` without an import statement for the submodule.
"""
import importlib
import importlib.util


def __getattr__(name):
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

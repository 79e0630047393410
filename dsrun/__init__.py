"""dsrun: a DeepSpeed-compatible launcher and training runtime.

`import dsrun as deepspeed` works for DeepSpeed scripts, and DeepSpeed's module tree is mirrored by the
subpackages here (`dsrun.comm`, `dsrun.accelerator`, `dsrun.ops`, `dsrun.utils`, `dsrun.zero`, ...:
docs/compat.md). The runtime API is imported lazily so that `dsrun.launcher` (and `dsrun --help`) never
imports torch.
"""
import importlib
import os

__version__ = "0.1.0"

# [Note: source checkouts] Installed, `launcher/`, `runtime/` and `kernels/` sit inside this package
# (setup.py maps them). Run from a source checkout without installing (PYTHONPATH=repo, or pytest from
# the repo root shadowing the editable install), they are siblings of this folder: add the checkout root
# to the package path so that `dsrun.launcher` still resolves. Only a checkout is recognised, so an
# installed package never exposes its site-packages neighbours.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_ROOT, "setup.py")) and os.path.isfile(os.path.join(_ROOT, "launcher", "spec.py")):
    __path__.append(_ROOT)

# public name -> module that defines it; ("module", "attribute") when the names differ. Names whose
# module is the value itself (`zero`, `comm`, ...) are real subpackages, so `import dsrun.comm` works too.
_LAZY = {
    "initialize": "dsrun.runtime.api",
    "init_distributed": "dsrun.runtime.dist",
    "add_config_arguments": "dsrun.runtime.api",
    "DeepSpeedConfig": "dsrun.runtime.config",
    "DeepSpeedConfigError": ("dsrun.errors", "ConfigError"),
    "DeepSpeedEngine": ("dsrun.runtime.engine", "Engine"),
    "get_accelerator": "dsrun.accelerator",
    "logger": "dsrun.utils",
    "log_dist": "dsrun.utils",
    "zero": "dsrun.zero",
    "comm": "dsrun.comm",
    "accelerator": "dsrun.accelerator",
    "ops": "dsrun.ops",
    "utils": "dsrun.utils",
    "checkpoint": "dsrun.checkpoint",
    "moe": "dsrun.moe",
    "git_version_info": "dsrun.git_version_info",
    "checkpointing": "dsrun.checkpointing",
    "pipe": "dsrun.pipe",
    "PipelineModule": "dsrun.pipe",
    "kernels": "dsrun.kernels",
    "launcher": "dsrun.launcher",
    "runtime": "dsrun.runtime",
}

__all__ = ["__version__", "initialize", "init_distributed", "add_config_arguments", "DeepSpeedConfig",
           "DeepSpeedConfigError", "DeepSpeedEngine", "get_accelerator", "logger", "log_dist", "zero", "comm",
           "accelerator", "ops", "utils", "checkpoint", "moe", "git_version_info", "checkpointing", "pipe",
           "kernels"]


def __getattr__(name):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'dsrun' has no attribute {name!r}")
    target, attr = target if isinstance(target, tuple) else (target, name)
    module = importlib.import_module(target)
    value = module if target.rsplit(".", 1)[-1] == attr else getattr(module, attr)
    globals()[name] = value
    return value

"""Checks made on the launching machine before any rank starts: the script exists, and the DeepSpeed
config named in the script's arguments loads for the planned world size.

`check(spec, plan)` raises a UsageError/ConfigError (exit 2, nothing started: shared/design.md, "Exit
codes") or returns a `Preflight` whose `summary()` is the human-readable `--dry_run` line set.

[Note: preflight config] The config is read by the runtime's own loader (`runtime/config`:
`load_config(path, world_size=...)`), so the launcher and the ranks can never disagree about what is
valid. That loader imports no torch, and it is imported only here, when launching (never for
`dsrun --help`). `"auto"` values resolve to their defaults there, so configs written for HF Trainer
pass. The world size is the planned number of ranks; a script using model parallelism has fewer
data-parallel ranks, so a batch-size mismatch that some divisor of the world size satisfies is only
a warning: the runtime checks the batch again with the real data-parallel size.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from dsrun.errors import ConfigError, UsageError

from .spec import LaunchPlan, LaunchSpec

__all__ = ["CONFIG_FLAGS", "find_config", "check", "Preflight"]

# The script flags that name a DeepSpeed config, in the order DeepSpeed's runtime prefers them.
CONFIG_FLAGS = ("--deepspeed_config", "--deepscale_config", "--deepspeed")
_BASE64 = re.compile(r"eyJ[A-Za-z0-9_\-+/]*=*")  # base64 of JSON text starting with '{"'
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def find_config(script_args: Sequence[str]) -> Optional[str]:
    """The config path in the script's arguments, or None.

    `--deepspeed_config X`, `--deepspeed_config=X`, the deprecated `--deepscale_config`, and
    `--deepspeed X`/`--deepspeed=X` (dsrun.add_config_arguments' `--deepspeed [PATH]`: a bare
    `--deepspeed`, followed by another flag or nothing, names no config). As with argparse, the last
    occurrence of a flag wins; `--deepspeed_config` wins over `--deepspeed PATH`.
    """
    found = {}
    args = list(script_args)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name not in CONFIG_FLAGS:
            continue
        if not eq:
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or following.startswith("-"):
                continue
            value = following
        found[name] = value
    return next((found[flag] for flag in CONFIG_FLAGS if found.get(flag)), None)


@dataclass
class Preflight:
    """What the checks found: the script, the config path (None: none named) and its batch sizes."""

    script: str
    world_size: int
    config: Optional[str] = None
    batch: Optional[str] = None  # "train_batch_size 8 = micro 2 x accumulation 2 x 2 ranks"
    notes: List[str] = field(default_factory=list)

    def summary(self, plan: LaunchPlan) -> str:
        """A few lines for people (stderr on `--dry_run`)."""
        hosts = ", ".join(f"{host}: {len(slots)}" for host, slots in plan.world_info.items())
        lines = [f"dsrun: dry run of {plan.job_id}: {self.world_size} rank(s) ({hosts}), launcher {plan.launcher}, "
                 f"master {plan.master_addr}:{plan.master_port}",
                 f"dsrun: script {self.script}: found" if self.script else "dsrun: script: not checked"]
        if self.config:
            lines.append(f"dsrun: config {self.config}: valid; {self.batch}")
        else:
            lines.append("dsrun: config: none named in the script's arguments (not checked)")
        lines += [f"dsrun: note: {note}" for note in self.notes]
        lines.append("dsrun: dry run: nothing started")
        return "\n".join(lines)


def check(spec: LaunchSpec, plan: LaunchPlan) -> Preflight:
    """Run every preflight check for `plan`; raise the first problem (exit 2).

    A job that runs on other machines (multi-node launchers) may have its files only there: a script or
    config missing on this machine is a note, not an error; a config found here is validated.
    """
    remote = plan.launcher != "local" and plan.node_rank is None
    result = Preflight(script="", world_size=plan.world_size)
    try:
        result.script = _check_script(spec)
    except UsageError as err:
        if not remote:
            raise
        result.notes.append(f"{err.message}: not checked (it may exist on the nodes only)")
    path = find_config(spec.script_args)
    if path is not None:
        full = os.path.join(spec.cwd, path)
        if remote and not os.path.isfile(full):
            result.notes.append(f"config {path} is not on this machine: not checked")
            return result
        result.config = path
        result.batch, note = _check_config(full, path, plan.world_size)
        if note:
            result.notes.append(note)
    return result


def _check_script(spec: LaunchSpec) -> str:
    """The script as given, after checking that it is a file (relative to the working directory).
    `--module` names a module and `--no_python` a program found on PATH: neither is checked ("")."""
    if spec.module or spec.no_python:
        return ""
    path = os.path.join(spec.cwd, spec.script)
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise UsageError(f"script {spec.script!r} {what} (looked in {spec.cwd})", where="SCRIPT",
                         hint="give the path of a Python file; --module runs a module, --no_python a program")
    return spec.script


def _check_config(path: str, shown: str, world_size: int):
    """Load the config at `path` for `world_size` ranks; return (batch text, warning or None)."""
    from dsrun.runtime.config import load_config  # no torch: [Note: preflight config]

    if not os.path.isfile(path):
        if _BASE64.fullmatch(shown):  # DeepSpeed also takes the config as url-safe base64 JSON
            path = shown
        else:
            raise ConfigError("config file not found", where=shown,
                              hint="the path is relative to the working directory; fix it in the script's arguments")
    try:
        cfg = load_config(path, world_size=world_size)
    except ConfigError as err:
        key = getattr(err, "key_path", None) or err.where
        if key not in _BATCH_KEYS:
            raise
        for size in range(world_size - 1, 0, -1):  # fewer data-parallel ranks (model parallelism)?
            if world_size % size == 0 and _loads(load_config, path, size):
                cfg = load_config(path, world_size=size)
                note = (f"{shown}: the batch sizes do not fit {world_size} data-parallel ranks ({err.message}); "
                        f"they fit {size}: fine if the script uses model parallelism")
                return _batch_text(cfg), note
        raise
    return _batch_text(cfg), None


def _loads(load_config, path: str, world_size: int) -> bool:
    try:
        load_config(path, world_size=world_size)
    except ConfigError:
        return False
    return True


def _batch_text(cfg) -> str:
    return (f"train_batch_size {cfg.train_batch_size} = micro {cfg.train_micro_batch_size_per_gpu} x accumulation "
            f"{cfg.gradient_accumulation_steps} x {cfg.world_size} rank(s)")

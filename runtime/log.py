"""dsrun's logger inside the ranks: the `dsrun` logger, its level from the launcher, rank-0-once helpers.

Every runtime module logs to `logging.getLogger("dsrun")` or a child of it (`dsrun.runtime....`).
Under `dsrun`, the node agent passes the launcher's `--log_level` (`error` for `-q`) to each rank as
`DSRUN_LOG_LEVEL` (launcher/agent.py `worker_env`); the first `get_logger()` then gives the `dsrun`
logger that level and one stderr handler whose lines carry the level (`[dsrun] WARNING: ...`; the
agent already prefixes each line with `[rank N]`) and stops it propagating to the root logger (a script's
own `basicConfig` would print every line twice). Records get a `rank` attribute. Without
`DSRUN_LOG_LEVEL` (torchrun, a plain `python`, tests) logging is left as the application set it up.

Messages that every rank would repeat (config deprecations, "auto" resolutions, scheduler warnings)
go through `warn_once_rank0` / `info_rank0` / `rank0_warns`: printed by rank 0 only, once per process.
The rank is torch.distributed's when it is initialised, else `$RANK`, else 0; torch is never imported
here (the launcher's config preflight loads the config without it).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

__all__ = ["LEVEL_ENV", "get_logger", "current_rank", "rank0_warns", "warn_once_rank0", "info_rank0",
           "log_auto_resolved"]

LEVEL_ENV = "DSRUN_LOG_LEVEL"  # set by launcher/agent.py worker_env
_NAME = "dsrun"
_FORMAT = "[dsrun] %(levelname)s: %(message)s"
_said = set()


def current_rank() -> int:
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except (RuntimeError, ValueError):
        pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _RankFilter(logging.Filter):
    """Adds `record.rank` (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = current_rank()
        return True


def _launcher_level() -> Optional[int]:
    name = os.environ.get(LEVEL_ENV, "").strip().upper()
    level = logging.getLevelName(name) if name else None
    return level if isinstance(level, int) else None


def get_logger(name: str = _NAME) -> logging.Logger:
    """The `dsrun` logger (or a child), configured from `DSRUN_LOG_LEVEL` on first use."""
    root = logging.getLogger(_NAME)
    if not any(isinstance(f, _RankFilter) for f in root.filters):
        root.addFilter(_RankFilter())
        level = _launcher_level()
        if level is not None:
            handler = logging.StreamHandler(sys.stderr)
            handler.addFilter(_RankFilter())  # children's records reach this handler without the logger's filter
            handler.setFormatter(logging.Formatter(_FORMAT))
            root.addHandler(handler)
            root.setLevel(level)
            root.propagate = False
    return logging.getLogger(name)


def _enabled(level: int) -> bool:
    launcher = _launcher_level()
    return level >= launcher if launcher is not None else get_logger().isEnabledFor(level)


def rank0_warns() -> bool:
    """True where a warning every rank would repeat should be issued: rank 0, unless the launcher's
    `--log_level`/`-q` hides warnings. For `warnings.warn` call sites (config deprecations)."""
    return current_rank() == 0 and _enabled(logging.WARNING)


def warn_once_rank0(message: str, *args, logger: Optional[logging.Logger] = None) -> None:
    """A warning that every rank would repeat: logged by rank 0 only, once per process."""
    _once_rank0(logging.WARNING, message, args, logger)


def info_rank0(message: str, *args, logger: Optional[logging.Logger] = None) -> None:
    _once_rank0(logging.INFO, message, args, logger)


def _once_rank0(level: int, message: str, args: tuple, logger: Optional[logging.Logger]) -> None:
    if current_rank() != 0:
        return
    key = (level, message, repr(args))
    if key in _said:
        return
    _said.add(key)
    (logger or get_logger()).log(level, message, *args, stacklevel=3)


def log_auto_resolved(config) -> None:
    """List what each `"auto"` of the config became (`DsConfig.auto_resolved`) at info level, from rank 0.
    Values that batch.py inferred are read back from the config (the note only says how)."""
    parts = []
    for path, how in getattr(config, "auto_resolved", {}).items():
        value = getattr(config, path, None) if "." not in path else None
        parts.append(f"{path} = {value} ({how})" if value is not None and str(value) not in how else f"{path} = {how}")
    if parts:
        info_rank0('config "auto" values: %s', "; ".join(parts))

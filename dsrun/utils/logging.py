"""DeepSpeed's script logger: `logger` (INFO and up, to stdout, DeepSpeed's line format) and `log_dist`.

It is its own logger ("dsrun.script", not propagating), so configuring it never changes how dsrun's
runtime logs, and dsrun's runtime never writes to it.
"""
import logging
import sys

__all__ = ["logger", "log_dist", "log_dist_once", "set_log_level_from_string"]

_FORMAT = "[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d:%(funcName)s] %(message)s"


def _make_logger() -> logging.Logger:
    log = logging.getLogger("dsrun.script")
    if not log.handlers:
        handler = logging.StreamHandler(stream=sys.stdout)
        handler.setFormatter(logging.Formatter(_FORMAT))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


logger = _make_logger()
_logged_once = set()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else -1


def log_dist(message: str, ranks=None, level=logging.INFO) -> None:
    """Log `message` on the given ranks (None or [-1] = every rank; [0] = rank 0), prefixed with the rank."""
    rank = _rank()
    if ranks is None or -1 in ranks or rank in ranks or rank == -1:
        logger.log(level, f"[Rank {rank}] {message}", stacklevel=2)


def log_dist_once(message: str, ranks=None, level=logging.INFO) -> None:
    if (message, level) not in _logged_once:
        _logged_once.add((message, level))
        log_dist(message, ranks, level)


def set_log_level_from_string(log_level_str: str, custom_logger=None) -> None:
    level = logging.getLevelName(log_level_str.upper())
    if not isinstance(level, int):
        raise ValueError(f"invalid log level {log_level_str!r}")
    (custom_logger or logger).setLevel(level)

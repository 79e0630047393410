"""How one rank's command line is built, the same on every node and for every transport.

`worker_argv()` is the single serializer of `WorkerOptions` into argv (reference section 9.10, "one
option, one serializer"): the node agent calls it for each local rank and the planner for `commands`.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence, Tuple

from dsrun.errors import UsageError

from .spec import WorkerOptions

__all__ = ["MAX_CORE_ID", "worker_argv", "parse_range_list", "format_range_list", "cores_for_rank", "numactl_prefix"]


# Linux supports at most 8192 CPUs (CONFIG_NR_CPUS with MAXSMP); the bound keeps a typo such as
# `0-99999999999` from expanding into a list of a hundred billion ints.
MAX_CORE_ID = 65535


def parse_range_list(text: str, flag: str = "--bind_core_list") -> List[int]:
    """Parse a core list like `0,2-4,6` (ascending, non-overlapping, `a-b` with a <= b; DeepSpeed rules).

    Core ids are 0..`MAX_CORE_ID`.
    """
    cores: List[int] = []
    for item in text.split(","):
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", item)
        if match is None:
            raise UsageError(f"bad range {item!r} in {text!r}", where=flag,
                             hint="use ascending cores and ranges without spaces, e.g. 0,2-4,6")
        for digits in match.groups():
            value = (digits or "0").lstrip("0") or "0"
            if len(value) > len(str(MAX_CORE_ID)) or int(value) > MAX_CORE_ID:
                shown = digits if len(digits) <= 20 else digits[:20] + "..."
                raise UsageError(f"core {shown} in {item!r} is above the highest core id {MAX_CORE_ID}",
                                 where=flag, hint="list this machine's cores, e.g. 0-15 (see `lscpu`)")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise UsageError(f"bad range {item!r} in {text!r}: the end is below the start", where=flag,
                             hint="write ranges as low-high, e.g. 2-4")
        if cores and low <= cores[-1]:
            raise UsageError(f"bad range {item!r} in {text!r}: ranges must be ascending and must not overlap",
                             where=flag, hint="e.g. 0,2-4,6")
        cores.extend(range(low, high + 1))
    return cores


def format_range_list(cores: Sequence[int]) -> str:
    """Compress sorted cores into numactl's form: [0,1,2,5,6] -> `0-2,5-6`."""
    parts: List[str] = []
    start = prev = None
    for core in cores:
        if prev is not None and core == prev + 1:
            prev = core
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = core
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)


def cores_for_rank(worker: WorkerOptions, local_rank: int, local_size: int, *,
                   cores: Optional[Sequence[int]] = None) -> Optional[Tuple[int, ...]]:
    """The cores `local_rank` is bound to, or None without `--bind_cores_to_rank`.

    The list is `--bind_core_list`, else this node's physical cores; each rank gets an equal slice
    (DeepSpeed `numa.py`). The agent also sets `OMP_NUM_THREADS` to the slice length.
    """
    if not worker.bind_cores_to_rank:
        return None
    pool = list(worker.bind_core_list) if worker.bind_core_list else list(cores if cores is not None else
                                                                            range(_physical_cores()))
    per_rank = len(pool) // local_size if local_size > 0 else 0
    if per_rank < 1:
        raise UsageError(f"{len(pool)} core(s) cannot be shared by {local_size} ranks: at least one core "
                         "needs to be assigned to each rank", where="--bind_cores_to_rank",
                         hint="give more cores with --bind_core_list or start fewer ranks")
    return tuple(pool[per_rank * local_rank: per_rank * (local_rank + 1)])


def numactl_prefix(worker: WorkerOptions, local_rank: int, local_size: int, *,
                   cores: Optional[Sequence[int]] = None) -> List[str]:
    """`["numactl", "-C", "0-3"]` when binding, else []."""
    bound = cores_for_rank(worker, local_rank, local_size, cores=cores)
    return ["numactl", "-C", format_range_list(bound)] if bound else []


def worker_argv(worker: WorkerOptions, local_rank: int, local_size: int, *,
                cores: Optional[Sequence[int]] = None) -> List[str]:
    """The exact argv of local rank `local_rank` of `local_size`.

    `[numactl -C ...] python -u [-m] script [--local_rank=N] *script_args`; with `--no_python` the
    script is run directly. `cores` overrides this node's physical core list (tests).
    """
    if worker.module and worker.no_python:
        raise UsageError("--module and --no_python cannot be used together", where="--module",
                         hint="--module runs `python -m SCRIPT`; --no_python runs SCRIPT as a program")
    argv = numactl_prefix(worker, local_rank, local_size, cores=cores)
    if not worker.no_python:
        argv += [worker.python, "-u"] + (["-m"] if worker.module else [])
    argv.append(worker.script)
    if not worker.no_local_rank:
        argv.append(f"--local_rank={local_rank}")
    argv.extend(worker.script_args)
    return argv


def _physical_cores() -> int:
    try:
        import psutil

        count = psutil.cpu_count(logical=False)
    except Exception:
        count = None
    return count or os.cpu_count() or 1

"""Collective logging (`comms_logger`, DeepSpeed's keys) and the tap that feeds it and the watchdog.

`CommTap` wraps the collectives of one `Comm` object (ZeRO's, runtime/zero/comm.py, or the pipeline's,
runtime/pipe/comm.py, which adds broadcast, send and recv) by setting instance attributes (the class and
every other instance stay untouched; `remove()` deletes them). It is installed from outside the ZeRO
code, by `apply_monitoring`, and only when something listens:
- the hang watchdog notes the last collective issued (op, bytes, time): a dict update per call;
- `comms_logger.enabled` or `wall_clock_breakdown` time each call. Timing synchronises the device
  before and after the op and waits for it (as DeepSpeed's comms logger does), so an overlapped
  collective becomes a blocking one: a diagnostic mode, not for production throughput.

Reported per op: bytes (all_reduce: the tensor; all_gather: the gathered output; reduce_scatter and
all_to_all: the input; broadcast, send, recv: the tensor), time, algorithm bandwidth = bytes / time and bus
bandwidth = algbw x 2(n-1)/n for all_reduce, x 1 for broadcast, send and recv, and x (n-1)/n for the others
(nccl-tests' convention), in GB/s (10^9 bytes).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, List, Optional

__all__ = ["CommTap", "CommsLogger", "bus_factor"]

OPS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast", "send", "recv")
_WHOLE = ("broadcast", "send", "recv")  # bus bandwidth = algorithm bandwidth


def bus_factor(op: str, world_size: int) -> float:
    n = max(world_size, 1)
    if op in _WHOLE:
        return 1.0
    return 2.0 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


def _nbytes(op: str, args) -> int:
    tensor = args[0] if op in ("all_reduce", "all_gather") + _WHOLE else (args[1] if len(args) > 1 else args[0])
    try:
        return tensor.numel() * tensor.element_size()
    except AttributeError:
        return 0


class CommsLogger:
    """Accumulates (op, bytes) -> count and time; prints each op when verbose, a summary at the end."""

    def __init__(self, section, *, rank: int, world_size: int, write: Callable[[str], None]):
        self.verbose, self.debug = section.verbose, section.debug
        self.ops = None if section.prof_all else set(section.prof_ops)
        self.rank, self.world_size, self.write = rank, world_size, write
        self.stats: Dict[tuple, List[float]] = {}

    def wants(self, op: str) -> bool:
        return self.ops is None or op in self.ops

    def record(self, op: str, nbytes: int, seconds: float, caller: str = "") -> None:
        entry = self.stats.setdefault((op, nbytes), [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
        if self.verbose and self.rank == 0:
            algbw = nbytes / seconds / 1e9 if seconds > 0 else 0.0
            line = (f"comm op: {op} | time (ms): {seconds * 1e3:.3f} | msg size: {nbytes} | "
                    f"algbw (GB/s): {algbw:.3f} | busbw (GB/s): {algbw * bus_factor(op, self.world_size):.3f}")
            self.write(line + (f" | caller: {caller}" if self.debug and caller else ""))

    def summary(self) -> List[Dict[str, Any]]:
        rows = []
        for (op, nbytes), (count, total) in sorted(self.stats.items()):
            algbw = nbytes * count / total / 1e9 if total > 0 else 0.0
            rows.append({"op": op, "bytes": nbytes, "count": count, "total_ms": round(total * 1e3, 3),
                         "avg_ms": round(total * 1e3 / count, 3), "algbw_gbs": round(algbw, 3),
                         "busbw_gbs": round(algbw * bus_factor(op, self.world_size), 3)})
        return rows

    def summary_text(self) -> str:
        lines = [f"{'op':<16}{'bytes':>14}{'count':>8}{'total ms':>12}{'avg ms':>10}{'algbw GB/s':>12}"
                 f"{'busbw GB/s':>12}"]
        for r in self.summary():
            lines.append(f"{r['op']:<16}{r['bytes']:>14}{r['count']:>8}{r['total_ms']:>12.3f}{r['avg_ms']:>10.3f}"
                         f"{r['algbw_gbs']:>12.3f}{r['busbw_gbs']:>12.3f}")
        return "comms_logger summary (rank 0):\n" + "\n".join(lines)


class CommTap:
    """Wraps `comm`'s collectives (see the module docstring)."""

    def __init__(self, comm, *, last: Optional[dict] = None, logger: Optional[CommsLogger] = None,
                 on_time: Optional[Callable[[float], None]] = None, sync: Callable[[], None] = lambda: None,
                 count: Optional[dict] = None):
        """`last` receives the last collective (op, bytes, time) and `count["collectives"]` counts them
        (the watchdog's); `logger` and `on_time` get timed ops."""
        self.comm, self.last, self.logger, self.on_time, self.sync = comm, last, logger, on_time, sync
        self.count = count
        self._installed: List[str] = []

    def install(self) -> "CommTap":
        for op in OPS:
            fn = getattr(self.comm, op, None)
            if fn is not None and op not in vars(self.comm):
                setattr(self.comm, op, self._wrap(op, fn))
                self._installed.append(op)
        return self

    def remove(self) -> None:
        for op in self._installed:
            vars(self.comm).pop(op, None)
        self._installed = []

    def _wrap(self, op: str, fn):
        last, logger, on_time, sync, count = self.last, self.logger, self.on_time, self.sync, self.count
        timed = on_time is not None or (logger is not None and logger.wants(op))

        def collective(*args, **kwargs):
            nbytes = _nbytes(op, args)
            if last is not None:
                last.update(op=op, bytes=nbytes, time=time.time())
            if count is not None:
                count["collectives"] += 1
            if not timed:
                return fn(*args, **kwargs)
            sync()
            t0 = time.perf_counter()
            work = fn(*args, **kwargs)
            work.wait()
            sync()
            seconds = time.perf_counter() - t0
            if on_time is not None:
                on_time(seconds)
            if logger is not None and logger.wants(op):
                caller = sys._getframe(1).f_code.co_name if logger.debug else ""
                logger.record(op, nbytes, seconds, caller)
            return work
        collective.__wrapped__ = fn
        return collective

"""`wall_clock_breakdown: true`: forward, backward, optimizer and communication time per optimizer step.

Like DeepSpeed's timers, the phases are timed with a device synchronisation at each edge, so the
numbers are the device's time and the overlap between phases is lost (a diagnostic mode). The engine's
`forward` and `backward` are wrapped through instance attributes (the class is untouched, `remove()`
restores it); optimizer time runs from the end of the last backward to the end of the optimizer step;
communication is the time spent in the ZeRO collectives (comms_logger.py's tap), part of the others.
"""
from __future__ import annotations

import time
from typing import Callable, Dict

__all__ = ["Breakdown"]


class Breakdown:
    def __init__(self, engine, *, sync: Callable[[], None]):
        self.engine, self.sync = engine, sync
        self.totals: Dict[str, float] = {"forward_ms": 0.0, "backward_ms": 0.0, "comm_ms": 0.0}
        self._backward_end = None

    def install(self) -> "Breakdown":
        for name, key in (("forward", "forward_ms"), ("backward", "backward_ms")):
            setattr(self.engine, name, self._timed(getattr(self.engine, name), key))
        return self

    def remove(self) -> None:
        for name in ("forward", "backward"):
            vars(self.engine).pop(name, None)

    def _timed(self, fn, key):
        sync, totals = self.sync, self.totals

        def timed(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            t1 = time.perf_counter()
            totals[key] += (t1 - t0) * 1e3
            if key == "backward_ms":
                self._backward_end = t1
            return out
        timed.__wrapped__ = fn
        return timed

    def add(self, key: str, seconds: float) -> None:
        """Time of a phase the engine timed itself, device synchronised at both edges (the pipeline
        engine's forward and backward instructions, which `engine.forward`/`backward` do not run)."""
        self.totals[key] += seconds * 1e3
        if key == "backward_ms":
            self._backward_end = time.perf_counter()

    def add_comm(self, seconds: float) -> None:
        self.totals["comm_ms"] += seconds * 1e3

    def take(self) -> Dict[str, float]:
        """This optimizer step's times (called at its end); resets the totals."""
        self.sync()
        now = time.perf_counter()
        out = dict(self.totals)
        out["optimizer_ms"] = (now - self._backward_end) * 1e3 if self._backward_end is not None else None
        for key in self.totals:
            self.totals[key] = 0.0
        return out

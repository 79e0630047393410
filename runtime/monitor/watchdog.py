"""The hang watchdog: when no optimizer step completes within `hang_watchdog.timeout_s`, every rank
says where it is and rank 0 prints one report naming the ranks that are behind. It never kills.

[Note: watchdog side channel] A rank stuck in a collective cannot take part in another, so the report
travels over the job's TCPStore (the rendezvous store behind the default process group, a key-value
server in rank 0's process that answers from its own thread whatever rank 0's Python code is doing).
The watchdog adds no connection, no native thread and no C++ object: each rank runs one pure-Python
daemon thread that wakes every `poll_s` (timeout/4, at most 5 s) and uses the existing store client,
whose operations are serialised by the client itself.

Protocol (keys under `dsrun/watchdog/<n>/`, n counting engines in this process):
1. A rank is *busy* from the first forward or backward after an optimizer step until the next step
   completes. A rank busy for longer than the timeout increments `trigger` (once per stall).
2. Every rank polls `trigger`; on a new value it writes `report/<rank>`: its counters (steps, backward
   calls, collectives issued), its phase, its last collective and the Python stack of its main thread
   (`sys._current_frames`; collectives release the GIL while they wait, so the thread runs).
3. Rank 0 waits until every rank has answered or two polls have passed, then prints one report. The
   ranks whose counters (steps, backwards, collectives) are lowest are named as behind: the others
   wait in a collective for them. A rank in a point-to-point receive (the pipeline engine) reports the
   rank it waits for (`waiting_on`); when some do, the ranks waited on that wait on nobody are named
   instead. Otherwise pipeline ranks (`steps_only`) compare their steps only: stages issue different
   sends and collectives in a step. A rank that does not answer is named as unresponsive.
Rank 0 prints at most once per stall of its own and then sets `printed`; the report also lands in the
metrics folder. A rank that triggered and sees no `printed` four polls later prints its own view (rank
0's Python may be the one stuck).
Without a store (a process group built without one) each rank prints its own report instead.
"""
from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

__all__ = ["HangWatchdog", "default_store", "format_report"]

_GENERATION = itertools.count()
_STACK_FRAMES = 30


def default_store():
    """The default process group's store, or None."""
    try:
        from torch.distributed import distributed_c10d
        return distributed_c10d._get_default_store()
    except Exception:  # no default group, or a backend without a store
        return None


def _main_stack(thread_id: int) -> str:
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "  (no Python frame)"
    return "".join(traceback.format_stack(frame)[-_STACK_FRAMES:]).rstrip()


def _progress(report: Dict[str, Any]):
    if report.get("steps_only"):  # pipeline stages issue different sends and collectives: steps compare
        return (report.get("steps", 0),)
    return (report.get("steps", 0), report.get("backwards", 0), report.get("collectives", 0))


def format_report(reports: Dict[int, Optional[Dict[str, Any]]], *, timeout_s: float) -> str:
    """One text naming the ranks behind, then each rank's state and stack (behind ranks first). `reports`
    maps every rank asked to its report, or None when it did not answer."""
    answered = {r: rep for r, rep in reports.items() if rep}
    missing = sorted(r for r, rep in reports.items() if not rep)
    lines = [f"[dsrun hang watchdog] no optimizer step completed within {timeout_s:g} s "
             f"(hang_watchdog.timeout_s); reports from {len(answered)}/{len(reports)} ranks"]
    behind: List[int] = []
    # a rank in a point-to-point receive (the pipeline engine) names its peer: the ranks waited on that
    # wait on nobody are behind, whatever the counters say (stages count differently)
    waited = {rep["waiting_on"] for rep in answered.values() if rep.get("waiting_on") is not None}
    idle = sorted(r for r in waited if r in answered and answered[r].get("waiting_on") is None)
    if idle:
        behind = idle
        lines.append("ranks behind: " + ", ".join(map(str, behind)) + " (the others wait for them in a "
                     "point-to-point receive)")
    elif answered:
        low = min(_progress(r) for r in answered.values())
        behind = sorted(r for r, rep in answered.items() if _progress(rep) == low)
        if len(behind) == len(answered):
            lines.append(f"ranks behind: none: every rank that answered is at the same point "
                         f"(step {low[0]}); look at the collective they share")
            behind = []
        else:
            lines.append("ranks behind: " + ", ".join(str(r) for r in behind)
                         + " (the others wait for them in a collective)")
    if missing:
        lines.append("ranks that did not answer (stuck holding the GIL, or dead): " + ", ".join(map(str, missing)))
    order = behind + sorted(r for r in answered if r not in behind)
    now = time.time()
    for r in order:
        rep = answered[r]
        last = rep.get("last_collective")
        coll = (f"{last['op']} of {last['bytes']} bytes issued {now - last['time']:.1f} s ago" if last
                else "none seen")
        lines.append(f"rank {r} ({rep.get('host')}, pid {rep.get('pid')}): step {rep.get('steps')}, "
                     f"{rep.get('backwards')} backward calls, {rep.get('collectives')} collectives; "
                     f"in {rep.get('phase')} for {rep.get('busy_s', 0):.1f} s; last collective: {coll}")
        lines.append(rep.get("stack", ""))
    return "\n".join(lines)


class HangWatchdog:
    """One daemon thread per rank (see the module docstring). `state` is shared with the monitor, which
    updates `steps`, `backwards`, `collectives`, `phase` and `busy_since` (None between steps)."""

    def __init__(self, *, timeout_s: float, rank: int, world_size: int, state: Dict[str, Any], store=None,
                 write: Callable[[str], None], save: Optional[Callable[[str], None]] = None):
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self.state, self.store, self.write, self.save = state, store, write, save
        self.poll_s = min(max(timeout_s / 4.0, 0.05), 5.0)
        self.prefix = f"dsrun/watchdog/{next(_GENERATION)}/"
        self.main_thread = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._triggered_at: Optional[int] = None  # `steps` when this rank last triggered
        self._own_episode: Optional[tuple] = None  # (episode, time) this rank triggered, until rank 0 prints
        self._answered = 0
        self._printed_at: Optional[int] = None  # the step count of the last stall reported (one report a stall)
        self._printed_episode = 0  # the last episode reported: a stall that is over is never reported again
        self._episode_seen: Dict[int, float] = {}
        self.reports_printed = 0

    def start(self) -> "HangWatchdog":
        self._thread = threading.Thread(target=self._run, name="dsrun-hang-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the thread to end and give it a moment (it wakes at once unless a store call is in flight;
        a daemon thread never holds up exit either way)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)
        self.store = None  # a held store keeps its native thread alive past the process group ([Note: teardown at exit])

    def _run(self) -> None:
        import torch.distributed as dist
        while not self._stop.wait(self.poll_s):
            if not dist.is_initialized():  # the process group is gone: nothing left to watch
                return
            try:
                self._tick()
            except Exception:  # the store went away (process group destroyed, peer gone): stop quietly
                return

    def _stalled(self) -> bool:
        busy = self.state.get("busy_since")
        return busy is not None and time.time() - busy > self.timeout_s

    def _tick(self) -> None:
        steps = self.state.get("steps", 0)
        stalled = self._stalled() and self._triggered_at != steps
        if self.store is None:
            if stalled:
                self._triggered_at = steps
                self.write(format_report({self.rank: self.snapshot()}, timeout_s=self.timeout_s))
            return
        if stalled:
            self._triggered_at = steps
            self._own_episode = (self.store.add(self.prefix + "trigger", 1), time.time())
        episode = self.store.add(self.prefix + "trigger", 0)
        if episode > self._answered:
            self._answered = episode
            self.store.set(self.prefix + f"report/{self.rank}", json.dumps(dict(self.snapshot(), episode=episode)))
        if self.rank == 0 and episode > self._printed_episode and self._printed_at != steps:
            self._maybe_print(episode, steps)
        elif self.rank != 0 and self._own_episode is not None:
            self._fallback_print()

    def _fallback_print(self) -> None:
        """Rank 0 has not printed this rank's stall after four polls (its Python is stuck holding the GIL,
        or it died): print this rank's own report, once."""
        episode, since = self._own_episode
        if time.time() - since < 4 * self.poll_s + 1.0:
            return
        self._own_episode = None
        key = self.prefix + "printed"
        if self.store.check([key]) and int(self.store.get(key)) >= episode:
            return
        self.write("rank 0 did not report; this rank's view:\n" + format_report(
            {self.rank: self.snapshot()}, timeout_s=self.timeout_s))

    def snapshot(self) -> Dict[str, Any]:
        busy = self.state.get("busy_since")
        return {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                "steps": self.state.get("steps", 0), "backwards": self.state.get("backwards", 0),
                "collectives": self.state.get("collectives", 0),
                "phase": self.state.get("phase", "?") if busy is not None else "between steps",
                "busy_s": time.time() - busy if busy is not None else 0.0,
                "last_collective": dict(self.state["last"]) if self.state.get("last") else None,
                "waiting_on": self.state.get("waiting_on") if busy is not None else None,
                "steps_only": self.state.get("steps_only", False),
                "stack": _main_stack(self.main_thread)}

    def _maybe_print(self, episode: int, steps: int) -> None:
        first_seen = self._episode_seen.setdefault(episode, time.time())
        reports: Dict[int, Optional[Dict[str, Any]]] = dict.fromkeys(range(self.world_size))
        for r in range(self.world_size):
            key = self.prefix + f"report/{r}"
            if self.store.check([key]):
                rep = json.loads(self.store.get(key))
                reports[r] = rep if rep.get("episode", 0) >= episode else None
        complete = all(reports.get(r) for r in range(self.world_size))
        if not complete and time.time() - first_seen < 2 * self.poll_s + 0.5:
            return
        self._printed_at = steps
        self._printed_episode = max(episode, self.store.add(self.prefix + "trigger", 0))
        self.store.set(self.prefix + "printed", str(self._printed_episode))
        text = format_report(reports, timeout_s=self.timeout_s)
        self.reports_printed += 1
        self.write(text)
        if self.save is not None:
            self.save(text)

"""Orderly teardown at interpreter exit: engines, then process groups, while Python is still whole.

[Note: teardown at exit] Ranks used to die *after* the script had finished, with "terminate called
without an active exception" (SIGABRT, exit 134). Cause: gloo's native threads (its worker threads and
its transport's event loop, held by the process group *and by every `Work` handle still referenced from
Python*) were still alive when the interpreter finalised. A native thread that then drops the last
reference to a tensor owned by a Python object must take the GIL; during finalisation that call ends
the thread with a forced unwind, which crosses a `noexcept` destructor, and the C++ runtime calls
`std::terminate`. It is a race, so it showed in a few runs out of a hundred, more on a loaded machine
and most with ZeRO-1/2, whose post-step all-gathers stay in flight (unwaited handles) until the next
forward. `destroy_process_group()` alone did not help: a `Work` still referenced keeps gloo's context
and its threads alive after it.

A second trap: a module of torch that is first imported *after* the default group exists
(`torch.distributed._shard`, which the first optimizer pulls in through `torch._dynamo` in torch 2.13)
keeps a reference to that group, so even `destroy_process_group()` leaves its threads running until
finalisation. `dsrun.init_distributed` therefore imports it before it creates the group (20 ms). A
group the script created itself before that import stays pinned; dsrun cannot release it, and the
waits in step 1 below are then what keeps the race away (no collective is in flight at exit).

So `at_exit`, registered with `atexit` the first time dsrun initialises torch.distributed or builds an
engine, runs before finalisation (after every non-daemon thread was joined and after the atexit
handlers registered later, e.g. by the user's script) and, in this order:

1. destroys every live engine: each waits for the collectives it still has in flight and drops every
   handle it holds (hooks, buffers, side threads such as monitors);
2. destroys every process group (`destroy_process_group()`), whoever created it;
3. collects garbage, so `Work` handles in reference cycles go too, and with them gloo's last threads.

Afterwards the process has no native threads of torch.distributed left (the tests count them).

When the script is ending because of an uncaught exception, waiting on collectives could hang (the
peers may be stuck elsewhere) and finalising could turn exit code 1 into 134: then the rank flushes its
output and leaves at once with `os._exit(1)` (a KeyboardInterrupt re-raises SIGINT, as Python itself
does), skipping finalisation. The error was already printed and recorded (runtime/rank_errors.py).

Folders given to `track_path` (NVMe swap folders, runtime/zero/swap.py) are removed on every one of
these ways out, by the DsrunError exit of rank_errors.py, and on SIGTERM (the launcher's way of stopping
the other ranks when one fails) unless the script handles SIGTERM itself.
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import sys
import threading
import weakref

__all__ = ["track_engine", "track_path", "untrack_path", "remove_tracked_paths", "ensure_registered", "note_uncaught", "at_exit", "flush_streams"]

_engines: "weakref.WeakSet" = weakref.WeakSet()
_paths: set = set()  # folders removed at exit, also on the fast exit (NVMe swap folders, runtime/zero/swap.py)
_lock = threading.Lock()
_registered = False
_uncaught = None  # the type of an uncaught exception seen by the excepthook, if any


def ensure_registered() -> None:
    """Register the exit teardown once per process."""
    global _registered
    with _lock:
        if not _registered:
            atexit.register(at_exit)
            _registered = True


def track_engine(engine) -> None:
    """Destroy `engine` at exit unless it is gone (or destroyed) before."""
    _engines.add(engine)
    ensure_registered()


def track_path(path: str) -> None:
    """Remove folder `path` at exit: normal end, uncaught exception, DsrunError, or SIGTERM (how the
    launcher stops the other ranks when one fails) while no other handler is installed for it."""
    with _lock:
        _paths.add(path)
    ensure_registered()
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def untrack_path(path: str) -> None:
    """`path` was removed by its owner: nothing to do for it at exit."""
    with _lock:
        _paths.discard(path)


def remove_tracked_paths() -> None:
    """Remove the folders given to `track_path` (now, once); never raises."""
    from .zero.swap import remove_folder
    with _lock:
        paths = list(_paths)
        _paths.clear()
    for path in paths:
        remove_folder(path)


def _on_sigterm(signo, _frame) -> None:
    """SIGTERM's default action (death by the signal, the same exit status) after removing the folders."""
    remove_tracked_paths()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def note_uncaught(exc_type) -> None:
    """Called by the excepthook: the script is ending because of this exception."""
    global _uncaught
    _uncaught = exc_type


def flush_streams() -> None:
    """Flush Python's stdout and stderr (the current and the original objects) before an `os._exit`."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass


def _leave_now(exc_type) -> None:
    try:
        logging.shutdown()
    except Exception:
        pass
    flush_streams()
    remove_tracked_paths()
    if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(1)


def at_exit() -> None:
    """The teardown described in [Note: teardown at exit]; never raises."""
    if _uncaught is not None:
        _leave_now(_uncaught)
    for engine in list(_engines):
        try:
            engine.destroy()
        except Exception as exc:  # one broken engine must not keep the process groups alive
            logging.getLogger("dsrun").debug("engine teardown at exit failed: %s", exc)
    _engines.clear()
    remove_tracked_paths()
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:
        logging.getLogger("dsrun").debug("destroy_process_group at exit failed: %s", exc)
    gc.collect()

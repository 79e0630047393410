"""How a rank reports the error that ends it: to the real stderr, and to its error file for the launcher.

[Note: errors that reach the terminal] torch >= 2.13's `init_process_group` wraps `sys.excepthook`: its
wrapper points `sys.stderr` at a string buffer, calls the hook that was there before, then writes the
buffer out with `[rankN]:` prefixes. A hook that writes its message to `sys.stderr` and then calls
`os._exit` (as it must, to choose the exit code) therefore loses the message with the buffer. So:

- The message of a `DsrunError` is written with `os.write(2, ...)`, straight to file descriptor 2, once,
  before anything else; then the process exits with the error's exit code.
- Any other uncaught exception is passed on to the previous hook (so its traceback prints as before)
  after its traceback has been saved.
- Either way, when the launcher gave the rank an error file (`DSRUN_ERROR_FILE`, also exported as
  torchelastic's `TORCHELASTIC_ERROR_FILE` so that `@record`-decorated scripts write the same file), the
  error is written there as JSON in torchelastic's layout (`{"message": {"message": ..., "extraInfo":
  {"py_callstack": ..., "timestamp": ...}}}`) plus a `"dsrun"` entry with the error's class, exit code, key
  path and hint. The agent reads it into `failure.json` and the root-cause panel
  (`dsrun.launcher.failure.read_error_file`).

Nothing here raises: reporting an error must never hide it behind another one.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

from dsrun.errors import DsrunError

__all__ = ["install_excepthook", "write_error_file", "ERROR_FILE_ENV"]

ERROR_FILE_ENV = "DSRUN_ERROR_FILE"


def _rank_prefix() -> str:
    try:
        import torch.distributed as dist
        return f" (rank {dist.get_rank()})" if dist.is_initialized() else ""
    except Exception:  # printing an error must never raise another one
        return ""


def _write_fd2(text: str) -> None:
    data = text.encode("utf-8", "replace")
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:
        pass


def write_error_file(exc: BaseException, tb=None, environ=os.environ) -> None:
    """Record `exc` in the rank's error file when the launcher asked for one; never raises."""
    path = environ.get(ERROR_FILE_ENV) or environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        stack = "".join(traceback.format_exception(type(exc), exc, tb if tb is not None else exc.__traceback__))
        if isinstance(exc, DsrunError):
            summary = exc.render()
            extra = {"type": type(exc).__name__, "message": summary, "exit_code": exc.exit_code,
                     "where": exc.where, "hint": exc.hint}
        else:
            summary = f"{type(exc).__name__}: {exc}"
            extra = {"type": type(exc).__name__, "message": summary, "exit_code": 1, "where": None, "hint": None}
        record = {"message": {"message": summary, "extraInfo": {"py_callstack": stack,
                                                                "timestamp": str(int(time.time()))}},
                  "dsrun": extra}
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, path)
    except Exception:
        pass


def _excepthook(previous):
    def hook(exc_type, exc, tb):
        write_error_file(exc, tb)
        if isinstance(exc, DsrunError):
            _write_fd2(f"dsrun: error{_rank_prefix()}: {exc.render()}\n")
            from .teardown import flush_streams, remove_tracked_paths
            flush_streams()
            remove_tracked_paths()  # e.g. NVMe swap folders (os._exit skips the exit teardown)
            os._exit(exc.exit_code)  # sys.exit inside an excepthook would not change the exit status
        from .teardown import note_uncaught
        note_uncaught(exc_type)  # the exit teardown then leaves at once ([Note: teardown at exit])
        previous(exc_type, exc, tb)
    hook._dsrun = True
    return hook


def install_excepthook() -> None:
    """Make an uncaught DsrunError print one clean line on fd 2 and exit with its exit code; record every
    uncaught exception in the rank's error file; defer the rest to the hook installed before. Idempotent,
    also when torch has wrapped the hook since ([Note: errors that reach the terminal])."""
    if not _installed(sys.excepthook):
        sys.excepthook = _excepthook(sys.excepthook)


def _installed(hook) -> bool:
    if getattr(hook, "_dsrun", False):
        return True
    # torch's wrapper keeps the hook it wrapped in its closure.
    for cell in getattr(hook, "__closure__", None) or ():
        try:
            if getattr(cell.cell_contents, "_dsrun", False):
                return True
        except ValueError:  # an empty cell
            continue
    return False

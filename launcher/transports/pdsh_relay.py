"""What pdsh runs per host on the launching machine: `python -m dsrun.launcher.transports.pdsh_relay
SPEC_FILE ssh ... HOST LINE` feeds SPEC_FILE, then pdsh's stdin, into the stdin of `ssh ... HOST LINE`.

[Note: pdsh relay] pdsh never forwards its stdin to remote commands, so its own ssh module could only
pass the agent's spec in argv. The pdsh transport therefore runs pdsh with `-R exec` (pdsh still fans
out, substitutes `%h`/`%n`/`%u`, labels and collects output and exit codes) and this relay per host:

1. read SPEC_FILE (a 0600 hard link made for this node in a 0700 folder) and unlink it at once;
2. fork a feeder that dies with its parent (PR_SET_PDEATHSIG), writes the spec into a pipe and then
   holds that pipe open until pdsh's stdin (never written) reaches EOF, i.e. until pdsh ends;
3. exec the ssh command with that pipe as its stdin.

So the remote agent reads the spec line first and then holds a lifeline that ends when pdsh ends
(pdsh itself dies with dsrun, even on SIGKILL), and pdsh sees ssh's own exit status (255: could not
connect). Torch-free, nothing imported beyond the standard library; after the exec only ssh and the
small feeder remain per host.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import signal
import sys

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1


def _feed(spec: bytes, pipe_w: int, parent: int) -> None:
    """In the forked child: die with the parent (ssh), write the spec, then hold the pipe open until
    pdsh's end of our stdin closes (pdsh ended) and exit, which closes ssh's stdin."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)
    try:
        view = memoryview(spec)
        while view:
            view = view[os.write(pipe_w, view):]
    except OSError:
        os._exit(0)  # ssh is gone (EPIPE): its own exit status reports the node
    # ssh makes the socket it shares with our stdin non-blocking, so wait with poll(), not a blocking read.
    poller = select.poll()
    poller.register(0, select.POLLIN | select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0))
    while True:
        for _, events in poller.poll():
            if events & (select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)):
                os._exit(0)
            try:
                if not os.read(0, 65536):  # pdsh never writes; EOF means it ended
                    os._exit(0)
            except BlockingIOError:
                pass
            except OSError:
                os._exit(0)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python -m dsrun.launcher.transports.pdsh_relay SPEC_FILE COMMAND...", file=sys.stderr)
        return 2
    path, command = argv[0], argv[1:]
    try:
        with open(path, "rb") as f:
            spec = f.read()
        os.unlink(path)
    except OSError as e:
        print(f"dsrun pdsh relay: cannot read the launch spec {path}: {e.strerror}", file=sys.stderr)
        return 2
    pipe_r, pipe_w = os.pipe()
    parent = os.getpid()
    if os.fork() == 0:
        os.close(pipe_r)
        _feed(spec, pipe_w, parent)
    os.close(pipe_w)
    os.dup2(pipe_r, 0)
    os.close(pipe_r)
    try:
        os.execvp(command[0], command)
    except OSError as e:
        print(f"dsrun pdsh relay: cannot run {command[0]!r}: {e.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main())

"""Process helpers for the node agent: spawn-time death ties, process-group signalling, the guardian.

[Note: no orphans] Every rank runs in its own session (so its process group id is its pid and the
terminal's Ctrl-C reaches only dsrun) and is tied to the agent's life twice:

1. `PR_SET_PDEATHSIG=SIGKILL`, set in the rank between fork and exec (`preexec`), kills the rank
   itself the moment the agent's spawning thread dies, even by SIGKILL.
2. The rank's own children (data-loader workers, compilers, shells) do not get that signal, and after
   the rank dies they would be orphans. A *guardian* covers them: a tiny process forked from the agent
   before any rank starts, that reads "+pgid"/"-pgid" lines over a pipe whose only writer is the
   agent. When the agent dies in any way, the kernel closes the pipe; the guardian reads EOF and sends
   SIGKILL to every process group it still holds, then exits. On a normal exit the agent first tells
   it which groups are already empty, so a recycled id is never signalled.

The guardian is a plain `os.fork()` (no exec, no imports) so it costs about a millisecond; it sits in
its own process group, ignores the terminal's signals, and redirects its stdio to /dev/null so it
never holds a pipe someone waits on.

Descendants that call `setsid()` (or double-fork into a new session) leave the rank's group.
launcher/jobtree.py covers them. Where cgroup v2 is usable the ranks run in a job cgroup ([Note: job
cgroup] in launcher/cgroup.py) that no process can leave: the agent's teardown and the guardian (given
the cgroup's path) kill it whole, so nothing the job started is left running after its end, its
failure or a SIGKILL of the agent. Elsewhere the agent makes itself a child subreaper
(`PR_SET_CHILD_SUBREAPER`), so that such orphans re-parent to it instead of init; its teardown ends
them with the ranks (held by pidfd, `Strays`), which covers a job's end and its failure. For a SIGKILL
of the agent, it tells the guardian every new process group it sees among the descendants, in a scan
every half second. The limits there, which only a cgroup removes: a process that moved into a new
session since the last scan survives a SIGKILL of the agent, and so does one that leaves its group
again after being seen (a second `setsid`). Processes the job has someone else start (`systemd-run`,
a container runtime, sshd) are not its descendants, and neither scheme sees them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import signal
import time
from typing import Callable, Dict, Iterable, List, Optional

from dsrun.launcher import cgroup as _cgroup

__all__ = ["preexec_tied_to", "signal_group", "group_alive", "pidfd_open", "children", "descendants",
           "set_child_subreaper", "Strays", "Guardian", "signal_name"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_libc = None


def _prctl():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc.prctl


def preexec_tied_to(parent_pid: int, sig: int = signal.SIGKILL, *,
                    cgroup_procs: Optional[str] = None) -> Callable[[], None]:
    """A `preexec_fn` that makes the child receive `sig` when its parent dies.

    The libc symbol is resolved here, in the parent, so that the child only makes a few syscalls
    between fork and exec. If the parent already died before `prctl` took effect, the child kills
    itself. With `cgroup_procs` (a job cgroup's `cgroup.procs`), the child first moves itself into that
    cgroup, before any of its own code runs; should that fail, the process group still covers it.
    """
    prctl = _prctl()
    join = cgroup_procs.encode() if cgroup_procs else None

    def _preexec():
        if join is not None:
            try:
                fd = os.open(join, os.O_WRONLY)
                try:
                    os.write(fd, b"0")  # "0" is the writer itself
                finally:
                    os.close(fd)
            except OSError:
                pass
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return _preexec


def set_child_subreaper(on: bool) -> Optional[bool]:
    """Make this process adopt its orphaned descendants (instead of init); returns the previous setting,
    or None where the kernel refuses."""
    prctl = _prctl()
    previous = ctypes.c_int(0)
    if prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0) != 0:
        return None
    if prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        return None
    return bool(previous.value)


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False when the group is already empty."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed uid; nothing more we can do from here
        return True


def group_alive(pgid: int) -> bool:
    """True while any process (zombies included) still belongs to process group `pgid`."""
    return signal_group(pgid, 0)


def pidfd_open(pid: int) -> Optional[int]:
    """A pidfd that becomes readable when `pid` exits, or None where the kernel lacks pidfds."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return opener(pid)
    except OSError:
        return None


def _children(pid: int) -> Optional[List[int]]:
    """Direct children from /proc/<pid>/task/*/children (a few small reads); None where unsupported."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: List[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended meanwhile
            return None  # kernel without CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return found


def children(pid: int) -> List[int]:
    """Direct children of `pid` (zombies included)."""
    found = _children(pid)
    if found is None:
        import psutil

        try:
            found = [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:
            found = []
    return found


def descendants(pids: Iterable[int]) -> List[int]:
    """Every live descendant of `pids`; used only during teardown, so it must be quick.

    Reads the kernel's per-task children lists (no full /proc scan, no psutil import on the failure
    path); falls back to psutil where those lists are missing.
    """
    found: List[int] = []
    todo = list(pids)
    while todo:
        below = children(todo.pop())
        found.extend(below)
        todo.extend(below)
    return found


class Strays:
    """Processes outside the ranks' groups that a teardown must end, held by pidfd where the kernel
    has them, so that a pid recycled during the grace period is never signalled."""

    def __init__(self, pids: Iterable[int] = ()):
        self._held: Dict[int, Optional[int]] = {}
        opener = getattr(os, "pidfd_open", None)
        for pid in pids:
            try:
                self._held[pid] = opener(pid) if opener else None
            except ProcessLookupError:  # reaped already: its pid may be someone else's by now
                continue
            except OSError:  # a kernel without pidfds
                self._held[pid] = None

    def __bool__(self) -> bool:
        return bool(self._held)

    def pids(self) -> List[int]:
        return list(self._held)

    def signal(self, sig: int) -> None:
        for pid, fd in self._held.items():
            try:
                if fd is not None:
                    signal.pidfd_send_signal(fd, sig)
                else:
                    os.kill(pid, sig)
            except OSError:
                pass

    def alive(self) -> bool:
        return any(self._alive(pid, fd) for pid, fd in self._held.items())

    @staticmethod
    def _alive(pid: int, fd: Optional[int]) -> bool:
        if fd is not None:  # readable once the process has exited (zombies count as gone)
            return not select.select([fd], [], [], 0)[0]
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[:1] != ["Z"]
        except OSError:
            return False

    def reap(self, timeout: float = 1.0) -> None:
        """Collect the exit status of those that are our children (orphans we adopted as subreaper)."""
        deadline = time.monotonic() + timeout
        for pid, fd in self._held.items():
            while self._alive(pid, fd) and time.monotonic() < deadline:
                time.sleep(0.005)
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def close(self) -> None:
        for fd in self._held.values():
            if fd is not None:
                os.close(fd)
        self._held.clear()


_SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}


def signal_name(signo: int) -> str:
    return _SIGNAL_NAMES.get(signo, f"signal {signo}")


class Guardian:
    """Kills registered process groups when the agent dies (see [Note: no orphans])."""

    def __init__(self):
        self.pid: Optional[int] = None
        self._wfd: Optional[int] = None

    def start(self, cgroup: Optional[str] = None) -> "Guardian":
        """Fork the guardian; with `cgroup` (a job cgroup's folder) it also kills and removes that
        cgroup when the agent dies or closes it."""
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the guardian: never returns
            try:
                os.close(wfd)
                _guard(rfd, cgroup)
            finally:
                os._exit(0)
        os.close(rfd)
        self.pid, self._wfd = pid, wfd
        return self

    def _send(self, line: str) -> None:
        if self._wfd is None:
            return
        try:
            os.write(self._wfd, line.encode())
        except OSError:  # the guardian is gone; PDEATHSIG still covers the ranks
            pass

    def add(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def remove(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def close(self) -> None:
        """Tell the guardian to finish (it kills any group not removed) and reap it."""
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None
        if self.pid is not None:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = None


def _guard(rfd: int, cgroup: Optional[str]) -> None:
    """The guardian's body: only os-level calls, since it runs in a fork of a possibly threaded parent."""
    os.setpgid(0, 0)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # forked from a non-main thread on an old Python: keep the defaults
            pass
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    keep = sorted({rfd, 0, 1, 2})
    low = 3
    for fd in keep:
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 65536)
    groups = set()
    pending = b""
    while True:
        try:
            data = os.read(rfd, 4096)
        except InterruptedError:
            continue
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line[:1] == b"+":
                groups.add(int(line[1:]))
            elif line[:1] == b"-":
                groups.discard(int(line[1:]))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    if cgroup is not None:  # gone already after a normal end: the agent removes it before closing us
        _cgroup.remove(cgroup)

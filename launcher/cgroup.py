"""Job cgroups: one cgroup v2 folder per node agent holding every rank and everything the ranks start.

[Note: job cgroup] A process can leave its process group and its session (`setsid`, a double fork),
but not its cgroup: the kernel puts every child in its parent's cgroup, and only a writer with access
to the cgroup tree can move it out. So where cgroup v2 is usable, the agent creates
`<its own cgroup>/dsrun-<job_id>-<node_rank>-<agent pid>` and each rank joins it between fork and exec
(it writes "0" to the folder's `cgroup.procs` in `preexec`, before any of its own code runs). Ending
the job's whole tree is then one write of "1" to `cgroup.kill` (Linux >= 5.14; older kernels: freeze,
SIGKILL every member, thaw), and `cgroup.events` saying `populated 0` means nothing is left.

Usable means: a cgroup2 mount (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid
ones), our own cgroup found under it through `/proc/self/cgroup`, and `mkdir` there allowed (root, or a
delegated subtree such as systemd's `user@.service`) along with write access to our own
`cgroup.procs` (the kernel checks the common ancestor when a rank moves itself). The agent itself stays
where it is and the ranks go into a leaf: cgroup v2 forbids processes in a cgroup that hands
controllers to its children, and we enable none. Anything else (cgroup v1 only, a read-only mount, a
non-delegated login session) leaves supervision to process groups ([Note: no orphans] in
launcher/procs.py). `DSRUN_CGROUP=off` in the agent's environment forces that fallback.

Everything the guardian calls (`kill_tree`, `remove`) uses only `os`, as it runs in a bare fork.
"""
from __future__ import annotations

import os
import re
import signal
import time
from typing import List, Mapping, Optional, Tuple

__all__ = ["JobCgroup", "create_job_cgroup", "kill_tree", "remove", "current_cgroup"]

_MOUNTINFO = "/proc/self/mountinfo"
_SETTLE_S = 2.0  # a killed cgroup empties within milliseconds; D-state tasks are the exception


def _cgroup2_mount() -> Optional[Tuple[str, str]]:
    """(mount point, root inside the hierarchy) of the first cgroup2 mount, or None."""
    try:
        with open(_MOUNTINFO) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts, fstype = fields.split(), rest.split()[:1]
        if fstype == ["cgroup2"] and len(parts) >= 5:
            return _unescape(parts[4]), _unescape(parts[3])
    return None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def current_cgroup(pid: str = "self") -> Optional[str]:
    """The cgroup v2 path of `pid` ("0::<path>" in /proc/<pid>/cgroup), or None."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        pass
    return None


def create_job_cgroup(job_id: str, node_rank: int,
                      environ: Mapping[str, str]) -> Tuple[Optional["JobCgroup"], str]:
    """Create this agent's job cgroup; returns (cgroup, "") or (None, why process groups are used)."""
    if environ.get("DSRUN_CGROUP", "auto").lower() in ("off", "0", "no", "false"):
        return None, "DSRUN_CGROUP=off"
    mount = _cgroup2_mount()
    if mount is None:
        return None, "no cgroup v2 mount"
    mount_point, root = mount
    own = current_cgroup()
    if own is None or "/../" in own + "/" or not (own == root or own.startswith(root.rstrip("/") + "/")):
        return None, "own cgroup not under the cgroup v2 mount"  # "/..": outside our cgroup namespace
    parent = os.path.join(mount_point, own[len(root.rstrip("/")):].lstrip("/"))
    if not os.access(os.path.join(parent, "cgroup.procs"), os.W_OK):
        return None, f"{parent}/cgroup.procs is not writable"
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:64]
    path = os.path.join(parent, f"dsrun-{safe_id}-{node_rank}-{os.getpid()}")
    try:
        os.mkdir(path)
    except OSError as e:
        return None, f"cannot create {path}: {e.strerror}"
    return JobCgroup(path), ""


class JobCgroup:
    """One job cgroup folder (see [Note: job cgroup]); the agent owns it and removes it at the end."""

    def __init__(self, path: str):
        self.path = path
        self.procs_file = os.path.join(path, "cgroup.procs")

    def members(self) -> List[int]:
        return _members(self.path)

    def populated(self) -> bool:
        return _populated(self.path)

    def kill(self, timeout: float = _SETTLE_S) -> bool:
        """SIGKILL the whole tree and wait until it is gone; False if something is still there."""
        return kill_tree(self.path, timeout)

    def remove(self) -> None:
        remove(self.path)


def _members(path: str) -> List[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _populated(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return "populated 1" in f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return bool(_members(path))


def _write(path: str, value: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, value)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def kill_tree(path: str, timeout: float = _SETTLE_S, *, use_kill_file: bool = True) -> bool:
    """SIGKILL every process in cgroup `path` (its subgroups included) and wait until it is empty.

    `cgroup.kill` does it atomically, forks in flight included. Without it (Linux < 5.14, or
    `use_kill_file=False`, which tests use to reach this path) the cgroup is frozen so that nothing
    forks between our reading `cgroup.procs` and signalling (SIGKILL reaches frozen tasks), and the
    read-and-kill is repeated until the cgroup is empty (also the only way before Linux 5.2, which
    has no `cgroup.freeze`).
    """
    deadline = time.monotonic() + timeout
    killed_at_once = use_kill_file and _write(os.path.join(path, "cgroup.kill"), b"1")
    frozen = False
    while _populated(path):
        if not killed_at_once:
            frozen = frozen or _write(os.path.join(path, "cgroup.freeze"), b"1")
            for sub, _, _ in os.walk(path):
                for pid in _members(sub):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        if time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    if frozen:
        _write(os.path.join(path, "cgroup.freeze"), b"0")
    return not _populated(path)


def remove(path: str) -> None:
    """Kill whatever is left in cgroup `path` and remove its folder (sub-folders first)."""
    if not os.path.isdir(path):
        return
    kill_tree(path)
    for sub, _, _ in sorted(os.walk(path), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(sub)
        except OSError:
            pass

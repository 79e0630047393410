"""Failure records: what one rank's failure looks like, the root cause first, and the JSON record.

A `FailureReport` is written as `failure.json` into the job's log folder, and a node agent prints it
once more as the last line of its stdout, `@@dsrun-failure@@ <json>`, so that a multi-node driver can
merge the reports of every node (`from_dict`, launcher/transports/common.py `JobOutcome`) and pick the
earliest failure (`root_cause.timestamp`) as the job's; it writes the merged `failure.json` on the
launching machine and prints it with the same renderer (launcher/output.py).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional, Tuple

from dsrun.launcher.procs import signal_name

__all__ = ["RankFailure", "FailureReport", "exit_code_for", "FAILURE_MARKER", "parse_marker_line",
           "default_log_dir", "read_error_file", "error_file_path"]

FAILURE_MARKER = "@@dsrun-failure@@"

# Why a rank may have died of a signal, for the person reading the panel (DeepSpeed #4890, #3232).
_SIGNAL_HINTS = {
    "SIGKILL": "killed by SIGKILL: often the kernel OOM killer (check `dmesg` / `journalctl -k`)",
    "SIGSEGV": "segmentation fault in native code (a C/C++/CUDA extension or a driver)",
    "SIGABRT": "aborted: a C++ exception or failed assertion in native code",
    "SIGBUS": "bus error: often /dev/shm too small for data-loader workers",
    "SIGTERM": "terminated by SIGTERM from outside the job (a scheduler or a person)",
}


def exit_code_for(returncode: int) -> Tuple[int, Optional[str]]:
    """Map a `Popen.returncode` to (shell-style exit code, signal name): -9 -> (137, "SIGKILL")."""
    if returncode < 0:
        return 128 - returncode, signal_name(-returncode)
    return returncode, None


def default_log_dir(job_id: str) -> str:
    """Where the failure record goes when neither `--log_dir` nor `--enable_each_rank_log` is given:
    `<tmp>/<job id>` (job ids already read `dsrun-<hex>`), else `<tmp>/dsrun-<pid>` without one."""
    name = job_id.replace(os.sep, "_") if job_id else f"dsrun-{os.getpid()}"
    return os.path.join(tempfile.gettempdir(), name if name.startswith("dsrun-") else f"dsrun-{name}")


@dataclass
class RankFailure:
    """One rank that ended with a non-zero status on its own (not from our teardown)."""

    rank: int
    local_rank: int
    host: str
    pid: int
    exitcode: int  # shell style: 3, or 137 for SIGKILL
    signal: Optional[str]  # "SIGKILL", or None for a plain exit
    timestamp: float  # epoch seconds when the agent saw it
    tail: List[str] = field(default_factory=list)
    log_file: Optional[str] = None
    restart_count: int = 0
    error: Optional[str] = None  # the rank's own error message, from its error file
    error_file: Optional[str] = None  # that file: the full traceback is there


    @property
    def time(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.timestamp)) + \
            f".{int(self.timestamp * 1000) % 1000:03d}"

    @property
    def hint(self) -> Optional[str]:
        return _SIGNAL_HINTS.get(self.signal) if self.signal else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["time"] = self.time
        data["hint"] = self.hint
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RankFailure":
        """Inverse of `to_dict` (derived keys such as `time` and `hint` are dropped; unknown ones too)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class FailureReport:
    """Every failure of one job attempt on one node (or, merged, of the whole job)."""

    job_id: str
    host: str
    node_rank: Optional[int]  # None for the job-level report a multi-node driver writes
    failures: List[RankFailure] = field(default_factory=list)
    terminated: List[dict] = field(default_factory=list)  # ranks we stopped: {rank, pid, how}
    signal: Optional[str] = None  # a signal that dsrun itself received, if that ended the job
    exitcode: int = 0
    # Multi-node jobs: nodes that ended without an agent report: {host, node_rank, status, reason}.
    lost_nodes: List[dict] = field(default_factory=list)

    def ordered(self) -> List[RankFailure]:
        """Root cause first: the earliest failure, ties broken by rank."""
        return sorted(self.failures, key=lambda f: (f.timestamp, f.rank))

    @property
    def root_cause(self) -> Optional[RankFailure]:
        ordered = self.ordered()
        return ordered[0] if ordered else None

    def to_dict(self) -> dict:
        ordered = self.ordered()
        return {
            "job_id": self.job_id,
            "host": self.host,
            "node_rank": self.node_rank,
            "exitcode": self.exitcode,
            "signal": self.signal,
            "root_cause": ordered[0].to_dict() if ordered else None,
            "failures": [f.to_dict() for f in ordered],
            "terminated": list(self.terminated),
            "lost_nodes": list(self.lost_nodes),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "FailureReport":
        """Inverse of `to_dict`: what a multi-node driver reads from an agent's marker line."""
        return cls(job_id=data.get("job_id", ""), host=data.get("host", ""), node_rank=data.get("node_rank"),
                   failures=[RankFailure.from_dict(f) for f in data.get("failures") or []],
                   terminated=list(data.get("terminated") or []), signal=data.get("signal"),
                   exitcode=data.get("exitcode", 0), lost_nodes=list(data.get("lost_nodes") or []))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    def write(self, directory: str) -> str:
        """Write `directory/failure.json` atomically; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "failure.json")
        fd, tmp = tempfile.mkstemp(prefix=".failure.", dir=directory)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        return path

    def marker_line(self) -> str:
        return f"{FAILURE_MARKER} {self.to_json()}"


def error_file_path(directory: str, rank: int) -> str:
    """The error file a rank writes when an uncaught exception ends it (runtime/rank_errors.py)."""
    return os.path.join(directory, f"rank{rank}.error.json")


def read_error_file(path: str) -> Optional[str]:
    """The one-paragraph message in a rank's error file (dsrun's or torchelastic's `@record` layout), or None
    when the file is missing or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    ours = data.get("dsrun")
    if isinstance(ours, dict) and isinstance(ours.get("message"), str):
        return ours["message"]
    message = data.get("message")
    if isinstance(message, dict):
        message = message.get("message")
    return message if isinstance(message, str) else None


def parse_marker_line(line: str) -> Optional[dict]:
    """The report dict carried by an agent's `@@dsrun-failure@@ <json>` line, else None."""
    line = line.strip()
    if not line.startswith(FAILURE_MARKER):
        return None
    try:
        return json.loads(line[len(FAILURE_MARKER):])
    except ValueError:
        return None

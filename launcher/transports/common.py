"""What every multi-node transport shares: the agent's command line and spec hand-over, the remote
shell line, the one signal trap, output pumps, and the job-level failure record.

[Note: remote command line] A remote shell sees exactly one line per node, built here:
`cd <cwd> && [. <venv_script> && ]exec <python> -u -m dsrun.launcher.agent --job_id <id>
[--node_rank N] --lifeline stdin`. Every word is `shlex.quote`d and none comes from a user file's
values: the plan (hostfile names, `.deepspeed_env` values, script arguments) travels in the spec.

[Note: spec on stdin] The `AgentSpec` never travels in argv: argv is world-readable in
/proc/<pid>/cmdline, the spec's env may hold tokens, and a long argv fails with "Argument list too
long". The driver writes the spec as ONE line of JSON on the agent's stdin (`spec_line`), right after
starting it, and then never writes again: from then on stdin is the lifeline (EOF = the driver is
gone). The agent reads exactly that line (`read_spec_line`) before it starts supervising. The
agent's argv carries only its job id (what `node_entry --kill` matches on) and, under pdsh, its node
rank.

[Note: one failure model] Each agent prints its `FailureReport` as a `@@dsrun-failure@@ <json>` line
(launcher/failure.py). `JobOutcome` collects those lines from every node, adds the nodes that ended
without one (connection lost, unreachable, agent could not start), merges them into one job-level
`FailureReport` (root cause = earliest timestamp), writes it as `failure.json` on the launching
machine (the local rule: `--log_dir`, else `--enable_each_rank_log`, else the default log folder) and
prints it with the local renderer (launcher/output.py).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sys
import threading
from dataclasses import asdict
from typing import IO, Callable, Iterable, List, Optional

from dsrun.launcher.failure import FAILURE_MARKER, FailureReport, default_log_dir, parse_marker_line
from dsrun.launcher.output import print_failure
from dsrun.launcher.procs import signal_name
from dsrun.launcher.spec import AgentSpec, LaunchPlan

__all__ = ["AGENT_MODULE", "NODE_ENTRY_MODULE", "agent_argv", "remote_line", "spec_line", "read_spec_line",
           "SignalTrap", "LinePump", "JobOutcome", "UNREACHABLE_EXIT"]

AGENT_MODULE = "dsrun.launcher.agent"
NODE_ENTRY_MODULE = "dsrun.launcher.transports.node_entry"
UNREACHABLE_EXIT = 255  # OpenSSH's own exit status when it cannot connect or authenticate
_MAX_SPEC_BYTES = 1 << 30


def agent_argv(python: str, job_id: str, *, node_rank: Optional[str] = None) -> List[str]:
    """The argv that starts one node agent; `node_rank` (pdsh's `%n`) replaces the spec's node rank."""
    argv = [python, "-u", "-m", AGENT_MODULE, "--job_id", job_id]
    if node_rank is not None:
        argv += ["--node_rank", node_rank]
    return argv + ["--lifeline", "stdin"]


def _quote_path(path: str) -> str:
    # `~/x` keeps its meaning on the remote side (the remote user's home) yet stays a literal word.
    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + (shlex.quote(path[1:]) if len(path) > 1 else "")
    return shlex.quote(path)


def remote_line(cwd: str, argv: Iterable[str], venv_script: Optional[str] = None) -> str:
    """One POSIX shell line that enters `cwd`, optionally sources `venv_script`, then execs `argv`."""
    parts = [f"cd {_quote_path(cwd)}"]
    if venv_script:
        parts.append(f". {_quote_path(venv_script)}")
    parts.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return " && ".join(parts)


def spec_line(spec: AgentSpec) -> bytes:
    """The bytes a driver writes on an agent's stdin: the spec as one JSON line (JSON escapes newlines)."""
    return spec.to_json().encode() + b"\n"


def read_spec_line(fd: int) -> str:
    """Read the spec line from `fd` up to its newline; ValueError if the stream ends first. The driver
    writes nothing after the line, so what follows on `fd` is the lifeline alone."""
    buffer = bytearray()
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise ValueError("stdin ended before the launch spec line (the driver writes one JSON line)")
        end = chunk.find(b"\n")
        if end >= 0:
            buffer += chunk[:end]
            return buffer.decode()
        buffer += chunk
        if len(buffer) > _MAX_SPEC_BYTES:
            raise ValueError(f"launch spec line longer than {_MAX_SPEC_BYTES} bytes")


class SignalTrap:
    """SIGINT/SIGTERM/SIGHUP become `signum` (the first one) for the driver's loop, plus an optional
    callback run in the handler (e.g. forwarding to mpirun). Installed only on the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, on_signal: Optional[Callable[[int], None]] = None):
        self.signum: Optional[int] = None
        self._on_signal = on_signal
        self._previous = {}

    def __enter__(self) -> "SignalTrap":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if self._on_signal is not None:
            self._on_signal(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class LinePump(threading.Thread):
    """Copies a byte stream to `out` line by line. Agent failure reports (`@@dsrun-failure@@` lines) go
    to `on_report` instead; `on_line(text) -> bool` may claim other lines (True = not printed)."""

    def __init__(self, stream: IO[bytes], out: IO[bytes], lock: threading.Lock, *,
                 on_report: Optional[Callable[[dict], None]] = None,
                 on_line: Optional[Callable[[str], bool]] = None, name: str = "pump"):
        super().__init__(name=name, daemon=True)
        self.stream, self.out, self.lock = stream, out, lock
        self.on_report, self.on_line = on_report, on_line
        self.reports: List[dict] = []

    def run(self) -> None:
        marker = FAILURE_MARKER.encode()
        try:
            for raw in iter(self.stream.readline, b""):
                if marker in raw:
                    report = parse_marker_line(raw.decode("utf-8", "replace"))
                    if report is not None:
                        self.reports.append(report)
                        if self.on_report:
                            self.on_report(report)
                        continue
                if self.on_line and self.on_line(raw.decode("utf-8", "replace").rstrip("\n")):
                    continue
                with self.lock:
                    self.out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    self.out.flush()
        except (OSError, ValueError, EOFError):
            pass  # the stream went away with its connection; the exit status says the rest


class JobOutcome:
    """The job-level failure model of a multi-node run: see [Note: one failure model]."""

    def __init__(self, plan: LaunchPlan):
        self.plan = plan
        self.reports: List[FailureReport] = []
        self.lost: List[dict] = []
        self._lock = threading.Lock()

    def add_report(self, data: dict) -> None:
        """An agent's marker report (as parsed JSON); ignored unless it belongs to this job."""
        if data.get("job_id") not in (None, self.plan.job_id):
            return
        with self._lock:
            self.reports.append(FailureReport.from_dict(data))

    def has_report(self, host: str) -> bool:
        with self._lock:
            return any(r.host == host for r in self.reports)

    def node_lost(self, host: str, status: Optional[int], reason: str) -> None:
        """A node that ended without a report: `status` is its exit status (None: unknown)."""
        node_rank = list(self.plan.world_info).index(host) if host in self.plan.world_info else None
        with self._lock:
            self.lost.append({"host": host, "node_rank": node_rank, "status": status, "reason": reason})

    def merged(self, signum: Optional[int]) -> FailureReport:
        """One report for the whole job; the root cause is the earliest rank failure on any node."""
        with self._lock:
            reports, lost = list(self.reports), list(self.lost)
        report = FailureReport(job_id=self.plan.job_id, host=socket.gethostname(), node_rank=None,
                               failures=[f for r in reports for f in r.failures],
                               terminated=[t for r in reports for t in r.terminated],
                               signal=signal_name(signum) if signum else None, lost_nodes=lost)
        report.exitcode = self._exit_code(report, reports, signum)
        return report

    @staticmethod
    def _exit_code(report: FailureReport, reports: List[FailureReport], signum: Optional[int]) -> int:
        if report.root_cause is not None:
            return report.root_cause.exitcode
        if signum:
            return 128 + signum
        for node in report.lost_nodes:
            status = node.get("status")
            if status == UNREACHABLE_EXIT:
                return 2  # could not launch there: LaunchError's code
        for node in report.lost_nodes:
            if isinstance(node.get("status"), int) and node["status"] > 0:
                return node["status"]
        if report.lost_nodes:
            return 1
        # An agent stopped from outside (a signal on its node): the first such report, in arrival order.
        return next((r.exitcode for r in reports if r.exitcode), 0)

    def finish(self, signum: Optional[int], stream: Optional[IO[str]] = None) -> int:
        """Merge, and when the job did not succeed write `failure.json` here and print the summary;
        returns dsrun's exit code."""
        report = self.merged(signum)
        if report.exitcode == 0:
            return 0
        worker = self.plan.worker
        directory = worker.log_dir or worker.each_rank_log_dir or default_log_dir(self.plan.job_id)
        stream = stream if stream is not None else sys.stderr
        path = None
        try:
            path = report.write(os.path.abspath(directory))
        except OSError as e:
            stream.write(f"dsrun: could not write the failure record to {directory}: {e}\n")
        print_failure(report, path, stream=stream)
        return report.exitcode


def stdout_bytes() -> IO[bytes]:
    return getattr(sys.stdout, "buffer", sys.stdout)


def stderr_bytes() -> IO[bytes]:
    return getattr(sys.stderr, "buffer", sys.stderr)


def dumps_options(options) -> dict:
    """A transport's frozen options dataclass as the plain (JSON) dict a `Command.options` holds."""
    return json.loads(json.dumps(asdict(options)))

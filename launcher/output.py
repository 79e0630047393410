"""Readable output: rank-prefixed line streaming and the failure summary.

Every rank's stdout and stderr arrive on pipes that the agent reads in one thread; `RankStream`
cuts the bytes into whole lines and `ConsoleWriter` writes each line with its prefix in a single
`write`, so lines of different ranks never interleave mid-line. The prefix is `[rank N]`, or
`[host:rank N]` when the job spans several nodes. On a terminal each rank's prefix gets its own colour
(rendered once with rich, then reused as a plain string so user text is never parsed as markup);
otherwise output is plain. `NO_COLOR` turns colours off.
"""
from __future__ import annotations

import collections
import os
import sys
from typing import Deque, List, Optional, TextIO

from dsrun.launcher.failure import FailureReport, RankFailure

__all__ = ["RankStream", "ConsoleWriter", "render_failure", "print_failure", "TAIL_LINES"]

TAIL_LINES = 20
_MAX_PARTIAL = 64 * 1024  # a line longer than this is written in pieces rather than held
_PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "bright_cyan", "bright_magenta", "bright_green")


class RankStream:
    """Turns one pipe's bytes into whole lines and keeps the rank's last lines for the failure panel."""

    def __init__(self, tail: Deque[str]):
        self._partial = b""
        self.tail = tail  # shared by a rank's stdout and stderr

    def feed(self, data: bytes) -> List[str]:
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        if len(self._partial) > _MAX_PARTIAL:
            complete.append(self._partial)
            self._partial = b""
        return self._keep([line.decode("utf-8", "replace") for line in complete])

    def finish(self) -> List[str]:
        """Lines left at end of stream (a last line without a newline)."""
        rest, self._partial = self._partial, b""
        return self._keep([rest.decode("utf-8", "replace")]) if rest else []

    def _keep(self, lines: List[str]) -> List[str]:
        self.tail.extend(lines)
        return lines


def new_tail() -> Deque[str]:
    return collections.deque(maxlen=TAIL_LINES)


def _wants_colour(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ConsoleWriter:
    """Writes prefixed rank lines to the agent's stdout/stderr."""

    def __init__(self, *, multi_node: bool, host: str, out: Optional[TextIO] = None,
                 err: Optional[TextIO] = None, colour: Optional[bool] = None):
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self._multi_node = multi_node
        self._host = host
        self._colour = _wants_colour(self.out) if colour is None else colour
        self._prefixes = {}

    def prefix(self, rank: int) -> str:
        cached = self._prefixes.get(rank)
        if cached is None:
            text = f"[{self._host}:rank {rank}]" if self._multi_node else f"[rank {rank}]"
            if self._colour:
                from rich.color import ColorSystem
                from rich.style import Style
                text = Style.parse(_PALETTE[rank % len(_PALETTE)]).render(text, color_system=ColorSystem.STANDARD)
            cached = self._prefixes[rank] = text + " "
        return cached

    def write(self, rank: int, lines: List[str], *, stderr: bool = False) -> None:
        if not lines:
            return
        prefix = self.prefix(rank)
        stream = self.err if stderr else self.out
        try:
            stream.write("".join(f"{prefix}{line}\n" for line in lines))
            stream.flush()
        except (BrokenPipeError, ValueError):  # our reader went away (`dsrun ... | head`)
            pass

    def note(self, message: str) -> None:
        """A line from dsrun itself, on stderr."""
        try:
            self.err.write(f"dsrun: {message}\n")
            self.err.flush()
        except (BrokenPipeError, ValueError):
            pass


def _describe(f: RankFailure) -> str:
    how = f"exit code {f.exitcode}" + (f" ({f.signal})" if f.signal else "")
    return f"rank {f.rank} (local_rank {f.local_rank}) on {f.host}, pid {f.pid}: {how} at {f.time}"


def _tail_repeats(f: RankFailure) -> bool:
    """True when the rank's last lines only repeat its error message (a dsrun user error prints one line)."""
    if not f.error:
        return False
    first = f.error.splitlines()[0] if f.error.strip() else f.error
    return any(first in line for line in f.tail) and len(f.tail) <= len(f.error.splitlines()) + 1


def render_failure(report: FailureReport, record_path: Optional[str] = None) -> str:
    """The failure summary as plain text, root cause first (torchrun's table, made shorter)."""
    ordered = report.ordered()
    lines = []
    if ordered:
        root = ordered[0]
        lines.append(f"Root cause (first failure): {_describe(root)}")
        if root.error:
            lines.extend(f"  {line}" for line in root.error.splitlines())
        if root.error_file:
            lines.append(f"  error file (traceback): {root.error_file}")
        if root.hint:
            lines.append(f"  hint: {root.hint}")
        if root.log_file:
            lines.append(f"  log: {root.log_file}")
        if root.tail and not _tail_repeats(root):
            lines.append(f"  last {len(root.tail)} lines of rank {root.rank}:")
            lines.extend(f"    {line}" for line in root.tail)
        elif not root.tail:
            lines.append(f"  (rank {root.rank} printed nothing)")
        if len(ordered) > 1:
            lines.append("Other failed ranks:")
            lines.extend(f"  {_describe(f)}" for f in ordered[1:])
    for node in report.lost_nodes:
        lines.append(f"Node {node.get('host')} (node_rank {node.get('node_rank')}) ended without a report: "
                     f"{node.get('reason')}")
    if report.signal:
        lines.append(f"dsrun received {report.signal}; the job was stopped")
    if report.terminated:
        stopped = ", ".join(f"{t['rank']} ({t['how']})" for t in report.terminated)
        lines.append(f"Stopped by dsrun: rank {stopped}")
    if record_path:
        lines.append(f"Failure record: {record_path}")
    return "\n".join(lines)


def print_failure(report: FailureReport, record_path: Optional[str] = None, stream: Optional[TextIO] = None,
                  colour: Optional[bool] = None) -> None:
    """Print the summary: a red rich panel on a terminal, plain text otherwise."""
    stream = stream if stream is not None else sys.stderr
    text = render_failure(report, record_path)
    colour = _wants_colour(stream) if colour is None else colour
    try:
        if colour:
            from rich.console import Console
            from rich.panel import Panel
            from rich.text import Text
            failed = report.failures or report.lost_nodes
            title = f"dsrun: job {report.job_id} failed" if failed else f"dsrun: job {report.job_id} stopped"
            Console(file=stream, force_terminal=True, soft_wrap=False).print(
                Panel(Text(text), title=title, border_style="red", expand=False))
        else:
            failed = report.failures or report.lost_nodes
            stream.write(f"dsrun: job {report.job_id} {'FAILED' if failed else 'STOPPED'}\n{text}\n")
        stream.flush()
    except (BrokenPipeError, ValueError):
        pass

"""Readable output: rank-prefixed streaming of every rank's output, and the failure summary.

Every rank's stdout and stderr arrive on pipes that the agent reads in one thread. A `RankStream`
per pipe turns bytes into console writes through the agent's one `ConsoleWriter`:
- whole lines are written with the prefix `[rank N]` (`[host:rank N]` on multi-node jobs) in a single
  `write`, so lines of different ranks never interleave mid-line;
- a partial line (no newline yet: `print(..., end="")`, a prompt) is written after `PARTIAL_DELAY_S`
  with its prefix, and the rest of that line continues it without a second prefix; when another
  rank writes in between, the open line is ended first;
- `\\r` progress bars (tqdm): on a terminal each update rewrites the current line, prefix included;
  when the output is not a terminal, only each line's last state is written (no `^M` runs in logs);
- torch's excepthook prefix `[rankN]: ` is dropped when it names the same rank (no `[rank 0] [rank0]:`);
- `WorkerOptions.output_ranks` hides other ranks' output from the console (their last lines still
  reach the failure summary);
- after the agent forwarded Ctrl-C (`ConsoleWriter.interrupted`), a rank's KeyboardInterrupt
  traceback on stderr is replaced by one line per rank.

Colour and width are decided once by `make_console` (rich): no colour when the stream is not a
terminal, with `NO_COLOR` set or with `TERM=dumb`; `FORCE_COLOR` forces it. Prefixes are rendered
once and reused as plain strings, so user text is never parsed as markup.
"""
from __future__ import annotations

import codecs
import collections
import os
import re
import sys
import time
from typing import Deque, Iterable, List, Optional, TextIO

from dsrun.launcher.failure import FailureReport, RankFailure

__all__ = ["RankStream", "ConsoleWriter", "make_console", "render_failure", "print_failure", "TAIL_LINES",
           "PARTIAL_DELAY_S"]

TAIL_LINES = 20
PARTIAL_DELAY_S = 0.3  # a partial line waits this long for its newline before it is shown
_MAX_PARTIAL = 64 * 1024  # a line longer than this is ended rather than held
_MAX_HELD = 400  # stderr lines held after Ctrl-C while waiting to see whether they are a KeyboardInterrupt
_PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "bright_cyan", "bright_magenta", "bright_green")
_TOKENS = re.compile(r"(\r|\n)")
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (.+)$')
_TRACEBACK_START = ("Traceback (most recent call last):", "Error in sys.excepthook", "Exception ignored",
                    "Original exception was:")


def make_console(stream: TextIO):
    """The rich `Console` that decides colour and width for `stream`.

    No colour (and no escape codes at all) when `NO_COLOR` is set or `TERM` is dumb; otherwise rich's
    own rules: colour on a terminal, or anywhere with `FORCE_COLOR`."""
    from rich.console import Console

    plain = bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM", "").lower() in ("dumb", "unknown")
    return Console(file=stream, color_system=None if plain else "auto", no_color=plain, highlight=False,
                   markup=False, emoji=False, soft_wrap=True)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def new_tail() -> Deque[str]:
    return collections.deque(maxlen=TAIL_LINES)


class ConsoleWriter:
    """Writes the ranks' output to the agent's stdout/stderr: one line at most is open (written without
    its newline) at any time, and it is ended before anything else is written."""

    def __init__(self, *, multi_node: bool, host: str, out: Optional[TextIO] = None,
                 err: Optional[TextIO] = None, colour: Optional[bool] = None, ranks: Optional[Iterable[int]] = None,
                 delay: float = PARTIAL_DELAY_S):
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self._multi_node = multi_node
        self._host = host
        self._colour = make_console(self.out).color_system is not None if colour is None else colour
        self._ranks = None if ranks is None else frozenset(ranks)
        self.delay = delay
        self.interrupted = False  # set by the agent once it forwarded Ctrl-C to the ranks
        self._open: Optional["RankStream"] = None
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

    @property
    def erase(self) -> str:
        """Clears the rest of a rewritten line (only where escape codes are allowed)."""
        return "\x1b[K" if self._colour else ""

    def shows(self, rank: int) -> bool:
        return self._ranks is None or rank in self._ranks

    def live(self, stderr: bool) -> bool:
        """True when `\\r` updates can be passed through: the stream is a terminal."""
        return _isatty(self.err if stderr else self.out)

    def is_open(self, owner: "RankStream") -> bool:
        return self._open is owner

    def put(self, owner: "RankStream", text: str, *, opens: bool) -> None:
        """Write `owner`'s text; `opens`: it does not end with a newline, so the line stays open."""
        if self._open is not None and self._open is not owner:
            self._end_open()
        self._raw(owner.stderr, text)
        self._open = owner if opens else None

    def close_line(self, owner: "RankStream") -> None:
        if self._open is owner:
            self._end_open()

    def _end_open(self) -> None:
        stderr, self._open = self._open.stderr, None
        self._raw(stderr, "\n")

    def _raw(self, stderr: bool, text: str) -> None:
        stream = self.err if stderr else self.out
        try:
            stream.write(text)
            stream.flush()
        except (BrokenPipeError, ValueError):  # our reader went away (`dsrun ... | head`)
            pass

    def write(self, rank: int, lines: List[str], *, stderr: bool = False) -> None:
        """Whole lines for `rank`, each with its prefix, in one write."""
        if lines and self.shows(rank):
            if self._open is not None:
                self._end_open()
            prefix = self.prefix(rank)
            self._raw(stderr, "".join(f"{prefix}{line}\n" for line in lines))

    def note(self, message: str) -> None:
        """A line from dsrun itself, on stderr."""
        if self._open is not None:
            self._end_open()
        self._raw(True, f"dsrun: {message}\n")


class RankStream:
    """One pipe of one rank: bytes in, console writes out (see the module docstring); keeps the rank's
    last lines (each line's last state) in `tail` for the failure panel."""

    def __init__(self, tail: Deque[str], writer: ConsoleWriter, *, rank: int, stderr: bool = False):
        self.tail = tail  # shared by a rank's stdout and stderr
        self.rank = rank
        self.stderr = stderr
        self._w = writer
        self._live = writer.live(stderr)
        self._visible = writer.shows(rank)
        self._torch_prefix = f"[rank{rank}]: "
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._held: List[str] = []
        self._reset()

    def _reset(self) -> None:
        self._seg = ""  # the unfinished line's current segment: its text since the line began or the last \r
        self._shown = 0  # characters of _seg already on the console
        self._cr = False  # this line had a \r
        self._cr_pending = False  # a \r ended _seg; the next text starts a new segment
        self._rewrite = False  # live: the next write replaces the line on the console (\r + prefix)
        self._since: Optional[float] = None  # when the unshown text began waiting

    # ------------------------------------------------------------ input
    def feed(self, data: bytes) -> None:
        for token in _TOKENS.split(self._decoder.decode(data)):
            if token == "\n":
                self._end_line()
            elif token == "\r":
                self._carriage_return()
            elif token:
                self._text(token)
        if self._live and self._cr and not self._cr_pending and len(self._seg) > self._shown and self._shows_now():
            self._emit("")  # a progress bar's update: show it at once
        if len(self._seg) > _MAX_PARTIAL:
            self._end_line()

    def finish(self) -> None:
        """End of stream: a last line without a newline is ended; held lines are released."""
        rest = self._decoder.decode(b"", final=True)
        if rest:
            self._text(rest)
        if self._seg or self._cr_pending or self._shown:
            self._end_line()
        self._release()

    def flush_due(self) -> Optional[float]:
        """When the waiting partial line must be shown (a `time.monotonic()` value), or None."""
        if self._since is None or not self._shows_now() or (self._cr and not self._live):
            return None
        return self._since + self._w.delay

    def flush(self, now: float) -> None:
        due = self.flush_due()
        if due is not None and due <= now and len(self._seg) > self._shown:
            self._emit("")

    # ------------------------------------------------------------ lines
    def _shows_now(self) -> bool:
        return self._visible and not (self.stderr and self._w.interrupted)

    def _text(self, text: str) -> None:
        if self._cr_pending:
            self._seg, self._shown, self._cr_pending = "", 0, False
        self._seg += text
        if self._since is None:
            self._since = time.monotonic()

    def _carriage_return(self) -> None:
        if self._seg and not self._cr_pending and self._shows_now():
            if self._live:
                if len(self._seg) > self._shown:
                    self._emit("")
                self._rewrite = True
            else:  # piped: a shown partial stays as it is; the line's last state follows on its own line
                self._w.close_line(self)
        self._cr = self._cr_pending = True
        self._since = None

    def _end_line(self) -> None:
        if self._cr_pending:  # "...\r\n": the segment before the \r is the line's last state
            self._rewrite = False
        line = self._strip(self._seg)
        self.tail.append(line)
        if self._shows_now():
            self._emit("\n")
        elif self._visible and self.stderr:  # after Ctrl-C: held until the rank's stderr ends
            self._held.append(line)
            if len(self._held) > _MAX_HELD:
                self._release()
        self._reset()

    def _strip(self, text: str) -> str:
        """Drop torch's `[rankN]: ` (its excepthook's prefix) when it repeats ours."""
        return text[len(self._torch_prefix):] if text.startswith(self._torch_prefix) else text

    def _emit(self, end: str) -> None:
        """Put the unshown rest of the segment on the console, followed by `end` ("\\n" or "")."""
        w, seg = self._w, self._seg
        if self._rewrite:
            text = "\r" + w.prefix(self.rank) + self._strip(seg) + w.erase
        elif w.is_open(self):
            text = seg[self._shown:]
        elif self._shown == 0:
            text = w.prefix(self.rank) + self._strip(seg)
        elif len(seg) > self._shown:  # the line was ended by another rank's output: continue on a new one
            text = w.prefix(self.rank) + seg[self._shown:]
        else:
            return
        w.put(self, text + end, opens=not end)
        self._shown, self._rewrite, self._since = len(seg), False, None

    def _release(self) -> None:
        """Write the lines held after Ctrl-C: a KeyboardInterrupt traceback becomes one line."""
        held, self._held = self._held, []
        if not held:
            return
        if not any(line.startswith("KeyboardInterrupt") for line in held):
            self._w.write(self.rank, held, stderr=True)
            return
        first = next((i for i, line in enumerate(held) if line.startswith(_TRACEBACK_START)), 0)
        self._w.write(self.rank, held[:first] + [_interrupt_summary(held[first:])], stderr=True)


def _interrupt_summary(lines: List[str]) -> str:
    where = ""
    for line in lines:
        if line.startswith("KeyboardInterrupt"):
            break
        m = _FRAME.match(line)
        if m:
            where = f" at {os.path.basename(m.group(1))}:{m.group(2)} in {m.group(3)}"
    return f"interrupted (KeyboardInterrupt){where}"


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
    console = make_console(stream)
    colour = console.color_system is not None if colour is None else colour
    try:
        if colour:
            from rich.console import Console
            from rich.panel import Panel
            from rich.text import Text
            failed = report.failures or report.lost_nodes
            title = f"dsrun: job {report.job_id} failed" if failed else f"dsrun: job {report.job_id} stopped"
            if console.color_system is None:  # colour asked for by the caller
                console = Console(file=stream, force_terminal=True, soft_wrap=False, highlight=False)
            console.print(Panel(Text(text), title=title, border_style="red", expand=False), soft_wrap=False)
        else:
            failed = report.failures or report.lost_nodes
            stream.write(f"dsrun: job {report.job_id} {'FAILED' if failed else 'STOPPED'}\n{text}\n")
        stream.flush()
    except (BrokenPipeError, ValueError):
        pass

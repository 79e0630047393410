"""Rank 0's progress display.

On a terminal: a live rich panel (progress bar when the total is known, then step, loss, lr, grad norm,
throughput, TFLOP/s and MFU, memory, skipped steps, ETA), refreshed when rows are written, by the
caller's thread (rich's auto-refresh thread is off). Under `dsrun` at a terminal (the agent sets
`DSRUN_CONSOLE_TTY=1`; the rank's own stdout is a pipe): one status line rewritten in place with `\r`,
which dsrun's output layer shows live under the `[rank 0]` prefix. Anywhere else (a pipe, a file):
one plain line every `steps_per_print` steps and nothing else: no colour, no cursor movement, no
carriage return. `wall_clock_breakdown` adds forward/backward/optimizer/comm times.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, TextIO, Tuple

__all__ = ["Progress", "format_line", "fields"]


def _si(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.1f}"


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def fields(row: Dict[str, Any], *, total_steps: Optional[int], eta_s: Optional[float]) -> List[Tuple[str, str]]:
    """(label, value) pairs shown for `row`; the same in the plain line and the live panel."""
    out = []
    step = f"{row['step']}/{total_steps}" if total_steps else str(row["step"])
    out.append(("step", step))
    if row.get("loss") is not None:
        out.append(("loss", f"{row['loss']:.4f}"))
    if row.get("lr") is not None:
        out.append(("lr", f"{row['lr']:.3e}"))
    if row.get("grad_norm") is not None:
        out.append(("grad norm", f"{row['grad_norm']:.3g}"))
    if row.get("samples_per_s"):
        out.append(("samples/s", _si(row["samples_per_s"])))
    if row.get("tokens_per_s"):
        out.append(("tokens/s", _si(row["tokens_per_s"])))
    if row.get("tflops"):
        out.append(("FLOP/s", _si(row["tflops"] * 1e12)))
    if row.get("mfu") is not None:
        out.append(("MFU", f"{100 * row['mfu']:.1f}%"))
    if row.get("memory_gib") is not None:
        out.append(("mem", f"{row['memory_gib']:.2f} GiB"))
    out.append(("skipped", str(row.get("skipped") or 0)))
    for key, label in (("forward_ms", "fwd"), ("backward_ms", "bwd"), ("optimizer_ms", "optim"),
                       ("comm_ms", "comm")):
        if row.get(key) is not None:
            out.append((label, f"{row[key]:.1f} ms"))
    if eta_s is not None:
        out.append(("ETA", _duration(eta_s)))
    return out


def format_line(pairs: List[Tuple[str, str]]) -> str:
    return " | ".join(f"{label} {value}" for label, value in pairs)


class _EndsOpenLine:
    """rank 0's stdout while a `\r` status line is open: a write from the script ends that line first, as
    rich's Live and tqdm.write do, so the script's text never lands at the end of the status line."""

    def __init__(self, stream: TextIO, progress: "Progress"):
        self._stream, self._progress = stream, progress

    def write(self, text: str) -> int:
        if text and self._progress._line_open:
            self._progress._line_open = False
            self._stream.write("\n")
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class Progress:
    """Shows rows as they are written (rank 0 only)."""

    def __init__(self, *, steps_per_print: int, total_steps: Optional[int] = None, stream: Optional[TextIO] = None,
                 terminal: Optional[bool] = None):
        self.stream = stream if stream is not None else sys.stdout
        if terminal is None:
            try:
                terminal = self.stream.isatty()
            except (AttributeError, ValueError):
                terminal = False
        self.terminal = terminal
        # dsrun's console is a terminal that renders `\r` updates (launcher/agent.py sets this for the ranks)
        self.one_line = not terminal and os.environ.get("DSRUN_CONSOLE_TTY") == "1"
        self._line_open = False
        self._proxy = None
        self.steps_per_print = steps_per_print
        self.total_steps = total_steps
        self._live = None

    def show(self, row: Dict[str, Any], *, eta_s: Optional[float] = None) -> None:
        pairs = fields(row, total_steps=self.total_steps, eta_s=eta_s)
        if self.terminal:
            self._show_live(row, pairs)
        elif self.one_line:
            if self._proxy is None and self.stream is sys.stdout:  # the script's own prints start a new line
                self._proxy = sys.stdout = _EndsOpenLine(self.stream, self)
            self._write("\r" + format_line(pairs))
            self._line_open = True
        elif self.steps_per_print and row["step"] % self.steps_per_print == 0:
            try:
                self.stream.write(format_line(pairs) + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):  # the reader went away; training goes on
                pass

    def _show_live(self, row, pairs) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        table = Table.grid(padding=(0, 2))
        for _ in pairs:
            table.add_column(justify="right")
        table.add_row(*[f"[dim]{label}[/dim]" for label, _ in pairs])
        table.add_row(*[f"[bold]{value}[/bold]" for _, value in pairs])
        view = Table.grid()
        if self.total_steps:
            bar = Table.grid(padding=(0, 1))
            bar.add_row(ProgressBar(total=self.total_steps, completed=min(row["step"], self.total_steps), width=60),
                        f"{100 * min(row['step'] / self.total_steps, 1):.0f}%")
            view.add_row(bar)
        view.add_row(table)
        if self._live is None:
            self._live = Live(view, console=Console(file=self.stream), auto_refresh=False, transient=False)
            self._live.start()
        self._live.update(view, refresh=True)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # the reader went away; training goes on
            pass

    def close(self) -> None:
        if self._proxy is not None:
            if sys.stdout is self._proxy:
                sys.stdout = self.stream
            self._proxy = None
        if self._line_open:
            self._line_open = False
            self._write("\n")
        live, self._live = self._live, None
        if live is not None:
            try:
                live.stop()
            except Exception:  # the terminal is gone; nothing to restore
                pass

"""training_curves.png: loss, learning rate and throughput against the optimizer step.

matplotlib's Agg backend (no display needed), imported only here and only when the run ends.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["plot_curves", "FIGSIZE_IN", "DPI"]

FIGSIZE_IN = (12.0, 4.0)
DPI = 100  # 1200 x 400 pixels


def _series(rows, key):
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _smooth(y, width):
    out, acc = [], 0.0
    for i, v in enumerate(y):
        acc += v - (y[i - width] if i >= width else 0.0)
        out.append(acc / min(i + 1, width))
    return out


def _draw(ax, x, y, color, title):
    """The raw series faint, a trailing mean over ~2% of the steps on top (one step's host time is noisy)."""
    width = max(1, len(y) // 50)
    if width > 1:
        ax.plot(x, y, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(x, _smooth(y, width), color=color)
    else:
        ax.plot(x, y, color=color)
    ax.set_title(title)


def plot_curves(rows: List[Dict[str, Any]], path: str) -> Optional[str]:
    """Draw the three panels to `path`; returns None, or a reason when nothing was drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    if not rows:
        return "no optimizer step was recorded"
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)  # fixed margins: a layout engine costs seconds on a busy host
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.9, wspace=0.22)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_tput = fig.subplots(1, 3)
    _draw(ax_loss, *_series(rows, "loss"), "tab:blue", "loss")
    x, y = _series(rows, "lr")
    ax_lr.plot(x, y, color="tab:orange")
    ax_lr.set_title("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    key, label = ("tokens_per_s", "tokens/s") if any(r.get("tokens_per_s") for r in rows) else \
        ("samples_per_s", "samples/s")
    _draw(ax_tput, *_series(rows, key), "tab:green", f"throughput ({label})")
    for ax in (ax_loss, ax_lr, ax_tput):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=DPI)
    return None

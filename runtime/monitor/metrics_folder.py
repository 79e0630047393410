"""The metrics folder rank 0 leaves behind (docs/monitoring.md):

    <output_path>/training_metrics.csv       one row per optimizer step, appended and flushed as rows arrive
    <output_path>/training_curves.png        loss, lr and throughput against step (written at the end)
    <output_path>/summary.json               the run in one object (rewritten at every flush; final at the end)
    <output_path>/deepspeed_config_auto.json the resolved config, every "auto" filled in (written when
                                             training starts: the first engine.backward)

A crash leaves the rows flushed so far and a summary whose `status` says "running" or "failed".
JSON files are replaced atomically (write to a temporary name, then rename).
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional

__all__ = ["MetricsFolder", "BASE_COLUMNS", "BREAKDOWN_COLUMNS"]

# [Note: CSV columns] loss: mean of the micro-batch losses over the accumulation steps and the
# data-parallel ranks; lr: the first param group's, as set for this step; grad_norm: the global norm
# before clipping; skipped: optimizer steps skipped so far (overflow; counted when the engine learns of
# it, see the engine's [Note: deferred overflow accounting]); samples: samples seen so far;
# samples_per_s / tokens_per_s / tflops: this step's, from host wall time (the average over a print
# window is exact; a single row can lag the device); memory_gib: allocated device memory (CUDA) or the
# process's resident set size (CPU).
BASE_COLUMNS = ("step", "loss", "lr", "grad_norm", "loss_scale", "skipped", "samples", "samples_per_s",
                "tokens_per_s", "tflops", "step_time_s", "memory_gib")
BREAKDOWN_COLUMNS = ("forward_ms", "backward_ms", "optimizer_ms", "comm_ms")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.6g}"
    return str(value)


def write_json(path: str, data: Dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


class MetricsFolder:
    """Rank 0's writer for the folder. Nothing touches the disk before `start()`."""

    def __init__(self, path: str, *, columns: Iterable[str]):
        self.path = os.path.abspath(path)
        self.columns = tuple(columns)
        self._csv = None
        self._writer = None

    @property
    def started(self) -> bool:
        return self._writer is not None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def start(self, resolved_config: Dict[str, Any]) -> None:
        os.makedirs(self.path, exist_ok=True)
        write_json(self.file("deepspeed_config_auto.json"), resolved_config)
        self._csv = open(self.file("training_metrics.csv"), "w", newline="")
        self._writer = csv.writer(self._csv)
        self._writer.writerow(self.columns)
        self._csv.flush()

    def write_rows(self, rows: List[Dict[str, Any]]) -> None:
        if self._writer is None or not rows:
            return
        for row in rows:
            self._writer.writerow([_cell(row.get(c)) for c in self.columns])
        self._csv.flush()

    def write_summary(self, summary: Dict[str, Any]) -> None:
        if self._writer is not None:
            write_json(self.file("summary.json"), summary)

    def write_plot(self, rows: List[Dict[str, Any]]) -> Optional[str]:
        """training_curves.png from every row so far; returns why not when it could not be drawn."""
        if self._writer is None:
            return "the folder was never started"
        from .plots import plot_curves
        return plot_curves(rows, self.file("training_curves.png"))

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
        self._csv = self._writer = None

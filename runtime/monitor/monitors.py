"""DeepSpeed's monitors from the config: `tensorboard`, `csv_monitor`, `wandb`, `comet` (rank 0 writes).

Events are DeepSpeed's `(name, value, x)` triples with x = global samples: `Train/Samples/train_loss`,
`Train/Samples/lr`, `Train/Samples/loss_scale` (fp16) and, with `wall_clock_breakdown`,
`Train/Samples/elapsed_time_ms_{forward,backward,step}`. They are written when rows are (every
`steps_per_print` steps), never per micro-step. Folder layouts are DeepSpeed's: tensorboard and
csv_monitor write under `<output_path>/<job_name>` (an empty output_path is the working directory);
csv_monitor keeps one `<name with / and spaces as _>.csv` per event with a `step,<last part of name>`
header. A monitor that is enabled but whose package is missing is a ConfigError naming the package,
raised on every rank at initialize.
"""
from __future__ import annotations

import csv
import importlib.util
import os
from typing import Any, Dict, Iterable, List, Tuple

from dsrun.errors import ConfigError

__all__ = ["build_monitors", "events_for_row", "CSVMonitor", "TensorBoardMonitor", "WandbMonitor", "CometMonitor"]

Event = Tuple[str, Any, int]


def events_for_row(row: Dict[str, Any], *, fp16: bool, breakdown: bool) -> List[Event]:
    x = row.get("samples") or row["step"]
    events = []
    if row.get("loss") is not None:
        events.append(("Train/Samples/train_loss", row["loss"], x))
    if row.get("lr") is not None:
        events.append(("Train/Samples/lr", row["lr"], x))
    if fp16 and row.get("loss_scale") is not None:
        events.append(("Train/Samples/loss_scale", row["loss_scale"], x))
    if breakdown:
        for key, name in (("forward_ms", "forward"), ("backward_ms", "backward"), ("optimizer_ms", "step")):
            if row.get(key) is not None:
                events.append((f"Train/Samples/elapsed_time_ms_{name}", row[key], x))
    return events


def _log_dir(section) -> str:
    return os.path.join(section.output_path, section.job_name)


class CSVMonitor:
    def __init__(self, section):
        self.log_dir = _log_dir(section)
        os.makedirs(self.log_dir, exist_ok=True)
        self._started = set()

    def write_events(self, events: Iterable[Event]) -> None:
        for name, value, x in events:
            filename = name.replace("/", "_").replace(" ", "_")
            with open(os.path.join(self.log_dir, filename + ".csv"), "a", newline="") as f:
                writer = csv.writer(f)
                if filename not in self._started:
                    self._started.add(filename)
                    writer.writerow(["step", name.split("/")[-1]])
                writer.writerow([x, value])

    def close(self) -> None:
        pass


class TensorBoardMonitor:
    def __init__(self, section):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=_log_dir(section))

    def write_events(self, events: Iterable[Event]) -> None:
        for name, value, x in events:
            self.writer.add_scalar(name, value, x)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbMonitor:
    def __init__(self, section):
        import wandb
        self.wandb = wandb
        wandb.init(project=section.project, group=section.group, entity=section.team)

    def write_events(self, events: Iterable[Event]) -> None:
        for name, value, x in events:
            self.wandb.log({name: value}, step=x)

    def close(self) -> None:
        self.wandb.finish()


class CometMonitor:
    def __init__(self, section):
        import comet_ml
        kwargs = {k: getattr(section, k) for k in ("project", "workspace", "api_key", "experiment_key", "online",
                                                  "mode") if getattr(section, k) is not None}
        self.experiment = comet_ml.start(**kwargs)
        if section.experiment_name:
            self.experiment.set_name(section.experiment_name)
        self.interval = section.samples_log_interval
        self._last = None

    def write_events(self, events: Iterable[Event]) -> None:
        for name, value, x in events:
            if self._last is None or x - self._last >= self.interval or x == self._last:  # DeepSpeed's thinning
                self.experiment.log_metric(name, value, step=x)
                self._last = x

    def close(self) -> None:
        self.experiment.end()


# section name -> (package to import, the class that writes it)
_KINDS = {"tensorboard": ("tensorboard", TensorBoardMonitor), "csv_monitor": (None, CSVMonitor),
          "wandb": ("wandb", WandbMonitor), "comet": ("comet_ml", CometMonitor)}


def build_monitors(config, *, rank: int) -> List[Any]:
    """The enabled monitors (rank 0 gets writers, other ranks an empty list). Every rank checks that the
    enabled monitors' packages import, so that a missing one stops the job at initialize with exit code 2."""
    monitors = []
    for name, (package, cls) in _KINDS.items():
        section = getattr(config, name)
        if not section.enabled:
            continue
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{name} is enabled but the '{package}' package is not installed",
                              where=f"{name}.enabled", hint=f"pip install {package}, or set {name}.enabled to false")
        if rank == 0:
            monitors.append(cls(section))
    return monitors

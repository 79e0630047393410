"""What a training run shows and leaves behind (docs/monitoring.md).

    monitor = apply_monitoring(engine=engine, config=config)   # in Engine.__init__, after composition

Modules, one concept each: `hub` (TrainingMonitor, the object the engine calls), `step_stats` (losses and
step values kept on the device until a row is written), `throughput` (tokens, FLOPs, peaks, memory),
`progress` (rank 0's live panel or plain lines), `metrics_folder` and `plots` (the files),
`monitors` (tensorboard, csv_monitor, wandb, comet), `breakdown` (wall_clock_breakdown),
`comms_logger` (collective tap and log), `watchdog` (the hang watchdog).
"""
from __future__ import annotations

__all__ = ["apply_monitoring", "TrainingMonitor"]


def apply_monitoring(*, engine, config):
    """Build the engine's `TrainingMonitor` from the resolved config. Collective-free; raises ConfigError
    (on every rank) for an enabled monitor whose package is missing."""
    from .hub import TrainingMonitor
    return TrainingMonitor(engine=engine, config=config)


def __getattr__(name):
    if name == "TrainingMonitor":
        from .hub import TrainingMonitor
        return TrainingMonitor
    raise AttributeError(name)

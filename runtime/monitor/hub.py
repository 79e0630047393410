"""`TrainingMonitor`: the one object the engine holds for everything a run shows and leaves behind.

The engine calls it at three points and nowhere else: `on_backward(loss)` when `engine.backward`
starts, `on_step(...)` at the end of each optimizer (boundary) step, `close()` in `engine.destroy()`.
The pipeline engine, whose work does not pass through `engine.forward`, calls `on_backward` once per
batch with the batch's loss, and also `busy(phase)` at each instruction and `add_inputs` for tokens.
It wraps `engine.forward` (token counting, busy tracking; the module gets no hook), taps the ZeRO (or
pipeline) transfers when the watchdog, comms_logger or wall_clock_breakdown needs them, and an `atexit`
handler that finalises the folder when the script ends without `destroy()` (cheap, never raises,
no collective). The per-step cost with defaults is a few dict updates, one small device add per
micro-batch and one 8-byte async all-reduce per optimizer step (step_stats.py's [Note: sync-free loss]).
"""
from __future__ import annotations

import atexit
import sys
import time
import weakref
from typing import Any, Dict, List, Optional

import torch

from .comms_logger import CommsLogger, CommTap
from .metrics_folder import BASE_COLUMNS, BREAKDOWN_COLUMNS, MetricsFolder
from .monitors import build_monitors, events_for_row
from .progress import Progress
from .step_stats import MAX_PENDING, StepStats
from .throughput import count_tokens, memory_bytes, peak_flops, peak_memory_bytes
from .watchdog import HangWatchdog, default_store

__all__ = ["TrainingMonitor"]

_KEEP_ROWS = 20_000  # rows kept for the plot and the summary; beyond this every other one is dropped


def _stderr(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (ValueError, OSError):  # stderr closed at exit
        pass


def _total_steps(config) -> Optional[int]:
    sched = getattr(config, "scheduler", None)
    total = sched.params.get("total_num_steps") if sched is not None else None
    return int(total) if isinstance(total, (int, float)) and total > 0 else None


class TrainingMonitor:
    def __init__(self, *, engine, config):
        self.rank, self.world_size, self.device = engine.global_rank, engine.world_size, engine.device
        self.dp_world_size = engine.dp_world_size
        self.config = config
        metrics = config.metrics
        self.breakdown_enabled = bool(config.wall_clock_breakdown)
        self.monitors = build_monitors(config, rank=self.rank)  # raises ConfigError for a missing package
        self.stats = StepStats(group=engine.dp_group, world_size=self.dp_world_size)
        self.state: Dict[str, Any] = {"steps": engine.global_steps, "backwards": 0, "collectives": 0,
                                      "phase": "between steps", "busy_since": None, "last": {}}
        self.samples_per_step = engine.train_batch_size()
        self.rank_samples_per_step = engine.train_micro_batch_size_per_gpu() * engine.gradient_accumulation_steps()
        self.num_params = sum({p.data_ptr(): p.numel() for p in engine.module.parameters()}.values())
        self.flops_per_sample = metrics.flops_per_sample
        self.peak = peak_flops(self.device, metrics.peak_tflops)
        self.tokens = 0
        self.rows: List[Dict[str, Any]] = []
        self._keep_every, self._seen_rows = 1, 0
        self.best: Optional[tuple] = None
        self.last_row: Optional[Dict[str, Any]] = None
        self.t_start = time.time()
        self.t_step: Optional[float] = None  # set by the first forward or backward, then at each step's end
        self.train_s = 0.0
        self.status = "running"
        self.config_sha256 = config.fingerprint()
        self.closed = False
        self.folder = self.progress = None
        if self.rank == 0:
            self._open_outputs(config)
        self.drain_every = (config.steps_per_print if 0 < config.steps_per_print <= MAX_PENDING
                            else 10 if self.progress is not None and self.progress.terminal else MAX_PENDING)
        self._start_watchers(engine, config)
        self._wrap_forward(engine)
        ref = weakref.ref(self)
        self._atexit = lambda: ref() is not None and ref()._at_exit()
        atexit.register(self._atexit)

    def _open_outputs(self, config) -> None:
        """Rank 0: the metrics folder and the progress display."""
        if config.metrics.enabled:  # started by the first backward: an engine that never trains leaves nothing
            columns = BASE_COLUMNS + (BREAKDOWN_COLUMNS if self.breakdown_enabled else ())
            self.folder = MetricsFolder(config.metrics.output_path, columns=columns)
        self.progress = Progress(steps_per_print=config.steps_per_print, total_steps=_total_steps(config))

    def _start_watchers(self, engine, config) -> None:
        """wall_clock_breakdown timers, comms_logger, the hang watchdog, and the collective tap they share."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.breakdown = self.comms_logger = self.watchdog = self.tap = None
        if self.breakdown_enabled:
            from .breakdown import Breakdown
            self.breakdown = Breakdown(engine, sync=sync).install()
        if config.comms_logger.enabled:
            self.comms_logger = CommsLogger(config.comms_logger, rank=self.rank, world_size=self.dp_world_size,
                                            write=_stderr)
        if config.hang_watchdog.enabled:
            self.watchdog = HangWatchdog(timeout_s=config.hang_watchdog.timeout_s, rank=self.rank,
                                         world_size=self.world_size, state=self.state, store=default_store(),
                                         write=_stderr, save=self._save_hang_report).start()
            weakref.finalize(self, self.watchdog.stop)  # an engine dropped without destroy() stops it too
        # the plain engine's ZeRO Comm, or the pipeline engine's PipeComm (runtime/pipe/comm.py)
        comm = getattr(getattr(engine, "zero", None), "comm", None) or vars(engine).get("comm")
        if comm is not None and (self.watchdog or self.comms_logger or self.breakdown):
            self.tap = CommTap(comm, last=self.state["last"] if self.watchdog else None, logger=self.comms_logger,
                               on_time=self.breakdown.add_comm if self.breakdown else None, sync=sync,
                               count=self.state if self.watchdog else None).install()

    def _wrap_forward(self, engine) -> None:
        """Count tokens and mark the rank busy at each training forward: an instance attribute over
        `engine.forward` (the module gets no hook; `close()` removes it)."""
        inner, module = engine.forward, engine.module

        def forward(*args, **kwargs):
            if module.training and torch.is_grad_enabled():
                tokens = count_tokens(args, kwargs)
                if tokens:
                    self.tokens += tokens
                self._busy("forward")
            return inner(*args, **kwargs)
        forward.__wrapped__ = inner
        self._engine_ref = weakref.ref(engine)
        engine.forward = forward

    # -- the engine's three calls ------------------------------------------------------------------

    def _busy(self, phase: str) -> None:
        state = self.state
        state["phase"] = phase
        if state["busy_since"] is None:
            state["busy_since"] = time.time()
            if self.t_step is None:
                self.t_step = time.perf_counter()

    def busy(self, phase: str, waiting_on: Optional[int] = None) -> None:
        """Mark this rank busy in `phase`, for an engine whose work does not go through `engine.forward`
        and `on_backward` (the pipeline engine calls it as each schedule instruction starts). `waiting_on`
        names the global rank a point-to-point receive waits for (None otherwise): the watchdog's report
        names the ranks waited on as behind, and compares steps only (watchdog.py)."""
        self._busy(phase)
        self.state["waiting_on"], self.state["steps_only"] = waiting_on, True

    def add_inputs(self, inputs) -> None:
        """Count the tokens of one training micro-batch's inputs (a tensor, or a tuple led by one), for an
        engine whose inputs do not go through `engine.forward` (the pipeline's first stage loads them)."""
        tokens = count_tokens(tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), None)
        if tokens:
            self.tokens += tokens

    def on_backward(self, loss: torch.Tensor) -> None:
        """Record one micro-batch's loss (no host sync)."""
        if self.folder is not None and not self.folder.started:
            self._to_folder("start", self.config.to_dict())
        self.stats.add_loss(loss)
        self.state["backwards"] += 1
        self._busy("backward")

    def on_step(self, *, step: int, samples: int, grad_norm, lr: Optional[float], loss_scale: float,
                skipped_steps: int) -> None:
        """Called when an optimizer step has completed: park its values, write rows when due."""
        now = time.perf_counter()
        step_s, self.t_step = now - (self.t_step if self.t_step is not None else now), now
        self.train_s += step_s
        host = {"lr": lr, "loss_scale": loss_scale, "skipped": skipped_steps, "samples": samples,
                "step_time_s": step_s, "memory_gib": memory_bytes(self.device) / 2**30}
        if step_s > 0:
            host["samples_per_s"] = self.samples_per_step / step_s
            tokens_per_sample = self.tokens / self.rank_samples_per_step if self.tokens else 1
            if self.tokens:
                host["tokens_per_s"] = self.tokens * self.dp_world_size / step_s
            flops = self.flops_per_sample or 6.0 * self.num_params * tokens_per_sample
            host["tflops"] = flops * self.rank_samples_per_step / step_s / 1e12
            if self.peak:
                host["mfu"] = host["tflops"] * 1e12 / self.peak
        if self.breakdown is not None:
            host.update(self.breakdown.take())
        self.tokens = 0
        self.stats.end_step(step, grad_norm, host)
        state = self.state
        state["steps"], state["phase"], state["busy_since"] = step, "between steps", None
        state.pop("waiting_on", None)
        spp = self.config.steps_per_print
        if (spp and step % spp == 0) or len(self.stats.pending) >= self.drain_every:
            self.flush()

    def close(self, status: str = "completed") -> None:
        """Flush, finalise the folder and stop everything this monitor started. Idempotent."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self._atexit)
        if self.watchdog is not None:
            self.watchdog.stop()
        engine = self._engine_ref()
        if engine is not None:
            vars(engine).pop("forward", None)
        if self.tap is not None:
            self.tap.remove()
        if self.breakdown is not None:
            self.breakdown.remove()
        self.flush(wait=status == "completed")
        self.status = status
        if self.rank == 0:
            try:
                self._finalise()
            except Exception as exc:  # what a run leaves must never fail the run: say what was lost
                _stderr(f"[dsrun] metrics not finalised: {type(exc).__name__}: {exc}")

    def _finalise(self) -> None:
        """Rank 0 at the end: the display, the comms summary, the monitors, the curves and the summary."""
        if self.progress is not None:
            self.progress.close()
        if self.comms_logger is not None and self.comms_logger.stats:
            _stderr(self.comms_logger.summary_text())
        for monitor in self.monitors:
            monitor.close()
        if self.folder is not None and self.folder.started:
            why = self.folder.write_plot(self.rows) if self.rows else None  # an engine that never stepped
            if why:
                _stderr(f"[dsrun] training_curves.png not written: {why}")
            self.folder.write_summary(self.summary())
            self.folder.close()

    def _at_exit(self) -> None:
        failed = getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None) is not None
        try:
            self.close(status="failed" if failed else "exited without engine.destroy()")
        except Exception as exc:  # at exit nothing may raise; say what was lost
            _stderr(f"[dsrun] metrics not finalised at exit: {type(exc).__name__}: {exc}")

    # -- rows ----------------------------------------------------------------------------------------

    def flush(self, wait: bool = True) -> None:
        """Write the parked steps' rows (rank 0) and update the display, monitors and summary."""
        rows = self.stats.drain(read=self.rank == 0, wait=wait)
        if self.rank != 0 or not rows:
            return
        for row in rows:
            self._keep(row)
        self._to_folder("write_rows", rows)
        for monitor in self.monitors:
            monitor.write_events([e for row in rows for e in events_for_row(
                row, fp16=self.config.fp16.enabled, breakdown=self.breakdown_enabled)])
        window_s = sum(r["step_time_s"] for r in rows)
        shown = dict(rows[-1])
        if window_s > 0:  # the window's average is exact where one step's host time is not
            for key in ("samples_per_s", "tokens_per_s", "tflops", "mfu"):
                if shown.get(key) is not None:
                    shown[key] = sum(r.get(key, 0) * r["step_time_s"] for r in rows) / window_s
        self.last_row = rows[-1]
        total = self.progress.total_steps if self.progress else None
        eta = (total - shown["step"]) * window_s / len(rows) if total and shown["step"] <= total else None
        self.progress.show(shown, eta_s=eta)
        self._to_folder("write_summary", self.summary())

    def _to_folder(self, method: str, *args) -> None:
        """Call the folder; a disk that refuses (permissions, full) turns the folder off with one warning
        rather than stopping the training."""
        if self.folder is None:
            return
        try:
            getattr(self.folder, method)(*args)
        except OSError as exc:
            _stderr(f"[dsrun] metrics folder turned off: cannot write {self.folder.path}: {exc} "
                    f"(metrics.output_path)")
            self.folder = None

    def _keep(self, row: Dict[str, Any]) -> None:
        loss = row.get("loss")
        if isinstance(loss, float) and loss == loss and (self.best is None or loss < self.best[0]):
            self.best = (loss, row["step"])
        self._seen_rows += 1
        if self._seen_rows % self._keep_every == 0:
            self.rows.append(row)
        if len(self.rows) >= _KEEP_ROWS:
            self.rows, self._keep_every = self.rows[::2], self._keep_every * 2

    def summary(self) -> Dict[str, Any]:
        import dsrun
        cfg, last = self.config, self.last_row or {}
        steps = last.get("step", self.state["steps"])
        return {
            "status": self.status,
            "final_loss": last.get("loss"), "best_loss": self.best[0] if self.best else None,
            "best_loss_step": self.best[1] if self.best else None,
            "steps": steps, "samples": last.get("samples", 0), "skipped_steps": last.get("skipped", 0),
            "world_size": self.world_size, "data_parallel_size": self.dp_world_size,
            "zero_stage": cfg.zero.stage, "precision": cfg.precision.param_dtype,
            "train_batch_size": cfg.train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "parameters": self.num_params,
            "timings": {"wall_s": round(time.time() - self.t_start, 3), "train_s": round(self.train_s, 3),
                        "mean_step_s": round(self.train_s / steps, 6) if steps else None,
                        "samples_per_s": round(last.get("samples", 0) / self.train_s, 3) if self.train_s else None},
            "peak_memory_gib": round(peak_memory_bytes(self.device) / 2**30, 4),
            "versions": {"dsrun": dsrun.__version__, "torch": torch.__version__,
                         "python": sys.version.split()[0]},
            "config_sha256": self.config_sha256,
            "comms": self.comms_logger.summary() if self.comms_logger is not None else None,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t_start)),
        }

    def _save_hang_report(self, text: str) -> None:
        folder = self.folder
        if folder is not None and folder.started:
            try:
                with open(folder.file("hang_report.txt"), "a") as f:
                    f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + text + "\n\n")
            except OSError:  # the report went to stderr already
                pass

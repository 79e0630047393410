"""Per-step training statistics, kept on the device until a row is written.

[Note: sync-free loss] `engine.backward(loss)` hands the loss here. It is detached and added to a
running sum on its own device (one small kernel, no host sync). At the optimizer step the sum of this
step's micro-batch losses is all-reduced across the data-parallel ranks with `async_op=True` (one
8-byte collective per optimizer step, never per micro-step) and parked with the step's host-side values
(lr, loss scale, step time, ...). Nothing is read back until `drain()`, called every `steps_per_print`
steps (or at most every `MAX_PENDING` steps, and at the end): it waits for the parked reductions and
reads every parked value in one `.tolist()`. So the CSV's `loss` is the mean of the micro-batch losses
over the accumulation steps and over the data-parallel ranks, and the host waits for the device once
per window, where DeepSpeed's progress line waits anyway.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

__all__ = ["StepStats", "PendingStep", "MAX_PENDING"]

MAX_PENDING = 100  # steps parked before a drain is forced (bounds memory and what a hard kill loses)


@dataclass
class PendingStep:
    step: int
    loss_sum: Optional[torch.Tensor]  # sum over micro-batches (and over ranks once `work` completes)
    micro_batches: int
    work: Any  # the async all-reduce of loss_sum, or None
    grad_norm: Any  # tensor, float or None
    host: Dict[str, Any] = field(default_factory=dict)  # lr, loss_scale, skipped, samples, ...


class StepStats:
    """Collects what each optimizer step leaves; `drain()` turns it into plain rows."""

    def __init__(self, *, group=None, world_size: int = 1):
        self.group = group
        self.world_size = world_size
        self._loss_sum: Optional[torch.Tensor] = None
        self._micro_batches = 0
        self.pending: List[PendingStep] = []
        self.last_step_time = time.perf_counter()

    def add_loss(self, loss: torch.Tensor) -> None:
        """Record one micro-batch's loss without waiting for the device."""
        value = loss.detach().float().reshape(())
        self._loss_sum = value.clone() if self._loss_sum is None else self._loss_sum.add_(value)
        self._micro_batches += 1

    def end_step(self, step: int, grad_norm, host: Dict[str, Any]) -> PendingStep:
        """Park the step that just completed; starts the cross-rank loss reduction."""
        loss_sum, work = self._loss_sum, None
        if loss_sum is not None and self.world_size > 1:
            # every rank takes an optimizer step at the same point, so the collectives line up
            work = dist.all_reduce(loss_sum, group=self.group, async_op=True)
        if torch.is_tensor(grad_norm):  # a copy: the optimizer may reuse the buffer at the next step
            grad_norm = grad_norm.detach().float().reshape(()).clone()
        entry = PendingStep(step, loss_sum, self._micro_batches, work, grad_norm, host)
        self.pending.append(entry)
        self._loss_sum, self._micro_batches = None, 0
        return entry

    def drain(self, *, read: bool = True, wait: bool = True) -> List[Dict[str, Any]]:
        """Return the parked steps as rows (oldest first), reading the device once. `read=False` (ranks
        other than 0) only retires the reductions. `wait=False` (at exit, when a peer may be gone) never
        blocks: a reduction still in flight leaves its row without a loss."""
        pending, self.pending = self.pending, []
        for entry in pending:
            if entry.work is None:
                continue
            if wait:
                entry.work.wait()
            elif not entry.work.is_completed():
                entry.loss_sum, entry.work = None, None
        if not read or not pending:
            return []
        by_device: Dict[torch.device, list] = {}
        for entry in pending:
            for name in ("loss_sum", "grad_norm"):
                value = getattr(entry, name)
                if torch.is_tensor(value):
                    by_device.setdefault(value.device, []).append((entry, name, value))
        for items in by_device.values():  # one read per device (one in practice)
            values = torch.stack([v for _, _, v in items]).tolist()
            for (entry, name, _), value in zip(items, values):
                setattr(entry, name, value)
        return [self._row(entry) for entry in pending]

    def _row(self, entry: PendingStep) -> Dict[str, Any]:
        loss = None
        if entry.loss_sum is not None and entry.micro_batches:
            ranks = self.world_size if entry.work is not None else 1
            loss = entry.loss_sum / (entry.micro_batches * ranks)
        row = {"step": entry.step, "loss": loss, "grad_norm": entry.grad_norm}
        row.update(entry.host)
        return row

"""Bucket updaters: how the optimizer step turns reduced gradients into new weights, chosen once.

`select_updater` picks one object at construction (never a type test per step):

- `FlatKernelUpdater` (dsrun's FusedAdam): per bucket, one kernel applies the unscale-and-clip
  coefficient, the Adam update and the cast into the working weights, and the bucket is published right
  away, so publishing (all-gathers at stages 1-2) runs while later buckets update ([Note: pipelined step]).
  It keeps torch's state layout ('step', 'exp_avg', 'exp_avg_sq' per master), so checkpoints and
  `state_dict` do not depend on which updater ran. An overflow turns the coefficient into NaN and every
  kernel leaves its bucket as it was ([Note: device-side skip] in optimizer.py).
- `TorchOptimizerUpdater` (any other optimizer): one multiply of every gradient by the coefficient,
  `optimizer.step()` on the masters, a cast of the masters into the working weights, then publishing.

- `HostOffloadUpdater` (`offload_optimizer`, chosen by the caller from the offload policy): masters and
  optimizer state in host memory, per bucket the gradient copied to the host, the CPU step (fused CPU Adam
  or Adagrad kernel, else the optimizer's own step), the updated weights copied back, then the publish.
"""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from typing import Dict, List, Tuple

import torch

__all__ = ["select_updater", "FlatKernelUpdater", "TorchOptimizerUpdater", "HostOffloadUpdater"]


def _flat_kernel_capable(optimizer) -> bool:
    """dsrun's FusedAdam with its own `step` (a subclass overriding `step` keeps the torch path)."""
    from dsrun.kernels.fused_adam import FusedAdam  # imports no compiled code
    return isinstance(optimizer, FusedAdam) and type(optimizer).step is FusedAdam.step


def select_updater(optimizer, *, weights, masters: List[torch.Tensor], aliased: bool,
                   bucket_of_master: Dict[int, int], offload=None):
    """The updater for `optimizer` over `masters` (one per bucket) publishing into `weights`; with
    `offload` (a dict: `targets`, `pin`) the host updater."""
    if offload is not None:
        return HostOffloadUpdater(optimizer, weights=weights, masters=masters, aliased=aliased,
                                  bucket_of_master=bucket_of_master, **offload)
    cls = FlatKernelUpdater if _flat_kernel_capable(optimizer) else TorchOptimizerUpdater
    return cls(optimizer, weights=weights, masters=masters, aliased=aliased, bucket_of_master=bucket_of_master)


class _Updater:
    skips_on_device = False

    def __init__(self, optimizer, *, weights, masters, aliased, bucket_of_master):
        self.optimizer, self.weights, self.masters = optimizer, weights, masters
        self.aliased, self.bucket_of_master = aliased, bucket_of_master

    def cast_and_publish(self) -> None:
        """Masters -> working weights (cast), then publish every bucket (forward order: last bucket first)."""
        n = len(self.masters)
        if not self.aliased and n:  # a weight store may keep no working shard (unit_weights.py)
            pairs = [(self.weights.owned(b), m) for b, m in enumerate(self.masters)]
            pairs = [(w, m) for w, m in pairs if w is not None]
            if pairs:
                torch._foreach_copy_([w for w, _ in pairs], [m for _, m in pairs])
        for b in reversed(range(n)):
            self.weights.publish(b)

    def wait(self) -> None:
        """Updates queued elsewhere than the compute stream are visible to it (nothing to wait for here)."""


class TorchOptimizerUpdater(_Updater):
    def step(self, coef, grads: List[torch.Tensor]) -> None:
        if grads and (torch.is_tensor(coef) or coef != 1.0):
            torch._foreach_mul_(grads, coef)
        for master, grad in zip(self.masters, grads):
            master.grad = grad
        self.optimizer.step()
        self.cast_and_publish()


class FlatKernelUpdater(_Updater):
    skips_on_device = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._side = None  # CUDA stream of the update while publishing overlaps the next forward

    def step(self, coef, grads: List[torch.Tensor]) -> None:
        """[Note: pipelined step] per bucket: unscale+clip+Adam+cast in one kernel, then its publish.

        When publishing overlaps the next forward on CUDA the updates run on a side stream: the next
        forward starts at once and each layer waits (through its bucket's all-gather, launched after that
        bucket's update) only for its own weights, so the update of later buckets overlaps the first
        layers' compute. (Launching the later buckets lazily from the forward's pre-hooks, to take their
        host work off the step, measured no faster on 4 H200: RESULTS.md B3, 2026-11-22.)"""
        opt = self.optimizer
        by_bucket: Dict[int, Tuple[int, torch.Tensor]] = {
            self.bucket_of_master[id(m)]: (g, m) for g, group in enumerate(opt.param_groups) for m in group["params"]}
        side = None
        device = self.weights.device
        if self.weights.overlaps_forward and device.type == "cuda":
            if self._side is None:
                self._side = torch.cuda.Stream(device=device)
            side = self._side
            side.wait_stream(torch.cuda.current_stream(device))
            if torch.is_tensor(coef):
                coef.record_stream(side)  # made on the main stream, read on the side one
        with torch.cuda.stream(side) if side is not None else nullcontext():
            for b in sorted(by_bucket, reverse=True):  # forward order: the last bucket holds the first layers
                g, master = by_bucket[b]
                self._update_bucket(b, g, master, grads[b], coef)

    def _update_bucket(self, b: int, g: int, master: torch.Tensor, grad: torch.Tensor, coef) -> None:
        state = self.optimizer.state[master]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(master)
            state["exp_avg_sq"] = torch.zeros_like(master)
        state["step"] = int(state["step"]) + 1
        out = None if self.aliased else self.weights.owned(b)
        if master.numel():
            self.optimizer.step_flat(master, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], out=out,
                                     group=g, grad_scale=coef)
        self.weights.publish(b)

    def wait(self) -> None:
        """The compute stream waits for updates queued on the side stream."""
        if self._side is not None:
            torch.cuda.current_stream(self.weights.device).wait_stream(self._side)


class HostOffloadUpdater(_Updater):
    """Optimizer offload (offload.py): masters and state on the host, the step on the CPU.

    `targets[b]` is where bucket b's updated weights go on the device (the working chunk, or the device
    shard when the master is the shard), None when the host master is itself the working chunk (fp32 on
    a CPU device)."""

    def __init__(self, optimizer, *, weights, masters, aliased, bucket_of_master, targets, pin: bool,
                 on_device=frozenset(), residency=None):
        super().__init__(optimizer, weights=weights, masters=masters, aliased=aliased,
                         bucket_of_master=bucket_of_master)
        from .offload import offload_kind
        self.targets, self.pin = targets, pin
        self.on_device = set(on_device)  # [Note: partial offload]: buckets stepped on the accelerator
        # where masters and states are between steps: host memory, or files (nvme.py's `resident` hook)
        self.residency = residency or _ALWAYS_RESIDENT
        self.kind = offload_kind(optimizer)
        self._host_grads: Dict[int, torch.Tensor] = {}
        self._staging: Dict[int, torch.Tensor] = {}
        self._pipeline = None  # HostStepPipeline, made at the first step on an accelerator
        from ..log import info_rank0, warn_once_rank0
        name = type(optimizer).__name__
        if self.kind == "adam" and type(optimizer).__module__.startswith("torch.optim"):
            info_rank0("offload_optimizer: the client torch.optim.%s runs as dsrun's fused CPU Adam (same "
                       "hyperparameters and state)", name)
        elif self.kind == "torch":
            warn_once_rank0("offload_optimizer: %s has no fused CPU kernel; its step runs on the CPU as given, "
                            "which may be slow (Adam, AdamW and Adagrad have CPU kernels)", name)

    def _host_grad(self, b: int, grad: torch.Tensor) -> torch.Tensor:
        """Bucket b's gradient on the host: the reducer's chunk itself on a CPU device, else a copy into
        a host buffer allocated once (pinned per `pin`)."""
        if grad.device.type == "cpu" and grad.dtype == torch.float32:
            return grad
        buf = self._host_grads.get(b)
        if buf is None:
            from .offload import host_tensor
            buf = self._host_grads[b] = host_tensor(torch.empty(grad.shape, dtype=torch.float32), pin=self.pin)
        buf.copy_(grad)
        return buf

    def _out(self, b: int):
        """Where the CPU kernel writes the updated weights: the target itself when it is on the host,
        else a host staging buffer of the target's dtype (then copied to the device)."""
        target = self.targets[b]
        if target is None or target.device.type == "cpu":
            return target
        buf = self._staging.get(b)
        if buf is None:
            from .offload import host_tensor
            buf = self._staging[b] = host_tensor(torch.empty(target.shape, dtype=target.dtype), pin=self.pin)
        return buf

    def step(self, coef, grads: List[torch.Tensor]) -> None:
        opt = self.optimizer
        by_bucket = {self.bucket_of_master[id(m)]: (g, m) for g, group in enumerate(opt.param_groups)
                     for m in group["params"]}
        order = sorted(by_bucket, reverse=True)  # forward order: the last bucket holds the first layers
        if self.kind != "torch" and self._pipeline_device(order, grads) is not None:
            return self._pipelined_step(coef, grads, by_bucket, order)
        coef = float(coef)  # the host reads the coefficient: the step runs here
        host = {b: self._host_grad(b, grads[b]) for b in by_bucket}
        if coef != 1.0:
            torch._foreach_mul_(list(host.values()), coef)
        if self.kind == "torch":
            for b, (_, master) in by_bucket.items():
                master.grad = host[b]
            opt.step()
            for _, master in by_bucket.values():
                master.grad = None
            self.cast_and_publish()
            return
        for b in order:
            g, master = by_bucket[b]
            out = self._out(b)
            if master.numel():
                with self.residency.resident(master):  # NVMe: swapped in around its step ([Note: NVMe residency])
                    state = self._begin_state(master, opt.param_groups[g])
                    self._kernel_step(master, state, host[b], opt.param_groups[g], out)
            if out is not None and out is not self.targets[b]:
                self.targets[b].copy_(out, non_blocking=True)
            self.weights.publish(b)

    def _pipeline_device(self, order, grads):
        """The CUDA device when every bucket's gradient is a flat tensor there and its update target a flat
        tensor there or on the host (or None) (the pipelined host step applies), else None."""
        devs = {grads[b].device for b in order}
        if len(devs) != 1:
            return None
        dev = devs.pop()
        flat = all(grads[b].dim() == 1 and (t is None or (t.dim() == 1 and t.numel() == grads[b].numel()
                                                          and t.device in (dev, torch.device("cpu"))))
                   for b in order for t in (self.targets[b],))
        return dev if dev.type == "cuda" and flat else None

    def _pipelined_step(self, coef, grads, by_bucket, order) -> None:
        """[Note: pipelined host step] (host_pipeline.py): the unscale-and-clip multiply on the device,
        then the gradients down, the CPU step and the weights up, chunk by chunk, all overlapped."""
        if self._pipeline is None:
            from .host_pipeline import HostStepPipeline
            self._pipeline = HostStepPipeline(grads[order[0]].device, pin=self.pin)
        groups = self.optimizer.param_groups
        for b in [b for b in order if b in self.on_device]:  # [Note: partial offload]: these first
            g, master = by_bucket[b]
            self._device_step(master, grads[b], groups[g], coef, self.targets[b])
            self.weights.publish(b)
        order = [b for b in order if b not in self.on_device]
        if torch.is_tensor(coef) or coef != 1.0:
            torch._foreach_mul_([grads[b] for b in order], coef)
        states = {}
        with ExitStack() as resident:
            def step_chunk(b, lo, hi, grad, out):
                g, master = by_bucket[b]
                if lo == 0:  # a bucket's first chunk: swapped in (NVMe), its state created or advanced
                    resident.enter_context(self.residency.resident(master))
                    states[b] = self._begin_state(master, groups[g])
                self._kernel_step(master, states[b], grad, groups[g], out, lo, hi)
                if hi == master.numel():  # its last chunk: the bucket may leave memory again
                    states.pop(b)
                    resident.pop_all().close()
            self._pipeline.run(order, grads, self.targets, step_chunk, self.weights.publish)

    def _device_step(self, master, grad, group, coef, target) -> None:
        """A bucket kept on the accelerator: dsrun's fused Adam there, the coefficient inside the kernel."""
        from dsrun.kernels.fused_adam import fused_adam_flat
        if not master.numel():
            return
        state = self._begin_state(master, group)
        beta1, beta2 = group["betas"]
        out = None if target is None or target.data_ptr() == master.data_ptr() else target
        fused_adam_flat(master, grad, state["exp_avg"], state["exp_avg_sq"], out, lr=float(group["lr"]),
                        beta1=float(beta1), beta2=float(beta2), eps=group["eps"], weight_decay=group["weight_decay"],
                        step=state["step"], adamw_mode=bool(self._adamw(group)),
                        bias_correction=group.get("bias_correction", True), grad_scale=coef)

    def _adamw(self, group) -> bool:
        return group.get("adamw_mode", group.get("decoupled_weight_decay", isinstance(self.optimizer,
                                                                                      torch.optim.AdamW)))

    def _begin_state(self, master, group) -> dict:
        """The optimizer state of `master`, created on first use, its step count advanced for this step."""
        state = self.optimizer.state[master]
        if len(state) == 0:
            state["step"] = 0
            if self.kind == "adagrad":
                state["sum"] = torch.full_like(master, float(group["initial_accumulator_value"]))
            else:
                state["exp_avg"] = torch.zeros_like(master)
                state["exp_avg_sq"] = torch.zeros_like(master)
        state["step"] = int(state["step"]) + 1
        return state

    def _kernel_step(self, master, state, grad, group, out, lo: int = 0, hi: int = None) -> None:
        """The fused CPU kernel on elements [lo, hi) of `master` (all by default); `grad` and `out` hold
        just those elements."""
        from dsrun.kernels import cpu_ops
        hi = master.numel() if hi is None else hi
        if self.kind == "adagrad":
            cpu_ops.adagrad_step(master[lo:hi], grad, state["sum"][lo:hi], lr=float(group["lr"]), eps=group["eps"],
                                 weight_decay=group["weight_decay"], out=out)
            return
        beta1, beta2 = group["betas"]
        adamw = self._adamw(group)
        cpu_ops.adam_step(master[lo:hi], grad, state["exp_avg"][lo:hi], state["exp_avg_sq"][lo:hi],
                          lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                          weight_decay=group["weight_decay"], step=state["step"], adamw_mode=bool(adamw),
                          bias_correction=group.get("bias_correction", True), out=out)

    def cast_and_publish(self) -> None:
        """Host masters -> device working weights (cast), then publish every bucket."""
        for b in reversed(range(len(self.masters))):
            target = self.targets[b]
            if target is not None and target.data_ptr() != self.masters[b].data_ptr():
                target.copy_(self.masters[b], non_blocking=target.device.type != "cpu")
            self.weights.publish(b)


class _AlwaysResident:
    """Host masters and states that never leave host memory (CPU offload)."""

    @staticmethod
    def resident(master):
        return nullcontext()


_ALWAYS_RESIDENT = _AlwaysResident()

"""ZeroOptimizer: flat working weights, fp32 masters of the owned chunks, and the optimizer step.

One class serves ZeRO-0, 1 and 2 (the sharding policy decides ownership; see layout.py's
[Note: bucket-major ownership]). It

1. packs every trainable parameter into one flat working buffer in `param_dtype` (module parameters
   become views of it) after broadcasting rank 0's initial weights;
2. keeps fp32 master weights for the chunk of each bucket this rank owns. When working and master
   dtypes agree (fp32), the master *is* the owned view of the working buffer: no copy;
3. rewires the torch optimizer so each param group holds its buckets' master chunks (optimizer state
   therefore exists only for owned elements: 1/world of the whole when sharded);
4. at the boundary: global grad norm (sum of squares over owned chunks, all-reduced when sharded),
   overflow check, then the update and publication of the new weights, in one of two ways:
   - dsrun's FusedAdam: per bucket, one kernel applies the unscale-and-clip coefficient, the Adam
     update and the cast into the working buffer, and the bucket's all-gather is launched right away,
     so the gathers run while later buckets update ([Note: pipelined step]);
   - any other optimizer: one multiply of every gradient by the coefficient, `optimizer.step()`, a
     copy of the masters into the working buffer, then the all-gathers.

[Note: pipelined step] FusedAdam's per-bucket step keeps torch's state layout ('step', 'exp_avg',
'exp_avg_sq' per master), so checkpoints and `state_dict` do not depend on which path ran.

[Note: bucket size] Buckets are at most `OVERLAP_BUCKET_NUMEL` elements even when
`reduce_bucket_size`/`allgather_bucket_size` allow more (DeepSpeed's 5e8 default): 3 buckets for a
1B model leave a third of the gradients to reduce after backward ends, while ~64M-element buckets
(a transformer block or so) overlap all but the last and still move 256 MB per collective. The
configured sizes remain upper bounds, so they still bound the staging memory.
"""
from __future__ import annotations

import math
from contextlib import nullcontext as _nullcontext
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from .comm import Comm
from .copy_engine import CopyEngineGather, copy_engines_usable
from .layout import FlatLayout, build_layout
from .param_gather import ForwardGate
from .reducer import GradReducer

__all__ = ["ZeroOptimizer", "StepResult", "OVERLAP_BUCKET_NUMEL"]

OVERLAP_BUCKET_NUMEL = 1 << 26  # [Note: bucket size]


class StepResult:
    """`grad_norm` and `clip_coef` are floats, or 0-dim device tensors ([Note: sync-free step]).
    `overflow` is set when the overflow check ran on the device ([Note: device-side skip]): the step was
    launched as applied, and `overflow.read()` says later whether the device skipped it."""

    __slots__ = ("applied", "grad_norm", "clip_coef", "overflow")

    def __init__(self, applied: bool, grad_norm: float, clip_coef: float = 1.0, overflow=None):
        self.applied, self.grad_norm, self.clip_coef, self.overflow = applied, grad_norm, clip_coef, overflow


class DeviceFlag:
    """A 0-dim bool tensor read later without waiting for work queued after it: on CUDA it is copied
    to pinned memory right away and an event marks the copy, so `read()` waits for that event only
    (a plain `.item()` would wait for everything queued on the stream since, e.g. the next backward)."""

    def __init__(self, flag: torch.Tensor):
        self._event = None
        if flag.is_cuda:
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = flag

    def read(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return bool(self._host)


class ZeroOptimizer:
    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, sharding, precision,
                 comm_policy, comm: Comm, device: torch.device, dtype_of, accumulation_steps: int = 1):
        self.module, self.optimizer, self.comm = module, optimizer, comm
        self.param_dtype = dtype_of(precision.param_dtype)
        master_dtype = dtype_of(precision.master_dtype)
        names = {p: n for n, p in module.named_parameters()}
        groups, in_optimizer = [], set()
        for group in optimizer.param_groups:
            named = []
            for p in group["params"]:
                if p not in names:
                    raise ValueError("the optimizer holds a parameter that is not in the model; build it from "
                                     "model.parameters() (or a subset)")
                if p in in_optimizer:
                    raise ValueError(f"parameter {names[p]!r} appears in two optimizer param groups")
                in_optimizer.add(p)
                if p.requires_grad:
                    named.append((names[p], p))
            groups.append(named)
        self.layout: FlatLayout = build_layout(
            groups, bucket_numel=min(comm_policy.reduce_bucket_size, comm_policy.allgather_bucket_size,
                                     OVERLAP_BUCKET_NUMEL), world_size=comm.world_size, rank=comm.rank,
            sharded=sharding.optimizer_state)
        self.sharded = self.layout.sharded and comm.world_size > 1
        trainable = {s.param for s in self.layout.slots}
        self.frozen = [(n, p) for n, p in module.named_parameters() if p not in trainable]

        # 1-2: flat fp32 copy of the initial weights (rank 0's), masters, working buffer.
        full = torch.zeros(self.layout.numel, dtype=torch.float32, device=device)
        with torch.no_grad():
            for s in self.layout.slots:
                full[s.offset:s.offset + s.numel].copy_(s.param.detach().reshape(-1))
            if comm.world_size > 1:
                dist.broadcast(full, src=dist.get_global_rank(comm.group, 0) if comm.group else 0,
                               group=comm.group)
        self.aliased = master_dtype == self.param_dtype == torch.float32
        # [Note: copy-engine collectives] in copy_engine.py: the working buffer then lives in symmetric memory
        copy_engines = self.sharded and comm_policy.copy_engine_comm and copy_engines_usable(comm, device)
        self.gather_engine = (CopyEngineGather(self.layout.numel, self.param_dtype, device, comm)
                              if copy_engines else None)
        if self.gather_engine is not None:
            self.flat = self.gather_engine.buffer
            self.flat.copy_(full)
        else:
            self.flat = full if self.aliased else full.to(self.param_dtype)
        self.masters: List[torch.Tensor] = [
            self.flat[b.own_start:b.own_end] if self.aliased
            else full[b.own_start:b.own_end].to(master_dtype).clone() for b in self.layout.buckets]
        del full
        with torch.no_grad():
            for s in self.layout.slots:
                s.param.data = self.flat[s.offset:s.offset + s.numel].view(s.shape)
            for _, p in self.frozen:
                data = p.data.to(device, self.param_dtype if p.is_floating_point() else p.dtype)
                if comm.world_size > 1:
                    dist.broadcast(data, src=dist.get_global_rank(comm.group, 0) if comm.group else 0,
                                   group=comm.group)
                p.data = data

        self.reducer = GradReducer(self.layout, comm=comm, sharding=sharding, precision=precision,
                                   comm_policy=comm_policy, device=device, dtype_of=dtype_of,
                                   accumulation_steps=accumulation_steps, copy_engines=copy_engines)
        self._gathers: List = []
        self._side = None  # CUDA stream of the update under a forward gate (_fused_step)
        # [Note: param gather overlap] in param_gather.py
        self.gate = (ForwardGate(module, {s.param: s.bucket for s in self.layout.slots})
                     if self.sharded and comm_policy.overlap_param_gather else None)
        # 3: the optimizer sees master chunks only.
        for g, group in enumerate(optimizer.param_groups):
            group["params"] = [self.masters[b.index] for b in self.layout.group_buckets(g)]
        self._bucket_of_master = {id(m): b.index for b, m in zip(self.layout.buckets, self.masters)}
        optimizer.state.clear()
        self._attach_grads()

    # -- step ----------------------------------------------------------------------------------------

    def _attach_grads(self) -> None:
        for master, grad in zip(self.masters, self.reducer.grads):
            master.grad = grad

    def global_grad_norm_sq(self) -> torch.Tensor:
        """Sum of squares of the (still loss-scaled) gradients over all ranks' partitions, fp32."""
        parts = self.reducer.norm_parts  # [Note: norms during backward] in reducer.py
        grads = [g for g in self.reducer.grads if g.numel()]
        if parts is not None and len(parts) == len(self.reducer.grads):
            sq = torch.stack(parts).pow(2).sum()
        elif grads:
            sq = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
        else:
            sq = torch.zeros((), dtype=torch.float32, device=self.flat.device)
        if self.sharded:
            dist.all_reduce(sq, group=self.comm.group)
        return sq

    @property
    def skips_on_device(self) -> bool:
        """Whether an overflowing step can be skipped by the update kernels themselves
        ([Note: device-side skip]): dsrun's FusedAdam, whose flat step skips on a non-finite scale."""
        return self._fused_adam()

    def step(self, *, loss_scale: float, max_norm: float, check_overflow: bool,
             skip_on_device: bool = False) -> StepResult:
        """Unscale, clip, update and publish the new weights; skip (returning applied=False) on overflow.

        [Note: sync-free step] Without overflow checking (fp32; bf16 with `check_grad_overflow: false`) the
        norm and the clip coefficient stay on the device (as torch's clip_grad_norm_ does) and StepResult
        carries them as tensors: the host never waits for the GPU here, so it can queue the next forward
        while backward is still running. With a forward gate the all-gathers may still be running when
        this returns.

        [Note: device-side skip] With overflow checking (fp16; bf16 by default, as DeepSpeed) the host
        reads the norm to decide whether to skip, so it waits for backward to end before it queues the
        updates and cannot run ahead of the GPU. (On 4 H200 the B3 model was GPU-bound either way and its
        step time did not change: RESULTS.md B3, 2026-11-22; a host-bound loop gains.) With
        `skip_on_device` (the caller's choice: the engine asks for it when the loss scale cannot change,
        and `skips_on_device` must hold) the step stays sync-free: an overflow turns the coefficient into NaN, every update
        kernel then leaves its bucket as it was, and the all-gathers republish the unchanged weights. The
        host counted the step as applied; `StepResult.overflow` tells it later, and `undo_step()` takes
        the step counts back."""
        self.wait_params()
        self.reducer.materialize()
        unscale = self.reducer.grad_scale / loss_scale  # [Note: gradient scale] in reducer.py
        sq = self.global_grad_norm_sq()
        overflow = None
        if check_overflow and not skip_on_device:
            norm = math.sqrt(sq.item()) * unscale
            if not math.isfinite(norm):
                return StepResult(False, norm)
            ratio = (norm + 1e-6) / max_norm if max_norm > 0 else 0.0  # DeepSpeed's formula
            clip_coef = 1.0 / ratio if ratio > 1 else 1.0
            coef = unscale * clip_coef
        else:
            norm = sq.sqrt() * unscale
            clip_coef = ((max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm > 0
                         else torch.ones((), dtype=torch.float32, device=sq.device))
            coef = clip_coef * unscale
            if check_overflow:
                if not self.skips_on_device:
                    raise RuntimeError("skip_on_device needs dsrun's FusedAdam")
                finite = torch.isfinite(norm)
                coef = torch.where(finite, coef, torch.full_like(coef, math.nan))
                overflow = DeviceFlag(~finite)
        with torch.no_grad():
            if self._fused_adam():
                self._fused_step(coef)
            else:
                grads = self.reducer.grads
                if grads and (torch.is_tensor(coef) or coef != 1.0):
                    torch._foreach_mul_(grads, coef)
                self._attach_grads()
                self.optimizer.step()
                self._cast_and_gather()
            if self.gate is None:
                self.wait_gathers()
        return StepResult(True, norm, clip_coef, overflow)

    def undo_step(self) -> None:
        """Take back the step counts of a step the device skipped ([Note: device-side skip])."""
        for master in self.masters:
            state = self.optimizer.state.get(master)
            if state and "step" in state:
                state["step"] = int(state["step"]) - 1

    def _fused_adam(self) -> bool:
        from dsrun.kernels.fused_adam import FusedAdam  # imports no compiled code
        return type(self.optimizer) is FusedAdam

    def _fused_step(self, coef) -> None:
        """[Note: pipelined step] per bucket: unscale+clip+Adam+cast in one kernel, then its all-gather.

        Under a forward gate on CUDA the updates run on a side stream: the next forward starts at once and
        each layer waits (through its bucket's all-gather, launched after that bucket's update) only for
        its own weights, so the update of later buckets overlaps the first layers' compute.
        (Launching the later buckets lazily from the forward's pre-hooks, to take their host work off the
        step, measured no faster on 4 H200: RESULTS.md B3, 2026-11-22.)"""
        opt = self.optimizer
        by_bucket = {self._bucket_of_master[id(m)]: (g, m) for g, group in enumerate(opt.param_groups)
                     for m in group["params"]}
        side = None
        if self.gate is not None and self.flat.is_cuda:
            if self._side is None:
                self._side = torch.cuda.Stream(device=self.flat.device)
            side = self._side
            side.wait_stream(torch.cuda.current_stream(self.flat.device))
            if torch.is_tensor(coef):
                coef.record_stream(side)  # made on the main stream, read on the side one
        with torch.cuda.stream(side) if side is not None else _nullcontext():
            for b in sorted(by_bucket, reverse=True):  # forward order: the last bucket holds the first layers
                self._update_bucket(b, *by_bucket[b], coef)

    def _update_bucket(self, b: int, g: int, master: torch.Tensor, coef) -> None:
        state = self.optimizer.state[master]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(master)
            state["exp_avg_sq"] = torch.zeros_like(master)
        state["step"] = int(state["step"]) + 1
        bucket = self.layout.buckets[b]
        out = None if self.aliased else self.flat[bucket.own_start:bucket.own_end]
        if master.numel():
            self.optimizer.step_flat(master, self.reducer.grads[b], state["exp_avg"], state["exp_avg_sq"],
                                     state["step"], out=out, group=g, grad_scale=coef)
        self._gather(bucket)

    @torch.no_grad()
    def publish(self) -> None:
        """Masters -> working buffer (cast), then all-gather every bucket when sharded; waits."""
        self.wait_params()
        self._cast_and_gather()
        self.wait_gathers()
        if self.gather_engine is not None:
            self.gather_engine.fence()

    def _cast_and_gather(self) -> None:
        buckets = self.layout.buckets
        if not self.aliased:
            torch._foreach_copy_([self.flat[b.own_start:b.own_end] for b in buckets], self.masters)
        for b in reversed(buckets):
            self._gather(b)

    def _gather(self, b) -> None:
        if not self.sharded:
            return
        if self.gather_engine is not None:
            work = self.gather_engine.all_gather(b.start, b.end)
        else:
            work = self.comm.all_gather(self.flat[b.start:b.end], self.flat[b.own_start:b.own_end], async_op=True)
        if self.gate is not None:
            self.gate.add(b.index, work)
        else:
            self._gathers.append(work)

    def wait_gathers(self) -> None:
        gathers, self._gathers = self._gathers, []
        for w in gathers:
            w.wait()
        if self.gate is not None:
            self.gate.wait_all()

    def wait_params(self) -> None:
        """Block until every rank's updated weights are in the working buffer and the update itself has
        finished (stream order on GPU)."""
        self.wait_gathers()
        if self._side is not None:
            torch.cuda.current_stream(self.flat.device).wait_stream(self._side)

    # -- introspection for checkpoints and tests ----------------------------------------------------

    def owned_slices(self):
        """Yield (slot, lo, hi, master_view, per-element optimizer state views) for each trainable param."""
        for slot in self.layout.slots:
            bucket = self.layout.buckets[slot.bucket]
            lo, hi = bucket.owned_range(slot)
            master = self.masters[bucket.index]
            a = slot.offset + lo - bucket.own_start if hi > lo else 0
            state = self.optimizer.state.get(master, {})
            optim = {k: v[a:a + hi - lo] for k, v in state.items()
                     if torch.is_tensor(v) and v.dim() > 0 and v.shape == master.shape}
            yield slot, lo, hi, master[a:a + hi - lo], optim

    def optimizer_state_numel(self) -> int:
        """Elements of per-element optimizer state held by this rank."""
        return sum(v.numel() for st in self.optimizer.state.values() for v in st.values()
                   if torch.is_tensor(v) and v.dim() > 0)

    def ensure_optimizer_state(self) -> None:
        """Create optimizer state (before loading into it) with one no-op step: zero grads and lr 0."""
        if all(self.optimizer.state.get(m) for m in self.masters):
            return
        saved = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0 if not torch.is_tensor(g["lr"]) else torch.zeros_like(g["lr"])
        for m in self.masters:
            m.grad = torch.zeros_like(m)
        try:
            self.optimizer.step()
        finally:
            for g, lr in zip(self.optimizer.param_groups, saved):
                g["lr"] = lr
            self._attach_grads()

    def scalar_state(self) -> List[Dict]:
        """Per param group: hyperparameters (not `params`) and the group's scalar optimizer state."""
        out = []
        for g, group in enumerate(self.optimizer.param_groups):
            hyper = {k: v for k, v in group.items() if k != "params"}
            scalars = {}
            for m in group["params"]:
                for k, v in self.optimizer.state.get(m, {}).items():
                    if not (torch.is_tensor(v) and v.dim() > 0 and v.shape == m.shape):
                        scalars[k] = v.item() if torch.is_tensor(v) else v
                break
            out.append({"hyperparameters": hyper, "state": scalars})
        return out

    def load_scalar_state(self, groups: Sequence[Dict]) -> None:
        if len(groups) != len(self.optimizer.param_groups):
            raise ValueError(f"checkpoint has {len(groups)} optimizer param groups, the optimizer has "
                             f"{len(self.optimizer.param_groups)}")
        for group, saved in zip(self.optimizer.param_groups, groups):
            group.update({k: v for k, v in saved["hyperparameters"].items() if k != "params"})
            for m in group["params"]:
                state = self.optimizer.state.setdefault(m, {})
                for k, v in saved["state"].items():
                    if torch.is_tensor(state.get(k)):
                        state[k].fill_(v)
                    else:
                        state[k] = v

    def destroy(self) -> None:
        self.wait_params()
        if self.gate is not None:
            self.gate.remove()
            self.gate = None
        self.reducer.remove()
        for m in self.masters:
            m.grad = None
        for group in self.optimizer.param_groups:
            group["params"] = []
        self.optimizer.state.clear()
        self.masters, self.flat, self.gather_engine = [], None, None

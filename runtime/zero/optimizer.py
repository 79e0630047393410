"""ZeroOptimizer: fp32 masters of the owned chunks, the optimizer step, and the checkpoint view.

One class is the `ShardingStrategy` (strategy.py) of every ZeRO stage; the sharding policy decides
ownership (layout.py's [Note: bucket-major ownership]) and where working weights live (the weight store:
flat_weights.py for stages 0-2, unit_weights.py for ZeRO-3). It

1. keeps fp32 master weights for the chunk of each bucket this rank owns. When working and master
   dtypes agree (fp32), the master *is* the owned chunk of the working weights: no copy;
2. rewires the torch optimizer so each param group holds its buckets' master chunks (optimizer state
   therefore exists only for owned elements: 1/world of the whole when sharded);
3. at the boundary: global grad norm (sum of squares over owned chunks, all-reduced when sharded),
   overflow check, then the update and publication of the new weights by the bucket updater chosen
   once at construction (updater.py: dsrun's FusedAdam flat kernel, or any torch optimizer).

[Note: bucket size] Buckets are at most `OVERLAP_BUCKET_NUMEL` elements even when
`reduce_bucket_size`/`allgather_bucket_size` allow more (DeepSpeed's 5e8 default): 3 buckets for a
1B model leave a third of the gradients to reduce after backward ends, while ~64M-element buckets
(a transformer block or so) overlap all but the last and still move 256 MB per collective. The
configured sizes remain upper bounds, so they still bound the staging memory.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist

from ..shard_state import MASTER_KEY, ParamShard, ReadFn
from .comm import Comm
from .layout import FlatLayout
from .reducer import GradReducer
from .strategy import DeviceFlag, StepResult
from .updater import select_updater

__all__ = ["ZeroOptimizer", "StepResult", "OVERLAP_BUCKET_NUMEL", "optimizer_groups"]

OVERLAP_BUCKET_NUMEL = 1 << 26  # [Note: bucket size]


def optimizer_groups(module: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Per optimizer param group, its trainable (name, param) pairs; and the module's other parameters
    (frozen, or outside every group) as (name, param). Raises ValueError on a foreign or repeated param."""
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
    trainable = {p for named in groups for _, p in named}
    frozen = [(n, p) for n, p in module.named_parameters() if p not in trainable]
    return groups, frozen


class ZeroOptimizer:
    """The sharding strategy of ZeRO stages 0-3 (see the module doc)."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, layout: FlatLayout, weights,
                 reducer: GradReducer, comm: Comm, precision, dtype_of, frozen, offload_pin=None,
                 offload_ratio: float = 1.0, nvme=None):
        self.module, self.optimizer, self.comm = module, optimizer, comm
        self.layout, self.weights, self.reducer, self.frozen = layout, weights, reducer, frozen
        self.sharded = layout.sharded and comm.world_size > 1
        self.param_dtype = dtype_of(precision.param_dtype)
        self.aliased = dtype_of(precision.master_dtype) == self.param_dtype == torch.float32
        self.masters: List[torch.Tensor] = weights.make_masters(dtype_of(precision.master_dtype), self.aliased)
        offload = None
        self._host_grads = True  # masters and reduced gradients on one device: grads attach as .grad
        self.nvme = None  # NVMe offload (nvme.py): host masters and states in files between their steps
        if offload_pin is not None and nvme is not None:
            swapped_params = getattr(weights, "swapped", False)  # the NVMe masters are the shards: no target
            targets = [None] * len(self.masters) if swapped_params else self._offload_targets(separate=True)
            offload = {"targets": targets, "pin": offload_pin}
            self.nvme = offload["residency"] = nvme(optimizer, self.masters)
            self.masters, self.aliased, self._host_grads = self.nvme.masters, False, False
            if swapped_params:
                weights.adopt_swapped_masters(self.nvme)
        elif offload_pin is not None:  # optimizer offload (offload.py): masters on the host
            offload = {"targets": self._offload_targets(), "pin": offload_pin, "on_device": set()}
            if weights.device.type != "cpu":
                from .offload import device_buckets, host_masters, offload_kind
                kind = offload_kind(optimizer)
                # [Note: partial offload] (offload.py): with ratio < 1 some buckets keep device masters;
                # host masters from parameter offload stay where they are
                on_host = all(m.device.type == "cpu" for m in self.masters)
                keep = set() if on_host or kind != "adam" else device_buckets(layout, offload_ratio)
                offload["on_device"] = keep
                # the fused CPU kernels' step copies through its own pinned ring (host_pipeline.py): the
                # masters need no pinning (pinning tens of GB is slow and may fail)
                host = host_masters([m for b, m in enumerate(self.masters) if b not in keep and m.device.type != "cpu"],
                                    pin=offload_pin and kind == "torch")[::-1]
                self.masters = [m if b in keep or m.device.type == "cpu" else host.pop()
                                for b, m in enumerate(self.masters)]
                self.aliased, self._host_grads = False, False
        # the optimizer sees master chunks only
        for g, group in enumerate(optimizer.param_groups):
            group["params"] = [self.masters[b.index] for b in layout.group_buckets(g)]
        bucket_of_master = {id(m): b.index for b, m in zip(layout.buckets, self.masters)}
        optimizer.state.clear()
        self.updater = select_updater(optimizer, weights=weights, masters=self.masters, aliased=self.aliased,
                                      bucket_of_master=bucket_of_master, offload=offload)
        self._attach_grads()

    # -- the backward ------------------------------------------------------------------------------------

    def before_backward(self, boundary: bool) -> None:
        """Called before each backward: whether gradients get communicated at its end."""
        self.wait_params()
        self.weights.before_backward()
        self.reducer.begin_micro_step(boundary)
        if boundary and self.nvme is not None:  # the step's first read runs under this backward
            self.nvme.prefetch_first()

    def after_backward(self) -> None:
        """Flush incomplete buckets, wait for every reduction, release what backward gathered. Idempotent."""
        self.reducer.finish_backward()
        self.weights.after_backward()

    # -- step ----------------------------------------------------------------------------------------

    def _offload_targets(self, *, separate: bool = False) -> List:
        """Per bucket, where the host step's updated weights go on the device: the working chunk, else
        (ZeRO-3's master-is-the-shard) the device master; None when the master is the working chunk on
        a CPU device, unless the host masters are `separate` tensors (NVMe: they leave memory)."""
        targets = []
        for b, m in enumerate(self.masters):
            w = self.weights.owned(b)
            on_host = self.weights.device.type == "cpu" and not separate
            if w is None:
                target = None if on_host else m
            else:
                target = None if on_host and self.aliased else w
            if target is not None and not separate and target.device.type == "cpu" and target is m:
                target = None  # the host master is itself the shard ([Note: parameter offload] in unit_weights.py)
            targets.append(target)
        return targets

    def _attach_grads(self) -> None:
        if not self._host_grads:  # offloaded masters: the host updater copies the gradients itself
            for master in self.masters:
                master.grad = None
            return
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
            sq = torch.zeros((), dtype=torch.float32, device=self.weights.device)
        if self.sharded:
            dist.all_reduce(sq, group=self.comm.group)
        return sq

    @property
    def skips_on_device(self) -> bool:
        """Whether an overflowing step can be skipped by the update kernels themselves
        ([Note: device-side skip]): the flat-kernel updater, whose kernels skip on a non-finite scale."""
        return self.updater.skips_on_device

    def step(self, *, loss_scale: float, max_norm: float, check_overflow: bool,
             skip_on_device: bool = False) -> StepResult:
        """Unscale, clip, update and publish the new weights; skip (returning applied=False) on overflow.
        Clears the accumulated gradients either way.

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
        and `skips_on_device` must hold) the step stays sync-free: an overflow turns the coefficient into
        NaN, every update kernel then leaves its bucket as it was, and publishing republishes the unchanged
        weights. The host counted the step as applied; `StepResult.overflow` tells it later, and
        `undo_step()` takes the step counts back."""
        self.after_backward()  # no-op after engine.backward
        self.reducer.fold_stray()  # gradients of other backwards ([Note: stray gradients] in reducer.py)
        try:
            return self._step(loss_scale, max_norm, check_overflow, skip_on_device)
        finally:
            self.reducer.zero()
            if self.reducer.transient:  # the gradient chunks were dropped: masters must not keep them alive
                self._attach_grads()

    def _step(self, loss_scale, max_norm, check_overflow, skip_on_device) -> StepResult:
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
            self.updater.step(coef, self.reducer.grads)
            self._attach_grads()
            if not self.weights.overlaps_forward:
                self.weights.wait()
        return StepResult(True, norm, clip_coef, overflow)

    def undo_step(self) -> None:
        """Take back the step counts of a step the device skipped ([Note: device-side skip])."""
        for master in self.masters:
            state = self.optimizer.state.get(master)
            if state and "step" in state:
                state["step"] = int(state["step"]) - 1

    @torch.no_grad()
    def publish(self) -> None:
        """Masters -> working weights (cast), then publish every bucket; waits."""
        self.wait_params()
        self.updater.cast_and_publish()
        self.weights.wait()
        self.weights.fence()

    def wait_params(self) -> None:
        """Block until every rank's updated weights are in the working weights and the update itself has
        finished (stream order on GPU)."""
        self.weights.wait()
        self.updater.wait()

    # -- attributes tests and tools read ----------------------------------------------------------------

    @property
    def gate(self):
        return getattr(self.weights, "gate", None)

    @property
    def gather_engine(self):
        return getattr(self.weights, "gather_engine", None)

    def optimizer_state_numel(self) -> int:
        """Elements of per-element optimizer state held by this rank."""
        return sum(v.numel() for st in self.optimizer.state.values() for v in st.values()
                   if torch.is_tensor(v) and v.dim() > 0)

    # -- checkpoint view (runtime/shard_state.py) -------------------------------------------------------

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

    def checkpoint_shards(self) -> List[ParamShard]:
        """One `ParamShard` per `module.named_parameters()` entry (see runtime/shard_state.py)."""
        if self.nvme is not None:  # the views below must be readable until the next step
            self.nvme.swap_in_all()
        by_param = {}
        for slot, lo, hi, master, optim in self.owned_slices():
            by_param[slot.param] = ParamShard(slot.name, slot.shape, self.param_dtype, lo, hi, master, optim)
        shards = []
        for name, p in self.module.named_parameters():
            shard = by_param.get(p) or self.weights.frozen_shard(name, p)
            if shard is None:
                shard = ParamShard(name, tuple(p.shape), p.dtype, 0, p.numel(), p.detach().float().reshape(-1),
                                   {}, frozen=True)
            shards.append(shard)
        return shards

    def load_checkpoint_shards(self, read: ReadFn, *, load_optimizer_states: bool = True) -> None:
        """Fill this rank's master (and optimizer) slices from `read(name, key, start, end)`, then
        publish the working weights on every rank. Collective."""
        if self.nvme is not None:  # creating and loading the state needs it in memory
            self.nvme.swap_in_all()
        if load_optimizer_states:
            self.ensure_optimizer_state()
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for shard in self.checkpoint_shards():
                if shard.end > shard.start:
                    shard.master.copy_(read(shard.name, MASTER_KEY, shard.start, shard.end).reshape(-1))
                if shard.frozen:
                    self.weights.load_frozen(params[shard.name], shard)
                    continue
                if load_optimizer_states and shard.end > shard.start:
                    for key, view in shard.optim.items():
                        view.copy_(read(shard.name, key, shard.start, shard.end).reshape(-1))
            self.publish()

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

    def full_state_dict(self, *, to_cpu: bool = True) -> Dict[str, torch.Tensor]:
        """The module's state dict with every parameter whole, in its working dtype (collective)."""
        state = self.weights.full_state_dict(self.module)
        return {k: v.detach().to("cpu", copy=True) if to_cpu else v for k, v in state.items()}

    def destroy(self) -> None:
        self.wait_params()
        if self.nvme is not None:  # waits for its I/O, removes its files
            nvme, self.nvme = self.nvme, None
            nvme.close()
        self.weights.destroy()
        self.reducer.remove()
        for m in self.masters:
            m.grad = None
        for group in self.optimizer.param_groups:
            group["params"] = []
        self.optimizer.state.clear()
        self.masters = []

"""StageOptimizer: the gradients and the optimizer step of one pipeline stage.

What the pipeline's step instructions do with gradients (engine.py runs them at the end of a batch):

    RT  reduce_tied()     sum each tied weight's gradient over the stages holding it (module.py's tie groups)
    RG  reduce()          mean the gradients over the data-parallel group (one flat all-reduce)
    OPT step(max_norm)    global norm over every stage, clip, optimizer step, publish the new weights

[Note: pipeline global norm] The gradient norm for clipping counts every parameter of the whole model
once: each stage sums the squares of its gradients (leaving out its copies of tied weights that a lower
stage also holds), and the sums are all-reduced over the pipe group. After RG the gradients are equal on
every data-parallel rank, so the pipe group (one rank per stage) is enough. DeepSpeed clips by each
stage's own norm under some configurations (reference/deepspeed-runtime.md section 7).

Precision: with fp32 weights the optimizer updates the module's parameters and gradients accumulate in
`.grad`. With bf16 or fp16 weights each trainable parameter's gradient is added, in fp32, to an fp32
buffer as soon as autograd has it (a post-accumulate-grad hook), so micro-batches accumulate in fp32
(DeepSpeed accumulates in bf16 unless told otherwise), and the optimizer updates fp32 masters that are cast
back. fp16 gradients carry the loss scale until `step` divides it out ([Note: pipeline fp16] in engine.py).

ZeRO-1 (`sharding.optimizer_state`): each trainable parameter belongs to one data-parallel rank (greedy,
balanced by size, the same on every rank). Only the owner keeps optimizer state and an fp32 master for it
and runs its update; afterwards each rank broadcasts the weights it owns over the data-parallel group.
Gradients are all-reduced whole (not reduce-scattered): simple, and the same bytes per rank as stage 0.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dsrun.kernels.accumulate import accumulate_, fp32_copy
from .comm import PipeComm

__all__ = ["StageOptimizer", "assign_owners"]


def assign_owners(numels: List[int], world: int) -> List[int]:
    """For each parameter (by size, in order), the data-parallel rank owning it: largest first, each to
    the least loaded rank (ties to the lower rank). Pure; the same on every rank."""
    load = [0] * world
    owners = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += numels[i]
    return owners


class StageOptimizer:
    """See the module docstring. `module` is the stage's PipelineModule on its device; `optimizer` a torch
    optimizer over (some of) its parameters, rewired here to the masters this rank owns."""

    def __init__(self, module, optimizer: torch.optim.Optimizer, *, param_dtype: torch.dtype, grid,
                 shard_optimizer_state: bool, comm: Optional[PipeComm] = None):
        self.module, self.optimizer, self.grid = module, optimizer, grid
        self.comm = comm or PipeComm()
        self.names = {p: n for n, p in module.named_parameters()}
        in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
        for p in in_optimizer:
            if p not in self.names:
                raise ValueError("the optimizer holds a parameter that is not in this pipeline stage; build it "
                                 "from model.parameters()")
        self.params = [p for p in module.parameters() if p.requires_grad and p in set(in_optimizer)]
        self.mixed = param_dtype != torch.float32
        with torch.no_grad():
            for p in module.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(param_dtype)
        self.dp_group, self.dp_world = grid.get_data_parallel_group(), grid.get_data_parallel_world_size()
        self.dp_rank, self.dp_ranks = grid.get_data_parallel_rank(), grid.dp_group
        world = self.dp_world if shard_optimizer_state else 1
        self.owner = dict(zip(self.params, assign_owners([p.numel() for p in self.params], world))) \
            if shard_optimizer_state else {p: self.dp_rank for p in self.params}
        self.sharded = shard_optimizer_state and self.dp_world > 1
        self.owned = [p for p in self.params if self.owner[p] == self.dp_rank]
        self._grads: Dict[torch.nn.Parameter, torch.Tensor] = {}
        self._hooks = []
        if self.mixed:
            self.masters = {p: p.detach().float().clone() for p in self.owned}
            for p in self.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._accumulate))
        else:
            self.masters = {p: p for p in self.owned}
        for group in optimizer.param_groups:
            group["params"] = [self.masters[p] for p in group["params"] if p in self.masters]
        optimizer.state.clear()
        self.grad_norm: Optional[float] = None

    # -- gradients -----------------------------------------------------------------------------------

    def _accumulate(self, p: torch.nn.Parameter) -> None:
        """bf16: add the new gradient into the fp32 buffer and drop the bf16 one (one-pass kernels on a
        GPU: kernels/accumulate.py)."""
        buf = self._grads.get(p)
        if buf is None:
            self._grads[p] = fp32_copy(p.grad)
        else:
            accumulate_(buf, p.grad)
        p.grad = None

    def grad_of(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """The accumulated (fp32 when mixed) gradient of a stage parameter, or None."""
        return self._grads.get(p) if self.mixed else p.grad

    def _all_grads(self) -> List[torch.Tensor]:
        """Every trainable parameter's gradient, zeros where backward gave none (so every data-parallel
        rank reduces the same tensors)."""
        out = []
        for p in self.params:
            g = self.grad_of(p)
            if g is None:
                g = torch.zeros_like(p, dtype=torch.float32 if self.mixed else p.dtype)
                if self.mixed:
                    self._grads[p] = g
                else:
                    p.grad = g
            out.append(g)
        return out

    def reduce_tied(self) -> None:
        self.module.allreduce_tied_weight_gradients(grad_of=self.grad_of, comm=self.comm)

    def reduce(self) -> None:
        """Mean of the gradients over the data-parallel group."""
        grads = self._all_grads()
        if self.dp_world == 1 or not grads:
            return
        flat = _flatten_dense_tensors(grads)
        self.comm.all_reduce(flat, group=self.dp_group)
        flat.div_(self.dp_world)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    # -- step ----------------------------------------------------------------------------------------

    def global_norm(self) -> torch.Tensor:
        """[Note: pipeline global norm]."""
        grads = [g for p, g in zip(self.params, self._all_grads()) if not self.module.is_tied_replica(p)]
        device = self.params[0].device if self.params else torch.device("cpu")
        sq = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum() if grads else \
            torch.zeros((), device=device)
        if self.grid.get_pipe_parallel_world_size() > 1:
            self.comm.all_reduce(sq, group=self.grid.get_pipe_parallel_group())
        return sq.sqrt()

    @torch.no_grad()
    def step(self, max_norm: float, *, loss_scale: float = 1.0, check_overflow: bool = False) -> bool:
        """Unscale (gradients carry `loss_scale`, fp16), clip by the global norm (DeepSpeed's coefficient
        max_norm / (norm + 1e-6) when above 1), update, publish, clear the gradients. With `check_overflow`
        a non-finite global norm skips the update (every rank sees the same norm). `grad_norm` is the
        unscaled norm before clipping. Returns whether the update was applied."""
        norm = self.global_norm() / loss_scale
        grads = self._all_grads()
        if check_overflow and not math.isfinite(norm.item()):  # the host waits for the norm only here
            self.grad_norm = norm.item()
            self._clear_grads()
            return False
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm > 0 else None
        if loss_scale != 1.0:
            coef = coef / loss_scale if coef is not None else 1.0 / loss_scale
        if coef is not None:
            torch._foreach_mul_(grads, coef)
        for p in self.owned:
            self.masters[p].grad = self.grad_of(p)
        self.optimizer.step()
        for p in self.owned:
            self.masters[p].grad = None
            if self.mixed:
                p.data.copy_(self.masters[p])
        if self.sharded:
            self._publish()
        self._clear_grads()
        self.grad_norm = norm.item()
        return True

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None
        self._grads.clear()

    def _publish(self) -> None:
        """Each data-parallel rank broadcasts the weights it owns (one flat message per owner)."""
        for r, src in enumerate(self.dp_ranks):
            tensors = [p.data for p in self.params if self.owner[p] == r]
            if not tensors:
                continue
            flat = _flatten_dense_tensors(tensors)
            self.comm.broadcast(flat, src=src, group=self.dp_group)
            if r != self.dp_rank:
                for t, new in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                    t.copy_(new)

    # -- checkpoint view (checkpoint.py) ---------------------------------------------------------------

    def state_by_name(self) -> Dict[str, dict]:
        """For each parameter this rank owns and counts (not a tied replica): its fp32 master and its
        optimizer state, on the CPU, keyed by the parameter's name in the PipelineModule."""
        out = {}
        for p in self.owned:
            if self.module.is_tied_replica(p):
                continue
            m = self.masters[p]
            state = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                     for k, v in self.optimizer.state.get(m, {}).items()}
            out[self.names[p]] = {"master": m.detach().float().cpu().clone(), "state": state}
        return out

    def hyperparameters(self) -> List[dict]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    @torch.no_grad()
    def load_state_by_name(self, saved: Dict[str, dict], groups: Optional[List[dict]], *,
                           load_optimizer_states: bool) -> None:
        """Masters from the layer weights (already loaded into the module), then the saved fp32 masters and
        optimizer state of the parameters this rank owns, where the checkpoint has them."""
        for p in self.owned:
            entry = saved.get(self.names[p]) if load_optimizer_states else None
            m = self.masters[p]
            if self.mixed:
                m.copy_(p.float())
            if entry is None:
                continue
            m.copy_(entry["master"].to(m.device))
            if self.mixed:
                p.copy_(m)
            self.optimizer.state[m] = {k: (v.to(m.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                                       for k, v in entry["state"].items()}
        if load_optimizer_states and groups is not None and len(groups) == len(self.optimizer.param_groups):
            for group, hyper in zip(self.optimizer.param_groups, groups):
                group.update(hyper)

    def destroy(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._grads.clear()

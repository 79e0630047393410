"""`checkpoint(function, *args)`: run `function` without keeping its activations and recompute it in
backward, under the RNG states of the forward (rng.py).

Two forms, the same results:
- reentrant (DeepSpeed's default, `use_reentrant=True`): an autograd Function. Only the tensor inputs are
  saved; with `cpu_checkpointing` they are saved as host copies (on a GPU pinned and copied out and back
  on a copy stream, the next one prefetched: host.py), moved back to their device for the recompute; with `partition_activations` and a model-parallel world > 1 each rank saves only its
  1/mp slice (all-gathered over the model-parallel group for the recompute).
- non-reentrant (`use_reentrant=False`, or `non_reentrant_checkpoint`): torch.utils.checkpoint with
  use_reentrant=False, plus the model-parallel tracker's states. It keeps the inputs as they are:
  `cpu_checkpointing` and `partition_activations` apply to the reentrant form only.

Arguments and outputs may mix tensors and other values; non-tensor outputs come back unchanged and get
no gradient. Unlike torch's reentrant checkpoint, parameters inside `function` get gradients even when
no tensor input requires grad (a dummy input requiring grad keeps the node in the graph).
`profile` appends (kind, seconds) for each forward and recompute+backward to `PROFILE`; `synchronize`
synchronises the CUDA device around each checkpoint (no-op without CUDA).
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist

from .host import HostCopy
from .rng import capture_rng_states, rng_states_of
from .settings import SETTINGS

__all__ = ["checkpoint", "non_reentrant_checkpoint", "PROFILE"]

# profile=True: (kind, seconds) per checkpoint forward and recompute-backward, newest last.
PROFILE: List[tuple] = []


def _sync() -> None:
    if SETTINGS.synchronize and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class _Saved:
    """How one tensor input is kept until backward: as is, as a host copy, or as this rank's slice.
    `to_save()` is what the autograd Function saves for backward (the only reference kept: an attribute
    of the node would keep every checkpoint's input alive until the whole graph is freed, not only until
    its own backward); `restore(saved)` gives the input back on its device."""

    def __init__(self, tensor: torch.Tensor):
        self.shape, self.device, self.requires_grad = tensor.shape, tensor.device, tensor.requires_grad
        data = tensor.detach()
        self.partitioned = SETTINGS.partitions()
        if self.partitioned:
            data = _my_slice(data, SETTINGS.mpu)
        self.host: Optional[HostCopy] = None
        if SETTINGS.cpu_checkpointing and data.device.type == "cuda":
            self.host = HostCopy(data)  # asynchronous, pinned ([Note: host checkpoints] in host.py)
            data = self.host.host
        elif SETTINGS.cpu_checkpointing and data.device.type != "cpu":
            data = data.to("cpu")
        elif self.partitioned:
            data = data.clone()  # the slice is a view: keep only its own storage alive
        self._data: Optional[torch.Tensor] = data

    def to_save(self) -> torch.Tensor:
        data, self._data = self._data, None
        return data

    def restore(self, saved: torch.Tensor) -> torch.Tensor:
        data = self.host.restore() if self.host is not None else saved.to(self.device)
        self.host = None
        if self.partitioned:
            data = _gather(data, SETTINGS.mpu, self.shape)
        return data.detach().requires_grad_(self.requires_grad)


def _my_slice(data: torch.Tensor, mpu) -> torch.Tensor:
    world, rank = mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()
    flat = data.reshape(-1)
    size = -(-flat.numel() // world)  # ceil: the last slice is zero-padded
    if size * world != flat.numel():
        flat = torch.cat([flat, flat.new_zeros(size * world - flat.numel())])
    return flat.narrow(0, rank * size, size)


def _gather(part: torch.Tensor, mpu, shape) -> torch.Tensor:
    world = mpu.get_model_parallel_world_size()
    parts = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(parts, part.contiguous(), group=mpu.get_model_parallel_group())
    numel = 1
    for n in shape:
        numel *= n
    return torch.cat(parts)[:numel].view(shape)


class _ReentrantCheckpoint(torch.autograd.Function):

    @staticmethod
    def forward(ctx, run_function, _dummy, *args):
        ctx.run_function = run_function
        ctx.rng = capture_rng_states()
        ctx.tensor_slots = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        ctx.plain_args = [None if torch.is_tensor(a) else a for a in args]
        ctx.saved = [_Saved(args[i]) for i in ctx.tensor_slots]
        ctx.save_for_backward(*[s.to_save() for s in ctx.saved])
        with torch.no_grad():
            outputs = run_function(*args)
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        ctx.single = not isinstance(outputs, tuple)
        ctx.mark_non_differentiable(*[o for o in outs if torch.is_tensor(o) and not o.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("dsrun.checkpointing.checkpoint (reentrant) does not work with "
                               "torch.autograd.grad(); use backward(), or use_reentrant=False")
        start = time.perf_counter() if SETTINGS.profile else 0.0
        args = list(ctx.plain_args)
        inputs = [s.restore(stored) for s, stored in zip(ctx.saved, ctx.saved_tensors)]
        for slot, tensor in zip(ctx.tensor_slots, inputs):
            args[slot] = tensor
        with rng_states_of(ctx.rng), torch.enable_grad():
            outputs = ctx.run_function(*args)
        outs = (outputs,) if ctx.single else outputs
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = [None] * len(args)
        for slot, tensor in zip(ctx.tensor_slots, inputs):
            input_grads[slot] = tensor.grad if tensor.requires_grad else None
        if SETTINGS.profile:
            PROFILE.append(("backward", time.perf_counter() - start))
        return (None, None, *input_grads)


def _run_non_reentrant(function: Callable, args: tuple):
    forward_rng = capture_rng_states()
    calls = [0]

    def replay(*inner):
        # The first call is the forward; later ones are recomputes and must see the forward's tracker
        # states (torch's own preserve_rng_state covers the CPU and CUDA generators).
        calls[0] += 1
        if calls[0] == 1:
            return function(*inner)
        with rng_states_of(forward_rng):
            return function(*inner)

    return torch.utils.checkpoint.checkpoint(replay, *args, use_reentrant=False, preserve_rng_state=True)


def checkpoint(function: Callable, *args: Any, use_reentrant: Optional[bool] = None, **kwargs: Any):
    """Run `function(*args, **kwargs)` with its activations recomputed in backward (module docstring).

    `use_reentrant` None means True, DeepSpeed's default. Keyword arguments are passed through as
    constants: a tensor given by keyword gets no gradient in the reentrant form (pass it positionally).
    Returns what `function` returns."""
    reentrant = True if use_reentrant is None else use_reentrant
    if kwargs:
        function = functools.partial(function, **kwargs)
    _sync()
    start = time.perf_counter() if SETTINGS.profile else 0.0
    if reentrant:
        # The dummy tensor requiring grad makes autograd call backward even if no input requires grad,
        # so parameters inside still get gradients (as DeepSpeed's non-reentrant variant promises).
        outputs = _ReentrantCheckpoint.apply(function, _DUMMY, *args)
    else:
        outputs = _run_non_reentrant(function, args)
    if SETTINGS.profile:
        PROFILE.append(("forward", time.perf_counter() - start))
    _sync()
    return outputs


_DUMMY = torch.empty(0, requires_grad=True)


def non_reentrant_checkpoint(function: Callable, *args: Any):
    """DeepSpeed's `non_reentrant_checkpoint`: `checkpoint(function, *args, use_reentrant=False)`."""
    return checkpoint(function, *args, use_reentrant=False)

"""GradReducer: gradients from autograd hooks into reduced fp32 buffers the optimizer reads.

Every trainable parameter gets a post-accumulate-grad hook that moves `param.grad` into flat storage
and frees it, so `.grad` of module parameters stays None. Three modes, chosen from the sharding
policy and world size once, at construction:

- `replicated` (ZeRO-0, or one rank): grads accumulate in a full flat buffer (`grad_accum_dtype`);
  at the accumulation boundary each bucket is all-reduced as soon as its last gradient arrives
  (overlapping the rest of backward). Non-boundary micro-steps communicate nothing.
- `shard_at_boundary` (ZeRO-1): same full accumulation buffer, but at the boundary each bucket is
  reduce-scattered into this rank's chunk (the optimizer only needs its own partition).
- `shard_every_step` (ZeRO-2, and ZeRO-1 without gradient accumulation, where it sends the same bytes
  with no full buffer): no full buffer; each micro-step, a bucket's gradients are copied into a
  staging buffer in the wire dtype (the reduce dtype, or the gradients' own 16-bit dtype: [Note: 16-bit
  wire, fp32 sums]) and sent as soon as the bucket is complete; the
  owned chunk lands in the fp32 partition buffer (written directly on the first micro-step after a
  step, added on later ones). With GAS > 1 this sends GAS times the bytes of ZeRO-1 (as DeepSpeed's
  ZeRO-2) but never holds more than `STAGING_BUFFERS` buckets of full gradients.

[Note: transient gradient storage] With `transient=True` (ZeRO-3: parameters sharded, so gradients arrive
unit by unit and the peak is at the start of backward, when activations are largest) `shard_every_step`
holds no gradient memory between steps: each bucket's fp32 chunk (`grads[b]`) is allocated when its
first reduction of the step is launched (written, not added) and dropped at `zero()`, and each staging
buffer is the size of its own bucket and dropped when its reduction has finished (the caching allocator
recycles both). Without it, the partition and up to `STAGING_BUFFERS` buffers of the largest bucket live
for the whole run, which costs nothing extra at stages 1-2, whose full working weights dominate anyway.
On the B3 model (1.26B, 2 ranks) it takes 2.35 GiB of fp32 partition and ~1 GiB of staging off the peak.

[Note: bucket launch order] Buckets are launched strictly in index order (a bucket that completes
early waits for the ones before it); leftovers are flushed in index order at the end of backward.
Ranks whose graphs differ (an unused parameter on one rank only) therefore still issue identical
collective sequences.

[Note: 16-bit wire, fp32 sums] In `shard_every_step` with 16-bit working weights and fp32 reduction
(bf16's default), the gradients autograd produces are 16-bit already: casting them to fp32 before
the wire adds no information and doubles the bytes. Such buckets travel in their own dtype through
one `all_to_all` (rank r receives every rank's r-th chunk) and the owner sums the world's chunks in
fp32 (`sum(dim=0, dtype=float32)` straight into the partition). The sums are fp32 as the policy asks
(only their order differs from a ring reduce-scatter), the wire carries half the bytes, and the
staging copy is a plain copy instead of a cast. On one node the all_to_all is done by copy engines
rather than an NCCL kernel ([Note: copy-engine collectives] in copy_engine.py).

[Note: norms during backward] At the boundary micro-step of the 16-bit-wire path each bucket's final
gradient norm is taken right after its sum, while backward still runs, so the optimizer step only
combines `norm_parts` (one per bucket) instead of reading every gradient again after backward (~0.4 ms
of the B3 model's step on 4 H200). Any other path, or a step without that micro-step, reads them all.

[Note: gradient scale] Collectives *sum*. The mean's 1/world (and DeepSpeed's
`gradient_predivide_factor`) is not a separate pass over the gradients: `grad_scale` tells the
optimizer what to multiply the reduced gradients by, and it folds that into the unscale-and-clip
coefficient it applies anyway. Gradients are pre-multiplied before communicating only when asked
(`prescale_gradients`) or when the wire dtype is fp16, where a sum over ranks could overflow.
`contiguous_gradients` is always on (gradients are always copied into flat buckets);
`overlap_comm` false waits on each collective right after launching it.

[Note: stray gradients] A gradient that reaches this engine's parameters outside its own backward (a
GAN's generator loss flowing through the discriminator, a plain `loss.backward()`) is left in
`param.grad`, where PyTorch accumulates further ones, as it does for a plain module and DeepSpeed does at
stage 0. What happens to it next is PyTorch's: `zero_grad()` of the module or the engine drops it; this
engine's next backward finds it under its own gradient (the hook sees their sum) and reduces it with that
backward; a boundary `step()` reached first reduces what is left (`fold_stray`) before the optimizer reads
the gradients, as the optimizer of a plain module would read `.grad`. The fold communicates only when
strays exist, which data-parallel ranks running the same code agree on. ZeRO-3 refuses them: its weights
are partitioned outside the engine's own forward and backward. (DeepSpeed's ZeRO-1/2 hooks move such a
gradient into their reduce buckets at once, out of reach of the module's `zero_grad()`, so there a GAN's
discriminator step also applies the generator loss's gradient; dsrun keeps PyTorch's result at every
stage, which tests/runtime/test_two_engines.py checks.)
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Deque, List, Optional

import torch

from .comm import Comm
from .copy_engine import CopyEngineAllToAll
from .layout import FlatLayout

__all__ = ["GradReducer"]

REPLICATED, SHARD_AT_BOUNDARY, SHARD_EVERY_STEP = "replicated", "shard_at_boundary", "shard_every_step"
STAGING_BUFFERS = 4  # bucket-sized reduce buffers in flight at once (shard_every_step, overlap_comm)


class GradReducer:
    """Owns gradient storage and hooks. `grads[b]` is bucket b's reduced gradient chunk (fp32 view)."""

    def __init__(self, layout: FlatLayout, *, comm: Comm, sharding, precision, comm_policy, device,
                 dtype_of: Callable[[str], torch.dtype], accumulation_steps: int = 1, copy_engines: bool = False,
                 transient: bool = False):
        self.layout, self.comm = layout, comm
        self.params_sharded = bool(sharding.parameters)  # ZeRO-3: [Note: stray gradients]
        sharded = layout.sharded and comm.world_size > 1
        self.mode = (SHARD_EVERY_STEP if sharded and (sharding.gradients or accumulation_steps == 1) else
                     SHARD_AT_BOUNDARY if sharded else REPLICATED)
        self.accum_dtype = dtype_of(precision.grad_accum_dtype)
        self.reduce_dtype = dtype_of(precision.reduce_dtype)
        self.overlap = bool(comm_policy.overlap_comm)
        world = comm.world_size
        # [Note: gradient scale]
        if comm_policy.prescale_gradients:
            self.pre_factor = 1.0 / comm_policy.gradient_predivide_factor
        elif self.reduce_dtype == torch.float16 and world > 1:
            self.pre_factor = 1.0 / world
        else:
            self.pre_factor = 1.0
        mean = comm_policy.allreduce_op == "mean"
        self.grad_scale = 1.0 / ((world if mean else 1) * self.pre_factor)
        # [Note: 16-bit wire, fp32 sums]
        grad_dtype = dtype_of(precision.param_dtype)
        self.sum_locally = (self.mode == SHARD_EVERY_STEP and world > 1 and grad_dtype != torch.float32
                            and self.reduce_dtype == torch.float32 and self.pre_factor == 1.0)
        self.wire_dtype = grad_dtype if self.sum_locally else self.reduce_dtype
        self.device = device
        self._max_bucket = max((b.numel for b in layout.buckets), default=0)
        # [Note: copy-engine collectives] in copy_engine.py
        self.a2a_engine = (CopyEngineAllToAll(self._max_bucket, STAGING_BUFFERS, self.wire_dtype, device, comm)
                           if copy_engines and self.sum_locally else None)
        nb = len(layout.buckets)
        # [Note: transient gradient storage]
        self.transient = transient and self.mode == SHARD_EVERY_STEP
        if self.mode == REPLICATED:
            self.accum = torch.zeros(layout.numel, dtype=self.accum_dtype, device=device)
            self.part = None
            self.grads = [self.accum[b.start:b.end] for b in layout.buckets]
        else:
            self.accum = (torch.zeros(layout.numel, dtype=self.accum_dtype, device=device)
                          if self.mode == SHARD_AT_BOUNDARY else None)
            self.part = (None if self.transient else
                         torch.zeros(layout.own_numel, dtype=self.accum_dtype, device=device))
            self.grads, pos = [], 0
            for b in layout.buckets:
                self.grads.append(None if self.transient else self.part[pos:pos + b.own_numel])
                pos += b.own_numel
        self._seen = [False] * len(layout.slots)
        self._arrived = [0] * nb
        self._ready = [False] * nb
        self._launched = [False] * nb
        self._next = 0
        self._communicate = False
        self._in_backward = False  # between begin_micro_step and finish_backward: this engine's own backward
        self._fresh = True  # the partition holds nothing since the last zero(): overwrite, do not add
        self._reduced = False  # `accum` holds sums over ranks already ([Note: several backwards per step])
        self._carried: Optional[torch.Tensor] = None
        self.norm_parts: Optional[List[torch.Tensor]] = None  # [Note: norms during backward]
        self._overwrite = False
        self._pending: Deque[tuple] = deque()  # (work, finalize callable or None), oldest first
        self._staging = {}  # bucket index -> (full staging buffer, bucket-sized view) (SHARD_EVERY_STEP)
        self._free: List[torch.Tensor] = []
        self._num_staging = 0
        self._hooks = [s.param.register_post_accumulate_grad_hook(self._make_hook(s)) for s in layout.slots]
        # called with a bucket's index once every gradient of the bucket arrived in this backward (ZeRO-3
        # releases gathered weights then: unit_weights.py)
        self.on_bucket_ready: Optional[Callable[[int], None]] = None

    # -- micro-step lifecycle ------------------------------------------------------------------------

    def begin_micro_step(self, boundary: bool) -> None:
        """Called before each backward: whether gradients get communicated at its end.

        [Note: several backwards per step] A script may call `engine.backward()` more than once before one
        `step()` (a GAN's two losses), each at the boundary. The replicated buffer is all-reduced in place,
        so reducing it again would count the earlier gradients world-size times over: its reduced contents
        are set aside for this backward, which reduces only its own gradients, and added back after."""
        self._communicate = boundary or self.mode == SHARD_EVERY_STEP
        if self._communicate and self.mode == REPLICATED:
            if self._reduced:
                self._carried = self.accum.clone()
                self.accum.zero_()
            self._reduced = True
        # [Note: norms during backward]
        self.norm_parts = [] if boundary and self.sum_locally else None
        self._overwrite, self._fresh = self._fresh, False
        nb = len(self.layout.buckets)
        self._seen = [False] * len(self.layout.slots)
        self._arrived, self._ready, self._launched = [0] * nb, [False] * nb, [False] * nb
        self._next = 0
        self._in_backward = True

    def finish_backward(self) -> None:
        """Flush incomplete buckets (in order) and wait for every collective of this micro-step."""
        if self._communicate:
            for b in range(self._next, len(self.layout.buckets)):
                self._ready[b] = True
            self._launch_ready()
        self.wait_all()
        self._communicate = False
        self._in_backward = False
        if self._carried is not None:  # [Note: several backwards per step]
            self.accum.add_(self._carried)
            self._carried = None

    def wait_all(self) -> None:
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        work, finalize = self._pending.popleft()
        work.wait()
        if finalize is not None:
            finalize()

    def zero(self) -> None:
        """Clear accumulated gradients after an optimizer step (or a skipped one). The partition of
        `shard_every_step` is overwritten by the next micro-step instead of being cleared here."""
        if self.accum is not None:
            self.accum.zero_()
        self._reduced = False
        if self.mode == SHARD_EVERY_STEP:
            self._fresh = True
        if self.transient:
            self.grads = [None] * len(self.grads)
        self.norm_parts = None

    def materialize(self) -> None:
        """Make `grads` hold zeros if no micro-step ran since `zero()` (a step without backward)."""
        if self.transient:
            for b, bucket in enumerate(self.layout.buckets):
                if self.grads[b] is None:
                    self.grads[b] = torch.zeros(bucket.own_numel, dtype=self.accum_dtype, device=self.device)
            self._fresh = False
        elif self._fresh and self.part is not None:
            self.part.zero_()
            self._fresh = False

    def remove(self) -> None:
        """Remove hooks and free every buffer (Engine.destroy)."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._pending, self._staging, self._free = [], deque(), {}, []
        self.accum = self.part = self.a2a_engine = None
        self.grads = []

    # -- hooks ---------------------------------------------------------------------------------------

    def _make_hook(self, slot):
        def hook(param):
            if param.grad is None:
                return
            if not self._in_backward:  # [Note: stray gradients]: stays in param.grad
                if self.params_sharded:
                    raise RuntimeError(
                        f"gradient of {slot.name!r} arrived outside this engine's backward: another engine's "
                        "backward() (or a direct loss.backward()) reached this model's parameters, which ZeRO "
                        "stage 3 does not take (stages 0-2 keep them until zero_grad() or the next step); detach "
                        "the path into this model where its gradients are not wanted (`fake.detach()` in a GAN)")
                return
            grad = param.grad
            param.grad = None
            self._take(slot, grad)
        return hook

    def fold_stray(self) -> bool:
        """[Note: stray gradients] Before a boundary step: reduce the gradients other backwards left in
        `.grad` since this engine's last backward, adding them to the accumulated ones. Returns whether
        there were any (a collective ran only then)."""
        stray = [s for s in self.layout.slots if s.param.grad is not None]
        if not stray:
            return False
        self.begin_micro_step(boundary=True)
        try:
            for s in stray:
                grad, s.param.grad = s.param.grad, None
                self._take(s, grad)
        finally:
            self.finish_backward()
        return True

    def _take(self, slot, grad: torch.Tensor) -> None:
        b = slot.bucket
        if self._launched[b]:
            raise RuntimeError(
                f"gradient of {slot.name!r} arrived after its bucket was reduced (a parameter reached twice "
                "in one backward, e.g. through reentrant activation checkpointing); use non-reentrant "
                "checkpointing (use_reentrant=False)")
        flat_grad = grad.reshape(-1)
        if self.mode == SHARD_EVERY_STEP:
            bucket = self.layout.buckets[b]
            staging = self._staging_for(b)
            view = staging[slot.offset - bucket.start:slot.offset - bucket.start + slot.numel]
            if self._seen[slot.index]:
                view.add_(flat_grad)
            elif view.dtype != flat_grad.dtype and view.is_cuda:
                # a casting copy_ takes TensorIterator's unrolled (unvectorized) path on CUDA; the foreach copy
                # is vectorized: 1.42x faster for bf16 -> fp32 on an H200 (RESULTS.md B3, 2026-11-22)
                torch._foreach_copy_([view], [flat_grad])
            else:
                view.copy_(flat_grad)
        else:
            self.accum[slot.offset:slot.offset + slot.numel].add_(flat_grad)
        if not self._seen[slot.index]:
            self._seen[slot.index] = True
            self._arrived[b] += 1
            if self.on_bucket_ready is not None and self._arrived[b] == len(self.layout.buckets[b].slots):
                self.on_bucket_ready(b)
        if self._communicate and self._arrived[b] == len(self.layout.buckets[b].slots):
            self._ready[b] = True
            self._launch_ready()

    # -- reduction -----------------------------------------------------------------------------------

    def _launch_ready(self) -> None:
        while self._next < len(self.layout.buckets) and self._ready[self._next]:
            b = self._next
            self._launched[b] = True
            self._next += 1
            self._launch(b)

    def _launch(self, b: int) -> None:
        bucket = self.layout.buckets[b]
        overwrite = self._overwrite
        if self.transient and self.grads[b] is None:  # [Note: transient gradient storage]
            self.grads[b] = torch.empty(bucket.own_numel, dtype=self.accum_dtype, device=self.device)
            overwrite = True
        out, full = self.grads[b], None
        if self.mode == SHARD_EVERY_STEP:
            src = self._staging_for(b)
            self._zero_missing(bucket, src)
            full = self._staging.pop(b)[0]
        else:
            src = self.accum[bucket.start:bucket.end]
        if self.sum_locally:
            return self._launch_all_to_all(bucket, src, out, full, overwrite)
        send = src if src.dtype == self.reduce_dtype else src.to(self.reduce_dtype)
        if self.pre_factor != 1.0:
            # `shard_at_boundary` keeps its full buffer unreduced: a later backward of the same step (or
            # fold_stray) reduces it again, so it must not be prescaled in place
            keep = send is src and self.mode == SHARD_AT_BOUNDARY
            send = send.mul(self.pre_factor) if keep else send.mul_(self.pre_factor)
        if self.mode == REPLICATED:
            work = self.comm.all_reduce(send, async_op=self.overlap)
            finalize = (lambda: src.copy_(send)) if send is not src else None
        else:
            accumulate = self.mode == SHARD_EVERY_STEP and not overwrite
            recv = out if (out.dtype == send.dtype and not accumulate) else torch.empty(
                bucket.own_numel, dtype=send.dtype, device=send.device)
            work = self.comm.reduce_scatter(recv, send, async_op=self.overlap)

            def finalize(recv=recv, out=out, full=full, accumulate=accumulate):
                if accumulate:
                    out.add_(recv)
                elif recv is not out:
                    out.copy_(recv)
                if full is not None:
                    self._recycle(full)
        self._track(work, finalize)

    def _launch_all_to_all(self, bucket, src: torch.Tensor, out: torch.Tensor, full: torch.Tensor,
                           overwrite: bool) -> None:
        """[Note: 16-bit wire, fp32 sums]"""
        engine, slot = self.a2a_engine, None
        if engine is not None:
            recv, slot, work = engine.all_to_all(src)
        else:
            recv = torch.empty_like(src)
            work = self.comm.all_to_all(recv, src, async_op=self.overlap)
        world, parts = self.comm.world_size, self.norm_parts

        def finalize():
            chunks = recv.view(world, bucket.own_numel)
            if overwrite:
                torch.sum(chunks, dim=0, dtype=torch.float32, out=out)
            else:
                out.add_(chunks.sum(dim=0, dtype=torch.float32))
            if parts is not None:
                parts.append(torch.linalg.vector_norm(out))
            if slot is not None:
                engine.release(slot)
            self._recycle(full)
        self._track(work, finalize)

    def _track(self, work, finalize) -> None:
        if self.overlap:
            self._pending.append((work, finalize))
        else:
            work.wait()
            if finalize is not None:
                finalize()

    def _staging_for(self, b: int) -> torch.Tensor:
        entry = self._staging.get(b)
        if entry is not None:
            return entry[1]
        bucket = self.layout.buckets[b]
        while not self._free and self._pending and self._num_staging >= STAGING_BUFFERS:
            self._wait_oldest()  # reuse the buffer of the oldest reduction once it has finished
        if self._free:
            full = self._free.pop()
        else:
            size = bucket.numel if self.transient else self._max_bucket
            full = torch.empty(size, dtype=self.wire_dtype, device=self.device)
            self._num_staging += 1
        buf = full[:bucket.numel]
        last = bucket.slots[-1]
        buf[last.offset + last.numel - bucket.start:].zero_()  # padding
        self._staging[b] = (full, buf)
        return buf

    def _recycle(self, full: torch.Tensor) -> None:
        """A staging buffer's reduction has finished: keep it for the next bucket, or drop it when transient."""
        if self.transient:
            self._num_staging -= 1
        else:
            self._free.append(full)

    def _zero_missing(self, bucket, staging: torch.Tensor) -> None:
        for s in bucket.slots:
            if not self._seen[s.index]:
                staging[s.offset - bucket.start:s.offset - bucket.start + s.numel].zero_()

    def release_staging(self) -> Optional[int]:
        """Drop idle staging buffers (they are re-allocated on demand); returns how many were dropped."""
        n, self._free, self._num_staging = len(self._free), [], self._num_staging - len(self._free)
        return n

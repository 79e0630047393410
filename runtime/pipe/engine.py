"""PipelineEngine: what `dsrun.initialize(model=PipelineModule(...))` returns (DeepSpeed's PipelineEngine).

    loss = engine.train_batch(data_iter)          # gradient_accumulation_steps micro-batches, one step
    loss = engine.eval_batch(data_iter)           # forward only; any sequence of train and eval calls works

A batch is a schedule (schedule.py: instructions as data) run by `_run`, which dispatches each
instruction on its op through `_DISPATCH`: the engine has no state machine beyond the buffers of the
batch in flight, which start empty and end empty, so train and eval batches interleave freely.
Buffers are keyed by micro-batch id (the schedules bound how many are alive at once). DeepSpeed's other
engine methods (stage queries, data sources, batch re-sizing, checkpoints) are in surface.py.

Composition order ([Note: composition order] in runtime/compose.py, applied to the stage's module):
placement on the device, tied weights synchronised from their lowest stage, the optimizer (the client's
or the config's), precision and ZeRO-1 (stage_optimizer.py), the scheduler, the data loader over the
data-parallel group. Gradient all-reduce over the data-parallel group, tied-weight reduction and the
global-norm clipping are the schedule's RT, RG and OPT instructions.

Loss: the last stage computes `loss_fn(outputs, labels)` per micro-batch and backpropagates it divided
by the number of micro-batches; train_batch returns the mean over micro-batches and data-parallel ranks,
broadcast over the pipe group, so every rank returns the same 0-dim tensor (as DeepSpeed).

Monitoring (runtime/monitor/, as the plain engine): one train_batch is one step. Each training
instruction marks the rank busy in its phase (a receive names the peer it waits for, so the hang
watchdog names a stalled stage rather than the stages waiting for it); at the end of train_batch the
monitor gets the batch's mean loss, which every rank holds, and the step's values. eval_batch is not a
step and is not watched.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from dsrun.errors import ConfigError, UsageError

from ..config.policies import torch_dtype
from ..config_queries import ConfigQueries
from .p2p import StageP2P
from .schedule import InferenceSchedule, InterleavedInferenceSchedule, InterleavedTrainSchedule, TrainSchedule
from .surface import PipelineError, PipelineSurface

__all__ = ["PipelineEngine", "PipelineError"]


class PipelineEngine(PipelineSurface, ConfigQueries):
    """See the module docstring. Built by `dsrun.initialize`; every rank of the world builds one."""

    def __init__(self, *, model, config, optimizer=None, model_parameters=None, lr_scheduler=None,
                 training_data=None, collate_fn=None):
        self._check_supported(config)
        self.config, self.module = config, model
        self.grid = model.mpu()
        self.global_rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.stage_id, self.num_stages = self.grid.get_stage_id(), model.num_stages
        self.dp_world_size = self.grid.get_data_parallel_world_size()
        self.micro_batches = config.gradient_accumulation_steps
        self.num_chunks = model.num_chunks
        self.extra_warmup = config.pipeline.extra_warmup  # [Note: extra warm-up] (schedule.py)
        self.has_attention_mask = False  # DeepSpeed's flag (set_has_attention_mask)
        if self.extra_warmup and self.num_chunks > 1:
            raise ConfigError(f"pipeline.extra_warmup ({self.extra_warmup}) applies to 1F1B only; the interleaved "
                              f"schedule (num_chunks={self.num_chunks}) already warms up over every chunk, and "
                              "more made it slower on 2 H200 (RESULTS.md)", where="pipeline.extra_warmup",
                              hint="set it to 0, or build the PipelineModule with num_chunks=1")
        self._check_micro_batches(self.micro_batches, where="gradient_accumulation_steps")
        from ..dist import local_rank
        self.local_rank = local_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self._check_every_stage_trains(model)
        from ..compose import apply_data, apply_optimizer, apply_placement, apply_scheduler
        apply_placement(model, device=self.device, sharding=config.sharding, precision=config.precision)
        model.synchronize_tied_weights()
        opt = apply_optimizer(model, client=optimizer, model_parameters=model_parameters, config=config,
                              device=self.device)
        if opt is None:
            raise ConfigError("the pipeline engine needs an optimizer", where="optimizer",
                              hint="pass optimizer= to initialize or add an \"optimizer\" section")
        from .comm import PipeComm
        from .stage_optimizer import StageOptimizer
        self.comm = PipeComm()  # every transfer goes through it: the monitor taps it (comm.py)
        self.stage_optimizer = StageOptimizer(model, opt, param_dtype=torch_dtype(config.precision.param_dtype),
                                              grid=self.grid, shard_optimizer_state=config.sharding.optimizer_state,
                                              comm=self.comm)
        from ..compose import apply_precision
        # fp16: the last stage scales the loss; the step unscales and skips on overflow ([Note: pipeline fp16])
        self.loss_scaler, self._check_overflow = apply_precision(config=config)
        self.skipped_steps, self._step_applied = 0, False
        from ..engine_compat import optimizer_view
        self.optimizer = optimizer_view(opt, self)  # DeepSpeed's wrapper attributes: cur_scale, overflow, ...
        self.lr_scheduler = apply_scheduler(client=lr_scheduler, optimizer=opt, config=config)
        self.training_dataloader = apply_data(training_data=training_data, config=config,
                                              group=self.grid.get_data_parallel_group(), collate_fn=collate_fn)
        self.data_iterator = None
        if self.training_dataloader is not None and (self.is_first_stage() or self.is_last_stage()):
            from ..utils import RepeatingLoader
            self.data_iterator = iter(RepeatingLoader(self.training_dataloader))
        self.p2p = self._build_p2p(model)
        self.global_steps = self.global_samples = self.micro_steps = 0
        self.agg_train_loss = self.agg_eval_loss = None
        self._batch_fn = None
        self._boundary = False
        self._clear_buffers()
        from ..teardown import track_engine
        track_engine(self)  # destroyed at exit before the process groups ([Note: teardown at exit])
        # as the plain engine, after composition: progress, metrics folder, monitors, hang watchdog
        self.dp_group = self.grid.get_data_parallel_group()
        from ..monitor import apply_monitoring
        self.monitor = apply_monitoring(engine=self, config=config)

    def _build_p2p(self, model) -> StageP2P:
        s, n = self.stage_id, self.num_stages
        if n == 1:
            return StageP2P(prev_rank=None if s == 0 else self.grid.stage_to_global(s - 1),
                            next_rank=None if s == n - 1 else self.grid.stage_to_global(s + 1),
                            device=self.device, dynamic_shape=model.dynamic_shape, comm=self.comm)
        from .p2p import channel_groups
        p2p = StageP2P(prev_rank=self.grid.stage_to_global((s - 1) % n), next_rank=self.grid.stage_to_global((s + 1) % n),
                       device=self.device, dynamic_shape=model.dynamic_shape, num_stages=n, stage_id=s,
                       groups=channel_groups(self.grid, self.num_chunks), comm=self.comm)
        p2p.connect()
        return p2p

    def _first_virtual(self, ins) -> bool:
        return self.stage_id == 0 and ins.chunk == 0

    def _last_virtual(self, ins) -> bool:
        return self.is_last_stage() and ins.chunk == self.num_chunks - 1

    @staticmethod
    def _check_supported(config) -> None:
        if config.sharding.gradients or config.sharding.parameters:
            raise ConfigError("ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism (ZeRO-1 works)",
                              where="zero_optimization.stage", hint="set it to 0 or 1")
        if config.offload.optimizer.value != "none" or config.offload.params.value != "none":
            raise ConfigError("offload is not supported with pipeline parallelism",
                              where="zero_optimization.offload_optimizer", hint="remove the offload sections")

    def _check_every_stage_trains(self, model) -> None:
        """Every rank learns which stages hold no trainable parameter and all stop with one clear error
        (collective: a stage failing alone in its optimizer's constructor left the others waiting)."""
        mine = torch.tensor([int(not any(p.requires_grad for p in model.parameters()))], device=self.device)
        flags = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(flags, mine)
        topo = self.grid.topology
        empty = sorted({topo.get_coord(rank).pipe for rank, flag in enumerate(torch.cat(flags).tolist()) if flag})
        if empty:
            parts = model.parts
            where = ", ".join(f"stage {s} (layers {parts[s]}-{parts[s + 1] - 1})" if model.num_chunks == 1
                              else f"stage {s}" for s in empty)
            raise UsageError(f"pipeline {where} hold{'s' if len(empty) == 1 else ''} no trainable parameter, so its "
                             f"optimizer would have nothing to step",
                             hint="partition with partition_method='parameters' or 'type:<layer class>', or use "
                                  "fewer stages")

    # -- batches ---------------------------------------------------------------------------------------

    def train_batch(self, data_iter=None) -> torch.Tensor:
        """Run one batch of `gradient_accumulation_steps` micro-batches through the 1F1B schedule and take
        one optimizer step. Returns the mean loss (the same 0-dim tensor on every rank)."""
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() requires gradients enabled. Use eval_batch() instead.")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        self._kind, self._compute_loss = "train", True
        if self.num_chunks > 1 or self.extra_warmup:  # ordered; with one chunk, plain 1F1B plus the extra warm-up
            self._run(InterleavedTrainSchedule(self.micro_batches, self.num_stages, self.stage_id, self.num_chunks,
                                               extra_warmup=self.extra_warmup))
        else:  # DeepSpeed's lock-step 1F1B
            self._run(TrainSchedule(micro_batches=self.micro_batches, stages=self.num_stages, stage_id=self.stage_id))
        # mean over micro-batches and data-parallel ranks, from the last stage to every rank (as DeepSpeed)
        self.agg_train_loss = self._from_last_stage(
            self._average([self._total_loss / self.micro_batches]) if self.is_last_stage() else None)
        self._clear_buffers()
        self.monitor.on_backward(self.agg_train_loss)  # the step's loss: one value, already averaged
        self.monitor.on_step(step=self.global_steps, samples=self.global_samples,
                             grad_norm=self.stage_optimizer.grad_norm, lr=self.optimizer.param_groups[0]["lr"],
                             loss_scale=self.loss_scaler.loss_scale, skipped_steps=self.skipped_steps)
        return self.agg_train_loss

    def eval_batch(self, data_iter, return_logits: bool = False, compute_loss: bool = True, reduce_output="avg",
                   bcast_loss: bool = True, num_micro_batches: Optional[int] = None):
        """Forward `num_micro_batches` (default gradient_accumulation_steps) micro-batches from `data_iter`
        without gradients (DeepSpeed's semantics). Per micro-batch the last stage keeps the loss, or the
        outputs when `compute_loss` is False or there is no loss_fn; `reduce_output='avg'` averages them
        over micro-batches and data-parallel ranks, None returns the list. With `compute_loss` and
        `bcast_loss` the averaged loss is returned on every rank, otherwise on the last stage (None
        elsewhere). `return_logits` returns `(result, outputs)`, outputs being the last micro-batch's on
        the last stage. The train iterator and the module's train/eval mode are restored afterwards."""
        if reduce_output is not None and reduce_output.lower() != "avg":
            raise NotImplementedError(f"reduction type {reduce_output} not supported.")
        micro_batches = num_micro_batches or self.micro_batches
        saved_iter, saved_mode = self.data_iterator, self.module.training
        self.set_dataiterator(data_iter)
        self.module.eval()
        self._kind, self._compute_loss = "eval", compute_loss
        try:
            with torch.no_grad():
                if self.num_chunks > 1:
                    self._run(InterleavedInferenceSchedule(micro_batches, self.num_stages, self.stage_id,
                                                           self.num_chunks))
                else:
                    self._run(InferenceSchedule(micro_batches=micro_batches, stages=self.num_stages,
                                                stage_id=self.stage_id))
            result = None
            if self.is_last_stage():
                values = [self._losses_done[mb] for mb in range(micro_batches)]
                result = values if reduce_output is None else self._average(values)
            if compute_loss and bcast_loss and reduce_output is not None:
                result = self._from_last_stage(result)
            outputs = self._last_outputs if self.is_last_stage() else None
        finally:
            self.data_iterator = saved_iter
            self.module.train(saved_mode)
            self._clear_buffers()
        self.agg_eval_loss = result
        return (result, outputs) if return_logits else result

    def _average(self, values):
        """Mean over micro-batches, then over the data-parallel group (tensors, or tuples of tensors)."""
        if not torch.is_tensor(values[0]):
            return [self._average([v[i] for v in values]) for i in range(len(values[0]))]
        mean = sum(v.float() for v in values) / len(values)
        if self.dp_world_size > 1:
            self.comm.all_reduce(mean, group=self.grid.get_data_parallel_group())
            mean /= self.dp_world_size
        return mean

    def _from_last_stage(self, value) -> torch.Tensor:
        """The last stage's 0-dim float tensor on every rank of the pipe group."""
        if self.num_stages == 1:
            return value
        if not self.is_last_stage():
            value = torch.zeros((), dtype=torch.float32, device=self.device)
        value = value.float().reshape(())
        self.comm.broadcast(value, src=self.grid.stage_to_global(self.num_stages - 1),
                            group=self.grid.get_pipe_parallel_group())
        return value

    # -- the schedule interpreter ------------------------------------------------------------------------

    def _clear_buffers(self) -> None:
        self._inputs, self._labels, self._outputs, self._grads, self._losses = {}, {}, {}, {}, {}
        self._losses_done, self._last_outputs = {}, None
        self._total_loss = torch.zeros((), dtype=torch.float32, device=self.device)

    def _run(self, schedule) -> None:
        self._clear_buffers()
        try:
            watched = self._kind == "train"
            timer = self.monitor.breakdown if watched else None  # wall_clock_breakdown
            for step in schedule.steps():
                for ins in step:
                    if watched:
                        self._mark_busy(ins)
                    if timer is not None and ins.op in _TIMED:
                        self._timed(timer, ins)
                    else:
                        _DISPATCH[ins.op](self, ins)
        finally:
            self.p2p.wait_sends()

    def _mark_busy(self, ins) -> None:
        peer = self.p2p.prev_rank if ins.op == "rA" else self.p2p.next_rank if ins.op == "rG" else None
        phase = f"{_PHASES[ins.op]} (micro-batch {ins.micro_batch})" if ins.micro_batch is not None \
            else _PHASES[ins.op]
        self.monitor.busy(phase if peer is None else f"{phase} from rank {peer}", waiting_on=peer)

    def _timed(self, timer, ins) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        _DISPATCH[ins.op](self, ins)
        sync()
        timer.add(_TIMED[ins.op], time.perf_counter() - start)

    def _to_device(self, obj):
        """A loaded batch on the stage's device. From host memory to a GPU the copy is issued without
        waiting: a plain copy from pageable memory first waits for every kernel already queued, so the
        host loses its lead over the GPU once per micro-batch and the GPU idles while the host launches
        the next layers (about 1 ms per micro-batch on B3). Pageable inputs are staged through pinned
        memory (torch's caching host allocator keeps the block until the copy has run); pinned inputs (a
        DataLoader's with pin_memory=True, fresh each batch) are read as the copy runs, so a loader that
        refills one pinned buffer in place must not do so before the step that used it has finished."""
        if torch.is_tensor(obj):
            if obj.device.type == "cpu" and self.device.type == "cuda":
                return (obj if obj.is_pinned() else obj.pin_memory()).to(self.device, non_blocking=True)
            return obj.to(self.device)
        if isinstance(obj, (tuple, list)):
            return tuple(self._to_device(o) for o in obj)
        return obj

    def _load(self, ins) -> None:
        if self.data_iterator is None:
            raise PipelineError("no data: pass data_iter to train_batch()/eval_batch(), call set_dataiterator(), "
                                "or give training_data to initialize()")
        batch = next(self.data_iterator)
        if self._batch_fn is not None:
            batch = self._batch_fn(batch)
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise PipelineError("each batch from the data iterator must be a pair (inputs, labels)")
        if self._first_virtual(ins):
            self._inputs[(ins.micro_batch, 0)] = self._to_device(batch[0])
            if self._kind == "train":
                self.monitor.add_inputs(batch[0])  # tokens/s when the inputs are token ids
        if self._last_virtual(ins):
            self._labels[ins.micro_batch] = self._to_device(batch[1])

    def _forward(self, ins) -> None:
        mb, key = ins.micro_batch, (ins.micro_batch, ins.chunk)
        inputs = self._inputs[key] if self._kind == "train" else self._inputs.pop(key)  # train: kept for backward
        outputs = self.module(inputs, chunk=ins.chunk) if self.num_chunks > 1 else self.module(inputs)
        if not self._last_virtual(ins):
            self._outputs[key] = outputs
            return
        use_loss_fn = self._compute_loss and self.module.loss_fn is not None
        loss = self.module.loss_fn(outputs, self._labels.pop(mb)) if use_loss_fn else outputs
        if self._kind == "train":
            self._total_loss += loss.detach().float()
            self._losses[mb] = loss
        else:
            self._last_outputs = outputs
            self._losses_done[mb] = loss.detach() if torch.is_tensor(loss) else tuple(t.detach() for t in loss)

    def _backward(self, ins) -> None:
        key = (ins.micro_batch, ins.chunk)
        if self._last_virtual(ins):  # scaled for fp16 ([Note: pipeline fp16])
            (self._losses.pop(ins.micro_batch).float() * (self.loss_scaler.loss_scale / self.micro_batches)).backward()
        else:
            outputs = self._outputs.pop(key)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            pairs = [(o, g) for o, g in zip(outputs, self._grads.pop(key)) if g is not None]
            torch.autograd.backward([o for o, _ in pairs], grad_tensors=[g for _, g in pairs])
        if self._first_virtual(ins):
            self._inputs.pop(key)

    def _send_activations(self, ins) -> None:
        key = (ins.micro_batch, ins.chunk)
        self.p2p.send_activations(self._outputs[key], self._kind, ins.chunk)
        if self._kind == "eval":
            del self._outputs[key]

    def _recv_activations(self, ins) -> None:
        self._inputs[(ins.micro_batch, ins.chunk)] = self.p2p.recv_activations(self._kind, ins.chunk)

    def _send_grads(self, ins) -> None:
        self.p2p.send_grads(self._inputs.pop((ins.micro_batch, ins.chunk)), ins.chunk)

    def _recv_grads(self, ins) -> None:
        self._grads[(ins.micro_batch, ins.chunk)] = self.p2p.recv_grads(ins.chunk)

    def _reduce_tied(self, ins) -> None:
        self.stage_optimizer.reduce_tied()

    def _reduce_grads(self, ins) -> None:
        self._boundary = True
        self.stage_optimizer.reduce()

    def _optimizer_step(self, ins) -> None:
        """[Note: pipeline fp16] The global norm is taken over the scaled gradients of every stage, so all
        ranks see the same overflow and skip the same steps; a skipped step leaves the weights, the
        optimizer state and the scheduler as they were (DeepSpeed's semantics) and still counts as a step."""
        try:
            applied = self.stage_optimizer.step(float(self.config.gradient_clipping or 0.0),
                                                loss_scale=self.loss_scaler.loss_scale,
                                                check_overflow=self._check_overflow)
        finally:
            self._boundary = False
        if self._check_overflow:
            self.loss_scaler.record(not applied, step=self.global_steps, grad_norm=self.stage_optimizer.grad_norm,
                                    report=self.global_rank == 0)
            self.skipped_steps += not applied
        self._step_applied = applied
        if applied and self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        self.micro_steps += self.micro_batches

    def destroy(self) -> None:
        self.monitor.close()
        self.stage_optimizer.destroy()
        self._clear_buffers()


_PHASES = {"L": "load", "F": "forward", "B": "backward", "sA": "send activations", "rA": "recv activations",
           "sG": "send grads", "rG": "recv grads", "RT": "tied-weight reduction", "RG": "gradient all-reduce",
           "OPT": "optimizer step"}

_TIMED = {"F": "forward_ms", "B": "backward_ms"}

_DISPATCH = {
    "L": PipelineEngine._load,
    "F": PipelineEngine._forward,
    "B": PipelineEngine._backward,
    "sA": PipelineEngine._send_activations,
    "rA": PipelineEngine._recv_activations,
    "sG": PipelineEngine._send_grads,
    "rG": PipelineEngine._recv_grads,
    "RT": PipelineEngine._reduce_tied,
    "RG": PipelineEngine._reduce_grads,
    "OPT": PipelineEngine._optimizer_step,
}

"""Shared pieces of the pipeline tests: small layer lists, the single-process reference (the same layers
run as one sequential model on one process) and the per-rank training loop. Not a test module."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsrun.pipe import LayerSpec, TiedLayerSpec

WIDTH, MICRO = 8, 2
BASE_SEED = 1234
LR, CLIP = 0.02, 0.05


class Scale(torch.nn.Module):
    """A layer without parameters (a plain callable would do too)."""

    def forward(self, x):
        return torch.tanh(x)


def mlp_specs(n_linear=4):
    """Linear/tanh pairs ending in a Linear: 2*n_linear - 1 layers."""
    specs = []
    for i in range(n_linear):
        specs.append(LayerSpec(torch.nn.Linear, WIDTH, WIDTH))
        if i < n_linear - 1:
            specs.append(LayerSpec(Scale))
    return specs


def _transposed(module, x):
    return F.linear(x, module.weight.t())


def tied_specs():
    """A square Linear used at the start and (transposed) at the end; its weight is shared."""
    return [TiedLayerSpec("embed", torch.nn.Linear, WIDTH, WIDTH, bias=False), LayerSpec(Scale),
            LayerSpec(torch.nn.Linear, WIDTH, WIDTH), LayerSpec(Scale),
            LayerSpec(torch.nn.Linear, WIDTH, WIDTH), LayerSpec(Scale),
            TiedLayerSpec("embed", torch.nn.Linear, WIDTH, WIDTH, bias=False, forward_fn=_transposed)]


class Pack(torch.nn.Module):
    """x -> (x, a float mask that needs no gradient, an int64 tensor, a boolean mask last, as
    Megatron-DeepSpeed's attention mask): what crosses stages as a tuple."""

    def forward(self, x):
        return x, (x > 0).float(), torch.arange(x.shape[0]), x < -0.5


class MaskedLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, inputs):
        x, mask, rows, keep = inputs
        out = torch.tanh(self.lin(x)) * (1 + mask)
        return torch.where(keep, out, 0.5 * out), mask, rows, keep


class Unpack(torch.nn.Module):
    def forward(self, inputs):
        x, _, rows, _ = inputs
        return x + rows.float()[:, None] * 0.01


def tuple_specs():
    return [LayerSpec(Pack), LayerSpec(MaskedLinear), LayerSpec(MaskedLinear), LayerSpec(MaskedLinear),
            LayerSpec(Unpack)]


def build_reference(specs):
    """The layers as one model, each built under seed BASE_SEED + index (as seed_layers=True does); a
    tied key's module is built at its first layer. Returns (list of callables, {name: param}) with
    parameter names as the PipelineModule names them."""
    funcs, modules, tied = [], torch.nn.ModuleDict(), {}
    for idx, spec in enumerate(specs):
        torch.manual_seed(BASE_SEED + idx)
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in tied:
                tied[spec.key] = spec.build()
                modules[f"tied_modules.{spec.key}".replace(".", "_")] = tied[spec.key]
            mod = tied[spec.key]
            funcs.append((lambda m, f: (lambda x: f(m, x)))(mod, spec.forward_fn) if spec.forward_fn else mod)
        else:
            mod = spec.build()
            modules[str(idx)] = mod
            funcs.append(mod)
    named = {}
    for key, mod in modules.items():
        prefix = key.replace("tied_modules_", "tied_modules.")
        for n, p in mod.named_parameters():
            named[f"{prefix}.{n}"] = p
    return funcs, named


def batches(steps, dp, micro_batches, seed=7):
    """Per step, per data-parallel rank, the list of (x, y) micro-batches."""
    g = torch.Generator().manual_seed(seed)
    return [[[(torch.randn(MICRO, WIDTH, generator=g), torch.randn(MICRO, WIDTH, generator=g))
              for _ in range(micro_batches)] for _ in range(dp)] for _ in range(steps)]


def reference_run(specs, data, clip=CLIP, eval_after=None):
    """Train the sequential model on every step of `data` (all ranks' micro-batches in one step): mean
    loss, global-norm clipping, Adam. Returns (losses, {name: weight}, eval losses by step)."""
    funcs, named = build_reference(specs)
    params = list(named.values())
    opt = torch.optim.Adam(params, lr=LR)

    def run(x):
        for f in funcs:
            x = f(x)
        return x
    losses, evals = [], {}
    for step, per_rank in enumerate(data):
        mbs = [mb for rank in per_rank for mb in rank]
        loss = sum(F.mse_loss(run(x), y) for x, y in mbs) / len(mbs)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if eval_after is not None and step in eval_after:
            with torch.no_grad():
                evals[step] = (sum(F.mse_loss(run(x), y) for x, y in mbs) / len(mbs)).item()
    return losses, {n: p.detach().clone() for n, p in named.items()}, evals


def pipe_config(dp, micro_batches, zero_stage=0, clip=CLIP, bf16=False, fp16=False, extra_warmup=0):
    cfg = {"train_batch_size": MICRO * micro_batches * dp, "train_micro_batch_size_per_gpu": MICRO,
           "gradient_clipping": clip, "zero_optimization": {"stage": zero_stage}, "steps_per_print": 0,
           "hang_watchdog": {"enabled": False}}
    if extra_warmup:
        cfg["pipeline"] = {"extra_warmup": extra_warmup}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if fp16:  # True, or the fp16 section's keys
        cfg["fp16"] = {"enabled": True, **(fp16 if isinstance(fp16, dict) else {})}
    return cfg


def make_engine(specs, num_stages, dp, micro_batches, **kw):
    import dsrun
    from dsrun.pipe import PipelineModule
    partition = kw.pop("partition_method", "uniform")
    interval = kw.pop("activation_checkpoint_interval", 0)
    chunks = kw.pop("num_chunks", 1)
    model = PipelineModule(specs, num_stages=num_stages, loss_fn=F.mse_loss, seed_layers=True, base_seed=BASE_SEED,
                           partition_method=partition, activation_checkpoint_interval=interval, num_chunks=chunks)
    engine, *_ = dsrun.initialize(model=model, optimizer=lambda ps: torch.optim.Adam(ps, lr=LR),
                                  config=pipe_config(dp, micro_batches, **kw))
    return engine


def train_steps(engine, data):
    """train_batch on this rank's micro-batches of each step; returns the losses (as floats)."""
    dp_rank = engine.grid.get_data_parallel_rank()
    return [engine.train_batch(iter(step[dp_rank])).item() for step in data]


def stage_weights(engine):
    """{name: fp32 weight} of this rank's stage (tied weights under their tied_modules name)."""
    return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}

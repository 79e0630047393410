"""Pipeline parallelism on the B3 model, 2 GPUs: per-GPU throughput side by side in one run.

Contenders (bf16 module, or fp16 with --fp16; AdamW(fused) on fp32 masters, gradient clipping 1.0, the same layers):
  unpipelined          the whole model on one GPU (each rank runs it alone), M micro-batches then a step
  dsrun-1f1b           dsrun's PipelineEngine, S stages (S = ranks: 2 or 4), 1F1B, m = 4, 8, 16
  dsrun-1f1b-xw1/xw2   the same with `pipeline.extra_warmup` 1 or 2 ([Note: extra warm-up] in schedule.py)
  dsrun-interleaved    dsrun's PipelineEngine, S stages x 2 model chunks, interleaved 1F1B, m = 4, 8, 16
  deepspeed-1f1b       DeepSpeed's PipelineEngine, S stages, m = 16 (needs `import deepspeed`)

    python -m dsrun.launcher.cli --num_gpus 2 benchmarks/bench_pipe.py --results benchmarks/RESULTS.md
    python -m dsrun.launcher.cli --num_gpus 2 benchmarks/bench_pipe.py --tiny     # CPU, gloo, tiny model
    ... --only dsrun-1f1b --micro_batches 16 --profile /tmp/traces                 # one contender, traced

Micro-batches come from host memory as a DataLoader's do; each contender moves them to its device.
Per-GPU tok/s = tokens of a batch / batch time / GPUs used (median of --steps batches after 2 warm-up
batches). The bound is 0.95 x (1 - bubble) of the unpipelined per-GPU rate, bubble = (S-1)/(M+S-1) for 1F1B
and (S-1)/(vM+S-1) interleaved. Rank 0 prints the table and appends it to --results. Without --tiny a
missing DeepSpeed is an error; with --tiny it is skipped.
"""
import argparse
import datetime
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from b3_model import Block, ModelShape, RMSNorm, rope_tables  # noqa: E402

TINY = ModelShape(dim=64, layers=4, heads=4, ffn=128, vocab=256, seq=32, micro_batch=2)
_ROPE = {}
# Balance blocks and the LM head (about a block and a half of compute with its fp32 cross-entropy) over the
# stages; the embedding is nearly free. Both engines get the same method (DeepSpeed has 'type:' too).
PARTITION = "type:BlockPipe|HeadPipe"
PARTS = {}  # contender -> layer boundaries it used, reported with the table
# dsrun's contenders: (name, model chunks, pipeline.extra_warmup); [Note: extra warm-up] in schedule.py
DSRUN = (("dsrun-1f1b", 1, 0), ("dsrun-1f1b-xw1", 1, 1), ("dsrun-1f1b-xw2", 1, 2), ("dsrun-interleaved", 2, 0))
STAGES = [2]  # pipeline stages = ranks (set in main)
# --fp16: fp16 weights and a loss scale of 2^8 (dynamic in both engines, static in the unpipelined loop; no
# overflow at that scale on B3, so no contender skips a step); default bf16
PRECISION = {"dtype": torch.bfloat16, "name": "bf16", "scale": 1.0}


class EmbedPipe(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.embed = nn.Embedding(s.vocab, s.dim)

    def forward(self, tokens):
        return self.embed(tokens)


class BlockPipe(Block):
    """A B3 block taking and returning only the hidden state (RoPE tables cached per shape and device)."""

    def forward(self, x):
        key = (x.shape[1], x.shape[2] // self.heads, x.device, x.dtype)
        if key not in _ROPE:
            cos, sin = rope_tables(x.shape[1], x.shape[2] // self.heads, x.device, x.dtype)
            _ROPE[key] = (cos[None, :, None, :], sin[None, :, None, :])
        return super().forward(x, *_ROPE[key])


class HeadPipe(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.norm = RMSNorm(s.dim)
        self.head = nn.Linear(s.dim, s.vocab, bias=False)

    def forward(self, x):
        return self.head(self.norm(x))


def lm_loss(logits, targets):
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def layer_specs(spec_cls, s: ModelShape):
    return [spec_cls(EmbedPipe, s)] + [spec_cls(BlockPipe, s) for _ in range(s.layers)] + [spec_cls(HeadPipe, s)]


def make_optimizer(params, device):
    return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")


def batches(s: ModelShape, seed=0):
    """An endless iterator of (tokens, targets) micro-batches in host memory, as a DataLoader yields them
    (the same stream on every rank); each engine moves them to its device."""
    g = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, s.vocab, (s.micro_batch, s.seq + 1), generator=g)
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def to_device(t, device):
    """The unpipelined loop's copy: pinned and non-blocking (a pageable copy waits for queued kernels)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(device):
    """Free the previous contender's memory before the next one builds (reference cycles included)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


PROFILE = {"dir": None, "name": None}  # --profile: every rank traces one batch after the timed ones; the run's name
PEAK = {}  # run name -> peak GiB allocated on the busiest rank


def timed(run_batch, steps, device):
    """Median seconds of `run_batch()` over `steps` batches after 2 warm-up batches; and the last loss."""
    import torch.distributed as dist
    times, loss = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        sync(device)
        dist.barrier()
        start = time.perf_counter()
        loss = run_batch()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    if PROFILE["dir"]:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync(device)
        dist.barrier()
        with profile(activities=acts) as prof:
            run_batch()
            sync(device)
        os.makedirs(PROFILE["dir"], exist_ok=True)
        prof.export_chrome_trace(os.path.join(PROFILE["dir"], f"trace_{PROFILE['name']}_rank{dist.get_rank()}.json"))
    peak = torch.tensor(float(torch.cuda.max_memory_allocated()) if device.type == "cuda" else 0.0, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    PEAK[PROFILE["name"]] = peak.item() / 2 ** 30
    return statistics.median(times), float(loss)


def run_unpipelined(s, m, steps, device):
    torch.manual_seed(0)
    layers = nn.Sequential(*(spec.build() for spec in layer_specs(_Spec, s))).to(device, PRECISION["dtype"])
    masters = [p.detach().float().clone().requires_grad_(False) for p in layers.parameters()]
    opt = make_optimizer(masters, device)
    data = batches(s)

    def batch():
        total = 0.0
        for _ in range(m):
            tokens, targets = (to_device(t, device) for t in next(data))
            loss = lm_loss(layers(tokens), targets) / m
            (loss * PRECISION["scale"]).backward()
            total += loss.detach()
        params = list(layers.parameters())
        for p, master in zip(params, masters):
            master.grad = p.grad.float() / PRECISION["scale"]
            p.grad = None
        torch.nn.utils.clip_grad_norm_(masters, 1.0)
        opt.step()
        with torch.no_grad():
            for p, master in zip(params, masters):
                p.copy_(master)
        return total

    seconds, loss = timed(batch, steps, device)
    return m * s.micro_batch * s.seq / seconds, loss


class _Spec:
    """A LayerSpec stand-in for the unpipelined model (no pipeline package needed)."""

    def __init__(self, cls, *args):
        self.cls, self.args = cls, args

    def build(self):
        return self.cls(*self.args)


def pipe_config(s, m):
    return {"train_batch_size": s.micro_batch * m, "train_micro_batch_size_per_gpu": s.micro_batch,
            "gradient_accumulation_steps": m, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
            PRECISION["name"]: {"enabled": True, **({"initial_scale_power": 8} if PRECISION["name"] == "fp16" else {})},
            "zero_optimization": {"stage": 0}}


def run_dsrun(s, m, chunks, steps, device, extra_warmup=0):
    import dsrun
    from dsrun.pipe import LayerSpec, PipelineModule
    torch.manual_seed(0)
    model = PipelineModule(layer_specs(LayerSpec, s), num_stages=STAGES[0], loss_fn=lm_loss,
                           partition_method=PARTITION, num_chunks=chunks)
    PARTS["dsrun-interleaved" if chunks > 1 else "dsrun-1f1b"] = list(model.parts)
    cfg = dict(pipe_config(s, m), hang_watchdog={"enabled": False}, pipeline={"extra_warmup": extra_warmup})
    engine, *_ = dsrun.initialize(model=model, optimizer=lambda ps: make_optimizer(ps, device), config=cfg)
    data = batches(s)
    seconds, loss = timed(lambda: engine.train_batch(data), steps, device)
    engine.destroy()
    return m * s.micro_batch * s.seq / seconds / STAGES[0], loss


def run_deepspeed(s, m, steps, device):
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = PipelineModule(layer_specs(LayerSpec, s), num_stages=STAGES[0], loss_fn=lm_loss, partition_method=PARTITION)
    PARTS["deepspeed-1f1b"] = [int(b) for b in model.parts]  # numpy integers in DeepSpeed
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      optimizer=lambda ps: make_optimizer(ps, device), config=pipe_config(s, m))
    data = batches(s)
    seconds, loss = timed(lambda: engine.train_batch(data), steps, device)
    return m * s.micro_batch * s.seq / seconds / STAGES[0], loss


def bound(m, stages=2, chunks=1):
    return 0.95 * (1 - (stages - 1) / (chunks * m + stages - 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU-sized model (gloo); DeepSpeed optional")
    p.add_argument("--micro_batches", default="4,8,16")
    p.add_argument("--deepspeed_m", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--shape", default=None, help="d,L,H,ffn,V,seq,mb (default: B3 with micro-batch 4)")
    p.add_argument("--results", default=None)
    p.add_argument("--fp16", action="store_true", help="fp16 weights with loss scaling instead of bf16")
    p.add_argument("--only", default="", help="comma-separated contenders to run (default: all)")
    p.add_argument("--profile", default=None, help="directory: each rank writes a chrome trace of one batch per "
                   "contender (read it with trace_gaps.py)")
    args = p.parse_args()
    PROFILE["dir"] = args.profile
    if args.fp16:
        PRECISION.update(dtype=torch.float16, name="fp16", scale=2.0 ** 8)
    only = set(filter(None, args.only.split(",")))

    def wanted(name):
        return not only or name in only
    import dsrun
    import torch.distributed as dist
    dsrun.init_distributed()
    if dist.get_world_size() not in (2, 4):
        raise SystemExit("bench_pipe.py runs on 2 or 4 ranks (--num_gpus 2|4): one pipeline stage per rank")
    STAGES[0] = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    shape = ModelShape.parse(args.shape) if args.shape else TINY if args.tiny else ModelShape(micro_batch=4)
    ms = [int(v) for v in args.micro_batches.split(",")]
    try:
        import deepspeed  # noqa: F401
        have_ds = True
    except ImportError:
        if not args.tiny:
            raise SystemExit("DeepSpeed is not importable: install deepspeed==0.19.8 (or run with --tiny)")
        have_ds = False

    rows, base = [], {}
    for m in ms:
        PROFILE["name"] = f"unpipelined_m{m}"
        rate, loss = run_unpipelined(shape, m, args.steps, device)
        release(device)
        base[m] = rate
        rows.append(("unpipelined", m, rate, loss, None))
        for name, chunks, extra in DSRUN:
            if not wanted(name):
                continue
            PROFILE["name"] = f"{name}_m{m}"
            rate, loss = run_dsrun(shape, m, chunks, args.steps, device, extra)
            release(device)
            rows.append((name, m, rate, loss, chunks))
    if have_ds and wanted("deepspeed-1f1b"):
        m = args.deepspeed_m
        if m not in base:
            PROFILE["name"] = f"unpipelined_m{m}"
            base[m] = run_unpipelined(shape, m, args.steps, device)[0]
            release(device)
        PROFILE["name"] = f"deepspeed-1f1b_m{m}"
        rate, loss = run_deepspeed(shape, m, args.steps, device)
        rows.append(("deepspeed-1f1b", m, rate, loss, 1))
    if dist.get_rank() == 0:
        report(args, shape, rows, base, device, have_ds)
    dist.barrier()


def report(args, shape, rows, base, device, have_ds):
    ds_rate = {m: r for name, m, r, _, _ in rows if name == "deepspeed-1f1b"}
    lines = ["| contender | m | tok/s per GPU | vs unpipelined | bound 0.95(1-bubble) | meets bound | vs DeepSpeed | "
             "peak GiB | loss |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m, rate, loss, chunks in rows:
        ratio, peak = rate / base[m], PEAK.get(f"{name}_m{m}", 0.0)
        if chunks is None:
            lines.append(f"| {name} | {m} | {rate:,.0f} | 1.00x | | | | {peak:.1f} | {loss:.4f} |")
            continue
        b = bound(m, STAGES[0], chunks)
        vs_ds = f"{rate / ds_rate[m]:.2f}x" if m in ds_rate and not name.startswith("deepspeed") else ""
        lines.append(f"| {name} | {m} | {rate:,.0f} | {ratio:.3f} | {b:.3f} | {'yes' if ratio >= b else 'NO'} | "
                     f"{vs_ds} | {peak:.1f} | {loss:.4f} |")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (gloo)"
    versions = f"torch {torch.__version__}"
    if have_ds:
        import deepspeed
        versions += f", deepspeed {deepspeed.__version__}"
    cmd = f"python -m dsrun.launcher.cli --num_gpus {STAGES[0]} benchmarks/bench_pipe.py " + " ".join(
        a for a in sys.argv[1:] if not a.startswith("--local_rank"))
    text = "\n".join([
        f"## Pipeline parallelism, {STAGES[0]} stages on B3 blocks ({datetime.date.today().isoformat()})", "",
        f"- machine: 2 x {machine}; {versions}",
        f"- command: `{cmd.strip()}`",
        f"- model: d={shape.dim} L={shape.layers} H={shape.heads} ffn={shape.ffn} V={shape.vocab} seq={shape.seq} "
        f"micro-batch {shape.micro_batch}; {PRECISION['name']} weights, fp32 masters, AdamW, clipping 1.0; "
        f"median of {args.steps} "
        f"batches after 2 warm-up",
        f"- partition `{PARTITION}` (layer 0 embedding, 1..{shape.layers} blocks, {shape.layers + 1} head); boundaries: "
        + "; ".join(f"{k} {v}" for k, v in PARTS.items()), "",
        *lines, ""])
    print(text, flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()

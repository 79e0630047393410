"""Activation checkpointing on the B3 model, one GPU: peak memory and step time, side by side in one run.

Contenders (bf16 module, forward + backward of one micro-batch, no optimizer; every block wrapped the same way):
  none              no checkpointing
  torch             torch.utils.checkpoint(use_reentrant=False) per block
  torch-reentrant   torch.utils.checkpoint(use_reentrant=True) per block (the form DeepSpeed's default matches)
  dsrun             dsrun.checkpointing.checkpoint per block (DeepSpeed's default, reentrant form)
  dsrun-nonreentrant  dsrun.checkpointing.checkpoint(..., use_reentrant=False)
  dsrun-cpu         dsrun's reentrant form with `cpu_checkpointing` (saved block inputs kept in host memory)

    python benchmarks/bench_act_ckpt.py [--mb 8] [--steps 10] [--results benchmarks/RESULTS.md]

Appends a table to RESULTS.md: step ms (median), peak GiB (torch.cuda.max_memory_allocated), relative to none.
"""
import argparse
import datetime
import functools
import gc
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from b3_model import LlamaLM, ModelShape  # noqa: E402

MODES = ("none", "torch", "torch-reentrant", "dsrun", "dsrun-nonreentrant", "dsrun-cpu")


def wrap(model, mode):
    import dsrun.checkpointing as ds_ckpt
    from torch.utils.checkpoint import checkpoint as torch_ckpt
    ds_ckpt.reset()
    ds_ckpt.configure(None, checkpoint_in_cpu=(mode == "dsrun-cpu"))
    for block in model.layers:
        forward = block.forward
        if mode == "torch":
            block.forward = functools.partial(torch_ckpt, forward, use_reentrant=False)
        elif mode == "torch-reentrant":
            block.forward = functools.partial(torch_ckpt, forward, use_reentrant=True)
        elif mode in ("dsrun", "dsrun-cpu"):
            block.forward = functools.partial(ds_ckpt.checkpoint, forward)
        elif mode == "dsrun-nonreentrant":
            block.forward = functools.partial(ds_ckpt.checkpoint, forward, use_reentrant=False)


def run(mode, shape, steps):
    torch.manual_seed(0)
    model = LlamaLM(shape).cuda().to(torch.bfloat16)
    if mode != "none":
        wrap(model, mode)
    tokens = torch.randint(0, shape.vocab, (shape.micro_batch, shape.seq), device="cuda")
    times = []
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(tokens, tokens)
        loss.backward()
        torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e3)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    loss = loss.item()
    del model
    gc.collect()  # the wrapped forwards (block -> partial -> bound method -> block) are a reference cycle:
    torch.cuda.empty_cache()  # without a collection the model's 2.3 GiB stayed into the next contender's peak
    assert torch.cuda.memory_allocated() < 2 ** 28, f"{mode} left {torch.cuda.memory_allocated() / 2 ** 30:.2f} GiB"
    return statistics.median(times), peak, loss


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = p.parse_args()
    shape = ModelShape(micro_batch=args.mb)
    rows = []
    for mode in args.modes.split(","):
        ms, peak, loss = run(mode, shape, args.steps)
        rows.append((mode, ms, peak, loss))
        print(f"{mode}: {ms:.1f} ms, peak {peak:.2f} GiB, loss {loss:.4f}", flush=True)
    base_ms, base_peak = rows[0][1], rows[0][2]
    text = [f"\n## Activation checkpointing on B3, one GPU ({datetime.date.today()})\n",
            f"- machine: {torch.cuda.get_device_name()}; torch {torch.__version__}",
            f"- command: `python benchmarks/bench_act_ckpt.py {' '.join(sys.argv[1:])}`",
            f"- bf16 module, micro-batch {shape.micro_batch} x seq {shape.seq}, forward + backward, no optimizer; "
            f"median of {args.steps} steps after 3 warm-up steps; every block wrapped\n",
            "| contender | step ms | vs none | peak GiB | vs none | loss |", "|---|---|---|---|---|---|"]
    for mode, ms, peak, loss in rows:
        text.append(f"| {mode} | {ms:.1f} | {ms / base_ms:.2f}x | {peak:.2f} | {peak / base_peak:.2f}x | {loss:.4f} |")
    with open(args.results, "a") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()

"""Probe: what bounds CPU optimizer offload on this host (issue 12), measured in one process.

Prints, for a flat parameter of `--numel` elements:
- pinned device->host and host->device copy bandwidth (fp32 and bf16), alone;
- dsrun's CPU Adam kernel (fp32 master, bf16 out; fp32 or bf16 gradient) in Gparam/s at several thread
  counts, alone and while device<->host copies of other buffers run (the two share host memory bandwidth);
- the in-place host memory bandwidth (`x.mul_(1.0)`, 1 GiB).

    python benchmarks/probe_offload_host.py --numel 268435456
"""
import argparse
import os
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from dsrun.kernels import cpu_ops  # noqa: E402


def timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bw(numel, dtype):
    dev = torch.empty(numel, dtype=dtype, device="cuda")
    host = torch.empty(numel, dtype=dtype).pin_memory()
    nbytes = numel * dev.element_size()

    def d2h():
        host.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()

    def h2d():
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
    return nbytes / timed(d2h) / 1e9, nbytes / timed(h2d) / 1e9


def adam_rate(numel, grad_dtype, threads, background=None):
    p = torch.randn(numel)
    g = torch.randn(numel).to(grad_dtype)
    m, v = torch.zeros(numel), torch.zeros(numel)
    out = torch.empty(numel, dtype=torch.bfloat16)
    torch.set_num_threads(threads)
    step = [0]

    def run():
        step[0] += 1
        cpu_ops.adam_step(p, g, m, v, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step[0],
                          out=out)
    run()
    stop = threading.Event()
    th = None
    if background is not None:
        th = threading.Thread(target=background, args=(stop,), daemon=True)
        th.start()
    t = timed(run)
    stop.set()
    th and th.join()
    return numel / t / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=1 << 28)
    ap.add_argument("--threads", default="")
    args = ap.parse_args()
    n = args.numel
    cores = os.cpu_count()
    print(f"host: {cores} CPUs, torch {torch.__version__}, simd {cpu_ops.simd_level_name()}, numel {n}")
    x = torch.ones(1 << 28)
    bw = (1 << 30) * 2 / timed(lambda: x.mul_(1.0)) / 1e9
    print(f"in-place host bandwidth (read+write) {bw:.1f} GB/s")
    rows = []
    if torch.cuda.is_available():
        for dt in (torch.float32, torch.bfloat16):
            d2h, h2d = copy_bw(n, dt)
            rows.append((f"pinned copy {dt}", f"D2H {d2h:.1f} GB/s, H2D {h2d:.1f} GB/s"))
            print(rows[-1], flush=True)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores // 4, cores // 2, cores})
    for gd in (torch.float32, torch.bfloat16):
        for t in threads:
            r = adam_rate(n, gd, t)
            rows.append((f"cpu adam grad={gd} threads={t}", f"{r:.2f} Gparam/s"))
            print(rows[-1], flush=True)
    if torch.cuda.is_available():
        dev = torch.empty(n // 2, device="cuda")
        host = torch.empty(n // 2).pin_memory()

        def copies(stop):
            while not stop.is_set():
                host.copy_(dev, non_blocking=True)
                dev.copy_(host, non_blocking=True)
                torch.cuda.synchronize()
        for t in (cores, max(1, cores - 2)):
            r = adam_rate(n, torch.float32, t, background=copies)
            rows.append((f"cpu adam fp32 grad threads={t} with D2H+H2D running", f"{r:.2f} Gparam/s"))
            print(rows[-1], flush=True)
    print("\n| probe | figure |\n|---|---|")
    for a, b in rows:
        print(f"| {a} | {b} |")


if __name__ == "__main__":
    main()

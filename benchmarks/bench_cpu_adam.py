"""B1: CPU Adam kernel (shared/reference/performance-anchors.md section 6, B1).

dsrun CPUAdam vs torch.optim.AdamW(fused=True), DeepSpeedCPUAdam (when `deepspeed` imports) and
torch's default for-loop AdamW on one flat fp32 tensor, interleaved in one process (the CI box
drifts +-40% between minutes), plus the in-place read+write bandwidth of the same box measured in
the same loop (`x.mul_(1.0)` over a 1 GiB buffer); each round starts one case later, so that no case
always follows the same neighbour. Every optimizer steps the same parameter and gradient (so all of
them stream the same pages) with its own states.
Variants: (a) fp32 in place (28 B/param); (b) fp32 master + bf16 copy-out (30 B); (c) bf16 grads in
(26 B). Ratios are medians of per-round time ratios. Prints one table; `--append` adds it to
benchmarks/RESULTS.md. To include DeepSpeed, run under an environment that has it, e.g.

    python -m venv --system-site-packages /tmp/dsvenv && /tmp/dsvenv/bin/pip install deepspeed ninja
    /tmp/dsvenv/bin/python benchmarks/bench_cpu_adam.py --numel 134217728 --repeats 9
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's dsrun, also from another venv

import dsrun.kernels as K  # noqa: E402
from dsrun.kernels import CPUAdam, cpu_ops  # noqa: E402

LR, WD = 1e-3, 0.01
HP = dict(lr=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=WD, adamw_mode=True, bias_correction=True)
A, TORCH, DS, LOOP = ("dsrun CPUAdam fp32 (a)", "torch AdamW fused=True fp32", "DeepSpeedCPUAdam fp32",
                      "torch AdamW for-loop (default) fp32")
BW = "in-place r+w bandwidth (x.mul_(1.0))"


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def deepspeed_adam(param):
    """(DeepSpeedCPUAdam over `param`, version), or (None, why not)."""
    try:
        import deepspeed
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        opt = DeepSpeedCPUAdam([param], lr=LR, weight_decay=WD, adamw_mode=True)
        opt.step()  # JIT build (ninja) on first use, outside the timed loop
        return opt, deepspeed.__version__
    except Exception as e:  # absent, or its JIT build failed: report, do not fail the benchmark
        return None, f"not measured ({type(e).__name__}: {str(e)[:120]})"


def build_cases(n, with_loop):
    """Ordered {name: (step function, bytes per param)} and notes; all share one param and grad."""
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    ours = CPUAdam([p], **{k: v for k, v in HP.items() if k not in ("beta1", "beta2")})
    ours.step()  # allocates its states
    st = ours.state[p]
    g16 = p.grad.to(torch.bfloat16)
    out16 = torch.empty(n, dtype=torch.bfloat16)
    step = [1]

    def flat(m, v, grad=None, out=None):
        step[0] += 1
        ours.step_flat(p.data, p.grad if grad is None else grad, m, v, step[0], out=out)

    topt = torch.optim.AdamW([p], lr=LR, weight_decay=WD, fused=True)
    cases = {A: (ours.step, 28), TORCH: (topt.step, 28)}
    ds, ds_note = deepspeed_adam(p)
    if ds is not None:
        cases[DS] = (ds.step, 28)
    cases["dsrun CPUAdam fp32 + bf16 out (b)"] = (lambda: flat(st["exp_avg"], st["exp_avg_sq"], out=out16), 30)
    cases["dsrun CPUAdam bf16 grads (c)"] = (lambda: flat(st["exp_avg"], st["exp_avg_sq"], grad=g16), 26)
    if with_loop:
        loop = torch.optim.AdamW([p], lr=LR, weight_decay=WD, foreach=False, fused=False)
        cases[LOOP] = (loop.step, 28)
    bw_buf = torch.empty(2 ** 28)  # 1 GiB fp32
    bw_buf.fill_(1.0)
    cases[BW] = (lambda: bw_buf.mul_(1.0), None)
    return cases, ds_note, 2 * bw_buf.numel() * 4


def ratio(times, num, den):
    """Median and range of per-round t(num)/t(den): > 1 means `den` is faster."""
    rs = sorted(a / b for a, b in zip(times[num], times[den]))
    return statistics.median(rs), rs[0], rs[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=128 * 2 ** 20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-loop", action="store_true", help="skip torch's for-loop AdamW (slow)")
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    n = args.numel
    torch.manual_seed(0)
    cases, ds_note, bw_bytes = build_cases(n, not args.no_loop)
    for fn, _ in cases.values():  # warm-up: first touch of states, page faults
        fn()
    times = {k: [] for k in cases}
    names = list(cases)
    for r in range(args.repeats):  # interleaved: every case once per round, rotating who goes first
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(timed(cases[k][0]))

    bw = [bw_bytes / t / 1e9 for t in times[BW]]
    bw_med = statistics.median(bw)
    baselines = [TORCH] + ([DS] if DS in times else [])
    if DS in times:  # per round, the faster of torch fused and DeepSpeed
        times["best baseline"] = [min(a, b) for a, b in zip(times[TORCH], times[DS])]
    rows = []
    for k, (fn, bpp) in cases.items():
        if bpp is None:
            continue
        gps = n / statistics.median(times[k]) / 1e9
        vs = [ratio(times, b, k) for b in baselines + (["best baseline"] if DS in times else [])]
        rows.append((k, gps, n / min(times[k]) / 1e9, gps * bpp, 100 * gps * bpp / bw_med, vs))

    b_over_a = ratio(times, "dsrun CPUAdam fp32 + bf16 out (b)", A)[0]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip() if os.path.exists(
        "/sys/kernel/mm/transparent_hugepage/enabled") else "n/a"
    cols = " | ".join(f"median ratio vs {b} [min-max]" for b in baselines + (["best of both"] if DS in times else []))
    lines = [
        f"## B1 CPU Adam ({date})",
        "",
        f"- machine: {platform.node()}, {cpu}, {os.cpu_count()} cores, SIMD {cpu_ops.simd_level_name()}, "
        f"torch threads {torch.get_num_threads()}, THP `{thp}`",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, dsrun kernels "
        f"{K.loader.load_cpu_ops(warn=False).state.value}, deepspeed {ds_note}",
        f"- command: `{os.path.basename(sys.executable)} benchmarks/bench_cpu_adam.py --numel {n} "
        f"--repeats {args.repeats}{' --no-loop' if args.no_loop else ''}{' --append' if args.append else ''}`",
        f"- {n / 2**20:.0f}Mi params, one flat tensor shared by all optimizers, AdamW lr {LR} wd {WD}, median of "
        f"{args.repeats} interleaved rounds; in-place bandwidth median {bw_med:.1f} GB/s (samples "
        f"{', '.join(f'{b:.0f}' for b in bw)})",
        f"- variant (b) takes {100 * (b_over_a - 1):+.0f}% time over (a) (median of per-round ratios)",
        "",
        f"| impl | Gparam/s (median) | best | GB/s at its B/param | % of in-place bw | {cols} |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in rows[0][5]) + " |",
    ]
    for k, gps, best, gbs, pct, vs in rows:
        rs = " | ".join(f"{r:.2f}x [{lo:.2f}-{hi:.2f}]" for r, lo, hi in vs)
        lines.append(f"| {k} | {gps:.2f} | {best:.2f} | {gbs:.1f} | {pct:.0f}% | {rs} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(os.path.join(HERE, "RESULTS.md"), "a") as f:  # append-only: others append too
            f.write("\n" + text)


if __name__ == "__main__":
    main()

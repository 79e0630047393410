"""Where a step's GPU time goes, from a torch.profiler chrome trace (bench_b3.py --profile DIR).

    python benchmarks/trace_gaps.py DIR/trace_dsrun-z2_4.json[.gz] [--top 15]

Prints, for the compute stream (the stream with the most non-NCCL kernel time): the profiled span, busy
time by kernel family, and the largest idle gaps. Each gap is classified by the kernel that ends it:
`host` when that kernel was launched less than 30 us before it started (the GPU waited for the host to
launch it) and `dependency` otherwise (it was queued but waited on an event: another stream, NCCL).
NCCL kernels are reported per stream with the time they overlap compute kernels.
"""
import argparse
import gzip
import json
import signal
from collections import defaultdict

FAMILIES = (("nccl", "nccl"), ("adam", "_adam_"), ("attention", "flash"), ("attention", "fmha"),
            ("gemm", "gemm"), ("gemm", "nvjet"), ("gemm", "sm90_"), ("gemm", "cutlass"),
            ("norm/reduce", "reduce"), ("norm/reduce", "norm"), ("copy/cast", "copy"), ("copy/cast", "cat"),
            ("elementwise", "elementwise"), ("elementwise", "vectorized"))


def family(name):
    low = name.lower()
    for fam, key in FAMILIES:
        if key in low:
            return fam
    return "other"


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def union(intervals):
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    events = load(args.trace)
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    by_stream = defaultdict(list)
    for k in kernels:
        by_stream[k["tid"]].append(k)
    compute = max(by_stream, key=lambda s: sum(k["dur"] for k in by_stream[s] if family(k["name"]) != "nccl"))
    ks = sorted(by_stream[compute], key=lambda k: k["ts"])
    span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
    busy = defaultdict(float)
    for k in ks:
        busy[family(k["name"])] += k["dur"]
    print(f"compute stream {compute}: span {span / 1e3:.1f} ms, busy {sum(busy.values()) / 1e3:.1f} ms, "
          f"idle {(span - union([(k['ts'], k['ts'] + k['dur']) for k in ks])) / 1e3:.1f} ms")
    for fam, t in sorted(busy.items(), key=lambda x: -x[1]):
        print(f"  {fam:12s} {t / 1e3:8.2f} ms")
    gaps, kinds = [], defaultdict(float)
    for prev, nxt in zip(ks, ks[1:]):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap <= 5:
            continue
        launch = launches.get(nxt["args"].get("correlation"))
        lag = nxt["ts"] - (launch["ts"] + launch["dur"]) if launch else None
        kind = "host" if lag is not None and lag < 30 else "dependency"
        kinds[kind] += gap
        gaps.append((gap, kind, prev["name"][:50], nxt["name"][:50], prev["ts"] + prev["dur"] - ks[0]["ts"]))
    print("idle by cause: " + ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in kinds.items()))
    print(f"largest gaps (us, cause, at ms, after -> before):")
    for gap, kind, a, b, at in sorted(gaps, reverse=True)[:args.top]:
        print(f"  {gap:8.0f} {kind:10s} {at / 1e3:8.2f}  {a} -> {b}")
    compute_iv = [(k["ts"], k["ts"] + k["dur"]) for k in ks]
    for s, lst in by_stream.items():
        nccl = [k for k in lst if family(k["name"]) == "nccl"]
        if not nccl:
            continue
        iv = [(k["ts"], k["ts"] + k["dur"]) for k in nccl]
        t = union(iv)
        both = union(iv) + union(compute_iv) - union(iv + compute_iv)
        names = defaultdict(float)
        for k in nccl:
            names[k["name"].split("(")[0][:40]] += k["dur"]
        print(f"nccl stream {s}: {t / 1e3:.1f} ms ({both / 1e3:.1f} ms under compute) "
              + ", ".join(f"{n} {v / 1e3:.1f}" for n, v in sorted(names.items(), key=lambda x: -x[1])[:4]))


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly
    main()

"""NVMe offload I/O: the drive's sequential bandwidth beside dsrun's swapper (runtime/zero/swap.py), one run.

The drive, dd-like: one large file written in `--block-mib` blocks then fsync'd, and read back, with
O_DIRECT when the filesystem supports it (page-aligned buffers from mmap), else buffered I/O with the
file's pages dropped from the page cache first (posix_fadvise DONTNEED; no root needed) - the table says
which. Two forms: one stream (dd), and `--jobs` streams on disjoint ranges (what an NVMe drive needs to
reach its rated bandwidth; fio's numjobs). The better one is the drive's figure.

The swapper: the same bytes as fp32 tensors of `--tensor-mib`, written with `TensorSwapper.write` (its
thread pool, the `aio` settings given; O_DIRECT where supported unless `--swap-buffered`) then fsync'd
(buffered, the fsync makes the figure the drive's), dropped from the cache, and read back with
`TensorSwapper.read`.
With O_DIRECT available the drive is also measured the swapper's way (buffered, fsync, DONTNEED): a
virtual disk or a drive cache can make that faster than O_DIRECT, and ratios use the best drive row.
Then the optimizer's path: `NvmeOptimizerState` over the same tensors as masters with Adam's two states,
stepping each bucket with no compute (read the next bucket while the last is written back), i.e. the
I/O-bound limit of one NVMe-offloaded step; its bytes moved are counted both ways.

    python benchmarks/bench_nvme.py --path /local_nvme/tmp --size-gib 8 --results benchmarks/RESULTS.md

Prints one markdown table last (and appends it to --results). Runs on CPU-only machines too.
"""
import argparse
import datetime
import mmap
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's dsrun

from dsrun.runtime.zero.nvme import NvmeOptimizerState  # noqa: E402
from dsrun.runtime.zero.swap import TensorSwapper  # noqa: E402

GIB = 1 << 30


def _direct_ok(folder):
    try:
        fd = os.open(os.path.join(folder, "probe"), os.O_RDWR | os.O_CREAT | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, 4096)
        os.pwrite(fd, buf, 0)
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(os.path.join(folder, "probe"))


def _drop(fd, nbytes):
    os.fsync(fd)
    os.posix_fadvise(fd, 0, nbytes, os.POSIX_FADV_DONTNEED)


def disk(folder, nbytes, block, jobs, direct):
    """(write GB/s, read GB/s) of one file, `jobs` streams on disjoint ranges, fsync included."""
    path = os.path.join(folder, f"dd{jobs}.bin")
    flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o600)
    bufs = [mmap.mmap(-1, block) for _ in range(jobs)]
    for b in bufs:
        b.write(os.urandom(1 << 16) * (block >> 16))
    per = nbytes // jobs // block * block

    def run(j, write):
        for off in range(j * per, (j + 1) * per, block):
            n = os.pwrite(fd, bufs[j], off) if write else os.preadv(fd, [bufs[j]], off)
            assert n == block, f"short {'write' if write else 'read'}: {n} of {block} bytes"

    def timed(write):
        t = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda j: run(j, write), range(jobs)))
        if write:
            os.fsync(fd)
        return per * jobs / (time.perf_counter() - t) / 1e9

    try:
        w = timed(True)
        if not direct:
            _drop(fd, nbytes)
        r = timed(False)
    finally:
        os.close(fd)
        os.unlink(path)
    return w, r


def swapper(folder, nbytes, tensor_bytes, block, queue_depth, threads, direct):
    """(write GB/s, read GB/s, optimizer-path GB/s, O_DIRECT used) through dsrun's swapper."""
    sw = TensorSwapper(folder, rank=0, block_size=block, queue_depth=queue_depth, thread_count=threads,
                       direct=direct)
    used_direct = sw.direct
    n = max(1, nbytes // tensor_bytes)
    tensors = [torch.randn(tensor_bytes // 4) for _ in range(n)]
    try:
        t = time.perf_counter()
        pend = [sw.write(f"t{i}", x) for i, x in enumerate(tensors)]
        for p in pend:
            p.wait()
        for fd in sw._fds.values():
            os.fsync(fd)
        w = n * tensor_bytes / (time.perf_counter() - t) / 1e9
        for key, fd in sw._fds.items():
            _drop(fd, sw._sizes[key])
        t = time.perf_counter()
        pend = [sw.read(f"t{i}", x) for i, x in enumerate(tensors)]
        for p in pend:
            p.wait()
        r = n * tensor_bytes / (time.perf_counter() - t) / 1e9
    finally:
        sw.close()
    # the optimizer's path: masters + 2 states per bucket, 1/3 of the bytes each
    sw = TensorSwapper(folder, rank=0, block_size=block, queue_depth=queue_depth, thread_count=threads,
                       direct=direct)
    per = max(1, tensor_bytes // 3 // 4)
    masters = [torch.zeros(per) for _ in range(n)]
    opt = torch.optim.Adam(masters)
    state = NvmeOptimizerState(sw, opt, masters, prefetch=True, buffer_count=4)
    for m in state.masters:
        opt.state[m] = {"exp_avg": torch.zeros(per), "exp_avg_sq": torch.zeros(per)}
    try:
        for m in reversed(state.masters):  # the first pass writes the states
            with state.resident(m):
                pass
        state.flush()
        for key, fd in sw._fds.items():
            _drop(fd, sw._sizes[key])
        t = time.perf_counter()
        for m in reversed(state.masters):
            with state.resident(m):
                pass
        state.flush()
        for fd in sw._fds.values():
            os.fsync(fd)
        step = 2 * 3 * per * 4 * n / (time.perf_counter() - t) / 1e9  # read and written
    finally:
        state.close()
    return w, r, step, used_direct


def _medians(runs):
    """Per position, the median over a list of result tuples; a bool position (a flag) from the first."""
    import statistics
    return tuple(v[0] if isinstance(v[0], bool) else statistics.median(v) for v in zip(*runs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default=tempfile.gettempdir(), help="a directory on the drive to measure")
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--block-mib", type=int, default=8, help="dd block size")
    ap.add_argument("--jobs", type=int, default=8, help="parallel streams of the drive's second measurement")
    ap.add_argument("--tensor-mib", type=int, default=256)
    ap.add_argument("--aio-block-mib", type=int, default=1)
    ap.add_argument("--queue-depth", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--swap-buffered", action="store_true", help="the swapper without O_DIRECT even where supported")
    ap.add_argument("--rounds", type=int, default=1, help="measure the 1-stream drive and the swapper this many "
                    "times, alternating, and report medians (a virtual disk's speed drifts between minutes)")
    ap.add_argument("--results", help="append the table to this markdown file")
    a = ap.parse_args()
    nbytes = int(a.size_gib * GIB)
    block = a.block_mib << 20
    with tempfile.TemporaryDirectory(dir=a.path, prefix="bench_nvme.") as folder:
        direct = _direct_ok(folder)
        d1s, ss = [], []
        for _ in range(max(1, a.rounds)):
            d1s.append(disk(folder, nbytes, block, 1, direct))
            ss.append(swapper(folder, nbytes, a.tensor_mib << 20, a.aio_block_mib << 20, a.queue_depth, a.threads,
                              False if a.swap_buffered else None))
        dn = disk(folder, nbytes, block, a.jobs, direct)
        db = disk(folder, nbytes, block, a.jobs, False) if direct else None
    d1, s = _medians(d1s), _medians(ss)
    drives = [d for d in (d1, dn, db) if d]
    best_w, best_r = max(d[0] for d in drives), max(d[1] for d in drives)
    buffered = "buffered + fsync + fadvise(DONTNEED)"
    mode = "O_DIRECT" if direct else f"{buffered} (no O_DIRECT here)"
    rows = [(f"drive, 1 stream ({mode})", *d1, ""), (f"drive, {a.jobs} streams ({mode})", *dn, "")]
    if db:  # the swapper's own way through the page cache, on the raw file
        rows.append((f"drive, {a.jobs} streams ({buffered})", *db, ""))
    how = "O_DIRECT" if s[3] else "buffered"
    rows += [(f"dsrun swapper ({how}, aio block {a.aio_block_mib} MiB, qd {a.queue_depth} x {a.threads} threads)",
              *s[:2],
              f"write {s[0] / best_w:.2f}x, read {s[1] / best_r:.2f}x of the drive"),
             ("dsrun NVMe optimizer step, I/O only (read+write)", s[2], s[2],
              f"{s[2] / ((best_w + best_r) / 2):.2f}x of the drive's mean")]
    lines = [f"## NVMe offload I/O ({datetime.date.today()})", "",
             f"- machine: {platform.node()}; {platform.processor() or platform.machine()}; torch {torch.__version__}",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- {a.size_gib} GiB under {a.path}; ratios against the best drive row; 1-stream drive and swapper: "
             f"median of {max(1, a.rounds)} alternating rounds", "",
             "| what | write GB/s | read GB/s | ratio |", "|---|---|---|---|"]
    lines += [f"| {n} | {w:.2f} | {r:.2f} | {x} |" for n, w, r, x in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.results:
        with open(a.results, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()

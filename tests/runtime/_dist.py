"""Run a function on N gloo ranks (forked processes) and collect each rank's return value.

    results = run_ranks(fn, world_size=2, args=(...))   # fn(rank, world_size, *args) -> picklable

Each child sets its own RANK/WORLD_SIZE/MASTER_* (children only: the parent's environment is never
touched), initialises gloo (or `backend`) through `dsrun.init_distributed`, runs `fn`, and always destroys the
process group. A child's exception is re-raised in the parent with the child's traceback text.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch.multiprocessing as mp

__all__ = ["run_ranks", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, fn, world_size, port, outdir, args, env, backend="gloo"):
    import torch
    import torch.distributed as dist
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.update(env or {})
    torch.set_num_threads(1)
    result = None
    try:
        from dsrun.runtime.dist import init_distributed
        init_distributed(dist_backend=backend)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # report every failure to the parent
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)


def run_ranks(fn, *, world_size: int, args=(), env=None, timeout: float = 120.0, start_method: str = "fork",
              backend: str = "gloo"):
    """fn(rank, world_size, *args) on `world_size` ranks; returns the list of results by rank.

    CUDA jobs need start_method="spawn" (CUDA cannot be used in a forked child), a module-level fn and,
    to run on NCCL, backend="nccl"."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_child, args=(fn, world_size, free_port(), outdir, args, env, backend), nprocs=world_size,
                                 join=False, start_method=start_method)
        try:
            while not ctx.join(timeout=timeout):
                pass
        except mp.ProcessRaisedException:
            pass
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()
        results = []
        for rank in range(world_size):
            path = os.path.join(outdir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} died without a result")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed: {value}")
            results.append(value)
        return results

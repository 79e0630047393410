"""init_distributed: join (or reuse) the default process group.

Rank, world size and master come from `dsrun.runtime.dist_env.discover` (dsrun/torchrun variables,
MPI, Slurm). A plain `python train.py` with none of them set runs as a one-rank world on 127.0.0.1.
The backend is nccl with CUDA, else gloo; on CUDA the current device is set from the local rank. The
timeout is `$DEEPSPEED_TIMEOUT` minutes (default 10), as in DeepSpeed. `os.environ` is only read.

[Note: one job per store] Two jobs given the same master port would otherwise mix: rank 0 of one job
binds the port, rank 0 of the other fails to, and the second job's other ranks join the first job's
store and can complete collectives with its ranks. So, unless the caller passes its own
`init_method`, dsrun creates the rendezvous TCPStore itself (as torch's tcp:// and env:// rendezvous
would: rank 0 hosts it, multi-tenant, libuv unless USE_LIBUV=0; every rank a client under torchrun's
agent store), rank 0 publishes the job id (`DSRUN_JOB_ID`, else `TORCHELASTIC_RUN_ID`) under
`dsrun/job_id`, and every other rank compares it with its own before the process group exists. A
mismatch, or rank 0 failing to bind the port, is a `LaunchError` naming the port (and both job ids).
"""
from __future__ import annotations

import importlib
import os
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from dsrun.errors import LaunchError, UsageError

__all__ = ["init_distributed", "default_timeout", "local_rank", "JOB_ID_KEY"]

JOB_ID_KEY = "dsrun/job_id"  # outside torch's "default_pg/" prefix
_NO_JOB_ID = "(no job id)"

_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK",
                   "SLURM_PROCID")


def default_timeout(environ=os.environ) -> timedelta:
    value = environ.get("DEEPSPEED_TIMEOUT", "")
    try:
        return timedelta(minutes=float(value)) if value else timedelta(minutes=10)
    except ValueError:
        raise UsageError(f"DEEPSPEED_TIMEOUT={value!r} is not a number of minutes", where="DEEPSPEED_TIMEOUT") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_rank(environ=os.environ) -> int:
    """This process's local rank (0 when nothing says otherwise)."""
    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID",
                 "MPI_LOCALRANKID", "PALS_LOCAL_RANKID"):
        if environ.get(name, "") != "":
            return int(environ[name])
    return 0


def init_distributed(dist_backend: Optional[str] = None, auto_mpi_discovery: bool = True,
                     distributed_port: int = 29500, verbose: bool = True, timeout: Optional[timedelta] = None,
                     init_method: Optional[str] = None, dist_init_required: Optional[bool] = None, config=None,
                     rank: int = -1, world_size: int = -1) -> None:
    """Initialise torch.distributed once; reuse an existing default group (DeepSpeed's signature).

    Args:
        dist_backend: "nccl", "gloo", ...; default nccl when CUDA is available, else gloo.
        auto_mpi_discovery: read MPI/Slurm variables when RANK/WORLD_SIZE are absent.
        distributed_port: master port when MASTER_PORT is unset.
        timeout: collective timeout; default `$DEEPSPEED_TIMEOUT` minutes or 10.
        init_method: a torch init_method URL, used as given; default: a TCPStore at MASTER_ADDR:MASTER_PORT
            that must belong to this job ([Note: one job per store]).
        dist_init_required: False skips initialisation when no group exists.
        rank, world_size: override the discovered values (>= 0).
    """
    if dist.is_initialized() or dist_init_required is False:
        return
    environ = dict(os.environ)
    if not any(environ.get(k) for k in _RANK_VARIABLES) and rank < 0:
        env_rank, env_world, env_local, addr, port = 0, 1, 0, "127.0.0.1", _free_port()
    else:
        from .dist_env import discover
        if "MASTER_PORT" not in environ:
            environ["MASTER_PORT"] = str(distributed_port)
        found = discover(environ, use_mpi4py=auto_mpi_discovery)
        env_rank, env_world, env_local = found.rank, found.world_size, found.local_rank
        addr, port = found.master_addr, found.master_port
    rank = env_rank if rank < 0 else rank
    world_size = env_world if world_size < 0 else world_size
    backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(env_local % torch.cuda.device_count())
    timeout = timeout or default_timeout()
    from .rank_errors import install_excepthook
    from .teardown import ensure_registered
    install_excepthook()
    _check_backend(backend)
    importlib.import_module("torch.distributed._shard")  # imported first, it cannot pin the group ([Note: teardown at exit])
    ensure_registered()  # process groups are destroyed before the interpreter finalises ([Note: teardown at exit])
    if init_method is not None:  # the caller's rendezvous, untouched
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        return
    store = _job_store(addr, int(port), rank, world_size, timeout, environ)
    # torch prefixes the store of its own rendezvous the same way (distributed_c10d.init_process_group)
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world_size,
                            timeout=timeout)


def _check_backend(backend: str) -> None:
    """UsageError (exit 2) for NCCL where it cannot run: a CPU-only torch build, or no GPU (DeepSpeedExamples
    default to `--backend nccl`; torch's own error is a traceback about a missing NCCL build)."""
    if backend.lower() == "nccl" and not (dist.is_nccl_available() and torch.cuda.is_available()):
        why = "this torch build has no NCCL" if not dist.is_nccl_available() else "no CUDA GPU is visible"
        raise UsageError(f"dist_backend 'nccl' cannot run here: {why} (torch {torch.__version__})",
                         hint="use dist_backend='gloo' (a script's --backend gloo), or leave it unset: dsrun "
                              "picks nccl when CUDA is available, else gloo")


def _job_store(addr: str, port: int, rank: int, world_size: int, timeout: timedelta, environ) -> "dist.Store":
    """The rendezvous TCPStore, checked to belong to this job ([Note: one job per store])."""
    job_id = environ.get("DSRUN_JOB_ID") or environ.get("TORCHELASTIC_RUN_ID") or _NO_JOB_ID
    agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)  # torchrun's agent hosts it
    hosts = rank == 0 and not agent_store
    try:
        store = dist.TCPStore(addr, port, world_size, hosts, timeout=timeout, multi_tenant=not agent_store,
                              use_libuv=environ.get("USE_LIBUV", "1") == "1")
    except dist.DistNetworkError as err:
        if hosts and "EADDRINUSE" in str(err):
            raise LaunchError(f"rank 0 of job {job_id} cannot host the rendezvous on port {port}: the port is "
                              "already in use (by another job?)", where="MASTER_PORT",
                              hint="give each concurrent job its own --master_port, or leave it out") from None
        raise
    if rank == 0:
        owner = store.compare_set(JOB_ID_KEY, "", job_id).decode(errors="replace")
    else:
        try:
            owner = store.get(JOB_ID_KEY).decode(errors="replace")  # waits for rank 0, up to `timeout`
        except dist.DistStoreError:
            raise LaunchError(f"rank {rank} of job {job_id} reached a rendezvous store at {addr}:{port}, but no rank 0 "
                              f"published a job id there within {timeout}", where="MASTER_PORT",
                              hint="rank 0 may have failed to start, or another program owns the port") from None
    if owner != job_id:
        raise LaunchError(f"the rendezvous store at {addr}:{port} belongs to job {owner}, but this is rank {rank} of "
                          f"job {job_id}: two jobs share port {port}", where="MASTER_PORT",
                          hint="give each concurrent job its own --master_port, or leave it out")
    return store

"""Command lines for the MPI family (openmpi, mpich, impi, mvapich) and the checks they need.

mpirun starts the workers itself, through `python -u -m dsrun.launcher.transports.mpi_worker`, which
maps the MPI variables to the dsrun worker environment and execs the script (launcher/transports/
mpi_worker.py). Environment values never appear in argv: openmpi gets `-x NAME` and the hydra family
`-genvlist A,B,...`, each of which copies the value from mpirun's own environment, and the values
ride in `Command.env`. So `.deepspeed_env` values reach the workers byte for byte.

MPI places ranks by count, not by slot id, and mpich/impi/mvapich place the same number on every
host (`-ppn`), so `validate_resources` rejects what they cannot express, before anything starts.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from dsrun.errors import UsageError
from dsrun.launcher.spec import Command, LaunchPlan, LaunchSpec, WorkerOptions, encode_world_info
from dsrun.launcher.transports.base import Transport
from dsrun.launcher.transports.common import dumps_options
from dsrun.launcher.transports.scheduler import run_scheduler

__all__ = ["MPI_LAUNCHERS", "WORLD_INFO_ENV", "validate_resources", "worker_env", "shim_argv",
           "openmpi_command", "hydra_command", "MpiOptions", "MpiTransport", "reject_agent_flags"]

MPI_LAUNCHERS = ("openmpi", "mpich", "impi", "mvapich")
WORLD_INFO_ENV = "DSRUN_WORLD_INFO"
SHIM_MODULE = "dsrun.launcher.transports.mpi_worker"
_NAMES = {"openmpi": "openmpi", "mpich": "MPICH", "impi": "Intel MPI", "mvapich": "mvapich", "slurm": "slurm"}
# DeepSpeed's mvapich defaults (reference 4.5), minus MV2_USE_CUDA, which the worker's node decides.
MVAPICH_DEFAULTS = {"MV2_SMP_USE_CMA": "0", "MV2_DEBUG_SHOW_BACKTRACE": "1", "MV2_SUPPORT_DL": "1",
                    "MV2_ENABLE_AFFINITY": "0", "MV2_INTER_ALLGATHER_TUNING": "5", "MV2_CUDA_USE_NAIVE": "0"}


def validate_resources(launcher: str, world_info: Mapping[str, List[int]], *, same_count: bool) -> None:
    """Slot sets must be each host's first N slots (and, with `same_count`, equal N everywhere)."""
    name = _NAMES.get(launcher, launcher)
    for host, slots in world_info.items():
        if list(slots) != list(range(len(slots))):
            raise UsageError(f"{name} backend cannot select specific device ids, got {list(slots)} on {host}. "
                             "Filter whole hosts, or keep the first N slots on every host.", where="--include/--exclude")
    counts = {host: len(slots) for host, slots in world_info.items()}
    if same_count and len(set(counts.values())) > 1:
        raise UsageError(f"{name} backend needs the same slot count on every host, got {counts}.",
                         where="--include/--exclude",
                         hint="filter so that every host keeps the same number of slots, or use --launcher ssh")


def worker_env(plan: LaunchPlan) -> Dict[str, str]:
    """What every MPI/srun worker must receive: the plan's env plus master, job id and the world layout."""
    env = dict(plan.env)
    env.update({"MASTER_ADDR": plan.master_addr, "MASTER_PORT": str(plan.master_port),
                "DSRUN_JOB_ID": plan.job_id, WORLD_INFO_ENV: encode_world_info(plan.world_info),
                "DSRUN_LOG_LEVEL": plan.worker.log_level})  # what the agent gives its ranks (runtime/log.py)
    return env


def shim_argv(worker: WorkerOptions) -> List[str]:
    """`python -u -m ...mpi_worker [options] -- script args`: every per-rank option, one serializer."""
    argv = [worker.python, "-u", "-m", SHIM_MODULE]
    if worker.module:
        argv.append("--module")
    if worker.no_python:
        argv.append("--no_python")
    if worker.no_local_rank:
        argv.append("--no_local_rank")
    if worker.each_rank_log_dir:
        argv += ["--each_rank_log", worker.each_rank_log_dir]
    return argv + ["--", worker.script, *worker.script_args]


def _has_mca(args: List[str], key: str) -> bool:
    return any(a in ("-mca", "--mca") and i + 1 < len(args) and args[i + 1] == key for i, a in enumerate(args))


def openmpi_command(plan: LaunchPlan, launcher_args: str) -> Command:
    """`mpirun -n N -H h1:n1,h2:n2 --mca btl ^openib [--mca btl_tcp_if_include eth0] ARGS -x K ... shim`."""
    extra = shlex.split(launcher_args)
    env = worker_env(plan)
    hosts = ",".join(f"{host}:{len(slots)}" for host, slots in plan.world_info.items())
    argv = ["mpirun", "-n", str(plan.world_size), "-H", hosts, "--mca", "btl", "^openib"]
    if not _has_mca(extra, "btl_tcp_if_include"):
        argv += ["--mca", "btl_tcp_if_include", "eth0"]  # DeepSpeed's default (reference 4.2, 7.2)
    argv += extra
    for name in env:
        argv += ["-x", name]
    return Command(host=None, argv=tuple(argv + shim_argv(plan.worker)), env=env)


def hydra_command(plan: LaunchPlan, launcher_args: str, launcher: str) -> Command:
    """mpich, impi and mvapich: `mpirun -n N -ppn P ARGS -genvlist K,... -hosts h1,h2 shim`."""
    ppn = len(next(iter(plan.world_info.values())))
    env = worker_env(plan)
    if launcher == "impi":
        env.setdefault("I_MPI_PIN", "0")  # dsrun binds cores itself when asked (reference 4.4)
    if launcher == "mvapich":
        env = {**MVAPICH_DEFAULTS, **env}
    argv = ["mpirun", "-n", str(plan.world_size), "-ppn", str(ppn), *shlex.split(launcher_args),
            "-genvlist", ",".join(env), "-hosts", ",".join(plan.world_info)]
    return Command(host=None, argv=tuple(argv + shim_argv(plan.worker)), env=env)


def reject_agent_flags(name: str, plan: LaunchPlan, venv_script: Optional[str]) -> None:
    """mpirun and srun start the ranks themselves: flags only a dsrun node agent honours are errors."""
    worker = plan.worker
    for flag, given in (("--max_restarts", worker.max_restarts > 0),
                        ("--bind_cores_to_rank", worker.bind_cores_to_rank),
                        ("--bind_core_list", bool(worker.bind_core_list)), ("--venv_script", bool(venv_script)),
                        ("--save_pid", worker.save_pid)):
        if given:
            raise UsageError(f"{flag} is not supported with --launcher {name}: {name} starts the ranks itself",
                             where=flag, hint="use --launcher ssh or pdsh, or pass the launcher's own option "
                                              "(e.g. mpirun --bind-to, srun --cpu-bind) through --launcher_args")


@dataclass(frozen=True)
class MpiOptions:
    launcher: str = "openmpi"  # one of MPI_LAUNCHERS
    launcher_args: str = ""
    venv_script: Optional[str] = None  # only to reject it


class MpiTransport(Transport):
    """`--launcher openmpi|mpich|impi|mvapich`: one `mpirun` in the foreground."""

    name = "mpi"

    def __init__(self, options: MpiOptions):
        self.options = options

    @classmethod
    def from_spec(cls, spec: LaunchSpec, launcher: str) -> "MpiTransport":
        return cls(MpiOptions(launcher=launcher, launcher_args=spec.launcher_args, venv_script=spec.venv_script))

    @classmethod
    def from_options(cls, launcher: str, options: Mapping[str, object]) -> "MpiTransport":
        return cls(MpiOptions(**options))

    def validate(self, plan: LaunchPlan) -> None:
        launcher = self.options.launcher
        validate_resources(launcher, plan.world_info, same_count=launcher != "openmpi")
        reject_agent_flags(launcher, plan, self.options.venv_script)

    def commands(self, plan: LaunchPlan) -> Tuple[Command, ...]:
        o = self.options
        if o.launcher == "openmpi":
            command = openmpi_command(plan, o.launcher_args)
        else:
            command = hydra_command(plan, o.launcher_args, o.launcher)
        return (Command(host=None, argv=command.argv, env=command.env, options=dumps_options(o)),)

    def run(self, plan: LaunchPlan) -> int:
        return run_scheduler(plan.commands[0], plan.worker.grace_period)

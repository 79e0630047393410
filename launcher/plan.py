"""`plan(spec) -> LaunchPlan`: the pure core of `dsrun` (shared/style.md rule 4).

No processes, network, clock or `os.environ`: everything from the machine (environment, hostfile
contents, visible GPUs, a free port, core count) was captured into the `LaunchSpec` by the CLI. The
steps follow DeepSpeed 0.19.8's runner order (reference section 1), so errors come in the same order.

[Note: which path runs] The ranks run through one local node agent when a single host remains and
`--force_multi` is not given (DeepSpeed runs it here even if that host is remote; a warning says so),
or with `--no_ssh` (this node only, `node_rank` = `--node_rank`). Otherwise `--launcher` (default ssh)
starts one agent per node, and `multinode.build_commands()` renders the commands.
"""
from __future__ import annotations

import importlib
import logging
from typing import Dict, List, Optional, Sequence, Tuple

from dsrun.errors import FilterError, UsageError

from . import resources
from .argv import parse_range_list, worker_argv
from .envfile import worker_env
from .spec import LAUNCHERS, AgentSpec, Command, LaunchPlan, LaunchSpec, WorkerOptions

__all__ = ["plan", "worker_argv", "normalize_launcher", "worker_options", "DEFAULT_MASTER_PORT", "LOCAL_ADDR"]

log = logging.getLogger("dsrun.launcher")

DEFAULT_MASTER_PORT = 29500  # TORCH_DISTRIBUTED_DEFAULT_PORT: every node must agree without talking
LOCAL_ADDR = "127.0.0.1"


def normalize_launcher(value: str) -> str:
    """Lower-case `--launcher` and check it is one of `LAUNCHERS` (even on one node, unlike DeepSpeed)."""
    name = (value or "").strip().lower()
    if name not in LAUNCHERS:
        raise UsageError(f"unknown launcher {value!r}", where="--launcher", hint=f"choose one of {', '.join(LAUNCHERS)}")
    return name


def worker_options(spec: LaunchSpec) -> WorkerOptions:
    """The per-rank options every node uses, validated."""
    if spec.module and spec.no_python:
        raise UsageError("--module and --no_python cannot be used together", where="--module",
                         hint="--module runs `python -m SCRIPT`; --no_python runs SCRIPT as a program")
    core_list = tuple(parse_range_list(spec.bind_core_list)) if spec.bind_core_list else None
    each_rank_log = spec.enable_each_rank_log if spec.enable_each_rank_log not in (None, "", "None") else None
    return WorkerOptions(
        script=spec.script, script_args=tuple(spec.script_args), python=spec.python, module=spec.module,
        no_python=spec.no_python, no_local_rank=spec.no_local_rank, bind_cores_to_rank=spec.bind_cores_to_rank,
        bind_core_list=core_list, each_rank_log_dir=each_rank_log, save_pid=spec.save_pid,
        max_restarts=spec.max_restarts, log_level="error" if spec.quiet else spec.log_level, log_dir=spec.log_dir,
        grace_period=spec.grace_period, tee=spec.tee,
        output_ranks=tuple(parse_range_list(spec.output_ranks, flag="--output_ranks")) if spec.output_ranks else None)


def _world_info(spec: LaunchSpec) -> Dict[str, List[int]]:
    resources.check_filter_flags(include=spec.include, exclude=spec.exclude, num_nodes=spec.num_nodes,
                                 num_gpus=spec.num_gpus)
    if spec.resource_pool is None:
        pool = resources.local_pool(spec.local_gpus, num_nodes=spec.num_nodes, num_gpus=spec.num_gpus)
    else:
        pool = dict(spec.resource_pool)
    world_info = resources.select_resources(pool, include=spec.include, exclude=spec.exclude,
                                            num_nodes=spec.num_nodes, num_gpus=spec.num_gpus)
    if not world_info:
        if spec.include or spec.exclude:
            flag = "--include" if spec.include else "--exclude"
            raise FilterError(f"{flag} {spec.include or spec.exclude!r} leaves no slots to run on", where=flag,
                              hint="keep at least one slot of a host with slots > 0")
        source = spec.hostfile or "--hostfile"
        raise FilterError("no host has any slots (every entry reads slots=0): nothing would run", where=source,
                          hint="give at least one host slots=N with N >= 1")
    return world_info


def _local_devices(host: str, slots: Sequence[int], gpus: Tuple[str, ...], where: str) -> Tuple[str, ...]:
    """Map a locally run node's slot ids onto this machine's visible GPUs (keeps the user's mask)."""
    if not gpus:
        return ()
    missing = [s for s in slots if s >= len(gpus)]
    if missing:
        raise FilterError(f"{host!r} would run slot(s) {missing} here, but this machine has {len(gpus)} visible "
                          f"GPU(s) ({','.join(gpus)})", where=where,
                          hint="lower --num_gpus or the hostfile's slots, or widen CUDA_VISIBLE_DEVICES")
    return tuple(gpus[s] for s in slots)


def _master_addr(spec: LaunchSpec, world_info: Dict[str, List[int]], local: bool) -> str:
    if spec.master_addr:
        return spec.master_addr
    if spec.no_ssh and len(world_info) > 1:
        raise UsageError("--no_ssh needs --master_addr: every node must reach node 0 at the same address",
                         where="--master_addr", hint="pass the address of node_rank 0, e.g. --master_addr 10.0.0.1")
    if local:
        return LOCAL_ADDR
    # The first host as written (minus `user@`); it is resolved on the workers, never through ssh.
    return list(world_info)[0].rpartition("@")[2]


def plan(spec: LaunchSpec) -> LaunchPlan:
    """Turn a parsed command line into the frozen plan that `execute()` runs and `--dry_run` prints.

    Raises `UsageError` (or a subclass) for any bad flag combination, filter or resource request.
    """
    requested = normalize_launcher(spec.launcher)
    worker = worker_options(spec)
    world_info = _world_info(spec)
    multi = (spec.force_multi or len(world_info) > 1) and not spec.no_ssh
    if multi and requested == "local":
        raise UsageError(f"--launcher local runs one node, but {len(world_info)} host(s) were selected"
                         + (" with --force_multi" if spec.force_multi else ""), where="--launcher",
                         hint="choose ssh, pdsh, an MPI launcher or slurm")
    if spec.no_ssh and not 0 <= spec.node_rank < len(world_info):
        raise UsageError(f"--no_ssh needs --node_rank between 0 and {len(world_info) - 1}, got {spec.node_rank}",
                         where="--node_rank", hint="run the same command on every node with its own --node_rank")
    if not multi and not spec.no_ssh and spec.resource_pool is not None and len(spec.resource_pool) > 1:
        log.warning("only %r is selected: its ranks run on this machine (DeepSpeed behaviour); "
                    "add --force_multi to start them on that host", list(world_info)[0])
    master_addr = _master_addr(spec, world_info, local=not multi)
    if spec.master_port is not None:
        master_port = spec.master_port
    elif not multi and not spec.no_ssh and spec.free_port:
        master_port = spec.free_port  # one node: no one else needs to agree, so avoid collisions
    else:
        master_port = DEFAULT_MASTER_PORT
    env = worker_env(spec.environ, spec.env_file_vars, spec.cwd)
    job_id = spec.job_id or "dsrun-job"

    def agent(node_rank: int, devices: Optional[Tuple[str, ...]]) -> AgentSpec:
        return AgentSpec(job_id=job_id, world_info=world_info, node_rank=node_rank, master_addr=master_addr,
                         master_port=master_port, env=env, worker=worker, cwd=spec.cwd, devices=devices)

    common = dict(world_info=world_info, master_addr=master_addr, master_port=master_port, env=env,
                  job_id=job_id, worker=worker)
    if not multi:
        node_rank = spec.node_rank if spec.no_ssh else 0
        host = list(world_info)[node_rank]
        where = "--num_gpus" if spec.num_gpus > 0 or spec.resource_pool is None else (spec.hostfile or "--hostfile")
        local_agent = agent(node_rank, _local_devices(host, world_info[host], spec.local_gpus, where))
        cores = range(spec.local_cores) if spec.local_cores else None
        size = len(world_info[host])
        commands = tuple(Command(host=None, argv=tuple(worker_argv(worker, rank, size, cores=cores)))
                         for rank in range(size))
        return LaunchPlan(launcher="local", node_rank=spec.node_rank if spec.no_ssh else None, commands=commands,
                          agents=(local_agent,), **common)
    agents = tuple(agent(rank, None) for rank in range(len(world_info)))
    draft = LaunchPlan(launcher=requested if requested != "local" else "ssh", node_rank=None, commands=(),
                       agents=agents, **common)
    return LaunchPlan(launcher=draft.launcher, node_rank=None, commands=_multinode_commands(spec, draft),
                      agents=agents, **common)


def _multinode_commands(spec: LaunchSpec, draft: LaunchPlan) -> Tuple[Command, ...]:
    """Commands from `multinode.build_commands(spec, draft)`; a placeholder agent command per node while
    that module is missing, so `--dry_run` still works."""
    try:
        multinode = importlib.import_module("dsrun.launcher.multinode")
    except ModuleNotFoundError as err:
        if err.name != "dsrun.launcher.multinode":
            raise  # the module exists but is broken: say so rather than print a placeholder
        multinode = None
    build = getattr(multinode, "build_commands", None)
    if build is None:
        return tuple(Command(host=a.host, argv=(draft.worker.python, "-m", "dsrun.launcher.agent", "--spec", a.to_b64()))
                     for a in draft.agents)
    return tuple(_as_command(item) for item in build(spec, draft))


def _as_command(item) -> Command:
    if isinstance(item, Command):
        return Command(host=item.host, argv=tuple(item.argv), env=dict(item.env), options=dict(item.options))
    return Command(host=item.get("host"), argv=tuple(item["argv"]), env=dict(item.get("env") or {}))

"""The data the launcher's planner produces and its executors and node agents consume.

[Note: plan contract] `plan.plan(LaunchSpec) -> LaunchPlan` is pure. A `LaunchPlan` holds one
`AgentSpec` per node of the job (this node only for local and `--no_ssh`). ssh and pdsh start an agent
from each; the MPI family and slurm start workers directly through `commands` (transports/mpi_worker.py)
and read only the shared fields (env, worker options, master) from the specs. A node
agent (`launcher/agent.py`) is given exactly one `AgentSpec` (in process for local runs; as one JSON
line on its stdin for remote ones, see [Note: spec on stdin] in transports/common.py) and needs
nothing else: it spawns `len(world_info[host])` ranks with the worker environment of
shared/design.md, supervises them and tears them down.
Every type here is frozen and round-trips through JSON.
"""
from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["LaunchSpec", "WorkerOptions", "AgentSpec", "Command", "LaunchPlan", "LAUNCHERS", "encode_world_info",
           "decode_world_info"]

LAUNCHERS = ("local", "ssh", "pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm")


@dataclass(frozen=True)
class LaunchSpec:
    """Every `dsrun` flag, parsed and typed, plus the inputs planning reads from outside.

    The CLI builds this; `plan.plan()` turns it into a `LaunchPlan` without side effects. The fields
    that come from the machine (`environ`, `cwd`, `python`, `local_gpus`, file contents) are captured
    here by the CLI so that planning stays pure and testable.
    """

    script: str
    script_args: Tuple[str, ...] = ()
    hostfile: Optional[str] = None  # None = not given: the default /job/hostfile, if present
    hostfile_explicit: bool = False
    include: str = ""
    exclude: str = ""
    num_nodes: int = -1
    num_gpus: int = -1
    master_addr: str = ""
    master_port: Optional[int] = None  # None = not given
    node_rank: int = -1
    launcher: str = "ssh"
    launcher_args: str = ""
    module: bool = False
    no_python: bool = False
    no_local_rank: bool = False
    no_ssh: bool = False
    no_ssh_check: bool = False
    force_multi: bool = False
    save_pid: bool = False
    enable_each_rank_log: Optional[str] = None
    bind_cores_to_rank: bool = False
    bind_core_list: Optional[str] = None
    ssh_port: Optional[int] = None
    venv_script: Optional[str] = None
    log_level: str = "info"
    quiet: bool = False
    # dsrun's own flags
    dry_run: bool = False
    max_restarts: int = 0
    log_dir: Optional[str] = None
    grace_period: float = 5.0
    ssh_accept_unknown_hosts: bool = False  # add unknown host keys instead of refusing
    ssh_connect_timeout: float = 10.0
    ssh_max_parallel: int = 64
    output_ranks: Optional[str] = None  # "0,3": only these ranks' output on the console (--local_ranks_filter)
    tee: bool = False  # with --enable_each_rank_log, the console gets the ranks' output too
    # captured from the machine by the CLI (kept out of planning's reach)
    environ: Dict[str, str] = field(default_factory=dict)
    cwd: str = "."
    python: str = "python3"
    job_id: str = ""
    resource_pool: Optional[Dict[str, int]] = None  # the hostfile's host -> slots; None = no hostfile (local)
    local_gpus: Tuple[str, ...] = ()  # this machine's visible GPU ids (CUDA_VISIBLE_DEVICES entries); () = none
    env_file_vars: Dict[str, str] = field(default_factory=dict)  # merged .deepspeed_env contents
    free_port: Optional[int] = None  # a port found free on this machine, used when --master_port is not given
    local_cores: Optional[int] = None  # this machine's physical cores, for --bind_cores_to_rank; None = unknown


@dataclass(frozen=True)
class WorkerOptions:
    """How each rank is started; identical on every node (one serializer for every transport)."""

    script: str
    script_args: Tuple[str, ...] = ()
    python: str = "python3"  # the interpreter path, captured once at plan time
    module: bool = False
    no_python: bool = False
    no_local_rank: bool = False
    bind_cores_to_rank: bool = False
    bind_core_list: Optional[Tuple[int, ...]] = None
    each_rank_log_dir: Optional[str] = None
    save_pid: bool = False
    max_restarts: int = 0
    log_level: str = "info"
    log_dir: Optional[str] = None  # failure record and agent logs; None = a per-job temp folder
    grace_period: float = 5.0  # seconds between SIGTERM to every rank and SIGKILL of survivors
    output_ranks: Optional[Tuple[int, ...]] = None  # global ranks whose output reaches the console; None = all
    tee: bool = False  # with each_rank_log_dir: the console gets the ranks' output too


@dataclass(frozen=True)
class AgentSpec:
    """Everything one node agent needs to start and supervise its node's ranks."""

    job_id: str
    world_info: Dict[str, List[int]]  # host -> slot ids, hostfile order
    node_rank: int
    master_addr: str
    master_port: int
    env: Dict[str, str]  # exported to every worker on top of the agent's own environment
    worker: WorkerOptions
    cwd: str
    # Physical GPU ids (CUDA_VISIBLE_DEVICES entries) for this node's slots, in slot order, set for every
    # local worker. None: the agent decides on its node (DeepSpeed: the slot ids themselves); (): no GPUs,
    # leave CUDA_VISIBLE_DEVICES alone (CPU ranks).
    devices: Optional[Tuple[str, ...]] = None

    @property
    def host(self) -> str:
        return list(self.world_info)[self.node_rank]

    @property
    def world_size(self) -> int:
        return sum(len(slots) for slots in self.world_info.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "AgentSpec":
        raw = json.loads(text)
        worker = raw.pop("worker")
        if raw.get("devices") is not None:
            raw["devices"] = tuple(raw["devices"])
        for key in ("script_args", "bind_core_list", "output_ranks"):
            if worker.get(key) is not None:
                worker[key] = tuple(worker[key])
        return cls(worker=WorkerOptions(**worker), **raw)

    def to_b64(self) -> str:
        """Base64 JSON, for plan.py's placeholder command only: transports never put a spec in argv
        (its env may hold secrets, and argv is world-readable in /proc)."""
        return base64.urlsafe_b64encode(self.to_json().encode()).decode()

    @classmethod
    def from_b64(cls, text: str) -> "AgentSpec":
        return cls.from_json(base64.urlsafe_b64decode(text.encode()).decode())


@dataclass(frozen=True)
class Command:
    """One process the executor starts: on `host` (None = this machine) with exactly `argv`."""

    host: Optional[str]
    argv: Tuple[str, ...]
    env: Dict[str, str] = field(default_factory=dict)  # extra variables for this process only
    # The transport's typed settings for running this command (e.g. `SshOptions` as a dict); never
    # printed and never sent anywhere. The executor rebuilds its transport from them.
    options: Dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchPlan:
    """The frozen result of planning; `--dry_run` prints `to_dry_run()` as JSON."""

    world_info: Dict[str, List[int]]
    master_addr: str
    master_port: int
    launcher: str  # one of LAUNCHERS
    node_rank: Optional[int]
    env: Dict[str, str]
    commands: Tuple[Command, ...]
    agents: Tuple[AgentSpec, ...]
    job_id: str
    worker: WorkerOptions

    @property
    def world_size(self) -> int:
        return sum(len(slots) for slots in self.world_info.values())

    def to_dry_run(self) -> dict:
        """The `--dry_run` JSON; values of secret-looking variables print as `***` (launcher/redact.py),
        in `env` and inside `commands`."""
        from dsrun.launcher.redact import mask_argv, mask_env

        secrets = {**self.env, **{k: v for c in self.commands for k, v in c.env.items()}}
        return {
            "world_info": {host: list(slots) for host, slots in self.world_info.items()},
            "world_size": self.world_size,
            "master_addr": self.master_addr,
            "master_port": self.master_port,
            "launcher": self.launcher,
            "node_rank": self.node_rank,
            "commands": [{"host": c.host, "argv": mask_argv(c.argv, secrets)} for c in self.commands],
            "env": mask_env(self.env),
            "job_id": self.job_id,
        }


def encode_world_info(world_info: Dict[str, List[int]]) -> str:
    """DeepSpeed's `--world_info` encoding (urlsafe base64 of `json.dumps`), byte-identical."""
    return base64.urlsafe_b64encode(json.dumps(world_info).encode()).decode()


def decode_world_info(text: str) -> Dict[str, List[int]]:
    return json.loads(base64.urlsafe_b64decode(text.encode()).decode())

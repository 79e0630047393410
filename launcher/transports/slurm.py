"""The srun command line, with DeepSpeed 0.19.8's semantics (reference 4.6 and 7.2).

`-n` is the number of active slots; `-i`/`-e` become `--nodelist h1,h2 --nodes K`; `--num_nodes`
alone becomes `--nodes K`; `--num_gpus` becomes `--gpus-per-node G`. Filters srun cannot express are
rejected by `mpi.validate_resources("slurm", ..., same_count=True)` with the reference's messages.
Workers start through the same shim as MPI's (SLURM_PROCID and friends), and the environment rides
in srun's own environment with `--export=ALL`, never in a comma-separated `--export` list.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from dsrun.launcher.spec import Command, LaunchPlan, LaunchSpec
from dsrun.launcher.transports.base import Transport
from dsrun.launcher.transports.common import dumps_options
from dsrun.launcher.transports.mpi import reject_agent_flags, shim_argv, validate_resources, worker_env
from dsrun.launcher.transports.scheduler import run_scheduler

__all__ = ["SlurmOptions", "SlurmTransport"]


@dataclass(frozen=True)
class SlurmOptions:
    launcher_args: str = ""
    filtered: bool = False  # -i/-e given: name the nodes
    num_nodes: int = -1
    num_gpus: int = -1
    venv_script: Optional[str] = None  # only to reject it


class SlurmTransport(Transport):
    """`--launcher slurm`: one `srun` in the foreground (inside an allocation)."""

    name = "slurm"

    def __init__(self, options: SlurmOptions):
        self.options = options

    @classmethod
    def from_spec(cls, spec: LaunchSpec, launcher: str = "slurm") -> "SlurmTransport":
        return cls(SlurmOptions(launcher_args=spec.launcher_args, filtered=bool(spec.include or spec.exclude),
                                num_nodes=spec.num_nodes, num_gpus=spec.num_gpus, venv_script=spec.venv_script))

    @classmethod
    def from_options(cls, launcher: str, options: Mapping[str, object]) -> "SlurmTransport":
        return cls(SlurmOptions(**options))

    def validate(self, plan: LaunchPlan) -> None:
        validate_resources("slurm", plan.world_info, same_count=True)
        reject_agent_flags("slurm", plan, self.options.venv_script)

    def commands(self, plan: LaunchPlan) -> Tuple[Command, ...]:
        o = self.options
        argv = ["srun", "-n", str(plan.world_size), *shlex.split(o.launcher_args)]
        if o.filtered:
            argv += ["--nodelist", ",".join(plan.world_info), "--nodes", str(len(plan.world_info))]
        elif o.num_nodes > 0:
            argv += ["--nodes", str(o.num_nodes)]
        if o.num_gpus > 0:
            argv += ["--gpus-per-node", str(o.num_gpus)]
        argv.append("--export=ALL")
        return (Command(host=None, argv=tuple(argv + shim_argv(plan.worker)), env=worker_env(plan),
                        options=dumps_options(o)),)

    def run(self, plan: LaunchPlan) -> int:
        return run_scheduler(plan.commands[0], plan.worker.grace_period)

"""Multi-node launches: which transport starts a job on many hosts, composed in one table.

`plan()` (launcher/plan.py) calls `build_commands(spec, draft_plan)` for every launcher but local;
`execute()` (launcher/execute.py) calls `execute(plan)` for those plans. Every launcher is one
`Transport` (launcher/transports/base.py: `validate`, `commands`, `run`), built from the parsed flags
at plan time and rebuilt from its commands' typed options at run time.

| launcher | commands                                   | started per node            | transport |
|----------|--------------------------------------------|-----------------------------|-----------|
| ssh      | one per node: `ssh ... HOST LINE`          | the node agent              | transports/ssh.py (paramiko) |
| pdsh     | one: `pdsh -R exec ... relay ssh ... LINE` | the node agent              | transports/pdsh.py |
| openmpi, mpich, impi, mvapich | one: `mpirun ...`     | the mpi_worker shim per rank | transports/mpi.py |
| slurm    | one: `srun ...`                            | the mpi_worker shim per rank | transports/slurm.py |

Node agents get their spec on stdin, never in argv, and report failures with one marker that the
driver merges into a job-level `failure.json` (transports/common.py: [Note: remote command line],
[Note: spec on stdin], [Note: one failure model]).
"""
from __future__ import annotations

from typing import Dict, Tuple, Type

from dsrun.errors import LaunchError, UsageError
from dsrun.launcher.spec import Command, LaunchPlan, LaunchSpec
from dsrun.launcher.transports.base import Transport
from dsrun.launcher.transports.mpi import MPI_LAUNCHERS, MpiTransport
from dsrun.launcher.transports.pdsh import PdshTransport
from dsrun.launcher.transports.slurm import SlurmTransport
from dsrun.launcher.transports.ssh import SshTransport

__all__ = ["TRANSPORTS", "REMOTE_LAUNCHERS", "transport_for", "build_commands", "execute"]

TRANSPORTS: Dict[str, Type[Transport]] = {"ssh": SshTransport, "pdsh": PdshTransport,
                                          **{name: MpiTransport for name in MPI_LAUNCHERS}, "slurm": SlurmTransport}
REMOTE_LAUNCHERS = tuple(TRANSPORTS)


def _transport_class(launcher: str) -> Type[Transport]:
    if launcher not in TRANSPORTS:
        raise UsageError(f"unknown multi-node launcher {launcher!r}; choose one of {', '.join(REMOTE_LAUNCHERS)}",
                         where="--launcher")
    return TRANSPORTS[launcher]


def transport_for(spec: LaunchSpec, launcher: str) -> Transport:
    """The transport for `--launcher launcher` with the options of `spec` (UsageError if it cannot honour them)."""
    return _transport_class(launcher).from_spec(spec, launcher)


def build_commands(spec: LaunchSpec, plan: LaunchPlan) -> Tuple[Command, ...]:
    """The commands that start `plan` (whose `commands` is still empty) with `plan.launcher`. Pure."""
    transport = transport_for(spec, plan.launcher)
    transport.validate(plan)
    return transport.commands(plan)


def execute(plan: LaunchPlan) -> int:
    """Run a multi-node plan to the end; returns dsrun's exit code (the root cause's, or 128+N)."""
    if plan.launcher not in TRANSPORTS or not plan.commands:
        raise LaunchError(f"nothing for the multi-node executor to run (launcher {plan.launcher!r}); local and "
                          "--no_ssh plans run in process (launcher/execute.py)")
    transport = _transport_class(plan.launcher).from_options(plan.launcher, plan.commands[0].options)
    return transport.run(plan)

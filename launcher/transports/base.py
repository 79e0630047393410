"""The transport interface: how a multi-node plan is checked, rendered and run.

One implementation per `--launcher` (ssh.py, pdsh.py, mpi.py for the MPI family, slurm.py), composed
in launcher/multinode.py. A transport is built twice from the same typed options: at plan time from
the `LaunchSpec` (`from_spec`), and at run time from the options its commands carry
(`Command.options`, `from_options`), so the executor never re-parses a command line.
"""
from __future__ import annotations

import abc
from typing import Mapping, Tuple

from dsrun.launcher.spec import Command, LaunchPlan, LaunchSpec

__all__ = ["Transport"]


class Transport(abc.ABC):
    """Starts one multi-node plan; `validate` and `commands` are pure, `run` starts processes."""

    name: str

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, spec: LaunchSpec, launcher: str) -> "Transport":
        """The transport for `--launcher launcher`, its options taken from the parsed flags; raises
        UsageError for flags it cannot honour."""

    @classmethod
    @abc.abstractmethod
    def from_options(cls, launcher: str, options: Mapping[str, object]) -> "Transport":
        """The same transport rebuilt from `Command.options` (what `commands()` recorded)."""

    @abc.abstractmethod
    def validate(self, plan: LaunchPlan) -> None:
        """Raise UsageError for what this transport cannot do with `plan` (nothing is started)."""

    @abc.abstractmethod
    def commands(self, plan: LaunchPlan) -> Tuple[Command, ...]:
        """The commands that start `plan` (what `--dry_run` prints), each carrying this transport's
        options. Pure."""

    @abc.abstractmethod
    def run(self, plan: LaunchPlan) -> int:
        """Run the plan to the end; returns dsrun's exit code (design.md, "Exit codes")."""

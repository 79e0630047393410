"""Run a `LaunchPlan`: in process for this node alone, through `multinode` otherwise.

Local jobs (`--launcher local`, chosen for one node) and `--no_ssh` jobs (each node runs its own
`dsrun --node_rank N`) have exactly one agent: this node's. Running it in the dsrun process itself
saves a second Python start-up and keeps the pid the user sees (and `--save_pid` writes) the one that
owns the ranks. Every other launcher is the multi-node executor's business (launcher/multinode.py).

[Note: start and end lines] `execute()` prints one line on stderr before anything starts (job id, ranks
per host, backend, master, the job's log folder) and one when the job has ended (exit code, wall time,
the failure record). The start line and a successful end line are info (hidden by `-q` and
`--log_level warning`); a failed end line is an error and always printed.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, Optional

from dsrun.launcher.failure import default_log_dir
from dsrun.launcher.spec import LaunchPlan

__all__ = ["execute", "runs_in_process", "record_dir", "start_line", "end_line"]


def runs_in_process(plan: LaunchPlan) -> bool:
    """True when this process should be the node agent: local jobs, and `--no_ssh` (a node_rank is set
    and the plan holds this node's agent only)."""
    if plan.launcher == "local":
        return True
    return plan.node_rank is not None and len(plan.agents) == 1


def execute(plan: LaunchPlan, stream: Optional[IO[str]] = None) -> int:
    """Run the plan to completion and return dsrun's exit code (design.md, "Exit codes"). Prints the start
    and end lines on `stream` (default stderr): [Note: start and end lines]."""
    stream = stream if stream is not None else sys.stderr
    level = logging.getLevelName(plan.worker.log_level.upper())
    verbose = not isinstance(level, int) or level <= logging.INFO
    if verbose:
        _say(stream, start_line(plan))
    started = time.monotonic()
    record = None
    if runs_in_process(plan):
        from dsrun.launcher.agent import NodeAgent

        agent = NodeAgent(plan.agents[0])
        code = agent.run()
        record = agent.record_path
    else:
        from dsrun.launcher import multinode

        code = multinode.execute(plan)
        if code != 0:
            path = os.path.join(os.path.abspath(record_dir(plan)), "failure.json")
            record = path if os.path.isfile(path) else None
    if code != 0 or verbose:
        _say(stream, end_line(plan, code, time.monotonic() - started, record))
    return code


def record_dir(plan: LaunchPlan) -> str:
    """The job's log folder: where its failure record and the ranks' error files go (the agent's and the
    multi-node driver's rule: `--log_dir`, else the `--enable_each_rank_log` folder, else
    `<tmp>/<job id>`)."""
    worker = plan.worker
    if worker.log_dir:
        return worker.log_dir
    if worker.each_rank_log_dir:
        if runs_in_process(plan):  # the folder may be shared by other jobs: one subfolder per job
            return os.path.join(worker.each_rank_log_dir, plan.job_id.replace(os.sep, "_"))
        return worker.each_rank_log_dir
    return default_log_dir(plan.job_id)


def start_line(plan: LaunchPlan) -> str:
    """`dsrun: starting dsrun-1a2b3c4d: 2 ranks (localhost: 2), backend gloo, master 127.0.0.1:29500,
    logs /tmp/dsrun-1a2b3c4d`. The backend is a guess from GPU presence: the script chooses."""
    hosts = plan.world_info
    if len(hosts) <= 4:
        where = ", ".join(f"{host}: {len(slots)}" for host, slots in hosts.items())
    else:
        counts = sorted(len(slots) for slots in hosts.values())
        where = f"{len(hosts)} hosts, {counts[0]}" + (f"-{counts[-1]}" if counts[-1] != counts[0] else "") + " per host"
    gpus = any(agent.devices is None or agent.devices for agent in plan.agents)
    logs = record_dir(plan)
    text = (f"dsrun: starting {plan.job_id}: {plan.world_size} rank{'s' if plan.world_size != 1 else ''} ({where}), "
            f"backend {'nccl' if gpus else 'gloo'}, master {plan.master_addr}:{plan.master_port}, logs {logs}")
    if plan.worker.each_rank_log_dir and plan.worker.each_rank_log_dir not in logs:
        text += f", rank logs {plan.worker.each_rank_log_dir}"
    return text


def end_line(plan: LaunchPlan, code: int, seconds: float, record: Optional[str]) -> str:
    """`dsrun: dsrun-1a2b3c4d finished: exit code 0 after 12.3 s`, or `... failed: exit code 1 after 4.0 s;
    failure record /tmp/dsrun-1a2b3c4d/failure.json`."""
    text = f"dsrun: {plan.job_id} {'finished' if code == 0 else 'failed'}: exit code {code} after {seconds:.1f} s"
    if code != 0:
        text += f"; failure record {record}" if record else "; no failure record written"
    return text


def _say(stream: IO[str], line: str) -> None:
    try:
        stream.write(line + "\n")
        stream.flush()
    except (BrokenPipeError, ValueError):
        pass

"""Job-scoped teardown on one node: `python -m dsrun.launcher.transports.node_entry --kill JOB_ID
[--grace S]` stops only that job's node agents (the pdsh transport runs it on every node).

Agents are found by the `--job_id` in their argv (the spec itself is never in argv: [Note: spec on
stdin] in common.py), never by a process name. Kept torch-free and import-light.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import List, Optional

__all__ = ["main", "agent_job_id", "find_job_processes", "kill_job"]

_AGENT_MODULE = "dsrun.launcher.agent"


def agent_job_id(cmdline: List[str]) -> Optional[str]:
    """The job id of a dsrun node agent's command line (`-m dsrun.launcher.agent --job_id ID`), else None."""
    if _AGENT_MODULE not in cmdline:
        return None
    for i, arg in enumerate(cmdline[:-1]):
        if arg == "--job_id":
            return cmdline[i + 1]
    return None


def find_job_processes(job_id: str):
    """This machine's agents for `job_id` (matched on their `--job_id`, never on a process name)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid != os.getpid() and agent_job_id(proc.info.get("cmdline") or []) == job_id:
            found.append(proc)
    return found


def kill_job(job_id: str, grace: float) -> int:
    """SIGTERM this job's agents (they tear their ranks down), SIGKILL any left after `grace` plus a margin."""
    import psutil

    agents = find_job_processes(job_id)
    for proc in agents:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(agents, timeout=grace + 5.0)
    for proc in alive:
        try:
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()
        except psutil.Error:
            pass
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsrun.launcher.transports.node_entry")
    parser.add_argument("--kill", metavar="JOB_ID", required=True)
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args(argv)
    return kill_job(args.kill, args.grace)


if __name__ == "__main__":
    sys.exit(main())

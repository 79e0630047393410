"""Transports that start node agents (ssh, pdsh) or workers (the MPI family, slurm) on other hosts.

Each module holds one `Transport` (base.py: `validate`, `commands`, `run`) with its typed options;
launcher/multinode.py composes them. What they share (the agent's command line, the spec on stdin,
the signal trap, the job-level failure record) is in common.py. Only `ssh` imports paramiko, and
only when it runs, so that `dsrun --help` stays light.
"""

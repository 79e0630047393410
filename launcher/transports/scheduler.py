"""Running a scheduler's launcher (mpirun, srun) in the foreground: it starts and tears down the ranks.

dsrun's part is to tie it to dsrun's life (PR_SET_PDEATHSIG=SIGTERM: it ends its ranks when dsrun
dies, even by SIGKILL), forward SIGINT/SIGTERM (SIGHUP as SIGTERM) through the one `SignalTrap`, and
map its exit status to dsrun's exit code.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess

from dsrun.errors import LaunchError
from dsrun.launcher.spec import Command
from dsrun.launcher.transports.common import SignalTrap

__all__ = ["run_scheduler"]

_MARGIN_S = 10.0


def run_scheduler(command: Command, grace: float) -> int:
    """Run `command` to the end; returns its exit code, 128+N after dsrun received signal N."""
    from dsrun.launcher.procs import preexec_tied_to

    binary = command.argv[0]
    if shutil.which(binary) is None:
        raise LaunchError(f"the launcher needs `{binary}`, which is not on PATH",
                          hint="install it, or use the default --launcher ssh")
    proc = subprocess.Popen(list(command.argv), env={**os.environ, **command.env},
                            preexec_fn=preexec_tied_to(os.getpid(), signal.SIGTERM))

    def forward(signum: int) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    with SignalTrap(on_signal=forward) as trap:
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # off the main thread no trap is installed
            code = proc.wait()
        if trap.signum and proc.poll() is None:
            try:
                proc.wait(grace + _MARGIN_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if trap.signum:
        return 128 + trap.signum
    return 128 - code if code < 0 else code

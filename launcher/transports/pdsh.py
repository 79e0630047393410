"""The pdsh transport: one `pdsh -R exec` process starts every node's agent through ssh.

[Note: pdsh node rank] pdsh substitutes `%n` with the host's index in `-w` (hostfile order; pdsh does
not sort a `-w` list), `%h` with the host and `%u` with the remote user. The per-host command is the
relay of [Note: pdsh relay] (transports/pdsh_relay.py) around `ssh [PDSH_SSH_ARGS or -2 -a -x]
-oConnectTimeout=T [PDSH_SSH_ARGS_APPEND] [-p PORT] %h LINE`, the ssh command pdsh's own ssh module
would run, where LINE starts `agent --job_id ID --node_rank %n --lifeline stdin`. The relay hands
each agent the spec on its stdin, so no spec is ever in an argv here or on the nodes.

Lifeline: pdsh runs in its own session (a terminal's Ctrl-C reaches dsrun alone, which stops the job in
order) with PR_SET_PDEATHSIG=SIGKILL, so it ends with dsrun even on SIGKILL; then every
relay's feeder sees EOF, every ssh's stdin closes and every agent tears its ranks down.

Fail fast: pdsh reports each host's exit status on stderr (`pdsh@x: HOST: ssh exited with exit code
N`). A node that ends non-zero (255: ssh could not connect) or an agent's failure report stops every
other node with a job-scoped kill run over pdsh (`node_entry --kill <job_id>`: SIGTERM to the agents
whose argv carries that job id, nothing by name); pdsh is then left to exit so every node's report is
read; if it has not ended a few seconds after that kill, it is stopped, which closes every lifeline.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from dsrun.errors import LaunchError, UsageError
from dsrun.launcher.spec import Command, LaunchPlan, LaunchSpec
from dsrun.launcher.transports.base import Transport
from dsrun.launcher.transports.common import (NODE_ENTRY_MODULE, UNREACHABLE_EXIT, JobOutcome, LinePump,
                                              SignalTrap, agent_argv, dumps_options, remote_line, spec_line,
                                              stderr_bytes, stdout_bytes)

__all__ = ["PdshOptions", "PdshTransport", "pdsh_env", "spec_dir"]

TEARDOWN_MARGIN_S = 10.0  # beyond the grace period, for the job-scoped kill over pdsh
SETTLE_S = 5.0  # after that kill, for pdsh to collect the last reports and exit
RELAY_MODULE = "dsrun.launcher.transports.pdsh_relay"
_NODE_RANK = "@@NODE_RANK@@"  # stands for pdsh's %n until the line is escaped
_EXIT_LINE = re.compile(r"^pdsh@[^:]*: (.+?): \S+ exited with exit code (\d+)\s*$")


@dataclass(frozen=True)
class PdshOptions:
    """What the pdsh transport needs besides the plan: flags and pdsh's ssh variables, read at plan time."""

    launcher_args: str = ""
    ssh_port: Optional[int] = None
    connect_timeout: float = 10.0
    ssh_args: str = ""  # PDSH_SSH_ARGS: replaces pdsh's default `-2 -a -x %h`
    ssh_args_append: str = ""  # PDSH_SSH_ARGS_APPEND
    venv_script: Optional[str] = None


def pdsh_env(environ: Mapping[str, str], ssh_port: Optional[int]) -> Dict[str, str]:
    """pdsh's own environment additions; `--ssh_port` is appended to PDSH_SSH_ARGS_APPEND, not replacing it."""
    env = {"PDSH_RCMD_TYPE": "ssh"}
    if ssh_port is not None:
        old = environ.get("PDSH_SSH_ARGS_APPEND", "").strip()
        env["PDSH_SSH_ARGS_APPEND"] = f"{old} -p {ssh_port}".strip()
    return env


def spec_dir(job_id: str) -> str:
    """The private (0700) folder that holds the spec's per-node links while the relays read them."""
    return os.path.join(tempfile.gettempdir(), f"{job_id}-spec")


class PdshTransport(Transport):
    """`--launcher pdsh`: see the module docstring."""

    name = "pdsh"

    def __init__(self, options: PdshOptions):
        self.options = options

    @classmethod
    def from_spec(cls, spec: LaunchSpec, launcher: str = "pdsh") -> "PdshTransport":
        words = shlex.split(spec.launcher_args)
        for flag, hint in (("-R", "dsrun runs ssh itself through pdsh's exec module; put ssh options in "
                                  "PDSH_SSH_ARGS_APPEND"),
                           ("-t", "use --ssh_connect_timeout")):
            if any(w == flag or (w.startswith(flag) and len(w) > 2 and not w.startswith("--")) for w in words):
                raise UsageError(f"pdsh option {flag} cannot be used with dsrun's pdsh transport",
                                 where="--launcher_args", hint=hint)
        return cls(PdshOptions(launcher_args=spec.launcher_args, ssh_port=spec.ssh_port,
                               connect_timeout=spec.ssh_connect_timeout,
                               ssh_args=spec.environ.get("PDSH_SSH_ARGS", ""),
                               ssh_args_append=spec.environ.get("PDSH_SSH_ARGS_APPEND", ""),
                               venv_script=spec.venv_script))

    @classmethod
    def from_options(cls, launcher: str, options: Mapping[str, object]) -> "PdshTransport":
        return cls(PdshOptions(**options))

    def validate(self, plan: LaunchPlan) -> None:
        if len(plan.agents) != len(plan.world_info):
            raise UsageError(f"pdsh needs one agent per host, got {len(plan.agents)} for {len(plan.world_info)} "
                             "hosts", where="--launcher")

    def _prefix(self, plan: LaunchPlan) -> List[str]:
        # The fan-out must cover every host: sessions stay open for the whole job, so a node beyond the
        # fan-out would only start once another node's agent had finished.
        fanout = max(1024, len(plan.world_info))
        return ["pdsh", "-S", "-N", "-f", str(fanout), "-w", ",".join(plan.world_info),
                *shlex.split(self.options.launcher_args)]

    def ssh_argv(self, line: str, hosts: Sequence[str] = ()) -> List[str]:
        """The ssh command the relay execs for one host (`%h`, `%u` left for pdsh), as pdsh's ssh module
        builds it: `-l%u` only when a user was named (`-l` or `user@host`), else ~/.ssh/config decides."""
        o = self.options
        named = any(w.startswith("-l") for w in shlex.split(o.launcher_args)) or any("@" in h for h in hosts)
        user = ["-l%u"] if named else []
        template = shlex.split(o.ssh_args) if o.ssh_args.strip() else ["-2", "-a", "-x", *user, "%h"]
        port = ["-p", str(o.ssh_port)] if o.ssh_port is not None else []
        return ["ssh", f"-oConnectTimeout={o.connect_timeout:g}", *template, *shlex.split(o.ssh_args_append),
                *port, line]

    def commands(self, plan: LaunchPlan) -> Tuple[Command, ...]:
        agent = plan.agents[0]
        # pdsh rewrites `%` sequences in every word of an exec command: our words are escaped (`%%`)
        # and only then get their `%n`; PDSH_SSH_ARGS* keep their `%h`/`%u` on purpose.
        line = remote_line(agent.cwd, agent_argv(plan.worker.python, plan.job_id, node_rank=_NODE_RANK),
                           self.options.venv_script)
        line = _literal(line).replace(_NODE_RANK, "%n")
        spec_file = _literal(os.path.join(spec_dir(plan.job_id), "node-")) + "%n"
        relay = [_literal(plan.worker.python), "-m", RELAY_MODULE, spec_file]
        argv = self._prefix(plan) + ["-R", "exec", *relay, *self.ssh_argv(line, list(plan.world_info))]
        return (Command(host=None, argv=tuple(argv), options=dumps_options(self.options)),)

    def kill_command(self, plan: LaunchPlan) -> Command:
        """A pdsh command (ssh module), on the same hosts, that stops only this job's agents."""
        line = " ".join(shlex.quote(a) for a in [plan.worker.python, "-m", NODE_ENTRY_MODULE, "--kill",
                                                 plan.job_id, "--grace", f"{plan.worker.grace_period:g}"])
        env = pdsh_env({"PDSH_SSH_ARGS_APPEND": self.options.ssh_args_append}, self.options.ssh_port)
        return Command(host=None, argv=tuple(self._prefix(plan) + [line]), env=env)

    def run(self, plan: LaunchPlan) -> int:
        _check_pdsh()
        directory = _write_spec_links(plan)
        try:
            return _PdshRun(self, plan, directory).run()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _literal(word: str) -> str:
    """`word` as pdsh's exec module passes it through unchanged."""
    return word.replace("%", "%%")


def _check_pdsh() -> None:
    if shutil.which("pdsh") is None:
        raise LaunchError("--launcher pdsh needs `pdsh`, which is not on PATH",
                          hint="install it, or use the default --launcher ssh")
    try:
        version = subprocess.run(["pdsh", "-V"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"`pdsh -V` failed: {e}") from None
    modules = re.search(r"rcmd modules:\s*([\w,]+)", version.stdout + version.stderr)
    found = set(modules.group(1).split(",")) if modules else set()
    if not {"exec", "ssh"} <= found:
        raise LaunchError(f"this pdsh lacks the exec or ssh rcmd module (it has: {', '.join(sorted(found)) or '?'})",
                          hint="install a pdsh built with both (Debian/Ubuntu's `pdsh` package is)")


def _write_spec_links(plan: LaunchPlan) -> str:
    """One 0600 copy of the spec with a hard link per node (`node-<n>`, unlinked by that node's relay)."""
    directory = spec_dir(plan.job_id)
    try:
        os.mkdir(directory, 0o700)  # fails if it exists: never write into a folder someone planted
    except OSError as e:
        raise LaunchError(f"cannot create the private folder {directory} for the launch spec: {e.strerror}",
                          hint="remove it if it is left over from an earlier run") from None
    source = os.path.join(directory, "spec.json")
    try:
        fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(spec_line(plan.agents[0]))
        for node_rank in range(len(plan.world_info)):
            os.link(source, os.path.join(directory, f"node-{node_rank}"))
        os.unlink(source)
    except OSError as e:
        shutil.rmtree(directory, ignore_errors=True)
        raise LaunchError(f"cannot write the launch spec into {directory}: {e.strerror}") from None
    return directory


class _PdshRun:
    """One pdsh launch: the process, its output pumps, per-host exit statuses and the teardown."""

    def __init__(self, transport: PdshTransport, plan: LaunchPlan, directory: str):
        self.transport, self.plan, self.directory = transport, plan, directory
        self.outcome = JobOutcome(plan)
        self.statuses: Dict[str, int] = {}  # hostfile name -> exit status pdsh reported
        self._names = {host.rpartition("@")[2]: host for host in plan.world_info}
        self._changed = threading.Event()
        self._stopping = False  # we are interrupting pdsh: its "interrupt" chatter is not for the user

    def _on_report(self, report: dict) -> None:
        self.outcome.add_report(report)
        if report.get("exitcode"):
            self._changed.set()

    def _on_stderr(self, line: str) -> bool:
        match = _EXIT_LINE.match(line)
        if not match:
            return self._stopping and line.startswith(("pdsh@", "sending signal"))
        host = self._names.get(match.group(1), match.group(1))
        self.statuses[host] = int(match.group(2))
        self._changed.set()
        return True  # summarised in the failure report instead

    def run(self) -> int:
        from dsrun.launcher.procs import preexec_tied_to  # pdsh dies with dsrun, even on SIGKILL

        command = self.transport.commands(self.plan)[0]
        lock = threading.Lock()
        with SignalTrap() as trap:
            proc = subprocess.Popen(list(command.argv), env={**os.environ, **command.env}, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                    preexec_fn=preexec_tied_to(os.getpid(), signal.SIGKILL))
            pumps = [LinePump(proc.stdout, stdout_bytes(), lock, on_report=self._on_report, name="pdsh-out"),
                     LinePump(proc.stderr, stderr_bytes(), lock, on_line=self._on_stderr, name="pdsh-err")]
            for pump in pumps:
                pump.start()
            self._supervise(proc, trap)
            for pump in pumps:
                pump.join(5)
        for host, status in self.statuses.items():
            if status != 0 and not self.outcome.has_report(host):
                self.outcome.node_lost(host, status, _reason(status))
        if proc.returncode and not self.statuses and not self.outcome.reports and not trap.signum:
            return proc.returncode  # pdsh itself failed (its message is above)
        return self.outcome.finish(trap.signum)

    def _supervise(self, proc: subprocess.Popen, trap: SignalTrap) -> None:
        settle_by = None
        while proc.poll() is None:
            self._forget_spec_when_read()
            bad = any(self.statuses.values()) or any(r.exitcode for r in self.outcome.reports)
            if settle_by is None and (trap.signum or bad):
                self._stop_nodes()  # returns once the agents it found are gone (bounded)
                settle_by = time.monotonic() + SETTLE_S
            if settle_by is not None and time.monotonic() > settle_by:
                # An agent that was still starting when the kill ran, or a node that cannot be reached
                # for the kill: ending pdsh closes every lifeline.
                self._stopping = True
                _stop_pdsh(proc)
            self._changed.wait(0.05)
            self._changed.clear()

    def _forget_spec_when_read(self) -> None:
        if self.directory and os.path.isdir(self.directory) and not os.listdir(self.directory):
            shutil.rmtree(self.directory, ignore_errors=True)  # every relay has read and unlinked its link

    def _stop_nodes(self) -> None:
        kill = self.transport.kill_command(self.plan)
        try:
            subprocess.run(list(kill.argv), env={**os.environ, **kill.env}, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=self.plan.worker.grace_period + TEARDOWN_MARGIN_S)
        except subprocess.TimeoutExpired:
            pass  # the lifeline still ends the agents once pdsh is stopped


def _reason(status: int) -> str:
    if status == UNREACHABLE_EXIT:
        return "ssh could not connect or log in (exit 255); is the host up and reachable with ssh?"
    return f"its agent exited with {status} without a report (its message is above)"


def _stop_pdsh(proc: subprocess.Popen) -> None:
    # pdsh ends on a second SIGINT within one second; the relays' feeders then see EOF,
    # closing every lifeline.
    for _ in range(2):
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.1)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

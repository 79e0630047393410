"""The ssh transport (paramiko): one session per node runs that node's agent, with a stdin lifeline.

Plan side (pure): `SshTransport.commands()` renders a node's launch as an OpenSSH-style argv, `ssh
[-p P] [-i KEY] -o BatchMode=yes -o ConnectTimeout=T -o StrictHostKeyChecking=yes|accept-new HOST
LINE`, which is what `--dry_run` shows and what an OpenSSH client would also run; the typed
`SshOptions` ride in `Command.options` for the run side.

Run side: `SshTransport.run(plan)` connects to every host in parallel (at most `max_parallel`
handshakes at once), reads `~/.ssh/config` (HostName, Port, User, IdentityFile, UserKnownHostsFile),
checks host keys against known_hosts, and only then starts every agent, so a launch either starts
on all nodes or on none. One `LaunchError` lists every host that failed to connect. Each agent then
gets its spec as one line on its stdin ([Note: spec on stdin] in common.py).

[Note: ssh lifeline] Each agent runs with `--lifeline stdin`, and after the spec line we never write
to the channel again. When dsrun exits, is killed, or the connection drops, the channel closes, the
agent reads EOF and tears down its own ranks (job-scoped: nothing is killed by name). When one node
fails, we send EOF (`shutdown_write`) to every other node, wait one grace period (plus a margin) for
their agents to report and exit, then close what is left.
"""
from __future__ import annotations

import getpass
import os
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from dsrun.errors import LaunchError, UsageError
from dsrun.launcher.spec import AgentSpec, Command, LaunchPlan, LaunchSpec
from dsrun.launcher.transports.base import Transport
from dsrun.launcher.transports.common import (JobOutcome, LinePump, SignalTrap, agent_argv, dumps_options,
                                              remote_line, spec_line, stderr_bytes, stdout_bytes)

__all__ = ["SshOptions", "SshTransport", "ssh_command", "HostTarget", "resolve_target", "connect_all"]

TEARDOWN_MARGIN_S = 10.0


@dataclass(frozen=True)
class SshOptions:
    """How the ssh transport connects; built from the `--ssh_*` flags, never from an argv."""

    port: Optional[int] = None  # --ssh_port; overrides ~/.ssh/config's Port, as `ssh -p` does
    connect_timeout: float = 10.0  # TCP connect, banner and authentication, each
    accept_unknown_hosts: bool = False  # OpenSSH's accept-new: record unknown keys, refuse changed ones
    max_parallel: int = 64  # handshakes in flight at once
    identity_file: Optional[str] = None  # overrides ~/.ssh/config's IdentityFile
    venv_script: Optional[str] = None  # sourced on each node before the agent starts


def ssh_command(host: str, line: str, options: SshOptions) -> Command:
    """The plan's record of starting `line` on `host` over ssh."""
    argv = ["ssh"]
    if options.port is not None:
        argv += ["-p", str(options.port)]
    if options.identity_file:
        argv += ["-i", options.identity_file]
    argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={options.connect_timeout:g}",
             "-o", "StrictHostKeyChecking=" + ("accept-new" if options.accept_unknown_hosts else "yes"),
             host, line]
    return Command(host=host, argv=tuple(argv), options=dumps_options(options))


class SshTransport(Transport):
    """`--launcher ssh`: one paramiko session and agent per node."""

    name = "ssh"

    def __init__(self, options: SshOptions):
        self.options = options

    @classmethod
    def from_spec(cls, spec: LaunchSpec, launcher: str = "ssh") -> "SshTransport":
        if spec.launcher_args.strip():
            raise UsageError("--launcher_args is not used by the ssh launcher", where="--launcher_args",
                             hint="put ssh options in ~/.ssh/config, or use --launcher pdsh with --launcher_args")
        return cls(SshOptions(port=spec.ssh_port, connect_timeout=spec.ssh_connect_timeout,
                              accept_unknown_hosts=spec.ssh_accept_unknown_hosts,
                              max_parallel=spec.ssh_max_parallel, venv_script=spec.venv_script))

    @classmethod
    def from_options(cls, launcher: str, options: Mapping[str, object]) -> "SshTransport":
        return cls(SshOptions(**options))

    def validate(self, plan: LaunchPlan) -> None:
        if len(plan.agents) != len(plan.world_info):
            raise UsageError(f"ssh needs one agent per host, got {len(plan.agents)} for {len(plan.world_info)} "
                             "hosts", where="--launcher")

    def line(self, agent: AgentSpec) -> str:
        return remote_line(agent.cwd, agent_argv(agent.worker.python, agent.job_id), self.options.venv_script)

    def commands(self, plan: LaunchPlan) -> Tuple[Command, ...]:
        return tuple(ssh_command(agent.host, self.line(agent), self.options) for agent in plan.agents)

    def run(self, plan: LaunchPlan) -> int:
        return run_ssh(plan, self.options, [self.line(agent) for agent in plan.agents])


@dataclass(frozen=True)
class HostTarget:
    """Where and how to connect to one host, after `~/.ssh/config`."""

    host: str  # the name in the hostfile
    hostname: str
    port: int
    user: str
    key_filenames: Tuple[str, ...]
    known_hosts_files: Tuple[str, ...]


def _config_path() -> str:
    return os.path.join(os.path.expanduser("~"), ".ssh", "config")


def resolve_target(host: str, options: SshOptions, config_path: Optional[str] = None) -> HostTarget:
    """Apply `~/.ssh/config` to `host`; `--ssh_port` beats the config's Port."""
    import paramiko

    config_path = config_path or _config_path()
    config = paramiko.SSHConfig.from_path(config_path) if os.path.exists(config_path) else paramiko.SSHConfig()
    entry = config.lookup(host)
    known = entry.get("userknownhostsfile")
    known_files = [os.path.expanduser(p) for p in known.split()] if known else [
        os.path.join(os.path.expanduser("~"), ".ssh", "known_hosts")]
    known_files.append("/etc/ssh/ssh_known_hosts")
    wanted = [options.identity_file] if options.identity_file else entry.get("identityfile", [])
    keys = tuple(os.path.expanduser(p) for p in wanted if os.path.exists(os.path.expanduser(p)))
    return HostTarget(host=host, hostname=entry.get("hostname", host),
                      port=options.port if options.port is not None else int(entry.get("port", 22)),
                      user=entry.get("user") or getpass.getuser(), key_filenames=keys,
                      known_hosts_files=tuple(known_files))


def _accept_new_policy(known_hosts_file: str):
    """OpenSSH's `accept-new`: record an unknown host's key (a changed key is still refused)."""
    import paramiko

    class AcceptNew(paramiko.MissingHostKeyPolicy):
        lock = threading.Lock()

        def missing_host_key(self, client, hostname, key):
            client.get_host_keys().add(hostname, key.get_name(), key)
            try:
                with self.lock, open(known_hosts_file, "a") as f:
                    f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            except OSError:
                pass  # accepted for this launch; recording it is a convenience

    return AcceptNew()


def _describe_error(target: HostTarget, options: SshOptions, exc: BaseException) -> str:
    import paramiko

    where = f"{target.user}@{target.hostname}:{target.port}"
    if isinstance(exc, paramiko.BadHostKeyException):
        return (f"{where}: host key CHANGED (does not match known_hosts); refusing to connect. If the host "
                f"was reinstalled, remove its old key with `ssh-keygen -R '[{target.hostname}]:{target.port}'`")
    if isinstance(exc, paramiko.AuthenticationException):
        keys = ", ".join(target.key_filenames) or "default keys and agent"
        return f"{where}: authentication failed (tried {keys}); set IdentityFile/User in ~/.ssh/config"
    if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
        return (f"{where}: host key unknown (not in {', '.join(target.known_hosts_files[:-1])}); add it with "
                f"`ssh-keyscan -p {target.port} {target.hostname} >> ~/.ssh/known_hosts` after checking it, "
                f"or pass --ssh_accept_unknown_hosts")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"{where}: timed out after {options.connect_timeout:g}s"
    return f"{where}: {type(exc).__name__}: {exc}"


def _connect(target: HostTarget, options: SshOptions):
    import paramiko

    client = paramiko.SSHClient()
    for path in target.known_hosts_files:
        if os.path.exists(path):
            client.load_system_host_keys(path)
    if options.accept_unknown_hosts:
        client.set_missing_host_key_policy(_accept_new_policy(target.known_hosts_files[0]))
    else:
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(target.hostname, port=target.port, username=target.user,
                       key_filename=list(target.key_filenames) or None, timeout=options.connect_timeout,
                       banner_timeout=options.connect_timeout, auth_timeout=options.connect_timeout,
                       channel_timeout=options.connect_timeout, allow_agent=True,
                       look_for_keys=not target.key_filenames)
        client.get_transport().set_keepalive(15)
    except BaseException:
        client.close()
        raise
    return client


def connect_all(hosts: Sequence[str], options: SshOptions) -> Dict[str, object]:
    """Connect to every host, `options.max_parallel` at a time; one LaunchError names every failure."""
    def attempt(host):
        target = None
        try:
            target = resolve_target(host, options)
            return host, _connect(target, options), None
        except Exception as exc:  # noqa: BLE001 - every failure is reported per host
            if target is None:
                return host, None, f"{host}: {exc}"
            return host, None, _describe_error(target, options, exc)

    workers = max(1, min(options.max_parallel, len(hosts)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dsrun-ssh") as pool:
        results = list(pool.map(attempt, hosts))
    clients = {host: client for host, client, _ in results if client is not None}
    errors = [error for _, _, error in results if error]
    if errors:
        for client in clients.values():
            client.close()
        raise LaunchError(f"could not connect to {len(errors)} of {len(hosts)} hosts over ssh:\n  "
                          + "\n  ".join(errors), hint="check that `ssh <host> true` works without a prompt")
    return clients


class _RemoteAgent:
    """One node's running agent: its channel, spec feeder, output pumps and exit-status waiter."""

    def __init__(self, index: int, spec: AgentSpec, client, line: str, lock, events, outcome: JobOutcome):
        self.index, self.host, self.client = index, spec.host, client
        self.channel = client.get_transport().open_session()
        self.channel.exec_command(line)
        self.stdout = LinePump(self.channel.makefile("rb"), stdout_bytes(), lock, on_report=outcome.add_report,
                               name=f"out-{self.host}")
        self.stderr = LinePump(self.channel.makefile_stderr("rb"), stderr_bytes(), lock, name=f"err-{self.host}")
        self.stdout.start()
        self.stderr.start()
        # Written from a thread: a large spec blocks until the remote agent reads it, and nodes start
        # in parallel. After it, nothing more is written ([Note: ssh lifeline]).
        self.feeder = threading.Thread(target=self._feed, args=(spec_line(spec),), daemon=True,
                                       name=f"spec-{self.host}")
        self.feeder.start()
        self.waiter = threading.Thread(target=lambda: events.put((index, self.channel.recv_exit_status())),
                                       daemon=True, name=f"wait-{self.host}")
        self.waiter.start()

    def _feed(self, data: bytes) -> None:
        try:
            self.channel.sendall(data)
        except Exception:  # noqa: BLE001 - the session ended first; its exit status tells why
            pass

    def send_eof(self) -> None:
        try:
            self.channel.shutdown_write()
        except Exception:  # noqa: BLE001 - already closed is fine
            pass

    def close(self) -> None:
        try:
            self.channel.close()
        finally:
            self.client.close()

    def finished_output(self) -> None:
        self.stdout.join(2.0)
        self.stderr.join(0.5)


def run_ssh(plan: LaunchPlan, options: SshOptions, lines: Sequence[str]) -> int:
    """Start every node's agent over ssh, supervise them all, and return the job's exit code."""
    hosts = [agent.host for agent in plan.agents]
    clients = connect_all(hosts, options)
    lock = threading.Lock()
    events: "queue.Queue[Tuple[int, int]]" = queue.Queue()
    outcome = JobOutcome(plan)
    agents: List[_RemoteAgent] = []
    with SignalTrap() as trap:
        try:
            for index, (spec, line) in enumerate(zip(plan.agents, lines)):
                agents.append(_RemoteAgent(index, spec, clients[spec.host], line, lock, events, outcome))
        except Exception as exc:  # noqa: BLE001
            for agent in agents:
                agent.send_eof()
            for client in clients.values():
                client.close()
            raise LaunchError(f"could not start the agent on {hosts[len(agents)]}: {exc}") from exc
        _supervise(agents, events, trap, plan.worker.grace_period, outcome)
        for agent in agents:
            agent.close()
    return outcome.finish(trap.signum)


def _supervise(agents: List[_RemoteAgent], events, trap: SignalTrap, grace_period: float,
               outcome: JobOutcome) -> None:
    pending = {a.index for a in agents}
    teardown_at = None
    forced = False
    while pending:
        if trap.signum and teardown_at is None:
            teardown_at = _teardown(agents, pending)
        try:
            index, status = events.get(timeout=0.1)
        except queue.Empty:
            if (teardown_at is not None and not forced
                    and time.monotonic() > teardown_at + grace_period + TEARDOWN_MARGIN_S):
                forced = True  # the agents had their grace period; drop the connections (lifeline)
                for i in pending:
                    agents[i].close()
            continue
        pending.discard(index)
        agent = agents[index]
        agent.finished_output()
        if status != 0 and teardown_at is None:
            if not outcome.has_report(agent.host):
                why = "the ssh session closed without an exit status" if status < 0 else \
                    f"the agent exited with {status} before reporting (its message is above)"
                outcome.node_lost(agent.host, None if status < 0 else status, why)
            teardown_at = _teardown(agents, pending)  # a node ended badly: the others cannot go on


def _teardown(agents: List[_RemoteAgent], pending) -> float:
    for i in pending:
        agents[i].send_eof()
    return time.monotonic()

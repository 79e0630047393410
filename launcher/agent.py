"""The node agent: spawns this node's ranks, streams their output, supervises and tears them down.

One `NodeAgent` gets one `AgentSpec` (launcher/spec.py) and nothing else. `dsrun` runs it in process
for local and `--no_ssh` jobs; multi-node transports run `python -u -m dsrun.launcher.agent --job_id
ID [--lifeline stdin]` on each node and write the spec as the first line of its stdin (`main`).

Lifecycle of one attempt: install signal handlers (before anything is spawned), start supervising the
job's process tree (launcher/jobtree.py: a job cgroup where the system allows it, [Note: job cgroup],
else process groups, [Note: no orphans]; both with a guardian that outlives the agent), spawn every
local rank in its own session, then wait in one `select` over each rank's pidfd (exit seen within
milliseconds), output pipes, a signal wake-up pipe and, for remote agents, the lifeline (stdin: EOF
means the driver's connection dropped). The first failure, signal or lifeline EOF starts a teardown of
all ranks at once with one shared grace period (`WorkerOptions.grace_period`), then SIGKILL for
survivors. The same teardown ends a job whose ranks
all exited but left processes behind (a `setsid` daemon, a forgotten child): nothing the job started
is left running after it. With `--max_restarts N` a failed group is restarted whole (torchrun
semantics) with `DSRUN_RESTART_COUNT`/`TORCHELASTIC_RESTART_COUNT` incremented; a rank that could not
even be spawned is not restarted (pytorch#60910).

Exit code: the root-cause rank's own code (128+N for death by signal N); a signal to the agent itself
gives 128+signo unless a rank had already failed; lifeline EOF gives 129 (as SIGHUP).

[Note: per-rank log files] With `--enable_each_rank_log DIR`, as in DeepSpeed, each rank's stdout and
stderr go only to `DIR/<YYYYmmddHHMMSS>_rank<N>.<job_id>.log` (no console copy: the flag exists to keep
64 ranks off the terminal); the failure summary still shows the root cause's last lines, read back from
its file. With `WorkerOptions.tee` the agent reads the ranks' pipes and writes each chunk to the rank's
file as it comes (unbuffered, so the failure tail is complete) as well as to the console. The job id in
the name (DeepSpeed has none) keeps two jobs sharing DIR apart, and the failure record goes to
`DIR/<job_id>/failure.json` for the same reason (unless `--log_dir` is given).
"""
from __future__ import annotations

import argparse
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

from dsrun.errors import DsrunError, LaunchError
from dsrun.launcher import procs
from dsrun.launcher.failure import (FailureReport, RankFailure, default_log_dir, error_file_path, exit_code_for,
                                    read_error_file)
from dsrun.launcher.jobtree import JobTree
from dsrun.launcher.output import ConsoleWriter, RankStream, new_tail, print_failure
from dsrun.launcher.spec import AgentSpec, WorkerOptions

ERROR_FILE_ENV = "DSRUN_ERROR_FILE"  # read by runtime/rank_errors.py (which must not import the launcher)
CONSOLE_TTY_ENV = "DSRUN_CONSOLE_TTY"  # "1": dsrun's console is a terminal that shows `\r` updates in place
LOG_LEVEL_ENV = "DSRUN_LOG_LEVEL"  # read by runtime/log.py: the launcher's --log_level/-q for the ranks' logger

__all__ = ["NodeAgent", "worker_env", "worker_argv", "pid_file_path", "main"]

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_POLL_S = 0.05  # only used where pidfds are missing, and to watch process groups during teardown
_REAP_TIMEOUT_S = 5.0  # after SIGKILL; a rank still there is stuck in the kernel (D state)
_SCAN_S = 0.5  # without a job cgroup: how often new process groups among the descendants reach the guardian
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def pid_file_path(pid: int) -> str:
    """DeepSpeed's `--save_pid` file name, kept for tools that look for it."""
    return f"/tmp/{pid}.deepspeed"


def _node_has_gpus() -> bool:
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return os.path.exists("/dev/nvidia0")


def _core_list(worker: WorkerOptions) -> List[int]:
    if worker.bind_core_list:
        return list(worker.bind_core_list)
    import psutil

    return list(range(psutil.cpu_count(logical=False) or os.cpu_count() or 1))


def worker_env(spec: AgentSpec, local_rank: int, *, restart_count: int = 0, base: Mapping[str, str],
               has_gpus: bool = False) -> Dict[str, str]:
    """The environment of one rank: a new dict = `base` + `spec.env` + the worker contract variables."""
    hosts = list(spec.world_info)
    slots = spec.world_info[spec.host]
    first_rank = sum(len(spec.world_info[h]) for h in hosts[:spec.node_rank])
    local_size, world_size = len(slots), spec.world_size
    rank = first_rank + local_rank
    env = dict(base)
    env.update(spec.env)
    env.update({
        "RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size),
        "LOCAL_SIZE": str(local_size), "LOCAL_WORLD_SIZE": str(local_size),
        "NODE_RANK": str(spec.node_rank), "GROUP_RANK": str(spec.node_rank),
        "CROSS_RANK": str(spec.node_rank), "CROSS_SIZE": str(len(hosts)), "GROUP_WORLD_SIZE": str(len(hosts)),
        "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world_size), "ROLE_NAME": "default",
        "MASTER_ADDR": spec.master_addr, "MASTER_PORT": str(spec.master_port),
        "DSRUN_JOB_ID": spec.job_id, "TORCHELASTIC_RUN_ID": spec.job_id,
        "DSRUN_RESTART_COUNT": str(restart_count), "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(spec.worker.max_restarts),
        "PYTHONUNBUFFERED": "1",
        LOG_LEVEL_ENV: str(spec.worker.log_level).lower(),
    })
    devices = getattr(spec, "devices", None)
    if devices:  # the planner mapped this node's slots onto physical ids (keeps a scheduler's mask)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    elif devices is None and has_gpus:  # DeepSpeed's launch.py: the node's slot ids, same for every rank
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(s) for s in slots)
    if spec.worker.bind_cores_to_rank:
        env["OMP_NUM_THREADS"] = str(_cores_per_rank(spec.worker, local_rank, local_size))
    return env


def _cores_per_rank(worker: WorkerOptions, local_rank: int, local_size: int) -> int:
    try:  # the planner's slicing, so OMP_NUM_THREADS always matches the numactl prefix
        from dsrun.launcher.argv import cores_for_rank
    except ImportError:
        cores_for_rank = None
    if cores_for_rank is not None:
        return len(cores_for_rank(worker, local_rank, local_size))
    per_rank = len(_core_list(worker)) // local_size
    if per_rank < 1:
        raise LaunchError(f"{local_size} ranks but only {len(_core_list(worker))} cores to bind",
                          where="--bind_cores_to_rank", hint="give --bind_core_list more cores or use fewer ranks")
    return per_rank


def _ranges(cores: List[int]) -> str:
    parts, start = [], None
    for i, core in enumerate(cores):
        if start is None:
            start = core
        if i + 1 == len(cores) or cores[i + 1] != core + 1:
            parts.append(str(start) if start == core else f"{start}-{core}")
            start = None
    return ",".join(parts)


def _fallback_worker_argv(worker: WorkerOptions, local_rank: int, local_size: int) -> List[str]:
    argv: List[str] = []
    if worker.bind_cores_to_rank:
        cores = _core_list(worker)
        per = len(cores) // local_size
        argv += ["numactl", "-C", _ranges(cores[per * local_rank:per * (local_rank + 1)])]
    if not worker.no_python:
        argv += [worker.python, "-u"] + (["-m"] if worker.module else [])
    argv.append(worker.script)
    if not worker.no_local_rank:
        argv.append(f"--local_rank={local_rank}")
    return argv + list(worker.script_args)


def worker_argv(worker: WorkerOptions, local_rank: int, local_size: int) -> List[str]:
    """The planner's `worker_argv` (one serializer for every mode) when available, else ours."""
    try:
        from dsrun.launcher.argv import worker_argv as planned
    except ImportError:
        return _fallback_worker_argv(worker, local_rank, local_size)
    return list(planned(worker, local_rank, local_size))


@dataclass
class _Rank:
    rank: int
    local_rank: int
    proc: Optional[subprocess.Popen] = None
    pidfd: Optional[int] = None
    pipes: Dict[int, tuple] = field(default_factory=dict)  # fd -> (RankStream, is_stderr, file object)
    tail: object = field(default_factory=new_tail)
    log_file: Optional[str] = None
    log: Optional[object] = None  # the rank's log file, open while its pipes are read (tee)
    error_file: Optional[str] = None  # where the rank records an uncaught exception (runtime/rank_errors.py)
    returncode: Optional[int] = None

    @property
    def pgid(self) -> int:
        return self.proc.pid


class NodeAgent:
    """Runs one node's ranks to completion; `run()` returns the exit code for this node."""

    def __init__(self, spec: AgentSpec, *, lifeline_fd: Optional[int] = None, emit_marker: bool = False,
                 out=None, err=None, environ: Optional[Mapping[str, str]] = None):
        self.spec = spec
        self.worker = spec.worker
        self.host = spec.host
        self.local_size = len(spec.world_info[self.host])
        self._lifeline_fd = lifeline_fd
        self._emit_marker = emit_marker
        self._environ = dict(os.environ if environ is None else environ)
        self.console = ConsoleWriter(multi_node=len(spec.world_info) > 1, host=self.host, out=out, err=err,
                                     ranks=self.worker.output_ranks)
        self._level = _LEVELS.get(str(self.worker.log_level).lower(), 20)
        self._signals: List[int] = []
        self._wake_r = self._wake_w = None
        self._old_handlers = {}
        self._tree = JobTree(self._note)
        self._lifeline_eof = False
        self.restart_count = 0
        self.ranks: List[_Rank] = []
        self.report = FailureReport(job_id=spec.job_id, host=self.host, node_rank=spec.node_rank)
        self.record_path: Optional[str] = None

    # ---------------------------------------------------------------- public
    def run(self) -> int:
        self._check_paths()
        pid_file = self._write_pid_file() if self.worker.save_pid else None
        try:
            self._install_signal_handlers()
            self._tree.start(self.spec.job_id, self.spec.node_rank, self._environ)
            code = self._attempts()
        finally:
            self._tree.close()
            self._restore_signal_handlers()
            if pid_file:
                _unlink(pid_file)
        self.report.exitcode = code
        if code != 0:
            self._finish_report()
        return code

    # ---------------------------------------------------------------- setup
    def _note(self, message: str, level: int = 20) -> None:
        if level >= self._level:
            self.console.note(message)

    def _check_paths(self) -> None:
        if not os.path.isdir(self.spec.cwd):
            raise LaunchError(f"working directory {self.spec.cwd!r} does not exist on {self.host}", where=self.host)
        log_dir = self.worker.each_rank_log_dir
        if log_dir:
            if os.path.exists(log_dir) and not os.path.isdir(log_dir):
                raise LaunchError(f"{log_dir} is a file; it should be a directory for each rank's log",
                                  where="--enable_each_rank_log", hint="give a directory path (created if missing)")
            try:
                os.makedirs(log_dir, exist_ok=True)
            except OSError as e:
                raise LaunchError(f"cannot create directory {log_dir} for each rank's log: {e.strerror}",
                                  where="--enable_each_rank_log") from None

    def _write_pid_file(self) -> str:
        """Write the pid to `pid_file_path()` without following any planted link.

        [Note: pid file in /tmp] The name is predictable and /tmp is shared, so the pid is written to a
        fresh temp file (O_CREAT|O_EXCL|O_NOFOLLOW: it cannot be someone else's file or link) that is
        then renamed over the name: a symlink there is replaced, never followed. A reader sees no file
        or the whole pid.
        """
        path = pid_file_path(os.getpid())
        tmp = f"{path}.{os.urandom(8).hex()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(tmp, flags, 0o644)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            _unlink(tmp)
            what = "is a directory" if os.path.isdir(path) and not os.path.islink(path) else (e.strerror or str(e))
            raise LaunchError(f"cannot write the pid file {path}: {what}", where="--save_pid",
                              hint=f"remove {path} (something else created it), or drop --save_pid") from None
        self._note(f"launcher pid: {os.getpid()} (pid file {path})", 10)
        return path

    def _install_signal_handlers(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        if threading.current_thread() is not threading.main_thread():
            return  # signals are the caller's business then; pipes and pidfds still work
        for sig in HANDLED_SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signo, _frame) -> None:
        self._signals.append(signo)
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._old_handlers.clear()
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None

    # ---------------------------------------------------------------- attempts
    def _attempts(self) -> int:
        while True:
            self.report.failures.clear()
            self.report.terminated.clear()
            outcome = self._one_attempt()
            if (outcome != "failed" or self.restart_count >= self.worker.max_restarts or self._spawn_failed()
                    or self._signals or self._lifeline_eof):
                break
            root = self.report.root_cause
            self.restart_count += 1
            self._note(f"worker group failed (rank {root.rank}: exit code {root.exitcode}); restarting, "
                       f"attempt {self.restart_count + 1} of {self.worker.max_restarts + 1}", 30)
        if self.report.root_cause is not None:
            return self.report.root_cause.exitcode
        if self._signals:
            self.report.signal = procs.signal_name(self._signals[0])
            return 128 + self._signals[0]
        if self._lifeline_eof:
            self.report.signal = "lifeline EOF"
            return 128 + signal.SIGHUP
        return 0

    def _spawn_failed(self) -> bool:
        return any(r.proc is None for r in self.ranks)

    def _one_attempt(self) -> str:
        """Spawn, supervise and tear down once; returns "ok", "failed" or "stopped"."""
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._wake_r, selectors.EVENT_READ, ("wake",))
            if self._lifeline_fd is not None and not self._lifeline_eof:
                sel.register(self._lifeline_fd, selectors.EVENT_READ, ("lifeline",))
            try:
                self._spawn_all(sel)
                stop = self._supervise(sel)
            except BaseException:  # a bug or KeyboardInterrupt (no handlers off the main thread)
                self._teardown(sel, signal.SIGKILL)
                raise
            self._teardown(sel, stop)
        finally:
            self._close_rank_fds(sel)
            sel.close()
        if self.report.failures:
            return "failed"
        return "stopped" if (self._signals or self._lifeline_eof) else "ok"

    def _spawn_all(self, sel) -> None:
        self.ranks = []
        has_gpus = _node_has_gpus()
        first_rank = sum(len(s) for s in list(self.spec.world_info.values())[:self.spec.node_rank])
        stamp = time.strftime("%Y%m%d%H%M%S")
        preexec = self._tree.preexec(os.getpid())
        stdin = subprocess.DEVNULL if self._lifeline_fd is not None else None
        # Every command first: a bad option raises before any rank exists.
        commands = [(worker_argv(self.worker, local_rank, self.local_size),
                     worker_env(self.spec, local_rank, restart_count=self.restart_count, base=self._environ,
                                has_gpus=has_gpus)) for local_rank in range(self.local_size)]
        for local_rank, (argv, env) in enumerate(commands):
            if self._signals or self._lifeline_eof:
                return
            r = _Rank(rank=first_rank + local_rank, local_rank=local_rank)
            r.error_file = self._fresh_error_file(r.rank)
            env[ERROR_FILE_ENV] = env["TORCHELASTIC_ERROR_FILE"] = r.error_file
            if self.console.live(stderr=False):  # rank 0's progress may update one line in place (runtime/monitor/progress.py)
                env[CONSOLE_TTY_ENV] = "1"
            self.ranks.append(r)
            self._note(f"rank {r.rank}: {argv}", 10)
            self._spawn_one(sel, r, argv, env, stdin, preexec, stamp)
            if r.proc is None:
                return

    def _spawn_one(self, sel, r: _Rank, argv, env, stdin, preexec, stamp) -> None:
        log = None
        if self.worker.each_rank_log_dir:
            r.log_file = os.path.join(self.worker.each_rank_log_dir,
                                      f"{stamp}_rank{r.rank}.{self.spec.job_id.replace(os.sep, '_')}.log")
            log = open(r.log_file, "ab", buffering=0)
            if self.worker.tee:
                r.log, log = log, None
        try:
            r.proc = subprocess.Popen(
                argv, env=env, cwd=self.spec.cwd, stdin=stdin,
                stdout=log if log else subprocess.PIPE, stderr=log if log else subprocess.PIPE,
                start_new_session=True, preexec_fn=preexec, close_fds=True)
        except OSError as e:
            code = 127 if isinstance(e, FileNotFoundError) else 126
            r.tail.append(f"dsrun could not start {argv[0]!r}: {e.strerror or e}")
            self._record_failure(r, code)
            return
        finally:
            if log:
                log.close()
            if r.log is not None and r.proc is None:
                r.log.close()
                r.log = None
        self._tree.guardian.add(r.pgid)
        r.pidfd = procs.pidfd_open(r.proc.pid)
        if r.pidfd is not None:
            sel.register(r.pidfd, selectors.EVENT_READ, ("exit", r))
        for stream, is_err in ((r.proc.stdout, False), (r.proc.stderr, True)):
            if stream is not None:
                fd = stream.fileno()
                os.set_blocking(fd, False)
                r.pipes[fd] = (RankStream(r.tail, self.console, rank=r.rank, stderr=is_err), is_err, stream)
                sel.register(fd, selectors.EVENT_READ, ("out", r, fd))

    # ---------------------------------------------------------------- supervision
    def _live(self) -> List[_Rank]:
        return [r for r in self.ranks if r.proc is not None and r.returncode is None]

    def _supervise(self, sel) -> Optional[int]:
        """Wait until every rank is done or something must stop the group; returns the signal to send."""
        if self._spawn_failed() or self._signals or self._lifeline_eof:
            return self._stop_signal()
        polling = any(r.pidfd is None for r in self.ranks)
        scanning = self._tree.needs_scans
        timeout = _POLL_S if polling else _SCAN_S if scanning else None
        next_scan = time.monotonic()
        while self._live():
            if scanning and time.monotonic() >= next_scan:
                self._tree.watch(self._rank_pids(), [r.proc.pid for r in self._live()])
                next_scan = time.monotonic() + _SCAN_S
            for key, _ in sel.select(self._flush_timeout(timeout)):
                self._dispatch(sel, key.data, during_teardown=False)
            self._flush_partials()
            if polling:
                self._poll_exits(during_teardown=False)
            if self.report.failures or self._signals or self._lifeline_eof:
                return self._stop_signal()
        return None

    def _stop_signal(self) -> int:
        if self._signals and not self.report.failures and self._signals[0] in (signal.SIGINT, signal.SIGTERM):
            return self._signals[0]  # forward Ctrl-C as Ctrl-C, so Python ranks see KeyboardInterrupt
        return signal.SIGTERM

    def _dispatch(self, sel, data, *, during_teardown: bool) -> None:
        kind = data[0]
        if kind == "exit":
            self._reap(sel, data[1], during_teardown)
        elif kind == "out":
            self._read(sel, data[1], data[2])
        elif kind == "wake":
            try:
                os.read(self._wake_r, 512)
            except BlockingIOError:
                pass
        elif kind == "lifeline":
            try:
                chunk = os.read(self._lifeline_fd, 4096)
            except BlockingIOError:
                chunk = b"?"
            if not chunk:
                self._lifeline_eof = True
                sel.unregister(self._lifeline_fd)

    def _read(self, sel, r: _Rank, fd: int) -> None:
        stream = r.pipes[fd][0]
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self._close_pipe(sel, r, fd)
                return
            if r.log is not None:
                r.log.write(chunk)
            stream.feed(chunk)

    def _flush_timeout(self, timeout: Optional[float]) -> Optional[float]:
        """`timeout`, shortened to wake up when a partial line is due on the console."""
        dues = [s.flush_due() for r in self.ranks for s, _, _ in r.pipes.values()]
        dues = [d for d in dues if d is not None]
        if not dues:
            return timeout
        wait = max(0.0, min(dues) - time.monotonic())
        return wait if timeout is None else min(timeout, wait)

    def _flush_partials(self) -> None:
        now = time.monotonic()
        for r in self.ranks:
            for stream, _, _ in r.pipes.values():
                stream.flush(now)

    def _drain(self, sel, r: _Rank) -> None:
        for fd in list(r.pipes):
            self._read(sel, r, fd)

    def _poll_exits(self, *, during_teardown: bool) -> None:
        for r in self._live():
            if r.proc.poll() is not None:
                self._reap(None, r, during_teardown)

    def _reap(self, sel, r: _Rank, during_teardown: bool) -> None:
        if r.returncode is not None:
            return
        code = r.proc.poll()
        if code is None:
            return  # spurious wake-up
        r.returncode = code
        if r.pidfd is not None:
            if sel is not None:
                sel.unregister(r.pidfd)
            os.close(r.pidfd)
            r.pidfd = None
        if code != 0 and not during_teardown:
            if sel is not None:
                self._drain(sel, r)
            self._record_failure(r, code)

    def _record_failure(self, r: _Rank, returncode: int) -> None:
        exitcode, signame = exit_code_for(returncode)
        tail = list(r.tail) if not r.log_file else _file_tail(r.log_file)
        error = read_error_file(r.error_file) if r.error_file else None
        self.report.failures.append(RankFailure(
            rank=r.rank, local_rank=r.local_rank, host=self.host, pid=r.proc.pid if r.proc else -1,
            exitcode=exitcode, signal=signame, timestamp=time.time(), tail=tail, log_file=r.log_file,
            restart_count=self.restart_count, error=error, error_file=r.error_file if error else None))

    # ---------------------------------------------------------------- teardown
    def _teardown(self, sel, sig: Optional[int]) -> None:
        """Signal every rank's group and every other process of the job at once, one shared grace
        period, then SIGKILL what is left (the whole job cgroup where there is one)."""
        groups = self._rank_pids()
        strays = self._tree.strays(groups, [r.proc.pid for r in self._live()])
        try:
            if self._tree.alive(groups, strays):
                self._stop_tree(sel, sig, groups, strays)
        finally:
            strays.reap()  # orphans adopted as subreaper, killed here or exited earlier
            strays.close()
            self._tree.forget(groups)

    def _rank_pids(self) -> List[int]:
        """Every spawned rank's pid, which is also its process group id."""
        return [r.proc.pid for r in self.ranks if r.proc is not None]

    def _stop_tree(self, sel, sig: Optional[int], groups: List[int], strays: procs.Strays) -> None:
        live = self._live()
        sig = signal.SIGTERM if sig is None else sig
        if sig == signal.SIGINT:  # each rank's KeyboardInterrupt traceback becomes one line (launcher/output.py)
            self.console.interrupted = True
        for pgid in groups:
            procs.signal_group(pgid, sig)
        outside = self._tree.signal_outside(groups, strays, sig)
        if outside and not live:
            self._note(f"the ranks have exited; ending what they left running in other sessions (pids "
                       f"{', '.join(map(str, sorted(outside)))}): nothing the job started outlives it")
        deadline = time.monotonic() + self.worker.grace_period
        signals_seen = len(self._signals)
        while time.monotonic() < deadline:
            if not self._live() and not self._tree.alive(groups, strays):
                break
            if len(self._signals) > signals_seen:
                self._note("second signal: killing the ranks now")
                break
            for key, _ in sel.select(min(_POLL_S, max(0.0, deadline - time.monotonic()))):
                self._dispatch(sel, key.data, during_teardown=True)
            self._flush_partials()
            self._poll_exits(during_teardown=True)
        killed = set()
        for r in self.ranks:
            if r.proc is not None and procs.signal_group(r.pgid, signal.SIGKILL) and r in live and r.returncode is None:
                killed.add(r.rank)
        self._tree.kill_outside(groups, strays)
        for r in live:
            self.report.terminated.append({"rank": r.rank, "pid": r.proc.pid,
                                           "how": f"SIGKILL after {self.worker.grace_period:g}s grace"
                                           if r.rank in killed else procs.signal_name(sig)})
        self._reap_all(sel)

    def _reap_all(self, sel) -> None:
        deadline = time.monotonic() + _REAP_TIMEOUT_S
        for r in self._live():
            try:
                r.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._note(f"rank {r.rank} (pid {r.proc.pid}) did not die after SIGKILL (stuck in the kernel, "
                           f"D state?); abandoning it", 40)
                continue
            self._reap(sel, r, during_teardown=True)

    def _close_rank_fds(self, sel) -> None:
        for r in self.ranks:
            for fd in list(r.pipes):
                try:
                    self._read(sel, r, fd)  # whatever is already in the pipe
                except (OSError, KeyError, ValueError):
                    pass
            for fd in list(r.pipes):
                self._close_pipe(sel, r, fd)
            if r.pidfd is not None:
                sel.unregister(r.pidfd)
                os.close(r.pidfd)
                r.pidfd = None

    def _close_pipe(self, sel, r: _Rank, fd: int) -> None:
        # Closed through its file object only: closing the bare fd would leave the object holding a
        # number that the next open() may reuse.
        stream, _, fileobj = r.pipes.pop(fd)
        stream.finish()
        sel.unregister(fd)
        fileobj.close()
        if not r.pipes and r.log is not None:
            r.log.close()
            r.log = None

    # ---------------------------------------------------------------- report
    def _record_dir(self) -> str:
        """The one folder for this job's failure record and the ranks' error files."""
        shared = self.worker.each_rank_log_dir  # maybe shared by other jobs: [Note: per-rank log files]
        return (self.worker.log_dir or (shared and os.path.join(shared, self.spec.job_id.replace(os.sep, "_")))
                or default_log_dir(self.spec.job_id))

    def _fresh_error_file(self, rank: int) -> str:
        path = error_file_path(self._record_dir(), rank)
        _unlink(path)  # an earlier attempt's record must not be read as this one's
        return path

    def _finish_report(self) -> None:
        directory = self._record_dir()
        try:
            self.record_path = self.report.write(directory)
        except OSError as e:
            self._note(f"could not write the failure record to {directory}: {e}", 40)
        if not self._emit_marker:  # a remote agent's driver merges every node's report and prints one summary
            print_failure(self.report, self.record_path, stream=self.console.err)
        if self._emit_marker:
            try:
                self.console.out.write(self.report.marker_line() + "\n")
                self.console.out.flush()
            except (BrokenPipeError, ValueError):
                pass


def _file_tail(path: str, lines: int = 20) -> List[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m dsrun.launcher.agent --job_id ID [--node_rank N] [--lifeline stdin]`: run one node's
    ranks. The `AgentSpec` arrives as the first line of stdin (JSON), never in argv ([Note: spec on
    stdin] in launcher/transports/common.py); `--node_rank` replaces the spec's (pdsh's `%n`)."""
    from dataclasses import replace

    from dsrun.launcher.transports.common import read_spec_line

    parser = argparse.ArgumentParser(prog="python -m dsrun.launcher.agent", description=main.__doc__)
    parser.add_argument("--job_id", required=True, help="the job this agent belongs to (what --kill matches)")
    parser.add_argument("--node_rank", type=int, default=None, help="this node's rank; default: the spec's")
    parser.add_argument("--lifeline", choices=["stdin"], default=None,
                        help="after the spec line, tear everything down when stdin reaches EOF (the driver "
                             "is gone)")
    args = parser.parse_args(argv)
    try:
        spec = AgentSpec.from_json(read_spec_line(0))
        if spec.job_id != args.job_id:
            raise ValueError(f"the spec is for job {spec.job_id!r}, not --job_id {args.job_id!r}")
        if args.node_rank is not None:
            if not 0 <= args.node_rank < len(spec.world_info):
                raise ValueError(f"--node_rank {args.node_rank} is outside 0..{len(spec.world_info) - 1}")
            spec = replace(spec, node_rank=args.node_rank)
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"dsrun agent: bad launch spec on stdin: {e}", file=sys.stderr)
        return 2
    try:
        return NodeAgent(spec, lifeline_fd=0 if args.lifeline == "stdin" else None, emit_marker=True).run()
    except DsrunError as e:
        print(f"dsrun: {e.render()}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""`dsrun [OPTIONS] SCRIPT [SCRIPT_ARGS...]`: the thin click layer over `plan()` and `execute()`.

Options convert through `ParamType`s that call the pure parsers; the CLI captures what planning needs
from the machine (environment, hostfile and `.deepspeed_env` contents, visible GPUs, a free port) into
a `LaunchSpec`, plans, runs the preflight checks (launcher/preflight.py), then prints the plan
(`--dry_run`) or executes it. Importing this module, and the whole launch path up to `execute()`, never
imports torch. DeepSpeed's option spellings: [Note: option spellings] on `_DsrunCommand`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import sys
from typing import Dict, List, Optional, Sequence

import click

from dsrun.errors import DsrunError, UsageError

from . import envfile, hostfile, ports, resources
from .argv import parse_range_list
from .plan import normalize_launcher, plan
from .spec import LAUNCHERS, LaunchPlan, LaunchSpec

__all__ = ["main", "cli", "build_spec"]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class _ParserType(click.ParamType):
    """A click type that validates through one of the pure parsers and keeps the text."""

    def __init__(self, name: str, check):
        self.name = name
        self._check = check

    def convert(self, value, param, ctx):
        if value is None or value == "":
            return value
        self._check(value)  # DsrunError propagates; main() prints it as `dsrun: error: ...`
        return value


class _Count(click.ParamType):
    """An int that is -1 ("not given", DeepSpeed's default) or within 0..`high`."""

    name = "integer"

    def __init__(self, flag: str, high: int, what: str):
        self._flag, self._high, self._what = flag, high, what

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if re.fullmatch(r"-?[0-9]{1,12}", text) is None:
            raise UsageError(f"{value!r} is not a whole number", where=self._flag, hint=f"give {self._what}")
        number = int(text)
        if number != -1 and not 0 <= number <= self._high:
            raise UsageError(f"{number} is out of range: use 0..{self._high}, or leave the flag out",
                             where=self._flag, hint=f"give {self._what}")
        return number


class _Seconds(click.ParamType):
    """A finite number of seconds in [`low`, `high`] (`nan` and `inf` compare false and would slip past
    click's FloatRange); `open_low` excludes `low` itself."""

    name = "seconds"

    def __init__(self, flag: str, low: float, high: float, *, open_low: bool = False):
        self._flag, self._low, self._high, self._open_low = flag, low, high, open_low

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{value!r} is not a number of seconds", where=self._flag) from None
        too_low = number <= self._low if self._open_low else number < self._low
        if not math.isfinite(number) or too_low or number > self._high:
            bound = f"above {self._low:g}" if self._open_low else f"at least {self._low:g}"
            raise UsageError(f"{value!r} is not a valid number of seconds: it must be finite, {bound} and at most "
                             f"{self._high:g}", where=self._flag)
        return number


class _Choice(click.Choice):
    """click's Choice, without the context's `token_normalize_func`: that maps option names
    ([Note: option spellings]), never option values."""

    def normalize_choice(self, choice, ctx):
        return super().normalize_choice(choice, None)


_DAY_S = 24 * 3600.0
FILTER_INCLUDE = _ParserType("filter", lambda v: resources.parse_filter(v, "--include"))
FILTER_EXCLUDE = _ParserType("filter", lambda v: resources.parse_filter(v, "--exclude"))
CORE_LIST = _ParserType("cores", parse_range_list)
LAUNCHER = _ParserType("launcher", normalize_launcher)


class _LogHandler(logging.Handler):
    """Writes through click so that CliRunner and the real stderr both see it."""

    def emit(self, record):
        click.echo(f"dsrun: {record.levelname.lower()}: {record.getMessage()}", err=True)


def _setup_logging(level: str) -> None:
    logger = logging.getLogger("dsrun.launcher")
    if not any(isinstance(h, _LogHandler) for h in logger.handlers):
        logger.addHandler(_LogHandler())
    logger.setLevel(level.upper())


class _DsrunCommand(click.Command):
    """click's Command with DeepSpeed's option spellings and `dsrun: error:` for DsrunErrors (no traceback).

    [Note: option spellings] Like DeepSpeed's argparse parser, options before SCRIPT accept hyphenated
    spellings (`--num-gpus`) and unique prefixes (`--launcher_arg`, `--num_g`); `--master` is ambiguous.
    click's parser passes every option name, declared and typed, through the context's
    `token_normalize_func`; `parse_args` installs `_spelling_normalizer` there. Everything from SCRIPT on
    is the script's: click stops at the first argument (`allow_interspersed_args=False`).
    """

    def parse_args(self, ctx, args):
        ctx.token_normalize_func = _spelling_normalizer(self, ctx)
        typed = list(args)  # click's parser consumes `args` as it goes
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as err:
            raise _unknown_option(err, typed) from None

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, **kwargs)
        except DsrunError as err:
            click.echo(f"dsrun: error: {err.render()}", err=True)
            sys.exit(err.exit_code)


def _spelling_normalizer(command: click.Command, ctx: click.Context):
    """The `token_normalize_func` for `command`: maps an option name (without its dashes) to the declared
    name it spells. Declared names map to themselves; `-` reads as `_`; a unique prefix of a long name
    (two characters at least, so that bundled short flags such as `-qH` fall through to click's short
    option handling) is that name; an ambiguous prefix is a UsageError naming the candidates."""
    owner: Dict[str, str] = {}
    short = set()
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            for opt in param.opts + param.secondary_opts:
                if opt.startswith("--"):
                    owner[opt[2:]] = param.name
                else:
                    short.add(opt[1:])

    def normalize(name: str) -> str:
        if name in owner or name in short:
            return name
        name = name.replace("-", "_")
        if name in owner or len(name) < 2:
            return name
        matches = sorted({owner[n]: n for n in owner if n.startswith(name)}.values())
        if len(matches) > 1:
            raise UsageError(f"ambiguous option: could match {', '.join('--' + m for m in matches)}",
                             where="--" + name, hint="spell the option out")
        return matches[0] if matches else name

    return normalize


def _unknown_option(err: click.NoSuchOption, args: List[str]) -> UsageError:
    """A UsageError for an option dsrun does not have; when it looks like the script's own flag, say that
    script arguments go after the script, and show the command line that would work."""
    typed = next((a for a in args if a.split("=", 1)[0].replace("-", "_") == err.option_name.replace("-", "_")),
                 err.option_name)
    flag = typed.split("=", 1)[0]
    close = [p for p in (err.possibilities or []) if p.startswith("--")]
    if close:
        return UsageError(f"no such option (did you mean {' or '.join(sorted(close))}?)", where=flag,
                          hint="script arguments go after the script: dsrun [OPTIONS] SCRIPT [SCRIPT_ARGS]...")
    start = args.index(typed) if typed in args else 0
    # The script is the first `.py` after the flag (the flag's own value may be an existing file).
    script = next((a for a in args[start + 1:] if a.endswith(".py") and not a.startswith("-")), None)
    if script is None:
        return UsageError(f"{flag} is not a dsrun option; script arguments go after the script: "
                          f"dsrun [OPTIONS] SCRIPT {typed}", hint="see `dsrun --help`")
    end = args.index(script, start)
    before = [a for a in args[:start] if a != "--"]
    usage = " ".join(["dsrun"] + before + [script] + args[start:end] + args[end + 1:])
    return UsageError(f"{flag} is not a dsrun option; script arguments go after the script: "
                      f"dsrun [OPTIONS] {script} {' '.join(args[start:end])}".rstrip(),
                      hint=f"did you mean: {usage}")


def _version_text() -> str:
    """`dsrun --version`: dsrun's version and where it is imported from, Python's, and torch's as
    installed (read from package metadata: importing torch would take seconds)."""
    import platform
    from importlib import metadata

    import dsrun

    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    return (f"dsrun {dsrun.__version__} from {os.path.dirname(os.path.abspath(dsrun.__file__))} "
            f"(python {platform.python_version()}, torch {torch})")


def _print_version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(_version_text())
        ctx.exit()


_EPILOG = """\b
Examples:
  dsrun train.py --deepspeed_config ds.json       every GPU here (or one CPU rank without GPUs)
  dsrun --num_gpus 2 train.py --deepspeed ds.json  two ranks on this machine
  dsrun -H hostfile --num_nodes 2 train.py ...     two hosts from the hostfile, over ssh
  dsrun --dry_run --num_gpus 4 train.py            print the launch plan as JSON; start nothing

\b
Options go before SCRIPT; everything after SCRIPT is passed to it untouched. Before
launching, dsrun checks that SCRIPT exists and validates the DeepSpeed config named by
--deepspeed_config/--deepspeed in the script's arguments (exit 2, nothing started)."""


@click.command(cls=_DsrunCommand, epilog=_EPILOG,
               context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"],
                                 "max_content_width": 110, "show_default": True})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print dsrun's version, install path and the torch version, and exit.")
@click.option("-H", "--hostfile", metavar="PATH", default=None,
              help="Hostfile (`host slots=N` lines, or .yaml). Default: $DLTS_HOSTFILE or /job/hostfile if it "
                   "exists; otherwise this machine only. A path given here must exist.")
@click.option("-i", "--include", default="", type=FILTER_INCLUDE, metavar="FILTER", show_default="all",
              help="Hosts/slots to use: HOST[:SLOT,...][@HOST...], e.g. worker-0:0,1@worker-1.")
@click.option("-e", "--exclude", default="", type=FILTER_EXCLUDE, metavar="FILTER", show_default="none",
              help="Hosts/slots to leave out (same syntax as --include).")
@click.option("--num_nodes", type=_Count("--num_nodes", resources.MAX_WORLD_SIZE, "a number of hosts >= 0"),
              default=-1, show_default="all hosts", help="Use the first N hosts.")
@click.option("--num_gpus", "--num_accelerators", "num_gpus", default=-1, show_default="every slot",
              type=_Count("--num_gpus", resources.MAX_SLOTS_PER_HOST, "a number of ranks per node >= 0"),
              help="Ranks per node (replaces the slot list with 0..N-1; CPU ranks without GPUs).")
@click.option("--master_port", type=click.IntRange(1, 65535), default=None,
              help="Rendezvous port. Default: a free port on one node, 29500 across nodes.")
@click.option("--master_addr", default="", show_default=False, help="Rendezvous address. Default: 127.0.0.1 on one node, "
                                                "else the first host's name as written in the hostfile.")
@click.option("--node_rank", type=int, default=-1, show_default=False, help="This node's index (with --no_ssh).")
@click.option("--launcher", type=LAUNCHER, default=None,
              help=f"Multi-node launcher: {', '.join(LAUNCHERS[1:])} (default ssh); one node runs locally.")
@click.option("--launcher_args", default="", show_default=False, help="Extra arguments for the launcher (shell-split).")
@click.option("--module", is_flag=True, help="Run SCRIPT as `python -m SCRIPT`.")
@click.option("--no_python", is_flag=True, help="Run SCRIPT directly, without `python -u`.")
@click.option("--no_local_rank", is_flag=True, help="Do not pass --local_rank=N to the script.")
@click.option("--no_ssh", is_flag=True, help="Run only this node's ranks (start dsrun on every node, "
                                              "each with its --node_rank and the same --master_addr).")
@click.option("--no_ssh_check", is_flag=True, help="Skip the passwordless-ssh check.")
@click.option("--force_multi", is_flag=True, help="Use the multi-node launcher even for one host.")
@click.option("--save_pid", is_flag=True, help="Write the agent's pid to /tmp/<dsrun pid>.deepspeed.")
@click.option("--enable_each_rank_log", metavar="DIR", default=None, help="Write each rank's output to DIR.")
@click.option("--tee", is_flag=True, help="With --enable_each_rank_log: also show the ranks' output on the console.")
@click.option("--output_ranks", "--local_ranks_filter", "output_ranks", default=None, metavar="RANKS",
              help="Show only these ranks' output on the console, e.g. 0 or 0,3 or 0-3 (every rank still reaches "
                   "the failure summary).")
@click.option("--bind_cores_to_rank", is_flag=True, help="Bind each rank to its share of cores with numactl.")
@click.option("--bind_core_list", type=CORE_LIST, metavar="CORES", default=None,
              help="Cores to share out, e.g. 0,2-4,6 (with --bind_cores_to_rank).")
@click.option("--ssh_port", type=click.IntRange(1, 65535), default=None, help="SSH port of the nodes.")
@click.option("--venv_script", metavar="PATH", default=None, help="Script sourced on each node before starting.")
@click.option("--log_level", type=_Choice(LOG_LEVELS, case_sensitive=False), default="info",
              show_default=True, help="The launcher's messages at this level and above.")
@click.option("-q", "--quiet", is_flag=True, help="Same as --log_level error (hides the start line; failures still "
                                                  "print).")
@click.option("--autotuning", type=_Choice(["tune", "run"]), default=None, hidden=True)
@click.option("--dry_run", is_flag=True, help="Print the launch plan as JSON and exit; start nothing.")
@click.option("--max_restarts", type=click.IntRange(min=0), default=0, show_default=True,
              help="Restart the ranks of a failed node up to N times.")
@click.option("--log_dir", metavar="DIR", default=None, help="Where failure records and agent logs go.")
@click.option("--grace_period", type=_Seconds("--grace_period", 0.0, _DAY_S), default=5.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when tearing down.")
@click.option("--ssh_accept_unknown_hosts", is_flag=True, help="Add unknown SSH host keys instead of refusing.")
@click.option("--ssh_connect_timeout", type=_Seconds("--ssh_connect_timeout", 0.0, _DAY_S, open_low=True),
              default=10.0,
              show_default=True, help="Seconds to wait for each SSH connection.")
@click.option("--ssh_max_parallel", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most SSH connections opened at once.")
@click.argument("script", metavar="SCRIPT")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED, metavar="[SCRIPT_ARGS]...")
def cli(**params):
    """Launch SCRIPT on every selected slot (DeepSpeed-compatible flags; `--num-gpus` spellings and
    unique prefixes work too)."""
    _setup_logging("error" if params["quiet"] else params["log_level"])
    spec = build_spec(params, environ=dict(os.environ), cwd=os.path.abspath("."), python=sys.executable)
    launch_plan = plan(spec)
    _check_master_port(spec, launch_plan)
    from . import preflight  # imports the config loader (no torch), only when launching

    checked = preflight.check(spec, launch_plan)
    log = logging.getLogger("dsrun.launcher")
    if spec.dry_run:
        click.echo(json.dumps(launch_plan.to_dry_run(), indent=2))
        if log.isEnabledFor(logging.INFO):  # the summary holds the notes; -q: the JSON alone
            click.echo(checked.summary(launch_plan), err=True)
        return
    for note in checked.notes:
        log.warning(note)
    from .execute import execute  # the executor (and only it) may start processes

    sys.exit(execute(launch_plan))


def build_spec(params: Dict, *, environ: Dict[str, str], cwd: str, python: str,
               gpus: Optional[Sequence[str]] = None, home: Optional[str] = None) -> LaunchSpec:
    """Capture the machine's inputs (hostfile, `.deepspeed_env`, GPUs, a free port) into a LaunchSpec.

    Args:
        params: click's parsed options.
        environ, cwd, python: the environment, working directory and interpreter to launch with.
        gpus: the visible GPUs; None = detect (CUDA_VISIBLE_DEVICES, else NVML).
        home: where `$HOME/.deepspeed_env` lives; None = `environ["HOME"]` or `~`.
    """
    if params.get("autotuning"):
        raise UsageError("autotuning is not supported by dsrun", where="--autotuning",
                         hint="run DeepSpeed's autotuner separately, then launch with its config")
    explicit = params["hostfile"] is not None
    path = params["hostfile"] if explicit else hostfile.default_hostfile(environ)
    pool = hostfile.read_hostfile(path, explicit=explicit)
    home = home or environ.get("HOME") or os.path.expanduser("~")
    file_vars = envfile.read_env_files(envfile.env_file_paths(environ, home, cwd))
    local_gpus = tuple(gpus) if gpus is not None else resources.local_gpus(environ)
    local_cores = None
    if params["bind_cores_to_rank"] and not params["bind_core_list"]:
        import psutil

        local_cores = psutil.cpu_count(logical=False) or os.cpu_count()
    return LaunchSpec(
        script=params["script"], script_args=tuple(params["script_args"]), hostfile=path if pool else None,
        hostfile_explicit=explicit, include=params["include"] or "", exclude=params["exclude"] or "",
        num_nodes=params["num_nodes"], num_gpus=params["num_gpus"], master_addr=params["master_addr"] or "",
        master_port=params["master_port"], node_rank=params["node_rank"],
        launcher=normalize_launcher(params["launcher"]) if params["launcher"] else "ssh",
        launcher_args=params["launcher_args"] or "", module=params["module"], no_python=params["no_python"],
        no_local_rank=params["no_local_rank"], no_ssh=params["no_ssh"], no_ssh_check=params["no_ssh_check"],
        force_multi=params["force_multi"], save_pid=params["save_pid"],
        enable_each_rank_log=params["enable_each_rank_log"], bind_cores_to_rank=params["bind_cores_to_rank"],
        bind_core_list=params["bind_core_list"], ssh_port=params["ssh_port"], venv_script=params["venv_script"],
        log_level="error" if params["quiet"] else params["log_level"].lower(), quiet=params["quiet"],
        dry_run=params["dry_run"], max_restarts=params["max_restarts"], log_dir=params["log_dir"],
        grace_period=params["grace_period"], ssh_accept_unknown_hosts=params["ssh_accept_unknown_hosts"],
        ssh_connect_timeout=params["ssh_connect_timeout"], ssh_max_parallel=params["ssh_max_parallel"],
        output_ranks=params["output_ranks"], tee=params["tee"], environ=environ, cwd=cwd, python=python, job_id=f"dsrun-{secrets.token_hex(4)}", resource_pool=pool,
        local_gpus=local_gpus, env_file_vars=file_vars,
        free_port=ports.find_free_port() if params["master_port"] is None else None, local_cores=local_cores)


def _check_master_port(spec: LaunchSpec, launch_plan: LaunchPlan) -> None:
    """An explicit port must be free where rank 0 (its TCPStore) will run: here, for local runs and for
    `--no_ssh` node 0.

    Best effort only: it catches a port that is already taken, not a job started at the same moment
    (both see the port free). The rendezvous itself refuses a second job on the port (runtime/dist.py,
    [Note: one job per store]); ports on other nodes are never checked from here.
    """
    if spec.master_port is None or launch_plan.launcher != "local":
        return
    if launch_plan.node_rank in (None, 0):
        ports.ensure_port_free(spec.master_port)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: exit 0 on success, 2 for any usage error (no traceback), else the
    executor's code."""
    cli.main(args=None if argv is None else list(argv), prog_name="dsrun")


if __name__ == "__main__":
    main()

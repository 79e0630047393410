"""The environment exported to every worker: automatic exports plus `.deepspeed_env` files.

[Note: exported environment] `worker_env()` = automatic exports (`AUTO_EXPORT_PREFIXES`,
`AUTO_EXPORT_NAMES`, PYTHONPATH with the working directory prepended) overridden by the files
(`$HOME/.deepspeed_env`, then `./.deepspeed_env`; the later wins; `DS_ENV_FILE` renames them). The same
dict goes to every worker in every mode (local, ssh, pdsh, MPI, slurm, `--no_ssh`). PATH is not
exported: remote nodes often lay out software differently, and the worker is started through an
absolute interpreter path anyway. hostfiles/README.md documents this for users.

Files use dotenv syntax: `KEY=VALUE`, blank lines, `#` comments, an optional `export ` prefix, and
values in single or double quotes (quotes stripped). Nothing is expanded: `$HOME` and `$(cmd)` stay
literal. Bad lines (and NUL bytes, even in comments) raise `EnvFileError` with `path:line`.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, List

from dsrun.errors import EnvFileError

__all__ = ["ENV_FILE_NAME", "AUTO_EXPORT_PREFIXES", "AUTO_EXPORT_NAMES", "parse_env_file", "env_file_paths",
           "read_env_files", "auto_exports", "worker_env"]

ENV_FILE_NAME = ".deepspeed_env"
# DeepSpeed's EXPORT_ENVS + the CUDA accelerator's, plus what reference section 9.6 asks for.
AUTO_EXPORT_PREFIXES = ("NCCL", "PYTHON", "UCX", "MV2", "MLFLOW", "TORCH_", "CUDA_", "HF_")
AUTO_EXPORT_NAMES = ("LD_LIBRARY_PATH", "OMP_NUM_THREADS")
# Per-node values that must never be copied from the launching machine.
_NEVER_EXPORT = ("CUDA_VISIBLE_DEVICES",)

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HINT = "lines look like KEY=VALUE, `export KEY=VALUE`, KEY=\"a b\" or # comment"


def parse_env_file(text: str, path: str = ENV_FILE_NAME) -> Dict[str, str]:
    """Parse `.deepspeed_env` text; later lines override earlier ones."""
    result: Dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        where = f"{path}:{lineno}"
        if "\0" in raw:  # no environment variable can hold one: exec would refuse the whole environment
            raise EnvFileError(f"a NUL byte at column {raw.index(chr(0)) + 1}", where=where,
                               hint="the file must be plain text; remove the NUL byte")
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if re.match(r"export\s", line):
            line = line[len("export"):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise EnvFileError(f"no '=' in {raw.strip()!r}", where=where, hint=_HINT)
        if not _KEY.fullmatch(key):
            raise EnvFileError(f"invalid variable name {key!r}", where=where,
                               hint="names are letters, digits and _, not starting with a digit")
        result[key] = _parse_value(value.strip(), where)
    return result


def _parse_value(value: str, where: str) -> str:
    if not value or value[0] not in "\"'":
        # Unquoted: a ` #` starts a trailing comment (dotenv); everything else is literal.
        return re.split(r"\s+#", value, maxsplit=1)[0].rstrip()
    quote = value[0]
    out: List[str] = []
    i = 1
    while i < len(value):
        char = value[i]
        if quote == '"' and char == "\\" and i + 1 < len(value) and value[i + 1] in "\"\\":
            out.append(value[i + 1])
            i += 2
            continue
        if char == quote:
            rest = value[i + 1:].strip()
            if rest and not rest.startswith("#"):
                raise EnvFileError(f"unexpected text {rest!r} after the closing {quote}", where=where, hint=_HINT)
            return "".join(out)
        out.append(char)
        i += 1
    raise EnvFileError(f"unterminated {quote} quote (values are single-line)", where=where, hint=_HINT)


def env_file_paths(environ: Dict[str, str], home: str, cwd: str) -> List[str]:
    """The files to read, in order (home, then cwd); an absolute `DS_ENV_FILE` is listed once."""
    name = environ.get("DS_ENV_FILE") or ENV_FILE_NAME
    paths: List[str] = []
    for folder in (home, cwd):
        path = os.path.normpath(os.path.join(folder, name))
        if path not in paths:
            paths.append(path)
    return paths


def read_env_files(paths: Iterable[str]) -> Dict[str, str]:
    """Read and merge the files that exist (later files win)."""
    merged: Dict[str, str] = {}
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as err:
            raise EnvFileError(f"cannot read: {err}", where=path)
        merged.update(parse_env_file(text, path))
    return merged


def auto_exports(environ: Dict[str, str], cwd: str) -> Dict[str, str]:
    """The variables exported without a file: matching names in `environ` order, and PYTHONPATH
    with `cwd` prepended (DeepSpeed)."""
    exported = {key: value for key, value in environ.items()
                if (key.startswith(AUTO_EXPORT_PREFIXES) or key in AUTO_EXPORT_NAMES) and key not in _NEVER_EXPORT}
    if environ.get("AISC_JOB_NAME"):  # DeepSpeed: these are per-node on AISC clusters
        exported.pop("NCCL_IB_HCA", None)
        exported.pop("UCX_NET_DEVICES", None)
    old = environ.get("PYTHONPATH")
    exported["PYTHONPATH"] = f"{cwd}:{old}" if old else cwd
    return exported


def worker_env(environ: Dict[str, str], file_vars: Dict[str, str], cwd: str) -> Dict[str, str]:
    """Automatic exports overridden by the `.deepspeed_env` files' variables."""
    env = auto_exports(environ, cwd)
    env.update(file_vars)
    return env

"""Hostfiles: the DeepSpeed/MPI text format and a YAML form, parsed strictly into `{host: slots}`.

Both shapes are documented in `hostfiles/README.md`. The result keeps file order: ranks are assigned
and the master host is chosen in that order. Every error is a `HostfileError` whose `where` is
`path:line`, so a typo never turns into a silent single-node run (DeepSpeed issues #5221, #3669).

[Note: hostfile limits] A host may list at most `MAX_SLOTS_PER_HOST` slots and a file at most
`MAX_WORLD_SIZE` in total: slot ids are materialised per host, so `slots=100000000` would otherwise
plan for minutes and gigabytes. A host name may not start with `-` (pdsh and mpirun would read it as an
option) nor contain `,` (their host-list separator).
"""
from __future__ import annotations

import os
import re
from typing import Dict, Optional

from dsrun.errors import HostfileError

from .resources import MAX_SLOTS_PER_HOST, MAX_WORLD_SIZE

__all__ = ["DEFAULT_HOSTFILE", "default_hostfile", "parse_hostfile", "parse_yaml_hostfile", "read_hostfile"]

DEFAULT_HOSTFILE = "/job/hostfile"

# [Note: anchored slots] DeepSpeed matches `^(\S+)\s+slots=(\d+)` unanchored, so `slots=2abc` means 2
# and `w slots=2 extra` is accepted. Ours is anchored: `host slots=N`, optionally followed by an MPI
# `max_slots=M` (ignored for planning; Open MPI reads it when handed the file), and nothing else.
_ENTRY = re.compile(r"^(?P<host>[^\s#=]+)\s+slots=(?P<slots>[0-9]+)(?:\s+max_slots=[0-9]+)?$")
_FIX = "each line must read `HOST slots=N` (N >= 0), e.g. `worker-0 slots=4`; `#` starts a comment"
_HOST_HINT = "write the host's DNS name or IP address (an ~/.ssh/config alias may not start with '-')"
_LIMIT_HINT = (f"slots counts ranks (processes) on that host: at most {MAX_SLOTS_PER_HOST} per host and "
               f"{MAX_WORLD_SIZE} in all (hostfiles/README.md)")


def _check_host(host: str, where: str) -> None:
    """Refuse names that a host-list tool would misread: a leading `-` (an option), a `,` (a separator),
    or a control character."""
    name = host.rpartition("@")[2]
    if host.startswith("-") or name.startswith("-"):
        raise HostfileError(f"host name {host!r} starts with '-': pdsh and mpirun would read it as an option",
                            where=where, hint=_HOST_HINT)
    if not host.isprintable():  # a NUL or control character: no resolver knows it, exec would refuse a NUL
        raise HostfileError(f"host name {host!r} contains a control character", where=where, hint=_HOST_HINT)
    if "," in host:
        raise HostfileError(f"host name {host!r} contains ',': pdsh and mpirun would split it into two hosts",
                            where=where, hint=_HOST_HINT)


def _slot_count(host: str, digits: str, where: str) -> int:
    """The value of a `slots` digit string, at most `MAX_SLOTS_PER_HOST` (checked before converting, so a
    10,000-digit number costs nothing)."""
    value = digits.lstrip("0") or "0"
    if len(value) > len(str(MAX_SLOTS_PER_HOST)) or int(value) > MAX_SLOTS_PER_HOST:
        shown = value if len(value) <= 20 else value[:20] + "..."
        raise HostfileError(f"host {host!r} has slots={shown}; at most {MAX_SLOTS_PER_HOST} slots per host",
                            where=where, hint=_LIMIT_HINT)
    return int(value)


def _check_total(total: int, where: str) -> None:
    """The file's slots so far stay within `MAX_WORLD_SIZE`."""
    if total > MAX_WORLD_SIZE:
        raise HostfileError(f"the hostfile lists {total} slots up to here; at most {MAX_WORLD_SIZE} in total",
                            where=where, hint=_LIMIT_HINT)


def default_hostfile(environ: Dict[str, str]) -> str:
    """The hostfile used when `-H` is not given: `$DLTS_HOSTFILE`, else `/job/hostfile`."""
    return environ.get("DLTS_HOSTFILE") or DEFAULT_HOSTFILE


def parse_hostfile(text: str, path: str = "hostfile") -> Dict[str, int]:
    """Parse DeepSpeed hostfile text into `{host: slots}` in file order.

    Args:
        text: the file's contents (CRLF, tabs, blank lines, whole-line and inline `#` comments are fine).
        path: the name used in error locations (`path:line`).
    """
    hosts: Dict[str, int] = {}
    first_seen: Dict[str, int] = {}
    total = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _ENTRY.match(line)
        if match is None:
            raise HostfileError(f"bad entry {line!r}", where=f"{path}:{lineno}", hint=_FIX)
        host, where = match.group("host"), f"{path}:{lineno}"
        _check_host(host, where)
        slots = _slot_count(host, match.group("slots"), where)
        total += slots
        _check_total(total, where)
        if host in hosts:
            raise HostfileError(f"host {host!r} is listed twice (first on line {first_seen[host]})",
                                where=where, hint="list each host once with its total slots")
        hosts[host] = slots
        first_seen[host] = lineno
    if not hosts:
        raise HostfileError("no hosts: the file is empty or holds only comments", where=f"{path}:1", hint=_FIX)
    return hosts


def parse_yaml_hostfile(text: str, path: str = "hostfile.yaml") -> Dict[str, int]:
    """Parse the YAML form `hosts: [{host: NAME, slots: N}, ...]` into `{host: slots}` in list order."""
    import yaml  # only YAML hostfiles pay for it

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise HostfileError(f"not valid YAML: {getattr(err, 'problem', None) or err}", where=f"{path}:{line}")
    shape = "the file must be a mapping with a `hosts:` list of `{host: NAME, slots: N}` entries"
    if not isinstance(root, yaml.MappingNode):
        line = root.start_mark.line + 1 if root is not None else 1
        raise HostfileError("no `hosts:` list", where=f"{path}:{line}", hint=shape)
    top = {}
    for key, value in root.value:
        if not isinstance(key, yaml.ScalarNode) or key.value != "hosts":
            name = key.value if isinstance(key, yaml.ScalarNode) else "(not a name)"
            raise HostfileError(f"unknown key {name!r}", where=f"{path}:{key.start_mark.line + 1}", hint=shape)
        if key.value in top:
            first = top[key.value][0].start_mark.line + 1
            raise HostfileError(f"`{key.value}:` is given twice (first on line {first})",
                                where=f"{path}:{key.start_mark.line + 1}", hint="keep one `hosts:` list")
        top[key.value] = (key, value)
    if "hosts" not in top or not isinstance(top["hosts"][1], yaml.SequenceNode) or not top["hosts"][1].value:
        line = top["hosts"][1].start_mark.line + 1 if "hosts" in top else 1
        raise HostfileError("`hosts:` must be a non-empty list", where=f"{path}:{line}", hint=shape)
    hosts: Dict[str, int] = {}
    total = 0
    for item in top["hosts"][1].value:
        where = f"{path}:{item.start_mark.line + 1}"
        host, slots = _yaml_entry(item, where, shape)
        total += slots
        _check_total(total, where)
        if host in hosts:
            raise HostfileError(f"host {host!r} is listed twice", where=where,
                                hint="list each host once with its total slots")
        hosts[host] = slots
    return hosts


def _yaml_entry(item, where: str, shape: str):
    import yaml

    if not isinstance(item, yaml.MappingNode):
        raise HostfileError("each entry must be a mapping like `{host: worker-0, slots: 4}`", where=where, hint=shape)
    fields = {}
    for key, value in item.value:
        if not isinstance(key, yaml.ScalarNode) or key.value not in ("host", "slots"):
            name = key.value if isinstance(key, yaml.ScalarNode) else "(not a name)"
            raise HostfileError(f"unknown key {name!r} (expected `host` and `slots`)", where=where, hint=shape)
        if key.value in fields:
            raise HostfileError(f"`{key.value}` is given twice in one entry", where=f"{where.rpartition(':')[0]}:"
                                f"{key.start_mark.line + 1}", hint="give each entry one `host` and one `slots`")
        if not isinstance(value, yaml.ScalarNode):
            raise HostfileError(f"`{key.value}` must be a plain value", where=where, hint=shape)
        fields[key.value] = value.value
    host, slots = fields.get("host", ""), fields.get("slots")
    if not host or any(c.isspace() for c in host):
        raise HostfileError(f"bad or missing host name {host!r}", where=where, hint=shape)
    _check_host(host, where)
    if slots is None or not re.fullmatch(r"[0-9]+", slots):
        raise HostfileError(f"host {host!r}: `slots` must be an integer >= 0, got {slots!r}", where=where, hint=shape)
    return host, _slot_count(host, slots, where)


def read_hostfile(path: Optional[str], *, explicit: bool) -> Optional[Dict[str, int]]:
    """Read and parse a hostfile; None when no hostfile applies (local mode).

    Args:
        path: the file; `.yaml`/`.yml` selects the YAML form.
        explicit: given with `-H`: a missing file is then an error instead of meaning "local mode".
    """
    if not path:
        return None
    if not os.path.isfile(path):
        if not explicit:
            return None
        what = "is not a file" if os.path.exists(path) else "does not exist"
        raise HostfileError(f"hostfile {path!r} {what}", where="--hostfile",
                            hint="fix the path, or drop -H/--hostfile to run on this machine only")
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as err:
        raise HostfileError(f"cannot read hostfile {path!r}: {err}", where="--hostfile")
    if path.endswith((".yaml", ".yml")):
        return parse_yaml_hostfile(text, path)
    return parse_hostfile(text, path)

"""Which slots on which hosts run a rank: filters, `--num_nodes`/`--num_gpus`, and local GPU discovery.

The filter functions reproduce DeepSpeed 0.19.8 exactly (`parse_resource_filter`,
`parse_inclusion_exclusion`; shared/reference/deepspeed-launcher.md 2.2-2.5), with clean errors instead
of Python `ValueError` text. `local_gpus()` is the only function here that touches the machine; it
never imports torch.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Callable, Dict, List, Optional, Tuple

from dsrun.errors import FilterError

__all__ = ["MAX_SLOTS_PER_HOST", "MAX_WORLD_SIZE", "check_filter_flags", "parse_filter", "parse_resource_filter",
           "parse_inclusion_exclusion", "select_resources", "local_pool", "local_gpus", "parse_visible_devices",
           "LOCAL_HOST"]

log = logging.getLogger("dsrun.launcher")

LOCAL_HOST = "localhost"
# Sanity limits ([Note: hostfile limits] in hostfile.py): ranks per host (hostfile slots, --num_gpus) and
# ranks in one job. Far above any real machine or job, far below what would stall planning.
MAX_SLOTS_PER_HOST = 65536
MAX_WORLD_SIZE = 1 << 20
_FILTER_HINT = "the syntax is HOST[:SLOT[,SLOT...]][@HOST[:SLOT...]...], e.g. worker-0:0,1@worker-1"


def parse_filter(text: str, flag: str = "--include") -> Dict[str, List[int]]:
    """Parse a `--include`/`--exclude` string into `{host: sorted unique slots}` in first-seen order.

    Specs for one host merge (DeepSpeed): `w@w:1` is `{w: [1]}`; a bare host alone is `{w: []}`
    ("the whole host"). Nothing is stripped. Syntax errors raise `FilterError` naming `flag`.
    """
    merged: Dict[str, List[int]] = {}
    for spec in text.split("@"):
        host, sep, slot_text = spec.partition(":")
        if ":" in slot_text:
            raise FilterError(f"bad node spec {spec!r}: more than one ':'", where=flag, hint=_FILTER_HINT)
        if not host:
            raise FilterError(f"empty host name in {text!r}", where=flag, hint=_FILTER_HINT)
        slots = merged.setdefault(host, [])
        if not sep:
            continue
        for item in slot_text.split(","):
            try:
                slots.append(int(item))
            except ValueError:
                what = "an empty slot" if item == "" else f"slot {item!r}"
                raise FilterError(f"bad node spec {spec!r}: {what} is not an integer", where=flag,
                                  hint=_FILTER_HINT) from None
    return {host: sorted(set(slots)) for host, slots in merged.items()}


def parse_resource_filter(host_info: Dict[str, List[int]], include: str = "", exclude: str = "") -> Dict[str, List[int]]:
    """Apply an include or exclude filter to `{host: slot ids}` (DeepSpeed 0.19.8 semantics).

    Include builds from scratch (a bare host gets all its slots); exclude removes slots, or the whole
    host when bare. Hosts left empty are dropped; the result follows `host_info`'s order.
    """
    if include and exclude:
        raise FilterError("--include and --exclude are mutually exclusive", where="--include",
                          hint="use one of them")
    if not include and not exclude:
        return {host: list(slots) for host, slots in host_info.items()}
    flag, text = ("--include", include) if include else ("--exclude", exclude)
    specs = parse_filter(text, flag)
    for host, slots in specs.items():
        if host not in host_info:
            known = _short(list(host_info)) if host_info else "(none)"
            raise FilterError(f"host {host!r} is not in the hostfile", where=flag, hint=f"known hosts: {known}")
        known_slots = set(host_info[host])
        for slot in slots:
            if slot not in known_slots:
                raise FilterError(f"no slot {slot} on host {host!r}", where=flag,
                                  hint=f"{host!r} has slots {_short(host_info[host])}")
    if include:
        chosen = {host: (slots if slots else list(host_info[host])) for host, slots in specs.items()}
    else:
        chosen = {host: list(slots) for host, slots in host_info.items()}
        for host, slots in specs.items():
            drop = set(slots)
            chosen[host] = [s for s in chosen[host] if s not in drop] if slots else []
    return {host: chosen[host] for host in host_info if chosen.get(host)}


def _short(items: List, limit: int = 10) -> str:
    """`a, b, c` for a hint, cut after `limit` items (a 3000-host hostfile makes no useful hint)."""
    text = ", ".join(str(item) for item in items[:limit])
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def parse_inclusion_exclusion(pool: Dict[str, int], include: str = "", exclude: str = "") -> Dict[str, List[int]]:
    """Filter a `{host: slot count}` pool: slots are seeded from the pool (the 0.19.8 fix)."""
    return parse_resource_filter({host: list(range(n)) for host, n in pool.items()}, include, exclude)


def check_filter_flags(*, include: str, exclude: str, num_nodes: int, num_gpus: int) -> None:
    """DeepSpeed's first resource check: `--num_nodes`/`--num_gpus` (any value >= 0) exclude filters."""
    if (include or exclude) and (num_nodes >= 0 or num_gpus >= 0):
        flag = "--num_nodes" if num_nodes >= 0 else "--num_gpus"
        raise FilterError(f"{flag} cannot be combined with {'--include' if include else '--exclude'}",
                          where=flag, hint="select hosts and slots with the filter alone")


def select_resources(pool: Dict[str, int], *, include: str = "", exclude: str = "", num_nodes: int = -1,
                     num_gpus: int = -1) -> Dict[str, List[int]]:
    """The runner's resource steps in DeepSpeed's order: mutual exclusion, filters, node trim, GPU override.

    Hosts without slots (`slots=0`) run no ranks and are left out before `--num_nodes` counts hosts,
    unlike DeepSpeed, which kept them as nodes that start nothing (and could make one the master).
    `num_nodes > 0` keeps the first N hosts; `num_gpus > 0` replaces every host's slots with range(N)
    (DeepSpeed; a warning is logged when N exceeds the hostfile's slots). The result may be empty:
    the caller reports that with its own context.
    """
    check_filter_flags(include=include, exclude=exclude, num_nodes=num_nodes, num_gpus=num_gpus)
    if num_gpus > MAX_SLOTS_PER_HOST:
        raise FilterError(f"--num_gpus {num_gpus} is above the limit of {MAX_SLOTS_PER_HOST} ranks per node",
                          where="--num_gpus", hint="--num_gpus counts ranks (processes) per node")
    active = {host: slots for host, slots in parse_inclusion_exclusion(pool, include, exclude).items() if slots}
    if num_nodes > 0:
        active = dict(list(active.items())[:num_nodes])
    if num_gpus > 0:
        short = [host for host in active if pool.get(host, 0) < num_gpus]
        if short:
            log.warning("--num_gpus %d exceeds the hostfile's slots on %s; starting %d ranks per node anyway",
                        num_gpus, _short(short), num_gpus)
        if num_gpus * len(active) > MAX_WORLD_SIZE:
            raise FilterError(f"--num_gpus {num_gpus} on {len(active)} nodes makes {num_gpus * len(active)} ranks; "
                              f"the limit is {MAX_WORLD_SIZE}", where="--num_gpus", hint="use fewer nodes or ranks")
        active = {host: list(range(num_gpus)) for host in active}
    return active


def local_pool(gpus: Tuple[str, ...], *, num_nodes: int = -1, num_gpus: int = -1) -> Dict[str, int]:
    """The pool without a hostfile: `{localhost: visible GPUs}`, or CPU ranks when there are none.

    Slot ids index into `gpus` (the visible list), so a `CUDA_VISIBLE_DEVICES` mask is kept. Without
    GPUs, `--num_gpus N` starts N CPU ranks (default 1).
    """
    if num_nodes > 1:
        raise FilterError(f"--num_nodes {num_nodes} needs a hostfile: without one only this machine is used",
                          where="--num_nodes", hint="pass -H/--hostfile listing the nodes")
    if gpus:
        if num_gpus > len(gpus):
            raise FilterError(f"--num_gpus {num_gpus} but this machine has {len(gpus)} visible GPU(s) "
                              f"({','.join(gpus)})", where="--num_gpus",
                              hint="lower --num_gpus or widen CUDA_VISIBLE_DEVICES")
        return {LOCAL_HOST: len(gpus)}
    return {LOCAL_HOST: num_gpus if num_gpus > 0 else 1}


def parse_visible_devices(value: str) -> Tuple[str, ...]:
    """Split a `CUDA_VISIBLE_DEVICES` value into its entries (indices, `GPU-<uuid>`, `MIG-<uuid>`)."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def local_gpus(environ: Dict[str, str], nvml_count: Optional[Callable[[], Optional[int]]] = None) -> Tuple[str, ...]:
    """This machine's visible GPUs as `CUDA_VISIBLE_DEVICES` entries; () when it has none.

    `CUDA_VISIBLE_DEVICES`, when set, is the list (an empty value hides every GPU), unless NVML loads and
    reports no GPU at all. Otherwise NVML (libnvidia-ml through ctypes) counts the devices.
    """
    count = (nvml_count or _nvml_device_count)()
    if "CUDA_VISIBLE_DEVICES" in environ:
        visible = parse_visible_devices(environ["CUDA_VISIBLE_DEVICES"])
        if visible == ("-1",) or count == 0:
            return ()
        return visible
    return tuple(str(i) for i in range(count or 0))


def _nvml_device_count() -> Optional[int]:
    """GPU count from NVML, or None when the library cannot be loaded or initialised."""
    for name in ("libnvidia-ml.so.1", "libnvidia-ml.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    try:
        if lib.nvmlInit_v2() != 0:
            return None
        try:
            count = ctypes.c_uint(0)
            if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
                return None
            return int(count.value)
        finally:
            lib.nvmlShutdown()
    except AttributeError:  # an NVML too old for the _v2 entry points
        return None

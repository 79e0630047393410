"""Per-parameter shard files: who writes which element ranges, how they are written, and how any range of
any tensor is read back at any world size.

[Note: shard ownership] Ranks describe what they hold as `(name, start, end)` ranges of each flattened
parameter. Every rank's ranges are all-gathered; an element is written by the lowest rank that holds it.
ZeRO-0 (every rank holds everything) thus writes one copy, from rank 0; ZeRO-1/2 slices are disjoint and
every rank writes its own. The union must cover every saved parameter exactly, which `plan_ownership`
checks at save time so a gap is caught when the checkpoint is written, not when it is needed.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import torch

from dsrun.runtime.checkpoint.errors import CheckpointError
from dsrun.runtime.checkpoint.integrity import load_torch_file

__all__ = ["plan_ownership", "check_coverage", "shard_payload", "ShardReader"]

Range = Tuple[int, int]


def _subtract(ranges: List[Range], cut: Range) -> List[Range]:
    out = []
    for start, end in ranges:
        if cut[1] <= start or cut[0] >= end:
            out.append((start, end))
            continue
        if start < cut[0]:
            out.append((start, cut[0]))
        if cut[1] < end:
            out.append((cut[1], end))
    return out


def plan_ownership(held_by_rank: Sequence[Dict[str, List[Range]]]) -> List[Dict[str, List[Range]]]:
    """For each rank, the ranges it writes: what it holds minus what any lower rank holds."""
    claimed: Dict[str, List[Range]] = {}
    plan = []
    for held in held_by_rank:
        mine = {}
        for name, ranges in held.items():
            own = list(ranges)
            for cut in claimed.get(name, []):
                own = _subtract(own, cut)
            own = [r for r in own if r[1] > r[0]]
            if own:
                mine[name] = own
            claimed.setdefault(name, []).extend(ranges)
        plan.append(mine)
    return plan


def check_coverage(plan: Sequence[Dict[str, List[Range]]], numels: Dict[str, int]) -> None:
    """Raise unless the planned ranges cover `[0, numel)` of every parameter (and nothing else)."""
    by_name: Dict[str, List[Range]] = {}
    for mine in plan:
        for name, ranges in mine.items():
            by_name.setdefault(name, []).extend(ranges)
    problems = []
    for name, numel in numels.items():
        pos = 0
        for start, end in sorted(by_name.pop(name, [])):
            if start != pos:
                break
            pos = end
        if pos != numel:
            problems.append(f"{name}: elements from {pos} of {numel} held by no rank")
    problems += [f"{name}: held by a rank but not a saved parameter" for name in by_name]
    if problems:
        raise CheckpointError("the ranks' parameter shards do not cover the model: " + "; ".join(problems[:5]),
                              hint="this is a dsrun bug in the sharding layer; please report it")


def shard_payload(shards, owned: Dict[str, List[Range]]) -> Dict[str, list]:
    """The shard-file entries for this rank: cloned slices of master and optimizer state for each owned range.

    Slices are cloned so `torch.save` writes only those elements, not the flat buffer they view."""
    entries: Dict[str, list] = {}
    for shard in shards:
        for start, end in owned.get(shard.name, []):
            if start < shard.start or end > shard.end:
                continue
            lo, hi = start - shard.start, end - shard.start
            entry = {"start": start, "end": end, "optim": {}}
            if shard.master is not None:
                entry["master"] = shard.master.detach()[lo:hi].to("cpu", copy=True).contiguous()
            for key, value in (shard.optim or {}).items():
                if torch.is_tensor(value) and value.dim() == 1 and value.numel() == shard.end - shard.start:
                    entry["optim"][key] = value.detach()[lo:hi].to("cpu", copy=True).contiguous()
            entries.setdefault(shard.name, []).append(entry)
    return entries


class ShardReader:
    """Serves `read(name, key, start, end)` from the shard files of one checkpoint folder.

    Files are opened lazily with `torch.load(mmap=True)`, so reading a range touches only the pages of the
    pieces that overlap it; the result is a new 1-D tensor of `end - start` elements. Each file is checked
    against the manifest's checksum when first opened ([Note: checkpoint checksums] in integrity.py), so
    a rank verifies the files it reads and no others.
    """

    def __init__(self, tag_dir: str, manifest: dict):
        self.tag_dir = tag_dir
        self.manifest = manifest
        self._files: Dict[str, dict] = {}
        # name -> sorted [(start, end, file)]
        self._index: Dict[str, List[Tuple[int, int, str]]] = {}
        for file, names in manifest["shards"].items():
            for name, ranges in names.items():
                self._index.setdefault(name, []).extend((s, e, file) for s, e in ranges)
        for pieces in self._index.values():
            pieces.sort()

    def _open(self, file: str) -> dict:
        if file not in self._files:
            payload = load_torch_file(self.tag_dir, file, self.manifest, weights_only=True)
            if not isinstance(payload, dict) or not isinstance(payload.get("entries"), dict):
                raise CheckpointError("not a dsrun shard file (no 'entries')", where=os.path.join(self.tag_dir, file))
            self._files[file] = payload
        return self._files[file]

    def _pieces(self, name: str, start: int = 0, end=None) -> List[Tuple[int, int, str]]:
        return [(s, e, f) for s, e, f in self._index.get(name, []) if e > start and (end is None or s < end)]

    def files_for(self, ranges: Dict[str, Range]) -> List[str]:
        """The shard files holding any element of `ranges` (name -> (start, end)), sorted."""
        return sorted({f for name, (start, end) in ranges.items() if end > start
                       for _, _, f in self._pieces(name, start, end)})

    def open_files(self, files: Sequence[str]) -> None:
        """Verify and open `files` now (errors surface here, before anything is restored)."""
        for file in files:
            self._open(file)

    def keys(self, name: str, start: int = 0, end=None) -> List[str]:
        """The tensor keys saved for `name` ('master' and the optimizer state names), looking only at the
        files holding elements `[start, end)` (default: all of them)."""
        keys = set()
        for p_start, _, file in self._pieces(name, start, end):
            entries = self._open(file)["entries"].get(name, [])
            for entry in entries:
                if entry.get("start") == p_start:
                    if "master" in entry:
                        keys.add("master")
                    keys.update(entry.get("optim", {}))
        return sorted(keys)

    def has(self, name: str, key: str = "master", start: int = 0, end=None) -> bool:
        return name in self._index and key in self.keys(name, start, end)

    def _piece(self, file, name, start, key):
        for entry in self._open(file)["entries"].get(name, []):
            if entry["start"] == start:
                value = entry.get("master") if key == "master" else entry["optim"].get(key)
                if value is None:
                    raise KeyError(f"{name}: no {key!r} saved in {file}")
                return value
        raise CheckpointError(f"{name}: range starting at {start} listed in the manifest but not in the file",
                              where=os.path.join(self.tag_dir, file))

    def read(self, name: str, key: str, start: int, end: int) -> torch.Tensor:
        """Elements `[start, end)` of the flattened tensor `key` of parameter `name`."""
        if name not in self._index:
            raise KeyError(f"parameter {name!r} is not in the checkpoint")
        out = None
        pos = start
        for p_start, p_end, file in self._index[name]:
            if p_end <= pos or p_start >= end:
                continue
            if p_start > pos:
                break
            piece = self._piece(file, name, p_start, key)
            hi = min(end, p_end)
            if out is None:
                out = torch.empty(end - start, dtype=piece.dtype)
            out[pos - start:hi - start].copy_(piece[pos - p_start:hi - p_start])
            pos = hi
            if pos >= end:
                break
        if pos < end:
            raise CheckpointError(f"{name}: elements [{pos}, {end}) of {key!r} are missing from the checkpoint",
                                  where=self.tag_dir)
        if out is None:
            out = torch.empty(0)
        return out

    def read_full(self, name: str, key: str = "master") -> torch.Tensor:
        """The whole tensor `key` of `name`, in its saved shape."""
        info = self.manifest["params"][name]
        return self.read(name, key, 0, info["numel"]).view(info["shape"])

    def close(self) -> None:
        self._files.clear()

"""Names and small metadata files of a checkpoint directory: tag folders, `latest`, the manifest.

See [Note: checkpoint format] in `dsrun/runtime/checkpoint/__init__.py` for the whole layout.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil

from dsrun.runtime.checkpoint.atomic import fsync_dir, write_file_atomic
from dsrun.runtime.checkpoint.errors import CheckpointError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "LATEST", "MANIFEST", "MODEL_STATES", "shard_file", "default_tag",
           "read_latest", "write_latest", "resolve_tag_dir", "read_manifest", "write_manifest", "validate_tag",
           "list_tags", "remove_stale"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "dsrun-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest"
MANIFEST = "checkpoint.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
_TAG_BAD = re.compile(r"[/\\\x00]")


def shard_file(rank: int) -> str:
    return f"zero_shard_rank{rank}.pt"


def default_tag(global_steps: int) -> str:
    return f"global_step{global_steps}"


def _tag_problem(tag: str):
    """Why `tag` cannot name a folder directly inside a checkpoint root, or None."""
    if not tag or tag in (".", ".."):
        return "it is empty or a relative folder reference"
    if _TAG_BAD.search(tag) or os.path.isabs(tag):
        return "it contains a path separator or NUL byte (a tag is a single folder name)"
    if TMP_MARK in tag or OLD_MARK in tag:
        return f"it contains {TMP_MARK!r} or {OLD_MARK!r}, reserved for unfinished saves"
    return None


def validate_tag(tag, where="tag") -> str:
    """A tag names one folder under save_dir: a non-empty string without path separators."""
    tag = str(tag)
    problem = _tag_problem(tag)
    if problem:
        raise CheckpointError(f"invalid checkpoint tag {tag!r}: {problem}", where=where,
                              hint="use a plain folder name such as 'global_step100'")
    return tag


def read_latest(load_dir: str):
    """The tag in `load_dir/latest`, or None when there is no such file. A tag that would leave the folder
    (`../x`, `/abs`, `a/b`, NUL) is refused with an error naming the `latest` file."""
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
        tag = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise CheckpointError(f"cannot read the tag in the 'latest' file: {reason}", where=path) from None
    if not tag:
        return None
    problem = _tag_problem(tag)
    if problem:
        raise CheckpointError(f"'latest' names {tag!r}, which is not a tag folder inside {load_dir}: {problem}",
                              where=path, hint="write the tag of a checkpoint folder into it, or pass tag=")
    return tag


def write_latest(save_dir: str, tag: str) -> None:
    """Point `latest` at `tag` with one atomic replace (the last act of a save)."""
    write_file_atomic(os.path.join(save_dir, LATEST), tag.encode())
    fsync_dir(save_dir)


def list_tags(load_dir: str) -> list:
    """The tag folders in `load_dir` (sorted), unfinished saves left out."""
    try:
        names = os.listdir(load_dir)
    except OSError:
        return []
    return sorted(n for n in names if _tag_problem(n) is None and os.path.isdir(os.path.join(load_dir, n)))


def resolve_tag_dir(load_dir: str, tag: str) -> str:
    """The folder holding `tag`. If a save of the same tag was interrupted between moving the old copy
    aside and publishing the new one, the old copy (`<tag>.old-*`) is still complete and is used.
    A tag with no folder raises an error listing the tags present."""
    path = os.path.join(load_dir, tag)
    if os.path.isdir(path):
        return path
    aside = sorted(glob.glob(glob.escape(path) + OLD_MARK + "*"))
    for candidate in aside:
        if os.path.isfile(os.path.join(candidate, MANIFEST)):
            return candidate
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"no checkpoint tag {tag!r} in {load_dir}: the folder does not exist",
                              hint="check the checkpoint directory")
    present = list_tags(load_dir)
    raise CheckpointError(f"no checkpoint tag {tag!r} in {load_dir}; tags present: "
                          f"{', '.join(present) if present else '(none)'}",
                          hint="check the tag (or the 'latest' file)")


def _stale(save_dir: str, name: str) -> bool:
    """Whether `name` in `save_dir` is a folder left by an unfinished save: any `<tag>.tmp-*`, and a
    `<tag>.old-*` whose `<tag>` exists (without it, the `.old` copy is the tag's only complete copy)."""
    if not os.path.isdir(os.path.join(save_dir, name)):
        return False
    if TMP_MARK in name:
        return True
    if OLD_MARK in name:
        tag = name.split(OLD_MARK, 1)[0]
        return bool(tag) and os.path.isdir(os.path.join(save_dir, tag))
    return False


def remove_stale(save_dir: str) -> list:
    """Remove the folders that crashed or failed saves left in `save_dir` (see `_stale`); returns their names.

    Call only where no save into `save_dir` is in progress: the saving job's rank 0, before it creates
    its own temp folder (other ranks write only after that). Two jobs must not save into one folder at once.
    """
    try:
        names = os.listdir(save_dir)
    except OSError:
        return []
    removed = [n for n in sorted(names) if _stale(save_dir, n)]
    for name in removed:
        shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    if removed:
        logger.info("removed folders of unfinished checkpoint saves in %s: %s", save_dir, ", ".join(removed))
    return removed


def write_manifest(tag_dir: str, manifest: dict) -> None:
    write_file_atomic(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())


# key -> type every manifest must have; checked so a damaged manifest is reported, not a KeyError later
_MANIFEST_KEYS = {"files": list, "shards": dict, "params": dict, "param_order": list}


def _parse_manifest(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise CheckpointError(f"cannot read {MANIFEST}: {err.strerror}", where=path) from None
    if not raw:
        raise CheckpointError(f"{MANIFEST} is empty (zero length)", where=path,
                              hint="the checkpoint is damaged; load another tag")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{MANIFEST} is not UTF-8 text: the file is corrupt", where=path) from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{MANIFEST} is not valid JSON (truncated or corrupt): {err.msg} at line "
                              f"{err.lineno} column {err.colno}", where=f"{path}:{err.lineno}",
                              hint="the checkpoint is damaged; load another tag") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{MANIFEST} is not a {FORMAT_NAME} manifest", where=path)
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {version!r} is newer than this dsrun "
                              f"understands ({FORMAT_VERSION})", where=path, hint="upgrade dsrun")
    bad = [key for key, kind in _MANIFEST_KEYS.items() if not isinstance(manifest.get(key), kind)]
    names = list(manifest.get("files") or []) + list(manifest.get("shards") or {})
    if any(not isinstance(n, str) or _tag_problem(n) is not None for n in names):
        bad.append("files (a file name that is not a plain name inside the folder)")
    if bad:
        raise CheckpointError(f"{MANIFEST} is damaged: missing or malformed {', '.join(bad)}", where=path)
    return manifest


def read_manifest(tag_dir: str) -> dict:
    """The manifest of a complete checkpoint; errors name the folder or file and what is wrong."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isdir(tag_dir):
        raise CheckpointError("checkpoint folder not found", where=tag_dir,
                              hint="check the directory and tag (or the 'latest' file)")
    if not os.path.isfile(path):
        raise CheckpointError(f"no {MANIFEST} in the checkpoint folder: not a dsrun checkpoint, or an "
                              f"incomplete save", where=tag_dir)
    manifest = _parse_manifest(path)
    missing = [name for name in manifest["files"] if not os.path.isfile(os.path.join(tag_dir, str(name)))]
    if missing:
        raise CheckpointError(f"incomplete checkpoint: missing {', '.join(map(str, missing))}", where=tag_dir,
                              hint="the checkpoint is damaged; load another tag")
    return manifest

"""Crash-safe file system steps: fsync'd files, atomic replace, directory publish by rename.

[Note: atomic checkpoint publish] A save writes every file into `<save_dir>/<tag>.tmp-<token>`, fsyncs
the files and the folder, then renames the folder to `<tag>` (moving an existing `<tag>` aside to
`<tag>.old-<token>` first and deleting it after), and only then replaces `latest` via a temp file and
`os.replace`. A crash at any point leaves `latest` naming a complete folder: the previous checkpoint
until the final replace, the new one after it. A write that fails (a full disk, a file size limit) removes
its partial file and raises a CheckpointError naming it; the save then removes its whole temp folder
(engine_io.save), and folders left by crashed saves are removed by the next save (layout.remove_stale).
"""
from __future__ import annotations

import os
import shutil

import torch

from dsrun.runtime.checkpoint.errors import CheckpointError
from dsrun.runtime.checkpoint.integrity import HashingWriter

__all__ = ["fsync_dir", "write_file_atomic", "torch_save_synced", "publish_dir"]


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_error(path: str, err: OSError) -> CheckpointError:
    reason = err.strerror or str(err)
    return CheckpointError(f"cannot write checkpoint file: {reason}", where=path,
                           hint="free space on that file system (or raise the file size limit) and save again")


def write_file_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsync, then `os.replace`. On failure
    the temp file is removed and a CheckpointError names `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        raise _write_error(path, err) from err


def torch_save_synced(obj, path: str) -> dict:
    """`torch.save` then fsync, so the bytes are on disk before the folder is published.

    Returns the file's manifest record (`bytes`, `digest`; [Note: checkpoint checksums] in integrity.py),
    checksummed as the bytes stream out. On failure the partial file is removed; an I/O error (ENOSPC, EFBIG)
    becomes a CheckpointError naming `path`, anything else is re-raised."""
    writer = None
    try:
        with open(path, "wb") as f, HashingWriter(f) as writer:
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
    except BaseException as err:
        _remove_quietly(path)
        io_error = writer.error if writer is not None and writer.error is not None else err
        if isinstance(io_error, OSError):
            raise _write_error(path, io_error) from err
        raise
    record = writer.record()
    # The checksum covers the stream torch wrote; it is the file only if torch never seeked back.
    assert size == record["bytes"], f"{path}: wrote {record['bytes']} bytes but the file has {size}"
    return record


def publish_dir(tmp_dir: str, final_dir: str, aside_dir: str) -> None:
    """Rename the finished `tmp_dir` to `final_dir`; an existing `final_dir` moves to `aside_dir` first and
    is deleted once the new folder is in place."""
    parent = os.path.dirname(final_dir)
    fsync_dir(tmp_dir)
    moved = False
    if os.path.exists(final_dir):
        os.rename(final_dir, aside_dir)
        moved = True
    os.rename(tmp_dir, final_dir)
    fsync_dir(parent)
    if moved:
        shutil.rmtree(aside_dir, ignore_errors=True)

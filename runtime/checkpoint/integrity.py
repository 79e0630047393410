"""File checksums of a checkpoint: computed while a file is written, checked before a file is read.

[Note: checkpoint checksums] The manifest records, for every file of the folder, its size and a SHA-256
digest (`"checksums": {"algorithm": "sha256", "files": {name: {"bytes": N, "digest": hex}}}`). SHA-256 is
hardware-accelerated on current x86 (SHA-NI) and ARM CPUs: on a loaded 2-core test machine it hashed
0.7 GB/s against 1.1 GB/s for zlib.crc32, a small cost next to serialising and fsyncing the same bytes,
and unlike a 32-bit CRC it never lets a corrupt file pass by chance. Saving hashes the byte stream on its
way to the file (`HashingWriter`: no second pass, no copy); loading streams the file in 4 MiB blocks before
`torch.load` sees it, for each file the rank actually opens. The size is checked first, so a truncated or
emptied file is reported as such rather than as a checksum mismatch. Checkpoints written before checksums
existed (no `checksums` key) load unverified, with one info line per folder.
"""
from __future__ import annotations

import hashlib
import logging
import os

import torch

from dsrun.runtime.checkpoint.errors import CheckpointError

__all__ = ["ALGORITHM", "HashingWriter", "file_record", "verify_file", "load_torch_file"]

logger = logging.getLogger(__name__)

ALGORITHM = "sha256"
BLOCK_BYTES = 4 << 20
_unverified_noted = set()  # folders already reported as written without checksums (one line each)


class HashingWriter:
    """A write-only file object for `torch.save`: hashes and counts each block, then writes it to `f`.

    torch's zip writer reports a failed `write` as an opaque RuntimeError; the original error (ENOSPC,
    EFBIG) is kept in `error` so the caller can report it."""

    def __init__(self, f):
        self._f = f
        self._hash = hashlib.new(ALGORITHM)
        self.nbytes = 0
        self.error = None

    def write(self, data) -> int:
        try:
            written = self._f.write(data)
        except OSError as err:
            self.error = err
            raise
        self._hash.update(data)
        self.nbytes += len(data)
        return written

    def flush(self) -> None:
        self._f.flush()

    def record(self) -> dict:
        """The manifest entry of what was written: `{"bytes": N, "digest": hex}`."""
        return {"bytes": self.nbytes, "digest": self._hash.hexdigest()}


def _hash_file(path: str, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    block = bytearray(BLOCK_BYTES)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(block)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def file_record(path: str) -> dict:
    """The manifest entry (`bytes`, `digest`) of an existing file, hashed by streaming it."""
    return {"bytes": os.path.getsize(path), "digest": _hash_file(path, ALGORITHM)}


def _checksums(manifest: dict, tag_dir: str):
    """`(algorithm, {file: record})`, or None for a checkpoint written without checksums."""
    checksums = manifest.get("checksums")
    if checksums is None:
        if tag_dir not in _unverified_noted:
            _unverified_noted.add(tag_dir)
            logger.info("checkpoint %s has no checksums (written by an older dsrun): files are not verified",
                        tag_dir)
        return None
    algorithm = checksums.get("algorithm") if isinstance(checksums, dict) else None
    files = checksums.get("files") if isinstance(checksums, dict) else None
    if not isinstance(algorithm, str) or not isinstance(files, dict):
        raise CheckpointError("malformed 'checksums' entry in checkpoint.json", where=tag_dir)
    return algorithm, files


def verify_file(tag_dir: str, name: str, manifest: dict) -> str:
    """Check that `tag_dir/name` exists, is not empty and matches its size and digest in the manifest.

    Returns the file's path. Raises CheckpointError naming the file: missing, zero-length, truncated,
    grown, or corrupt (checksum mismatch)."""
    path = os.path.join(tag_dir, name)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise CheckpointError("checkpoint file is missing", where=path,
                              hint="the checkpoint is incomplete; load another tag") from None
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint file: {err.strerror}", where=path) from None
    checksums = _checksums(manifest, tag_dir)
    expected = None if checksums is None else checksums[1].get(name)
    if checksums is not None and expected is None:
        raise CheckpointError("checkpoint.json has no checksum for this file", where=path)
    want = None if expected is None else expected.get("bytes")
    if size == 0:
        detail = f" (expected {want} bytes)" if want else ""
        raise CheckpointError(f"checkpoint file is empty (zero length){detail}", where=path,
                              hint="the checkpoint is damaged; load another tag")
    if expected is None:
        return path
    if size != want:
        what = "truncated" if size < want else "longer than saved"
        raise CheckpointError(f"checkpoint file is {what}: {size} bytes, expected {want}", where=path,
                              hint="the checkpoint is damaged; load another tag")
    algorithm = checksums[0]
    if algorithm not in hashlib.algorithms_available:
        logger.warning("checksum algorithm %r is unknown to this Python: %s checked by size only", algorithm,
                       path)
        return path
    try:
        actual = _hash_file(path, algorithm)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint file: {err.strerror}", where=path) from None
    if actual != expected.get("digest"):
        raise CheckpointError(f"checkpoint file is corrupt: {algorithm} checksum mismatch (saved "
                              f"{str(expected.get('digest'))[:16]}..., file {actual[:16]}...)", where=path,
                              hint="the checkpoint is damaged; load another tag")
    return path


def load_torch_file(tag_dir: str, name: str, manifest: dict, *, weights_only: bool, mmap: bool = True):
    """`torch.load` of one checkpoint file after `verify_file`; any failure to read it (including files
    of checkpoints without checksums) becomes a CheckpointError naming the file."""
    path = verify_file(tag_dir, name, manifest)
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=weights_only)
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, pickle or OSError errors
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint file cannot be read (truncated or corrupt?): {first_line}",
                              where=path, hint="the checkpoint is damaged; load another tag") from err

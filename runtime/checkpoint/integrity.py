"""File checksums of a checkpoint: computed while a file is written, checked before a file is read.

[Note: checkpoint checksums] The manifest records, for every file of the folder, its size and a CRC-32
(`"checksums": {"algorithm": "crc32", "files": {name: {"bytes": N, "digest": "8 hex digits"}}}`).
Why CRC-32 and not SHA-256: on an H200 host (Xeon, 16 cores) `torch.save` + fsync of 1 GiB took 1.35 s;
hashing the stream added 0.7 s with SHA-256 (1.2 GB/s), 0.36 s with zlib.crc32 (3.2 GB/s) and 0.03 s with
zlib.crc32 computed beside the file write (both release the GIL). The threat is accidental damage (bit
flips, truncation, zeroed or partly copied files), which CRC-32 catches (every burst up to 32 bits, other
damage with probability 1 - 2**-32), as zip and gzip do; a hash would not stop deliberate tampering either,
since the manifest beside the files is not signed. Another algorithm name (any of hashlib's) is verified
too, so the choice can change without a format version.

Saving checksums the byte stream on its way to the file (`HashingWriter`: no second pass, no copy; large
blocks are checksummed in a helper thread while the same block is being written). Loading streams the
file in 4 MiB blocks before `torch.load` sees it, for each file the rank actually opens. The size is
checked first, so a truncated or emptied file is reported as such rather than as a checksum mismatch.
Checkpoints written before checksums existed (no `checksums` key) load unverified, with one info line
per folder.
"""
from __future__ import annotations

import hashlib
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

from dsrun.runtime.checkpoint.errors import CheckpointError
from dsrun.runtime.log import warn_once_rank0

__all__ = ["ALGORITHM", "HashingWriter", "file_record", "verify_file", "load_torch_file"]

logger = logging.getLogger(__name__)

ALGORITHM = "crc32"
BLOCK_BYTES = 4 << 20
_OVERLAP_BYTES = 1 << 20  # blocks at least this large are checksummed beside their write
_unverified_noted = set()  # folders already reported as written without checksums (one line each)


class _Crc32:
    """zlib.crc32 behind hashlib's `update` / `hexdigest`."""

    def __init__(self):
        self._value = 0

    def update(self, data) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


def _new_hash(algorithm: str):
    return _Crc32() if algorithm == "crc32" else hashlib.new(algorithm)


def _known(algorithm: str) -> bool:
    return algorithm == "crc32" or algorithm in hashlib.algorithms_available


class HashingWriter:
    """A write-only file object for `torch.save`: checksums and counts each block as it writes it to `f`.

    torch's zip writer reports a failed `write` as an opaque RuntimeError; the original error (ENOSPC,
    EFBIG) is kept in `error` so the caller can report it. Use as a context manager (it owns a thread)."""

    def __init__(self, f):
        self._f = f
        self._hash = _new_hash(ALGORITHM)
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsrun-ckpt-crc")
        self.nbytes = 0
        self.error = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._helper.shutdown(wait=True)

    def write(self, data) -> int:
        # `data` is valid only during this call: a block checksummed in the helper is waited for before
        # returning, which also keeps the blocks in order.
        pending = self._helper.submit(self._hash.update, data) if len(data) >= _OVERLAP_BYTES else None
        try:
            written = self._f.write(data)
        except OSError as err:
            self.error = err
            raise
        finally:
            if pending is not None:
                pending.result()
        if pending is None:
            self._hash.update(data)
        self.nbytes += len(data)
        return written

    def flush(self) -> None:
        self._f.flush()

    def record(self) -> dict:
        """The manifest entry of what was written: `{"bytes": N, "digest": hex}`."""
        return {"bytes": self.nbytes, "digest": self._hash.hexdigest()}


def _hash_file(path: str, algorithm: str) -> str:
    digest = _new_hash(algorithm)
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
    """The manifest entry (`bytes`, `digest`) of an existing file, checksummed by streaming it."""
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
    if not _known(algorithm):
        warn_once_rank0("checksum algorithm %r is unknown to this Python: %s checked by size only", algorithm,
                        path, logger=logger)
        return path
    try:
        actual = _hash_file(path, algorithm)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint file: {err.strerror}", where=path) from None
    if actual != expected.get("digest"):
        raise CheckpointError(f"checkpoint file is corrupt: {algorithm} checksum mismatch (saved "
                              f"{_short(expected.get('digest'))}, file {_short(actual)})", where=path,
                              hint="the checkpoint is damaged; load another tag")
    return path


def _short(digest) -> str:
    digest = str(digest)
    return digest if len(digest) <= 16 else digest[:16] + "..."


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

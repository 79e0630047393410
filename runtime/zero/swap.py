"""TensorSwapper: host tensors kept in files under `nvme_path`, read and written by a thread pool.

The NVMe offload (`device: nvme`, nvme.py) keeps what does not fit in host memory in one file per tensor
under `<nvme_path>/dsrun-<job id>/rank<rank>/` (the job id is the launcher's `DSRUN_JOB_ID`, else this
process's pid). The folder is removed when the swapper is closed (the engine's `destroy()`, which the
exit teardown runs) and, when the rank ends by an uncaught exception, by the teardown's fast exit
(runtime/teardown.py `track_path`). A rank killed by a signal leaves it behind; the next swapper on the
same host removes folders whose owner process is gone (`sweep_stale`).

[Note: swap I/O] A tensor's bytes move in `block_size` pieces, each one `os.pwrite`/`os.pread` on a pool
of `queue_depth * thread_count` threads (the `aio` section): those calls release the GIL, so the pieces
are in flight together (the queue depth) while the caller computes. Nothing is silent:
- each file is allocated to its full size when first written (`posix_fallocate`), so a full disk
  (ENOSPC) or a file-size limit (EFBIG; SIGXFSZ is ignored for that, its default would kill the rank)
  shows up at once, as a `SwapError` naming the file and the bytes needed;
- a short write is continued, and a write that makes no progress or fails is a `SwapError`;
- a short read (a file truncated behind dsrun's back) is a `SwapError`, never zeros.
Errors raised by pool threads reach the caller at `Pending.wait()`.

Where the filesystem supports O_DIRECT (probed once per swapper), the I/O bypasses the page cache: each
pool thread has a page-aligned bounce buffer of `block_size` bytes (torch's allocator gives no
block-aligned memory) and copies through it with `memmove`, which releases the GIL; a tensor's last
piece is padded to 4 KiB in the file. Elsewhere (tmpfs, some network filesystems) the I/O is buffered,
through the page cache. benchmarks/bench_nvme.py measures both beside the drive.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import torch

from dsrun.errors import ConfigError, DsrunError

__all__ = ["SwapError", "TensorSwapper", "Pending", "job_folder", "check_nvme_path", "check_disk_budget",
           "free_storage", "alloc_storage", "direct_io_supported"]

_OWNER = "owner"  # "<host> <pid>" of the process that made a rank folder
_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length are multiples of this


class SwapError(DsrunError):
    """An NVMe swap read or write failed (full disk, file-size limit, short write, truncated file)."""

    exit_code = 1


def job_folder(nvme_path: str, *, rank: int, job_id: Optional[str] = None) -> str:
    """`<nvme_path>/dsrun-<job id>/rank<rank>`; the job id defaults to DSRUN_JOB_ID, else `pid<pid>`."""
    job = job_id or os.environ.get("DSRUN_JOB_ID") or f"pid{os.getpid()}"
    return os.path.join(nvme_path, job if job.startswith("dsrun-") else f"dsrun-{job}", f"rank{rank}")


def check_nvme_path(nvme_path: str, where: str) -> None:
    """ConfigError unless `nvme_path` is an existing, writable directory."""
    if not os.path.isdir(nvme_path):
        raise ConfigError(f"nvme_path {nvme_path!r} is not an existing directory", where=where,
                          hint="create it, or point nvme_path at a directory on a local NVMe drive")
    if not os.access(nvme_path, os.W_OK | os.X_OK):
        raise ConfigError(f"nvme_path {nvme_path!r} is not writable by this user", where=where,
                          hint="change its permissions, or point nvme_path at a writable directory")


def check_disk_budget(nvme_path: str, needed: int, *, local_ranks: int, where: str, free: Optional[int] = None) -> None:
    """ConfigError when `needed` bytes (all local ranks together) exceed the free space of `nvme_path`."""
    free = shutil.disk_usage(nvme_path).free if free is None else free
    if needed > free:
        gib = 1 << 30
        raise ConfigError(f"NVMe offload needs {needed} bytes ({needed / gib:.2f} GiB) under {nvme_path} for "
                          f"{local_ranks} local rank(s), but only {free} bytes ({free / gib:.2f} GiB) are free",
                          where=where, hint="free space there, point nvme_path at a larger drive, or use more "
                                            "data-parallel ranks (more nodes)")


def free_storage(t: torch.Tensor) -> None:
    """Release `t`'s memory; the tensor keeps its shape (and identity) for `alloc_storage`."""
    t.untyped_storage().resize_(0)


def alloc_storage(t: torch.Tensor) -> None:
    """Give `t` (freed by `free_storage`) fresh, uninitialised memory again."""
    nbytes = t.numel() * t.element_size()
    if t.untyped_storage().nbytes() != nbytes:
        t.untyped_storage().resize_(nbytes)


def _address(t: torch.Tensor) -> int:
    """The address of a contiguous host tensor's bytes (any dtype)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("swapped tensors must be contiguous host tensors")
    return t.data_ptr()


def _view(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def direct_io_supported(folder: str) -> bool:
    """Whether files in `folder` can be opened with O_DIRECT and written from an aligned buffer."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    path = os.path.join(folder, ".direct_probe")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | flag, 0o600)
    except OSError:
        return False
    try:
        return os.pwrite(fd, mmap.mmap(-1, _ALIGN), 0) == _ALIGN
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(nvme_path: str) -> None:
    """Remove `dsrun-*/rank*` folders under `nvme_path` made on this host by processes that are gone
    (ranks killed by a signal cannot remove their own)."""
    host = socket.gethostname()
    try:
        jobs = [e for e in os.scandir(nvme_path) if e.name.startswith("dsrun-") and e.is_dir()]
    except OSError:
        return
    for job in jobs:
        for entry in list(os.scandir(job.path)):
            try:
                with open(os.path.join(entry.path, _OWNER)) as f:
                    owner_host, pid = f.read().split()
            except (OSError, ValueError):
                continue
            if owner_host == host and not _pid_alive(int(pid)):
                shutil.rmtree(entry.path, ignore_errors=True)
        try:
            os.rmdir(job.path)  # only when empty
        except OSError:
            pass


def _make_folder(folder: str, where: str) -> None:
    """Create a rank folder and its `owner` file. Another rank of the job removes the job folder when it
    is empty as it ends (`remove_folder`), possibly between our two mkdirs: then make it again."""
    for attempt in range(10):
        try:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, _OWNER), "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
            return
        except FileNotFoundError:
            if attempt == 9:
                raise ConfigError(f"cannot create the swap folder {folder}: it keeps disappearing", where=where)
        except OSError as exc:
            raise ConfigError(f"cannot create the swap folder {folder}: {exc.strerror}", where=where) from None


class Pending:
    """I/O in flight; `wait()` returns when all of it is done and raises its first error."""

    def __init__(self, futures: List, keep: Optional[torch.Tensor] = None):
        self._futures = futures
        # the pool threads hold only the tensor's address: it must live until they are done, even when
        # the caller passed a temporary (`swapper.read(key, torch.empty(n)).wait()` freed it before the
        # threads wrote into it: heap corruption)
        self._keep = keep

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def wait(self) -> None:
        futures, self._futures = self._futures, []
        first = None
        for f in futures:
            exc = f.exception()
            if exc is not None and first is None:
                first = exc
        self._keep = None
        if first is not None:
            raise first


class TensorSwapper:
    """One file per key under this rank's folder; `write`/`read` move a host tensor's bytes
    asynchronously ([Note: swap I/O])."""

    def __init__(self, nvme_path: str, *, rank: int, block_size: int = 1 << 20, queue_depth: int = 8,
                 thread_count: int = 1, where: str = "nvme_path", direct: Optional[bool] = None):
        check_nvme_path(nvme_path, where)
        sweep_stale(nvme_path)
        self.folder = job_folder(nvme_path, rank=rank)
        _make_folder(self.folder, where)
        from ..teardown import track_path
        track_path(self.folder)
        _ignore_sigxfsz()
        self.block_size = max(_ALIGN, int(block_size) // _ALIGN * _ALIGN)
        self.direct = direct_io_supported(self.folder) if direct is None else direct
        self._bounce = threading.local()  # O_DIRECT: each pool thread's aligned buffer
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(queue_depth) * max(1, int(thread_count))),
                                        thread_name_prefix="dsrun-swap")
        self._fds: Dict[str, int] = {}
        self._sizes: Dict[str, int] = {}
        self.bytes_written = self.bytes_read = 0

    def has(self, key: str) -> bool:
        """Whether `key` was ever written."""
        return key in self._sizes

    def path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.swp")

    def _open(self, key: str, nbytes: int) -> int:
        fd = self._fds.get(key)
        if fd is not None and self._sizes[key] >= nbytes:
            return fd
        path = self.path(key)
        if fd is None:
            flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if self.direct else 0)
            fd = self._fds[key] = os.open(path, flags, 0o600)
        try:
            os.posix_fallocate(fd, 0, _padded(nbytes) if self.direct else nbytes)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise _io_error("allocate", path, nbytes, exc) from None
        self._sizes[key] = nbytes
        return fd

    def _pieces(self, nbytes: int):
        return [(lo, min(lo + self.block_size, nbytes)) for lo in range(0, nbytes, self.block_size)]

    def write(self, key: str, tensor: torch.Tensor) -> Pending:
        """Start writing `tensor`'s bytes to `key`'s file; the tensor must stay untouched until `wait()`."""
        addr, nbytes = _address(tensor), tensor.numel() * tensor.element_size()
        fd, path = self._open(key, nbytes), self.path(key)
        self.bytes_written += nbytes
        if self.direct:
            jobs = [(self._write_direct, fd, path, addr + lo, hi - lo, lo, nbytes) for lo, hi in self._pieces(nbytes)]
        else:
            jobs = [(_write, fd, path, _view(addr + lo, hi - lo), lo, nbytes) for lo, hi in self._pieces(nbytes)]
        return Pending([self._pool.submit(*job) for job in jobs], keep=tensor)

    def read(self, key: str, tensor: torch.Tensor) -> Pending:
        """Start reading `key`'s file into `tensor` (written by `write` before, same size)."""
        nbytes = tensor.numel() * tensor.element_size()
        if self._sizes.get(key, -1) < nbytes:
            raise SwapError(f"{self.path(key)}: read {nbytes} bytes from a file that was never written that large")
        addr, fd, path = _address(tensor), self._fds[key], self.path(key)
        self.bytes_read += nbytes
        if self.direct:
            jobs = [(self._read_direct, fd, path, addr + lo, hi - lo, lo) for lo, hi in self._pieces(nbytes)]
        else:
            jobs = [(_read, fd, path, _view(addr + lo, hi - lo), lo) for lo, hi in self._pieces(nbytes)]
        return Pending([self._pool.submit(*job) for job in jobs], keep=tensor)

    def _bounce_buffer(self):
        """(mmap, address) of this pool thread's page-aligned buffer of `block_size` bytes."""
        held = getattr(self._bounce, "buf", None)
        if held is None:
            buf = mmap.mmap(-1, self.block_size)
            held = self._bounce.buf = (buf, ctypes.addressof(ctypes.c_char.from_buffer(buf)))
        return held

    def _write_direct(self, fd: int, path: str, src: int, n: int, offset: int, nbytes: int) -> None:
        buf, addr = self._bounce_buffer()
        ctypes.memmove(addr, src, n)
        padded = _padded(n)
        if padded > n:
            ctypes.memset(addr + n, 0, padded - n)
        try:
            written = os.pwrite(fd, memoryview(buf)[:padded], offset)
        except OSError as exc:
            raise _io_error("write", path, nbytes, exc) from None
        if written != padded:  # an O_DIRECT write cannot be continued from an unaligned point
            raise SwapError(f"NVMe offload wrote only {offset + max(written, 0)} of {nbytes} bytes to {path} "
                            "(short write)")

    def _read_direct(self, fd: int, path: str, dst: int, n: int, offset: int) -> None:
        buf, addr = self._bounce_buffer()
        padded = _padded(n)
        try:
            got = os.preadv(fd, [memoryview(buf)[:padded]], offset)
        except OSError as exc:
            raise SwapError(f"NVMe offload could not read {path}: {exc.strerror}") from None
        if got < n:
            raise SwapError(f"NVMe offload read past the end of {path} at byte {offset + max(got, 0)}: the file was "
                            "truncated or replaced while the job ran")
        ctypes.memmove(dst, addr, n)

    def close(self) -> None:
        """Wait for the pool, close the files and remove this rank's folder (and the job's, if empty)."""
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        remove_folder(self.folder)
        from ..teardown import untrack_path
        untrack_path(self.folder)


def remove_folder(folder: str) -> None:
    """Remove a rank's swap folder and then its job folder when that is empty; never raises."""
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(folder))
    except OSError:
        pass


def _io_error(what: str, path: str, nbytes: int, exc: OSError) -> SwapError:
    reason = {errno.ENOSPC: "the drive is full", errno.EDQUOT: "the disk quota is exhausted",
              errno.EFBIG: "a file-size limit (ulimit -f) or the filesystem's largest file was reached"}.get(
        exc.errno, exc.strerror or str(exc))
    return SwapError(f"NVMe offload could not {what} {nbytes} bytes in {path}: {reason}",
                     hint="free space on the drive, raise the file-size limit, or point nvme_path elsewhere")


def _write(fd: int, path: str, buf: memoryview, offset: int, nbytes: int) -> None:
    done = 0
    while done < len(buf):
        try:
            n = os.pwrite(fd, buf[done:], offset + done)
        except OSError as exc:
            raise _io_error("write", path, nbytes, exc) from None
        if n <= 0:  # no progress and no errno: never report success for bytes not written
            raise SwapError(f"NVMe offload wrote only {offset + done} of {nbytes} bytes to {path} (short write)")
        done += n


def _read(fd: int, path: str, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        try:
            n = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as exc:
            raise SwapError(f"NVMe offload could not read {path}: {exc.strerror}") from None
        if n <= 0:
            raise SwapError(f"NVMe offload read past the end of {path} at byte {offset + done}: the file was "
                            "truncated or replaced while the job ran")
        done += n


def _ignore_sigxfsz() -> None:
    """A write past RLIMIT_FSIZE raises SIGXFSZ, whose default kills the rank without a word; ignored, the
    write fails with EFBIG, which `_io_error` names. Only from the main thread, and only over the default."""
    sig = getattr(signal, "SIGXFSZ", None)
    if sig is None or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(sig) == signal.SIG_DFL:
        signal.signal(sig, signal.SIG_IGN)

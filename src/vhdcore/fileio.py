"""File I/O and durability: the one place to audit what a crash can leave.

* Positional reads and writes (:func:`pwrite_all`, :func:`preadinto_exact`). Writes into new file space are
  issued in pieces of at most 256 KiB: on this class of machine, fresh page-cache memory is slow on first touch,
  and a copy loop of <=256 KiB writes reaches ~4.5 GB/s where single 2 MiB writes manage ~0.7 GB/s
  (docs/machine-facts.md). Nothing else changes: the bytes land in the same order.
* New files (:func:`atomic_output`): a temporary name from :mod:`tempfile` in the destination's own directory
  (``O_CREAT|O_EXCL``, so a planted symlink is never followed), fsynced, renamed over the final name, and the
  directory fsynced (:func:`fsync_dir`, the one directory sync), so a crash leaves either the old file or the
  whole new one under the final name.
* In-place rewrites of a disk (coalesce, relink, rebase, resize, set-parent) go through :class:`WriteIO`: every
  write, copy, truncation and ``fdatasync`` counted, and open to fault injection and recording.

Test support (the one documented fault-injection point; nothing else reads these variables):

* ``VHDCORE_FAULT_AFTER_WRITES=N``: the N-th write (1-based; pwrite, copy_file_range and ftruncate through one
  :class:`WriteIO`, relinking included) fails as ``VHDCORE_FAULT_ACTION`` says: ``eio`` (OSError EIO, the
  default), ``kill`` (SIGKILL before the write) or ``torn`` (the first half of it, sector-rounded, then SIGKILL).
* ``VHDCORE_FAULT_RECORD=PATH``: append every write (path, offset, bytes), every ``fdatasync`` (logged before it
  starts: writes logged before it are durable once it returns) and every truncation to PATH, so a test can
  rebuild the states a power cut could leave (:func:`read_record`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import struct
import tempfile
import threading
from typing import Iterator, Sequence

import numpy as np

# Writes into new file space are cut to this size (module docstring): every writer of fresh space uses it.
WRITE_PIECE = 256 * 1024
# A power cut tears a write at a device-sector boundary: the injected torn write keeps whole 512-byte sectors.
TORN_UNIT = 512


def zero_fill(mv: memoryview) -> None:
    """Zero a writable byte view in place (a memset through numpy, no temporary buffer)."""
    if len(mv):
        np.frombuffer(mv, dtype=np.uint8).fill(0)


def pwrite_all(fd: int, bufs: Sequence[bytes | bytearray | memoryview], offset: int) -> int:
    """Write the buffers one after the other at ``offset``; returns the bytes written (all of them)."""
    pos = offset
    batch: list[memoryview] = []
    batch_len = 0
    for buf in bufs:
        mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
        start = 0
        while start < len(mv):
            k = min(len(mv) - start, WRITE_PIECE - batch_len)
            batch.append(mv[start : start + k])
            batch_len += k
            start += k
            if batch_len == WRITE_PIECE:
                pos += _writev_exact(fd, batch, pos)
                batch, batch_len = [], 0
    if batch:
        pos += _writev_exact(fd, batch, pos)
    return pos - offset


def _writev_exact(fd: int, views: list[memoryview], offset: int) -> int:
    total = sum(len(v) for v in views)
    done = os.pwritev(fd, views, offset)
    while done < total:  # short writes are rare on regular files; finish the rest piece by piece
        skip = done
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            done += os.pwrite(fd, v[skip:], offset + done)
            break
    return total


def preadinto_exact(fd: int, mv: memoryview, offset: int) -> int:
    """Fill ``mv`` from ``offset``; returns how many bytes were read (short only at end of file)."""
    done = 0
    n = len(mv)
    while done < n:
        got = os.preadv(fd, [mv[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def pread_upto(fd: int, offset: int, n: int) -> bytes:
    """``n`` bytes at ``offset``, fewer only at the end of the file: memory follows what the file holds, not
    ``n`` (read in pieces of at most 64 MiB)."""
    parts = []
    got = 0
    while got < n:
        b = os.pread(fd, min(n - got, 64 * 1024 * 1024), offset + got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def pieces(mv: memoryview) -> list[memoryview]:
    """``mv`` cut into views of at most :data:`WRITE_PIECE` bytes (an iovec list for :meth:`WriteIO.pwritev`)."""
    return [mv[i : i + WRITE_PIECE] for i in range(0, len(mv), WRITE_PIECE)]


# --------------------------------------------------------------------------------------------- new files


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    dfd = os.open(os.fspath(directory) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, mode: int = 0o644, fsync: bool = True
                  ) -> Iterator[tuple[int, str]]:
    """An fd for a new temporary file beside ``path``, renamed to ``path`` when the block ends without error.

    The temporary name is unpredictable and created exclusively (``tempfile.mkstemp``), so a symlink planted
    in the directory is never followed; on any error the temporary file is removed.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        yield fd, tmp
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, mode)
        os.rename(tmp, path)
        if fsync:
            fsync_dir(directory)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------- in-place writes

_REC = struct.Struct("<cHQQ")  # kind (W write, S sync, T truncate), path length, offset, data length


class WriteIO:
    """Every write an in-place rewrite makes: counted, and open to fault injection and recording (module
    docstring). ``faults=False``: a plain writer that reads none of the ``VHDCORE_FAULT_*`` variables."""

    def __init__(self, *, faults: bool = True) -> None:
        self.writes = 0
        self.syncs = 0
        self._lock = threading.Lock()  # coalesce's commit thread writes too
        self.fault_at = 0
        self.fault_action = "eio"
        raw = os.environ.get("VHDCORE_FAULT_AFTER_WRITES") if faults else None
        if raw:
            self.fault_at = int(raw)
            self.fault_action = os.environ.get("VHDCORE_FAULT_ACTION", "eio")
            if self.fault_action not in ("eio", "kill", "torn"):
                raise ValueError(f"VHDCORE_FAULT_ACTION must be eio, kill or torn, not {self.fault_action!r}")
        rec = os.environ.get("VHDCORE_FAULT_RECORD") if faults else None
        self._rec = open(rec, "ab") if rec else None  # noqa: SIM115 - closed by close()

    def close(self) -> None:
        if self._rec is not None:
            self._rec.close()
            self._rec = None

    def _count(self, fd: int, data: bytes | None, offset: int) -> None:
        with self._lock:
            self.writes += 1
            n = self.writes
        if n != self.fault_at:
            return
        if self.fault_action == "eio":
            raise OSError(errno.EIO, f"injected fault at write {n} (VHDCORE_FAULT_AFTER_WRITES)")
        if self.fault_action == "torn" and data:
            half = len(data) // 2 // TORN_UNIT * TORN_UNIT
            if half:
                os.pwrite(fd, data[:half], offset)
        os.kill(os.getpid(), signal.SIGKILL)

    def _record(self, kind: bytes, fd: int, offset: int, data: bytes = b"", length: int | None = None) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}").encode()
        with self._lock:
            self._rec.write(_REC.pack(kind, len(path), offset, len(data) if length is None else length))
            self._rec.write(path)
            self._rec.write(data)
            self._rec.flush()

    def pwritev(self, fd: int, bufs: list, offset: int) -> None:
        if self.fault_at or self._rec:
            flat = b"".join(bytes(b) for b in bufs)
            self._count(fd, flat, offset)
        else:
            self._count(fd, None, offset)
        total = sum(len(b) for b in bufs)
        done = os.pwritev(fd, bufs, offset)
        if done < total:  # rare on regular files: finish piecewise
            rest = memoryview(b"".join(bytes(b) for b in bufs))
            while done < total:
                done += os.pwrite(fd, rest[done:], offset + done)
        if self._rec:
            self._record(b"W", fd, offset, flat)

    def copy(self, src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> None:
        """Kernel-side copy of ``n`` bytes (OSError EXDEV/ENOSYS/... when the file systems cannot)."""
        data = os.pread(src_fd, n, src_off) if (self.fault_action == "torn" and self.fault_at) or self._rec else None
        self._count(dst_fd, data, dst_off)
        done = 0
        while done < n:
            got = os.copy_file_range(src_fd, dst_fd, n - done, src_off + done, dst_off + done)
            if got <= 0:
                raise OSError(errno.EIO, f"copy_file_range copied nothing at source offset {src_off + done}")
            done += got
        if self._rec:
            self._record(b"W", dst_fd, dst_off, data)

    def ftruncate(self, fd: int, size: int) -> None:
        self._count(fd, None, size)
        os.ftruncate(fd, size)
        if self._rec:
            self._record(b"T", fd, size)

    def fdatasync(self, fd: int) -> None:
        if self._rec:
            self._record(b"S", fd, 0)
        with self._lock:
            self.syncs += 1
        os.fdatasync(fd)


def read_record(path: str) -> Iterator[tuple[str, str, int, bytes]]:
    """The operations a ``VHDCORE_FAULT_RECORD`` file holds: (kind "W"/"S"/"T", file path, offset, data)."""
    with open(path, "rb") as f:
        while True:
            head = f.read(_REC.size)
            if len(head) < _REC.size:
                return
            kind, plen, offset, dlen = _REC.unpack(head)
            p = f.read(plen).decode()
            data = f.read(dlen) if kind == b"W" else b""
            yield kind.decode(), p, offset, data


__all__ = ["WRITE_PIECE", "zero_fill", "pwrite_all", "preadinto_exact", "pread_upto", "pieces", "fsync_dir", "atomic_output",
           "WriteIO", "read_record"]

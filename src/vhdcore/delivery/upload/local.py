"""A local file destination, written atomically.

The bytes go to a temporary name in the target directory (same file system, so the final rename is
atomic); ``close()`` fsyncs the file, renames it over the final name and fsyncs the directory, so after a
crash the final name holds either the previous file or the whole new one, never a prefix. ``abort()``
removes the temporary file. Nothing is visible at the final name before ``close()``.

The temporary file (``.<name>.<random>.part``) is held under an exclusive ``flock`` for the sink's life. A run
killed mid-export leaves its part file behind, unheld: the next sink opened for the same destination removes
every such part file that nobody holds (a concurrent export to the same name keeps its own) and lists them in
``leftovers_removed``.

With ``device=True`` an existing block device at ``path`` is written in place (no temporary file, no rename):
the caller has checked that it was named explicitly (:func:`vhdcore.destination.check_destination`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import tempfile
import time
from typing import Any

from ...fileio import WRITE_PIECE, fsync_dir
from ...progress import ProgressCallback, as_progress
from . import Sink, UploadResult

__all__ = ["LocalSink", "remove_stale_parts"]


def remove_stale_parts(path: str) -> list[str]:
    """Remove the part files a killed sink for ``path`` left (``.<name>.*.part`` that no process holds locked).

    Each candidate is opened without following symlinks and must be a regular file; it is removed only while we
    hold its lock and only if the name still leads to the file we locked.
    """
    directory, base = os.path.split(os.path.abspath(path))
    prefix = f".{base}."
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".part")) or "/" in name[len(prefix):]:
            continue
        cand = os.path.join(directory, name)
        try:
            fd = os.open(cand, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    continue  # a live export is writing it
                raise
            now = os.lstat(cand)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(cand)
                removed.append(cand)
        except FileNotFoundError:
            continue
        finally:
            os.close(fd)
    return removed


class LocalSink(Sink):
    """Write a stream to ``path`` atomically.

    ``overwrite`` False refuses (FileExistsError at close) to replace an existing file; ``fsync`` False
    skips the durability syncs (tests, scratch output); ``md5`` True also computes the md5 of the bytes
    for ``UploadResult.etag`` (off by default: :class:`vhdcore.delivery.digests.StreamDigests` does it off-thread).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = True,
        fsync: bool = True,
        md5: bool = False,
        mode: int = 0o666,
        progress: ProgressCallback | None = None,
        device: bool = False,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.destination = self.path
        self.overwrite = overwrite
        self.fsync = fsync
        self.progress = as_progress(progress)
        self.bytes_written = 0
        self.closed = False
        self.result = None
        self._md5 = hashlib.md5() if md5 else None
        self._t0 = time.monotonic()
        directory, base = os.path.split(self.path)
        if not base:
            raise IsADirectoryError(f"destination is a directory: {self.path}")
        self.leftovers_removed: list[str] = []
        self.device = False
        if device:
            with contextlib.suppress(FileNotFoundError):
                self.device = stat.S_ISBLK(os.stat(self.path).st_mode)
        if self.device:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            self._tmp = ""
            return
        if not overwrite and os.path.lexists(self.path):
            raise FileExistsError(f"destination exists: {self.path}")
        self.leftovers_removed = remove_stale_parts(self.path)
        self._fd, self._tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".part", dir=directory)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours alone: a fresh name nobody else has opened
        # mkstemp creates 0600; give the file the permissions a plain open() would (mode & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(self._fd, mode & ~umask)

    @property
    def temp_path(self) -> str:
        return self._tmp

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise ValueError(f"sink is closed: {self.path}")
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        pos = 0
        while pos < n:
            pos += os.write(self._fd, mv[pos : pos + WRITE_PIECE])
        if self._md5 is not None:
            self._md5.update(mv)
        self.bytes_written += n
        self.progress(self.bytes_written, None, state="saving", destination=self.path)

    def close(self) -> UploadResult:
        if self.closed:
            if self.result is None:
                raise ValueError(f"sink was aborted: {self.path}")
            return self.result
        try:
            if self.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            if self.device:
                pass  # written in place
            elif self.overwrite:
                os.replace(self._tmp, self.path)
            else:
                # link() fails if the name appeared meanwhile, instead of silently replacing it
                os.link(self._tmp, self.path)
                os.unlink(self._tmp)
            if self.fsync and not self.device:
                fsync_dir(os.path.dirname(self.path))
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self.result = UploadResult(
            destination=self.path,
            size=self.bytes_written,
            etag=self._md5.hexdigest() if self._md5 is not None else None,
            elapsed=time.monotonic() - self._t0,
            extra={"warnings": [f"removed {p}, left by an earlier export to this destination that did not finish"
                                for p in self.leftovers_removed]} if self.leftovers_removed else {},
        )
        self.progress(self.bytes_written, self.bytes_written, state="saving", destination=self.path)
        return self.result

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        if self._tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)

    def __del__(self) -> None:
        # A sink dropped without close() must not leave its temporary file behind.
        if not getattr(self, "closed", True) and getattr(self, "_tmp", None):
            try:
                self.abort()
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"LocalSink({self.path!r}, written={self.bytes_written})"

    def __reduce__(self) -> Any:  # pragma: no cover - an open file descriptor cannot be pickled
        raise TypeError("LocalSink cannot be pickled")

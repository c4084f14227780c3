"""A local file destination, written atomically.

The bytes go to a temporary name in the target directory (same file system, so the final rename is
atomic); ``close()`` fsyncs the file, renames it over the final name and fsyncs the directory, so after a
crash the final name holds either the previous file or the whole new one, never a prefix. ``abort()``
removes the temporary file. Nothing is visible at the final name before ``close()``.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from typing import Any

from ..progress import ProgressCallback, as_progress
from . import Sink, UploadResult

__all__ = ["LocalSink"]

KiB = 1024
# Writing fresh file space in pieces of <= 256 KiB runs ~6x faster on this class of machine than 2 MiB
# writes (page-cache first touch; see machine-facts), so large writes are cut to this size.
_WRITE_PIECE = 256 * KiB


class LocalSink(Sink):
    """Write a stream to ``path`` atomically.

    ``overwrite`` False refuses (FileExistsError at close) to replace an existing file; ``fsync`` False
    skips the durability syncs (tests, scratch output); ``md5`` True also computes the md5 of the bytes
    for ``UploadResult.etag`` (off by default: :class:`vhdcore.digests.StreamDigests` does it off-thread).
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
        if not overwrite and os.path.lexists(self.path):
            raise FileExistsError(f"destination exists: {self.path}")
        self._fd, self._tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".part", dir=directory)
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
            pos += os.write(self._fd, mv[pos : pos + _WRITE_PIECE])
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
            if self.overwrite:
                os.replace(self._tmp, self.path)
            else:
                # link() fails if the name appeared meanwhile, instead of silently replacing it
                os.link(self._tmp, self.path)
                os.unlink(self._tmp)
            if self.fsync:
                dfd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self.result = UploadResult(
            destination=self.path,
            size=self.bytes_written,
            etag=self._md5.hexdigest() if self._md5 is not None else None,
            elapsed=time.monotonic() - self._t0,
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
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass

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

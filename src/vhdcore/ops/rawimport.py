"""A raw image or block device as a source for ``convert`` (qemu-img convert -f raw): import into VHD.

``RawDisk`` offers what the converters read from a chain (``size``, ``allocated_extents``, ``readinto``), so
``convert`` writes fixed, dynamic or raw output from it with the same code and the same layouts. Holes of a
sparse file are found with SEEK_DATA/SEEK_HOLE and never read; the data runs are read in chunks and runs of
zeros inside them are dropped by the writers' zero test (``_kernels.is_zero``), so the output stays sparse and
a dynamic output allocates only blocks that hold data. A block device has no holes: all of it is data.

A file is taken as raw when asked (``--from raw``) or, with ``auto``, when it carries no VHD footer (cookie
``conectix``) at its end, at its end minus 511 bytes (Virtual PC's short footer) or at offset 0 (the copy).
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Iterator

from ..exceptions import InvalidFormatError
from ..disk.extents import Extent
from ..fileio import preadinto_exact, zero_fill
from ..format.structs import FOOTER_COOKIE, FOOTER_SIZE, SECTOR_SIZE, round_up

__all__ = ["RawDisk", "looks_like_vhd", "data_runs"]


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def looks_like_vhd(path: str | os.PathLike[str]) -> bool:
    """Whether the file carries a VHD footer where readers look for one."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        size = _device_size(fd) if stat.S_ISBLK(st.st_mode) else st.st_size
        for off in (size - FOOTER_SIZE, size - FOOTER_SIZE + 1, 0):
            if off >= 0 and size >= FOOTER_SIZE - 1 and os.pread(fd, 8, off) == FOOTER_COOKIE:
                return True
        return False
    finally:
        os.close(fd)


def data_runs(fd: int, size: int, seekable_holes: bool = True) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` runs of [0, size) that may hold data: everything but the file system's holes."""
    if not seekable_holes:
        if size:
            yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                yield pos, size - pos
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        pos = end


class RawDisk:
    """A raw image or block device, read-only, seen as a virtual disk of its size rounded up to a sector."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(self.fd)
            if stat.S_ISBLK(st.st_mode):
                self.file_size = _device_size(self.fd)
                self._holes = False
            elif stat.S_ISREG(st.st_mode):
                self.file_size = st.st_size
                self._holes = True
            else:
                raise InvalidFormatError("a raw source must be a regular file or a block device", path=self.path,
                                         field="file")
            if self.file_size == 0:
                raise InvalidFormatError("the raw source is empty", path=self.path, field="file size", value=0)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = round_up(self.file_size, SECTOR_SIZE)
        self.layers: list = []
        self.leaf = self  # what convert asks for its default block size
        self.block_size = 0
        self.warnings: list[str] = []
        if self.size != self.file_size:
            self.warnings.append(f"{self.path}: {self.file_size} bytes is not a whole number of sectors; the "
                                 f"virtual disk is {self.size} bytes, its tail zeros")

    def allocated_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        stop = self.size if length is None else min(self.size, offset + length)
        for start, n in data_runs(self.fd, self.file_size, self._holes):
            s, e = max(start, offset), min(start + n, stop)
            if e > s:
                yield Extent(s, e - s, None, 0, s)  # layer None: the raw file itself (no VHD layer)

    def allocated_bytes(self) -> int:
        return sum(e.length for e in self.allocated_extents())

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        if offset >= self.size:
            return 0
        n = min(len(mv), self.size - offset)
        got = preadinto_exact(self.fd, mv[:n], offset)
        if got < n:
            zero_fill(mv[got:n])  # past the end of the file: the sector's padding
        return n

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "RawDisk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

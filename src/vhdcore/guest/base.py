"""Shared pieces of the guest layer: the reader protocol, bounded reads, and the result types.

The guest layer reads partition tables and file-system allocation structures straight from a virtual disk,
without mounting anything. It works on any object with ``.size`` and ``.read(offset, n) -> bytes`` (a
``vhdcore.Disk``, or a raw image wrapped in a tiny reader class).

Every read goes through :class:`Region`, which refuses to leave the partition or file system being parsed, so a
hostile field can never make a parser read (or allocate) past what the structure it describes can hold.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np

from .. import kernels as K
from ..exceptions import InvalidFormatError
from .bits import set_range, shift_up

__all__ = [
    "DiskReader", "Region", "Partition", "FileSystemUsage", "GuestReport", "reader_path", "count_set_bits",
    "clear_tail", "unknown_usage", "RawFileReader", "FREE_RUNS_CHUNK_BITS",
]

# free_extents() and count_set_bits() walk the bitmap in slices of this many bits (a multiple of 8) so that the
# temporaries of one slice stay small however large (and however fragmented) the file system is.
FREE_RUNS_CHUNK_BITS = 1 << 24


@runtime_checkable
class DiskReader(Protocol):
    """What the guest layer needs from a disk: its size and random reads."""

    size: int

    def read(self, offset: int, n: int) -> bytes: ...


def reader_path(reader: Any) -> str | None:
    """The file behind a reader, for error messages (a vhdcore Disk names its leaf)."""
    for obj in (reader, getattr(reader, "leaf", None)):
        p = getattr(obj, "path", None)
        if isinstance(p, (str, os.PathLike)):
            return os.fspath(p)
    return None


class Region:
    """A window ``[offset, offset + size)`` of a disk; reads outside it raise :class:`InvalidFormatError`.

    Offsets given to :meth:`read` are relative to the window; errors report the absolute disk offset.
    """

    def __init__(self, reader: DiskReader, offset: int, size: int, what: str = "partition") -> None:
        disk_size = int(reader.size)
        if offset < 0 or size < 0 or offset + size > disk_size:
            raise InvalidFormatError(f"{what} [{offset}, {offset + size}) lies outside the disk of {disk_size} bytes",
                                     path=reader_path(reader), offset=offset, field=f"{what}.size", value=size)
        self.reader = reader
        self.offset = offset
        self.size = size
        self.what = what
        self.path = reader_path(reader)

    def error(self, message: str, rel_offset: int | None = None, field: str | None = None,
              value: Any = None) -> InvalidFormatError:
        off = None if rel_offset is None else self.offset + rel_offset
        return InvalidFormatError(message, path=self.path, offset=off, field=field, value=value)

    def read(self, rel_offset: int, n: int, field: str = "read") -> bytes:
        if n < 0 or rel_offset < 0 or rel_offset + n > self.size:
            raise self.error(f"{field}: {n} bytes at {rel_offset} lie outside the {self.what} of {self.size} bytes",
                             rel_offset if rel_offset >= 0 else None, field, rel_offset)
        if n == 0:
            return b""
        data = self.reader.read(self.offset + rel_offset, n)
        if len(data) != n:
            raise self.error(f"{field}: short read ({len(data)} of {n} bytes)", rel_offset, field, len(data))
        return bytes(data) if not isinstance(data, bytes) else data

    def sub(self, rel_offset: int, size: int, what: str) -> "Region":
        if rel_offset < 0 or size < 0 or rel_offset + size > self.size:
            raise self.error(f"{what} [{rel_offset}, {rel_offset + size}) lies outside the {self.what}",
                             rel_offset if rel_offset >= 0 else None, f"{what}.size", size)
        return Region(self.reader, self.offset + rel_offset, size, what)


@dataclass
class Partition:
    """One entry of the disk's partition table (``index`` is 1-based, as Linux numbers them)."""

    index: int
    offset: int  # bytes from the start of the virtual disk
    size: int  # bytes
    type_id: str  # MBR: "0x83"; GPT: the type GUID in its usual text form
    type_name: str  # "unknown" when the table's type is not one we know
    scheme: str = "mbr"  # "mbr" | "gpt" | "none" (a file system spanning the disk)
    name: str = ""  # GPT partition name
    uuid: str = ""  # GPT unique partition GUID
    bootable: bool = False
    logical: bool = False  # MBR logical partition inside an extended one

    @property
    def end(self) -> int:
        return self.offset + self.size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class FileSystemUsage:
    """What one file system's own allocation structures say about its space.

    ``bitmap`` holds ``cluster_count`` bits, LSB-first (bit ``i`` of the array = cluster ``i`` in use), and cluster
    ``i`` lies at disk offset ``bitmap_origin + i * cluster_size``. Whatever part of ``[offset, offset + size)``
    the bitmap does not cover (FAT's reserved sectors, FATs and root directory before cluster 2; slack after the
    last whole cluster) is file-system metadata and counts as used; ``free_ranges()`` never returns it.

    ``used_bytes + free_bytes == size``; ``free_bytes == free_clusters * cluster_size``.
    """

    type: str  # "ext2" | "ext3" | "ext4" | "ntfs" | "fat12" | "fat16" | "fat32" | "xfs" | "unknown"
    offset: int  # disk offset of the file system's first byte
    size: int  # bytes the file system spans on the disk
    cluster_size: int
    cluster_count: int  # bits in the bitmap
    used_clusters: int
    bitmap: np.ndarray  # uint8, LSB-first, ceil(cluster_count / 8) bytes, bits past cluster_count are zero
    bitmap_origin: int  # disk offset of cluster 0 of the bitmap
    used_bytes: int
    free_bytes: int
    partition_index: int | None = None
    label: str | None = None
    uuid: str | None = None
    metadata_bytes: int = 0  # bytes of [offset, offset+size) outside the bitmap (always used)
    details: dict[str, Any] = field(default_factory=dict)  # per-FS figures (tool-comparable counts)
    notes: list[str] = field(default_factory=list)  # discrepancies found while reading

    @property
    def free_clusters(self) -> int:
        return self.cluster_count - self.used_clusters

    @property
    def end(self) -> int:
        return self.offset + self.size

    def cluster_offset(self, cluster: int) -> int:
        """Disk offset of ``cluster`` (a bit index of ``bitmap``)."""
        return self.bitmap_origin + cluster * self.cluster_size

    def free_extents(self) -> tuple[np.ndarray, np.ndarray]:
        """The free ranges as two int64 arrays ``(disk_offsets, lengths)`` in bytes, ordered, adjacent runs merged.

        Vectorised over slices of the bitmap, so a badly fragmented volume (millions of free runs) costs numpy
        passes, not a Python step per run.
        """
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        n = self.cluster_count
        for lo in range(0, n, FREE_RUNS_CHUNK_BITS):
            hi = min(n, lo + FREE_RUNS_CHUNK_BITS)
            bits = np.unpackbits(self.bitmap[lo // 8 : -(-hi // 8)], bitorder="little")[: hi - lo]
            # +1 where a free run starts, -1 where it ends, with used sentinels on both sides.
            edges = np.diff(np.concatenate(([1], bits, [1])).astype(np.int8))
            s = np.flatnonzero(edges == -1) + lo
            e = np.flatnonzero(edges == 1) + lo
            if len(s) and ends and len(ends[-1]) and ends[-1][-1] == s[0]:
                ends[-1] = ends[-1][:-1]  # a run that crosses the slice boundary: join the halves
                s = s[1:]
            starts.append(s)
            ends.append(e)
        if not starts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        s_all = np.concatenate(starts).astype(np.int64)
        e_all = np.concatenate(ends).astype(np.int64)
        cs = self.cluster_size
        return self.bitmap_origin + s_all * cs, (e_all - s_all) * cs

    def free_ranges(self) -> Iterator[tuple[int, int]]:
        """Byte ranges ``(disk_offset, length)`` the file system marks free, in order, adjacent runs merged."""
        offsets, lengths = self.free_extents()
        return zip(offsets.tolist(), lengths.tolist())

    def used_bytes_per_block(self, block_size: int) -> tuple[int, np.ndarray]:
        """``(first_block, used)``: bytes of each ``block_size`` block of the disk, from ``first_block`` on, that
        this file system uses (metadata outside the bitmap included). The blocks span ``[offset, end)``.

        This is the per-VHD-block join growth forensics needs; when the clusters tile the blocks it is one pass
        of ``count_runs_in_blocks`` over the bitmap, otherwise a walk over the free ranges.
        """
        if block_size <= 0 or self.size <= 0:
            raise ValueError("block size and file-system size must be positive")
        first = self.offset // block_size
        last = (self.end - 1) // block_size
        nblocks = last - first + 1
        starts = np.arange(first, last + 1, dtype=np.int64) * block_size
        used = np.minimum(starts + block_size, self.end) - np.maximum(starts, self.offset)
        cs = self.cluster_size
        lead = self.bitmap_origin - first * block_size
        if self.cluster_count and block_size % cs == 0 and lead >= 0 and lead % cs == 0:
            per = block_size // cs
            pad = lead // cs
            total_bits = nblocks * per
            if pad + self.cluster_count <= total_bits:
                # Padding counts as in use, so the zero bits of each block are exactly its free clusters.
                padded = np.full(-(-total_bits // 8), 0xFF, dtype=np.uint8)
                body = self.bitmap if pad % 8 == 0 else shift_up(self.bitmap, pad % 8)
                nbody = -(-(pad % 8 + self.cluster_count) // 8)
                region = padded[pad // 8 : pad // 8 + nbody]
                region[:] = body[:nbody]
                set_range(padded, pad + self.cluster_count, total_bits)  # bits past the bitmap: not free
                if pad % 8:
                    set_range(padded, (pad // 8) * 8, pad)
                counts = np.zeros(nblocks, dtype=np.uint32)
                K.count_runs_in_blocks(padded, per, nblocks, counts, msb_first=False)
                return first, used - (per - counts.astype(np.int64)) * cs
        for off, n in self.free_ranges():
            end = off + n
            b = off // block_size
            while off < end:
                k = min(end, (b + 1) * block_size) - off
                used[b - first] -= k
                off += k
                b += 1
        return first, used

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view without the bitmap."""
        d = {k: getattr(self, k) for k in (
            "type", "offset", "size", "cluster_size", "cluster_count", "used_clusters", "bitmap_origin",
            "used_bytes", "free_bytes", "metadata_bytes", "partition_index", "label", "uuid")}
        d["free_clusters"] = self.free_clusters
        d["details"] = dict(self.details)
        d["notes"] = list(self.notes)
        return d

    to_dict = summary


def count_set_bits(bitmap: np.ndarray, nbits: int) -> int:
    """Set bits among the first ``nbits`` of an LSB-first bitmap (through the kernels)."""
    if nbits == 0:
        return 0
    total = 0
    for lo in range(0, nbits, FREE_RUNS_CHUNK_BITS):
        hi = min(nbits, lo + FREE_RUNS_CHUNK_BITS)
        total += int(K.bitmap_count(bitmap[lo // 8 : -(-hi // 8)], 0, hi - lo, msb_first=False))
    return total


def clear_tail(bitmap: np.ndarray, nbits: int) -> None:
    """Zero the bits at and after ``nbits`` in the last byte (file systems pad their last group with ones)."""
    if nbits % 8 and len(bitmap) * 8 > nbits:
        bitmap[nbits // 8] &= (1 << (nbits % 8)) - 1
    if len(bitmap) > -(-nbits // 8):
        bitmap[-(-nbits // 8):] = 0


@dataclass
class GuestReport:
    """The guest view of one virtual disk: its partition table and the file systems found in it."""

    disk_size: int
    partition_table: str  # "mbr" | "gpt" | "none" (file system at offset 0) | "empty" (nothing recognised)
    partitions: list[Partition]
    filesystems: list[FileSystemUsage]  # recognised file systems, plus "unknown" entries for the rest
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def used_bytes(self) -> int:
        return sum(fs.used_bytes for fs in self.filesystems if fs.type != "unknown")

    def to_dict(self) -> dict[str, Any]:
        return {
            "disk_size": self.disk_size,
            "partition_table": self.partition_table,
            "partitions": [p.to_dict() for p in self.partitions],
            "filesystems": [fs.summary() for fs in self.filesystems],
            "warnings": list(self.warnings),
            "seconds": self.seconds,
        }


def unknown_usage(offset: int, size: int, partition_index: int | None, note: str) -> FileSystemUsage:
    """A region holding nothing we recognise: all of it counts as used, never as free."""
    return FileSystemUsage(
        type="unknown", offset=offset, size=size, cluster_size=512, cluster_count=0, used_clusters=0,
        bitmap=np.zeros(0, dtype=np.uint8), bitmap_origin=offset, used_bytes=size, free_bytes=0,
        partition_index=partition_index, metadata_bytes=size, notes=[note])


class RawFileReader:
    """A raw disk image file (or a block device) as a :class:`DiskReader`; a context manager."""

    def __init__(self, path: str | os.PathLike[str], offset: int = 0, size: int | None = None) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            end = os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self._fd)
            raise
        self._base = offset
        self.size = (end - offset) if size is None else size

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0:
            raise ValueError(f"negative read ({offset}, {n})")
        n = max(0, min(n, self.size - offset))
        return os.pread(self._fd, n, self._base + offset) if n else b""

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RawFileReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

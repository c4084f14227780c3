"""The guest layer: partition tables and file-system allocation read from a virtual disk, without mounting.

``analyse(reader)`` walks the partition table (or takes the whole disk when a file system starts at offset 0)
and, for each partition, reports what the file system's own allocation structures say is in use, with the
allocation bitmap itself so that growth forensics can join it with the VHD's block allocation, and
``free_ranges()`` so that compaction can skip free space. ``reader`` is anything with ``.size`` and
``.read(offset, n)``: a ``vhdcore.Disk``, or :class:`RawFileReader` over a raw image.

Recognised: ext2/3/4, NTFS, FAT12/16/32, XFS. Anything else (swap, LVM, btrfs, exFAT, encrypted, empty) is
reported as ``type="unknown"`` with whatever signature was seen in ``details["signature"]``: all of its space
counts as used.
What is read is metadata only (superblocks, descriptors, bitmaps, FATs, a few MFT records), so the cost follows
the file systems' metadata, not the disk's virtual size.
"""
from __future__ import annotations

import time
from typing import Callable

from ..exceptions import InvalidFormatError
from .base import (DiskReader, FileSystemUsage, GuestReport, Partition, RawFileReader, Region, reader_path,
                   unknown_usage)
from .ext import is_ext, read_ext
from .fat import is_fat, read_fat
from .ntfs import is_ntfs, read_ntfs
from .xfs import is_xfs, read_xfs
from .partitions import PartitionTable, read_partition_table

__all__ = ["analyse", "probe", "identify", "read_partition_table", "DiskReader", "FileSystemUsage", "GuestReport",
           "Partition", "PartitionTable", "RawFileReader"]

_PARSERS: dict[str, tuple[Callable[[Region], bool], Callable[..., FileSystemUsage]]] = {
    "ext": (is_ext, read_ext),
    "ntfs": (is_ntfs, read_ntfs),
    "fat": (is_fat, read_fat),
    "xfs": (is_xfs, read_xfs),
}


def _other_signature(region: Region) -> str | None:
    """Signatures of file systems and containers we do not analyse, so that "unknown" says what it saw."""
    def at(off: int, n: int) -> bytes:
        return region.read(off, n, "signature") if off + n <= region.size else b""

    if at(3, 8) == b"EXFAT   ":
        return "exfat"
    if at(0x10040, 8) == b"_BHRfS_M":
        return "btrfs"
    if at(0, 6) == b"LUKS\xba\xbe":
        return "luks"
    if at(512, 8) == b"LABELONE":
        return "lvm2"
    if at(4086, 10) in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap"
    if at(0, 4) == b"\x00\x00\x00\x00" and at(0, 512) == bytes(512):
        return "zeros"
    return None


def identify(reader: DiskReader, offset: int, size: int) -> list[str]:
    """Names of the analysable file systems whose signature is present at ``offset`` (usually 0 or 1)."""
    region = Region(reader, offset, size)
    return [name for name, (test, _) in _PARSERS.items() if test(region)]


def probe(reader: DiskReader, offset: int, size: int, partition_index: int | None = None,
          ) -> FileSystemUsage | None:
    """The usage of the ext2/3/4, NTFS, FAT or XFS file system at ``[offset, offset + size)``, or None.

    Raises :class:`InvalidFormatError` when a signature is present but its structures are malformed, and when
    signatures of two different file systems are present (an old one not wiped: never guessed).
    """
    region = Region(reader, offset, size)
    found = [name for name, (test, _) in _PARSERS.items() if test(region)]
    if not found:
        return None
    if len(found) > 1:
        raise InvalidFormatError(f"signatures of {' and '.join(found)} at the same place: ambiguous",
                                 path=reader_path(reader), offset=offset, field="signature", value=",".join(found))
    return _PARSERS[found[0]][1](region, partition_index)


def analyse(reader: DiskReader, *, strict: bool = False) -> GuestReport:
    """The partition table of ``reader`` and the usage of each file system in it.

    With ``strict=False`` (the default) a malformed partition table or file system does not stop the report: it
    is listed as ``type="unknown"`` (all of its space counted as used) with the error in ``notes`` and in the
    report's ``warnings``. With ``strict=True`` the error is raised.
    """
    t0 = time.perf_counter()
    size = int(reader.size)
    warnings: list[str] = []
    try:
        table = read_partition_table(reader)
    except InvalidFormatError as e:
        if strict:
            raise
        warnings.append(f"partition table: {e}")
        table = PartitionTable("invalid", [], [])
        fs = unknown_usage(0, size, None, f"unreadable partition table: {e}")
        return GuestReport(size, "invalid", [], [fs], warnings, round(time.perf_counter() - t0, 6))
    warnings.extend(table.warnings)
    filesystems: list[FileSystemUsage] = []
    for part in table.partitions:
        index = None if table.scheme == "none" else part.index
        try:
            fs = probe(reader, part.offset, part.size, index)
            if fs is None:
                fs = unknown_usage(part.offset, part.size, index,
                                   f"no ext2/3/4, NTFS, FAT or XFS file system (partition type {part.type_name})")
                sig = _other_signature(Region(reader, part.offset, part.size))
                if sig:
                    fs.details["signature"] = sig
        except InvalidFormatError as e:
            if strict:
                raise
            warnings.append(f"partition {part.index} at offset {part.offset}: {e}")
            fs = unknown_usage(part.offset, part.size, index, f"malformed file system: {e}")
        if fs.notes and fs.type != "unknown":
            warnings.extend(f"{fs.type} at offset {fs.offset}: {n}" for n in fs.notes)
        filesystems.append(fs)
    if not table.partitions:
        warnings.append("no partition table and no file system at the start of the disk")
    return GuestReport(size, table.scheme, table.partitions, filesystems, warnings,
                       round(time.perf_counter() - t0, 6))

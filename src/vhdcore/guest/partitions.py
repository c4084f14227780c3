"""Partition tables of a virtual disk: MBR (with extended/logical partitions), protective MBR + GPT, or none.

Only the primary GPT is read (its header CRC and entry-array CRC are checked); a disk whose GPT is damaged raises
:class:`ChecksumError` rather than falling back to the backup, so a report never silently describes a table the
firmware would not use. Partitions that run past the end of the disk are clipped and reported in ``warnings``.
"""
from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass, field

from ..exceptions import ChecksumError, InvalidFormatError
from .base import DiskReader, Partition, reader_path

__all__ = ["PartitionTable", "read_partition_table", "looks_like_filesystem", "MBR_TYPES", "GPT_TYPES"]

SECTOR = 512
# An EBR chain longer than this is a loop or garbage: Linux itself stops at a few hundred.
MAX_LOGICAL = 256
# Largest GPT entry array read (the spec's minimum is 16 KiB; real tables are 16-32 KiB).
MAX_GPT_ARRAY = 4 * 1024 * 1024

MBR_TYPES: dict[int, str] = {
    0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16", 0x07: "HPFS/NTFS/exFAT",
    0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)", 0x0E: "W95 FAT16 (LBA)", 0x0F: "W95 Ext'd (LBA)",
    0x11: "Hidden FAT12", 0x12: "Compaq diagnostics", 0x14: "Hidden FAT16 <32M", 0x16: "Hidden FAT16",
    0x17: "Hidden HPFS/NTFS", 0x1B: "Hidden W95 FAT32", 0x1C: "Hidden W95 FAT32 (LBA)",
    0x1E: "Hidden W95 FAT16 (LBA)", 0x27: "Hidden NTFS WinRE", 0x42: "SFS (Windows dynamic disk)",
    0x82: "Linux swap", 0x83: "Linux", 0x85: "Linux extended", 0x8E: "Linux LVM", 0xA5: "FreeBSD",
    0xA6: "OpenBSD", 0xA8: "Darwin UFS", 0xA9: "NetBSD", 0xAF: "HFS / HFS+", 0xDE: "Dell Utility",
    0xEE: "GPT", 0xEF: "EFI (FAT-12/16/32)", 0xFD: "Linux raid autodetect",
}
EXTENDED_TYPES = {0x05, 0x0F, 0x85}

GPT_TYPES: dict[str, str] = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery environment",
    "5808c8aa-7e8f-42e0-85d2-e1e90434cfb3": "Microsoft LDM metadata",
    "af9b60a0-1431-4f62-bc68-3311714a69ad": "Microsoft LDM data",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "44479540-f297-41b2-9af7-d131d5f0458a": "Linux root (x86)",
    "b921b045-1df0-41c3-af44-4c6f280d3fae": "Linux root (ARM-64)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
    "4d21b016-b534-45c2-a9fb-5c16e091fd2d": "Linux variable data",
    "8484680c-9521-48c6-9c11-b0720656f69e": "Linux /usr (x86-64)",
    "48465300-0000-11aa-aa11-00306543ecac": "Apple HFS/HFS+",
    "516e7cb6-6ecf-11d6-8ff8-00022d09712b": "FreeBSD UFS",
}


@dataclass
class PartitionTable:
    scheme: str  # "mbr" | "gpt" | "none" (a file system at offset 0) | "empty" (nothing recognised)
    partitions: list[Partition]
    warnings: list[str] = field(default_factory=list)
    sector_size: int = SECTOR


def looks_like_filesystem(sector0: bytes, sb1024: bytes = b"") -> bool:
    """Whether the disk's first bytes are a file system's own boot sector or superblock rather than an MBR.

    ``sb1024`` is the 1024 bytes at offset 1024 (where ext2/3/4 keep their superblock); optional.
    """
    if len(sector0) < SECTOR:
        return False
    if sector0[3:11] in (b"NTFS    ", b"EXFAT   ") or sector0[:4] == b"XFSB":
        return True
    if len(sb1024) >= 58 and sb1024[56:58] == b"\x53\xef":
        return True
    return _plausible_bpb(sector0)


def _plausible_bpb(s: bytes) -> bool:
    """A FAT BIOS parameter block at the start of the disk (a 'superfloppy' without partition table)."""
    if s[0] not in (0xEB, 0xE9) or s[510:512] != b"\x55\xaa":
        return False
    bps, spc, reserved, nfats, _, _, media = struct.unpack_from("<HBHBHHB", s, 11)
    return (bps in (512, 1024, 2048, 4096) and spc in (1, 2, 4, 8, 16, 32, 64, 128) and reserved >= 1
            and nfats in (1, 2) and (media >= 0xF8 or media == 0xF0))


def read_partition_table(reader: DiskReader) -> PartitionTable:
    """Read the partition table at the start of ``reader``.

    GPT wins when a protective (0xEE) entry is present and the header at LBA 1 carries its signature; a boot
    sector or superblock at offset 0 means an unpartitioned disk ("none"); otherwise the MBR is read.
    """
    size = int(reader.size)
    path = reader_path(reader)
    if size < SECTOR:
        return PartitionTable("empty", [], ["disk smaller than one sector"])
    s0 = _read(reader, 0, SECTOR)
    sb = _read(reader, 1024, 1024) if size >= 2048 else b""
    mbr_ok = s0[510:512] == b"\x55\xaa"
    entries = [struct.unpack_from("<B3sB3sII", s0, 446 + 16 * i) for i in range(4)] if mbr_ok else []
    protective = mbr_ok and any(e[2] == 0xEE for e in entries)
    if protective:
        for ss in (SECTOR, 4096):
            if size >= 2 * ss and _read(reader, ss, 8) == b"EFI PART":
                return _read_gpt(reader, ss, size, path)
    if looks_like_filesystem(s0, sb):
        return PartitionTable("none", [Partition(1, 0, size, "", "whole disk", scheme="none")])
    if not mbr_ok:
        return PartitionTable("empty", [])
    table = _read_mbr(reader, entries, size, path)
    if protective:
        table.warnings.append("protective MBR (type 0xEE) without a GPT header at LBA 1: the MBR was read")
    return table


def _read(reader: DiskReader, offset: int, n: int) -> bytes:
    data = reader.read(offset, n)
    if len(data) != n:
        raise InvalidFormatError(f"short read of the partition table ({len(data)} of {n} bytes)",
                                 path=reader_path(reader), offset=offset, field="read", value=len(data))
    return bytes(data)


def _clip(table: PartitionTable, p: Partition, disk_size: int) -> None:
    """Add ``p`` to the table, clipped to the disk; drop it (with a warning) if it starts past the end."""
    if p.size == 0:
        return
    if p.offset >= disk_size:
        table.warnings.append(f"partition {p.index} starts at {p.offset}, past the end of the disk ({disk_size}): "
                              "ignored")
        return
    if p.end > disk_size:
        table.warnings.append(f"partition {p.index} ends at {p.end}, past the end of the disk ({disk_size}): "
                              "clipped")
        p.size = disk_size - p.offset
    table.partitions.append(p)


def _mbr_type(t: int) -> tuple[str, str]:
    return f"0x{t:02x}", MBR_TYPES.get(t, "unknown")


def _read_mbr(reader: DiskReader, entries: list[tuple], size: int, path: str | None) -> PartitionTable:
    table = PartitionTable("mbr", [])
    extended: list[tuple[int, int]] = []
    for i, (status, _, ptype, _, lba, count) in enumerate(entries):
        if ptype == 0 or count == 0:
            continue
        if status not in (0x00, 0x80):
            raise InvalidFormatError(f"MBR entry {i + 1} has boot indicator 0x{status:02x} (only 0x00 and 0x80 "
                                     "are valid): not a partition table", path=path, offset=446 + 16 * i,
                                     field="mbr.status", value=status)
        if ptype in EXTENDED_TYPES:
            extended.append((lba, count))
            continue
        tid, tname = _mbr_type(ptype)
        _clip(table, Partition(i + 1, lba * SECTOR, count * SECTOR, tid, tname, bootable=status == 0x80), size)
    if len(extended) > 1:
        table.warnings.append(f"{len(extended)} extended partitions in the MBR: only the first is walked")
    if extended:
        _walk_ebr_chain(reader, table, extended[0][0], extended[0][1], size, path)
    _check_overlaps(table)
    return table


def _walk_ebr_chain(reader: DiskReader, table: PartitionTable, ext_lba: int, ext_count: int, size: int,
                    path: str | None) -> None:
    """Logical partitions: a linked list of extended boot records, each holding one logical partition and a
    link to the next EBR (relative to the start of the extended partition)."""
    ext_end = ext_lba + ext_count
    seen: set[int] = set()
    rel = 0
    index = 5
    for _ in range(MAX_LOGICAL + 1):
        ebr_lba = ext_lba + rel
        if ebr_lba in seen:
            table.warnings.append(f"EBR chain loops back to LBA {ebr_lba}: stopped")
            return
        seen.add(ebr_lba)
        if ebr_lba >= ext_end or (ebr_lba + 1) * SECTOR > size:
            table.warnings.append(f"EBR at LBA {ebr_lba} lies outside the extended partition or the disk: stopped")
            return
        ebr = _read(reader, ebr_lba * SECTOR, SECTOR)
        if ebr[510:512] != b"\x55\xaa":
            raise InvalidFormatError("extended boot record without its 0x55AA signature", path=path,
                                     offset=ebr_lba * SECTOR + 510, field="ebr.signature", value=ebr[510:512])
        _, _, t1, _, lba1, n1 = struct.unpack_from("<B3sB3sII", ebr, 446)
        _, _, t2, _, lba2, n2 = struct.unpack_from("<B3sB3sII", ebr, 462)
        if t1 != 0 and n1 != 0:
            start = ebr_lba + lba1
            if start + n1 > ext_end:
                table.warnings.append(f"logical partition {index} runs past its extended partition")
            tid, tname = _mbr_type(t1)
            _clip(table, Partition(index, start * SECTOR, n1 * SECTOR, tid, tname, logical=True), size)
            index += 1
        if t2 not in EXTENDED_TYPES or n2 == 0:
            return
        rel = lba2
    table.warnings.append(f"more than {MAX_LOGICAL} logical partitions: stopped")


def _check_overlaps(table: PartitionTable) -> None:
    parts = sorted(table.partitions, key=lambda p: p.offset)
    for a, b in zip(parts, parts[1:]):
        if b.offset < a.end:
            table.warnings.append(f"partitions {a.index} and {b.index} overlap")


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


def _read_gpt(reader: DiskReader, ss: int, size: int, path: str | None) -> PartitionTable:
    hdr = _read(reader, ss, ss)
    (hsize, hcrc, _, my_lba, _alt, first_usable, last_usable) = struct.unpack_from("<IIIQQQQ", hdr, 12)
    entries_lba, nentries, esize, ecrc = struct.unpack_from("<QIII", hdr, 72)
    if not 92 <= hsize <= ss:
        raise InvalidFormatError(f"GPT header size {hsize} outside [92, {ss}]", path=path, offset=ss + 12,
                                 field="gpt.header_size", value=hsize)
    calc = zlib.crc32(hdr[:16] + b"\0\0\0\0" + hdr[20:hsize])
    if calc != hcrc:
        raise ChecksumError("GPT header CRC32 mismatch", structure="GPT header", expected=hcrc, actual=calc,
                            path=path, offset=ss + 16)
    if my_lba != 1:
        raise InvalidFormatError("GPT header does not name LBA 1 as its own location", path=path, offset=ss + 24,
                                 field="gpt.my_lba", value=my_lba)
    if esize < 128 or esize % 8:
        raise InvalidFormatError("GPT entry size is not a multiple of 8 of at least 128", path=path, offset=ss + 84,
                                 field="gpt.entry_size", value=esize)
    array_bytes = nentries * esize
    if array_bytes > MAX_GPT_ARRAY:
        raise InvalidFormatError(f"GPT entry array of {array_bytes} bytes (over {MAX_GPT_ARRAY})", path=path,
                                 offset=ss + 80, field="gpt.num_entries", value=nentries)
    if entries_lba < 2 or (entries_lba * ss + array_bytes) > size:
        raise InvalidFormatError("GPT entry array lies outside the disk", path=path, offset=ss + 72,
                                 field="gpt.entries_lba", value=entries_lba)
    arr = _read(reader, entries_lba * ss, array_bytes)
    calc = zlib.crc32(arr)
    if calc != ecrc:
        raise ChecksumError("GPT entry array CRC32 mismatch", structure="GPT entry array", expected=ecrc,
                            actual=calc, path=path, offset=ss + 88)
    table = PartitionTable("gpt", [], sector_size=ss)
    for i in range(nentries):
        e = arr[i * esize : i * esize + 128]
        if e[:16] == bytes(16):
            continue
        first, last, attrs = struct.unpack_from("<QQQ", e, 32)
        type_guid = _guid(e[:16])
        name = e[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        if last < first:
            raise InvalidFormatError(f"GPT entry {i + 1} ends before it starts", path=path,
                                     offset=entries_lba * ss + i * esize + 40, field="gpt.last_lba", value=last)
        if first < first_usable or last > last_usable:
            table.warnings.append(f"GPT partition {i + 1} lies outside the usable LBAs [{first_usable}, "
                                  f"{last_usable}]")
        _clip(table, Partition(i + 1, first * ss, (last - first + 1) * ss, type_guid,
                               GPT_TYPES.get(type_guid, "unknown"), scheme="gpt", name=name,
                               uuid=_guid(e[16:32]), bootable=bool(attrs & 4)), size)
    _check_overlaps(table)
    return table

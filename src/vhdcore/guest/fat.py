"""FAT12/16/32 cluster allocation, read from the BIOS parameter block and the (active) FAT.

The FAT type follows the Linux driver and dosfstools: FAT32 when the 16-bit FAT size is zero, otherwise FAT12 for
at most 4084 data clusters and FAT16 above. A data cluster is in use when its FAT entry is non-zero (bad-cluster
marks included), which is exactly the kernel's statfs free count (``df``) and, on a consistent volume, the
``used/total clusters`` figure of ``fsck.fat -n -v``. The bitmap covers the data clusters only (bit 0 = cluster 2,
at the start of the data region); the reserved sectors, the FATs and the FAT12/16 root directory before it, and
the sectors after the last whole cluster, are ``metadata_bytes`` and count as used.
"""
from __future__ import annotations

import struct

import numpy as np

from .base import FileSystemUsage, Region, count_set_bits

__all__ = ["is_fat", "read_fat"]

MAX_FAT12_CLUSTERS = 4084  # Linux: MAX_FAT12
MAX_FAT16_CLUSTERS = 0xFFF4
MAX_FAT32_CLUSTERS = 0x0FFFFFF5
FSINFO_LEAD = 0x41615252
FSINFO_STRUCT = 0x61417272


def is_fat(region: Region) -> bool:
    if region.size < 512:
        return False
    s = region.read(0, 512, "fat.boot_sector")
    if s[0] not in (0xEB, 0xE9) or s[510:512] != b"\x55\xaa":
        return False
    if s[3:11] in (b"NTFS    ", b"EXFAT   "):
        return False
    bps, spc, reserved, nfats = struct.unpack_from("<HBHB", s, 11)
    media = s[21]
    return (bps in (512, 1024, 2048, 4096) and spc in (1, 2, 4, 8, 16, 32, 64, 128) and reserved >= 1
            and nfats >= 1 and (media >= 0xF8 or media == 0xF0))


def read_fat(region: Region, partition_index: int | None = None) -> FileSystemUsage:
    """Parse the FAT file system that starts at ``region`` offset 0."""
    err = region.error
    s = region.read(0, 512, "fat.boot_sector")
    bps, spc, reserved, nfats, root_entries, total16, media, fatsz16 = struct.unpack_from("<HBHBHHBH", s, 11)
    total32, = struct.unpack_from("<I", s, 32)
    if bps not in (512, 1024, 2048, 4096):
        raise err("bytes per sector must be 512, 1024, 2048 or 4096", 11, "fat.bytes_per_sector", bps)
    if spc == 0 or spc & (spc - 1):
        raise err("sectors per cluster is not a power of two", 13, "fat.sectors_per_cluster", spc)
    if reserved == 0:
        raise err("no reserved sectors (the boot sector is one)", 14, "fat.reserved_sectors", reserved)
    if nfats == 0:
        raise err("no FAT", 16, "fat.num_fats", nfats)
    is32 = fatsz16 == 0
    if is32:
        fatsz, ext_flags, _ver, root_cluster, fsinfo_sec = struct.unpack_from("<IHHIH", s, 36)
        label_off, sig_off = 71, 66
    else:
        fatsz, ext_flags, root_cluster, fsinfo_sec = fatsz16, 0, 0, 0
        label_off, sig_off = 43, 38
    if fatsz == 0:
        raise err("FAT size is zero", 36 if is32 else 22, "fat.fat_size", fatsz)
    total = total16 or total32
    if total == 0 or total * bps > region.size:
        raise err(f"volume of {total} sectors is larger than its partition ({region.size} bytes)",
                  19 if total16 else 32, "fat.total_sectors", total)
    root_sectors = -(-(root_entries * 32) // bps)
    data_start = reserved + nfats * fatsz + root_sectors
    if data_start >= total:
        raise err("reserved sectors, FATs and root directory fill the whole volume", 14,
                  "fat.reserved_sectors", data_start)
    clusters = (total - data_start) // spc
    if is32:
        bits, limit = 32, MAX_FAT32_CLUSTERS
        if root_entries:
            raise err("FAT32 volume with a fixed root directory", 17, "fat.root_entries", root_entries)
    elif clusters <= MAX_FAT12_CLUSTERS:
        bits, limit = 12, MAX_FAT12_CLUSTERS
    else:
        bits, limit = 16, MAX_FAT16_CLUSTERS
    if clusters == 0 or clusters > limit:
        raise err(f"{clusters} clusters do not fit FAT{bits}", 13, "fat.clusters", clusters)
    fat_entries = fatsz * bps * 8 // bits
    if fat_entries < clusters + 2:
        raise err(f"a FAT of {fatsz} sectors holds {fat_entries} entries, {clusters + 2} needed",
                  36 if is32 else 22, "fat.fat_size", fatsz)
    active = ext_flags & 0x0F if is32 and ext_flags & 0x80 else 0  # mirroring off: one active FAT
    if active >= nfats:
        raise err("active FAT number past the number of FATs", 40, "fat.ext_flags", ext_flags)

    nbytes = -(-((clusters + 2) * bits) // 8)
    raw = np.frombuffer(region.read((reserved + active * fatsz) * bps, nbytes, "fat.table"), dtype=np.uint8)
    entries = _entries(raw, bits, clusters + 2)
    data = entries[2:]
    in_use = data != 0
    bitmap = np.packbits(in_use, bitorder="little")
    used = count_set_bits(bitmap, clusters)
    bad_mark = {12: 0xFF7, 16: 0xFFF7, 32: 0x0FFFFFF7}[bits]
    bad = int(np.count_nonzero(data == bad_mark))

    notes: list[str] = []
    details = {"fat_bits": bits, "bytes_per_sector": bps, "sectors_per_cluster": spc, "total_sectors": total,
               "reserved_sectors": reserved, "fats": nfats, "fat_sectors": fatsz, "root_entries": root_entries,
               "data_start_sector": data_start, "clusters": clusters, "used_clusters": used,
               "free_clusters": clusters - used, "bad_clusters": bad, "media": media}
    if is32:
        details["root_cluster"] = root_cluster
        if 0 < fsinfo_sec < reserved:
            fi = region.read(fsinfo_sec * bps, 512, "fat.fsinfo")
            lead, = struct.unpack_from("<I", fi, 0)
            sig, hint_free = struct.unpack_from("<II", fi, 484)
            if lead == FSINFO_LEAD and sig == FSINFO_STRUCT and hint_free != 0xFFFFFFFF:
                details["fsinfo_free_clusters"] = hint_free
                if hint_free != clusters - used:
                    notes.append(f"FSInfo free cluster hint {hint_free} differs from the FAT's {clusters - used}")
    label = None
    serial = None
    if s[sig_off] in (0x28, 0x29):
        serial = f"{struct.unpack_from('<I', s, sig_off + 1)[0]:08X}"
    if s[sig_off] == 0x29:
        label = s[label_off : label_off + 11].decode("latin-1").rstrip(" \0") or None
        if label == "NO NAME":
            label = None
    cs = bps * spc
    size = total * bps
    free_bytes = (clusters - used) * cs
    return FileSystemUsage(
        type=f"fat{bits}", offset=region.offset, size=size, cluster_size=cs, cluster_count=clusters,
        used_clusters=used, bitmap=bitmap, bitmap_origin=region.offset + data_start * bps,
        used_bytes=size - free_bytes, free_bytes=free_bytes, partition_index=partition_index, label=label,
        uuid=serial, metadata_bytes=size - clusters * cs, details=details, notes=notes)


def _entries(raw: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first ``n`` FAT entries as uint32."""
    if bits == 32:
        return raw[: 4 * n].view("<u4").astype(np.uint32) & 0x0FFFFFFF
    if bits == 16:
        return raw[: 2 * n].view("<u2").astype(np.uint32)
    # FAT12: two entries in three bytes, the odd one in the high nibble of the middle byte and the third byte.
    pad = (-len(raw)) % 3
    b = np.concatenate((raw, np.zeros(pad, np.uint8))).reshape(-1, 3).astype(np.uint32)
    out = np.empty(len(b) * 2, dtype=np.uint32)
    out[0::2] = b[:, 0] | ((b[:, 1] & 0x0F) << 8)
    out[1::2] = (b[:, 1] >> 4) | (b[:, 2] << 4)
    return out[:n]

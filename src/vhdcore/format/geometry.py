"""CHS geometry and VHD timestamps.

References: Microsoft "Virtual Hard Disk Image Format Specification" v1.0, appendix "CHS calculation";
qemu block/vpc.c (how CHS-sizing readers pick the disk size).
"""
from __future__ import annotations

import datetime as _dt
import time
from typing import NamedTuple

SECTOR_SIZE = 512

# 65535 cylinders x 16 heads x 255 sectors per track: the largest geometry the footer can hold. Readers
# that size disks by CHS (Virtual PC, qemu for creators it does not know) take this value to mean
# "the geometry cannot describe this disk, use the footer's current size".
MAX_CHS_SECTORS = 65535 * 16 * 255
MAX_GEOMETRY: "Geometry"

VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z as a Unix time


class Geometry(NamedTuple):
    cylinders: int
    heads: int
    sectors_per_track: int

    @property
    def total_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track

    @property
    def size(self) -> int:
        """The disk size a CHS-sizing reader (Virtual PC) derives from this geometry."""
        return self.total_sectors * SECTOR_SIZE

    def pack(self) -> int:
        return (self.cylinders << 16) | (self.heads << 8) | self.sectors_per_track

    @classmethod
    def unpack(cls, value: int) -> "Geometry":
        return cls((value >> 16) & 0xFFFF, (value >> 8) & 0xFF, value & 0xFF)


MAX_GEOMETRY = Geometry(65535, 16, 255)


def chs_from_size(size: int) -> Geometry:
    """The geometry the specification's algorithm gives for a disk of ``size`` bytes."""
    total = min(size // SECTOR_SIZE, MAX_CHS_SECTORS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return Geometry(cth // heads, heads, spt)


def libvhd_chs(size: int) -> Geometry:
    """The largest geometry libvhd accepts for a disk of ``size`` bytes (its ``vhd_chs``: the specification's
    algorithm on the size rounded up to whole sectors, at least one). ``vhd-util check`` rejects a footer whose
    packed geometry is larger ("geometry too large")."""
    return chs_from_size(max(1, -(-size // SECTOR_SIZE)) * SECTOR_SIZE)


def geometry_for_new_disk(size: int) -> Geometry:
    """Geometry to record in a disk we create: the specification's, computed from the size.

    libvhd (`vhd-util check`) rejects a footer geometry larger than this ("geometry too large"), so the maximum
    geometry is not an option below ~127 GiB. qemu sizes a disk by this geometry (which rounds down) unless the
    creator application is one it trusts for the current size: see ``structs.CREATOR_APP``.
    """
    return chs_from_size(size)


def vhd_timestamp(unix_time: float | None = None) -> int:
    """Seconds since 2000-01-01 UTC, as stored in footers and headers (clamped to the u32 range)."""
    t = time.time() if unix_time is None else unix_time
    return max(0, min(0xFFFFFFFF, int(t) - VHD_EPOCH))


def timestamp_to_datetime(ts: int) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(VHD_EPOCH + ts, tz=_dt.timezone.utc)

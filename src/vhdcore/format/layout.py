"""Where vhdcore puts things in a VHD it writes: the footer it makes, and the dynamic layout every writer shares.

A new dynamic or differencing file (create, snapshot, convert, compact, export's ``vhd`` package) is laid out
the same way: footer copy at 0, header at 512, BAT at 1536 (all unallocated), parent locator data after the BAT
in whole sectors, then blocks, each placed so that its *data* (after the sector bitmap) starts on a 4 KiB
boundary as Windows does, then the footer. :func:`dynamic_file_size` is that layout's size for a block count,
which is how measure and growth predict what convert and compact will write.
"""
from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .geometry import Geometry, chs_from_size, geometry_for_new_disk, vhd_timestamp
from .locators import place
from .structs import (
    BATMAP_CREATOR,
    CREATOR_APP,
    CREATOR_VERSION,
    FEATURE_RESERVED,
    FOOTER_SIZE,
    FORMAT_VERSION,
    HEADER_SIZE,
    HEADER_VERSION,
    HOST_OS_WINDOWS,
    NO_DATA_OFFSET,
    OLD_CREATOR_APP,
    SECTOR_SIZE,
    UNUSED_BAT_ENTRY,
    DiskType,
    DynamicHeader,
    Footer,
    bitmap_bytes,
    round_up,
)
from .rules import block_size_ok, entries_needed, table_bytes

# New blocks are placed so that their data (after the bitmap) starts on this boundary, as Windows does:
# page-aligned data keeps reads, writes and copy_file_range on whole pages.
BLOCK_DATA_ALIGNMENT = 4096

if TYPE_CHECKING:  # pragma: no cover
    from ..disk.image import Image

MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_BLOCK_SIZE = 2 * MiB
# The specification's limit for a VHD (Hyper-V refuses larger ones).
MAX_CREATE_SIZE = 2040 * GiB
NIL_UUID = uuid.UUID(int=0)


def check_size(size: int, block_size: int | None = None) -> None:
    """Refuse (ValueError) a virtual size or block size vhdcore will not write."""
    if not isinstance(size, int) or size <= 0 or size % SECTOR_SIZE:
        raise ValueError(f"size must be a positive multiple of 512 bytes, not {size!r}")
    if size > MAX_CREATE_SIZE:
        raise ValueError(f"size {size} is over the VHD limit of 2040 GiB")
    if block_size is not None and not block_size_ok(block_size):
        raise ValueError(f"block size must be a power of two from 512 bytes to 256 MiB, not {block_size}")


# --------------------------------------------------------------------------------------------- footer


def make_footer(size: int, disk_type: DiskType, *, data_offset: int, timestamp: int | None = None,
                unique_id: uuid.UUID | None = None, like: Footer | None = None) -> Footer:
    """A new footer. ``like``: the footer of the disk this one is rewritten from, whose creator and geometry
    are kept when they still fit (see :func:`keeps_identity`); otherwise vhdcore's own (``structs.CREATOR_APP``
    and the specification's geometry, which both libvhd and qemu read as the full size)."""
    creator, version, host, geometry = CREATOR_APP, CREATOR_VERSION, HOST_OS_WINDOWS, geometry_for_new_disk(size)
    if like is not None and keeps_identity(like, size):
        creator, version, host = like.creator_app, like.creator_version, like.creator_os
        geometry = Geometry.unpack(like.geometry)
    return Footer(
        features=FEATURE_RESERVED,
        format_version=FORMAT_VERSION,
        data_offset=data_offset,
        timestamp=vhd_timestamp() if timestamp is None else timestamp,
        creator_app=creator,
        creator_version=version,
        creator_os=host,  # the spec knows only Wi2k and Mac; Linux writers (qemu, vhd-util) say Wi2k
        original_size=size,
        current_size=size,
        geometry=geometry.pack(),
        disk_type=int(disk_type),
        checksum=0,
        unique_id=unique_id or uuid.uuid4(),
        saved_state=0,
    ).with_checksum()


def keeps_identity(src: Footer, size: int) -> bool:
    """Whether a disk rewritten from one with footer ``src`` keeps its creator and geometry.

    Not when the size changes (the geometry describes the old size), not for vhdcore's old creator (its maximum
    geometry fails libvhd's check), not for "tap\0" (it promises libvhd a batmap that vhdcore does not write),
    and not when the geometry is larger than the specification's for the size (libvhd rejects it).
    """
    if src.current_size != size or src.creator_app in (OLD_CREATOR_APP, BATMAP_CREATOR):
        return False
    geo = Geometry.unpack(src.geometry)
    return geo.heads > 0 and geo.sectors_per_track > 0 and geo.pack() <= chs_from_size(size).pack()


# --------------------------------------------------------------------------------------------- dynamic layout


def write_dynamic_layout(fd: int, size: int, block_size: int, *, disk_type: DiskType = DiskType.DYNAMIC,
                         parent: Image | None = None, locators: Sequence[tuple[bytes, bytes]] = (),
                         parent_name: str = "", unique_id: uuid.UUID | None = None,
                         like: Footer | None = None) -> int:
    """Write footer copy, header, BAT (all unallocated), locator data and footer into an empty file.

    Returns the file size. Layout: footer copy at 0, header at 512, BAT at 1536, locator data after the BAT
    in whole sectors (:func:`vhdcore.format.locators.place`), footer. Blocks are appended later.
    """
    mte = entries_needed(size, block_size)
    table_offset = FOOTER_SIZE + HEADER_SIZE
    bat_bytes = table_bytes(mte)
    locs, loc_data, pos = place(locators, table_offset + bat_bytes)
    footer = make_footer(size, disk_type, data_offset=FOOTER_SIZE, unique_id=unique_id, like=like)
    header = DynamicHeader(
        data_offset=NO_DATA_OFFSET,
        table_offset=table_offset,
        header_version=HEADER_VERSION,
        max_table_entries=mte,
        block_size=block_size,
        checksum=0,
        parent_unique_id=parent.unique_id if parent is not None else NIL_UUID,
        parent_timestamp=vhd_timestamp(os.fstat(parent.fd).st_mtime) if parent is not None else 0,
        parent_unicode_name_raw=DynamicHeader.encode_parent_name(parent_name),
        parent_locators=tuple(locs),
    )
    fpacked = footer.pack()
    os.pwrite(fd, fpacked, 0)
    os.pwrite(fd, header.pack(), FOOTER_SIZE)
    bat = np.full(bat_bytes // 4, UNUSED_BAT_ENTRY, dtype=">u4").tobytes()
    os.pwrite(fd, bat, table_offset)
    for off, data in loc_data:
        os.pwrite(fd, data, off)
    os.pwrite(fd, fpacked, pos)
    return pos + FOOTER_SIZE


def first_block_position(size: int, block_size: int) -> int:
    """Where write_dynamic_layout ends its metadata (the footer's place before any block is added)."""
    return FOOTER_SIZE + HEADER_SIZE + table_bytes(entries_needed(size, block_size))


def next_block(pos: int, bm_size: int) -> int:
    """Start of the next block's bitmap at or after ``pos``: its data begins page-aligned. Every writer places
    blocks by it (``Image.allocate_block``, convert, the ``vhd`` package, coalesce's writer)."""
    return -(-(pos + bm_size) // BLOCK_DATA_ALIGNMENT) * BLOCK_DATA_ALIGNMENT - bm_size


def block_stride(block_size: int) -> int:
    """Distance between the data of consecutive blocks written one after the other (page-aligned data)."""
    return round_up(bitmap_bytes(block_size) + block_size, BLOCK_DATA_ALIGNMENT)


def dynamic_file_size(size: int, block_size: int, nblocks: int) -> int:
    """The exact size of the dynamic VHD convert and compact write with ``nblocks`` blocks."""
    bm_size = bitmap_bytes(block_size)
    pos = first_block_position(size, block_size)
    if nblocks:
        # Block data starts page-aligned, so consecutive data starts are align(bitmap + block) apart.
        first_data = next_block(pos, bm_size) + bm_size
        pos = first_data + (nblocks - 1) * block_stride(block_size) + block_size
    return pos + FOOTER_SIZE


__all__ = ["DEFAULT_BLOCK_SIZE", "MAX_CREATE_SIZE", "check_size", "make_footer", "keeps_identity",
           "write_dynamic_layout", "first_block_position", "next_block", "block_stride", "dynamic_file_size"]

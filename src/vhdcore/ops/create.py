"""Creating new VHD files: fixed, dynamic, and differencing children ("snapshots").

Every new file is written under a temporary name in its target directory and renamed into place once complete,
so a crash never leaves a half-made disk under the requested name.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from typing import Callable, Iterator, Sequence

import numpy as np

from ..disk.chain import Disk, open_chain
from ..destination import atomic_output, check_destination  # atomic_output: convert/compact import it from here
from ..format.geometry import Geometry, chs_from_size, geometry_for_new_disk, vhd_timestamp
from ..disk.image import Image
from ..format.rules import block_size_ok
from ..disk.locks import lock
from ..format.structs import (
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
    DiskType,
    DynamicHeader,
    Footer,
    ParentLocator,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_BLOCK_SIZE = 2 * MiB
# The specification's limit for a VHD (Hyper-V refuses larger ones).
MAX_CREATE_SIZE = 2040 * GiB
_NIL_UUID = uuid.UUID(int=0)


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


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
    if src.current_size != size or src.creator_app in (OLD_CREATOR_APP, b"tap\0"):
        return False
    geo = Geometry.unpack(src.geometry)
    return geo.heads > 0 and geo.sectors_per_track > 0 and geo.pack() <= chs_from_size(size).pack()


def _check_size(size: int, block_size: int | None = None) -> None:
    if not isinstance(size, int) or size <= 0 or size % SECTOR_SIZE:
        raise ValueError(f"size must be a positive multiple of 512 bytes, not {size!r}")
    if size > MAX_CREATE_SIZE:
        raise ValueError(f"size {size} is over the VHD limit of 2040 GiB")
    if block_size is not None and not block_size_ok(block_size):
        raise ValueError(f"block size must be a power of two from 512 bytes to 256 MiB, not {block_size}")


def write_dynamic_layout(fd: int, size: int, block_size: int, *, disk_type: DiskType = DiskType.DYNAMIC,
                         parent: Image | None = None, locators: Sequence[tuple[bytes, bytes]] = (),
                         parent_name: str = "", unique_id: uuid.UUID | None = None,
                         like: Footer | None = None) -> int:
    """Write footer copy, header, BAT (all unallocated), locator data and footer into an empty file.

    Returns the file size. Layout: footer copy at 0, header at 512, BAT at 1536, locator data after the BAT
    in whole sectors, footer. Blocks are appended later.
    """
    mte = -(-size // block_size)
    table_offset = FOOTER_SIZE + HEADER_SIZE
    bat_bytes = _round_up(mte * 4, SECTOR_SIZE)
    pos = table_offset + bat_bytes
    locs: list[ParentLocator] = []
    loc_data: list[tuple[int, bytes]] = []
    for code, data in locators:
        space = _round_up(max(len(data), 1), SECTOR_SIZE)
        # Data space in bytes, as Windows and Hyper-V write it (every reader accepts that form).
        locs.append(ParentLocator(code, space, len(data), pos))
        loc_data.append((pos, data))
        pos += space
    footer = make_footer(size, disk_type, data_offset=FOOTER_SIZE, unique_id=unique_id, like=like)
    header = DynamicHeader(
        data_offset=NO_DATA_OFFSET,
        table_offset=table_offset,
        header_version=HEADER_VERSION,
        max_table_entries=mte,
        block_size=block_size,
        checksum=0,
        parent_unique_id=parent.unique_id if parent is not None else _NIL_UUID,
        parent_timestamp=vhd_timestamp(os.fstat(parent.fd).st_mtime) if parent is not None else 0,
        parent_unicode_name_raw=DynamicHeader.encode_parent_name(parent_name),
        parent_locators=tuple(locs),
    )
    fpacked = footer.pack()
    os.pwrite(fd, fpacked, 0)
    os.pwrite(fd, header.pack(), FOOTER_SIZE)
    bat = np.full(bat_bytes // 4, 0xFFFFFFFF, dtype=">u4").tobytes()
    os.pwrite(fd, bat, table_offset)
    for off, data in loc_data:
        os.pwrite(fd, data, off)
    os.pwrite(fd, fpacked, pos)
    return pos + FOOTER_SIZE


def create(path: str | os.PathLike[str], size: int, type: str = "dynamic", block_size: int = DEFAULT_BLOCK_SIZE,
           *, overwrite: bool = False) -> Disk:
    """Create a fixed or dynamic VHD of ``size`` bytes; returns it opened "r+".

    An existing file is never replaced unless ``overwrite`` is set (it may be somebody's disk).
    """
    path = os.fspath(path)
    check_destination(path, overwrite=overwrite)
    if type not in ("dynamic", "fixed"):
        raise ValueError(f"type must be 'dynamic' or 'fixed', not {type!r}")
    _check_size(size, block_size if type == "dynamic" else None)
    with atomic_output(path) as (fd, _tmp):
        if type == "fixed":
            # A sparse file: the data area reads as zeros without being written.
            os.ftruncate(fd, size)
            os.pwrite(fd, make_footer(size, DiskType.FIXED, data_offset=NO_DATA_OFFSET).pack(), size)
        else:
            write_dynamic_layout(fd, size, block_size)
    return open_chain(path, "r+")


def parent_locators_for(parent_path: str, child_path: str) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The parent name and MacX/W2ku/W2ru locators a child at ``child_path`` records for ``parent_path``.

    As libvhd's own snapshots: the path relative to the child in every locator, MacX first (libvhd takes the
    first locator that resolves, in slot order). No absolute path: a copied chain must open its own copies,
    in vhdcore and in vhd-util, even while the originals exist. The name is the parent's file name, as libvhd
    records it (its check refuses a name that differs from the locators' base name).
    """
    parent_abs = os.path.abspath(parent_path)
    rel = os.path.relpath(parent_abs, os.path.dirname(os.path.abspath(child_path)))
    if not rel.startswith(".." + os.sep):
        rel = "./" + rel
    # libvhd's Windows form: ".\\" before the relative path, "..\\" included (".\\..\\dir\\p.vhd").
    windows = (".\\" + rel if rel.startswith("..") else rel).replace("/", "\\")
    locs = [
        (b"MacX", ("file://" + rel).encode("utf-8")),
        (b"W2ku", windows.encode("utf-16-le")),
        (b"W2ru", windows.encode("utf-16-le")),
    ]
    # The parent unicode name is the file name alone: libvhd's check wants it to match the locators' base name.
    return os.path.basename(parent_abs), locs


# Test hook: called with the parent's path once its lock is held (the race tests run a coalesce there).
_after_parent_locked: Callable[[str], None] | None = None


def snapshot(parent: str | os.PathLike[str], child: str | os.PathLike[str], *,
             block_size: int | None = None, parent_dirs: Sequence[str] | None = None,
             overwrite: bool = False) -> Disk:
    """Create a differencing child of ``parent``; returns the child's chain opened "r+".

    The child records the parent's unique id, its modification time (as blktap does; Windows writes 0) and its
    name, with W2ku, W2ru and MacX locators.
    """
    parent = os.fspath(parent)
    child = os.fspath(child)
    check_destination(child, sources=[parent], overwrite=overwrite)
    # Opening the parent's whole chain checks that it is usable before anything is written.
    with open_chain(parent, "r", parent_dirs=parent_dirs) as pdisk:
        check_destination(child, sources=[img.path for img in pdisk.layers], overwrite=overwrite)
        pimg = pdisk.leaf
        # Shared until the child is in place (vhdcore.disk.locks): a coalesce into the parent, or one that would
        # delete it, is refused meanwhile, and this one is refused while such a coalesce runs.
        lock(pimg, why="a coalesce is changing or removing it; take the snapshot afterwards")
        if _after_parent_locked is not None:
            _after_parent_locked(pimg.path)
        bs = block_size or pimg.block_size or DEFAULT_BLOCK_SIZE
        _check_size(pdisk.size, bs)
        name, locs = parent_locators_for(parent, child)
        with atomic_output(child) as (fd, _tmp):
            write_dynamic_layout(fd, pdisk.size, bs, disk_type=DiskType.DIFFERENCING, parent=pimg, locators=locs,
                                 parent_name=name if len(name) <= 255 else os.path.basename(parent))
    dirs = [os.path.dirname(os.path.abspath(parent))] + list(parent_dirs or [])
    return open_chain(child, "r+", parent_dirs=dirs)

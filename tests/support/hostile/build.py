"""A byte-level VHD writer for tests: every field is the caller's, so files can be made as wrong as needed.

It does not use vhdcore's writer (which refuses to make bad files); it uses only ``vhdcore.format.structs`` for the
field layout and the checksum rule. ``Layout`` records where every structure went, so that a test can cut the
file at a structure boundary or patch one field and know what the reader must say.
"""
from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from vhdcore.format.geometry import geometry_for_new_disk
from vhdcore.format.structs import (
    FEATURE_RESERVED,
    FOOTER_SIZE,
    HEADER_SIZE,
    NO_DATA_OFFSET,
    SECTOR_SIZE,
    DiskType,
    DynamicHeader,
    Footer,
    ParentLocator,
    bitmap_bytes,
    checksum,
)

KiB = 1024
MiB = 1024 * KiB
TS = 700_000_000  # 2022-03-07: a fixed timestamp in the past


def _pad(n: int, a: int = SECTOR_SIZE) -> int:
    return -(-n // a) * a


@dataclass
class Layout:
    path: Path
    size: int
    disk_type: DiskType
    unique_id: uuid.UUID
    block_size: int = 0
    bitmap_size: int = 0
    header_offset: int = -1
    table_offset: int = -1
    max_table_entries: int = 0
    locator_offsets: list[int] = field(default_factory=list)
    block_offsets: dict[int, int] = field(default_factory=dict)  # block -> file offset of its bitmap
    footer_offset: int = 0
    file_size: int = 0

    @property
    def bat_end(self) -> int:
        return self.table_offset + _pad(self.max_table_entries * 4)

    def block_end(self, b: int) -> int:
        return self.block_offsets[b] + self.bitmap_size + self.block_size


def footer(size: int, disk_type: DiskType, unique_id: uuid.UUID, data_offset: int, **over) -> Footer:
    kw = dict(features=FEATURE_RESERVED, format_version=0x00010000, data_offset=data_offset, timestamp=TS,
              creator_app=b"test", creator_version=0x00010000, creator_os=b"Wi2k", original_size=size,
              current_size=size, geometry=geometry_for_new_disk(size).pack(), disk_type=int(disk_type), checksum=0,
              unique_id=unique_id, saved_state=0)
    kw.update(over)
    return Footer(**kw)


def block_content(b: int, block_size: int) -> bytes:
    """Recognisable data for block ``b``: every sector names its block and sector."""
    return b"".join(f"block {b:6d} sector {s:6d} ".encode().ljust(SECTOR_SIZE, b"#")
                    for s in range(block_size // SECTOR_SIZE))


def build(path: os.PathLike | str, *, size: int = 4 * MiB, disk_type: DiskType = DiskType.DYNAMIC,
          block_size: int = 512 * KiB, blocks: Sequence[int] = (), bitmaps: dict[int, bytes] | None = None,
          unique_id: uuid.UUID | None = None, parent_uid: uuid.UUID | None = None, parent_name: str = "",
          parent_timestamp: int = 0, locators: Sequence[tuple[bytes, bytes]] = (), mte: int | None = None,
          footer_over: dict | None = None) -> Layout:
    """Write a VHD: footer copy, header at 512, BAT at 1536, locator data, then ``blocks`` in the given order
    (each holding ``block_content``), then the footer. Fixed disks: data then footer."""
    path = Path(path)
    uid = unique_id or uuid.uuid4()
    if disk_type == DiskType.FIXED:
        with open(path, "wb") as f:
            f.truncate(size)
            f.seek(size)
            f.write(footer(size, disk_type, uid, NO_DATA_OFFSET, **(footer_over or {})).pack())
        return Layout(path, size, disk_type, uid, footer_offset=size, file_size=size + FOOTER_SIZE)
    mte = -(-size // block_size) if mte is None else mte
    bm = bitmap_bytes(block_size)
    lay = Layout(path, size, disk_type, uid, block_size, bm, 512, 1536, mte)
    pos = lay.bat_end
    locs = []
    loc_data = []
    for code, data in locators:
        space = _pad(max(1, len(data)))
        locs.append(ParentLocator(code, space, len(data), pos))
        loc_data.append((pos, data))
        lay.locator_offsets.append(pos)
        pos += space
    bat = [0xFFFFFFFF] * mte
    block_data = []
    for b in blocks:
        lay.block_offsets[b] = pos
        bat[b] = pos // SECTOR_SIZE
        bitmap = (bitmaps or {}).get(b, b"\xff" * (block_size // SECTOR_SIZE // 8)).ljust(bm, b"\0")
        block_data.append((pos, bitmap + block_content(b, block_size)))
        pos += bm + block_size
    lay.footer_offset = pos
    lay.file_size = pos + FOOTER_SIZE
    ft = footer(size, disk_type, uid, 512, **(footer_over or {})).pack()
    hdr = DynamicHeader(
        data_offset=NO_DATA_OFFSET, table_offset=1536, header_version=0x00010000, max_table_entries=mte,
        block_size=block_size, checksum=0, parent_unique_id=parent_uid or uuid.UUID(int=0),
        parent_timestamp=parent_timestamp, parent_unicode_name_raw=DynamicHeader.encode_parent_name(parent_name),
        parent_locators=tuple(locs)).pack()
    with open(path, "wb") as f:
        f.write(ft)
        f.write(hdr)
        f.seek(1536)
        f.write(struct.pack(f">{mte}I", *bat))
        for off, data in loc_data:
            f.seek(off)
            f.write(data)
        for off, data in block_data:
            f.seek(off)
            f.write(data)
        f.seek(pos)
        f.write(ft)
    return lay


def child_of(parent: Layout, path: os.PathLike | str, *, locators: Sequence[tuple[bytes, bytes]] | None = None,
             parent_name: str | None = None, **kw) -> Layout:
    """A differencing child of ``parent`` naming it relatively (W2ru + MacX), like vhdcore's snapshot."""
    path = Path(path)
    rel = os.path.relpath(parent.path, path.parent)
    if locators is None:
        locators = [(b"W2ru", (".\\" + rel.replace("/", "\\")).encode("utf-16-le")),
                    (b"MacX", f"file://./{rel}".encode())]
    return build(path, size=kw.pop("size", parent.size), disk_type=DiskType.DIFFERENCING,
                 parent_uid=parent.unique_id, parent_name=rel if parent_name is None else parent_name,
                 locators=locators, **kw)


# --------------------------------------------------------------------------------------------- patching


def read(path: os.PathLike | str) -> bytearray:
    return bytearray(Path(path).read_bytes())


def write(path: os.PathLike | str, data: bytes | bytearray) -> None:
    Path(path).write_bytes(bytes(data))


def fix_footer_checksum(buf: bytearray, off: int) -> None:
    struct.pack_into(">I", buf, off + 64, 0)
    struct.pack_into(">I", buf, off + 64, checksum(buf[off : off + FOOTER_SIZE], 64))


def fix_header_checksum(buf: bytearray, off: int) -> None:
    struct.pack_into(">I", buf, off + 36, 0)
    struct.pack_into(">I", buf, off + 36, checksum(buf[off : off + HEADER_SIZE], 36))


_FOOTER_FIELDS = {"features": (8, ">I"), "format_version": (12, ">I"), "data_offset": (16, ">Q"),
                  "timestamp": (24, ">I"), "original_size": (40, ">Q"), "current_size": (48, ">Q"),
                  "geometry": (56, ">I"), "disk_type": (60, ">I"), "checksum": (64, ">I"),
                  "saved_state": (84, ">B")}
_HEADER_FIELDS = {"data_offset": (8, ">Q"), "table_offset": (16, ">Q"), "header_version": (24, ">I"),
                  "max_table_entries": (28, ">I"), "block_size": (32, ">I"), "checksum": (36, ">I"),
                  "parent_timestamp": (56, ">I")}


def patch_footer(lay: Layout, *, which: str = "both", checksum_ok: bool = True, **values: int) -> None:
    """Set footer fields at the end and/or in the copy at 0, recomputing the checksum unless told not to."""
    buf = read(lay.path)
    offs = {"end": [lay.footer_offset], "copy": [0], "both": [lay.footer_offset, 0]}[which]
    if lay.disk_type == DiskType.FIXED:
        offs = [lay.footer_offset]
    for off in offs:
        for name, value in values.items():
            rel, fmt = _FOOTER_FIELDS[name]
            struct.pack_into(fmt, buf, off + rel, value)
        if checksum_ok and "checksum" not in values:
            fix_footer_checksum(buf, off)
    write(lay.path, buf)


def patch_header(lay: Layout, *, checksum_ok: bool = True, **values: int) -> None:
    buf = read(lay.path)
    off = lay.header_offset
    for name, value in values.items():
        rel, fmt = _HEADER_FIELDS[name]
        struct.pack_into(fmt, buf, off + rel, value)
    if checksum_ok and "checksum" not in values:
        fix_header_checksum(buf, off)
    write(lay.path, buf)


def set_bat(lay: Layout, block: int, entry: int) -> None:
    buf = read(lay.path)
    struct.pack_into(">I", buf, lay.table_offset + 4 * block, entry)
    write(lay.path, buf)


def fill_bat(lay: Layout, byte: int) -> None:
    buf = read(lay.path)
    n = lay.max_table_entries * 4
    buf[lay.table_offset : lay.table_offset + n] = bytes([byte]) * n
    write(lay.path, buf)


def set_locator(lay: Layout, slot: int, *, code: bytes | None = None, space: int | None = None,
                length: int | None = None, offset: int | None = None) -> None:
    """Overwrite fields of parent locator entry ``slot`` (and fix the header checksum)."""
    buf = read(lay.path)
    o = lay.header_offset + 576 + 24 * slot
    c0, s0, l0, r0, off0 = struct.unpack_from(">4sIIIQ", buf, o)
    struct.pack_into(">4sIIIQ", buf, o, code if code is not None else c0, s0 if space is None else space,
                     l0 if length is None else length, r0, off0 if offset is None else offset)
    fix_header_checksum(buf, lay.header_offset)
    write(lay.path, buf)


def truncate(lay: Layout, n: int) -> None:
    os.truncate(lay.path, n)

"""A dynamic disk laid out as blktap's vhd-util writes it (with a batmap), for the Image and check tests."""
from __future__ import annotations

import struct
import uuid
from pathlib import Path

from vhdcore.format.geometry import chs_from_size
from vhdcore.format.structs import BATMAP_COOKIE, NO_DATA_OFFSET, DiskType, DynamicHeader, Footer

MiB = 1024 * 1024


def build_tap_file(path: Path, size: int = 8 * MiB, block_size: int = 2 * MiB) -> tuple[int, int, bytes]:
    """A dynamic disk as blktap's vhd-util lays it out: footer copy, header, BAT, batmap header sector, batmap
    sectors, one full block (batmap bit set), footer. Returns (batmap header offset, batmap end, batmap bytes)."""
    mte = size // block_size
    bat_end = 1536 + -(-mte * 4 // 512) * 512
    bm_hdr = bat_end
    bm_off = bm_hdr + 512
    bm_sectors = 1
    batmap = bytearray(512)
    batmap[0] = 0x80  # block 0 fully written
    bm_end = bm_off + bm_sectors * 512
    block0 = bm_end
    footer = Footer(features=2, format_version=0x00010000, data_offset=512, timestamp=700_000_000,
                    creator_app=b"tap\0", creator_version=0x00010003, creator_os=b"Wi2k", original_size=size,
                    current_size=size, geometry=chs_from_size(size).pack(), disk_type=int(DiskType.DYNAMIC), checksum=0,
                    unique_id=uuid.uuid4(), saved_state=0).pack()
    header = DynamicHeader(data_offset=NO_DATA_OFFSET, table_offset=1536, header_version=0x00010000,
                           max_table_entries=mte, block_size=block_size, checksum=0,
                           parent_unique_id=uuid.UUID(int=0), parent_timestamp=0,
                           parent_unicode_name_raw=bytes(512), parent_locators=()).pack()
    bat = [block0 // 512] + [0xFFFFFFFF] * (mte - 1)
    # libvhd's batmap checksum: one's complement of the byte sum of the map sectors.
    csum = (~sum(batmap)) & 0xFFFFFFFF
    bm_header = BATMAP_COOKIE + struct.pack(">QIII", bm_off, bm_sectors, 0x00010002, csum)
    with open(path, "wb") as f:
        f.write(footer)
        f.write(header)
        f.write(struct.pack(f">{mte}I", *bat).ljust(bat_end - 1536, b"\xff"))
        f.write(bm_header.ljust(512, b"\0"))
        f.write(bytes(batmap))
        f.write(b"\xff" * 512 + b"T" * block_size)
        f.write(footer)
    return bm_hdr, bm_end, bytes(batmap)

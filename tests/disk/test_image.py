"""One .vhd file: footers (legacy, torn), field checks, block allocation, bitmaps, locks, reads and streams."""
from __future__ import annotations

import io
import os
import random
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import vhdcore
from vhdcore.exceptions import (
    ChecksumError,
    CorruptImageError,
    InvalidFormatError,
    LockError,
    ReadOnlyError,
    UnsupportedFeatureError,
)
from vhdcore.format.geometry import chs_from_size
from vhdcore.disk.image import Image
from vhdcore.format.layout import BLOCK_DATA_ALIGNMENT
from vhdcore.format.structs import (
    BATMAP_COOKIE,
    FOOTER_SIZE,
    HEADER_SIZE,
    NO_DATA_OFFSET,
    DiskType,
    DynamicHeader,
    Footer,
    checksum,
)
from support.tapfile import build_tap_file
from support.vhdtest import MiB, build_chain, random_writes

KiB = 1024


def bit(bitmap: bytes, i: int) -> bool:
    """Sector i's bit, MSB-first as the specification says (written out here, not through a kernel)."""
    return bool(bitmap[i // 8] & (0x80 >> (i % 8)))


def set_bits(bitmap: bytes, nbits: int) -> list[int]:
    return [i for i in range(nbits) if bit(bitmap, i)]


def fix_footer(buf: bytearray, off: int) -> None:
    struct.pack_into(">I", buf, off + 64, checksum(buf[off : off + FOOTER_SIZE], 64))


def fix_header(buf: bytearray, off: int = 512) -> None:
    struct.pack_into(">I", buf, off + 36, checksum(buf[off : off + HEADER_SIZE], 36))


def make_dynamic(path: Path, size: int = 8 * MiB, block_size: int = 512 * KiB, writes: int = 10,
                 seed: int = 1) -> bytearray:
    model = bytearray(size)
    with vhdcore.create(path, size, block_size=block_size) as d:
        random_writes(d, model, random.Random(seed), writes)
    return model


def read_all(path: Path, **kw) -> bytes:
    with vhdcore.open(path, **kw) as d:
        return d.read(0, d.size)


# --------------------------------------------------------------------------------------------- footers


@pytest.mark.backend_independent
def test_legacy_511_byte_footer_fixed(tmp_path: Path) -> None:
    p = tmp_path / "f.vhd"
    data = random.Random(3).randbytes(1 * MiB)
    with vhdcore.create(p, 1 * MiB, type="fixed") as d:
        d.write(0, data)
    with open(p, "r+b") as f:
        f.truncate(1 * MiB + 511)  # the last footer byte is reserved and zero: what pre-2004 Virtual PC wrote
    with Image(p) as img:
        assert img.footer_source == "legacy" and img.footer_offset == 1 * MiB + 1 - 1 and img.size == 1 * MiB
    assert read_all(p) == data


def test_legacy_511_byte_footer_dynamic(tmp_path: Path) -> None:
    p = tmp_path / "d.vhd"
    model = make_dynamic(p)
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 1)
    with Image(p) as img:
        assert img.footer_source == "legacy"
    assert read_all(p) == model


def test_torn_footer_read_only_uses_copy_r_plus_refuses(tmp_path: Path) -> None:
    """A crash after a new block's data was written but before the footer went after it: the file ends with
    block bytes. Readers use the footer copy at 0 and see the old content; writers refuse."""
    p = tmp_path / "d.vhd"
    model = make_dynamic(p)
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.seek(size - FOOTER_SIZE)
        f.write(b"\xff" * 512 + random.Random(0).randbytes(512 * KiB))  # bitmap + data of an unreferenced block
    with vhdcore.open(p) as d:
        assert d.leaf.footer_source == "copy"
        assert any("copy at offset 0" in w for w in d.warnings)
        assert d.read(0, d.size) == model
    with pytest.raises(CorruptImageError) as ei:
        vhdcore.open(p, "r+")
    assert ei.value.field == "footer" and ei.value.path == str(p) and ei.value.offset == p.stat().st_size - 512


@pytest.mark.backend_independent
def test_torn_footer_of_fixed_disk_has_no_copy(tmp_path: Path) -> None:
    p = tmp_path / "f.vhd"
    vhdcore.create(p, 1 * MiB, type="fixed").close()
    with open(p, "r+b") as f:
        f.seek(1 * MiB + 100)
        f.write(b"garbage!")
    with pytest.raises(ChecksumError) as ei:
        Image(p)
    assert ei.value.offset == 1 * MiB + 64 and ei.value.field == "footer.checksum"


def test_footer_checksum_end_bad_copy_good(tmp_path: Path) -> None:
    """Only the end footer is broken: read-only open falls back to the copy (and says so)."""
    p = tmp_path / "d.vhd"
    model = make_dynamic(p)
    buf = bytearray(p.read_bytes())
    buf[-512 + 40] ^= 0x01  # original size: a bit flip, checksum now wrong
    p.write_bytes(buf)
    with vhdcore.open(p) as d:
        assert d.leaf.footer_source == "copy" and d.read(0, d.size) == model


def test_strict_false_accepts_bad_checksums_and_warns(tmp_path: Path) -> None:
    p = tmp_path / "d.vhd"
    model = make_dynamic(p)
    buf = bytearray(p.read_bytes())
    buf[512 + 60] ^= 0x01  # header reserved word: header checksum now wrong
    p.write_bytes(buf)
    with pytest.raises(ChecksumError) as ei:
        vhdcore.open(p)
    assert ei.value.structure == "dynamic header" and ei.value.offset == 512 + 36
    with vhdcore.open(p, strict=False) as d:
        assert d.read(0, d.size) == model
        assert any("checksum" in w for w in d.warnings), d.warnings


# --------------------------------------------------------------------------------------------- malformed fields

# (what, patch function, exception, field, offset of the field)
HEADER_CASES = [
    ("block size not a power of two", lambda b: struct.pack_into(">I", b, 512 + 32, 3 * 512), InvalidFormatError,
     "header.block_size", 512 + 32),
    ("block size zero", lambda b: struct.pack_into(">I", b, 512 + 32, 0), InvalidFormatError, "header.block_size",
     512 + 32),
    ("max table entries too small", lambda b: struct.pack_into(">I", b, 512 + 28, 1), InvalidFormatError,
     "header.max_table_entries", 512 + 28),
    ("max table entries absurd", lambda b: struct.pack_into(">I", b, 512 + 28, 0xFFFFFFF0), InvalidFormatError,
     "header.max_table_entries", 512 + 28),
    ("BAT past end of file", lambda b: struct.pack_into(">Q", b, 512 + 16, 1 << 40), CorruptImageError,
     "header.table_offset", 512 + 16),
    ("BAT not sector aligned", lambda b: struct.pack_into(">Q", b, 512 + 16, 1537), CorruptImageError,
     "header.table_offset", 512 + 16),
]


@pytest.mark.parametrize("what,fn,exc,field,offset", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_malformed_header_field(tmp_path: Path, what, fn, exc, field, offset) -> None:
    p = tmp_path / "d.vhd"
    make_dynamic(p)
    buf = bytearray(p.read_bytes())
    fn(buf)
    fix_header(buf)
    p.write_bytes(buf)
    with pytest.raises(exc) as ei:
        vhdcore.open(p)
    e = ei.value
    assert (e.path, e.field, e.offset) == (str(p), field, offset), str(e)
    assert str(p) in str(e) and field in str(e) and f"offset {offset}" in str(e)


FOOTER_CASES = [
    ("size not sector multiple", 48, ">Q", 8 * MiB + 1, InvalidFormatError, "footer.current_size"),
    ("size over 2 TiB", 48, ">Q", 3 * 1024**4, InvalidFormatError, "footer.current_size"),
    ("header offset outside file", 16, ">Q", 1 << 40, CorruptImageError, "footer.data_offset"),
    ("header offset all ones", 16, ">Q", NO_DATA_OFFSET, CorruptImageError, "footer.data_offset"),
    ("disk type 5", 60, ">I", 5, InvalidFormatError, "footer.disk_type"),
    ("version 2", 12, ">I", 0x00020000, InvalidFormatError, "footer.format_version"),
]


@pytest.mark.parametrize("what,rel,fmt,value,exc,field", FOOTER_CASES, ids=[c[0] for c in FOOTER_CASES])
def test_malformed_footer_field(tmp_path: Path, what, rel, fmt, value, exc, field) -> None:
    p = tmp_path / "d.vhd"
    make_dynamic(p, writes=0)
    buf = bytearray(p.read_bytes())
    end = len(buf) - FOOTER_SIZE
    for off in (0, end):
        struct.pack_into(fmt, buf, off + rel, value)
        fix_footer(buf, off)
    p.write_bytes(buf)
    with pytest.raises(exc) as ei:
        vhdcore.open(p)
    e = ei.value
    assert e.path == str(p) and e.field == field and e.offset == end + rel, str(e)


def test_blocks_past_eof_and_overlapping(tmp_path: Path) -> None:
    p = tmp_path / "d.vhd"
    make_dynamic(p, size=4 * MiB, writes=0)
    with vhdcore.open(p, "r+") as d:
        d.write(0, b"a" * 512)
        d.write(1 * MiB, b"b" * 512)
    good = p.read_bytes()
    bat = struct.unpack_from(">8I", good, 1536)
    # Block 1 moved to block 0's place: two blocks overlap.
    buf = bytearray(good)
    struct.pack_into(">I", buf, 1536 + 4 * 2, bat[0])
    p.write_bytes(buf)
    with pytest.raises(CorruptImageError) as ei:
        vhdcore.open(p)
    assert ei.value.field == "bat"
    # A block past the end of the file.
    buf = bytearray(good)
    struct.pack_into(">I", buf, 1536 + 4 * 3, len(good) // 512 + 10)
    p.write_bytes(buf)
    with pytest.raises(CorruptImageError) as ei:
        vhdcore.open(p)
    assert ei.value.field == "bat[3]" and ei.value.offset == 1536 + 12
    # A block over the BAT.
    buf = bytearray(good)
    struct.pack_into(">I", buf, 1536 + 4 * 3, 3)
    p.write_bytes(buf)
    with pytest.raises(CorruptImageError) as ei:
        vhdcore.open(p)
    assert ei.value.field == "bat[3]"
    # strict=False (--ignore-checksums) relaxes checksums only: the bounds still hold.
    with pytest.raises(CorruptImageError) as ei:
        vhdcore.open(p, strict=False)
    assert ei.value.field == "bat[3]"


@pytest.mark.backend_independent
def test_not_a_vhd(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.vhd"
    tiny.write_bytes(b"x" * 100)
    with pytest.raises(CorruptImageError) as ei:
        Image(tiny)
    assert ei.value.field == "footer"
    vhdx = tmp_path / "disk.vhdx"
    vhdx.write_bytes(b"vhdxfile" + bytes(4096))
    with pytest.raises(UnsupportedFeatureError):
        Image(vhdx)
    junk = tmp_path / "junk.vhd"
    junk.write_bytes(bytes(4096))
    with pytest.raises(InvalidFormatError) as ei:
        Image(junk)
    assert ei.value.field == "footer.cookie"
    with pytest.raises(InvalidFormatError):
        Image(tmp_path)  # a directory
    with pytest.raises(ValueError):
        Image(junk, "w")


@pytest.mark.backend_independent
def test_fixed_disk_shorter_than_its_size(tmp_path: Path) -> None:
    p = tmp_path / "f.vhd"
    vhdcore.create(p, 2 * MiB, type="fixed").close()
    footer = p.read_bytes()[-512:]
    with open(p, "r+b") as f:
        f.truncate(1 * MiB)
        f.seek(1 * MiB)
        f.write(footer)
    with pytest.raises(CorruptImageError) as ei:
        Image(p)
    assert ei.value.field == "file size"


# --------------------------------------------------------------------------------------------- allocation


def test_new_dynamic_block_zero_filled_written_bits(tmp_path: Path) -> None:
    p = tmp_path / "d.vhd"
    bs = 512 * KiB
    vhdcore.create(p, 4 * MiB, block_size=bs).close()
    with vhdcore.open(p, "r+") as d:
        d.write(bs + 5000, b"X" * 700)  # block 1, unaligned inside the block
        img = d.leaf
        data_off = img.block_file_offset(1)
        assert data_off % BLOCK_DATA_ALIGNMENT == 0
        # On disk, not only through the reader: the new block holds zeros around the written bytes.
        raw = img.pread(data_off, bs)
        assert raw[5000:5700] == b"X" * 700
        assert raw[:5000] == bytes(5000) and raw[5700:] == bytes(bs - 5700)
        # Dynamic disk too: exactly the written sectors' bits (libvhd reads a clear bit as zeros).
        assert set_bits(img.read_bitmap(1), bs // 512) == [9, 10, 11]
        assert img.read_bitmap(0) is None and img.block_file_offset(0) is None
        assert list(img.allocated_blocks()) == [1]
    with vhdcore.open(p) as d:
        assert d.read(bs, bs) == bytes(5000) + b"X" * 700 + bytes(bs - 5700)
        assert d.read(0, bs) == bytes(bs)
        assert p.stat().st_size == d.leaf.footer_offset + 512


def test_allocation_order_footer_copy_and_bat(tmp_path: Path) -> None:
    """After a write: the BAT entry points at the block, the footer is at the new end and the copy matches."""
    p = tmp_path / "d.vhd"
    with vhdcore.create(p, 4 * MiB, block_size=1 * MiB) as d:
        d.write(3 * MiB, b"z" * 512)
        off = d.leaf.block_file_offset(3) - d.leaf.bitmap_size
    raw = p.read_bytes()
    assert struct.unpack_from(">I", raw, 1536 + 12)[0] * 512 == off
    assert raw[:512] == raw[-512:] and raw[-512:-504] == b"conectix"
    assert len(raw) == off + 512 + 1 * MiB + 512


def test_differencing_bitmap_only_written_sectors(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    bs = 512 * KiB
    gp = random.Random(7).randbytes(4 * MiB)
    with vhdcore.create(base, 4 * MiB, block_size=bs) as d:
        d.write(0, gp)
    with vhdcore.snapshot(base, child) as d:
        d.write(bs + 3 * 512, b"A" * 512)  # exactly sector 3 of block 1
        d.write(bs + 10 * 512 + 100, b"B" * 1000)  # sectors 10..12, partially
        d.write(bs + 20 * 512 + 511, b"C")  # one byte: sector 20 only
        bm = d.leaf.read_bitmap(1)
        assert set_bits(bm, bs // 512) == [3, 10, 11, 12, 20]
        assert d.leaf.read_bitmap(0) is None
        # Later writes into the allocated block add bits, never all of them.
        d.write(bs + 100 * 512, b"D" * 1024)
        assert set_bits(d.leaf.read_bitmap(1), bs // 512) == [3, 10, 11, 12, 20, 100, 101]
    expected = bytearray(gp)
    expected[bs + 1536 : bs + 2048] = b"A" * 512
    expected[bs + 5120 + 100 : bs + 5120 + 1100] = b"B" * 1000
    expected[bs + 10240 + 511] = ord("C")
    expected[bs + 51200 : bs + 51200 + 1024] = b"D" * 1024
    # Re-read from the file, not the cache: the on-disk bitmap says the same.
    raw = child.read_bytes()
    with Image(child) as img:
        bmoff = img.block_file_offset(1) - img.bitmap_size
    assert set_bits(raw[bmoff : bmoff + 512], bs // 512) == [3, 10, 11, 12, 20, 100, 101]
    assert read_all(child) == expected


def test_grandparent_still_visible(tmp_path: Path) -> None:
    paths = [tmp_path / n for n in ("gp.vhd", "p.vhd", "c.vhd")]
    bs = 512 * KiB
    size = 2 * MiB
    gp = random.Random(1).randbytes(size)
    model = bytearray(gp)
    with vhdcore.create(paths[0], size, block_size=bs) as d:
        d.write(0, gp)
    with vhdcore.snapshot(paths[0], paths[1]) as d:
        d.write(bs + 512, b"P" * 512)
        model[bs + 512 : bs + 1024] = b"P" * 512
    with vhdcore.snapshot(paths[1], paths[2]) as d:
        d.write(bs + 2048, b"C" * 100)
        model[bs + 2048 : bs + 2148] = b"C" * 100
        assert d.read(0, size) == model
    with vhdcore.open(paths[2]) as d:
        assert d.read(0, size) == model
        # Sectors of block 1 the child and the parent did not write come from the grandparent.
        assert d.read(bs, 512) == gp[bs : bs + 512] and d.read(bs + 4096, bs - 4096) == gp[bs + 4096 : 2 * bs]


def test_write_sectors_validates(tmp_path: Path) -> None:
    p = tmp_path / "d.vhd"
    with vhdcore.create(p, 1 * MiB, block_size=512 * KiB) as d:
        with pytest.raises(ValueError):
            d.leaf.write_sectors(100, bytes(512))
        with pytest.raises(ValueError):
            d.leaf.write_sectors(1 * MiB, bytes(512))
        with pytest.raises(ValueError):
            d.write(1 * MiB - 10, bytes(11))
        with pytest.raises(ValueError):
            d.write(-1, b"x")
        assert d.write(1 * MiB - 1, b"") == 0
        d.write(1 * MiB - 1, b"!")
        with pytest.raises(ValueError):
            d.leaf.allocate_block(1)  # already allocated
        with pytest.raises(ValueError):
            d.leaf.write_sectors(0, bytes(100))
    assert read_all(p)[-1:] == b"!"


# --------------------------------------------------------------------------------------------- batmap


def test_batmap_never_overwritten(tmp_path: Path) -> None:
    p = tmp_path / "tap.vhd"
    bm_hdr, bm_end, batmap = build_tap_file(p)
    before = p.read_bytes()[bm_hdr:bm_end]
    with vhdcore.open(p, "r+") as d:
        img = d.leaf
        assert img.batmap is not None and img.batmap.batmap_offset == bm_hdr + 512 and img.batmap.end == bm_end
        assert img.metadata_end >= bm_end
        d.write(3 * 2 * MiB, b"new" * 1000)
        d.write(1 * 2 * MiB + 7, b"more")
        for b in (1, 3):
            start = img.block_file_offset(b) - img.bitmap_size
            assert start >= bm_end
    raw = p.read_bytes()
    assert raw[bm_hdr:bm_end] == before
    with vhdcore.open(p) as d:
        assert d.read(0, 2 * MiB) == b"T" * 2 * MiB
        assert d.read(6 * MiB, 3000) == b"new" * 1000
        assert d.read(2 * MiB, 11) == bytes(7) + b"more"


def test_block_over_batmap_is_corrupt(tmp_path: Path) -> None:
    """The batmap counts as metadata: a BAT entry pointing into it is an overlap."""
    p = tmp_path / "tap.vhd"
    bm_hdr, _bm_end, _ = build_tap_file(p)
    buf = bytearray(p.read_bytes())
    struct.pack_into(">I", buf, 1536, bm_hdr // 512)
    p.write_bytes(buf)
    with pytest.raises(CorruptImageError) as ei:
        vhdcore.open(p)
    assert ei.value.field == "bat[0]"


# --------------------------------------------------------------------------------------------- locks, modes


def test_writer_lock(tmp_path: Path) -> None:
    p = tmp_path / "d.vhd"
    make_dynamic(p)
    with vhdcore.open(p, "r+") as w:
        with pytest.raises(LockError) as ei:
            vhdcore.open(p, "r+")
        assert ei.value.path == str(p)
        with vhdcore.open(p) as r:  # readers are fine
            assert r.read(0, 4096) == w.read(0, 4096)
        # Another process is refused too.
        code = ("import sys, vhdcore\n"
                "try:\n    vhdcore.open(sys.argv[1], 'r+')\n"
                "except vhdcore.LockError:\n    sys.exit(3)\n")
        assert subprocess.run([sys.executable, "-c", code, str(p)]).returncode == 3
    with vhdcore.open(p, "r+"):  # released on close
        pass


def test_read_only_refuses_writes(tmp_path: Path) -> None:
    p = tmp_path / "d.vhd"
    make_dynamic(p)
    before = p.read_bytes()
    with vhdcore.open(p) as d:
        with pytest.raises(ReadOnlyError) as ei:
            d.write(0, b"x")
        assert ei.value.path == str(p)
        with pytest.raises(ReadOnlyError):
            d.leaf.write_sectors(0, bytes(512))
        with pytest.raises(ReadOnlyError):
            d.leaf.allocate_block(15)
    assert p.read_bytes() == before


def test_snapshot_parents_are_read_only(tmp_path: Path) -> None:
    paths, _ = build_chain(tmp_path, depth=2, writes=3)
    with vhdcore.open(paths[-1], "r+") as d:
        assert d.leaf.writable and not d.layers[1].writable
        with vhdcore.open(paths[0], "r+"):  # the parent is not locked by a reader of it
            pass


# --------------------------------------------------------------------------------------------- reads


def test_readinto_vs_read(tmp_path: Path) -> None:
    paths, model = build_chain(tmp_path, depth=3, writes=15, seed=5)
    rnd = random.Random(9)
    with vhdcore.open(paths[-1]) as d:
        for _ in range(200):
            off = rnd.randrange(0, d.size)
            n = rnd.randrange(0, 300_000)
            buf = bytearray(n)
            got = d.readinto(off, buf)
            assert got == min(n, d.size - off)
            assert buf[:got] == model[off : off + got] == d.read(off, n)
        assert d.read(d.size, 10) == b"" and d.readinto(d.size + 5, bytearray(10)) == 0
        # Any writable buffer: numpy, memoryview of a larger buffer.
        arr = np.zeros(3000, dtype=np.uint8)
        assert d.readinto(1000, arr) == 3000 and arr.tobytes() == model[1000:4000]
        big = bytearray(10_000)
        d.readinto(5, memoryview(big)[100:200])
        assert big[100:200] == model[5:105] and big[:100] == bytes(100)
        with pytest.raises(ValueError):
            d.read(-1, 5)


def test_single_file_fast_path_matches_extents(tmp_path: Path) -> None:
    """The one-file read path and the extent walk agree on a dynamic disk with odd block boundaries."""
    p = tmp_path / "d.vhd"
    model = make_dynamic(p, size=8 * MiB, block_size=128 * KiB, writes=40, seed=11)
    with vhdcore.open(p) as d:
        via_extents = bytearray(d.size)
        for e in d.extents():
            if e.layer is not None:
                via_extents[e.offset : e.end] = e.layer.pread(e.file_offset, e.length)
        assert via_extents == model == d.read(0, d.size)


def test_disk_stream(tmp_path: Path) -> None:
    paths, model = build_chain(tmp_path, depth=2, writes=10, seed=4)
    with vhdcore.open(paths[-1]) as d:
        s = d.stream()
        assert isinstance(s, io.RawIOBase) and s.readable() and s.seekable() and not s.writable()
        assert s.read(1000) == model[:1000] and s.tell() == 1000
        buf = bytearray(5000)
        assert s.readinto(buf) == 5000 and buf == model[1000:6000]
        assert s.seek(-10, io.SEEK_END) == d.size - 10
        assert s.read(100) == model[-10:] and s.read(100) == b""
        assert s.seek(100) == 100 and s.seek(50, io.SEEK_CUR) == 150 and s.read(3) == model[150:153]
        with pytest.raises(ValueError):
            s.seek(-1)
        with pytest.raises(ValueError):
            s.seek(0, 7)
        s.seek(0)
        out = io.BytesIO()
        shutil.copyfileobj(s, out, 777_777)
        assert out.getvalue() == model
        s.seek(0)
        assert s.readall() == model
        # Buffered wrapper (what open()/tarfile/zipfile users wrap it in).
        s.seek(0)
        br = io.BufferedReader(s, buffer_size=64 * KiB)
        assert br.read(12345) == model[:12345]
        br.seek(4 * MiB)
        assert br.read(10) == model[4 * MiB : 4 * MiB + 10]


def test_layer_runs_and_data_end(tmp_path: Path) -> None:
    p = tmp_path / "d.vhd"
    bs = 256 * KiB
    with vhdcore.create(p, 2 * MiB, block_size=bs) as d:
        assert d.leaf.data_end() == d.leaf.footer_offset
        d.write(2 * bs, b"x" * bs)
        img = d.leaf
        runs = list(img.layer_runs(100, 2 * MiB))
        fo = img.block_file_offset(2)
        assert runs == [(100, 2 * bs - 100, -1), (2 * bs, bs, fo), (3 * bs, 2 * MiB - 3 * bs, -1)]
        assert list(img.layer_runs(5, 5)) == []
        assert img.data_end() == fo + bs
    f = tmp_path / "f.vhd"
    with vhdcore.create(f, 1 * MiB, type="fixed") as d:
        assert list(d.leaf.layer_runs(10, 20)) == [(10, 10, 10)]
        assert d.leaf.is_fixed and not d.leaf.is_dynamic and d.leaf.block_size == 0


def test_unaligned_writes_against_model(tmp_path: Path) -> None:
    """Writes that start and end inside sectors, across block boundaries, on fixed, dynamic and differencing."""
    rnd = random.Random(21)
    for kind in ("fixed", "dynamic", "differencing"):
        d_ = tmp_path / kind
        d_.mkdir()
        size = 3 * MiB
        base = d_ / "base.vhd"
        model = bytearray(size)
        disk = vhdcore.create(base, size, type="fixed" if kind == "fixed" else "dynamic", block_size=256 * KiB)
        if kind == "differencing":
            disk.write(0, rnd.randbytes(size))
            model[:] = disk.read(0, size)
            disk.close()
            disk = vhdcore.snapshot(base, d_ / "child.vhd")
        with disk:
            for off, n in [(1, 1), (511, 2), (256 * KiB - 3, 7), (256 * KiB * 2 - 700, 1400), (size - 1, 1),
                           (0, 513), (12345, 256 * KiB + 1000)]:
                data = rnd.randbytes(n)
                disk.write(off, data)
                model[off : off + n] = data
                lo, hi = max(0, off - 600), min(size, off + n + 600)
                assert disk.read(lo, hi - lo) == model[lo:hi]
            leaf = disk.leaf.path
        assert read_all(Path(leaf)) == model, kind

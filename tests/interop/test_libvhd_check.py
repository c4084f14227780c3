"""check and repair judged by libvhd: what vhdcore's check reports is what XenServer's vhd-util rejects or cannot
read, and repair --set-bitmap-bits makes hidden data readable to libvhd (and puts it back with --undo)."""
from __future__ import annotations

import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

import vhdcore
from support.libvhd import assert_valid, libvhd_create, libvhd_read, libvhd_snapshot, libvhd_write, needs_libvhd, vhd_util
from vhdcore.cli import main as cli
from vhdcore.ops.check import WARNING, check
from vhdcore.disk.image import Image
from vhdcore.ops.repair import repair, undo
from vhdcore.format.structs import checksum

pytestmark = needs_libvhd

MiB = 1024 * 1024
SECTOR = 512


def _pwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_data_under_clear_bits_found_then_set_on_request_then_undone(tmp_path: Path) -> None:
    """The old vhdcore bug, reproduced on a disk libvhd made and wrote: data written into libvhd-allocated blocks
    without setting bits. check counts it, libvhd reads zeros there; only repair --set-bitmap-bits exposes it."""
    p = tmp_path / "old.vhd"
    libvhd_create(p, 8)
    rnd = random.Random(10)
    first = rnd.randbytes(SECTOR)
    libvhd_write(p, 0, first, tmp_path / "w")  # block 0: only bit 0 set
    libvhd_write(p, 2 * MiB + 50 * SECTOR, first, tmp_path / "w")  # block 1: only bit 50 set
    with Image(str(p)) as im:
        starts = [int(im.bat[0]) * SECTOR, int(im.bat[1]) * SECTOR]
    bm = 512  # 2 MiB blocks: a 512-byte bitmap before the data
    # Block 0, sectors 8..15: the first byte is not zero (libvhd's own check -b misses such sectors).
    hidden0 = b"\x5a" + rnd.randbytes(8 * SECTOR - 1)
    # Block 1, sectors 100..103: zeros but for one byte in the middle of the last one (only it holds data).
    hidden1 = bytearray(4 * SECTOR)
    hidden1[3 * SECTOR + 200] = 7
    _pwrite(p, starts[0] + bm + 8 * SECTOR, hidden0)
    _pwrite(p, starts[1] + bm + 100 * SECTOR, bytes(hidden1))
    original = p.read_bytes()

    model = bytearray(8 * MiB)
    model[:SECTOR] = first
    model[2 * MiB + 50 * SECTOR : 2 * MiB + 51 * SECTOR] = first
    assert libvhd_read(p, len(model)) == model  # libvhd: the hidden sectors read as zeros
    with vhdcore.open(p) as d:
        assert d.read(0, d.size) == model  # and so does vhdcore

    rep = check(p)
    found = sorted((f for f in rep.findings if f.code == "BITMAP_CLEAR_DATA"), key=lambda f: f.offset)
    assert [(f.severity, f.field, f.offset, f.count) for f in found] == [
        (WARNING, "bitmap[block 0]", starts[0] + bm + 8 * SECTOR, 8),
        (WARNING, "bitmap[block 1]", starts[1] + bm + 103 * SECTOR, 1),
    ]
    assert found[0].to_dict()["count"] == 8 and "vhd-util check -b" in found[0].explanation

    # Never automatic: a plain repair changes nothing and says how to ask.
    plain = repair(p)
    assert not plain.changed and p.read_bytes() == original
    assert any("--set-bitmap-bits" in why for why in plain.not_repaired)

    assert cli.main(["repair", str(p), "--set-bitmap-bits"]) == 0
    undo_files = list(tmp_path.glob("old.vhd.repair-*.undo"))
    assert len(undo_files) == 1
    model[8 * SECTOR : 16 * SECTOR] = hidden0
    model[2 * MiB + 100 * SECTOR : 2 * MiB + 104 * SECTOR] = hidden1
    assert_valid(p)
    assert libvhd_read(p, len(model)) == model
    with vhdcore.open(p) as d:
        assert d.read(0, d.size) == model
    assert check(p).clean
    # Only the bits of sectors holding data were set: block 0 bits 0 and 8..15, block 1 bits 50 and 103.
    with Image(str(p)) as im:
        b0, b1 = im.pread(starts[0], bm), im.pread(starts[1], bm)
    assert b0[0] == 0x80 and b0[1] == 0xFF and not any(b0[2:])
    assert [i for i in range(4096) if b1[i // 8] >> (7 - i % 8) & 1] == [50, 103]

    undo(undo_files[0], p)
    assert p.read_bytes() == original


@pytest.mark.backend_independent
def test_geometry_too_large_as_libvhd_judges_it(tmp_path: Path) -> None:
    """FOOTER_GEOMETRY_TOO_LARGE exactly where `vhd-util check` says "geometry too large" (qemu's force_size
    disks record the maximum geometry; at 200 GiB the maximum is the specification's)."""
    for size in ("100M", "1G", "200G"):
        p = tmp_path / f"q{size}.vhd"
        subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "force_size=on", p, size], check=True)
        out = vhd_util("check", "-n", p, check=False).stdout.decode()
        libvhd_rejects = "geometry too large" in out
        ours = {f.code for f in check(p).findings}
        assert ("FOOTER_GEOMETRY_TOO_LARGE" in ours) == libvhd_rejects, (size, out[:200], ours)
        assert libvhd_rejects == (size != "200G")


@pytest.mark.backend_independent
def test_parent_name_against_locators_as_libvhd_judges_it(tmp_path: Path) -> None:
    """A parent unicode name that is a full path (as Windows writes it) fails libvhd's check; check says so."""
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    libvhd_create(base, 4)
    libvhd_snapshot(child, base)
    assert check(child).clean
    assert_valid(child)
    buf = bytearray(child.read_bytes())
    hoff = struct.unpack_from(">Q", buf, 16)[0]
    name = "C:\\images\\base.vhd".encode("utf-16-be")
    buf[hoff + 64 : hoff + 64 + 512] = name.ljust(512, b"\0")
    struct.pack_into(">I", buf, hoff + 36, 0)
    struct.pack_into(">I", buf, hoff + 36, checksum(bytes(buf[hoff : hoff + 1024]), 36))
    child.write_bytes(buf)
    out = vhd_util("check", "-n", child, check=False).stdout.decode()
    assert "does not match header name (/images/base.vhd)" in out
    found = [f for f in check(child).findings if f.code == "PARENT_NAME_LOCATOR_MISMATCH"]
    assert found and all(f.severity == WARNING and f.field.startswith("header.parent_locator[") for f in found)
    assert "'/images/base.vhd'" in found[0].message
    with vhdcore.open(child) as d:  # the locators still lead to the parent
        assert Path(d.layers[1].path) == base

"""The format rules (vhdcore.format.rules): what real writers' files pass, where each limit's edge lies, and that
Image, check and verify, which all judge headers by these rules, refuse the same headers.

Offsets and field names below are the specification's table (docs: "Hard Disk Footer Format", "Dynamic Disk Header
Format"), written out here rather than taken from vhdcore.format.structs, so a drifted table fails.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest

import vhdcore
from vhdcore.delivery.verify import verify
from vhdcore.exceptions import VHDError
from vhdcore.format import rules as R
from vhdcore.format.geometry import MAX_GEOMETRY, chs_from_size
from vhdcore.format.structs import FOOTER, HEADER, NO_DATA_OFFSET
from vhdcore.ops.check import check

pytestmark = pytest.mark.backend_independent

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"
KiB, MiB, GiB = 1024, 1024**2, 1024**3
# Written by Windows (dfvfs), Hyper-V 2012 R2 and Virtual PC: none of them breaks a rule.
WRITERS = ["dfvfs/ntfs-fixed.vhd", "dfvfs/ntfs-dynamic.vhd", "dfvfs/ntfs-differential.vhd", "dfvfs/ext2.vhd",
           "qemu/hyperv2012r2-dynamic.vhd", "qemu/virtualpc-dynamic.vhd"]
FAR_FUTURE = 1 << 32


def _footer(name: str):
    return FOOTER.unpack((CORPUS / name).read_bytes()[-512:])


def _kinds(problems) -> list[str]:
    return [p.kind for p in problems]


# --------------------------------------------------------------------------------------------- real writers


@pytest.mark.parametrize("name", WRITERS)
def test_real_writers_break_no_rule(name: str) -> None:
    data = (CORPUS / name).read_bytes()
    f = FOOTER.unpack(data[-512:])
    assert R.footer_problems(f, future=FAR_FUTURE) == []
    if f.disk_type == 2:
        return
    h = HEADER.unpack(data, f.data_offset)
    assert R.header_offset_problems(f.data_offset, len(data)) == []
    assert R.header_field_problems(h) == []
    assert R.block_size_problem(h.block_size) is None
    assert R.table_entries_problem(h.max_table_entries, f.current_size, h.block_size) is None
    assert R.table_offset_problems(h.table_offset, h.max_table_entries, f.data_offset, len(data)) == []
    if f.disk_type == 4:
        assert R.parent_field_problems(h, future=FAR_FUTURE) == []


# --------------------------------------------------------------------------------------------- limits

BLOCK_SIZES = [
    (0, False), (256, False), (511, False), (512, True), (1536, False), (4 * KiB, True), (2 * MiB, True),
    (2 * MiB + 512, False), (256 * MiB, True), (512 * MiB, False), (0x80000000, False), (0xFFFFFFFF, False),
]


@pytest.mark.parametrize("bs,ok", BLOCK_SIZES, ids=[str(b) for b, _ in BLOCK_SIZES])
def test_block_size_limits(bs: int, ok: bool) -> None:
    assert R.block_size_ok(bs) is ok
    p = R.block_size_problem(bs)
    assert (p is None) is ok
    if p is not None:
        assert (p.kind, p.field, p.offset, p.value) == (R.BLOCK_SIZE, "header.block_size", 32, bs)


TABLE_CASES = [
    # (what, virtual size, block size, max table entries, problem kind or None, field, offset)
    ("exact", 8 * MiB, 2 * MiB, 4, None, None, None),
    ("last block partial", 8 * MiB + 512, 2 * MiB, 5, None, None, None),
    ("one short", 8 * MiB + 512, 2 * MiB, 4, R.TOO_FEW_ENTRIES, "header.max_table_entries", 28),
    ("zero entries for a non-empty disk", 512, 512, 0, R.TOO_FEW_ENTRIES, "header.max_table_entries", 28),
    ("spare room at the limit", 8 * MiB, 2 * MiB, 4 + (1 << 20), None, None, None),
    ("one past the spare room", 8 * MiB, 2 * MiB, 5 + (1 << 20), R.TOO_MANY_ENTRIES, "header.max_table_entries", 28),
    ("the field's maximum", 8 * MiB, 2 * MiB, 0xFFFFFFFF, R.TOO_MANY_ENTRIES, "header.max_table_entries", 28),
    # 2040 GiB in 64 KiB blocks needs 33M entries: the block size is what is wrong for vhdcore.
    ("BAT over vhdcore's limit", 2040 * GiB, 64 * KiB, 2040 * GiB // (64 * KiB), R.BAT_OVER_LIMIT,
     "header.block_size", 32),
    ("largest BAT accepted", (1 << 24) * 128 * KiB, 128 * KiB, 1 << 24, None, None, None),
    ("one block more", (1 << 24) * 128 * KiB + 512, 128 * KiB, (1 << 24) + 1, R.BAT_OVER_LIMIT,
     "header.block_size", 32),
    ("spare room past the limit", 1 * GiB, 2 * MiB, (1 << 24) + 1, R.TOO_MANY_ENTRIES, "header.max_table_entries",
     28),
]


@pytest.mark.parametrize("what,size,bs,mte,kind,field,offset", TABLE_CASES, ids=[c[0] for c in TABLE_CASES])
def test_table_size_limits(what, size, bs, mte, kind, field, offset) -> None:
    p = R.table_entries_problem(mte, size, bs)
    if kind is None:
        assert p is None
    else:
        assert (p.kind, p.field, p.offset) == (kind, field, offset)


def test_virtual_size_limits() -> None:
    assert R.virtual_size_problem(0) is None
    assert R.virtual_size_problem(2 * 1024**4) is None  # vhdcore's ceiling itself
    for bad in (511, 2 * 1024**4 + 512, 2**64 - 512):
        p = R.virtual_size_problem(bad)
        assert (p.kind, p.field, p.offset, p.value) == (R.VIRTUAL_SIZE, "footer.current_size", 48, bad)


# --------------------------------------------------------------------------------------------- footer


def test_footer_problems_each_on_its_field() -> None:
    base = _footer("dfvfs/ntfs-dynamic.vhd")
    cases = [
        (dict(format_version=0x00020000), R.FOOTER_VERSION, "footer.format_version", 12),
        (dict(disk_type=5), R.DISK_TYPE, "footer.disk_type", 60),
        (dict(disk_type=1), R.DISK_TYPE, "footer.disk_type", 60),
        (dict(features=0), R.FEATURES, "footer.features", 8),  # bit 0x2 must be set
        (dict(features=0x6), R.FEATURES, "footer.features", 8),  # 0x4 is not defined
        (dict(timestamp=FAR_FUTURE + 1), R.TIMESTAMP_FUTURE, "footer.timestamp", 24),
        (dict(saved_state=1), R.SAVED_STATE, "footer.saved_state", 84),
        (dict(unique_id=bytes(16)), R.UNIQUE_ID_ZERO, "footer.unique_id", 68),
    ]
    for change, kind, field, offset in cases:
        problems = R.footer_problems(base._replace(**change), future=FAR_FUTURE)
        assert [(p.kind, p.field, p.offset) for p in problems] == [(kind, field, offset)], change
    # Features 0x3 (temporary) is allowed.
    assert R.footer_problems(base._replace(features=0x3), future=FAR_FUTURE) == []


def test_footer_size_and_geometry() -> None:
    base = _footer("dfvfs/ntfs-dynamic.vhd")

    def kinds(size: int, geometry) -> list[str]:
        return _kinds(R.footer_problems(base._replace(current_size=size, geometry=geometry.pack()),
                                        future=FAR_FUTURE))

    size = 2041 * GiB
    assert kinds(size, MAX_GEOMETRY) == [R.OVER_FORMAT_LIMIT]
    assert kinds(2040 * GiB, chs_from_size(2040 * GiB)) == []
    assert kinds(2 * 1024**4 + 512, MAX_GEOMETRY) == [R.VIRTUAL_SIZE]
    # qemu's force_size marker (the maximum geometry) on a small disk: libvhd's "geometry too large".
    assert kinds(8 * MiB, MAX_GEOMETRY) == [R.GEOMETRY_TOO_LARGE]
    assert kinds(8 * MiB, chs_from_size(8 * MiB)) == []
    # A geometry describing more than the size, or with no heads.
    assert kinds(8 * MiB, chs_from_size(16 * MiB)) == [R.GEOMETRY]
    assert kinds(8 * MiB, chs_from_size(8 * MiB)._replace(heads=0)) == [R.GEOMETRY]


def test_fixed_disk_data_offset() -> None:
    fixed = _footer("dfvfs/ntfs-fixed.vhd")
    assert fixed.data_offset == NO_DATA_OFFSET
    # The specification's text says 0xFFFFFFFF; writers use all 64 bits; both are accepted.
    assert R.footer_problems(fixed._replace(data_offset=0xFFFFFFFF), future=FAR_FUTURE) == []
    p, = R.footer_problems(fixed._replace(data_offset=512), future=FAR_FUTURE)
    assert (p.kind, p.field, p.offset) == (R.FIXED_DATA_OFFSET, "footer.data_offset", 16)


# --------------------------------------------------------------------------------------------- header placement


def test_header_offset_problems() -> None:
    size = 4 * MiB
    assert R.header_offset_problems(512, size) == []
    assert R.header_offset_problems(size - 1024, size) == []  # the header's last byte is the file's
    assert _kinds(R.header_offset_problems(size - 512, size)) == [R.HEADER_PAST_EOF]
    assert _kinds(R.header_offset_problems(513, size)) == [R.HEADER_UNALIGNED]
    assert _kinds(R.header_offset_problems(0, size)) == [R.HEADER_IN_FOOTER_COPY]
    assert _kinds(R.header_offset_problems(NO_DATA_OFFSET, size)) == [R.NO_HEADER, R.HEADER_UNALIGNED,
                                                                       R.HEADER_PAST_EOF]
    assert {p.field for p in R.header_offset_problems(NO_DATA_OFFSET, size)} == {"footer.data_offset"}


def test_table_offset_problems() -> None:
    # The usual layout: footer copy 0..512, header 512..1536, BAT from 1536.
    size = 4 * MiB
    assert R.table_offset_problems(1536, 4, 512, size) == []
    assert _kinds(R.table_offset_problems(1537, 4, 512, size)) == [R.TABLE_UNALIGNED]
    assert _kinds(R.table_offset_problems(1024, 4, 512, size)) == [R.TABLE_OVER_METADATA]  # inside the header
    assert _kinds(R.table_offset_problems(0, 4, 512, size)) == [R.TABLE_OVER_METADATA]  # the footer copy
    # A BAT before the header must end before it (a padded sector counts).
    assert R.table_offset_problems(512, 128, 1024, size) == []
    assert _kinds(R.table_offset_problems(512, 129, 1024, size)) == [R.TABLE_OVER_METADATA]
    # Inside the file: the table's own bytes must fit (its sector padding need not).
    assert R.table_offset_problems(size - 512, 128, 512, size) == []
    p, = R.table_offset_problems(size - 512, 129, 512, size)
    assert (p.kind, p.field, p.offset) == (R.BAT_PAST_EOF, "header.table_offset", 16)


def test_parent_field_problems() -> None:
    data = (CORPUS / "dfvfs/ntfs-differential.vhd").read_bytes()
    h = HEADER.unpack(data, 512)
    assert R.parent_field_problems(h, future=FAR_FUTURE) == []
    bad = h._replace(parent_unique_id=bytes(16), parent_timestamp=FAR_FUTURE + 1, parent_unicode_name=bytes(512))
    assert [(p.kind, p.field, p.offset) for p in R.parent_field_problems(bad, future=FAR_FUTURE)] == [
        (R.PARENT_ID_ZERO, "header.parent_unique_id", 40),
        (R.PARENT_TIMESTAMP_FUTURE, "header.parent_timestamp", 56),
        (R.PARENT_NAME, "header.parent_unicode_name", 64),
    ]
    # A lone surrogate is not UTF-16.
    odd = h._replace(parent_unicode_name=b"\xd8\x00" + bytes(510))
    assert _kinds(R.parent_field_problems(odd, future=FAR_FUTURE)) == [R.PARENT_NAME]


# --------------------------------------------------------------------------------------------- one rule, three readers

# (max table entries, block size) written into an empty 8 MiB dynamic disk; each breaks one rule or none.
AGREE = [
    ("sound", 4, 2 * MiB, True),
    ("block size 3 sectors", 4, 1536, False),
    ("block size 512 MiB", 4, 512 * MiB, False),
    ("one entry short", 3, 2 * MiB, False),
    ("spare entries at the limit", 4 + (1 << 20), 2 * MiB, True),
    ("one spare entry too many", 5 + (1 << 20), 2 * MiB, False),
]


@pytest.mark.parametrize("what,mte,bs,sound", AGREE, ids=[c[0] for c in AGREE])
def test_image_check_and_verify_agree(tmp_path: Path, what, mte, bs, sound) -> None:
    """The same header is refused by Image (open), flagged by check and refused by verify's stream parse, or
    accepted by all three."""
    p = tmp_path / "d.vhd"
    vhdcore.create(p, 8 * MiB, block_size=2 * MiB).close()
    made = p.read_bytes()
    copy, header, footer = made[:512], bytearray(made[512:1536]), made[-512:]
    assert struct.unpack_from(">Q", footer, 16)[0] == 512 and struct.unpack_from(">Q", header, 16)[0] == 1536
    struct.pack_into(">I", header, 28, mte)
    struct.pack_into(">I", header, 32, bs)
    bat = b"\xff" * (-(-mte * 4 // 512) * 512)  # every block unallocated, the table as large as it says
    data = copy + HEADER.sealed(header) + bat + footer
    p.write_bytes(data)

    try:
        vhdcore.open(p).close()
        opened = True
    except VHDError:
        opened = False
    flagged = {"HEADER_BLOCK_SIZE", "HEADER_MAX_TABLE_ENTRIES"} & check(p).codes()
    gz = tmp_path / "d.vhd.gz"
    gz.write_bytes(gzip.compress(data, compresslevel=1))
    try:
        streamed = verify(gz, gz).match
    except VHDError:
        streamed = False
    assert (opened, not flagged, streamed) == (sound, sound, sound), (what, flagged)

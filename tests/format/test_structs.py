"""Footer, dynamic header, parent locators and batmap: parsed from real blobs, packed back, broken field by field.

The blobs come from the corpus (written by Windows, Hyper-V, Virtual PC and qemu), so the checksum rule is checked
against what other writers computed, not against vhdcore's own packer.
"""
from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest

from vhdcore.exceptions import ChecksumError, CorruptImageError, InvalidFormatError, VHDError
from vhdcore.format.structs import (
    BATMAP_COOKIE,
    FOOTER_SIZE,
    HEADER_SIZE,
    PLATFORM_MAC,
    PLATFORM_MACX,
    PLATFORM_NONE,
    PLATFORM_W2KU,
    PLATFORM_W2RU,
    PLATFORM_WI2K,
    BatmapHeader,
    DiskType,
    DynamicHeader,
    Footer,
    ParentLocator,
    bitmap_bytes,
    checksum,
)

pytestmark = pytest.mark.backend_independent

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"
# Files whose structures carry correct checksums (image*.vhd were hand-edited to carry wrong ones).
GOOD = ["dfvfs/ntfs-fixed.vhd", "dfvfs/ntfs-dynamic.vhd", "dfvfs/ntfs-parent.vhd", "dfvfs/ntfs-differential.vhd",
        "dfvfs/ext2.vhd", "qemu/hyperv2012r2-dynamic.vhd", "qemu/virtualpc-dynamic.vhd"]
DYNAMIC = [n for n in GOOD if "fixed" not in n and "parent" not in n]


def footer_blob(name: str) -> bytes:
    data = (CORPUS / name).read_bytes()
    return data[-FOOTER_SIZE:]


def header_blob(name: str) -> tuple[bytes, int]:
    data = (CORPUS / name).read_bytes()
    hoff = struct.unpack_from(">Q", data, 16)[0]
    return data[hoff : hoff + HEADER_SIZE], hoff


def byte_sum_checksum(blob: bytes, field: int) -> int:
    """The specification's rule spelled out independently of vhdcore.format.structs.checksum."""
    total = 0
    for i, b in enumerate(blob):
        if not field <= i < field + 4:
            total += b
    return 0xFFFFFFFF ^ (total & 0xFFFFFFFF)


def patch(blob: bytes, offset: int, fmt: str, value, csum_at: int | None = None) -> bytes:
    """``blob`` with one field replaced; the checksum is recomputed when ``csum_at`` is given."""
    out = bytearray(blob)
    struct.pack_into(fmt, out, offset, value)
    if csum_at is not None:
        struct.pack_into(">I", out, csum_at, byte_sum_checksum(bytes(out), csum_at))
    return bytes(out)


# --------------------------------------------------------------------------------------------- footer


@pytest.mark.parametrize("name", GOOD)
def test_footer_checksum_matches_other_writers(name: str) -> None:
    blob = footer_blob(name)
    stored = struct.unpack_from(">I", blob, 64)[0]
    assert checksum(blob, 64) == stored == byte_sum_checksum(blob, 64)
    f = Footer.parse(blob)
    assert f.checksum == stored


@pytest.mark.parametrize("name", GOOD)
def test_footer_round_trip(name: str) -> None:
    blob = footer_blob(name)
    f = Footer.parse(blob, path=name, offset=0)
    assert f.pack() == blob
    assert Footer.parse(f.pack()) == f
    # The copy at offset 0 of a dynamic disk is the same footer.
    if "fixed" not in name and "parent" not in name:
        assert (CORPUS / name).read_bytes()[:FOOTER_SIZE] == blob


def test_footer_fields_of_known_writers() -> None:
    f = Footer.parse(footer_blob("dfvfs/ntfs-differential.vhd"))
    assert f.type == DiskType.DIFFERENCING and f.creator_app_text == "win" and f.creator_version_text == "10.0"
    assert f.current_size == 4194304 and f.data_offset == 512 and f.features & 0x2
    vpc = Footer.parse(footer_blob("qemu/virtualpc-dynamic.vhd"))
    assert vpc.creator_app == b"vpc " and vpc.creator_os_text == "Wi2k" and vpc.type == DiskType.DYNAMIC
    fixed = Footer.parse(footer_blob("dfvfs/ntfs-fixed.vhd"))
    assert fixed.type == DiskType.FIXED and fixed.data_offset == 0xFFFFFFFFFFFFFFFF


def test_footer_pack_writes_checksum_and_with_checksum() -> None:
    f = Footer.parse(footer_blob("dfvfs/ext2.vhd"))
    g = f.__class__(**{**f.__dict__, "current_size": f.current_size + 512, "checksum": 0})
    packed = g.pack()
    assert struct.unpack_from(">I", packed, 64)[0] == byte_sum_checksum(packed, 64)
    assert g.with_checksum().checksum == struct.unpack_from(">I", packed, 64)[0]
    assert Footer.parse(packed).current_size == f.current_size + 512


def _raises(exc_type, fn, *, field: str, offset: int | None, path: str = "disk.vhd") -> VHDError:
    with pytest.raises(exc_type) as ei:
        fn()
    e = ei.value
    assert e.field == field and e.offset == offset and e.path == path
    text = str(e)
    assert path in text and field in text and (offset is None or f"offset {offset}" in text)
    return e


BASE = 1000  # the footer's file offset in these tests: errors must add the field's offset to it


@pytest.mark.parametrize("case,fmt,rel,value,exc,field", [
    ("cookie", ">8s", 0, b"conectiX", InvalidFormatError, "footer.cookie"),
    ("version", ">I", 12, 0x00020000, InvalidFormatError, "footer.format_version"),
    ("type none", ">I", 60, 0, InvalidFormatError, "footer.disk_type"),
    ("type deprecated", ">I", 60, 1, InvalidFormatError, "footer.disk_type"),
    ("type unknown", ">I", 60, 5, InvalidFormatError, "footer.disk_type"),
    ("type huge", ">I", 60, 0xFFFFFFFF, InvalidFormatError, "footer.disk_type"),
])
def test_footer_malformed_field(case, fmt, rel, value, exc, field) -> None:
    blob = patch(footer_blob("dfvfs/ntfs-dynamic.vhd"), rel, fmt, value, csum_at=64)
    e = _raises(exc, lambda: Footer.parse(blob, path="disk.vhd", offset=BASE), field=field,
                offset=BASE + rel if rel else BASE)
    assert e.value == value


def test_footer_bad_checksum() -> None:
    good = footer_blob("dfvfs/ntfs-dynamic.vhd")
    blob = patch(good, 48, ">Q", 8 * 1024 * 1024)  # size changed, checksum not
    e = _raises(ChecksumError, lambda: Footer.parse(blob, path="disk.vhd", offset=BASE), field="footer.checksum",
                offset=BASE + 64)
    assert e.structure == "footer"
    assert e.expected == struct.unpack_from(">I", good, 64)[0]
    assert e.actual == byte_sum_checksum(blob, 64)
    # Callers that accept bad checksums still get the structure.
    assert Footer.parse(blob, verify_checksum=False).current_size == 8 * 1024 * 1024


@pytest.mark.parametrize("n", [0, 511, 513, 1024])
def test_footer_wrong_length(n: int) -> None:
    _raises(InvalidFormatError, lambda: Footer.parse(bytes(n), path="disk.vhd", offset=7), field="footer", offset=7)


def test_footer_without_offset_still_names_field() -> None:
    blob = patch(footer_blob("dfvfs/ntfs-dynamic.vhd"), 0, ">8s", b"nonsense")
    with pytest.raises(InvalidFormatError) as ei:
        Footer.parse(blob)
    assert ei.value.field == "footer.cookie" and ei.value.offset is None and "footer.cookie" in str(ei.value)


def test_legacy_511_byte_footer_parses_padded() -> None:
    """Virtual PC before 2004 wrote 511 bytes; the missing last byte is reserved (zero)."""
    blob = footer_blob("qemu/virtualpc-dynamic.vhd")
    assert blob[-1] == 0
    assert Footer.parse(blob[:511] + b"\0") == Footer.parse(blob)
    with pytest.raises(InvalidFormatError):
        Footer.parse(blob[:511])


# --------------------------------------------------------------------------------------------- header


@pytest.mark.parametrize("name", DYNAMIC)
def test_header_checksum_and_round_trip(name: str) -> None:
    blob, hoff = header_blob(name)
    assert checksum(blob, 36) == struct.unpack_from(">I", blob, 36)[0] == byte_sum_checksum(blob, 36)
    h = DynamicHeader.parse(blob, path=name, offset=hoff)
    assert h.pack() == blob
    assert DynamicHeader.parse(h.pack()) == h
    assert len(h.parent_locators) == 8
    assert h.sectors_per_block * 512 == h.block_size == 2 * 1024 * 1024 and h.bitmap_size == 512


def test_header_of_windows_differencing_disk() -> None:
    blob, _ = header_blob("dfvfs/ntfs-differential.vhd")
    h = DynamicHeader.parse(blob)
    parent = Footer.parse(footer_blob("dfvfs/ntfs-parent.vhd"))
    assert h.parent_unique_id == parent.unique_id
    assert h.parent_unicode_name == "C:\\Projects\\dfvfs\\test_data\\ntfs-parent.vhd"
    used = [loc for loc in h.parent_locators if loc.is_used]
    assert {loc.platform_code for loc in used} == {PLATFORM_W2KU, PLATFORM_W2RU}
    data = (CORPUS / "dfvfs/ntfs-differential.vhd").read_bytes()
    paths = {}
    for loc in used:
        # Windows stores the data space in bytes, not sectors.
        assert loc.data_space >= 512 and loc.data_space_bytes == loc.data_space
        paths[loc.platform_code] = loc.decode_path(data[loc.data_offset : loc.data_offset + loc.data_length])
    assert paths == {PLATFORM_W2RU: ".\\ntfs-parent.vhd",
                     PLATFORM_W2KU: "C:\\Projects\\dfvfs\\test_data\\ntfs-parent.vhd"}


@pytest.mark.parametrize("case,fmt,rel,value,field", [
    ("cookie", ">8s", 0, b"cxsparsX", "header.cookie"),
    ("version", ">I", 24, 0x00020000, "header.header_version"),
])
def test_header_malformed_field(case, fmt, rel, value, field) -> None:
    blob, _ = header_blob("dfvfs/ext2.vhd")
    bad = patch(blob, rel, fmt, value, csum_at=36)
    e = _raises(InvalidFormatError, lambda: DynamicHeader.parse(bad, path="disk.vhd", offset=512), field=field,
                offset=512 + rel)
    assert e.value == value


def test_header_bad_checksum_and_truncation() -> None:
    blob, _ = header_blob("dfvfs/ext2.vhd")
    bad = patch(blob, 32, ">I", 1 << 20)
    e = _raises(ChecksumError, lambda: DynamicHeader.parse(bad, path="disk.vhd", offset=512),
                field="header.checksum", offset=512 + 36)
    assert e.structure == "dynamic header" and e.actual == byte_sum_checksum(bad, 36)
    assert DynamicHeader.parse(bad, verify_checksum=False).block_size == 1 << 20
    _raises(CorruptImageError, lambda: DynamicHeader.parse(blob[:700], path="disk.vhd", offset=512), field="header",
            offset=512)


def test_corpus_hand_edited_header_checksum() -> None:
    """dfvfs image-differential.vhd carries a wrong header checksum: detected, and readable when told to."""
    blob, hoff = header_blob("dfvfs/image-differential.vhd")
    with pytest.raises(ChecksumError) as ei:
        DynamicHeader.parse(blob, path="x", offset=hoff)
    assert ei.value.offset == hoff + 36
    h = DynamicHeader.parse(blob, verify_checksum=False)
    assert h.parent_unicode_name == "image.vhd" and not any(loc.is_used for loc in h.parent_locators)


def test_parent_name_encoding() -> None:
    raw = DynamicHeader.encode_parent_name("bäse.vhd")
    assert len(raw) == 512 and raw.startswith("bäse.vhd".encode("utf-16-be")) and raw.endswith(b"\0\0")
    blob, _ = header_blob("dfvfs/ext2.vhd")
    h = DynamicHeader.parse(blob)
    h2 = h.__class__(**{**h.__dict__, "parent_unicode_name_raw": raw})
    assert DynamicHeader.parse(h2.pack()).parent_unicode_name == "bäse.vhd"
    assert DynamicHeader.encode_parent_name("x" * 256) and len(DynamicHeader.encode_parent_name("x" * 256)) == 512
    with pytest.raises(InvalidFormatError) as ei:
        DynamicHeader.encode_parent_name("x" * 257)
    assert ei.value.field == "header.parent_unicode_name"
    # A name that is not valid UTF-16 (a lone surrogate) reads as no name, it does not raise.
    h3 = h.__class__(**{**h.__dict__, "parent_unicode_name_raw": b"\xd8\x00" + bytes(510)})
    assert DynamicHeader.parse(h3.pack()).parent_unicode_name == ""


def test_header_pack_pads_locator_slots() -> None:
    blob, _ = header_blob("dfvfs/ext2.vhd")
    h = DynamicHeader.parse(blob)
    loc = ParentLocator(PLATFORM_MACX, 1, 20, 4096)
    h2 = h.__class__(**{**h.__dict__, "parent_locators": (loc,)})
    back = DynamicHeader.parse(h2.pack())
    assert back.parent_locators[0] == loc
    assert all(not x.is_used for x in back.parent_locators[1:]) and len(back.parent_locators) == 8


# --------------------------------------------------------------------------------------------- locators


def test_locator_round_trip_and_layout() -> None:
    loc = ParentLocator(PLATFORM_W2RU, 2, 30, 0x12345600, reserved=0)
    raw = loc.pack()
    assert len(raw) == 24
    assert raw[:4] == b"W2ru" and struct.unpack(">IIIQ", raw[4:]) == (2, 30, 0, 0x12345600)
    assert ParentLocator.parse(raw) == loc
    assert not ParentLocator.parse(bytes(24)).is_used and ParentLocator.parse(bytes(24)).platform_code == PLATFORM_NONE


@pytest.mark.parametrize("space,expected", [(1, 512), (2, 1024), (0, 0), (511, 511 * 512), (512, 512),
                                            (1024, 1024), (4096, 4096), (513, 513 * 512)])
def test_locator_data_space_sectors_or_bytes(space: int, expected: int) -> None:
    assert ParentLocator(PLATFORM_W2RU, space, 0, 0).data_space_bytes == expected


@pytest.mark.parametrize("code,raw,expected", [
    (PLATFORM_W2RU, ".\\base.vhd".encode("utf-16-le"), ".\\base.vhd"),
    (PLATFORM_W2KU, "C:\\vms\\bäse.vhd\0\0".encode("utf-16-le"), "C:\\vms\\bäse.vhd"),
    (PLATFORM_MACX, b"file://./base.vhd\0", "file://./base.vhd"),
    (PLATFORM_WI2K, b"C:\\old\\base.vhd", "C:\\old\\base.vhd"),
    (PLATFORM_MAC, b"\x00\x01alias-record", None),
    (PLATFORM_W2RU, b"\x00\xd8", None),  # a lone surrogate: not a path
    (PLATFORM_MACX, b"\xff\xfe", None),  # not UTF-8
])
def test_locator_decode_path(code: bytes, raw: bytes, expected) -> None:
    assert ParentLocator(code, 1, len(raw), 512).decode_path(raw) == expected


# --------------------------------------------------------------------------------------------- batmap, bitmaps


def test_batmap_header() -> None:
    raw = BATMAP_COOKIE + struct.pack(">QIII", 3 * 512, 2, 0x00010002, 0xDEADBEEF) + bytes(512 - 28)
    bm = BatmapHeader.parse(raw)
    assert bm == BatmapHeader(1536, 2, 0x00010002, 0xDEADBEEF)
    assert bm.end == 1536 + 1024
    assert BatmapHeader.parse(b"tdbatmaX" + raw[8:]) is None
    assert BatmapHeader.parse(raw[:20]) is None


@pytest.mark.parametrize("block_size,expected", [(512, 512), (4096, 512), (2 * 1024**2, 512),
                                                 (4 * 1024**2, 1024), (8 * 1024**2, 2048),
                                                 (256 * 1024**2, 65536)])
def test_bitmap_bytes(block_size: int, expected: int) -> None:
    assert bitmap_bytes(block_size) == expected
    assert bitmap_bytes(block_size) * 8 >= block_size // 512


def test_disk_type_labels() -> None:
    assert [DiskType(t).label for t in (2, 3, 4)] == ["fixed", "dynamic", "differencing"]
    u = uuid.UUID(bytes=footer_blob("dfvfs/ntfs-fixed.vhd")[68:84])
    assert Footer.parse(footer_blob("dfvfs/ntfs-fixed.vhd")).unique_id == u

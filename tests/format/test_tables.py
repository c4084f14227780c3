"""The field tables of vhdcore.format.structs against the specification's, and the two parses built on them."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vhdcore.exceptions import InvalidFormatError
from vhdcore.format.structs import BATMAP, FOOTER, HEADER, LOCATOR, Footer, Table, locator_entry_offset

pytestmark = pytest.mark.backend_independent

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"

# The specification's tables (offset, field, size), copied from it rather than from the code.
SPEC_FOOTER = [(0, "cookie", 8), (8, "features", 4), (12, "format_version", 4), (16, "data_offset", 8),
               (24, "timestamp", 4), (28, "creator_app", 4), (32, "creator_version", 4), (36, "creator_os", 4),
               (40, "original_size", 8), (48, "current_size", 8), (56, "geometry", 4), (60, "disk_type", 4),
               (64, "checksum", 4), (68, "unique_id", 16), (84, "saved_state", 1), (85, "reserved", 427)]
SPEC_HEADER = [(0, "cookie", 8), (8, "data_offset", 8), (16, "table_offset", 8), (24, "header_version", 4),
               (28, "max_table_entries", 4), (32, "block_size", 4), (36, "checksum", 4), (40, "parent_unique_id", 16),
               (56, "parent_timestamp", 4), (60, "reserved1", 4), (64, "parent_unicode_name", 512),
               (576, "parent_locators", 192), (768, "reserved2", 256)]
SPEC_LOCATOR = [(0, "platform_code", 4), (4, "data_space", 4), (8, "data_length", 4), (12, "reserved", 4),
                (16, "data_offset", 8)]


@pytest.mark.parametrize("table,spec", [(FOOTER, SPEC_FOOTER), (HEADER, SPEC_HEADER), (LOCATOR, SPEC_LOCATOR)],
                         ids=["footer", "header", "locator"])
def test_tables_are_the_specifications(table: Table, spec) -> None:
    assert [(f.offset, f.name, f.size) for f in table.fields] == spec
    assert table.struct.size == table.size


def test_batmap_table_is_libvhds() -> None:
    # libvhd's vhd_batmap_header: cookie, batmap_offset (u64), batmap_size, batmap_version, checksum (u32 each).
    assert [(f.offset, f.name, f.size) for f in BATMAP.fields] == [
        (0, "cookie", 8), (8, "batmap_offset", 8), (16, "batmap_size", 4), (20, "batmap_version", 4),
        (24, "checksum", 4)]


def test_locator_entries_follow_the_parent_name() -> None:
    assert [locator_entry_offset(i) for i in (0, 1, 7)] == [576, 600, 744]


def test_a_row_that_drifts_is_refused() -> None:
    with pytest.raises(AssertionError, match="declared at 12"):
        Table("t", 16, ((0, "a", "8s"), (12, "b", "I")))
    with pytest.raises(AssertionError, match="take 12 bytes, not 16"):
        Table("t", 16, ((0, "a", "8s"), (8, "b", "I")))


def test_field_names_and_single_fields() -> None:
    blob = bytearray((CORPUS / "dfvfs/ntfs-dynamic.vhd").read_bytes()[-512:])
    assert FOOTER.field("current_size") == "footer.current_size"
    assert FOOTER.get(blob, "current_size") == struct.unpack_from(">Q", blob, 48)[0] == 4194304
    FOOTER.put(blob, "current_size", 8 * 1024**2)
    assert struct.unpack_from(">Q", blob, 48)[0] == 8 * 1024**2
    assert bytes(blob[FOOTER.slice("unique_id")]) == bytes(blob[68:84])
    with pytest.raises(KeyError):
        FOOTER.field("size")


def test_lenient_parse_keeps_what_the_strict_one_refuses() -> None:
    good = (CORPUS / "qemu/virtualpc-dynamic.vhd").read_bytes()[-512:]
    broken = bytearray(good)
    broken[:8] = b"conectiX"
    struct.pack_into(">I", broken, 60, 6)  # a deprecated disk type
    rec = FOOTER.unpack(broken)
    assert rec.cookie == b"conectiX" and rec.disk_type == 6 and rec.creator_app == b"vpc "
    assert rec.checksum != FOOTER.checksum(broken)
    with pytest.raises(InvalidFormatError):
        Footer.parse(bytes(broken))
    # Sealing restores a checksum Virtual PC would have written over the same bytes.
    assert FOOTER.sealed(good) == good
    assert FOOTER.get(FOOTER.sealed(broken), "checksum") == FOOTER.checksum(broken)
    assert Footer.from_fields(FOOTER.unpack(good)) == Footer.parse(good)

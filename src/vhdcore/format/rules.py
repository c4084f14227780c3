"""The VHD format's limits and validity rules, written once for every reader.

``Image`` (which refuses a disk it cannot trust), ``check`` (which lists every finding with its code) and
``verify`` (which reads a VHD stream once, in order) all judge footers and dynamic headers by these functions.
Each function returns the problems it finds as ``Problem`` values and reports nothing itself: every caller turns
them into its own exceptions or findings, and may act on only some of them (see ``header_offset_problems`` for
the one difference between Image and check).

Each problem names the field it is about as the structure's table in ``structs`` names it, with the field's
offset from the start of its structure; the caller adds where the structure lies in the file.

References: Microsoft "Virtual Hard Disk Image Format Specification" v1.0 (2006); blktap vhd-util (libvhd)
``vhd_validate_footer``/``vhd_validate_header`` for what XenServer refuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .geometry import MAX_GEOMETRY, Geometry, libvhd_chs
from .structs import (
    DISK_TYPES,
    FEATURE_RESERVED,
    FEATURE_TEMPORARY,
    FOOTER,
    FOOTER_SIZE,
    HEADER,
    HEADER_SIZE,
    NO_DATA_OFFSET,
    SECTOR_SIZE,
    DiskType,
    version_supported,
)

# --------------------------------------------------------------------------------------------- limits

# vhdcore's ceiling for the virtual size (2 TiB): a larger size field is corrupt or hostile.
MAX_VIRTUAL_SIZE = 2 * 1024**4
# The format's own limit (2040 GiB): Hyper-V and Windows refuse larger disks; vhdcore reads them, check warns.
FORMAT_SIZE_LIMIT = 2040 * 1024**3
MIN_BLOCK_SIZE = SECTOR_SIZE
MAX_BLOCK_SIZE = 256 * 1024**2
# 2040 GiB in 128 KiB blocks (real writers use 512 KiB or 2 MiB): a larger BAT would be 64+ MiB of memory
# sized by an untrusted field.
MAX_BAT_ENTRIES = 1 << 24
# Entries a writer may keep beyond what the virtual size needs (room to grow); more is corrupt or hostile, and
# is refused before the BAT is read so that the count never sizes an allocation.
MAX_SPARE_BAT_ENTRIES = 1 << 20


@dataclass(frozen=True)
class Problem:
    """One broken rule: ``kind`` (one of the names below), the ``field`` it is about ("header.block_size"),
    that field's ``offset`` inside its structure, and the ``value`` found there."""

    kind: str
    field: str
    offset: int
    value: Any


def _on(table: Any, name: str, kind: str, value: Any) -> Problem:
    return Problem(kind, table.field(name), table.offset(name), value)


# Footer problems. FOOTER_VERSION and DISK_TYPE leave nothing else in the footer interpretable.
FOOTER_VERSION = "footer version"
DISK_TYPE = "disk type"
FEATURES = "features"
TIMESTAMP_FUTURE = "timestamp in the future"
VIRTUAL_SIZE = "virtual size"  # not a whole number of sectors, or over MAX_VIRTUAL_SIZE
OVER_FORMAT_LIMIT = "over the format's size limit"
GEOMETRY = "geometry"  # describes more than the size, or has no heads or sectors
GEOMETRY_TOO_LARGE = "geometry larger than the specification's"
SAVED_STATE = "saved state"
UNIQUE_ID_ZERO = "unique id all zeros"
FIXED_DATA_OFFSET = "fixed disk with a data offset"

# Where the footer says the dynamic header is.
NO_HEADER = "no header offset"  # all ones: the fixed disk's value
HEADER_UNALIGNED = "header offset not sector-aligned"
HEADER_IN_FOOTER_COPY = "header offset inside the footer copy"
HEADER_PAST_EOF = "header past the end of the file"

# Dynamic header problems.
HEADER_VERSION = "header version"
HEADER_DATA_OFFSET = "header data offset"  # the unused field is not all ones
BLOCK_SIZE = "block size"
TOO_FEW_ENTRIES = "fewer table entries than the size needs"
BAT_OVER_LIMIT = "BAT over vhdcore's limit"  # the size needs more than MAX_BAT_ENTRIES blocks of this size
TOO_MANY_ENTRIES = "absurdly many table entries"
TABLE_UNALIGNED = "table offset not sector-aligned"
TABLE_OVER_METADATA = "BAT over the footer copy or the header"
BAT_PAST_EOF = "BAT past the end of the file"

# Differencing header problems.
PARENT_ID_ZERO = "parent unique id all zeros"
PARENT_TIMESTAMP_FUTURE = "parent timestamp in the future"
PARENT_NAME = "parent name empty or not UTF-16"


def block_size_ok(block_size: int) -> bool:
    """A power-of-two number of sectors, 512 B to 256 MiB."""
    return MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0


def entries_needed(virtual_size: int, block_size: int) -> int:
    """BAT entries a disk of ``virtual_size`` needs in blocks of ``block_size`` (the last one may be partial)."""
    return -(-virtual_size // block_size)


def table_bytes(entries: int) -> int:
    """Bytes the BAT of ``entries`` entries occupies in the file: padded to whole sectors."""
    return -(-entries * 4 // SECTOR_SIZE) * SECTOR_SIZE


# --------------------------------------------------------------------------------------------- footer


def virtual_size_problem(size: int) -> Problem | None:
    if size % SECTOR_SIZE or size > MAX_VIRTUAL_SIZE:
        return _on(FOOTER, "current_size", VIRTUAL_SIZE, size)
    return None


def footer_problems(f: Any, *, future: int) -> list[Problem]:
    """Every problem of a footer's fields (``f``: a lenient parse, ``FOOTER.unpack``), in the order check lists
    them. ``future``: a timestamp later than this is in the future. Cookie and checksum are the parse's."""
    out: list[Problem] = []
    if not version_supported(f.format_version):
        out.append(_on(FOOTER, "format_version", FOOTER_VERSION, f.format_version))
    if f.disk_type not in DISK_TYPES:
        out.append(_on(FOOTER, "disk_type", DISK_TYPE, f.disk_type))
    if not f.features & FEATURE_RESERVED or f.features & ~(FEATURE_RESERVED | FEATURE_TEMPORARY):
        out.append(_on(FOOTER, "features", FEATURES, f.features))
    if f.timestamp > future:
        out.append(_on(FOOTER, "timestamp", TIMESTAMP_FUTURE, f.timestamp))
    size = f.current_size
    bad_size = virtual_size_problem(size)
    if bad_size is not None:
        out.append(bad_size)
    elif size > FORMAT_SIZE_LIMIT:
        out.append(_on(FOOTER, "current_size", OVER_FORMAT_LIMIT, size))
    geo = Geometry.unpack(f.geometry)
    if geo != MAX_GEOMETRY and (geo.heads == 0 or geo.sectors_per_track == 0 or geo.size > size):
        out.append(_on(FOOTER, "geometry", GEOMETRY, geo))
    elif geo.pack() > libvhd_chs(size).pack():
        # libvhd compares the packed fields (cylinders, then heads, then sectors), not the sizes they describe.
        out.append(_on(FOOTER, "geometry", GEOMETRY_TOO_LARGE, geo))
    if f.saved_state:
        out.append(_on(FOOTER, "saved_state", SAVED_STATE, f.saved_state))
    if f.unique_id == bytes(16):
        out.append(_on(FOOTER, "unique_id", UNIQUE_ID_ZERO, f.unique_id))
    if f.disk_type == DiskType.FIXED and f.data_offset not in (NO_DATA_OFFSET, 0xFFFFFFFF):
        out.append(_on(FOOTER, "data_offset", FIXED_DATA_OFFSET, f.data_offset))
    return out


# --------------------------------------------------------------------------------------------- dynamic header


def header_offset_problems(header_offset: int, file_size: int) -> list[Problem]:
    """What is wrong with the footer's data offset of a dynamic disk (every problem that applies).

    ``Image`` does not refuse HEADER_IN_FOOTER_COPY by itself: the header it would read there is the footer copy,
    and the header's cookie check refuses it with the more telling "bad cookie".
    """
    out = []
    if header_offset == NO_DATA_OFFSET:
        out.append(_on(FOOTER, "data_offset", NO_HEADER, header_offset))
    if header_offset % SECTOR_SIZE:
        out.append(_on(FOOTER, "data_offset", HEADER_UNALIGNED, header_offset))
    if header_offset < FOOTER_SIZE:
        out.append(_on(FOOTER, "data_offset", HEADER_IN_FOOTER_COPY, header_offset))
    if header_offset + HEADER_SIZE > file_size:
        out.append(_on(FOOTER, "data_offset", HEADER_PAST_EOF, header_offset))
    return out


def header_field_problems(h: Any) -> list[Problem]:
    """The header's version and its unused data offset (``h``: a lenient parse, ``HEADER.unpack``)."""
    out = []
    if not version_supported(h.header_version):
        out.append(_on(HEADER, "header_version", HEADER_VERSION, h.header_version))
    if h.data_offset != NO_DATA_OFFSET:
        out.append(_on(HEADER, "data_offset", HEADER_DATA_OFFSET, h.data_offset))
    return out


def block_size_problem(block_size: int) -> Problem | None:
    if not block_size_ok(block_size):
        return _on(HEADER, "block_size", BLOCK_SIZE, block_size)
    return None


def table_entries_problem(max_table_entries: int, virtual_size: int, block_size: int) -> Problem | None:
    """The BAT's size against the disk's: too few entries, a BAT over vhdcore's limit (the block size is too
    small for the size: reported on the block size), or absurdly many. ``block_size`` must be valid."""
    mte = max_table_entries
    needed = entries_needed(virtual_size, block_size)
    if mte < needed:
        return _on(HEADER, "max_table_entries", TOO_FEW_ENTRIES, mte)
    if needed > MAX_BAT_ENTRIES:
        return _on(HEADER, "block_size", BAT_OVER_LIMIT, block_size)
    if mte > needed + MAX_SPARE_BAT_ENTRIES or mte > MAX_BAT_ENTRIES:
        return _on(HEADER, "max_table_entries", TOO_MANY_ENTRIES, mte)
    return None


def table_offset_problems(table_offset: int, max_table_entries: int, header_offset: int,
                          file_size: int) -> list[Problem]:
    """Where the BAT lies (every problem that applies): on a sector boundary, clear of the footer copy and the
    dynamic header, inside the file."""
    to = table_offset
    out = []
    if to % SECTOR_SIZE:
        out.append(_on(HEADER, "table_offset", TABLE_UNALIGNED, to))
    end = to + table_bytes(max_table_entries)
    if to < FOOTER_SIZE or (to < header_offset + HEADER_SIZE and end > header_offset):
        out.append(_on(HEADER, "table_offset", TABLE_OVER_METADATA, to))
    if to + max_table_entries * 4 > file_size:
        out.append(_on(HEADER, "table_offset", BAT_PAST_EOF, to))
    return out


def parent_field_problems(h: Any, *, future: int) -> list[Problem]:
    """A differencing disk's record of its parent (``h``: a lenient parse, ``HEADER.unpack``)."""
    out = []
    if h.parent_unique_id == bytes(16):
        out.append(_on(HEADER, "parent_unique_id", PARENT_ID_ZERO, h.parent_unique_id))
    if h.parent_timestamp > future:
        out.append(_on(HEADER, "parent_timestamp", PARENT_TIMESTAMP_FUTURE, h.parent_timestamp))
    try:
        name_ok = bool(h.parent_unicode_name.decode("utf-16-be").split("\0", 1)[0])
    except UnicodeDecodeError:
        name_ok = False
    if not name_ok:
        out.append(_on(HEADER, "parent_unicode_name", PARENT_NAME, h.parent_unicode_name))
    return out

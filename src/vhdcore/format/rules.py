"""The VHD format's limits and validity rules, written once for every reader.

``Image`` (which refuses a disk it cannot trust), ``check`` (which lists every finding with its code) and
``verify`` (which reads a VHD stream once, in order) all judge footers and dynamic headers by these functions.
Each function returns the problems it finds as ``Problem`` values and reports nothing itself: every caller turns
them into its own exceptions or findings, and may act on only some of them (see ``header_offset_problems`` for
the one difference between Image and check).

Each problem names the field it is about as the structure's table in ``structs`` names it, with the field's
offset from the start of its structure; the caller adds where the structure lies in the file.

Where things lie in a dynamic file is written here once too: the metadata regions (footer copy, header, BAT,
the locators' reserved space, blktap's batmap), where the metadata ends, and the rules for the blocks the BAT
places (``BlockPlacement``: inside the data, after the metadata, not overlapping), which Image enforces on every
open and check reports entry by entry.

References: Microsoft "Virtual Hard Disk Image Format Specification" v1.0 (2006); blktap vhd-util (libvhd)
``vhd_validate_footer``/``vhd_validate_header`` for what XenServer refuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple, Sequence

import numpy as np

from .. import kernels as K
from .geometry import MAX_GEOMETRY, Geometry, libvhd_chs
from .structs import (
    BATMAP_CREATOR,
    DISK_TYPES,
    FEATURE_RESERVED,
    FEATURE_TEMPORARY,
    FOOTER,
    FOOTER_SIZE,
    HEADER,
    HEADER_SIZE,
    MAX_LOCATOR_BYTES,
    NO_DATA_OFFSET,
    SECTOR_SIZE,
    UNUSED_BAT_ENTRY,
    BatmapHeader,
    DiskType,
    ParentLocator,
    round_up,
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


class Region(NamedTuple):
    """A named byte range ``[start, end)`` of a file's metadata ("dynamic header", "parent locator 2")."""

    name: str
    start: int
    end: int


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

# Where blocks lie (BlockPlacement).
BLOCK_PAST_END = "block past the end of the data"  # ends past the footer (or the end of the file)
BLOCK_IN_METADATA = "block over metadata"  # overlaps the footer copy, header, BAT, a locator or the batmap
BLOCK_BEFORE_METADATA = "block before the end of the metadata"  # overlaps none, but lies before one
BLOCKS_OVERLAP = "blocks overlap"


def block_size_ok(block_size: int) -> bool:
    """A power-of-two number of sectors, 512 B to 256 MiB."""
    return MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0


def entries_needed(virtual_size: int, block_size: int) -> int:
    """BAT entries a disk of ``virtual_size`` needs in blocks of ``block_size`` (the last one may be partial)."""
    return -(-virtual_size // block_size)


def table_bytes(entries: int) -> int:
    """Bytes the BAT of ``entries`` entries occupies in the file: padded to whole sectors."""
    return round_up(entries * 4, SECTOR_SIZE)


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


# --------------------------------------------------------------------------------------------- where things lie


def header_regions(header_offset: int) -> list[Region]:
    """The footer copy at offset 0 and the dynamic header: metadata of every dynamic layout."""
    return [Region("footer copy", 0, FOOTER_SIZE), Region("dynamic header", header_offset, header_offset + HEADER_SIZE)]


def bat_region(table_offset: int, max_table_entries: int) -> Region:
    return Region("BAT", table_offset, table_offset + table_bytes(max_table_entries))


def locator_region(slot: int, loc: ParentLocator, file_size: int) -> Region | None:
    """The data space a used locator reserves, when it lies inside the file and is not absurdly large. A used slot
    reserves its space whatever its platform code: readers and writers keep blocks clear of it."""
    start, space = loc.data_offset, loc.data_space_bytes
    if 0 < start and start + space <= file_size and space <= MAX_LOCATOR_BYTES:
        return Region(f"parent locator {slot}", start, start + space)
    return None


def batmap_header_offset(creator_app: bytes, bat_end: int, file_size: int) -> int | None:
    """Where blktap's batmap header would be: in the sector after the BAT, only in a file blktap wrote
    (creator "tap\\0") and only when that sector is inside the file."""
    if creator_app == BATMAP_CREATOR and bat_end + SECTOR_SIZE <= file_size:
        return bat_end
    return None


def batmap_regions(header_offset: int, batmap: BatmapHeader, file_size: int) -> list[Region]:
    """The batmap header's sector, and the map itself when it ends inside the file."""
    out = [Region("batmap header", header_offset, header_offset + SECTOR_SIZE)]
    if batmap.end <= file_size:
        out.append(Region("batmap", batmap.batmap_offset, batmap.end))
    return out


def metadata_end(regions: Sequence[Region]) -> int:
    """Where the metadata ends (sector-rounded): no block may start before it."""
    return round_up(max(r.end for r in regions), SECTOR_SIZE)


class BlockPlacement:
    """Where the BAT's allocated blocks lie, against the three rules for them: a block ends by ``limit`` (the
    footer, or the end of the file when the footer is torn), starts after all the ``metadata``, and overlaps no
    other block. A break of any of them would make a writer put one block's data into another's or over the
    metadata, so Image refuses the disk and check lists each entry.

    ``bat``: native-order uint32 entries; ``span``: bytes of a block with its bitmap. The verdict comes from
    ``kernels.scan_bat`` (no sort for a BAT in file order, the common case: every open of a disk asks); which
    entries break a rule is worked out only when asked, and each mask is over ``entries``.
    """

    def __init__(self, bat: np.ndarray, span: int, limit: int, metadata: Sequence[Region]) -> None:
        self.bat = bat
        self.span = span
        self.limit = limit
        self.metadata = list(metadata)
        # The region that ends last (the first of them on a tie): blocks go after it.
        self.front = max(self.metadata, key=lambda r: r.end)
        allocated, lowest, highest_end, overlaps = K.scan_bat(bat, span // SECTOR_SIZE)
        self.allocated = int(allocated)
        self.overlap_count = int(overlaps)
        self.blocks_end = int(highest_end) * SECTOR_SIZE  # 0 when none is allocated
        self._any_past_end = self.allocated > 0 and self.blocks_end > limit
        self._any_in_metadata = self.allocated > 0 and int(lowest) * SECTOR_SIZE < self.front.end

    @cached_property
    def entries(self) -> np.ndarray:
        """Indexes of the allocated entries, ascending."""
        return np.flatnonzero(self.bat != UNUSED_BAT_ENTRY)

    @cached_property
    def starts(self) -> np.ndarray:
        return self.bat[self.entries].astype(np.uint64) * SECTOR_SIZE

    @cached_property
    def ends(self) -> np.ndarray:
        return self.starts + self.span

    @cached_property
    def past_end(self) -> np.ndarray:
        return self.ends > self.limit

    @cached_property
    def in_metadata(self) -> list[tuple[Region, np.ndarray]]:
        """Per metadata region, in order: the blocks that overlap it."""
        return [(r, (self.starts < r.end) & (self.ends > r.start)) for r in self.metadata]

    @cached_property
    def in_any_metadata(self) -> np.ndarray:
        out = np.zeros(len(self.entries), dtype=bool)
        for _r, mask in self.in_metadata:
            out |= mask
        return out

    @cached_property
    def before_metadata(self) -> np.ndarray:
        """Blocks that overlap no metadata but start before its end (before a locator or the batmap): writers put
        every block after all the metadata, and vhdcore refuses any other layout."""
        return (self.starts < self.front.end) & ~self.in_any_metadata

    @cached_property
    def overlaps(self) -> tuple[np.ndarray, np.ndarray]:
        """The overlapping pairs as (earlier, later) positions into ``entries``, in file order. Every block has
        the same span, so the nearest earlier block is the one to compare with."""
        if len(self.entries) < 2:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        order = np.argsort(self.starts, kind="stable")
        clash = np.flatnonzero(self.starts[order][1:] < self.ends[order][:-1])
        return order[clash], order[clash + 1]

    @cached_property
    def own_bytes(self) -> np.ndarray:
        """Blocks wholly inside the data, clear of the metadata and of each other."""
        overlapping = np.zeros(len(self.entries), dtype=bool)
        earlier, later = self.overlaps
        overlapping[earlier] = True
        overlapping[later] = True
        return ~(self.past_end | self.in_any_metadata | overlapping)

    def _entry(self, kind: str, pos: int) -> Problem:
        i = int(self.entries[pos])
        return Problem(kind, f"bat[{i}]", 4 * i, int(self.bat[i]))

    def problems(self) -> list[Problem]:
        """One problem per broken rule, naming the telling entry: the last block past the end, the first block
        before the end of the metadata, and (on "bat") how many pairs overlap. Offsets are from the BAT's start."""
        out = []
        if self._any_past_end:
            out.append(self._entry(BLOCK_PAST_END, int(np.argmax(self.starts))))
        if self._any_in_metadata:
            pos = int(np.argmin(self.starts))
            out.append(self._entry(BLOCK_IN_METADATA if self.in_any_metadata[pos] else BLOCK_BEFORE_METADATA, pos))
        if self.overlap_count:
            out.append(Problem(BLOCKS_OVERLAP, "bat", 0, self.overlap_count))
        return out

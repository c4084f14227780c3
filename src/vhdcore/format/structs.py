"""VHD on-disk structures: the footer, the dynamic disk header and its parent locators, the blktap batmap.

Each structure is declared once, as a field table in the manner of the specification's (offset, name, format);
everything that needs a field's offset, format or name takes it from the table: the lenient parse (``TABLE.unpack``:
every field as stored, whatever it holds, for ``check``), the strict parse (``Footer.parse`` and friends: cookie,
checksum and version verified), the packers, and the offsets that error messages and findings name. Parsing and
packing do no I/O, so every structure can be tested from a blob.

References: Microsoft "Virtual Hard Disk Image Format Specification" v1.0 (2006), sections "Hard Disk Footer
Format" and "Dynamic Disk Header Format"; blktap vhd-util (libvhd) for the batmap extension.
"""
from __future__ import annotations

import enum
import struct
import uuid
from collections import namedtuple
from dataclasses import dataclass, replace
from typing import Any, Iterable

from ..exceptions import ChecksumError, CorruptImageError, InvalidFormatError

SECTOR_SIZE = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
BATMAP_COOKIE = b"tdbatmap"
# The creator application of blktap (XenServer); libvhd keeps a batmap after the BAT only in its files.
BATMAP_CREATOR = b"tap\0"
FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
FEATURE_TEMPORARY = 0x1
FEATURE_RESERVED = 0x2  # "must always be set" per the specification
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
UNUSED_BAT_ENTRY = 0xFFFFFFFF
LOCATOR_SLOTS = 8
PARENT_NAME_BYTES = 512

HOST_OS_WINDOWS = b"Wi2k"
HOST_OS_MAC = b"Mac "

# The creator application of the disks vhdcore makes. Two readers decide this field between them: qemu sizes
# a VHD by its CHS geometry (rounded down, so most sizes lose sectors) unless the creator is one it trusts for
# the footer's current size ("win ", "qem2", "d2v ", "CTXS", "tap\0") or the geometry is the maximum; and
# libvhd (XenServer) rejects a geometry larger than the specification's for the size, and takes "tap\0" to
# promise a blktap batmap. "qem2" is the creator qemu itself writes to say "the current size is the size"
# (its force_size); libvhd gives it no meaning. With the specification's geometry, both read the full size.
CREATOR_APP = b"qem2"
CREATOR_VERSION = 0x00010000
# Creators for which qemu (block/vpc.c) takes the footer's current size rather than the CHS geometry.
QEMU_TRUSTED_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
# What vhdcore wrote before (with the maximum geometry when the size was not a CHS size): such footers are
# re-made under the current policy when vhdcore rewrites a disk; any other creator is kept.
OLD_CREATOR_APP = b"vhdc"


class DiskType(enum.IntEnum):
    NONE = 0
    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4

    @property
    def label(self) -> str:
        return self.name.lower()


# The disk types a footer may hold (0 is "none", 1, 5 and 6 are deprecated).
DISK_TYPES = (DiskType.FIXED, DiskType.DYNAMIC, DiskType.DIFFERENCING)


def checksum(data: bytes | bytearray | memoryview, field_offset: int) -> int:
    """One's complement of the byte sum, with the 4-byte checksum field counted as zero."""
    mv = memoryview(data)
    total = sum(mv[:field_offset]) + sum(mv[field_offset + 4 :])
    return (~total) & 0xFFFFFFFF


def version_supported(version: int) -> bool:
    """The footer's format version and the dynamic header's version: major version 1, any minor."""
    return version >> 16 == 1


# --------------------------------------------------------------------------------------------- field tables


@dataclass(frozen=True)
class Field:
    """One row of a structure's table: where the field is, what it is called, its ``struct`` format (big-endian)."""

    offset: int
    name: str
    format: str

    @property
    def size(self) -> int:
        return struct.calcsize(">" + self.format)


class Table:
    """An on-disk structure declared as its rows, in order; ``prefix`` names it in error fields ("footer.checksum").

    Building the table checks that each row starts where the previous one ends and that the rows fill ``size``
    bytes, so an offset written in a row cannot drift from the formats.
    """

    def __init__(self, prefix: str, size: int, rows: Iterable[tuple[int, str, str]]) -> None:
        self.prefix = prefix
        self.size = size
        self.fields = tuple(Field(*row) for row in rows)
        pos = 0
        for f in self.fields:
            if f.offset != pos:
                raise AssertionError(f"{prefix}.{f.name} is declared at {f.offset}, the rows before end at {pos}")
            pos += f.size
        if pos != size:
            raise AssertionError(f"the {prefix} rows take {pos} bytes, not {size}")
        self.names = tuple(f.name for f in self.fields)
        self._rows = {f.name: f for f in self.fields}
        self.struct = struct.Struct(">" + "".join(f.format for f in self.fields))
        # The lenient parse's result: every field by name, as stored.
        self.Record = namedtuple(prefix.title().replace(" ", "") + "Fields", self.names)  # type: ignore[misc]

    def row(self, name: str) -> Field:
        return self._rows[name]

    def offset(self, name: str) -> int:
        """Byte offset of field ``name`` from the start of the structure."""
        return self._rows[name].offset

    def field(self, name: str) -> str:
        """The field's name as errors and findings give it: "footer.current_size"."""
        self._rows[name]  # an unknown name is a programming error, not a new field
        return f"{self.prefix}.{name}"

    def unpack(self, data: bytes | bytearray | memoryview, base: int = 0) -> Any:
        """The lenient parse: every field as stored (no cookie, checksum or range check) of the structure at
        ``base`` in ``data``."""
        return self.Record._make(self.struct.unpack_from(data, base))

    def pack(self, **values: Any) -> bytearray:
        """The structure's bytes from a value for every field (no checksum computed)."""
        return bytearray(self.struct.pack(*(values[n] for n in self.names)))

    def get(self, data: bytes | bytearray | memoryview, name: str, base: int = 0) -> Any:
        """One field of the structure that starts at ``base`` in ``data``."""
        f = self._rows[name]
        return struct.unpack_from(">" + f.format, data, base + f.offset)[0]

    def put(self, buf: bytearray | memoryview, name: str, value: Any, base: int = 0) -> None:
        f = self._rows[name]
        struct.pack_into(">" + f.format, buf, base + f.offset, value)

    def slice(self, name: str, base: int = 0) -> slice:
        """Where field ``name`` lies in a buffer holding the structure at ``base``."""
        f = self._rows[name]
        return slice(base + f.offset, base + f.offset + f.size)

    def checksum(self, data: bytes | bytearray | memoryview) -> int:
        """The checksum the structure's bytes should carry (its checksum field counted as zero)."""
        return checksum(data, self._rows["checksum"].offset)

    def sealed(self, data: bytes | bytearray | memoryview) -> bytes:
        """``data`` with its checksum field set to the checksum of the rest."""
        buf = bytearray(data)
        self.put(buf, "checksum", 0)
        self.put(buf, "checksum", self.checksum(buf))
        return bytes(buf)


# Hard Disk Footer Format (the spec's table); at the end of every VHD and, for dynamic disks, copied at offset 0.
FOOTER = Table("footer", FOOTER_SIZE, (
    (0, "cookie", "8s"),
    (8, "features", "I"),
    (12, "format_version", "I"),
    (16, "data_offset", "Q"),
    (24, "timestamp", "I"),
    (28, "creator_app", "4s"),
    (32, "creator_version", "I"),
    (36, "creator_os", "4s"),
    (40, "original_size", "Q"),
    (48, "current_size", "Q"),
    (56, "geometry", "I"),
    (60, "disk_type", "I"),
    (64, "checksum", "I"),
    (68, "unique_id", "16s"),
    (84, "saved_state", "B"),
    (85, "reserved", "427s"),
))

# Parent Locator Entry: eight of them fill the header's parent_locators field.
LOCATOR = Table("parent locator", 24, (
    (0, "platform_code", "4s"),
    (4, "data_space", "I"),
    (8, "data_length", "I"),
    (12, "reserved", "I"),
    (16, "data_offset", "Q"),
))

# Dynamic Disk Header Format, at the footer's data_offset.
HEADER = Table("header", HEADER_SIZE, (
    (0, "cookie", "8s"),
    (8, "data_offset", "Q"),
    (16, "table_offset", "Q"),
    (24, "header_version", "I"),
    (28, "max_table_entries", "I"),
    (32, "block_size", "I"),
    (36, "checksum", "I"),
    (40, "parent_unique_id", "16s"),
    (56, "parent_timestamp", "I"),
    (60, "reserved1", "I"),
    (64, "parent_unicode_name", f"{PARENT_NAME_BYTES}s"),
    (576, "parent_locators", f"{LOCATOR_SLOTS * LOCATOR.size}s"),
    (768, "reserved2", "256s"),
))

# blktap's batmap header (libvhd), in the sector after the BAT; the rest of that sector is zeros.
BATMAP = Table("batmap", 28, (
    (0, "cookie", "8s"),
    (8, "batmap_offset", "Q"),
    (16, "batmap_size", "I"),  # sectors
    (20, "batmap_version", "I"),
    (24, "checksum", "I"),
))


def locator_entry_offset(slot: int) -> int:
    """Offset of parent locator entry ``slot`` from the start of the dynamic header."""
    return HEADER.offset("parent_locators") + slot * LOCATOR.size


def _require(cond: bool, msg: str, *, path: Any, offset: int | None, field: str, value: Any) -> None:
    if not cond:
        raise InvalidFormatError(msg, path=path, offset=offset, field=field, value=value)


def _at(base: int | None, rel: int) -> int | None:
    return None if base is None else base + rel


def _strict_unpack(table: Table, data: bytes, *, cookie: bytes, version: str, names: tuple[str, str, str],
                   path: Any, offset: int | None, verify_checksum: bool) -> Any:
    """The strict parse shared by the footer and the dynamic header: the cookie, the checksum (unless
    ``verify_checksum`` is off) and a 1.x ``version`` field, in that order. ``names``: what the structure is called
    in the bad-cookie message, in the checksum error, and in the version message."""
    cookie_name, structure, version_name = names
    rec = table.unpack(data)
    _require(rec.cookie == cookie, f"not a {cookie_name} (bad cookie)", path=path, offset=offset,
             field=table.field("cookie"), value=rec.cookie)
    if verify_checksum:
        actual = table.checksum(data)
        if actual != rec.checksum:
            raise ChecksumError(
                f"{structure} checksum mismatch: stored 0x{rec.checksum:08x}, computed 0x{actual:08x}",
                structure=structure, expected=rec.checksum, actual=actual, path=path,
                offset=_at(offset, table.offset("checksum")), field=table.field("checksum"), value=rec.checksum,
            )
    _require(version_supported(getattr(rec, version)), f"unsupported {version_name} version", path=path,
             offset=_at(offset, table.offset(version)), field=table.field(version), value=getattr(rec, version))
    return rec


# --------------------------------------------------------------------------------------------- footer


@dataclass(frozen=True)
class Footer:
    features: int
    format_version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    geometry: int
    disk_type: int
    checksum: int
    unique_id: uuid.UUID
    saved_state: int
    cookie: bytes = FOOTER_COOKIE
    reserved: bytes = bytes(427)

    @classmethod
    def parse(
        cls,
        data: bytes,
        *,
        path: Any = None,
        offset: int | None = None,
        verify_checksum: bool = True,
    ) -> "Footer":
        """Parse a 512-byte footer (a 511-byte legacy footer must be padded with one zero byte first)."""
        if len(data) != FOOTER_SIZE:
            raise InvalidFormatError(
                f"footer needs {FOOTER_SIZE} bytes, got {len(data)}", path=path, offset=offset, field="footer"
            )
        rec = _strict_unpack(FOOTER, data, cookie=FOOTER_COOKIE, version="format_version",
                             names=("VHD footer", "footer", "footer format"), path=path, offset=offset,
                             verify_checksum=verify_checksum)
        _require(rec.disk_type in DISK_TYPES, "unknown or deprecated disk type", path=path,
                 offset=_at(offset, FOOTER.offset("disk_type")), field=FOOTER.field("disk_type"), value=rec.disk_type)
        return cls.from_fields(rec)

    @classmethod
    def from_fields(cls, rec: Any) -> "Footer":
        """The footer of a lenient parse's fields, unchecked."""
        return cls(**{**rec._asdict(), "unique_id": uuid.UUID(bytes=rec.unique_id)})

    def pack(self) -> bytes:
        values = {name: getattr(self, name) for name in FOOTER.names}
        values.update(disk_type=int(self.disk_type), checksum=0, unique_id=self.unique_id.bytes)
        return FOOTER.sealed(FOOTER.pack(**values))

    def with_checksum(self) -> "Footer":
        """A copy whose checksum field is the one ``pack`` writes."""
        return replace(self, checksum=FOOTER.get(self.pack(), "checksum"))

    @property
    def type(self) -> DiskType:
        return DiskType(self.disk_type)

    @property
    def creator_app_text(self) -> str:
        return self.creator_app.decode("latin-1").rstrip("\0 ") or "?"

    @property
    def creator_os_text(self) -> str:
        return self.creator_os.decode("latin-1").rstrip("\0 ") or "?"

    @property
    def creator_version_text(self) -> str:
        return f"{self.creator_version >> 16}.{self.creator_version & 0xFFFF}"


# --------------------------------------------------------------------------------------------- locators

PLATFORM_W2RU = b"W2ru"
PLATFORM_W2KU = b"W2ku"
PLATFORM_MACX = b"MacX"
PLATFORM_MAC = b"Mac "
PLATFORM_WI2R = b"Wi2r"
PLATFORM_WI2K = b"Wi2k"
PLATFORM_NONE = b"\0\0\0\0"

# A locator's path never needs more than this; a larger stated length is hostile or corrupt.
MAX_LOCATOR_BYTES = 64 * 1024


@dataclass(frozen=True)
class ParentLocator:
    platform_code: bytes
    data_space: int  # as stored: sectors per the spec, bytes for several writers (see data_space_bytes)
    data_length: int
    data_offset: int
    reserved: int = 0

    @classmethod
    def parse(cls, data: bytes, base: int = 0) -> "ParentLocator":
        return cls(**LOCATOR.unpack(data, base)._asdict())

    def pack(self) -> bytes:
        return bytes(LOCATOR.pack(**{name: getattr(self, name) for name in LOCATOR.names}))

    @property
    def is_used(self) -> bool:
        return self.platform_code != PLATFORM_NONE

    @property
    def data_space_bytes(self) -> int:
        """Space reserved for the locator's data, in bytes.

        The specification says sectors; Windows and Hyper-V store bytes. A value that is a multiple of 512 and
        at least 512 can only sensibly be bytes (no locator needs 512+ sectors).
        """
        if self.data_space >= SECTOR_SIZE and self.data_space % SECTOR_SIZE == 0:
            return self.data_space
        return self.data_space * SECTOR_SIZE

    def decode_path(self, raw: bytes) -> str | None:
        """The path this locator's data names, or None for platforms that hold no path (Mac alias)."""
        from .locators import decode  # the encodings live with the other locator rules

        return decode(self.platform_code, raw)


EMPTY_LOCATOR = ParentLocator(PLATFORM_NONE, 0, 0, 0)


# --------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class DynamicHeader:
    data_offset: int
    table_offset: int
    header_version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_unique_id: uuid.UUID
    parent_timestamp: int
    parent_unicode_name_raw: bytes
    parent_locators: tuple[ParentLocator, ...]
    reserved1: int = 0
    reserved2: bytes = bytes(256)
    cookie: bytes = HEADER_COOKIE

    @classmethod
    def parse(
        cls,
        data: bytes,
        *,
        path: Any = None,
        offset: int | None = None,
        verify_checksum: bool = True,
    ) -> "DynamicHeader":
        if len(data) != HEADER_SIZE:
            raise CorruptImageError(f"dynamic header needs {HEADER_SIZE} bytes, got {len(data)} (file truncated)",
                                    path=path, offset=offset, field="header")
        rec = _strict_unpack(HEADER, data, cookie=HEADER_COOKIE, version="header_version",
                             names=("dynamic disk header", "dynamic header", "dynamic header"), path=path,
                             offset=offset, verify_checksum=verify_checksum)
        return cls.from_fields(rec)

    @classmethod
    def from_fields(cls, rec: Any) -> "DynamicHeader":
        """The header of a lenient parse's fields, unchecked."""
        locators = tuple(ParentLocator.parse(rec.parent_locators, i * LOCATOR.size) for i in range(LOCATOR_SLOTS))
        return cls(rec.data_offset, rec.table_offset, rec.header_version, rec.max_table_entries, rec.block_size,
                   rec.checksum, uuid.UUID(bytes=rec.parent_unique_id), rec.parent_timestamp, rec.parent_unicode_name,
                   locators, rec.reserved1, rec.reserved2, rec.cookie)

    def pack(self) -> bytes:
        locs = b"".join(loc.pack() for loc in self.parent_locators)
        locs += EMPTY_LOCATOR.pack() * (LOCATOR_SLOTS - len(self.parent_locators))
        raw = HEADER.pack(cookie=self.cookie, data_offset=self.data_offset, table_offset=self.table_offset,
                          header_version=self.header_version, max_table_entries=self.max_table_entries,
                          block_size=self.block_size, checksum=0, parent_unique_id=self.parent_unique_id.bytes,
                          parent_timestamp=self.parent_timestamp, reserved1=self.reserved1,
                          parent_unicode_name=self.parent_unicode_name_raw, parent_locators=locs,
                          reserved2=self.reserved2)
        return HEADER.sealed(raw)

    @property
    def parent_unicode_name(self) -> str:
        try:
            return self.parent_unicode_name_raw.decode("utf-16-be").split("\0", 1)[0]
        except UnicodeDecodeError:
            return ""

    @staticmethod
    def encode_parent_name(name: str) -> bytes:
        raw = name.encode("utf-16-be")
        if len(raw) > PARENT_NAME_BYTES:
            raise InvalidFormatError("parent name does not fit in the header", field="header.parent_unicode_name",
                                     value=name)
        return raw.ljust(PARENT_NAME_BYTES, b"\0")

    @property
    def sectors_per_block(self) -> int:
        return self.block_size // SECTOR_SIZE

    @property
    def bitmap_size(self) -> int:
        return bitmap_bytes(self.block_size)


def round_up(n: int, a: int) -> int:
    """``n`` rounded up to a whole number of ``a`` (sectors, pages): the one rounding the format's sizes use."""
    return -(-n // a) * a


def bitmap_bytes(block_size: int) -> int:
    """Bytes of sector bitmap in front of each block: one bit per sector, padded to whole sectors."""
    spb = block_size // SECTOR_SIZE
    return round_up((spb + 7) // 8, SECTOR_SIZE)


# --------------------------------------------------------------------------------------------- batmap


@dataclass(frozen=True)
class BatmapHeader:
    """blktap's "batmap": one bit per block, set when every sector of the block is present.

    vhd-util keeps it in the sectors after the BAT; a writer must not place blocks over it.
    """

    batmap_offset: int
    batmap_size: int  # sectors
    batmap_version: int
    checksum: int

    @classmethod
    def parse(cls, data: bytes) -> "BatmapHeader | None":
        if len(data) < BATMAP.size:
            return None
        rec = BATMAP.unpack(data)
        if rec.cookie != BATMAP_COOKIE:
            return None
        return cls(rec.batmap_offset, rec.batmap_size, rec.batmap_version, rec.checksum)

    def pack(self) -> bytes:
        """The header's sector: the fields, then zeros."""
        raw = BATMAP.pack(cookie=BATMAP_COOKIE, batmap_offset=self.batmap_offset, batmap_size=self.batmap_size,
                          batmap_version=self.batmap_version, checksum=self.checksum)
        return bytes(raw.ljust(SECTOR_SIZE, b"\0"))

    @property
    def end(self) -> int:
        return self.batmap_offset + self.batmap_size * SECTOR_SIZE



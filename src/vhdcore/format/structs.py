"""VHD on-disk structures: the footer, the dynamic disk header and its parent locators, the blktap batmap.

Each structure is parsed from bytes and packed to bytes with no I/O, so every structure can be tested from a
blob. Parsing verifies cookies and checksums; packing writes the checksum.

References: Microsoft "Virtual Hard Disk Image Format Specification" v1.0 (2006), sections "Hard Disk Footer
Format" and "Dynamic Disk Header Format"; blktap vhd-util (libvhd) for the batmap extension.
"""
from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, replace
from typing import Any

from ..exceptions import ChecksumError, CorruptImageError, InvalidFormatError

SECTOR_SIZE = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
BATMAP_COOKIE = b"tdbatmap"
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


_FOOTER = struct.Struct(">8sIIQI4sI4sQQIII16sB427s")
_HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")
_LOCATOR = struct.Struct(">4sIIIQ")
_BATMAP = struct.Struct(">8sQIII")  # cookie, batmap offset, size in sectors, version, checksum
assert _FOOTER.size == FOOTER_SIZE and _HEADER.size == HEADER_SIZE and _LOCATOR.size == 24


def checksum(data: bytes | bytearray | memoryview, field_offset: int) -> int:
    """One's complement of the byte sum, with the 4-byte checksum field counted as zero."""
    mv = memoryview(data)
    total = sum(mv[:field_offset]) + sum(mv[field_offset + 4 :])
    return (~total) & 0xFFFFFFFF


def _require(cond: bool, msg: str, *, path: Any, offset: int | None, field: str, value: Any) -> None:
    if not cond:
        raise InvalidFormatError(msg, path=path, offset=offset, field=field, value=value)


def _at(base: int | None, rel: int) -> int | None:
    return None if base is None else base + rel


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
        (cookie, features, version, data_offset, timestamp, app, app_ver, host_os, orig, cur, geo, dtype,
         csum, uid, saved, reserved) = _FOOTER.unpack(data)
        _require(cookie == FOOTER_COOKIE, "not a VHD footer (bad cookie)", path=path, offset=offset,
                 field="footer.cookie", value=cookie)
        if verify_checksum:
            actual = checksum(data, 64)
            if actual != csum:
                raise ChecksumError(
                    f"footer checksum mismatch: stored 0x{csum:08x}, computed 0x{actual:08x}",
                    structure="footer", expected=csum, actual=actual, path=path, offset=_at(offset, 64),
                    field="footer.checksum", value=csum,
                )
        _require(version >> 16 == 1, "unsupported footer format version", path=path, offset=_at(offset, 12),
                 field="footer.format_version", value=version)
        _require(dtype in (2, 3, 4), "unknown or deprecated disk type", path=path, offset=_at(offset, 60),
                 field="footer.disk_type", value=dtype)
        return cls(features, version, data_offset, timestamp, app, app_ver, host_os, orig, cur, geo, dtype,
                   csum, uuid.UUID(bytes=uid), saved, cookie, reserved)

    def pack(self) -> bytes:
        raw = bytearray(
            _FOOTER.pack(self.cookie, self.features, self.format_version, self.data_offset, self.timestamp,
                         self.creator_app, self.creator_version, self.creator_os, self.original_size,
                         self.current_size, self.geometry, int(self.disk_type), 0, self.unique_id.bytes,
                         self.saved_state, self.reserved)
        )
        struct.pack_into(">I", raw, 64, checksum(raw, 64))
        return bytes(raw)

    def with_checksum(self) -> "Footer":
        """A copy whose checksum field is the one ``pack`` writes."""
        return replace(self, checksum=struct.unpack_from(">I", self.pack(), 64)[0])

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
    def parse(cls, data: bytes) -> "ParentLocator":
        code, space, length, reserved, off = _LOCATOR.unpack(data)
        return cls(code, space, length, off, reserved)

    def pack(self) -> bytes:
        return _LOCATOR.pack(self.platform_code, self.data_space, self.data_length, self.reserved,
                             self.data_offset)

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
        (cookie, data_off, table_off, version, mte, block_size, csum, puid, pts, res1, pname, locs,
         res2) = _HEADER.unpack(data)
        _require(cookie == HEADER_COOKIE, "not a dynamic disk header (bad cookie)", path=path, offset=offset,
                 field="header.cookie", value=cookie)
        if verify_checksum:
            actual = checksum(data, 36)
            if actual != csum:
                raise ChecksumError(
                    f"dynamic header checksum mismatch: stored 0x{csum:08x}, computed 0x{actual:08x}",
                    structure="dynamic header", expected=csum, actual=actual, path=path,
                    offset=_at(offset, 36), field="header.checksum", value=csum,
                )
        _require(version >> 16 == 1, "unsupported dynamic header version", path=path, offset=_at(offset, 24),
                 field="header.header_version", value=version)
        locators = tuple(ParentLocator.parse(locs[i * 24 : (i + 1) * 24]) for i in range(LOCATOR_SLOTS))
        return cls(data_off, table_off, version, mte, block_size, csum, uuid.UUID(bytes=puid), pts, pname,
                   locators, res1, res2, cookie)

    def pack(self) -> bytes:
        locs = b"".join(loc.pack() for loc in self.parent_locators)
        locs += EMPTY_LOCATOR.pack() * (LOCATOR_SLOTS - len(self.parent_locators))
        raw = bytearray(
            _HEADER.pack(self.cookie, self.data_offset, self.table_offset, self.header_version,
                         self.max_table_entries, self.block_size, 0, self.parent_unique_id.bytes,
                         self.parent_timestamp, self.reserved1, self.parent_unicode_name_raw, locs,
                         self.reserved2)
        )
        struct.pack_into(">I", raw, 36, checksum(raw, 36))
        return bytes(raw)

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


def bitmap_bytes(block_size: int) -> int:
    """Bytes of sector bitmap in front of each block: one bit per sector, padded to whole sectors."""
    spb = block_size // SECTOR_SIZE
    raw = (spb + 7) // 8
    return (raw + SECTOR_SIZE - 1) // SECTOR_SIZE * SECTOR_SIZE


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
        if len(data) < _BATMAP.size:
            return None
        cookie, off, size, version, csum = _BATMAP.unpack_from(data)
        if cookie != BATMAP_COOKIE:
            return None
        return cls(off, size, version, csum)

    @property
    def end(self) -> int:
        return self.batmap_offset + self.batmap_size * SECTOR_SIZE



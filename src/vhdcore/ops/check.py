"""Integrity check of a VHD file and its chain: every problem, not just the first.

``Image`` stops at the first structure it cannot trust. ``check`` instead parses each structure itself from
bounded reads and keeps going, so a damaged file yields the full list of what is wrong with it, each with a
code, a severity, the byte offset, the field and a plain-language explanation.

What is verified is a superset of XenServer's ``vhd-util check``: footer (cookie, version, checksum, disk type,
sizes, geometry, timestamp) and its copy at offset 0; the dynamic header (cookie, version, checksum, table
offset, block size, max table entries); every BAT entry (inside the file, clear of the metadata, not overlapping
another block); the parent locators (inside the file, not overlapping); the file length against the last block
and the footer; and for differencing disks the parent (found inside the allowed directories, same unique id,
timestamp) and the chain (acyclic, bounded depth). Also what libvhd rejects or cannot see: data under clear
sector-bitmap bits (read only for allocated blocks whose bitmap has a clear bit), a footer geometry larger than
the specification's for the size, a parent unicode name that is not the locators' file name.

Nothing here sizes an allocation from an untrusted field: the BAT is read only when it fits in the file and in
``MAX_BAT_ENTRIES``, locator data only up to ``MAX_LOCATOR_BYTES``, and the search for a displaced footer is
bounded in bytes.
"""
from __future__ import annotations

import fcntl
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..exceptions import ChainCycleError, InvalidFormatError, ParentMismatchError, ParentNotFoundError, VHDError
from .. import kernels as K
from ..fileio import pread_upto
from ..format import locators
from ..format import rules as R
from ..format.geometry import VHD_EPOCH, libvhd_chs, vhd_timestamp
from ..format.rules import FORMAT_SIZE_LIMIT  # noqa: F401 - check's public name for the format's size limit
from ..format.structs import (
    BATMAP,
    FOOTER,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER,
    HEADER_COOKIE,
    HEADER_SIZE,
    LOCATOR,
    LOCATOR_SLOTS,
    MAX_LOCATOR_BYTES,
    SECTOR_SIZE,
    BatmapHeader,
    DiskType,
    DynamicHeader,
    Footer,
    ParentLocator,
    bitmap_bytes,
    locator_entry_offset,
    round_up,
    version_supported,
)

ERROR = "error"
WARNING = "warning"
INFO = "info"

# Clock skew between the host that wrote a disk and this one; later timestamps are "in the future".
DEFAULT_TIME_SLACK = 3600
# Per file and code: past this many, one summary finding says how many more there were.
MAX_FINDINGS_PER_CODE = 20
# A footer displaced by bytes appended after it is looked for this far past the last block.
FOOTER_SEARCH_BYTES = 256 * 1024 * 1024
_SEARCH_CHUNK = 4 * 1024 * 1024
_LOCATOR_ORDER = (b"W2ru", b"W2ku", b"MacX", b"Mac ", b"Wi2r", b"Wi2k")

# code -> (severity, what it means and what to do about it)
CODES: dict[str, tuple[str, str]] = {
    "FILE_TOO_SMALL": (ERROR, "The file is too short to hold a VHD footer: it is empty or was cut off."),
    "VHDX_FILE": (ERROR, "This is a VHDX file, a different format; vhdcore handles VHD only."),
    "FOOTER_MISSING": (ERROR, "The last sector of the file holds no valid VHD footer. A crash while a block was "
                              "being added leaves this state: when the copy of the footer at offset 0 is intact, "
                              "'vhdcore repair' restores the footer from it."),
    "FOOTER_LEGACY": (INFO, "The footer is 511 bytes long, as Virtual PC wrote it before 2004; readers accept it."),
    "FOOTER_CHECKSUM": (ERROR, "The footer's checksum does not match its bytes: a field was changed without "
                               "updating the checksum, or the sector is damaged."),
    "FOOTER_VERSION": (ERROR, "The footer's format version is not 1.x; the rest of the footer cannot be trusted."),
    "FOOTER_DISK_TYPE": (ERROR, "The disk type is not fixed (2), dynamic (3) or differencing (4)."),
    "FOOTER_FEATURES": (WARNING, "The footer's feature bits are not what the specification allows (bit 0x2 must "
                                 "be set, only 0x1 and 0x2 are defined)."),
    "FOOTER_TIMESTAMP_FUTURE": (WARNING, "The footer's creation time lies in the future: the writer's clock was "
                                         "wrong or the field is damaged."),
    "FOOTER_SIZE": (ERROR, "The virtual size is not a multiple of 512 bytes or is larger than 2 TiB."),
    "FOOTER_SIZE_LIMIT": (WARNING, "The virtual size is over the format's limit of 2040 GiB; Hyper-V and Windows "
                                   "refuse such disks."),
    "FOOTER_GEOMETRY": (WARNING, "The CHS geometry describes a disk larger than the virtual size, or has zero "
                                 "heads or sectors per track; readers that size disks by geometry get it wrong "
                                 "(and XenServer's 'vhd-util check' rejects the disk)."),
    "FOOTER_GEOMETRY_TOO_LARGE": (WARNING, "The CHS geometry is larger than the one the specification's algorithm "
                                           "gives for the virtual size (qemu's force_size disks and older vhdcore "
                                           "disks record the maximum 65535/16/255). Readers size the disk by its "
                                           "current size, but XenServer's 'vhd-util check' rejects the footer "
                                           "(\"geometry too large\"), so its storage manager will not use the "
                                           "disk. 'vhdcore convert' writes a copy with the specification's "
                                           "geometry."),
    "FOOTER_DATA_OFFSET": (WARNING, "A fixed disk's footer should have data offset 0xFFFFFFFFFFFFFFFF."),
    "FOOTER_SAVED_STATE": (WARNING, "The disk is marked as holding a saved virtual machine state; it must not "
                                    "be compacted or modified until the VM is resumed."),
    "FOOTER_UNIQUE_ID": (WARNING, "The footer's unique id is all zeros, so children cannot tell this disk apart."),
    "FOOTER_COPY_MISSING": (ERROR, "Offset 0 of a dynamic disk must hold a copy of the footer, used to recover "
                                   "from a lost footer; it does not. 'vhdcore repair' rewrites it."),
    "FOOTER_COPY_CHECKSUM": (ERROR, "The copy of the footer at offset 0 has a wrong checksum. 'vhdcore repair' "
                                    "rewrites it from the footer."),
    "FOOTER_COPY_MISMATCH": (ERROR, "The copy of the footer at offset 0 differs from the footer at the end. "
                                    "'vhdcore repair' rewrites it from the footer."),
    "FILE_TRAILING_DATA": (ERROR, "Bytes follow the footer at the end of the file (an append, or a copy that "
                                  "padded the file), so the footer is not where readers look for it. No block "
                                  "refers to them; 'vhdcore repair' truncates them after backing them up."),
    "FILE_UNUSED_SPACE": (INFO, "Bytes between the last block and the footer belong to no block: left by an "
                                "interrupted block allocation or by the writer's alignment. Harmless."),
    "FILE_TRUNCATED": (ERROR, "The file is shorter than the disk's data: it was cut off."),
    "FILE_LENGTH": (WARNING, "The file's length does not fit the layout (not a multiple of 512 bytes, or a "
                             "fixed disk whose data area is not its virtual size)."),
    "HEADER_OFFSET": (ERROR, "The footer's data offset does not point at a dynamic header inside the file."),
    "HEADER_COOKIE": (ERROR, "The dynamic header does not start with 'cxsparse'."),
    "HEADER_CHECKSUM": (ERROR, "The dynamic header's checksum does not match its bytes. If every field is "
                               "otherwise valid, 'vhdcore repair --fix-checksums' recomputes it."),
    "HEADER_VERSION": (ERROR, "The dynamic header's version is not 1.x."),
    "HEADER_DATA_OFFSET": (WARNING, "The dynamic header's data offset (unused) should be 0xFFFFFFFFFFFFFFFF."),
    "HEADER_BLOCK_SIZE": (ERROR, "The block size must be a power-of-two number of sectors, 512 B to 256 MiB."),
    "HEADER_MAX_TABLE_ENTRIES": (ERROR, "The BAT has fewer entries than the virtual size needs, or absurdly many."),
    "HEADER_TABLE_OFFSET": (ERROR, "The BAT's offset is not sector-aligned or makes it overlap the footer copy "
                                   "or the dynamic header."),
    "BAT_OUTSIDE_FILE": (ERROR, "The BAT does not fit inside the file: the file was cut off or the header's "
                                "table offset or max table entries is damaged."),
    "BAT_ENTRY_PAST_EOF": (ERROR, "A BAT entry points at a block that ends past the footer or the end of the "
                                  "file: the file was cut off or the entry is damaged. Reads of it fail."),
    "BAT_ENTRY_IN_METADATA": (ERROR, "A BAT entry points at a block that overlaps the footer copy, the dynamic "
                                     "header, the BAT or a parent locator: writing it would destroy metadata."),
    "BAT_ENTRY_BEFORE_METADATA": (ERROR, "A block lies before a parent locator or the batmap. Writers place "
                                         "every block after all the metadata; vhdcore refuses this layout."),
    "BAT_ENTRY_OVERLAP": (ERROR, "Two BAT entries point at blocks that overlap: writing one changes the other."),
    "BATMAP_OUTSIDE_FILE": (WARNING, "The blktap batmap after the BAT does not fit in the file."),
    "BATMAP_VERSION": (WARNING, "The blktap batmap has a version newer than 1.2; blktap refuses to use it."),
    "BATMAP_CHECKSUM": (WARNING, "The blktap batmap's checksum does not match its contents: blktap ignores a "
                                "damaged batmap (vhdcore never uses it for reads); vhd-util check reports it."),
    "HEADER_PARENT_ID": (ERROR, "A differencing disk must record its parent's unique id; it is all zeros."),
    "HEADER_PARENT_TIMESTAMP_FUTURE": (WARNING, "The recorded parent time stamp lies in the future."),
    "HEADER_PARENT_NAME": (WARNING, "The parent's unicode name is empty or not valid UTF-16."),
    "PARENT_NAME_LOCATOR_MISMATCH": (WARNING, "The parent's unicode name is not the file name the MacX, W2ku or W2ru "
                                              "locator points at. XenServer's 'vhd-util check' compares the whole "
                                              "name (backslashes read as '/', a leading 'C:' dropped) with the "
                                              "locator's last path component and rejects the disk when they differ; "
                                              "Windows writes the parent's full path in the name, so every "
                                              "Hyper-V differencing disk fails that check. Readers that follow the "
                                              "locators (vhdcore, libvhd, Windows) still find the parent."),
    "LOCATOR_PLATFORM": (WARNING, "A parent locator has a platform code that no writer uses; it is ignored."),
    "LOCATOR_LENGTH": (ERROR, "A parent locator's data length is zero, larger than its data space or larger than "
                              "any path; it is ignored."),
    "LOCATOR_OUTSIDE_FILE": (ERROR, "A parent locator's data lies outside the file; it is ignored."),
    "LOCATOR_OVERLAP": (ERROR, "A parent locator's data overlaps another locator, the header or the BAT."),
    "LOCATOR_ALIGNMENT": (WARNING, "A parent locator's data does not start on a sector boundary."),
    "LOCATOR_PATH": (WARNING, "A parent locator's data is not a path in the encoding its platform code says."),
    "PARENT_NOT_FOUND": (ERROR, "The parent disk was not found in the allowed directories (the disk's own and "
                                "those given with --parent-dir). Locators that point elsewhere are not followed."),
    "PARENT_MISMATCH": (ERROR, "A file with the parent's name exists but its unique id is not the one this disk "
                               "records: the parent was replaced or modified, and the chain reads wrong data."),
    "PARENT_TIMESTAMP": (WARNING, "The parent time stamp this disk records matches neither the parent file's "
                                  "modification time nor its footer time stamp (often just a copy between hosts)."),
    "CHAIN_CYCLE": (ERROR, "Following parents leads back to a disk already in the chain."),
    "CHAIN_TOO_DEEP": (ERROR, "The chain is deeper than vhdcore accepts; no real chain is that deep."),
    "BITMAP_CLEAR_DATA": (WARNING, "Sectors of an allocated block hold data (a non-zero byte) while their "
                                   "sector-bitmap bits are clear. Readers that follow the specification (libvhd, "
                                   "XenServer, vhdcore) read such a sector as zeros in a dynamic disk and as the "
                                   "parent's sector in a differencing one, so the data is invisible. Two causes: a "
                                   "writer put it there without setting the bits (vhdcore before the libvhd bitmap "
                                   "rule did when writing into an existing block), or a write was cut off by a "
                                   "crash after its data and before its bitmap (the write was never completed; the "
                                   "disk reads its old content). 'vhd-util check -b' rejects the disk. If the data "
                                   "is what the disk should hold, 'vhdcore repair --set-bitmap-bits' sets those bits "
                                   "(with an undo file); if it is stale, leave it: it is never read."),
    "TOO_MANY_FINDINGS": (INFO, "More findings of one code than are listed."),
    "FILE_IN_USE": (INFO, "Another process holds the writer lock on this file: what the check saw may be the "
                          "middle of a write (a block being added looks like a torn footer)."),
}


@dataclass(frozen=True)
class Finding:
    """One problem: ``code`` from ``CODES``, ``offset`` the byte offset of ``field`` in ``path``."""

    code: str
    severity: str
    offset: int | None
    field: str | None
    message: str
    path: str
    repairable: bool = False
    count: int | None = None  # how many units (sectors) the finding covers, where that is meaningful

    @property
    def explanation(self) -> str:
        return CODES.get(self.code, (self.severity, ""))[1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["explanation"] = self.explanation
        return d

    def __str__(self) -> str:
        where = f"offset {self.offset}" if self.offset is not None else "-"
        if self.field:
            where += f" {self.field}"
        return f"{self.severity} {self.code} ({where}): {self.message}"


@dataclass
class CheckReport:
    path: str
    findings: list[Finding] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # files examined, leaf first
    chain: bool = False

    @property
    def clean(self) -> bool:
        """No errors and no warnings (informational notes do not count)."""
        return not any(f.severity in (ERROR, WARNING) for f in self.findings)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    def codes(self, path: str | None = None) -> set[str]:
        return {f.code for f in self.findings if path is None or f.path == path}

    def to_dict(self) -> dict:
        return {"path": self.path, "clean": self.clean, "chain": self.chain, "layers": list(self.layers),
                "error_count": len(self.errors), "warning_count": len(self.warnings),
                "warnings": [str(f) for f in self.warnings],
                "findings": [f.to_dict() for f in self.findings]}


# --------------------------------------------------------------------------------------------- raw parsing


@dataclass
class RawFooter:
    """A footer's fields as stored, whatever they hold (``Footer.parse`` refuses bad ones): the lenient parse."""

    raw: bytes
    offset: int
    fields: Any  # FOOTER.Record: every field by its table name
    computed_checksum: int

    @classmethod
    def parse(cls, raw: bytes, offset: int) -> "RawFooter":
        if len(raw) == FOOTER_SIZE - 1:
            raw = raw + b"\0"
        return cls(raw, offset, FOOTER.unpack(raw), FOOTER.checksum(raw))

    @property
    def cookie_ok(self) -> bool:
        return self.fields.cookie == FOOTER_COOKIE

    @property
    def stored_checksum(self) -> int:
        return self.fields.checksum

    @property
    def checksum_ok(self) -> bool:
        return self.fields.checksum == self.computed_checksum

    @property
    def valid(self) -> bool:
        return self.cookie_ok and self.checksum_ok

    def as_footer(self) -> Footer:
        return Footer.from_fields(self.fields)


def differing_footer_fields(a: RawFooter, b: RawFooter) -> list[str]:
    return [name for name in FOOTER.names if getattr(a.fields, name) != getattr(b.fields, name)]


class _File:
    """Bounded reads of one open file: a read never asks for more than the caller's explicit bound."""

    def __init__(self, path: str) -> None:
        self.path = path
        # O_NONBLOCK: a FIFO must not hang the check; it is refused below as not a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidFormatError("not a regular file", path=path, field="file")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = st.st_size
        self.identity = (st.st_dev, st.st_ino)
        self.mtime = st.st_mtime

    def writer_active(self) -> bool:
        """Whether a writer holds the file's lock (a shared lock conflicts only with a writer's exclusive one)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer at the end of the file)."""
        if offset >= self.size or n <= 0:
            return b""
        return pread_upto(self.fd, offset, min(n, self.size - offset))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --------------------------------------------------------------------------------------------- one file


@dataclass
class FileAnalysis:
    """What ``check`` learnt about one file; ``repair`` plans from it."""

    path: str
    file_size: int
    identity: tuple[int, int] = (0, 0)
    mtime: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    end_footer: RawFooter | None = None  # the footer at the end (512 or legacy 511 bytes), if its cookie is there
    footer_offset: int = -1  # where the file's real footer is (-1: none found)
    footer_source: str = ""  # "end", "legacy", "displaced" (bytes follow it), "copy" (only the copy is usable)
    copy: RawFooter | None = None  # the footer copy at offset 0 (dynamic and differencing disks)
    footer: RawFooter | None = None  # the footer the analysis trusted
    disk_type: int = 0
    size: int = 0
    header: DynamicHeader | None = None
    header_offset: int = -1
    header_raw: bytes = b""
    header_fields_ok: bool = False  # every header field valid except perhaps the checksum
    block_size: int = 0
    bat: np.ndarray | None = None
    metadata: list[tuple[str, int, int]] = field(default_factory=list)  # (name, start, end)
    data_end: int = 0  # end of the last block or of the metadata, whichever is later (sector-rounded)
    blocks_ok: bool = False  # the BAT was read and every entry checked
    locators: list[tuple[int, ParentLocator]] = field(default_factory=list)
    locator_data: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (offset, length) -> bytes
    # Blocks holding data under clear sector-bitmap bits: (block index, file offset of the block, sectors), all
    # of them (the findings list only the first MAX_FINDINGS_PER_CODE); repair --set-bitmap-bits works from it.
    clear_data: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def is_differencing(self) -> bool:
        return self.disk_type == DiskType.DIFFERENCING

    @property
    def is_dynamic_layout(self) -> bool:
        return self.disk_type in (DiskType.DYNAMIC, DiskType.DIFFERENCING)

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}


class _Collector:
    def __init__(self, a: FileAnalysis) -> None:
        self.a = a
        self.counts: dict[str, int] = {}
        self.unlisted: dict[str, int] = {}  # hits counted by ``room`` but never passed to ``add``

    def add(self, code: str, offset: int | None, field_: str | None, message: str, *, repairable: bool = False,
            severity: str | None = None, count: int | None = None) -> None:
        n = self.counts.get(code, 0) + 1
        self.counts[code] = n
        if n > MAX_FINDINGS_PER_CODE:
            return
        self.a.findings.append(Finding(code, severity or CODES[code][0], offset, field_, message, self.a.path,
                                       repairable, count))

    def room(self, code: str, hits: np.ndarray) -> np.ndarray:
        """The hits still worth a finding of their own; the rest are only counted (no per-entry Python loop
        over a hostile BAT of millions of entries)."""
        left = max(0, MAX_FINDINGS_PER_CODE - self.counts.get(code, 0))
        if len(hits) > left:
            self.unlisted[code] = self.unlisted.get(code, 0) + len(hits) - left
        return hits[:left]

    def finish(self) -> None:
        for code, n in self.counts.items():
            more = n - MAX_FINDINGS_PER_CODE + self.unlisted.get(code, 0) if n > MAX_FINDINGS_PER_CODE else \
                self.unlisted.get(code, 0)
            if more > 0:
                self.a.findings.append(Finding("TOO_MANY_FINDINGS", INFO, None, None,
                                               f"{more} more {code} findings not listed", self.a.path))


def analyse_file(path: str, *, time_slack: int = DEFAULT_TIME_SLACK, now: int | None = None,
                 probe_lock: bool = True) -> FileAnalysis:
    """Every structural finding about one file (no parent resolution). Raises only when the file cannot be
    read at all (OSError) or is not a regular file (InvalidFormatError, field "file")."""
    f = _File(path)
    try:
        a = FileAnalysis(path, f.size, f.identity, f.mtime)
        c = _Collector(a)
        if probe_lock and f.writer_active():
            c.add("FILE_IN_USE", None, "lock", "another process has this file open for writing")
        _analyse(f, a, c, vhd_timestamp() + time_slack if now is None else now + time_slack)
        c.finish()
        return a
    finally:
        f.close()


def _analyse(f: _File, a: FileAnalysis, c: _Collector, future: int) -> None:
    size = f.size
    if size < FOOTER_SIZE - 1:
        c.add("FILE_TOO_SMALL", 0, "file size", f"the file is {size} bytes long; a VHD footer alone takes 512")
        return
    if f.read(0, 8) == b"vhdxfile":
        c.add("VHDX_FILE", 0, "signature", "the file starts with the VHDX signature 'vhdxfile'")
        return
    # The footer at the end, then the legacy 511-byte footer.
    end = None
    if size >= FOOTER_SIZE:
        end = RawFooter.parse(f.read(size - FOOTER_SIZE, FOOTER_SIZE), size - FOOTER_SIZE)
        if not end.cookie_ok:
            end = None
    if end is None:
        legacy = RawFooter.parse(f.read(size - FOOTER_SIZE + 1, FOOTER_SIZE - 1), size - FOOTER_SIZE + 1)
        if legacy.cookie_ok:
            end = legacy
            a.footer_source = "legacy"
            c.add("FOOTER_LEGACY", end.offset, "footer", "the footer is the 511-byte form of Virtual PC before 2004")
    a.end_footer = end
    if end is not None:
        a.footer_offset = end.offset
        a.footer_source = a.footer_source or "end"
    copy = RawFooter.parse(f.read(0, FOOTER_SIZE), 0) if size >= FOOTER_SIZE else None
    if copy is not None and not copy.cookie_ok:
        copy = None
    a.copy = copy

    # Which footer to trust for the layout: the end one when sound, else the copy at 0 (dynamic layouts only).
    copy_usable = (copy is not None and copy.valid
                   and copy.fields.disk_type in (DiskType.DYNAMIC, DiskType.DIFFERENCING)
                   and version_supported(copy.fields.format_version))
    if end is not None and (end.checksum_ok or not copy_usable):
        trusted = end
    elif copy_usable:
        trusted = copy
    else:
        trusted = None
    if end is not None and not end.checksum_ok:
        c.add("FOOTER_CHECKSUM", end.offset + FOOTER.offset("checksum"), FOOTER.field("checksum"),
              f"stored 0x{end.stored_checksum:08x}, computed 0x{end.computed_checksum:08x}"
              + ("; the copy at offset 0 is intact and 'vhdcore repair' restores the footer from it"
                 if copy_usable else ""), repairable=True)
    if trusted is None:
        trusted = _find_fixed_footer(f)
        if trusted is None:
            c.add("FOOTER_MISSING", max(0, size - FOOTER_SIZE), "footer",
                  "no VHD footer at the end of the file and no usable copy at offset 0: this is not a VHD, or "
                  "both copies are damaged")
            return
        a.footer_offset = trusted.offset
        a.footer_source = "displaced"
        c.add("FILE_TRAILING_DATA", trusted.offset + FOOTER_SIZE, "file size",
              f"{size - trusted.offset - FOOTER_SIZE} bytes follow the footer of this fixed disk at "
              f"{trusted.offset}", repairable=True)
    a.footer = trusted
    if not _check_footer_fields(trusted, a, c, future):
        return
    a.disk_type = trusted.fields.disk_type
    a.size = trusted.fields.current_size

    if a.disk_type == DiskType.FIXED:
        _check_fixed(f, a, c)
        return
    _check_dynamic(f, a, c, future)


def _check_footer_fields(ft: RawFooter, a: FileAnalysis, c: _Collector, future: int) -> bool:
    """Field checks of the trusted footer; False when the rest of the file cannot be interpreted."""
    o = ft.offset
    ok = True
    for p in R.footer_problems(ft.fields, future=future):
        at = o + p.offset
        if p.kind == R.FOOTER_VERSION:
            c.add("FOOTER_VERSION", at, p.field, f"version 0x{p.value:08x}, expected 0x00010000")
            return False
        if p.kind == R.DISK_TYPE:
            c.add("FOOTER_DISK_TYPE", at, p.field, f"disk type {p.value}")
            return False
        if p.kind == R.FEATURES:
            c.add("FOOTER_FEATURES", at, p.field, f"features 0x{p.value:08x}")
        elif p.kind == R.TIMESTAMP_FUTURE:
            c.add("FOOTER_TIMESTAMP_FUTURE", at, p.field, f"timestamp {p.value} is {_when(p.value)}")
        elif p.kind == R.VIRTUAL_SIZE:
            c.add("FOOTER_SIZE", at, p.field, f"current size {p.value}")
            ok = False
        elif p.kind == R.OVER_FORMAT_LIMIT:
            c.add("FOOTER_SIZE_LIMIT", at, p.field, f"current size {p.value} is over 2040 GiB")
        elif p.kind == R.GEOMETRY:
            geo, size = p.value, ft.fields.current_size
            c.add("FOOTER_GEOMETRY", at, p.field, f"C/H/S {geo.cylinders}/{geo.heads}/{geo.sectors_per_track} "
                  f"({geo.size} bytes) for a disk of {size}")
        elif p.kind == R.GEOMETRY_TOO_LARGE:
            geo, size = p.value, ft.fields.current_size
            want = libvhd_chs(size)
            c.add("FOOTER_GEOMETRY_TOO_LARGE", at, p.field,
                  f"C/H/S {geo.cylinders}/{geo.heads}/{geo.sectors_per_track} is larger than the specification's "
                  f"{want.cylinders}/{want.heads}/{want.sectors_per_track} for a disk of {size} bytes")
        elif p.kind == R.SAVED_STATE:
            c.add("FOOTER_SAVED_STATE", at, p.field, f"saved state {p.value}")
        elif p.kind == R.UNIQUE_ID_ZERO:
            c.add("FOOTER_UNIQUE_ID", at, p.field, "unique id is all zeros")
        elif p.kind == R.FIXED_DATA_OFFSET:
            c.add("FOOTER_DATA_OFFSET", at, p.field, f"data offset 0x{p.value:x}")
    return ok


def _when(ts: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(VHD_EPOCH + ts))
    except (OverflowError, OSError, ValueError):
        return "out of range"


def _check_fixed(f: _File, a: FileAnalysis, c: _Collector) -> None:
    size = a.size
    end = a.footer
    if end.offset < size:
        c.add("FILE_TRUNCATED", end.offset, "file size",
              f"a fixed disk of {size} bytes needs a file of {size + FOOTER_SIZE} bytes, this one has {f.size}")
    elif end.offset > size:
        c.add("FILE_LENGTH", size, "file size",
              f"{end.offset - size} bytes lie between the disk's data and the footer (the file is longer than a "
              f"fixed disk of {size} bytes)")
    a.data_end = min(end.offset, size)


# A fixed disk has no copy of its footer; one displaced by appended bytes is looked for this far from the end.
FIXED_FOOTER_SEARCH_BYTES = 64 * 1024 * 1024
_MAX_FOOTER_CANDIDATES = 4096


def _find_fixed_footer(f: _File) -> RawFooter | None:
    """A valid fixed-disk footer at a sector-aligned offset equal to its own current size, in the last
    FIXED_FOOTER_SEARCH_BYTES of the file (followed by appended bytes)."""
    if f.size < FOOTER_SIZE + 1:
        return None
    lo = max(0, f.size - FIXED_FOOTER_SEARCH_BYTES)
    lo -= lo % SECTOR_SIZE
    pos = lo
    candidates = 0
    while pos + FOOTER_SIZE < f.size and candidates < _MAX_FOOTER_CANDIDATES:
        chunk = f.read(pos, _SEARCH_CHUNK)
        k = chunk.find(FOOTER_COOKIE)
        while k >= 0 and candidates < _MAX_FOOTER_CANDIDATES:
            off = pos + k
            if off % SECTOR_SIZE == 0 and off + FOOTER_SIZE < f.size:
                candidates += 1
                cand = RawFooter.parse(f.read(off, FOOTER_SIZE), off)
                if cand.valid and cand.fields.disk_type == DiskType.FIXED and cand.fields.current_size == off:
                    return cand
            k = chunk.find(FOOTER_COOKIE, k + 1)
        pos += _SEARCH_CHUNK
    return None


def _check_dynamic(f: _File, a: FileAnalysis, c: _Collector, future: int) -> None:
    ft = a.footer
    fsize = f.size
    copy = a.copy
    # The copy at offset 0 against the footer at the end.
    end = a.end_footer
    if end is not None and end.checksum_ok:
        if copy is None:
            c.add("FOOTER_COPY_MISSING", 0, "footer copy", "offset 0 does not hold a copy of the footer",
                  repairable=True)
        elif not copy.checksum_ok:
            c.add("FOOTER_COPY_CHECKSUM", FOOTER.offset("checksum"), "footer copy.checksum",
                  f"stored 0x{copy.stored_checksum:08x}, computed 0x{copy.computed_checksum:08x}", repairable=True)
        elif copy.raw[: FOOTER_SIZE - 1] != end.raw[: FOOTER_SIZE - 1]:
            c.add("FOOTER_COPY_MISMATCH", 0, "footer copy",
                  "fields that differ: " + ", ".join(differing_footer_fields(copy, end)), repairable=True)

    hoff = ft.fields.data_offset
    bad_offset = R.header_offset_problems(hoff, fsize)
    if bad_offset:
        c.add("HEADER_OFFSET", ft.offset + bad_offset[0].offset, bad_offset[0].field,
              f"data offset 0x{hoff:x} does not leave room for a 1024-byte header inside the {fsize}-byte file")
        _finish_footer_position(f, a, c)
        return
    a.header_offset = hoff
    raw = f.read(hoff, HEADER_SIZE)
    a.header_raw = raw
    h = HEADER.unpack(raw)
    if h.cookie != HEADER_COOKIE:
        c.add("HEADER_COOKIE", hoff, HEADER.field("cookie"), f"cookie {h.cookie!r}")
        _finish_footer_position(f, a, c)
        return
    fields_ok = True
    computed = HEADER.checksum(raw)
    if computed != h.checksum:
        c.add("HEADER_CHECKSUM", hoff + HEADER.offset("checksum"), HEADER.field("checksum"),
              f"stored 0x{h.checksum:08x}, computed 0x{computed:08x}", repairable=True)
    for p in R.header_field_problems(h):
        if p.kind == R.HEADER_VERSION:
            c.add("HEADER_VERSION", hoff + p.offset, p.field, f"version 0x{p.value:08x}")
            fields_ok = False
        elif p.kind == R.HEADER_DATA_OFFSET:
            c.add("HEADER_DATA_OFFSET", hoff + p.offset, p.field, f"data offset 0x{p.value:x}")
    header = DynamicHeader.from_fields(h) if version_supported(h.header_version) else None
    a.header = header
    # The dynamic header is metadata from here on, whatever else is wrong.
    a.metadata = R.header_regions(hoff)

    block_size, mte, table_off = h.block_size, h.max_table_entries, h.table_offset
    bad_block = R.block_size_problem(block_size)
    block_ok = bad_block is None
    if not block_ok:
        c.add("HEADER_BLOCK_SIZE", hoff + bad_block.offset, bad_block.field, f"block size {block_size}")
        fields_ok = False
    mte_ok = True
    if block_ok:
        needed = R.entries_needed(a.size, block_size)
        bad_mte = R.table_entries_problem(mte, a.size, block_size)
        # Every table-size problem is one finding on the max table entries (Image names the block size when the
        # BAT is over vhdcore's limit).
        at, fld = hoff + HEADER.offset("max_table_entries"), HEADER.field("max_table_entries")
        if bad_mte is not None and bad_mte.kind == R.TOO_FEW_ENTRIES:
            c.add("HEADER_MAX_TABLE_ENTRIES", at, fld,
                  f"{mte} entries, a disk of {a.size} bytes with {block_size}-byte blocks needs {needed}")
            fields_ok = mte_ok = False
        elif bad_mte is not None:
            c.add("HEADER_MAX_TABLE_ENTRIES", at, fld,
                  f"{mte} entries where the disk needs {needed} (at most {R.MAX_BAT_ENTRIES} are accepted)")
            fields_ok = mte_ok = False
    bat_bytes = mte * 4
    bat_end = table_off + R.table_bytes(mte)
    table_ok = True
    bad_table = {p.kind: p for p in R.table_offset_problems(table_off, mte, hoff, fsize)}
    if R.TABLE_UNALIGNED in bad_table:
        p = bad_table[R.TABLE_UNALIGNED]
        c.add("HEADER_TABLE_OFFSET", hoff + p.offset, p.field, f"table offset {table_off} is not sector-aligned")
        fields_ok = table_ok = False
    elif R.TABLE_OVER_METADATA in bad_table:
        p = bad_table[R.TABLE_OVER_METADATA]
        c.add("HEADER_TABLE_OFFSET", hoff + p.offset, p.field,
              f"the BAT at {table_off}..{bat_end} overlaps the footer copy or the dynamic header at {hoff}")
        fields_ok = table_ok = False
    if mte_ok and table_ok and R.BAT_PAST_EOF in bad_table:
        p = bad_table[R.BAT_PAST_EOF]
        c.add("BAT_OUTSIDE_FILE", hoff + p.offset, p.field,
              f"the BAT of {mte} entries at {table_off} ends at {table_off + bat_bytes}, past the end of the "
              f"{fsize}-byte file")
        fields_ok = table_ok = False
    if table_ok and table_off >= FOOTER_SIZE:
        a.metadata.append(R.bat_region(table_off, mte))

    if header is not None and a.disk_type == DiskType.DIFFERENCING:
        for p in R.parent_field_problems(h, future=future):
            at = hoff + p.offset
            if p.kind == R.PARENT_ID_ZERO:
                c.add("HEADER_PARENT_ID", at, p.field, "parent unique id is all zeros")
            elif p.kind == R.PARENT_TIMESTAMP_FUTURE:
                c.add("HEADER_PARENT_TIMESTAMP_FUTURE", at, p.field, f"parent timestamp {p.value} is {_when(p.value)}")
            elif p.kind == R.PARENT_NAME:
                c.add("HEADER_PARENT_NAME", at, p.field,
                      "the parent's unicode name is empty or not valid UTF-16 big-endian")
        _check_locators(f, a, c, header, hoff)
        _check_parent_name_vs_locators(a, c, h.parent_unicode_name, hoff)

    # blktap's batmap, kept in the sectors right after the BAT.
    bm_at = R.batmap_header_offset(ft.fields.creator_app, bat_end, fsize) if table_ok else None
    bm = BatmapHeader.parse(f.read(bm_at, SECTOR_SIZE)) if bm_at is not None else None
    if bm is not None:
        a.metadata += R.batmap_regions(bm_at, bm, fsize)
        if bm.batmap_offset < bat_end or bm.end > fsize:
            c.add("BATMAP_OUTSIDE_FILE", bat_end + BATMAP.offset("batmap_offset"), BATMAP.field("batmap_offset"),
                  f"batmap at {bm.batmap_offset} of {bm.batmap_size} sectors")
        if bm.end <= fsize:
            _check_batmap(f, c, bm, bat_end)

    a.header_fields_ok = fields_ok
    a.block_size = block_size if block_ok else 0
    a.data_end = R.metadata_end(a.metadata)
    if block_ok and mte_ok and table_ok:
        _check_bat(f, a, c, table_off, mte, block_size)
    _finish_footer_position(f, a, c)


# libvhd's batmap versions: 1.1 summed the map's bytes as signed chars, 1.2 (current) as unsigned ones.
_BATMAP_V1_1 = 0x00010001
_BATMAP_NEWEST = 0x00010002
_BATMAP_READ = 1024 * 1024


def _check_batmap(f: _File, c: _Collector, bm: BatmapHeader, hdr_off: int) -> None:
    """The batmap's version and its checksum: the one's complement of the byte sum of its map sectors."""
    if bm.batmap_version > _BATMAP_NEWEST:
        c.add("BATMAP_VERSION", hdr_off + BATMAP.offset("batmap_version"), BATMAP.field("batmap_version"),
              f"0x{bm.batmap_version:08x}")
        return
    signed = bm.batmap_version == _BATMAP_V1_1
    total = 0
    pos, end = bm.batmap_offset, bm.end  # inside the file: the caller checked
    while pos < end:
        piece = f.read(pos, min(_BATMAP_READ, end - pos))
        if not piece:
            break
        total += int(np.frombuffer(piece, dtype=np.int8 if signed else np.uint8).sum(dtype=np.int64))
        pos += len(piece)
    want = ~total & 0xFFFFFFFF
    if want != bm.checksum:
        c.add("BATMAP_CHECKSUM", hdr_off + BATMAP.offset("checksum"), BATMAP.field("checksum"),
              f"recorded 0x{bm.checksum:08x}, the map sums to 0x{want:08x}")


def _check_locators(f: _File, a: FileAnalysis, c: _Collector, header: DynamicHeader, hoff: int) -> None:
    fsize = f.size
    placed: list[tuple[int, int, int]] = []  # (slot, start, end)
    regions: list[R.Region] = []
    for i, loc in enumerate(header.parent_locators[:LOCATOR_SLOTS]):
        if not loc.is_used:
            continue
        o = hoff + locator_entry_offset(i)
        o_data = o + LOCATOR.offset("data_offset")  # where most locator findings point
        fld = f"header.parent_locator[{i}]"
        space = loc.data_space_bytes
        start = loc.data_offset
        region = R.locator_region(i, loc, fsize)
        if region is not None:
            for name, ms, me in a.metadata:
                if start < me and start + space > ms:
                    c.add("LOCATOR_OVERLAP", o_data, fld + ".data_offset",
                          f"data at {start}..{start + space} overlaps the {name} at {ms}..{me}")
            for j, s2, e2 in placed:
                if start < e2 and start + space > s2:
                    c.add("LOCATOR_OVERLAP", o_data, fld + ".data_offset",
                          f"data at {start}..{start + space} overlaps parent locator {j} at {s2}..{e2}")
            placed.append((i, start, start + space))
            regions.append(region)
        if loc.platform_code not in _LOCATOR_ORDER:
            c.add("LOCATOR_PLATFORM", o, fld + ".platform_code", f"platform code {loc.platform_code!r}")
            continue
        a.locators.append((i, loc))
        if loc.data_length <= 0 or loc.data_length > space or loc.data_length > MAX_LOCATOR_BYTES:
            c.add("LOCATOR_LENGTH", o + LOCATOR.offset("data_length"), fld + ".data_length",
                  f"data length {loc.data_length} with data space {space} bytes")
        if start % SECTOR_SIZE:
            c.add("LOCATOR_ALIGNMENT", o_data, fld + ".data_offset", f"data offset {start}")
        stop = start + max(space, loc.data_length)
        if start <= 0 or stop > fsize or space > MAX_LOCATOR_BYTES:
            c.add("LOCATOR_OUTSIDE_FILE", o_data, fld + ".data_offset",
                  f"data at {start}..{stop} is outside the {fsize}-byte file or absurdly large")
            continue
        if 0 < loc.data_length <= min(space, MAX_LOCATOR_BYTES):
            data = f.read(loc.data_offset, loc.data_length)
            a.locator_data[(loc.data_offset, loc.data_length)] = data
            text = loc.decode_path(data)
            undecodable = text is None and loc.platform_code != b"Mac "  # a Mac alias holds no path
            if undecodable or (text is not None and not text.strip("\0 ")) or (text and "\0" in text):
                c.add("LOCATOR_PATH", o, fld, f"{loc.platform_code.decode('latin-1')} data does not decode "
                      "to a path")
    a.metadata += regions


def _libvhd_path(text: str) -> str:
    """A name as libvhd decodes a Windows one: up to the first NUL, backslashes as '/', a leading C: dropped."""
    text = text.split("\0", 1)[0].replace("\\", "/")
    return text[2:] if text[:2] in ("C:", "c:") else text


def _posix_basename(path: str) -> str:
    """POSIX basename(3), as libvhd's check calls it: trailing slashes ignored."""
    stripped = path.rstrip("/")
    if not stripped:
        return "/" if path else "."
    return stripped.rsplit("/", 1)[-1]


def _check_parent_name_vs_locators(a: FileAnalysis, c: _Collector, pname_raw: bytes, hoff: int) -> None:
    """libvhd's check: the parent's unicode name must equal the file name of every MacX, W2ku and W2ru locator."""
    try:
        pname = _libvhd_path(pname_raw.decode("utf-16-be"))
    except UnicodeDecodeError:
        return  # HEADER_PARENT_NAME says so
    if not pname.isascii():
        c.add("PARENT_NAME_LOCATOR_MISMATCH", hoff + HEADER.offset("parent_unicode_name"),
              HEADER.field("parent_unicode_name"),
              f"the parent name {pname!r} is not ASCII: libvhd cannot decode it and rejects the disk")
        return
    for slot, loc in a.locators:
        data = a.locator_data.get((loc.data_offset, loc.data_length))
        if data is None:
            continue
        if loc.platform_code == b"MacX":
            try:
                text = data.decode("utf-8").split("\0", 1)[0]
            except UnicodeDecodeError:
                continue
            if not text.startswith("file://"):
                continue
            path = text[len("file://"):]
        elif loc.platform_code in (b"W2ku", b"W2ru"):
            try:
                path = _libvhd_path(data.decode("utf-16-le"))
            except UnicodeDecodeError:
                continue
        else:
            continue  # libvhd's check reads only these three
        name = _posix_basename(path)
        if name != pname:
            c.add("PARENT_NAME_LOCATOR_MISMATCH", hoff + locator_entry_offset(slot), f"header.parent_locator[{slot}]",
                  f"{loc.platform_code.decode('latin-1')} locator names {name!r}, the parent unicode name (as "
                  f"libvhd reads it) is {pname!r}")


def _check_bat(f: _File, a: FileAnalysis, c: _Collector, table_off: int, mte: int, block_size: int) -> None:
    raw = f.read(table_off, mte * 4)
    bat = np.frombuffer(raw, dtype=">u4").astype(np.uint32)
    a.bat = bat
    # A trusted end footer bounds the data; without one (torn footer) the file's end does.
    limit = a.footer_offset if a.footer_source in ("end", "legacy") else f.size
    placed = R.BlockPlacement(bat, bitmap_bytes(block_size) + block_size, limit, a.metadata)
    idx, starts, ends = placed.entries, placed.starts, placed.ends

    def entry(k: int) -> tuple[int, str, int, int, int]:
        i = int(idx[k])
        return i, f"bat[{i}]", table_off + 4 * i, int(starts[k]), int(ends[k])

    for k in c.room("BAT_ENTRY_PAST_EOF", np.flatnonzero(placed.past_end)):
        i, fld, off, s, e = entry(int(k))
        c.add("BAT_ENTRY_PAST_EOF", off, fld, f"block {i} at {s}..{e} ends past {limit}"
              f" ({'the footer' if limit != f.size else 'the end of the file'})")
    for (name, ms, me), mask in placed.in_metadata:
        for k in c.room("BAT_ENTRY_IN_METADATA", np.flatnonzero(mask)):
            i, fld, off, s, e = entry(int(k))
            c.add("BAT_ENTRY_IN_METADATA", off, fld, f"block {i} at {s}..{e} overlaps the {name} at {ms}..{me}")
    front = placed.front
    for k in c.room("BAT_ENTRY_BEFORE_METADATA", np.flatnonzero(placed.before_metadata)):
        i, fld, off, s, e = entry(int(k))
        c.add("BAT_ENTRY_BEFORE_METADATA", off, fld, f"block {i} at {s}..{e} lies before the {front.name}, "
              f"which ends at {front.end}")
    earlier, later = placed.overlaps
    for k in c.room("BAT_ENTRY_OVERLAP", np.arange(len(later))):
        first = int(idx[earlier[k]])
        second, fld, off, s, e = entry(int(later[k]))
        c.add("BAT_ENTRY_OVERLAP", off, fld, f"block {second} at {s}..{e} overlaps block {first} at "
              f"{int(starts[earlier[k]])}..{int(ends[earlier[k]])}")
    if placed.allocated:
        a.data_end = max(a.data_end, placed.blocks_end)
    a.blocks_ok = True
    # Only blocks wholly inside the data and clear of metadata and of each other: then every data byte is read
    # at most once and the scan costs no more than the allocated blocks.
    sound = placed.own_bytes
    _check_bitmaps(f, a, c, idx[sound], starts[sound], block_size)


# Data read per piece when looking for data under clear bits: 8192 sectors (a whole number of bitmap bytes).
_SCAN_SECTORS = 8192


def data_under_clear_bits(read, bitmap: bytes, data_offset: int, sectors: int) -> tuple[int, int, bytearray]:
    """Sectors of a block's data that hold a non-zero byte while their bitmap bit is clear.

    ``read(offset, n)`` reads the file; ``bitmap`` is the block's sector bitmap, ``data_offset`` the file offset
    of its first data sector, ``sectors`` how many of its sectors lie inside the virtual disk. Returns (how many,
    index of the first, or -1, and the bitmap with those sectors' bits set). Only pieces of the block with a
    clear bit are read.
    """
    fixed = bytearray(bitmap)
    count, first = 0, -1
    for s0 in range(0, sectors, _SCAN_SECTORS):
        n = min(_SCAN_SECTORS, sectors - s0)
        if K.bitmap_count(fixed, s0, s0 + n) == n:
            continue
        data = read(data_offset + s0 * SECTOR_SIZE, n * SECTOR_SIZE)
        if len(data) != n * SECTOR_SIZE:
            break  # the file ends inside the block: its BAT entry is reported elsewhere
        nbytes = (n + 7) // 8
        zero = bytearray(nbytes)
        K.sector_zero_mask(data, zero)
        # written := sectors holding data (~zero), then those whose bit is clear: written & ~bitmap.
        written = bytearray(b"\xff" * nbytes)
        K.bitmap_andnot(written, zero)
        if n % 8:
            K.bitmap_set_range(written, n, nbytes * 8, False)
        hidden = bytearray(written)
        K.bitmap_andnot(hidden, fixed[s0 // 8 : s0 // 8 + nbytes])
        k = K.bitmap_count(hidden, 0, n)
        if k:
            if first < 0:
                first = s0 + next(r0 for r0, _len, on in K.bitmap_runs(hidden, 0, n) if on)
            count += k
            piece = fixed[s0 // 8 : s0 // 8 + nbytes]
            K.bitmap_or(piece, written)
            fixed[s0 // 8 : s0 // 8 + nbytes] = piece
    return count, first, fixed


def _check_bitmaps(f: _File, a: FileAnalysis, c: _Collector, blocks: np.ndarray, starts: np.ndarray,
                   block_size: int) -> None:
    """BITMAP_CLEAR_DATA: allocated sectors that hold data their clear bit hides (libvhd's ``check -b``, with
    every byte of the sector tested, not just up to the first non-zero one)."""
    if not len(blocks):
        return
    bm_bytes = bitmap_bytes(block_size)
    spb = block_size // SECTOR_SIZE
    for k in np.argsort(starts, kind="stable"):  # in file order: sequential reads
        i, start = int(blocks[k]), int(starts[k])
        sectors = min(spb, (a.size - i * block_size) // SECTOR_SIZE)
        if sectors <= 0:
            continue
        bitmap = f.read(start, bm_bytes)
        if len(bitmap) != bm_bytes:
            continue
        if K.bitmap_count(bitmap, 0, sectors) == sectors:
            continue
        n, first, _fixed = data_under_clear_bits(f.read, bitmap, start + bm_bytes, sectors)
        if n:
            a.clear_data.append((i, start, n))
            c.add("BITMAP_CLEAR_DATA", start + bm_bytes + first * SECTOR_SIZE, f"bitmap[block {i}]",
                  f"{n} sector(s) of block {i} hold data under a clear bit, the first at disk sector "
                  f"{i * spb + first}", repairable=True, count=n)


def _finish_footer_position(f: _File, a: FileAnalysis, c: _Collector) -> None:
    """Where the footer is against where the data ends: missing, displaced by trailing bytes, or after a gap."""
    fsize = f.size
    if a.footer_source in ("end", "legacy") and a.end_footer is not None and a.end_footer.checksum_ok:
        if a.data_end and a.blocks_ok and a.footer_offset > a.data_end:
            c.add("FILE_UNUSED_SPACE", a.data_end, "file size",
                  f"{a.footer_offset - a.data_end} bytes between the end of the data at {a.data_end} and the "
                  f"footer at {a.footer_offset}")
        if a.footer_source == "end" and fsize % SECTOR_SIZE:
            c.add("FILE_LENGTH", fsize, "file size", f"file length {fsize} is not a multiple of 512")
        return
    # The end holds no sound footer: a displaced one (bytes appended after it) or a torn one.
    copy = a.copy
    if copy is not None and copy.valid and a.data_end:
        found = _find_displaced_footer(f, a.data_end, copy.raw)
        if found >= 0:
            a.footer_offset = found
            a.footer_source = "displaced"
            a.footer = RawFooter.parse(copy.raw, found)
            c.add("FILE_TRAILING_DATA", found + FOOTER_SIZE, "file size",
                  f"{fsize - found - FOOTER_SIZE} bytes follow the footer at {found}", repairable=True)
            return
    if a.end_footer is None:
        a.footer_source = "copy" if a.footer is a.copy else ""
        # Repair needs the copy and a BAT it can trust to know where the data ends.
        fixable = a.footer is a.copy and a.blocks_ok and not any(x.code.startswith("BAT_") for x in a.findings)
        c.add("FOOTER_MISSING", max(0, fsize - FOOTER_SIZE), "footer",
              "no valid footer at the end of the file" + ("; the copy at offset 0 is intact and 'vhdcore repair' "
                                                          "restores the footer from it" if fixable else ""),
              repairable=fixable)
    else:
        a.footer_source = "copy" if a.footer is a.copy else a.footer_source


def _find_displaced_footer(f: _File, start: int, footer_raw: bytes) -> int:
    """Offset of the first sector-aligned exact copy of ``footer_raw`` at or after ``start`` (bounded search)."""
    start = round_up(start, SECTOR_SIZE)
    stop = min(f.size, start + FOOTER_SEARCH_BYTES)
    pos = start
    while pos + FOOTER_SIZE <= stop:
        chunk = f.read(pos, min(_SEARCH_CHUNK + FOOTER_SIZE, stop - pos))
        k = chunk.find(footer_raw)
        while k >= 0:
            if (pos + k) % SECTOR_SIZE == 0 and pos + k + FOOTER_SIZE < f.size:
                return pos + k
            k = chunk.find(footer_raw, k + 1)
        pos += _SEARCH_CHUNK
    return -1


# --------------------------------------------------------------------------------------------- chains


class _ParentProbe:
    """What ``chain.resolve_parent`` needs of a child, built from a FileAnalysis instead of an Image (which
    may refuse the damaged file being checked)."""

    def __init__(self, a: FileAnalysis) -> None:
        self.path = a.path
        self.header = a.header
        self.footer = a.footer.as_footer()
        self.disk_type = DiskType.DIFFERENCING
        self.parent_locators = [loc for _, loc in a.locators]
        self.file_size = a.file_size
        self.warnings: list[str] = []
        self._data = a.locator_data

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def parent_candidates(self) -> list[tuple[str, str]]:
        return locators.parent_candidates(self.parent_locators, self.header.parent_unicode_name,
                                          lambda loc: locators.read(loc, self.file_size, self.pread), self._warn)

    def pread(self, offset: int, n: int) -> bytes:
        # Only locator data is read, and the analysis already read every in-bounds locator.
        data = self._data.get((offset, n))
        if data is None or len(data) != n:
            raise InvalidFormatError("file ends inside a parent locator", path=self.path, offset=offset,
                                     field="parent locator")
        return data


def _resolve(a: FileAnalysis, allowed: Sequence[str]) -> tuple[str | None, Finding | None]:
    from ..disk.chain import resolve_parent

    hoff = a.header_offset
    try:
        return resolve_parent(_ParentProbe(a), allowed), None
    except ParentMismatchError as e:
        return None, Finding("PARENT_MISMATCH", ERROR, e.offset, e.field, e.message, a.path)
    except ParentNotFoundError as e:
        tried = "; ".join(e.tried) if e.tried else "no locator or parent name gave a path"
        return None, Finding("PARENT_NOT_FOUND", ERROR, hoff + HEADER.offset("parent_unicode_name"),
                             HEADER.field("parent_unicode_name"),
                             f"parent {a.header.parent_unicode_name!r} not found (tried: {tried})", a.path)
    except ChainCycleError as e:
        return None, Finding("CHAIN_CYCLE", ERROR, e.offset, e.field, e.message, a.path)
    except VHDError as e:
        return None, Finding("PARENT_NOT_FOUND", ERROR, e.offset, e.field, str(e), a.path)


def check(path: str | os.PathLike[str], chain: bool = False, parent_dirs: Sequence[str | os.PathLike[str]] | None
          = None, *, time_slack: int = DEFAULT_TIME_SLACK) -> CheckReport:
    """Check ``path`` (and with ``chain=True`` every layer of its chain in full).

    Without ``chain`` the leaf gets every check and its parents only the chain checks (found in the allowed
    directories, unique id, timestamp, no cycle, bounded depth). Raises OSError or InvalidFormatError (field
    "file") only when ``path`` itself cannot be read as a regular file: the "could not check" case.
    """
    from ..disk.chain import MAX_CHAIN_DEPTH

    path = os.fspath(path)
    report = CheckReport(path, chain=chain)
    allowed = [os.path.dirname(os.path.realpath(path))]
    allowed += [os.path.realpath(os.fspath(d)) for d in (parent_dirs or ())]
    a = analyse_file(path, time_slack=time_slack)
    seen = {a.identity}
    depth = 0
    while True:
        report.layers.append(a.path)
        if depth == 0 or chain:
            report.findings.extend(a.findings)
        if not a.is_differencing or a.header is None or a.footer is None:
            break
        if depth + 1 >= MAX_CHAIN_DEPTH:
            report.findings.append(Finding("CHAIN_TOO_DEEP", ERROR, None, "chain depth",
                                           f"the chain has more than {MAX_CHAIN_DEPTH} layers", path))
            break
        ppath, problem = _resolve(a, allowed)
        if problem is not None:
            report.findings.append(problem)
            break
        try:
            parent = analyse_file(ppath, time_slack=time_slack)
        except (OSError, VHDError) as e:
            report.findings.append(Finding("PARENT_NOT_FOUND", ERROR,
                                           a.header_offset + HEADER.offset("parent_unicode_name"),
                                           HEADER.field("parent_unicode_name"), f"parent {ppath} cannot be read: {e}",
                                           a.path))
            break
        if parent.identity in seen:
            report.findings.append(Finding("CHAIN_CYCLE", ERROR, a.header_offset + HEADER.offset("parent_unique_id"),
                                           HEADER.field("parent_unique_id"),
                                           f"the parent {ppath} is already in the chain", a.path))
            break
        seen.add(parent.identity)
        recorded = a.header.parent_timestamp
        if recorded and parent.footer is not None:
            mtime = vhd_timestamp(parent.mtime)
            if recorded not in (mtime, parent.footer.fields.timestamp):
                report.findings.append(Finding(
                    "PARENT_TIMESTAMP", WARNING, a.header_offset + HEADER.offset("parent_timestamp"),
                    HEADER.field("parent_timestamp"),
                    f"records {recorded} ({_when(recorded)}); the parent {ppath} was modified at {mtime} and its "
                    f"footer says {parent.footer.fields.timestamp}", a.path))
        a = parent
        depth += 1
    return report


def explain(code: str) -> str:
    return CODES[code][1]


__all__ = ["check", "CheckReport", "Finding", "FileAnalysis", "analyse_file", "CODES", "ERROR", "WARNING", "INFO"]

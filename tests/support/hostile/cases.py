"""Hand-made hostile files, each with the exact exception ``vhdcore.open`` must raise and the ``check`` findings
it must report.

A case's ``make(directory)`` writes its files and returns a ``Target``: the path to open, the directories to
allow for parents, and the expectations. Cases cover truncation at every structure boundary, empty and tiny
files, bad BATs (all 0xFF, all 0x00, past EOF, into metadata, overlapping), absurd header fields, parent locator
escapes (absolute paths, ``..``, symlinks, devices, FIFOs, embedded NUL), cycles and a 1000-deep chain.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Callable

from vhdcore.exceptions import (
    ChainCycleError,
    ChecksumError,
    CorruptImageError,
    InvalidFormatError,
    ParentMismatchError,
    ParentNotFoundError,
    UnsupportedFeatureError,
)
from vhdcore.format.structs import FOOTER_SIZE, DiskType

from . import build as B
from .build import KiB, MiB


@dataclass
class Target:
    path: Path
    error: type[BaseException] | None  # exact class vhdcore.open(path, parent_dirs=...) raises; None: it opens
    field: str | None = None  # the exception's .field
    findings: set[str] = dc_field(default_factory=set)  # codes check(path, chain=True) must report
    clean: bool = False  # check must report no error or warning
    parent_dirs: list[str] = dc_field(default_factory=list)
    refused: str | None = None  # text every ParentNotFoundError.tried entry about this path must contain
    outside: Path | None = None  # a directory nothing may be opened in
    repairs_to_clean: bool = False  # 'repair' must leave a clean file whose content is the original's
    content: dict[int, bytes] = dc_field(default_factory=dict)  # virtual offset -> bytes that must read back


@dataclass
class Case:
    name: str
    make: Callable[[Path], Target]


CASES: list[Case] = []


def case(name: str):
    def deco(fn: Callable[[Path], Target]) -> Callable[[Path], Target]:
        CASES.append(Case(name, fn))
        return fn
    return deco


# --------------------------------------------------------------------------------------------- the base file

BLOCK = 512 * KiB
ORDER = (2, 0, 5)  # file order of the blocks; bat[5] is the one furthest into the file


def base(d: Path, name: str = "disk.vhd") -> B.Layout:
    return B.build(d / name, size=4 * MiB, block_size=BLOCK, blocks=ORDER)


def block_probe(lay: B.Layout) -> dict[int, bytes]:
    return {b * BLOCK: B.block_content(b, BLOCK)[:1024] for b in ORDER}


# --------------------------------------------------------------------------------------------- truncation


def _truncation(point: str) -> Callable[[Path], Target]:
    def make(d: Path) -> Target:
        lay = base(d)
        p = lay.path
        cut = {
            "empty": 0, "1 byte": 1, "510 bytes": 510,
            "511 bytes (footer copy as legacy footer)": 511,
            "512 bytes (footer copy only)": 512,
            "inside the header": 1024,
            "after the header": 1536,
            "inside the BAT": 1536 + 16,
            "after the BAT": lay.bat_end,
            "inside the first block": lay.block_offsets[2] + 4096,
            "after the first block": lay.block_end(2),
            "inside the last block": lay.block_offsets[5] + 100_000,
            "after the last block (footer lost)": lay.footer_offset,
            "inside the footer (torn)": lay.footer_offset + 256,
            "footer's last byte (511-byte legacy footer)": lay.file_size - 1,
        }[point]
        B.truncate(lay, cut)
        if cut < FOOTER_SIZE - 1:
            return Target(p, CorruptImageError, "footer", {"FILE_TOO_SMALL"})
        if cut <= 1024:
            return Target(p, CorruptImageError, "footer.data_offset", {"HEADER_OFFSET"})
        if cut < lay.bat_end:
            return Target(p, CorruptImageError, "header.table_offset", {"BAT_OUTSIDE_FILE", "FOOTER_MISSING"})
        if cut < lay.footer_offset:
            return Target(p, CorruptImageError, "bat[5]", {"BAT_ENTRY_PAST_EOF", "FOOTER_MISSING"})
        if cut < lay.file_size - 1:
            # Read-only opens fall back to the copy at 0; repair restores the footer.
            return Target(p, None, None, {"FOOTER_MISSING"}, repairs_to_clean=True, content=block_probe(lay))
        return Target(p, None, None, {"FOOTER_LEGACY"}, clean=True, content=block_probe(lay))
    return make


for _p in ("empty", "1 byte", "510 bytes", "511 bytes (footer copy as legacy footer)", "512 bytes (footer copy only)",
           "inside the header", "after the header", "inside the BAT", "after the BAT", "inside the first block",
           "after the first block", "inside the last block", "after the last block (footer lost)",
           "inside the footer (torn)", "footer's last byte (511-byte legacy footer)"):
    CASES.append(Case(f"truncated {_p}", _truncation(_p)))


@case("fixed disk truncated")
def _fixed_truncated(d: Path) -> Target:
    lay = B.build(d / "fixed.vhd", size=1 * MiB, disk_type=DiskType.FIXED)
    B.patch_footer(lay, current_size=2 * MiB, original_size=2 * MiB)
    return Target(lay.path, CorruptImageError, "file size", {"FILE_TRUNCATED"})


@case("fixed disk with bytes after the footer")
def _fixed_trailing(d: Path) -> Target:
    lay = B.build(d / "fixed.vhd", size=1 * MiB, disk_type=DiskType.FIXED)
    with open(lay.path, "ab") as f:
        f.write(b"appended by a careless copy" * 100)
    # The end holds no footer and a fixed disk has no copy: opening fails, check finds the displaced footer.
    return Target(lay.path, InvalidFormatError, "footer.cookie", {"FILE_TRAILING_DATA"}, repairs_to_clean=True)


@case("dynamic disk with bytes after the footer")
def _dyn_trailing(d: Path) -> Target:
    lay = base(d)
    with open(lay.path, "ab") as f:
        f.write(os.urandom(3000))
    return Target(lay.path, None, None, {"FILE_TRAILING_DATA"}, repairs_to_clean=True, content=block_probe(lay))


# --------------------------------------------------------------------------------------------- footer and header


@case("VHDX file")
def _vhdx(d: Path) -> Target:
    p = d / "disk.vhdx"
    p.write_bytes(b"vhdxfile" + bytes(1 * MiB))
    return Target(p, UnsupportedFeatureError, "signature", {"VHDX_FILE"})


@case("random bytes")
def _random(d: Path) -> Target:
    p = d / "random.vhd"
    p.write_bytes(os.urandom(64 * KiB))
    return Target(p, InvalidFormatError, "footer.cookie", {"FOOTER_MISSING"})


@case("footer checksum wrong in both copies")
def _footer_csum(d: Path) -> Target:
    lay = base(d)
    B.patch_footer(lay, checksum=0x12345678)
    return Target(lay.path, ChecksumError, "footer.checksum", {"FOOTER_CHECKSUM"})


@case("footer checksum wrong at the end only")
def _footer_csum_end(d: Path) -> Target:
    lay = base(d)
    B.patch_footer(lay, which="end", checksum=0x12345678)
    # Read-only: the copy at 0 is used. Repair restores the end from it.
    return Target(lay.path, None, None, {"FOOTER_CHECKSUM"}, repairs_to_clean=True, content=block_probe(lay))


@case("footer copy differs")
def _copy_differs(d: Path) -> Target:
    lay = base(d)
    B.patch_footer(lay, which="copy", timestamp=B.TS + 1)
    return Target(lay.path, None, None, {"FOOTER_COPY_MISMATCH"}, repairs_to_clean=True, content=block_probe(lay))


@case("footer copy zeroed")
def _copy_zeroed(d: Path) -> Target:
    lay = base(d)
    buf = B.read(lay.path)
    buf[:FOOTER_SIZE] = bytes(FOOTER_SIZE)
    B.write(lay.path, buf)
    return Target(lay.path, None, None, {"FOOTER_COPY_MISSING"}, repairs_to_clean=True, content=block_probe(lay))


@case("unknown disk type")
def _disk_type(d: Path) -> Target:
    lay = base(d)
    B.patch_footer(lay, disk_type=5)
    return Target(lay.path, InvalidFormatError, "footer.disk_type", {"FOOTER_DISK_TYPE"})


@case("format version 2")
def _version(d: Path) -> Target:
    lay = base(d)
    B.patch_footer(lay, format_version=0x00020000)
    return Target(lay.path, InvalidFormatError, "footer.format_version", {"FOOTER_VERSION"})


@case("virtual size not a multiple of 512")
def _size_odd(d: Path) -> Target:
    lay = base(d)
    B.patch_footer(lay, current_size=4 * MiB + 1)
    return Target(lay.path, InvalidFormatError, "footer.current_size", {"FOOTER_SIZE"})


@case("virtual size 16 EiB")
def _size_huge(d: Path) -> Target:
    lay = base(d)
    B.patch_footer(lay, current_size=0xFFFFFFFFFFFFFE00)
    return Target(lay.path, InvalidFormatError, "footer.current_size", {"FOOTER_SIZE"})


@case("header offset past EOF")
def _hoff_eof(d: Path) -> Target:
    lay = base(d)
    B.patch_footer(lay, data_offset=1 << 40)
    return Target(lay.path, CorruptImageError, "footer.data_offset", {"HEADER_OFFSET"})


@case("header offset 0 (the footer copy)")
def _hoff_zero(d: Path) -> Target:
    lay = base(d)
    B.patch_footer(lay, data_offset=0)
    return Target(lay.path, InvalidFormatError, "header.cookie", {"HEADER_OFFSET"})


@case("header checksum wrong")
def _header_csum(d: Path) -> Target:
    lay = base(d)
    B.patch_header(lay, checksum=0xDEADBEEF)
    return Target(lay.path, ChecksumError, "header.checksum", {"HEADER_CHECKSUM"})


@case("block size 0")
def _bs0(d: Path) -> Target:
    lay = base(d)
    B.patch_header(lay, block_size=0)
    return Target(lay.path, InvalidFormatError, "header.block_size", {"HEADER_BLOCK_SIZE"})


@case("block size not a power of two")
def _bs3(d: Path) -> Target:
    lay = base(d)
    B.patch_header(lay, block_size=3 * 512)
    return Target(lay.path, InvalidFormatError, "header.block_size", {"HEADER_BLOCK_SIZE"})


@case("block size 2 GiB")
def _bs_huge(d: Path) -> Target:
    lay = base(d)
    B.patch_header(lay, block_size=0x80000000)
    return Target(lay.path, InvalidFormatError, "header.block_size", {"HEADER_BLOCK_SIZE"})


@case("max table entries 0xFFFFFFFF")
def _mte_huge(d: Path) -> Target:
    lay = base(d)
    B.patch_header(lay, max_table_entries=0xFFFFFFFF)
    return Target(lay.path, InvalidFormatError, "header.max_table_entries", {"HEADER_MAX_TABLE_ENTRIES"})


@case("max table entries too small")
def _mte_small(d: Path) -> Target:
    lay = base(d)
    B.patch_header(lay, max_table_entries=2)
    return Target(lay.path, InvalidFormatError, "header.max_table_entries", {"HEADER_MAX_TABLE_ENTRIES"})


@case("BAT of 33M entries in a sparse file (2040 GiB in 64 KiB blocks)")
def _mte_sparse(d: Path) -> Target:
    # The BAT fits in the (sparse) file, so only vhdcore's own ceiling stops a 130 MB allocation.
    lay = base(d)
    size = 2040 * 1024**3
    mte = size // (64 * KiB)
    B.patch_footer(lay, current_size=size, original_size=size)
    B.patch_header(lay, block_size=64 * KiB, max_table_entries=mte)
    os.truncate(lay.path, 1536 + mte * 4 + 1 * MiB)
    return Target(lay.path, UnsupportedFeatureError, "header.block_size", {"HEADER_MAX_TABLE_ENTRIES"})


@case("table offset not sector-aligned")
def _table_unaligned(d: Path) -> Target:
    lay = base(d)
    B.patch_header(lay, table_offset=1537)
    return Target(lay.path, CorruptImageError, "header.table_offset", {"HEADER_TABLE_OFFSET"})


@case("table offset past EOF")
def _table_eof(d: Path) -> Target:
    lay = base(d)
    B.patch_header(lay, table_offset=1 << 40)
    return Target(lay.path, CorruptImageError, "header.table_offset", {"BAT_OUTSIDE_FILE"})


# --------------------------------------------------------------------------------------------- BAT


@case("BAT all 0xFF (every block unallocated)")
def _bat_ff(d: Path) -> Target:
    lay = base(d)
    B.fill_bat(lay, 0xFF)
    # A valid, empty disk: the blocks still in the file are unreferenced space.
    return Target(lay.path, None, None, {"FILE_UNUSED_SPACE"}, clean=True, content={0: bytes(1024), BLOCK: bytes(1024)})


@case("BAT all 0x00 (every block at sector 0)")
def _bat_zero(d: Path) -> Target:
    lay = base(d)
    B.fill_bat(lay, 0x00)
    return Target(lay.path, CorruptImageError, "bat[0]", {"BAT_ENTRY_IN_METADATA", "BAT_ENTRY_OVERLAP"})


@case("BAT entry past EOF")
def _bat_eof(d: Path) -> Target:
    lay = base(d)
    B.set_bat(lay, 3, 0x00100000)
    return Target(lay.path, CorruptImageError, "bat[3]", {"BAT_ENTRY_PAST_EOF"})


@case("BAT entry 0xFFFFFFFE")
def _bat_max(d: Path) -> Target:
    lay = base(d)
    B.set_bat(lay, 1, 0xFFFFFFFE)
    return Target(lay.path, CorruptImageError, "bat[1]", {"BAT_ENTRY_PAST_EOF"})


@case("BAT entry inside the BAT")
def _bat_in_bat(d: Path) -> Target:
    lay = base(d)
    B.set_bat(lay, 1, 3)
    return Target(lay.path, CorruptImageError, "bat[1]", {"BAT_ENTRY_IN_METADATA"})


@case("two BAT entries at the same block")
def _bat_dup(d: Path) -> Target:
    lay = base(d)
    B.set_bat(lay, 1, lay.block_offsets[2] // 512)
    return Target(lay.path, CorruptImageError, "bat", {"BAT_ENTRY_OVERLAP"})


@case("overlapping blocks one sector apart")
def _bat_overlap(d: Path) -> Target:
    lay = base(d)
    B.set_bat(lay, 5, lay.block_offsets[0] // 512 + 1)
    return Target(lay.path, CorruptImageError, "bat", {"BAT_ENTRY_OVERLAP"})


# --------------------------------------------------------------------------------------------- chains


def _parent_and_child(d: Path, **child_kw) -> tuple[B.Layout, B.Layout]:
    parent = base(d, "parent.vhd")
    child = B.child_of(parent, d / "child.vhd", blocks=(1,), **child_kw)
    return parent, child


@case("parent's unique id differs")
def _mismatch(d: Path) -> Target:
    parent = base(d, "parent.vhd")
    child = B.build(d / "child.vhd", disk_type=DiskType.DIFFERENCING, parent_uid=uuid.uuid4(),
                    parent_name="parent.vhd", locators=[(b"W2ru", ".\\parent.vhd".encode("utf-16-le"))])
    del parent
    return Target(child.path, ParentMismatchError, "header.parent_unique_id", {"PARENT_MISMATCH"})


@case("parent missing")
def _missing(d: Path) -> Target:
    parent, child = _parent_and_child(d)
    os.unlink(parent.path)
    return Target(child.path, ParentNotFoundError, "header.parent_unicode_name", {"PARENT_NOT_FOUND"})


@case("disk names itself as parent")
def _self(d: Path) -> Target:
    uid = uuid.uuid4()
    lay = B.build(d / "self.vhd", disk_type=DiskType.DIFFERENCING, unique_id=uid, parent_uid=uid,
                  parent_name="self.vhd", locators=[(b"W2ru", ".\\self.vhd".encode("utf-16-le"))])
    return Target(lay.path, ChainCycleError, "parent locator", {"CHAIN_CYCLE"})


@case("cycle A -> B -> A")
def _cycle(d: Path) -> Target:
    ua, ub = uuid.uuid4(), uuid.uuid4()
    a = B.build(d / "a.vhd", disk_type=DiskType.DIFFERENCING, unique_id=ua, parent_uid=ub, parent_name="b.vhd",
                locators=[(b"W2ru", ".\\b.vhd".encode("utf-16-le"))])
    B.build(d / "b.vhd", disk_type=DiskType.DIFFERENCING, unique_id=ub, parent_uid=ua, parent_name="a.vhd",
            locators=[(b"W2ru", ".\\a.vhd".encode("utf-16-le"))])
    return Target(a.path, ChainCycleError, "parent", {"CHAIN_CYCLE"})


@case("chain 1000 deep")
def _deep(d: Path) -> Target:
    prev = B.build(d / "l0000.vhd", size=64 * KiB, block_size=4 * KiB)
    for i in range(1, 1000):
        prev = B.child_of(prev, d / f"l{i:04d}.vhd", size=64 * KiB, block_size=4 * KiB)
    return Target(prev.path, ChainCycleError, "chain depth", {"CHAIN_TOO_DEEP"})


def _escape(d: Path, locators: list[tuple[bytes, bytes]], parent_name: str = "",
            parent_dirs: list[str] | None = None, refused: str = "refused") -> Target:
    """A child in d/child/ whose real parent (right unique id) sits in d/outside/, named only by ``locators``."""
    outside = d / "outside"
    outside.mkdir(exist_ok=True)
    (d / "child").mkdir(exist_ok=True)
    parent = base(outside, "parent.vhd")
    child = B.build(d / "child" / "child.vhd", disk_type=DiskType.DIFFERENCING, parent_uid=parent.unique_id,
                    parent_name=parent_name, locators=locators, blocks=(1,))
    return Target(child.path, ParentNotFoundError, "header.parent_unicode_name", {"PARENT_NOT_FOUND"},
                  parent_dirs=parent_dirs or [], refused=refused, outside=outside)


def _u16(s: str) -> bytes:
    return s.encode("utf-16-le")


@case("locator names /etc/shadow")
def _shadow(d: Path) -> Target:
    return _escape(d, [(b"MacX", b"file:///etc/shadow"), (b"W2ku", _u16("/etc/shadow"))])


@case("locator names an absolute path outside")
def _abs_outside(d: Path) -> Target:
    return _escape(d, [(b"MacX", f"file://{d}/outside/parent.vhd".encode())])


@case("locator ..\\..\\ escapes the directory")
def _dotdot(d: Path) -> Target:
    return _escape(d, [(b"W2ru", _u16("..\\outside\\parent.vhd")), (b"MacX", b"file://./../outside/parent.vhd")])


@case("parent name ../outside/parent.vhd")
def _name_dotdot(d: Path) -> Target:
    return _escape(d, [], parent_name="../outside/parent.vhd")


@case("symlink in the child's directory pointing out")
def _symlink(d: Path) -> Target:
    t = _escape(d, [(b"W2ru", _u16(".\\parent.vhd"))])
    os.symlink(d / "outside" / "parent.vhd", d / "child" / "parent.vhd")
    return t


@case("symlinked directory pointing out")
def _symlink_dir(d: Path) -> Target:
    t = _escape(d, [(b"W2ru", _u16(".\\link\\parent.vhd"))])
    os.symlink(d / "outside", d / "child" / "link")
    return t


@case("locator names a device file")
def _device(d: Path) -> Target:
    # /dev is allowed here, so only the "regular files only" rule refuses /dev/zero.
    return _escape(d, [(b"MacX", b"file:///dev/zero")], parent_dirs=["/dev"], refused="not a regular file, refused")


@case("locator names a FIFO")
def _fifo(d: Path) -> Target:
    t = _escape(d, [(b"W2ru", _u16(".\\pipe.vhd"))], refused="not a regular file, refused")
    os.mkfifo(d / "child" / "pipe.vhd")
    return t


@case("locator names a directory")
def _directory(d: Path) -> Target:
    t = _escape(d, [(b"W2ru", _u16(".\\sub"))], refused="not a regular file, refused")
    (d / "child" / "sub").mkdir()
    return t


@case("locator with an embedded NUL")
def _nul(d: Path) -> Target:
    return _escape(d, [(b"W2ru", _u16(".\\parent.vhd\0/../../outside/parent.vhd")),
                       (b"MacX", b"file:///%00/etc/passwd")], refused="")


@case("locator data length 2 GiB")
def _loc_len(d: Path) -> Target:
    parent, child = _parent_and_child(d)
    B.set_locator(child, 0, length=0x7FFFFFFF)
    B.set_locator(child, 1, length=0x7FFFFFFF)
    # Both locators ignored; the parent is still found by its unicode name.
    return Target(child.path, None, None, {"LOCATOR_LENGTH"}, content={BLOCK: B.block_content(1, BLOCK)[:512]})


@case("locator data past EOF")
def _loc_eof(d: Path) -> Target:
    parent, child = _parent_and_child(d)
    B.set_locator(child, 0, offset=1 << 40)
    return Target(child.path, None, None, {"LOCATOR_OUTSIDE_FILE"}, content={BLOCK: B.block_content(1, BLOCK)[:512]})


@case("locators overlapping each other")
def _loc_overlap(d: Path) -> Target:
    parent, child = _parent_and_child(d)
    B.set_locator(child, 1, offset=child.locator_offsets[0])
    return Target(child.path, None, None, {"LOCATOR_OVERLAP"})


@case("locator inside a block")
def _loc_in_block(d: Path) -> Target:
    parent, child = _parent_and_child(d)
    B.set_locator(child, 0, offset=child.block_offsets[1] + 4096)
    return Target(child.path, CorruptImageError, "bat[1]", {"BAT_ENTRY_IN_METADATA"})


@case("saved state and a timestamp in the future")
def _saved(d: Path) -> Target:
    lay = base(d)
    B.patch_footer(lay, saved_state=1, timestamp=0xFFFFFFF0)
    return Target(lay.path, None, None, {"FOOTER_SAVED_STATE", "FOOTER_TIMESTAMP_FUTURE"}, content=block_probe(lay))


@case("locator data placed after a block")
def _loc_after_block(d: Path) -> Target:
    parent, child = _parent_and_child(d)
    # The W2ru data moved to a new sector between the last block and the footer: clear of every block, but
    # after block 1, a layout no writer makes.
    buf = B.read(child.path)
    w2ru = bytes(buf[child.locator_offsets[0] : child.locator_offsets[0] + 512])
    B.write(child.path, buf[: child.footer_offset] + w2ru + buf[child.footer_offset :])
    B.set_locator(child, 0, offset=child.footer_offset, space=512)
    return Target(child.path, CorruptImageError, "bat[1]", {"BAT_ENTRY_BEFORE_METADATA"})


@case("locator with an unknown platform code over a block")
def _loc_unknown_platform(d: Path) -> Target:
    parent, child = _parent_and_child(d)
    B.set_locator(child, 1, code=b"M\0\0\0", offset=child.block_offsets[1] + 4096)
    return Target(child.path, CorruptImageError, "bat[1]", {"BAT_ENTRY_IN_METADATA", "LOCATOR_PLATFORM"})


def _child_truncation(point: str) -> Callable[[Path], Target]:
    def make(d: Path) -> Target:
        parent, child = _parent_and_child(d)
        loc0, loc1 = child.locator_offsets
        cut = {"inside the first locator's data": loc0 + 10, "between the locators' data": loc1,
               "after the locators' data (no blocks)": child.block_offsets[1]}[point]
        B.truncate(child, cut)
        # The copy at 0 stands in for the footer; the cut locators are ignored (the parent name still finds the
        # parent), and the first BAT entry points past the end.
        return Target(child.path, CorruptImageError, "bat[1]", {"FOOTER_MISSING", "BAT_ENTRY_PAST_EOF"})
    return make


for _p in ("inside the first locator's data", "between the locators' data", "after the locators' data (no blocks)"):
    CASES.append(Case(f"differencing child truncated {_p}", _child_truncation(_p)))


@case("fixed disk with a torn footer")
def _fixed_torn(d: Path) -> Target:
    lay = B.build(d / "fixed.vhd", size=1 * MiB, disk_type=DiskType.FIXED)
    B.truncate(lay, lay.file_size - 256)
    # No copy to restore it from: not repairable without guessing.
    return Target(lay.path, InvalidFormatError, "footer.cookie", {"FOOTER_MISSING"})

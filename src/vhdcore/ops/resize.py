"""Change a disk's virtual size (vhd-util resize, Resize-VHD, qemu-img resize): fixed, dynamic and differencing.

Growing a dynamic or differencing disk may need a larger block allocation table. The BAT sits near the start of
the file, followed by whatever the writer put there (blocks, parent-locator data, blktap's batmap); when the
larger table does not fit in front of them, the blocks and locators in its way are moved to the end of the file
and the table grows over the space they left, as vhd-util does. A shrink is done only when asked (``shrink``)
and only when the cut-off tail reads as zeros through the chain; otherwise it is refused naming the first offset
that holds data. A differencing disk is not grown over a region where its parent chain holds data (the new
region of a grown disk reads as zeros).

Every change is planned first, written into a journal beside the disk (``.<disk>.resize``, durable before the
first write), and carried out in two phases:

* copy: the footer is written (unchanged) past the end of everything that moves, so the file ends with a valid
  footer at every instant; then the moved blocks and locators are copied there; sync. Nothing references the
  copies yet, so a crash leaves the old disk.
* commit: BAT entries of the moved blocks (both copies hold the same bytes), the header naming the moved
  locators, then the new BAT entries, batmap and the header with the new table size, then the footer with the
  new size, its copy at offset 0, and a truncation if the file had more after it; syncs between the steps.
  Every commit write is of fixed bytes, so replaying them is harmless.

A rerun finds the journal, checks that it is this disk's (path, unique id), and redoes the phase it was in: the
copies if the commit had not begun (their sources are intact until then), else the commit's writes. A crash in
the commit of a fixed disk's resize can leave the new size with the old footer's 512 bytes visible inside the
disk until the rerun zeroes them; a crash in the commit of a blktap disk whose batmap moves leaves libvhd
without the batmap (vhdcore and qemu read it) until the rerun. Writes go through ``fileio.WriteIO``,
so the same fault injection (``VHDCORE_FAULT_AFTER_WRITES``, ``VHDCORE_FAULT_ACTION``) covers them.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from .. import kernels as K
from . import journal
from ..disk.chain import Disk, open_chain
from ..fileio import WriteIO
from ..format.layout import MAX_CREATE_SIZE, make_footer, next_block
from ..exceptions import ChainError, InvalidFormatError, LockError, UnsafeOperationError, UnsupportedFeatureError, \
    VHDError
from ..disk.image import Image
from ..format.rules import MAX_BAT_ENTRIES, entries_needed, table_bytes
from ..format.structs import (
    FOOTER,
    HEADER,
    FOOTER_SIZE,
    SECTOR_SIZE,
    UNUSED_BAT_ENTRY,
    BatmapHeader,
    DiskType,
    Footer,
    ParentLocator,
    locator_entry_offset,
    round_up,
)

__all__ = ["resize", "ResizeReport", "journal_path", "first_data_offset"]

JOURNAL_SUFFIX = ".resize"
MAX_JOURNAL_BYTES = 64 * 1024 * 1024
CHUNK = 4 * 1024 * 1024
MAX_LOCATOR_SPACE = 1024 * 1024  # a locator holds a path: 64 KiB is already absurd
ProgressFn = Callable[[int, int], None]


@dataclass
class ResizeReport:
    path: str
    type: str
    old_size: int
    new_size: int
    max_table_entries: int  # after (0 for a fixed disk)
    blocks_moved: int
    locators_moved: int
    bytes_moved: int
    file_size: int
    resumed: bool  # an interrupted resize was finished first
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def journal_path(path: str) -> str:
    return journal.journal_path(path, JOURNAL_SUFFIX)


def _round(n: int, a: int = SECTOR_SIZE) -> int:
    return round_up(n, a)


# --------------------------------------------------------------------------------------------- checks


def first_data_offset(disk: Disk, start: int, stop: int) -> int | None:
    """The first byte in [start, stop) of ``disk`` that is not zero, or None. Reads only allocated runs."""
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    for ext in disk.allocated_extents(start, max(0, stop - start)):
        pos = ext.offset
        while pos < ext.end:
            n = min(CHUNK, ext.end - pos)
            ext.layer.preadinto(ext.file_offset + (pos - ext.offset), mv[:n])
            if not K.is_zero(mv[:n]):
                return pos + int(np.flatnonzero(np.frombuffer(mv[:n], dtype=np.uint8))[0])
            pos += n
    return None


def _new_footer(old: Footer, size: int) -> Footer:
    """The footer with the new size; the geometry is the one a new disk of that size gets (create's rule)."""
    geo = make_footer(size, DiskType(old.disk_type), data_offset=old.data_offset).geometry
    return replace(old, current_size=size, geometry=geo).with_checksum()


# --------------------------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    """What a resize writes. ``ops`` entries: ("w", off, bytes), ("f", off, length, byte), ("s",), ("t", size)."""

    reserve: tuple[int, bytes] | None  # the footer written past the moved data before the copies
    copies: list[tuple[int, int, int]]  # (src, dst, length)
    ops: list[tuple]
    blocks_moved: int = 0
    locators_moved: int = 0
    mte: int = 0
    footer_at: int = 0  # where the footer ends up

    def to_json(self) -> dict:
        def enc(op: tuple) -> list:
            return [op[0], op[1], op[2].hex()] if op[0] == "w" else list(op)

        return {"reserve": [self.reserve[0], self.reserve[1].hex()] if self.reserve else None,
                "copies": [list(c) for c in self.copies], "ops": [enc(o) for o in self.ops]}

    @classmethod
    def from_json(cls, doc: dict, file_limit: int) -> "_Plan":
        def num(x) -> int:
            if not isinstance(x, int) or x < 0 or x > file_limit:
                raise ValueError(f"offset or length {x!r} out of bounds")
            return x

        res = doc["reserve"]
        reserve = (num(res[0]), bytes.fromhex(res[1])) if res else None
        copies = [(num(s), num(d), num(n)) for s, d, n in doc["copies"]]
        ops: list[tuple] = []
        for op in doc["ops"]:
            kind = op[0]
            if kind == "w":
                ops.append(("w", num(op[1]), bytes.fromhex(op[2])))
            elif kind == "f":
                if op[3] not in (0, 0xFF):
                    raise ValueError("fill byte")
                ops.append(("f", num(op[1]), num(op[2]), op[3]))
            elif kind == "s":
                ops.append(("s",))
            elif kind == "t":
                ops.append(("t", num(op[1])))
            else:
                raise ValueError(f"unknown operation {kind!r}")
        return cls(reserve, copies, ops)


def _plan_fixed(img: Image, new: int) -> _Plan:
    old = img.size
    footer = _new_footer(img.footer, new).pack()
    ops: list[tuple] = [("w", new, footer), ("s",)]
    if new > old:
        ops += [("f", old, FOOTER_SIZE, 0), ("s",)]  # the old footer's place is now disk data: zeros
    ops += [("t", new + FOOTER_SIZE), ("s",)]
    return _Plan(None, [], ops, footer_at=new)


def _batmap_bytes(img: Image, mte: int) -> tuple[int, bytes]:
    """(map sectors, map bytes) of a batmap for ``mte`` blocks, keeping the old map's bits."""
    nbytes = _round(max(1, -(-mte // 8)))
    new = bytearray(nbytes)
    bm = img.batmap
    old = img.pread(bm.batmap_offset, min(bm.batmap_size * SECTOR_SIZE, nbytes, -(-img.max_table_entries // 8)))
    new[: len(old)] = old
    return nbytes // SECTOR_SIZE, bytes(new)


def _batmap_header(offset: int, sectors: int, version: int, data: bytes) -> bytes:
    csum = ~int(np.frombuffer(data, dtype=np.uint8).sum(dtype=np.int64)) & 0xFFFFFFFF
    return BatmapHeader(offset, sectors, version, csum).pack()


def _plan_dynamic(img: Image, new: int) -> _Plan:
    h = img.header
    bs = img.block_size
    hoff = img.footer.data_offset
    to = h.table_offset
    old_mte = img.max_table_entries
    need = entries_needed(new, bs)
    mte = max(old_mte, need)
    span = img.bitmap_size + bs
    bat = img.bat
    ops: list[tuple] = []
    copies: list[tuple[int, int, int]] = []
    reserve = None
    locs = list(h.parent_locators)
    moved_blocks = moved_locs = 0
    old_need = entries_needed(img.size, bs)
    footer_at = img.data_end()
    # Entries between the old and the new size (growing), or past the new size (shrinking), must read as
    # nothing: a block there holds no data of the disk (checked for a shrink; beyond the size for a grow).
    lo, hi = (old_need, need) if new > img.size else (need, old_need)
    stale = [b for b in range(lo, min(hi, old_mte)) if int(bat[b]) != UNUSED_BAT_ENTRY]
    if mte > old_mte:
        new_bat_end = to + table_bytes(mte)
        region_end = new_bat_end
        batmap = None
        if img.batmap is not None:
            sectors, data = _batmap_bytes(img, mte)
            batmap = (new_bat_end, sectors, data)
            region_end = new_bat_end + SECTOR_SIZE + sectors * SECTOR_SIZE
        if to <= hoff < region_end:
            raise UnsupportedFeatureError("the dynamic header lies after the BAT, where the larger table would go",
                                          path=img.path, offset=FOOTER.offset("data_offset"),
                                          field=FOOTER.field("data_offset"), value=hoff)
        # Locator data must stay in front of every block (readers take the end of the metadata as the start of
        # the block area): the locators after the BAT are rewritten past the new table, and past everything the
        # old header still references (their old data, the old batmap) until the header is switched.
        loc_after = [i for i, loc in enumerate(locs) if loc.is_used and loc.data_offset >= to]
        loc_writes: list[tuple] = []
        if loc_after:
            pos = max([region_end] + [locs[i].data_offset + _round(locs[i].data_space_bytes) for i in loc_after]
                      + ([img.batmap.end] if img.batmap is not None else []))
            for i in loc_after:
                loc = locs[i]
                space = _round(loc.data_space_bytes)
                if space > MAX_LOCATOR_SPACE or loc.data_offset + space > img.file_size:
                    raise UnsupportedFeatureError("a parent locator's data space is too large or outside the file",
                                                  path=img.path, offset=hoff + locator_entry_offset(i),
                                                  field=f"header.parent_locators[{i}]", value=loc.data_space_bytes)
                pos = _round(pos)
                loc_writes.append(("w", pos, img.pread(loc.data_offset, space)))
                locs[i] = ParentLocator(loc.platform_code, loc.data_space, loc.data_length, pos, loc.reserved)
                pos += space
            region_end = pos
        dropped = set(stale)  # their data is no part of the disk: they are dropped, not moved
        in_way = [int(b) for b in np.flatnonzero(bat != UNUSED_BAT_ENTRY)
                  if int(b) not in dropped and int(bat[b]) * SECTOR_SIZE < region_end
                  and int(bat[b]) * SECTOR_SIZE + span > to]
        in_way.sort(key=lambda b: int(bat[b]))
        pos = max(footer_at, _round(region_end))
        bat_writes: list[tuple] = []
        for b in in_way:
            src = int(bat[b]) * SECTOR_SIZE
            dst = next_block(pos, img.bitmap_size)
            copies.append((src, dst, span))
            bat_writes.append(("w", to + 4 * b, (dst // SECTOR_SIZE).to_bytes(4, "big")))
            pos = dst + span
        moved_blocks, moved_locs = len(in_way), len(loc_after)
        footer_at = _round(pos)
        if copies or footer_at != img.data_end():
            reserve = (footer_at, img.footer.pack())
        if bat_writes:
            ops += bat_writes + [("s",)]
        if loc_writes:
            # Into space no block uses any more; then the header (old table size) naming them there.
            ops += loc_writes + [("s",), ("w", hoff, replace(h, parent_locators=tuple(locs)).pack()), ("s",)]
        ops.append(("f", to + 4 * old_mte, new_bat_end - (to + 4 * old_mte), 0xFF))
        if batmap is not None:
            at, sectors, data = batmap
            ops.append(("w", at + SECTOR_SIZE, data))
            ops.append(("w", at, _batmap_header(at + SECTOR_SIZE, sectors, img.batmap.batmap_version, data)))
        ops.append(("s",))
        ops.append(("w", hoff, replace(h, max_table_entries=mte, parent_locators=tuple(locs)).pack()))
        ops.append(("s",))
    for b in stale:
        ops.insert(0, ("w", to + 4 * b, UNUSED_BAT_ENTRY.to_bytes(4, "big")))
    if stale:
        ops.insert(len(stale), ("s",))
    if new > img.size and img.size % bs:
        # The old last block's sectors past the old size join the disk: they must be zeros.
        b = img.size // bs
        if int(bat[b]) != UNUSED_BAT_ENTRY:
            data_off = int(bat[b]) * SECTOR_SIZE + img.bitmap_size
            start = img.size - b * bs
            end = min(bs, new - b * bs)
            ops.insert(0, ("f", data_off + start, end - start, 0))
    footer = _new_footer(img.footer, new).pack()
    ops += [("w", footer_at, footer), ("s",), ("w", 0, footer), ("s",), ("t", footer_at + FOOTER_SIZE), ("s",)]
    return _Plan(reserve, copies, ops, moved_blocks, moved_locs, mte, footer_at)


# --------------------------------------------------------------------------------------------- carrying out


class _Runner:
    def __init__(self, fd: int, io: WriteIO, progress: ProgressFn | None) -> None:
        self.fd = fd
        self.io = io
        self.progress = progress

    def copy_phase(self, plan: _Plan) -> None:
        if plan.reserve is not None:
            off, data = plan.reserve
            self.io.pwritev(self.fd, [data], off)
            self.io.fdatasync(self.fd)
        total = sum(n for _, _, n in plan.copies)
        done = 0
        for src, dst, n in plan.copies:
            try:
                self.io.copy(self.fd, src, self.fd, dst, n)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.io.pwritev(self.fd, [os.pread(self.fd, n, src)], dst)
            done += n
            if self.progress:
                self.progress(done, total)
        if plan.copies:
            self.io.fdatasync(self.fd)

    def commit_phase(self, plan: _Plan) -> None:
        for op in plan.ops:
            kind = op[0]
            if kind == "w":
                self.io.pwritev(self.fd, [op[2]], op[1])
            elif kind == "f":
                _, off, n, byte = op
                pos = 0
                while pos < n:
                    k = min(CHUNK, n - pos)
                    self.io.pwritev(self.fd, [bytes([byte]) * k], off + pos)
                    pos += k
            elif kind == "s":
                self.io.fdatasync(self.fd)
            elif kind == "t":
                if os.fstat(self.fd).st_size != op[1]:
                    self.io.ftruncate(self.fd, op[1])


def _write_journal(path: str, doc: dict) -> None:
    journal.write_journal(journal_path(path), doc)


def _remove_journal(path: str) -> None:
    journal.remove_journal(journal_path(path))


def _probe_unique_ids(fd: int, offsets: Sequence[int]) -> set:
    ids = set()
    for off in offsets:
        if off < 0:
            continue
        raw = os.pread(fd, FOOTER_SIZE, off)
        if len(raw) < FOOTER_SIZE:
            continue
        try:
            ids.add(str(Footer.parse(raw, verify_checksum=False).unique_id))
        except VHDError:
            continue
    return ids


def _open_locked(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockError("another writer holds this file", path=path, field="lock") from None
        raise
    return fd


def _resume(path: str, io: WriteIO, progress: ProgressFn | None) -> dict | None:
    """Finish the resize a journal describes; returns the journal, or None when there is none."""
    jp = journal_path(path)
    try:
        with open(jp, "rb") as f:
            raw = f.read(MAX_JOURNAL_BYTES + 1)
    except FileNotFoundError:
        return None
    fd = _open_locked(path)
    try:
        limit = 2 * MAX_CREATE_SIZE + (1 << 30)
        try:
            if len(raw) > MAX_JOURNAL_BYTES:
                raise ValueError("too large")
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("kind") != "resize":
                raise ValueError("not a resize journal")
            plan = _Plan.from_json(doc["plan"], limit)
            uid, phase = str(doc["unique_id"]), doc["phase"]
            footers = [int(x) for x in doc["footers"]]
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise InvalidFormatError(f"unreadable resize journal ({e}); remove it if no resize was interrupted",
                                     path=jp, field="journal") from None
        if doc.get("path") != os.path.realpath(path):
            raise ChainError(f"the resize journal is for {doc.get('path')}, not this disk", path=jp,
                             field="journal.path")
        size = os.fstat(fd).st_size
        if uid not in _probe_unique_ids(fd, [size - FOOTER_SIZE, 0, *footers]):
            raise ChainError(f"the resize journal is for the disk with unique id {uid}, not this one", path=jp,
                             field="journal.unique_id", value=uid)
        runner = _Runner(fd, io, progress)
        if phase == "copy":
            runner.copy_phase(plan)
            doc["phase"] = "commit"
            _write_journal(path, doc)
        elif phase != "commit":
            raise InvalidFormatError(f"unknown resize journal phase {phase!r}", path=jp, field="journal.phase")
        runner.commit_phase(plan)
    finally:
        os.close(fd)
    _remove_journal(path)
    return doc


def resize(path: str | os.PathLike[str], size: int, *, shrink: bool = False,
           parent_dirs: Sequence[str] | None = None, progress: ProgressFn | None = None) -> ResizeReport:
    """Make the disk at ``path`` ``size`` bytes (see the module docstring)."""
    t0 = time.perf_counter()
    path = os.fspath(path)
    if not isinstance(size, int) or size <= 0 or size % SECTOR_SIZE:
        raise ValueError(f"size must be a positive multiple of 512 bytes, not {size!r}")
    if size > MAX_CREATE_SIZE:
        raise ValueError(f"size {size} is over the VHD limit of 2040 GiB")
    io = WriteIO()
    try:
        resumed = _resume(path, io, progress) is not None
        with open_chain(path, "r", parent_dirs) as disk:
            img = disk.leaf
            old = img.size
            warnings = list(disk.warnings)
            if size < old:
                if not shrink:
                    raise UnsafeOperationError(f"{size} is smaller than the disk's {old} bytes: pass --shrink to "
                                               "cut the disk", path=path, field="size", value=size)
                first = first_data_offset(disk, size, old)
                if first is not None:
                    raise UnsafeOperationError(f"the part to cut off holds data (first non-zero byte at offset "
                                               f"{first}); nothing was changed", path=path, offset=first,
                                               field="data", value=first)
            elif size > old and img.is_differencing and len(disk.layers) > 1:
                pdisk = Disk(disk.layers[1:])
                first = first_data_offset(pdisk, old, min(size, pdisk.size))
                if first is not None:
                    raise UnsafeOperationError(f"the parent chain holds data at offset {first}, inside the region "
                                               "the grown child would cover (it would appear in it)", path=path,
                                               offset=first, field="parent data", value=first)
            if img.is_fixed:
                plan = _plan_fixed(img, size)
            else:
                if img.footer_offset < 0:
                    raise InvalidFormatError("the footer at the end of the file is missing: run 'vhdcore repair' "
                                             "first", path=path, field="footer")
                need = entries_needed(size, img.block_size)
                if need > MAX_BAT_ENTRIES:
                    raise UnsupportedFeatureError(f"{need} blocks of {img.block_size} bytes are too many for a BAT",
                                                  path=path, field=HEADER.field("block_size"), value=img.block_size)
                plan = _plan_dynamic(img, size)
            uid, footer_off, dtype = str(img.unique_id), img.footer_offset, img.disk_type.label
        report = ResizeReport(path, dtype, old, size, plan.mte, plan.blocks_moved, plan.locators_moved,
                              sum(n for _, _, n in plan.copies), 0, resumed, 0.0, warnings)
        if size != old:
            doc = {"kind": "resize", "path": os.path.realpath(path), "unique_id": uid, "old_size": old,
                   "new_size": size, "phase": "copy" if (plan.copies or plan.reserve) else "commit",
                   "footers": [footer_off, plan.footer_at],
                   "plan": plan.to_json()}
            _write_journal(path, doc)
            fd = _open_locked(path)
            try:
                runner = _Runner(fd, io, progress)
                if doc["phase"] == "copy":
                    runner.copy_phase(plan)
                    doc["phase"] = "commit"
                    _write_journal(path, doc)
                runner.commit_phase(plan)
            finally:
                os.close(fd)
            _remove_journal(path)
    finally:
        io.close()
    report.file_size = os.path.getsize(path)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report

"""Move a differencing disk onto another parent without changing what it reads (qemu-img rebase, safe mode).

The child reads its own sectors where its bitmaps say so and its parent chain's everywhere else. To put a new
chain under it, every sector the child does not hold and on which the old backing chain and the new one read
differently is first copied into the child, with the content the old chain gives it; then the child's header is
re-pointed at the new parent (``relink.plan_relink``, the plan set-parent writes). Both backing chains' extents are
walked side by side with the child's own runs, as ``compare`` does: sectors the child holds are never looked at, a
range zero in both chains or taken by both from the same run of the same file is equal without reading, so the
cost follows the data that differs (and the data in the chains that might), not the virtual size.

The new parent must have the child's virtual size; a smaller or larger one is refused (a larger parent is what
qemu accepts, but libvhd's readers and vhdcore's check expect a chain of one size: resize the child first).

Crash safety. A journal beside the child (``.<child>.rebase``, durable before the first write) records the old
and the new parent and the relink plan. The copy phase writes through ``coalesce_writer.TargetWriter``: data into
the child's existing blocks lands under bitmap bits that are still clear, new blocks go into a region whose end
already carries a copy of the footer, and bitmaps and BAT entries are written only after the data they cover is
durable (data, then bitmap, then BAT: libvhd's rule, bits set exactly for the sectors written). Every write puts
into the child what it already reads through its old parent, so after a crash at any write the child opens and
reads its old content through the OLD parent. The journal then moves to the relink phase (the copies durable) and
the header is switched in one write. A rerun of rebase on the child finds the journal: in the copy phase it starts
over (sectors copied already are the child's own now and are skipped); in the relink phase it writes the plan
again (a torn header is mended), refusing a different new parent than the one the journal names. Writes go
through ``fileio.WriteIO``, so ``VHDCORE_FAULT_AFTER_WRITES`` / ``VHDCORE_FAULT_ACTION`` reach them.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .. import kernels as K
from . import journal
from ..disk.chain import Disk, open_chain
from .coalesce.writer import TargetWriter
from ..exceptions import ChainError, InvalidFormatError, UnsafeOperationError
from ..disk.extents import Extent, same_stored_bytes
from ..fileio import WriteIO, zero_fill
from ..disk.image import NOT_HERE, Image
from .coalesce.relink import RelinkPlan, apply_relink, plan_from_json, plan_relink
from .setparent import _with_file_name, refuse_cycle
from ..format.structs import FOOTER, SECTOR_SIZE, UNUSED_BAT_ENTRY

__all__ = ["rebase", "RebaseReport", "journal_path"]

JOURNAL_SUFFIX = ".rebase"
MAX_JOURNAL_BYTES = 1 << 20  # a header and a few locators, hex-encoded
CHUNK = 1024 * 1024
BATCH_BYTES = 64 * 1024 * 1024  # new-block bytes per metadata commit (one fdatasync each)
ProgressFn = Callable[[int, int], None]


@dataclass
class RebaseReport:
    child: str
    old_parent: str
    new_parent: str
    bytes_compared: int  # of the two backing chains together (ranges equal without reading are not counted)
    bytes_copied: int  # written into the child
    blocks_added: int
    resumed: bool  # an interrupted rebase was finished (relink phase) or restarted (copy phase) first
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        # docs/json.md: the disk changed is the `path`, a parent's file a `parent_path`.
        d = asdict(self)
        d["path"], d["old_parent_path"], d["parent_path"] = d.pop("child"), d.pop("old_parent"), d.pop("new_parent")
        return d


def journal_path(child: str) -> str:
    return journal.journal_path(child, JOURNAL_SUFFIX)


def _write_journal(child: str, doc: dict) -> None:
    journal.write_journal(journal_path(child), doc)


def _remove_journal(child: str) -> None:
    journal.remove_journal(journal_path(child))


def _read_journal(child: str) -> tuple[dict, RelinkPlan] | None:
    """The journal of an interrupted rebase of ``child``, bound to it (path, unique id, the plan's bytes)."""
    jp = journal_path(child)
    doc = journal.read_journal(jp, "rebase", MAX_JOURNAL_BYTES)
    if doc is None:
        return None
    try:
        if doc.get("phase") not in ("copy", "relink") or not isinstance(doc.get("new_parent"), str):
            raise ValueError("bad phase or new parent")
        plan = plan_from_json(doc["plan"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidFormatError(f"unreadable rebase journal ({e}); remove it if no rebase was interrupted",
                                 path=jp, field="journal") from None
    journal.bind_header_plan(child, plan, jp)
    return doc, plan


# --------------------------------------------------------------------------------------------- the walk


def _own_runs(img: Image, size: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, held by the child) runs of [0, size)."""
    for off, n, fo in img.layer_runs(0, size):
        yield off, n, fo != NOT_HERE


def _backing(disk: Disk, size: int) -> Iterator[Extent]:
    """The backing chain's extents over [0, size); zeros past its end (a parent smaller than the child)."""
    yield from disk.extents(0, min(size, disk.size))
    if disk.size < size:
        yield Extent(disk.size, size - disk.size, None, -1, -1)


def _three_way(own: Iterator[tuple[int, int, bool]], a: Iterator[Extent], b: Iterator[Extent]
               ) -> Iterator[tuple[int, int, Extent, Extent]]:
    """Ranges not held by the child, with the old (``a``) and new (``b``) backing extent that applies."""
    ro, ea, eb = next(own, None), next(a, None), next(b, None)
    while ro is not None and ea is not None and eb is not None:
        o_off, o_n, held = ro
        o_end = o_off + o_n
        start = max(o_off, ea.offset, eb.offset)
        end = min(o_end, ea.end, eb.end)
        if end > start and not held:
            yield start, end, ea, eb
        if o_end <= end:
            ro = next(own, None)
        if ea.end <= end:
            ea = next(a, None)
        if eb.end <= end:
            eb = next(b, None)


def _read(ext: Extent, pos: int, mv: memoryview) -> None:
    if ext.is_zero:
        zero_fill(mv)
    else:
        ext.layer.preadinto(ext.file_offset + (pos - ext.offset), mv)


def _differing_sectors(x: memoryview, y: memoryview) -> Iterator[tuple[int, int]]:
    """(first byte, end byte) runs of whole sectors on which ``x`` and ``y`` differ."""
    ax = np.frombuffer(x, dtype=np.uint8).reshape(-1, SECTOR_SIZE)
    ay = np.frombuffer(y, dtype=np.uint8).reshape(-1, SECTOR_SIZE)
    diff = (ax != ay).any(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate(([False], diff, [False])).astype(np.int8)))
    for s, e in zip(edges[::2], edges[1::2]):
        yield int(s) * SECTOR_SIZE, int(e) * SECTOR_SIZE


def _nonzero_sectors(x: memoryview) -> Iterator[tuple[int, int]]:
    ax = np.frombuffer(x, dtype=np.uint8).reshape(-1, SECTOR_SIZE)
    nz = ax.any(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate(([False], nz, [False])).astype(np.int8)))
    for s, e in zip(edges[::2], edges[1::2]):
        yield int(s) * SECTOR_SIZE, int(e) * SECTOR_SIZE


# --------------------------------------------------------------------------------------------- the copy


class _ChildWriter:
    """Puts sector runs (in ascending order) into the child through a TargetWriter, one block at a time: runs into
    an existing block go to its data area and set its bitmap bits at the block's end; runs into a block the child
    lacks are gathered in a zeroed block buffer that is written, bitmap first, into a new slot."""

    def __init__(self, img: Image, w: TargetWriter) -> None:
        self.img = img
        self.w = w
        self.bs = img.block_size
        self.block = -1
        self.bitmap: bytearray | None = None
        self.buf: bytearray | None = None  # for a new block
        self.copied = 0
        self.added = 0

    def _flush(self) -> None:
        b = self.block
        if b < 0:
            return
        if self.buf is not None:
            off = self.w.new_slot()
            self.w.write([bytes(self.bitmap), memoryview(self.buf)], off)
            self.w.add_block(b, off)
            self.img._bitmap_cache[b] = bytes(self.bitmap)
            self.added += 1
        else:
            self.w.add_bitmap(b, int(self.img.bat[b]) * SECTOR_SIZE, bytes(self.bitmap))
        self.block, self.bitmap, self.buf = -1, None, None

    def put(self, voff: int, data: memoryview) -> None:
        pos = 0
        n = len(data)
        while pos < n:
            v = voff + pos
            b = v // self.bs
            in_block = v - b * self.bs
            k = min(n - pos, self.bs - in_block)
            if b != self.block:
                self._flush()
                self.block = b
                old = self.img.read_bitmap(b) if int(self.img.bat[b]) != UNUSED_BAT_ENTRY else None
                if old is None:
                    self.bitmap = bytearray(self.img.bitmap_size)
                    self.buf = bytearray(self.bs)
                else:
                    self.bitmap = bytearray(old)
            piece = data[pos : pos + k]
            if self.buf is not None:
                self.buf[in_block : in_block + k] = piece
            else:
                self.w.write([piece], int(self.img.bat[b]) * SECTOR_SIZE + self.img.bitmap_size + in_block)
            K.bitmap_set_range(self.bitmap, in_block // SECTOR_SIZE, (in_block + k) // SECTOR_SIZE)
            self.copied += k
            pos += k

    def finish(self) -> None:
        self._flush()


def _new_block_candidates(img: Image, old: Disk, new: Disk) -> int:
    """How many blocks the copy may add at most: those the child lacks that meet a range the two backing chains
    might read differently (found from the extent maps alone, nothing read). TargetWriter reserves room for
    them by writing the footer that far out."""
    size, bs = img.size, img.block_size
    ids: dict = {}
    seen = -1
    count = 0
    for start, end, ea, eb in _three_way(_own_runs(img, size), _backing(old, size), _backing(new, size)):
        if ea.is_zero and eb.is_zero or same_stored_bytes(ea, eb, ids):
            continue
        for b in range(max(start // bs, seen + 1), (end - 1) // bs + 1):
            if int(img.bat[b]) == UNUSED_BAT_ENTRY:
                count += 1
            seen = b
    return count


def _copy_phase(child: Disk, new: Disk, io: WriteIO, progress: ProgressFn | None) -> tuple[int, int, int]:
    """Copy into the child what differs between its old backing chain and ``new``; (compared, copied, added)."""
    img = child.leaf
    size = img.size
    old = Disk(child.layers[1:])
    w = TargetWriter(img, io, BATCH_BYTES, _new_block_candidates(img, old, new))
    cw = _ChildWriter(img, w)
    ba, bb = bytearray(CHUNK), bytearray(CHUNK)
    ma, mb = memoryview(ba), memoryview(bb)
    compared = 0
    ids: dict = {}
    try:
        for start, end, ea, eb in _three_way(_own_runs(img, size), _backing(old, size), _backing(new, size)):
            if ea.is_zero and eb.is_zero or same_stored_bytes(ea, eb, ids):
                continue
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                pa, pb = ma[:n], mb[:n]
                if eb.is_zero:
                    _read(ea, pos, pa)
                    compared += n
                    runs = _nonzero_sectors(pa)
                elif ea.is_zero:
                    _read(eb, pos, pb)
                    compared += n
                    zero_fill(pa)
                    runs = _nonzero_sectors(pb)
                else:
                    _read(ea, pos, pa)
                    _read(eb, pos, pb)
                    compared += 2 * n
                    runs = () if K.bytes_equal(pa, pb) else _differing_sectors(pa, pb)
                for s, e in runs:
                    cw.put(pos + s, pa[s:e])
                pos += n
                if progress:
                    progress(pos, size)
        cw.finish()
        w.finish()
    except BaseException:
        w.abort()
        raise
    return compared, cw.copied, cw.added


# --------------------------------------------------------------------------------------------- the command


def _finish_relink(child: str, plan: RelinkPlan, io: WriteIO) -> None:
    apply_relink(plan, io=io)
    _remove_journal(child)


def rebase(child: str | os.PathLike[str], new_parent: str | os.PathLike[str], *,
           parent_dirs: Sequence[str] | None = None, strict: bool = True,
           progress: ProgressFn | None = None) -> RebaseReport:
    """Put ``new_parent`` under the differencing disk ``child``, keeping its content (module docstring)."""
    t0 = time.perf_counter()
    child_s, parent_s = os.fspath(child), os.fspath(new_parent)
    if not os.path.exists(parent_s):
        raise FileNotFoundError(f"new parent {parent_s} does not exist")
    resumed = False
    pending = _read_journal(child_s)
    if pending is not None:
        doc, plan = pending
        if doc["phase"] == "relink":
            # The header may be torn: nothing else can be read until the plan is written again.
            if doc["new_parent"] != os.path.realpath(parent_s):
                raise ChainError(f"an interrupted rebase onto {doc['new_parent']} must be finished first: run it "
                                 "again with that parent", path=journal_path(child_s), field="journal.new_parent",
                                 value=doc["new_parent"])
            io = WriteIO()
            try:
                _finish_relink(child_s, plan, io)
            finally:
                io.close()
            return RebaseReport(child_s, doc.get("old_parent", ""), parent_s, 0, 0, 0, True,
                                round(time.perf_counter() - t0, 3), list(plan.warnings))
        # Copy phase: the child still names its old parent and reads its old content; start over.
        resumed = True
    dirs = list(parent_dirs or [])
    io = WriteIO()
    try:
        with open_chain(child_s, "r+", dirs, strict=strict) as cdisk:
            leaf = cdisk.leaf
            if not leaf.is_differencing:
                raise ChainError("not a differencing disk: it has no parent to replace", path=leaf.path,
                                 field=FOOTER.field("disk_type"), value=int(leaf.disk_type))
            if leaf.footer_offset < 0:
                raise InvalidFormatError("the footer at the end of the file is missing: run 'vhdcore repair' first",
                                         path=leaf.path, field="footer")
            old_parent = cdisk.layers[1].path
            st = os.fstat(leaf.fd)
            child_key = (st.st_dev, st.st_ino)
            with open_chain(parent_s, "r", dirs, strict=strict) as ndisk:
                refuse_cycle(ndisk, child_key, child_s)
                if ndisk.size != leaf.size:
                    raise UnsafeOperationError(
                        f"the new parent's virtual size {ndisk.size} differs from the child's {leaf.size}; rebase "
                        "needs a parent of the same size (resize one of them first)", path=parent_s,
                        field=FOOTER.field("current_size"), value=ndisk.size)
                plan = _with_file_name(plan_relink(child_s, ndisk.leaf), ndisk.leaf.path)
                doc = {"kind": "rebase", "phase": "copy", "old_parent": os.path.realpath(old_parent),
                       "new_parent": os.path.realpath(parent_s), "plan": plan.to_json()}
                _write_journal(child_s, doc)
                compared, copied, added = _copy_phase(cdisk, ndisk, io, progress)
            warnings = list(cdisk.warnings)
        doc["phase"] = "relink"
        _write_journal(child_s, doc)
        _finish_relink(child_s, plan, io)
    finally:
        io.close()
    # The child must now open with the new parent found where it is.
    check_dirs = [os.path.dirname(os.path.realpath(parent_s))] + dirs
    with open_chain(child_s, "r", check_dirs, strict=strict) as disk:
        if os.path.realpath(disk.layers[1].path) != os.path.realpath(parent_s):
            raise ChainError(f"after rebase the child resolves to {disk.layers[1].path}, not {parent_s}",
                             path=child_s, field="parent locator")
        warnings += list(plan.warnings) + [w for w in disk.warnings if w not in warnings]
    return RebaseReport(child_s, old_parent, parent_s, compared, copied, added, resumed,
                        round(time.perf_counter() - t0, 3), warnings)

"""Coalesce: write every sector a differencing child holds into its parent (or, with ``into``, every layer from
the leaf down to an ancestor, into that ancestor, each sector once from the topmost layer that holds it).

How it stays fast: the work goes target block by target block (the target's existing blocks in their file order,
then new blocks in virtual order, appended). For each, the source layers' sector bitmaps are combined first (top
layer wins: a lower layer contributes only the sectors no higher layer holds), so each target sector is written
once:

* a full block from one layer is one kernel-side ``copy_file_range`` (or one vectored write when its bytes must be
  looked at: the zero test below);
* a partial block that goes into a new target block is assembled in memory (zeros, or the target's own bytes,
  with the ``merge_block`` kernel laying the source sectors over them) and written once;
* a partial block over an existing target block with few runs has just its runs written (no read of the target,
  no rewrite of the sectors it keeps; runs from ``bitmap_runs``); with many runs it is merged and written whole.
* zero-aware: a merged block that is all zeros, over a target block that is unallocated with nothing allocated
  under it, is not allocated (it reads as zeros already). Over a differencing target zeros must be written.

Writes into new file space go as vectors of 256 KiB pieces (single 2 MiB writes run several times slower on this
kernel: machine-facts.md). How the target's metadata stays behind its data, and the fault-injection hooks the
crash tests use, are in ``coalesce_writer``.

Safety: refused (UnsafeOperationError naming the override) when other disks depend on the target or an
intermediate layer, when a parent's unique id is not the one its child records, or when a disk is in saved state.
``remove_child`` acts only once the target is durable (and verified, if asked): the child's children are relinked
to the target, then the merged layers are deleted (deepest first, the child last); a journal beside the child,
holding every relink's bytes, lets a rerun after a crash in that phase finish the job: it relinks the journal's
grandchildren again (mending a header torn mid-write) and, if layers were already deleted so that the child's
chain no longer opens, completes the removal from the journal alone.
"""
from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import xxhash

from ... import kernels as K
from ...disk.chain import Disk, open_layers, resolve_parent
from ...disk.chain import file_identity as _identity, is_within as _within
from ...format.locators import candidate_paths as _candidate_names
from ...exceptions import (
    ChainError,
    ParentMismatchError,
    UnsafeOperationError,
    UnsupportedFeatureError,
    VerificationError,
    VHDError,
)
from ...fileio import WriteIO, fsync_dir, pieces
from .writer import TargetWriter
from ...disk.image import Image
from ...disk.locks import lock
from .resume import MergeProgress
from ...progress import Stages, as_progress
from .relink import (
    JournalError,
    RelinkPlan,
    apply_relink,
    bind_plans,
    dependents,
    journal_path,
    plan_relink,
    read_journal,
    write_journal,
)
from ...format.structs import SECTOR_SIZE, UNUSED_BAT_ENTRY

MiB = 1024 * 1024

FORCE_OTHER_CHILDREN = "other-children"
FORCE_PARENT_ID = "parent-id"
FORCE_SAVED_STATE = "saved-state"
FORCE_CHOICES = (FORCE_OTHER_CHILDREN, FORCE_PARENT_ID, FORCE_SAVED_STATE)

# New blocks written between two metadata commits (each commit is one fdatasync, overlapped with the next batch).
DEFAULT_BATCH_BYTES = 256 * MiB
# A partial block over an existing target block with at most this many runs has its runs written one by one
# (each a page-cache write, no metadata); with more, it is merged in memory and written whole.
MAX_RUN_WRITES = 64
# A fixed target has no blocks: it is processed in units of the child's block size, within these bounds.
_MIN_FIXED_UNIT = 64 * 1024
_MAX_FIXED_UNIT = 8 * MiB

ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------- report


@dataclass
class CoalesceReport:
    child: str
    target: str
    target_type: str
    merged_layers: list[str]  # the layers whose data went into the target, leaf first
    backend: str
    block_size: int  # the unit of work: the target's block size (a fixed target: the child's)
    blocks_copied: int = 0  # target blocks written
    full_blocks: int = 0  # of those, blocks taken whole from one layer
    partial_blocks: int = 0  # merged sector by sector
    bytes_copied: int = 0  # sectors copied into the target, in bytes
    blocks_allocated: int = 0  # new blocks in the target
    blocks_resumed: int = 0  # target blocks an interrupted run (resume=True) had merged already: not redone
    zero_blocks_skipped: int = 0  # all-zero blocks over nothing: not allocated (they already read as zeros)
    shadowed_sectors: int = 0  # copied sectors that replaced data the target held (the duplicate data eliminated)
    target_size_before: int = 0
    target_size_after: int = 0
    syncs: int = 0
    writes: int = 0
    seconds: float = 0.0
    verified: bool = False
    verify_seconds: float = 0.0
    relinked: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def target_growth(self) -> int:
        return self.target_size_after - self.target_size_before

    @property
    def shadowed_bytes(self) -> int:
        return self.shadowed_sectors * SECTOR_SIZE

    @property
    def throughput(self) -> float:
        """Bytes copied per second of the merge itself (verification excluded)."""
        merge = self.seconds - self.verify_seconds
        return self.bytes_copied / merge if merge > 0 else 0.0

    def to_dict(self) -> dict:
        """The JSON form (docs/json.md): the child is the ``source``, the target the ``destination``."""
        d = asdict(self)
        d.update(target_growth=self.target_growth, shadowed_bytes=self.shadowed_bytes,
                 throughput=round(self.throughput))
        out = {"source": d.pop("child"), "destination": d.pop("target")}
        for k, v in d.items():
            out[k.replace("target_", "destination_", 1) if k.startswith("target_") else k] = v
        return out


# --------------------------------------------------------------------------------------------- helpers


def _zero(mv: memoryview) -> None:
    """memset through numpy: several times faster than slice assignment from a zero buffer."""
    if len(mv):
        np.frombuffer(mv, dtype=np.uint8).fill(0)


def _preadinto(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        got = os.preadv(fd, [mv[done:]], offset + done)
        if got <= 0:
            raise OSError(errno.EIO, f"short read at offset {offset + done}")
        done += got



def _copy_bits(dst: bytearray, dst_bit: int, src: bytes, src_bit: int, n: int) -> None:
    """dst bits [dst_bit, dst_bit+n) = src bits [src_bit, src_bit+n), MSB-first; other dst bits unchanged."""
    if n <= 0:
        return
    if dst_bit % 8 == 0 and src_bit % 8 == 0:
        db, sb = dst_bit // 8, src_bit // 8
        whole = n // 8
        dst[db : db + whole] = src[sb : sb + whole]
        rem = n % 8
        if rem:
            mask = (0xFF << (8 - rem)) & 0xFF
            dst[db + whole] = (dst[db + whole] & ~mask & 0xFF) | (src[sb + whole] & mask)
        return
    # Unaligned: only blocks smaller than 4 KiB lead here (one bitmap byte covers 4 KiB); rare, so numpy.
    bits = np.unpackbits(np.frombuffer(src, dtype=np.uint8))[src_bit : src_bit + n]
    d = np.unpackbits(np.frombuffer(bytes(dst), dtype=np.uint8))
    d[dst_bit : dst_bit + n] = bits
    dst[:] = np.packbits(d).tobytes()[: len(dst)]


# --------------------------------------------------------------------------------------------- opening


def _find_parent_any_id(img: Image, allowed: Sequence[str]) -> str:
    """Like chain.resolve_parent, but accept the first candidate that is a VHD whatever its unique id
    (for ``force=parent-id``)."""
    me = os.path.realpath(img.path)
    child_dir = os.path.dirname(me)
    for source, raw in img.parent_candidates():
        for name in _candidate_names(source, raw):
            cands = ([name] + [os.path.join(d, os.path.basename(name)) for d in allowed]
                     if os.path.isabs(name) else [os.path.join(child_dir, name)])
            for cand in cands:
                real = os.path.realpath(cand)
                if real == me or not _within(real, allowed) or not os.path.isfile(real):
                    continue
                try:
                    with Image(real, "r", strict=False):
                        return real
                except VHDError:
                    continue
    return resolve_parent(img, allowed)  # raises ParentNotFoundError naming every path tried


def _open_layers(child: str, parent_dirs: Sequence[str], strict: bool, force: set[str],
                 warnings: list[str]) -> list[Image]:
    """The child's whole chain, every file read-only, leaf first. As chain.open_layers, but a parent whose
    unique id differs is an UnsafeOperationError (overridable with force 'parent-id'), not a dead end."""

    def on_mismatch(img: Image, allowed: Sequence[str], e: ParentMismatchError) -> str:
        if FORCE_PARENT_ID not in force:
            raise UnsafeOperationError(
                f"the parent of {img.path} does not carry the unique id the child records ({e.message}); "
                "its data may not be what the child was written over. Pass force "
                f"'{FORCE_PARENT_ID}' (--force {FORCE_PARENT_ID}) to merge anyway",
                path=img.path, offset=e.offset, field="header.parent_unique_id", value=e.value) from None
        ppath = _find_parent_any_id(img, allowed)
        warnings.append(f"{img.path}: parent {ppath} has a different unique id than the child records "
                        f"(merged anyway: force '{FORCE_PARENT_ID}')")
        return ppath

    layers, found = open_layers(child, "r", parent_dirs, strict=strict, on_mismatch=on_mismatch)
    warnings.extend(found)
    return layers


# --------------------------------------------------------------------------------------------- the merge


class _Merger:
    def __init__(self, layers: list[Image], k: int, report: CoalesceReport, io: WriteIO, batch_bytes: int,
                 use_copy_range: bool, progress: ProgressFn | None) -> None:
        self.sources = layers[:k]
        self.target = layers[k]
        self.below = layers[k + 1 :]
        self.report = report
        self.io = io
        self.progress = as_progress(progress) if progress is not None else None
        self.journal: MergeProgress | None = None  # resume=True: the blocks merged so far (merge_progress)
        self._block = 0
        self.use_copy_range = use_copy_range
        self.batch_bytes = batch_bytes
        self.limit = self.sources[0].size  # the leaf's view is what must survive
        T = self.target
        if T.is_fixed:
            self.unit = min(max(max(L.block_size for L in self.sources), _MIN_FIXED_UNIT), _MAX_FIXED_UNIT)
        else:
            self.unit = T.block_size
        self.nsec_unit = self.unit // SECTOR_SIZE
        self.bm_bytes = -(-self.nsec_unit // 8)
        self.buf = bytearray(self.unit)
        self.tmp = bytearray(self.unit)
        self.filled = bytearray(self.bm_bytes)
        self.lbm = bytearray(self.bm_bytes)
        self.zero_bm = bytes(self.bm_bytes)

    # ------------------------------------------------------------------------- planning

    def target_blocks(self) -> np.ndarray:
        """Target-unit indexes that some source layer has an allocated block over (within the leaf's size)."""
        U = self.unit
        parts = []
        for L in self.sources:
            alloc = L.allocated_blocks().astype(np.int64)
            if not len(alloc):
                continue
            start = alloc * L.block_size
            end = np.minimum(start + L.block_size, min(L.size, self.limit))
            keep = start < end
            start, end = start[keep], end[keep]
            first = start // U
            last = (end - 1) // U
            counts = last - first + 1
            if len(counts) and counts.max() > 1:
                base = np.repeat(first, counts)
                offs = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
                parts.append(base + offs)
            else:
                parts.append(first)
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.concatenate(parts))

    def order(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(blocks the target already has, in its file order; new blocks, in virtual order).

        In-place writes then sweep the target file once, and new blocks are appended in the order readers of
        the virtual disk will want them."""
        T = self.target
        if T.is_fixed:
            return blocks, np.zeros(0, dtype=np.int64)
        entries = T.bat[blocks]
        have = entries != UNUSED_BAT_ENTRY
        existing = blocks[have]
        existing = existing[np.argsort(entries[have], kind="stable")]
        return existing, blocks[~have]

    def below_has_data(self, v0: int, v1: int) -> bool:
        """Whether any layer under the target may hold data in [v0, v1) (conservatively: an allocated block)."""
        for B in self.below:
            if v0 >= B.size:
                continue
            if B.is_fixed:
                return True
            alloc = B.allocated_blocks()
            first = v0 // B.block_size
            last = (min(v1, B.size) - 1) // B.block_size
            i = int(np.searchsorted(alloc, first))
            if i < len(alloc) and alloc[i] <= last:
                return True
        return False

    # ------------------------------------------------------------------------- gathering

    def _layer_bitmap(self, L: Image, v0: int, v1: int, out: bytearray) -> list[tuple[int, int, int]]:
        """Fill ``out`` (zeroed) with L's present bits for the sectors of [v0, v1); return the pieces
        ``(offset in block, file offset, length)`` of L's allocated blocks over that range."""
        if v0 >= L.size:
            return []
        v1 = min(v1, L.size)
        sbs = L.block_size
        alloc = L.allocated_blocks()
        first, last = v0 // sbs, (v1 - 1) // sbs
        i0 = int(np.searchsorted(alloc, first))
        found: list[tuple[int, int, int]] = []
        bat = L.bat
        for i in range(i0, len(alloc)):
            sb = int(alloc[i])
            if sb > last:
                break
            b0 = sb * sbs
            s = max(v0, b0)
            e = min(v1, b0 + sbs)
            bm = L.read_bitmap(sb)
            _copy_bits(out, (s - v0) // SECTOR_SIZE, bm, (s - b0) // SECTOR_SIZE, (e - s) // SECTOR_SIZE)
            found.append((s - v0, int(bat[sb]) * SECTOR_SIZE + L.bitmap_size + (s - b0), e - s))
        return found

    def _read_pieces(self, L: Image, lp: list[tuple[int, int, int]], dst: memoryview) -> None:
        for rel, foff, n in lp:
            L.preadinto(foff, dst[rel : rel + n])

    # ------------------------------------------------------------------------- one block

    def merge(self, tb: int, w: TargetWriter, is_new: bool) -> None:
        rep = self.report
        T = self.target
        U = self.unit
        v0 = tb * U
        v1 = min(v0 + U, self.limit)
        n = v1 - v0
        nsec = n // SECTOR_SIZE
        filled = self.filled
        filled[:] = self.zero_bm
        lbm = self.lbm
        contrib: list[tuple[Image, list, bytes, int]] = []
        for L in self.sources:
            lbm[:] = self.zero_bm
            layer_pieces = self._layer_bitmap(L, v0, v1, lbm)
            if not layer_pieces:
                continue
            if contrib:
                K.bitmap_andnot(lbm, filled)  # sectors a higher layer holds are not this layer's to give
            c = K.bitmap_count(lbm, 0, nsec)
            if c == 0:
                continue
            contrib.append((L, layer_pieces, bytes(lbm), c))
            K.bitmap_or(filled, lbm)
        if not contrib:
            if is_new:
                w.skip_candidate()
            self._advance(n)
            return
        copied = sum(c for *_, c in contrib)
        full = copied == nsec

        # Where the block is in the target, and what the target held there.
        dest: int | None = v0 if T.is_fixed else T.block_file_offset(tb)
        # Dynamic targets too: libvhd reads a clear bit of a dynamic disk as zeros, so the copied sectors' bits
        # are ORed into the target's bitmap whatever its type.
        tbm = T.read_bitmap(tb) if (dest is not None and not T.is_fixed) else None
        if dest is not None:
            if tbm is None:
                rep.shadowed_sectors += copied
            else:
                only = bytearray(filled)
                K.bitmap_andnot(only, memoryview(tbm)[: self.bm_bytes])
                rep.shadowed_sectors += copied - K.bitmap_count(only, 0, nsec)
        zero_check = dest is None and not self.below_has_data(v0, v1)

        single = len(contrib) == 1 and full
        direct = None
        if single and not zero_check and self.use_copy_range:
            L, lp = contrib[0][0], contrib[0][1]
            if all(lp[j][1] + lp[j][2] == lp[j + 1][1] for j in range(len(lp) - 1)):
                direct = (L.fd, lp[0][1])
        buf = memoryview(self.buf)[:n]

        if dest is not None and direct is None and not full:
            runs = [[r for r in K.bitmap_runs(mask, 0, nsec) if r[2]] for _L, _lp, mask, _c in contrib]
            if sum(len(r) for r in runs) <= MAX_RUN_WRITES:
                self._write_runs(w, contrib, runs, dest, n)
                self._account(copied, single)
                self._bitmap_update(w, tb, tbm)
                self._advance(n)
                return

        if direct is None:
            if not full:
                if dest is not None:
                    T.preadinto(dest, buf)
                else:
                    _zero(buf)
            tmp = memoryview(self.tmp)[:n]
            for L, lp, mask, c in contrib:
                if c == nsec:
                    self._read_pieces(L, lp, buf)
                else:
                    self._read_pieces(L, lp, tmp)
                    K.merge_block(buf, tmp, mask)
            if zero_check and K.is_zero(buf):
                rep.zero_blocks_skipped += 1
                w.skip_candidate()
                self._advance(n)
                return
        self._account(copied, single)

        if dest is not None:
            self._write_data(w, direct, buf, dest, n)
            self._bitmap_update(w, tb, tbm)
        else:
            # Exactly the sectors some source holds, in a dynamic target as in a differencing one: the others
            # read as zeros (dynamic) or through to the layers below (differencing), as they did before.
            bm = bytearray(T.bitmap_size)
            bm[: self.bm_bytes] = filled
            bitmap = bytes(bm)
            off = w.new_slot()
            data_off = off + T.bitmap_size
            if n < U:  # the last block of a disk whose size is not a multiple of the block: zeros after its end
                _zero(memoryview(self.buf)[n:U])
            if direct is not None:
                w.write([bitmap], off)
                self._write_data(w, direct, buf, data_off, n)
                if n < U:
                    w.write(pieces(memoryview(self.buf)[n:U]), data_off + n)
            else:
                w.write([bitmap] + pieces(memoryview(self.buf)[:U]), off)
            T._bitmap_cache.pop(tb, None)
            w.add_block(tb, off)
            rep.blocks_allocated += 1
        self._advance(n)

    def _account(self, copied: int, single: bool) -> None:
        rep = self.report
        rep.blocks_copied += 1
        rep.bytes_copied += copied * SECTOR_SIZE
        if single:
            rep.full_blocks += 1
        else:
            rep.partial_blocks += 1

    def _bitmap_update(self, w: TargetWriter, tb: int, tbm: bytes | None) -> None:
        """An existing block of a dynamic or differencing target: its bitmap gains the copied sectors (after
        their data)."""
        if tbm is None:
            return
        new = bytearray(tbm)
        K.bitmap_or(memoryview(new)[: self.bm_bytes], self.filled)
        if new != tbm:
            w.add_bitmap(tb, int(self.target.bat[tb]) * SECTOR_SIZE, bytes(new))

    def _write_runs(self, w: TargetWriter, contrib: list, runs: list, dest: int, n: int) -> None:
        """Each layer's runs straight from its block to the target (the target's other sectors untouched)."""
        tmp = memoryview(self.tmp)[:n]
        for (L, lp, _mask, _c), layer_runs in zip(contrib, runs):
            self._read_pieces(L, lp, tmp)
            for first, length, _present in layer_runs:
                a, b = first * SECTOR_SIZE, (first + length) * SECTOR_SIZE
                w.write(pieces(tmp[a:b]), dest + a)

    def _write_data(self, w: TargetWriter, direct, buf: memoryview, dest: int, n: int) -> None:
        if direct is not None:
            try:
                w.copy(direct[0], direct[1], dest, n)
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.use_copy_range = False  # this file system cannot: copy through memory from now on
                _preadinto(direct[0], buf, direct[1])
        w.write(pieces(buf), dest)

    def _advance(self, n: int) -> None:
        if self.journal is not None:  # the block is written (or needed nothing): a checkpoint may count it
            self.journal.add(self._block, n)
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total, state="coalescing")

    # ------------------------------------------------------------------------- whole run

    def run(self, journal: MergeProgress | None = None) -> None:
        T = self.target
        blocks = self.target_blocks()
        self.journal = journal
        if journal is not None:  # resume: blocks an interrupted run of this same merge made durable are done
            left = journal.remaining(blocks)
            self.report.blocks_resumed = len(blocks) - len(left)
            blocks = left
        existing, new = self.order(blocks)
        self.total = int(np.minimum(self.unit, self.limit - blocks * self.unit).sum()) if len(blocks) else 0
        self.done = 0
        if self.progress is not None:
            self.progress(0, self.total, state="coalescing")
        w = TargetWriter(T, self.io, self.batch_bytes, int(len(new)))
        try:
            w.reserve()
            for b, is_new in [(b, False) for b in existing.tolist()] + [(b, True) for b in new.tolist()]:
                self._block = b
                self.merge(b, w, is_new)
                if journal is not None and journal.due():
                    w.checkpoint()
                    journal.save()
            w.finish()
        except BaseException as exc:
            w.abort()
            if journal is not None and not isinstance(exc, OSError):
                # stopped on purpose (a time limit) or by a bug, not by the disk: keep what was merged
                with contextlib.suppress(Exception):
                    w.checkpoint()
                    journal.save()
            raise


# --------------------------------------------------------------------------------------------- verification


def _block_digests(disk: Disk, unit: int, limit: int, blocks: Iterable[int],
                   progress: ProgressFn | None = None) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    buf = bytearray(unit)
    blocks = list(blocks)
    total = sum(min(unit, limit - b * unit) for b in blocks)
    done = 0
    for b in blocks:
        v0 = b * unit
        n = min(unit, limit - v0)
        mv = memoryview(buf)[:n]
        disk.readinto(v0, mv)
        out[b] = xxhash.xxh3_128_digest(mv)
        done += n
        if progress is not None:
            progress(done, total, state="verifying")
    return out


def _data_units(layers: Sequence[Image], unit: int, limit: int) -> np.ndarray:
    """Units of the virtual disk [0, limit) that some layer may hold data in (all of them under a fixed layer)."""
    nunits = -(-limit // unit)
    parts = []
    for L in layers:
        if L.is_fixed:
            return np.arange(nunits, dtype=np.int64)
        alloc = L.allocated_blocks().astype(np.int64)
        if not len(alloc):
            continue
        start = alloc * L.block_size
        end = np.minimum(start + L.block_size, min(L.size, limit))
        keep = start < end
        first = start[keep] // unit
        last = (end[keep] - 1) // unit
        counts = last - first + 1
        base = np.repeat(first, counts)
        offs = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        parts.append(base + offs)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(parts))


def _first_difference(a: Disk, b: Disk, v0: int, n: int) -> int:
    x = np.frombuffer(a.read(v0, n), dtype=np.uint8)
    y = np.frombuffer(b.read(v0, n), dtype=np.uint8)
    diff = np.flatnonzero(x != y)
    return v0 + int(diff[0]) if len(diff) else v0


# --------------------------------------------------------------------------------------------- the operation


def coalesce(
    child: str | os.PathLike[str],
    *,
    into: str | os.PathLike[str] | None = None,
    verify: bool = False,
    progress: ProgressFn | None = None,
    remove_child: bool = False,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    parent_dirs: Sequence[str | os.PathLike[str]] | None = None,
    force: Iterable[str] = (),
    strict: bool = True,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    use_copy_range: bool = True,
    resume: bool = False,
) -> CoalesceReport:
    """Merge ``child`` into its parent (or every layer from ``child`` down to just above ``into`` into ``into``).

    ``verify`` hashes the chain's content per block before and the target's after (xxh3-128) and raises
    VerificationError at the first differing offset. ``remove_child`` then re-points the child's own children
    (found in ``search_dirs``, default the child's directory) at the target and deletes the merged layers.
    ``force`` overrides the safety refusals it names: 'other-children' (other disks depend on the target or an
    intermediate layer), 'parent-id' (a parent's unique id is not the one its child records), 'saved-state'.
    ``progress(done, total)`` is called with bytes of the virtual disk processed.
    ``resume`` keeps a journal of the blocks merged so far (vhdcore.ops.coalesce.resume), so that a rerun after a
    crash, a kill or a time limit merges only what was left (``blocks_resumed`` in the report).
    """
    t0 = time.perf_counter()
    force_set = set(force)
    unknown = force_set - set(FORCE_CHOICES)
    if unknown:
        raise ValueError(f"unknown force option(s) {sorted(unknown)}; choose from {', '.join(FORCE_CHOICES)}")
    child = os.fspath(child)
    warnings: list[str] = []
    pdirs = [os.fspath(d) for d in (parent_dirs or ())]
    finished = _finish_interrupted_removal(child, os.fspath(into) if into is not None else None, warnings, pdirs,
                                           [os.fspath(d) for d in (search_dirs or ())])
    if finished is not None:
        return finished
    layers = _open_layers(child, pdirs, strict, force_set, warnings)
    target_rw: Image | None = None
    fresh: list[Image] = []
    ios: list[WriteIO] = []
    try:
        leaf = layers[0]
        if not leaf.is_differencing:
            raise ChainError("not a differencing disk: it has no parent to merge into", path=leaf.path,
                             field="footer.disk_type", value=int(leaf.disk_type))
        k = _target_index(layers, into)
        sources = layers[:k]
        target = layers[k]
        child_dir = os.path.dirname(os.path.realpath(leaf.path))
        dirs = [os.path.realpath(os.fspath(d)) for d in (search_dirs or [child_dir])]
        # Locks in the one order (vhdcore.disk.locks): the merged layers from the leaf down (exclusive when they will
        # be deleted, so no snapshot can take one as its parent meanwhile), then the target, exclusive, before
        # any safety check, so that no disk can come to depend on it between the check and the merge.
        for L in sources:
            lock(L, exclusive=remove_child, why="it cannot be merged while another process writes or reads it "
                 "as a parent" if remove_child else "it cannot be merged while it changes")
        target_rw = Image(target.path, "r+", strict=strict)
        if _identity(target_rw) != _identity(target):
            raise ChainError("the target file was replaced while opening it", path=target.path, field="file")
        journal = _own_journal(layers, k)
        # A journal's relinks count only once bound to disks found now (relink.bind_plans): never its names.
        replay = bind_plans(journal, journal_path(leaf.path), [leaf.unique_id, target.unique_id], target,
                            dirs) if journal else []
        _check_safety(layers, k, dirs, force_set, warnings, replay)
        grandchildren = [d.path for d in dependents(leaf, dirs)] if remove_child else []
        if remove_child:
            known = {os.path.realpath(g) for g in grandchildren}
            grandchildren += [p.path for p in replay if os.path.realpath(p.path) not in known]
            for g in grandchildren:  # fail now, not after the merge, if one is in use
                Image(g, "r+", strict=False).close()

        # The target, for writing (its exclusive lock taken above), replaces its read-only image in the chain.
        layers[k] = target_rw
        target.close()
        target = target_rw

        rep = CoalesceReport(child=leaf.path, target=target.path, target_type=target.disk_type.label,
                             merged_layers=[L.path for L in sources], backend=K.BACKEND, block_size=0,
                             target_size_before=target.file_size)
        io = WriteIO()
        ios.append(io)
        # With verify the job has three stages (hash the chain, merge, hash the result), each shown as it runs.
        stages = Stages(progress, {"verify-before": 1, "merge": 2, "verify-after": 1}) if verify and progress \
            else None
        merger = _Merger(layers, k, rep, io, batch_bytes, use_copy_range,
                         stages.stage("merge", "coalescing") if stages else progress)
        rep.block_size = merger.unit
        unit, limit = merger.unit, merger.limit

        before: dict[int, bytes] = {}
        if verify:
            tv = time.perf_counter()
            before = _block_digests(Disk(layers), unit, limit, _data_units(layers, unit, limit),
                                    stages.stage("verify-before", "verifying") if stages else None)
            rep.verify_seconds += time.perf_counter() - tv

        journal = MergeProgress(sources, target, unit, limit) if resume else None
        merger.run(journal)
        if journal is not None:
            journal.remove()
        rep.target_size_after = target.file_size

        if verify:
            tv = time.perf_counter()
            fresh = [Image(target.path, "r", strict=strict)]
            after_disk = Disk(fresh + layers[k + 1 :])
            after_units = _data_units(after_disk.layers, unit, limit)
            zero_digest = {}
            check = sorted(set(before) | set(int(u) for u in after_units))
            vprog = as_progress(stages.stage("verify-after", "verifying") if stages else None)
            vtotal, vdone = sum(min(unit, limit - b * unit) for b in check), 0
            for b in check:
                n = min(unit, limit - b * unit)
                got = _block_digests(after_disk, unit, limit, [b])[b]
                vdone += n
                vprog(vdone, vtotal, state="verifying")
                want = before.get(b)
                if want is None:
                    want = zero_digest.setdefault(n, xxhash.xxh3_128_digest(bytes(n)))
                if got != want:
                    off = _first_difference(Disk(layers), after_disk, b * unit, n)
                    raise VerificationError(
                        f"after coalescing, the target's content differs from the chain's content before, first "
                        f"at virtual offset {off}", path=target.path, offset=off, field="content")
            rep.verified = True
            rep.verify_seconds += time.perf_counter() - tv

        rep.writes, rep.syncs = io.writes, io.syncs
        if remove_child:
            _relink_and_remove(layers, k, grandchildren, io, rep)
        rep.warnings = warnings + rep.warnings
        rep.seconds = time.perf_counter() - t0
        return rep
    finally:
        for io_ in ios:
            io_.close()
        for im in fresh:
            im.close()
        for im in layers:
            im.close()
        if target_rw is not None:
            target_rw.close()


def _target_index(layers: list[Image], into: str | os.PathLike[str] | None) -> int:
    if len(layers) < 2:
        raise ChainError("the disk has no parent", path=layers[0].path)
    if into is None:
        return 1
    want = os.stat(os.fspath(into))
    for i, L in enumerate(layers):
        st = os.fstat(L.fd)
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            if i == 0:
                raise ChainError("cannot coalesce a disk into itself", path=L.path, field="into", value=into)
            return i
    raise ChainError(f"{os.fspath(into)} is not an ancestor of this disk (chain: "
                     f"{' <- '.join(L.path for L in reversed(layers))})", path=layers[0].path, field="into",
                     value=os.fspath(into))


def _own_journal(layers: list[Image], k: int) -> dict | None:
    """The journal beside the child if an interrupted ``remove_child`` run of this same coalesce (same child,
    same target) left it; None otherwise."""
    rec = read_journal(layers[0].path)
    if rec and rec.get("child_unique_id") == str(layers[0].unique_id) \
            and rec.get("target_unique_id") == str(layers[k].unique_id):
        return rec
    return None


def _check_safety(layers: list[Image], k: int, dirs: list[str], force: set[str], warnings: list[str],
                  replay: list[RelinkPlan]) -> None:
    sources, target = layers[:k], layers[k]
    for img in sources + [target]:
        if img.footer.saved_state:
            if FORCE_SAVED_STATE not in force:
                raise UnsafeOperationError(
                    "the disk is in saved state (a suspended VM's disk): merging would change what the VM resumes "
                    f"on. Pass force '{FORCE_SAVED_STATE}' (--force {FORCE_SAVED_STATE}) to merge anyway",
                    path=img.path, offset=img.footer_offset + 84 if img.footer_offset >= 0 else 84,
                    field="footer.saved_state", value=img.footer.saved_state)
            warnings.append(f"{img.path}: in saved state (merged anyway: force '{FORCE_SAVED_STATE}')")
    for i in range(len(sources)):
        if sources[i].size > layers[i + 1].size:
            raise UnsupportedFeatureError(
                f"the disk ({sources[i].size} bytes) is larger than its parent {layers[i + 1].path} "
                f"({layers[i + 1].size} bytes): its data past the parent's end has nowhere to go (resize the parent "
                "first)", path=sources[i].path, field="footer.current_size", value=sources[i].size)
    # Every disk whose view goes through a layer we change (the target and the intermediate layers) other than
    # the chain's own would see different content.
    already = {os.path.realpath(p.path) for p in replay}  # relinked by the interrupted run: bound, not named
    child_dir = os.path.dirname(os.path.realpath(layers[0].path))
    for i in range(1, k + 1):
        img = layers[i]
        layer_dir = os.path.dirname(os.path.realpath(img.path))
        scan = sorted(set(dirs) | {layer_dir} | (_sibling_dirs(layer_dir) if layer_dir != child_dir else set()))
        deps = [d for d in dependents(img, scan, exclude=[layers[i - 1].path])
                if not (i == k and d.path in already)]
        if not deps:
            continue
        names = "; ".join(f"{d.path} ({d.reason})" for d in deps[:10]) + (
            f"; and {len(deps) - 10} more" if len(deps) > 10 else "")  # a shared base may have hundreds
        if FORCE_OTHER_CHILDREN not in force:
            raise UnsafeOperationError(
                f"other disks depend on {img.path} and would see their content change: {names}. Coalesce those "
                f"first, or pass force '{FORCE_OTHER_CHILDREN}' (--force {FORCE_OTHER_CHILDREN}) if they are "
                "disposable", path=img.path, field="children", value=len(deps))
        warnings.append(f"{img.path}: merged although other disks depend on it: {names}")


# A shared parent's directory and its siblings: at most this many are searched for its other children.
MAX_SIBLING_DIRS = 10_000


def _sibling_dirs(layer_dir: str) -> set[str]:
    """The directories beside ``layer_dir`` (its parent's subdirectories, not through symlinks).

    A layer outside the child's own directory, found through --parent-dir, is typically a shared base (an
    image cache such as OpenStack's ``instances/_base`` beside ``instances/<vm>/``): its other children live in
    the sibling directories, not in its own, and a coalesce into it must know them before changing it."""
    up = os.path.dirname(layer_dir)
    out: set[str] = set()
    try:
        with os.scandir(up) as it:
            for entry in it:
                if len(out) >= MAX_SIBLING_DIRS:
                    break
                if entry.is_dir(follow_symlinks=False):
                    out.add(os.path.join(up, entry.name))
    except OSError:
        pass
    return out


def _relink_and_remove(layers: list[Image], k: int, grandchildren: list[str], io: WriteIO,
                       rep: CoalesceReport) -> None:
    leaf, target = layers[0], layers[k]
    merged = [L.path for L in layers[:k]]
    # Every relink's bytes go into the journal before the first is written: a header torn by a crash is then
    # rewritten whole by the rerun (_journal_children, or _finish_interrupted_removal once layers were deleted)
    # instead of leaving a grandchild with a bad checksum.
    plans = [plan_relink(g, target) for g in grandchildren]
    jpath = write_journal(leaf.path, {
        "version": 2, "child": os.path.realpath(leaf.path), "child_unique_id": str(leaf.unique_id),
        "target": os.path.realpath(target.path), "target_unique_id": str(target.unique_id),
        "merged": merged, "children": [os.path.realpath(g) for g in grandchildren],
        "relinks": [p.to_json() for p in plans]})
    for g, plan in zip(grandchildren, plans):
        apply_relink(plan, io=io)
        rep.warnings.extend(plan.warnings)
        rep.relinked.append(g)
    # The merged layers stay open, locked, until they are unlinked: no snapshot can take one as its parent.
    _remove_merged(merged, jpath, rep)


def _remove_merged(merged: list[str], jpath: str, rep: CoalesceReport) -> None:
    """Delete the merged layers deepest first and the child (beside which the journal lies) last, then the journal.

    A crash part-way leaves the child and its journal, so coalescing the child again finds the journal and
    finishes (:func:`_finish_interrupted_removal`) instead of leaving layers that nothing references.
    """
    for p in list(reversed(merged[1:])) + merged[:1]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
        rep.removed.append(p)
    for d in sorted({os.path.dirname(os.path.realpath(p)) for p in merged}):
        fsync_dir(d)
    os.unlink(jpath)


def _lexists(p: str) -> bool:
    try:
        os.lstat(p)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True  # cannot tell: treat as present, so nothing is taken for deleted
    return True


def _finish_interrupted_removal(child: str, into: str | None, warnings: list[str], parent_dirs: list[str],
                                search_dirs: list[str]) -> CoalesceReport | None:
    """Finish a ``remove_child`` run that died while deleting the merged layers (the child's chain no longer
    opens: some of its layers are gone, or the child itself is, and only the journal is left). None when there
    is no such run to finish: the caller goes on as usual.

    The journal exists only once the target was durable (and verified when asked) and holds every relink. It is
    believed only as far as it matches what is found now: its merged layers that still exist must be, by
    device and inode, the child's chain as it resolves (a prefix of it: layers are deleted deepest first), the
    rest must be gone; its target must carry the recorded unique id inside the chain's directories; its relinks
    must bind to the chain's children (relink.bind_plans). Anything else is a JournalError and nothing is
    deleted or written. Then the relinks are replayed and what is left of the merged layers is deleted.
    """
    child_real = os.path.realpath(child)
    jpath = journal_path(child)
    rec = read_journal(child)
    if not rec or rec.get("child") != child_real:
        return None
    merged = rec.get("merged")
    if not isinstance(merged, list) or not merged or len(merged) > 4096 or not all(isinstance(p, str)
                                                                                  for p in merged):
        raise JournalError("the journal's list of merged layers is not a list of paths", path=jpath, field="merged")
    if merged[0] != child_real:
        raise JournalError("the journal's first merged layer is not the child it lies beside", path=jpath,
                           field="merged[0]", value=merged[0])
    present = [_lexists(p) for p in merged]
    if all(present):
        return None  # the chain is whole: the usual path redoes the merge and replays the (bound) relinks
    n = present.index(False)
    if any(present[n:]):
        raise JournalError("the journal's merged layers are not a prefix of the chain (layers are deleted deepest "
                           f"first, yet {merged[n]} is gone and a deeper one exists)", path=jpath, field="merged")
    target_path = str(rec.get("target", ""))
    if into is not None and os.path.realpath(into) != target_path:
        return None
    child_dir = os.path.dirname(child_real)
    allowed = sorted({child_dir, *(os.path.realpath(d) for d in parent_dirs + search_dirs)})
    if n == 0:
        # Killed after the child's unlink, before the journal's: every relink and deletion is done.
        os.unlink(jpath)
        fsync_dir(child_dir)
        warnings.append(f"{child}: removed the journal of a finished coalesce into {target_path} (the run was "
                        "interrupted just before removing it)")
        rep = CoalesceReport(child=child_real, target=target_path, target_type="", merged_layers=list(merged),
                             backend=K.BACKEND, block_size=0)
        rep.warnings = list(warnings)
        return rep
    # The layers still present must be the chain as it resolves now, file for file.
    walked: list[tuple[int, int]] = []
    img = Image(child, "r", strict=False)
    try:
        if str(img.unique_id) != rec.get("child_unique_id"):
            return None
        leaf_path = img.path
        while len(walked) < n:
            walked.append(_identity(img))
            if len(walked) == n or not img.is_differencing:
                break
            try:
                nxt = resolve_parent(img, allowed)
            except VHDError:
                break
            img.close()
            img = Image(nxt, "r", strict=False)
    finally:
        img.close()
    for i, p in enumerate(merged[:n]):
        st = os.stat(p)
        if i >= len(walked) or (st.st_dev, st.st_ino) != walked[i]:
            raise JournalError(f"the journal names {p} as a merged layer, but it is not layer {i} of the child's "
                               "chain", path=jpath, field=f"merged[{i}]", value=p)
    if not _within(os.path.realpath(target_path), allowed):
        raise JournalError(f"the journal's target {target_path} is outside the chain's directories", path=jpath,
                           field="target", value=target_path)
    with Image(target_path, "r") as target:
        if str(target.unique_id) != rec.get("target_unique_id"):
            raise ChainError("the journal of an interrupted coalesce names a target whose unique id changed since",
                             path=target_path, field="footer.unique_id", value=str(target.unique_id))
        rep = CoalesceReport(child=leaf_path, target=target.path, target_type=target.disk_type.label,
                             merged_layers=list(merged), backend=K.BACKEND, block_size=target.block_size or 0)
        with Image(child, "r", strict=False) as leaf:
            plans = bind_plans(rec, jpath, [leaf.unique_id, target.unique_id], target,
                               [os.path.realpath(d) for d in search_dirs] or [child_dir])
    t0 = time.perf_counter()
    for plan in plans:
        apply_relink(plan)
        rep.relinked.append(plan.path)
    rep.warnings = warnings + [f"{leaf_path}: finished the removal of an interrupted coalesce from its journal "
                               f"(merged into {target_path}; layers already deleted: "
                               f"{', '.join(p for p in merged[n:])})"]
    _remove_merged(merged[:n], jpath, rep)
    rep.seconds = time.perf_counter() - t0
    return rep


__all__ = ["coalesce", "CoalesceReport", "FORCE_CHOICES", "FORCE_OTHER_CHILDREN", "FORCE_PARENT_ID",
           "FORCE_SAVED_STATE", "DEFAULT_BATCH_BYTES", "journal_path"]

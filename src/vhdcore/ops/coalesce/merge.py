"""The merge itself: every sector the source layers hold goes into the target, target block by target block.

For each target block the source layers' sector bitmaps are combined first (top layer wins: a lower layer
contributes only the sectors no higher layer holds), so each target sector is written once. How a block is
written depends on what it gets and where it goes (the package docstring lists the cases); the target's
metadata (BAT, bitmaps, footer) follows its data through :class:`~.writer.TargetWriter`.
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Callable, NamedTuple

import numpy as np

from ... import kernels as K
from ...disk.image import Image
from ...fileio import zero_fill
from ...format.structs import SECTOR_SIZE, UNUSED_BAT_ENTRY
from ...progress import as_progress
from .layers import MergeChain
from .report import CoalesceReport
from .resume import MergeProgress
from ...fileio import WriteIO, pieces
from .writer import TargetWriter

__all__ = ["Merger", "DEFAULT_BATCH_BYTES", "MAX_RUN_WRITES", "ProgressFn"]

MiB = 1024 * 1024

# New blocks written between two metadata commits (each commit is one fdatasync, overlapped with the next batch).
DEFAULT_BATCH_BYTES = 256 * MiB
# A partial block over an existing target block with at most this many runs has its runs written one by one
# (each a page-cache write, no metadata); with more, it is merged in memory and written whole.
MAX_RUN_WRITES = 64
# A fixed target has no blocks: it is processed in units of the child's block size, within these bounds.
_MIN_FIXED_UNIT = 64 * 1024
_MAX_FIXED_UNIT = 8 * MiB

ProgressFn = Callable[[int, int], None]


class Piece(NamedTuple):
    """A stretch of one source block that lies within the target block being merged."""

    offset: int  # in the target block
    file_offset: int  # of the data in the source layer's file
    length: int


class Contribution(NamedTuple):
    """What one source layer gives a target block: the sectors no higher layer holds."""

    layer: Image
    pieces: list[Piece]  # every allocated piece of the layer over the block (the mask picks the sectors)
    mask: bytes  # the sector bitmap of what it gives
    sectors: int  # set bits in ``mask``


class CopySource(NamedTuple):
    """A whole target block's data as one contiguous range of one source file (copied kernel-side)."""

    fd: int
    offset: int


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


def _read_pieces(layer: Image, layer_pieces: list[Piece], dst: memoryview) -> None:
    for piece in layer_pieces:
        layer.preadinto(piece.file_offset, dst[piece.offset : piece.offset + piece.length])


class Merger:
    def __init__(self, chain: MergeChain, report: CoalesceReport, io: WriteIO, batch_bytes: int,
                 use_copy_range: bool, progress: ProgressFn | None) -> None:
        self.sources = chain.sources
        self.target = chain.target
        self.below = chain.below
        self.report = report
        self.io = io
        self.progress = as_progress(progress) if progress is not None else None
        self.merge_progress: MergeProgress | None = None  # resume=True: the blocks merged so far
        self._current_block = 0
        self.use_copy_range = use_copy_range
        self.batch_bytes = batch_bytes
        self.limit = self.sources[0].size  # the leaf's view is what must survive
        target = self.target
        if target.is_fixed:
            self.unit = min(max(max(layer.block_size for layer in self.sources), _MIN_FIXED_UNIT),
                            _MAX_FIXED_UNIT)
        else:
            self.unit = target.block_size
        self.unit_sectors = self.unit // SECTOR_SIZE
        self.bitmap_bytes = -(-self.unit_sectors // 8)
        self.buf = bytearray(self.unit)
        self.tmp = bytearray(self.unit)
        self.filled = bytearray(self.bitmap_bytes)  # the sectors some source gives the block being merged
        self.layer_bitmap = bytearray(self.bitmap_bytes)
        self.zero_bitmap = bytes(self.bitmap_bytes)
        self.done = 0
        self.total = 0

    # ------------------------------------------------------------------------- planning

    def target_blocks(self) -> np.ndarray:
        """Target-unit indexes that some source layer has an allocated block over (within the leaf's size)."""
        unit = self.unit
        parts = []
        for layer in self.sources:
            alloc = layer.allocated_blocks().astype(np.int64)
            if not len(alloc):
                continue
            start = alloc * layer.block_size
            end = np.minimum(start + layer.block_size, min(layer.size, self.limit))
            keep = start < end
            start, end = start[keep], end[keep]
            first = start // unit
            last = (end - 1) // unit
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
        target = self.target
        if target.is_fixed:
            return blocks, np.zeros(0, dtype=np.int64)
        entries = target.bat[blocks]
        have = entries != UNUSED_BAT_ENTRY
        existing = blocks[have]
        existing = existing[np.argsort(entries[have], kind="stable")]
        return existing, blocks[~have]

    def below_has_data(self, start: int, end: int) -> bool:
        """Whether any layer under the target may hold data in [start, end) (conservatively: an allocated
        block)."""
        for layer in self.below:
            if start >= layer.size:
                continue
            if layer.is_fixed:
                return True
            alloc = layer.allocated_blocks()
            first = start // layer.block_size
            last = (min(end, layer.size) - 1) // layer.block_size
            i = int(np.searchsorted(alloc, first))
            if i < len(alloc) and alloc[i] <= last:
                return True
        return False

    # ------------------------------------------------------------------------- gathering

    def _layer_bitmap(self, layer: Image, start: int, end: int, out: bytearray) -> list[Piece]:
        """Fill ``out`` (zeroed) with the layer's present bits for the sectors of [start, end); return the
        pieces of the layer's allocated blocks over that range."""
        if start >= layer.size:
            return []
        end = min(end, layer.size)
        block_size = layer.block_size
        alloc = layer.allocated_blocks()
        first, last = start // block_size, (end - 1) // block_size
        found: list[Piece] = []
        bat = layer.bat
        for i in range(int(np.searchsorted(alloc, first)), len(alloc)):
            block = int(alloc[i])
            if block > last:
                break
            block_start = block * block_size
            lo = max(start, block_start)
            hi = min(end, block_start + block_size)
            bitmap = layer.read_bitmap(block)
            _copy_bits(out, (lo - start) // SECTOR_SIZE, bitmap, (lo - block_start) // SECTOR_SIZE,
                       (hi - lo) // SECTOR_SIZE)
            data = int(bat[block]) * SECTOR_SIZE + layer.bitmap_size  # the block's data in the layer's file
            found.append(Piece(lo - start, data + (lo - block_start), hi - lo))
        return found

    def _contributions(self, start: int, end: int, sectors: int) -> list[Contribution]:
        """Each source layer's share of [start, end), top layer first; ``self.filled`` ends as their union."""
        filled = self.filled
        filled[:] = self.zero_bitmap
        mask = self.layer_bitmap
        out: list[Contribution] = []
        for layer in self.sources:
            mask[:] = self.zero_bitmap
            layer_pieces = self._layer_bitmap(layer, start, end, mask)
            if not layer_pieces:
                continue
            if out:
                K.bitmap_andnot(mask, filled)  # sectors a higher layer holds are not this layer's to give
            count = K.bitmap_count(mask, 0, sectors)
            if count == 0:
                continue
            out.append(Contribution(layer, layer_pieces, bytes(mask), count))
            K.bitmap_or(filled, mask)
        return out

    def _copy_source(self, contribution: Contribution) -> CopySource | None:
        """The block's one contiguous source range, when its pieces follow each other in the source file."""
        ps = contribution.pieces
        if all(ps[j].file_offset + ps[j].length == ps[j + 1].file_offset for j in range(len(ps) - 1)):
            return CopySource(contribution.layer.fd, ps[0].file_offset)
        return None

    # ------------------------------------------------------------------------- one block

    def merge(self, block: int, writer: TargetWriter, is_new: bool) -> None:
        """Merge target block ``block`` (``is_new``: the target has no block there yet)."""
        target = self.target
        start = block * self.unit
        end = min(start + self.unit, self.limit)
        length = end - start
        sectors = length // SECTOR_SIZE
        contributions = self._contributions(start, end, sectors)
        if not contributions:
            if is_new:
                writer.skip_candidate()
            self._advance(length)
            return
        copied = sum(c.sectors for c in contributions)
        full = copied == sectors

        # Where the block is in the target, and what the target held there.
        dest: int | None = start if target.is_fixed else target.block_file_offset(block)
        # Dynamic targets too: libvhd reads a clear bit of a dynamic disk as zeros, so the copied sectors' bits
        # are ORed into the target's bitmap whatever its type.
        target_bitmap = target.read_bitmap(block) if (dest is not None and not target.is_fixed) else None
        if dest is not None:
            self._count_shadowed(copied, target_bitmap, sectors)
        zero_check = dest is None and not self.below_has_data(start, end)

        single = len(contributions) == 1 and full
        copy_source = (self._copy_source(contributions[0])
                       if single and not zero_check and self.use_copy_range else None)
        buf = memoryview(self.buf)[:length]

        if dest is not None and copy_source is None and not full:
            runs = [[r for r in K.bitmap_runs(c.mask, 0, sectors) if r[2]] for c in contributions]
            if sum(len(r) for r in runs) <= MAX_RUN_WRITES:
                self._write_runs(writer, contributions, runs, dest, length)
                self._account(copied, single)
                self._bitmap_update(writer, block, target_bitmap)
                self._advance(length)
                return

        if copy_source is None:
            self._assemble(buf, contributions, dest, full, sectors)
            if zero_check and K.is_zero(buf):
                self.report.zero_blocks_skipped += 1
                writer.skip_candidate()
                self._advance(length)
                return
        self._account(copied, single)

        if dest is not None:
            self._write_data(writer, copy_source, buf, dest, length)
            self._bitmap_update(writer, block, target_bitmap)
        else:
            self._write_new_block(writer, block, copy_source, buf, length)
        self._advance(length)

    def _count_shadowed(self, copied: int, target_bitmap: bytes | None, sectors: int) -> None:
        """Copied sectors that replace data the target held (all of them in a fixed target)."""
        if target_bitmap is None:
            self.report.shadowed_sectors += copied
            return
        only = bytearray(self.filled)
        K.bitmap_andnot(only, memoryview(target_bitmap)[: self.bitmap_bytes])
        self.report.shadowed_sectors += copied - K.bitmap_count(only, 0, sectors)

    def _assemble(self, buf: memoryview, contributions: list[Contribution], dest: int | None, full: bool,
                  sectors: int) -> None:
        """The merged block in ``buf``: the sources' sectors over the target's own bytes (zeros in a new block)."""
        if not full:
            if dest is not None:
                self.target.preadinto(dest, buf)
            else:
                zero_fill(buf)
        tmp = memoryview(self.tmp)[: len(buf)]
        for c in contributions:
            if c.sectors == sectors:
                _read_pieces(c.layer, c.pieces, buf)
            else:
                _read_pieces(c.layer, c.pieces, tmp)
                K.merge_block(buf, tmp, c.mask)

    def _account(self, copied: int, single: bool) -> None:
        report = self.report
        report.blocks_copied += 1
        report.bytes_copied += copied * SECTOR_SIZE
        if single:
            report.full_blocks += 1
        else:
            report.partial_blocks += 1

    def _bitmap_update(self, writer: TargetWriter, block: int, target_bitmap: bytes | None) -> None:
        """An existing block of a dynamic or differencing target: its bitmap gains the copied sectors (after
        their data)."""
        if target_bitmap is None:
            return
        new = bytearray(target_bitmap)
        K.bitmap_or(memoryview(new)[: self.bitmap_bytes], self.filled)
        if new != target_bitmap:
            writer.add_bitmap(block, int(self.target.bat[block]) * SECTOR_SIZE, bytes(new))

    def _write_runs(self, writer: TargetWriter, contributions: list[Contribution], runs: list, dest: int,
                    length: int) -> None:
        """Each layer's runs straight from its block to the target (the target's other sectors untouched)."""
        tmp = memoryview(self.tmp)[:length]
        for c, layer_runs in zip(contributions, runs):
            _read_pieces(c.layer, c.pieces, tmp)
            for first, count, _present in layer_runs:
                a, b = first * SECTOR_SIZE, (first + count) * SECTOR_SIZE
                writer.write(pieces(tmp[a:b]), dest + a)

    def _write_data(self, writer: TargetWriter, copy_source: CopySource | None, buf: memoryview, dest: int,
                    length: int) -> None:
        if copy_source is not None:
            try:
                writer.copy(copy_source.fd, copy_source.offset, dest, length)
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.use_copy_range = False  # this file system cannot: copy through memory from now on
                _preadinto(copy_source.fd, buf, copy_source.offset)
        writer.write(pieces(buf), dest)

    def _write_new_block(self, writer: TargetWriter, block: int, copy_source: CopySource | None,
                         buf: memoryview, length: int) -> None:
        """A block the target does not have yet, appended: its bitmap, then its data."""
        target, unit = self.target, self.unit
        # Exactly the sectors some source holds, in a dynamic target as in a differencing one: the others
        # read as zeros (dynamic) or through to the layers below (differencing), as they did before.
        bitmap = bytearray(target.bitmap_size)
        bitmap[: self.bitmap_bytes] = self.filled
        bitmap_bytes = bytes(bitmap)
        offset = writer.new_slot()
        data_offset = offset + target.bitmap_size
        if length < unit:  # the last block of a disk whose size is not a multiple of the block: zeros after its end
            zero_fill(memoryview(self.buf)[length:unit])
        if copy_source is not None:
            writer.write([bitmap_bytes], offset)
            self._write_data(writer, copy_source, buf, data_offset, length)
            if length < unit:
                writer.write(pieces(memoryview(self.buf)[length:unit]), data_offset + length)
        else:
            writer.write([bitmap_bytes] + pieces(memoryview(self.buf)[:unit]), offset)
        target._bitmap_cache.pop(block, None)
        writer.add_block(block, offset)
        self.report.blocks_allocated += 1

    def _advance(self, length: int) -> None:
        if self.merge_progress is not None:  # the block is written (or needed nothing): a checkpoint may count it
            self.merge_progress.add(self._current_block, length)
        self.done += length
        if self.progress is not None:
            self.progress(self.done, self.total, state="coalescing")

    # ------------------------------------------------------------------------- whole run

    def run(self, merge_progress: MergeProgress | None = None) -> None:
        blocks = self.target_blocks()
        self.merge_progress = merge_progress
        if merge_progress is not None:  # resume: blocks an interrupted run of this same merge made durable are done
            left = merge_progress.remaining(blocks)
            self.report.blocks_resumed = len(blocks) - len(left)
            blocks = left
        existing, new = self.order(blocks)
        self.total = int(np.minimum(self.unit, self.limit - blocks * self.unit).sum()) if len(blocks) else 0
        self.done = 0
        if self.progress is not None:
            self.progress(0, self.total, state="coalescing")
        writer = TargetWriter(self.target, self.io, self.batch_bytes, int(len(new)))
        try:
            writer.reserve()
            for block, is_new in [(b, False) for b in existing.tolist()] + [(b, True) for b in new.tolist()]:
                self._current_block = block
                self.merge(block, writer, is_new)
                if merge_progress is not None and merge_progress.due():
                    writer.checkpoint()
                    merge_progress.save()
            writer.finish()
        except BaseException as exc:
            writer.abort()
            if merge_progress is not None and not isinstance(exc, OSError):
                # stopped on purpose (a time limit) or by a bug, not by the disk: keep what was merged
                with contextlib.suppress(Exception):
                    writer.checkpoint()
                    merge_progress.save()
            raise

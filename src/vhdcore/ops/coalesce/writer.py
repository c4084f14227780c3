"""The write side of coalesce: every write it makes (``WriteIO``) and the ordering that keeps the target's metadata
behind its data (``TargetWriter``).

Ordering (the child overlays the target, so only the target's *metadata* can make a crash visible):

* Data over blocks the target already has (or over a fixed target) is shadowed by the child: it may land at any
  time, in any order.
* New blocks are appended in one *reserved region*: before the first of them overwrites the old footer, a copy of
  the footer is written past the region's end and made durable, so the file ends with a valid footer at every
  instant. (The region starts after the last block the BAT references, so space a crashed run left unused is
  reclaimed.)
* BAT entries of new blocks, and the bitmaps of a differencing target's existing blocks, wait in a batch. A batch
  is committed by a background thread: ``fdatasync`` (the batch's data is durable), then the metadata writes;
  meanwhile the next batch's data is being written. The next commit's ``fdatasync`` makes the metadata durable
  too; the final commit ends with one more. So one sync per batch, overlapped with the work, instead of one per
  block, and never a BAT entry or bitmap bit over data that is not on disk.
* At the end, if the region was not filled (all-zero blocks are not allocated), the footer goes to the real end,
  is made durable, and only then is the file cut after it.

Every write goes through :class:`vhdcore.fileio.WriteIO` (with its fault-injection and recording hooks).
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ...disk.image import Image
from ...format.layout import block_stride, next_block
from ...fileio import WriteIO
from ...format.structs import FOOTER_SIZE, SECTOR_SIZE, UNUSED_BAT_ENTRY, round_up

MiB = 1024 * 1024
# Bitmaps of existing differencing blocks waiting for their data to be durable, before a commit is forced.
MAX_PENDING_BITMAP_BYTES = 8 * MiB


class TargetWriter:
    """Writes into the target and keeps its metadata behind its data (module docstring)."""

    def __init__(self, img: Image, io: WriteIO, batch_bytes: int, new_candidates: int) -> None:
        self.img = img
        self.io = io
        self.fd = img.fd
        self.batch_bytes = batch_bytes
        self.remaining = new_candidates  # candidate new blocks not yet placed or skipped
        self.fixed = img.is_fixed
        if not self.fixed:
            # The footer's own bytes, not a re-pack: a footer read with a bad checksum (strict=False) stays as it
            # was, and identical to its copy at offset 0.
            n = min(FOOTER_SIZE, img.file_size - img.footer_offset)
            self.footer = img.pread(img.footer_offset, n).ljust(FOOTER_SIZE, b"\0")
            self.span = img.bitmap_size + img.block_size
            self.stride = block_stride(img.block_size)
            start = max(img.blocks_end, img.metadata_end)
            self.pos = round_up(start, SECTOR_SIZE)
            self.eof_footer = img.footer_offset  # the footer that ends the file now
            # The BAT as it is on disk: committed runs are written from here, never from img.bat, whose newer
            # entries may point at data not yet durable.
            self.disk_bat = img.bat.astype(">u4")
        self.reserved = False
        self.pending_bat: dict[int, int] = {}
        self.pending_bitmaps: list[tuple[int, bytes]] = []
        self.pending_bitmap_bytes = 0
        self.batch_new = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------------- new blocks

    def reserve(self) -> None:
        """Reserve the region for the new blocks now (cheapest before anything else is dirty: its sync is then
        one sector, not the writes in flight)."""
        if not self.fixed and not self.reserved and self.remaining > 0:
            self._reserve()

    def _reserve(self) -> None:
        n = max(1, self.remaining)
        end = next_block(self.pos, self.img.bitmap_size) + (n - 1) * self.stride + self.span
        if end > self.eof_footer:
            self.io.pwritev(self.fd, [self.footer], end)
            self.io.fdatasync(self.fd)
            self.eof_footer = end
        self.reserved = True

    def new_slot(self) -> int:
        """File offset for the next new block (its bitmap; the data follows)."""
        if not self.reserved:
            self._reserve()
        off = next_block(self.pos, self.img.bitmap_size)
        self.pos = off + self.span
        self.remaining -= 1
        self.batch_new += self.span
        return off

    def skip_candidate(self) -> None:
        self.remaining -= 1

    # ------------------------------------------------------------------------- data

    def write(self, bufs: list, offset: int) -> None:
        self.io.pwritev(self.fd, bufs, offset)

    def copy(self, src_fd: int, src_off: int, dst_off: int, n: int) -> None:
        self.io.copy(src_fd, src_off, self.fd, dst_off, n)

    # ------------------------------------------------------------------------- metadata

    def add_block(self, block: int, offset: int) -> None:
        self.pending_bat[block] = offset // SECTOR_SIZE
        self.img.bat[block] = offset // SECTOR_SIZE
        self.img._alloc_cache = None
        self._maybe_commit()

    def add_bitmap(self, block: int, offset: int, bitmap: bytes) -> None:
        self.pending_bitmaps.append((offset, bitmap))
        self.pending_bitmap_bytes += len(bitmap)
        self.img._bitmap_cache.pop(block, None)
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        if self.batch_new >= self.batch_bytes or self.pending_bitmap_bytes >= MAX_PENDING_BITMAP_BYTES:
            self._submit()

    def _take(self) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
        """The pending metadata as (offset, bytes) writes, marked as on disk in ``disk_bat``."""
        bat_writes: list[tuple[int, bytes]] = []
        if self.pending_bat:
            blocks = sorted(self.pending_bat)
            for b in blocks:
                self.disk_bat[b] = self.pending_bat[b]
            table = self.img.header.table_offset
            start = prev = blocks[0]
            for b in blocks[1:] + [-1]:
                if b >= 0 and b - prev <= 128:  # neighbours go in one write
                    prev = b
                    continue
                bat_writes.append((table + 4 * start, self.disk_bat[start : prev + 1].tobytes()))
                start = prev = b
        bitmaps = self.pending_bitmaps
        self.pending_bat = {}
        self.pending_bitmaps = []
        self.pending_bitmap_bytes = 0
        self.batch_new = 0
        return bat_writes, bitmaps

    def _commit(self, bat_writes: list[tuple[int, bytes]], bitmaps: list[tuple[int, bytes]]) -> None:
        self.io.fdatasync(self.fd)  # the batch's data is durable ...
        for off, raw in bat_writes:  # ... before anything points at it
            self.io.pwritev(self.fd, [raw], off)
        for off, raw in bitmaps:
            self.io.pwritev(self.fd, [raw], off)

    def _run(self, bat_writes, bitmaps) -> None:
        try:
            self._commit(bat_writes, bitmaps)
        except BaseException as e:  # handed to the main thread at the next wait
            self._error = e

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _submit(self) -> None:
        """Commit the batch in the background; at most one commit in flight."""
        self._wait()
        work = self._take()
        if not work[0] and not work[1]:
            return
        self._thread = threading.Thread(target=self._run, args=work, name="vhdcore-coalesce-commit", daemon=True)
        self._thread.start()

    def checkpoint(self) -> None:
        """Make everything written so far durable, data before the metadata that points at it (the state a crash
        right after the next commit would leave): a resumable merge records its progress only after this."""
        self._wait()
        bat_writes, bitmaps = self._take()
        if bat_writes or bitmaps:
            self._commit(bat_writes, bitmaps)
        self.io.fdatasync(self.fd)

    def abort(self) -> None:
        """After an error: let an in-flight commit finish (its writes are ordered) without raising, then give
        back the reserved region (ENOSPC must not leave up to a batch of space allocated): the footer moves to
        the end of the last block the on-disk BAT references, is made durable, and the file is cut after it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.fixed or not self.reserved:
            return
        # The BAT as the file holds it now (a failed commit may have written only part of what it took).
        try:
            raw = os.pread(self.fd, 4 * len(self.disk_bat), self.img.header.table_offset)
        except OSError:
            return
        if len(raw) != 4 * len(self.disk_bat):
            return
        bat = np.frombuffer(raw, dtype=">u4")
        used = bat[bat != UNUSED_BAT_ENTRY].astype(np.int64)
        end = max(int(used.max()) * SECTOR_SIZE + self.span if len(used) else 0, self.img.metadata_end)
        end = round_up(end, SECTOR_SIZE)
        if end >= self.eof_footer:
            return
        try:
            self.io.pwritev(self.fd, [self.footer], end)  # within space already allocated: no new space needed
            self.io.fdatasync(self.fd)
            self.io.ftruncate(self.fd, end + FOOTER_SIZE)
            self.io.fdatasync(self.fd)
        except OSError:
            pass  # the file still ends with a valid footer (the reserved one); the next coalesce reclaims it

    def finish(self) -> None:
        self._wait()
        bat_writes, bitmaps = self._take()
        if bat_writes or bitmaps:
            self._commit(bat_writes, bitmaps)
        img = self.img
        if not self.fixed and self.reserved:
            end = self.pos
            if self.eof_footer != end:
                # Unused reserved space (or space a crash left) after the last block: the footer moves to the
                # real end and is made durable before the file is cut after it.
                self.io.pwritev(self.fd, [self.footer], end)
                self.io.fdatasync(self.fd)
                self.io.ftruncate(self.fd, end + FOOTER_SIZE)
            img.blocks_end = max(img.blocks_end, end)
        self.io.fdatasync(self.fd)
        img.file_size = os.fstat(self.fd).st_size
        if not self.fixed:
            img.footer_offset = img.file_size - FOOTER_SIZE
            img.footer_source = "end"


__all__ = ["TargetWriter"]

"""One .vhd file: its footer, dynamic header, BAT and sector bitmaps, and reads and writes of its own sectors.

An ``Image`` knows nothing about parents; ``chain.Disk`` stacks images. Reads and writes here are of this file
only: ``layer_runs`` says, for a range of the virtual disk, which parts this file holds and where.

References: VHD specification v1.0 (footer, header, BAT, bitmaps); qemu block/vpc.c ``alloc_block`` for the
crash-safe order of block allocation.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import warnings
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np

from .. import kernels as K
from ..exceptions import (
    ChecksumError,
    CorruptImageError,
    InvalidFormatError,
    LockError,
    ReadOnlyError,
    UnsupportedFeatureError,
    VHDError,
)
from ..fileio import preadinto_exact, pwrite_all
from ..format import locators
from ..format.geometry import Geometry
from ..format.layout import next_block
from ..format import rules as R
from ..format.rules import MAX_BAT_ENTRIES
from ..format.structs import (
    FOOTER,
    FOOTER_SIZE,
    HEADER,
    HEADER_SIZE,
    SECTOR_SIZE,
    UNUSED_BAT_ENTRY,
    BatmapHeader,
    DiskType,
    DynamicHeader,
    Footer,
    ParentLocator,
    Table,
    bitmap_bytes,
    round_up,
)

NOT_HERE = -1

_BITMAP_CACHE_BLOCKS = 4096
_ZEROS = bytes(4 * 1024 * 1024)




class Image:
    """A single VHD file (fixed, dynamic or differencing), opened read-only or for writing."""

    def __init__(self, path: str | os.PathLike[str], mode: str = "r", *, strict: bool = True) -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        self.path = os.fspath(path)
        self.mode = mode
        self.writable = mode == "r+"
        self.strict = strict
        self.warnings: list[str] = []
        self.fd = -1
        self._bitmap_cache: OrderedDict[int, bytes] = OrderedDict()
        self._alloc_cache: np.ndarray | None = None
        # O_NONBLOCK: opening a FIFO must not hang; it is then refused as not a regular file.
        flags = (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(self.path, flags)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidFormatError("not a regular file", path=self.path, field="file")
            if self.writable:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise LockError("another writer holds this file", path=self.path, field="lock") from None
                    raise
            self.fd = fd
            self.file_size = st.st_size
            self._load()
        except BaseException:
            self.fd = -1
            os.close(fd)
            raise

    # ----------------------------------------------------------------------------------------- parsing

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def _note_bad_checksum(self, raw: bytes, table: Table, stored: int, structure: str, offset: int) -> None:
        """In non-strict mode a wrong checksum is accepted, but the caller must still hear about it."""
        if not self.strict and table.checksum(raw) != stored:
            self._warn(f"{structure} at offset {offset} has a wrong checksum (stored 0x{stored:08x}, computed "
                       f"0x{table.checksum(raw):08x}); accepted because strict checking is off")

    def _read_footer(self) -> None:
        size = self.file_size
        if size < FOOTER_SIZE - 1:
            raise CorruptImageError(f"file of {size} bytes is too small to hold a VHD footer", path=self.path,
                                    offset=0, field="footer", value=size)
        verify = self.strict
        errors: list[VHDError] = []
        # The footer at the end, then the 511-byte footer of Virtual PC before 2004, then the copy at 0
        # (the state a crash during block allocation leaves).
        for off, length, source in ((size - FOOTER_SIZE, FOOTER_SIZE, "end"),
                                    (size - FOOTER_SIZE + 1, FOOTER_SIZE - 1, "legacy")):
            if off < 0:
                continue
            raw = self.pread(off, length)
            if length < FOOTER_SIZE:
                raw += b"\0"
            try:
                self.footer = Footer.parse(raw, path=self.path, offset=off, verify_checksum=verify)
                self._note_bad_checksum(raw, FOOTER, self.footer.checksum, "footer", off)
            except ChecksumError as e:
                errors.append(e)
                continue
            except InvalidFormatError as e:
                errors.append(e)
                continue
            self.footer_offset = off
            self.footer_source = source
            return
        if size >= FOOTER_SIZE:
            try:
                raw = self.pread(0, FOOTER_SIZE)
                copy = Footer.parse(raw, path=self.path, offset=0, verify_checksum=verify)
            except InvalidFormatError as e:
                errors.append(e)
            else:
                if copy.type != DiskType.FIXED:
                    self._note_bad_checksum(raw, FOOTER, copy.checksum, "footer", 0)
                    if self.writable:
                        raise CorruptImageError(
                            "the footer at the end of the file is missing or torn (an interrupted write?); "
                            "the copy at offset 0 is intact: run 'vhdcore repair'",
                            path=self.path, offset=size - FOOTER_SIZE, field="footer")
                    self._warn("footer at end of file missing or torn; using the copy at offset 0")
                    self.footer = copy
                    # New data would go where the footer should be: just after the last block.
                    self.footer_offset = -1
                    self.footer_source = "copy"
                    return
        # Prefer the most telling error: a checksum error on a real footer beats "bad cookie".
        for e in errors:
            if isinstance(e, ChecksumError):
                raise e
        if size >= 8 and self.pread(0, 8) == b"vhdxfile":
            raise UnsupportedFeatureError("this is a VHDX file, not a VHD", path=self.path, offset=0,
                                          field="signature", value=b"vhdxfile")
        raise errors[0]

    def _load(self) -> None:
        self._read_footer()
        f = self.footer
        self.disk_type = f.type
        self.size = f.current_size
        self.geometry = Geometry.unpack(f.geometry)
        if f.saved_state:
            self._warn("disk is in saved state")
        bad_size = R.virtual_size_problem(self.size)
        if bad_size is not None:
            raise InvalidFormatError("virtual size must be a multiple of 512 and at most 2 TiB", path=self.path,
                                     offset=self._footer_field_offset(bad_size.offset), field=bad_size.field,
                                     value=self.size)
        self.header: DynamicHeader | None = None
        self.batmap: BatmapHeader | None = None
        if self.disk_type == DiskType.FIXED:
            self.block_size = 0
            self.bitmap_size = 0
            self.sectors_per_block = 0
            self.max_table_entries = 0
            self.bat = np.zeros(0, dtype=np.uint32)
            if self.footer_offset < self.size:
                raise CorruptImageError(
                    f"fixed disk of {self.size} bytes needs a file of at least {self.size + FOOTER_SIZE} bytes",
                    path=self.path, offset=self.file_size, field="file size", value=self.file_size)
            self.metadata_end = 0
            return
        self._load_dynamic()

    def _footer_field_offset(self, rel: int) -> int:
        return (self.footer_offset if self.footer_offset >= 0 else 0) + rel

    def _load_dynamic(self) -> None:
        f = self.footer
        hoff = f.data_offset
        # Offset 0 (the footer copy) is left to the header's cookie check, which names it better.
        bad = [p for p in R.header_offset_problems(hoff, self.file_size) if p.kind != R.HEADER_IN_FOOTER_COPY]
        if bad:
            raise CorruptImageError("dynamic header offset outside the file", path=self.path,
                                    offset=self._footer_field_offset(bad[0].offset), field=bad[0].field, value=hoff)
        raw = self.pread(hoff, HEADER_SIZE)
        self.header = h = DynamicHeader.parse(raw, path=self.path, offset=hoff, verify_checksum=self.strict)
        self._note_bad_checksum(raw, HEADER, h.checksum, "dynamic header", hoff)
        bs = h.block_size
        p = R.block_size_problem(bs)
        if p is not None:
            raise InvalidFormatError("block size must be a power of two number of sectors, 512 B to 256 MiB",
                                     path=self.path, offset=hoff + p.offset, field=p.field, value=bs)
        self.block_size = bs
        self.sectors_per_block = bs // SECTOR_SIZE
        self.bitmap_size = bitmap_bytes(bs)
        mte = h.max_table_entries
        needed = R.entries_needed(self.size, bs)
        # Before the BAT is read: a hostile count must not size an allocation, even in a large sparse file.
        p = R.table_entries_problem(mte, self.size, bs)
        if p is not None and p.kind == R.TOO_FEW_ENTRIES:
            raise InvalidFormatError(f"max table entries too small for the disk size (needs {needed})",
                                     path=self.path, offset=hoff + p.offset, field=p.field, value=mte)
        if p is not None and p.kind == R.BAT_OVER_LIMIT:
            raise UnsupportedFeatureError(f"a BAT of {needed} entries is over vhdcore's limit of {MAX_BAT_ENTRIES}"
                                          " (block size too small for the virtual size)", path=self.path,
                                          offset=hoff + p.offset, field=p.field, value=bs)
        if p is not None:
            raise InvalidFormatError("max table entries absurdly larger than the disk needs", path=self.path,
                                     offset=hoff + p.offset, field=p.field, value=mte)
        # Bounded by the file too: the BAT must fit in it. (A BAT over the header is left to the block checks.)
        to = h.table_offset
        bat_bytes = mte * 4
        bad = [p for p in R.table_offset_problems(to, mte, hoff, self.file_size) if p.kind != R.TABLE_OVER_METADATA]
        if bad:
            raise CorruptImageError("BAT does not fit in the file", path=self.path, offset=hoff + bad[0].offset,
                                    field=bad[0].field, value=to)
        self.max_table_entries = mte
        raw = self.pread(to, bat_bytes)
        self.bat = np.frombuffer(raw, dtype=">u4").astype(np.uint32)
        bat = R.bat_region(to, mte)
        regions = [*R.header_regions(hoff), bat]
        self.parent_locators: list[ParentLocator] = []
        if self.disk_type == DiskType.DIFFERENCING:
            for i, loc in enumerate(h.parent_locators):
                if not loc.is_used:
                    continue
                self.parent_locators.append(loc)
                region = R.locator_region(i, loc, self.file_size)
                if region is not None:
                    regions.append(region)
        bm_at = R.batmap_header_offset(f.creator_app, bat.end, self.file_size)
        if bm_at is not None:
            bm = BatmapHeader.parse(self.pread(bm_at, SECTOR_SIZE))
            if bm is not None:
                self.batmap = bm
                regions += R.batmap_regions(bm_at, bm, self.file_size)
        self.metadata_end = R.metadata_end(regions)
        self._check_blocks(regions)

    def _check_blocks(self, metadata: list[R.Region]) -> None:
        limit = self.footer_offset if self.footer_offset >= 0 else self.file_size
        placed = R.BlockPlacement(self.bat, self.bitmap_size + self.block_size, limit, metadata)
        self.allocated_count = placed.allocated
        self.blocks_end = placed.blocks_end if placed.allocated else self.metadata_end
        # Structural bounds hold whatever ``strict`` says: it relaxes checksums only, and a block past the end
        # or two BAT entries sharing storage would make a writer put one block's data into another's.
        to = self.header.table_offset
        for p in placed.problems():
            if p.kind == R.BLOCK_PAST_END:
                raise CorruptImageError("a block lies past the end of the file (truncated?)", path=self.path,
                                        offset=to + p.offset, field=p.field, value=p.value)
            if p.kind in (R.BLOCK_IN_METADATA, R.BLOCK_BEFORE_METADATA):
                raise CorruptImageError("a block overlaps the header, BAT or locators", path=self.path,
                                        offset=to + p.offset, field=p.field, value=p.value)
            raise CorruptImageError(f"{p.value} pair(s) of blocks overlap", path=self.path, offset=to + p.offset,
                                    field=p.field, value=p.value)

    # ----------------------------------------------------------------------------------------- facts

    @property
    def is_fixed(self) -> bool:
        return self.disk_type == DiskType.FIXED

    @property
    def is_dynamic(self) -> bool:
        return self.disk_type == DiskType.DYNAMIC

    @property
    def is_differencing(self) -> bool:
        return self.disk_type == DiskType.DIFFERENCING

    @property
    def unique_id(self):
        return self.footer.unique_id

    @property
    def chs_size(self) -> int:
        return self.geometry.size

    def allocated_blocks(self) -> np.ndarray:
        """Indexes of allocated blocks, ascending (cached until the next allocation)."""
        if self._alloc_cache is None:
            self._alloc_cache = np.flatnonzero(self.bat != UNUSED_BAT_ENTRY)
        return self._alloc_cache

    def block_file_offset(self, block: int) -> int | None:
        """File offset of a block's data (after its bitmap), or None when it is not allocated."""
        entry = int(self.bat[block])
        if entry == UNUSED_BAT_ENTRY:
            return None
        return entry * SECTOR_SIZE + self.bitmap_size

    def data_end(self) -> int:
        """Where the next block goes: after every block and all metadata, where the footer is."""
        end = max(self.blocks_end, self.metadata_end)
        if self.footer_offset >= 0:
            end = max(end, self.footer_offset)
        return round_up(end, SECTOR_SIZE)

    # ----------------------------------------------------------------------------------------- I/O

    def pread(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes of this file at ``offset``; a short read is a truncated file."""
        buf = bytearray(n)
        self.preadinto(offset, memoryview(buf))
        return bytes(buf)

    def preadinto(self, offset: int, mv: memoryview) -> None:
        got = preadinto_exact(self.fd, mv, offset)
        if got < len(mv):
            raise CorruptImageError(f"file ends before the {len(mv)} bytes at offset {offset}", path=self.path,
                                    offset=offset + got, field="data", value=self.file_size)

    def pwrite(self, offset: int, data: Sequence[bytes | memoryview] | bytes | memoryview) -> None:
        if not self.writable:
            raise ReadOnlyError("disk is opened read-only", path=self.path, offset=offset)
        bufs = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        end = offset + pwrite_all(self.fd, bufs, offset)
        if end > self.file_size:
            self.file_size = end

    def read_bitmap(self, block: int) -> bytes | None:
        """The sector bitmap of an allocated block (cached), or None for an unallocated one."""
        bm = self._bitmap_cache.get(block)
        if bm is not None:
            self._bitmap_cache.move_to_end(block)
            return bm
        entry = int(self.bat[block])
        if entry == UNUSED_BAT_ENTRY:
            return None
        bm = self.pread(entry * SECTOR_SIZE, self.bitmap_size)
        self._bitmap_cache[block] = bm
        if len(self._bitmap_cache) > _BITMAP_CACHE_BLOCKS:
            self._bitmap_cache.popitem(last=False)
        return bm

    def layer_runs(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """Runs ``(offset, length, file_offset)`` of [start, stop) of the virtual disk, in order.

        ``file_offset`` is NOT_HERE where this file does not hold the data (zeros for a dynamic disk, the
        parent's data for a differencing one). A sector whose bitmap bit is clear is not held, in dynamic and
        differencing disks alike: the specification says such a sector was never written, and libvhd (XenServer)
        reads it as zeros in a dynamic disk. Cost follows the allocated blocks in the range.
        """
        if start >= stop:
            return
        if self.disk_type == DiskType.FIXED:
            yield start, stop - start, start
            return
        bs = self.block_size
        alloc = self.allocated_blocks()
        first = start // bs
        last = (stop - 1) // bs
        i = int(np.searchsorted(alloc, first))
        pos = start
        bat = self.bat
        bmsize = self.bitmap_size
        while pos < stop:
            if i >= len(alloc) or alloc[i] > last:
                yield pos, stop - pos, NOT_HERE
                return
            b = int(alloc[i])
            i += 1
            bstart = b * bs
            if bstart > pos:
                yield pos, bstart - pos, NOT_HERE
                pos = bstart
            bend = min(stop, bstart + bs)
            data_off = int(bat[b]) * SECTOR_SIZE + bmsize
            bitmap = self.read_bitmap(b)
            s0 = (pos - bstart) // SECTOR_SIZE
            s1 = -(-(bend - bstart) // SECTOR_SIZE)
            for first_bit, nbits, present in K.bitmap_runs(bitmap, s0, s1):
                rs = max(pos, bstart + first_bit * SECTOR_SIZE)
                re = min(bend, bstart + (first_bit + nbits) * SECTOR_SIZE)
                yield rs, re - rs, (data_off + (rs - bstart)) if present else NOT_HERE
            pos = bend

    # ----------------------------------------------------------------------------------------- writes

    def _require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError("disk is opened read-only", path=self.path)

    def write_sectors(self, offset: int, data: bytes | memoryview) -> None:
        """Write sector-aligned ``data`` at virtual ``offset`` into this file, allocating blocks as needed.

        Every dynamic and differencing disk gets exactly the written sectors' bits set (libvhd's rule: a clear
        bit is never-written, read as zeros or as the parent); a new block is zero elsewhere.
        """
        self._require_writable()
        mv = memoryview(data).cast("B")
        n = len(mv)
        if offset % SECTOR_SIZE or n % SECTOR_SIZE:
            raise ValueError("write_sectors needs sector-aligned offset and length")
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"write of {n} bytes at {offset} beyond the virtual size {self.size}")
        if self.disk_type == DiskType.FIXED:
            self.pwrite(offset, mv)
            return
        bs = self.block_size
        pos = 0
        while pos < n:
            voff = offset + pos
            b = voff // bs
            in_block = voff - b * bs
            k = min(n - pos, bs - in_block)
            self._write_in_block(b, in_block, mv[pos : pos + k])
            pos += k

    def _write_in_block(self, b: int, in_block: int, piece: memoryview) -> None:
        s0 = in_block // SECTOR_SIZE
        s1 = s0 + len(piece) // SECTOR_SIZE
        data_off = self.block_file_offset(b)
        if data_off is None:
            self.allocate_block(b, in_block, piece)
            return
        self.pwrite(data_off + in_block, piece)
        self.set_bitmap_bits(b, s0, s1)

    def set_bitmap_bits(self, b: int, s0: int, s1: int) -> None:
        """Mark sectors [s0, s1) of allocated block ``b`` as written, after their data is in place.

        Data first, then the bitmap that says it is there: a crash in between leaves the old content readable.
        """
        bitmap = self.read_bitmap(b)
        if bitmap is None:
            raise ValueError(f"block {b} is not allocated")
        if K.bitmap_count(bitmap, s0, s1) != s1 - s0:
            new = bytearray(bitmap)
            K.bitmap_set_range(new, s0, s1)
            self.pwrite(int(self.bat[b]) * SECTOR_SIZE, bytes(new))
            self._bitmap_cache[b] = bytes(new)

    def new_block_offset(self) -> int:
        """Sector-aligned offset for a new block, so that its data starts on a page boundary."""
        return next_block(self.data_end(), self.bitmap_size)

    def allocate_block(self, b: int, in_block: int = 0, piece: memoryview | bytes = b"",
                       bitmap: bytes | None = None, sync: bool = False) -> int:
        """Append block ``b`` holding ``piece`` at ``in_block`` (zeros elsewhere); returns its file offset.

        Order (crash-safe, as qemu and Windows do): block and bitmap where the footer was, the footer at the
        new end, then the BAT entry, then the footer copy at 0. Until the BAT entry is written, the block is
        unreachable, so a crash at any point leaves the old content readable (at worst with the footer to be
        restored from its copy at 0 by ``repair``). ``sync`` makes each step durable before the next.
        """
        self._require_writable()
        if self.disk_type == DiskType.FIXED:
            raise ValueError("fixed disks have no blocks to allocate")
        if int(self.bat[b]) != UNUSED_BAT_ENTRY:
            raise ValueError(f"block {b} is already allocated")
        bs = self.block_size
        piece = memoryview(piece).cast("B")
        if bitmap is None:
            # Exactly the written sectors, in every disk type, as libvhd allocates.
            bm = bytearray(self.bitmap_size)
            s0 = in_block // SECTOR_SIZE
            K.bitmap_set_range(bm, s0, s0 + len(piece) // SECTOR_SIZE)
            bitmap = bytes(bm)
        offset = self.new_block_offset()
        iov: list = [bitmap]
        if in_block:
            iov.append(memoryview(_ZEROS)[:in_block] if in_block <= len(_ZEROS) else bytes(in_block))
        iov.append(piece)
        tail = bs - in_block - len(piece)
        if tail:
            iov.append(memoryview(_ZEROS)[:tail] if tail <= len(_ZEROS) else bytes(tail))
        self.pwrite(offset, iov)
        end = offset + self.bitmap_size + bs
        self._commit_block(b, offset, end, sync)
        self._bitmap_cache[b] = bytes(bitmap)
        return offset

    def _commit_block(self, b: int, offset: int, end: int, sync: bool) -> None:
        """Steps 2-4 of an allocation whose block was written at ``offset`` (ending at ``end``)."""
        footer = self.footer.pack()
        self.pwrite(end, footer)
        if sync:
            os.fdatasync(self.fd)
        self.pwrite(self.header.table_offset + 4 * b, int(offset // SECTOR_SIZE).to_bytes(4, "big"))
        if sync:
            os.fdatasync(self.fd)
        self.pwrite(0, footer)
        self.bat[b] = offset // SECTOR_SIZE
        self._alloc_cache = None
        self.blocks_end = max(self.blocks_end, end)
        self.footer_offset = end
        self.footer_source = "end"
        self.allocated_count = getattr(self, "allocated_count", 0) + 1
        new_size = end + FOOTER_SIZE
        if new_size < self.file_size:
            # The file had bytes after the old footer (trailing junk): they must not remain after the new
            # footer, or a reader would take them for the footer.
            os.ftruncate(self.fd, new_size)
        self.file_size = new_size

    def flush(self) -> None:
        if self.fd >= 0 and self.writable:
            os.fsync(self.fd)

    # ----------------------------------------------------------------------------------------- parents

    def read_locator(self, loc: ParentLocator) -> bytes | None:
        """The raw data of a parent locator, or None when its offset or length is out of bounds."""
        return locators.read(loc, self.file_size, self.pread)

    def parent_candidates(self) -> list[tuple[str, str]]:
        """``(source, path)`` pairs naming the parent, in the order to try them, then the parent unicode name
        (:func:`vhdcore.format.locators.parent_candidates`)."""
        if self.header is None or self.disk_type != DiskType.DIFFERENCING:
            return []
        return locators.parent_candidates(self.parent_locators, self.header.parent_unicode_name,
                                          self.read_locator, self._warn)

    # ----------------------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)  # closing releases the flock

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - safety net
        if getattr(self, "fd", -1) >= 0:
            warnings.warn(f"vhdcore Image {self.path} was not closed", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        return f"<Image {self.path!r} {self.disk_type.label} {self.size} bytes>"

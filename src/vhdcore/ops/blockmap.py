"""Per-block facts of a virtual disk on one block grid, shared by growth forensics and compaction.

Both operations look at the disk in blocks of one size (the block size of the dynamic VHD compaction writes) and
ask the same questions of each block: how many of its bytes some layer holds, whether any of those bytes live in
the host file (a fixed VHD's sparse holes read as zeros and are never read), which of its sectors the guest's file
systems mark free, and, once the block's bytes are in memory, whether it can be dropped. Answering them in one
place is what makes growth's compaction estimate the exact size ``compact`` writes.

Sector masks are MSB-first (bit 7 of byte 0 is sector 0 of the block), the order of the kernels'
``sector_zero_mask`` and ``merge_block``; file-system bitmaps are LSB-first cluster bitmaps from ``vhdcore.guest``.
"""
from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .. import kernels as K
from ..disk.chain import Disk
from ..disk.image import Image
from ..format.rules import MAX_BLOCK_SIZE, block_size_ok
from ..format.structs import SECTOR_SIZE

__all__ = ["Intervals", "BlockAllocation", "block_allocation", "grid_block_size", "host_data_runs", "FreeSectorMap",
           "BlockJudge", "Verdict", "unsafe_reason", "MAX_GRID_BLOCKS"]

# The per-block arrays are sized by the grid: 2040 GiB (the VHD limit) in 512 KiB blocks is just under this.
MAX_GRID_BLOCKS = 1 << 22
DEFAULT_GRID = 2 * 1024 * 1024  # fixed disks have no blocks: the grid (and a compacted disk) uses 2 MiB


# ------------------------------------------------------------------------------------------------ intervals


@dataclass
class Intervals:
    """Sorted, disjoint, non-adjacent byte ranges ``[starts[i], ends[i])`` as int64 arrays."""

    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def empty(cls) -> "Intervals":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def merged(cls, starts: Any, ends: Any) -> "Intervals":
        """Normalise arbitrary ranges (any order, overlapping, touching, empty ones) into disjoint runs."""
        s = np.asarray(starts, dtype=np.int64)
        e = np.asarray(ends, dtype=np.int64)
        keep = e > s
        s, e = s[keep], e[keep]
        if len(s) == 0:
            return cls.empty()
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
        reach = np.maximum.accumulate(e)
        # A run starts where its start lies past everything before it (touching runs are joined).
        new = np.ones(len(s), dtype=bool)
        new[1:] = s[1:] > reach[:-1]
        idx = np.flatnonzero(new)
        out_e = np.maximum.reduceat(e, idx)
        return cls(s[idx], out_e)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def total(self) -> int:
        return int((self.ends - self.starts).sum())

    def union(self, other: "Intervals") -> "Intervals":
        return Intervals.merged(np.concatenate([self.starts, other.starts]), np.concatenate([self.ends, other.ends]))

    def overlap_bytes(self, other: "Intervals") -> int:
        """Bytes in both: |A| + |B| - |A u B|."""
        return self.total + other.total - self.union(other).total

    def intersect(self, other: "Intervals") -> "Intervals":
        """The ranges in both (vectorised: elementary segments between all boundaries, kept if in both)."""
        if len(self) == 0 or len(other) == 0:
            return Intervals.empty()
        bounds = np.unique(np.concatenate([self.starts, self.ends, other.starts, other.ends]))
        lo, hi = bounds[:-1], bounds[1:]
        keep = self.contains(lo) & other.contains(lo)
        return Intervals.merged(lo[keep], hi[keep])

    def contains(self, points: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.starts, points, side="right") - 1
        ok = i >= 0
        out = np.zeros(len(points), dtype=bool)
        out[ok] = points[ok] < self.ends[i[ok]]
        return out

    def clip(self, lo: int, hi: int) -> "Intervals":
        s = np.maximum(self.starts, lo)
        e = np.minimum(self.ends, hi)
        keep = e > s
        return Intervals(s[keep], e[keep])

    def coverage_before(self, points: np.ndarray) -> np.ndarray:
        """Bytes of the intervals below each point (points sorted or not)."""
        if len(self) == 0:
            return np.zeros(len(points), dtype=np.int64)
        lengths = self.ends - self.starts
        cum = np.concatenate([[0], np.cumsum(lengths)])
        i = np.searchsorted(self.starts, points, side="right")  # intervals starting at or before the point
        partial = np.zeros(len(points), dtype=np.int64)
        has = i > 0
        j = i[has] - 1
        partial[has] = np.minimum(points[has] - self.starts[j], lengths[j])
        return cum[np.maximum(i - 1, 0)] * has + partial

    def per_block(self, block_size: int, nblocks: int) -> np.ndarray:
        """Bytes of each ``block_size`` block (blocks 0 .. nblocks-1) the intervals cover."""
        edges = np.arange(nblocks + 1, dtype=np.int64) * block_size
        return np.diff(self.coverage_before(edges))


# ------------------------------------------------------------------------------------------------ VHD side


def host_data_runs(img: Image) -> Intervals:
    """Ranges of a fixed VHD's data area the host file really stores (SEEK_DATA/SEEK_HOLE); holes read as zeros.

    Where the file system does not report holes, the whole data area counts as data.
    """
    size = img.size
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    try:
        while pos < size:
            try:
                s = os.lseek(img.fd, pos, os.SEEK_DATA)
            except OSError as e:  # ENXIO: no data after pos
                if e.errno == 6:
                    break
                raise
            if s >= size:
                break
            e = min(size, os.lseek(img.fd, s, os.SEEK_HOLE))
            starts.append(s)
            ends.append(e)
            pos = e
            if len(starts) > 1_000_000:  # absurdly fragmented: stop looking, read the rest
                starts.append(pos)
                ends.append(size)
                break
    except (OSError, AttributeError):
        return Intervals(np.array([0], np.int64), np.array([size], np.int64))
    return Intervals.merged(starts, ends)


@dataclass
class BlockAllocation:
    """The disk on a grid of ``block_size`` blocks: what some layer holds, and what might not be zero."""

    block_size: int
    nblocks: int
    allocated: np.ndarray  # int64 per block: bytes some layer holds
    data: np.ndarray  # int64 per block: of those, bytes stored in a host file (not in a fixed VHD's holes)
    allocated_runs: Intervals
    data_runs: Intervals

    def span(self, disk_size: int) -> np.ndarray:
        """Bytes of each block inside the virtual disk (the last block may be cut short)."""
        s = np.full(self.nblocks, self.block_size, dtype=np.int64)
        if self.nblocks:
            s[-1] = disk_size - (self.nblocks - 1) * self.block_size
        return s


def block_allocation(disk: Disk, block_size: int) -> BlockAllocation:
    """Per-block allocated and host-stored bytes, from the chain's extents (cost: the allocated runs)."""
    nblocks = -(-disk.size // block_size)
    # Runs are merged as they come (the extents are in order), so memory follows the number of separate runs.
    starts, ends, depths = array("q"), array("q"), array("q")
    for e in disk.allocated_extents():
        depth = e.depth if e.layer.is_fixed else -1
        if ends and ends[-1] == e.offset and depths[-1] == depth:
            ends[-1] = e.end
        else:
            starts.append(e.offset)
            ends.append(e.end)
            depths.append(depth)
    s = np.frombuffer(starts, dtype=np.int64) if starts else np.zeros(0, np.int64)
    e_ = np.frombuffer(ends, dtype=np.int64) if ends else np.zeros(0, np.int64)
    d = np.frombuffer(depths, dtype=np.int64) if depths else np.zeros(0, np.int64)
    allocated = Intervals.merged(s, e_)
    fixed = d >= 0
    if fixed.any():
        # Runs served by a fixed layer count as data only where its host file is not a hole.
        parts_s, parts_e = [s[~fixed]], [e_[~fixed]]
        for depth in np.unique(d[fixed]).tolist():
            sel = d == depth
            held = host_data_runs(disk.layers[depth]).intersect(Intervals.merged(s[sel], e_[sel]))
            parts_s.append(held.starts)
            parts_e.append(held.ends)
        data = Intervals.merged(np.concatenate(parts_s), np.concatenate(parts_e))
    else:
        data = allocated
    return BlockAllocation(block_size, nblocks, allocated.per_block(block_size, nblocks),
                           data.per_block(block_size, nblocks), allocated, data)


def grid_block_size(disk: Disk, requested: int | None) -> tuple[int, str | None]:
    """The block size of the grid (and of a compacted disk): ``requested``, else the leaf's (2 MiB for a fixed
    disk), made coarser when the disk would have more than MAX_GRID_BLOCKS blocks; returns it and a warning."""
    if requested is not None:
        if not block_size_ok(requested):
            raise ValueError(f"block size must be a power of two from 512 bytes to 256 MiB, not {requested}")
        if -(-disk.size // requested) > MAX_GRID_BLOCKS:
            raise ValueError(f"block size {requested} cuts the {disk.size}-byte disk into more than "
                             f"{MAX_GRID_BLOCKS} blocks")
        return requested, None
    bs = int(disk.leaf.block_size or DEFAULT_GRID)
    note = None
    while -(-disk.size // bs) > MAX_GRID_BLOCKS and bs < MAX_BLOCK_SIZE:
        bs *= 2
    if bs != (disk.leaf.block_size or DEFAULT_GRID):
        note = f"blocks of {bs} bytes are used instead of the leaf's {disk.leaf.block_size} (a disk this large)"
    return bs, note


# ------------------------------------------------------------------------------------------------ guest side


def unsafe_reason(fs: Any) -> str | None:
    """Why a file system's free map must not be trusted for dropping data, or None.

    A journal that still needs replaying may allocate blocks the bitmaps do not show yet.
    """
    if fs.details.get("needs_recovery") or fs.details.get("dirty"):
        return "the file system needs recovery (unclean shutdown): its free-space map may be stale"
    for note in fs.notes:
        if "needs recovery" in note:
            return "the file system's journal needs recovery: its free-space map may be stale"
    return None


@dataclass
class _FsInfo:
    index: int  # position in the analysed file-system list
    fs: Any
    trusted: bool  # its free sectors may be dropped (see unsafe_reason)
    first: int  # first block the file system touches
    last: int
    free: np.ndarray  # free bytes per block first..last
    overlap: np.ndarray  # bytes of each block inside [offset, end)


class FreeSectorMap:
    """Which sectors of each block the known file systems mark free.

    A sector counts as free for dropping only if some known file system covers it, every region of the partition
    layout that covers it (known file systems and unknown partitions alike) marks it free, and the file system's
    free map is trusted (see :func:`unsafe_reason`). Everything else is kept as it is.
    """

    def __init__(self, filesystems: Sequence[Any], disk_size: int, block_size: int) -> None:
        if block_size % SECTOR_SIZE:
            raise ValueError(f"block size {block_size} is not a multiple of {SECTOR_SIZE}")
        self.block_size = block_size
        self.spb = block_size // SECTOR_SIZE
        self.mask_bytes = -(-self.spb // 8)
        self.disk_size = disk_size
        self.skipped: list[tuple[int, str]] = []  # (file-system index, why its free space is not dropped)
        self.infos: list[_FsInfo] = []
        regions = [(int(fs.offset), int(fs.offset) + int(fs.size)) for fs in filesystems]
        self.regions = regions
        order = sorted(range(len(regions)), key=lambda i: regions[i])
        self.overlapping: set[int] = set()
        reach_i = None
        for i in order:
            if reach_i is not None and regions[i][0] < regions[reach_i][1]:
                self.overlapping.update((i, reach_i))
            if reach_i is None or regions[i][1] > regions[reach_i][1]:
                reach_i = i
        for i, fs in enumerate(filesystems):
            if fs.type == "unknown" or int(fs.cluster_count) <= 0 or int(fs.size) <= 0:
                continue
            cs, origin = int(fs.cluster_size), int(fs.bitmap_origin)
            if cs % SECTOR_SIZE or origin % SECTOR_SIZE or int(fs.offset) % SECTOR_SIZE:
                self.skipped.append((i, f"clusters of {cs} bytes at {origin} are not whole sectors"))
                continue
            why = unsafe_reason(fs)
            if why:
                self.skipped.append((i, why))
            first, used = fs.used_bytes_per_block(block_size)
            last = first + len(used) - 1
            starts = np.arange(first, last + 1, dtype=np.int64) * block_size
            overlap = np.minimum(starts + block_size, fs.offset + fs.size) - np.maximum(starts, fs.offset)
            self.infos.append(_FsInfo(i, fs, why is None, int(first), int(last), overlap - used, overlap))
        self._first = np.array([f.first for f in self.infos], dtype=np.int64)
        self._last = np.array([f.last for f in self.infos], dtype=np.int64)
        self._ones = bytearray(self.mask_bytes)
        K.bitmap_set_range(self._ones, 0, self.spb)

    def free_per_block(self, nblocks: int) -> np.ndarray:
        """Free bytes per block summed over the file systems (overlapping layouts counted twice)."""
        out = np.zeros(nblocks, dtype=np.int64)
        for f in self.infos:
            hi = min(f.last + 1, nblocks)
            out[f.first : hi] += f.free[: hi - f.first]
        return out

    def touching(self, b: int) -> list[_FsInfo]:
        """File systems (trusted or not) with free space in block ``b``."""
        if not self.infos:
            return []
        idx = np.flatnonzero((self._first <= b) & (self._last >= b))
        return [self.infos[i] for i in idx if self.infos[i].free[b - self.infos[i].first] > 0]

    def fs_mask(self, f: _FsInfo, b: int) -> bytearray:
        """Free sectors of ``f`` in block ``b`` (MSB-first, ``spb`` bits)."""
        bs = self.block_size
        fs = f.fs
        k = b - f.first
        mask = bytearray(self.mask_bytes)
        base = b * bs
        lo = max(base, int(fs.offset))
        hi = min(base + bs, int(fs.offset) + int(fs.size))
        s0, s1 = (lo - base) // SECTOR_SIZE, (hi - base) // SECTOR_SIZE
        if f.free[k] == f.overlap[k]:  # the whole overlap is free: no need to look at bits
            K.bitmap_set_range(mask, s0, s1)
            return mask
        cs, origin, count = int(fs.cluster_size), int(fs.bitmap_origin), int(fs.cluster_count)
        off = base + np.arange(s0, s1, dtype=np.int64) * SECTOR_SIZE
        cl = (off - origin) // cs
        inside = (off >= origin) & (cl < count)
        if not inside.any():
            return mask
        c_lo, c_hi = int(cl[inside][0]), int(cl[inside][-1]) + 1
        byte_lo = c_lo // 8
        bits = np.unpackbits(np.asarray(fs.bitmap[byte_lo : -(-c_hi // 8)], dtype=np.uint8), bitorder="little")
        free = np.zeros(self.spb, dtype=bool)
        sel = free[s0:s1]
        sel[inside] = bits[cl[inside] - byte_lo * 8] == 0
        mask[:] = np.packbits(free, bitorder="big").tobytes()
        return mask

    def masks(self, b: int) -> list[tuple[_FsInfo, bytearray]]:
        return [(f, self.fs_mask(f, b)) for f in self.touching(b)]

    def union(self, b: int, masks: list[tuple[_FsInfo, bytearray]]) -> bytearray | None:
        """Sectors of block ``b`` free for dropping, or None when there are none."""
        masks = [(f, m) for f, m in masks if f.trusted]
        if not masks:
            return None
        out = bytearray(masks[0][1])
        for _, m in masks[1:]:
            K.bitmap_or(out, m)
        if any(f.index in self.overlapping for f, _ in masks):
            # Overlapping regions: a sector that any covering region uses (or does not understand) is kept.
            mine = {f.index: m for f, m in masks}  # untrusted file systems count as using everything
            base = b * self.block_size
            for i, (lo, hi) in enumerate(self.regions):
                lo, hi = max(lo, base), min(hi, base + self.block_size)
                if lo >= hi:
                    continue
                keep = bytearray(self.mask_bytes)
                K.bitmap_set_range(keep, (lo - base) // SECTOR_SIZE, -(-(hi - base) // SECTOR_SIZE))
                if i in mine:
                    K.bitmap_andnot(keep, mine[i])
                K.bitmap_andnot(out, keep)
        return out


# ------------------------------------------------------------------------------------------------ the verdict


@dataclass
class Verdict:
    """What one block holds, once read."""

    zero: bool  # every sector reads as zero
    droppable: bool  # every sector is zero or free in the file systems (quick/full drop it)
    free: bytearray | None  # sectors free for dropping (MSB-first), None if none
    zero_sectors: int = 0
    # per usable file system touching the block: (file-system index, free sectors, free sectors holding data)
    per_fs: list[tuple[int, int, int]] = field(default_factory=list)


class BlockJudge:
    """Examines blocks read into memory: zero sectors (kernel) joined with the file systems' free sectors."""

    def __init__(self, fmap: FreeSectorMap | None, block_size: int) -> None:
        self.fmap = fmap
        self.block_size = block_size
        self.spb = block_size // SECTOR_SIZE
        self.mask_bytes = -(-self.spb // 8)
        self._zero = bytearray(self.mask_bytes)
        self._tmp = bytearray(self.mask_bytes)
        self._zeros_block = bytearray(block_size)

    def examine(self, b: int, block: memoryview, *, per_fs: bool = False) -> Verdict:
        """``block`` holds the whole block (zero-padded past the end of the disk)."""
        spb = self.spb
        nzero = K.sector_zero_mask(block, self._zero)
        if nzero == spb:
            return Verdict(True, True, None, nzero)
        if self.fmap is None:
            return Verdict(False, False, None, nzero)
        masks = self.fmap.masks(b)
        counts: list[tuple[int, int, int]] = []
        if per_fs:
            for f, m in masks:
                free = K.bitmap_count(m, 0, spb)
                self._tmp[:] = m
                K.bitmap_andnot(self._tmp, self._zero)
                counts.append((f.index, free, K.bitmap_count(self._tmp, 0, spb)))
        union = self.fmap.union(b, masks)
        if union is None:
            return Verdict(False, False, None, nzero, counts)
        self._tmp[:] = self._zero
        K.bitmap_or(self._tmp, union)
        droppable = K.bitmap_count(self._tmp, 0, spb) == spb
        return Verdict(False, droppable, union, nzero, counts)

    def zero_free_sectors(self, block: memoryview, verdict: Verdict) -> int:
        """Overwrite the block's free sectors with zeros (full mode); returns the sectors that held data.

        Call it right after :meth:`examine` of the same block: it reuses that block's zero-sector mask.
        """
        if verdict.free is None:
            return 0
        self._tmp[:] = verdict.free
        K.bitmap_andnot(self._tmp, self._zero)
        n = K.bitmap_count(self._tmp, 0, self.spb)
        if n:
            K.merge_block(block, self._zeros_block, self._tmp)
        return n

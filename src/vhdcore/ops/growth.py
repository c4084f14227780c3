"""Growth forensics: why a VHD chain is larger than the file systems inside it, and what compaction would reclaim.

A VHD only grows: blocks the guest freed by deleting files stay allocated, every snapshot layer adds its own copies
of what it rewrites, and blocks of zeros take as much room as blocks of data. This module puts numbers on each
cause, from the files alone, without mounting anything:

- the VHD side, per layer (``LayerGrowth``): its file, its metadata (footers, header, BAT, locators, sector
  bitmaps), the bytes its blocks hold, how many of them shadow data a layer below already holds (the duplicates
  coalescing removes), and its blocks that hold only zeros;
- the guest side (``vhdcore.guest``): the partition table and, for each file system, what its own allocation
  structures say is in use;
- the join, per block of the grid compaction writes (``FileSystemGrowth``): bytes the VHD holds that the file
  system marks free (deleted-file space), of which still holding data (recoverable deleted data, the forensic
  view), and the blocks ``compact`` would drop. The compacted sizes are computed by the same per-block rules
  ``vhdcore.compact`` applies (``vhdcore.ops.blockmap``), so they are the sizes it writes, to the byte.

Cost follows metadata and allocated blocks: block data is read once per layer (chains only) and once through the
chain, holes of sparse fixed disks are skipped, and the bitmap work runs in the kernels.
"""
from __future__ import annotations

import os
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .. import kernels as K
from .blockmap import BlockJudge, FreeSectorMap, Intervals, block_allocation, grid_block_size, host_data_runs
from ..disk.chain import Disk, open_chain
from ..format.layout import dynamic_file_size
from ..disk.image import Image
from ..format.rules import table_bytes
from ..format.structs import FOOTER_SIZE, HEADER_SIZE, SECTOR_SIZE

__all__ = ["growth", "GrowthReport", "LayerGrowth", "FileSystemGrowth", "SECONDS_PER_GB", "SYSTEM_VOLUME_LIMIT",
           "imaging_seconds"]

GiB = 1024**3
# The seed's rule of thumb for cloud imaging: about two minutes per GB of VHD data. Cloud "GB" (flavors, quotas)
# are binary gigabytes, so GB here is GiB.
SECONDS_PER_GB = 120.0
# A system volume over this cannot be built on General Purpose / I/O flavors (the documented limit).
SYSTEM_VOLUME_LIMIT = 40 * GiB
# Fixed disks and the per-layer scan look at data in units of this size (a fixed VHD has no blocks).
FIXED_UNIT = 2 * 1024 * 1024

ProgressFn = Callable[[int, int], None]


def imaging_seconds(nbytes: int) -> float:
    return round(nbytes / GiB * SECONDS_PER_GB, 1)


@dataclass
class LayerGrowth:
    path: str
    type: str  # "fixed" | "dynamic" | "differencing"
    block_size: int  # the layer's block size (fixed disks: the 2 MiB unit zero data is counted in)
    file_size: int
    disk_usage_bytes: int  # what the host file system really stores for the file (sparse files use less)
    allocated_blocks: int
    block_bytes: int  # file space of the allocated blocks' data areas (fixed: the whole data area)
    allocated_bytes: int  # bytes of the virtual disk this layer holds (differencing: present sectors only)
    shadowed_bytes: int  # of those, bytes some layer below also holds (duplicates coalescing removes)
    zero_blocks: int  # allocated blocks whose held data is all zero
    zero_block_bytes: int  # the bytes those blocks hold
    metadata_bytes: int  # footers, header, BAT, parent locators, sector bitmaps
    other_bytes: int  # the rest of the file: alignment padding and space no structure refers to


@dataclass
class FileSystemGrowth:
    type: str  # ext2 | ext3 | ext4 | ntfs | fat12 | fat16 | fat32 | xfs | unknown
    offset: int
    size: int
    used_bytes: int  # from the file system's own allocation structures (unknown: all of it)
    free_bytes: int
    allocated_bytes: int  # bytes of [offset, offset+size) some layer of the chain holds
    free_allocated_bytes: int  # held by the VHD but free in the file system: deleted-file space
    free_allocated_nonzero_bytes: int  # of which not zero: deleted data still recoverable
    free_allocated_zero_bytes: int
    allocated_blocks: int  # blocks of the grid holding some allocated byte of this file system
    free_blocks: int  # of those, blocks entirely free in this file system
    cluster_size: int
    partition: int | None = None
    label: str | None = None
    trusted: bool = True  # its free space may be dropped by compaction
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class GrowthReport:
    path: str
    virtual_size: int
    file_size: int  # all layers' files together
    disk_usage_bytes: int  # what the host stores for them (st_blocks)
    allocated_blocks: int  # all layers together
    allocated_bytes: int  # bytes held by all layers together (duplicates included)
    virtual_allocated_bytes: int  # bytes of the virtual disk some layer holds
    metadata_bytes: int
    zero_block_bytes: int  # bytes in allocated blocks that hold only zeros, all layers
    shadowed_bytes: int
    layers: list[LayerGrowth]
    partition_table: str
    partitions: list[dict]
    filesystems: list[FileSystemGrowth]
    used_bytes: int  # what the recognised file systems use (the df-like figure)
    block_size: int  # the grid of the join and of the compacted disk
    blocks: dict  # counts on that grid: allocated, zero, free (droppable, not zero), kept
    compacted_size: dict  # the size `compact` writes, per mode
    reclaimable_bytes: int  # file_size - compacted_size["full"]
    imaging_estimate_seconds: dict
    warnings: list[str]
    seconds: float
    block_table: list[dict] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["block_table"] is None:
            del d["block_table"]
        return d


# ------------------------------------------------------------------------------------------------ VHD side


def _metadata_bytes(img: Image) -> int:
    if img.is_fixed:
        return FOOTER_SIZE
    locs = sum(loc.data_space_bytes for loc in img.parent_locators) if img.is_differencing else 0
    bat = table_bytes(img.max_table_entries)
    return 2 * FOOTER_SIZE + HEADER_SIZE + bat + locs + len(img.allocated_blocks()) * img.bitmap_size


def _disk_usage(img: Image) -> int:
    try:
        return os.fstat(img.fd).st_blocks * 512
    except (OSError, AttributeError):
        return img.file_size


class _ScanBuffer:
    """The block buffer the zero scans read disk data into (one, reused) and the progress count of those reads."""

    def __init__(self, block_size: int, total: int, progress: ProgressFn | None) -> None:
        self.buf = bytearray(max(block_size, FIXED_UNIT))
        self.mv = memoryview(self.buf)
        self.done = 0
        self.total = max(total, 1)
        self.progress = progress

    def tick(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(min(self.done, self.total), self.total)


def _layer_present(img: Image) -> Intervals:
    """The virtual ranges one file holds."""
    size = img.size
    if img.is_fixed:
        return Intervals(np.array([0], np.int64), np.array([size], np.int64))
    bs = img.block_size
    blocks = img.allocated_blocks().astype(np.int64)
    blocks = blocks[blocks * bs < size]
    # Dynamic disks too: a sector whose bit is clear is not held (libvhd reads it as zeros).
    starts, ends = array("q"), array("q")
    for b in blocks.tolist():
        base = b * bs
        nsec = (min(base + bs, size) - base) // SECTOR_SIZE
        bitmap = img.read_bitmap(b)
        for first, n, present in K.bitmap_runs(bitmap, 0, nsec):
            if present:
                s, e = base + first * SECTOR_SIZE, base + (first + n) * SECTOR_SIZE
                if ends and ends[-1] == s:  # runs continuing into the next block
                    ends[-1] = e
                else:
                    starts.append(s)
                    ends.append(e)
    if not starts:
        return Intervals.empty()
    return Intervals(np.frombuffer(starts, np.int64).copy(), np.frombuffer(ends, np.int64).copy())


def _layer_zero_scan(img: Image, scan: _ScanBuffer) -> tuple[int, int]:
    """(zero blocks, bytes they hold) of one file, reading only its own data."""
    size = img.size
    mv = scan.mv
    zero_blocks = zero_bytes = 0
    if img.is_fixed:
        unit = FIXED_UNIT
        nunits = -(-size // unit)
        data = host_data_runs(img).per_block(unit, nunits)
        spans = np.minimum(np.arange(1, nunits + 1, dtype=np.int64) * unit, size) - np.arange(nunits) * unit
        holes = data == 0
        zero_blocks, zero_bytes = int(holes.sum()), int(spans[holes].sum())
        for u in np.flatnonzero(~holes).tolist():
            n = int(spans[u])
            img.preadinto(u * unit, mv[:n])
            scan.tick(n)
            if K.is_zero(mv[:n]):
                zero_blocks += 1
                zero_bytes += n
        return zero_blocks, zero_bytes
    bs = img.block_size
    spb = bs // SECTOR_SIZE
    zmask = bytearray(-(-spb // 8))
    for b in img.allocated_blocks().tolist():
        base = b * bs
        if base >= size:
            continue
        n = min(bs, size - base)
        part = mv[:n]
        img.preadinto(img.block_file_offset(b), part)
        scan.tick(n)
        # A block (dynamic or differencing) is zero when none of its present sectors holds data.
        nsec = n // SECTOR_SIZE
        present = bytearray(img.read_bitmap(b)[: len(zmask)])
        K.sector_zero_mask(part[: nsec * SECTOR_SIZE], zmask)
        held = K.bitmap_count(present, 0, nsec)
        K.bitmap_andnot(present, zmask)
        if K.bitmap_count(present, 0, nsec) == 0 and held:
            zero_blocks += 1
            zero_bytes += held * SECTOR_SIZE
    return zero_blocks, zero_bytes


# ------------------------------------------------------------------------------------------------ report


def growth(path: str | os.PathLike[str], *, parent_dirs: Sequence[str] | None = None, strict: bool = True,
           block_size: int | None = None, block_table: bool = False,
           progress: ProgressFn | None = None) -> GrowthReport:
    """Analyse the chain ending at ``path``: VHD allocation per layer joined with the guest file systems' use.

    ``block_size`` is the grid of the join and of the compaction estimate (default: the leaf's block size, 2 MiB
    for a fixed disk), the same default ``compact`` uses. ``block_table`` adds one row per allocated block.
    """
    t0 = time.perf_counter()
    with open_chain(path, "r", parent_dirs, strict=strict) as disk:
        return _growth(disk, t0, block_size, block_table, progress)


def _growth(disk: Disk, t0: float, block_size: int | None, want_table: bool,
            progress: ProgressFn | None) -> GrowthReport:
    from .. import guest

    size = disk.size
    bs, grid_note = grid_block_size(disk, block_size)
    layers_imgs = disk.layers
    alloc = block_allocation(disk, bs)
    nblocks = alloc.nblocks
    span = alloc.span(size)

    # Reading the layers one by one is needed only when the chain's view differs from each file's own view.
    single = len(layers_imgs) == 1 and (layers_imgs[0].block_size or FIXED_UNIT) == bs
    layer_read = 0 if single else sum(_layer_data_bytes(img) for img in layers_imgs)
    scan = _ScanBuffer(bs, layer_read + int(span[alloc.data > 0].sum()), progress)

    # --- the VHD side, per layer; shadowing from the base up
    present = [_layer_present(img) for img in layers_imgs]
    below = Intervals.empty()
    shadowed = [0] * len(layers_imgs)
    for d in range(len(layers_imgs) - 1, -1, -1):
        shadowed[d] = present[d].overlap_bytes(below) if len(below) else 0
        below = below.union(present[d])
    zero_scan = [(0, 0)] * len(layers_imgs) if single else [_layer_zero_scan(img, scan) for img in layers_imgs]

    # --- the guest side
    g = guest.analyse(disk)
    fmap = FreeSectorMap(g.filesystems, size, bs)
    judge = BlockJudge(fmap, bs)

    # --- the join: every block that holds data is read once through the chain
    allocated_mask = alloc.allocated > 0
    zero = allocated_mask & (alloc.data == 0)  # fixed-disk holes: zeros, never read
    droppable = zero.copy()
    nfs = len(g.filesystems)
    free_nonzero = np.zeros(nfs, dtype=np.int64)
    table_nonzero = np.zeros(nblocks, dtype=np.int64) if want_table else None
    mv = scan.mv[:bs]
    for b in np.flatnonzero(alloc.data > 0).tolist():
        n = int(span[b])
        if n < bs:
            mv[n:] = bytes(bs - n)
        disk.readinto(b * bs, mv[:n])
        scan.tick(n)
        v = judge.examine(b, mv, per_fs=True)
        zero[b] = v.zero
        droppable[b] = v.droppable
        for idx, _free, nonzero in v.per_fs:
            free_nonzero[idx] += nonzero * SECTOR_SIZE
            if table_nonzero is not None:
                table_nonzero[b] += nonzero * SECTOR_SIZE

    filesystems, fs_free_alloc_pb = _join(g.filesystems, fmap, alloc, span, free_nonzero, bs)
    # Single-file disks: the chain's view is the file's view, so its zero blocks come from the join's reads.
    if single:
        img = layers_imgs[0]
        zero_scan = [(int(zero.sum()), int(np.minimum(span, alloc.allocated)[zero].sum()))]

    layers = []
    for d, img in enumerate(layers_imgs):
        nalloc = len(img.allocated_blocks()) if not img.is_fixed else -(-size // FIXED_UNIT)
        unit = img.block_size if not img.is_fixed else FIXED_UNIT
        block_bytes = nalloc * img.block_size if not img.is_fixed else size
        meta = _metadata_bytes(img)
        layers.append(LayerGrowth(
            path=img.path, type=img.disk_type.label, block_size=unit, file_size=img.file_size,
            disk_usage_bytes=_disk_usage(img), allocated_blocks=nalloc, block_bytes=block_bytes,
            allocated_bytes=present[d].total, shadowed_bytes=shadowed[d], zero_blocks=zero_scan[d][0],
            zero_block_bytes=zero_scan[d][1], metadata_bytes=meta,
            other_bytes=max(0, img.file_size - meta - block_bytes)))

    kept_zero_mode = int((allocated_mask & ~zero).sum())
    kept_full = int((allocated_mask & ~droppable).sum())
    compacted = {"zero": dynamic_file_size(size, bs, kept_zero_mode),
                 "quick": dynamic_file_size(size, bs, kept_full),
                 "full": dynamic_file_size(size, bs, kept_full)}
    file_size = sum(l.file_size for l in layers)
    blocks = {"allocated": int(allocated_mask.sum()), "zero": int(zero.sum()),
              "free": int((droppable & ~zero).sum()), "kept": kept_full}
    used = sum(fs.used_bytes for fs in filesystems if fs.type != "unknown")
    warnings = _warnings(disk, g, fmap, filesystems, size, file_size, compacted["full"], used)
    if grid_note:
        warnings.append(grid_note)
    estimate = {"now": imaging_seconds(file_size), "after_compaction": imaging_seconds(compacted["full"]),
                "seconds_per_gb": SECONDS_PER_GB}
    table = _block_table(alloc, zero, droppable, fmap, fs_free_alloc_pb, table_nonzero, span) if want_table else None
    return GrowthReport(
        path=disk.leaf.path, virtual_size=size, file_size=file_size,
        disk_usage_bytes=sum(l.disk_usage_bytes for l in layers),
        allocated_blocks=sum(l.allocated_blocks for l in layers),
        allocated_bytes=sum(l.allocated_bytes for l in layers), virtual_allocated_bytes=alloc.allocated_runs.total,
        metadata_bytes=sum(l.metadata_bytes for l in layers), zero_block_bytes=sum(l.zero_block_bytes for l in layers),
        shadowed_bytes=sum(shadowed), layers=layers, partition_table=g.partition_table,
        partitions=[p.to_dict() for p in g.partitions], filesystems=filesystems, used_bytes=used, block_size=bs,
        blocks=blocks, compacted_size=compacted, reclaimable_bytes=max(0, file_size - compacted["full"]),
        imaging_estimate_seconds=estimate, warnings=warnings, seconds=round(time.perf_counter() - t0, 3),
        block_table=table)


def _layer_data_bytes(img: Image) -> int:
    """What _layer_zero_scan reads of one file."""
    if img.is_fixed:
        nunits = -(-img.size // FIXED_UNIT)
        data = host_data_runs(img).per_block(FIXED_UNIT, nunits) > 0
        spans = np.minimum(np.arange(1, nunits + 1, dtype=np.int64) * FIXED_UNIT, img.size) - \
            np.arange(nunits, dtype=np.int64) * FIXED_UNIT
        return int(spans[data].sum())
    bs = img.block_size
    blocks = img.allocated_blocks().astype(np.int64)
    return int(np.clip(img.size - blocks * bs, 0, bs).sum())


def _join(fss: list, fmap: FreeSectorMap, alloc, span: np.ndarray, free_nonzero: np.ndarray, bs: int,
          ) -> tuple[list[FileSystemGrowth], dict[int, tuple[int, np.ndarray]]]:
    """Per file system: VHD-held bytes, of which free in the file system, per block of the grid."""
    infos = {f.index: f for f in fmap.infos}
    out: list[FileSystemGrowth] = []
    per_block: dict[int, tuple[int, np.ndarray]] = {}
    runs = alloc.allocated_runs
    for i, fs in enumerate(fss):
        off, end = int(fs.offset), int(fs.offset) + int(fs.size)
        held = int(runs.coverage_before(np.array([end], np.int64))[0] - runs.coverage_before(np.array([off],
                                                                                                   np.int64))[0])
        first, last = off // bs, (max(end, off + 1) - 1) // bs
        touched = alloc.allocated[first : last + 1] > 0
        f = infos.get(i)
        free_alloc = 0
        free_blocks = 0
        if f is not None and touched.any():
            free = f.free
            full_alloc = alloc.allocated[first : last + 1] == span[first : last + 1]
            fa = np.where(full_alloc, free, 0).astype(np.int64)
            # Blocks the chain holds only in part: free sectors counted where the chain holds them.
            for k in np.flatnonzero(~full_alloc & touched & (free > 0)).tolist():
                b = first + k
                fa[k] = _free_held_in_block(fmap, f, b, runs, bs)
            free_alloc = int(fa.sum())
            free_blocks = int((touched & (free == span[first : last + 1])).sum())
            per_block[i] = (first, fa)
        trusted = f is not None and f.trusted
        out.append(FileSystemGrowth(
            type=fs.type, offset=off, size=int(fs.size), used_bytes=int(fs.used_bytes), free_bytes=int(fs.free_bytes),
            allocated_bytes=held, free_allocated_bytes=free_alloc,
            free_allocated_nonzero_bytes=int(free_nonzero[i]),
            free_allocated_zero_bytes=free_alloc - int(free_nonzero[i]), allocated_blocks=int(touched.sum()),
            free_blocks=free_blocks, cluster_size=int(fs.cluster_size), partition=fs.partition_index,
            label=fs.label, trusted=trusted, details=_jsonable(fs.details), notes=list(fs.notes)))
    return out, per_block


def _free_held_in_block(fmap: FreeSectorMap, f, b: int, runs: Intervals, bs: int) -> int:
    mask = fmap.fs_mask(f, b)
    held = bytearray(len(mask))
    part = runs.clip(b * bs, (b + 1) * bs)
    for s, e in zip(part.starts.tolist(), part.ends.tolist()):
        K.bitmap_set_range(held, (s - b * bs) // SECTOR_SIZE, -(-(e - b * bs) // SECTOR_SIZE))
    K.bitmap_andnot(mask, _invert(held, fmap.spb))
    return K.bitmap_count(mask, 0, fmap.spb) * SECTOR_SIZE


def _invert(mask: bytearray, nbits: int) -> bytearray:
    out = bytearray(len(mask))
    K.bitmap_set_range(out, 0, nbits)
    K.bitmap_andnot(out, mask)
    return out


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out


def _block_table(alloc, zero, droppable, fmap: FreeSectorMap, fs_free_alloc_pb, nonzero, span) -> list[dict]:
    bs = alloc.block_size
    nblocks = alloc.nblocks
    fs_free = fmap.free_per_block(nblocks)
    free_alloc = np.zeros(nblocks, dtype=np.int64)
    for first, fa in fs_free_alloc_pb.values():
        free_alloc[first : first + len(fa)] += fa
    covered = np.zeros(nblocks, dtype=np.int64)
    for f in fmap.infos:
        covered[f.first : f.last + 1] += f.overlap
    rows = []
    for b in np.flatnonzero(alloc.allocated > 0).tolist():
        verdict = "zero" if zero[b] else ("free" if droppable[b] else "keep")
        rows.append({"block": b, "offset": b * bs, "allocated": int(alloc.allocated[b]),
                     "fs_used": int(covered[b] - fs_free[b]), "free_allocated": int(free_alloc[b]),
                     "free_allocated_nonzero": int(nonzero[b]), "zero": bool(zero[b]), "compact": verdict})
    return rows


def _warnings(disk: Disk, g, fmap: FreeSectorMap, filesystems: list[FileSystemGrowth], size: int, file_size: int,
              compacted: int, used: int) -> list[str]:
    out = list(disk.warnings) + list(g.warnings)
    for i, why in fmap.skipped:
        fs = filesystems[i]
        out.append(f"{fs.type} at offset {fs.offset}: {why}; compaction keeps all of its blocks")
    for fs in filesystems:
        if fs.type == "unknown":
            sig = fs.details.get("signature")
            out.append(f"partition at offset {fs.offset} ({fs.size} bytes): no recognised file system"
                       f"{f' ({sig})' if sig else ''}; its blocks are counted as used and kept as they are")
    gb = lambda n: f"{n / GiB:.1f} GB"  # noqa: E731
    if size > SYSTEM_VOLUME_LIMIT:
        out.append(f"the virtual disk is {gb(size)}: a system volume over 40 GB cannot be built on General Purpose "
                   "/ I/O flavors")
    if file_size > SYSTEM_VOLUME_LIMIT and used <= SYSTEM_VOLUME_LIMIT:
        after = (f"; after compaction it would be {gb(compacted)}" if compacted < file_size else "")
        out.append(f"the VHD files hold {gb(file_size)} while the file systems use {gb(used)}: the VHD's size "
                   "includes change tracking (snapshot layers) and deleted-file space, so it can exceed a limit the "
                   f"file system is under{after}")
    return out

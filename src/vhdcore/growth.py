"""Growth forensics: why a VHD chain is larger than the file systems inside it.

The VHD side (what each layer allocated, what it shadows below, blocks that hold only zeros, metadata) comes
from the files' own structures; the guest side (what each file system really uses) from ``vhdcore.guest``,
read from the file systems' allocation structures without mounting anything. The two are joined per VHD block.
Cost follows metadata and allocated blocks, never the virtual size.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import _kernels as K
from .chain import Disk, open_chain
from .image import NOT_HERE, Image
from .structs import FOOTER_SIZE, HEADER_SIZE, SECTOR_SIZE

GB = 1000**3
# The seeds' rule of thumb for cloud imaging: about two minutes per GB of VHD.
SECONDS_PER_GB = 120.0
# A system volume over this cannot be built on General Purpose / I/O flavors (documented limit).
SYSTEM_VOLUME_LIMIT = 40 * GB
_READ_CHUNK = 8 * 1024 * 1024


@dataclass
class LayerGrowth:
    path: str
    type: str
    file_size: int
    allocated_blocks: int
    allocated_bytes: int  # bytes of block data this layer holds (present sectors for differencing layers)
    shadowed_bytes: int  # of those, bytes that some layer below also holds (duplicates coalescing removes)
    zero_blocks: int  # allocated blocks whose present data is all zero
    zero_block_bytes: int
    metadata_bytes: int  # footers, header, BAT, bitmaps, locators


@dataclass
class FileSystemGrowth:
    type: str
    offset: int
    size: int
    cluster_size: int
    used_bytes: int
    free_bytes: int
    allocated_bytes: int  # bytes of this file system's range backed by some layer of the chain
    free_allocated_bytes: int  # allocated in the VHD but free in the file system (deleted-file space)
    free_allocated_nonzero_bytes: int  # of which still holding data (recoverable deleted data)
    partition: int | None = None
    label: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class GrowthReport:
    path: str
    virtual_size: int
    file_size: int  # all layers' files together
    allocated_bytes: int  # block data held by all layers together
    virtual_allocated_bytes: int  # bytes of the virtual disk that some layer holds
    metadata_bytes: int
    zero_block_bytes: int
    shadowed_bytes: int
    layers: list[LayerGrowth]
    partition_table: str
    partitions: list[dict]
    filesystems: list[FileSystemGrowth]
    reclaimable_bytes: int
    compacted_size_estimate: int
    imaging_estimate_seconds: dict
    warnings: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ VHD side


def _present_runs(img: Image, start: int = 0, stop: int | None = None):
    """Runs (offset, length, file_offset) of the virtual disk this one file holds."""
    stop = img.size if stop is None else stop
    for off, n, fo in img.layer_runs(start, stop):
        if fo != NOT_HERE:
            yield off, n, fo


def _metadata_bytes(img: Image) -> int:
    if img.is_fixed:
        return FOOTER_SIZE
    locs = sum(loc.data_space_bytes for loc in getattr(img, "parent_locators", []))
    bat = -(-img.max_table_entries * 4 // SECTOR_SIZE) * SECTOR_SIZE
    return 2 * FOOTER_SIZE + HEADER_SIZE + bat + locs + len(img.allocated_blocks()) * img.bitmap_size


def _layer_growth(disk: Disk, depth: int, progress: Callable[[int], None] | None) -> LayerGrowth:
    img = disk.layers[depth]
    below = Disk(disk.layers[depth + 1 :]) if depth + 1 < len(disk.layers) else None
    allocated = shadowed = zero_blocks = zero_bytes = 0
    buf = bytearray(_READ_CHUNK)
    mv = memoryview(buf)
    if img.is_fixed:
        blocks: list[tuple[int, list[tuple[int, int, int]]]] = []
        # A fixed disk holds everything; "zero blocks" are counted in 2 MiB units for comparability.
        unit = 2 * 1024 * 1024
        for start in range(0, img.size, unit):
            n = min(unit, img.size - start)
            blocks.append((start // unit, [(start, n, start)]))
        nblocks = 0
    else:
        unit = img.block_size
        nblocks = len(img.allocated_blocks())
        blocks = None  # type: ignore[assignment]
    block_iter = blocks if blocks is not None else _dynamic_blocks(img)
    for _b, runs in block_iter:
        block_nonzero = False
        block_len = 0
        for off, n, fo in runs:
            allocated += n
            block_len += n
            if below is not None:
                shadowed += sum(e.length for e in below.allocated_extents(off, n))
            pos = 0
            while pos < n and not block_nonzero:
                k = min(len(buf), n - pos)
                img.preadinto(fo + pos, mv[:k])
                if not K.is_zero(mv[:k]):
                    block_nonzero = True
                pos += k
            if progress:
                progress(n)
        if not block_nonzero and block_len:
            zero_blocks += 1
            zero_bytes += block_len
    if below is not None:
        below.layers = []  # the view shares images with ``disk``; it must not close them
    return LayerGrowth(
        path=img.path,
        type=img.disk_type.label,
        file_size=img.file_size,
        allocated_blocks=nblocks if not img.is_fixed else 0,
        allocated_bytes=allocated,
        shadowed_bytes=shadowed,
        zero_blocks=zero_blocks,
        zero_block_bytes=zero_bytes,
        metadata_bytes=_metadata_bytes(img),
    )


def _dynamic_blocks(img: Image):
    bs = img.block_size
    for b in img.allocated_blocks():
        b = int(b)
        start = b * bs
        yield b, list(_present_runs(img, start, min(start + bs, img.size)))


# ------------------------------------------------------------------------------------------------ guest side


def _block_allocation(disk: Disk, block_size: int) -> np.ndarray:
    """Bytes of each ``block_size`` virtual block that some layer holds (uint32 per block)."""
    nblocks = -(-disk.size // block_size)
    out = np.zeros(nblocks, dtype=np.int64)
    for ext in disk.allocated_extents():
        pos = ext.offset
        while pos < ext.end:
            b = pos // block_size
            k = min(ext.end, (b + 1) * block_size) - pos
            out[b] += k
            pos += k
    return out


def _join_filesystem(disk: Disk, fs: Any, alloc_by_block: np.ndarray, block_size: int) -> FileSystemGrowth:
    """Per VHD block: used by the file system / allocated but free / of which non-zero."""
    cs = int(fs.cluster_size)
    origin = int(fs.bitmap_origin)
    nclusters = int(fs.cluster_count)
    used_bits = np.unpackbits(np.asarray(fs.bitmap, dtype=np.uint8), bitorder="little")[:nclusters]
    fs_start, fs_end = int(fs.offset), int(fs.offset) + int(fs.size)
    allocated = free_alloc = free_alloc_nonzero = 0
    spc = max(1, cs // SECTOR_SIZE)
    buf = bytearray(block_size)
    mv = memoryview(buf)
    zero_mask = bytearray(-(-block_size // SECTOR_SIZE // 8) or 1)
    first_block = fs_start // block_size
    last_block = (fs_end - 1) // block_size
    blocks = np.flatnonzero(alloc_by_block[first_block : last_block + 1]) + first_block
    for b in blocks:
        b = int(b)
        lo = max(fs_start, b * block_size)
        hi = min(fs_end, (b + 1) * block_size, disk.size)
        if hi <= lo:
            continue
        # Which parts of [lo, hi) are backed by the chain, and which clusters are free there.
        runs = [(e.offset, e.length) for e in disk.allocated_extents(lo, hi - lo)]
        if not runs:
            continue
        for off, n in runs:
            allocated += n
            c0 = (off - origin) // cs
            c1 = -(-(off + n - origin) // cs)
            c0c, c1c = max(c0, 0), min(c1, nclusters)
            if c1c <= c0c:
                continue  # outside the cluster area: file-system metadata, which counts as used
            bits = used_bits[c0c:c1c]
            free_clusters = np.flatnonzero(bits == 0)
            if len(free_clusters) == 0:
                continue
            # Free bytes within this run, clipped to the run's range.
            cstarts = origin + (free_clusters + c0c).astype(np.int64) * cs
            cends = cstarts + cs
            s = np.maximum(cstarts, off)
            e = np.minimum(cends, off + n)
            lens = np.clip(e - s, 0, None)
            free_here = int(lens.sum())
            if not free_here:
                continue
            free_alloc += free_here
            # Non-zero free sectors: the deleted data still on disk.
            rlen = n
            part = mv[:rlen] if rlen <= len(buf) else memoryview(bytearray(rlen))
            disk.readinto(off, part)
            nsec = rlen // SECTOR_SIZE
            mask = bytearray(-(-nsec // 8) or 1)
            K.sector_zero_mask(part[: nsec * SECTOR_SIZE], mask)
            zero_sec = np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="big")[:nsec].astype(bool)
            sec_off = off + np.arange(nsec, dtype=np.int64) * SECTOR_SIZE
            cl = (sec_off - origin) // cs
            in_range = (cl >= 0) & (cl < nclusters)
            free_sec = np.zeros(nsec, dtype=bool)
            free_sec[in_range] = used_bits[cl[in_range]] == 0
            free_alloc_nonzero += int(np.count_nonzero(free_sec & ~zero_sec)) * SECTOR_SIZE
    return FileSystemGrowth(
        type=fs.type, offset=fs_start, size=int(fs.size), cluster_size=cs, used_bytes=int(fs.used_bytes),
        free_bytes=int(fs.free_bytes), allocated_bytes=allocated, free_allocated_bytes=free_alloc,
        free_allocated_nonzero_bytes=free_alloc_nonzero, partition=getattr(fs, "partition_index", None),
        label=getattr(fs, "label", None), notes=list(getattr(fs, "notes", []) or []))


# ------------------------------------------------------------------------------------------------ report


def growth(path: str | os.PathLike[str], *, parent_dirs: Sequence[str] | None = None, strict: bool = True,
           progress: Callable[[int, int], None] | None = None) -> GrowthReport:
    """Analyse the chain ending at ``path``: VHD allocation per layer joined with guest file-system use."""
    t0 = time.perf_counter()
    with open_chain(path, "r", parent_dirs, strict=strict) as disk:
        return _growth(disk, t0, progress)


def _growth(disk: Disk, t0: float, progress: Callable[[int, int], None] | None) -> GrowthReport:
    from . import guest

    total_alloc = sum(
        (img.size if img.is_fixed else len(img.allocated_blocks()) * img.block_size) for img in disk.layers)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], max(total_alloc, 1))

    layers = [_layer_growth(disk, d, tick) for d in range(len(disk.layers))]
    block_size = disk.leaf.block_size or 2 * 1024 * 1024
    alloc_by_block = _block_allocation(disk, block_size)
    virtual_allocated = int(alloc_by_block.sum())
    warnings: list[str] = list(disk.warnings)

    g = guest.analyse(disk)
    filesystems = [_join_filesystem(disk, fs, alloc_by_block, block_size) for fs in g.filesystems
                   if fs.type != "unknown" and fs.cluster_count > 0]
    for fs in g.filesystems:
        if fs.type == "unknown":
            warnings.append(f"partition at offset {fs.offset} ({fs.size} bytes): no known file system; "
                            "its allocated blocks are kept as they are")
    partitions = [p.to_dict() if hasattr(p, "to_dict") else dict(vars(p)) for p in g.partitions]

    file_size = sum(l.file_size for l in layers)
    metadata = sum(l.metadata_bytes for l in layers)
    zero_bytes = sum(l.zero_block_bytes for l in layers)
    shadowed = sum(l.shadowed_bytes for l in layers)

    compacted = _compacted_estimate(disk, filesystems, g, alloc_by_block, block_size)
    reclaimable = max(0, file_size - compacted)
    for fs in filesystems:
        if fs.size > SYSTEM_VOLUME_LIMIT and fs.offset < 2 * 1024**3:
            warnings.append(
                f"the {fs.type} file system at offset {fs.offset} is over 40 GB: a system volume this large "
                "cannot be built on General Purpose / I/O flavors")
    if file_size > SYSTEM_VOLUME_LIMIT:
        warnings.append(
            f"the VHD chain holds {file_size / GB:.1f} GB, over 40 GB: its size counts change tracking and deleted-file "
            "space, so it can exceed a flavor limit the file system is under")
    estimate = {
        "now": round(file_size / GB * SECONDS_PER_GB, 1),
        "after_compaction": round(compacted / GB * SECONDS_PER_GB, 1),
        "seconds_per_gb": SECONDS_PER_GB,
    }
    return GrowthReport(
        path=disk.leaf.path, virtual_size=disk.size, file_size=file_size,
        allocated_bytes=sum(l.allocated_bytes for l in layers), virtual_allocated_bytes=virtual_allocated,
        metadata_bytes=metadata, zero_block_bytes=zero_bytes, shadowed_bytes=shadowed, layers=layers,
        partition_table=g.partition_table, partitions=partitions, filesystems=filesystems,
        reclaimable_bytes=reclaimable, compacted_size_estimate=compacted, imaging_estimate_seconds=estimate,
        warnings=warnings + list(getattr(g, "warnings", []) or []), seconds=round(time.perf_counter() - t0, 3))


def _compacted_estimate(disk: Disk, filesystems: list[FileSystemGrowth], g: Any, alloc_by_block: np.ndarray,
                        block_size: int) -> int:
    """Size of the single dynamic VHD a full compaction would write: blocks that hold used file-system data
    or data in regions no known file system covers, plus metadata."""
    from .structs import bitmap_bytes

    keep = alloc_by_block > 0
    nblocks = len(alloc_by_block)
    covered_free = np.zeros(nblocks, dtype=bool)
    for fs in g.filesystems:
        cs = int(fs.cluster_size)
        origin = int(fs.bitmap_origin)
        used_bits = np.unpackbits(np.asarray(fs.bitmap, dtype=np.uint8), bitorder="little")[: int(fs.cluster_count)]
        # Blocks entirely inside the file system's cluster area with no used cluster can be dropped.
        fs_first = -(-max(int(fs.offset), origin) // block_size)
        fs_last = (min(int(fs.offset) + int(fs.size), origin + len(used_bits) * cs)) // block_size
        if fs_last <= fs_first or block_size % cs:
            continue
        per = block_size // cs
        c0 = (fs_first * block_size - origin) // cs
        if (fs_first * block_size - origin) % cs:
            continue
        span = used_bits[c0 : c0 + (fs_last - fs_first) * per]
        nb = len(span) // per
        if nb <= 0:
            continue
        counts = span[: nb * per].reshape(nb, per).sum(axis=1)
        covered_free[fs_first : fs_first + nb] |= counts == 0
    keep &= ~covered_free
    kept = int(np.count_nonzero(keep))
    mte = nblocks
    meta = 2 * FOOTER_SIZE + HEADER_SIZE + -(-mte * 4 // SECTOR_SIZE) * SECTOR_SIZE
    return meta + kept * (block_size + bitmap_bytes(block_size))

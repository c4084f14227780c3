"""Compaction: a new dynamic VHD with the same guest data, without the space the guest no longer uses.

Like Hyper-V's Optimize-VHD, from the files alone. The chain is read through, block by block on the output's grid,
and each block that some layer holds is judged (``vhdcore.ops.blockmap``, the rules growth's estimate uses):

- ``zero``: blocks that read as all zeros are dropped (no guest analysis needed);
- ``quick``: also blocks in which every sector is free in the file systems covering it or reads as zero;
- ``full``: as ``quick``, and inside the blocks that are kept, sectors the file systems mark free are zeroed, so
  deleted data does not travel and the result compresses well.

Sectors a file system uses are never changed, and regions no recognised file system covers (partition tables,
gaps, unknown partitions, file systems whose journal needs recovery) are kept as they are. The output is written
under a temporary name beside ``dst`` and renamed into place at the end.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from .. import kernels as K
from .blockmap import BlockJudge, FreeSectorMap, block_allocation, grid_block_size
from ..disk.chain import open_chain
from .convert import write_dynamic
from ..fileio import atomic_output
from ..format.layout import check_size
from ..destination import check_destination
from ..format.structs import SECTOR_SIZE

__all__ = ["compact", "CompactReport", "MODES"]

MODES = ("full", "quick", "zero")
ProgressFn = Callable[[int, int], None]


@dataclass
class CompactReport:
    source: str
    destination: str
    mode: str
    virtual_size: int
    block_size: int
    bytes_before: int  # all files of the source chain
    bytes_after: int  # the new file
    reclaimed_bytes: int
    blocks_considered: int  # blocks of the grid some layer holds
    blocks_kept: int
    blocks_dropped: dict  # reason -> blocks: "zero" (all zeros), "free" (free in the file systems, or zero)
    free_bytes_zeroed: int  # full mode: bytes of free sectors inside kept blocks that held data, now zeros
    bytes_read: int
    seconds: float
    filesystems: list[dict] = field(default_factory=list)  # what the guest analysis found (summary)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def compact(src: str | os.PathLike[str], dst: str | os.PathLike[str], mode: str = "full", *,
            block_size: int | None = None, parent_dirs: Sequence[str] | None = None, strict: bool = True,
            progress: ProgressFn | None = None, overwrite: bool = False) -> CompactReport:
    """Write the chain ending at ``src`` into a new dynamic VHD ``dst``, dropping what ``mode`` allows."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    t0 = time.perf_counter()
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    check_destination(dst_s, sources=[src_s], overwrite=overwrite)  # before a byte of the source is read
    with open_chain(src_s, "r", parent_dirs, strict=strict) as disk:
        check_destination(dst_s, sources=[img.path for img in disk.layers], overwrite=overwrite)
        bs, grid_note = grid_block_size(disk, block_size)
        check_size(disk.size, bs)
        before = sum(img.file_size for img in disk.layers)
        warnings = list(disk.warnings) + ([grid_note] if grid_note else [])
        fs_summary: list[dict] = []
        fmap = None
        if mode != "zero":
            from .. import guest

            g = guest.analyse(disk)
            warnings.extend(g.warnings)
            fmap = FreeSectorMap(g.filesystems, disk.size, bs)
            for i, why in fmap.skipped:
                warnings.append(f"{g.filesystems[i].type} at offset {g.filesystems[i].offset}: {why}; "
                                "its blocks are kept as they are")
            fs_summary = [{"type": fs.type, "offset": fs.offset, "size": fs.size, "used_bytes": fs.used_bytes,
                           "free_bytes": fs.free_bytes, "partition": fs.partition_index} for fs in g.filesystems]
        alloc = block_allocation(disk, bs)
        judge = BlockJudge(fmap, bs)
        considered = int((alloc.allocated > 0).sum())
        # Blocks held only by holes of a sparse fixed disk are zeros: dropped without reading them.
        hole_blocks = int(((alloc.allocated > 0) & (alloc.data == 0)).sum())
        blocks = np.flatnonzero(alloc.data > 0)
        dropped = {"zero": hole_blocks, "free": 0}
        zeroed = [0]

        def keep(b: int, mv: memoryview) -> bool:
            if mode == "zero":
                if K.is_zero(mv):
                    dropped["zero"] += 1
                    return False
                return True
            v = judge.examine(b, mv)
            if v.zero:
                dropped["zero"] += 1
                return False
            if v.droppable:
                dropped["free"] += 1
                return False
            if mode == "full":
                zeroed[0] += judge.zero_free_sectors(mv, v)
            return True

        with atomic_output(dst_s) as (fd, _tmp):
            st = write_dynamic(fd, disk, bs, blocks, keep, progress)
        return CompactReport(
            source=src_s, destination=dst_s, mode=mode, virtual_size=disk.size, block_size=bs, bytes_before=before,
            bytes_after=st.file_size, reclaimed_bytes=before - st.file_size, blocks_considered=considered,
            blocks_kept=st.blocks_written, blocks_dropped=dropped, free_bytes_zeroed=zeroed[0] * SECTOR_SIZE,
            bytes_read=st.bytes_read, seconds=round(time.perf_counter() - t0, 3), filesystems=fs_summary,
            warnings=warnings)


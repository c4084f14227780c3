"""The size of the file ``convert`` or ``compact`` would write, without writing it (qemu-img measure).

Exact for VHD outputs: the writers' layout is a function of the virtual size, the block size and the number of
blocks kept (``layout.dynamic_file_size``), so measuring is counting the blocks they would keep, by the same
rules. ``convert --to dynamic`` keeps every block on the output's grid that some layer holds and that does not
read as all zeros, so those blocks are read (only those: cost follows the data). ``compact`` sizes come from
growth's per-block join, which applies compact's rules block by block. A fixed output is the virtual size plus a
footer, whatever the data; a raw output is as long as the virtual size (``data_bytes`` says how much of it a
sparse raw file would really allocate).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from .. import kernels as K
from ..disk.chain import open_chain
from ..disk.extents import data_blocks
from ..format.layout import DEFAULT_BLOCK_SIZE, check_size, dynamic_file_size
from ..format.rules import entries_needed
from ..format.structs import FOOTER_SIZE

__all__ = ["measure", "MeasureReport", "TARGETS"]

TARGETS = ("dynamic", "fixed", "raw")
ProgressFn = Callable[[int, int], None]


@dataclass
class MeasureReport:
    source: str
    to: str
    compact: str | None
    virtual_size: int
    block_size: int  # of a dynamic output; 0 otherwise
    blocks: int  # blocks a dynamic output would hold
    file_size: int  # the exact size of the output file
    fully_allocated_size: int  # the file with every block allocated (qemu-img measure's second figure)
    data_bytes: int  # bytes of the virtual disk that are not zeros (on the output's grid for dynamic outputs)
    bytes_read: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def measure(src: str | os.PathLike[str], to: str = "dynamic", *, compact: str | None = None,
            block_size: int | None = None, parent_dirs: Sequence[str] | None = None, strict: bool = True,
            progress: ProgressFn | None = None) -> MeasureReport:
    if to not in TARGETS:
        raise ValueError(f"'to' must be one of {', '.join(TARGETS)}, not {to!r}")
    if compact is not None:
        from .compact import MODES

        if compact not in MODES:
            raise ValueError(f"compact mode must be one of {', '.join(MODES)}, not {compact!r}")
        if to != "dynamic":
            raise ValueError("compact writes dynamic disks: --compact goes with --to dynamic")
        return _measure_compact(src, compact, block_size, parent_dirs, strict, progress)
    src_s = os.fspath(src)
    with open_chain(src_s, "r", parent_dirs, strict=strict) as disk:
        size = disk.size
        if to == "fixed":
            return MeasureReport(src_s, to, None, size, 0, 0, size + FOOTER_SIZE, size + FOOTER_SIZE,
                                 disk.allocated_bytes(), 0, list(disk.warnings))
        if to == "raw":
            return MeasureReport(src_s, to, None, size, 0, 0, size, size, disk.allocated_bytes(), 0,
                                 list(disk.warnings))
        bs = block_size or disk.leaf.block_size or DEFAULT_BLOCK_SIZE
        check_size(size, bs)
        buf = bytearray(bs)
        mv = memoryview(buf)
        kept = read = 0
        candidates = list(data_blocks(disk, bs))
        for i, b in enumerate(candidates):
            start = b * bs
            n = min(bs, size - start)
            disk.readinto(start, mv[:n])
            read += n
            if not K.is_zero(mv[:n]):
                kept += 1
            if progress:
                progress((i + 1) * bs, len(candidates) * bs)
        mte = entries_needed(size, bs)
        return MeasureReport(src_s, to, None, size, bs, kept, dynamic_file_size(size, bs, kept),
                             dynamic_file_size(size, bs, mte), kept * bs, read, list(disk.warnings))


def _measure_compact(src, mode: str, block_size: int | None, parent_dirs, strict: bool,
                     progress: ProgressFn | None) -> MeasureReport:
    from .growth import growth

    g = growth(src, parent_dirs=parent_dirs, strict=strict, block_size=block_size, progress=progress)
    size, bs = g.virtual_size, g.block_size
    file_size = g.compacted_size[mode]
    blocks = _blocks_of(file_size, size, bs)
    # growth reads each allocated byte once per layer (chains) or once (a single file).
    return MeasureReport(os.fspath(src), "dynamic", mode, size, bs, blocks, file_size,
                         dynamic_file_size(size, bs, entries_needed(size, bs)), blocks * bs, g.allocated_bytes,
                         list(g.warnings))


def _blocks_of(file_size: int, size: int, bs: int) -> int:
    """The block count whose dynamic_file_size is ``file_size`` (the layout is monotonic in it)."""
    lo, hi = 0, entries_needed(size, bs)
    while lo < hi:
        mid = (lo + hi) // 2
        if dynamic_file_size(size, bs, mid) < file_size:
            lo = mid + 1
        else:
            hi = mid
    return lo

"""Compare the virtual content of two disks (chains), as ``qemu-img compare`` does without ``-s``.

The answer is "identical" or the offset of the first sector that differs. Disks of different sizes are compared
over the smaller size, and the rest of the larger one must read as zeros. Both disks' extent maps are walked side
by side: a range that is zero in both (nothing allocated in either chain) is never read, and a range both chains
take from the same run of the same file (a chain compared with its own parent's chain) is equal without reading.
So the cost follows the data the disks hold, not their virtual size.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .. import kernels as K
from ..disk.chain import Disk, open_chain
from ..disk.extents import Extent, same_stored_bytes
from ..format.structs import SECTOR_SIZE

__all__ = ["compare", "compare_disks", "CompareResult"]

CHUNK = 1024 * 1024
ProgressFn = Callable[[int, int], None]


@dataclass
class CompareResult:
    a: str
    b: str
    identical: bool
    # Start of the first sector that differs (qemu-img compare's figure), or None when identical.
    offset: int | None
    size_a: int
    size_b: int
    bytes_read: int  # both disks together
    warnings: list[str] = field(default_factory=list)

    @property
    def size_mismatch(self) -> bool:
        return self.size_a != self.size_b

    def to_dict(self) -> dict:
        d = asdict(self)
        d["a_size"], d["b_size"] = d.pop("size_a"), d.pop("size_b")  # sizes end in _size (docs/json.md)
        d["size_mismatch"] = self.size_mismatch
        return d


def _paired(a: Iterator[Extent], b: Iterator[Extent]) -> Iterator[tuple[int, int, Extent, Extent]]:
    """Ranges ``(start, end, ea, eb)`` on which one extent of each walk applies (both walks cover [0, size))."""
    ea, eb = next(a, None), next(b, None)
    while ea is not None and eb is not None:
        start = max(ea.offset, eb.offset)
        end = min(ea.end, eb.end)
        if end > start:
            yield start, end, ea, eb
        a_done, b_done = ea.end <= end, eb.end <= end
        if a_done:
            ea = next(a, None)
        if b_done:
            eb = next(b, None)


def _read(ext: Extent, pos: int, mv: memoryview) -> None:
    ext.layer.preadinto(ext.file_offset + (pos - ext.offset), mv)


def _first_diff(x: memoryview, y: memoryview) -> int:
    ax = np.frombuffer(x, dtype=np.uint8)
    ay = np.frombuffer(y, dtype=np.uint8)
    return int(np.flatnonzero(ax != ay)[0])


def _first_nonzero(x: memoryview) -> int:
    return int(np.flatnonzero(np.frombuffer(x, dtype=np.uint8))[0])


def compare_disks(da: Disk, db: Disk, progress: ProgressFn | None = None) -> tuple[int | None, int]:
    """(first differing byte offset or None, bytes read) of two open disks."""
    common = min(da.size, db.size)
    buf_a, buf_b = bytearray(CHUNK), bytearray(CHUNK)
    mva, mvb = memoryview(buf_a), memoryview(buf_b)
    read = 0
    total = max(da.size, db.size)
    if common:
        ids: dict[int, tuple[int, int]] = {}

        for start, end, ea, eb in _paired(da.extents(0, common), db.extents(0, common)):
            if ea.is_zero and eb.is_zero:
                continue
            if same_stored_bytes(ea, eb, ids):
                continue
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                pa, pb = mva[:n], mvb[:n]
                if ea.is_zero:
                    _read(eb, pos, pb)
                    read += n
                    if not K.is_zero(pb):
                        return pos + _first_nonzero(pb), read
                elif eb.is_zero:
                    _read(ea, pos, pa)
                    read += n
                    if not K.is_zero(pa):
                        return pos + _first_nonzero(pa), read
                else:
                    _read(ea, pos, pa)
                    _read(eb, pos, pb)
                    read += 2 * n
                    if not K.bytes_equal(pa, pb):
                        return pos + _first_diff(pa, pb), read
                pos += n
                if progress:
                    progress(pos, total)
    # The tail of the larger disk must read as zeros.
    larger = da if da.size > db.size else db
    for ext in larger.allocated_extents(common, larger.size - common):
        pos = ext.offset
        while pos < ext.end:
            n = min(CHUNK, ext.end - pos)
            pa = mva[:n]
            _read(ext, pos, pa)
            read += n
            if not K.is_zero(pa):
                return pos + _first_nonzero(pa), read
            pos += n
            if progress:
                progress(pos, total)
    return None, read


def compare(a: str | os.PathLike[str], b: str | os.PathLike[str], *, parent_dirs: Sequence[str] | None = None,
            strict: bool = True, progress: ProgressFn | None = None) -> CompareResult:
    """Compare the virtual disks of the chains ending at ``a`` and ``b`` (both opened read-only)."""
    with open_chain(a, "r", parent_dirs, strict=strict) as da, open_chain(b, "r", parent_dirs, strict=strict) as db:
        diff, read = compare_disks(da, db, progress)
        warnings = list(da.warnings) + list(db.warnings)
        return CompareResult(os.fspath(a), os.fspath(b), diff is None,
                             None if diff is None else diff - diff % SECTOR_SIZE, da.size, db.size, read, warnings)

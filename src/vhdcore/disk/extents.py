"""The run type every operation consumes: which layer (or nothing: zeros) holds a range of the virtual disk, and
the blocks of a new layout that such runs touch."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable, Iterator, NamedTuple, Optional, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from .image import Image


class Extent(NamedTuple):
    offset: int  # virtual disk offset
    length: int
    layer: Optional["Image"]  # None: the run reads as zeros (nothing allocated anywhere in the chain)
    depth: int  # index of ``layer`` in the chain (0 = leaf), -1 for zeros
    file_offset: int  # where the run starts in ``layer``'s file, -1 for zeros

    @property
    def is_zero(self) -> bool:
        return self.layer is None

    @property
    def end(self) -> int:
        return self.offset + self.length


def same_stored_bytes(a: Extent, b: Extent, ids: dict) -> bool:
    """Whether two runs read the same bytes of the same file (both held, one file by device and inode, the same
    distance between disk and file offsets): such a pair is equal without being read. ``ids`` caches each
    layer's identity (by ``id(layer)``) from one call to the next."""
    if a.is_zero or b.is_zero or a.file_offset - a.offset != b.file_offset - b.offset:
        return False

    def identity(e: Extent) -> tuple[int, int]:
        key = id(e.layer)
        if key not in ids:
            st = os.fstat(e.layer.fd)
            ids[key] = (st.st_dev, st.st_ino)
        return ids[key]

    return identity(a) == identity(b)


def merge_zero_runs(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Join consecutive zero runs (the layer walk yields one per gap per layer)."""
    pending: Extent | None = None
    for ext in extents:
        if ext.layer is None:
            if pending is not None and pending.end == ext.offset:
                pending = pending._replace(length=pending.length + ext.length)
                continue
            if pending is not None:
                yield pending
            pending = ext
            continue
        if pending is not None:
            yield pending
            pending = None
        yield ext
    if pending is not None:
        yield pending


class _HasExtents(Protocol):
    def allocated_extents(self) -> Iterator[Extent]: ...


def data_blocks(disk: _HasExtents, block_size: int) -> Iterator[int]:
    """Indexes of ``block_size`` blocks of the virtual disk that some layer holds data for, ascending (a
    ``chain.Disk``, or anything with ``allocated_extents()``: the blocks a new dynamic layout must write)."""
    last = -1
    for ext in disk.allocated_extents():
        first = ext.offset // block_size
        end = (ext.end - 1) // block_size
        for b in range(max(first, last + 1), end + 1):
            yield b
        last = max(last, end)

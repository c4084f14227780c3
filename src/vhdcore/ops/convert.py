"""Collapse a chain's virtual disk into one new file: raw (sparse), fixed VHD or dynamic VHD.

Only what the chain holds is read (the allocation map says where); zeros are never written, so a raw output
stays sparse and a dynamic output allocates only blocks that hold data. The output is written under a
temporary name and renamed at the end.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from .. import kernels as K
from ..destination import check_destination
from ..disk.chain import Disk, open_chain
from ..disk.extents import data_blocks
from ..fileio import atomic_output, pwrite_all
from ..format.layout import DEFAULT_BLOCK_SIZE, check_size, make_footer, next_block, write_dynamic_layout
from ..format.rules import entries_needed
from ..format.structs import (FOOTER_SIZE, HEADER_SIZE, NO_DATA_OFFSET, SECTOR_SIZE, UNUSED_BAT_ENTRY, DiskType,
                              bitmap_bytes)

ProgressFn = Callable[[int, int], None]
CHUNK = 4 * 1024 * 1024


@dataclass
class ConvertReport:
    source: str
    destination: str
    to: str
    virtual_size: int
    bytes_read: int
    bytes_written: int
    blocks_written: int
    zero_bytes_skipped: int
    file_size: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _open_source(src, source_format: str, parent_dirs, strict: bool):
    """The chain ending at ``src``, or (``raw``, or ``auto`` and no VHD footer) a raw image: rawimport.RawDisk."""
    if source_format not in ("auto", "vhd", "raw"):
        raise ValueError(f"source format must be auto, vhd or raw, not {source_format!r}")
    if source_format != "vhd":
        from .rawimport import RawDisk, looks_like_vhd

        if source_format == "raw" or not looks_like_vhd(src):
            return RawDisk(src)
    return open_chain(src, "r", parent_dirs, strict=strict)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str = "dynamic", *,
            block_size: int | None = None, parent_dirs: Sequence[str] | None = None,
            progress: ProgressFn | None = None, strict: bool = True, source_format: str = "vhd",
            overwrite: bool = False) -> ConvertReport:
    """``source_format``: "vhd" (a chain), "raw" (a raw image or block device), "auto" (raw without a footer)."""
    if to not in ("raw", "fixed", "dynamic"):
        raise ValueError(f"'to' must be raw, fixed or dynamic, not {to!r}")
    t0 = time.perf_counter()
    dst = os.fspath(dst)
    check_destination(dst, sources=[src], overwrite=overwrite)  # before a byte of the source is read
    with _open_source(src, source_format, parent_dirs, strict) as disk:
        check_destination(dst, sources=[img.path for img in disk.layers], overwrite=overwrite)
        if to == "dynamic":
            rep = _to_dynamic(disk, dst, block_size or disk.leaf.block_size or DEFAULT_BLOCK_SIZE, progress)
        else:
            rep = _to_flat(disk, dst, to == "fixed", progress)
        rep.source = os.fspath(src)
        rep.seconds = time.perf_counter() - t0
        rep.file_size = os.path.getsize(dst)
        rep.warnings = list(disk.warnings)
        return rep


def _to_flat(disk: Disk, dst: str, fixed: bool, progress: ProgressFn | None) -> ConvertReport:
    size = disk.size
    total = sum(e.length for e in disk.allocated_extents())
    done = read = written = skipped = 0
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    with atomic_output(dst) as (fd, _tmp):
        os.ftruncate(fd, size)  # sparse: holes read as zeros
        for ext in disk.allocated_extents():
            pos = ext.offset
            while pos < ext.end:
                n = min(CHUNK, ext.end - pos)
                part = mv[:n]
                disk.readinto(pos, part)
                read += n
                if K.is_zero(part):
                    skipped += n
                else:
                    pwrite_all(fd, [part], pos)
                    written += n
                pos += n
                done += n
                if progress:
                    progress(done, total)
        if fixed:
            # A raw source has no footer to take creator and geometry from.
            footer = make_footer(size, DiskType.FIXED, data_offset=NO_DATA_OFFSET,
                                 like=getattr(disk.leaf, "footer", None))
            os.pwrite(fd, footer.pack(), size)
            written += FOOTER_SIZE
    return ConvertReport("", dst, "fixed" if fixed else "raw", size, read, written, 0, skipped, 0, 0.0)


def _to_dynamic(disk: Disk, dst: str, block_size: int, progress: ProgressFn | None) -> ConvertReport:
    check_size(disk.size, block_size)
    blocks = np.fromiter(data_blocks(disk, block_size), dtype=np.int64)
    with atomic_output(dst) as (fd, _tmp):
        st = write_dynamic(fd, disk, block_size, blocks, lambda b, mv: not K.is_zero(mv), progress)
    return ConvertReport("", dst, "dynamic", disk.size, st.bytes_read, st.bytes_written, st.blocks_written,
                         st.bytes_dropped, 0, 0.0)


@dataclass
class DynamicWrite:
    bytes_read: int = 0
    bytes_written: int = 0
    blocks_written: int = 0
    bytes_dropped: int = 0  # bytes of candidate blocks ``keep`` turned down
    file_size: int = 0


KeepFn = Callable[[int, memoryview], bool]


def write_dynamic(fd: int, disk: Disk, block_size: int, blocks: np.ndarray, keep: KeepFn,
                  progress: ProgressFn | None) -> DynamicWrite:
    """Write a new dynamic VHD of ``disk``'s size into the empty file ``fd``: each block of ``blocks`` (ascending)
    is read from ``disk`` and written if ``keep(block, data)`` says so (``keep`` may rewrite the data in place).

    Data goes first, then the BAT that points at it, then the footer; ``fd`` is expected to be an
    :func:`~vhdcore.fileio.atomic_output` file, so a crash leaves nothing under the final name. Each block's
    bitmap has the bits of the sectors inside the virtual size set (the block holds the content there, zeros
    included), none past it. The leaf's creator and geometry are kept when they fit (``make_footer``).
    """
    size = disk.size
    st = DynamicWrite()
    total = int(len(blocks)) * block_size
    bm_size = bitmap_bytes(block_size)
    spb = block_size // SECTOR_SIZE
    full_bitmap = bytearray(bm_size)
    K.bitmap_set_range(full_bitmap, 0, spb)
    tail = size % block_size
    last_bitmap = bytearray(bm_size)
    K.bitmap_set_range(last_bitmap, 0, tail // SECTOR_SIZE)
    buf = bytearray(block_size)
    mv = memoryview(buf)
    end = write_dynamic_layout(fd, size, block_size, like=getattr(disk.leaf, "footer", None))
    pos = end - FOOTER_SIZE
    mte = entries_needed(size, block_size)
    bat = np.full(mte, UNUSED_BAT_ENTRY, dtype=np.uint32)
    for i, b in enumerate(blocks):
        b = int(b)
        start = b * block_size
        n = min(block_size, size - start)
        if n < block_size:
            mv[n:] = bytes(block_size - n)
        disk.readinto(start, mv[:n])
        st.bytes_read += n
        if not keep(b, mv):
            st.bytes_dropped += n
        else:
            pos = next_block(pos, bm_size)
            pwrite_all(fd, [full_bitmap if n == block_size else last_bitmap, mv], pos)
            bat[b] = pos // SECTOR_SIZE
            pos += bm_size + block_size
            st.bytes_written += bm_size + block_size
            st.blocks_written += 1
        if progress:
            progress((i + 1) * block_size, total)
    # Metadata after data: the BAT and the final footer point at blocks already written.
    os.pwrite(fd, bat.astype(">u4").tobytes(), FOOTER_SIZE + HEADER_SIZE)
    footer = os.pread(fd, FOOTER_SIZE, 0)
    os.pwrite(fd, footer, pos)
    os.ftruncate(fd, pos + FOOTER_SIZE)
    st.file_size = pos + FOOTER_SIZE
    return st

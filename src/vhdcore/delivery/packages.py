"""Export packages: a chain's content as one byte stream, generated in order with no temporary file.

Each package knows its exact length before the first byte (progress totals, zstd's content size and the
tar headers need it) and yields its bytes as memoryviews of a reused buffer (the compressors copy what
they keep). Reads of the chain go through ``disk.readinto`` on buffers of several MiB, and unallocated
space is never read: the allocation map says where the data is.

* ``vhd``: one new dynamic VHD. Header and BAT are computed up front from the allocation map (the k-th
  data block sits at a known offset), then come only the blocks some layer of the chain holds (bitmap all
  ones, data read through the chain), then the footer. The layout is the one ``convert --to dynamic``
  writes: BAT at 1536, block data page-aligned. One difference: convert drops allocated blocks that turn
  out to be all zeros, which a stream cannot know before its BAT has gone out; they compress to nothing.
  With ``zero_scan`` (automatic when a layer is a fixed VHD, whose "allocation" is the whole disk) the
  candidate blocks are read once before the stream starts and the all-zero ones left out, as convert does.
* ``fixed``: the virtual content rounded up to a whole MiB (Azure and other importers refuse anything
  else; the footer's current size is the rounded size), then a fixed-disk footer. ``zero_ranges`` lists
  the stretches the allocation map proves zero, for an uploader that can skip them.
* ``raw``: the virtual content as it is.
* ``chain-tar``: the OpenStack XenAPI layout: a tar of the chain's files as ``0.vhd`` (leaf) ...
  ``N.vhd`` (base). In the tar copy (never in the inputs) each child's header names its parent
  ``{i+1}.vhd``: the parent unicode name and the W2ru/W2ku/MacX locators are rewritten in their existing
  space, and the header checksum recomputed; so the chain opens where it is extracted.

References: VHD specification v1.0 (layouts, locators); POSIX.1-2001 pax / ustar for the tar framing
(headers made by :mod:`tarfile`, the data streamed here so large files are not copied 16 KiB at a time).
"""
from __future__ import annotations

import dataclasses
import os
import tarfile
import uuid
from typing import Iterator

import numpy as np

from .. import kernels as K
from ..disk.chain import Disk
from ..disk.extents import data_blocks
from ..disk.image import Image
from ..format import locators
from ..format.layout import (
    DEFAULT_BLOCK_SIZE,
    block_stride,
    check_size,
    first_block_position,
    make_footer,
    next_block,
)
from ..format.rules import entries_needed, table_bytes
from ..format.structs import (
    FOOTER_SIZE,
    HEADER_SIZE,
    HEADER_VERSION,
    NO_DATA_OFFSET,
    SECTOR_SIZE,
    UNUSED_BAT_ENTRY,
    DiskType,
    DynamicHeader,
    bitmap_bytes,
    round_up,
)
from .digests import XXH3Manifest

__all__ = ["PACKAGES", "Package", "VhdPackage", "FlatPackage", "ChainTarPackage", "open_package",
           "iter_content", "disk_manifest", "chain_tar_names"]

KiB = 1024
MiB = 1024 * KiB
PACKAGES = ("vhd", "fixed", "chain-tar", "raw")
# Reads of the chain: big enough that per-call costs vanish next to the copy, small enough to stay in cache.
READ_SIZE = 8 * MiB
# Zero runs shorter than this are read through the chain (readinto zero-fills them) rather than emitted apart:
# a differencing chain's bitmaps cut content into sector-sized pieces, and handing a compressor thousands of
# tiny pieces costs more than copying a few zeros. It is also the smallest zero range worth reporting.
MIN_ZERO_RUN = 64 * KiB
FIXED_ALIGNMENT = MiB
_ZEROS = memoryview(bytes(READ_SIZE))
_NIL_UUID = uuid.UUID(int=0)


def _zeros(n: int) -> Iterator[memoryview]:
    while n > 0:
        k = min(n, len(_ZEROS))
        yield _ZEROS[:k]
        n -= k


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in ranges:
        if n <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


# --------------------------------------------------------------------------------------------- content


def content_plan(disk: Disk, min_zero_run: int = MIN_ZERO_RUN) -> list[tuple[int, int, bool]]:
    """``(offset, length, is_data)`` covering the virtual disk: data runs to read, zero runs to skip.

    Zero runs shorter than ``min_zero_run`` between data runs are folded into the data (read, and zero-filled
    by ``readinto``); the rest come straight from the allocation map.
    """
    plan: list[tuple[int, int, bool]] = []
    for ext in disk.extents():
        is_data = ext.layer is not None
        if plan and plan[-1][2] == is_data:
            off, n, _ = plan[-1]
            plan[-1] = (off, n + ext.length, is_data)
        else:
            plan.append((ext.offset, ext.length, is_data))
    # Fold short zero runs into their data neighbours.
    out: list[tuple[int, int, bool]] = []
    for off, n, is_data in plan:
        if not is_data and n < min_zero_run and out and out[-1][2]:
            out[-1] = (out[-1][0], out[-1][1] + n, True)
            continue
        if is_data and out and out[-1][2]:
            out[-1] = (out[-1][0], out[-1][1] + n, True)
            continue
        out.append((off, n, is_data))
    return out


def iter_content(disk: Disk, plan: list[tuple[int, int, bool]] | None = None,
                 read_size: int = READ_SIZE) -> Iterator[tuple[int, memoryview | None, int]]:
    """The virtual content in order as ``(offset, view or None for zeros, length)``.

    Views are of one reused buffer: valid until the next item.
    """
    if plan is None:
        plan = content_plan(disk)
    buf = bytearray(read_size)
    mv = memoryview(buf)
    for off, n, is_data in plan:
        if not is_data:
            yield off, None, n
            continue
        pos, end = off, off + n
        while pos < end:
            k = min(read_size, end - pos)
            disk.readinto(pos, mv[:k])
            yield pos, mv[:k], k
            pos += k


def disk_manifest(disk: Disk, block_size: int = 2 * MiB) -> XXH3Manifest:
    """xxh3-128 digests of the disk's virtual content per ``block_size`` (unallocated space is not read)."""
    m = XXH3Manifest(block_size)
    for _, view, n in iter_content(disk):
        if view is None:
            m.update_zeros(n)
        else:
            m.update(view)
    return m.finish()


# --------------------------------------------------------------------------------------------- packages


class Package:
    """A package stream: ``size`` bytes, produced by :meth:`chunks`; counters filled as it runs."""

    name = ""
    #: exact length of the stream, known before it starts
    size: int = 0
    #: bytes read from the chain's files so far
    bytes_read: int = 0
    #: ``(offset, length)`` of stretches of the stream known to be zeros (fixed and raw)
    zero_ranges: list[tuple[int, int]]
    #: blocks written (vhd)
    data_blocks: int = 0
    #: things the caller should know (locators dropped...)
    warnings: list[str]

    def __init__(self) -> None:
        self.zero_ranges = []
        self.warnings = []

    def chunks(self) -> Iterator[memoryview]:  # pragma: no cover - abstract
        raise NotImplementedError


class VhdPackage(Package):
    """A dynamic VHD of the chain's content (see the module docstring)."""

    name = "vhd"

    def __init__(self, disk: Disk, manifest: XXH3Manifest | None = None, *, block_size: int | None = None,
                 unique_id: uuid.UUID | None = None, timestamp: int | None = None,
                 zero_scan: bool | None = None) -> None:
        super().__init__()
        self.disk = disk
        self.manifest = manifest
        size = disk.size
        bs = block_size or disk.leaf.block_size or DEFAULT_BLOCK_SIZE
        check_size(size, bs)
        self.block_size = bs
        self.blocks = np.fromiter(data_blocks(disk, bs), dtype=np.int64)
        # A fixed layer "holds" every block, so its allocation map says nothing: read its blocks once up front
        # and keep those that are not all zeros (as convert does), rather than exporting a full-size disk.
        self.zero_scan = any(img.is_fixed for img in disk.layers) if zero_scan is None else zero_scan
        if self.zero_scan:
            self.blocks = self._nonzero(self.blocks)
        self.data_blocks = len(self.blocks)
        self.bitmap_size = bm = bitmap_bytes(bs)
        mte = entries_needed(size, bs)
        self.table_offset = FOOTER_SIZE + HEADER_SIZE
        self.bat_bytes = table_bytes(mte)
        first = first_block_position(size, bs)
        # Data of every block starts page-aligned; the k-th block is one constant stride after the first.
        self.first_block = next_block(first, bm)
        self.stride = block_stride(bs)
        n = self.data_blocks
        self.footer_offset = self.first_block + (n - 1) * self.stride + bm + bs if n else first
        self.size = self.footer_offset + FOOTER_SIZE
        bat = np.full(self.bat_bytes // 4, UNUSED_BAT_ENTRY, dtype=np.uint32)
        if n:
            bat[self.blocks] = (self.first_block + np.arange(n, dtype=np.int64) * self.stride) // SECTOR_SIZE
        self.bat = bat.astype(">u4").tobytes()
        self.footer = make_footer(size, DiskType.DYNAMIC, data_offset=FOOTER_SIZE, timestamp=timestamp,
                                  unique_id=unique_id, like=disk.leaf.footer).pack()
        self.header = DynamicHeader(
            data_offset=NO_DATA_OFFSET, table_offset=self.table_offset, header_version=HEADER_VERSION,
            max_table_entries=mte, block_size=bs, checksum=0, parent_unique_id=_NIL_UUID, parent_timestamp=0,
            parent_unicode_name_raw=bytes(512), parent_locators=(),
        ).pack()

    def _nonzero(self, blocks: np.ndarray) -> np.ndarray:
        bs, size = self.block_size, self.disk.size
        buf = memoryview(bytearray(bs))
        keep = np.zeros(len(blocks), dtype=bool)
        for i, b in enumerate(blocks.tolist()):
            k = min(bs, size - b * bs)
            self.disk.readinto(b * bs, buf[:k])
            self.bytes_read += k
            keep[i] = not K.is_zero(buf[:k])
        return blocks[keep]

    def chunks(self) -> Iterator[memoryview]:
        disk, m = self.disk, self.manifest
        size, bs, bm = self.disk.size, self.block_size, self.bitmap_size
        yield memoryview(self.footer)
        yield memoryview(self.header)
        yield memoryview(self.bat)
        n = self.data_blocks
        if n:
            yield from _zeros(self.first_block - self.table_offset - self.bat_bytes)
        # A staging area of whole slots [bitmap | data | gap to the next bitmap], bitmaps and gaps set once.
        gap = self.stride - bm - bs
        per = max(1, READ_SIZE // self.stride)
        stage = bytearray(per * self.stride)
        view = memoryview(stage)
        bitmap = bytearray(bm)
        K.bitmap_set_range(bitmap, 0, bs // SECTOR_SIZE)
        for i in range(per):
            view[i * self.stride : i * self.stride + bm] = bitmap
        covered = 0  # virtual bytes handed to the manifest
        for g in range(0, n, per):
            group = self.blocks[g : g + per]
            for i, b in enumerate(group):
                start = int(b) * bs
                data = view[i * self.stride + bm : i * self.stride + bm + bs]
                k = min(bs, size - start)
                disk.readinto(start, data[:k])
                if k < bs:  # the disk ends inside its last block: the rest of the block reads as zeros
                    data[k:] = _ZEROS[: bs - k] if bs - k <= len(_ZEROS) else bytes(bs - k)
                    # ... and its bitmap says so: no bit past the virtual size (the last block, so this slot
                    # is not used again).
                    last = bytearray(bm)
                    K.bitmap_set_range(last, 0, k // SECTOR_SIZE)
                    view[i * self.stride : i * self.stride + bm] = last
                self.bytes_read += k
                if m is not None:
                    if start > covered:
                        m.update_zeros(start - covered)
                    m.update(data[:k])
                covered = start + k
            end = len(group) * self.stride
            if g + per >= n:
                end -= gap  # no gap after the last block: the footer follows it
            yield view[:end]
        if m is not None and size > covered:
            m.update_zeros(size - covered)
        yield memoryview(self.footer)


class FlatPackage(Package):
    """The virtual content as raw bytes, or as a fixed VHD (rounded to a whole MiB, then a footer)."""

    def __init__(self, disk: Disk, manifest: XXH3Manifest | None = None, *, fixed: bool = False,
                 unique_id: uuid.UUID | None = None, timestamp: int | None = None) -> None:
        super().__init__()
        self.name = "fixed" if fixed else "raw"
        self.disk = disk
        self.manifest = manifest
        self.fixed = fixed
        self.plan = content_plan(disk)
        self.content_size = round_up(disk.size, FIXED_ALIGNMENT) if fixed else disk.size
        self.size = self.content_size + (FOOTER_SIZE if fixed else 0)
        zeros = [(off, n) for off, n, is_data in self.plan if not is_data and n >= MIN_ZERO_RUN]
        zeros.append((disk.size, self.content_size - disk.size))
        self.zero_ranges = _merge_ranges(zeros)
        self.footer = (make_footer(self.content_size, DiskType.FIXED, data_offset=NO_DATA_OFFSET,
                                   timestamp=timestamp, unique_id=unique_id, like=disk.leaf.footer).pack()
                       if fixed else b"")

    def chunks(self) -> Iterator[memoryview]:
        m = self.manifest
        for _, view, n in iter_content(self.disk, self.plan):
            if view is None:
                if m is not None:
                    m.update_zeros(n)
                yield from _zeros(n)
            else:
                self.bytes_read += n
                if m is not None:
                    m.update(view)
                yield view
        yield from _zeros(self.content_size - self.disk.size)
        if self.footer:
            yield memoryview(self.footer)


# --------------------------------------------------------------------------------------------- chain-tar


def chain_tar_names(depth: int) -> list[str]:
    """Member names of a chain of ``depth`` layers, leaf first: 0.vhd ... N.vhd."""
    return [f"{i}.vhd" for i in range(depth)]


def relink_child(img: Image, parent_name: str) -> tuple[list[tuple[int, bytes]], list[str]]:
    """Byte patches that make differencing ``img`` name its parent ``parent_name`` (beside it), and warnings.

    Each locator that can name a path is rewritten for ``./parent_name`` in its own platform's encoding and
    fitted by :func:`vhdcore.format.locators.fit` (in its own space when usable, else moved to space nothing
    else uses, else dropped: the parent unicode name and the other locators still find the parent). Mac alias
    blobs, which cannot be rewritten, are dropped.
    """
    h = img.header
    assert h is not None and img.is_differencing
    warnings: list[str] = []
    wanted: list[locators.Wanted] = []
    for i, loc in enumerate(h.parent_locators):
        if not loc.is_used:
            continue
        data = locators.encode(loc.platform_code, "./" + parent_name)
        if data is None:
            warnings.append(f"{img.path}: parent locator {i} ({loc.platform_code!r}) cannot be rewritten; dropped")
            continue
        wanted.append(locators.Wanted(loc.platform_code, data, i))
    fitted = locators.fit(h.parent_locators, wanted, locators.Room.of(img))
    for w, (how, off) in zip(wanted, fitted.outcome):
        loc = h.parent_locators[w.slot]
        if how == "moved":
            warnings.append(f"{img.path}: parent locator {w.slot} ({w.code!r}) moved to offset {off} in the tar "
                            f"copy (its space at {loc.data_offset} was unusable)")
        elif how == "dropped":
            warnings.append(f"{img.path}: parent locator {w.slot} ({w.code!r}) has no usable data space (offset "
                            f"{loc.data_offset}, space {loc.data_space_bytes}) and no free sector before the first "
                            "block to move it to; dropped")
    header = dataclasses.replace(h, parent_unicode_name_raw=DynamicHeader.encode_parent_name(parent_name),
                                 parent_locators=fitted.table)
    return fitted.writes + [(img.footer.data_offset, header.pack())], warnings


class ChainTarPackage(Package):
    """A tar of the chain's files, ``0.vhd`` (leaf) ... ``N.vhd`` (base), children relinked in the copy."""

    name = "chain-tar"

    def __init__(self, disk: Disk, *, mtime: int | None = None) -> None:
        super().__init__()
        self.disk = disk
        self.names = chain_tar_names(len(disk.layers))
        self.members: list[tuple[Image, bytes, int, list[tuple[int, bytes]]]] = []
        total = 0
        for i, img in enumerate(disk.layers):
            patches: list[tuple[int, bytes]] = []
            if img.is_differencing:
                patches, warns = relink_child(img, self.names[i + 1])
                self.warnings.extend(warns)
            size = os.fstat(img.fd).st_size
            info = tarfile.TarInfo(self.names[i])
            info.size = size
            info.mode = 0o644
            # The file's own mtime: blktap-made children record their parent's mtime as parent timestamp.
            info.mtime = int(os.fstat(img.fd).st_mtime) if mtime is None else mtime
            info.uname = info.gname = ""
            header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            self.members.append((img, header, size, patches))
            total += len(header) + round_up(size, tarfile.BLOCKSIZE)
        total += 2 * tarfile.BLOCKSIZE  # end-of-archive marker
        self.size = round_up(total, tarfile.RECORDSIZE)

    def chunks(self) -> Iterator[memoryview]:
        buf = bytearray(READ_SIZE)
        mv = memoryview(buf)
        produced = 0
        for img, header, size, patches in self.members:
            yield memoryview(header)
            produced += len(header)
            pos = 0
            while pos < size:
                k = min(READ_SIZE, size - pos)
                img.preadinto(pos, mv[:k])
                for off, data in patches:
                    a, b = max(off, pos), min(off + len(data), pos + k)
                    if a < b:
                        mv[a - pos : b - pos] = data[a - off : b - off]
                self.bytes_read += k
                yield mv[:k]
                pos += k
            produced += size
            pad = round_up(size, tarfile.BLOCKSIZE) - size
            if pad:
                yield _ZEROS[:pad]
                produced += pad
        yield from _zeros(self.size - produced)


def open_package(name: str, disk: Disk, manifest: XXH3Manifest | None = None, *, block_size: int | None = None,
                 unique_id: uuid.UUID | None = None, timestamp: int | None = None,
                 zero_scan: bool | None = None) -> Package:
    """The package ``name`` (one of :data:`PACKAGES`) of ``disk``; its manifest (if any) is fed as it streams,
    except for ``chain-tar`` whose stream holds no virtual content (see :func:`disk_manifest`)."""
    if name == "vhd":
        return VhdPackage(disk, manifest, block_size=block_size, unique_id=unique_id, timestamp=timestamp,
                          zero_scan=zero_scan)
    if name in ("fixed", "raw"):
        return FlatPackage(disk, manifest, fixed=name == "fixed", unique_id=unique_id, timestamp=timestamp)
    if name == "chain-tar":
        return ChainTarPackage(disk)
    raise ValueError(f"unknown package {name!r}: expected one of {', '.join(PACKAGES)}")


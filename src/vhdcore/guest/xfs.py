"""XFS block allocation, read from the superblock and each allocation group's free-space structures.

Free blocks are what ``xfs_db -c "freesp"`` counts: the extents of each AG's by-block-number free-space B+tree
(bnobt) plus the blocks parked on the AG free list (AGFL), so ``free = sum(agf_freeblks + agf_flcount)``; that is
the superblock's ``fdblocks`` less the free-space B+trees' own non-root blocks (``agf_btreeblks``), which
fdblocks counts as free because they go back to the pool as the trees shrink. Everything else of ``dblocks`` is
used (the internal log included). A realtime subvolume, if any, lives on another device and is not covered.
"""
from __future__ import annotations

import struct
import uuid

import numpy as np

from .base import FileSystemUsage, Region, count_set_bits
from .bits import set_range

__all__ = ["is_xfs", "read_xfs"]

XFS_MAGIC = b"XFSB"
AGF_MAGIC = b"XAGF"
AGFL_MAGIC = b"XAFL"
BNO_MAGICS = {b"ABTB": 16, b"AB3B": 56}  # v4 / v5 (CRC) short-form btree block header sizes
MAX_LEVELS = 12
MAX_AGS = 1 << 20


def is_xfs(region: Region) -> bool:
    return region.size >= 512 and region.read(0, 4, "xfs.sb_magicnum") == XFS_MAGIC


def _clear_range(bitmap: np.ndarray, start: int, stop: int) -> None:
    """Clear bits [start, stop) of an LSB-first bitmap."""
    set_range(bitmap, start, stop, value=False)


def read_xfs(region: Region, partition_index: int | None = None) -> FileSystemUsage:
    """Parse the XFS file system that starts at ``region`` offset 0."""
    err = region.error
    sb = region.read(0, 512, "xfs.superblock")
    if sb[:4] != XFS_MAGIC:
        raise err("no XFS superblock magic", 0, "xfs.sb_magicnum", sb[:4])
    bs, dblocks = struct.unpack_from(">IQ", sb, 4)
    fs_uuid = sb[32:48]
    agblocks, agcount = struct.unpack_from(">II", sb, 84)
    version, sectsize = struct.unpack_from(">HH", sb, 100)
    fname = sb[108:120].split(b"\0", 1)[0].decode("utf-8", "replace")
    fdblocks, = struct.unpack_from(">Q", sb, 144)
    v5 = version & 0xF == 5
    if bs < 512 or bs > 65536 or bs & (bs - 1):
        raise err("block size must be a power of two in [512, 65536]", 4, "xfs.sb_blocksize", bs)
    if sectsize < 512 or sectsize > bs or sectsize & (sectsize - 1):
        raise err("sector size must be a power of two in [512, block size]", 102, "xfs.sb_sectsize", sectsize)
    if dblocks == 0 or dblocks * bs > region.size:
        raise err(f"file system of {dblocks} x {bs} bytes is larger than its partition ({region.size} bytes)",
                  8, "xfs.sb_dblocks", dblocks)
    if agblocks < 5 or agcount == 0 or agcount > MAX_AGS or (agcount - 1) * agblocks >= dblocks \
            or agcount * agblocks < dblocks:
        raise err(f"{agcount} allocation groups of {agblocks} blocks do not tile {dblocks} blocks", 84,
                  "xfs.sb_agblocks", agblocks)

    bitmap = np.full(-(-dblocks // 8), 0xFF, dtype=np.uint8)
    if dblocks % 8:
        bitmap[-1] = (1 << (dblocks % 8)) - 1
    free_total = 0
    flcount_total = 0
    btree_total = 0
    for ag in range(agcount):
        ag_start = ag * agblocks
        ag_len = min(agblocks, dblocks - ag_start)
        base = ag_start * bs
        agf = region.read(base + sectsize, 64, f"xfs.agf[{ag}]")
        if agf[:4] != AGF_MAGIC:
            raise err(f"AG {ag}: no AGF magic", base + sectsize, "xfs.agf_magicnum", agf[:4])
        seqno, length, bno_root = struct.unpack_from(">III", agf, 8)
        bno_level, = struct.unpack_from(">I", agf, 28)
        flfirst, fllast, flcount, freeblks, _longest, btreeblks = struct.unpack_from(">6I", agf, 40)
        if seqno != ag or length != ag_len:
            raise err(f"AG {ag}: AGF says AG {seqno} of {length} blocks", base + sectsize + 8, "xfs.agf_length",
                      length)
        if not 1 <= bno_level <= MAX_LEVELS or not 0 < bno_root < ag_len:
            raise err(f"AG {ag}: free-space btree root {bno_root} / {bno_level} levels out of range",
                      base + sectsize + 16, "xfs.agf_bno_root", bno_root)
        found = _walk_bnobt(region, bs, base, ag, ag_len, bno_root, bno_level, bitmap, ag_start)
        if found != freeblks:
            raise err(f"AG {ag}: free-space btree holds {found} free blocks, the AGF says {freeblks}",
                      base + sectsize + 52, "xfs.agf_freeblks", freeblks)
        for b in _agfl_blocks(region, base, sectsize, v5, ag, ag_len, flfirst, fllast, flcount):
            _clear_range(bitmap, ag_start + b, ag_start + b + 1)
        free_total += freeblks
        flcount_total += flcount
        btree_total += btreeblks

    used = count_set_bits(bitmap, dblocks)
    free = dblocks - used
    notes = []
    if free != free_total + flcount_total:
        notes.append(f"free extents overlap: {free} distinct free blocks, the AGFs list {free_total + flcount_total}")
    if fdblocks != free_total + flcount_total + btree_total:
        notes.append(f"superblock fdblocks {fdblocks} differs from the AGFs' free + free-list + btree blocks "
                     f"{free_total + flcount_total + btree_total} (lazy counters are refreshed at unmount)")
    size = dblocks * bs
    return FileSystemUsage(
        type="xfs", offset=region.offset, size=size, cluster_size=bs, cluster_count=dblocks, used_clusters=used,
        bitmap=bitmap, bitmap_origin=region.offset, used_bytes=size - free * bs, free_bytes=free * bs,
        partition_index=partition_index, label=fname or None, uuid=str(uuid.UUID(bytes=fs_uuid)),
        details={"block_size": bs, "dblocks": dblocks, "agcount": agcount, "agblocks": agblocks,
                 "free_blocks": free, "agf_free_blocks": free_total, "agfl_blocks": flcount_total,
                 "btree_blocks": btree_total, "sb_fdblocks": fdblocks, "version": version & 0xF},
        notes=notes)


def _walk_bnobt(region: Region, bs: int, base: int, ag: int, ag_len: int, root: int, levels: int,
                bitmap: np.ndarray, ag_start: int) -> int:
    """Clear the bits of every free extent the AG's bnobt lists; returns the free blocks found.

    Level by level from the root; every block is visited at most once and must carry the level its parent
    implies, so a damaged tree can neither loop nor send us outside the AG.
    """
    err = region.error
    level_blocks = [root]
    seen: set[int] = set()
    total = 0
    for expect_level in range(levels - 1, -1, -1):
        next_blocks: list[int] = []
        for agbno in level_blocks:
            if agbno in seen or not 0 < agbno < ag_len:
                raise err(f"AG {ag}: free-space btree points at block {agbno} (again or outside the AG)",
                          base + agbno * bs if 0 < agbno < ag_len else None, "xfs.bnobt.ptr", agbno)
            seen.add(agbno)
            off = base + agbno * bs
            blk = region.read(off, bs, f"xfs.bnobt[{ag}]")
            hdr = BNO_MAGICS.get(blk[:4])
            if hdr is None:
                raise err(f"AG {ag}: free-space btree block without its magic", off, "xfs.bnobt.magic", blk[:4])
            level, numrecs = struct.unpack_from(">HH", blk, 4)
            if level != expect_level:
                raise err(f"AG {ag}: btree block at level {level}, expected {expect_level}", off + 4,
                          "xfs.bnobt.level", level)
            if expect_level == 0:
                if hdr + numrecs * 8 > bs:
                    raise err("too many records for the block", off + 6, "xfs.bnobt.numrecs", numrecs)
                recs = np.frombuffer(blk, dtype=">u4", count=2 * numrecs, offset=hdr).astype(np.int64)
                starts, lens = recs[0::2], recs[1::2]
                if numrecs and (np.any(lens == 0) or np.any(starts + lens > ag_len)):
                    raise err(f"AG {ag}: free extent outside the AG", off + hdr, "xfs.bnobt.rec", numrecs)
                for s, n in zip(starts.tolist(), lens.tolist()):
                    _clear_range(bitmap, ag_start + s, ag_start + s + n)
                total += int(lens.sum())
            else:
                maxrecs = (bs - hdr) // 12
                if numrecs == 0 or numrecs > maxrecs:
                    raise err("node record count out of range", off + 6, "xfs.bnobt.numrecs", numrecs)
                ptrs = np.frombuffer(blk, dtype=">u4", count=numrecs, offset=hdr + maxrecs * 8)
                next_blocks.extend(int(p) for p in ptrs)
        if len(seen) + len(next_blocks) > ag_len:
            raise err(f"AG {ag}: free-space btree larger than its AG", base, "xfs.bnobt", len(next_blocks))
        level_blocks = next_blocks
    return total


def _agfl_blocks(region: Region, base: int, sectsize: int, v5: bool, ag: int, ag_len: int, first: int,
                 last: int, count: int) -> list[int]:
    """Blocks on the AG free list (a circular array in the AGFL sector)."""
    if count == 0:
        return []
    err = region.error
    off = base + 3 * sectsize
    data = region.read(off, sectsize, f"xfs.agfl[{ag}]")
    hdr = 0
    if v5:
        if data[:4] != AGFL_MAGIC:
            raise err(f"AG {ag}: no AGFL magic", off, "xfs.agfl_magicnum", data[:4])
        hdr = 36
    slots = (sectsize - hdr) // 4
    if first >= slots or last >= slots or count > slots or (last - first) % slots + 1 != count:
        raise err(f"AG {ag}: free list [{first}, {last}] of {count} blocks does not fit {slots} slots",
                  base + sectsize + 40, "xfs.agf_flcount", count)
    arr = struct.unpack_from(f">{slots}I", data, hdr)
    blocks = [arr[(first + i) % slots] for i in range(count)]
    bad = [b for b in blocks if not 0 < b < ag_len]
    if bad:
        raise err(f"AG {ag}: free list names block {bad[0]} outside the AG", off + hdr, "xfs.agfl", bad[0])
    return blocks

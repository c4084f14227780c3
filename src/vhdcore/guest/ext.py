"""ext2/3/4 block allocation, read from the superblock, the group descriptors and the block bitmaps.

What counts as used follows e2fsprogs (what ``dumpe2fs`` and ``e2fsck`` load): a group's block bitmap is read
from disk unless the group is flagged BLOCK_UNINIT on a file system with group-descriptor checksums
(``uninit_bg`` / ``metadata_csum``); such a group is all free except the metadata e2fsprogs reserves for it
(superblock backup, group descriptor blocks, reserved GDT blocks) and the group's own block bitmap, inode
bitmap and inode table, wherever flex_bg put them. Block 0 of a 1 KiB-block file system (the boot block, before
the first group) counts as used, as in ``Block count - Free blocks``.

The group descriptor checksums themselves are not verified (e2fsprogs would ignore BLOCK_UNINIT on a descriptor
whose checksum is bad); free counts from the bitmaps are compared with the superblock's and the descriptors' and
any difference is reported in ``notes``.
"""
from __future__ import annotations

import struct
import uuid

import numpy as np

from .base import FileSystemUsage, Region, clear_tail, count_set_bits
from .bits import set_range, shift_up

__all__ = ["EXT_MAGIC", "is_ext", "read_ext"]

EXT_MAGIC = 0xEF53
SB_OFFSET = 1024

COMPAT_HAS_JOURNAL = 0x4
COMPAT_SPARSE_SUPER2 = 0x200
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_BTREE_DIR = 0x4
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400

BG_BLOCK_UNINIT = 0x2

# Features an ext3 driver understands (blkid's rule): anything beyond them makes it ext4.
EXT3_INCOMPAT = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG
EXT3_RO_COMPAT = RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_BTREE_DIR

# 2^20 groups of 8 MiB (1 KiB blocks) is 8 TiB, of 128 MiB (4 KiB blocks) 128 TiB: far past any VHD.
MAX_GROUPS = 1 << 20
# Bitmap blocks read in one request when they lie next to each other (flex_bg packs them).
MAX_READ_BLOCKS = 1024
MAX_READ_BYTES = 8 * 1024 * 1024


def is_ext(region: Region) -> bool:
    if region.size < SB_OFFSET + 1024:
        return False
    return struct.unpack("<H", region.read(SB_OFFSET + 0x38, 2, "ext.s_magic"))[0] == EXT_MAGIC


def _is_power(n: int, base: int) -> bool:
    while n > 1 and n % base == 0:
        n //= base
    return n == 1


def _has_super(group: int, sparse: bool, sparse2: bool, backup_bgs: tuple[int, int]) -> bool:
    """Whether ``group`` holds a superblock backup (and, without meta_bg, a copy of the descriptor table)."""
    if group == 0:
        return True
    if sparse2:
        return group in backup_bgs
    if group == 1 or not sparse:
        return True
    if not group & 1:
        return False
    return _is_power(group, 3) or _is_power(group, 5) or _is_power(group, 7)


def read_ext(region: Region, partition_index: int | None = None) -> FileSystemUsage:
    """Parse the ext2/3/4 file system that starts at ``region`` offset 0."""
    sb = region.read(SB_OFFSET, 1024, "ext.superblock")
    err = region.error
    (inodes_count, blocks_lo, _r_blocks_lo, free_lo, _free_inodes, first_data_block, log_block, log_cluster,
     blocks_per_group, clusters_per_group, inodes_per_group) = struct.unpack_from("<11I", sb, 0)
    magic, = struct.unpack_from("<H", sb, 0x38)
    if magic != EXT_MAGIC:
        raise err("no ext2/3/4 superblock magic", SB_OFFSET + 0x38, "ext.s_magic", magic)
    rev_level, = struct.unpack_from("<I", sb, 0x4C)
    inode_size = 128
    if rev_level >= 1:
        inode_size, = struct.unpack_from("<H", sb, 0x58)
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
    fs_uuid = sb[0x68:0x78]
    label = sb[0x78:0x88].split(b"\0", 1)[0].decode("utf-8", "replace")
    reserved_gdt, = struct.unpack_from("<H", sb, 0xCE)
    desc_size_field, = struct.unpack_from("<H", sb, 0xFE)
    first_meta_bg, = struct.unpack_from("<I", sb, 0x104)
    blocks_hi, _r_hi, free_hi = struct.unpack_from("<III", sb, 0x150)
    backup_bgs = struct.unpack_from("<II", sb, 0x24C)

    if incompat & INCOMPAT_JOURNAL_DEV:
        raise err("an external ext3/4 journal device, not a file system", SB_OFFSET + 0x60, "ext.s_feature_incompat",
                  incompat)
    if log_block > 6:
        raise err("block size over 64 KiB", SB_OFFSET + 0x18, "ext.s_log_block_size", log_block)
    bs = 1024 << log_block
    is64 = bool(incompat & INCOMPAT_64BIT)
    blocks_count = blocks_lo | (blocks_hi << 32 if is64 else 0)
    sb_free = free_lo | (free_hi << 32 if is64 else 0)
    bigalloc = bool(ro_compat & RO_COMPAT_BIGALLOC)
    if bigalloc:
        if not log_block <= log_cluster <= log_block + 16:
            raise err("cluster size outside [block size, 2^16 blocks]", SB_OFFSET + 0x1C, "ext.s_log_cluster_size",
                      log_cluster)
        cluster_bits = log_cluster - log_block
        units_per_group = clusters_per_group
    else:
        cluster_bits = 0
        units_per_group = blocks_per_group
    ratio = 1 << cluster_bits
    cs = bs * ratio
    if units_per_group == 0 or units_per_group > 8 * bs or units_per_group % 8:
        raise err("blocks (clusters) per group must be a non-zero multiple of 8 of at most 8 x block size",
                  SB_OFFSET + (0x24 if bigalloc else 0x20), "ext.s_blocks_per_group", units_per_group)
    blocks_per_group = units_per_group * ratio
    if first_data_block not in (0, 1) or (first_data_block == 1 and (bs != 1024 or bigalloc)):
        raise err("first data block must be 1 for 1 KiB blocks and 0 otherwise", SB_OFFSET + 0x14,
                  "ext.s_first_data_block", first_data_block)
    if blocks_count <= first_data_block:
        raise err("block count too small", SB_OFFSET + 0x4, "ext.s_blocks_count", blocks_count)
    if blocks_count * bs > region.size:
        raise err(f"file system of {blocks_count} x {bs} bytes is larger than its partition ({region.size} bytes)",
                  SB_OFFSET + 0x4, "ext.s_blocks_count", blocks_count)
    if inodes_per_group == 0 or inodes_per_group > 8 * bs or inode_size < 128 or inode_size > bs \
            or inode_size & (inode_size - 1):
        raise err("inodes per group or inode size out of range", SB_OFFSET + 0x28, "ext.s_inodes_per_group",
                  inodes_per_group)
    if is64:
        desc_size = desc_size_field
        if desc_size < 64 or desc_size > 1024 or desc_size & (desc_size - 1) or desc_size > bs:
            raise err("64-bit group descriptor size must be a power of two in [64, 1024]", SB_OFFSET + 0xFE,
                      "ext.s_desc_size", desc_size)
    else:
        desc_size = 32
    ngroups = -(-(blocks_count - first_data_block) // blocks_per_group)
    if inodes_count and inodes_count != ngroups * inodes_per_group:
        raise err(f"inode count is not {ngroups} groups x {inodes_per_group} inodes", SB_OFFSET,
                  "ext.s_inodes_count", inodes_count)
    if ngroups > MAX_GROUPS:
        raise err(f"{ngroups} block groups (over {MAX_GROUPS})", SB_OFFSET + 0x20, "ext.s_blocks_per_group",
                  blocks_per_group)
    inode_table_blocks = -(-(inodes_per_group * inode_size) // bs)
    desc_per_block = bs // desc_size
    desc_blocks = -(-ngroups // desc_per_block)
    meta_bg = bool(incompat & INCOMPAT_META_BG)
    if not meta_bg and first_data_block + 1 + desc_blocks + reserved_gdt > blocks_per_group:
        # Without meta_bg the whole descriptor table (and its reserve) follows the superblock in group 0.
        raise err(f"{desc_blocks} descriptor blocks + {reserved_gdt} reserved do not fit in a group of "
                  f"{blocks_per_group} blocks", SB_OFFSET + 0xCE, "ext.s_reserved_gdt_blocks", reserved_gdt)
    if meta_bg and first_meta_bg > desc_blocks:
        raise err("first meta block group past the descriptor table", SB_OFFSET + 0x104, "ext.s_first_meta_bg",
                  first_meta_bg)
    sparse = bool(ro_compat & RO_COMPAT_SPARSE_SUPER)
    sparse2 = bool(compat & COMPAT_SPARSE_SUPER2)
    csum = bool(ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM))

    def has_super(g: int) -> bool:
        return _has_super(g, sparse, sparse2, backup_bgs)

    def group_first_block(g: int) -> int:
        return first_data_block + g * blocks_per_group

    # ---------------------------------------------------------------- group descriptors
    gd = _read_descriptors(region, bs, desc_size, ngroups, desc_blocks, first_data_block, meta_bg, first_meta_bg,
                           desc_per_block, has_super, group_first_block)
    block_bitmap = gd["bb_lo"].astype(np.uint64)
    inode_bitmap = gd["ib_lo"].astype(np.uint64)
    inode_table = gd["it_lo"].astype(np.uint64)
    gd_free = gd["free_lo"].astype(np.uint64)
    if desc_size >= 64:
        block_bitmap |= gd["bb_hi"].astype(np.uint64) << np.uint64(32)
        inode_bitmap |= gd["ib_hi"].astype(np.uint64) << np.uint64(32)
        inode_table |= gd["it_hi"].astype(np.uint64) << np.uint64(32)
        gd_free |= gd["free_hi"].astype(np.uint64) << np.uint64(16)
    flags = gd["flags"]
    uninit = (flags & BG_BLOCK_UNINIT).astype(bool) if csum else np.zeros(ngroups, dtype=bool)
    for name, arr, span in (("block bitmap", block_bitmap, 1), ("inode bitmap", inode_bitmap, 1),
                            ("inode table", inode_table, inode_table_blocks)):
        bad = np.flatnonzero((arr < first_data_block) | (arr + np.uint64(span) > np.uint64(blocks_count)))
        if name == "block bitmap":
            bad = bad[~uninit[bad]]  # an uninitialised group's bitmap is never read
        if len(bad):
            g = int(bad[0])
            raise err(f"group {g}'s {name} at block {int(arr[g])} lies outside the file system", None,
                      f"ext.group[{g}].{name.replace(' ', '_')}", int(arr[g]))

    # ---------------------------------------------------------------- block bitmaps
    row = units_per_group // 8
    rows = np.zeros((ngroups, row), dtype=np.uint8)
    to_read = np.flatnonzero(~uninit)
    _read_bitmaps(region, bs, block_bitmap, to_read, rows)
    raw = rows.reshape(-1)
    nunits = -(-blocks_count // ratio)
    if first_data_block:
        bitmap = shift_up(raw, first_data_block)
        bitmap[0] |= 1  # the boot block before group 0
    else:
        bitmap = raw
    bitmap = bitmap[: -(-nunits // 8)].copy()
    clear_tail(bitmap, nunits)

    # BLOCK_UNINIT groups: the metadata e2fsprogs marks for them (mark_uninit_bg_group_blocks).
    old_desc_blocks = first_meta_bg if meta_bg else desc_blocks + reserved_gdt
    for g in np.flatnonzero(uninit).tolist():
        gfirst = group_first_block(g)
        gstart = gfirst if gfirst else first_data_block
        hs = has_super(g)
        marks: list[tuple[int, int]] = []
        if hs:
            marks.append((gstart, 1))
        meta_group = g // desc_per_block
        if not meta_bg or meta_group < first_meta_bg:
            if hs:
                marks.append((gstart + 1, old_desc_blocks))
        elif g % desc_per_block in (0, 1, desc_per_block - 1):
            marks.append((gstart + (1 if hs else 0), 1))
        # The group's own bitmaps and inode table, wherever flex_bg put them (0 = none).
        for start, count in ((int(inode_table[g]), inode_table_blocks), (int(block_bitmap[g]), 1),
                             (int(inode_bitmap[g]), 1)):
            if start:
                marks.append((start, count))
        for start, count in marks:
            end = min(start + count, blocks_count)
            if start < end:
                set_range(bitmap, start >> cluster_bits, ((end - 1) >> cluster_bits) + 1)

    used = count_set_bits(bitmap, nunits)
    free_units = nunits - used
    free_blocks = free_units * ratio
    notes: list[str] = []
    if free_blocks != sb_free:
        notes.append(f"superblock free block count {sb_free} differs from the bitmaps' {free_blocks}"
                     " (the superblock's count is only refreshed at unmount/sync)")
    gd_total = int(gd_free.sum()) * ratio
    if gd_total != free_blocks:
        notes.append(f"group descriptors' free block counts add up to {gd_total}, the bitmaps to {free_blocks}")
    if incompat & INCOMPAT_RECOVER:
        notes.append("the journal needs recovery: the bitmaps may not show the latest allocations")
    fs_type = "ext2"
    if compat & COMPAT_HAS_JOURNAL:
        fs_type = "ext3"
    if incompat & ~EXT3_INCOMPAT or ro_compat & ~EXT3_RO_COMPAT:
        fs_type = "ext4"
    size = blocks_count * bs
    free_bytes = free_units * cs
    return FileSystemUsage(
        type=fs_type, offset=region.offset, size=size, cluster_size=cs, cluster_count=nunits, used_clusters=used,
        bitmap=bitmap, bitmap_origin=region.offset, used_bytes=size - free_bytes, free_bytes=free_bytes,
        partition_index=partition_index, label=label or None, uuid=str(uuid.UUID(bytes=fs_uuid)),
        metadata_bytes=0, notes=notes,
        details={
            "block_size": bs, "block_count": blocks_count, "free_blocks": free_blocks,
            "superblock_free_blocks": sb_free, "group_free_blocks": gd_total, "groups": ngroups,
            "block_uninit_groups": int(uninit.sum()), "desc_size": desc_size, "first_data_block": first_data_block,
            "features": {"compat": compat, "incompat": incompat, "ro_compat": ro_compat},
            "flex_bg": bool(incompat & 0x200), "meta_bg": meta_bg, "64bit": is64, "bigalloc": bigalloc,
        })


_GD32 = [("bb_lo", "<u4"), ("ib_lo", "<u4"), ("it_lo", "<u4"), ("free_lo", "<u2"), ("fi_lo", "<u2"),
         ("dirs_lo", "<u2"), ("flags", "<u2")]
_GD64 = _GD32 + [("pad", "V12"), ("bb_hi", "<u4"), ("ib_hi", "<u4"), ("it_hi", "<u4"), ("free_hi", "<u2")]


def _read_descriptors(region: Region, bs: int, desc_size: int, ngroups: int, desc_blocks: int,
                      first_data_block: int, meta_bg: bool, first_meta_bg: int, desc_per_block: int,
                      has_super, group_first_block) -> np.ndarray:
    """The group descriptor table as a numpy structured array (one row per group)."""
    if meta_bg:
        # The first s_first_meta_bg descriptor blocks follow the superblock; each later one lives at the start
        # of the first group of its meta block group (after that group's superblock backup, if any).
        locs = [first_data_block + 1 + i if i < first_meta_bg
                else group_first_block(i * desc_per_block) + (1 if has_super(i * desc_per_block) else 0)
                for i in range(desc_blocks)]
        parts = [region.read(b * bs, bs, f"ext.gdt[{i}]") for i, b in enumerate(locs)]
        table = b"".join(parts)
    else:
        table = region.read((first_data_block + 1) * bs, desc_blocks * bs, "ext.group_descriptors")
    dtype = np.dtype({"names": [n for n, _ in (_GD64 if desc_size >= 64 else _GD32)],
                      "formats": [f for _, f in (_GD64 if desc_size >= 64 else _GD32)],
                      "itemsize": desc_size})
    return np.frombuffer(table, dtype=dtype, count=ngroups)


def _read_bitmaps(region: Region, bs: int, locations: np.ndarray, groups: np.ndarray, rows: np.ndarray) -> None:
    """Fill ``rows[g]`` with the first ``rows.shape[1]`` bytes of group g's bitmap block, for g in ``groups``.

    Bitmap blocks that sit next to each other (flex_bg packs them) are fetched with one read.
    """
    if len(groups) == 0:
        return
    row = rows.shape[1]
    locs = locations[groups]
    order = np.argsort(locs, kind="stable")
    g_sorted = groups[order]
    b_sorted = locs[order].astype(np.int64)
    cap = max(1, min(MAX_READ_BLOCKS, MAX_READ_BYTES // bs))
    # Start a new read wherever the next block is not the one right after, or the read is full.
    breaks = np.flatnonzero(np.diff(b_sorted) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(b_sorted)]))
    for s, e in zip(starts.tolist(), ends.tolist()):
        for lo in range(s, e, cap):
            hi = min(e, lo + cap)
            first = int(b_sorted[lo])
            data = region.read(first * bs, (int(b_sorted[hi - 1]) - first + 1) * bs, "ext.block_bitmap")
            blocks = np.frombuffer(data, dtype=np.uint8).reshape(-1, bs)
            rows[g_sorted[lo:hi]] = blocks[b_sorted[lo:hi] - first, :row]

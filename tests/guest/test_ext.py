"""ext2/3/4 usage against e2fsprogs: dumpe2fs's counts and its per-group free-block lists, debugfs's block lists."""
from __future__ import annotations

import numpy as np
import pytest

from support.guestimages import EXT_VARIANTS, RawReader, debugfs_blocks, dumpe2fs_free_blocks, dumpe2fs_header
from vhdcore.guest import analyse, probe


def _ranges_to_blocks(fs, nblocks: int) -> np.ndarray:
    """Free blocks according to free_ranges() (a bool per file-system block)."""
    bs = fs.details["block_size"]
    free = np.zeros(nblocks, dtype=bool)
    for off, n in fs.free_ranges():
        assert (off - fs.offset) % bs == 0 and n % bs == 0
        free[(off - fs.offset) // bs : (off - fs.offset + n) // bs] = True
    return free


@pytest.mark.parametrize("name", list(EXT_VARIANTS))
def test_used_bytes_match_dumpe2fs(ext_images, name):
    img = ext_images[name]
    hdr = dumpe2fs_header(img.path)
    bs, count, free = int(hdr["Block size"]), int(hdr["Block count"]), int(hdr["Free blocks"])
    r = RawReader(img.path)
    fs = probe(r, 0, r.size)
    assert fs is not None
    assert fs.used_bytes == (count - free) * bs
    assert fs.free_bytes == free * bs
    assert fs.size == count * bs
    assert fs.details["block_count"] == count
    assert fs.notes == []  # bitmaps, group descriptors and superblock agree on a cleanly built image
    expected_type = name.split("-")[0]
    assert fs.type == expected_type
    assert fs.uuid == hdr["Filesystem UUID"]


@pytest.mark.parametrize("name", list(EXT_VARIANTS))
def test_bitmap_is_dumpe2fs_free_list(ext_images, name):
    """Block by block, what we call free is exactly what dumpe2fs lists as free (BLOCK_UNINIT groups included)."""
    img = ext_images[name]
    r = RawReader(img.path)
    fs = probe(r, 0, r.size)
    nblocks = fs.details["block_count"]
    ratio = fs.cluster_size // fs.details["block_size"]
    oracle = dumpe2fs_free_blocks(img.path, nblocks, ratio)
    ours = _ranges_to_blocks(fs, nblocks)
    diff = np.flatnonzero(oracle != ours)
    assert len(diff) == 0, f"{len(diff)} blocks differ, first {diff[:10]}"
    # The bitmap itself says the same (per cluster under bigalloc).
    bits = np.unpackbits(fs.bitmap, bitorder="little")[: fs.cluster_count].astype(bool)
    assert np.array_equal(np.repeat(~bits, ratio)[:nblocks], oracle)


@pytest.mark.parametrize("name", ["ext4-64bit-flexbg", "ext2-1k", "ext3", "ext4-bigalloc"])
def test_file_blocks_never_free(ext_images, name):
    img = ext_images[name]
    r = RawReader(img.path)
    fs = probe(r, 0, r.size)
    free = _ranges_to_blocks(fs, fs.details["block_count"])
    checked = 0
    for f in img.files:
        blocks = debugfs_blocks(img.path, f)
        assert blocks, f
        assert not free[blocks].any(), f"{f} has blocks in a free range"
        checked += len(blocks)
    assert checked > 100


def test_deleted_files_leave_free_space(ext_images):
    """Blocks of deleted files that no new file reused are free: the case growth forensics is about."""
    img = ext_images["ext4-32bit-noflex"]
    r = RawReader(img.path)
    fs = probe(r, 0, r.size)
    free = _ranges_to_blocks(fs, fs.details["block_count"])
    assert free.sum() * fs.details["block_size"] == fs.free_bytes
    # At least one block range that the deleted files had is free now (the deletions happened).
    assert img.deleted and fs.free_bytes > 0


def test_features_seen(ext_images):
    """The variants really exercise the code paths they are named after."""
    d = {n: probe(RawReader(i.path), 0, RawReader(i.path).size).details for n, i in ext_images.items()}
    assert d["ext4-64bit-flexbg"]["64bit"] and d["ext4-64bit-flexbg"]["flex_bg"]
    assert d["ext4-64bit-flexbg"]["desc_size"] == 64 and d["ext4-64bit-flexbg"]["groups"] > 1
    assert d["ext4-64bit-flexbg"]["block_uninit_groups"] > 0
    assert d["ext4-uninit-bg"]["block_uninit_groups"] > 0
    assert d["ext4-32bit-noflex"]["desc_size"] == 32 and not d["ext4-32bit-noflex"]["flex_bg"]
    assert d["ext4-meta-bg"]["meta_bg"] and d["ext4-meta-bg"]["groups"] > 1024 // 64
    assert d["ext4-bigalloc"]["bigalloc"]
    assert d["ext4-64k"]["block_size"] == 65536
    assert d["ext2-1k"]["first_data_block"] == 1
    for v in d.values():
        assert v["free_blocks"] == v["superblock_free_blocks"] == v["group_free_blocks"]


def test_analyse_whole_disk_ext(ext_images):
    img = ext_images["ext3"]
    r = RawReader(img.path)
    g = analyse(r)
    assert g.partition_table == "none"
    assert [fs.type for fs in g.filesystems] == ["ext3"]
    assert g.filesystems[0].partition_index is None
    assert g.warnings == []


def test_stale_superblock_count_is_reported(ext_images, tmp_path):
    """The superblock's free count lags on a mounted file system: usage follows the bitmaps, with a note."""
    src = ext_images["ext4-32bit-noflex"].path
    img = tmp_path / "stale.img"
    img.write_bytes(src.read_bytes())
    from support.guestimages import run

    hdr = dumpe2fs_header(img)
    run("debugfs", "-w", "-R", f"ssv free_blocks_count {int(hdr['Free blocks']) + 7}", img)
    fs = probe(RawReader(img), 0, img.stat().st_size)
    assert fs.free_bytes == int(hdr["Free blocks"]) * int(hdr["Block size"])
    assert any("superblock free block count" in n for n in fs.notes)

"""XFS usage against xfs_db: freesp's extent list and total, bmap of every file."""
from __future__ import annotations

import numpy as np
import pytest

from support.guestimages import RawReader, xfs_file_blocks, xfs_free_extents
from vhdcore.guest import analyse, probe


def _free_blocks(fs) -> np.ndarray:
    free = np.zeros(fs.cluster_count, dtype=bool)
    for off, n in fs.free_ranges():
        b = (off - fs.bitmap_origin) // fs.cluster_size
        free[b : b + n // fs.cluster_size] = True
    return free


@pytest.mark.parametrize("name", ["xfs-v5", "xfs-1k", "xfs-v4"])
def test_xfs_matches_xfs_db(xfs_images, name):
    img = xfs_images[name]
    r = RawReader(img.path)
    fs = probe(r, 0, r.size)
    assert fs.type == "xfs" and fs.notes == []
    oracle, total = xfs_free_extents(img.path, fs.details["agblocks"], fs.cluster_count)
    assert fs.free_clusters == total == int(oracle.sum())
    assert fs.free_bytes == total * fs.cluster_size
    assert fs.used_bytes == (fs.details["dblocks"] - total) * fs.cluster_size
    ours = _free_blocks(fs)
    assert np.array_equal(ours, oracle)
    # The superblock's fdblocks also counts the free-space btrees' own blocks as free.
    d = fs.details
    assert d["sb_fdblocks"] == d["agf_free_blocks"] + d["agfl_blocks"] + d["btree_blocks"]
    assert d["agfl_blocks"] > 0


@pytest.mark.parametrize("name", ["xfs-v5", "xfs-1k", "xfs-v4"])
def test_xfs_file_blocks_never_free(xfs_images, name):
    img = xfs_images[name]
    fs = probe(RawReader(img.path), 0, img.path.stat().st_size)
    free = _free_blocks(fs)
    n = 0
    for f in img.files:
        for start, count in xfs_file_blocks(img.path, f, fs.details["agblocks"]):
            assert not free[start : start + count].any(), f
            n += count
    assert n * fs.cluster_size >= 1_000_000


def test_xfs_in_analyse(xfs_images):
    g = analyse(RawReader(xfs_images["xfs-v5"].path), strict=True)
    assert g.partition_table == "none" and [fs.type for fs in g.filesystems] == ["xfs"]

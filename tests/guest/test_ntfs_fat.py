"""NTFS usage against ntfsinfo (counts and file runlists); FAT usage against fsck.fat and mshowfat."""
from __future__ import annotations

import numpy as np
import pytest

from support.guestimages import (FAT_VARIANTS, NTFS_VARIANTS, RawReader, fat_file_clusters, fsck_fat_clusters,
                      ntfs_file_clusters, ntfsinfo_counts)
from vhdcore.guest import analyse, probe


def _free_clusters(fs) -> np.ndarray:
    free = np.zeros(fs.cluster_count, dtype=bool)
    for off, n in fs.free_ranges():
        c0 = (off - fs.bitmap_origin) // fs.cluster_size
        free[c0 : c0 + n // fs.cluster_size] = True
    return free


# ------------------------------------------------------------------------------------------------ NTFS


@pytest.mark.parametrize("name", list(NTFS_VARIANTS))
def test_ntfs_matches_ntfsinfo(ntfs_images, name):
    img = ntfs_images[name]
    cs, nclusters, free = ntfsinfo_counts(img.path)
    r = RawReader(img.path)
    fs = probe(r, 0, r.size)
    assert fs.type == "ntfs"
    assert fs.cluster_size == cs
    assert fs.cluster_count == nclusters
    assert fs.free_clusters == free
    assert fs.free_bytes == free * cs
    assert fs.used_clusters * cs == (nclusters - free) * cs
    assert fs.used_bytes + fs.free_bytes == fs.size
    assert fs.label == name[:16]


@pytest.mark.parametrize("name", list(NTFS_VARIANTS))
def test_ntfs_file_clusters_never_free(ntfs_images, name):
    img = ntfs_images[name]
    fs = probe(RawReader(img.path), 0, img.path.stat().st_size)
    free = _free_clusters(fs)
    assert free.sum() == fs.free_clusters
    runs = 0
    for f in img.files:
        for lcn, length in ntfs_file_clusters(img.path, f):
            assert not free[lcn : lcn + length].any(), f"{f}: clusters {lcn}+{length} in a free range"
            runs += 1
    assert runs >= len(img.files) - 2  # a few tiny files may be resident in the MFT record
    # The truncated files really gave space back (their data runs are gone).
    for t in img.truncated:
        assert ntfs_file_clusters(img.path, t) == []


# ------------------------------------------------------------------------------------------------ FAT


@pytest.mark.parametrize("name", list(FAT_VARIANTS))
def test_fat_matches_fsck(fat_images, name):
    img = fat_images[name]
    used, total = fsck_fat_clusters(img.path)
    r = RawReader(img.path)
    fs = probe(r, 0, r.size)
    assert fs.type == f"fat{img.bits}"
    assert fs.cluster_count == total
    assert fs.used_clusters == used
    # df's figure on a vfat mount: (data clusters - free clusters) x cluster size.
    assert fs.used_bytes - fs.metadata_bytes == used * fs.cluster_size
    assert fs.free_bytes == (total - used) * fs.cluster_size
    assert fs.used_bytes + fs.free_bytes == fs.size == fs.details["total_sectors"] * 512 <= r.size
    assert fs.label == name[:11].upper()
    assert fs.notes == []


@pytest.mark.parametrize("name", list(FAT_VARIANTS))
def test_fat_file_clusters_never_free(fat_images, name):
    img = fat_images[name]
    fs = probe(RawReader(img.path), 0, img.path.stat().st_size)
    free = _free_clusters(fs)
    assert free.sum() == fs.free_clusters
    n = 0
    for f in img.files:
        clusters = fat_file_clusters(img.path, f)
        assert clusters
        assert not free[np.array(clusters) - 2].any(), f
        n += len(clusters)
    assert n > 50
    # The first free range starts in the data region, never in the FATs or root directory before it.
    first = next(fs.free_ranges())
    assert first[0] >= fs.bitmap_origin


def test_fat32_fsinfo_hint_is_checked(fat_images):
    fs = probe(RawReader(fat_images["fat32"].path), 0, fat_images["fat32"].path.stat().st_size)
    assert fs.details.get("fsinfo_free_clusters") == fs.free_clusters


def test_analyse_superfloppy_fat(fat_images):
    g = analyse(RawReader(fat_images["fat12"].path))
    assert g.partition_table == "none"
    assert [fs.type for fs in g.filesystems] == ["fat12"]

"""blockmap: the per-block rules growth and compact share, against a brute-force per-sector model.

The file-system usages here are built directly (random bitmaps, origins, cluster sizes, overlapping and unknown
regions, a file system whose journal needs recovery), the cases real tools do not produce on demand; the real
file systems are covered by test_growth.py and test_compact.py.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from vhdcore import kernels as K
from vhdcore.ops.blockmap import BlockJudge, FreeSectorMap, Intervals
from vhdcore.guest.base import FileSystemUsage, unknown_usage

SECTOR = 512


def _fs(rnd: random.Random, disk_sectors: int, offset_sec: int, size_sec: int, *, recover: bool = False,
        ) -> tuple[FileSystemUsage, np.ndarray]:
    """A file system at ``offset_sec`` with a random bitmap; returns it and its per-sector free map."""
    cs = SECTOR * rnd.choice([1, 2, 8, 16])
    spc = cs // SECTOR
    lead = rnd.randrange(0, 9) * SECTOR  # metadata before cluster 0 (FAT's reserved area, FATs, root)
    origin = offset_sec * SECTOR + lead
    count = max(0, (size_sec * SECTOR - lead) // cs - rnd.randrange(0, 3))
    bits = np.array([rnd.random() < 0.5 for _ in range(count)], dtype=np.uint8)
    if count > 8:  # long free and used runs too
        a = rnd.randrange(count)
        bits[a : a + rnd.randrange(1, count)] = rnd.randrange(2)
    bitmap = np.packbits(bits, bitorder="little") if count else np.zeros(0, np.uint8)
    used = int(bits.sum())
    free = np.zeros(disk_sectors, dtype=bool)
    for c in np.flatnonzero(bits == 0):
        s = origin // SECTOR + int(c) * spc
        free[s : s + spc] = True
    size = size_sec * SECTOR
    fs = FileSystemUsage(type="ext4", offset=offset_sec * SECTOR, size=size, cluster_size=cs, cluster_count=count,
                         used_clusters=used, bitmap=bitmap, bitmap_origin=origin,
                         used_bytes=size - (count - used) * cs, free_bytes=(count - used) * cs,
                         notes=["the journal needs recovery: the bitmaps may not show the latest allocations"]
                         if recover else [])
    return fs, free


@pytest.mark.parametrize("seed", range(12))
def test_free_sectors_and_verdicts_against_brute_force(seed: int) -> None:
    rnd = random.Random(seed)
    bs = SECTOR * rnd.choice([8, 16, 64, 128, 4096])
    nblocks = rnd.randrange(3, 12)
    disk_sectors = nblocks * bs // SECTOR - rnd.choice([0, 0, 1, 7])  # a disk that ends inside a block
    fss: list[FileSystemUsage] = []
    frees: list[np.ndarray] = []
    trusted: list[bool] = []
    pos = rnd.randrange(0, 40)
    while pos < disk_sectors - 16 and len(fss) < 5:
        size = rnd.randrange(8, max(9, disk_sectors // 2))
        size = min(size, disk_sectors - pos)
        kind = rnd.random()
        if kind < 0.15:
            fs, free = unknown_usage(pos * SECTOR, size * SECTOR, None, "test"), np.zeros(disk_sectors, bool)
            ok = False
        else:
            recover = kind < 0.25
            fs, free = _fs(rnd, disk_sectors, pos, size, recover=recover)
            ok = not recover
        fss.append(fs)
        frees.append(free)
        trusted.append(ok)
        # Mostly one after another, sometimes overlapping the previous region (hostile partition tables).
        pos = pos + size + rnd.randrange(0, 20) if rnd.random() < 0.7 else pos + max(1, size // 2)
    covered = [np.zeros(disk_sectors, bool) for _ in fss]
    for c, fs in zip(covered, fss):
        c[fs.offset // SECTOR : (fs.offset + fs.size) // SECTOR] = True
    # A sector may be dropped if a trusted file system marks it free and no region covering it uses it.
    droppable_free = np.zeros(disk_sectors, bool)
    for f, ok in zip(frees, trusted):
        if ok:
            droppable_free |= f
    for c, f, ok in zip(covered, frees, trusted):
        droppable_free &= ~(c & ~(f if ok else np.zeros_like(f)))

    fmap = FreeSectorMap(fss, disk_sectors * SECTOR, bs)
    judge = BlockJudge(fmap, bs)
    spb = bs // SECTOR
    data = np.frombuffer(rnd.randbytes(nblocks * bs), np.uint8).copy()
    zero_sec = np.array([rnd.random() < 0.4 for _ in range(nblocks * spb)])
    for b in range(nblocks):
        if rnd.random() < 0.2:
            zero_sec[b * spb : (b + 1) * spb] = True
        elif rnd.random() < 0.2:  # a block whose every non-free sector is zero
            zero_sec[b * spb : (b + 1) * spb] |= ~np.pad(droppable_free, (0, nblocks * spb - disk_sectors))[
                b * spb : (b + 1) * spb]
    zero_sec[disk_sectors:] = True  # past the end of the disk: the zero padding a reader adds
    data.reshape(-1, SECTOR)[zero_sec] = 0
    pad_free = np.zeros(nblocks * spb, bool)
    pad_free[:disk_sectors] = droppable_free
    per_fs_free = [np.pad(f, (0, nblocks * spb - disk_sectors)) for f in frees]
    for b in range(nblocks):
        sl = slice(b * spb, (b + 1) * spb)
        block = memoryview(data[b * bs : (b + 1) * bs])
        v = judge.examine(b, block, per_fs=True)
        assert v.zero == bool(zero_sec[sl].all())
        assert v.droppable == bool((zero_sec[sl] | pad_free[sl]).all())
        if v.zero:
            continue
        got = np.zeros(spb, bool) if v.free is None else \
            np.unpackbits(np.frombuffer(bytes(v.free), np.uint8), bitorder="big")[:spb].astype(bool)
        assert np.array_equal(got, pad_free[sl]), b
        # Per file system (trusted or not): free sectors, and free sectors holding data (the forensic view).
        want = {i: (int(per_fs_free[i][sl].sum()), int((per_fs_free[i][sl] & ~zero_sec[sl]).sum()))
                for i in range(len(fss)) if fss[i].type != "unknown" and per_fs_free[i][sl].any()}
        assert {i: (f, nz) for i, f, nz in v.per_fs} == want
        # Full mode: exactly the droppable free sectors that held data become zero; nothing else moves.
        before = data[b * bs : (b + 1) * bs].copy()
        n = judge.zero_free_sectors(block, v)
        after = data[b * bs : (b + 1) * bs].reshape(spb, SECTOR)
        changed = (before.reshape(spb, SECTOR) != after).any(axis=1)
        assert n == int((pad_free[sl] & ~zero_sec[sl]).sum()) == int(changed.sum())
        assert not after[pad_free[sl]].any()
    # Free bytes per block, summed over file systems (trusted or not), from used_bytes_per_block.
    want_pb = np.zeros(nblocks, np.int64)
    for f, fs in zip(per_fs_free, fss):
        if fs.type != "unknown":
            want_pb += f.reshape(nblocks, spb).sum(axis=1) * SECTOR
    assert np.array_equal(fmap.free_per_block(nblocks), want_pb)
    assert len(fmap.skipped) == sum(1 for fs, ok in zip(fss, trusted) if not ok and fs.type != "unknown")


@pytest.mark.backend_independent
@pytest.mark.parametrize("seed", range(20))
def test_intervals_against_sets(seed: int) -> None:
    rnd = random.Random(seed)

    def random_runs() -> tuple[list[int], list[int]]:
        starts = [rnd.randrange(0, 400) for _ in range(rnd.randrange(0, 12))]
        return starts, [s + rnd.randrange(0, 40) for s in starts]

    def as_set(starts, ends) -> set[int]:
        return {x for s, e in zip(starts, ends) for x in range(s, e)}

    a_s, a_e = random_runs()
    b_s, b_e = random_runs()
    a, b = Intervals.merged(a_s, a_e), Intervals.merged(b_s, b_e)
    sa, sb = as_set(a_s, a_e), as_set(b_s, b_e)
    assert as_set(a.starts, a.ends) == sa and a.total == len(sa)
    assert np.all(a.starts[1:] > a.ends[:-1])  # disjoint and not touching
    assert a.union(b).total == len(sa | sb)
    assert a.overlap_bytes(b) == len(sa & sb)
    i = a.intersect(b)
    assert as_set(i.starts, i.ends) == sa & sb
    c = a.clip(50, 300)
    assert as_set(c.starts, c.ends) == {x for x in sa if 50 <= x < 300}
    bs = rnd.choice([1, 7, 32, 64])
    nblocks = 500 // bs
    assert a.per_block(bs, nblocks).tolist() == [len({x for x in sa if k * bs <= x < (k + 1) * bs})
                                                 for k in range(nblocks)]
    points = np.array([rnd.randrange(0, 500) for _ in range(10)], np.int64)
    assert a.contains(points).tolist() == [int(p) in sa for p in points]


def test_kernel_backends_agree_on_masks() -> None:
    """The masks are MSB-first, the kernels' sector order: a mask built here reads back sector by sector."""
    mask = bytearray(4)
    K.bitmap_set_range(mask, 3, 17)
    bits = np.unpackbits(np.frombuffer(bytes(mask), np.uint8), bitorder="big")
    assert np.flatnonzero(bits).tolist() == list(range(3, 17))

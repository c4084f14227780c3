"""Damaged and hostile metadata: every parser either answers consistently or raises InvalidFormatError naming
the field; nothing else escapes, nothing is allocated from an unchecked field, nothing loops."""
from __future__ import annotations

import random
import struct
import time

import pytest

from support.guestimages import RawReader
from vhdcore.exceptions import InvalidFormatError
from vhdcore.guest import analyse, probe


class PatchedReader:
    """A real image's bytes with a few bytes overwritten in memory (the file itself is untouched)."""

    def __init__(self, path, patches: dict[int, bytes]) -> None:
        self.base = RawReader(path)
        self.size = self.base.size
        self.path = f"{path} (patched)"
        self.patches = patches

    def read(self, offset: int, n: int) -> bytes:
        data = bytearray(self.base.read(offset, n))
        for off, b in self.patches.items():
            lo, hi = max(off, offset), min(off + len(b), offset + len(data))
            if lo < hi:
                data[lo - offset : hi - offset] = b[lo - off : hi - off]
        return bytes(data)


def _error(path, patches: dict[int, bytes]) -> InvalidFormatError:
    r = PatchedReader(path, patches)
    with pytest.raises(InvalidFormatError) as e:
        probe(r, 0, r.size)
    return e.value


def _consistent(fs) -> None:
    assert fs.used_bytes + fs.free_bytes == fs.size
    assert len(fs.bitmap) == -(-fs.cluster_count // 8)
    assert 0 <= fs.used_clusters <= fs.cluster_count
    total = 0
    for off, n in fs.free_ranges():
        assert fs.offset <= off and off + n <= fs.end + fs.cluster_size
        total += n
    assert total == fs.free_bytes


# ------------------------------------------------------------------------------------------------ targeted


@pytest.mark.backend_independent
def test_ext_hostile_fields(ext_images):
    p = ext_images["ext4-64bit-flexbg"].path
    sb = 1024
    e = _error(p, {sb + 4: struct.pack("<I", 0xFFFFFFF0)})
    assert e.field == "ext.s_blocks_count" and "larger than its partition" in str(e)
    assert _error(p, {sb + 0x18: struct.pack("<I", 9)}).field == "ext.s_log_block_size"
    assert _error(p, {sb + 0x20: struct.pack("<I", 12)}).field == "ext.s_blocks_per_group"
    assert _error(p, {sb + 0xFE: struct.pack("<H", 48)}).field == "ext.s_desc_size"
    assert _error(p, {sb + 0x14: struct.pack("<I", 5)}).field == "ext.s_first_data_block"
    # Group 0's block bitmap pointing past the end of the file system.
    gdt = 4096
    e = _error(p, {gdt: struct.pack("<I", 0x7FFFFFFF)})
    assert e.field == "ext.group[0].block_bitmap" and e.value == 0x7FFFFFFF


@pytest.mark.backend_independent
def test_ntfs_hostile_fields(ntfs_images):
    p = ntfs_images["ntfs-4k"].path
    r = RawReader(p)
    fs = probe(r, 0, r.size)
    mft = fs.details["mft_lcn"] * fs.cluster_size
    rec6 = mft + 6 * 1024
    assert _error(p, {0x40: b"\x00"}).field == "ntfs.clusters_per_mft_record"
    assert _error(p, {0x0D: b"\x03"}).field == "ntfs.sectors_per_cluster"
    assert _error(p, {0x28: struct.pack("<Q", 1 << 40)}).field == "ntfs.total_sectors"
    # A torn record: the last two bytes of its first sector no longer carry the update sequence number.
    e = _error(p, {rec6 + 510: b"\xde\xad"})
    assert e.field == "ntfs.record.usn" and e.offset == rec6 + 510
    assert _error(p, {rec6: b"BAAD"}).field == "ntfs.record.magic"
    # $Bitmap's data run moved past the end of the volume (find its mapping pairs and rewrite the LCN).
    rec = bytearray(r.read(rec6, 1024))
    pos = struct.unpack_from("<H", rec, 0x14)[0]
    while struct.unpack_from("<I", rec, pos)[0] != 0x80:
        pos += struct.unpack_from("<I", rec, pos + 4)[0]
    mp = pos + struct.unpack_from("<H", rec, pos + 0x20)[0]
    header = rec[mp]
    nlen, noff = header & 15, header >> 4
    lcn_at = rec6 + mp + 1 + nlen
    e = _error(p, {lcn_at: ((1 << (8 * noff - 1)) - 1).to_bytes(noff, "little")})
    assert e.field in ("ntfs.run_lcn", "ntfs.record.usn")  # usn if the pairs straddle a fixup position
    e = _error(p, {rec6 + mp: b"\x0f"})
    assert e.field in ("ntfs.mapping_pairs", "ntfs.run_length")


@pytest.mark.backend_independent
def test_fat_hostile_fields(fat_images):
    p = fat_images["fat16"].path
    e = _error(p, {22: struct.pack("<H", 1)})  # a one-sector FAT cannot hold thousands of clusters
    assert e.field == "fat.fat_size"
    e = _error(p, {19: struct.pack("<H", 0), 32: struct.pack("<I", 0x7FFFFFFF)})
    assert e.field == "fat.total_sectors"
    e = _error(p, {14: struct.pack("<H", 0xFFFF)})
    assert e.field in ("fat.reserved_sectors", "fat.clusters")
    p32 = fat_images["fat32"].path
    assert _error(p32, {40: struct.pack("<H", 0x80 | 5)}).field == "fat.ext_flags"
    assert _error(p32, {17: struct.pack("<H", 512)}).field == "fat.root_entries"


# ------------------------------------------------------------------------------------------------ mutation


def _metadata_spots(kind: str, path) -> list[tuple[int, int]]:
    """(offset, length) of the structures worth damaging in each kind of image."""
    r = RawReader(path)
    fs = probe(r, 0, r.size)
    if kind == "ext":
        bs = fs.details["block_size"]
        gdt = (fs.details["first_data_block"] + 1) * bs
        return [(1024, 1024), (gdt, min(bs, 64 * fs.details["groups"])), (gdt + bs, bs * 2)]
    if kind == "ntfs":
        mft = fs.details["mft_lcn"] * fs.cluster_size
        return [(0, 512), (mft, 1024), (mft + 6 * 1024, 1024)]
    if kind == "xfs":
        agf = r.read(512, 64)
        root = struct.unpack_from(">I", agf, 16)[0] * fs.cluster_size
        return [(0, 256), (512, 64), (1536, 512), (root, 64), (root + 56, 256)]
    d = fs.details
    return [(0, 512), (d["reserved_sectors"] * 512, 2048)]


MUTANTS = 400


@pytest.mark.parametrize("kind,fixture,name", [
    ("ext", "ext_images", "ext4-64bit-flexbg"), ("ext", "ext_images", "ext2-1k"),
    ("ext", "ext_images", "ext4-meta-bg"), ("ntfs", "ntfs_images", "ntfs-4k"),
    ("fat", "fat_images", "fat12"), ("fat", "fat_images", "fat32"), ("xfs", "xfs_images", "xfs-v5"),
])
def test_random_damage_is_contained(request, kind, fixture, name):
    path = request.getfixturevalue(fixture)[name].path
    spots = _metadata_spots(kind, path)
    rnd = random.Random(f"{name}-damage")
    outcomes = {"ok": 0, "error": 0, "other": 0}
    for _ in range(MUTANTS):
        patches = {}
        for _ in range(rnd.randint(1, 4)):
            off, length = rnd.choice(spots)
            at = off + rnd.randrange(length)
            width = rnd.choice((1, 2, 4))
            value = rnd.choice((0, 0xFF, 0x80, rnd.randrange(256)))
            patches[at] = bytes([value]) * width if rnd.random() < 0.5 else rnd.randbytes(width)
        r = PatchedReader(path, patches)
        t0 = time.perf_counter()
        try:
            g = analyse(r, strict=True)
        except InvalidFormatError as e:
            assert str(e)
            outcomes["error"] += 1
        else:
            for fs in g.filesystems:
                _consistent(fs)
            outcomes["ok" if any(f.type != "unknown" for f in g.filesystems) else "other"] += 1
        assert time.perf_counter() - t0 < 2.0, patches
    # Both paths were exercised: some damage is caught, some lands in bytes that do not matter.
    assert outcomes["error"] > 0 and outcomes["ok"] > 0, outcomes


@pytest.mark.backend_independent
def test_truncated_images_raise_cleanly(ext_images, ntfs_images, fat_images):
    """A file system cut short (a half-copied image): an InvalidFormatError, not a short-read crash."""
    for img in (ext_images["ext3"], ntfs_images["ntfs-4k"], fat_images["fat16"]):
        base = RawReader(img.path)
        for cut in (600, 3000, 70_000, base.size // 2):
            r = PatchedReader(img.path, {})
            r.size = cut
            g = analyse(r)
            fs = g.filesystems[0] if g.filesystems else None
            if fs is not None:
                assert fs.type == "unknown" or fs.size <= cut
            with pytest.raises(InvalidFormatError):
                if probe(r, 0, cut) is None:
                    raise InvalidFormatError("no file system")

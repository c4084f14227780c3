"""Whole disks: MBR (with logical partitions) and GPT tables against sfdisk, every file system in them against its
own tool, the corpus NTFS disk, the same analysis through a vhdcore Disk, and the cost of a large sparse disk."""
from __future__ import annotations

import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import vhdcore
from support.guestimages import (MiB, RawReader, dumpe2fs_header, fsck_fat_clusters, ntfsinfo_counts, run, sfdisk_json)
from vhdcore.exceptions import ChecksumError, InvalidFormatError
from vhdcore.guest import RawFileReader, analyse, read_partition_table

CORPUS = Path(__file__).parent.parent / "data" / "corpus" / "dfvfs"


def _tool_used_bytes(kind: str, image: Path) -> int:
    """What the file system's own tool says is in use, in bytes (see each parser's docstring)."""
    if kind.startswith("ext"):
        h = dumpe2fs_header(image)
        return (int(h["Block count"]) - int(h["Free blocks"])) * int(h["Block size"])
    if kind == "ntfs":
        cs, n, free = ntfsinfo_counts(image)
        return None, n - free, n  # type: ignore[return-value]
    if kind.startswith("fat"):
        used, total = fsck_fat_clusters(image)
        return None, used, total  # type: ignore[return-value]
    raise AssertionError(kind)


def _check_against_tools(g, disk) -> None:
    by_index = {fs.partition_index: fs for fs in g.filesystems}
    for num, (kind, image) in disk.layout.items():
        fs = by_index[num]
        part = next(p for p in g.partitions if p.index == num)
        assert fs.offset == part.offset
        if kind in ("swap", "blank"):
            assert fs.type == "unknown"
            assert fs.details.get("signature") == ("swap" if kind == "swap" else "zeros")
            assert fs.used_bytes == part.size and fs.free_bytes == 0 and list(fs.free_ranges()) == []
            continue
        assert fs.type == kind
        if kind.startswith("fat") or kind == "ntfs":
            _, used, total = _tool_used_bytes(kind, image)
            assert (fs.used_clusters, fs.cluster_count) == (used, total)
        else:
            assert fs.used_bytes == _tool_used_bytes(kind, image)
        for off, n in fs.free_ranges():
            assert fs.offset <= off and off + n <= part.end


def _check_against_sfdisk(table, disk_path: Path) -> None:
    sf = sfdisk_json(disk_path)
    expected = {}
    for p in sf["partitions"]:
        num = int(p["node"][len(str(disk_path)):])
        expected[num] = (p["start"] * 512, p["size"] * 512, p["type"].lower())
    extended = {n for n, (_, _, t) in expected.items() if t in ("5", "f", "85")}
    got = {p.index: (p.offset, p.size, p.type_id.lower().removeprefix("0x").lstrip("0") if p.scheme == "mbr"
                     else p.type_id) for p in table.partitions}
    assert got == {n: v for n, v in expected.items() if n not in extended}
    if sf["label"] == "gpt":
        uuids = {int(p["node"][len(str(disk_path)):]): p["uuid"].lower() for p in sf["partitions"]}
        names = {int(p["node"][len(str(disk_path)):]): p.get("name", "") for p in sf["partitions"]}
        assert {p.index: p.uuid for p in table.partitions} == uuids
        assert {p.index: p.name for p in table.partitions} == names


@pytest.mark.backend_independent
def test_mbr_table_matches_sfdisk(mbr_disk):
    table = read_partition_table(RawReader(mbr_disk.path))
    assert table.scheme == "mbr" and table.warnings == []
    _check_against_sfdisk(table, mbr_disk.path)
    parts = {p.index: p for p in table.partitions}
    assert sorted(parts) == [1, 2, 4, 5, 6, 7]
    assert parts[1].bootable and not parts[2].bootable
    assert [p.logical for p in table.partitions] == [False, False, False, True, True, True]
    assert parts[2].type_name == "Linux swap" and parts[6].type_name == "HPFS/NTFS/exFAT"


@pytest.mark.backend_independent
def test_gpt_table_matches_sfdisk(gpt_disk):
    table = read_partition_table(RawReader(gpt_disk.path))
    assert table.scheme == "gpt" and table.warnings == []
    _check_against_sfdisk(table, gpt_disk.path)
    names = [p.type_name for p in table.partitions]
    assert names == ["EFI System", "Linux filesystem", "Microsoft basic data", "Linux filesystem"]


def test_analyse_mbr_disk(mbr_disk):
    g = analyse(RawReader(mbr_disk.path), strict=True)
    assert g.partition_table == "mbr"
    assert [fs.type for fs in g.filesystems] == ["fat16", "unknown", "unknown", "ext4", "ntfs", "ext2"]
    _check_against_tools(g, mbr_disk)
    assert g.warnings == []


def test_analyse_gpt_disk(gpt_disk):
    g = analyse(RawReader(gpt_disk.path), strict=True)
    assert g.partition_table == "gpt"
    assert [fs.type for fs in g.filesystems] == ["fat32", "ext4", "ntfs", "unknown"]
    _check_against_tools(g, gpt_disk)
    d = g.to_dict()
    assert d["filesystems"][0]["type"] == "fat32" and "bitmap" not in d["filesystems"][0]


def test_corpus_ntfs_fixed_vhd(tmp_path):
    """Windows-made NTFS in a fixed VHD (the raw disk followed by a 512-byte footer): partition at LBA 128."""
    vhd = CORPUS / "ntfs-fixed.vhd"
    with RawFileReader(vhd, size=vhd.stat().st_size - 512) as r:
        g = analyse(r, strict=True)
    assert g.partition_table == "mbr"
    [fs] = g.filesystems
    assert fs.type == "ntfs" and fs.offset == 65536 == g.partitions[0].offset
    part = tmp_path / "part.img"
    run("dd", f"if={vhd}", f"of={part}", "bs=512", "skip=128", f"count={g.partitions[0].size // 512}", "status=none")
    cs, n, free = ntfsinfo_counts(part)
    assert (fs.cluster_size, fs.cluster_count, fs.free_clusters) == (cs, n, free)
    assert fs.used_bytes == g.partitions[0].size - free * cs
    # The same through the VHD engine, for the fixed, dynamic and differential copies of that disk.
    for name in ("ntfs-fixed.vhd", "ntfs-dynamic.vhd", "ntfs-differential.vhd"):
        with vhdcore.open(CORPUS / name) as disk:
            [fs2] = analyse(disk, strict=True).filesystems
        # Separate formats of the same content (each its own volume serial number).
        assert {**fs2.summary(), "uuid": None} == {**fs.summary(), "uuid": None}, name
        assert np.array_equal(fs2.bitmap, fs.bitmap)


def test_same_answer_through_a_vhdcore_disk(gpt_disk, tmp_path):
    """A dynamic VHD holding the GPT disk analyses exactly like the raw image (growth reads through a Disk)."""
    vhd = tmp_path / "gpt.vhd"
    raw = gpt_disk.path
    size = raw.stat().st_size
    with vhdcore.create(vhd, size, type="dynamic") as disk, open(raw, "rb") as f:
        chunk = 1 * MiB
        for off in range(0, size, chunk):
            data = f.read(chunk)
            if data.strip(b"\0"):
                disk.write(off, data)
    want = analyse(RawReader(raw))
    with vhdcore.open(vhd) as disk:
        got = analyse(disk)
    assert got.partition_table == want.partition_table
    assert [p.to_dict() for p in got.partitions] == [p.to_dict() for p in want.partitions]
    for a, b in zip(got.filesystems, want.filesystems):
        assert a.summary() == b.summary()
        assert np.array_equal(a.bitmap, b.bitmap)
        assert list(a.free_ranges()) == list(b.free_ranges())


def test_cost_follows_metadata_not_virtual_size(guest_tools, tmp_path):
    """An 8 GiB ext4 and an 8 GiB NTFS (sparse files): a few hundred KiB read, well under a second."""
    results = {}
    ext = tmp_path / "big-ext4.img"
    ntfs = tmp_path / "big-ntfs.img"
    for p in (ext, ntfs):
        with open(p, "wb") as f:
            f.truncate(8 * 1024 * MiB)
    run("mke2fs", "-q", "-F", "-t", "ext4", "-J", "size=4", ext)
    run("mkntfs", "-F", "-Q", "-q", ntfs)
    for p in (ext, ntfs):
        r = RawReader(p)
        t0 = time.perf_counter()
        g = analyse(r, strict=True)
        ranges = list(g.filesystems[0].free_ranges())
        results[p.name] = (time.perf_counter() - t0, r.bytes_read, r.reads, g.filesystems[0], ranges)
    t, nbytes, nreads, fs, ranges = results[ext.name]
    h = dumpe2fs_header(ext)
    assert fs.used_bytes == (int(h["Block count"]) - int(h["Free blocks"])) * 4096
    assert nbytes < 256 * 1024 and nreads < 64 and t < 1.0, (t, nbytes, nreads)
    assert sum(n for _, n in ranges) == fs.free_bytes
    t, nbytes, nreads, fs, ranges = results[ntfs.name]
    cs, n, free = ntfsinfo_counts(ntfs)
    assert fs.free_clusters == free
    # $Bitmap is the one big read: one bit per cluster.
    assert nbytes < n // 8 + 64 * 1024 and t < 1.0, (t, nbytes)
    assert sum(n for _, n in ranges) == fs.free_bytes


# ------------------------------------------------------------------------------------------------ damaged tables


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.backend_independent
def test_gpt_header_crc_mismatch(gpt_disk, tmp_path):
    img = _copy(gpt_disk.path, tmp_path / "bad.img")
    _patch(img, 512 + 80, struct.pack("<I", 129))  # one more entry: the header CRC no longer matches
    with pytest.raises(ChecksumError) as e:
        analyse(RawReader(img), strict=True)
    assert e.value.offset == 512 + 16 and "GPT header" in str(e.value)
    g = analyse(RawReader(img))
    assert g.partition_table == "invalid" and g.filesystems[0].type == "unknown"
    assert g.filesystems[0].used_bytes == img.stat().st_size and g.warnings


@pytest.mark.backend_independent
def test_gpt_entry_array_crc_and_huge_counts(gpt_disk, tmp_path):
    img = _copy(gpt_disk.path, tmp_path / "bad.img")
    _patch(img, 1024 + 32, b"\x01")  # an entry's first LBA: the array CRC no longer matches
    with pytest.raises(ChecksumError) as e:
        read_partition_table(RawReader(img))
    assert "entry array" in str(e.value)
    # A header claiming 2^32-1 entries (with a correct header CRC) is refused before anything is allocated.
    img2 = _copy(gpt_disk.path, tmp_path / "huge.img")
    hdr = bytearray(img2.read_bytes()[512:1024])
    hdr[80:84] = struct.pack("<I", 0xFFFFFFFF)
    hdr[16:20] = b"\0\0\0\0"
    hdr[16:20] = struct.pack("<I", zlib.crc32(bytes(hdr[:92])))
    _patch(img2, 512, bytes(hdr))
    with pytest.raises(InvalidFormatError) as e:
        read_partition_table(RawReader(img2))
    assert e.value.field == "gpt.num_entries"


@pytest.mark.backend_independent
def test_ebr_loop_stops(mbr_disk, tmp_path):
    img = _copy(mbr_disk.path, tmp_path / "loop.img")
    table = read_partition_table(RawReader(img))
    # The second EBR's link to the next EBR now points back at the first one.
    ext_start = struct.unpack_from("<I", img.read_bytes(), 446 + 32 + 8)[0]
    p6 = next(p for p in table.partitions if p.index == 6)
    ebr2 = p6.offset - 2048 * 512  # sfdisk leaves 1 MiB before each logical partition's data
    data = img.read_bytes()
    assert data[ebr2 + 510 : ebr2 + 512] == b"\x55\xaa"
    _patch(img, ebr2 + 462 + 8, struct.pack("<I", 0))
    t = read_partition_table(RawReader(img))
    assert [p.index for p in t.partitions] == [1, 2, 4, 5, 6]
    assert any("loops" in w for w in t.warnings), (t.warnings, ext_start)


@pytest.mark.backend_independent
def test_partition_past_the_end_is_clipped(mbr_disk, tmp_path):
    img = _copy(mbr_disk.path, tmp_path / "short.img")
    os.truncate(img, 30 * MiB)  # cuts into logical partition 6; the EBR of 7 is gone
    g = analyse(RawReader(img))
    assert any("clipped" in w for w in g.warnings) and any("EBR" in w or "ignored" in w for w in g.warnings)
    by = {fs.partition_index: fs for fs in g.filesystems}
    # NTFS no longer fits its partition: reported unknown with the reason, never guessed.
    assert by[6].type == "unknown" and "larger than its partition" in by[6].notes[0]
    assert by[5].type == "ext4"


@pytest.mark.backend_independent
def test_empty_disk(tmp_path):
    img = tmp_path / "zero.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    g = analyse(RawReader(img))
    assert g.partition_table == "empty" and g.filesystems == [] and g.warnings


def _brute_used_per_block(fs, block_size: int) -> tuple[int, np.ndarray]:
    """Byte by byte: a byte is used when it is in the file system and not in a free cluster."""
    first, last = fs.offset // block_size, (fs.end - 1) // block_size
    base = first * block_size
    used = np.zeros((last - first + 1) * block_size, dtype=bool)
    used[fs.offset - base : fs.end - base] = True
    bits = np.unpackbits(fs.bitmap, bitorder="little")[: fs.cluster_count].astype(bool)
    for c in np.flatnonzero(~bits):
        o = fs.bitmap_origin + int(c) * fs.cluster_size - base
        used[o : o + fs.cluster_size] = False
    return first, used.reshape(-1, block_size).sum(axis=1)


@pytest.mark.parametrize("block_size", [2 * MiB, 512 * 1024, 21 * 512])  # the last one forces the walk
def test_used_bytes_per_block(mbr_disk, gpt_disk, block_size):
    """The per-VHD-block join (fast path through count_runs_in_blocks, or the free-range walk) is exact."""
    for disk in (mbr_disk, gpt_disk):
        for fs in analyse(RawReader(disk.path)).filesystems:
            first, used = fs.used_bytes_per_block(block_size)
            bfirst, bused = _brute_used_per_block(fs, block_size)
            assert first == bfirst
            assert np.array_equal(used, bused), (fs.type, block_size)
            assert int(used.sum()) == fs.used_bytes


@pytest.mark.parametrize("chunk", [8, 24, 1 << 24])
def test_free_extents_across_slices(monkeypatch, chunk):
    """Runs that cross the slices free_extents()/count_set_bits() work in come out whole, whatever the slice."""
    from vhdcore.guest import base

    monkeypatch.setattr(base, "FREE_RUNS_CHUNK_BITS", chunk)
    rng = np.random.default_rng(chunk)
    for n, density in ((1000, 0.5), (4099, 0.9), (4099, 0.02), (64, 0.0), (64, 1.0)):
        bits = rng.random(n) < density
        bitmap = np.packbits(bits, bitorder="little")
        fs = base.FileSystemUsage("ext4", 4096, n * 512, 512, n, int(bits.sum()), bitmap, 8192, 0, 0)
        want = []
        i = 0
        while i < n:
            if not bits[i]:
                j = i
                while j < n and not bits[j]:
                    j += 1
                want.append((8192 + i * 512, (j - i) * 512))
                i = j
            else:
                i += 1
        assert list(fs.free_ranges()) == want
        assert base.count_set_bits(bitmap, n) == int(bits.sum())

"""compact: a new dynamic VHD with the same guest data. The file systems' own checkers find the results clean, every
file read back with the file system's own tool is byte-identical, used sectors and regions no file system covers are
unchanged, and the sizes are the ones growth predicts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vhdcore
from vhdcore.destination import DestinationError
from support import growth as gs
from support.growth import MiB, SECTOR
from vhdcore.exceptions import VHDError


_read_all = gs.read_disk


def _check_guest(g: gs.GuestChain, out: Path, tmp: Path) -> None:
    """Each file system of ``out`` is clean for its checker and holds every file byte for byte."""
    for num, part in g.parts.items():
        if part.kind in ("swap", "data"):
            continue
        img = gs.extract_partition(out, part, tmp / f"p{num}.img")
        gs.check_filesystem(part.kind, img)
        assert gs.extract_files(part, img, tmp / f"p{num}-files") == part.files, part.kind


def _free_any(g: gs.GuestChain) -> np.ndarray:
    free_any = np.zeros(g.size // SECTOR, dtype=bool)
    for f in gs.free_sectors(g).values():
        free_any |= f
    return free_any


@pytest.mark.parametrize("mode", ["full", "quick", "zero"])
def test_mbr_chain(mode, mbr_chain, tmp_path) -> None:
    g = mbr_chain
    out = tmp_path / f"{mode}.vhd"
    calls = []
    rep = vhdcore.compact(g.leaf, out, mode=mode, progress=lambda done, total: calls.append((done, total)))
    growth = vhdcore.growth(g.leaf)
    # The size growth predicted, to the byte; the report's figures add up.
    assert rep.bytes_after == os.path.getsize(out) == growth.compacted_size[mode]
    assert rep.bytes_before == sum(os.path.getsize(p) for p in g.layers) == growth.file_size
    assert rep.reclaimed_bytes == rep.bytes_before - rep.bytes_after > 0
    assert rep.block_size == g.block_sizes[-1] == growth.block_size
    assert rep.blocks_considered == growth.blocks["allocated"]
    assert rep.blocks_kept + rep.blocks_dropped["zero"] + rep.blocks_dropped["free"] == rep.blocks_considered
    assert rep.blocks_dropped["zero"] == growth.blocks["zero"]
    assert calls and calls[-1][0] == calls[-1][1]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with vhdcore.open(out) as d:
        assert len(d.layers) == 1 and d.leaf.is_dynamic and d.size == g.size
        assert len(d.leaf.allocated_blocks()) == rep.blocks_kept

    before, after = g.content(), _read_all(out)
    free = _free_any(g)
    nsec = g.size // SECTOR
    changed = (before.reshape(nsec, SECTOR) != after.reshape(nsec, SECTOR)).any(axis=1)
    if mode == "zero":
        assert rep.blocks_dropped["free"] == 0 and rep.free_bytes_zeroed == 0
        assert not changed.any()  # dropping zero blocks changes nothing
        return
    # Only sectors the file systems mark free ever change, and they change to zeros.
    assert not (changed & ~free).any()
    assert not after.reshape(nsec, SECTOR)[changed].any()
    assert rep.blocks_dropped["free"] == growth.blocks["free"] > 0
    free_nonzero = free & gs.nonzero_sectors(before)
    if mode == "full":
        assert not after.reshape(nsec, SECTOR)[free].any()  # no deleted data left anywhere
        assert rep.free_bytes_zeroed == int((changed & ~np.repeat(_dropped(out, g, rep.block_size), rep.block_size
                                                                   // SECTOR)[:nsec]).sum()) * SECTOR
        assert int(changed.sum()) == int(free_nonzero.sum())
    else:
        assert rep.free_bytes_zeroed == 0
        assert after.reshape(nsec, SECTOR)[free].any()  # deleted data in kept blocks stays
    # Partitions without a file system we know, and the partition table, are as they were.
    for part in g.parts.values():
        if part.kind in ("data", "swap"):
            assert np.array_equal(after[part.offset : part.offset + part.size],
                                  before[part.offset : part.offset + part.size])
    _check_guest(g, out, tmp_path)


def _dropped(out: Path, g: gs.GuestChain, bs: int) -> np.ndarray:
    """Blocks of the output grid that the source held and the output does not."""
    nblk = -(-g.size // bs)
    with vhdcore.open(out) as d:
        kept = np.zeros(nblk, dtype=bool)
        kept[d.leaf.allocated_blocks()] = True
    spb = bs // SECTOR
    pad = np.zeros(nblk * spb, dtype=bool)
    pad[: g.size // SECTOR] = g.allocated()
    return pad.reshape(nblk, spb).any(axis=1) & ~kept


def test_gpt_chain_ntfs_fat32_ext2(gpt_chain, tmp_path) -> None:
    g = gpt_chain
    out = tmp_path / "gpt.vhd"
    rep = vhdcore.compact(g.leaf, out, block_size=1 * MiB)
    growth = vhdcore.growth(g.leaf, block_size=1 * MiB)
    assert rep.bytes_after == os.path.getsize(out) == growth.compacted_size["full"] < rep.bytes_before
    assert rep.block_size == 1 * MiB
    before, after = g.content(), _read_all(out)
    swap = g.parts[3]
    assert np.array_equal(after[swap.offset : swap.offset + swap.size], before[swap.offset : swap.offset + swap.size])
    assert np.array_equal(after[: 34 * SECTOR], before[: 34 * SECTOR])  # protective MBR, GPT header and entries
    assert np.array_equal(after[-33 * SECTOR :], before[-33 * SECTOR :])  # the backup GPT
    assert rep.free_bytes_zeroed > 0
    _check_guest(g, out, tmp_path)


def test_fixed_source_same_as_chain(mbr_chain, tmp_path) -> None:
    """A sparse fixed VHD of the same disk compacts to the same bytes: its holes are zero blocks, never read."""
    fixed = gs.fixed_copy(mbr_chain)
    a, b = tmp_path / "from-fixed.vhd", tmp_path / "from-chain.vhd"
    ra = vhdcore.compact(fixed, a, block_size=2 * MiB)
    rb = vhdcore.compact(mbr_chain.leaf, b, block_size=2 * MiB)
    assert ra.bytes_after == rb.bytes_after and ra.blocks_kept == rb.blocks_kept
    assert ra.bytes_read < mbr_chain.size // 2
    assert np.array_equal(_read_all(a), _read_all(b))


@pytest.mark.parametrize("name", ["ntfs-dynamic.vhd", "ntfs-differential.vhd", "ntfs-fixed.vhd"])
def test_corpus_ntfs(name, tmp_path) -> None:
    """The corpus's Windows-made NTFS (MBR partition at LBA 128) stays clean, with every file identical."""
    gs.ensure_tools()
    src = gs.CORPUS / name
    out = tmp_path / "out.vhd"
    rep = vhdcore.compact(src, out, mode="full")
    assert rep.bytes_after == vhdcore.growth(src).compacted_size["full"]
    [fs] = [f for f in rep.filesystems]
    assert fs["type"] == "ntfs" and fs["offset"] == 128 * SECTOR
    part = gs.Part(1, "ntfs", fs["offset"], fs["size"], Path())
    old = gs.extract_partition(src, part, tmp_path / "old.img")
    new = gs.extract_partition(out, part, tmp_path / "new.img")
    gs.check_filesystem("ntfs", new)
    names = [l.split(None, 1)[1] for l in gs.run("ntfsls", "-i", "-f", old).splitlines() if l.strip()]
    assert names
    for n in names:
        want = subprocess.run(["ntfscat", "-f", str(old), n], capture_output=True).stdout
        got = subprocess.run(["ntfscat", "-f", str(new), n], capture_output=True).stdout
        assert got == want, n


def test_interrupted_compaction_leaves_nothing(mbr_chain, tmp_path) -> None:
    out = tmp_path / "out.vhd"

    def boom(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vhdcore.compact(mbr_chain.leaf, out, progress=boom)
    assert list(tmp_path.iterdir()) == []
    # The source is untouched and still opens as the same chain.
    with vhdcore.open(mbr_chain.leaf) as d:
        assert len(d.layers) == 3


@pytest.mark.backend_independent
def test_refusals(mbr_chain, tmp_path) -> None:
    with pytest.raises(ValueError, match="mode"):
        vhdcore.compact(mbr_chain.leaf, tmp_path / "x.vhd", mode="fast")
    with pytest.raises(DestinationError, match="file of the source chain"):
        vhdcore.compact(mbr_chain.leaf, mbr_chain.layers[0], overwrite=True)
    with pytest.raises(ValueError, match="block size"):
        vhdcore.compact(mbr_chain.leaf, tmp_path / "x.vhd", block_size=3000)
    bad = tmp_path / "bad.vhd"
    bad.write_bytes(b"conectix" + bytes(600))
    with pytest.raises(VHDError):
        vhdcore.compact(bad, tmp_path / "y.vhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.vhd"]


def test_journal_needing_recovery_keeps_everything(tmp_path) -> None:
    """Free space of a file system whose journal needs replaying is not dropped or zeroed: the result reads the
    same as the source."""
    img, vhd = gs.ext4_needing_recovery(tmp_path, 40 * MiB, 810, 4_000_000)
    out = tmp_path / "out.vhd"
    rep = vhdcore.compact(vhd, out, mode="full")
    assert rep.blocks_dropped["free"] == 0 and rep.free_bytes_zeroed == 0
    assert any("needs recovery" in w for w in rep.warnings)
    assert np.array_equal(_read_all(out), np.fromfile(img, np.uint8))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdcore", *args], capture_output=True, text=True)


@pytest.mark.backend_independent
def test_cli(mbr_chain, tmp_path) -> None:
    out = tmp_path / "cli.vhd"
    p = _cli("compact", str(mbr_chain.leaf), str(out), "--mode", "quick", "--json", "--progress", "json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["mode"] == "quick" and d["bytes_after"] == os.path.getsize(out) < d["bytes_before"]
    assert set(d["blocks_dropped"]) == {"zero", "free"} and d["blocks_dropped"]["free"] > 0
    progress = [json.loads(l) for l in p.stderr.splitlines() if l.strip()]
    assert progress and progress[-1]["done"] == progress[-1]["total"]
    p = _cli("compact", str(mbr_chain.leaf), str(tmp_path / "h.vhd"), "--progress", "none")
    assert p.returncode == 0 and "reclaimed" in p.stdout and "dropped as free space" in p.stdout
    p = _cli("compact", str(mbr_chain.leaf), str(tmp_path / "m.vhd"), "--mode", "nope")
    assert p.returncode == 2 and p.stderr.count("\n") == 1


def test_xfs_behind_gpt(tmp_path) -> None:
    """XFS (made from a prototype file, no mount): used bytes as xfs_db counts them, free blocks dropped, and the
    compacted file system is clean for xfs_repair with every file's extents holding the same bytes."""
    gs.ensure_tools()
    g = gs.GuestChain(tmp_path, "xfs", 324 * MiB, "label: gpt\nsize=320MiB, type=L, name=xfs\n")
    part = g.xfs(1, 64, ["-d", "agcount=2"])
    g.commit(tmp_path / "xfs.vhd", 2 * MiB)
    rep = vhdcore.growth(g.leaf)
    [fs] = rep.filesystems
    assert fs.type == "xfs" and fs.offset == part.offset == 1 * MiB
    sb = gs.run("xfs_db", "-r", "-c", "sb 0", "-c", "p dblocks blocksize", part.image)
    dblocks = int(sb.split("dblocks = ")[1].split()[0])
    bs = int(sb.split("blocksize = ")[1].split()[0])
    free_total = int(gs.run("xfs_db", "-r", "-c", "freesp -s", part.image).split("total free blocks")[1].split()[0])
    assert fs.used_bytes == (dblocks - free_total) * bs
    free = gs.image_free_sectors(part, g.size // SECTOR)
    assert fs.free_allocated_bytes == int((free & g.allocated()).sum()) * SECTOR
    out = tmp_path / "out.vhd"
    crep = vhdcore.compact(g.leaf, out)
    assert crep.bytes_after == rep.compacted_size["full"] == os.path.getsize(out)
    img = gs.extract_partition(out, part, tmp_path / "new.img")
    gs.check_filesystem("xfs", img)
    assert gs.extract_files(part, img, tmp_path / "files") == part.files
    assert len(part.files) >= 10

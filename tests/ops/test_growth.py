"""growth: VHD allocation per layer and the join with the guest file systems, checked against an independent model
of the chain (which sectors each layer holds), the raw bytes, and each file system's own tool."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import vhdcore
from support import growth as gs
from support.growth import MiB, SECTOR

GiB = 1024 * MiB


@pytest.fixture(scope="module")
def reports(mbr_chain, gpt_chain) -> dict[str, vhdcore.GrowthReport]:
    seen: list[tuple[int, int]] = []
    out = {"mbr": vhdcore.growth(mbr_chain.leaf, block_table=True, progress=lambda d, t: seen.append((d, t))),
           "gpt": vhdcore.growth(gpt_chain.leaf)}
    # Progress: bytes read, each layer's own blocks then the chain's, ending at the total.
    per_layer = sum(min(bs, mbr_chain.size) * n for bs, n in zip(mbr_chain.block_sizes, mbr_chain.layer_blocks))
    assert seen[-1][0] == seen[-1][1] == per_layer + out["mbr"].blocks["allocated"] * out["mbr"].block_size
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    return out


def _chain(name, mbr_chain, gpt_chain) -> gs.GuestChain:
    return mbr_chain if name == "mbr" else gpt_chain


@pytest.mark.parametrize("name", ["mbr", "gpt"])
def test_chain_reads_as_the_disk(name, mbr_chain, gpt_chain) -> None:
    """The fixture is what it claims: the chain's virtual disk is the raw disk the tools made."""
    g = _chain(name, mbr_chain, gpt_chain)
    with vhdcore.open(g.leaf) as d:
        assert len(d.layers) == len(g.layers)
    assert np.array_equal(gs.read_disk(g.leaf), g.content())


@pytest.mark.parametrize("name", ["mbr", "gpt"])
def test_layers_against_model(name, mbr_chain, gpt_chain, reports) -> None:
    g = _chain(name, mbr_chain, gpt_chain)
    rep = reports[name]
    assert rep.virtual_size == g.size
    assert [Path(l.path).name for l in rep.layers] == [p.name for p in reversed(g.layers)]
    assert rep.file_size == sum(os.path.getsize(p) for p in g.layers)
    below = np.zeros(g.size // SECTOR, dtype=bool)
    expected = []
    for d in range(len(g.layers)):  # base first
        present = g.present[d]
        expected.append((int(present.sum()) * SECTOR, int((present & below).sum()) * SECTOR, g.layer_blocks[d],
                         g.layer_zero[d]))
        below |= present
    got = [(l.allocated_bytes, l.shadowed_bytes, l.allocated_blocks, (l.zero_blocks, l.zero_block_bytes))
           for l in reversed(rep.layers)]
    assert got == expected
    assert rep.virtual_allocated_bytes == int(g.allocated().sum()) * SECTOR
    assert rep.allocated_bytes == sum(e[0] for e in expected)
    assert rep.shadowed_bytes == sum(e[1] for e in expected)
    assert rep.zero_block_bytes == sum(e[3][1] for e in expected)
    for l, bs in zip(reversed(rep.layers), g.block_sizes):
        assert l.block_size == bs
        assert l.block_bytes == l.allocated_blocks * bs
        # Footer copy, header (1 KiB), BAT, locators, a sector bitmap per block and the footer; the rest is alignment padding.
        bitmap = -(-(bs // SECTOR // 8) // SECTOR) * SECTOR
        mte = -(-g.size // bs)
        fixed_part = 4 * SECTOR + -(-mte * 4 // SECTOR) * SECTOR
        locators = l.metadata_bytes - fixed_part - l.allocated_blocks * bitmap
        assert (locators == 0) == (l.type == "dynamic") and 0 <= locators <= 3 * 2 * SECTOR
        assert l.metadata_bytes + l.block_bytes + l.other_bytes == l.file_size
        assert l.other_bytes < (l.allocated_blocks + 1) * 4096


@pytest.mark.parametrize("name", ["mbr", "gpt"])
def test_filesystems_against_tools(name, mbr_chain, gpt_chain, reports) -> None:
    """Used bytes as the tools count them; VHD-held, deleted-file and recoverable bytes as the model says."""
    g = _chain(name, mbr_chain, gpt_chain)
    rep = reports[name]
    assert rep.partition_table == g.scheme
    nsec = g.size // SECTOR
    held = g.allocated()
    nonzero = gs.nonzero_sectors(g.content())
    free = gs.free_sectors(g)
    by_offset = {fs.offset: fs for fs in rep.filesystems}
    assert sorted(by_offset) == sorted(p.offset for p in g.parts.values())
    for num, part in g.parts.items():
        fs = by_offset[part.offset]
        assert fs.partition == num
        inside = np.zeros(nsec, dtype=bool)
        inside[part.offset // SECTOR : (part.offset + fs.size) // SECTOR] = True
        assert fs.allocated_bytes == int((held & inside).sum()) * SECTOR, part.kind
        if part.kind in ("swap", "data"):
            assert fs.type == "unknown" and fs.used_bytes == part.size and fs.free_allocated_bytes == 0
            assert any(f"offset {part.offset}" in w and "no recognised file system" in w for w in rep.warnings)
            continue
        assert fs.type == part.kind
        if part.kind.startswith("ext"):
            assert fs.used_bytes == gs.tool_used_bytes(part.kind, part.image, part.size)
        else:
            assert fs.size == part.size
            assert fs.used_bytes == gs.tool_used_bytes(part.kind, part.image, part.size)
        f = free[num]
        assert fs.free_bytes == int((f & inside).sum()) * SECTOR
        assert fs.free_allocated_bytes == int((f & held).sum()) * SECTOR
        assert fs.free_allocated_nonzero_bytes == int((f & held & nonzero).sum()) * SECTOR
        assert fs.free_allocated_zero_bytes == fs.free_allocated_bytes - fs.free_allocated_nonzero_bytes
        assert fs.trusted
    assert rep.used_bytes == sum(fs.used_bytes for fs in rep.filesystems if fs.type != "unknown")
    # The scenario's point: deleted files left data behind in the VHD.
    assert sum(fs.free_allocated_nonzero_bytes for fs in rep.filesystems) > 1 * MiB


@pytest.mark.parametrize("name", ["mbr", "gpt"])
def test_blocks_against_model(name, mbr_chain, gpt_chain, reports) -> None:
    g = _chain(name, mbr_chain, gpt_chain)
    rep = reports[name]
    free = gs.free_sectors(g)
    free_any = np.zeros(g.size // SECTOR, dtype=bool)
    for f in free.values():
        free_any |= f
    m = gs.model_blocks(g, free_any, rep.block_size)
    assert rep.block_size == g.block_sizes[-1]
    assert rep.blocks == {"allocated": int(m["held"].sum()), "zero": int(m["zero"].sum()),
                          "free": int((m["droppable"] & ~m["zero"]).sum()),
                          "kept": int((m["held"] & ~m["droppable"]).sum())}
    assert rep.blocks["free"] > 0 or name == "gpt"
    est = rep.imaging_estimate_seconds
    assert est["now"] == round(rep.file_size / GiB * 120, 1)
    assert est["after_compaction"] == round(rep.compacted_size["full"] / GiB * 120, 1)
    assert rep.reclaimable_bytes == rep.file_size - rep.compacted_size["full"] > 0
    assert rep.compacted_size["quick"] == rep.compacted_size["full"] <= rep.compacted_size["zero"]


def test_block_table(mbr_chain, reports) -> None:
    rep = reports["mbr"]
    rows = rep.block_table
    assert len(rows) == rep.blocks["allocated"]
    assert sum(r["allocated"] for r in rows) == rep.virtual_allocated_bytes
    known = [fs for fs in rep.filesystems if fs.type != "unknown"]
    assert sum(r["free_allocated"] for r in rows) == sum(fs.free_allocated_bytes for fs in known)
    assert sum(r["free_allocated_nonzero"] for r in rows) == sum(fs.free_allocated_nonzero_bytes for fs in known)
    assert {r["compact"] for r in rows} == {"keep", "zero", "free"}
    assert sum(r["compact"] == "keep" for r in rows) == rep.blocks["kept"]
    # Recoverable deleted data, block by block, matches the raw bytes.
    content = mbr_chain.content()
    for r in rows:
        if r["free_allocated_nonzero"]:
            assert content[r["offset"] : r["offset"] + rep.block_size].any()


def test_fixed_disk_same_guest_answer(mbr_chain, reports, tmp_path) -> None:
    """The chain collapsed into a (sparse) fixed VHD: every byte is held, the guest figures are the same, holes
    of the host file are not read."""
    fixed = gs.fixed_copy(mbr_chain)
    seen = []
    rep = vhdcore.growth(fixed, progress=lambda done, total: seen.append((done, total)))
    chain_rep = vhdcore.growth(mbr_chain.leaf, block_size=2 * MiB)
    [layer] = rep.layers
    assert layer.type == "fixed" and layer.allocated_bytes == mbr_chain.size and layer.shadowed_bytes == 0
    assert rep.virtual_allocated_bytes == mbr_chain.size == rep.allocated_bytes
    assert layer.metadata_bytes == 512 and layer.file_size == mbr_chain.size + 512
    assert rep.block_size == 2 * MiB
    assert seen and seen[-1][0] == seen[-1][1] < mbr_chain.size // 2  # only the host file's data was read
    for a, b in zip(rep.filesystems, chain_rep.filesystems):
        assert (a.type, a.offset, a.used_bytes, a.free_allocated_nonzero_bytes) == \
               (b.type, b.offset, b.used_bytes, b.free_allocated_nonzero_bytes)
        if a.type != "unknown":
            assert a.free_allocated_bytes == a.free_bytes  # a fixed disk holds all of the free space
    # Blocks that read as zeros anywhere are dropped, so the compacted disk is the same as from the chain.
    assert rep.compacted_size == chain_rep.compacted_size
    nonzero = gs.nonzero_sectors(mbr_chain.content()).reshape(-1, 2 * MiB // SECTOR).any(axis=1)
    assert layer.zero_blocks == int((~nonzero).sum())


@pytest.mark.parametrize("name", ["ntfs-fixed.vhd", "ntfs-dynamic.vhd", "ntfs-differential.vhd", "ext2.vhd"])
def test_corpus(name, tmp_path) -> None:
    """Windows-made NTFS behind an MBR partition at LBA 128 (fixed, dynamic, differencing) and a bare ext2."""
    gs.ensure_tools()
    path = gs.CORPUS / name
    rep = vhdcore.growth(path)
    raw = tmp_path / "disk.raw"
    vhdcore.convert(path, raw, to="raw")
    [fs] = [f for f in rep.filesystems]
    part = tmp_path / "part.img"
    with open(raw, "rb") as src, open(part, "wb") as dst:
        src.seek(fs.offset)
        dst.write(src.read(fs.size))
    if name.startswith("ntfs"):
        assert rep.partition_table == "mbr" and fs.type == "ntfs" and fs.offset == 128 * SECTOR
        assert fs.used_bytes == gs.tool_used_bytes("ntfs", part, fs.size)
    else:
        assert rep.partition_table == "none" and fs.type == "ext2" and fs.offset == 0
        assert fs.used_bytes == gs.tool_used_bytes("ext2", part, fs.size)
    with vhdcore.open(path) as d:
        assert rep.virtual_allocated_bytes == d.allocated_bytes()
        assert [l.path for l in rep.layers] == [img.path for img in d.layers]
    data = np.fromfile(raw, np.uint8)
    # The VHD holds the file system's free space only where some layer holds it; non-zero per the raw bytes.
    free = np.zeros(len(data) // SECTOR, dtype=bool)
    from vhdcore.guest import analyse
    with vhdcore.open(path) as d:
        g = analyse(d)
        held = np.zeros(len(free), dtype=bool)
        for e in d.allocated_extents():
            held[e.offset // SECTOR : e.end // SECTOR] = True
    free = gs.guest_free_sectors(g.filesystems[0], len(free))
    nonzero = gs.nonzero_sectors(data)
    assert fs.free_allocated_bytes == int((free & held).sum()) * SECTOR
    assert fs.free_allocated_nonzero_bytes == int((free & held & nonzero).sum()) * SECTOR
    if name == "ntfs-differential.vhd":
        child, parent = rep.layers
        assert child.type == "differencing" and 0 < child.shadowed_bytes <= child.allocated_bytes
        assert parent.type == "fixed" and parent.shadowed_bytes == 0


def test_large_virtual_disk_costs_what_it_holds(tmp_path) -> None:
    """100 GiB virtual, a 64 MiB ext4 spanning the start of the disk: the cost follows the data, not the virtual
    size."""
    gs.ensure_tools()
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(gs.content(900 + i, 5_000_000))
    gs.run("mke2fs", "-q", "-F", "-t", "ext4", "-d", src, img)
    gs.run("debugfs", "-w", "-R", "rm /f2", img)
    vhd = tmp_path / "big.vhd"
    data = np.fromfile(img, np.uint8)
    with vhdcore.create(vhd, 100 * GiB) as d:
        chunks = data.reshape(-1, gs.CHUNK)
        for c in np.flatnonzero(chunks.any(axis=1)).tolist():
            d.write(c * gs.CHUNK, memoryview(chunks[c]))
    t = time.perf_counter()
    rep = vhdcore.growth(vhd)
    elapsed = time.perf_counter() - t
    assert elapsed < 3.0, elapsed
    [fs] = rep.filesystems
    assert rep.partition_table == "none" and fs.type == "ext4" and fs.offset == 0
    assert fs.used_bytes == gs.tool_used_bytes("ext4", img, 64 * MiB) and fs.free_allocated_nonzero_bytes >= 4_900_000
    assert rep.virtual_size == 100 * GiB
    assert any("over 40 GB" in w and "virtual disk" in w for w in rep.warnings)
    assert rep.compacted_size["full"] < rep.file_size


def test_vhd_over_the_limit_while_the_file_system_is_under(tmp_path) -> None:
    """A 41 GiB fixed VHD (sparse on the host) holding a small ext4: both documented limits are named."""
    gs.ensure_tools()
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    gs.run("mke2fs", "-q", "-F", "-t", "ext4", img)
    vhd = tmp_path / "big-fixed.vhd"
    with vhdcore.create(vhd, 41 * GiB, type="fixed") as d:
        d.write(0, img.read_bytes())
    t = time.perf_counter()
    rep = vhdcore.growth(vhd)
    assert time.perf_counter() - t < 3.0
    assert rep.file_size == 41 * GiB + 512 and rep.disk_usage_bytes < 64 * MiB
    joined = "\n".join(rep.warnings)
    assert "cannot be built on General Purpose / I/O flavors" in joined
    assert "includes change tracking" in joined and "deleted-file space" in joined
    assert rep.compacted_size["full"] < 64 * MiB
    assert rep.imaging_estimate_seconds["now"] == round((41 * GiB + 512) / GiB * 120, 1)


def test_journal_needing_recovery_is_not_trusted(tmp_path) -> None:
    """An ext4 whose journal needs replaying: its free map may be stale, so compaction must not drop its blocks."""
    img, vhd = gs.ext4_needing_recovery(tmp_path, 48 * MiB, 800, 3_000_000)
    rep = vhdcore.growth(vhd)
    [fs] = rep.filesystems
    assert not fs.trusted and fs.free_allocated_nonzero_bytes >= 2 * MiB  # still reported: the forensic view
    assert any("needs recovery" in w for w in rep.warnings)
    assert rep.blocks["free"] == 0
    assert rep.compacted_size["full"] == rep.compacted_size["zero"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdcore", *args], capture_output=True, text=True)


@pytest.mark.backend_independent
def test_cli(mbr_chain, reports) -> None:
    p = _cli("growth", str(mbr_chain.leaf), "--json", "--progress", "none")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    for key in ("virtual_size", "file_size", "allocated_bytes", "zero_block_bytes", "layers", "filesystems",
                "reclaimable_bytes", "imaging_estimate_seconds"):
        assert key in d
    for l in d["layers"]:
        assert {"path", "allocated_bytes", "shadowed_bytes"} <= set(l)
    for fs in d["filesystems"]:
        assert {"type", "offset", "size", "used_bytes", "free_allocated_bytes", "free_allocated_nonzero_bytes"} <= set(fs)
    assert {"now", "after_compaction"} <= set(d["imaging_estimate_seconds"])
    assert "block_table" not in d
    rep = reports["mbr"].to_dict()
    for key in ("file_size", "allocated_bytes", "reclaimable_bytes", "compacted_size", "blocks"):
        assert d[key] == rep[key]
    p = _cli("growth", str(mbr_chain.leaf), "--json", "--blocks", "--progress", "none")
    assert len(json.loads(p.stdout)["block_table"]) == rep["blocks"]["allocated"]
    p = _cli("growth", str(mbr_chain.leaf), "--progress", "none")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "used by file systems" in lines[2] and "VHD files now" in lines[2] and "after compaction" in lines[2]
    assert lines[3].split()[0] == "size" and lines[4].lstrip().startswith("imaging estimate")
    assert "reclaimable by compaction" in lines[5]
    p = _cli("growth", str(mbr_chain.root / "missing.vhd"))
    assert p.returncode == 1 and p.stderr.count("\n") == 1


@pytest.mark.backend_independent
def test_grid_choices(tmp_path) -> None:
    """The grid is a power of two the disk can be cut into without per-block arrays sized past 4M entries."""
    vhd = tmp_path / "e.vhd"
    vhdcore.create(vhd, 100 * GiB, block_size=512 * 1024).close()
    rep = vhdcore.growth(vhd)
    assert rep.block_size == 512 * 1024 and rep.blocks["allocated"] == 0 and rep.filesystems == []
    assert rep.partition_table == "empty" and rep.compacted_size["full"] < 2 * MiB
    assert vhdcore.growth(vhd, block_size=4 * MiB).block_size == 4 * MiB
    for bad in (4096, 3 * MiB, 512 * MiB):
        with pytest.raises(ValueError, match="block size"):
            vhdcore.growth(vhd, block_size=bad)
    p = _cli("growth", str(vhd), "--block-size", "4K")
    assert p.returncode == 1 and "block size" in p.stderr and p.stderr.count("\n") == 1

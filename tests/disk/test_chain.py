"""Chains: extents through the layers, parent resolution by each locator kind, id checks, depth and cycles."""
from __future__ import annotations

import os
import random
import shutil
import time
import uuid
from pathlib import Path

import pytest

import vhdcore
from vhdcore.disk.chain import MAX_CHAIN_DEPTH
from vhdcore.fileio import atomic_output
from vhdcore.format.layout import write_dynamic_layout
from vhdcore.exceptions import ChainCycleError, ChecksumError, ParentMismatchError, ParentNotFoundError
from vhdcore.disk.image import Image
from vhdcore.format.structs import DiskType
from support.vhdtest import MiB, build_chain

KiB = 1024
S = 512


def make_child(path: Path, parent: Path, locators: list[tuple[bytes, bytes]], name: str = "", *,
               size: int | None = None, block_size: int = 512 * KiB, unique_id: uuid.UUID | None = None) -> None:
    """A differencing child of ``parent`` that names it only the given ways."""
    with Image(parent, "r", strict=False) as p:
        with atomic_output(str(path)) as (fd, _tmp):
            write_dynamic_layout(fd, size or p.size, block_size, disk_type=DiskType.DIFFERENCING, parent=p,
                                 locators=locators, parent_name=name, unique_id=unique_id)


def u16(s: str) -> bytes:
    return s.encode("utf-16-le")


# --------------------------------------------------------------------------------------------- extents


class Owners:
    """Independent model of who holds each sector: the index (creation order) of the topmost layer, or -1."""

    def __init__(self, size: int) -> None:
        self.owner = [-1] * (size // S)

    def wrote(self, layer: int, off: int, n: int) -> None:
        for s in range(off // S, -(-(off + n) // S)):
            self.owner[s] = layer


def mixed_chain(d: Path) -> tuple[list[Path], bytearray, Owners, list[int]]:
    """Base (dynamic, 256 KiB blocks), child (1 MiB blocks), grandchild (128 KiB blocks): different block sizes
    so that extents must split at each holder's own block boundaries."""
    size = 6 * MiB
    rnd = random.Random(42)
    paths = [d / "base.vhd", d / "mid.vhd", d / "leaf.vhd"]
    bss = [256 * KiB, 1 * MiB, 128 * KiB]
    model = bytearray(size)
    owners = Owners(size)
    plan = [
        [(0, 300 * KiB), (2 * MiB + 5, 10), (5 * MiB, 1 * MiB)],
        [(100 * KiB + 3, 2000), (1 * MiB - 512, 1024), (4 * MiB, 600 * KiB), (5 * MiB + 512, 512)],
        [(0, 512), (200 * KiB, 200 * KiB + 1), (4 * MiB + 128 * KiB - 1, 2), (6 * MiB - 1, 1)],
    ]
    for i, (p, bs, writes) in enumerate(zip(paths, bss, plan)):
        disk = (vhdcore.create(p, size, block_size=bs) if i == 0 else
                vhdcore.snapshot(paths[i - 1], p, block_size=bs))
        with disk:
            for off, n in writes:
                data = rnd.randbytes(n)
                disk.write(off, data)
                model[off : off + n] = data
                owners.wrote(i, off, n)  # every disk type holds exactly the written sectors (libvhd's rule)
    return paths, model, owners, bss


def test_extents_of_a_chain(tmp_path: Path) -> None:
    paths, model, owners, bss = mixed_chain(tmp_path)
    depth_of = {2: 0, 1: 1, 0: 2}  # creation index -> depth in disk.layers (leaf first)
    with vhdcore.open(paths[-1]) as d:
        assert [Path(l.path).name for l in d.layers] == ["leaf.vhd", "mid.vhd", "base.vhd"]
        exts = list(d.extents())
        pos = 0
        prev = None
        for e in exts:
            assert e.offset == pos and e.length > 0
            pos = e.end
            if e.layer is None:
                assert e.depth == -1 and e.file_offset == -1
                assert prev is None or prev.layer is not None, "zero runs must be merged"
                assert d.read(e.offset, e.length) == bytes(e.length)
            else:
                assert d.layers[e.depth] is e.layer
                bs = e.layer.block_size
                assert e.offset // bs == (e.end - 1) // bs, f"{e} crosses a block of its layer"
                assert e.layer.pread(e.file_offset, e.length) == model[e.offset : e.end]
            # Every sector of the extent is held by the layer the model says.
            for s in range(e.offset // S, -(-e.end // S)):
                o = owners.owner[s]
                assert (depth_of[o] if o >= 0 else -1) == e.depth, (e, s)
            prev = e
        assert pos == d.size
        # All three layers and zeros appear.
        assert {e.depth for e in exts} == {-1, 0, 1, 2}
        # A sub-range is the clipped version of the full list.
        lo, hi = 150 * KiB + 7, 4 * MiB + 300 * KiB
        sub = list(d.extents(lo, hi - lo))
        assert sub[0].offset == lo and sub[-1].end == hi
        assert sum(e.length for e in sub) == hi - lo
        for e in sub:
            assert d.read(e.offset, e.length) == model[e.offset : e.end]
        assert list(d.extents(d.size, 10)) == [] and list(d.extents(5, 0)) == []
        with pytest.raises(ValueError):
            list(d.extents(-1, 5))
        alloc = list(d.allocated_extents())
        assert all(e.layer is not None for e in alloc)
        assert d.allocated_bytes() == sum(e.length for e in alloc) == sum(
            S for o in owners.owner if o >= 0)
        assert d.read(0, d.size) == model


def test_extents_unallocated_disk_is_one_zero_run(tmp_path: Path) -> None:
    p = tmp_path / "d.vhd"
    vhdcore.create(p, 64 * MiB, block_size=1 * MiB).close()
    c = tmp_path / "c.vhd"
    vhdcore.snapshot(p, c).close()
    with vhdcore.open(c) as d:
        assert list(d.extents()) == [vhdcore.Extent(0, 64 * MiB, None, -1, -1)]
        assert list(d.extents(3, 10)) == [vhdcore.Extent(3, 10, None, -1, -1)]


def test_extents_of_fixed_base(tmp_path: Path) -> None:
    base, child = tmp_path / "f.vhd", tmp_path / "c.vhd"
    with vhdcore.create(base, 2 * MiB, type="fixed") as d:
        d.write(0, b"f" * 2 * MiB)
    with vhdcore.snapshot(base, child, block_size=512 * KiB) as d:
        d.write(512 * KiB + 512, b"c" * 512)
    with vhdcore.open(child) as d:
        exts = [(e.offset, e.length, e.depth) for e in d.extents()]
        # The fixed base is one file region, but the child's block boundaries still split it where the child
        # holds sectors; runs from the fixed base never read as zeros.
        assert (512 * KiB + 512, 512, 0) in exts
        assert all(dep in (0, 1) for _, _, dep in exts)
        assert d.read(512 * KiB, 1536) == b"f" * 512 + b"c" * 512 + b"f" * 512


def test_parent_smaller_than_child_reads_zeros_beyond(tmp_path: Path) -> None:
    base, child = tmp_path / "b.vhd", tmp_path / "c.vhd"
    with vhdcore.create(base, 1 * MiB, block_size=512 * KiB) as d:
        d.write(0, b"b" * MiB)
    make_child(child, base, [(b"W2ru", u16(".\\b.vhd"))], size=2 * MiB)
    with vhdcore.open(child) as d:
        assert d.size == 2 * MiB
        assert d.read(0, 2 * MiB) == b"b" * MiB + bytes(MiB)
        assert [(e.offset, e.length, e.depth) for e in d.extents()] == [(0, 512 * KiB, 1), (512 * KiB, 512 * KiB, 1),
                                                                         (MiB, MiB, -1)]


# --------------------------------------------------------------------------------------------- resolution


@pytest.fixture()
def base_disk(tmp_path: Path) -> tuple[Path, bytes]:
    p = tmp_path / "base.vhd"
    data = random.Random(5).randbytes(1 * MiB)
    with vhdcore.create(p, 1 * MiB, block_size=512 * KiB) as d:
        d.write(0, data)
    return p, data


@pytest.mark.parametrize("kind", ["W2ru", "W2ru-plain", "MacX-relative", "MacX-absolute", "W2ku", "Wi2r", "name",
                                  "name-windows-path"])
def test_parent_found_by_each_locator_kind(tmp_path: Path, base_disk, kind: str) -> None:
    base, data = base_disk
    locs = {
        "W2ru": [(b"W2ru", u16(".\\base.vhd"))],
        "W2ru-plain": [(b"W2ru", u16("base.vhd"))],
        "MacX-relative": [(b"MacX", b"file://./base.vhd")],
        "MacX-absolute": [(b"MacX", f"file://{base}".encode())],
        "W2ku": [(b"W2ku", u16("D:\\Hyper-V\\Disks\\base.vhd"))],
        "Wi2r": [(b"Wi2r", b".\\base.vhd")],
        "name": [],
        "name-windows-path": [],
    }[kind]
    name = {"name": "base.vhd", "name-windows-path": "C:\\VMs\\base.vhd"}.get(kind, "")
    child = tmp_path / "child.vhd"
    make_child(child, base, locs, name)
    with vhdcore.open(child) as d:
        assert d.layers[1].path == str(base.resolve())
        assert d.read(0, MiB) == data


def test_locator_order_relative_first(tmp_path: Path, base_disk) -> None:
    """W2ru is tried before W2ku: a stale absolute path to another disk does not matter."""
    base, data = base_disk
    decoy_dir = tmp_path / "old"
    decoy_dir.mkdir()
    vhdcore.create(decoy_dir / "base.vhd", 1 * MiB).close()
    child = tmp_path / "child.vhd"
    make_child(child, base, [(b"W2ku", u16(str(decoy_dir / "base.vhd"))), (b"W2ru", u16(".\\base.vhd"))])
    with vhdcore.open(child, parent_dirs=[decoy_dir]) as d:
        assert d.layers[1].path == str(base.resolve())
    # A relative locator that misses, then a name that hits.
    child2 = tmp_path / "child2.vhd"
    make_child(child2, base, [(b"W2ru", u16(".\\gone.vhd")), (b"MacX", b"file://./gone2.vhd")], "base.vhd")
    with vhdcore.open(child2) as d:
        assert d.read(0, MiB) == data


def test_parent_in_other_directory_needs_parent_dirs(tmp_path: Path) -> None:
    pd, cd = tmp_path / "parents", tmp_path / "children"
    pd.mkdir()
    cd.mkdir()
    with vhdcore.create(pd / "base.vhd", 1 * MiB) as d:
        d.write(0, b"p" * 4096)
    vhdcore.snapshot(pd / "base.vhd", cd / "child.vhd").close()
    # Locators say ..\parents\base.vhd; outside the child's directory, so refused unless allowed.
    with pytest.raises(ParentNotFoundError) as ei:
        vhdcore.open(cd / "child.vhd")
    e = ei.value
    assert e.tried and any("outside the allowed directories" in t for t in e.tried)
    assert e.path == str(cd / "child.vhd") and e.field == "header.parent_unicode_name"
    assert isinstance(e, FileNotFoundError)
    with vhdcore.open(cd / "child.vhd", parent_dirs=[pd]) as d:
        assert d.read(0, 4096) == b"p" * 4096
    # The parent moved into a directory the caller names: found by its file name there.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(pd / "base.vhd", moved / "base.vhd")
    with vhdcore.open(cd / "child.vhd", parent_dirs=[moved]) as d:
        assert d.layers[1].path == str((moved / "base.vhd").resolve())


def test_snapshot_into_a_subdirectory_opens_without_parent_dir(tmp_path: Path) -> None:
    """`snapshot c2.vhd sub/c3.vhd` then `info sub/c3.vhd`: the locator only climbs (..\\c2.vhd), so it is
    followed, and so is c2's own parent beside it; two levels down as well. The CLI prints no error."""
    import subprocess
    import sys

    paths, model = build_chain(tmp_path, 2, size=2 * MiB, writes=5)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    vhdcore.snapshot(paths[-1], tmp_path / "sub" / "c3.vhd").close()
    vhdcore.snapshot(tmp_path / "sub" / "c3.vhd", tmp_path / "sub" / "deeper" / "c4.vhd").close()
    vhdcore.snapshot(paths[0], tmp_path / "sub" / "deeper" / "from-base.vhd").close()
    for leaf, depth in (("sub/c3.vhd", 3), ("sub/deeper/c4.vhd", 4), ("sub/deeper/from-base.vhd", 2)):
        with vhdcore.open(tmp_path / leaf) as d:
            assert len(d.layers) == depth
            if depth > 2:
                assert d.read(0, d.size) == bytes(model)
        r = subprocess.run([sys.executable, "-m", "vhdcore", "info", leaf], cwd=tmp_path, capture_output=True,
                           text=True)
        assert r.returncode == 0 and r.stderr == "", r.stderr


def test_parent_not_found_says_what_to_do(tmp_path: Path) -> None:
    """A parent in a sibling directory still needs --parent-dir, and the message says so."""
    import subprocess
    import sys

    (tmp_path / "parents").mkdir()
    (tmp_path / "children").mkdir()
    vhdcore.create(tmp_path / "parents" / "base.vhd", 1 * MiB).close()
    vhdcore.snapshot(tmp_path / "parents" / "base.vhd", tmp_path / "children" / "c.vhd").close()
    r = subprocess.run([sys.executable, "-m", "vhdcore", "info", str(tmp_path / "children" / "c.vhd")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "--parent-dir DIR" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "vhdcore", "info", str(tmp_path / "children" / "c.vhd"),
                        "--parent-dir", str(tmp_path / "parents")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_parent_mismatch(tmp_path: Path, base_disk) -> None:
    base, _ = base_disk
    child = tmp_path / "child.vhd"
    vhdcore.snapshot(base, child).close()
    os.replace(base, tmp_path / "orig.vhd")
    vhdcore.create(base, 1 * MiB).close()  # same name, new unique id
    with pytest.raises(ParentMismatchError) as ei:
        vhdcore.open(child)
    assert ei.value.field == "header.parent_unique_id" and ei.value.offset == 512 + 40
    os.replace(tmp_path / "orig.vhd", base)
    vhdcore.open(child).close()


def test_parent_timestamp_mismatch_is_a_warning(tmp_path: Path, base_disk) -> None:
    base, _ = base_disk
    t = time.time() - 7200  # the parent's mtime, recorded by the snapshot, differs from its footer timestamp
    os.utime(base, (t, t))
    child = tmp_path / "child.vhd"
    vhdcore.snapshot(base, child).close()
    with vhdcore.open(child) as d:
        assert not d.warnings
    t = time.time() + 3600
    os.utime(base, (t, t))
    with vhdcore.open(child) as d:
        assert any("timestamp" in w for w in d.warnings)


def test_missing_parent(tmp_path: Path, base_disk) -> None:
    base, _ = base_disk
    child = tmp_path / "child.vhd"
    vhdcore.snapshot(base, child).close()
    base.unlink()
    with pytest.raises(ParentNotFoundError) as ei:
        vhdcore.open(child)
    assert len(ei.value.tried) >= 1 and "not found" in str(ei.value)


# --------------------------------------------------------------------------------------------- corpus chains


def test_corpus_windows_differencing(corpus_dir: Path, tmp_path: Path) -> None:
    """W2ru .\\ntfs-parent.vhd resolves beside the child; W2ku C:\\Projects\\... is not needed."""
    for n in ("ntfs-differential.vhd", "ntfs-parent.vhd"):
        shutil.copy(corpus_dir / "dfvfs" / n, tmp_path / n)
    with vhdcore.open(tmp_path / "ntfs-differential.vhd") as d:
        assert len(d.layers) == 2 and d.layers[1].path == str((tmp_path / "ntfs-parent.vhd").resolve())
        assert d.layers[1].is_fixed
        # The child holds some sectors, the fixed parent the rest: both appear in the map.
        assert {e.depth for e in d.extents()} == {0, 1}


def test_corpus_name_only_parent_bad_checksum(corpus_dir: Path) -> None:
    child = corpus_dir / "dfvfs" / "image-differential.vhd"
    with pytest.raises(ChecksumError):
        vhdcore.open(child)
    with vhdcore.open(child, strict=False) as d:
        assert d.layers[0].parent_candidates() == [("name", "image.vhd")]
        assert Path(d.layers[1].path).name == "image.vhd"
        assert any("checksum" in w for w in d.warnings)


# --------------------------------------------------------------------------------------------- limits


def test_chain_depth_limit(tmp_path: Path) -> None:
    """MAX_CHAIN_DEPTH layers open; one more is refused (made by hand: snapshot would reopen the chain each time)."""
    prev = tmp_path / "l0.vhd"
    vhdcore.create(prev, 1 * MiB, block_size=512 * KiB).close()
    paths = [prev]
    for i in range(1, MAX_CHAIN_DEPTH + 1):
        p = tmp_path / f"l{i}.vhd"
        make_child(p, prev, [(b"W2ru", u16(f".\\l{i - 1}.vhd"))])
        paths.append(p)
        prev = p
    with vhdcore.open(paths[MAX_CHAIN_DEPTH - 1]) as d:
        assert len(d.layers) == MAX_CHAIN_DEPTH
    with pytest.raises(ChainCycleError) as ei:
        vhdcore.open(paths[MAX_CHAIN_DEPTH])
    assert ei.value.field == "chain depth"


def test_cycle_detection(tmp_path: Path) -> None:
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    vhdcore.create(a, 1 * MiB, block_size=512 * KiB).close()
    with Image(a) as img:
        a_id = img.unique_id
    make_child(b, a, [(b"W2ru", u16(".\\a.vhd"))])
    # a becomes a child of b while keeping its unique id: a -> b -> a.
    make_child(a, b, [(b"W2ru", u16(".\\b.vhd"))], unique_id=a_id)
    with pytest.raises(ChainCycleError) as ei:
        vhdcore.open(b)
    assert "loops" in str(ei.value)
    # A disk that names itself.
    c = tmp_path / "c.vhd"
    vhdcore.create(c, 1 * MiB).close()
    with Image(c) as img:
        c_id = img.unique_id
    tmp = tmp_path / "c2.vhd"
    make_child(tmp, c, [(b"W2ru", u16(".\\c.vhd"))], unique_id=c_id)
    os.replace(tmp, c)
    with pytest.raises(ChainCycleError):
        vhdcore.open(c)


def test_build_chain_helper_round_trip(tmp_path: Path) -> None:
    """The shared helper's model is what a reopened chain reads, at every depth."""
    for depth in (1, 2, 4):
        sub = tmp_path / str(depth)
        sub.mkdir()
        paths, model = build_chain(sub, depth=depth, writes=10, seed=depth)
        with vhdcore.open(paths[-1]) as d:
            assert len(d.layers) == depth and d.read(0, d.size) == model

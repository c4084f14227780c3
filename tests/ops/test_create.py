"""Creating fixed and dynamic disks and differencing children: the bytes on disk, the recorded parent, refusals."""
from __future__ import annotations

import os
import struct
import time
import uuid
from pathlib import Path

import pytest

import vhdcore
from vhdcore.format.layout import MAX_CREATE_SIZE
from vhdcore.format.locators import parent_locators_for
from vhdcore.format.geometry import chs_from_size, vhd_timestamp
from vhdcore.disk.image import Image
from vhdcore.format.structs import DiskType, DynamicHeader, Footer
from support.vhdtest import MiB

KiB = 1024
GiB = 1024 * MiB


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("size,block_size", [(10 * MiB, 2 * MiB), (3 * MiB + 512, 2 * MiB), (1 * MiB, 512),
                                             (64 * MiB, 64 * MiB), (4 * GiB, 4 * MiB)])
def test_create_dynamic_layout(tmp_path: Path, size: int, block_size: int) -> None:
    p = tmp_path / "d.vhd"
    before = vhd_timestamp()
    vhdcore.create(p, size, block_size=block_size).close()
    raw = p.read_bytes()
    mte = -(-size // block_size)
    bat_bytes = -(-mte * 4 // 512) * 512
    assert len(raw) == 512 + 1024 + bat_bytes + 512
    assert raw[:512] == raw[-512:]
    f = Footer.parse(raw[-512:])
    assert f.type == DiskType.DYNAMIC and f.current_size == f.original_size == size and f.data_offset == 512
    assert f.creator_app == b"qem2" and f.features == 2 and f.saved_state == 0
    assert before <= f.timestamp <= vhd_timestamp() + 1
    g = chs_from_size(size)
    assert f.geometry == g.pack()  # the spec's CHS: libvhd rejects a larger one (qemu trusts creator qem2)
    h = DynamicHeader.parse(raw[512:1536])
    assert (h.table_offset, h.max_table_entries, h.block_size) == (1536, mte, block_size)
    assert h.data_offset == 0xFFFFFFFFFFFFFFFF and h.parent_unique_id == uuid.UUID(int=0)
    assert raw[1536 : 1536 + bat_bytes] == b"\xff" * bat_bytes
    with vhdcore.open(p) as d:
        assert d.size == size and d.leaf.is_dynamic and list(d.extents()) == [vhdcore.Extent(0, size, None, -1, -1)]
    assert leftovers(tmp_path) == []


@pytest.mark.backend_independent
def test_create_fixed_is_sparse(tmp_path: Path) -> None:
    p = tmp_path / "f.vhd"
    vhdcore.create(p, 256 * MiB, type="fixed").close()
    st = p.stat()
    assert st.st_size == 256 * MiB + 512
    assert st.st_blocks * 512 < 1 * MiB  # the data area is a hole
    f = Footer.parse(p.read_bytes()[-512:])
    assert f.type == DiskType.FIXED and f.data_offset == 0xFFFFFFFFFFFFFFFF and f.current_size == 256 * MiB
    with vhdcore.open(p) as d:
        assert d.leaf.is_fixed and d.read(100 * MiB, 4096) == bytes(4096)


def test_unique_ids_differ(tmp_path: Path) -> None:
    ids = set()
    for i in range(5):
        with vhdcore.create(tmp_path / f"{i}.vhd", 1 * MiB) as d:
            ids.add(d.leaf.unique_id)
    assert len(ids) == 5


@pytest.mark.backend_independent
@pytest.mark.parametrize("kw", [dict(size=0), dict(size=1000), dict(size=-512), dict(size=MAX_CREATE_SIZE + 512),
                                dict(size=1 * MiB, block_size=3 * 512), dict(size=1 * MiB, block_size=256),
                                dict(size=1 * MiB, block_size=512 * MiB), dict(size=1 * MiB, type="differencing"),
                                dict(size=1.5 * MiB)])
def test_create_refuses(tmp_path: Path, kw: dict) -> None:
    with pytest.raises(ValueError):
        vhdcore.create(tmp_path / "x.vhd", **kw)
    assert list(tmp_path.iterdir()) == []


def test_create_largest(tmp_path: Path) -> None:
    with vhdcore.create(tmp_path / "big.vhd", MAX_CREATE_SIZE) as d:
        assert d.size == 2040 * GiB and d.leaf.max_table_entries == 2040 * 512


def test_snapshot_records_parent(tmp_path: Path) -> None:
    sub = tmp_path / "disks"
    sub.mkdir()
    base = sub / "base.vhd"
    with vhdcore.create(base, 8 * MiB, block_size=1 * MiB) as d:
        d.write(0, b"b" * 4096)
        base_id = d.leaf.unique_id
    t = time.time() - 5000
    os.utime(base, (t, t))
    child = sub / "child.vhd"
    with vhdcore.snapshot(base, child) as d:
        img = d.leaf
        assert img.is_differencing and len(d.layers) == 2 and not d.layers[1].writable and img.writable
        assert img.block_size == 1 * MiB  # the parent's
        h = img.header
        assert h.parent_unique_id == base_id
        assert h.parent_timestamp == vhd_timestamp(t)  # the parent file's mtime, as blktap records it
        assert h.parent_unicode_name == "base.vhd"
        cands = dict(img.parent_candidates())
        assert cands["W2ru"] == ".\\base.vhd"
        assert cands["MacX"] == "file://./base.vhd"
        assert cands["W2ku"] == ".\\base.vhd"  # relative in every locator, as libvhd writes them
        assert [src for src, _ in img.parent_candidates()] == ["MacX", "W2ku", "W2ru", "name"]
        for loc in img.parent_locators:
            assert loc.data_offset >= 1536 + 512 and loc.data_offset % 512 == 0
            assert loc.data_space_bytes >= loc.data_length and loc.data_space % 512 == 0
        assert d.read(0, 4096) == b"b" * 4096
        assert img.footer.current_size == 8 * MiB and img.footer.creator_app == b"qem2"
        assert img.unique_id != base_id
    # The parent was opened read-only and is unchanged by the snapshot.
    assert os.stat(base).st_mtime == pytest.approx(t, abs=1)
    # A snapshot of a snapshot.
    grand = sub / "grand.vhd"
    with vhdcore.snapshot(child, grand) as d:
        assert len(d.layers) == 3 and d.leaf.header.parent_unique_id == d.layers[1].unique_id


def test_snapshot_locators_across_directories(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    base = tmp_path / "a" / "deep" / "base.vhd"
    vhdcore.create(base, 1 * MiB).close()
    name, locs = parent_locators_for(str(base), str(tmp_path / "a" / "child.vhd"))
    assert name == "base.vhd"  # the file name, as libvhd records it
    assert dict(locs)[b"W2ru"].decode("utf-16-le") == ".\\deep\\base.vhd"  # the locators carry the path
    assert dict(locs)[b"MacX"] == b"file://./deep/base.vhd"
    with vhdcore.snapshot(base, tmp_path / "a" / "child.vhd") as d:
        assert d.layers[1].path == str(base.resolve())
    with vhdcore.open(tmp_path / "a" / "child.vhd") as d:  # a sub-directory of the child's: allowed
        assert len(d.layers) == 2
    with vhdcore.snapshot(base, tmp_path / "b" / "child.vhd") as d:
        cands = dict(d.leaf.parent_candidates())
        assert cands["W2ru"] == cands["W2ku"] == ".\\..\\a\\deep\\base.vhd"
        assert cands["MacX"] == "file://../a/deep/base.vhd"  # libvhd's form


def test_snapshot_of_fixed_parent_and_block_size(tmp_path: Path) -> None:
    base = tmp_path / "f.vhd"
    with vhdcore.create(base, 5 * MiB, type="fixed") as d:
        d.write(0, b"F" * 5 * MiB)
    with vhdcore.snapshot(base, tmp_path / "c.vhd") as d:
        assert d.leaf.block_size == 2 * MiB
        d.write(3, b"c")
    with vhdcore.snapshot(base, tmp_path / "c2.vhd", block_size=4096) as d:
        assert d.leaf.block_size == 4096 and d.leaf.max_table_entries == 5 * 256
        assert d.read(0, 5 * MiB) == b"F" * 5 * MiB


def test_snapshot_refuses(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    vhdcore.create(base, 1 * MiB).close()
    child = tmp_path / "child.vhd"
    vhdcore.snapshot(base, child).close()
    before = child.read_bytes()
    with pytest.raises(FileExistsError):
        vhdcore.snapshot(base, child)
    assert child.read_bytes() == before
    with pytest.raises(FileNotFoundError):
        vhdcore.snapshot(tmp_path / "nope.vhd", tmp_path / "c3.vhd")
    # A parent whose own parent is missing: refused before anything is written.
    (tmp_path / "base.vhd").unlink()
    with pytest.raises(vhdcore.ParentNotFoundError):
        vhdcore.snapshot(child, tmp_path / "c4.vhd")
    assert not (tmp_path / "c4.vhd").exists() and leftovers(tmp_path) == []


def test_created_files_pass_footer_checks_of_a_second_reader(tmp_path: Path) -> None:
    """Checksums written by vhdcore verify with an independent byte sum."""
    p = tmp_path / "d.vhd"
    with vhdcore.create(p, 3 * MiB) as d:
        d.write(MiB, b"x")
    c = tmp_path / "c.vhd"
    vhdcore.snapshot(p, c).close()
    for path in (p, c):
        raw = path.read_bytes()
        for off, size, field in ((0, 512, 64), (len(raw) - 512, 512, 64), (512, 1024, 36)):
            blob = raw[off : off + size]
            total = sum(blob) - sum(blob[field : field + 4])
            assert struct.unpack_from(">I", blob, field)[0] == (~total) & 0xFFFFFFFF
        with Image(path) as img:
            assert img.footer_source == "end"

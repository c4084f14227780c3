"""convert: a chain collapsed into one raw, fixed or dynamic file with the same virtual content, zeros skipped."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

import vhdcore
from vhdcore.disk.extents import data_blocks
from support.vhdtest import MiB, build_chain, qemu_raw

KiB = 1024


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """(start, end) of the non-hole ranges of a file, from SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def nonzero_blocks(model: bytes | bytearray, bs: int) -> list[int]:
    return [b for b in range(-(-len(model) // bs)) if any(model[b * bs : (b + 1) * bs])]


@pytest.fixture()
def chain(tmp_path: Path) -> tuple[list[Path], bytearray]:
    paths, model = build_chain(tmp_path, depth=3, size=12 * MiB, block_size=512 * KiB, writes=25, seed=3)
    # A block written only with zeros in the leaf over data in the base, and a zero block nowhere else.
    with vhdcore.open(paths[-1], "r+") as d:
        d.write(10 * MiB, bytes(512 * KiB))
        model[10 * MiB : 10 * MiB + 512 * KiB] = bytes(512 * KiB)
    return paths, model


def test_to_raw(tmp_path: Path, chain) -> None:
    paths, model = chain
    out = tmp_path / "out.raw"
    seen = []
    rep = vhdcore.convert(paths[-1], out, to="raw", progress=lambda done, total: seen.append((done, total)))
    assert out.read_bytes() == model
    assert rep.to == "raw" and rep.virtual_size == len(model) and rep.file_size == len(model)
    with vhdcore.open(paths[-1]) as d:
        assert rep.bytes_read == d.allocated_bytes()
    assert rep.bytes_written + rep.zero_bytes_skipped == rep.bytes_read
    assert rep.zero_bytes_skipped >= 512 * KiB
    # Sparse: every data range of the output overlaps something non-zero in the model... and the holes read as zero.
    ranges = data_ranges(out)
    with vhdcore.open(paths[-1]) as d:
        nexts = sum(1 for _ in d.allocated_extents())
    # Page granularity: each written run may round out to whole 4 KiB pages at both ends.
    assert sum(e - s for s, e in ranges) <= rep.bytes_written + 8 * KiB * nexts
    assert sum(e - s for s, e in ranges) < len(model) - rep.zero_bytes_skipped
    assert seen and seen[-1][0] == seen[-1][1] and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert rep.source == str(paths[-1]) and rep.destination == str(out) and rep.seconds >= 0


def test_to_fixed(tmp_path: Path, chain) -> None:
    paths, model = chain
    out = tmp_path / "out.vhd"
    rep = vhdcore.convert(paths[-1], out, to="fixed")
    assert rep.file_size == len(model) + 512
    with vhdcore.open(out) as d:
        assert d.leaf.is_fixed and d.read(0, d.size) == model
    assert qemu_raw(out, tmp_path / "q.raw").read_bytes() == model


@pytest.mark.parametrize("block_size", [None, 64 * KiB, 2 * MiB, 4 * MiB])
def test_to_dynamic(tmp_path: Path, chain, block_size) -> None:
    paths, model = chain
    out = tmp_path / "out.vhd"
    rep = vhdcore.convert(paths[-1], out, to="dynamic", block_size=block_size)
    bs = block_size or 512 * KiB
    with vhdcore.open(out) as d:
        img = d.leaf
        assert img.is_dynamic and img.block_size == bs and d.size == len(model)
        assert d.read(0, d.size) == model
        # Only blocks holding non-zero data are allocated; zero blocks of the source were skipped.
        assert list(img.allocated_blocks()) == nonzero_blocks(model, bs)
        assert rep.blocks_written == len(nonzero_blocks(model, bs))
        # Blocks are laid out in order, data page-aligned, file ends with the footer after the last block.
        offs = [img.block_file_offset(b) for b in img.allocated_blocks()]
        assert offs == sorted(offs) and all(o % 4096 == 0 for o in offs)
        assert out.stat().st_size == offs[-1] + bs + 512
    assert out.read_bytes()[:512] == out.read_bytes()[-512:]
    if bs == 2 * MiB:  # qemu-img reads dynamic VHDs of any block size, but checks 2 MiB ones most
        assert qemu_raw(out, tmp_path / "q.raw").read_bytes() == model


def test_dynamic_round_trip_through_convert(tmp_path: Path, chain) -> None:
    """dynamic -> fixed -> dynamic -> raw keeps the bytes (a fixed source has one extent per disk)."""
    paths, model = chain
    a, b, c = tmp_path / "a.vhd", tmp_path / "b.vhd", tmp_path / "c.raw"
    vhdcore.convert(paths[-1], a, to="fixed")
    rep = vhdcore.convert(a, b, to="dynamic", block_size=1 * MiB)
    assert rep.bytes_read == len(model)  # a fixed disk holds every byte
    vhdcore.convert(b, c, to="raw")
    assert c.read_bytes() == model


def test_data_blocks(tmp_path: Path) -> None:
    p = tmp_path / "d.vhd"
    with vhdcore.create(p, 16 * MiB, block_size=256 * KiB) as d:
        for off in (0, 3 * MiB - 1, 5 * MiB + 7, 15 * MiB):
            d.write(off, b"xy")
        # With 1 MiB output blocks: 0, 2 and 3 (a write across 3 MiB), 5, 15.
        assert list(data_blocks(d, 1 * MiB)) == [0, 2, 3, 5, 15]
        # Smaller output blocks: only those holding written sectors (a sector whose bitmap bit is clear is not
        # held, in a dynamic disk too), although the 256 KiB source blocks around them are allocated.
        src_blocks = [int(b) for b in d.leaf.allocated_blocks()]
        assert src_blocks == [0, 11, 12, 20, 60]
        assert list(data_blocks(d, 64 * KiB)) == [0, 47, 48, 80, 240]


def test_output_is_atomic_and_refusals(tmp_path: Path, chain) -> None:
    paths, _ = chain
    out = tmp_path / "out.vhd"
    with pytest.raises(ValueError):
        vhdcore.convert(paths[-1], out, to="vhdx")
    with pytest.raises(ValueError):
        vhdcore.convert(paths[-1], out, to="dynamic", block_size=3000)
    os.rename(paths[0], tmp_path / "hidden")
    with pytest.raises(vhdcore.ParentNotFoundError):
        vhdcore.convert(paths[-1], out, to="raw")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # An existing destination is refused without overwrite, and with it replaced whole, never partly overwritten.
    os.rename(tmp_path / "hidden", paths[0])
    out.write_bytes(b"old" * 1000)
    with pytest.raises(FileExistsError, match="--overwrite"):
        vhdcore.convert(paths[0], out, to="dynamic")
    assert out.read_bytes() == b"old" * 1000
    vhdcore.convert(paths[0], out, to="dynamic", overwrite=True)
    with vhdcore.open(out):
        pass


def test_convert_single_file_and_corpus_differencing(tmp_path: Path, corpus_dir: Path) -> None:
    src = corpus_dir / "dfvfs" / "ntfs-differential.vhd"
    out = tmp_path / "n.vhd"
    vhdcore.convert(src, out, to="dynamic")
    with vhdcore.open(src) as a, vhdcore.open(out) as b:
        assert a.read(0, a.size) == b.read(0, b.size)
        assert len(b.layers) == 1 and b.leaf.block_size == 2 * MiB


def test_convert_partial_last_block(tmp_path: Path) -> None:
    """A virtual size that is not a multiple of the block size: the last block is short in the disk."""
    size = 3 * MiB + 1536
    p = tmp_path / "d.vhd"
    rnd = random.Random(8)
    model = bytearray(size)
    with vhdcore.create(p, size, block_size=2 * MiB) as d:
        tail = rnd.randbytes(3000)
        d.write(size - 3000, tail)
        model[size - 3000 :] = tail
    for to in ("raw", "fixed", "dynamic"):
        out = tmp_path / f"o.{to}"
        vhdcore.convert(p, out, to=to, block_size=1 * MiB if to == "dynamic" else None)
        if to == "raw":
            assert out.read_bytes() == model
        else:
            with vhdcore.open(out) as d:
                assert d.size == size and d.read(0, size) == model
    assert np.frombuffer(qemu_raw(tmp_path / "o.fixed", tmp_path / "q.raw").read_bytes(), np.uint8).size == size


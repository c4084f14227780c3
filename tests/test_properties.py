"""Property tests: random writes through chains of depth 1-4 against an in-memory model.

Hypothesis picks the virtual size (not always a multiple of the block size), per-layer block sizes (512 B to
4 MiB), the base type and writes at any byte offset and length; the chain is reopened and compared byte for
byte, its extents are checked against the model, and it is converted to a dynamic disk and compared again.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdcore

KiB = 1024
# Hundreds of tiny chains: on tmpfs the fsyncs of create/snapshot/convert cost nothing (the logic is the subject).
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
BLOCK_SIZES = [512, 4 * KiB, 64 * KiB, 128 * KiB, 512 * KiB, 1024 * KiB, 4096 * KiB]


@st.composite
def writes_for(draw, size: int) -> list[tuple[int, bytes]]:
    out = []
    for _ in range(draw(st.integers(0, 6))):
        n = draw(st.integers(1, min(size, 300 * KiB)))
        off = draw(st.integers(0, size - n))
        kind = draw(st.sampled_from(["random", "zeros", "pattern"]))
        if kind == "zeros":
            data = bytes(n)
        elif kind == "pattern":
            data = bytes([draw(st.integers(1, 255))]) * n
        else:
            data = draw(st.binary(min_size=min(n, 64), max_size=min(n, 64))) * (n // 64 + 1)
            data = data[:n] if data else bytes(n)
        out.append((off, data))
    return out


@st.composite
def scenarios(draw):
    size = draw(st.integers(1, 2048 * 2 * 3)) * 512  # up to 6 MiB, any whole number of sectors
    depth = draw(st.integers(1, 4))
    base_type = draw(st.sampled_from(["dynamic", "dynamic", "fixed"]))
    block_sizes = [draw(st.sampled_from(BLOCK_SIZES)) for _ in range(depth)]
    layers = [draw(writes_for(size)) for _ in range(depth)]
    reopen_writes = draw(writes_for(size))
    out_bs = draw(st.sampled_from(BLOCK_SIZES))
    return size, base_type, block_sizes, layers, reopen_writes, out_bs


def check_extents(disk: vhdcore.Disk, model: bytearray) -> None:
    pos = 0
    last_zero = False
    for e in disk.extents():
        assert e.offset == pos and e.length > 0
        if e.layer is None:
            assert not last_zero
            assert not any(model[e.offset : e.end])
        else:
            bs = e.layer.block_size
            if bs:
                assert e.offset // bs == (e.end - 1) // bs
            assert e.layer.pread(e.file_offset, e.length) == model[e.offset : e.end]
        last_zero = e.layer is None
        pos = e.end
    assert pos == disk.size


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_random_writes_through_chains(scenario) -> None:
    size, base_type, block_sizes, layers, reopen_writes, out_bs = scenario
    with tempfile.TemporaryDirectory(dir=SCRATCH) as td:
        d = Path(td)
        model = bytearray(size)
        paths: list[Path] = []
        for i, (bs, writes) in enumerate(zip(block_sizes, layers)):
            p = d / f"l{i}.vhd"
            disk = (vhdcore.create(p, size, type=base_type, block_size=bs) if i == 0 else
                    vhdcore.snapshot(paths[-1], p, block_size=bs))
            with disk:
                for off, data in writes:
                    disk.write(off, data)
                    model[off : off + len(data)] = data
                assert disk.read(0, size) == model
            paths.append(p)
        # Reopened from the files alone: same bytes, extents agree with the model.
        with vhdcore.open(paths[-1]) as disk:
            assert len(disk.layers) == len(paths)
            assert disk.read(0, size) == model
            check_extents(disk, model)
        # Writes in a later session land on the leaf and persist.
        with vhdcore.open(paths[-1], "r+") as disk:
            for off, data in reopen_writes:
                disk.write(off, data)
                model[off : off + len(data)] = data
        with vhdcore.open(paths[-1]) as disk:
            assert disk.read(0, size) == model
        # Lower layers never change when a child is written.
        for i, p in enumerate(paths[:-1]):
            with vhdcore.open(p) as disk:
                assert len(disk.layers) == i + 1
        out = d / "out.vhd"
        if size >= out_bs or out_bs <= 512 * KiB:
            vhdcore.convert(paths[-1], out, to="dynamic", block_size=out_bs)
            with vhdcore.open(out) as disk:
                assert disk.read(0, size) == model
                assert all(any(model[int(b) * out_bs : (int(b) + 1) * out_bs]) for b in disk.leaf.allocated_blocks())


@settings(max_examples=150, deadline=None)
@given(size_sectors=st.integers(1, 64), bs=st.sampled_from([512, 1024, 4096]),
       reads=st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 40_000)), max_size=8))
def test_reads_at_any_offset(size_sectors: int, bs: int, reads) -> None:
    """read/readinto of any range (including past the end) of a small two-layer chain match the model."""
    size = size_sectors * 512
    with tempfile.TemporaryDirectory(dir=SCRATCH) as td:
        base, child = Path(td) / "b.vhd", Path(td) / "c.vhd"
        model = bytearray(size)
        with vhdcore.create(base, size, block_size=bs) as disk:
            data = bytes((i * 7) % 251 + 1 for i in range(size // 2))
            disk.write(size // 4, data)
            model[size // 4 : size // 4 + len(data)] = data
        with vhdcore.snapshot(base, child) as disk:
            disk.write(size // 3, b"\xff" * (size // 5))
            model[size // 3 : size // 3 + size // 5] = b"\xff" * (size // 5)
        with vhdcore.open(child) as disk:
            for off, n in reads:
                assert disk.read(off, n) == model[off : off + n]
                buf = bytearray(n)
                got = disk.readinto(off, buf)
                assert got == len(model[off : off + n]) and buf[:got] == model[off : off + n]

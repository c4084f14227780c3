"""vhdcore resize: judged by vhd-util (check, read -r), qemu-img (fixed, dynamic) and a byte model; a crash at
every write is followed by a rerun that finishes."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdcore
from vhdcore.exceptions import UnsafeOperationError
from vhdcore.format.geometry import chs_from_size
from vhdcore.ops.resize import journal_path, resize
from support.vhdtest import MiB, faulted, qemu_raw, vhd_util, vhd_util_path, vhd_util_read, vhdcore_cli


KiB = 1024
needs_vhd_util = pytest.mark.skipif(vhd_util_path() is None, reason="VHD_UTIL (libvhd's vhd-util) not set")
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def chs_exact(n: int) -> int:
    """A size near ``n`` that a CHS geometry describes exactly (vhd-util check wants the spec's geometry)."""
    s = chs_from_size(n).size
    assert chs_from_size(s).size == s
    return s


def content(path: Path, **kw) -> bytes:
    with vhdcore.open(path, **kw) as d:
        return d.read(0, d.size)


def clean(path: Path, **kw) -> bool:
    rep = vhdcore.check(path, **kw)
    return rep.clean


def write(path: Path, model: bytearray, off: int, data: bytes, **kw) -> None:
    with vhdcore.open(path, "r+", **kw) as d:
        d.write(off, data)
    model[off : off + len(data)] = data


def grown(model: bytearray, size: int) -> bytearray:
    return model[:size] + bytearray(max(0, size - len(model)))


@needs_vhd_util
def test_vhd_util_disk_grows_shrinks(tmp_path: Path) -> None:
    p = tmp_path / "d.vhd"
    vhd_util("create", "-n", p, "-s", 8)
    size = 8 * MiB
    model = bytearray(size)
    write(p, model, 0, b"a" * 4096)
    write(p, model, 5 * MiB + 512, b"b" * 70000)
    for new in (chs_exact(100 * MiB), chs_exact(600 * MiB)):  # in the BAT's room (256 MiB), then past it
        rep = resize(p, new)
        assert vhd_util("check", "-n", p).returncode == 0
        assert vhd_util_read(p, 8 * MiB) == bytes(model)
        with vhdcore.open(p) as d:
            assert d.size == new and d.read(0, size) == bytes(model)
            assert all(e.end <= size for e in d.allocated_extents())
        assert clean(p)
    assert rep.blocks_moved >= 1
    qemu_raw(p, tmp_path / "q.raw")
    with open(tmp_path / "q.raw", "rb") as f:
        assert f.read(size) == bytes(model)
    model = grown(model, new)
    # Shrink: refused without --shrink, refused over data (naming it), done over zeros.
    with pytest.raises(UnsafeOperationError, match="--shrink"):
        resize(p, chs_exact(8 * MiB))
    r = vhdcore_cli("resize", p, 4 * MiB, "--shrink", check=False)
    assert r.returncode != 0 and f"offset {5 * MiB + 512}" in r.stderr
    small = chs_exact(6 * MiB)
    assert small > 5 * MiB + 512 + 70000
    resize(p, small, shrink=True)
    model = model[:small]
    assert vhd_util("check", "-n", p).returncode == 0
    assert content(p) == bytes(model)
    assert vhd_util_read(p, small) == bytes(model)


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_qemu_reads_the_result(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "d.vhd"
    size = 3 * MiB
    vhdcore.create(p, size, type=kind, block_size=64 * KiB).close()
    model = bytearray(size)
    write(p, model, size - 512, b"e" * 512)
    write(p, model, 1000, b"x" * 9000)
    for new in (40 * MiB, 5 * MiB + 512, 70 * MiB):  # 128 entries fit the first BAT: 8 MiB
        if new < len(model):
            resize(p, new, shrink=True)
        else:
            resize(p, new)
        model = grown(model, new)
        assert content(p) == bytes(model)
        raw = qemu_raw(p, tmp_path / "q.raw")
        assert raw.stat().st_size == new and raw.read_bytes() == bytes(model)
        assert clean(p)
        raw.unlink()


def test_differencing_moves_blocks_and_locators(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    vhdcore.create(base, 4 * MiB, block_size=64 * KiB).close()
    model = bytearray(4 * MiB)
    write(base, model, 0, b"B" * 300_000)
    vhdcore.snapshot(base, child).close()
    write(child, model, 100_000, b"C" * 50_000)
    write(child, model, 4 * MiB - 512, b"Z" * 512)
    rep = resize(child, 64 * MiB)  # 1024 entries: the BAT grows over the locators and the first blocks
    assert rep.blocks_moved >= 1 and rep.locators_moved >= 1
    model = grown(model, 64 * MiB)
    assert content(child) == bytes(model)
    assert clean(child, chain=True)
    write(child, model, 60 * MiB, b"new")
    assert content(child) == bytes(model)
    # Shrinking back below the parent's size and growing again: the region reads as zeros, not the parent's.
    write(child, model, 3 * MiB, bytes(512))
    with pytest.raises(UnsafeOperationError):
        resize(child, 3 * MiB, shrink=True)  # the child's "new" at 60 MiB is data
    write(child, model, 60 * MiB, bytes(3))
    write(child, model, 4 * MiB - 512, bytes(512))
    resize(child, 3 * MiB + 512, shrink=True)
    model = model[: 3 * MiB + 512]
    assert content(child) == bytes(model)


@pytest.mark.parametrize("kind", ["differencing", "dynamic", "fixed-shrink"])
def test_crash_at_every_write_then_rerun(tmp_path: Path, monkeypatch, kind: str) -> None:
    d = Path(SCRATCH) if SCRATCH else tmp_path
    work = Path(os.path.realpath(tmp_path if not SCRATCH else d)) / f"resize-crash-{os.getpid()}-{kind}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        size = 2 * MiB
        model = bytearray(size)
        p = work / "disk.vhd"
        if kind == "differencing":
            vhdcore.create(work / "base.vhd", size, block_size=64 * KiB).close()
            write(work / "base.vhd", model, 0, b"b" * 200_000)
            vhdcore.snapshot(work / "base.vhd", p).close()
        else:
            vhdcore.create(p, size, type="fixed" if kind == "fixed-shrink" else "dynamic", block_size=64 * KiB).close()
        write(p, model, 70_000, b"c" * 100_000)
        write(p, model, size - 1024, b"t" * 512)
        new = 40 * MiB if kind != "fixed-shrink" else 1 * MiB
        if kind == "fixed-shrink":
            write(p, model, size - 1024, bytes(512))
        pristine = p.read_bytes()
        final = grown(model, new)
        at = 1
        while True:
            p.write_bytes(pristine)
            if faulted(lambda: resize(p, new, shrink=True), at, monkeypatch):
                break
            # After the crash: the disk opens and holds the old content (at the old or the new size). A fixed disk
            # has no footer copy: between its two footer writes the other footer's sector shows inside the disk,
            # past the smaller of the two sizes (the module docstring); the rerun zeroes it.
            got = content(p)
            n = min(len(got), size)
            if kind == "fixed-shrink":
                n = min(n, new)
                assert got[:n] == bytes(model[:n]), f"write {at}"
            else:
                assert got[:n] == bytes(model[:n]) and not any(got[n:]), f"write {at}"
            assert os.path.exists(journal_path(str(p)))
            rep = resize(p, new, shrink=True)
            assert rep.resumed
            assert content(p) == bytes(final), f"write {at}"
            assert clean(p, chain=True), f"write {at}"
            assert not os.path.exists(journal_path(str(p)))
            at += 1
        assert at > 2
        assert content(p) == bytes(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["dynamic", "fixed", "differencing"]), seed=st.integers(0, 2**32 - 1),
       steps=st.lists(st.tuples(st.integers(1, 24), st.booleans()), min_size=1, max_size=5))
def test_random_resize_sequences(tmp_path_factory, kind: str, seed: int, steps) -> None:
    """Random writes and resizes (sizes in 256 KiB units) against a byte model."""
    tmp = tmp_path_factory.mktemp("rs", numbered=True) if not SCRATCH else None
    work = Path(SCRATCH) / f"rs-{os.getpid()}-{seed}" if SCRATCH else tmp
    work.mkdir(exist_ok=True)
    try:
        rnd = random.Random(seed)
        unit = 256 * KiB
        size = 4 * unit
        model = bytearray(size)
        p = work / "d.vhd"
        if kind == "differencing":
            vhdcore.create(work / "b.vhd", size, block_size=32 * KiB).close()
            write(work / "b.vhd", model, 0, rnd.randbytes(50_000))
            vhdcore.snapshot(work / "b.vhd", p).close()
        else:
            vhdcore.create(p, size, type=kind, block_size=32 * KiB).close()
        for units, with_write in steps:
            if with_write:
                n = rnd.randrange(1, 40_000)
                off = rnd.randrange(0, len(model) - n)
                write(p, model, off, rnd.randbytes(n))
            new = units * unit + rnd.choice([0, 512])
            if new < len(model) and any(model[new:]):
                with pytest.raises(UnsafeOperationError):
                    resize(p, new, shrink=True)
                continue
            if kind == "differencing" and new > len(model):
                pass  # the parent's content past the child's size was zero when the child shrank over it
            resize(p, new, shrink=True)
            model = grown(model, new)
            assert content(p) == bytes(model)
        assert clean(p, chain=True)
    finally:
        if SCRATCH:
            shutil.rmtree(work, ignore_errors=True)

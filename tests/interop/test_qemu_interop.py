"""Interop with qemu-img/qemu-io (Debian qemu-utils) for fixed and dynamic disks, both directions.

qemu ignores the parent of a differencing disk, so it is an oracle only for fixed and dynamic files.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vhdcore
from support.vhdtest import MiB, file_sha256, qemu_raw, random_writes, run

KiB = 1024
# Many small disks in the property test: on tmpfs their fsyncs cost nothing.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def qemu_io(path: Path, *cmds: str, fmt: str = "vpc") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(args + [path])


def qemu_info(path: Path) -> dict:
    return json.loads(run(["qemu-img", "info", "-f", "vpc", "--output=json", path]).stdout)


def vhdcore_bytes(path: Path) -> bytes:
    with vhdcore.open(path) as d:
        return d.read(0, d.size)


# (offset, length, pattern byte): unaligned, across 2 MiB blocks, the last sector, a sub-sector write.
QEMU_WRITES = [(0, 4096, 0x11), (1 * MiB + 512, 3 * MiB, 0x5A), (20 * MiB - 512, 1024, 0xA5),
               (33 * MiB + 7, 1000, 0x77), (40 * MiB, 512, 0x00)]


def apply_writes(model: bytearray, writes) -> None:
    for off, n, pat in writes:
        model[off : off + n] = bytes([pat]) * n


@pytest.mark.parametrize("kind", ["dynamic", "fixed", "dynamic-force-size"])
def test_qemu_written_disks_read_bit_exact(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "q.vhd"
    opts = {"dynamic": [], "fixed": ["-o", "subformat=fixed"], "dynamic-force-size": ["-o", "force_size=on"]}[kind]
    run(["qemu-img", "create", "-q", "-f", "vpc", *opts, p, "50M"])
    size = qemu_info(p)["virtual-size"]
    writes = QEMU_WRITES + [(size - 512, 512, 0xEE)]
    for off, n, pat in writes:
        qemu_io(p, f"write -P {pat} {off} {n}")
    model = bytearray(size)
    apply_writes(model, writes)
    got = vhdcore_bytes(p)
    assert len(got) == size
    assert got == model
    assert got == qemu_raw(p, tmp_path / "q.raw").read_bytes()
    with vhdcore.open(p) as d:
        assert d.leaf.footer.creator_app == (b"qem2" if kind == "dynamic-force-size" else b"qemu")
        if kind != "fixed":
            # qemu allocates whole 2 MiB blocks: exactly those the writes touched.
            touched = sorted({b for off, n, _ in writes for b in range(off // (2 * MiB), (off + n - 1) // (2 * MiB) + 1)})
            assert [int(b) for b in d.leaf.allocated_blocks()] == touched


@pytest.mark.parametrize("size,block_size", [(50 * MiB, 2 * MiB), (64 * MiB, 2 * MiB), (10 * MiB + 512, 512 * KiB),
                                             (24 * MiB, 4 * MiB), (3 * MiB, 64 * KiB)])
def test_vhdcore_dynamic_read_by_qemu(tmp_path: Path, size: int, block_size: int) -> None:
    p = tmp_path / "v.vhd"
    rnd = random.Random(size ^ block_size)
    model = bytearray(size)
    with vhdcore.create(p, size, block_size=block_size) as d:
        random_writes(d, model, rnd, 25, max_len=300_000)
    with vhdcore.open(p, "r+") as d:  # a second session appends more blocks
        random_writes(d, model, rnd, 10, max_len=300_000)
        d.write(size - 3, b"end")
        model[size - 3 :] = b"end"
    assert qemu_info(p)["virtual-size"] == size
    assert vhdcore_bytes(p) == model
    assert qemu_raw(p, tmp_path / "v.raw").read_bytes() == model


@pytest.mark.parametrize("size", [5 * MiB, 10 * MiB + 512, 127 * MiB])
def test_vhdcore_fixed_read_by_qemu(tmp_path: Path, size: int) -> None:
    p = tmp_path / "f.vhd"
    rnd = random.Random(size)
    model = bytearray(size)
    with vhdcore.create(p, size, type="fixed") as d:
        random_writes(d, model, rnd, 20, max_len=200_000)
    assert qemu_info(p)["virtual-size"] == size
    assert vhdcore_bytes(p) == model
    assert qemu_raw(p, tmp_path / "f.raw").read_bytes() == model


def test_each_writer_writes_into_the_others_disk(tmp_path: Path) -> None:
    """qemu-io writes into a vhdcore disk and vhdcore into a qemu disk; each reads what both wrote."""
    ours, theirs = tmp_path / "ours.vhd", tmp_path / "theirs.vhd"
    vhdcore.create(ours, 32 * MiB).close()
    run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "force_size=on", theirs, "32M"])
    model = {p: bytearray(32 * MiB) for p in (ours, theirs)}
    rnd = random.Random(77)
    for p in (ours, theirs):
        with vhdcore.open(p, "r+") as d:
            random_writes(d, model[p], rnd, 8, max_len=3 * MiB)
        w = [(5 * MiB + 3, 70_000, 0x42), (30 * MiB, 2 * MiB, 0x43), (0, 512, 0x44)]
        for off, n, pat in w:
            qemu_io(p, f"write -P {pat} {off} {n}")
        apply_writes(model[p], w)
        with vhdcore.open(p, "r+") as d:
            random_writes(d, model[p], rnd, 4, max_len=1 * MiB)
        assert vhdcore_bytes(p) == model[p]
        assert qemu_raw(p, tmp_path / "x.raw").read_bytes() == model[p]


def test_convert_outputs_read_by_qemu(tmp_path: Path) -> None:
    """What ``vhdcore convert`` writes from a qemu disk, qemu reads back as the same bytes."""
    src = tmp_path / "q.vhd"
    run(["qemu-img", "create", "-q", "-f", "vpc", src, "40M"])
    for off, n, pat in QEMU_WRITES[:4]:
        qemu_io(src, f"write -P {pat} {off} {n}")
    ref = qemu_raw(src, tmp_path / "ref.raw")
    for to in ("fixed", "dynamic"):
        out = tmp_path / f"{to}.vhd"
        vhdcore.convert(src, out, to=to)
        assert file_sha256(qemu_raw(out, tmp_path / f"{to}.raw")) == file_sha256(ref)
        assert vhdcore_bytes(out) == ref.read_bytes()
    vhdcore.convert(src, tmp_path / "v.raw", to="raw")
    assert file_sha256(tmp_path / "v.raw") == file_sha256(ref)


@pytest.mark.backend_independent
def test_qemu_sees_full_size_of_non_chs_sizes(tmp_path: Path) -> None:
    """Sizes the CHS geometry cannot express: vhdcore records the maximum geometry, so CHS-sizing readers
    (qemu for creator apps it does not know) take the footer's size instead of truncating."""
    for size in (10 * MiB + 512, 1000 * MiB, 100 * 1024 * MiB + 4096):
        for kind in ("fixed", "dynamic"):
            p = tmp_path / f"{kind}-{size}.vhd"
            vhdcore.create(p, size, type=kind).close()
            assert qemu_info(p)["virtual-size"] == size, (kind, size)
            p.unlink()


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["fixed", "dynamic"]), sectors=st.integers(1, 24 * 2048),
       block_size=st.sampled_from([512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB]),
       writes=st.lists(st.tuples(st.integers(0, 2**40), st.integers(1, 400_000), st.integers(0, 255)), max_size=8))
def test_any_vhdcore_disk_reads_the_same_in_qemu(kind: str, sectors: int, block_size: int, writes) -> None:
    """Random sizes (any whole number of sectors), block sizes and unaligned writes: qemu-img agrees byte for byte."""
    size = sectors * 512
    with tempfile.TemporaryDirectory(dir=SCRATCH) as td:
        p = Path(td) / "d.vhd"
        model = bytearray(size)
        with vhdcore.create(p, size, type=kind, block_size=block_size) as d:
            for off, n, pat in writes:
                off %= size
                n = min(n, size - off)
                d.write(off, bytes([pat]) * n)
                model[off : off + n] = bytes([pat]) * n
        assert vhdcore_bytes(p) == model
        assert qemu_raw(p, Path(td) / "d.raw").read_bytes() == model

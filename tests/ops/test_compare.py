"""vhdcore compare against qemu-img compare (fixed and dynamic disks) and against a byte model (chains)."""
from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdcore
from vhdcore.ops.compare import compare
from support.vhdtest import MiB, build_chain, random_writes

from support.vhdtest import vhdcore_cli

KiB = 1024


def qemu_compare(a: Path, b: Path) -> tuple[int, str]:
    r = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "vpc", str(a), str(b)], capture_output=True,
                       text=True)
    return r.returncode, r.stdout


def qemu_offset(out: str) -> int | None:
    for line in out.splitlines():
        if line.startswith("Content mismatch at offset "):
            return int(line.split()[-1].rstrip("!"))
    return None


def make(path: Path, size: int, writes: list[tuple[int, bytes]], type: str = "dynamic",
         block_size: int = 512 * KiB) -> None:
    with vhdcore.create(path, size, type=type, block_size=block_size) as d:
        for off, data in writes:
            d.write(off, data)


def model_first_diff(a: bytes, b: bytes) -> int | None:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i - i % 512
    tail = a[n:] if len(a) > n else b[n:]
    for i, c in enumerate(tail):
        if c:
            return n + i - (n + i) % 512
    return None


@pytest.mark.parametrize("ta,tb", [("dynamic", "dynamic"), ("dynamic", "fixed"), ("fixed", "fixed")])
def test_one_sector_differs_like_qemu(tmp_path: Path, ta: str, tb: str) -> None:
    size = 6 * MiB
    common = [(0, b"boot" * 128), (3 * MiB + 4096, b"\x5a" * 70000)]
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    make(a, size, common, ta)
    make(b, size, common, tb)
    assert compare(a, b).identical
    assert qemu_compare(a, b)[0] == 0
    with vhdcore.open(b, "r+") as d:
        d.write(5 * MiB + 1000, b"!")  # a sector neither disk held before: zeros in a, data in b
    res = compare(a, b)
    rc, out = qemu_compare(a, b)
    assert (rc, res.identical) == (1, False)
    assert res.offset == qemu_offset(out) == 5 * MiB + 512
    r = vhdcore_cli("compare", a, b, check=False)
    assert r.returncode == 1 and r.stdout.strip() == f"Content mismatch at offset {5 * MiB + 512}!"


@pytest.mark.parametrize("tail_data", [False, True])
def test_sizes_differ_tail_must_be_zero(tmp_path: Path, tail_data: bool) -> None:
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    make(a, 4 * MiB, [(1000 * 512, b"x" * 512)])
    writes = [(1000 * 512, b"x" * 512), (4 * MiB + 512, bytes(4096))]  # allocated, but zeros
    if tail_data:
        writes.append((5 * MiB + 3 * 512 + 7, b"tail"))
    make(b, 6 * MiB, writes)
    res = compare(a, b)
    rc, out = qemu_compare(a, b)
    assert res.size_mismatch
    assert rc == (1 if tail_data else 0)
    assert res.identical is (not tail_data)
    assert res.offset == qemu_offset(out)
    assert compare(b, a).offset == res.offset


def test_chain_against_its_flat_copy(tmp_path: Path) -> None:
    paths, model = build_chain(tmp_path, 3, size=4 * MiB, writes=15, seed=3)
    flat = tmp_path / "flat.vhd"
    vhdcore.convert(paths[-1], flat, to="dynamic")
    assert compare(paths[-1], flat).identical
    assert vhdcore_cli("compare", paths[-1], flat).stdout.strip() == "Images are identical."
    # The child and its parent share the base's runs: those are equal without reading them.
    res = compare(paths[-1], paths[-2])
    with vhdcore.open(paths[-2]) as d:
        parent = d.read(0, d.size)
    assert res.offset == model_first_diff(bytes(model), parent)


def test_cost_follows_the_data(tmp_path: Path) -> None:
    """Two 1 TiB disks holding one written sector each: only those sectors are read (libvhd's rule: the rest of
    each block's sectors have clear bits and read as zeros, so nothing else needs reading)."""
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    make(a, 1024 * 1024 * MiB, [(700 * 1024 * MiB, b"a" * 512)], block_size=2 * MiB)
    make(b, 1024 * 1024 * MiB, [(700 * 1024 * MiB, b"a" * 512)], block_size=2 * MiB)
    res = compare(a, b)
    assert res.identical and res.bytes_read == 2 * 512


def test_errors_exit_2(tmp_path: Path) -> None:
    a = tmp_path / "a.vhd"
    make(a, MiB, [])
    (tmp_path / "junk.vhd").write_bytes(b"not a vhd" * 100)
    for other in (tmp_path / "missing.vhd", tmp_path / "junk.vhd"):
        r = vhdcore_cli("compare", a, other, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), sizes=st.sampled_from([(2 * MiB, 2 * MiB), (2 * MiB, 3 * MiB),
                                                              (3 * MiB + 512, 2 * MiB)]),
       types=st.sampled_from([("dynamic", "dynamic"), ("dynamic", "fixed")]))
def test_random_disks_match_qemu_and_model(tmp_path_factory, seed: int, sizes, types) -> None:
    tmp = tmp_path_factory.mktemp("cmp")
    rnd = random.Random(seed)
    a, b = tmp / "a.vhd", tmp / "b.vhd"
    models = []
    for path, size, t in ((a, sizes[0], types[0]), (b, sizes[1], types[1])):
        model = bytearray(size)
        with vhdcore.create(path, size, type=t, block_size=256 * KiB) as d:
            random_writes(d, model, random.Random(seed), 6, max_len=20000)  # the same writes in both
            if rnd.random() < 0.7:
                random_writes(d, model, rnd, 1, max_len=3000)
        models.append(bytes(model))
    res = compare(a, b)
    rc, out = qemu_compare(a, b)
    expected = model_first_diff(*models)
    assert res.offset == expected
    assert rc == (0 if expected is None else 1)
    assert qemu_offset(out) == expected

"""vhdcore judged by XenServer's libvhd (vhd-util, vhdw): what XenServer reads is what vhdcore wrote.

The four failures of issue 10 first, then every writer. Content is always compared through `vhd-util read -r`
as well as `check -p -b` (check's zero test misses a sector whose first byte is not zero).
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

import vhdcore
from support.libvhd import (assert_valid, libvhd_create, libvhd_parent, libvhd_read, libvhd_snapshot, libvhd_write,
                    needs_libvhd, vhd_util)
from vhdcore.ops.coalesce import coalesce

pytestmark = needs_libvhd

MiB = 1024 * 1024
GiB = 1024 * MiB


def libvhd_chain(d: Path, depth: int, mib: int = 16, seed: int = 0) -> tuple[list[Path], bytearray]:
    """A chain made by vhd-util and written by libvhd (vhdw): base first; and its byte model."""
    rnd = random.Random(seed)
    model = bytearray(mib * MiB)
    paths = [d / "base.vhd"]
    libvhd_create(paths[0], mib)
    for i in range(depth):
        if i:
            paths.append(d / f"c{i}.vhd")
            libvhd_snapshot(paths[-1], paths[-2])
        for _ in range(12):
            off = rnd.randrange(mib * MiB // 512 - 64) * 512
            data = rnd.randbytes(rnd.randrange(1, 64) * 512)
            libvhd_write(paths[-1], off, data, d / "w.bin")
            model[off : off + len(data)] = data
    return paths, model


def same_in_both(leaf: Path, model: bytes) -> None:
    assert_valid(leaf)
    assert libvhd_read(leaf, len(model)) == model
    with vhdcore.open(leaf) as disk:
        assert disk.read(0, disk.size) == model


# ------------------------------------------------------------------------------------- the four failures


def test_write_into_a_libvhd_block_is_seen_by_libvhd(tmp_path: Path) -> None:
    """1: vhdcore writing into a block libvhd allocated (one sector's bit set) sets the bits it writes."""
    p = tmp_path / "w.vhd"
    libvhd_create(p, 64)
    one = random.Random(1).randbytes(512)
    libvhd_write(p, 0, one, tmp_path / "one")
    with vhdcore.open(p, mode="r+") as d:
        d.write(8 * 512, b"\xab" * 4096)
        assert d.read(0, 512) == one
    model = bytearray(64 * MiB)
    model[:512] = one
    model[4096:8192] = b"\xab" * 4096
    same_in_both(p, bytes(model))


@pytest.mark.parametrize("how", ["leaf-into-base", "leaf-into-base-remove", "mid-remove"])
def test_coalesce_into_a_libvhd_dynamic_base(tmp_path: Path, how: str) -> None:
    """2: coalescing into a dynamic base ORs the child's bits into the base's; libvhd reads every sector."""
    paths, model = libvhd_chain(tmp_path, 3, seed=2)
    base, mid, leaf = paths
    if how == "mid-remove":
        coalesce(mid, remove_child=True)
    else:
        coalesce(leaf, into=base, remove_child=how.endswith("remove"))
    same_in_both(base if how == "leaf-into-base-remove" else leaf, bytes(model))
    if how == "leaf-into-base":
        same_in_both(base, bytes(model))  # the base alone holds the whole content now


@pytest.mark.backend_independent
@pytest.mark.parametrize("size", [100 * MiB, 1 * GiB, 40 * GiB, 127 * GiB, 2040 * GiB, 12345 * 512, 3 * MiB + 512])
def test_created_disks_pass_libvhd_and_qemu_read_the_full_size(tmp_path: Path, size: int) -> None:
    """3: libvhd accepts vhdcore's geometry, and qemu-img reads the full virtual size."""
    for kind in ("dynamic", "fixed") if size <= GiB else ("dynamic",):
        p = tmp_path / f"{kind}.vhd"
        vhdcore.create(p, size, type=kind).close()
        assert_valid(p)
        info = json.loads(subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", p],
                                         check=True, capture_output=True).stdout)
        assert info["virtual-size"] == size, (kind, size, info["virtual-size"])
        q = vhd_util("query", "-n", p, "-v").stdout.decode().strip()
        assert int(q) == size // MiB


def test_copied_chain_opens_its_own_copies(tmp_path: Path) -> None:
    """4: a chain copied elsewhere (originals still there) resolves to the copies, in libvhd and in vhdcore."""
    src = tmp_path / "orig"
    src.mkdir()
    with vhdcore.create(src / "base.vhd", 8 * MiB) as d:
        d.write(0, b"base" * 1024)
    with vhdcore.snapshot(src / "base.vhd", src / "mid.vhd") as d:
        d.write(4096, b"mid!" * 1024)
    with vhdcore.snapshot(src / "mid.vhd", src / "leaf.vhd") as d:
        d.write(8192, b"leaf" * 1024)
    with vhdcore.open(src / "leaf.vhd") as d:
        model = d.read(0, d.size)
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    assert libvhd_parent(dst / "leaf.vhd") == str(dst / "mid.vhd")
    assert libvhd_parent(dst / "mid.vhd") == str(dst / "base.vhd")
    with vhdcore.open(dst / "leaf.vhd") as d:
        assert [Path(l.path) for l in d.layers] == [dst / "leaf.vhd", dst / "mid.vhd", dst / "base.vhd"]
    same_in_both(dst / "leaf.vhd", model)
    # libvhd's coalesce of the copy writes into the copy, never into the originals.
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    vhd_util("coalesce", "-n", dst / "leaf.vhd")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    same_in_both(dst / "mid.vhd", model)

"""Import of raw images (convert --from raw / detected), judged by qemu-img compare and qemu-img convert -O vpc."""
from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

import vhdcore
from vhdcore.ops.rawimport import RawDisk, looks_like_vhd
from support.vhdtest import MiB, run

from support.vhdtest import vhdcore_cli


def sparse_raw(path: Path, size: int, seed: int = 1) -> bytearray:
    """A sparse raw file: holes, data runs, and allocated runs of zeros."""
    rnd = random.Random(seed)
    model = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(6):
            n = rnd.randrange(1, 300_000)
            off = rnd.randrange(0, size - n)
            data = bytes(n) if rnd.random() < 0.3 else rnd.randbytes(n)
            f.seek(off)
            f.write(data)
            model[off : off + n] = data
    return model


def qemu_same(raw: Path, vhd: Path) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vpc", str(raw), str(vhd)], capture_output=True,
                       text=True)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode == 0


@pytest.mark.parametrize("to", ["dynamic", "fixed"])
@pytest.mark.parametrize("size", [24 * MiB, 5 * MiB + 1000])
def test_import_like_qemu(tmp_path: Path, to: str, size: int) -> None:
    raw = tmp_path / "disk.img"
    model = sparse_raw(raw, size, seed=size)
    out = tmp_path / "out.vhd"
    r = vhdcore_cli("convert", raw, out, "--to", to, "--json")  # detected: no VHD footer
    with vhdcore.open(out) as d:
        assert d.size == -(-size // 512) * 512
        got = d.read(0, d.size)
    assert got[:size] == bytes(model) and not any(got[size:])
    if size % 512 == 0:
        assert qemu_same(raw, out)
        q = tmp_path / "q.vhd"
        run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", raw, q])
        cmp = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "vpc", q, out], capture_output=True)
        assert cmp.returncode == 0
    import json

    rep = json.loads(r.stdout)
    with RawDisk(raw) as rd:
        held = rd.allocated_bytes()
    assert held < size  # the holes are holes
    if to == "fixed":
        assert rep["bytes_read"] == held  # only the data runs are read
    else:
        # Only blocks that hold non-zero data are allocated.
        with vhdcore.open(out) as d:
            bs = d.leaf.block_size
            want = {b for b in range(-(-d.size // bs)) if any(model[b * bs : (b + 1) * bs])}
            assert set(int(b) for b in d.leaf.allocated_blocks()) == want


def test_from_raw_forced_and_vhd_detected(tmp_path: Path) -> None:
    vhd = tmp_path / "a.vhd"
    with vhdcore.create(vhd, 2 * MiB, type="fixed") as d:
        d.write(0, b"x" * 512)
    assert looks_like_vhd(vhd)
    # Detected as a VHD: its virtual disk is converted.
    vhdcore_cli("convert", vhd, tmp_path / "v.vhd", "--to", "dynamic")
    with vhdcore.open(tmp_path / "v.vhd") as d:
        assert d.size == 2 * MiB
    # --from raw: the file's bytes themselves (footer included) are the disk.
    vhdcore_cli("convert", vhd, tmp_path / "r.vhd", "--to", "dynamic", "--from", "raw")
    with vhdcore.open(tmp_path / "r.vhd") as d:
        assert d.read(0, d.size) == vhd.read_bytes()


def test_refusals(tmp_path: Path) -> None:
    (tmp_path / "empty.img").write_bytes(b"")
    r = vhdcore_cli("convert", tmp_path / "empty.img", tmp_path / "o.vhd", "--to", "dynamic", check=False)
    assert r.returncode != 0 and "empty" in r.stderr and "Traceback" not in r.stderr
    os.mkfifo(tmp_path / "fifo")
    r = vhdcore_cli("convert", tmp_path / "fifo", tmp_path / "o.vhd", "--to", "dynamic", "--from", "raw", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr

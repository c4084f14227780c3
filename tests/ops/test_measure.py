"""vhdcore measure: the size equals the real size of what convert and compact write.

qemu-img measure is no oracle for VHD outputs here: qemu 7.2's vpc driver has no size measurement ("Block driver
'vpc' does not support size measurement"), and a qemu-written dynamic VHD has qemu's own layout (BAT size,
unaligned blocks) anyway. It is the oracle for raw outputs (its "required size" of a raw file is the virtual size).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import vhdcore
from vhdcore.ops.measure import measure
from support.vhdtest import MiB, build_chain, run

from support.vhdtest import vhdcore_cli

KiB = 1024


def _source(tmp_path: Path, kind: str) -> Path:
    if kind == "chain":
        paths, _ = build_chain(tmp_path, 3, size=6 * MiB, writes=12, seed=5)
        return paths[-1]
    p = tmp_path / "src.vhd"
    with vhdcore.create(p, 6 * MiB + 512, type="dynamic" if kind != "fixed" else "fixed",
                        block_size=512 * KiB) as d:
        d.write(0, b"m" * 5000)
        d.write(2 * MiB, bytes(600 * KiB))  # allocates blocks that hold only zeros: convert drops them
        d.write(6 * MiB, b"end" * 100)
    return p


@pytest.mark.parametrize("kind", ["dynamic", "fixed", "chain"])
@pytest.mark.parametrize("to,bs", [("dynamic", None), ("dynamic", 2 * MiB), ("fixed", None), ("raw", None)])
def test_measure_is_the_converted_size(tmp_path: Path, kind: str, to: str, bs) -> None:
    src = _source(tmp_path, kind)
    rep = measure(src, to, block_size=bs)
    out = tmp_path / "out.img"
    vhdcore.convert(src, out, to=to, block_size=bs)
    assert rep.file_size == os.path.getsize(out)
    if to == "dynamic":
        with vhdcore.open(out) as d:
            assert rep.blocks == len(d.leaf.allocated_blocks())
    if to == "raw":
        q = json.loads(run(["qemu-img", "measure", "--output=json", "-O", "raw", "-f", "raw", out]).stdout)
        assert q["required"] == rep.file_size


@pytest.mark.parametrize("mode", ["zero", "quick", "full"])
def test_measure_is_the_compacted_size(mbr_chain, tmp_path: Path, mode: str) -> None:
    rep = measure(mbr_chain.leaf, compact=mode)
    out = tmp_path / "c.vhd"
    crep = vhdcore.compact(mbr_chain.leaf, out, mode=mode)
    assert rep.file_size == os.path.getsize(out) == crep.bytes_after
    assert rep.blocks == crep.blocks_kept


def test_cli(tmp_path: Path) -> None:
    src = _source(tmp_path, "dynamic")
    r = vhdcore_cli("measure", src, "--to", "fixed")
    assert r.stdout.splitlines()[0] == f"required size: {6 * MiB + 1024}"
    doc = json.loads(vhdcore_cli("measure", src, "--json").stdout)
    vhdcore.convert(src, tmp_path / "o.vhd", to="dynamic")
    assert doc["file_size"] == os.path.getsize(tmp_path / "o.vhd")
    r = vhdcore_cli("measure", src, "--to", "fixed", "--compact", "zero", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_cost_follows_the_data(tmp_path: Path) -> None:
    p = tmp_path / "big.vhd"
    with vhdcore.create(p, 1024 * 1024 * MiB) as d:
        d.write(500 * 1024 * MiB, b"x")
    rep = measure(p)
    assert rep.blocks == 1 and rep.bytes_read == 2 * MiB

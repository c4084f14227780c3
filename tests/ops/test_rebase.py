"""vhdcore rebase, judged by libvhd's vhd-util (read -r through the chain, check, query -p) and a byte model; a crash
at every write leaves the old content readable through the old parent, and a rerun finishes."""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdcore
from vhdcore.exceptions import ChainCycleError, ChainError, UnsafeOperationError, VHDError
from vhdcore.ops.rebase import journal_path, rebase
from vhdcore.ops.coalesce.relink import plan_relink
from support.vhdtest import (
    MiB,
    faulted,
    file_sha256,
    random_writes,
    vhd_util,
    vhd_util_path,
    vhd_util_read,
    vhdcore_cli,
)


KiB = 1024
needs_vhd_util = pytest.mark.skipif(vhd_util_path() is None, reason="VHD_UTIL (libvhd's vhd-util) not set")
SIZE = 2 * MiB


def content(path: Path, **kw) -> bytes:
    with vhdcore.open(path, **kw) as d:
        return d.read(0, d.size)


def parent_of(path: Path, **kw) -> str:
    with vhdcore.open(path, **kw) as d:
        return os.path.realpath(d.layers[1].path)


def _base(path: Path, rnd: random.Random, writes: int = 6, size: int = SIZE) -> bytearray:
    model = bytearray(size)
    with vhdcore.create(path, size, block_size=64 * KiB) as d:
        random_writes(d, model, rnd, writes, 40_000)
    return model


def _child(parent: Path, path: Path, model: bytearray, rnd: random.Random, writes: int = 6) -> bytearray:
    model = bytearray(model)
    with vhdcore.snapshot(parent, path) as d:
        random_writes(d, model, rnd, writes, 40_000)
    return model


@needs_vhd_util
def test_vhd_util_reads_the_rebased_chain(tmp_path: Path) -> None:
    """Disks made by libvhd: child of A moved onto B (another disk), then onto a sibling's chain."""
    rnd = random.Random(3)
    a, b, child = tmp_path / "a.vhd", tmp_path / "b.vhd", tmp_path / "child.vhd"
    ma, mb = bytearray(SIZE), bytearray(SIZE)
    for p, m in ((a, ma), (b, mb)):
        vhd_util("create", "-n", p, "-s", SIZE // MiB)
        with vhdcore.open(p, "r+") as d:
            random_writes(d, m, rnd, 8, 40_000)
    vhd_util("snapshot", "-n", child, "-p", a)
    model = bytearray(ma)
    with vhdcore.open(child, "r+") as d:
        random_writes(d, model, rnd, 8, 40_000)
    parents = {p: file_sha256(p) for p in (a, b)}
    rep = vhdcore_cli("rebase", child, b, "--json")
    doc = json.loads(rep.stdout)
    assert doc["bytes_copied"] > 0 and doc["parent_path"] == str(b)
    assert vhd_util("query", "-n", child, "-p").stdout.strip() == str(b)
    assert vhd_util("check", "-n", child, "-p").returncode == 0
    assert vhd_util_read(child, SIZE) == bytes(model)
    assert content(child) == bytes(model)
    assert {p: file_sha256(p) for p in (a, b)} == parents  # the parents are only read
    # Onto a libvhd snapshot of A (a two-level new chain sharing A with nothing the child still uses).
    sib = tmp_path / "sib.vhd"
    vhd_util("snapshot", "-n", sib, "-p", a)
    with vhdcore.open(sib, "r+") as d:
        random_writes(d, bytearray(SIZE), rnd, 4, 40_000)
    rebase(child, sib)
    assert vhd_util("query", "-n", child, "-p").stdout.strip() == str(sib)
    assert vhd_util_read(child, SIZE) == bytes(model)
    assert vhd_util("check", "-n", child, "-p").returncode == 0


def test_onto_grandparent_reads_only_what_differs(tmp_path: Path) -> None:
    """Rebasing a leaf past its parent copies the parent's sectors; the grandparent's runs, shared by both backing
    chains, and the zero regions of a large sparse disk are never read."""
    size = 64 * MiB
    base, mid, leaf = tmp_path / "base.vhd", tmp_path / "mid.vhd", tmp_path / "leaf.vhd"
    model = bytearray(size)
    with vhdcore.create(base, size, block_size=64 * KiB) as d:
        d.write(0, b"B" * MiB)
        model[0:MiB] = b"B" * MiB
    with vhdcore.snapshot(base, mid) as d:
        d.write(512 * KiB, b"M" * 20_000)  # 40 sectors (the last one partly)
        d.write(40 * MiB, b"m" * 512)
    model[512 * KiB : 512 * KiB + 20_000] = b"M" * 20_000
    model[40 * MiB : 40 * MiB + 512] = b"m" * 512
    with vhdcore.snapshot(mid, leaf) as d:
        d.write(512 * KiB, b"L" * 1024)  # covers two of mid's sectors: those need no copy
    model[512 * KiB : 512 * KiB + 1024] = b"L" * 1024
    rep = rebase(leaf, base)
    assert parent_of(leaf) == str(base)
    assert content(leaf) == bytes(model)
    mid_bytes = 40 * 512 + 512
    assert rep.bytes_copied == mid_bytes - 1024
    assert rep.bytes_compared <= 2 * mid_bytes
    assert vhdcore.check(leaf, chain=True).clean
    # Back onto mid (now the old chain holds those sectors in the leaf itself): nothing differs that matters.
    rep = rebase(leaf, mid)
    assert rep.bytes_copied == 0 and content(leaf) == bytes(model)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["write", "rebase", "rebase", "snapshot"]), st.integers(0, 2**32)),
                min_size=1, max_size=6))
def test_random_rebase_sequences(tmp_path: Path, steps) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as td:
        d = Path(td)
        rnd = random.Random(len(steps))
        size = 512 * KiB
        # Three bases; parents get children (and so never change afterwards: their models stay true).
        bases = {}
        for i in range(3):
            bases[d / f"base{i}.vhd"] = _base(d / f"base{i}.vhd", rnd, 4, size)
        disks = dict(bases)  # every possible parent, with its content
        leaf = d / "leaf.vhd"
        model = _child(d / "base0.vhd", leaf, disks[d / "base0.vhd"], rnd, 3)
        for k, (op, seed) in enumerate(steps):
            r = random.Random(seed)
            if op == "write":
                with vhdcore.open(leaf, "r+") as disk:
                    random_writes(disk, model, r, 2, 30_000)
            elif op == "snapshot":  # a new possible parent: a child of one of the disks, with its own writes
                src = r.choice(sorted(disks))
                new = d / f"snap{k}.vhd"
                disks[new] = _child(src, new, disks[src], r, 2)
            else:
                target = r.choice(sorted(disks))
                rebase(leaf, target)
                assert parent_of(leaf) == str(target)
            assert content(leaf) == bytes(model), (k, op)
        assert vhdcore.check(leaf, chain=True).clean


def test_crash_at_every_write_then_rerun(tmp_path: Path, monkeypatch) -> None:
    """At every write: the child opens and reads its old content through the old parent (or, once the header was
    being switched, a torn header is mended by the rerun); the rerun finishes."""
    rnd = random.Random(5)
    a, b, child = tmp_path / "a.vhd", tmp_path / "b.vhd", tmp_path / "child.vhd"
    ma = _base(a, rnd)
    _base(b, rnd)
    model = _child(a, child, ma, rnd)
    pristine = child.read_bytes()
    at = 1
    relink_faults = 0
    while True:
        child.write_bytes(pristine)
        Path(journal_path(str(child))).unlink(missing_ok=True)
        if faulted(lambda: rebase(child, b), at, monkeypatch):
            break
        doc = json.loads(Path(journal_path(str(child))).read_text())
        if doc["phase"] == "copy":
            assert parent_of(child) == str(a), f"write {at}"
            assert content(child) == bytes(model), f"write {at}"
            # Data written before its bits (the crash came between them) is a BITMAP_CLEAR_DATA warning: every
            # reader still gets the old content, as the line above shows.
            left = [f for f in vhdcore.check(child, chain=True).findings
                    if f.severity in ("error", "warning") and f.code != "BITMAP_CLEAR_DATA"]
            assert not left, (f"write {at}", [str(f) for f in left])
        else:
            # The fault hit the relink: tear the header as a power cut could (its first sector only).
            relink_faults += 1
            *_, (hoff, header) = [(o, bytes.fromhex(h)) for o, h in doc["plan"]["writes"]]
            with open(child, "r+b") as f:
                f.seek(hoff)
                f.write(header[:512])
        rep = rebase(child, b)
        assert rep.resumed, f"write {at}"
        assert parent_of(child) == str(b), f"write {at}"
        assert content(child) == bytes(model), f"write {at}"
        assert vhdcore.check(child, chain=True).clean, f"write {at}"
        assert not os.path.exists(journal_path(str(child)))
        at += 1
    assert at > 5 and relink_faults >= 1
    assert parent_of(child) == str(b) and content(child) == bytes(model)


def test_refusals(tmp_path: Path) -> None:
    rnd = random.Random(9)
    a, b, child, grandchild = (tmp_path / n for n in ("a.vhd", "b.vhd", "child.vhd", "gc.vhd"))
    ma = _base(a, rnd)
    mc = _child(a, child, ma, rnd)
    _child(child, grandchild, mc, rnd)
    before = {p: file_sha256(p) for p in (a, child, grandchild)}
    with pytest.raises(ChainError, match="not a differencing"):
        rebase(a, child)
    with pytest.raises(ChainCycleError):
        rebase(child, grandchild)  # the new parent's chain holds the child
    _base(b, rnd, size=SIZE * 2)
    r = vhdcore_cli("rebase", child, b, check=False)
    assert r.returncode != 0 and "virtual size" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(UnsafeOperationError):
        rebase(child, b)
    r = vhdcore_cli("rebase", child, tmp_path / "missing.vhd", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert {p: file_sha256(p) for p in (a, child, grandchild)} == before
    assert not os.path.exists(journal_path(str(child)))
    # A journal in the relink phase binds the rerun to its parent; a foreign journal is refused untouched.
    jp = Path(journal_path(str(child)))
    other = tmp_path / "o.vhd"
    _base(other, rnd)
    with vhdcore.Image(other) as oimg:
        plan = plan_relink(str(child), oimg)
    jp.write_text(json.dumps({"kind": "rebase", "phase": "relink", "new_parent": str(other), "plan": plan.to_json()}))
    with pytest.raises(ChainError, match="must be finished first"):
        rebase(child, a)
    jp.write_text('{"kind": "rebase", "phase": "copy", "new_parent": "x", "plan": {"path": "/etc/passwd", '
                  '"unique_id": "00000000-0000-0000-0000-000000000000", "writes": [[0, "00"]]}}')
    with pytest.raises(VHDError, match="journal"):
        rebase(child, other)
    assert {p: file_sha256(p) for p in (a, child, grandchild)} == before

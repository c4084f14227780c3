"""coalesce: content, layouts, zero-awareness, multi-layer merges, safety refusals, verification, relinking, CLI."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdcore
from vhdcore.cli import main as cli
from vhdcore.ops.check import INFO, check
from vhdcore.ops.coalesce import coalesce
from vhdcore.exceptions import (
    ChainError,
    LockError,
    UnsafeOperationError,
    UnsupportedFeatureError,
    VerificationError,
)
from vhdcore.disk.image import Image

from support.coalesce import content, layered_chain, set_footer, set_header
from support.vhdtest import MiB, build_chain, disk_sha256, qemu_raw, random_writes

EXPECTED = json.loads((Path(__file__).resolve().parent.parent / "data" / "corpus" / "expected.json").read_text())


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def assert_clean(path) -> None:
    rep = check(path)
    bad = [str(f) for f in rep.findings if f.severity != INFO]
    assert not bad, bad


# --------------------------------------------------------------------------------------------- real files


def test_corpus_windows_differencing_into_fixed_parent(corpus_dir, tmp_path) -> None:
    """ntfs-differential (made by Windows 10) into a copy of its fixed parent: the parent's content becomes the
    one the corpus lists for the differencing disk."""
    for name in ("ntfs-parent.vhd", "ntfs-differential.vhd"):
        shutil.copy(corpus_dir / "dfvfs" / name, tmp_path / name)
    parent, child = tmp_path / "ntfs-parent.vhd", tmp_path / "ntfs-differential.vhd"
    assert disk_sha256(parent) == EXPECTED["dfvfs/ntfs-parent.vhd"]["sha256"]
    rep = coalesce(child, verify=True)
    assert rep.verified and rep.target_type == "fixed"
    assert rep.bytes_copied > 0 and rep.blocks_allocated == 0 and rep.target_growth == 0
    assert rep.shadowed_sectors * 512 == rep.bytes_copied  # every sector of a fixed disk holds data
    assert disk_sha256(parent) == EXPECTED["dfvfs/ntfs-differential.vhd"]["sha256"]
    assert disk_sha256(child) == EXPECTED["dfvfs/ntfs-differential.vhd"]["sha256"]  # the child still reads the same
    assert_clean(parent)
    # qemu-img reads the fixed parent as raw data plus footer: the same bytes
    raw = qemu_raw(parent, tmp_path / "p.raw")
    assert sha(raw.read_bytes()) == EXPECTED["dfvfs/ntfs-differential.vhd"]["sha256"]


def test_corpus_windows_differencing_remove_child_relinks_grandchild(corpus_dir, tmp_path) -> None:
    for name in ("ntfs-parent.vhd", "ntfs-differential.vhd"):
        shutil.copy(corpus_dir / "dfvfs" / name, tmp_path / name)
    child = tmp_path / "ntfs-differential.vhd"
    grand = tmp_path / "grand.vhd"
    with vhdcore.snapshot(child, grand) as d:
        d.write(4096, b"grandchild data" * 100)
        want = d.read(0, d.size)
    rep = coalesce(child, remove_child=True, verify=True)
    assert rep.relinked == [str(grand)] and rep.removed == [str(child)]
    assert not child.exists()
    assert content(grand) == want
    with vhdcore.open(grand) as d:
        assert [os.path.basename(L.path) for L in d.layers] == ["grand.vhd", "ntfs-parent.vhd"]
        assert not d.warnings
    assert check(grand, chain=True).clean


def test_corpus_qemu_differencing_with_bad_checksums(corpus_dir, tmp_path) -> None:
    """qemu's child names its parent by unicode name only; both carry hand-edited bad checksums."""
    for name in ("image.vhd", "image-differential.vhd"):
        shutil.copy(corpus_dir / "dfvfs" / name, tmp_path / name)
    with pytest.raises(vhdcore.ChecksumError):
        coalesce(tmp_path / "image-differential.vhd")
    rep = coalesce(tmp_path / "image-differential.vhd", strict=False, verify=True)
    assert rep.verified
    assert disk_sha256(tmp_path / "image.vhd", strict=False) == EXPECTED["dfvfs/image-differential.vhd"]["sha256"]


# --------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("target", ["dynamic", "fixed", "differencing"])
@pytest.mark.parametrize("block_size", [512 * 1024, 2 * MiB])
def test_every_case_of_block(tmp_path, target, block_size) -> None:
    parent, child, model = layered_chain(tmp_path, block_size=block_size, target=target)
    assert content(child) == model
    parent_before = content(parent)
    size_before = parent.stat().st_size
    rep = coalesce(child, verify=True)
    assert content(parent) == model
    assert content(child) == model
    assert rep.verified and rep.syncs >= 1
    assert rep.target_growth == parent.stat().st_size - size_before
    assert_clean(parent)
    nb = len(model) // block_size
    assert rep.full_blocks + rep.partial_blocks == rep.blocks_copied
    if target == "dynamic":
        # block 5: zeros over nothing -> nothing allocated; odd blocks the child touches are new.
        assert rep.zero_blocks_skipped == 1
        assert rep.blocks_allocated == len([b for b in range(nb) if b % 2 and b % 6 != 5 and b % 6 in (1, 3)])
        with Image(parent) as img:
            assert int(img.bat[5]) == 0xFFFFFFFF
        # qemu reads what vhdcore allocated
        assert qemu_raw(parent, tmp_path / "p.raw").read_bytes() == bytes(model)
    if target == "differencing":
        # block 4: zeros over the base's data must be written (the base would show through otherwise)
        with Image(parent) as img:
            assert int(img.bat[4]) != 0xFFFFFFFF
            assert int(img.bat[5]) == 0xFFFFFFFF  # zeros over nothing at any depth: skipped
        assert rep.zero_blocks_skipped == 1
    if target == "fixed":
        assert rep.blocks_allocated == 0 and rep.target_growth == 0
    # sectors the child did not hold are untouched
    changed = [i for i in range(0, len(model), 512) if parent_before[i : i + 512] != model[i : i + 512]]
    assert rep.bytes_copied >= len(changed) * 512


@pytest.mark.parametrize("child_bs,parent_bs", [(512 * 1024, 2 * MiB), (2 * MiB, 512 * 1024)])
def test_child_and_parent_block_sizes_differ(tmp_path, child_bs, parent_bs) -> None:
    size = 16 * MiB
    rnd = random.Random(5)
    model = bytearray(size)
    with vhdcore.create(tmp_path / "p.vhd", size, block_size=parent_bs) as d:
        random_writes(d, model, rnd, 20)
    with vhdcore.snapshot(tmp_path / "p.vhd", tmp_path / "c.vhd", block_size=child_bs) as d:
        random_writes(d, model, rnd, 40, max_len=3 * MiB)
    rep = coalesce(tmp_path / "c.vhd", verify=True)
    assert rep.block_size == parent_bs
    assert content(tmp_path / "p.vhd") == model
    assert_clean(tmp_path / "p.vhd")


def test_small_blocks_unaligned_bitmaps(tmp_path) -> None:
    """Blocks under 4 KiB put block boundaries inside a bitmap byte of the other layer."""
    size = 256 * 1024
    rnd = random.Random(2)
    model = bytearray(size)
    with vhdcore.create(tmp_path / "p.vhd", size, block_size=1024) as d:
        random_writes(d, model, rnd, 10, max_len=5000)
    with vhdcore.snapshot(tmp_path / "p.vhd", tmp_path / "c.vhd", block_size=8192) as d:
        random_writes(d, model, rnd, 15, max_len=9000)
    coalesce(tmp_path / "c.vhd", verify=True)
    assert content(tmp_path / "p.vhd") == model


def test_fixed_target_small_child_blocks(tmp_path) -> None:
    """A fixed target is worked in units bigger than the child's 4 KiB blocks: several child blocks per unit."""
    size = 1 * MiB
    rnd = random.Random(4)
    model = bytearray(size)
    with vhdcore.create(tmp_path / "p.vhd", size, type="fixed") as d:
        random_writes(d, model, rnd, 10, max_len=50_000)
    with vhdcore.snapshot(tmp_path / "p.vhd", tmp_path / "c.vhd", block_size=4096) as d:
        random_writes(d, model, rnd, 30, max_len=20_000)
    rep = coalesce(tmp_path / "c.vhd", verify=True)
    assert rep.block_size == 64 * 1024
    assert content(tmp_path / "p.vhd") == model


def test_disk_size_not_a_multiple_of_the_block(tmp_path) -> None:
    size = 5 * MiB + 3 * 512
    rnd = random.Random(9)
    model = bytearray(size)
    with vhdcore.create(tmp_path / "p.vhd", size) as d:
        random_writes(d, model, rnd, 5)
    with vhdcore.snapshot(tmp_path / "p.vhd", tmp_path / "c.vhd") as d:
        d.write(size - 4096, rnd.randbytes(4096))
        d.write(4 * MiB, rnd.randbytes(MiB))
        model[size - 4096 :] = d.read(size - 4096, 4096)
        model[4 * MiB : 5 * MiB] = d.read(4 * MiB, MiB)
    coalesce(tmp_path / "c.vhd", verify=True)
    assert content(tmp_path / "p.vhd") == model
    assert_clean(tmp_path / "p.vhd")


def test_small_batches_many_commits(tmp_path) -> None:
    parent, child, model = layered_chain(tmp_path, block_size=512 * 1024, nblocks=24)
    rep = coalesce(child, batch_bytes=1)  # a commit (one sync) per new block, plus the reservation's
    assert rep.blocks_allocated == 8 and rep.syncs >= rep.blocks_allocated + 1
    assert content(parent) == model
    assert_clean(parent)


def test_without_copy_file_range(tmp_path) -> None:
    parent, child, model = layered_chain(tmp_path, target="differencing")
    coalesce(child, use_copy_range=False, verify=True)
    assert content(parent) == model


def test_4k_runs(tmp_path) -> None:
    parent, child, model = layered_chain(tmp_path, run=4096)
    rep = coalesce(child, verify=True)
    assert rep.partial_blocks >= 4
    assert content(parent) == model


# --------------------------------------------------------------------------------------------- several layers


@pytest.mark.parametrize("depth", [2, 3, 5, 8])
@pytest.mark.parametrize("base_type,block_size", [("dynamic", 512 * 1024), ("fixed", 2 * MiB),
                                                  ("dynamic", 2 * MiB)])
def test_collapse_chain_into_base(tmp_path, depth, base_type, block_size) -> None:
    size = 8 * MiB if block_size < MiB else 16 * MiB
    paths, model = build_chain(tmp_path, depth, size=size, block_size=block_size, writes=25, seed=depth,
                               base_type=base_type)
    leaf, base = paths[-1], paths[0]
    assert content(leaf) == model
    rep = coalesce(leaf, into=base, verify=True, remove_child=True)
    assert rep.merged_layers == [str(p) for p in reversed(paths[1:])]
    # deepest first, the child (beside which the journal lies) last
    assert rep.removed == rep.merged_layers[1:][::-1] + rep.merged_layers[:1]
    assert content(base) == model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.vhd"]
    assert_clean(base)
    if base_type == "dynamic":
        assert qemu_raw(base, tmp_path / "b.raw").read_bytes() == bytes(model)


def test_crash_while_deleting_merged_layers_is_finished_by_a_rerun(tmp_path, monkeypatch) -> None:
    # base <- l1 <- l2 <- l3 (leaf) <- grand; coalesce l3 into base, removing l3..l1. The run dies after the first
    # deletion: l1 is gone, so l3's chain no longer opens; coalescing l3 again must finish from the journal.
    C = sys.modules["vhdcore.ops.coalesce"]  # the module (vhdcore.coalesce is the function)

    paths, model = build_chain(tmp_path, 4, size=8 * MiB, block_size=512 * 1024, writes=20, seed=3)
    base, leaf = paths[0], paths[-1]
    gmodel = bytearray(model)
    with vhdcore.snapshot(leaf, tmp_path / "grand.vhd") as g:
        random_writes(g, gmodel, random.Random(5), 4)
    real_unlink = os.unlink
    calls = []

    def dying_unlink(p, *a, **k):
        calls.append(p)
        if len(calls) == 2:
            raise OSError(5, "simulated crash")
        return real_unlink(p, *a, **k)

    monkeypatch.setattr(C.os, "unlink", dying_unlink)
    with pytest.raises(OSError, match="simulated crash"):
        coalesce(leaf, into=base, remove_child=True)
    monkeypatch.setattr(C.os, "unlink", real_unlink)
    assert calls[0] == str(paths[1]) and not paths[1].exists() and leaf.exists()
    assert (tmp_path / f".{leaf.name}.coalesce").exists()
    with pytest.raises(vhdcore.VHDError):  # its chain is broken: only the journal can finish the job
        vhdcore.open(leaf)
    rep = coalesce(leaf, into=base, remove_child=True)
    assert "finished the removal of an interrupted coalesce" in rep.warnings[-1]
    assert rep.relinked == [str(tmp_path / "grand.vhd")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.vhd", "grand.vhd"]
    assert content(base) == model and content(tmp_path / "grand.vhd") == bytes(gmodel)
    assert check(tmp_path / "grand.vhd", chain=True).clean


def test_into_writes_each_sector_once(tmp_path) -> None:
    """Three layers over the same block: the target gets one write for it, from the top layer's sectors."""
    size = 4 * MiB
    with vhdcore.create(tmp_path / "base.vhd", size) as d:
        pass
    model = bytearray(size)
    prev = tmp_path / "base.vhd"
    for i in range(3):
        p = tmp_path / f"l{i}.vhd"
        with vhdcore.snapshot(prev, p) as d:
            data = bytes([i + 1]) * MiB
            d.write(i * 256 * 1024, data)
            model[i * 256 * 1024 : i * 256 * 1024 + MiB] = data
        prev = p
    rep = coalesce(prev, into=tmp_path / "base.vhd", verify=True)
    assert rep.blocks_copied == 1 and rep.partial_blocks == 1 and rep.blocks_allocated == 1
    assert rep.bytes_copied == MiB + 2 * 256 * 1024  # the union of the layers' sectors, each once
    assert content(tmp_path / "base.vhd") == model


def test_into_intermediate_ancestor(tmp_path) -> None:
    paths, model = build_chain(tmp_path, 4, seed=11)
    leaf = paths[-1]
    coalesce(leaf, into=paths[1], remove_child=True)
    assert content(paths[1]) == model
    assert not paths[2].exists() and not paths[3].exists() and paths[0].exists()


def test_into_refuses_non_ancestor(tmp_path) -> None:
    paths, _ = build_chain(tmp_path, 2)
    with vhdcore.create(tmp_path / "other.vhd", 8 * MiB):
        pass
    with pytest.raises(ChainError, match="not an ancestor"):
        coalesce(paths[-1], into=tmp_path / "other.vhd")
    with pytest.raises(ChainError, match="into itself"):
        coalesce(paths[-1], into=paths[-1])


# --------------------------------------------------------------------------------------------- property test


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depth=st.integers(2, 4), into_base=st.booleans(), base_type=st.sampled_from(["dynamic", "fixed"]),
       block_kib=st.sampled_from([512, 2048]), seed=st.integers(0, 2**32 - 1), grandchildren=st.integers(0, 2))
def test_random_chains(depth, into_base, base_type, block_kib, seed, grandchildren) -> None:
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        size = 8 * MiB
        paths, model = build_chain(d, depth, size=size, block_size=block_kib * 1024, writes=15, seed=seed,
                                   base_type=base_type)
        leaf = paths[-1]
        rnd = random.Random(seed)
        views = {}
        for g in range(grandchildren):
            gp = d / f"g{g}.vhd"
            gm = bytearray(model)
            with vhdcore.snapshot(leaf, gp) as disk:
                random_writes(disk, gm, rnd, 5)
            views[gp] = bytes(gm)
        target = paths[0] if into_base else paths[-2]
        rep = coalesce(leaf, into=target if into_base else None, remove_child=True, verify=True)
        assert content(target) == model
        assert sorted(rep.relinked) == sorted(str(p) for p in views)
        for gp, want in views.items():
            assert content(gp) == want
            assert check(gp, chain=True).clean
        assert not leaf.exists()


# --------------------------------------------------------------------------------------------- zero-awareness


def test_zero_child_block_over_nothing_allocates_nothing(tmp_path) -> None:
    with vhdcore.create(tmp_path / "p.vhd", 64 * MiB):
        pass
    with vhdcore.snapshot(tmp_path / "p.vhd", tmp_path / "c.vhd") as d:
        d.write(0, bytes(8 * MiB))
    size = (tmp_path / "p.vhd").stat().st_size
    rep = coalesce(tmp_path / "c.vhd")
    assert rep.zero_blocks_skipped == 4 and rep.blocks_allocated == 0 and rep.blocks_copied == 0
    assert (tmp_path / "p.vhd").stat().st_size == size
    assert_clean(tmp_path / "p.vhd")


def test_zero_child_block_over_differencing_parent_is_written(tmp_path) -> None:
    with vhdcore.create(tmp_path / "b.vhd", 8 * MiB) as d:
        d.write(0, b"\xff" * (2 * MiB))
    vhdcore.snapshot(tmp_path / "b.vhd", tmp_path / "p.vhd").close()
    with vhdcore.snapshot(tmp_path / "p.vhd", tmp_path / "c.vhd") as d:
        d.write(0, bytes(4 * MiB))
    rep = coalesce(tmp_path / "c.vhd", verify=True)
    # block 0 hides the base's 0xff: written; block 1 has nothing under it: skipped
    assert rep.blocks_allocated == 1 and rep.zero_blocks_skipped == 1
    assert content(tmp_path / "p.vhd") == bytes(8 * MiB)


# --------------------------------------------------------------------------------------------- safety


@pytest.mark.backend_independent
def test_refuses_when_parent_has_other_children(tmp_path) -> None:
    paths, model = build_chain(tmp_path, 2)
    sibling = tmp_path / "sibling.vhd"
    vhdcore.snapshot(paths[0], sibling).close()
    before = content(paths[0])
    with pytest.raises(UnsafeOperationError, match="sibling.vhd") as e:
        coalesce(paths[1])
    assert "other-children" in str(e.value)
    assert content(paths[0]) == before
    rep = coalesce(paths[1], force=["other-children"])
    assert any("sibling.vhd" in w for w in rep.warnings)
    assert content(paths[0]) == model


@pytest.mark.backend_independent
def test_sibling_in_another_searched_directory(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths, _ = build_chain(tmp_path / "a", 2)
    vhdcore.snapshot(paths[0], tmp_path / "b" / "s.vhd").close()
    coalesce(paths[1])  # b is not searched
    with pytest.raises(UnsafeOperationError):
        coalesce(paths[1], search_dirs=[tmp_path / "a", tmp_path / "b"])


@pytest.mark.backend_independent
def test_a_copy_of_the_parent_elsewhere_is_not_a_dependent(tmp_path) -> None:
    """A sibling that records the parent's id but resolves to a copy of it in its own directory."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths, model = build_chain(tmp_path / "a", 2)
    shutil.copy(paths[0], tmp_path / "b" / "base.vhd")
    vhdcore.snapshot(tmp_path / "b" / "base.vhd", tmp_path / "b" / "s.vhd").close()
    coalesce(paths[1], search_dirs=[tmp_path / "a", tmp_path / "b"])
    assert content(paths[0]) == model


@pytest.mark.backend_independent
def test_intermediate_layer_with_other_children_is_refused(tmp_path) -> None:
    paths, _ = build_chain(tmp_path, 3)
    vhdcore.snapshot(paths[1], tmp_path / "side.vhd").close()
    with pytest.raises(UnsafeOperationError, match="side.vhd") as e:
        coalesce(paths[2], into=paths[0])  # child1's view would change under side.vhd
    assert e.value.path == str(paths[1])
    with pytest.raises(UnsafeOperationError, match="side.vhd"):
        coalesce(paths[2])  # child1 is the target itself


@pytest.mark.backend_independent
def test_refuses_parent_with_other_unique_id(tmp_path) -> None:
    paths, model = build_chain(tmp_path, 2)
    set_footer(paths[0], unique_id=uuid.uuid4())
    with pytest.raises(UnsafeOperationError, match="unique id") as e:
        coalesce(paths[1])
    assert e.value.field == "header.parent_unique_id" and "parent-id" in str(e.value)
    rep = coalesce(paths[1], force=["parent-id"])
    assert any("unique id" in w for w in rep.warnings)
    assert content(paths[0]) == model


@pytest.mark.backend_independent
@pytest.mark.parametrize("which", ["child", "parent"])
def test_refuses_saved_state(tmp_path, which) -> None:
    paths, model = build_chain(tmp_path, 2)
    set_footer(paths[1] if which == "child" else paths[0], saved_state=1)
    with pytest.raises(UnsafeOperationError, match="saved state") as e:
        coalesce(paths[1])
    assert e.value.field == "footer.saved_state"
    coalesce(paths[1], force=["saved-state"])
    assert content(paths[0]) == model


@pytest.mark.backend_independent
def test_parent_timestamp_is_a_warning(tmp_path) -> None:
    paths, model = build_chain(tmp_path, 2)
    set_header(paths[1], parent_timestamp=12345)
    rep = coalesce(paths[1])
    assert any("time stamp" in w for w in rep.warnings)
    assert content(paths[0]) == model


@pytest.mark.backend_independent
def test_refuses_child_larger_than_parent(tmp_path) -> None:
    with vhdcore.create(tmp_path / "p.vhd", 8 * MiB):
        pass
    vhdcore.snapshot(tmp_path / "p.vhd", tmp_path / "c.vhd").close()
    set_footer(tmp_path / "p.vhd", current_size=4 * MiB, original_size=4 * MiB)  # the parent shrank
    with pytest.raises(UnsupportedFeatureError, match="larger than its parent"):
        coalesce(tmp_path / "c.vhd")


@pytest.mark.backend_independent
def test_refuses_non_differencing_and_bad_force(tmp_path) -> None:
    with vhdcore.create(tmp_path / "p.vhd", 4 * MiB):
        pass
    with pytest.raises(ChainError, match="not a differencing disk"):
        coalesce(tmp_path / "p.vhd")
    with pytest.raises(ValueError, match="unknown force"):
        coalesce(tmp_path / "p.vhd", force=["everything"])


@pytest.mark.backend_independent
def test_locks(tmp_path) -> None:
    paths, _ = build_chain(tmp_path, 2)
    with vhdcore.open(paths[1], "r+"):
        with pytest.raises(LockError):
            coalesce(paths[1])
    with vhdcore.open(paths[0], "r+"):
        with pytest.raises(LockError):
            coalesce(paths[1])
    vhdcore.snapshot(paths[1], tmp_path / "g.vhd").close()
    with vhdcore.open(tmp_path / "g.vhd", "r+"):  # a grandchild in use cannot be relinked: refused up front
        with pytest.raises(LockError):
            coalesce(paths[1], remove_child=True)
    assert paths[1].exists()


# --------------------------------------------------------------------------------------------- verification


def _damage_during(parent, victim, at_call=2):
    """A progress callback that overwrites 8 bytes of the target file at ``victim`` on the ``at_call``-th call of
    the merge (verify's own hashing passes report progress too, as state "verifying")."""
    calls = []

    def progress(done, total, **info):
        if info.get("state") != "coalescing":
            return
        calls.append((done, total))
        if len(calls) == at_call:
            fd = os.open(parent, os.O_WRONLY)
            os.pwrite(fd, b"garbage!", victim)
            os.close(fd)

    return progress, calls


def test_verification_names_the_first_differing_offset(tmp_path) -> None:
    """Bytes written wrong into the target (simulated: overwritten from the progress callback once block 0 is
    merged, under data the child holds): --verify names the exact offset."""
    parent, child, model = layered_chain(tmp_path, target="fixed")
    victim = 4096 + 512 * 7  # block 0 is a full child block, merged first
    progress, calls = _damage_during(parent, victim)
    with pytest.raises(VerificationError) as e:
        coalesce(child, verify=True, progress=progress)
    assert e.value.offset == victim and e.value.path == str(parent) and e.value.field == "content"
    assert calls[-1][0] == calls[-1][1] > 0
    assert content(child) == model  # the child's view hides the damage: nothing was lost


def test_verification_catches_damage_the_child_sees_too(tmp_path) -> None:
    """Damage under a sector the child does not hold changes the child's view as well: still caught (the offset
    is then the start of the block)."""
    parent, child, model = layered_chain(tmp_path, target="fixed")
    victim = 3 * 2 * MiB + 65536 + 512 * 7  # inside block 3, between two runs the child holds
    with Image(child) as c:
        bm = c.read_bitmap(3)
        sec = (victim - 3 * 2 * MiB) // 512
        assert not (bm[sec // 8] >> (7 - sec % 8)) & 1
    progress, _ = _damage_during(parent, victim)
    with pytest.raises(VerificationError) as e:
        coalesce(child, verify=True, progress=progress)
    assert 3 * 2 * MiB <= e.value.offset <= victim


def test_progress_reports_bytes(tmp_path) -> None:
    parent, child, model = layered_chain(tmp_path)
    seen = []
    coalesce(child, progress=lambda d, t: seen.append((d, t)))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


# --------------------------------------------------------------------------------------------- relinking


def test_relink_keeps_grandchildren_views(tmp_path) -> None:
    paths, model = build_chain(tmp_path, 3)
    rnd = random.Random(1)
    views = {}
    for name in ("g1.vhd", "g2.vhd"):
        gm = bytearray(model)
        with vhdcore.snapshot(paths[-1], tmp_path / name) as d:
            random_writes(d, gm, rnd, 10)
        views[tmp_path / name] = bytes(gm)
    rep = coalesce(paths[-1], remove_child=True)
    assert sorted(rep.relinked) == sorted(str(p) for p in views)
    for p, want in views.items():
        assert content(p) == want
        with vhdcore.open(p) as d:
            assert d.layers[1].path == str(paths[1]) and not d.warnings
            h = d.leaf.header
            assert h.parent_unique_id == d.layers[1].unique_id
            assert h.parent_unicode_name == "child1.vhd"
            assert {src for src, _ in d.leaf.parent_candidates()} == {"W2ru", "MacX", "W2ku", "name"}
        assert check(p, chain=True).clean
    assert not (tmp_path / ".child2.vhd.coalesce").exists()


def test_relink_across_directories(tmp_path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "leaf").mkdir()
    paths, model = build_chain(tmp_path / "base", 2)
    child = tmp_path / "leaf" / "c.vhd"
    with vhdcore.snapshot(paths[1], child) as d:
        d.write(0, b"x" * 4096)
        model[:4096] = b"x" * 4096
    g = tmp_path / "leaf" / "g.vhd"
    vhdcore.snapshot(child, g, parent_dirs=[tmp_path / "base"]).close()
    coalesce(child, remove_child=True, parent_dirs=[tmp_path / "base"])
    assert content(g, parent_dirs=[tmp_path / "base"]) == model


# --------------------------------------------------------------------------------------------- CLI


def test_cli_json(tmp_path, capsys) -> None:
    parent, child, model = layered_chain(tmp_path, target="differencing")
    assert cli.main(["coalesce", str(child), "--verify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("blocks_copied", "bytes_copied", "blocks_allocated", "destination_growth", "shadowed_bytes",
                "shadowed_sectors", "seconds", "throughput", "verify_seconds", "zero_blocks_skipped"):
        assert key in out
    assert out["verified"] is True and out["destination"] == str(parent) and out["source"] == str(child)
    assert content(parent) == model


@pytest.mark.backend_independent
def test_cli_refusal_is_one_line(tmp_path) -> None:
    paths, _ = build_chain(tmp_path, 2)
    vhdcore.snapshot(paths[0], tmp_path / "s.vhd").close()
    r = subprocess.run([sys.executable, "-m", "vhdcore", "coalesce", str(paths[1])], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "--force other-children" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vhdcore", "coalesce", str(paths[1]), "--force", "other-children",
                        "--progress", "json", "--remove-child"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (r.stdout + r.stderr).splitlines() if x.startswith("{")]
    assert lines[-1]["done"] == lines[-1]["total"] > 0 and lines[-1]["state"] == "complete"
    assert [x["state"] for x in lines].count("complete") == 1 and lines[-2]["state"] == "coalescing"
    assert "removed" in r.stdout and not paths[1].exists()


@pytest.mark.backend_independent
def test_cli_into(tmp_path, capsys) -> None:
    paths, model = build_chain(tmp_path, 3)
    assert cli.main(["coalesce", str(paths[-1]), "--into", str(paths[0])]) == 0
    assert "copied" in capsys.readouterr().out
    assert content(paths[0]) == model

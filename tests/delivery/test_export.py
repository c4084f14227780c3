"""vhdcore.export / vhdcore verify on local destinations: every package and compression, checked with the
standard tools (gzip, zstd, tar, qemu-img) against an in-memory model of the chain's content."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import vhdcore
from vhdcore.destination import DestinationError
from vhdcore.ops.check import check
from vhdcore.ops.convert import convert
from vhdcore.delivery.export import ExportReport, export, verify
from vhdcore.format.structs import DynamicHeader, Footer, ParentLocator
from support.exportcheck import EXT, assert_package_holds, decompress
from support.vhdtest import build_chain, qemu_raw, run

KiB = 1024
MiB = 1024 * KiB
# Not a whole number of blocks nor of MiB: the last block is partial and the fixed package must round up.
SIZE = 8 * MiB + 3 * 512
BLOCK = 512 * KiB


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A base and two differencing children with random writes; (leaf, the virtual content)."""
    d = tmp_path_factory.mktemp("chain")
    paths, model = build_chain(d, 3, size=SIZE, block_size=BLOCK, writes=25, seed=11)
    return paths[-1], bytes(model)


def file_digests(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    return {a: hashlib.new(a, data).hexdigest() for a in ("md5", "sha256", "sha512")}


def files_sha(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("package", ["vhd", "fixed", "raw", "chain-tar"])
def test_every_package_and_compression_reads_back_with_standard_tools(
        chain: tuple[Path, bytes], tmp_path: Path, package: str, compression: str) -> None:
    leaf, model = chain
    before = files_sha(leaf.parent)
    dest = tmp_path / f"image.{package}{EXT[compression]}"
    rep = export(leaf, dest, package=package, fsync=False)  # compression "auto": from the extension
    assert isinstance(rep, ExportReport) and rep.compression == compression and rep.package == package
    assert files_sha(leaf.parent) == before, "the inputs must never change"
    assert rep.digests == file_digests(dest) and rep.size == dest.stat().st_size
    assert rep.glance_properties()["checksum"] == rep.digests["md5"]
    assert rep.manifest_path == str(dest) + ".xxh3.json" and os.path.exists(rep.manifest_path)
    plain = decompress(dest, compression, tmp_path / "plain")
    assert plain.stat().st_size == rep.package_size
    assert_package_holds(plain, package, model, tmp_path, depth=3)
    # the copy checks out against the source, against the manifest, and the manifest against the source
    assert verify(dest, leaf).match
    assert verify(dest, rep.manifest_path).match
    assert verify(rep.manifest_path, leaf).match


def test_vhd_package_has_the_layout_convert_writes(chain: tuple[Path, bytes], tmp_path: Path) -> None:
    leaf, _ = chain
    conv = tmp_path / "convert.vhd"
    convert(leaf, conv, to="dynamic")
    cf = Footer.parse(conv.read_bytes()[-512:])
    rep = export(leaf, tmp_path / "export.vhd", unique_id=cf.unique_id, timestamp=cf.timestamp, fsync=False)
    a, b = conv.read_bytes(), (tmp_path / "export.vhd").read_bytes()
    assert len(a) == len(b) == rep.package_size
    # Same bytes except the gap between the BAT and the first block, where convert leaves the footer it
    # wrote before any block existed (the stream leaves zeros: nothing reads that gap).
    with vhdcore.open(conv) as d:
        gap = (1536 + d.leaf.max_table_entries * 4 + 511) // 512 * 512, int(d.leaf.bat[d.leaf.allocated_blocks()].min()) * 512
    assert a[: gap[0]] == b[: gap[0]] and a[gap[1]:] == b[gap[1]:]
    assert not any(b[gap[0]: gap[1]])
    with vhdcore.open(leaf) as src:
        assert rep.data_blocks == len(set(e.offset // BLOCK for e in src.allocated_extents())
                                       | {(e.end - 1) // BLOCK for e in src.allocated_extents()})
        assert rep.bytes_read <= src.size


def test_unallocated_space_is_not_read(tmp_path: Path) -> None:
    """Sparse disks: the vhd and raw packages read only the written blocks, and raw reports the zeros."""
    path = tmp_path / "sparse.vhd"
    with vhdcore.create(path, 64 * 1024 * MiB) as d:
        for off in (0, 5 * 1024 * MiB + 4096, 64 * 1024 * MiB - 2 * MiB):
            d.write(off, b"\xa5" * 300_000)
    rep = export(path, tmp_path / "sparse.vhd.zst", fsync=False)
    assert rep.data_blocks == 3 and rep.bytes_read == 3 * 2 * MiB and rep.size < 100 * KiB
    # BAT of 32768 entries, three page-aligned blocks, footer
    first = (1536 + 32768 * 4 + 512 + 4095) // 4096 * 4096 - 512
    assert rep.package_size == first + 2 * (2 * MiB + 4096) + 512 + 2 * MiB + 512
    assert verify(tmp_path / "sparse.vhd.zst", path).match
    small = tmp_path / "small.vhd"
    with vhdcore.create(small, 256 * MiB) as d:
        d.write(100 * MiB + 3, b"\x5a" * 70_000)
    raw = export(small, tmp_path / "small.raw.zst", package="raw", fsync=False)
    held = 137 * 512  # the sectors written (a clear bitmap bit reads as zeros without reading the block)
    assert raw.bytes_read == held and raw.package_size == 256 * MiB
    assert raw.zero_ranges == [(0, 100 * MiB), (100 * MiB + held, 156 * MiB - held)]
    assert verify(tmp_path / "small.raw.zst", small).match


def test_fixed_zero_ranges_are_zero_in_the_output(chain: tuple[Path, bytes], tmp_path: Path) -> None:
    leaf, model = chain
    rep = export(leaf, tmp_path / "f.vhd", package="fixed", fsync=False)
    data = (tmp_path / "f.vhd").read_bytes()
    assert rep.zero_ranges and rep.zero_ranges[-1][0] + rep.zero_ranges[-1][1] == len(data) - 512
    for off, n in rep.zero_ranges:
        assert n >= 512 and not any(data[off: off + n])
    # every range the chain leaves unallocated (64 KiB or more) is among them
    with vhdcore.open(leaf) as d:
        for e in d.extents():
            if e.layer is None and e.length >= 64 * KiB:
                assert any(o <= e.offset and e.end <= o + n for o, n in rep.zero_ranges), e


def _locators(path: Path) -> tuple[DynamicHeader, dict[bytes, str]]:
    raw = path.read_bytes()
    h = DynamicHeader.parse(raw[512:1536])
    out = {}
    for loc in h.parent_locators:
        if loc.is_used:
            out[loc.platform_code] = loc.decode_path(raw[loc.data_offset: loc.data_offset + loc.data_length])
    return h, out


def test_chain_tar_relinks_children_in_the_copy_only(chain: tuple[Path, bytes], tmp_path: Path) -> None:
    leaf, model = chain
    rep = export(leaf, tmp_path / "c.tar", package="chain-tar", fsync=False)
    assert rep.warnings == []
    out = tmp_path / "x"
    out.mkdir()
    with tarfile.open(tmp_path / "c.tar") as tf:
        assert tf.getnames() == ["0.vhd", "1.vhd", "2.vhd"]
        tf.extractall(out, filter="data")
    for i in (0, 1):
        h, locs = _locators(out / f"{i}.vhd")
        assert h.parent_unicode_name == f"{i + 1}.vhd"
        assert locs == {b"W2ku": f".\\{i + 1}.vhd", b"W2ru": f".\\{i + 1}.vhd", b"MacX": f"file://./{i + 1}.vhd"}
    # the originals still name the original files
    _, orig = _locators(leaf)
    assert orig[b"W2ru"].endswith("child1.vhd")
    # only headers and locator sectors differ from the originals; the base is identical
    assert (out / "2.vhd").read_bytes() == (leaf.parent / "base.vhd").read_bytes()
    a, b = leaf.read_bytes(), (out / "0.vhd").read_bytes()
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    h = DynamicHeader.parse(a[512:1536])
    spans = [(512, 1536)] + [(lo.data_offset, lo.data_offset + lo.data_space_bytes) for lo in h.parent_locators
                             if lo.is_used]
    assert all(any(s <= int(x) < e for s, e in spans) for x in diff)
    # moved elsewhere, the extracted chain still opens: it names its parents relative to itself
    moved = tmp_path / "elsewhere"
    (out).rename(moved)
    with vhdcore.open(moved / "0.vhd") as disk:
        assert len(disk.layers) == 3 and disk.read(0, disk.size) == model


def _rewrite_header(path: Path, **changes) -> None:
    raw = bytearray(path.read_bytes())
    h = DynamicHeader.parse(bytes(raw[512:1536]))
    locs = list(h.parent_locators)
    for i, loc in changes.pop("locators", {}).items():
        locs[i] = loc
    import dataclasses
    h = dataclasses.replace(h, parent_locators=tuple(locs), **changes)
    raw[512:1536] = h.pack()
    path.write_bytes(raw)


def test_chain_tar_moves_or_drops_a_locator_with_unusable_space(tmp_path: Path) -> None:
    paths, model = build_chain(tmp_path, 2, size=4 * MiB, block_size=BLOCK, writes=10, seed=3)
    child = paths[-1]
    h, _ = _locators(child)
    slots = {loc.platform_code: i for i, loc in enumerate(h.parent_locators) if loc.is_used}
    w2ku = h.parent_locators[slots[b"W2ku"]]
    # W2ku now points past the end of the file: vhdcore still opens the chain through W2ru, and its old
    # sector is free for the tar copy to move it back into.
    bogus = ParentLocator(b"W2ku", w2ku.data_space, w2ku.data_length, 1 << 40)
    _rewrite_header(child, locators={slots[b"W2ku"]: bogus})
    with vhdcore.open(child) as d:
        assert d.read(0, d.size) == model
    rep = export(child, tmp_path / "m.tar", package="chain-tar", fsync=False)
    assert any("moved" in w for w in rep.warnings)
    out = tmp_path / "x"
    out.mkdir()
    run(["tar", "-xf", tmp_path / "m.tar", "-C", out])
    _, locs = _locators(out / "0.vhd")
    assert locs[b"W2ku"] == ".\\1.vhd"
    assert check(out / "0.vhd", chain=True).clean
    # Now leave no free sector: MacX's space grows over W2ku's old sector (the slots are MacX, W2ku, W2ru, then
    # the first block). The copy must drop W2ku; W2ru, MacX and the parent name still find the parent.
    macx = h.parent_locators[slots[b"MacX"]]
    assert macx.data_offset + 512 == w2ku.data_offset
    _rewrite_header(child, locators={
        slots[b"MacX"]: ParentLocator(b"MacX", 1024, macx.data_length, macx.data_offset),
        slots[b"W2ku"]: ParentLocator(b"W2ku", 0, 0, 0)})
    assert check(child).codes() == {"LOCATOR_LENGTH", "LOCATOR_OUTSIDE_FILE"}  # the zero-space W2ku
    rep = export(child, tmp_path / "d.tar", package="chain-tar", fsync=False)
    assert any("dropped" in w for w in rep.warnings), rep.warnings
    out2 = tmp_path / "y"
    out2.mkdir()
    run(["tar", "-xf", tmp_path / "d.tar", "-C", out2])
    _, locs = _locators(out2 / "0.vhd")
    assert b"W2ku" not in locs and locs[b"W2ru"] == ".\\1.vhd" and locs[b"MacX"] == "file://./1.vhd"
    assert check(out2 / "0.vhd", chain=True).clean
    with vhdcore.open(out2 / "0.vhd") as d:
        assert d.read(0, d.size) == model


def test_verify_names_the_first_differing_offset(chain: tuple[Path, bytes], tmp_path: Path) -> None:
    leaf, model = chain
    rep = export(leaf, tmp_path / "r.raw", package="raw", fsync=False)
    raw = bytearray((tmp_path / "r.raw").read_bytes())
    at = 3 * MiB + 12345
    raw[at] ^= 0x40
    bad = tmp_path / "bad.raw.zst"
    subprocess.run(["zstd", "-q", "-o", str(bad)], input=bytes(raw), check=True)
    v = verify(bad, leaf)
    assert not v.match and v.offset == at
    # against the manifest the block is named
    v = verify(bad, rep.manifest_path)
    assert not v.match and v.offset == at // (2 * MiB) * (2 * MiB)
    # the CLI says so and exits 1; a good copy exits 0
    r = subprocess.run([sys.executable, "-m", "vhdcore", "verify", str(bad), str(leaf)], capture_output=True, text=True)
    assert r.returncode == 1 and f"offset {at}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "vhdcore", "verify", str(tmp_path / "r.raw"), str(leaf)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # a truncated copy differs where it ends
    short = tmp_path / "short.raw"
    short.write_bytes(bytes(raw[: 5 * MiB]))
    v = verify(short, leaf)
    assert not v.match and v.offset == min(at, 5 * MiB)


def test_verify_catches_a_changed_manifest_and_a_damaged_vhd_stream(chain: tuple[Path, bytes], tmp_path: Path) -> None:
    leaf, _ = chain
    rep = export(leaf, tmp_path / "v.vhd.gz", fsync=False)
    doc = json.loads(Path(rep.manifest_path).read_text())
    doc["blocks"][2][2] = "0" * 32
    forged = tmp_path / "forged.xxh3.json"
    forged.write_text(json.dumps(doc))
    v = verify(forged, leaf)
    assert not v.match and v.offset == 2 * doc["block_size"]
    # flip a byte inside a data block of the (decompressed) VHD stream
    plain = bytearray(decompress(tmp_path / "v.vhd.gz", "gzip", tmp_path / "v.vhd").read_bytes())
    with vhdcore.open(tmp_path / "v.vhd") as d:
        b = int(d.leaf.allocated_blocks()[1])
        pos = d.leaf.block_file_offset(b) + 777
        virt = b * d.leaf.block_size + 777
    plain[pos] ^= 1
    damaged = tmp_path / "damaged.vhd.zst"
    subprocess.run(["zstd", "-q", "-o", str(damaged)], input=bytes(plain), check=True)
    v = verify(damaged, leaf)
    assert not v.match and v.offset == virt and v.target_kind == "vhd stream"


def test_verify_refuses_garbage_with_a_vhderror(tmp_path: Path, chain: tuple[Path, bytes]) -> None:
    leaf, _ = chain
    bad = tmp_path / "bad.xxh3.json"
    bad.write_text('{"algorithm": "xxh3_128", "block_size": 4096, "size": 8192, "blocks": []}')
    with pytest.raises(vhdcore.InvalidFormatError):
        verify(bad, leaf)
    # a VHD stream whose header checksum was damaged
    rep = export(leaf, tmp_path / "h.vhd", fsync=False)
    raw = bytearray((tmp_path / "h.vhd").read_bytes())
    raw[512 + 40] ^= 1
    z = tmp_path / "h.vhd.zst"
    subprocess.run(["zstd", "-q", "-o", str(z)], input=bytes(raw), check=True)
    with pytest.raises(vhdcore.ChecksumError):
        verify(z, leaf)
    r = subprocess.run([sys.executable, "-m", "vhdcore", "verify", str(z), str(leaf)], capture_output=True, text=True)
    assert r.returncode == 2 and "checksum" in r.stderr
    assert rep.package_size
    # damaged compressed streams: a cut gzip member, a zstd frame with a flipped byte
    export(leaf, tmp_path / "g.raw.gz", package="raw", fsync=False)
    data = (tmp_path / "g.raw.gz").read_bytes()
    (tmp_path / "cut.raw.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(vhdcore.CorruptImageError, match="stream"):
        verify(tmp_path / "cut.raw.gz", leaf)
    export(leaf, tmp_path / "z.raw.zst", package="raw", fsync=False)
    zdata = bytearray((tmp_path / "z.raw.zst").read_bytes())
    zdata[len(zdata) // 2] ^= 0xFF
    (tmp_path / "flip.raw.zst").write_bytes(zdata)
    try:
        v = verify(tmp_path / "flip.raw.zst", leaf)
    except vhdcore.CorruptImageError:
        pass  # zstd noticed (block or content checksum)
    else:
        assert not v.match


def test_progress_goes_through_the_imaging_states(chain: tuple[Path, bytes], tmp_path: Path) -> None:
    leaf, _ = chain
    seen: list[tuple[int, int | None, dict]] = []
    rep = export(leaf, tmp_path / "p.vhd.zst", fsync=False,
                 progress=lambda done, total, **info: seen.append((done, total, info)))
    states = [str(getattr(i["state"], "value", i["state"])) for _, _, i in seen]
    assert states[0] == "preparing" and states[-1] == "complete"
    assert set(states) == {"preparing", "saving", "complete"}
    saving = [(d, t, i) for d, t, i in seen if i["state"] == "saving"]
    assert all(t == rep.package_size for _, t, _ in saving)
    assert [d for d, _, _ in saving] == sorted(d for d, _, _ in saving)
    last = seen[-1][2]
    assert last["read"] == rep.bytes_read and last["compressed"] == rep.size and last["sent"] == rep.size
    # the CLI's JSON lines: the states, then one complete event at 100 % of the job
    r = subprocess.run([sys.executable, "-m", "vhdcore", "export", str(leaf), str(tmp_path / "q.vhd.gz"),
                        "--progress", "json", "--no-fsync", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stderr.splitlines()]
    assert lines[0]["state"] == "preparing" and lines[0]["command"] == "export"
    assert lines[-1]["state"] == "complete" and lines[-1]["task_percent"] == 100.0
    assert [x["state"] for x in lines].count("complete") == 1
    assert any(x["state"] == "saving" and 0.0 <= x["task_percent"] <= 100.0 for x in lines)
    doc = json.loads(r.stdout)
    assert doc["compression"] == "gzip" and doc["digests"]["md5"] == hashlib.md5(
        (tmp_path / "q.vhd.gz").read_bytes()).hexdigest()


def test_progress_bar_on_a_terminal(chain: tuple[Path, bytes], tmp_path: Path) -> None:
    import io

    from vhdcore.progress import TerminalBar

    screen = io.StringIO()
    bar = TerminalBar("export", stream=screen, min_interval=0, force_tty=True)
    export(chain[0], tmp_path / "bar.vhd.zst", fsync=False, progress=bar)
    bar.finish()
    lines = screen.getvalue().split("\r")
    assert any("preparing" in x for x in lines) and any("saving" in x for x in lines)
    assert "100.0%" in lines[-1] and "complete" in lines[-1]


@pytest.mark.backend_independent
def test_bad_arguments_are_refused_before_anything_is_written(chain: tuple[Path, bytes], tmp_path: Path) -> None:
    leaf, _ = chain
    with pytest.raises(ValueError, match="package"):
        export(leaf, tmp_path / "a", package="qcow2")
    with pytest.raises(ValueError, match="compression"):
        export(leaf, tmp_path / "a", compression="lz4")
    with pytest.raises(ValueError, match="long"):
        export(leaf, tmp_path / "a.gz", long=True)
    with pytest.raises(vhdcore.ParentNotFoundError):
        export(_orphan(leaf, tmp_path), tmp_path / "a")
    with pytest.raises(DestinationError, match="file of the source chain"):
        export(tmp_path / "orphan" / "leaf.vhd", tmp_path / "orphan" / "leaf.vhd", parent_dirs=[leaf.parent],
               overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["orphan"]


def _orphan(leaf: Path, tmp_path: Path) -> Path:
    d = tmp_path / "orphan"
    d.mkdir()
    (d / "leaf.vhd").write_bytes(leaf.read_bytes())
    return d / "leaf.vhd"


def test_a_failing_read_leaves_no_destination(tmp_path: Path) -> None:
    """The chain's parent is truncated after the export opened it: the export fails, nothing is left."""
    paths, _ = build_chain(tmp_path, 2, size=16 * MiB, block_size=BLOCK, writes=40, seed=5)
    out = tmp_path / "out"
    out.mkdir()
    seen = []

    def cut(done: int, total: int | None, **info) -> None:
        if info["state"] == "saving" and done and not seen:
            seen.append(done)
            os.truncate(paths[0], 4096)

    with pytest.raises(vhdcore.CorruptImageError):
        export(paths[-1], out / "img.vhd.zst", progress=cut, fsync=False)
    assert os.listdir(out) == []


def test_zero_allocated_block_and_differencing_sector_runs(tmp_path: Path) -> None:
    """Blocks allocated but all zeros still go out (the BAT was sent first); sector runs of a child that hide a
    parent's data with zeros are honoured."""
    base = tmp_path / "b.vhd"
    with vhdcore.create(base, 4 * MiB, block_size=BLOCK) as d:
        d.write(0, b"\x11" * (2 * MiB))
        d.write(3 * MiB, bytes(BLOCK))  # allocated, zero
    child = tmp_path / "c.vhd"
    with vhdcore.snapshot(base, child) as d:
        d.write(4096, bytes(1024))  # zeros over the parent's data
        d.write(1 * MiB + 512, b"\x22" * 512)
    expect = bytearray(4 * MiB)
    expect[: 2 * MiB] = b"\x11" * (2 * MiB)
    expect[4096:5120] = bytes(1024)
    expect[MiB + 512: MiB + 1024] = b"\x22" * 512
    for pkg in ("vhd", "fixed", "raw"):
        dest = tmp_path / f"o.{pkg}"
        rep = export(child, dest, package=pkg, fsync=False)
        if pkg == "raw":
            assert dest.read_bytes() == expect
        else:
            assert qemu_raw(dest, tmp_path / "q.raw").read_bytes()[: 4 * MiB] == expect
        if pkg == "vhd":
            assert rep.data_blocks == 5
        assert verify(dest, child).match
    # another block size than the chain's: 2 MiB blocks gather the 512 KiB ones
    rep = export(child, tmp_path / "big.vhd", block_size=2 * MiB, fsync=False)
    assert rep.data_blocks == 2
    assert qemu_raw(tmp_path / "big.vhd", tmp_path / "q.raw").read_bytes()[: 4 * MiB] == expect
    with vhdcore.open(tmp_path / "big.vhd") as d:
        assert d.leaf.block_size == 2 * MiB
    # zero_scan leaves the all-zero allocated block out, and is automatic for a fixed source
    rep = export(child, tmp_path / "scan.vhd", zero_scan=True, fsync=False)
    assert rep.data_blocks == 4 and verify(tmp_path / "scan.vhd", child).match
    fixed = tmp_path / "fixed.vhd"
    convert(child, fixed, to="fixed")
    rep = export(fixed, tmp_path / "from-fixed.vhd", block_size=BLOCK, fsync=False)
    assert rep.data_blocks == 4 and verify(tmp_path / "from-fixed.vhd", child).match
    # a disk that is all unallocated: a valid VHD with an empty BAT
    empty = tmp_path / "e.vhd"
    vhdcore.create(empty, 3 * MiB).close()
    rep = export(empty, tmp_path / "e-out.vhd", fsync=False)
    assert rep.data_blocks == 0 and check(tmp_path / "e-out.vhd").clean
    assert qemu_raw(tmp_path / "e-out.vhd", tmp_path / "e.raw").read_bytes() == bytes(3 * MiB)


def test_the_manifest_can_go_elsewhere_or_nowhere(chain: tuple[Path, bytes], tmp_path: Path) -> None:
    leaf, _ = chain
    rep = export(leaf, tmp_path / "a.raw", package="raw", manifest=False, fsync=False)
    assert rep.manifest_path is None and not (tmp_path / "a.raw.xxh3.json").exists()
    m = tmp_path / "m" / "disk.json"
    m.parent.mkdir()
    rep = export(leaf, tmp_path / "b.raw", package="raw", manifest=m, digests=("md5",), fsync=False,
                 manifest_block_size=64 * KiB)
    assert rep.manifest_path == str(m) and set(rep.digests) == {"md5"}
    doc = json.loads(m.read_text())
    assert doc["block_size"] == 64 * KiB and doc["size"] == SIZE
    assert verify(tmp_path / "b.raw", m).match

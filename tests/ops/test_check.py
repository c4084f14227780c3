"""vhdcore check on real files (the corpus, qemu-img's, vhdcore's own chains) and on precise defects."""
from __future__ import annotations

import bz2
import json
import os
import shutil
import struct
import time
import uuid

import pytest

import vhdcore
from vhdcore.cli import main as cli
from vhdcore.ops.check import CODES, ERROR, INFO, WARNING, analyse_file, check
from vhdcore.format.geometry import vhd_timestamp
from vhdcore.format.structs import DiskType

from support.hostile import build as B
from support.vhdtest import MiB, build_chain, random_writes, run

# What the corpus files must give (everything else about them is clean).
CORPUS_FINDINGS = {
    "dfvfs/ext2.vhd": set(),
    "dfvfs/image.vhd": {"FOOTER_CHECKSUM"},  # hand-edited: both footer copies carry a wrong checksum
    "dfvfs/image-differential.vhd": {"FOOTER_CHECKSUM", "HEADER_CHECKSUM"},
    # Windows records the parent's full path as its unicode name; libvhd's check wants the locators' file name
    # ("parent locator 0 name (ntfs-parent.vhd) does not match header name (/Projects/.../ntfs-parent.vhd)").
    "dfvfs/ntfs-differential.vhd": {"PARENT_NAME_LOCATOR_MISMATCH"},
    "dfvfs/ntfs-dynamic.vhd": set(),
    "dfvfs/ntfs-fixed.vhd": set(),
    "dfvfs/ntfs-parent.vhd": set(),
    "qemu/hyperv2012r2-dynamic.vhd": set(),
    "qemu/virtualpc-dynamic.vhd": set(),
}


@pytest.mark.backend_independent
@pytest.mark.parametrize("name", sorted(CORPUS_FINDINGS))
def test_corpus(corpus_dir, name) -> None:
    rep = check(corpus_dir / name, chain=True)
    bad = {f.code for f in rep.findings if f.severity != INFO}
    assert bad == CORPUS_FINDINGS[name], [str(f) for f in rep.findings]
    assert rep.clean == (not CORPUS_FINDINGS[name])
    if name.endswith("differential.vhd"):
        assert len(rep.layers) == 2


@pytest.mark.backend_independent
def test_corpus_disk2vhd(corpus_dir, tmp_path) -> None:
    p = tmp_path / "d2v.vhd"
    with bz2.open(corpus_dir / "qemu" / "d2v-zerofilled.vhd.bz2") as src, open(p, "wb") as dst:
        shutil.copyfileobj(src, dst, 4 * MiB)
    rep = check(p)
    # Disk2vhd records the maximum geometry on a 251 MiB disk: vhd-util check says "geometry too large".
    assert {f.code for f in rep.findings} == {"FOOTER_GEOMETRY_TOO_LARGE"}, [str(f) for f in rep.findings]
    assert rep.warnings[0].offset == os.path.getsize(p) - 512 + 56


def test_qemu_made_files(tmp_path) -> None:
    """qemu-img's dynamic (with data written by qemu-io), fixed and force_size disks are clean."""
    dyn, fixed, forced = tmp_path / "d.vhd", tmp_path / "f.vhd", tmp_path / "e.vhd"
    run(["qemu-img", "create", "-q", "-f", "vpc", dyn, "64M"])
    run(["qemu-io", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0xa5 40M 4k", dyn])
    run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", fixed, "10M"])
    run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "force_size=on", forced, "100M"])
    for p in (dyn, fixed):
        rep = check(p)
        assert rep.clean, (p, [str(f) for f in rep.findings])
    # force_size records the maximum geometry, which libvhd's check rejects below ~127 GiB.
    rep = check(forced)
    assert [(f.code, f.severity, f.field) for f in rep.findings] == [("FOOTER_GEOMETRY_TOO_LARGE", WARNING,
                                                                      "footer.geometry")]
    a = analyse_file(str(dyn))
    assert a.bat is not None and int((a.bat != 0xFFFFFFFF).sum()) == 3  # 2 MiB blocks 0, 1 and 20


def test_vhdcore_chain_clean_on_every_layer(tmp_path) -> None:
    paths, _model = build_chain(tmp_path, depth=4, writes=20)
    rep = check(paths[-1], chain=True)
    assert rep.clean, [str(f) for f in rep.findings]
    assert rep.layers == [str(p) for p in reversed(paths)]
    # qemu-img reads the dynamic base the same way (a real peer agrees the structure is sound).
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", paths[0], tmp_path / "base.raw"])


def test_chain_flag_checks_parents_in_full(tmp_path) -> None:
    paths, _ = build_chain(tmp_path, depth=3, writes=5)
    lay = B.Layout(paths[0], 8 * MiB, DiskType.DYNAMIC, uuid.uuid4(), header_offset=512)
    B.patch_header(lay, checksum=0x1234)  # damage the base's header checksum
    leaf_only = check(paths[-1])
    assert leaf_only.clean, "without --chain a parent's own structure is not examined"
    full = check(paths[-1], chain=True)
    assert [(f.code, f.path) for f in full.errors] == [("HEADER_CHECKSUM", str(paths[0]))]


def test_parent_timestamp_and_dirs(tmp_path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "c").mkdir()
    parent = B.build(tmp_path / "p" / "base.vhd", blocks=(0,))
    child = B.build(tmp_path / "c" / "child.vhd", disk_type=DiskType.DIFFERENCING, parent_uid=parent.unique_id,
                    parent_name="base.vhd", parent_timestamp=123, locators=[(b"W2ru", "base.vhd".encode("utf-16-le"))])
    rep = check(child.path)
    assert rep.codes() == {"PARENT_NOT_FOUND"}
    rep = check(child.path, parent_dirs=[tmp_path / "p"])
    assert rep.codes() == {"PARENT_TIMESTAMP"}
    (w,) = rep.warnings
    assert w.offset == 512 + 56 and w.field == "header.parent_timestamp"


def test_findings_name_offset_and_field(tmp_path) -> None:
    lay = B.build(tmp_path / "d.vhd", blocks=(0, 3))
    B.set_bat(lay, 3, 0x7FFFFFFF)
    B.patch_footer(lay, which="copy", timestamp=vhd_timestamp() + 10 * 86400)
    rep = check(lay.path)
    by = {f.code: f for f in rep.findings}
    f = by["BAT_ENTRY_PAST_EOF"]
    assert (f.severity, f.offset, f.field, f.path) == (ERROR, 1536 + 12, "bat[3]", str(lay.path))
    assert "block 3" in f.message and f.explanation == CODES["BAT_ENTRY_PAST_EOF"][1]
    f = by["FOOTER_COPY_MISMATCH"]
    assert (f.offset, f.repairable) == (0, True) and "timestamp" in f.message


@pytest.mark.backend_independent
def test_future_timestamp_slack(tmp_path) -> None:
    lay = B.build(tmp_path / "d.vhd")
    B.patch_footer(lay, timestamp=vhd_timestamp() + 600)
    assert check(lay.path).clean  # within the default hour of clock skew
    assert "FOOTER_TIMESTAMP_FUTURE" in check(lay.path, time_slack=0).codes()


def test_many_findings_are_capped(tmp_path) -> None:
    lay = B.build(tmp_path / "d.vhd", size=64 * MiB, block_size=64 * 1024, blocks=(0,))
    B.fill_bat(lay, 0x7F)  # 1024 entries all past EOF
    rep = check(lay.path)
    past = [f for f in rep.findings if f.code == "BAT_ENTRY_PAST_EOF"]
    assert len(past) == 20
    assert any(f.code == "TOO_MANY_FINDINGS" and "1004 more" in f.message for f in rep.findings)


def test_writer_in_progress_is_noted(tmp_path) -> None:
    p = tmp_path / "d.vhd"
    with vhdcore.create(p, 4 * MiB):
        assert "FILE_IN_USE" in check(p).codes()
    assert check(p).codes() == set()


def test_large_sparse_disk_checks_fast(tmp_path) -> None:
    """A 2040 GiB disk (1M BAT entries, 300 blocks spread over it): bounded time, no per-entry Python loop."""
    p = tmp_path / "big.vhd"
    size = 2040 * 1024**3
    with vhdcore.create(p, size) as d:
        for i in range(300):
            d.write(i * (size // 300), b"z" * 512)
    t0 = time.perf_counter()
    rep = check(p)
    dt = time.perf_counter() - t0
    assert rep.clean and dt < 2.0, (dt, [str(f) for f in rep.findings])


# --------------------------------------------------------------------------------------------- CLI


def test_cli_exit_status_and_json(tmp_path, capsys) -> None:
    good = tmp_path / "good.vhd"
    with vhdcore.create(good, 4 * MiB) as d:
        d.write(0, b"a" * 4096)
    assert cli.main(["check", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: clean"

    lay = B.build(tmp_path / "bad.vhd", blocks=(1,))
    B.set_bat(lay, 2, 1)
    assert cli.main(["check", "--json", str(lay.path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["clean"] is False and doc["error_count"] == 3 and doc["warnings"] == []
    got = [(f["code"], f["offset"], f["field"]) for f in doc["findings"]]
    assert got == [("BAT_ENTRY_IN_METADATA", 1544, "bat[2]"), ("BAT_ENTRY_IN_METADATA", 1544, "bat[2]"),
                   ("BAT_ENTRY_OVERLAP", 1540, "bat[1]")]
    assert "dynamic header" in doc["findings"][0]["message"] and "BAT" in doc["findings"][1]["message"]
    assert all(f["explanation"] for f in doc["findings"])

    assert cli.main(["check", "--explain", str(lay.path)]) == 1
    out = capsys.readouterr().out
    assert "error   BAT_ENTRY_IN_METADATA [offset 1544 bat[2]]" in out
    assert CODES["BAT_ENTRY_IN_METADATA"][1] in out

    os.chmod(lay.path, 0)
    if os.geteuid() != 0:  # root reads anything
        assert cli.main(["check", str(lay.path)]) == 2


@pytest.mark.backend_independent
def test_cli_subprocess_one_line(tmp_path) -> None:
    """The installed entry point: 'could not check' is one line on stderr and exit status 2."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vhdcore", "check", str(tmp_path / "nope.vhd")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "could not check" in r.stderr


@pytest.mark.backend_independent
def test_every_code_has_severity_and_text() -> None:
    for code, (sev, text) in CODES.items():
        assert sev in (ERROR, WARNING, INFO) and len(text) > 20, code
        assert code == code.upper()


def test_check_reads_structures_not_data(tmp_path) -> None:
    """A disk whose blocks are all unreadable past the metadata is still checked (no block data is read)."""
    lay = B.build(tmp_path / "d.vhd", blocks=(0, 1, 2))
    buf = B.read(lay.path)
    struct.pack_into(">I", buf, 1536, 0x7FFFFFFF)
    B.write(lay.path, buf)
    rep = check(lay.path)
    assert rep.codes() == {"BAT_ENTRY_PAST_EOF"}


def test_random_writes_keep_check_clean(tmp_path) -> None:
    import random

    p = tmp_path / "d.vhd"
    model = bytearray(16 * MiB)
    with vhdcore.create(p, 16 * MiB, block_size=256 * 1024) as d:
        random_writes(d, model, random.Random(5), 40)
    assert check(p).clean


# --------------------------------------------------------------------------------------------- blktap batmap


def _tap_file(tmp_path, version: int = 0x00010002, map0: int = 0x80):
    """vhd-util's layout (see test_image.build_tap_file) with the batmap's version and first byte chosen."""
    from support.tapfile import build_tap_file

    p = tmp_path / "tap.vhd"
    bm_hdr, bm_end, batmap = build_tap_file(p)
    buf = bytearray(p.read_bytes())
    m = bytearray(batmap)
    m[0] = map0
    buf[bm_end - len(m) : bm_end] = m
    signed = sum(b - 256 if b > 127 else b for b in m) if version == 0x00010001 else sum(m)
    struct.pack_into(">II", buf, bm_hdr + 20, version, ~signed & 0xFFFFFFFF)
    p.write_bytes(buf)
    return p, bm_hdr, bm_end - len(m)


@pytest.mark.parametrize("version", [0x00010001, 0x00010002], ids=["v1.1-signed-sum", "v1.2"])
def test_batmap_checksum_as_libvhd_computes_it(tmp_path, version: int) -> None:
    # 0x80 sums to 128 unsigned but -128 as libvhd 1.1's signed char: the two versions disagree on it.
    p, _, _ = _tap_file(tmp_path, version=version, map0=0x80)
    rep = check(p)
    assert rep.clean, [str(f) for f in rep.findings]


def test_damaged_batmap_is_reported_not_fatal(tmp_path) -> None:
    p, hdr, map_off = _tap_file(tmp_path)
    buf = bytearray(p.read_bytes())
    buf[map_off + 1] ^= 0x40  # a bit flips inside the map
    p.write_bytes(buf)
    rep = check(p)
    found = [f for f in rep.findings if f.code == "BATMAP_CHECKSUM"]
    assert len(found) == 1 and found[0].severity == WARNING
    assert found[0].offset == hdr + 24 and found[0].field == "batmap.checksum"
    with vhdcore.open(p) as d:  # reads never depend on the batmap
        assert d.read(0, 4) == b"TTTT"


def test_batmap_from_the_future_is_reported(tmp_path) -> None:
    p, hdr, _ = _tap_file(tmp_path, version=0x00020000)
    codes = {f.code for f in check(p).findings}
    assert "BATMAP_VERSION" in codes and "BATMAP_CHECKSUM" not in codes

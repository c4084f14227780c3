"""The real files of tests/data/corpus (Windows 10, Hyper-V, Virtual PC, Disk2vhd, qemu) give exactly the sha256
listed in expected.json, through vhdcore's reader and through ``vhdcore convert --to raw``.

The two 127 GiB disks hold no block at all: their full hash (127 GiB of zeros, ~70 s of sha256) is computed once;
everywhere else they are checked cheaply as "no allocated extent, size as expected".
"""
from __future__ import annotations

import bz2
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vhdcore
from support.vhdtest import MiB, disk_sha256, file_sha256

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"
EXPECTED: dict[str, dict] = json.loads((CORPUS / "expected.json").read_text())
EMPTY_127G = ["qemu/hyperv2012r2-dynamic.vhd", "qemu/virtualpc-dynamic.vhd"]
SMALL = [n for n in EXPECTED if n not in EMPTY_127G]


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> dict[str, Path]:
    """Name -> path to open; the Disk2vhd file is decompressed into a temporary directory."""
    out = {}
    tmp = tmp_path_factory.mktemp("corpus")
    for name, meta in EXPECTED.items():
        if meta.get("bzip2"):
            dst = tmp / Path(name).name.removesuffix(".bz2")
            with bz2.open(CORPUS / name) as src, open(dst, "wb") as f:
                shutil.copyfileobj(src, f, 4 * MiB)
            out[name] = dst
        else:
            out[name] = CORPUS / name
    return out


def open_kw(name: str) -> dict:
    return {"strict": False} if EXPECTED[name].get("bad_checksum") else {}


@pytest.mark.backend_independent
def test_corpus_is_complete_and_noticed() -> None:
    notice = (CORPUS / "NOTICE").read_text()
    for name in EXPECTED:
        assert (CORPUS / name).is_file(), name
        assert name.split("/")[0] + "/" in notice
    assert "Apache" in notice and "GPL" in notice


@pytest.mark.parametrize("name", SMALL)
def test_sha256_through_reader(corpus_files, name: str) -> None:
    meta = EXPECTED[name]
    path = corpus_files[name]
    with vhdcore.open(path, **open_kw(name)) as d:
        assert d.size == meta["size"]
        assert d.leaf.disk_type.label == meta["type"]
    assert disk_sha256(path, **open_kw(name)) == meta["sha256"]
    if meta.get("bad_checksum"):
        with pytest.raises(vhdcore.ChecksumError):
            vhdcore.open(path)


def cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdcore", *map(str, args)], capture_output=True, text=True,
                          check=check)


@pytest.mark.parametrize("name", SMALL)
def test_sha256_through_cli_convert_raw(corpus_files, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out.raw"
    extra = ["--ignore-checksums"] if EXPECTED[name].get("bad_checksum") else []
    r = cli("convert", "--to", "raw", "--json", corpus_files[name], out, *extra)
    rep = json.loads(r.stdout)
    assert rep["virtual_size"] == EXPECTED[name]["size"] == out.stat().st_size
    assert file_sha256(out) == EXPECTED[name]["sha256"]


def test_disk2vhd_grew_but_holds_nothing(corpus_files, tmp_path: Path) -> None:
    """Every block allocated, every byte zero: the converted raw file is one hole, the dynamic output empty."""
    path = corpus_files["qemu/d2v-zerofilled.vhd.bz2"]
    with vhdcore.open(path) as d:
        img = d.leaf
        assert len(img.allocated_blocks()) == img.max_table_entries == -(-d.size // img.block_size)
        assert img.footer.creator_app == b"d2v\0"
    rep = vhdcore.convert(path, tmp_path / "d.vhd", to="dynamic")
    assert rep.blocks_written == 0 and rep.zero_bytes_skipped == rep.bytes_read == EXPECTED[
        "qemu/d2v-zerofilled.vhd.bz2"]["size"]
    with vhdcore.open(tmp_path / "d.vhd") as d:
        assert len(d.leaf.allocated_blocks()) == 0


def assert_no_data(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError):  # ENXIO: no data anywhere in the file
            os.lseek(fd, 0, os.SEEK_DATA)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", EMPTY_127G)
def test_empty_127g_disks_cheaply(name: str, tmp_path: Path) -> None:
    meta = EXPECTED[name]
    with vhdcore.open(CORPUS / name) as d:
        assert d.size == meta["size"] and d.leaf.disk_type.label == meta["type"]
        assert list(d.allocated_extents()) == []
        assert list(d.extents()) == [vhdcore.Extent(0, meta["size"], None, -1, -1)]
        assert d.read(meta["size"] - 4096, 8192) == bytes(4096)
        if "chs_size" in meta:
            assert d.leaf.chs_size == meta["chs_size"]
    out = tmp_path / "out.raw"
    cli("convert", "--to", "raw", CORPUS / name, out)
    assert out.stat().st_size == meta["size"]
    assert_no_data(out)
    info = json.loads(cli("info", "--json", CORPUS / name).stdout)
    assert info["allocated_blocks"] == 0 and info["virtual_size"] == meta["size"]
    if "chs_size" in meta:  # Virtual PC sizes by CHS: both sizes reported
        assert info["chs_size"] == meta["chs_size"]


@pytest.mark.backend_independent
@pytest.mark.slow
def test_empty_127g_full_hash_once() -> None:
    """The full sha256 of the 127 GiB virtual disk, once (both files share it; the other is shown empty above)."""
    assert EXPECTED[EMPTY_127G[0]]["sha256"] == EXPECTED[EMPTY_127G[1]]["sha256"]
    assert disk_sha256(CORPUS / EMPTY_127G[0]) == EXPECTED[EMPTY_127G[0]]["sha256"]

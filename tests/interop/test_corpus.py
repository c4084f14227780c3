"""The real files of tests/data/corpus (Windows 10, Hyper-V, Virtual PC, Disk2vhd, qemu) give exactly the sha256
listed in expected.json, through vhdcore's reader and through ``vhdcore convert --to raw``.

The two 127 GiB disks hold no block at all (expected.json gives both the same sha256). Hashing 127 GiB through the
reader took 75-115 s, so their content is proven in parts instead: the files' own BATs (parsed here by hand) hold no block;
vhdcore maps the disk as one hole, reads zeros across every one of its 65,024 block boundaries and at its end;
and a twin of each file, the same bytes with the sizes cut to 63 blocks, is hashed through the reader in full
and matches as many zeros, which is what qemu-img maps it as.
"""
from __future__ import annotations

import bz2
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vhdcore
from support.vhdtest import MiB, disk_sha256, file_sha256, run

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


def _vhd_checksum(b: bytes | bytearray) -> int:
    return ~sum(b) & 0xFFFFFFFF


def _empty_layout(raw: bytes) -> tuple[int, int, int, int, int]:
    """(current_size, data_offset, table_offset, max_table_entries, block_size), read by hand from the spec's
    offsets so that the check does not rest on vhdcore's own parser; asserts the footer copy, the checksums and
    that every BAT entry is unused."""
    footer = raw[-512:]
    assert raw[:512] == footer and footer[:8] == b"conectix"
    assert int.from_bytes(footer[64:68], "big") == _vhd_checksum(footer[:64] + bytes(4) + footer[68:])
    size, disk_type = int.from_bytes(footer[48:56], "big"), int.from_bytes(footer[60:64], "big")
    data_offset = int.from_bytes(footer[16:24], "big")
    header = raw[data_offset:data_offset + 1024]
    assert disk_type == 3 and header[:8] == b"cxsparse"
    assert int.from_bytes(header[36:40], "big") == _vhd_checksum(header[:36] + bytes(4) + header[40:])
    table_offset = int.from_bytes(header[16:24], "big")
    entries, block_size = int.from_bytes(header[28:32], "big"), int.from_bytes(header[32:36], "big")
    assert entries * block_size >= size
    assert raw[table_offset:table_offset + 4 * entries] == b"\xff" * (4 * entries)  # no block allocated
    return size, data_offset, table_offset, entries, block_size


@pytest.mark.backend_independent
@pytest.mark.parametrize("name", EMPTY_127G)
def test_empty_127g_reads_zeros_across_every_block(name: str) -> None:
    """The structure says "no block" (parsed by hand), and the reader returns zeros wherever a block begins or
    ends, not only where the extent map says so: one read straddles each of the 65,024 block boundaries."""
    assert EXPECTED[EMPTY_127G[0]]["sha256"] == EXPECTED[EMPTY_127G[1]]["sha256"]  # the same content, qemu says
    size, _, _, entries, block_size = _empty_layout((CORPUS / name).read_bytes())
    assert size == EXPECTED[name]["size"] and entries == size // block_size == 65024
    buf = bytearray(8192)
    zeros = bytes(8192)
    with vhdcore.open(CORPUS / name) as d:
        assert [e.length for e in d.extents()] == [size] and not list(d.allocated_extents())
        for boundary in range(block_size, size, block_size):
            buf[:] = b"\xaa" * 8192  # readinto must write every byte it reports
            assert d.readinto(boundary - 4096, buf) == 8192 and buf == zeros, boundary
        assert d.readinto(0, buf) == 8192 and buf == zeros


def _twin(src: Path, dst: Path, blocks: int) -> int:
    """The file with its sizes cut to ``blocks`` blocks: footer (both copies) and header rewritten with fresh
    checksums, geometry set so that C*H*S covers the size exactly (so qemu-img, which sizes Virtual PC's disks
    by CHS, sees the same size); creator, offsets, block size and the BAT's place stay the file's own."""
    raw = bytearray(src.read_bytes())
    _, data_offset, _, _, block_size = _empty_layout(bytes(raw))
    size = blocks * block_size
    cylinders, rem = divmod(size, 16 * 63 * 512)
    assert rem == 0
    footer = bytearray(raw[-512:])
    footer[40:56] = size.to_bytes(8, "big") * 2  # original and current size
    footer[56:60] = cylinders.to_bytes(2, "big") + bytes([16, 63])
    footer[64:68] = bytes(4)
    footer[64:68] = _vhd_checksum(footer).to_bytes(4, "big")
    raw[:512] = raw[-512:] = footer
    header = raw[data_offset:data_offset + 1024]
    header[28:32] = blocks.to_bytes(4, "big")
    header[36:40] = bytes(4)
    header[36:40] = _vhd_checksum(header).to_bytes(4, "big")
    raw[data_offset:data_offset + 1024] = header
    dst.write_bytes(raw)
    return size


@pytest.mark.backend_independent
@pytest.mark.parametrize("name", EMPTY_127G)
def test_empty_127g_twin_full_hash(name: str, tmp_path: Path) -> None:
    """The full-length read of the 127 GiB disks, on a twin of each (same file but 63 blocks instead of 65,024:
    the smallest count whose size a 16-head, 63-sector geometry covers exactly): the reader's sha256 over every
    byte is that of as many zeros, and qemu-img maps the same file as zeros throughout."""
    twin = tmp_path / "twin.vhd"
    size = _twin(CORPUS / name, twin, 63)
    assert _empty_layout(twin.read_bytes())[0] == size
    zeros = hashlib.sha256()
    chunk = bytes(4 * MiB)
    for off in range(0, size, len(chunk)):
        zeros.update(chunk[:min(len(chunk), size - off)])
    assert disk_sha256(twin) == zeros.hexdigest()
    # qemu-img's own reading of the twin: one run of zeros, no data, exactly as long
    qmap = json.loads(run(["qemu-img", "map", "--output=json", "-f", "vpc", twin]).stdout)
    assert [(e["start"], e["length"], e["zero"], e["data"]) for e in qmap] == [(0, size, True, False)], qmap

"""The command line, through ``python -m vhdcore`` subprocesses (and cli.main where many calls are needed):
every command's --json parses and carries its documented fields; errors are one line on stderr, no traceback,
non-zero exit status."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest

import vhdcore
from support.vhdtest import vhdcore_cli
from vhdcore.cli import main as cli
from support.vhdtest import MiB, build_chain

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"
LAYER_FIELDS = {"path", "type", "virtual_size", "chs_size", "geometry", "file_size", "creator_app",
                "creator_version", "creator_os", "timestamp", "unique_id", "saved_state", "block_size",
                "allocated_blocks", "allocated_bytes"}
DIFF_FIELDS = {"parent_unique_id", "parent_unicode_name", "parent_timestamp", "parent_locators"}


def main_json(*args: object):
    out = StringIO()
    with redirect_stdout(out):
        assert cli.main([str(a) for a in args]) == 0
    return json.loads(out.getvalue())


@pytest.fixture()
def chain(tmp_path: Path) -> tuple[list[Path], bytearray]:
    return build_chain(tmp_path, depth=3, size=8 * MiB, writes=10, seed=2)


@pytest.mark.backend_independent
def test_info_json_of_a_chain(chain) -> None:
    paths, _ = chain
    info = json.loads(vhdcore_cli("info", "--json", paths[-1]).stdout)
    assert LAYER_FIELDS | DIFF_FIELDS | {"chain_depth", "chain", "parent_path", "warnings"} <= set(info)
    with vhdcore.open(paths[-1]) as d:
        leaf = d.leaf
        assert info["path"] == str(paths[-1]) and info["type"] == "differencing"
        assert info["virtual_size"] == d.size and info["file_size"] == os.path.getsize(paths[-1])
        assert info["unique_id"] == str(leaf.unique_id)
        assert info["parent_unique_id"] == str(leaf.header.parent_unique_id) == str(d.layers[1].unique_id)
        assert info["allocated_blocks"] == len(leaf.allocated_blocks())
        assert info["allocated_bytes"] == len(leaf.allocated_blocks()) * leaf.block_size
        assert info["block_size"] == leaf.block_size and info["max_table_entries"] == leaf.max_table_entries
    assert info["chain_depth"] == 3 and [c["path"] for c in info["chain"]] == [str(p.resolve()) for p in
                                                                             reversed(paths[:-1])]
    assert info["chain"][-1]["type"] == "dynamic" and "parent_unique_id" not in info["chain"][-1]
    assert {loc["platform"] for loc in info["parent_locators"]} == {"W2ru", "MacX", "W2ku"}
    assert info["parent_unicode_name"] == "child1.vhd" and info["parent_path"] == str(paths[1].resolve())
    assert info["creator_app"] == "qem2" and info["warnings"] == [] and info["saved_state"] is False
    assert set(info["geometry"]) == {"cylinders", "heads", "sectors_per_track"}
    text = vhdcore_cli("info", paths[-1]).stdout
    assert "differencing" in text and "chain depth" in text and str(paths[1].resolve()) in text


@pytest.mark.backend_independent
def test_info_json_fixed_and_virtual_pc() -> None:
    fixed = main_json("info", "--json", CORPUS / "dfvfs" / "ntfs-fixed.vhd")
    assert LAYER_FIELDS <= set(fixed)
    assert fixed["type"] == "fixed" and fixed["block_size"] is None and fixed["allocated_bytes"] == 4194304
    assert fixed["creator_app"] == "win" and fixed["creator_version"] == "10.0"
    vpc = main_json("info", "--json", CORPUS / "qemu" / "virtualpc-dynamic.vhd")
    assert vpc["virtual_size"] == 136365211648 and vpc["chs_size"] == 136363130880
    assert vpc["geometry"] == {"cylinders": 65278, "heads": 16, "sectors_per_track": 255}
    text = vhdcore_cli("info", CORPUS / "qemu" / "virtualpc-dynamic.vhd").stdout
    assert "CHS size" in text and "136363130880" in text


@pytest.mark.backend_independent
def test_info_ignore_checksums_reports_warning() -> None:
    r = vhdcore_cli("info", "--json", CORPUS / "dfvfs" / "image-differential.vhd", check=False)
    assert r.returncode != 0 and "checksum" in r.stderr
    info = json.loads(vhdcore_cli("info", "--json", "--ignore-checksums",
                                  CORPUS / "dfvfs" / "image-differential.vhd").stdout)
    assert info["chain_depth"] == 2 and any("checksum" in w for w in info["warnings"])


def test_map_json(chain) -> None:
    paths, model = chain
    entries = json.loads(vhdcore_cli("map", "--json", paths[-1]).stdout)
    assert entries and all(set(e) == {"start", "length", "depth", "data", "zero", "offset", "file"} for e in entries)
    with vhdcore.open(paths[-1]) as d:
        assert sum(e["length"] for e in entries) == d.allocated_bytes()
        for e in entries:
            assert e["data"] and not e["zero"] and e["file"] == d.layers[e["depth"]].path
            with open(e["file"], "rb") as f:
                f.seek(e["offset"])
                assert f.read(e["length"]) == model[e["start"] : e["start"] + e["length"]]
    full = main_json("map", "--json", "--all", paths[-1])
    pos = 0
    for e in full:
        assert e["start"] == pos
        pos += e["length"]
        if e["zero"]:
            assert e["offset"] is None and e["depth"] == -1 and not any(model[e["start"] : e["start"] + e["length"]])
    assert pos == len(model)
    text = vhdcore_cli("map", paths[-1]).stdout.splitlines()
    assert text[0].split() == ["start", "length", "depth", "file", "offset", "file"] and len(text) == len(entries) + 1


def test_create_snapshot_convert_json(tmp_path: Path) -> None:
    base, child, out = tmp_path / "b.vhd", tmp_path / "c.vhd", tmp_path / "o.vhd"
    info = json.loads(vhdcore_cli("create", "--json", "--size", "40M", "--block-size", "512K", base).stdout)
    assert info["path"] == str(base.resolve()) or info["path"] == str(base)
    assert info["virtual_size"] == 40 * MiB and info["type"] == "dynamic" and info["block_size"] == 512 * 1024
    with vhdcore.open(base) as d:
        assert str(d.leaf.unique_id) == info["unique_id"]
    fixed = main_json("create", "--json", "--size", "1048576", "--type", "fixed", tmp_path / "f.vhd")
    assert fixed["type"] == "fixed" and fixed["block_size"] is None and fixed["virtual_size"] == MiB
    with vhdcore.open(base, "r+") as d:
        d.write(3 * MiB, b"x" * 5000)
    snap = json.loads(vhdcore_cli("snapshot", "--json", base, child).stdout)
    assert set(snap) == {"path", "parent_path", "unique_id", "parent_unique_id", "chain_depth", "warnings"}
    assert snap["chain_depth"] == 2 and snap["parent_unique_id"] == info["unique_id"]
    with vhdcore.open(child, "r+") as d:
        d.write(0, b"y" * 100)
    r = vhdcore_cli("convert", "--json", "--to", "dynamic", "--progress", "none", child, out)
    rep = json.loads(r.stdout)
    assert r.stderr == ""
    assert {"source", "destination", "to", "virtual_size", "bytes_read", "bytes_written", "blocks_written",
            "zero_bytes_skipped", "file_size", "seconds"} <= set(rep)
    assert rep["to"] == "dynamic" and rep["blocks_written"] == 2 and rep["file_size"] == os.path.getsize(out)
    # JSON progress lines: the last one says the work is complete.
    r = vhdcore_cli("convert", "--to", "fixed", "--progress", "json", child, tmp_path / "o2.vhd")
    progress = [json.loads(line) for line in (r.stdout + r.stderr).splitlines() if line.startswith("{")]
    assert progress and progress[-1]["done"] == progress[-1]["total"] > 0
    with vhdcore.open(out) as d, vhdcore.open(child) as c:
        assert d.read(0, d.size) == c.read(0, c.size)
    txt = vhdcore_cli("convert", "--to", "raw", child, tmp_path / "o.raw").stdout
    assert "raw" in txt and len(txt.splitlines()) == 1


@pytest.mark.backend_independent
def test_help_and_version() -> None:
    r = vhdcore_cli("--help")
    for name in ("info", "map", "create", "snapshot", "convert"):
        assert name in r.stdout
    assert vhdcore_cli("--version").stdout.strip() == f"vhdcore {vhdcore.__version__}"


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vhdcore") and "error" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.backend_independent
def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    cases = [
        (["create", tmp_path / "x.vhd", "--size", "abc"], "--size"),
        (["create", tmp_path / "x.vhd"], "--size"),
        (["convert", "a", "b", "--to", "vhdx"], "--to"),
        (["bogus"], "bogus"),
        ([], "COMMAND"),
        (["info"], "path"),
    ]
    for args, needle in cases:
        r = vhdcore_cli(*args, check=False)
        one_line_error(r, needle)
        assert r.returncode == 2 and r.stdout == ""
    assert not (tmp_path / "x.vhd").exists()


@pytest.mark.backend_independent
def test_runtime_errors_are_one_line(tmp_path: Path, chain) -> None:
    paths, _ = chain
    missing = tmp_path / "missing.vhd"
    one_line_error(vhdcore_cli("info", missing, check=False), str(missing))
    one_line_error(vhdcore_cli("map", "--json", CORPUS / "dfvfs" / "image.vhd", check=False), "checksum",
                   "offset")
    one_line_error(vhdcore_cli("info", tmp_path, check=False), "not a regular file")
    one_line_error(vhdcore_cli("create", tmp_path / "big.vhd", "--size", "3T", check=False), "2040")
    one_line_error(vhdcore_cli("create", tmp_path / "bs.vhd", "--size", "1G", "--block-size", "3K", check=False),
                   "block size")
    one_line_error(vhdcore_cli("snapshot", paths[0], paths[1], check=False), "exists")
    junk = tmp_path / "junk.vhd"
    junk.write_bytes(os.urandom(5000))
    one_line_error(vhdcore_cli("info", "--json", junk, check=False), "footer")
    # A parent that is gone: the error names the child and what was tried.
    os.rename(paths[0], tmp_path / "elsewhere.vhd")
    line = one_line_error(vhdcore_cli("convert", "--to", "raw", paths[-1], tmp_path / "o.raw", check=False),
                          "parent", "tried")
    assert str(paths[1]) in line and not (tmp_path / "o.raw").exists()
    # And it is found with --parent-dir once it is in a directory of that name.
    other = tmp_path / "other"
    other.mkdir()
    os.rename(tmp_path / "elsewhere.vhd", other / paths[0].name)
    vhdcore_cli("map", "--parent-dir", other, paths[-1])

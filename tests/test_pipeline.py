"""The whole imaging job (vhdcore.pipeline / `vhdcore image`) on a server-like ext4 chain built with real tools."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vhdcore
from vhdcore.demo import PART_OFFSET, build_server_chain
from vhdcore.pipeline import CheckFailedError, image
from support.vhdtest import disk_sha256, file_sha256

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server_chain(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("server")
    build_server_chain(str(d))
    return d


@pytest.fixture
def chain(server_chain, tmp_path) -> Path:
    """A private copy of the chain (a test may change it)."""
    for name in ("base.vhd", "snap1.vhd", "leaf.vhd"):
        shutil.copy2(server_chain / name, tmp_path / name)
    return tmp_path


def _unzstd(src: Path, dst: Path) -> Path:
    subprocess.run(["zstd", "-q", "-d", "-f", str(src), "-o", str(dst)], check=True)
    return dst


def test_image_exports_through_the_chain_and_reports_states(chain, tmp_path):
    before = disk_sha256(chain / "leaf.vhd")
    files = {n: file_sha256(chain / n) for n in ("base.vhd", "snap1.vhd", "leaf.vhd")}
    events = []
    rep = image(chain / "leaf.vhd", tmp_path / "out.vhd.zst",
                progress=lambda done, total, **info: events.append((info.get("state"), done, total)))
    # The source chain is only read (the in-place merge is --coalesce-in-place, tested in test_image_safety).
    assert {n: file_sha256(chain / n) for n in files} == files and rep.coalesce is None
    # The artifact decompresses with the standard tool into a VHD with the chain's content.
    out = _unzstd(tmp_path / "out.vhd.zst", tmp_path / "out.vhd")
    assert disk_sha256(out) == before
    assert rep.export["digests"]["sha256"] == hashlib.sha256((tmp_path / "out.vhd.zst").read_bytes()).hexdigest()
    assert rep.check["clean"] if "clean" in rep.check else not rep.check["findings"]
    assert rep.growth["filesystems"][0]["type"] == "ext4"
    states = [str(getattr(s, "value", s)) for s, _, _ in events if s is not None]
    order = ["preparing", "saving", "complete"]
    seen = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert seen == order


def test_image_with_full_compaction_keeps_every_used_sector(chain, tmp_path):
    from vhdcore import guest

    with vhdcore.open(chain / "leaf.vhd") as d:
        fs_before = [f for f in guest.analyse(d).filesystems if f.type == "ext4"][0]
        used_before = fs_before.used_bytes
    rep = image(chain / "leaf.vhd", tmp_path / "out.vhd.zst", compact="full")
    assert rep.compact["bytes_after"] < rep.compact["bytes_before"]
    assert not list(chain.glob(".compacted-*")), "the compacted copy must be removed after the export"
    out = _unzstd(tmp_path / "out.vhd.zst", tmp_path / "out.vhd")
    with vhdcore.open(out) as d:
        fs = [f for f in guest.analyse(d).filesystems if f.type == "ext4"][0]
        assert fs.used_bytes == used_before
        part = tmp_path / "part.img"
        with open(part, "wb") as f:
            f.write(d.read(PART_OFFSET, fs.size))
    fsck = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_image_refuses_a_chain_that_fails_its_check(chain, tmp_path):
    leaf = chain / "leaf.vhd"
    with vhdcore.open(leaf) as d:
        table = d.leaf.header.table_offset
        block = int(d.leaf.allocated_blocks()[0])
    raw = bytearray(leaf.read_bytes())
    raw[table + 4 * block : table + 4 * block + 4] = (0x7FFFFFF0).to_bytes(4, "big")  # block far past EOF
    leaf.write_bytes(raw)
    with pytest.raises(CheckFailedError):
        image(leaf, tmp_path / "out.vhd.zst")
    assert (chain / "snap1.vhd").exists() and not (tmp_path / "out.vhd.zst").exists()


def test_cli_image_json(chain, tmp_path):
    r = subprocess.run([sys.executable, "-m", "vhdcore", "image", str(chain / "leaf.vhd"), str(tmp_path / "o.vhd.gz"),
                        "--json", "--progress", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["export"]["compression"] == "gzip"
    lines = [json.loads(l) for l in r.stderr.splitlines() if l.startswith("{")]
    assert lines and lines[-1]["state"] == "complete"
    subprocess.run(["gzip", "-t", str(tmp_path / "o.vhd.gz")], check=True)

"""Command-line conventions every command shares: sizes with decimals, compression names that mean what they
say, gzip levels 1-9, verify finding its manifest, quiet broken pipes, growth --blocks in text."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vhdcore
from support.vhdtest import MiB, build_chain, disk_sha256

pytestmark = pytest.mark.backend_independent


def run(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "vhdcore", *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r


def test_sizes_with_decimals_as_qemu_img(tmp_path: Path) -> None:
    run("create", tmp_path / "a.vhd", "--size", "1.5G")
    q = subprocess.run(["qemu-img", "create", "-f", "raw", str(tmp_path / "q.raw"), "1.5G"], capture_output=True)
    with vhdcore.open(tmp_path / "a.vhd") as d:
        assert d.size == 1536 * MiB
        if q.returncode == 0:
            assert (tmp_path / "q.raw").stat().st_size == d.size
    r = run("create", tmp_path / "b.vhd", "--size", "1.3K", check=False)
    assert r.returncode == 2 and "whole number of bytes" in r.stderr


def test_unknown_compression_suffix_refused_not_ignored(tmp_path: Path) -> None:
    paths, _ = build_chain(tmp_path, 1, size=1 * MiB, writes=3)
    for name in ("out.vhd.bz2", "out.vhd.xz"):
        r = run("export", paths[-1], tmp_path / name, check=False)
        assert r.returncode == 1 and "does not write" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / name).exists()
    run("export", paths[-1], tmp_path / "plain.vhd.bz2", "--compress", "none")  # named explicitly: honoured
    assert disk_sha256(tmp_path / "plain.vhd.bz2") == disk_sha256(paths[-1])


@pytest.mark.parametrize("level,isal", [(1, 0), (6, 2), (9, 3)])
def test_gzip_levels_one_to_nine(tmp_path: Path, level: int, isal: int) -> None:
    paths, _ = build_chain(tmp_path, 1, size=1 * MiB, writes=3)
    out = tmp_path / "o.vhd.gz"
    rep = json.loads(run("export", paths[-1], out, "--level", level, "--json").stdout)
    assert rep["level"] == isal
    (tmp_path / "o.vhd").write_bytes(gzip.decompress(out.read_bytes()))
    assert disk_sha256(tmp_path / "o.vhd") == disk_sha256(paths[-1])


def test_gzip_level_out_of_range_refused(tmp_path: Path) -> None:
    paths, _ = build_chain(tmp_path, 1, size=1 * MiB, writes=1)
    r = run("export", paths[-1], tmp_path / "o.vhd.gz", "--level", "0", check=False)
    assert r.returncode == 1 and "1-9" in r.stderr


def test_verify_finds_the_manifest_beside_the_file(tmp_path: Path) -> None:
    paths, _ = build_chain(tmp_path, 2, size=2 * MiB, writes=5)
    out = tmp_path / "o.vhd.zst"
    run("export", paths[-1], out)
    assert (tmp_path / "o.vhd.zst.xxh3.json").exists()
    r = run("verify", out)
    assert "matches" in r.stdout and r.stdout.rstrip().endswith(")")
    (tmp_path / "o.vhd.zst.xxh3.json").unlink()
    r = run("verify", out, check=False)
    assert r.returncode == 2 and "no SRC given" in r.stderr


def test_broken_pipe_ends_quietly_with_141(tmp_path: Path) -> None:
    """`vhdcore info ... | head` where head has already gone: no message, the SIGPIPE status a shell shows."""
    run("create", tmp_path / "d.vhd", "--size", "64M")
    for args in (["map", "--all", "--json"], ["info", "--json"], ["info"]):
        r_fd, w_fd = os.pipe()
        os.close(r_fd)  # the reader is gone before the first byte
        try:
            p = subprocess.run([sys.executable, "-m", "vhdcore", *args, str(tmp_path / "d.vhd")], stdout=w_fd,
                               stderr=subprocess.PIPE)
        finally:
            os.close(w_fd)
        assert (p.returncode, p.stderr) == (141, b""), args


def test_growth_blocks_in_text(tmp_path: Path) -> None:
    paths, _ = build_chain(tmp_path, 2, size=2 * MiB, writes=5)
    r = run("growth", paths[-1], "--blocks")
    tail = r.stdout[r.stdout.index("(allocated ones)"):]
    with vhdcore.open(paths[-1]) as d:
        allocated = len({int(b) for L in d.layers for b in L.allocated_blocks()})
    rows = [l for l in tail.splitlines()[2:] if l.strip()]
    assert len(rows) == allocated and all(l.split()[-1] in ("keep", "drop", "zero") for l in rows), tail

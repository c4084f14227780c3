"""`vhdcore coalesce --resume`: a merge interrupted part-way is continued from its progress journal, merging only
the blocks it had not made durable. Runs on both backends (the resumed merge skips blocks in the kernels' loop)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vhdcore.ops.coalesce import coalesce
from support.vhdtest import build_chain, disk_sha256

MiB = 1024 * 1024


class _Stop(Exception):
    pass


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdcore", *map(str, args)], capture_output=True, text=True)


def test_coalesce_resume_continues_an_interrupted_merge(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base, child = build_chain(tmp_path / "a", 2, size=32 * MiB, block_size=512 * 1024, writes=120, seed=5)[0]
    twin = build_chain(tmp_path / "b", 2, size=32 * MiB, block_size=512 * 1024, writes=120, seed=5)[0]
    content = disk_sha256(child)

    def stop_half_way(done: int, total: int | None = None, **info: object) -> None:
        if total and done >= total // 2:
            raise _Stop()

    with pytest.raises(_Stop):
        coalesce(child, progress=stop_half_way, resume=True)
    assert disk_sha256(child) == content  # interrupted: the chain reads as before
    assert [n for n in os.listdir(tmp_path / "a") if n.endswith(".coalesce-progress")]

    r = _cli("coalesce", child, "--resume", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    # the same merge run whole, on an identical chain, without --resume
    full = json.loads(_cli("coalesce", twin[1], "--json").stdout)
    assert full["blocks_resumed"] == 0
    assert rep["blocks_resumed"] > 0 and rep["blocks_copied"] < full["blocks_copied"]
    assert rep["blocks_resumed"] + rep["blocks_copied"] == full["blocks_copied"]  # nothing merged twice
    assert disk_sha256(base) == content == disk_sha256(twin[0])
    assert not [n for n in os.listdir(tmp_path / "a") if n.endswith(".coalesce-progress")]  # journal removed
    assert not [n for n in os.listdir(tmp_path / "b") if n.endswith(".coalesce-progress")]  # none kept without it


def test_coalesce_resume_reports_in_text(tmp_path: Path) -> None:
    base, child = build_chain(tmp_path, 2, size=8 * MiB, block_size=512 * 1024, writes=30, seed=6)[0]

    def stop_half_way(done: int, total: int | None = None, **info: object) -> None:
        if total and done >= total // 2:
            raise _Stop()

    with pytest.raises(_Stop):
        coalesce(child, progress=stop_half_way, resume=True)
    r = _cli("coalesce", child, "--resume")
    assert r.returncode == 0 and "resumed: " in r.stdout, r.stderr

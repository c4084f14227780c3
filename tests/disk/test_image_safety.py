"""`vhdcore image` never changes its source chain unless asked, and never before the destination was checked.

Every failure mode ends with the sha256 of every source file as it was: a full local disk (a real tmpfs), a
refused destination, a kill during the export, a kill during an explicit in-place merge before it wrote.
The remote failure modes (bad credentials, a missing container) are in delivery/test_image_preflight.py.
"""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhdcore
from vhdcore.destination import DestinationError
from vhdcore.pipeline import image
from vhdcore.delivery.upload.preflight import NoSpaceError
from support.vhdtest import MiB, build_chain, disk_sha256, file_sha256


def _hashes(paths: list[Path]) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in paths}


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdcore", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def chain(tmp_path: Path) -> list[Path]:
    (tmp_path / "src").mkdir()
    paths, _ = build_chain(tmp_path / "src", 3, size=4 * MiB)
    return paths


def test_default_image_leaves_the_chain_byte_identical(chain: list[Path], tmp_path: Path) -> None:
    before = _hashes(chain)
    content = disk_sha256(chain[-1])
    rep = image(chain[-1], tmp_path / "out.vhd", analyse=False)
    assert _hashes(chain) == before and rep.coalesce is None
    assert disk_sha256(tmp_path / "out.vhd") == content
    assert rep.seconds["preflight"] >= 0


def test_coalesce_in_place_runs_after_the_delivery(chain: list[Path], tmp_path: Path) -> None:
    content = disk_sha256(chain[-1])
    states: list[str] = []
    rep = image(chain[-1], tmp_path / "out.vhd", analyse=False, coalesce_in_place=True,
                progress=lambda d, t, **i: states.append(str(getattr(i.get("state"), "value", i.get("state")))))
    assert disk_sha256(tmp_path / "out.vhd") == content
    assert disk_sha256(chain[0]) == content and not chain[1].exists() and not chain[2].exists()
    assert rep.coalesce["merged_layers"]
    order = [s for i, s in enumerate(states) if s != "None" and (i == 0 or s != states[i - 1])]
    assert order == ["preparing", "saving", "coalescing", "complete"]


def test_existing_destination_and_own_chain_refused_before_any_work(chain: list[Path], tmp_path: Path) -> None:
    before = _hashes(chain)
    (tmp_path / "exists.vhd").write_bytes(b"keep me")
    with pytest.raises(DestinationError, match="--overwrite"):
        image(chain[-1], tmp_path / "exists.vhd", analyse=False, coalesce_in_place=True)
    assert (tmp_path / "exists.vhd").read_bytes() == b"keep me"
    with pytest.raises(DestinationError, match="source chain"):
        image(chain[-1], chain[0], analyse=False, coalesce_in_place=True, overwrite=True)
    assert _hashes(chain) == before
    image(chain[-1], tmp_path / "exists.vhd", analyse=False, overwrite=True)
    assert disk_sha256(tmp_path / "exists.vhd") == disk_sha256(chain[-1])


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A real 2 MiB tmpfs: writes past it fail with ENOSPC."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.backend_independent
def test_full_local_disk_refused_by_preflight_chain_unchanged(chain: list[Path], tiny_fs: Path) -> None:
    before = _hashes(chain)
    with pytest.raises(NoSpaceError) as ei:
        image(chain[-1], tiny_fs / "out.vhd", analyse=False, coalesce_in_place=True)
    assert ei.value.field == "free_space" and ei.value.value <= 2 * MiB
    assert _hashes(chain) == before and list(tiny_fs.iterdir()) == []
    r = _cli("image", str(chain[-1]), str(tiny_fs / "out.vhd"), "--coalesce-in-place", "--no-growth")
    assert r.returncode == 1 and "bytes free" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert _hashes(chain) == before


def test_enospc_during_the_export_itself_leaves_the_chain(tiny_fs: Path, tmp_path: Path) -> None:
    """Another writer takes the space after the preflight passed: the export's own write fails with ENOSPC,
    the partial file is removed and, the merge never having started, every layer is as it was."""
    src = tmp_path / "small"
    src.mkdir()
    paths, _ = build_chain(src, 2, size=1 * MiB, writes=4)
    before = _hashes(paths)
    with pytest.raises(OSError) as ei:
        image(paths[-1], tiny_fs / "out.vhd", analyse=False, coalesce_in_place=True, progress=_filler(tiny_fs))
    assert ei.value.errno == errno.ENOSPC
    assert _hashes(paths) == before
    assert sorted(n.name for n in tiny_fs.iterdir()) == ["other-writer"]


def _filler(fs: Path):
    """A progress callback that, as the export starts saving, fills the file system (another writer)."""
    done = []

    def cb(d: int, t: int | None, **info) -> None:
        if str(getattr(info.get("state"), "value", info.get("state"))) == "saving" and not done:
            done.append(1)
            with open(fs / "other-writer", "wb") as f:
                try:
                    while True:
                        f.write(b"\x5a" * 65536)
                except OSError:
                    pass
    return cb


def test_killed_during_export_chain_unchanged(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    base = src / "base.vhd"
    rnd = random.Random(9)
    with vhdcore.create(base, 16 * MiB) as d:
        d.write(0, rnd.randbytes(16 * MiB))  # incompressible: zstd -19 takes seconds on it
    leaf = src / "leaf.vhd"
    with vhdcore.snapshot(base, leaf) as d:
        d.write(MiB, rnd.randbytes(MiB))
    before = _hashes([base, leaf])
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "vhdcore", "image", str(leaf), str(out / "img.vhd.zst"),
                          "--compress", "zstd", "--level", "19", "--no-growth", "--coalesce-in-place",
                          "--progress", "none"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(n.endswith(".part") for n in os.listdir(out)):  # the sink's file: the export is writing
        assert p.poll() is None and time.monotonic() < deadline, "the export never started"
        time.sleep(0.005)
    time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert not (out / "img.vhd.zst").exists()
    assert _hashes([base, leaf]) == before


def test_killed_in_place_merge_before_its_first_write_chain_unchanged(chain: list[Path], tmp_path: Path) -> None:
    """The point of no return of --coalesce-in-place is the merge's first write into the base; a kill just
    before it (coalesce's fault hook) leaves every layer as it was, and the image already delivered."""
    before = _hashes(chain)
    r = _cli("image", str(chain[-1]), str(tmp_path / "img.vhd"), "--coalesce-in-place", "--no-growth",
             env={"VHDCORE_FAULT_AFTER_WRITES": "1", "VHDCORE_FAULT_ACTION": "kill"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _hashes(chain) == before
    assert disk_sha256(tmp_path / "img.vhd") == disk_sha256(chain[-1])


@pytest.mark.backend_independent
def test_worst_case_counts_proven_zeros_only_when_compressed() -> None:
    from vhdcore.delivery.upload.preflight import worst_case_output

    T = 1 << 40
    sparse = worst_case_output(2 * T, "zstd", known_zero=2 * T - MiB)
    assert 2 * T // 1000 < sparse < 3 * 1024 * MiB  # a mostly empty 2 TB fixed package, compressed
    assert worst_case_output(2 * T, "none", known_zero=2 * T) > 2 * T  # written as it is: every byte
    full = worst_case_output(100 * MiB, "gzip")
    assert 100 * MiB + 100 * MiB // 128 < full < 102 * MiB

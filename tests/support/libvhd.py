"""XenServer's libvhd as the judge: vhd-util and vhdw, found through VHD_UTIL / VHDW (set by .ci/run).

Tests that need them skip, with that reason, where they are missing. Nothing here models libvhd: every answer
comes from running the real tools.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

VHD_UTIL = os.environ.get("VHD_UTIL", "")
VHDW = os.environ.get("VHDW", "")
SECTOR = 512


def _usable(path: str) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


needs_libvhd = pytest.mark.skipif(not (_usable(VHD_UTIL) and _usable(VHDW)),
                                  reason="libvhd's vhd-util/vhdw not found: set VHD_UTIL and VHDW "
                                         "(.ci/run does when ../shared/tools/vhd-util exists)")


def vhd_util(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    cp = subprocess.run([VHD_UTIL, *map(str, args)], capture_output=True, timeout=120)
    if check and cp.returncode != 0:
        raise AssertionError(f"vhd-util {' '.join(map(str, args))} exited {cp.returncode}: "
                             f"{cp.stdout.decode(errors='replace')[-400:]} {cp.stderr.decode(errors='replace')[-400:]}")
    return cp


def assert_valid(path: os.PathLike | str) -> None:
    """`vhd-util check -p -b`: the file, its parents and its bitmaps, as XenServer checks them."""
    cp = vhd_util("check", "-n", path, "-p", "-b", check=False)
    out = cp.stdout.decode(errors="replace")
    # (a fixed disk passes silently; a dynamic one says "is valid")
    assert cp.returncode == 0 and "invalid" not in out, f"vhd-util check -p -b {path}: {out[-600:]}"


def libvhd_read(path: os.PathLike | str, size: int, offset: int = 0) -> bytes:
    """``size`` bytes of the virtual disk from ``offset`` (sector-aligned) through the chain, as libvhd reads them
    (not for fixed disks or chains over a fixed parent: vhd-util cannot)."""
    assert offset % SECTOR == 0 and size % SECTOR == 0
    out = vhd_util("read", "-n", path, "-r", offset // SECTOR, "-c", size // SECTOR).stdout
    assert len(out) == size, f"vhd-util read -r gave {len(out)} bytes, not {size}"
    return out


def libvhd_write(path: os.PathLike | str, offset: int, data: bytes, scratch: Path) -> None:
    """Write sector-aligned ``data`` at ``offset`` through libvhd's vhd_io_write (vhdw), as tapdisk would."""
    assert offset % SECTOR == 0 and len(data) % SECTOR == 0 and data
    scratch.write_bytes(data)
    cp = subprocess.run([VHDW, str(path), str(offset // SECTOR), str(scratch)], capture_output=True, timeout=60)
    assert cp.returncode == 0, f"vhdw failed: {cp.stdout!r} {cp.stderr!r}"


def libvhd_create(path: os.PathLike | str, mib: int, fixed: bool = False) -> None:
    vhd_util("create", "-n", path, "-s", mib, *(["-r"] if fixed else []))


def libvhd_snapshot(child: os.PathLike | str, parent: os.PathLike | str) -> None:
    vhd_util("snapshot", "-n", child, "-p", parent)


def libvhd_parent(path: os.PathLike | str) -> str:
    """The parent file libvhd resolves for ``path`` (`vhd-util query -p`)."""
    return vhd_util("query", "-n", path, "-p").stdout.decode().strip()


def readable_by_libvhd(paths: list[Path]) -> bool:
    """``read -r`` cannot read a fixed disk, or a chain over one (paths: the chain, base first)."""
    with open(paths[0], "rb") as f:
        f.seek(-512, os.SEEK_END)
        footer = f.read(512)
    return int.from_bytes(footer[60:64], "big") != 2

"""Test helpers: chains built with vhdcore next to an in-memory model of their content, and peer tools."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import vhdcore

MiB = 1024 * 1024


def random_writes(disk: vhdcore.Disk, model: bytearray, rnd: random.Random, count: int, max_len: int = 70_000,
                  ) -> None:
    """Write ``count`` random runs (random offsets, lengths, some zero runs) to ``disk`` and to ``model``."""
    size = disk.size
    for _ in range(count):
        n = rnd.randrange(1, max_len)
        off = rnd.randrange(0, size - n)
        data = bytes(n) if rnd.random() < 0.1 else rnd.randbytes(n)
        disk.write(off, data)
        model[off : off + n] = data


def build_chain(directory: Path, depth: int, size: int = 8 * MiB, block_size: int = 512 * 1024,
                writes: int = 30, seed: int = 0, base_type: str = "dynamic") -> tuple[list[Path], bytearray]:
    """A base plus ``depth - 1`` differencing children, each with random writes. Returns (paths leaf-last, model)."""
    rnd = random.Random(seed)
    model = bytearray(size)
    paths = [directory / "base.vhd"]
    with vhdcore.create(paths[0], size, type=base_type, block_size=block_size) as d:
        random_writes(d, model, rnd, writes)
    for i in range(1, depth):
        p = directory / f"child{i}.vhd"
        with vhdcore.snapshot(paths[-1], p) as d:
            random_writes(d, model, rnd, writes)
        paths.append(p)
    return paths, model


def disk_sha256(path: os.PathLike | str, **open_kw) -> str:
    h = hashlib.sha256()
    with vhdcore.open(path, **open_kw) as d:
        buf = bytearray(4 * MiB)
        off = 0
        while off < d.size:
            n = d.readinto(off, buf)
            h.update(memoryview(buf)[:n])
            off += n
    return h.hexdigest()


def file_sha256(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, cmd)), check=True, capture_output=True, text=True, **kw)


def qemu_raw(vhd: os.PathLike | str, out: os.PathLike | str) -> Path:
    """qemu-img's view of a fixed or dynamic VHD as a raw file (qemu ignores differencing parents)."""
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd, out])
    return Path(out)


def vhd_util_path() -> str | None:
    """libvhd's vhd-util, from the VHD_UTIL environment variable (.ci/run sets it when the tool exists)."""
    p = os.environ.get("VHD_UTIL")
    return p if p and os.access(p, os.X_OK) else None


def vhd_util(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    """Run vhd-util (tests using it skip first through ``needs_vhd_util``)."""
    return subprocess.run([vhd_util_path(), *map(str, args)], check=check, capture_output=True, text=True)


def vhd_util_read(path: os.PathLike | str, size: int) -> bytes:
    """The virtual disk through libvhd's ``read -r`` (raw bytes through the chain; dynamic/differencing only)."""
    out = bytearray()
    step = 2048  # sectors per call: vhd-util read fails on larger counts
    for sec in range(0, size // 512, step):
        n = min(step, size // 512 - sec)
        out += subprocess.run([vhd_util_path(), "read", "-n", str(path), "-r", str(sec), "-c", str(n)], check=True,
                              capture_output=True).stdout
    assert len(out) == size, f"vhd-util read gave {len(out)} bytes, expected {size}"
    return bytes(out)


def vhdcore_cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "vhdcore", *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
    return r


def faulted(fn, at: int, monkeypatch) -> bool:
    """Run ``fn`` with the ``at``-th write failing; True if it completed (fewer writes than ``at``)."""
    monkeypatch.setenv("VHDCORE_FAULT_AFTER_WRITES", str(at))
    monkeypatch.setenv("VHDCORE_FAULT_ACTION", "eio")
    try:
        fn()
        return True
    except OSError as e:
        assert "injected fault" in str(e)
        return False
    finally:
        monkeypatch.delenv("VHDCORE_FAULT_AFTER_WRITES")

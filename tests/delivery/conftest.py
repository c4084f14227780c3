"""Fixtures for the delivery tests: disk-like test content, the real Swift server, a fault-injecting proxy."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Iterator

import pytest

from support.faultproxy import FaultProxy
from support.swift_server import SwiftServer, swift_server  # noqa: F401 - re-exported session fixture

KiB = 1024
MiB = 1024 * KiB


_PACKED = (".gz", ".xz", ".bz2", ".zst", ".zip", ".png", ".jpg", ".gif", ".pyc", ".whl")


def _usr_text(n: int, rnd: random.Random) -> bytes:
    """Real file bytes (text, ELF, compressed man pages...) from /usr/share, like a guest file system holds."""
    files: list[str] = []
    for top in ("/usr/share/doc", "/usr/share/perl5", "/usr/share/common-licenses", "/usr/lib/python3"):
        for d, _, names in os.walk(top):
            # already-compressed files would make the "file" runs as incompressible as the random ones
            files.extend(os.path.join(d, f) for f in names if not f.endswith(_PACKED))
            if len(files) > 4000:
                break
    files.sort()
    rnd.shuffle(files)
    out = bytearray()
    for p in files:
        if len(out) >= n:
            break
        try:
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    out += f.read(n - len(out))
        except OSError:
            continue
    if len(out) < n:  # a minimal system: fall back to pseudo text, still compressible
        words = [bytes(rnd.choice(b"abcdefghij ") for _ in range(8)) for _ in range(512)]
        while len(out) < n:
            out += b" ".join(rnd.choice(words) for _ in range(64)) + b"\n"
    return bytes(out[:n])


def disk_like(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that look like a disk: runs of file content, zeros and random (incompressible) data."""
    rnd = random.Random(seed)
    text = _usr_text(max(n // 2, 64 * KiB), rnd)
    out = bytearray()
    while len(out) < n:
        run = min(rnd.choice((4 * KiB, 60 * KiB, 256 * KiB, 1 * MiB)) + rnd.randrange(512), n - len(out))
        r = rnd.random()
        if r < 0.25:
            out += bytes(run)
        elif r < 0.4:
            out += rnd.randbytes(run)
        else:
            start = rnd.randrange(max(1, len(text) - run))
            out += text[start : start + run]
    return bytes(out)


@pytest.fixture(scope="session")
def disk_bytes() -> bytes:
    """About 5 MiB of disk-like content (odd length, so no piece boundary lines up by accident)."""
    return disk_like(5 * MiB + 12345, seed=7)


@pytest.fixture
def fault_proxy(swift_server: SwiftServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(swift_server.proxy_port)
    try:
        yield proxy
    finally:
        proxy.close()

"""The README's main job on a built-in sample: a small server-like chain, inspected.

Run with ``python -m vhdcore.demo [DIR]`` (``make demo``). It builds a base disk and two snapshots with vhdcore
itself, then shows what the CLI reports about the chain, the way an imaging pipeline would look at it.
"""
from __future__ import annotations

import os
import random
import sys
import tempfile

from . import cli
from .create import create, snapshot

MiB = 1024 * 1024


def build_sample_chain(directory: str) -> str:
    """base.vhd (64 MiB dynamic, 'OS install') <- snap1.vhd (updates) <- leaf.vhd (recent writes)."""
    rnd = random.Random(2026)
    base = os.path.join(directory, "base.vhd")
    with create(base, 64 * MiB, block_size=2 * MiB) as d:
        for i in range(12):  # an install: whole blocks of data
            d.write(i * 2 * MiB, rnd.randbytes(2 * MiB))
    snap = os.path.join(directory, "snap1.vhd")
    with snapshot(base, snap) as d:
        for _ in range(40):  # scattered updates: partial blocks shadowing the base
            d.write(rnd.randrange(0, 24 * MiB // 4096) * 4096, rnd.randbytes(64 * 1024))
    leaf = os.path.join(directory, "leaf.vhd")
    with snapshot(snap, leaf) as d:
        d.write(40 * MiB, rnd.randbytes(3 * MiB))  # new data past the install
        d.write(5 * MiB + 512, b"recent log line\n" * 64)  # an unaligned small write
    return leaf


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    directory = argv[0] if argv else tempfile.mkdtemp(prefix="vhdcore-demo-")
    os.makedirs(directory, exist_ok=True)
    for name in ("leaf.vhd", "snap1.vhd", "base.vhd"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.unlink(path)
    leaf = build_sample_chain(directory)
    print(f"== sample chain in {directory}: base.vhd <- snap1.vhd <- leaf.vhd\n")
    print("$ vhdcore info leaf.vhd")
    rc = cli.main(["info", leaf])
    print("\n$ vhdcore map leaf.vhd")
    rc |= cli.main(["map", leaf])
    return rc


if __name__ == "__main__":
    sys.exit(main())

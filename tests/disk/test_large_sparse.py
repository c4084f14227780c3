"""A 2040 GiB dynamic disk with a handful of blocks: every operation's cost follows the allocated data, not the
virtual size. Each step is timed on its own and must take well under a second."""
from __future__ import annotations

import json
import os
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest

import vhdcore
from vhdcore.cli import main as cli

GiB = 1024**3
MiB = 1024**2
SIZE = 2040 * GiB
LIMIT = 0.5  # seconds per step; each is ~0.1 s or less here, so this leaves room for a busy machine

WRITES = [(0, b"MBR!" * 128), (7 * GiB + 12345, b"middle" * 1000), (1024 * GiB - 3, b"across a block"),
          (SIZE - 512, b"E" * 512)]


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = time.perf_counter() - self.t0

        return _T()


def run_cli(*args: str) -> str:
    out = StringIO()
    with redirect_stdout(out):
        assert cli.main(list(args)) == 0
    return out.getvalue()


def test_2040_gib_disk_costs_follow_data(tmp_path: Path) -> None:
    p = tmp_path / "huge.vhd"
    cli.build_parser()  # imports every sub-command module once, outside the timings
    t = Timer()
    with t("create"):
        vhdcore.create(p, SIZE).close()
    with t("write"):
        with vhdcore.open(p, "r+") as d:
            for off, data in WRITES:
                d.write(off, data)
    expected_blocks = sorted({b for off, data in WRITES
                              for b in range(off // (2 * MiB), (off + len(data) - 1) // (2 * MiB) + 1)})
    assert len(expected_blocks) == 5
    with t("info"):
        info = json.loads(run_cli("info", "--json", str(p)))
    assert info["virtual_size"] == SIZE and info["allocated_blocks"] == 5
    assert info["max_table_entries"] == SIZE // (2 * MiB)
    with t("map"):
        entries = json.loads(run_cli("map", "--json", str(p)))
    # Exactly the written sectors are held (bitmap bits), not the whole blocks around them.
    held = {s for off, data in WRITES for s in range(off // 512, -(-(off + len(data)) // 512))}
    assert sum(e["length"] for e in entries) == len(held) * 512
    # Blocks 524287 and 524288 are neighbours on the disk but not in the file (a bitmap sits between them).
    assert [e["start"] // (2 * MiB) for e in entries] == expected_blocks
    out = tmp_path / "out.vhd"
    with t("convert"):
        run_cli("convert", "--to", "dynamic", "--json", str(p), str(out))
    with t("reopen+read"):
        with vhdcore.open(out) as d:
            assert d.size == SIZE
            assert [int(b) for b in d.leaf.allocated_blocks()] == expected_blocks
            for off, data in WRITES:
                assert d.read(off, len(data)) == data
            assert d.read(100 * GiB, 4096) == bytes(4096)
    # The files hold the blocks and a 4 MiB BAT, nothing in proportion to 2 TiB.
    assert os.path.getsize(p) < 20 * MiB and os.path.getsize(out) < 20 * MiB
    print({k: round(v, 3) for k, v in t.times.items()})
    slow = {k: round(v, 3) for k, v in t.times.items() if v > LIMIT}
    assert not slow, f"steps over {LIMIT} s: {slow} (all: {t.times})"


def test_2040_gib_chain_extents_fast(tmp_path: Path) -> None:
    """The same through a differencing child: extents and allocated bytes of the chain cost the allocated data."""
    base, child = tmp_path / "b.vhd", tmp_path / "c.vhd"
    with vhdcore.create(base, SIZE) as d:
        d.write(1000 * GiB, b"b" * 4096)
    with vhdcore.snapshot(base, child) as d:
        d.write(1000 * GiB + 512, b"c" * 512)
        d.write(2000 * GiB, b"c" * 1)
    t0 = time.perf_counter()
    with vhdcore.open(child) as d:
        exts = list(d.extents())
        assert d.allocated_bytes() == 4096 + 512  # the base's 8 sectors and the child's sector at 2000 GiB
        assert d.read(1000 * GiB, 1536) == b"b" * 512 + b"c" * 512 + b"b" * 512
    assert time.perf_counter() - t0 < LIMIT
    assert len(exts) <= 8
    assert pytest.approx(sum(e.length for e in exts)) == SIZE

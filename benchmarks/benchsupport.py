"""What the read and convert benchmarks share: the data set they build and the timings they record.

Kept out of conftest.py so that the bench files import it by a name of its own (``conftest`` is ambiguous when
tests/ and benchmarks/ are collected in one run).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DYN_SIZE = 4 * GiB
BLOCK = 2 * MiB
DYN_BLOCKS = 512  # 1 GiB of data
CHILD_FULL = 64  # full 2 MiB blocks per child
CHILD_PARTIAL = 192  # partially written blocks per child

# name -> {"min": s, "median": s, "bytes": n}; filled by the benchmarks, read by the ratio tests and the summary.
RESULTS: dict[str, dict[str, float]] = {}
RATIOS: list[str] = []


def record(name: str, benchmark: Any, nbytes: int) -> None:
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:  # --benchmark-disable: ran once, untimed
        return
    RESULTS[name] = {"min": stats.min, "median": stats.median, "bytes": nbytes}
    benchmark.extra_info["MB/s (min)"] = round(nbytes / stats.min / 1e6, 1)


# --------------------------------------------------------------------------------------------- data


def _pool(rnd: random.Random) -> bytes:
    return rnd.randbytes(64 * MiB)


def _slice(pool: bytes, rnd: random.Random, n: int) -> memoryview:
    start = rnd.randrange(0, len(pool) - n) & ~511
    return memoryview(pool)[start : start + n]


def _warm(*paths: Path) -> None:
    buf = bytearray(8 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


@dataclass
class BenchData:
    dir: Path
    dyn: Path
    plain: Path
    chain: list[Path]  # base first
    chain_raw: Path
    dyn_allocated: int
    chain_allocated: int
    info: dict = field(default_factory=dict)


def _write_child(disk, rnd: random.Random, pool: bytes, full: list[int], partial: list[int]) -> None:
    for b in full:
        disk.write(b * BLOCK, _slice(pool, rnd, BLOCK))
    for b in partial:
        for _ in range(rnd.randrange(4, 13)):
            n = rnd.randrange(1, 33) * 4 * KiB
            off = rnd.randrange(0, (BLOCK - n) // (4 * KiB) + 1) * 4 * KiB
            disk.write(b * BLOCK + off, _slice(pool, rnd, n))


def _write_dense(src: Path, dst: Path) -> None:
    """Every byte of ``src``'s virtual disk written to ``dst`` (zeros included), in 256 KiB pieces."""
    import vhdcore

    buf = bytearray(8 * MiB)
    mv = memoryview(buf)
    with vhdcore.open(src) as disk, open(dst, "wb", buffering=0) as out:
        off = 0
        while off < disk.size:
            n = disk.readinto(off, buf)
            for i in range(0, n, 256 * KiB):
                out.write(mv[i : min(n, i + 256 * KiB)])
            off += n
    assert os.stat(dst).st_blocks * 512 >= disk.size  # no holes


def build_bench_data(d: Path) -> BenchData:
    """Build the data set in directory ``d`` (see conftest.py) and warm the page cache with it."""
    import vhdcore

    rnd = random.Random(2024)
    pool = _pool(rnd)
    nblocks = DYN_SIZE // BLOCK
    dyn = d / "dyn.vhd"
    chosen = sorted(rnd.sample(range(nblocks), DYN_BLOCKS))
    with vhdcore.create(dyn, DYN_SIZE, block_size=BLOCK) as disk:
        for b in chosen:
            disk.write(b * BLOCK, _slice(pool, rnd, BLOCK))
    paths = [dyn]
    for i in (1, 2):
        child = d / f"child{i}.vhd"
        picks = rnd.sample(range(nblocks), CHILD_FULL + CHILD_PARTIAL)
        with vhdcore.snapshot(paths[-1], child) as disk:
            _write_child(disk, rnd, pool, picks[:CHILD_FULL], picks[CHILD_FULL:])
        paths.append(child)
    plain, chain_raw = d / "plain.raw", d / "chain.raw"
    _write_dense(dyn, plain)
    vhdcore.convert(paths[-1], chain_raw, to="raw")
    with vhdcore.open(dyn) as disk:
        dyn_alloc = disk.allocated_bytes()
    with vhdcore.open(paths[-1]) as disk:
        chain_alloc = disk.allocated_bytes()
        nexts = sum(1 for _ in disk.extents())
        per_layer = [sum(e.length for e in disk.allocated_extents() if e.depth == k) for k in range(3)]
    data = BenchData(d, dyn, plain, paths, chain_raw, dyn_alloc, chain_alloc,
                     {"chain extents": nexts, "chain bytes per layer (leaf first)": per_layer})
    _warm(dyn, plain, *paths)
    return data


def read_through(readinto, size: int, buf: bytearray) -> int:
    """Sequential ``readinto(offset, buffer)`` calls of len(buf) bytes over ``size`` bytes; returns bytes read."""
    mv = memoryview(buf)
    off = 0
    while off < size:
        n = readinto(off, mv)
        if n <= 0:
            break
        off += n
    return off


def read_file(path: Path, buf: bytearray) -> int:
    """The ceiling for a Python reader: a plain file read sequentially with ``readinto`` into the same buffer."""
    mv = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(mv):
            total += n
    return total

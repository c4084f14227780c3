"""Kernel throughput: the Cython kernels and their pure-Python twin on the sizes vhdcore feeds them, with a
plain-Python/numpy baseline for the same work measured in the same run.

Sizes: 2 MiB blocks (the default VHD block), 512-byte sector bitmaps (one per 2 MiB block), a BAT of 1M
entries (a 2 TiB disk of 2 MiB blocks), a 16 MiB LSB-first file-system bitmap (ext4, 512 GiB of 4 KiB
blocks). MB/s = 10^6 bytes of *input* per second: block bytes for block kernels, bitmap bytes for bitmap
kernels, 4 bytes per BAT entry. Nothing is asserted about time: shared machines are noisy, so compare rows of
one run, not runs.

Run as a script for a table (``python benchmarks/bench_kernels.py [--json]``) or under pytest-benchmark
(``pytest benchmarks/bench_kernels.py``), where ``extra_info`` holds MB/s per variant.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import numpy as np
import pytest

from vhdcore.kernels import load_backend

MiB = 1024 * 1024
BLOCK = 2 * MiB
SECTOR = 512
UNUSED = 0xFFFFFFFF


def _inputs() -> dict[str, Any]:
    rng = np.random.default_rng(12345)
    # b"\0" * n writes its pages; bytes(n) would map the kernel's shared zero page and read from L1.
    zero_block = b"\0" * BLOCK
    data = rng.integers(0, 256, BLOCK, dtype=np.uint8)
    tail_set = bytearray(b"\0" * BLOCK)
    tail_set[-1] = 1
    # Half of the sectors zero, in runs of 8 sectors, like a lightly used guest block.
    zero_runs = np.repeat(rng.random(BLOCK // SECTOR // 8) < 0.5, 8)
    half_zero = np.where(np.repeat(zero_runs, SECTOR), 0, data).astype(np.uint8)
    present_runs = np.repeat(rng.random(BLOCK // SECTOR // 8) < 0.5, 8)
    n_bat = 1 << 20
    span = (BLOCK + SECTOR) // SECTOR
    # 95 % allocated, in file order; a full 1M-entry BAT of 2 MiB blocks would pass the 2 TiB format limit.
    allocated = rng.random(n_bat) < 0.95
    offsets = 3 + (np.cumsum(allocated, dtype=np.uint64) - 1) * span
    sorted_bat = np.where(allocated, offsets, UNUSED).astype(np.uint32)
    fs_bitmap = np.repeat(rng.random(16 * MiB // 64) < 0.6, 64).astype(np.uint8) * 0xFF
    fs_bitmap[::7] = rng.integers(0, 256, len(fs_bitmap[::7]), dtype=np.uint8)
    return {
        "zero_block": zero_block,
        "zero_ref": b"\0" * BLOCK,
        "tail_set": bytes(tail_set),
        "data": data,
        "half_zero": half_zero,
        "dst": np.zeros(BLOCK, np.uint8),
        "bm_full": b"\xff" * 512,
        "bm_runs8": np.packbits(present_runs).tobytes(),
        "bm_runs64": np.packbits(np.repeat(rng.random(64) < 0.5, 64)).tobytes(),
        "bm_random": rng.integers(0, 256, 512, dtype=np.uint8).tobytes(),
        "bm_out": bytearray(512),
        "mask_out": bytearray(BLOCK // SECTOR // 8),
        "bat_sorted": sorted_bat,
        "bat_shuffled": rng.permutation(sorted_bat),
        "span": span,
        "fs_bitmap": fs_bitmap,
        "fs_counts": np.zeros(len(fs_bitmap) * 8 // 512, np.uint32),
    }


_IN: dict[str, Any] = {}


def inputs() -> dict[str, Any]:
    if not _IN:
        _IN.update(_inputs())
    return _IN


def _baseline_zero_mask(buf: np.ndarray, out: bytearray) -> None:
    out[:] = np.packbits(~buf.view(np.uint64).reshape(-1, SECTOR // 8).any(axis=1)).tobytes()


def _baseline_merge(dst: np.ndarray, src: np.ndarray, bitmap: bytes) -> None:
    present = np.repeat(np.unpackbits(np.frombuffer(bitmap, np.uint8)).astype(bool), SECTOR)
    np.copyto(dst, src, where=present)


def _baseline_block_counts(bitmap: np.ndarray, bits_per_block: int) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        per_byte = np.bitwise_count(bitmap)
    else:
        per_byte = np.unpackbits(bitmap).reshape(-1, 8).sum(axis=1, dtype=np.uint8)
    return per_byte.reshape(-1, bits_per_block // 8).sum(axis=1, dtype=np.uint32)


def _baseline_bat(bat: np.ndarray, span: int) -> None:
    used = np.sort(bat[bat != UNUSED])
    int(np.count_nonzero(np.diff(used) < span))


# (case, input bytes, kernel call taking a backend module, baseline name, baseline call)
Case = tuple[str, int, Callable[[Any, dict], Any], str, Callable[[dict], Any]]
CASES: list[Case] = [
    ("is_zero 2 MiB zero block", BLOCK, lambda K, d: K.is_zero(d["zero_block"]),
     "bytes == ZERO", lambda d: d["zero_block"] == d["zero_ref"]),
    ("is_zero 2 MiB, last byte set", BLOCK, lambda K, d: K.is_zero(d["tail_set"]),
     "numpy uint64 any", lambda d: not np.frombuffer(d["tail_set"], np.uint64).any()),
    ("sector_zero_mask 2 MiB, half zero", BLOCK, lambda K, d: K.sector_zero_mask(d["half_zero"], d["mask_out"]),
     "numpy reshape any + packbits", lambda d: _baseline_zero_mask(d["half_zero"], d["mask_out"])),
    ("merge_block 2 MiB, full bitmap", BLOCK, lambda K, d: K.merge_block(d["dst"], d["data"], d["bm_full"]),
     "memcpy (numpy copyto)", lambda d: np.copyto(d["dst"], d["data"])),
    ("merge_block 2 MiB, runs of 8 sectors", BLOCK, lambda K, d: K.merge_block(d["dst"], d["data"], d["bm_runs8"]),
     "numpy copyto where", lambda d: _baseline_merge(d["dst"], d["data"], d["bm_runs8"])),
    ("bitmap_runs 512 B, 64 runs", 512, lambda K, d: K.bitmap_runs(d["bm_runs64"], 0, 4096),
     "numpy unpackbits + diff", lambda d: np.flatnonzero(np.diff(np.unpackbits(np.frombuffer(d["bm_runs64"],
                                                                                          np.uint8))))),
    ("bitmap_runs 512 B, random (~2k runs)", 512, lambda K, d: K.bitmap_runs(d["bm_random"], 0, 4096),
     "numpy unpackbits + diff", lambda d: np.flatnonzero(np.diff(np.unpackbits(np.frombuffer(d["bm_random"],
                                                                                          np.uint8))))),
    ("bitmap_runs 512 B, full", 512, lambda K, d: K.bitmap_runs(d["bm_full"], 0, 4096),
     "bytes == FULL", lambda d: d["bm_full"] == b"\xff" * 512),
    ("bitmap_count 512 B", 512, lambda K, d: K.bitmap_count(d["bm_random"], 0, 4096),
     "int.bit_count", lambda d: int.from_bytes(d["bm_random"], "big").bit_count()),
    ("bitmap_set_range 512 B, unaligned", 512, lambda K, d: K.bitmap_set_range(d["bm_out"], 3, 4093),
     "bytearray slice fill", lambda d: d["bm_out"].__setitem__(slice(1, 511), b"\xff" * 510)),
    ("bitmap_or 512 B", 512, lambda K, d: K.bitmap_or(d["bm_out"], d["bm_random"]),
     "numpy bitwise_or", lambda d: np.bitwise_or(np.frombuffer(d["bm_out"], np.uint8),
                                                 np.frombuffer(d["bm_random"], np.uint8))),
    ("bitmap_andnot 512 B", 512, lambda K, d: K.bitmap_andnot(d["bm_out"], d["bm_random"]),
     "numpy and(~)", lambda d: np.frombuffer(d["bm_out"], np.uint8) & ~np.frombuffer(d["bm_random"], np.uint8)),
    ("scan_bat 1M entries, in sector order", 4 << 20, lambda K, d: K.scan_bat(d["bat_sorted"], d["span"]),
     "numpy sort + diff", lambda d: _baseline_bat(d["bat_sorted"], d["span"])),
    ("scan_bat 1M entries, shuffled", 4 << 20, lambda K, d: K.scan_bat(d["bat_shuffled"], d["span"]),
     "numpy sort + diff", lambda d: _baseline_bat(d["bat_shuffled"], d["span"])),
    ("count_runs_in_blocks 16 MiB fs bitmap", 16 * MiB,
     lambda K, d: K.count_runs_in_blocks(d["fs_bitmap"], 512, len(d["fs_counts"]), d["fs_counts"]),
     "numpy popcount + reshape sum", lambda d: _baseline_block_counts(d["fs_bitmap"], 512)),
]
VARIANTS = ("cython", "python", "baseline")


def _callable(case: Case, variant: str) -> Callable[[], Any]:
    _, _, kernel, _, baseline = case
    d = inputs()
    if variant == "baseline":
        return lambda: baseline(d)
    K = load_backend(variant)
    return lambda: kernel(K, d)


def time_one(fn: Callable[[], Any], min_time: float = 0.2, repeat: int = 5) -> float:
    """Best seconds per call over ``repeat`` rounds of enough calls to last ``min_time``."""
    fn()
    number = 1
    while True:
        t = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - t
        if elapsed >= min_time / repeat or number >= 1 << 20:
            break
        number *= 4
    best = elapsed / number
    for _ in range(repeat - 1):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t) / number)
    return best


def run_all(min_time: float = 0.2) -> list[dict[str, Any]]:
    rows = []
    for case in CASES:
        name, nbytes, _, base_name, _ = case
        row: dict[str, Any] = {"case": name, "bytes": nbytes, "baseline": base_name}
        for v in VARIANTS:
            sec = time_one(_callable(case, v), min_time)
            row[f"{v}_us"] = round(sec * 1e6, 2)
            row[f"{v}_mb_s"] = round(nbytes / sec / 1e6, 1)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds spent per variant (default 0.2)")
    args = ap.parse_args(argv)
    rows = run_all(args.min_time)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{os.cpu_count()} CPUs; MB/s of input, best of 5 rounds")
    print(f"{'case':40s} {'cython':>10s} {'python':>10s} {'baseline':>10s}  baseline")
    for r in rows:
        print(f"{r['case']:40s} {r['cython_mb_s']:10.1f} {r['python_mb_s']:10.1f} {r['baseline_mb_s']:10.1f}"
              f"  {r['baseline']}")
    print(f"(cython / python speed-up, median over cases: "
          f"{statistics.median(r['cython_mb_s'] / r['python_mb_s'] for r in rows):.1f}x)")


# ---------------------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_throughput(benchmark: Any, case: Case, variant: str) -> None:
    name, nbytes, _, base_name, _ = case
    benchmark.group = name
    benchmark.extra_info["variant"] = base_name if variant == "baseline" else variant
    benchmark(_callable(case, variant))
    benchmark.extra_info["MB/s (median)"] = round(nbytes / benchmark.stats.stats.median / 1e6, 1)


if __name__ == "__main__":
    main()

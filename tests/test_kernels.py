"""The kernel layer: both backends (compiled Cython and its pure-Python twin) in one process, every test
parametrized over the two, held to hand-computed answers, to a naive bit-by-bit reference and to each other.

Not marked backend_independent: the suite's second pass (VHDCORE_PUREPYTHON=1) runs them again, which also
checks that forcing the twin does not change what ``load_backend`` hands out.
"""
from __future__ import annotations

import importlib.machinery
import inspect
import itertools
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhdcore import kernels as _kernels
from vhdcore.kernels import KERNELS, load_backend

BACKENDS = ("cython", "python")
UNUSED = 0xFFFFFFFF
MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent

HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(params=BACKENDS)
def K(request: pytest.FixtureRequest) -> ModuleType:
    return load_backend(request.param)


def other(K: ModuleType) -> ModuleType:
    return load_backend("python" if K.CYTHON_MODULE else "cython")


# ------------------------------------------------------------------------------------ naive references
def bits_of(buf: bytes, msb_first: bool) -> list[int]:
    out = []
    for byte in bytes(buf):
        for k in range(8):
            out.append((byte >> (7 - k if msb_first else k)) & 1)
    return out


def pack(bits: list[int], msb_first: bool) -> bytes:
    out = bytearray(len(bits) // 8)
    for i, b in enumerate(bits):
        if b:
            out[i // 8] |= 1 << (7 - i % 8 if msb_first else i % 8)
    return bytes(out)


def naive_runs(bits: list[int], start: int, stop: int) -> list[tuple[int, int, bool]]:
    runs, pos = [], start
    for value, group in itertools.groupby(bits[start:stop]):
        n = len(list(group))
        runs.append((pos, n, bool(value)))
        pos += n
    return runs


def naive_merge(dst: bytes, src: bytes, bitmap: bytes, sector_size: int) -> tuple[bytes, int]:
    out, copied = bytearray(dst), 0
    for i, present in enumerate(bits_of(bitmap, True)[: len(dst) // sector_size]):
        if present:
            out[i * sector_size : (i + 1) * sector_size] = src[i * sector_size : (i + 1) * sector_size]
            copied += 1
    return bytes(out), copied


def naive_scan_bat(entries: list[int], span: int) -> tuple[int, int, int, int]:
    used = sorted(e for e in entries if e != UNUSED)
    if not used:
        return 0, 0, 0, 0
    overlaps = sum(1 for a, b in zip(used, used[1:]) if b - a < span)
    return len(used), used[0], used[-1] + span, overlaps


# ------------------------------------------------------------------------------------ edge-case tables
SIZES = (1, 2, 7, 8, 9, 16, 17, 64, 65)  # bytes: 64-bit windows that end inside, on and past the buffer


def patterns(nbytes: int) -> dict[str, list[int]]:
    n = nbytes * 8
    p = {
        "all_clear": [0] * n,
        "all_set": [1] * n,
        "first_bit": [1] + [0] * (n - 1),
        "last_bit": [0] * (n - 1) + [1],
        "all_but_first": [0] + [1] * (n - 1),
        "all_but_last": [1] * (n - 1) + [0],
        "alternating": [i & 1 for i in range(n)],
        "byte_boundary": [1 if i in (7, 8) else 0 for i in range(n)],
        "word_boundary": [1 if i in (63, 64) else 0 for i in range(n)],
        "word_of_ones": [1 if 64 <= i < 128 else 0 for i in range(n)],
        "runs_of_13": [(i // 13) & 1 for i in range(n)],
    }
    return p


def ranges(nbytes: int) -> list[tuple[int, int]]:
    n = nbytes * 8
    cand = [(0, n), (1, n), (0, n - 1), (7, 9), (8, 64), (63, 65), (64, 128), (3, 3), (0, 0), (n, n),
            (5, 61), (9, n - 7), (1, 2), (n - 1, n), (62, n), (3, 200)]
    return sorted({(a, b) for a, b in cand if 0 <= a <= b <= n})


def table():
    for nbytes in SIZES:
        for name, bits in patterns(nbytes).items():
            for start, stop in ranges(nbytes):
                yield nbytes, name, bits, start, stop


# ------------------------------------------------------------------------------------ backend identity
def test_backend_module_is_what_it_claims(K: ModuleType) -> None:
    """The "cython" backend really is the compiled extension, not the twin under another name."""
    compiled = K.__name__ == "vhdcore._coalesce"
    assert K.CYTHON_MODULE is compiled
    if compiled:
        assert any(K.__file__.endswith(sfx) for sfx in importlib.machinery.EXTENSION_SUFFIXES), K.__file__
        for name in KERNELS:
            fn = getattr(K, name)
            assert not inspect.isfunction(fn), f"{name} is Python code"
            assert type(fn).__name__ in ("cython_function_or_method", "builtin_function_or_method")
    else:
        assert K.__file__.endswith("_coalesce_py.py")
        assert all(inspect.isfunction(getattr(K, name)) for name in KERNELS)


def test_kernels_reexports_the_selected_backend(K: ModuleType) -> None:
    expected = "python" if os.environ.get("VHDCORE_PUREPYTHON", "").lower() in ("1", "true", "yes") else "cython"
    assert _kernels.BACKEND == expected
    chosen = load_backend(_kernels.BACKEND)
    for name in KERNELS:
        assert getattr(_kernels, name) is getattr(chosen, name)
    # Both backends expose the same surface with the same signatures (where Python can introspect them).
    assert all(callable(getattr(K, name)) for name in KERNELS)


def test_load_backend_rejects_unknown_names(K: ModuleType) -> None:
    with pytest.raises(ValueError, match="unknown kernel backend"):
        load_backend("fortran")
    assert load_backend("cython" if K.CYTHON_MODULE else "python") is K


_PROBE = """
import sys, warnings
if {block}:
    sys.modules["vhdcore._coalesce"] = None  # the extension "is not built": importing it raises ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import vhdcore.kernels as k
print(k.BACKEND, k.is_zero.__module__, any(issubclass(w.category, RuntimeWarning) for w in caught))
"""


@pytest.mark.parametrize("env,block,expected", [
    ("", False, "cython vhdcore._coalesce False"),
    ("1", False, "python vhdcore._coalesce_py False"),
    ("true", False, "python vhdcore._coalesce_py False"),
    ("", True, "python vhdcore._coalesce_py True"),  # fallback: the twin, with a warning
], ids=["default-cython", "env-1-python", "env-true-python", "missing-extension-python"])
def test_backend_selection_in_a_fresh_interpreter(env: str, block: bool, expected: str) -> None:
    e = {k: v for k, v in os.environ.items() if k != "VHDCORE_PUREPYTHON"}
    if env:
        e["VHDCORE_PUREPYTHON"] = env
    r = subprocess.run([sys.executable, "-c", _PROBE.format(block=block)], env=e, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-2] == expected


# ------------------------------------------------------------------------------------ bitmap_runs / count / set
@pytest.mark.parametrize("msb_first", [True, False], ids=["msb", "lsb"])
def test_runs_count_set_range_edge_table(K: ModuleType, msb_first: bool) -> None:
    cases = 0
    for nbytes, name, bits, start, stop in table():
        buf = pack(bits, msb_first)
        where = f"{name} nbytes={nbytes} [{start},{stop}) msb={msb_first}"
        assert K.bitmap_runs(buf, start, stop, msb_first) == naive_runs(bits, start, stop), where
        assert K.bitmap_count(buf, start, stop, msb_first) == sum(bits[start:stop]), where
        for value in (True, False):
            out = bytearray(buf)
            K.bitmap_set_range(out, start, stop, value, msb_first)
            want = bits[:start] + [int(value)] * (stop - start) + bits[stop:]
            assert bytes(out) == pack(want, msb_first), f"{where} value={value}"
        cases += 1
    assert cases > 1000


def test_runs_known_answers(K: ModuleType) -> None:
    vhd = b"\x80" + bytes(511)  # a 2 MiB block's bitmap with only sector 0 present
    assert K.bitmap_runs(vhd, 0, 4096) == [(0, 1, True), (1, 4095, False)]
    assert K.bitmap_runs(vhd, 0, 4096, msb_first=False) == [(0, 7, False), (7, 1, True), (8, 4088, False)]
    assert K.bitmap_runs(bytes(511) + b"\x01", 0, 4096) == [(0, 4095, False), (4095, 1, True)]
    assert K.bitmap_runs(b"\xff" * 512, 0, 4096) == [(0, 4096, True)]
    assert K.bitmap_runs(b"\xff" * 512, 100, 100) == []
    # bits 63 and 64 straddle a 64-bit word
    assert K.bitmap_runs(bytes(7) + b"\x01\x80", 0, 72) == [(0, 63, False), (63, 2, True), (65, 7, False)]
    assert K.bitmap_runs(b"\x0f\xf0", 2, 14) == [(2, 2, False), (4, 8, True), (12, 2, False)]
    assert K.bitmap_runs(b"\x0f\xf0", 2, 14, False) == [(2, 2, True), (4, 8, False), (12, 2, True)]
    runs = K.bitmap_runs(b"\x0f", 0, 8)
    assert all(type(r[2]) is bool and type(r[0]) is int and type(r[1]) is int for r in runs)


def test_count_and_set_range_known_answers(K: ModuleType) -> None:
    assert K.bitmap_count(b"\xff" * 512, 0, 4096) == 4096
    assert K.bitmap_count(b"\x80\x01", 0, 16) == 2
    assert K.bitmap_count(b"\x80\x01", 1, 15) == 0
    assert K.bitmap_count(b"\x80\x01", 1, 15, msb_first=False) == 2
    b = bytearray(2)
    K.bitmap_set_range(b, 3, 13)
    assert bytes(b) == b"\x1f\xf8"
    b = bytearray(2)
    K.bitmap_set_range(b, 3, 13, msb_first=False)
    assert bytes(b) == b"\xf8\x1f"
    b = bytearray(b"\xff\xff")
    K.bitmap_set_range(b, 3, 13, value=False)
    assert bytes(b) == b"\xe0\x07"
    b = bytearray(b"\xaa")
    K.bitmap_set_range(b, 4, 4)  # empty range: nothing changes
    assert bytes(b) == b"\xaa"


# ------------------------------------------------------------------------------------ or / andnot
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 512, 4099])
def test_or_andnot(K: ModuleType, n: int) -> None:
    rnd = random.Random(n)
    a, b = rnd.randbytes(n), rnd.randbytes(n)
    x = np.frombuffer(a, np.uint8)
    y = np.frombuffer(b, np.uint8)
    d = bytearray(a)
    K.bitmap_or(d, b)
    assert bytes(d) == (x | y).tobytes()
    d = bytearray(a)
    K.bitmap_andnot(d, b)
    assert bytes(d) == (x & ~y).tobytes()
    d = np.frombuffer(bytearray(a), np.uint8)  # numpy destination, memoryview source
    K.bitmap_or(d, memoryview(b))
    assert d.tobytes() == (x | y).tobytes()


def test_or_andnot_in_place_on_itself(K: ModuleType) -> None:
    d = bytearray(b"\x0f\xf0")
    K.bitmap_or(d, d)
    assert d == b"\x0f\xf0"
    K.bitmap_andnot(d, d)
    assert d == b"\x00\x00"


# ------------------------------------------------------------------------------------ is_zero
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 255, 256, 257, 511, 512, 4096, 2 * MiB])
def test_is_zero_every_position_class(K: ModuleType, n: int) -> None:
    assert K.is_zero(bytes(n)) is True
    positions = sorted({p for p in (0, 1, 7, 8, 63, 64, 255, 256, n // 2, n - 9, n - 8, n - 1) if 0 <= p < n})
    for p in positions:
        buf = bytearray(n)
        buf[p] = 0x01
        assert K.is_zero(buf) is False, p
        buf[p] = 0x80
        assert K.is_zero(bytes(buf)) is False, p


def test_is_zero_buffer_kinds_and_unaligned(K: ModuleType) -> None:
    base = np.zeros(4096 + 3, np.uint8)
    view = base[3:]  # data pointer not 8-byte aligned
    assert K.is_zero(view) and K.is_zero(memoryview(view)) and K.is_zero(bytearray(4096))
    base[-1] = 1
    assert not K.is_zero(view)
    assert not K.is_zero(memoryview(base.tobytes())[3:])


# ------------------------------------------------------------------------------------ bytes_equal
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 511, 512, 4096 + 3])
def test_bytes_equal_every_position_class(K: ModuleType, n: int) -> None:
    rnd = np.random.default_rng(n)
    a = rnd.integers(0, 256, n + 3, dtype=np.uint8)[3:]  # unaligned data pointer
    assert K.bytes_equal(a, a.tobytes()) is True
    assert K.bytes_equal(memoryview(a.tobytes()), bytearray(a.tobytes())) is True
    for p in sorted({p for p in (0, 1, 7, 8, n // 2, n - 9, n - 8, n - 1) if 0 <= p < n}):
        b = bytearray(a.tobytes())
        b[p] ^= 0x01
        assert K.bytes_equal(a, b) is False, p
    assert K.bytes_equal(a, a.tobytes() + b"\0") is False  # lengths differ


# ------------------------------------------------------------------------------------ sector_zero_mask
def test_sector_zero_mask_known_answer(K: ModuleType) -> None:
    buf = bytearray(10 * 512)
    buf[1 * 512 + 511] = 1  # last byte of sector 1
    buf[8 * 512] = 1  # first byte of sector 8
    out = bytearray(b"\xff\xff\x55")
    assert K.sector_zero_mask(buf, out) == 8
    # sectors 0..7 -> 1011 1111; sectors 8, 9 -> 01, the six bits past sector 9 are left as they were
    assert bytes(out) == b"\xbf\x7f\x55"
    out = bytearray(2)
    assert K.sector_zero_mask(buf, out) == 8
    assert bytes(out) == b"\xbf\x40"


@pytest.mark.parametrize("sector_size", [1, 8, 9, 512, 520, 4096])
@pytest.mark.parametrize("nsec", [0, 1, 7, 8, 9, 17])
def test_sector_zero_mask_table(K: ModuleType, sector_size: int, nsec: int) -> None:
    rnd = random.Random(sector_size * 100 + nsec)
    buf = bytearray(nsec * sector_size)
    zero = []
    for i in range(nsec):
        z = rnd.random() < 0.5
        zero.append(int(z))
        if not z:
            buf[i * sector_size + rnd.choice([0, sector_size - 1, rnd.randrange(sector_size)])] = rnd.randrange(1, 256)
    out = bytearray(rnd.randbytes(4))
    before = bits_of(out, True)
    assert K.sector_zero_mask(bytes(buf), out, sector_size) == sum(zero)
    assert bits_of(out, True) == zero + before[nsec:]


# ------------------------------------------------------------------------------------ merge_block
@pytest.mark.parametrize("sector_size", [1, 512, 4096])
@pytest.mark.parametrize("pattern", ["all_set", "all_clear", "first_bit", "last_bit", "alternating", "byte_boundary",
                                     "word_boundary", "word_of_ones", "runs_of_13", "all_but_first"])
def test_merge_block_table(K: ModuleType, sector_size: int, pattern: str) -> None:
    for nsec in (1, 8, 9, 70, 130):
        bits = patterns((nsec + 7) // 8 + 1)[pattern]
        bitmap = pack(bits, True)
        rnd = random.Random(nsec)
        src = rnd.randbytes(nsec * sector_size)
        dst0 = rnd.randbytes(nsec * sector_size)
        want, copied = naive_merge(dst0, src, bitmap, sector_size)
        dst = bytearray(dst0)
        assert K.merge_block(dst, src, bitmap, sector_size) == copied, (pattern, nsec)
        assert bytes(dst) == want, (pattern, nsec)


def test_merge_block_real_block(K: ModuleType) -> None:
    """A 2 MiB block and its 512-byte VHD bitmap, numpy buffers, against a numpy reference."""
    rng = np.random.default_rng(7)
    src = rng.integers(0, 256, 2 * MiB, dtype=np.uint8)
    dst = np.zeros(2 * MiB, np.uint8)
    present = np.repeat(rng.random(256) < 0.5, 16)  # runs of 16 sectors
    present[[0, 4095]] = [True, True]
    bitmap = np.packbits(present).tobytes()
    assert K.merge_block(dst, src, bitmap) == int(present.sum())
    expect = np.where(np.repeat(present, 512), src, 0)
    assert np.array_equal(dst, expect)


def test_merge_block_bitmap_longer_than_block(K: ModuleType) -> None:
    """A block shorter than its bitmap (the last block of a disk): bits past the block are ignored."""
    dst = bytearray(3 * 512)
    assert K.merge_block(dst, b"\x11" * (3 * 512), b"\xff" * 512) == 3
    assert dst == b"\x11" * (3 * 512)


# ------------------------------------------------------------------------------------ scan_bat
def u32(values) -> np.ndarray:
    return np.array(values, dtype=np.uint32)


@pytest.mark.parametrize("entries,span,expected", [
    ([], 4097, (0, 0, 0, 0)),
    ([UNUSED] * 5, 4097, (0, 0, 0, 0)),
    ([7], 10, (1, 7, 17, 0)),
    ([30, UNUSED, 10, 20], 10, (3, 10, 40, 0)),  # blocks exactly span apart touch, they do not overlap
    ([30, 10, 21], 10, (3, 10, 40, 1)),  # 30 - 21 < 10
    ([5, 5, 5], 1, (3, 5, 6, 2)),  # duplicates overlap
    ([5, 5, 5], 0, (3, 5, 5, 0)),
    ([0xFFFFFFFE], 4097, (1, 0xFFFFFFFE, 0xFFFFFFFE + 4097, 0)),  # no 32-bit wrap-around
    ([3, 4100, 8197], 4097, (3, 3, 12294, 0)),
    ([8197, 4100, 3], 4097, (3, 3, 12294, 0)),
    ([3, 4099], 4097, (2, 3, 8196, 1)),
], ids=lambda v: str(v)[:40])
def test_scan_bat_known_answers(K: ModuleType, entries, span: int, expected) -> None:
    assert K.scan_bat(u32(entries), span) == expected
    assert all(type(v) is int for v in K.scan_bat(u32(entries), span))


@pytest.mark.parametrize("n", [1, 2, 255, 256, 257, 5000, 70000])  # qsort, radix sort, ordered fast path
@pytest.mark.parametrize("layout", ["sorted", "shuffled", "sorted_then_one_late", "full_range", "same_top_bytes"])
def test_scan_bat_layouts(K: ModuleType, n: int, layout: str) -> None:
    rng = np.random.default_rng(n)
    span = 4097
    if layout == "full_range":
        bat = rng.integers(0, UNUSED, n, dtype=np.uint32)
    elif layout == "same_top_bytes":
        bat = (rng.integers(0, 256, n, dtype=np.uint32) | np.uint32(0x7F7F0000))
    else:
        bat = (np.arange(n, dtype=np.uint64) * span + 3).astype(np.uint32)
        if n > 3:
            bat[rng.choice(n, n // 20 + 1, replace=False)] += np.uint32(100)  # plant overlaps
        if layout == "shuffled":
            bat = rng.permutation(bat)
        elif layout == "sorted_then_one_late":
            bat = np.sort(bat)
            bat[-1] = 1
    bat[rng.random(n) < 0.1] = UNUSED
    assert K.scan_bat(bat, span) == naive_scan_bat(bat.tolist(), span)
    assert K.scan_bat(bat, span) == other(K).scan_bat(bat, span)


# ------------------------------------------------------------------------------------ count_runs_in_blocks
def naive_blocks(bits: list[int], bpb: int, nblocks: int) -> list[int]:
    return [sum(bits[i * bpb : (i + 1) * bpb]) for i in range(nblocks)]


@pytest.mark.parametrize("msb_first", [True, False], ids=["msb", "lsb"])
def test_count_runs_in_blocks_table(K: ModuleType, msb_first: bool) -> None:
    for nbytes in (1, 8, 9, 65):
        for name, bits in patterns(nbytes).items():
            buf = pack(bits, msb_first)
            nbits = nbytes * 8
            for bpb in (1, 3, 8, 13, 64, 65, nbits, nbits + 5):
                most = -(-nbits // bpb)
                for nblocks in {0, 1, most - 1, most} - {-1}:
                    out = np.full(most + 2, 0xDEAD, np.uint32)
                    K.count_runs_in_blocks(buf, bpb, nblocks, out, msb_first)
                    where = (name, nbytes, bpb, nblocks)
                    assert out[:nblocks].tolist() == naive_blocks(bits, bpb, nblocks), where
                    assert (out[nblocks:] == 0xDEAD).all(), where


def test_count_runs_in_blocks_known_answer(K: ModuleType) -> None:
    # An ext4-style LSB-first bitmap of 40 file-system blocks, 16 per VHD block: the last VHD block is partial.
    fs = bytes([0xFF, 0x00, 0x01, 0x80, 0x0F])
    out = np.zeros(3, np.uint32)
    K.count_runs_in_blocks(fs, 16, 3, out)
    assert out.tolist() == [8, 2, 4]


# ------------------------------------------------------------------------------------ argument validation
BAD_CALLS = {
    "runs_negative_start": lambda K: K.bitmap_runs(b"\0", -1, 3),
    "runs_stop_past_end": lambda K: K.bitmap_runs(b"\0", 0, 9),
    "runs_stop_before_start": lambda K: K.bitmap_runs(b"\0", 5, 4),
    "runs_empty_bitmap": lambda K: K.bitmap_runs(b"", 0, 1),
    "count_past_end": lambda K: K.bitmap_count(b"\0" * 512, 0, 4097),
    "count_negative": lambda K: K.bitmap_count(b"\0", -8, 0),
    "set_range_past_end": lambda K: K.bitmap_set_range(bytearray(1), 2, 9),
    "set_range_reversed": lambda K: K.bitmap_set_range(bytearray(1), 3, 2),
    "or_lengths_differ": lambda K: K.bitmap_or(bytearray(2), b"\0"),
    "andnot_lengths_differ": lambda K: K.bitmap_andnot(bytearray(1), b"\0\0"),
    "mask_not_sector_multiple": lambda K: K.sector_zero_mask(bytes(1000), bytearray(1)),
    "mask_sector_size_zero": lambda K: K.sector_zero_mask(bytes(512), bytearray(1), 0),
    "mask_sector_size_negative": lambda K: K.sector_zero_mask(bytes(512), bytearray(1), -512),
    "mask_out_too_small": lambda K: K.sector_zero_mask(bytes(9 * 512), bytearray(1)),
    "merge_lengths_differ": lambda K: K.merge_block(bytearray(1024), bytes(512), b"\xff"),
    "merge_not_sector_multiple": lambda K: K.merge_block(bytearray(1000), bytes(1000), b"\xff"),
    "merge_bitmap_too_small": lambda K: K.merge_block(bytearray(9 * 512), bytes(9 * 512), b"\xff"),
    "merge_sector_size_zero": lambda K: K.merge_block(bytearray(512), bytes(512), b"\xff", 0),
    "bat_negative_span": lambda K: K.scan_bat(u32([1]), -1),
    "bat_int32": lambda K: K.scan_bat(np.zeros(4, np.int32), 1),
    "bat_uint64": lambda K: K.scan_bat(np.zeros(4, np.uint64), 1),
    "bat_bytes": lambda K: K.scan_bat(bytes(16), 1),
    "bat_big_endian": lambda K: K.scan_bat(np.zeros(4, ">u4" if sys.byteorder == "little" else "<u4"), 1),
    "bat_2d": lambda K: K.scan_bat(np.zeros((2, 2), np.uint32), 1),
    "blocks_zero_size": lambda K: K.count_runs_in_blocks(b"\0", 0, 1, np.zeros(1, np.uint32)),
    "blocks_size_too_big": lambda K: K.count_runs_in_blocks(b"\0", 2**32, 1, np.zeros(1, np.uint32)),
    "blocks_negative": lambda K: K.count_runs_in_blocks(b"\0", 8, -1, np.zeros(1, np.uint32)),
    "blocks_out_too_small": lambda K: K.count_runs_in_blocks(b"\0\0", 8, 2, np.zeros(1, np.uint32)),
    "blocks_past_bitmap": lambda K: K.count_runs_in_blocks(b"\0\0", 5, 5, np.zeros(5, np.uint32)),
    "blocks_out_wrong_dtype": lambda K: K.count_runs_in_blocks(b"\0", 8, 1, np.zeros(1, np.uint64)),
    "bitmap_int8": lambda K: K.bitmap_count(np.zeros(2, np.int8), 0, 8),
    "bitmap_uint16": lambda K: K.is_zero(np.zeros(2, np.uint16)),
    "bitmap_2d": lambda K: K.is_zero(np.zeros((2, 2), np.uint8)),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_arguments_raise_value_error(K: ModuleType, call) -> None:
    with pytest.raises(ValueError):
        call(K)


def test_range_errors_name_the_range(K: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"\[0, 4097\).*4096 bits"):
        K.bitmap_count(bytes(512), 0, 4097)
    with pytest.raises(ValueError, match="multiple of sector_size 512"):
        K.sector_zero_mask(bytes(1000), bytearray(1))


BUFFER_ERRORS = {
    "readonly_bitmap": (BufferError, lambda K: K.bitmap_set_range(b"\0", 0, 1)),
    "readonly_dst": (BufferError, lambda K: K.bitmap_or(b"\0", b"\0")),
    "readonly_merge_dst": (BufferError, lambda K: K.merge_block(bytes(512), bytes(512), b"\xff")),
    "readonly_mask_out": (BufferError, lambda K: K.sector_zero_mask(bytes(512), b"\0")),
    "readonly_counts": (BufferError, lambda K: K.count_runs_in_blocks(b"\0", 8, 1, memoryview(bytes(4)).cast("I"))),
    "non_contiguous": (BufferError, lambda K: K.is_zero(memoryview(bytes(16))[::2])),
    "str": (TypeError, lambda K: K.is_zero("abc")),
    "list": (TypeError, lambda K: K.is_zero([0, 0])),
}


@pytest.mark.parametrize("case", BUFFER_ERRORS.values(), ids=BUFFER_ERRORS.keys())
def test_unusable_buffers_raise_the_same_error_on_both(K: ModuleType, case) -> None:
    exc, call = case
    with pytest.raises(exc):
        call(K)


def test_inputs_take_every_buffer_kind(K: ModuleType) -> None:
    raw = bytes([0b10100000]) + bytes(63)
    kinds = [raw, bytearray(raw), memoryview(raw), np.frombuffer(raw, np.uint8), memoryview(b"x" + raw)[1:]]
    for buf in kinds:
        assert K.bitmap_runs(buf, 0, 4) == [(0, 1, True), (1, 1, False), (2, 1, True), (3, 1, False)]
        assert K.bitmap_count(buf, 0, 512) == 2
        assert not K.is_zero(buf)
    bat = u32([4, 1])
    for b in (bat, memoryview(bat), memoryview(bat.tobytes()).cast("I")):
        assert K.scan_bat(b, 1) == (2, 1, 5, 0)


# ------------------------------------------------------------------------------------ properties (hypothesis)
bitmaps = st.lists(st.one_of(st.just(0), st.just(255), st.integers(0, 255)), max_size=80).map(bytes)


@pytest.mark.parametrize("backend", BACKENDS)
@HYP
@given(bm=bitmaps, data=st.data(), msb_first=st.booleans(), value=st.booleans())
def test_bitmap_properties(backend: str, bm: bytes, data: st.DataObject, msb_first: bool, value: bool) -> None:
    K = load_backend(backend)
    n = len(bm) * 8
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.integers(start, n))
    bits = bits_of(bm, msb_first)
    runs = K.bitmap_runs(bm, start, stop, msb_first)
    assert runs == naive_runs(bits, start, stop) == other(K).bitmap_runs(bm, start, stop, msb_first)
    assert sum(length for _, length, _ in runs) == stop - start
    count = K.bitmap_count(bm, start, stop, msb_first)
    assert count == sum(bits[start:stop]) == sum(length for _, length, s in runs if s)
    a, b = bytearray(bm), bytearray(bm)
    K.bitmap_set_range(a, start, stop, value, msb_first)
    other(K).bitmap_set_range(b, start, stop, value, msb_first)
    assert a == b == pack(bits[:start] + [int(value)] * (stop - start) + bits[stop:], msb_first)


@pytest.mark.parametrize("backend", BACKENDS)
@HYP
@given(data=st.data(), sector_size=st.sampled_from([1, 8, 512]), nsec=st.integers(0, 40))
def test_merge_and_zero_mask_properties(backend: str, data: st.DataObject, sector_size: int, nsec: int) -> None:
    K = load_backend(backend)
    n = nsec * sector_size
    src = bytearray(n)
    for i in data.draw(st.lists(st.integers(0, max(0, n - 1)), max_size=8)) if n else []:
        src[i] = data.draw(st.integers(1, 255))
    dst0 = data.draw(st.binary(min_size=n, max_size=n))
    bitmap = data.draw(st.binary(min_size=(nsec + 7) // 8, max_size=(nsec + 7) // 8 + 2))
    want, copied = naive_merge(dst0, bytes(src), bitmap, sector_size)
    d1, d2 = bytearray(dst0), bytearray(dst0)
    assert K.merge_block(d1, src, bitmap, sector_size) == copied == other(K).merge_block(d2, src, bitmap, sector_size)
    assert d1 == d2 == want
    zero = [int(not any(src[i * sector_size : (i + 1) * sector_size])) for i in range(nsec)]
    o1 = bytearray(data.draw(st.binary(min_size=(nsec + 7) // 8, max_size=(nsec + 7) // 8 + 1)))
    o2 = bytearray(o1)
    before = bits_of(o1, True)
    assert K.sector_zero_mask(src, o1, sector_size) == sum(zero) == other(K).sector_zero_mask(src, o2, sector_size)
    assert o1 == o2 and bits_of(o1, True) == zero + before[nsec:]
    assert K.is_zero(src) == (not any(src))


@pytest.mark.parametrize("backend", BACKENDS)
@HYP
@given(entries=st.lists(st.one_of(st.just(UNUSED), st.integers(0, 2**32 - 2), st.integers(1000, 1100)), max_size=600),
       span=st.integers(0, 5000))
def test_scan_bat_properties(backend: str, entries: list[int], span: int) -> None:
    K = load_backend(backend)
    bat = u32(entries)
    assert K.scan_bat(bat, span) == naive_scan_bat(entries, span) == other(K).scan_bat(bat, span)


@pytest.mark.parametrize("backend", BACKENDS)
@HYP
@given(bm=bitmaps.filter(len), data=st.data(), msb_first=st.booleans())
def test_count_runs_in_blocks_properties(backend: str, bm: bytes, data: st.DataObject, msb_first: bool) -> None:
    K = load_backend(backend)
    n = len(bm) * 8
    bpb = data.draw(st.integers(1, n + 9))
    nblocks = data.draw(st.integers(0, -(-n // bpb)))
    o1 = np.zeros(nblocks, np.uint32)
    o2 = np.zeros(nblocks, np.uint32)
    K.count_runs_in_blocks(bm, bpb, nblocks, o1, msb_first)
    other(K).count_runs_in_blocks(bm, bpb, nblocks, o2, msb_first)
    assert o1.tolist() == o2.tolist() == naive_blocks(bits_of(bm, msb_first), bpb, nblocks)


@pytest.mark.parametrize("backend", BACKENDS)
@HYP
@given(data=st.data())
def test_or_andnot_properties(backend: str, data: st.DataObject) -> None:
    K = load_backend(backend)
    a = data.draw(st.binary(max_size=100))
    b = data.draw(st.binary(min_size=len(a), max_size=len(a)))
    d = bytearray(a)
    K.bitmap_or(d, b)
    assert d == bytes(x | y for x, y in zip(a, b))
    K.bitmap_andnot(d, b)
    assert d == bytes(x & ~y & 0xFF for x, y in zip(a, b))


# ------------------------------------------------------------------------------------ the GIL is released
def _main_thread_turns_during(fn, calls: int) -> int:
    """How often this thread got to run while another thread made ``calls`` calls of ``fn``.

    The switch interval is raised to 5 s, so the interpreter never takes the GIL from the worker by force: this
    thread (which gives the GIL up after every turn) can only run when the worker gives it up itself, which a
    kernel does inside its ``with nogil:`` block and nowhere else. A kernel that keeps the GIL scores 0 or 1.
    """
    old = sys.getswitchinterval()
    done = threading.Event()
    turns = 0

    def worker() -> None:
        try:
            for _ in range(calls):
                fn()
        finally:
            done.set()

    sys.setswitchinterval(5.0)
    t = threading.Thread(target=worker)
    try:
        t.start()
        while not done.is_set():
            turns += 1
            time.sleep(0)  # hand the GIL back
        t.join()
    finally:
        sys.setswitchinterval(old)
    return turns


def _gil_cases():
    rng = np.random.default_rng(3)
    big = np.zeros(32 * MiB, np.uint8)
    big[:] = 0  # touch the pages so every call reads real memory
    twin = big.copy()
    data = rng.integers(0, 256, 32 * MiB, dtype=np.uint8)
    bitmap = np.zeros(4 * MiB, np.uint8)
    ones = np.full(32 * MiB // 512 // 8, 0xFF, np.uint8)
    dst = np.empty(32 * MiB, np.uint8)
    bat = rng.permutation(np.arange(1 << 21, dtype=np.uint32) * np.uint32(4097))
    counts = np.zeros(len(data) * 8 // 4096, np.uint32)
    return {
        "is_zero": lambda K: K.is_zero(big),
        "bytes_equal": lambda K: K.bytes_equal(big, twin),  # equal: memcmp runs to the end
        "sector_zero_mask": lambda K: K.sector_zero_mask(big, bytearray(len(big) // 512 // 8)),
        "merge_block": lambda K: K.merge_block(dst, data, ones),
        "bitmap_runs": lambda K: K.bitmap_runs(bitmap, 0, len(bitmap) * 8),
        "bitmap_count": lambda K: K.bitmap_count(data, 0, len(data) * 8),
        "bitmap_set_range": lambda K: K.bitmap_set_range(dst, 1, len(dst) * 8 - 1),
        "bitmap_or": lambda K: K.bitmap_or(dst, data),
        "bitmap_andnot": lambda K: K.bitmap_andnot(dst, data),
        "scan_bat": lambda K: K.scan_bat(bat, 4097),
        "count_runs_in_blocks": lambda K: K.count_runs_in_blocks(data, 4096, len(counts), counts),
    }


@pytest.fixture(scope="module")
def gil_cases():
    return _gil_cases()


@pytest.mark.parametrize("kernel", KERNELS)
def test_compiled_kernels_release_the_gil(K: ModuleType, gil_cases, kernel: str) -> None:
    """The Cython backend lets other threads run during every kernel; the twin gives no such promise (numpy
    drops the GIL in some operations and not others), so for it the probe's control is checked instead: a
    call that keeps the GIL scores at most 1."""
    if K.CYTHON_MODULE:
        turns = _main_thread_turns_during(lambda: gil_cases[kernel](K), calls=8)
        assert turns >= 3, f"{kernel}: the main thread ran {turns} times during 8 calls"
    else:
        held = bytes(8 * MiB)
        assert _main_thread_turns_during(lambda: held.count(b"\1"), calls=8) <= 1
        gil_cases[kernel](K)  # and the twin runs the same inputs

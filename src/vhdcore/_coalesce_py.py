"""Pure-Python/numpy twin of the Cython kernels: the executable specification (see docs/ARCHITECTURE.md)."""
from __future__ import annotations

import numpy as np

CYTHON_MODULE = False


def _u8(buf) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8)


def _bits(buf, msb_first: bool) -> np.ndarray:
    return np.unpackbits(_u8(buf), bitorder="big" if msb_first else "little")


def _check_range(buf, start: int, stop: int) -> None:
    nbits = len(memoryview(buf).cast("B")) * 8
    if not (0 <= start <= stop <= nbits):
        raise ValueError(f"bit range [{start}, {stop}) outside a bitmap of {nbits} bits")


def bitmap_runs(bitmap, start: int, stop: int, msb_first: bool = True) -> list[tuple[int, int, bool]]:
    _check_range(bitmap, start, stop)
    if start == stop:
        return []
    b = _bits(bitmap, msb_first)[start:stop]
    edges = np.flatnonzero(np.diff(b)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(b)]))
    return [(start + int(s), int(e - s), bool(b[s])) for s, e in zip(starts, ends)]


def bitmap_count(bitmap, start: int, stop: int, msb_first: bool = True) -> int:
    _check_range(bitmap, start, stop)
    return int(np.count_nonzero(_bits(bitmap, msb_first)[start:stop]))


def bitmap_set_range(bitmap, start: int, stop: int, value: bool = True, msb_first: bool = True) -> None:
    _check_range(bitmap, start, stop)
    arr = np.frombuffer(bitmap, dtype=np.uint8)
    b = np.unpackbits(arr, bitorder="big" if msb_first else "little")
    b[start:stop] = 1 if value else 0
    arr[:] = np.packbits(b, bitorder="big" if msb_first else "little")


def _same_len(dst, src) -> None:
    if len(memoryview(dst).cast("B")) != len(memoryview(src).cast("B")):
        raise ValueError("dst and src must have the same length")


def bitmap_or(dst, src) -> None:
    _same_len(dst, src)
    d = np.frombuffer(dst, dtype=np.uint8)
    np.bitwise_or(d, _u8(src), out=d)


def bitmap_andnot(dst, src) -> None:
    _same_len(dst, src)
    d = np.frombuffer(dst, dtype=np.uint8)
    np.bitwise_and(d, np.invert(_u8(src)), out=d)


def is_zero(buf) -> bool:
    a = _u8(buf)
    n8 = len(a) // 8 * 8
    if n8 and a[:n8].view(np.uint64).any():
        return False
    return not a[n8:].any()


def sector_zero_mask(buf, out, sector_size: int = 512) -> int:
    a = _u8(buf)
    if sector_size <= 0 or len(a) % sector_size:
        raise ValueError("buffer length must be a multiple of sector_size")
    n = len(a) // sector_size
    o = np.frombuffer(out, dtype=np.uint8)
    if len(o) * 8 < n:
        raise ValueError("output bitmap too small")
    zero = ~a.reshape(n, sector_size).any(axis=1) if n else np.zeros(0, bool)
    bits = np.unpackbits(o, bitorder="big")
    bits[:n] = zero
    o[:] = np.packbits(bits, bitorder="big")
    return int(zero.sum())


def merge_block(dst, src, bitmap, sector_size: int = 512) -> int:
    d = np.frombuffer(dst, dtype=np.uint8)
    s = _u8(src)
    if len(d) != len(s) or len(d) % sector_size:
        raise ValueError("dst and src must have the same length, a multiple of sector_size")
    n = len(d) // sector_size
    if len(_u8(bitmap)) * 8 < n:
        raise ValueError("bitmap too small for the block")
    copied = 0
    for first, length, present in bitmap_runs(bitmap, 0, n):
        if present:
            a, b = first * sector_size, (first + length) * sector_size
            d[a:b] = s[a:b]
            copied += length
    return copied


def scan_bat(bat, span_sectors: int) -> tuple[int, int, int, int]:
    a = np.asarray(bat, dtype=np.uint32)
    used = np.sort(a[a != 0xFFFFFFFF].astype(np.int64))
    if len(used) == 0:
        return 0, 0, 0, 0
    overlaps = int(np.count_nonzero(np.diff(used) < span_sectors))
    return int(len(used)), int(used[0]), int(used[-1] + span_sectors), overlaps


def count_runs_in_blocks(bitmap, bits_per_block: int, nblocks: int, out, msb_first: bool = False) -> None:
    o = np.frombuffer(out, dtype=np.uint32)
    if len(o) < nblocks or bits_per_block <= 0:
        raise ValueError("output too small or bad block size")
    bits = _bits(bitmap, msb_first)
    total = nblocks * bits_per_block
    if len(bits) < total:
        bits = np.concatenate((bits, np.zeros(total - len(bits), np.uint8)))
    o[:nblocks] = bits[:total].reshape(nblocks, bits_per_block).sum(axis=1, dtype=np.uint32)

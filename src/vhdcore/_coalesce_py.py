"""Pure-Python/numpy twin of the Cython kernels (``_coalesce.pyx``): the executable specification.

Same functions, same arguments, same results and the same exception types for bad arguments as the
compiled module (docs/ARCHITECTURE.md, "Kernels"); tests run every case against both. Written for clarity
first, then for speed with whole-array numpy operations (no Python loop per bit or per sector).

Bit order: bit ``i`` of a bitmap lives in byte ``i >> 3``; MSB-first (VHD sector bitmaps) means bit
``7 - (i & 7)`` of that byte, LSB-first (file-system bitmaps) bit ``i & 7``. numpy's ``bitorder="big"`` /
``"little"`` are exactly these two orders.
"""
from __future__ import annotations

import operator
import sys

import numpy as np

CYTHON_MODULE = False

UNUSED_ENTRY = 0xFFFFFFFF
_NATIVE = "<" if sys.byteorder == "little" else ">"
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcounts(a: np.ndarray) -> np.ndarray:
    """Set bits of each byte (numpy >= 2 has a ufunc for it; older numpy takes the table)."""
    return np.bitwise_count(a) if hasattr(np, "bitwise_count") else _POPCOUNT8[a]


# ------------------------------------------------------------------------------------------ buffer checks
# The compiled kernels take typed memoryviews (``const uint8_t[::1]`` and friends); these helpers accept and
# refuse the same buffers with the same exception types, so code tested on one backend behaves on the other.
# Struct codes Cython takes for uint8_t ('c' and '?' too) and for uint32_t, with the item size each must have.
_BYTE_CODES = ("B", "c", "?")
_U32_CODES = ("I", "L")
_ITEMSIZE = {"B": 1, "c": 1, "?": 1, "I": 4, "L": 4}


def _view(buf, codes: tuple[str, ...], writable: bool) -> memoryview:
    mv = memoryview(buf)  # TypeError for objects without the buffer protocol
    if mv.ndim != 1:
        raise ValueError(f"Buffer has wrong number of dimensions (expected 1, got {mv.ndim})")
    fmt = mv.format
    if fmt[:1] in "@=" or (fmt[:1] == _NATIVE and len(fmt) > 1):
        fmt = fmt[1:]
    elif fmt[:1] in "<>!":
        raise ValueError(f"Buffer byte order {mv.format!r} is not the native one")
    if fmt not in codes or mv.itemsize != _ITEMSIZE.get(fmt, 0):
        raise ValueError(f"Buffer dtype mismatch: format {mv.format!r}, itemsize {mv.itemsize}")
    if not mv.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    if writable and mv.readonly:
        raise BufferError("memoryview: underlying buffer is not writable")
    return mv


def _u8_in(buf) -> np.ndarray:
    return np.frombuffer(_view(buf, _BYTE_CODES, False), dtype=np.uint8)


def _u8_out(buf) -> np.ndarray:
    return np.frombuffer(_view(buf, _BYTE_CODES, True), dtype=np.uint8)


def _u32(buf, writable: bool) -> np.ndarray:
    return np.frombuffer(_view(buf, _U32_CODES, writable), dtype=np.uint32)


def _check_range(nbytes: int, start: int, stop: int) -> None:
    nbits = nbytes * 8
    if not (0 <= start <= stop <= nbits):
        raise ValueError(f"bit range [{start}, {stop}) is outside a bitmap of {nbits} bits")


def _check_sectors(nbytes: int, sector_size: int, what: str) -> None:
    if sector_size <= 0:
        raise ValueError(f"sector_size must be positive, not {sector_size}")
    if nbytes % sector_size:
        raise ValueError(f"{what} length {nbytes} is not a multiple of sector_size {sector_size}")


def _order(msb_first: bool) -> str:
    return "big" if msb_first else "little"


def _bits(a: np.ndarray, start: int, stop: int, msb_first: bool) -> np.ndarray:
    """Bits [start, stop) of byte array ``a`` as a uint8 0/1 array; only the bytes that hold them are unpacked."""
    first = start >> 3
    last = (stop + 7) >> 3
    b = np.unpackbits(a[first:last], bitorder=_order(msb_first))
    return b[start - first * 8 : stop - first * 8]


# ------------------------------------------------------------------------------------------------ kernels
def bitmap_runs(bitmap, start: int, stop: int, msb_first: bool = True) -> list[tuple[int, int, bool]]:
    """Maximal runs covering bit range [start, stop): a list of ``(first_bit, length, is_set)``, in order."""
    start, stop = operator.index(start), operator.index(stop)
    a = _u8_in(bitmap)
    _check_range(len(a), start, stop)
    if start == stop:
        return []
    b = _bits(a, start, stop, msb_first)
    edges = np.flatnonzero(b[1:] != b[:-1]) + 1  # where a run begins, after the first
    firsts = np.concatenate(([0], edges)) + start
    lengths = np.diff(np.concatenate((firsts, [stop])))
    first_set = bool(b[0])
    # Runs alternate, so run k is set iff k is even and the first run is set, or odd and it is not.
    return [(f, n, first_set ^ bool(k & 1)) for k, (f, n) in enumerate(zip(firsts.tolist(), lengths.tolist()))]


def bitmap_count(bitmap, start: int, stop: int, msb_first: bool = True) -> int:
    """Number of set bits in [start, stop)."""
    start, stop = operator.index(start), operator.index(stop)
    a = _u8_in(bitmap)
    _check_range(len(a), start, stop)
    if start == stop:
        return 0
    # Whole bytes through a per-byte popcount table; only the edge bytes are unpacked.
    lo, hi = -(-start // 8), stop // 8
    if lo >= hi:
        return int(np.count_nonzero(_bits(a, start, stop, msb_first)))
    edges = np.count_nonzero(_bits(a, start, lo * 8, msb_first)) + np.count_nonzero(_bits(a, hi * 8, stop, msb_first))
    return int(_popcounts(a[lo:hi]).sum(dtype=np.int64)) + int(edges)


def bitmap_set_range(bitmap, start: int, stop: int, value: bool = True, msb_first: bool = True) -> None:
    """Set (or with ``value=False`` clear) bits [start, stop) in place."""
    start, stop = operator.index(start), operator.index(stop)
    a = _u8_out(bitmap)
    _check_range(len(a), start, stop)
    if start == stop:
        return
    first, last = start >> 3, (stop - 1) >> 3
    # The (at most two) edge bytes are unpacked, edited and repacked; the bytes between are filled whole.
    for byte in {first, last}:
        b = np.unpackbits(a[byte : byte + 1], bitorder=_order(msb_first))
        b[max(start - byte * 8, 0) : min(stop - byte * 8, 8)] = 1 if value else 0
        a[byte] = np.packbits(b, bitorder=_order(msb_first))[0]
    a[first + 1 : last] = 0xFF if value else 0x00


def bitmap_or(dst, src) -> None:
    """``dst |= src``, byte-wise; the two have the same length."""
    d = _u8_out(dst)
    s = _u8_in(src)
    if len(s) != len(d):
        raise ValueError(f"dst and src differ in length ({len(d)} and {len(s)} bytes)")
    np.bitwise_or(d, s, out=d)


def bitmap_andnot(dst, src) -> None:
    """``dst &= ~src``, byte-wise; the two have the same length."""
    d = _u8_out(dst)
    s = _u8_in(src)
    if len(s) != len(d):
        raise ValueError(f"dst and src differ in length ({len(d)} and {len(s)} bytes)")
    np.bitwise_and(d, np.invert(s), out=d)


def is_zero(buf) -> bool:
    """True if every byte of ``buf`` is zero (true for an empty buffer)."""
    a = _u8_in(buf)
    n8 = len(a) & ~7
    # A uint64 view tests eight bytes per element; bytes past the last whole word are tested on their own.
    if n8 and a[:n8].view(np.uint64).any():
        return False
    return not a[n8:].any()


def bytes_equal(a, b) -> bool:
    """True if ``a`` and ``b`` hold the same bytes (buffers of different lengths are not equal)."""
    x, y = _u8_in(a), _u8_in(b)
    if len(x) != len(y):
        return False
    n8 = len(x) & ~7
    # Eight bytes per element where the length allows (a memoryview comparison goes byte by byte in Python).
    if n8 and not np.array_equal(x[:n8].view(np.uint64), y[:n8].view(np.uint64)):
        return False
    return bool(np.array_equal(x[n8:], y[n8:]))


def sector_zero_mask(buf, out, sector_size: int = 512) -> int:
    """Bit i of ``out`` (MSB-first) := sector i of ``buf`` is all zero; returns the number of zero sectors.

    Bits of ``out`` past the last sector are left as they were.
    """
    sector_size = operator.index(sector_size)
    a = _u8_in(buf)
    o = _u8_out(out)
    _check_sectors(len(a), sector_size, "buffer")
    n = len(a) // sector_size
    if len(o) < (n + 7) // 8:
        raise ValueError(f"out holds {len(o) * 8} bits, fewer than the {n} sectors")
    if n == 0:
        return 0
    words = a.view(np.uint64) if sector_size % 8 == 0 else a
    zero = ~words.reshape(n, -1).any(axis=1)
    nfull = n >> 3
    packed = np.packbits(zero, bitorder="big")
    o[:nfull] = packed[:nfull]
    if n & 7:  # the last, partial byte keeps its trailing bits
        keep = 0xFF >> (n & 7)
        o[nfull] = (int(packed[nfull]) & ~keep & 0xFF) | (int(o[nfull]) & keep)
    return int(np.count_nonzero(zero))


def merge_block(dst, src, bitmap, sector_size: int = 512) -> int:
    """Copy sector i of ``src`` into ``dst`` where bit i (MSB-first) of ``bitmap`` is set; returns sectors copied.

    One slice copy per run of set bits.
    """
    sector_size = operator.index(sector_size)
    d = _u8_out(dst)
    s = _u8_in(src)
    bm = _u8_in(bitmap)
    if len(s) != len(d):
        raise ValueError(f"dst and src differ in length ({len(d)} and {len(s)} bytes)")
    _check_sectors(len(d), sector_size, "dst")
    n = len(d) // sector_size
    if len(bm) * 8 < n:
        raise ValueError(f"bitmap holds {len(bm) * 8} bits, the block has {n} sectors")
    copied = 0
    for first, length, present in bitmap_runs(bm, 0, n):
        if present:
            lo, hi = first * sector_size, (first + length) * sector_size
            d[lo:hi] = s[lo:hi]
            copied += length
    return copied


def scan_bat(bat, span_sectors: int) -> tuple[int, int, int, int]:
    """Over a native-order uint32 BAT (0xFFFFFFFF = unused):
    ``(allocated, lowest_sector, highest_end_sector, overlaps)``.

    ``highest_end_sector`` is max(entry + span_sectors); ``overlaps`` counts pairs of consecutive allocated
    entries (in sector order) closer than ``span_sectors``, duplicates included.
    """
    span_sectors = operator.index(span_sectors)
    a = _u32(bat, False)
    if span_sectors < 0:
        raise ValueError(f"span_sectors must not be negative, not {span_sectors}")
    used = np.sort(a[a != UNUSED_ENTRY])
    if len(used) == 0:
        return 0, 0, 0, 0
    overlaps = int(np.count_nonzero(np.diff(used) < span_sectors))  # sorted: differences are >= 0
    return int(len(used)), int(used[0]), int(used[-1]) + span_sectors, overlaps


# Blocks per step of count_runs_in_blocks: keeps the unpacked bits of one step near 64 Mbit.
_STEP_BITS = 1 << 26


def count_runs_in_blocks(bitmap, bits_per_block: int, nblocks: int, out, msb_first: bool = False) -> None:
    """``out[i]`` := set bits in block i (bits [i * bits_per_block, (i + 1) * bits_per_block)) of ``bitmap``.

    The last block may run past the end of the bitmap (a file system rarely ends on a VHD block boundary);
    its missing bits count as clear. Entries of ``out`` past ``nblocks`` are left as they were.
    """
    bits_per_block, nblocks = operator.index(bits_per_block), operator.index(nblocks)
    a = _u8_in(bitmap)
    o = _u32(out, True)
    nbits = len(a) * 8
    if not 0 < bits_per_block <= 0xFFFFFFFF:
        raise ValueError(f"bits_per_block must be in [1, 2**32 - 1], not {bits_per_block}")
    if nblocks < 0:
        raise ValueError(f"nblocks must not be negative, not {nblocks}")
    if len(o) < nblocks:
        raise ValueError(f"out holds {len(o)} counts, nblocks is {nblocks}")
    if nblocks > -(-nbits // bits_per_block):
        raise ValueError(f"{nblocks} blocks of {bits_per_block} bits are outside a bitmap of {nbits} bits")
    if nblocks == 0:
        return
    if bits_per_block % 8 == 0:
        # Blocks of whole bytes: sum per-byte popcounts, eight times less data than unpacked bits.
        block_bytes = bits_per_block // 8
        per_byte = _popcounts(a[: nblocks * block_bytes])
        o[:nblocks] = np.add.reduceat(per_byte, np.arange(nblocks) * block_bytes, dtype=np.uint32)
        return
    step = max(1, _STEP_BITS // bits_per_block)
    for b0 in range(0, nblocks, step):
        b1 = min(b0 + step, nblocks)
        s, e = b0 * bits_per_block, min(b1 * bits_per_block, nbits)
        bits = _bits(a, s, e, msb_first)
        # reduceat sums each block's slice; the bounds are the block starts relative to s.
        o[b0:b1] = np.add.reduceat(bits, np.arange(b1 - b0) * bits_per_block, dtype=np.uint32)

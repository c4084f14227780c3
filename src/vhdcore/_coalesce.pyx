# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython kernels: tight loops over bitmaps, blocks and BATs with the GIL released.

Each ``def`` validates its arguments with the GIL held, then runs a ``nogil`` core. The pure-Python twin
(_coalesce_py.py) is the specification; tests run both.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy
from libc.stdlib cimport malloc, free, qsort

CYTHON_MODULE = True


cdef inline int _bit(const uint8_t[::1] bm, Py_ssize_t i, bint msb) noexcept nogil:
    if msb:
        return (bm[i >> 3] >> (7 - (i & 7))) & 1
    return (bm[i >> 3] >> (i & 7)) & 1


cdef inline void _set_bit(uint8_t[::1] bm, Py_ssize_t i, bint value, bint msb) noexcept nogil:
    cdef uint8_t mask
    if msb:
        mask = <uint8_t>(1 << (7 - (i & 7)))
    else:
        mask = <uint8_t>(1 << (i & 7))
    if value:
        bm[i >> 3] |= mask
    else:
        bm[i >> 3] &= <uint8_t>(~mask)


cdef Py_ssize_t _next_change(const uint8_t[::1] bm, Py_ssize_t i, Py_ssize_t stop, int value, bint msb) noexcept nogil:
    """First bit index >= i in [i, stop) whose value differs from ``value``; stop if none."""
    cdef uint8_t same = 0xFF if value else 0x00
    while i < stop:
        if (i & 7) == 0 and i + 8 <= stop:
            # Whole bytes of the same value are skipped eight bits at a time.
            if bm[i >> 3] == same:
                i += 8
                continue
        if _bit(bm, i, msb) != value:
            return i
        i += 1
    return stop


def _check_range(const uint8_t[::1] bm, Py_ssize_t start, Py_ssize_t stop):
    if start < 0 or stop < start or stop > bm.shape[0] * 8:
        raise ValueError(f"bit range [{start}, {stop}) outside a bitmap of {bm.shape[0] * 8} bits")


def bitmap_runs(const uint8_t[::1] bitmap, Py_ssize_t start, Py_ssize_t stop, bint msb_first=True):
    _check_range(bitmap, start, stop)
    if start == stop:
        return []
    cdef Py_ssize_t cap = stop - start + 1
    cdef int64_t* runs = <int64_t*>malloc(cap * 2 * sizeof(int64_t))
    if runs == NULL:
        raise MemoryError()
    cdef Py_ssize_t n = 0, i = start, j
    cdef int v
    try:
        with nogil:
            while i < stop:
                v = _bit(bitmap, i, msb_first)
                j = _next_change(bitmap, i + 1, stop, v, msb_first)
                runs[2 * n] = i
                runs[2 * n + 1] = (j - i) * 2 + v
                n += 1
                i = j
        return [(runs[2 * k], runs[2 * k + 1] >> 1, bool(runs[2 * k + 1] & 1)) for k in range(n)]
    finally:
        free(runs)


def bitmap_count(const uint8_t[::1] bitmap, Py_ssize_t start, Py_ssize_t stop, bint msb_first=True):
    _check_range(bitmap, start, stop)
    cdef Py_ssize_t i = start, total = 0
    with nogil:
        while i < stop and (i & 7):
            total += _bit(bitmap, i, msb_first)
            i += 1
        while i + 64 <= stop:
            total += _popcount8(bitmap, i >> 3)
            i += 64
        while i + 8 <= stop:
            total += __builtin_popcount(bitmap[i >> 3])
            i += 8
        while i < stop:
            total += _bit(bitmap, i, msb_first)
            i += 1
    return total


cdef extern from *:
    int __builtin_popcount(unsigned int) nogil
    int __builtin_popcountll(unsigned long long) nogil


cdef inline int _popcount8(const uint8_t[::1] bm, Py_ssize_t byte) noexcept nogil:
    cdef uint64_t w
    memcpy(&w, &bm[byte], 8)
    return __builtin_popcountll(w)


def bitmap_set_range(uint8_t[::1] bitmap, Py_ssize_t start, Py_ssize_t stop, bint value=True, bint msb_first=True):
    _check_range(bitmap, start, stop)
    cdef Py_ssize_t i = start
    cdef uint8_t fill = 0xFF if value else 0x00
    with nogil:
        while i < stop and (i & 7):
            _set_bit(bitmap, i, value, msb_first)
            i += 1
        while i + 8 <= stop:
            bitmap[i >> 3] = fill
            i += 8
        while i < stop:
            _set_bit(bitmap, i, value, msb_first)
            i += 1


def bitmap_or(uint8_t[::1] dst, const uint8_t[::1] src):
    if dst.shape[0] != src.shape[0]:
        raise ValueError("dst and src must have the same length")
    cdef Py_ssize_t i
    with nogil:
        for i in range(dst.shape[0]):
            dst[i] |= src[i]


def bitmap_andnot(uint8_t[::1] dst, const uint8_t[::1] src):
    if dst.shape[0] != src.shape[0]:
        raise ValueError("dst and src must have the same length")
    cdef Py_ssize_t i
    with nogil:
        for i in range(dst.shape[0]):
            dst[i] &= <uint8_t>(~src[i])


cdef bint _is_zero(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 0, k
    cdef uint64_t acc = 0, w
    while i + 64 <= n:
        # OR eight words, test once: keeps the loop branch-light.
        for k in range(8):
            memcpy(&w, p + i + 8 * k, 8)
            acc |= w
        if acc:
            return False
        i += 64
    while i < n:
        if p[i]:
            return False
        i += 1
    return True


def is_zero(const uint8_t[::1] buf):
    cdef bint r
    cdef Py_ssize_t n = buf.shape[0]
    if n == 0:
        return True
    with nogil:
        r = _is_zero(&buf[0], n)
    return r


def sector_zero_mask(const uint8_t[::1] buf, uint8_t[::1] out, Py_ssize_t sector_size=512):
    if sector_size <= 0 or buf.shape[0] % sector_size:
        raise ValueError("buffer length must be a multiple of sector_size")
    cdef Py_ssize_t n = buf.shape[0] // sector_size, i, zeros = 0
    if out.shape[0] * 8 < n:
        raise ValueError("output bitmap too small")
    cdef bint z
    with nogil:
        for i in range(n):
            z = _is_zero(&buf[i * sector_size], sector_size)
            _set_bit(out, i, z, True)
            zeros += z
    return zeros


def merge_block(uint8_t[::1] dst, const uint8_t[::1] src, const uint8_t[::1] bitmap, Py_ssize_t sector_size=512):
    if dst.shape[0] != src.shape[0] or sector_size <= 0 or dst.shape[0] % sector_size:
        raise ValueError("dst and src must have the same length, a multiple of sector_size")
    cdef Py_ssize_t n = dst.shape[0] // sector_size
    if bitmap.shape[0] * 8 < n:
        raise ValueError("bitmap too small for the block")
    cdef Py_ssize_t i = 0, j, copied = 0
    if n == 0:
        return 0
    with nogil:
        while i < n:
            i = _next_change(bitmap, i, n, 0, True)
            if i >= n:
                break
            j = _next_change(bitmap, i, n, 1, True)
            # One memcpy per run of present sectors.
            memcpy(&dst[i * sector_size], &src[i * sector_size], (j - i) * sector_size)
            copied += j - i
            i = j
    return copied


cdef int _cmp_u32(const void* a, const void* b) noexcept nogil:
    cdef uint32_t x = (<const uint32_t*>a)[0], y = (<const uint32_t*>b)[0]
    return (x > y) - (x < y)


def scan_bat(const uint32_t[::1] bat, uint64_t span_sectors):
    cdef Py_ssize_t n = bat.shape[0], i, count = 0, overlaps = 0
    cdef uint32_t* used = <uint32_t*>malloc((n if n else 1) * sizeof(uint32_t))
    if used == NULL:
        raise MemoryError()
    cdef uint64_t lowest = 0, highest = 0
    cdef uint32_t unused = 0xFFFFFFFFU
    try:
        with nogil:
            for i in range(n):
                if bat[i] != unused:
                    used[count] = bat[i]
                    count += 1
            if count:
                qsort(used, count, sizeof(uint32_t), _cmp_u32)
                lowest = used[0]
                highest = <uint64_t>used[count - 1] + span_sectors
                for i in range(1, count):
                    if <uint64_t>(used[i] - used[i - 1]) < span_sectors:
                        overlaps += 1
        return int(count), int(lowest), int(highest), int(overlaps)
    finally:
        free(used)


def count_runs_in_blocks(const uint8_t[::1] bitmap, Py_ssize_t bits_per_block, Py_ssize_t nblocks, uint32_t[::1] out,
                         bint msb_first=False):
    if out.shape[0] < nblocks or bits_per_block <= 0:
        raise ValueError("output too small or bad block size")
    cdef Py_ssize_t nbits = bitmap.shape[0] * 8, b, s, e, i, total
    with nogil:
        for b in range(nblocks):
            s = b * bits_per_block
            e = s + bits_per_block
            if e > nbits:
                e = nbits
            total = 0
            i = s
            while i < e and (i & 7):
                total += _bit(bitmap, i, msb_first)
                i += 1
            while i + 8 <= e:
                total += __builtin_popcount(bitmap[i >> 3])
                i += 8
            while i < e:
                total += _bit(bitmap, i, msb_first)
                i += 1
            out[b] = <uint32_t>(total if s < nbits else 0)

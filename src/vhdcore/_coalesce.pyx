# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython kernels: the tight loops over bitmaps, blocks and BATs, with the GIL released.

Each ``def`` takes typed memoryviews (``const`` for inputs, so ``bytes`` works), validates its arguments while
holding the GIL, and then runs a C-level core inside ``with nogil:``. ``_coalesce_py.py`` is the executable
specification of the same surface; the tests hold the two to identical results.

Bit order: a bitmap is a stream of bits; bit ``i`` lives in byte ``i >> 3``. MSB-first (VHD sector bitmaps)
puts it at bit ``7 - (i & 7)`` of that byte, LSB-first (ext/NTFS allocation bitmaps) at bit ``i & 7``.
The scanners read 64 stream bits at a time: an MSB-first window is loaded big-endian, so stream order is
most-significant-bit first and ``clz`` finds the first hit; an LSB-first window is loaded little-endian, so
stream order is least-significant-bit first and ``ctz`` finds it.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memmove, memset
from libc.stdlib cimport malloc, realloc, free, qsort

CYTHON_MODULE = True

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    #include <string.h>

    static inline uint64_t vhdk_load_be64(const uint8_t *p) {
        uint64_t w;
        memcpy(&w, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        w = __builtin_bswap64(w);
    #endif
        return w;
    }

    static inline uint64_t vhdk_load_le64(const uint8_t *p) {
        uint64_t w;
        memcpy(&w, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
    #endif
        return w;
    }

    /* Set bits of each byte value. */
    #define VHDK_B2(k) k, k + 1, k + 1, k + 2
    #define VHDK_B4(k) VHDK_B2(k), VHDK_B2(k + 1), VHDK_B2(k + 1), VHDK_B2(k + 2)
    #define VHDK_B6(k) VHDK_B4(k), VHDK_B4(k + 1), VHDK_B4(k + 1), VHDK_B4(k + 2)
    static const uint8_t vhdk_pop8[256] = { VHDK_B6(0), VHDK_B6(1), VHDK_B6(1), VHDK_B6(2) };

    /* Set bits in n bytes. Without -mpopcnt, __builtin_popcountll is a libgcc table walk (~7 GB/s here);
       the POPCNT instruction does ~23 GB/s, so x86 builds pick it at run time when the CPU has it. */
    #define VHDK_POPCOUNT_BODY                                                      \\
        uint64_t total = 0, w;                                                    \\
        size_t i = 0;                                                             \\
        for (; i + 8 <= n; i += 8) { memcpy(&w, p + i, 8); total += (uint64_t)__builtin_popcountll(w); } \\
        for (; i < n; i++) total += vhdk_pop8[p[i]];                               \\
        return total;

    static uint64_t vhdk_popcount_generic(const uint8_t *p, size_t n) { VHDK_POPCOUNT_BODY }

    #define VHDK_ALL_ONES UINT64_C(0xFFFFFFFFFFFFFFFF)
    #define VHDK_UNUSED_ENTRY UINT32_C(0xFFFFFFFF)

    #if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __attribute__((target("popcnt")))
    static uint64_t vhdk_popcount_hw(const uint8_t *p, size_t n) { VHDK_POPCOUNT_BODY }

    static int vhdk_has_popcnt = 0;  /* set once at import, with the GIL held; read-only afterwards */

    static void vhdk_init(void) {
        __builtin_cpu_init();
        vhdk_has_popcnt = __builtin_cpu_supports("popcnt") ? 1 : 0;
    }

    static uint64_t vhdk_popcount_bytes(const uint8_t *p, size_t n) {
        return vhdk_has_popcnt ? vhdk_popcount_hw(p, n) : vhdk_popcount_generic(p, n);
    }
    #else
    static void vhdk_init(void) {}
    static uint64_t vhdk_popcount_bytes(const uint8_t *p, size_t n) { return vhdk_popcount_generic(p, n); }
    #endif
    """
    uint64_t vhdk_load_be64(const uint8_t* p) noexcept nogil
    uint64_t vhdk_load_le64(const uint8_t* p) noexcept nogil
    void vhdk_init() noexcept
    uint64_t vhdk_popcount_bytes(const uint8_t* p, size_t n) noexcept nogil
    const uint8_t* POP8 "vhdk_pop8"  # set bits of a byte value (the builtin is a library call without -mpopcnt)
    const uint64_t ALL_ONES "VHDK_ALL_ONES"
    const uint32_t UNUSED_ENTRY "VHDK_UNUSED_ENTRY"
    int __builtin_clzll(unsigned long long x) noexcept nogil
    int __builtin_ctzll(unsigned long long x) noexcept nogil
    void __builtin_prefetch(const void* p) noexcept nogil


vhdk_init()


# ------------------------------------------------------------------------------------------------ C cores
cdef inline int _bit(const uint8_t* p, Py_ssize_t i, bint msb) noexcept nogil:
    if msb:
        return (p[i >> 3] >> (7 - (i & 7))) & 1
    return (p[i >> 3] >> (i & 7)) & 1


cdef inline uint8_t _byte_mask(int a, int b, bint msb) noexcept nogil:
    """Mask of stream bits [a, b) of one byte, 0 <= a < b <= 8."""
    if msb:
        return <uint8_t>((0xFF >> a) & (0xFF << (8 - b)))
    return <uint8_t>((0xFF << a) & (0xFF >> (8 - b)))


cdef inline uint64_t _window(const uint8_t* p, Py_ssize_t nbytes, Py_ssize_t byte, bint msb) noexcept nogil:
    """64 stream bits from byte ``byte`` on; bytes past the buffer read as zero."""
    cdef uint8_t tmp[8]
    cdef const uint8_t* q = p + byte
    if byte + 8 > nbytes:
        memset(tmp, 0, 8)
        memcpy(tmp, q, <size_t>(nbytes - byte))
        q = tmp
    return vhdk_load_be64(q) if msb else vhdk_load_le64(q)


cdef Py_ssize_t _find_other(const uint8_t* p, Py_ssize_t nbytes, Py_ssize_t i, Py_ssize_t stop, int value,
                            bint msb) noexcept nogil:
    """First bit index in [i, stop) whose value is not ``value``; ``stop`` if there is none."""
    cdef uint64_t flip = ALL_ONES if value else 0  # turn the bits we look for into ones
    cdef uint64_t w
    cdef Py_ssize_t base, lim
    cdef int off
    while i < stop:
        off = <int>(i & 7)
        base = i - off
        lim = stop - base  # > off, since i < stop
        w = _window(p, nbytes, base >> 3, msb) ^ flip
        if msb:
            w &= ALL_ONES >> off
            if lim < 64:
                w &= ~(ALL_ONES >> lim)
            if w:
                return base + __builtin_clzll(w)
        else:
            w &= ALL_ONES << off
            if lim < 64:
                w &= (<uint64_t>1 << lim) - 1
            if w:
                return base + __builtin_ctzll(w)
        if lim <= 64:
            return stop
        i = base + 64
    return stop


cdef Py_ssize_t _count(const uint8_t* p, Py_ssize_t start, Py_ssize_t stop, bint msb) noexcept nogil:
    """Set bits in [start, stop)."""
    if start >= stop:
        return 0
    cdef Py_ssize_t first = start >> 3, last = (stop - 1) >> 3
    cdef int lo = <int>(start & 7), hi = <int>(stop - (last << 3))
    if first == last:
        return POP8[p[first] & _byte_mask(lo, hi, msb)]
    cdef Py_ssize_t total = POP8[p[first] & _byte_mask(lo, 8, msb)] + POP8[p[last] & _byte_mask(0, hi, msb)]
    return total + <Py_ssize_t>vhdk_popcount_bytes(p + first + 1, <size_t>(last - first - 1))


cdef void _set_range(uint8_t* p, Py_ssize_t start, Py_ssize_t stop, bint value, bint msb) noexcept nogil:
    if start >= stop:
        return
    cdef Py_ssize_t first = start >> 3, last = (stop - 1) >> 3
    cdef int lo = <int>(start & 7), hi = <int>(stop - (last << 3))
    cdef uint8_t m
    if first == last:
        m = _byte_mask(lo, hi, msb)
        p[first] = (p[first] | m) if value else (p[first] & <uint8_t>~m)
        return
    m = _byte_mask(lo, 8, msb)
    p[first] = (p[first] | m) if value else (p[first] & <uint8_t>~m)
    m = _byte_mask(0, hi, msb)
    p[last] = (p[last] | m) if value else (p[last] & <uint8_t>~m)
    memset(p + first + 1, 0xFF if value else 0x00, <size_t>(last - first - 1))


cdef bint _all_zero(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    # OR 32 words together and branch once per 256 bytes: the compiler vectorises the inner loop and the
    # early exit still comes within 256 bytes of the first non-zero byte.
    cdef uint64_t acc, w = 0
    cdef int k
    while n >= 256:
        acc = 0
        for k in range(32):
            memcpy(&w, p + 8 * k, 8)
            acc |= w
        if acc:
            return False
        p += 256
        n -= 256
    while n >= 8:
        memcpy(&w, p, 8)
        if w:
            return False
        p += 8
        n -= 8
    while n > 0:
        if p[0]:
            return False
        p += 1
        n -= 1
    return True


cdef int _cmp_u32(const void* a, const void* b) noexcept nogil:
    cdef uint32_t x = (<const uint32_t*>a)[0], y = (<const uint32_t*>b)[0]
    return (x > y) - (x < y)


cdef Py_ssize_t _scan_ordered(const uint32_t* b, Py_ssize_t n, uint64_t span, uint64_t* lowest,
                              uint64_t* highest, Py_ssize_t* overlaps) noexcept nogil:
    """scan_bat's answer if the allocated entries are in ascending order (returns their count); else -1."""
    cdef Py_ssize_t i, count = 0, close = 0
    cdef uint32_t e, prev = 0
    for i in range(n):
        e = b[i]
        if e == UNUSED_ENTRY:
            continue
        if count:
            if e < prev:
                return -1
            close += <uint64_t>(e - prev) < span
        else:
            lowest[0] = e
        prev = e
        count += 1
    if count:
        highest[0] = <uint64_t>prev + span
    overlaps[0] = close
    return count


# Below this many entries qsort's per-call cost is smaller than the radix sort's 4 x 256-bucket histograms.
cdef enum:
    RADIX_MIN = 256
    WC_SLOTS = 16  # entries per bucket staged before a flush: one 64-byte cache line


cdef void _radix_sort_u32(uint32_t* a, uint32_t* tmp, Py_ssize_t n) noexcept nogil:
    """Sort ``a`` ascending (``tmp`` holds ``n`` more): LSD radix, one byte per pass.

    Passes whose byte is the same in every key are skipped (a file under 8 GiB never uses the top byte of
    its sector numbers). Writes are staged per bucket and flushed a cache line at a time: block offsets
    k * span spread evenly over the buckets, which puts the 256 write streams a power of two apart and makes
    a plain scatter thrash the caches (3x slower on a shuffled 1M-entry BAT). qsort, calling a comparator
    per step, is ~15x slower than this.
    """
    cdef Py_ssize_t hist[4 * 256]
    cdef uint32_t stage[256 * WC_SLOTS]
    cdef uint32_t fill[256]
    cdef Py_ssize_t i, total, c
    cdef Py_ssize_t* h
    cdef uint32_t v, k
    cdef uint32_t* src = a
    cdef uint32_t* dst = tmp
    cdef uint32_t* t
    cdef int d, shift
    memset(hist, 0, sizeof(hist))
    for i in range(n):
        v = a[i]
        hist[v & 0xFF] += 1
        hist[256 + ((v >> 8) & 0xFF)] += 1
        hist[512 + ((v >> 16) & 0xFF)] += 1
        hist[768 + (v >> 24)] += 1
    for d in range(4):
        h = hist + 256 * d
        shift = 8 * d
        if h[(src[0] >> shift) & 0xFF] == n:
            continue
        total = 0
        for k in range(256):
            c = h[k]
            h[k] = total
            total += c
        memset(fill, 0, sizeof(fill))
        for i in range(n):
            v = src[i]
            k = (v >> shift) & 0xFF
            stage[k * WC_SLOTS + fill[k]] = v
            fill[k] += 1
            if fill[k] == WC_SLOTS:
                memcpy(dst + h[k], &stage[k * WC_SLOTS], WC_SLOTS * sizeof(uint32_t))
                h[k] += WC_SLOTS
                fill[k] = 0
        for k in range(256):
            memcpy(dst + h[k], &stage[k * WC_SLOTS], fill[k] * sizeof(uint32_t))
        t = src
        src = dst
        dst = t
    if src != a:
        memcpy(a, src, <size_t>n * sizeof(uint32_t))


# ------------------------------------------------------------------------------------------------ checks
cdef int _check_range(Py_ssize_t nbytes, Py_ssize_t start, Py_ssize_t stop) except -1:
    cdef Py_ssize_t nbits = nbytes * 8
    if start < 0 or stop < start or stop > nbits:
        raise ValueError(f"bit range [{start}, {stop}) is outside a bitmap of {nbits} bits")
    return 0


cdef int _check_sectors(Py_ssize_t nbytes, Py_ssize_t sector_size, str what) except -1:
    if sector_size <= 0:
        raise ValueError(f"sector_size must be positive, not {sector_size}")
    if nbytes % sector_size:
        raise ValueError(f"{what} length {nbytes} is not a multiple of sector_size {sector_size}")
    return 0


# ------------------------------------------------------------------------------------------------ kernels
def bitmap_runs(const uint8_t[::1] bitmap, Py_ssize_t start, Py_ssize_t stop, bint msb_first=True):
    """Maximal runs covering bit range [start, stop): a list of ``(first_bit, length, is_set)``, in order."""
    cdef Py_ssize_t nbytes = bitmap.shape[0]
    _check_range(nbytes, start, stop)
    if start == stop:
        return []
    # Runs alternate in value, so their starts are enough; the array grows by doubling (never past one
    # entry per bit) so a bitmap with few runs costs little memory however long it is.
    cdef Py_ssize_t cap = min(stop - start, <Py_ssize_t>256), n = 0, i = start
    cdef Py_ssize_t* starts = <Py_ssize_t*>malloc(<size_t>cap * sizeof(Py_ssize_t))
    cdef Py_ssize_t* grown
    cdef const uint8_t* p = &bitmap[0]
    cdef int first_value, v
    cdef bint failed = False
    cdef Py_ssize_t k
    if starts == NULL:
        raise MemoryError()
    try:
        with nogil:
            first_value = _bit(p, start, msb_first)
            v = first_value
            while i < stop:
                if n == cap:
                    cap = min(cap * 2, stop - start)
                    grown = <Py_ssize_t*>realloc(starts, <size_t>cap * sizeof(Py_ssize_t))
                    if grown == NULL:
                        failed = True
                        break
                    starts = grown
                starts[n] = i
                n += 1
                i = _find_other(p, nbytes, i, stop, v, msb_first)
                v ^= 1
        if failed:
            raise MemoryError()
        out = [None] * n
        v = first_value
        for k in range(n - 1):
            out[k] = (starts[k], starts[k + 1] - starts[k], v == 1)
            v ^= 1
        out[n - 1] = (starts[n - 1], stop - starts[n - 1], v == 1)
        return out
    finally:
        free(starts)


def bitmap_count(const uint8_t[::1] bitmap, Py_ssize_t start, Py_ssize_t stop, bint msb_first=True):
    """Number of set bits in [start, stop)."""
    _check_range(bitmap.shape[0], start, stop)
    if start == stop:
        return 0
    cdef Py_ssize_t total
    cdef const uint8_t* p = &bitmap[0]
    with nogil:
        total = _count(p, start, stop, msb_first)
    return total


def bitmap_set_range(uint8_t[::1] bitmap, Py_ssize_t start, Py_ssize_t stop, bint value=True, bint msb_first=True):
    """Set (or with ``value=False`` clear) bits [start, stop) in place."""
    _check_range(bitmap.shape[0], start, stop)
    if start == stop:
        return
    cdef uint8_t* p = &bitmap[0]
    with nogil:
        _set_range(p, start, stop, value, msb_first)


def bitmap_or(uint8_t[::1] dst, const uint8_t[::1] src):
    """``dst |= src``, byte-wise; the two have the same length."""
    cdef Py_ssize_t n = dst.shape[0], i
    if src.shape[0] != n:
        raise ValueError(f"dst and src differ in length ({n} and {src.shape[0]} bytes)")
    if n == 0:
        return
    cdef uint8_t* d = &dst[0]
    cdef const uint8_t* s = &src[0]
    with nogil:
        for i in range(n):
            d[i] |= s[i]


def bitmap_andnot(uint8_t[::1] dst, const uint8_t[::1] src):
    """``dst &= ~src``, byte-wise; the two have the same length."""
    cdef Py_ssize_t n = dst.shape[0], i
    if src.shape[0] != n:
        raise ValueError(f"dst and src differ in length ({n} and {src.shape[0]} bytes)")
    if n == 0:
        return
    cdef uint8_t* d = &dst[0]
    cdef const uint8_t* s = &src[0]
    with nogil:
        for i in range(n):
            d[i] &= <uint8_t>~s[i]


def is_zero(const uint8_t[::1] buf):
    """True if every byte of ``buf`` is zero (true for an empty buffer)."""
    cdef Py_ssize_t n = buf.shape[0]
    if n == 0:
        return True
    cdef bint r
    cdef const uint8_t* p = &buf[0]
    with nogil:
        r = _all_zero(p, n)
    return r


def bytes_equal(const uint8_t[::1] a, const uint8_t[::1] b):
    """True if ``a`` and ``b`` hold the same bytes (buffers of different lengths are not equal)."""
    cdef Py_ssize_t n = a.shape[0]
    if n != b.shape[0]:
        return False
    if n == 0:
        return True
    cdef int r
    cdef const uint8_t* pa = &a[0]
    cdef const uint8_t* pb = &b[0]
    with nogil:
        r = memcmp(pa, pb, <size_t>n)
    return r == 0


def sector_zero_mask(const uint8_t[::1] buf, uint8_t[::1] out, Py_ssize_t sector_size=512):
    """Bit i of ``out`` (MSB-first) := sector i of ``buf`` is all zero; returns the number of zero sectors.

    Bits of ``out`` past the last sector are left as they were.
    """
    cdef Py_ssize_t nbytes = buf.shape[0]
    _check_sectors(nbytes, sector_size, "buffer")
    cdef Py_ssize_t n = nbytes // sector_size, zeros = 0, i, k, m
    if out.shape[0] < (n + 7) // 8:
        raise ValueError(f"out holds {out.shape[0] * 8} bits, fewer than the {n} sectors")
    if n == 0:
        return 0
    cdef const uint8_t* p = &buf[0]
    cdef uint8_t* o = &out[0]
    cdef uint8_t byte
    with nogil:
        i = 0
        while i < n:
            # One output byte per eight sectors; a last partial byte keeps its trailing bits.
            m = min(<Py_ssize_t>8, n - i)
            byte = 0
            for k in range(m):
                if _all_zero(p + (i + k) * sector_size, sector_size):
                    byte |= <uint8_t>(0x80 >> k)
                    zeros += 1
            if m < 8:
                byte |= o[i >> 3] & <uint8_t>(0xFF >> m)
            o[i >> 3] = byte
            i += 8
    return zeros


def merge_block(uint8_t[::1] dst, const uint8_t[::1] src, const uint8_t[::1] bitmap, Py_ssize_t sector_size=512):
    """Copy sector i of ``src`` into ``dst`` where bit i (MSB-first) of ``bitmap`` is set; returns sectors copied.

    Each run of set bits is one ``memmove``, so a full or mostly-full block copies at memory speed.
    """
    cdef Py_ssize_t nbytes = dst.shape[0]
    if src.shape[0] != nbytes:
        raise ValueError(f"dst and src differ in length ({nbytes} and {src.shape[0]} bytes)")
    _check_sectors(nbytes, sector_size, "dst")
    cdef Py_ssize_t n = nbytes // sector_size, bm_bytes = bitmap.shape[0]
    if bm_bytes * 8 < n:
        raise ValueError(f"bitmap holds {bm_bytes * 8} bits, the block has {n} sectors")
    if n == 0:
        return 0
    cdef uint8_t* d = &dst[0]
    cdef const uint8_t* s = &src[0]
    cdef const uint8_t* bm = &bitmap[0]
    cdef Py_ssize_t i = 0, j, copied = 0
    with nogil:
        while i < n:
            i = _find_other(bm, bm_bytes, i, n, 0, True)  # next present sector
            if i >= n:
                break
            j = _find_other(bm, bm_bytes, i, n, 1, True)  # end of its run
            memmove(d + i * sector_size, s + i * sector_size, <size_t>((j - i) * sector_size))
            copied += j - i
            i = j
    return copied


def scan_bat(const uint32_t[::1] bat, Py_ssize_t span_sectors):
    """Over a native-order uint32 BAT (0xFFFFFFFF = unused):
    ``(allocated, lowest_sector, highest_end_sector, overlaps)``.

    ``highest_end_sector`` is max(entry + span_sectors); ``overlaps`` counts pairs of consecutive allocated
    entries (in sector order) closer than ``span_sectors``, duplicates included.
    """
    if span_sectors < 0:
        raise ValueError(f"span_sectors must not be negative, not {span_sectors}")
    cdef Py_ssize_t n = bat.shape[0]
    if n == 0:
        return (0, 0, 0, 0)
    cdef const uint32_t* b = &bat[0]
    cdef uint32_t* used = NULL
    cdef uint32_t* tmp = NULL
    cdef Py_ssize_t count = 0, overlaps = 0
    cdef uint64_t lowest = 0, highest = 0, span = <uint64_t>span_sectors
    cdef Py_ssize_t i
    cdef bint failed = False
    try:
        with nogil:
            # Writers append blocks at the end of the file, so most BATs are already in sector order: one
            # read-only pass answers for them; the others are copied and sorted.
            count = _scan_ordered(b, n, span, &lowest, &highest, &overlaps)
            if count < 0:
                used = <uint32_t*>malloc(<size_t>n * sizeof(uint32_t))
                if used == NULL:
                    failed = True
                else:
                    count = 0
                    for i in range(n):
                        if b[i] != UNUSED_ENTRY:
                            used[count] = b[i]
                            count += 1
                    if count < RADIX_MIN:
                        qsort(used, <size_t>count, sizeof(uint32_t), _cmp_u32)
                    else:
                        tmp = <uint32_t*>malloc(<size_t>count * sizeof(uint32_t))
                        if tmp == NULL:
                            failed = True
                        else:
                            _radix_sort_u32(used, tmp, count)
                    if not failed:
                        lowest = used[0]
                        highest = <uint64_t>used[count - 1] + span
                        overlaps = 0
                        for i in range(1, count):
                            if <uint64_t>(used[i] - used[i - 1]) < span:
                                overlaps += 1
        if failed:
            raise MemoryError()
        return (count, lowest, highest, overlaps)
    finally:
        free(used)
        free(tmp)


def count_runs_in_blocks(const uint8_t[::1] bitmap, Py_ssize_t bits_per_block, Py_ssize_t nblocks,
                         uint32_t[::1] out, bint msb_first=False):
    """``out[i]`` := set bits in block i (bits [i * bits_per_block, (i + 1) * bits_per_block)) of ``bitmap``.

    The last block may run past the end of the bitmap (a file system rarely ends on a VHD block boundary);
    its missing bits count as clear. Entries of ``out`` past ``nblocks`` are left as they were.
    """
    cdef Py_ssize_t nbits = bitmap.shape[0] * 8
    if bits_per_block <= 0 or bits_per_block > 0xFFFFFFFF:
        raise ValueError(f"bits_per_block must be in [1, 2**32 - 1], not {bits_per_block}")
    if nblocks < 0:
        raise ValueError(f"nblocks must not be negative, not {nblocks}")
    if out.shape[0] < nblocks:
        raise ValueError(f"out holds {out.shape[0]} counts, nblocks is {nblocks}")
    if nblocks > (nbits + bits_per_block - 1) // bits_per_block:
        raise ValueError(f"{nblocks} blocks of {bits_per_block} bits are outside a bitmap of {nbits} bits")
    if nblocks == 0:
        return
    cdef const uint8_t* p = &bitmap[0]
    cdef uint32_t* o = &out[0]
    cdef Py_ssize_t blk, s, e
    with nogil:
        for blk in range(nblocks):
            s = blk * bits_per_block
            e = min(s + bits_per_block, nbits)
            # Blocks of a few cache lines are too short for the hardware prefetcher to run ahead (3x slower).
            __builtin_prefetch(p + min((s >> 3) + 1024, nbits >> 3))
            o[blk] = <uint32_t>_count(p, s, e, msb_first)

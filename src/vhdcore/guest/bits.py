"""Small helpers for LSB-first file-system bitmaps (range edits go through the kernels).

Each costs what its range costs (not the whole bitmap), which matters when a parser marks thousands of small
metadata ranges in a bitmap of millions of bits.
"""
from __future__ import annotations

import numpy as np

from .. import kernels as K


def set_range(bitmap: np.ndarray, start: int, stop: int, value: bool = True) -> None:
    """Set (or clear) bits [start, stop) of an LSB-first uint8 bitmap in place; stop is clipped to the bitmap."""
    stop = min(stop, len(bitmap) * 8)
    if start < stop:
        K.bitmap_set_range(bitmap, start, stop, value, msb_first=False)


def shift_up(bitmap: np.ndarray, nbits: int) -> np.ndarray:
    """A copy of ``bitmap`` with every bit moved ``nbits`` positions up (bit i -> bit i + nbits), 0 <= nbits < 8.

    The result is one byte longer; the low ``nbits`` bits are zero.
    """
    src = bitmap.astype(np.uint16)
    out = np.zeros(len(bitmap) + 1, dtype=np.uint16)
    out[:-1] = src << nbits
    out[1:] |= src >> (8 - nbits)
    return (out & 0xFF).astype(np.uint8)

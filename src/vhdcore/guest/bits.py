"""Small numpy helpers for LSB-first file-system bitmaps that the kernels do not cover.

Each costs what its range costs (not the whole bitmap), which matters when a parser marks thousands of small
metadata ranges in a bitmap of millions of bits.
"""
from __future__ import annotations

import numpy as np


def set_range(bitmap: np.ndarray, start: int, stop: int) -> None:
    """Set bits [start, stop) of an LSB-first uint8 bitmap, in place (stop is clipped to the bitmap)."""
    stop = min(stop, len(bitmap) * 8)
    if start >= stop:
        return
    b0, b1 = start >> 3, stop >> 3
    lo_mask = (0xFF << (start & 7)) & 0xFF
    hi_mask = (1 << (stop & 7)) - 1
    if b0 == b1:
        bitmap[b0] |= lo_mask & hi_mask
        return
    bitmap[b0] |= lo_mask
    bitmap[b0 + 1 : b1] = 0xFF
    if hi_mask:
        bitmap[b1] |= hi_mask


def shift_up(bitmap: np.ndarray, nbits: int) -> np.ndarray:
    """A copy of ``bitmap`` with every bit moved ``nbits`` positions up (bit i -> bit i + nbits), 0 <= nbits < 8.

    The result is one byte longer; the low ``nbits`` bits are zero.
    """
    src = bitmap.astype(np.uint16)
    out = np.zeros(len(bitmap) + 1, dtype=np.uint16)
    out[:-1] = src << nbits
    out[1:] |= src >> (8 - nbits)
    return (out & 0xFF).astype(np.uint8)

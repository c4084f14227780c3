"""Helpers shared by the coalesce tests: content of chains, editing header fields, chains with chosen layouts."""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import numpy as np

import vhdcore
from vhdcore.disk.image import Image
from vhdcore.format.structs import FOOTER_SIZE, HEADER_SIZE, DynamicHeader, Footer

MiB = 1024 * 1024


def content(path: os.PathLike | str, **open_kw) -> bytes:
    """The whole virtual disk of ``path``'s chain (test disks are small)."""
    with vhdcore.open(path, **open_kw) as d:
        return d.read(0, d.size)


def set_footer(path: os.PathLike | str, **changes) -> None:
    """Rewrite the footer (and the copy at offset 0 of a dynamic disk) with some fields changed."""
    with Image(path, "r", strict=False) as img:
        footer = dataclasses.replace(img.footer, **changes)
        end = img.footer_offset
        dynamic = not img.is_fixed
    fd = os.open(path, os.O_WRONLY)
    try:
        raw = footer.pack()
        os.pwrite(fd, raw, end)
        if dynamic:
            os.pwrite(fd, raw, 0)
    finally:
        os.close(fd)


def set_header(path: os.PathLike | str, **changes) -> None:
    with Image(path, "r", strict=False) as img:
        header = dataclasses.replace(img.header, **changes)
        hoff = img.footer.data_offset
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, header.pack(), hoff)
    finally:
        os.close(fd)


def layered_chain(directory: Path, *, block_size: int = 2 * MiB, nblocks: int = 12, target: str = "dynamic",
                  seed: int = 1, run: int = 64 * 1024) -> tuple[Path, Path, bytearray]:
    """A parent (dynamic, fixed, or differencing over a dynamic base) and a child exercising every case:
    full child blocks and partial ones (runs of ``run`` bytes), over allocated and unallocated parent blocks,
    all-zero child blocks over data and over nothing, and blocks the child leaves alone. Returns (parent, child, model)."""
    rnd = random.Random(seed)
    size = nblocks * block_size
    model = bytearray(size)
    base = directory / "base.vhd"
    with vhdcore.create(base, size, type="fixed" if target == "fixed" else "dynamic", block_size=block_size) as d:
        for b in range(0, nblocks, 2):  # even blocks allocated in the base
            data = rnd.randbytes(block_size)
            d.write(b * block_size, data)
            model[b * block_size : (b + 1) * block_size] = data
    parent = base
    if target == "differencing":
        parent = directory / "mid.vhd"
        with vhdcore.snapshot(base, parent) as d:
            for b in range(0, nblocks, 3):  # the middle layer holds a few partial blocks of its own
                off = b * block_size + block_size // 4
                data = rnd.randbytes(block_size // 8)
                d.write(off, data)
                model[off : off + len(data)] = data
    child = directory / "child.vhd"
    with vhdcore.snapshot(parent, child) as d:
        for b in range(nblocks):
            kind = b % 6
            start = b * block_size
            if kind in (0, 1):  # full block (over allocated, unallocated)
                data = rnd.randbytes(block_size)
                d.write(start, data)
                model[start : start + block_size] = data
            elif kind in (2, 3):  # runs
                for r in range(0, block_size, 2 * max(run, block_size // 32)):
                    data = rnd.randbytes(run)
                    d.write(start + r, data)
                    model[start + r : start + r + run] = data
            elif b % 12 in (4, 5):  # all-zero full blocks: over data below (4), over nothing (5)
                d.write(start, bytes(block_size))
                model[start : start + block_size] = bytes(block_size)
    return parent, child, model


def sectors_old_or_new(now: bytes, old: bytes, new: bytes) -> np.ndarray:
    """Indexes of 512-byte sectors of ``now`` that are neither the ``old`` nor the ``new`` sector."""
    a = np.frombuffer(now, np.uint8).reshape(-1, 512)
    o = np.frombuffer(old, np.uint8).reshape(-1, 512)
    n = np.frombuffer(new, np.uint8).reshape(-1, 512)
    ok = (a == o).all(axis=1) | (a == n).all(axis=1)
    return np.flatnonzero(~ok)


__all__ = ["content", "set_footer", "set_header", "layered_chain", "sectors_old_or_new", "MiB", "FOOTER_SIZE",
           "HEADER_SIZE", "Footer", "DynamicHeader"]

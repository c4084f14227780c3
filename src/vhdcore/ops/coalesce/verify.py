"""``verify=True``: the chain's content hashed per unit of work before the merge (xxh3-128), the target's after;
the first differing offset is a VerificationError."""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import numpy as np
import xxhash

from ...disk.chain import Disk
from ...disk.image import Image
from ...exceptions import VerificationError
from ...progress import as_progress
from .layers import MergeChain
from .merge import ProgressFn
from .report import CoalesceReport

__all__ = ["hash_chain", "verify_target"]


def _block_digests(disk: Disk, unit: int, limit: int, blocks: Iterable[int],
                   progress: ProgressFn | None = None) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    buf = bytearray(unit)
    blocks = list(blocks)
    total = sum(min(unit, limit - b * unit) for b in blocks)
    done = 0
    for b in blocks:
        v0 = b * unit
        n = min(unit, limit - v0)
        mv = memoryview(buf)[:n]
        disk.readinto(v0, mv)
        out[b] = xxhash.xxh3_128_digest(mv)
        done += n
        if progress is not None:
            progress(done, total, state="verifying")
    return out


def _data_units(layers: Sequence[Image], unit: int, limit: int) -> np.ndarray:
    """Units of the virtual disk [0, limit) that some layer may hold data in (all of them under a fixed layer)."""
    nunits = -(-limit // unit)
    parts = []
    for L in layers:
        if L.is_fixed:
            return np.arange(nunits, dtype=np.int64)
        alloc = L.allocated_blocks().astype(np.int64)
        if not len(alloc):
            continue
        start = alloc * L.block_size
        end = np.minimum(start + L.block_size, min(L.size, limit))
        keep = start < end
        first = start[keep] // unit
        last = (end[keep] - 1) // unit
        counts = last - first + 1
        base = np.repeat(first, counts)
        offs = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        parts.append(base + offs)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(parts))


def _first_difference(a: Disk, b: Disk, v0: int, n: int) -> int:
    x = np.frombuffer(a.read(v0, n), dtype=np.uint8)
    y = np.frombuffer(b.read(v0, n), dtype=np.uint8)
    diff = np.flatnonzero(x != y)
    return v0 + int(diff[0]) if len(diff) else v0



def hash_chain(chain: MergeChain, unit: int, limit: int, report: CoalesceReport,
               progress: ProgressFn | None) -> dict[int, bytes]:
    """The digest of every unit of the virtual disk [0, limit) that some layer may hold data in, before the
    merge."""
    started = time.perf_counter()
    layers = chain.layers
    before = _block_digests(Disk(layers), unit, limit, _data_units(layers, unit, limit), progress)
    report.verify_seconds += time.perf_counter() - started
    return before


def verify_target(chain: MergeChain, before: dict[int, bytes], unit: int, limit: int, strict: bool,
                  report: CoalesceReport, progress: ProgressFn | None) -> None:
    """Read the target afresh under its own parents and compare every unit with ``before`` (a unit that held
    nothing before must read as zeros now)."""
    started = time.perf_counter()
    target = chain.target
    with Image(target.path, "r", strict=strict) as fresh:
        after_disk = Disk([fresh] + chain.below)
        after_units = _data_units(after_disk.layers, unit, limit)
        zero_digest: dict[int, bytes] = {}
        check = sorted(set(before) | set(int(u) for u in after_units))
        vprog = as_progress(progress)
        vtotal, vdone = sum(min(unit, limit - b * unit) for b in check), 0
        for b in check:
            n = min(unit, limit - b * unit)
            got = _block_digests(after_disk, unit, limit, [b])[b]
            vdone += n
            vprog(vdone, vtotal, state="verifying")
            want = before.get(b)
            if want is None:
                want = zero_digest.setdefault(n, xxhash.xxh3_128_digest(bytes(n)))
            if got != want:
                off = _first_difference(Disk(chain.layers), after_disk, b * unit, n)
                raise VerificationError(
                    f"after coalescing, the target's content differs from the chain's content before, first "
                    f"at virtual offset {off}", path=target.path, offset=off, field="content")
    report.verified = True
    report.verify_seconds += time.perf_counter() - started

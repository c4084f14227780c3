"""format.rules.BlockPlacement: where the BAT's blocks may lie, judged once for Image and check. Its verdict comes
from a kernel (scan_bat), so this runs in both passes."""
from __future__ import annotations

import numpy as np

from vhdcore.format import rules as R


def test_block_placement_names_every_broken_entry() -> None:
    """Image takes the telling entry of each broken rule, check every entry: both from one BlockPlacement."""
    meta = [*R.header_regions(512), R.bat_region(1536, 8), R.Region("parent locator 0", 4096, 4608)]
    span = 1024  # a 512-byte block and its one-sector bitmap
    unused = 0xFFFFFFFF
    # 0: over the BAT; 1: before the locator, clear of metadata; 3 and 4: overlap; 5: past the limit; 6: sound.
    bat = np.array([3, 6, unused, 20, 21, 40, 30, unused], dtype=np.uint32)
    placed = R.BlockPlacement(bat, span, limit=20480, metadata=meta)
    assert placed.allocated == 6 and placed.blocks_end == 42 * 512 and placed.front.name == "parent locator 0"
    assert R.metadata_end(meta) == 4608
    entries = placed.entries.tolist()
    assert [entries[k] for k in np.flatnonzero(placed.past_end)] == [5]
    assert [(r.name, [entries[k] for k in np.flatnonzero(m)]) for r, m in placed.in_metadata if m.any()] == [
        ("BAT", [0])]
    assert [entries[k] for k in np.flatnonzero(placed.before_metadata)] == [1]
    earlier, later = placed.overlaps
    assert [(entries[a], entries[b]) for a, b in zip(earlier, later)] == [(3, 4)]
    assert [entries[k] for k in np.flatnonzero(placed.own_bytes)] == [1, 6]
    kinds = [(p.kind, p.field, p.offset, p.value) for p in placed.problems()]
    assert kinds == [(R.BLOCK_PAST_END, "bat[5]", 20, 40), (R.BLOCK_IN_METADATA, "bat[0]", 0, 3),
                     (R.BLOCKS_OVERLAP, "bat", 0, 1)]
    # A sound BAT: no problem, and nothing but the kernel's scan is needed for that verdict.
    sound = R.BlockPlacement(np.array([9, 11, unused], dtype=np.uint32), span, limit=20480, metadata=meta)
    assert sound.problems() == [] and "entries" not in sound.__dict__

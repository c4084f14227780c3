"""Parent locators: the one fitting rule (locators.fit) on its own, and a relink it drives judged by libvhd."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

from support.libvhd import assert_valid, libvhd_create, libvhd_parent, libvhd_snapshot, needs_libvhd
from vhdcore.disk.image import Image
from vhdcore.format import locators
from vhdcore.format.structs import EMPTY_LOCATOR, DynamicHeader, ParentLocator
from vhdcore.ops.setparent import set_parent

MACX, W2KU, W2RU, WI2K = b"MacX", b"W2ku", b"W2ru", b"Wi2k"


def _room(first_block: int = 8192, end: int = 20480) -> locators.Room:
    # Footer copy, header and BAT up to 2048; one block at first_block; the footer at end.
    return locators.Room(((0, 1536), (1536, 2048)), np.array([first_block], dtype=np.int64), 4096 + 512, end,
                         first_block)


def _slots(*locs: ParentLocator) -> tuple[ParentLocator, ...]:
    return tuple(locs) + (EMPTY_LOCATOR,) * (8 - len(locs))


def _wanted(rel: str = "./p.vhd") -> list[locators.Wanted]:
    return [locators.Wanted(code, locators.encode(code, rel)) for code in locators.NEW_CHILD_PLATFORMS]


def test_encode_decode_round_trip_as_libvhd_writes_them() -> None:
    assert locators.encode(MACX, "../d/p.vhd") == b"file://../d/p.vhd"
    assert locators.encode(W2KU, "../d/p.vhd") == ".\\..\\d\\p.vhd".encode("utf-16-le")
    assert locators.encode(WI2K, "./p.vhd") == b".\\p.vhd"
    assert locators.encode(b"Mac ", "./p.vhd") is None and locators.encode(WI2K, "./\u20ac.vhd") is None
    for code in (MACX, W2KU, W2RU, WI2K):
        text = locators.decode(code, locators.encode(code, "./p.vhd") + b"\0\0")
        assert locators.candidate_paths(code.decode(), text) == ["./p.vhd"]


def test_each_keeps_its_own_usable_slot_and_an_unusable_one_moves_to_free_sectors() -> None:
    slots = _slots(ParentLocator(MACX, 512, 9, 2048), ParentLocator(W2KU, 512, 14, 1 << 40),
                   ParentLocator(W2RU, 1, 14, 3072, reserved=5))
    f = locators.fit(slots, _wanted(), _room())
    assert f.outcome == [("kept", 2048), ("moved", 2560), ("kept", 3072)]
    # Kept entries keep their space as stored (sectors here) and reserved field; the moved one says bytes.
    assert f.table[:3] == (ParentLocator(MACX, 512, 14, 2048), ParentLocator(W2KU, 512, 14, 2560),
                           ParentLocator(W2RU, 1, 14, 3072, reserved=5))
    assert sorted((off, len(data)) for off, data in f.writes) == [(2048, 512), (2560, 512), (3072, 512)]


def test_own_slots_first_then_spare_space_then_dropped() -> None:
    # No free sector before the first block (3584): MacX, which has no slot, takes the spare Wi2k space; W2ku,
    # whose slot has no space, is dropped rather than taking W2ru's (W2ru keeps its own).
    slots = _slots(ParentLocator(W2RU, 512, 14, 2048), ParentLocator(W2KU, 0, 0, 0),
                   ParentLocator(WI2K, 1024, 7, 2560))
    f = locators.fit(slots, _wanted(), _room(first_block=3584))
    assert f.outcome == [("moved", 2560), ("dropped", 0), ("kept", 2048)]
    assert f.table[0] == ParentLocator(W2RU, 512, 14, 2048)
    # MacX takes the lowest empty entry; the Wi2k entry, whose space it took, is gone.
    assert f.table[1] == ParentLocator(MACX, 1024, 14, 2560) and f.table[2:] == (EMPTY_LOCATOR,) * 6
    assert all(off in (2048, 2560) for off, _ in f.writes)


def test_never_over_metadata_blocks_or_outside_the_file() -> None:
    slots = _slots(ParentLocator(MACX, 512, 9, 1536), ParentLocator(W2KU, 512, 9, 3584 + 512),
                   ParentLocator(W2RU, 512, 9, 20480), ParentLocator(WI2K, 512, 9, 2048 + 100))
    f = locators.fit(slots, _wanted(), _room(first_block=3584))
    # BAT, a block, the footer, a misaligned space: none usable; the free sectors 2048..3584 hold all three.
    assert [how for how, _ in f.outcome] == ["moved"] * 3
    assert sorted(off for off, _ in f.writes) == [2048, 2560, 3072]


@needs_libvhd
def test_relink_moves_a_locator_whose_space_is_unusable_and_libvhd_accepts_it(tmp_path: Path) -> None:
    """A libvhd child whose W2ku slot points past the end of the file: set-parent rewrites it into its old
    sector (nothing else uses it), and vhd-util checks the chain and finds the new parent."""
    d = tmp_path / "a"
    d.mkdir()
    base, child = d / "base.vhd", d / "child.vhd"
    libvhd_create(base, 4)
    libvhd_snapshot(child, base)
    raw = bytearray(child.read_bytes())
    h = DynamicHeader.parse(bytes(raw[512:1536]))
    slot = next(i for i, loc in enumerate(h.parent_locators) if loc.platform_code == W2KU)
    old = h.parent_locators[slot]
    locs = list(h.parent_locators)
    locs[slot] = dataclasses.replace(old, data_offset=1 << 40)
    raw[512:1536] = dataclasses.replace(h, parent_locators=tuple(locs)).pack()
    child.write_bytes(bytes(raw))
    moved = tmp_path / "b" / "base-copy.vhd"
    moved.parent.mkdir()
    shutil.copy2(base, moved)
    os.unlink(base)
    set_parent(child, moved)
    with Image(str(child)) as img:
        loc = img.header.parent_locators[slot]
        assert (loc.platform_code, loc.data_offset) == (W2KU, old.data_offset)
        assert dict(img.parent_candidates())["W2ku"] == ".\\..\\b\\base-copy.vhd"
    assert libvhd_parent(child) == str(moved)
    assert_valid(child)

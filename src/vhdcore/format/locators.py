"""Parent locators: how a differencing disk's path to its parent is encoded, decoded, placed and re-fitted.

A differencing header has eight locator slots (platform code, data space, data length, data offset); the data
is the parent's path in the platform's encoding, somewhere in the file. Every rule vhdcore has about them is here:

* **encode** (:func:`encode`, :func:`parent_locators_for`): the path relative to the child in every locator, as
  libvhd writes them: MacX ``file://./p.vhd`` (UTF-8), W2ku/W2ru ``.\\p.vhd`` (UTF-16-LE), Wi2k/Wi2r the same
  in Latin-1; ``..`` kept for a parent above the child (``.\\..\\d\\p.vhd``, ``file://../d/p.vhd``).
* **decode** (:func:`decode`, :func:`read`, :func:`parent_candidates`, :func:`candidate_paths`): a slot's data,
  bounded by the file and :data:`MAX_LOCATOR_BYTES`; the relative locators tried before the absolute ones; the
  text turned into POSIX path candidates (an absolute Windows path leaves only its file name).
* **place** (:func:`place`): locators of a new file, one after the other in whole sectors, space in bytes.
* **fit** (:func:`fit`): new locator data for an existing file, which cannot grow its metadata (coalesce's
  relink, set-parent, rebase, and export's chain-tar copy). See there for the rule.
"""
from __future__ import annotations

import ntpath
import os
import urllib.parse
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Sequence

import numpy as np

from .rules import table_bytes
from .structs import (
    EMPTY_LOCATOR,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_LOCATOR_BYTES,
    PLATFORM_MACX,
    PLATFORM_W2KU,
    PLATFORM_W2RU,
    PLATFORM_WI2K,
    PLATFORM_WI2R,
    SECTOR_SIZE,
    ParentLocator,
    round_up,
)

# The encoding of each platform that holds a path (a Mac alias, "Mac ", holds a binary blob, not a path).
ENCODINGS = {PLATFORM_W2RU: "utf-16-le", PLATFORM_W2KU: "utf-16-le", PLATFORM_MACX: "utf-8",
             PLATFORM_WI2R: "latin-1", PLATFORM_WI2K: "latin-1"}
# What a new child records, in slot order: MacX first (libvhd takes the first locator that resolves, in slot order).
NEW_CHILD_PLATFORMS = (PLATFORM_MACX, PLATFORM_W2KU, PLATFORM_W2RU)


# --------------------------------------------------------------------------------------------- encode


def relative_path(parent_path: str, child_path: str) -> str:
    """The parent's path relative to the child's directory, POSIX style, starting with ``./`` or ``../``."""
    parent_abs = os.path.abspath(parent_path)
    rel = os.path.relpath(parent_abs, os.path.dirname(os.path.abspath(child_path)))
    return rel if rel.startswith(".." + os.sep) else "./" + rel


def encode(code: bytes, rel: str) -> bytes | None:
    """The data a locator of platform ``code`` holds for ``rel`` (a :func:`relative_path`), or None when that
    platform cannot say it (a Mac alias, an unknown code, a name Latin-1 cannot hold)."""
    if code == PLATFORM_MACX:
        return ("file://" + rel).encode("utf-8")
    enc = ENCODINGS.get(code)
    if enc is None:
        return None
    # libvhd's Windows form: ".\\" before the relative path, "..\\" included (".\\..\\dir\\p.vhd").
    windows = (".\\" + rel if rel.startswith("..") else rel).replace("/", "\\")
    try:
        return windows.encode(enc)
    except UnicodeEncodeError:
        return None


def parent_locators_for(parent_path: str, child_path: str) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The parent name and MacX/W2ku/W2ru locators a child at ``child_path`` records for ``parent_path``.

    As libvhd's own snapshots: the path relative to the child in every locator, MacX first (libvhd takes the
    first locator that resolves, in slot order). No absolute path: a copied chain must open its own copies,
    in vhdcore and in vhd-util, even while the originals exist. The name is the parent's file name, as libvhd
    records it (its check refuses a name that differs from the locators' base name).
    """
    rel = relative_path(parent_path, child_path)
    locs = [(code, encode(code, rel)) for code in NEW_CHILD_PLATFORMS]
    return os.path.basename(os.path.abspath(parent_path)), locs  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- decode


def decode(code: bytes, raw: bytes) -> str | None:
    """The path a locator's data names, or None for platforms that hold no path (Mac alias) or bad data."""
    enc = ENCODINGS.get(code)
    if enc is None:
        return None
    try:
        return raw.decode(enc).rstrip("\0")
    except UnicodeDecodeError:
        return None


def read(loc: ParentLocator, file_size: int, pread: Callable[[int, int], bytes]) -> bytes | None:
    """The raw data of a parent locator, or None when its offset or length is out of bounds."""
    length = loc.data_length
    if length <= 0 or length > MAX_LOCATOR_BYTES or length > loc.data_space_bytes:
        return None
    if loc.data_offset <= 0 or loc.data_offset + length > file_size:
        return None
    return pread(loc.data_offset, length)


def is_relative(text: str) -> bool:
    """Whether a locator's path is relative to the child (``./p.vhd``, ``.\\p.vhd``, ``file://./p.vhd``,
    ``file://../d/p.vhd``, a bare name), not absolute (``/d/p.vhd``, ``C:\\d\\p.vhd``, ``file:///d/p.vhd``)."""
    t = text.strip()
    if t.startswith("file://"):
        return t.startswith(("file://./", "file://../"))
    return not (t.startswith(("/", "\\")) or (len(t) > 1 and t[1] == ":"))


_KNOWN = (PLATFORM_W2RU, PLATFORM_MACX, PLATFORM_W2KU, PLATFORM_WI2R, PLATFORM_WI2K)


def parent_candidates(slots: Sequence[ParentLocator], parent_name: str, read_slot: Callable[[ParentLocator],
                      bytes | None], warn: Callable[[str], None]) -> list[tuple[str, str]]:
    """``(source, path)`` pairs naming the parent, in the order to try them, then the parent unicode name.

    libvhd takes the first locator that resolves, in slot order; vhdcore tries the relative locators first
    (in slot order), then the absolute ones (in slot order): a copied chain opens its own copies even while
    the originals exist, and a chain libvhd wrote (relative paths in every slot) resolves as libvhd does.
    """
    found: list[tuple[int, int, str, str]] = []
    for slot, loc in enumerate(slots):
        if loc.platform_code not in _KNOWN:
            continue
        raw = read_slot(loc)
        if raw is None:
            warn(f"parent locator {loc.platform_code!r} points outside the file")
            continue
        p = decode(loc.platform_code, raw)
        if p:
            found.append((0 if is_relative(p) else 1, slot, loc.platform_code.decode("latin-1"), p))
    found.sort(key=lambda t: t[:2])
    out = [(src, p) for _, _, src, p in found]
    if parent_name:
        out.append(("name", parent_name))
    return out


def candidate_paths(source: str, raw: str) -> list[str]:
    """Turn one locator's text into relative or absolute POSIX path candidates."""
    text = raw.strip()
    if not text:
        return []
    if source == "MacX":
        if text.startswith(("file://./", "file://../")):
            # libvhd's relative form (file://../dir/p.vhd is not a URL with host ".."): relative to the child.
            return [text[len("file://"):]]
        if text.startswith("file://"):
            parsed = urllib.parse.urlparse(text)
            path = urllib.parse.unquote(parsed.path)
            if parsed.netloc == ".":  # file://./parent.vhd: relative to the child
                return [path.lstrip("/")]
            return [path]
        return [text]
    # Windows forms (W2ru/W2ku/name): backslashes, maybe a drive letter.
    if "\\" in text or ntpath.splitdrive(text)[0]:
        drive, rest = ntpath.splitdrive(text)
        parts = [p for p in rest.replace("\\", "/").split("/")]
        rel = "/".join(parts)
        if drive or rel.startswith("/"):
            # An absolute Windows path cannot exist here as it is; its file name may sit beside the child.
            return [ntpath.basename(text)]
        return [rel]
    return [text]


# --------------------------------------------------------------------------------------------- place


def place(locators: Sequence[tuple[bytes, bytes]], pos: int
          ) -> tuple[list[ParentLocator], list[tuple[int, bytes]], int]:
    """Locators of a new file from ``pos`` on: (table entries, (offset, data) writes, end of their space).

    Each takes whole sectors; its data space is recorded in bytes, as Windows and Hyper-V write it (every
    reader accepts that form).
    """
    table: list[ParentLocator] = []
    writes: list[tuple[int, bytes]] = []
    for code, data in locators:
        space = round_up(max(len(data), 1), SECTOR_SIZE)
        table.append(ParentLocator(code, space, len(data), pos))
        writes.append((pos, data))
        pos += space
    return table, writes, pos


# --------------------------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class Room:
    """What an existing file offers locator data.

    ``taken``: [start, end) ranges of the footer copy, the header, the BAT and the batmap; ``blocks``: file
    offsets of its blocks, each ``block_span`` bytes (bitmap and data); ``end``: where its footer starts;
    ``first_block``: free sectors are sought only before it (between the metadata and the first block).
    """

    taken: tuple[tuple[int, int], ...]
    blocks: np.ndarray
    block_span: int
    end: int
    first_block: int

    @classmethod
    def of(cls, img) -> "Room":
        """The room of a dynamic or differencing ``vhdcore.disk.image.Image``."""
        h = img.header
        hoff = img.footer.data_offset
        bat_end = h.table_offset + table_bytes(img.max_table_entries)
        # Nothing before the header's end: a journal's plan is refused there too (relink.check_plan_bytes).
        taken = [(0, max(FOOTER_SIZE, hoff + HEADER_SIZE)), (hoff, hoff + HEADER_SIZE), (h.table_offset, bat_end)]
        if img.batmap is not None:
            taken.append((bat_end, max(bat_end + SECTOR_SIZE, img.batmap.end)))
        blocks = img.bat[img.allocated_blocks()].astype(np.int64) * SECTOR_SIZE
        end = img.footer_offset if img.footer_offset >= 0 else img.file_size - FOOTER_SIZE
        first = int(blocks.min()) if len(blocks) else end
        return cls(tuple(taken), blocks, img.bitmap_size + img.block_size, end, first)

    def clear(self, start: int, stop: int, others: Sequence[tuple[int, int]]) -> bool:
        """Whether [start, stop) lies inside the file and overlaps no metadata, block or range of ``others``."""
        if start <= 0 or start % SECTOR_SIZE or stop > self.end:
            return False
        if any(a < stop and start < b for a, b in (*self.taken, *others)):
            return False
        return not bool(np.any((self.blocks < stop) & (self.blocks + self.block_span > start)))

    def free(self, need: int, others: Sequence[tuple[int, int]]) -> int | None:
        """The lowest sector-aligned offset before the first block where ``need`` bytes overlap nothing."""
        pos = SECTOR_SIZE
        for start, end in sorted((*self.taken, *others)):
            if pos + need <= min(start, self.first_block):
                return pos
            pos = max(pos, round_up(end, SECTOR_SIZE))
        return pos if pos + need <= self.first_block else None


class Wanted(NamedTuple):
    code: bytes
    data: bytes
    slot: int | None = None  # the slot it rewrites (chain-tar), or None: the first of its platform (relink)


class Fitted(NamedTuple):
    table: tuple[ParentLocator, ...]
    writes: list[tuple[int, bytes]]  # (offset, data padded to the space), locator data only
    outcome: list[tuple[str, int]]  # per wanted: ("kept" | "moved" | "dropped", offset)


def fit(slots: Sequence[ParentLocator], wanted: Sequence[Wanted], room: Room) -> Fitted:
    """Fit the ``wanted`` locators into an existing file whose header has ``slots`` (the one fitting rule).

    The file's layout never changes, so the data goes only into space nothing else uses:

    1. Each wanted locator keeps its own slot (``Wanted.slot``, or the first slot of its platform) when that
       slot's data space is usable (sector-aligned, inside the file, at most ``MAX_LOCATOR_BYTES``, clear of the
       header, BAT, batmap, every block and the spaces already kept) and its data fits: rewritten in place.
    2. The others, in the order given (libvhd's MacX first for a relink), take the smallest usable space of an
       unclaimed slot their data fits, else the lowest free sectors between the metadata and the first block.
    3. What still has no room is dropped (the parent unicode name and the other locators still find the parent).

    A locator in a slot's space keeps that entry's space as stored (sectors or bytes) and its reserved field; one
    moved into free sectors records its space in bytes. Each goes into its own table entry (its slot, or the first
    of its platform) if that is still empty, else the lowest empty one; the rest of the table is empty. Data is
    padded with zeros to its space.
    """
    n = len(slots)
    table: list[ParentLocator | None] = [None] * n  # None: nothing placed in this entry yet
    writes: list[tuple[int, bytes]] = []
    outcome: list[tuple[str, int]] = [("dropped", 0)] * len(wanted)
    kept: list[tuple[int, int]] = []  # data spaces given out so far
    spent: set[int] = set()  # slots whose data space is given out

    def usable(loc: ParentLocator, need: int) -> bool:
        space = loc.data_space_bytes
        return (loc.is_used and need <= space <= MAX_LOCATOR_BYTES
                and room.clear(loc.data_offset, loc.data_offset + space, kept))

    def own(w: Wanted, taken: Callable[[int], bool]) -> int | None:
        if w.slot is not None:
            return None if taken(w.slot) else w.slot
        return next((j for j, loc in enumerate(slots) if loc.platform_code == w.code and not taken(j)), None)

    def give(i: int, at: int, entry: ParentLocator, space: int, how: str) -> None:
        table[at] = entry
        kept.append((entry.data_offset, entry.data_offset + space))
        writes.append((entry.data_offset, wanted[i].data.ljust(space, b"\0")))
        outcome[i] = (how, entry.data_offset)

    homeless: list[int] = []
    for i, w in enumerate(wanted):  # 1. each in its own slot's space
        h = own(w, lambda j: j in spent)
        if h is not None and usable(slots[h], len(w.data)):
            spent.add(h)
            give(i, h, replace(slots[h], data_length=len(w.data)), slots[h].data_space_bytes, "kept")
        else:
            homeless.append(i)
    for i in homeless:  # 2. an unclaimed slot's space, else free sectors before the first block
        w = wanted[i]
        if None not in table:
            continue
        spare = sorted((j for j, loc in enumerate(slots) if j not in spent and usable(loc, len(w.data))),
                       key=lambda j: slots[j].data_space_bytes)
        if spare:
            loc = slots[spare[0]]
            spent.add(spare[0])
            entry, space = ParentLocator(w.code, loc.data_space, len(w.data), loc.data_offset, loc.reserved), \
                loc.data_space_bytes
        else:
            space = round_up(max(len(w.data), 1), SECTOR_SIZE)
            off = room.free(space, kept)
            if off is None:
                continue
            entry = ParentLocator(w.code, space, len(w.data), off)
        at = own(w, lambda j: table[j] is not None)
        if at is None:
            at = table.index(None)
        give(i, at, entry, space, "moved")
    return Fitted(tuple(EMPTY_LOCATOR if e is None else e for e in table), writes, outcome)


__all__ = ["ENCODINGS", "NEW_CHILD_PLATFORMS", "relative_path", "encode", "parent_locators_for", "decode", "read",
           "is_relative", "parent_candidates", "candidate_paths", "place", "Room", "Wanted", "Fitted", "fit"]

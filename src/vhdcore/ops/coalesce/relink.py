"""Who depends on a disk, and re-pointing children at another parent (used by coalesce --remove-child).

A differencing disk names its parent three ways: the parent's unique id, its modification time, and a path (the
unicode name and the platform locators). Finding "the children of X" therefore means reading the header of every
VHD in the searched directories, keeping those that record X's unique id, and resolving their parent path to be
sure it is X and not a copy of X elsewhere.

Relinking rewrites a child's header so that it names a new parent. The order keeps the child resolvable at every
instant (see ``relink``); the one step that cannot be made atomic is the single 1024-byte write of the header, which
a power cut can tear across its two sectors. Coalesce therefore records every relink's writes (a
:class:`RelinkPlan`) in its journal before the first one, and a rerun writes them all again, mending a torn header.
"""
from __future__ import annotations

import json
import os
import stat
import uuid
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np

from ...disk.chain import resolve_parent
from ...fileio import WriteIO, atomic_output, pwrite_all
from ...exceptions import ChainError, JournalError, VHDError
from ...format import locators
from ...format.geometry import vhd_timestamp
from ...format.locators import parent_locators_for
from ...format.rules import table_bytes
from ...disk.image import Image
from ...format.structs import (
    FOOTER,
    FOOTER_SIZE,
    HEADER_SIZE,
    NO_DATA_OFFSET,
    SECTOR_SIZE,
    DiskType,
    DynamicHeader,
    Footer,
)

VHD_SUFFIXES = (".vhd",)
# Journal of a coalesce that is removing its child, beside the child: ".<child name>.coalesce".
JOURNAL_SUFFIX = ".coalesce"


@dataclass(frozen=True)
class Dependent:
    path: str
    reason: str  # "resolves to it" or "records its unique id; its parent path cannot be resolved"


def _probe(path: str) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    """(unique id, parent unique id) of a VHD from its footer and header alone, or (None, None) if not a VHD.

    Bounded reads (512 + 1024 bytes) so that scanning a directory of large disks costs nothing; checksums are
    not verified here (a disk with a damaged checksum still depends on its parent).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None, None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < FOOTER_SIZE:
            return None, None
        raw = os.pread(fd, FOOTER_SIZE, st.st_size - FOOTER_SIZE)
        try:
            footer = Footer.parse(raw, verify_checksum=False)
        except VHDError:
            try:
                footer = Footer.parse(os.pread(fd, FOOTER_SIZE, 0), verify_checksum=False)
            except VHDError:
                return None, None
        if footer.type != DiskType.DIFFERENCING:
            return footer.unique_id, None
        hoff = footer.data_offset
        if hoff == NO_DATA_OFFSET or hoff + HEADER_SIZE > st.st_size:
            return footer.unique_id, None
        try:
            header = DynamicHeader.parse(os.pread(fd, HEADER_SIZE, hoff), verify_checksum=False)
        except VHDError:
            return footer.unique_id, None
        return footer.unique_id, header.parent_unique_id
    finally:
        os.close(fd)


def vhd_files(dirs: Iterable[str]) -> list[str]:
    """Real paths of the regular ``*.vhd`` files (any case) directly inside ``dirs``, without duplicates."""
    seen: set[str] = set()
    out: list[str] = []
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            continue
        for name in names:
            if not name.lower().endswith(VHD_SUFFIXES) or name.startswith("."):
                continue
            real = os.path.realpath(os.path.join(d, name))
            if real not in seen:
                seen.add(real)
                out.append(real)
    return out


def dependents(parent: Image, dirs: Sequence[str], exclude: Iterable[str] = ()) -> list[Dependent]:
    """Differencing disks in ``dirs`` (other than ``exclude``) whose parent is ``parent``.

    A disk that records ``parent``'s unique id but whose parent path cannot be resolved counts as a dependent:
    it may well name this very file from another host's point of view. One that resolves to another file with
    the same unique id (a copy) does not.
    """
    me = os.path.realpath(parent.path)
    skip = {os.path.realpath(p) for p in exclude} | {me}
    found: list[Dependent] = []
    uid = parent.unique_id
    for path in vhd_files(dirs):
        if path in skip:
            continue
        _own, puid = _probe(path)
        if puid != uid:
            continue
        allowed = sorted({os.path.dirname(path), *dirs, os.path.dirname(me)})
        try:
            with Image(path, "r", strict=False) as img:
                resolved = resolve_parent(img, allowed)
        except (ChainError, VHDError, OSError):
            found.append(Dependent(path, "records its unique id; its parent path cannot be resolved"))
            continue
        if os.path.realpath(resolved) == me:
            found.append(Dependent(path, "resolves to it"))
    return found


# --------------------------------------------------------------------------------------------- relinking


@dataclass(frozen=True)
class RelinkPlan:
    """The writes that make ``path`` name a new parent: locator data first, the 1024-byte header last."""

    path: str
    unique_id: uuid.UUID  # of the disk being relinked (its footer copy at offset 0 is never rewritten)
    writes: tuple[tuple[int, bytes], ...]
    warnings: tuple[str, ...]

    def to_json(self) -> dict:
        return {"path": self.path, "unique_id": str(self.unique_id),
                "writes": [[off, data.hex()] for off, data in self.writes]}


def plan_relink(child_path: str, new_parent: Image) -> RelinkPlan:
    """What :func:`relink` will write (see there), computed without writing anything."""
    warnings: list[str] = []
    with Image(child_path, "r", strict=False) as img:
        if not img.is_differencing or img.header is None:
            raise ChainError("not a differencing disk", path=img.path, field=FOOTER.field("disk_type"),
                             value=int(img.disk_type))
        h = img.header
        hoff = img.footer.data_offset
        name, wanted = parent_locators_for(new_parent.path, img.path)
        if len(name) > 255:
            name = os.path.basename(new_parent.path)
        fitted = locators.fit(h.parent_locators, [locators.Wanted(code, data) for code, data in wanted],
                              locators.Room.of(img))
        writes = fitted.writes
        dropped = [code.decode("latin-1") for (code, _), (how, _) in zip(wanted, fitted.outcome) if how == "dropped"]
        if dropped:  # libvhd tries MacX first, Windows W2ru/W2ku: each matters to someone
            warnings.append(f"{img.path}: locator(s) {', '.join(dropped)} for {new_parent.path} do not fit the "
                            "space the old ones reserved; the parent name still finds it")
        mtime = vhd_timestamp(os.stat(new_parent.path).st_mtime)
        new = replace(h, parent_unique_id=new_parent.unique_id, parent_timestamp=mtime,
                      parent_unicode_name_raw=DynamicHeader.encode_parent_name(name),
                      parent_locators=fitted.table)
        return RelinkPlan(os.path.realpath(img.path), img.unique_id, tuple(writes) + ((hoff, new.pack()),),
                          tuple(warnings))


def apply_relink(plan: RelinkPlan, *, io=None) -> None:
    """Carry out ``plan``: the locator data, a sync, then the header in one write, and a sync.

    Replaying a plan is harmless (the same bytes land in the same places), which is what makes a header torn
    by a crash mid-write curable: the coalesce journal keeps every plan until all are applied.
    """
    io = io or WriteIO(faults=False)
    with Image(plan.path, "r+", strict=False) as img:
        if img.unique_id != plan.unique_id:
            raise ChainError(f"{plan.path} is no longer the disk that was to be relinked (unique id "
                             f"{img.unique_id}, expected {plan.unique_id})", path=plan.path,
                             field=FOOTER.field("unique_id"), value=str(img.unique_id))
        *data_writes, (hoff, header) = plan.writes
        for off, data in data_writes:
            io.pwritev(img.fd, [data], off)
        if data_writes:
            io.fdatasync(img.fd)
        io.pwritev(img.fd, [header], hoff)
        io.fdatasync(img.fd)


def relink(child_path: str, new_parent: Image, *, io=None) -> list[str]:
    """Make the differencing disk at ``child_path`` name ``new_parent`` (id, time stamp, name, locators).

    Order: (1) the new locator data goes into the space the old locators reserved; while the header still
    names the old parent, its unicode name keeps resolving to it (locators that now lead to the new parent
    carry the wrong id for this header and are passed over); (2) one write of the header switches id, time
    stamp, name and locator table together. Returns warnings (locators that did not fit and were dropped).
    ``io`` (``pwritev(fd, bufs, offset)``, ``fdatasync(fd)``) carries the writes; coalesce passes its own.
    """
    plan = plan_relink(child_path, new_parent)
    apply_relink(plan, io=io)
    return list(plan.warnings)


def plan_from_json(doc: dict) -> RelinkPlan:
    """A plan as :meth:`RelinkPlan.to_json` stored it (ValueError/KeyError/TypeError if it is not one)."""
    writes = tuple((int(off), bytes.fromhex(data)) for off, data in doc["writes"])
    if not writes or any(off < 0 for off, _ in writes):
        raise ValueError("relink plan without writes, or with a negative offset")
    return RelinkPlan(str(doc["path"]), uuid.UUID(str(doc["unique_id"])), writes, ())


def journal_plans(rec: dict) -> list[RelinkPlan]:
    """The relink plans a coalesce journal holds (records that cannot be read are left out)."""
    plans = []
    for doc in rec.get("relinks") or ():
        try:
            plans.append(plan_from_json(doc))
        except (ValueError, KeyError, TypeError):
            continue
    return plans


# --------------------------------------------------------------------------------------------- journal


def journal_path(child_path: str) -> str:
    d, base = os.path.split(os.path.abspath(child_path))
    return os.path.join(d, "." + base + JOURNAL_SUFFIX)


def write_journal(child_path: str, record: dict) -> str:
    """Atomically (temporary file, fsync, rename, fsync of the directory) write the removal journal."""
    path = journal_path(child_path)
    with atomic_output(path, mode=0o600) as (fd, _tmp):
        pwrite_all(fd, [json.dumps(record).encode()], 0)
    return path


# A journal holds a few KiB per relinked child; anything larger is not one of ours.
MAX_JOURNAL_BYTES = 16 * 1024 * 1024


def read_journal(child_path: str) -> dict | None:
    """The journal beside ``child_path`` (None if there is none). Never followed through a symlink, bounded."""
    path = journal_path(child_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise JournalError(f"the coalesce journal cannot be opened ({e.strerror}; a symlink is never followed)",
                           path=path, field="journal") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_JOURNAL_BYTES:
            raise JournalError(f"the coalesce journal is not a regular file of at most {MAX_JOURNAL_BYTES} bytes",
                               path=path, field="journal", value=st.st_size)
        raw = os.read(fd, MAX_JOURNAL_BYTES + 1)
    finally:
        os.close(fd)
    try:
        rec = json.loads(raw)
    except ValueError:
        return None  # torn before its rename could not happen (atomic write): not a journal of ours
    return rec if isinstance(rec, dict) else None


def _stat_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def bind_plans(rec: dict, jpath: str, parent_ids: Sequence[uuid.UUID], target: Image,
               dirs: Sequence[str]) -> list[RelinkPlan]:
    """The journal's relink plans, each bound to a disk found now: a differencing VHD in ``dirs`` (matched by
    device and inode, not by the name the journal gives) whose parent is one of ``parent_ids`` (the child, or
    the target once relinked), whose unique id is the plan's, and whose planned bytes are a header naming
    ``target`` with the disk's own layout plus locator data in the slots that header declares, clear of the BAT
    and every block. Raises JournalError for anything else; the plans returned carry the found paths."""
    found: dict[tuple[int, int], str] = {}
    for p in vhd_files(dirs):
        own, puid = _probe(p)
        ident = _stat_id(p)
        if own is not None and puid in parent_ids and ident is not None:
            found[ident] = p
    docs = rec.get("relinks") or []
    if not isinstance(docs, list) or len(docs) > 100_000:
        raise JournalError("the journal's relink records are not a list", path=jpath, field="relinks")
    out: list[RelinkPlan] = []
    for i, doc in enumerate(docs):
        try:
            plan = plan_from_json(doc)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise JournalError("a relink record of the journal cannot be read", path=jpath,
                               field=f"relinks[{i}]") from None
        real = found.get(_stat_id(plan.path) or (-1, -1))
        if real is None:
            raise JournalError(f"the journal would relink {plan.path}, which is not a child of this chain in the "
                               f"searched directories ({', '.join(dirs)})", path=jpath, field=f"relinks[{i}].path",
                               value=plan.path)
        _check_plan(plan, real, target, jpath, i)
        out.append(replace(plan, path=real))
    return out


def _check_plan(plan: RelinkPlan, path: str, target: Image, jpath: str, i: int) -> None:
    check_plan_bytes(plan, path, target.unique_id, jpath, f"relinks[{i}]")


def check_plan_bytes(plan: RelinkPlan, path: str, parent_id: uuid.UUID | None, jpath: str, field: str) -> None:
    """Refuse a journal's header-rewrite plan for the differencing disk at ``path`` unless it is that disk's (its
    unique id) and its bytes are one valid header at the disk's header offset, keeping the disk's block table and
    block size, naming ``parent_id`` (when given), plus locator data only in slots that header declares, clear of
    header, BAT, blocks and footer. Every journal that rewrites a header (coalesce's relinks, set-parent, rebase)
    goes through here before a byte of it is written."""
    def refuse(why: str) -> JournalError:
        return JournalError(f"the journal's relink of {path} {why}", path=jpath, field=field, value=plan.path)

    with Image(path, "r", strict=False) as img:
        if img.unique_id != plan.unique_id or not img.is_differencing or img.header is None:
            raise refuse("is for another disk (unique id or type differs)")
        hoff = img.footer.data_offset
        if not plan.writes:
            raise refuse("writes nothing")
        *data_writes, (woff, raw) = plan.writes
        if woff != hoff or len(raw) != HEADER_SIZE:
            raise refuse("does not end with one header write at the disk's header offset")
        try:
            new = DynamicHeader.parse(raw, verify_checksum=True)
        except VHDError:
            raise refuse("writes a header that is not a valid dynamic header") from None
        cur = img.header
        if parent_id is not None and new.parent_unique_id != parent_id:
            raise refuse("writes a header that does not name the parent it was planned for")
        if (new.table_offset, new.max_table_entries, new.block_size, new.data_offset) != (
                cur.table_offset, cur.max_table_entries, cur.block_size, cur.data_offset):
            raise refuse("would change the disk's block table or block size")
        slots = {(loc.data_offset, loc.data_space_bytes) for loc in new.parent_locators if loc.is_used}
        bat_end = cur.table_offset + table_bytes(cur.max_table_entries)
        span = img.bitmap_size + img.block_size
        starts = img.bat[img.allocated_blocks()].astype(np.int64) * SECTOR_SIZE
        for off, data in data_writes:
            end = off + len(data)
            if (off, len(data)) not in slots:
                raise refuse(f"writes {len(data)} bytes at {off}, not a locator slot its header declares")
            if off < hoff + HEADER_SIZE or end > (img.footer_offset if img.footer_offset >= 0 else img.file_size) or (off < bat_end and end > cur.table_offset) \
                    or bool(np.any((starts < end) & (starts + span > off))):
                raise refuse(f"writes locator data at {off} over the header, the BAT, a block or the footer")


__all__ = ["Dependent", "dependents", "relink", "plan_relink", "apply_relink", "plan_from_json", "journal_plans",
           "RelinkPlan",
           "vhd_files", "journal_path", "write_journal", "read_journal", "bind_plans", "JournalError",
           "check_plan_bytes",
           "MAX_JOURNAL_BYTES"]

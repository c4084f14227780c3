"""Repair what can be repaired without guessing, with an undo file for every byte changed.

What ``repair`` fixes (each only when ``check`` found it and the rest of the file is sound):

- a missing or torn footer at the end of a dynamic or differencing disk, restored from the copy at offset 0
  (the state a crash during block allocation leaves), written just after the last block;
- bytes after the footer (``FILE_TRAILING_DATA``), truncated;
- a missing, damaged or different footer copy at offset 0, rewritten from the footer;
- with ``fix_checksums=True``, a footer or dynamic header checksum, when every other field is valid;
- with ``set_bitmap_bits=True`` (never by default), the sector-bitmap bits of sectors that hold data under a clear
  bit (``BITMAP_CLEAR_DATA``): the data an older vhdcore wrote into existing blocks without setting their bits
  becomes readable to libvhd and to vhdcore. Stale data a writer meant to hide would become readable too, which is
  why only the user can ask for it.

It never discards data reachable through the BAT: the footer goes at or after the end of the last block, and
only bytes past it are cut. It refuses to touch a file whose BAT points past the end, into metadata or at
overlapping blocks: those need a human. Before changing anything it writes, next to the disk, an undo file
holding the old content of every byte range it rewrites or cuts and the old file length; ``undo`` puts them
back. The disk is locked like any writer while being repaired.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Sequence

import xxhash

from .check import ERROR, WARNING, FileAnalysis, Finding, analyse_file, check, data_under_clear_bits
from ..destination import check_destination
from ..fileio import atomic_output, pread_upto, pwrite_all
from ..exceptions import InvalidFormatError, LockError, UnsafeOperationError
from ..format.rules import MAX_BAT_ENTRIES
from ..format.structs import FOOTER, FOOTER_SIZE, HEADER, HEADER_SIZE, SECTOR_SIZE, DiskType, bitmap_bytes

UNDO_MAGIC = b"VHDCUNDO"
UNDO_VERSION = 2
# magic, version, original file size, original mtime (ns), record count; then the identity of the disk the
# undo file belongs to, as the repair left it: its size, its unique id, and the xxh3-128 of the bytes the
# records will be written over. ``undo`` refuses a disk that does not match all three (another disk, or this
# one changed since).
_UNDO_HEAD = struct.Struct(">8sIQQIQ16s16s")
_UNDO_REC = struct.Struct(">QQ")  # offset, length; then the bytes
# One record per bitmap set (at most one per BAT entry) plus the few footer, header and cut records.
MAX_UNDO_RECORDS = MAX_BAT_ENTRIES + 64

# Findings that mean the BAT cannot be trusted: a repair would have to guess which block is right.
_BAT_ERRORS = {"BAT_ENTRY_PAST_EOF", "BAT_ENTRY_IN_METADATA", "BAT_ENTRY_OVERLAP", "BAT_OUTSIDE_FILE",
               "BAT_ENTRY_BEFORE_METADATA",
               "HEADER_OFFSET", "HEADER_COOKIE", "HEADER_VERSION", "HEADER_BLOCK_SIZE", "HEADER_MAX_TABLE_ENTRIES",
               "HEADER_TABLE_OFFSET"}
_FOOTER_FIELD_ERRORS = {"FOOTER_VERSION", "FOOTER_DISK_TYPE", "FOOTER_SIZE"}


@dataclass
class RepairAction:
    code: str  # RESTORE_FOOTER, TRUNCATE, REWRITE_FOOTER_COPY, FIX_FOOTER_CHECKSUM, FIX_HEADER_CHECKSUM,
    # SET_BITMAP_BITS
    offset: int
    length: int
    description: str
    fixes: tuple[str, ...] = ()  # finding codes this action addresses
    data: bytes = b""  # what is written at ``offset`` (empty for TRUNCATE: ``offset`` is the new length)

    def to_dict(self) -> dict:
        return {"code": self.code, "offset": self.offset, "length": self.length, "description": self.description,
                "fixes": list(self.fixes)}


@dataclass
class RepairReport:
    path: str
    dry_run: bool
    actions: list[RepairAction] = field(default_factory=list)
    before: list[Finding] = field(default_factory=list)
    remaining: list[Finding] = field(default_factory=list)  # after the repair (predicted for a dry run)
    not_repaired: list[str] = field(default_factory=list)  # why findings were left alone
    undo_path: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.actions) and not self.dry_run

    @property
    def clean(self) -> bool:
        return not any(f.severity in (ERROR, WARNING) for f in self.remaining)

    def to_dict(self) -> dict:
        return {"path": self.path, "dry_run": self.dry_run, "changed": self.changed, "clean": self.clean,
                "actions": [a.to_dict() for a in self.actions], "undo_path": self.undo_path,
                "not_repaired": list(self.not_repaired),
                "before": [f.to_dict() for f in self.before], "remaining": [f.to_dict() for f in self.remaining],
                "warnings": [str(f) for f in self.remaining if getattr(f, "severity", "") == "warning"]}


def plan(a: FileAnalysis, fix_checksums: bool = False, set_bitmap_bits: bool = False,
         read=None) -> tuple[list[RepairAction], list[str]]:
    """The actions that repair ``a`` and the reasons other findings are left alone.

    ``set_bitmap_bits`` needs ``read(offset, n)`` on the disk: the new bitmaps are computed from the data.
    """
    actions, refused = _plan(a, fix_checksums)
    if a.clear_data:
        sectors = sum(n for _i, _s, n in a.clear_data)
        if not set_bitmap_bits:
            refused.append(f"{sectors} sector(s) in {len(a.clear_data)} block(s) hold data under clear bitmap bits "
                           "(BITMAP_CLEAR_DATA): pass --set-bitmap-bits to make that data readable, if it is data "
                           "the disk should hold")
        elif a.codes() & _BAT_ERRORS or not a.blocks_ok:
            refused.append("the BAT is damaged: bitmap bits were not set")
        else:
            if read is None:
                raise ValueError("set_bitmap_bits needs read(offset, n)")
            bm_bytes = bitmap_bytes(a.block_size)
            spb = a.block_size // SECTOR_SIZE
            for i, start, _n in a.clear_data:
                sectors_in = min(spb, (a.size - i * a.block_size) // SECTOR_SIZE)
                n, _first, fixed = data_under_clear_bits(read, read(start, bm_bytes), start + bm_bytes, sectors_in)
                if n:
                    actions.append(RepairAction("SET_BITMAP_BITS", start, bm_bytes,
                                                f"set the bitmap bits of {n} sector(s) of block {i} that hold "
                                                f"data", ("BITMAP_CLEAR_DATA",), bytes(fixed)))
    return actions, refused


def _plan(a: FileAnalysis, fix_checksums: bool) -> tuple[list[RepairAction], list[str]]:
    codes = a.codes()
    actions: list[RepairAction] = []
    refused: list[str] = []
    if a.footer is None or a.disk_type == 0:
        if codes & {"FOOTER_MISSING", "FILE_TOO_SMALL", "VHDX_FILE"}:
            refused.append("no usable footer anywhere in the file: nothing to rebuild it from without guessing")
        return actions, refused
    if codes & _FOOTER_FIELD_ERRORS:
        refused.append("the footer's fields are invalid (" + ", ".join(sorted(codes & _FOOTER_FIELD_ERRORS))
                       + "): rebuilding them would be guessing")
        return actions, refused

    good: bytes | None = None  # a valid footer (512 bytes) for the end, once known
    end = a.end_footer

    if a.disk_type == DiskType.FIXED:
        if a.footer_source == "displaced":
            actions.append(RepairAction("TRUNCATE", a.footer_offset + FOOTER_SIZE, a.file_size - a.footer_offset
                                        - FOOTER_SIZE, f"cut the {a.file_size - a.footer_offset - FOOTER_SIZE} "
                                        f"bytes after the footer at {a.footer_offset}", ("FILE_TRAILING_DATA",)))
        elif end is not None and not end.checksum_ok:
            if fix_checksums:
                raw = FOOTER.sealed(end.raw)[: len(end.raw) if a.footer_source != "legacy" else FOOTER_SIZE - 1]
                actions.append(RepairAction("FIX_FOOTER_CHECKSUM", end.offset, len(raw),
                                            "recompute the footer checksum", ("FOOTER_CHECKSUM",), raw))
            else:
                refused.append("footer checksum wrong: pass --fix-checksums to recompute it (no other copy exists)")
        return actions, refused

    # Dynamic and differencing disks.
    bad_layout = codes & _BAT_ERRORS
    if bad_layout:
        refused.append("the dynamic header or the BAT is damaged (" + ", ".join(sorted(bad_layout)) + "): "
                       "moving the footer or cutting the file could lose data")
    header_fix: RepairAction | None = None
    if "HEADER_CHECKSUM" in codes:
        if fix_checksums and a.header_fields_ok:
            raw = HEADER.sealed(a.header_raw)
            header_fix = RepairAction("FIX_HEADER_CHECKSUM", a.header_offset, HEADER_SIZE,
                                      "recompute the dynamic header checksum", ("HEADER_CHECKSUM",), raw)
        elif fix_checksums:
            refused.append("dynamic header checksum wrong and other header fields invalid: not recomputed")
        else:
            refused.append("dynamic header checksum wrong: pass --fix-checksums to recompute it")
    if bad_layout or not a.blocks_ok:
        if header_fix is not None and not bad_layout:
            actions.append(header_fix)
        return actions, refused

    copy = a.copy
    if a.footer_source == "copy":
        # Missing or torn footer: the copy at 0 goes just after the last block; whatever lies past it was never
        # reachable (an allocation the crash interrupted).
        good = copy.raw
        pos = a.data_end
        actions.append(RepairAction("RESTORE_FOOTER", pos, FOOTER_SIZE,
                                    f"write the footer copy from offset 0 at {pos}, just after the last block",
                                    ("FOOTER_MISSING", "FOOTER_CHECKSUM"), good))
        if a.file_size > pos + FOOTER_SIZE:
            actions.append(RepairAction("TRUNCATE", pos + FOOTER_SIZE, a.file_size - pos - FOOTER_SIZE,
                                        f"cut the {a.file_size - pos - FOOTER_SIZE} unreferenced bytes after it",
                                        ("FILE_TRAILING_DATA",)))
    elif a.footer_source == "displaced":
        good = copy.raw
        cut = a.footer_offset + FOOTER_SIZE
        actions.append(RepairAction("TRUNCATE", cut, a.file_size - cut,
                                    f"cut the {a.file_size - cut} bytes after the footer at {a.footer_offset}",
                                    ("FILE_TRAILING_DATA",)))
    elif end is not None and end.checksum_ok:
        good = end.raw if a.footer_source == "end" else end.raw[: FOOTER_SIZE - 1] + b"\0"
    elif end is not None:
        # Bad checksum at the end and no usable copy: only a recomputation helps, if asked for.
        if fix_checksums:
            good = FOOTER.sealed(end.raw)
            n = FOOTER_SIZE if a.footer_source == "end" else FOOTER_SIZE - 1
            actions.append(RepairAction("FIX_FOOTER_CHECKSUM", end.offset, n, "recompute the footer checksum",
                                        ("FOOTER_CHECKSUM",), good[:n]))
        else:
            refused.append("footer checksum wrong and no usable copy at offset 0: pass --fix-checksums to "
                           "recompute it")
    if good is not None and copy_needs_rewrite(a, good):
        if any(s < FOOTER_SIZE for name, s, _e in a.metadata if name != "footer copy"):
            refused.append("offset 0 is used by other metadata: the footer copy was not rewritten")
        else:
            actions.append(RepairAction("REWRITE_FOOTER_COPY", 0, FOOTER_SIZE, "rewrite the footer copy at offset 0"
                                        " from the footer", ("FOOTER_COPY_MISSING", "FOOTER_COPY_CHECKSUM",
                                                             "FOOTER_COPY_MISMATCH"), good))
    if header_fix is not None:
        actions.append(header_fix)
    return actions, refused


def copy_needs_rewrite(a: FileAnalysis, good: bytes) -> bool:
    # Compared on 511 bytes, as check does: a legacy footer has no 512th byte to agree with.
    copy = a.copy
    return copy is None or not copy.checksum_ok or copy.raw[: FOOTER_SIZE - 1] != good[: FOOTER_SIZE - 1]


def _undo_name(path: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = f"{path}.repair-{stamp}"
    name = base + ".undo"
    n = 1
    while os.path.exists(name):
        n += 1
        name = f"{base}-{n}.undo"
    return name


def _clamped(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    return [(off, max(0, min(n, size - off))) for off, n in ranges]


def _over_digest(read, ranges: list[tuple[int, int]], size: int) -> bytes:
    """xxh3-128 of the bytes at ``ranges`` (each cut at ``size``): what an undo writes over."""
    h = xxhash.xxh3_128()
    for off, n in _clamped(ranges, size):
        done = 0
        while done < n:
            k = min(n - done, 16 * 1024 * 1024)
            h.update(read(off + done, k))
            done += k
    return h.digest()


def _after_repair(fd: int, st: os.stat_result, actions: list[RepairAction], ranges: list[tuple[int, int]]
                  ) -> tuple[int, bytes]:
    """(size, digest of the bytes at ``ranges``) the disk will have once ``actions`` are done, computed before."""
    size = st.st_size
    writes = [(a.offset, a.data) for a in actions if a.code != "TRUNCATE"]
    for off, data in writes:
        size = max(size, off + len(data))
    for a in actions:
        if a.code == "TRUNCATE":
            size = min(size, a.offset)

    def read(off: int, n: int) -> bytes:
        buf = bytearray(pread_upto(fd, off, n).ljust(n, b"\0"))
        for woff, data in writes:
            lo, hi = max(off, woff), min(off + n, woff + len(data))
            if lo < hi:
                buf[lo - off : hi - off] = data[lo - woff : hi - woff]
        return bytes(buf)

    return size, _over_digest(read, _clamped(ranges, st.st_size), size)


def _unique_id(a: FileAnalysis) -> bytes:
    return a.footer.raw[FOOTER.slice("unique_id")] if a.footer is not None else bytes(16)


def _write_undo(fd: int, undo_path: str, st: os.stat_result, ranges: list[tuple[int, int]],
                identity: tuple[int, bytes, bytes]) -> None:
    """The old bytes of every range, written (and made durable) before anything in the disk changes."""
    post_size, uid, digest = identity
    with atomic_output(undo_path, mode=0o600) as (ufd, _tmp):
        pwrite_all(ufd, [_UNDO_HEAD.pack(UNDO_MAGIC, UNDO_VERSION, st.st_size, st.st_mtime_ns, len(ranges),
                                         post_size, uid, digest)], 0)
        pos = _UNDO_HEAD.size
        for off, n in _clamped(ranges, st.st_size):
            pwrite_all(ufd, [_UNDO_REC.pack(off, n)], pos)
            pos += _UNDO_REC.size
            done = 0
            while done < n:  # pieces, so a long cut tail never sits in memory whole
                k = min(n - done, 16 * 1024 * 1024)
                pwrite_all(ufd, [pread_upto(fd, off + done, k)], pos)
                pos += k
                done += k


def _lock(fd: int, path: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockError("another writer holds this file", path=path, field="lock") from None
        raise


def repair(path: str | os.PathLike[str], dry_run: bool = False, fix_checksums: bool = False, *,
           set_bitmap_bits: bool = False, parent_dirs: Sequence[str | os.PathLike[str]] | None = None,
           undo_path: str | None = None, overwrite: bool = False) -> RepairReport:
    """Repair ``path`` in place (see the module text); returns what was done and what is left.

    The writer lock is taken before the file is examined, even for a dry run: a writer in the middle of a block
    allocation leaves exactly the state of a torn footer, and repairing that would cut its new block.
    ``remaining`` is what ``check(path, parent_dirs=...)`` reports afterwards (so it includes chain problems).
    """
    path = os.fspath(path)
    if undo_path is not None and not dry_run:  # the destination rule, before anything is read
        check_destination(undo_path, sources=[path], overwrite=overwrite)
    # Read-only first: a FIFO or a device is refused before it is ever opened for writing.
    probe = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(probe).st_mode):
            raise InvalidFormatError("not a regular file", path=path, field="file")
    finally:
        os.close(probe)
    fd = os.open(path, (os.O_RDONLY if dry_run else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        _lock(fd, path)
        a = analyse_file(path, probe_lock=False)  # the lock is ours
        report = RepairReport(path, dry_run, before=list(a.findings))
        actions, refused = plan(a, fix_checksums, set_bitmap_bits, lambda off, n: pread_upto(fd, off, n))
        report.actions = actions
        report.not_repaired = refused
        if not dry_run and actions:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != a.identity or st.st_size != a.file_size:
                raise InvalidFormatError("the file changed while it was being examined; run repair again",
                                         path=path, field="file")
            report.undo_path = undo_path or _undo_name(path)
            ranges = [(act.offset, act.length) if act.code != "TRUNCATE" else (act.offset, st.st_size - act.offset)
                      for act in actions]
            post_size, digest = _after_repair(fd, st, actions, ranges)
            _write_undo(fd, report.undo_path, st, ranges, (post_size, _unique_id(a), digest))
            # Footer first (so that a crash here leaves a file repair can finish), then the copy and the header,
            # then the cut.
            for act in actions:
                if act.code != "TRUNCATE":
                    pwrite_all(fd, [act.data], act.offset)
            os.fsync(fd)
            for act in actions:
                if act.code == "TRUNCATE":
                    os.ftruncate(fd, act.offset)
            os.fsync(fd)
    finally:
        os.close(fd)
    after = check(path, parent_dirs=parent_dirs).findings
    if dry_run:
        fixed = {c for act in actions for c in act.fixes}
        after = [f for f in after if f.code not in fixed or f.path != path]
    report.remaining = after
    return report


def undo(undo_path: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Put back what a repair changed: the old bytes of every range it rewrote or cut, and the old length."""
    undo_path = os.fspath(undo_path)
    path = os.fspath(path)
    ufd = os.open(undo_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        usize = os.fstat(ufd).st_size
        head = os.pread(ufd, _UNDO_HEAD.size, 0)
        if len(head) != _UNDO_HEAD.size:
            raise InvalidFormatError("undo file too short", path=undo_path, offset=0, field="undo header")
        magic, version, orig_size, _mtime, count, post_size, uid, digest = _UNDO_HEAD.unpack(head)
        if magic != UNDO_MAGIC:
            raise InvalidFormatError("not a vhdcore repair undo file", path=undo_path, offset=0, field="magic",
                                     value=magic)
        if version != UNDO_VERSION:
            raise InvalidFormatError(f"undo file version {version} (this vhdcore reads {UNDO_VERSION}, which records "
                                     "the identity of its disk)", path=undo_path, offset=8, field="version",
                                     value=version)
        # Every record takes at least its 16-byte head: a count the file cannot hold is refused, not trusted.
        if count > MAX_UNDO_RECORDS or count * _UNDO_REC.size > usize - _UNDO_HEAD.size:
            raise InvalidFormatError(f"undo file claims {count} records", path=undo_path, offset=28,
                                     field="record count", value=count)
        records: list[tuple[int, int, int]] = []  # offset in the disk, length, offset in the undo file
        pos = _UNDO_HEAD.size
        for _ in range(count):
            rec = os.pread(ufd, _UNDO_REC.size, pos)
            if len(rec) != _UNDO_REC.size:
                raise InvalidFormatError("undo file truncated", path=undo_path, offset=pos, field="record")
            off, n = _UNDO_REC.unpack(rec)
            pos += _UNDO_REC.size
            if pos + n > usize:
                raise InvalidFormatError("undo file truncated", path=undo_path, offset=pos, field="record.length",
                                         value=n)
            records.append((off, n, pos))
            pos += n
        if orig_size > max([post_size] + [off + n for off, n, _ in records]):
            raise InvalidFormatError("undo file restores a length that none of its records reaches", path=undo_path,
                                     offset=8 + 4, field="original size", value=orig_size)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            _lock(fd, path)
            _check_undo_identity(fd, path, undo_path, post_size, uid, digest, [(o, n) for o, n, _ in records])
            # Newest change first, so ranges that overlap get their oldest content back.
            for off, n, upos in reversed(records):
                done = 0
                while done < n:
                    k = min(n - done, 16 * 1024 * 1024)
                    pwrite_all(fd, [pread_upto(ufd, upos + done, k)], off + done)
                    done += k
            os.ftruncate(fd, orig_size)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        os.close(ufd)


def _check_undo_identity(fd: int, path: str, undo_path: str, post_size: int, uid: bytes, digest: bytes,
                         ranges: list[tuple[int, int]]) -> None:
    """Refuse to apply an undo file to a disk other than the one it was made for, or one changed since."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidFormatError("not a regular file", path=path, field="file")
    why = None
    if st.st_size != post_size:
        why = f"its size is {st.st_size} bytes, the repaired disk's was {post_size}"
    elif uid != bytes(16):
        at, n = FOOTER.offset("unique_id"), FOOTER.row("unique_id").size
        ids = {pread_upto(fd, o + at, n) for o in (0, st.st_size - FOOTER_SIZE) if o >= 0}
        if uid not in ids:
            why = "its unique id is not the repaired disk's"
    if why is None and _over_digest(lambda o, n: pread_upto(fd, o, n), ranges, st.st_size) != digest:
        why = "the bytes the undo would restore over are not the ones the repair wrote"
    if why is not None:
        raise UnsafeOperationError(f"this undo file belongs to another disk, or the disk changed since the repair "
                                   f"({why}); nothing was written", path=path, field="undo.disk_identity",
                                   value=undo_path)


__all__ = ["repair", "undo", "plan", "RepairReport", "RepairAction"]

"""A differencing chain (leaf -> ... -> base) seen as one virtual disk.

Parents are found from the child's locators and parent name, but only inside directories the caller allows (the
child's own and ``parent_dirs``): a locator is untrusted input, and following it anywhere else could open
``/etc/shadow`` or a FIFO. Each parent must carry the unique id the child recorded.
"""
from __future__ import annotations

import io
import os
import posixpath
import stat
from typing import Callable, Iterable, Iterator, Sequence

from .. import kernels as K
from ..exceptions import (
    ChainCycleError,
    ParentMismatchError,
    ParentNotFoundError,
    ReadOnlyError,
    VHDError,
)
from .extents import Extent, merge_zero_runs
from ..format.geometry import vhd_timestamp
from ..fileio import zero_fill
from ..format.locators import candidate_paths
from .image import NOT_HERE, Image
from ..format.structs import HEADER, SECTOR_SIZE, UNUSED_BAT_ENTRY

# Deeper chains exist nowhere in practice; a longer one is a loop through copies or a hostile file.
MAX_CHAIN_DEPTH = 128

Resolver = Callable[[Image, Sequence[str]], str]


def is_within(path: str, dirs: Iterable[str]) -> bool:
    """Whether the real path ``path`` is one of ``dirs`` or lies below one of them."""
    for d in dirs:
        if path == d or path.startswith(d.rstrip(os.sep) + os.sep):
            return True
    return False


def _climb_dirs(child_dir: str) -> set[str]:
    """The child's own directory and every directory above it (exactly these, not their subtrees).

    A relative locator that only climbs (``..\\parent.vhd``, what ``snapshot parent.vhd sub/child.vhd``
    writes) names a parent in one of them: it is followed without ``--parent-dir``, while one that climbs and
    then descends elsewhere (``..\\other\\parent.vhd``) still needs that directory named.
    """
    out = set()
    d = child_dir
    while True:
        out.add(d)
        up = os.path.dirname(d)
        if up == d:
            return out
        d = up


def _opened_outside(img: Image, allowed_dirs: Sequence[str], exact_dirs: Iterable[str] = ()) -> str | None:
    """The real path of the file ``img`` has open if it lies outside ``allowed_dirs``, else None.

    Candidates are checked by path and then opened by path; someone renaming a directory inside an allowed
    directory in between could slip a symlink to any file under us. The descriptor's own path (Linux
    /proc/self/fd) tells what was really opened, so the check holds whatever happened to the path.
    Where /proc is missing, the identity of the descriptor is compared with what the path names now.
    """
    try:
        real = os.readlink(f"/proc/self/fd/{img.fd}")
    except OSError:
        real = os.path.realpath(img.path)
        try:
            st, now = os.fstat(img.fd), os.stat(real)
        except OSError:
            return real
        same = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
        inside = is_within(real, allowed_dirs) or os.path.dirname(real) in set(exact_dirs)
        return None if same and inside else real
    if real.endswith(" (deleted)"):
        real = real[: -len(" (deleted)")]
    return None if is_within(real, allowed_dirs) or os.path.dirname(real) in set(exact_dirs) else real


def resolve_parent(child: Image, allowed_dirs: Sequence[str]) -> str:
    """Find the parent file of ``child`` inside ``allowed_dirs`` (real paths) and check its unique id.

    Raises ParentNotFoundError (with every path tried and why it was refused) or ParentMismatchError.
    """
    expected = child.header.parent_unique_id
    child_dir = os.path.dirname(os.path.realpath(child.path))
    tried: list[str] = []
    mismatched: list[str] = []
    seen: set[str] = set()
    climb = _climb_dirs(child_dir)
    for source, raw in child.parent_candidates():
        for name in candidate_paths(source, raw):
            if "\0" in name:
                # No file name holds a NUL (and os.stat would raise ValueError on one): hostile or corrupt.
                tried.append(f"{source} {raw!r} (contains a NUL character, refused)")
                continue
            if posixpath.isabs(name):
                # Followed only if it lies inside the allowed directories; else its file name is looked for there.
                cands = [name] + [os.path.join(d, posixpath.basename(name)) for d in allowed_dirs]
            else:
                # Relative to the child first; then its file name in every allowed directory, so that a parent
                # moved to a directory the caller names (--parent-dir) is found.
                cands = [os.path.join(child_dir, name)] + [os.path.join(d, posixpath.basename(name))
                                                           for d in allowed_dirs]
            for i, cand in enumerate(cands):
                real = os.path.realpath(cand)
                if real in seen:
                    continue
                seen.add(real)
                # the locator's own relative path, climbing only: the directory is exactly one above the child
                exact = {os.path.dirname(real)} if i == 0 and not posixpath.isabs(name) and \
                    os.path.dirname(real) in climb else set()
                if not is_within(real, allowed_dirs) and not exact:
                    tried.append(f"{source} {raw!r} -> {real} (outside the allowed directories, refused)")
                    continue
                try:
                    st = os.stat(real)
                except OSError:
                    tried.append(f"{source} {raw!r} -> {real} (not found)")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    tried.append(f"{source} {raw!r} -> {real} (not a regular file, refused)")
                    continue
                if real == os.path.realpath(child.path):
                    raise ChainCycleError("the disk names itself as its parent", path=child.path,
                                          field="parent locator", value=raw)
                try:
                    with Image(real, "r", strict=False) as cand_img:
                        escaped = _opened_outside(cand_img, allowed_dirs, exact)
                        uid = cand_img.unique_id
                except VHDError as e:
                    tried.append(f"{source} {raw!r} -> {real} (not a usable VHD: {e.message})")
                    continue
                if escaped is not None:
                    tried.append(f"{source} {raw!r} -> {real} (opened {escaped}, outside the allowed directories: "
                                 "the path changed while it was checked; refused)")
                    continue
                if uid == expected:
                    return real
                mismatched.append(f"{real} has unique id {uid}")
                tried.append(f"{source} {raw!r} -> {real} (unique id {uid} differs)")
    hoff = child.footer.data_offset
    if mismatched:
        raise ParentMismatchError(
            f"parent found but its unique id is not the {expected} this disk records ({'; '.join(mismatched)}):"
            " the parent was replaced or modified", path=child.path, offset=hoff + HEADER.offset("parent_unique_id"),
            field=HEADER.field("parent_unique_id"), value=str(expected))
    raise ParentNotFoundError(
        "parent disk not found in the allowed directories (the child's own, those above it that a relative "
        "locator climbs to, and --parent-dir ones); if it lies elsewhere, name its directory with --parent-dir DIR "
        "(parent_dirs= in Python)", tried=tried, path=child.path, offset=hoff + HEADER.offset("parent_unicode_name"),
        field=HEADER.field("parent_unicode_name"), value=child.header.parent_unicode_name)


class Disk:
    """The virtual disk of a chain of images, leaf first. Reads resolve through the layers; writes go to the leaf."""

    def __init__(self, layers: list[Image], warnings: list[str] | None = None) -> None:
        self.layers = layers
        self.leaf = layers[0]
        self.size = self.leaf.size
        self.mode = self.leaf.mode
        self.warnings = list(warnings or [])
        for img in layers:
            self.warnings.extend(f"{img.path}: {w}" for w in img.warnings)

    # ----------------------------------------------------------------------------------------- what is where

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Runs of [offset, offset+length) with the layer (or zeros) that holds each; zero runs merged."""
        if length is None:
            length = self.size - offset
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        stop = min(self.size, offset + length)
        if offset >= stop:
            return iter(())
        return merge_zero_runs(self._walk(0, offset, stop))

    def _walk(self, depth: int, start: int, stop: int) -> Iterator[Extent]:
        img = self.layers[depth]
        last = depth + 1 >= len(self.layers)
        for off, n, fo in img.layer_runs(start, stop):
            if fo != NOT_HERE:
                yield Extent(off, n, img, depth, fo)
            elif img.is_differencing and not last:
                # Parents may be smaller than the child: beyond the parent's size the disk reads as zeros.
                psize = self.layers[depth + 1].size
                if off < psize:
                    yield from self._walk(depth + 1, off, min(off + n, psize))
                if off + n > psize:
                    s = max(off, psize)
                    yield Extent(s, off + n - s, None, -1, -1)
            else:
                yield Extent(off, n, None, -1, -1)

    def allocated_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Only the runs some layer holds."""
        return (e for e in self.extents(offset, length) if e.layer is not None)

    def allocated_bytes(self) -> int:
        return sum(e.length for e in self.allocated_extents())

    # ----------------------------------------------------------------------------------------- reads

    def readinto(self, offset: int, buf) -> int:
        """Fill ``buf`` from virtual ``offset``; returns bytes read (short only at the end of the disk)."""
        mv = memoryview(buf).cast("B")
        if offset >= self.size:
            return 0
        n = min(len(mv), self.size - offset)
        if len(self.layers) == 1 and not self.leaf.is_differencing:
            self._readinto_single(offset, mv[:n])
            return n
        for ext in self.extents(offset, n):
            a = ext.offset - offset
            part = mv[a : a + ext.length]
            if ext.layer is None:
                zero_fill(part)
            else:
                ext.layer.preadinto(ext.file_offset, part)
        return n

    def _readinto_single(self, offset: int, mv: memoryview) -> None:
        """The common case of one fixed or dynamic file, block by block without the extent machinery
        (per-call overhead matters for 1 MiB reads that the kernel serves at 20+ GB/s)."""
        img = self.leaf
        if img.is_fixed:
            img.preadinto(offset, mv)
            return
        bs = img.block_size
        bat = img.bat
        extra = img.bitmap_size
        pos = 0
        n = len(mv)
        while pos < n:
            voff = offset + pos
            b = voff // bs
            k = min(n - pos, (b + 1) * bs - voff)
            entry = int(bat[b])
            if entry == UNUSED_BAT_ENTRY:
                zero_fill(mv[pos : pos + k])
            else:
                s0 = (voff - b * bs) // SECTOR_SIZE
                s1 = -(-(voff + k - b * bs) // SECTOR_SIZE)
                if K.bitmap_count(img.read_bitmap(b), s0, s1) == s1 - s0:
                    img.preadinto(entry * SECTOR_SIZE + extra + (voff - b * bs), mv[pos : pos + k])
                else:
                    # Some sectors were never written: they read as zeros (libvhd's rule, and the spec's).
                    for off, length, fo in img.layer_runs(voff, voff + k):
                        part = mv[off - offset : off - offset + length]
                        if fo == NOT_HERE:
                            zero_fill(part)
                        else:
                            img.preadinto(fo, part)
            pos += k

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0:
            raise ValueError("offset and n must be non-negative")
        n = max(0, min(n, self.size - offset))
        buf = bytearray(n)
        self.readinto(offset, buf)
        return bytes(buf)

    def stream(self) -> "DiskStream":
        return DiskStream(self)

    # ----------------------------------------------------------------------------------------- writes

    def write(self, offset: int, data) -> int:
        """Write ``data`` at virtual ``offset`` into the leaf; partial sectors are merged with what is below."""
        leaf = self.leaf
        if not leaf.writable:
            raise ReadOnlyError("disk is opened read-only", path=leaf.path, offset=offset)
        mv = memoryview(data).cast("B")
        n = len(mv)
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"write of {n} bytes at {offset} goes beyond the virtual size {self.size}")
        if n == 0:
            return 0
        head = offset % SECTOR_SIZE
        tail = (-(offset + n)) % SECTOR_SIZE
        if head or tail:
            start = offset - head
            buf = bytearray(head + n + tail)
            if head:
                self.readinto(start, memoryview(buf)[:SECTOR_SIZE])
            if tail:
                self.readinto(offset + n + tail - SECTOR_SIZE, memoryview(buf)[-SECTOR_SIZE:])
            buf[head : head + n] = mv
            leaf.write_sectors(start, buf)
        else:
            leaf.write_sectors(offset, mv)
        return n

    def flush(self) -> None:
        self.leaf.flush()

    def close(self) -> None:
        for img in self.layers:
            img.close()

    def __enter__(self) -> "Disk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Disk {self.leaf.path!r} depth {len(self.layers)} size {self.size}>"


class DiskStream(io.RawIOBase):
    """A seekable, read-only byte stream of the virtual disk; ``readinto`` is the real implementation."""

    def __init__(self, disk: Disk) -> None:
        self._disk = disk
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._disk.readinto(self._pos, b)
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._disk.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos


MismatchHandler = Callable[[Image, Sequence[str], ParentMismatchError], str]


def open_layers(
    path: str | os.PathLike[str],
    mode: str = "r",
    parent_dirs: Sequence[str | os.PathLike[str]] | None = None,
    *,
    strict: bool = True,
    resolver: Resolver | None = None,
    on_mismatch: MismatchHandler | None = None,
) -> tuple[list[Image], list[str]]:
    """Open ``path`` and every parent it needs, leaf first; returns the images and the warnings.

    Only the leaf is opened for writing (mode "r+"). A parent whose unique id differs from what its child
    records is a ParentMismatchError, unless ``on_mismatch(child, allowed_dirs, error)`` returns the path of a
    parent to accept anyway (coalesce's ``force parent-id``).
    """
    leaf = Image(path, mode, strict=strict)
    layers = [leaf]
    warnings: list[str] = []
    try:
        allowed = [os.path.dirname(os.path.realpath(leaf.path))]
        allowed += [os.path.realpath(os.fspath(d)) for d in (parent_dirs or ())]
        seen = {file_identity(leaf)}
        img = leaf
        while img.is_differencing:
            if len(layers) >= MAX_CHAIN_DEPTH:
                raise ChainCycleError(f"chain deeper than {MAX_CHAIN_DEPTH} layers", path=leaf.path,
                                      field="chain depth", value=len(layers))
            accept_other_id = False
            try:
                ppath = resolver(img, allowed) if resolver else resolve_parent(img, allowed)
            except ParentMismatchError as e:
                if on_mismatch is None:
                    raise
                ppath = on_mismatch(img, allowed, e)
                accept_other_id = True
            parent = Image(ppath, "r", strict=strict)
            escaped = _opened_outside(parent, allowed, _climb_dirs(os.path.dirname(os.path.realpath(img.path))))
            if escaped is not None:
                parent.close()
                raise ParentNotFoundError(
                    f"parent {ppath} turned out to be {escaped}, outside the allowed directories (the path "
                    "changed after it was checked); refused (name its directory with --parent-dir DIR if meant)", tried=[f"{ppath} -> {escaped}"], path=img.path,
                    offset=img.footer.data_offset + HEADER.offset("parent_unicode_name"),
                    field=HEADER.field("parent_unicode_name"),
                    value=img.header.parent_unicode_name)
            if file_identity(parent) in seen:
                parent.close()
                raise ChainCycleError("the chain loops back on itself", path=img.path, field="parent",
                                      value=ppath)
            seen.add(file_identity(parent))
            layers.append(parent)
            if parent.unique_id != img.header.parent_unique_id and not accept_other_id:
                raise ParentMismatchError(
                    f"parent {ppath} has unique id {parent.unique_id}, the child records "
                    f"{img.header.parent_unique_id}", path=img.path,
                    offset=img.footer.data_offset + HEADER.offset("parent_unique_id"),
                    field=HEADER.field("parent_unique_id"), value=str(img.header.parent_unique_id))
            recorded = img.header.parent_timestamp
            if recorded:  # Windows records 0: nothing to compare
                mtime = vhd_timestamp(os.stat(ppath).st_mtime)
                if recorded not in (mtime, parent.footer.timestamp):
                    warnings.append(
                        f"{img.path}: parent time stamp {recorded} differs from {ppath}'s modification time "
                        f"{mtime} (copied between hosts?)")
            img = parent
    except BaseException:
        for im in layers:
            im.close()
        raise
    return layers, warnings


def open_chain(
    path: str | os.PathLike[str],
    mode: str = "r",
    parent_dirs: Sequence[str | os.PathLike[str]] | None = None,
    *,
    strict: bool = True,
    resolver: Resolver | None = None,
) -> Disk:
    """Open ``path`` and every parent it needs as one Disk. Only the leaf is opened for writing (mode "r+")."""
    layers, warnings = open_layers(path, mode, parent_dirs, strict=strict, resolver=resolver)
    return Disk(layers, warnings)


def file_identity(img: Image) -> tuple[int, int]:
    """(device, inode) of the file ``img`` has open: the same file whatever path reached it."""
    st = os.fstat(img.fd)
    return st.st_dev, st.st_ino

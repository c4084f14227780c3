"""The one rule for every file a command writes, and the durable way to write it.

Every writing command (create, snapshot, convert, compact, export, image, repair's undo file, manifests) asks
:func:`check_destination` before it reads a byte of its source, so a refusal costs nothing and changes nothing:

- a file of the source chain (by path, through a symlink, or by device and inode) is refused always;
- an existing file is refused unless the caller passed ``overwrite`` (``--overwrite``);
- something that is not a regular file (a device node, a FIFO, a directory, a socket) is refused, except a
  block device named explicitly with ``allow_device`` (then it is written in place, never replaced);
- the directory must exist.

New files are made by :func:`vhdcore.fileio.atomic_output`: a temporary name in the
destination's own directory, fsynced, renamed over the final name, and the directory fsynced, so a crash leaves
either the old file or the whole new one under the final name.
"""
from __future__ import annotations

import contextlib
import os
import stat
from typing import Iterable

from .exceptions import DestinationError, DestinationExistsError

__all__ = ["DestinationError", "DestinationExistsError", "check_destination"]


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def check_destination(path: str | os.PathLike[str], *, sources: Iterable[str | os.PathLike[str]] = (),
                      overwrite: bool = False, allow_device: bool = False) -> str:
    """Refuse ``path`` as an output unless the rule above allows it; returns its absolute path.

    ``sources`` are the files the command reads (every layer of the chain): the destination may never be one
    of them, whatever ``overwrite`` says.
    """
    raw = os.fspath(path)
    if not raw:
        raise DestinationError("empty destination path", path=raw)
    dest = os.path.abspath(raw)
    directory = os.path.dirname(dest)
    if not os.path.isdir(directory):
        raise DestinationError(f"the directory {directory} does not exist", path=raw)
    src_ids: set[tuple[int, int]] = set()
    src_real: set[str] = set()
    for s in sources:
        s = os.fspath(s)
        src_real.add(os.path.realpath(s))
        with contextlib.suppress(OSError):
            src_ids.add(_identity(os.stat(s)))
    if os.path.realpath(dest) in src_real:
        raise DestinationError("the destination is a file of the source chain", path=raw)
    try:
        lst = os.lstat(dest)
    except FileNotFoundError:
        return dest
    try:
        st = os.stat(dest)  # through a symlink: what a write would reach
    except FileNotFoundError:
        st = None  # a dangling symlink: replacing the link itself is all a write would do
    if st is not None and _identity(st) in src_ids:
        raise DestinationError("the destination is a file of the source chain", path=raw)
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISBLK(st.st_mode) and allow_device:
            return dest
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a character device" if stat.S_ISCHR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        hint = " (export writes a block device in place when given --device)" if stat.S_ISBLK(
            st.st_mode) else ""
        raise DestinationError(f"the destination is {kind}; only regular files are written{hint}", path=raw)
    if not overwrite:
        what = "a symlink" if stat.S_ISLNK(lst.st_mode) else "a file"
        raise DestinationExistsError(f"the destination exists ({what}); pass --overwrite (overwrite=True) to "
                                     "replace it", path=raw)
    return dest

"""Locks on the files of a chain, and the one order every writer takes them in.

Locks are ``flock`` on the open file (per open file description, so two opens in one process exclude each other
too), always non-blocking: a contended lock is a :class:`~vhdcore.exceptions.LockError` naming the file, never a
wait, so no two vhdcore processes can deadlock whatever they lock.

- exclusive (``LOCK_EX``): a file whose bytes change or which will be deleted. Every ``Image(..., "r+")`` takes
  it; coalesce takes it on the target, and on the layers it merges when it will delete them (``remove_child``).
- shared (``LOCK_SH``): a file whose content must not change while it is read: coalesce's source layers, and the
  parent a snapshot records (so a coalesce into that parent, or one that would delete it, is refused meanwhile).

Order: top of the chain to its base. A writer locks the layers it involves starting at the topmost (the new
child of a snapshot, the leaf of a coalesce, whose own children are opened for relinking only afterwards) and
going down to the base, and takes every lock before its first safety check (dependents, sizes) so that what it
checked stays true until it is done: a snapshot holds its parent's shared lock until the new child is in place;
a coalesce holds its target's exclusive lock from before it looks for other children until the end.
"""
from __future__ import annotations

import errno
import fcntl
import os

from ..exceptions import LockError

__all__ = ["lock"]


def lock(img, *, exclusive: bool = False, why: str = "") -> None:
    """Take a lock on ``img`` (an open Image) or raise LockError; then check that no writer grew the file
    between its being read and the lock (its BAT would be stale)."""
    try:
        fcntl.flock(img.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockError(f"another process holds this file{'; ' + why if why else ''}", path=img.path,
                            field="lock") from None
        raise
    size = os.fstat(img.fd).st_size
    if size != img.file_size:
        raise LockError("the file changed while it was being opened (a writer was active); try again",
                        path=img.path, field="file size", value=size)

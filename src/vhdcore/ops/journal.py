"""Journals of the operations that rewrite a disk in place (set-parent, rebase, resize): one way to name, write,
read and remove them, and one rule binding a header-rewrite plan to the disk it was made for.

A journal is ``.<disk>.<suffix>`` beside the disk, written whole through :func:`fileio.atomic_output`
(never a torn journal), read with a size bound, and removed with its directory synced. What it says is input: a
journal that is not the kind expected, too large, or not bound to this disk is refused with a clear error and
nothing is written (see :func:`bind_header_plan`). The coalesce journal keeps its own reader in ``relink.py``
(it names layers and dependents, which are bound by device and inode there).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from ..fileio import atomic_output, fsync_dir
from ..exceptions import InvalidFormatError
from .coalesce.relink import JournalError, RelinkPlan, check_plan_bytes

__all__ = ["journal_path", "write_journal", "remove_journal", "read_journal", "bind_header_plan"]


def journal_path(disk: str | os.PathLike[str], suffix: str) -> str:
    d, base = os.path.split(os.path.abspath(os.fspath(disk)))
    return os.path.join(d, "." + base + suffix)


def write_journal(path: str, doc: dict[str, Any]) -> None:
    """Store ``doc`` at ``path`` durably (file and directory synced) before the first write it describes."""
    data = json.dumps(doc).encode()
    with atomic_output(path, mode=0o600) as (fd, _tmp):
        pos = 0
        while pos < len(data):
            pos += os.write(fd, data[pos:])


def remove_journal(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        fsync_dir(os.path.dirname(path))


def read_journal(path: str, kind: str, max_bytes: int) -> dict[str, Any] | None:
    """The journal at ``path`` as a dict whose ``kind`` is ``kind``; None when there is none.

    Opened without following a symlink (a journal is a file the operation wrote, never a link to one).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvalidFormatError(f"the {kind} journal cannot be opened as a plain file ({e.strerror})", path=path,
                                 field="journal") from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(max_bytes + 1)
    try:
        if len(raw) > max_bytes:
            raise ValueError(f"larger than {max_bytes} bytes")
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("kind") != kind:
            raise ValueError(f"not a {kind} journal")
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidFormatError(f"unreadable {kind} journal ({e}); remove it if no {kind} was interrupted",
                                 path=path, field="journal") from None
    return doc


def bind_header_plan(disk: str, plan: RelinkPlan, journal: str) -> None:
    """Refuse a header-rewrite plan that is not this differencing disk's: it must name this file (real path) and
    pass :func:`relink.check_plan_bytes` (its unique id; one valid header at the disk's header offset keeping its
    block table; locator data only in the slots that header declares, clear of the BAT, blocks and footer)."""
    if plan.path != os.path.realpath(disk):
        raise JournalError(f"the journal is for {plan.path}, not this disk", path=journal, field="journal.path",
                           value=plan.path)
    check_plan_bytes(plan, disk, None, journal, "journal.plan")

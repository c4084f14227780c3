"""Re-point a differencing disk at a parent that moved or was copied (vhd-util modify -p, qemu-img rebase -u).

Only the child's header and parent-locator data change: parent unique id, time stamp, unicode name and locators
(``relink.plan_relink`` computes the bytes, with ``locators.parent_locators_for``'s locators). The virtual content is
not looked at: the new parent must hold what the old one held. Its unique id is the check of that: a parent whose
id is not the one the child records is refused unless ``force`` (then the new id and time stamp are recorded),
since a different disk under the expected name is the classic way to corrupt a chain silently.

Crash safety: the plan's bytes (locator data, then the 1024-byte header) go into a journal beside the child,
``.<child>.set-parent``, made durable before the first write. The header is one write, but a power cut can tear
it across its two sectors (wrong checksum: the child no longer opens). Running set-parent again on the child finds
the journal, checks it is this child's (path, unique id, offsets inside the file, the header where the footer
says), and writes the same bytes again. The footer is never written.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

from ..disk.chain import Disk, open_chain
from . import journal
from ..exceptions import ChainCycleError, ChainError, InvalidFormatError, ParentMismatchError
from ..disk.image import Image
from .coalesce.relink import RelinkPlan, apply_relink, plan_from_json, plan_relink
from ..format.structs import FOOTER, HEADER, DynamicHeader

__all__ = ["set_parent", "SetParentReport", "journal_path"]

JOURNAL_SUFFIX = ".set-parent"
MAX_JOURNAL_BYTES = 1 << 20  # a header and a few locators, hex-encoded: far below this


@dataclass
class SetParentReport:
    child: str
    parent: str
    old_parent_unique_id: str
    parent_unique_id: str
    forced: bool  # the new parent's unique id differs from the one the child recorded
    resumed: bool  # an interrupted run's journal was replayed first
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        # docs/json.md: the disk changed is the `path`, a parent's file a `parent_path`.
        d = asdict(self)
        d["path"], d["parent_path"] = d.pop("child"), d.pop("parent")
        return d


def journal_path(child: str) -> str:
    return journal.journal_path(child, JOURNAL_SUFFIX)


def _write_journal(child: str, plan: RelinkPlan, parent: str) -> str:
    path = journal_path(child)
    journal.write_journal(path, {"kind": "set-parent", "parent": os.path.realpath(parent), "plan": plan.to_json()})
    return path


def _remove_journal(path: str) -> None:
    journal.remove_journal(path)


def _journal_plan(child: str) -> RelinkPlan | None:
    """The plan of an interrupted run on ``child``, bound to it; None when there is none. A journal that is not
    this child's is an error (refused, left in place), never a reason to write anything."""
    path = journal_path(child)
    doc = journal.read_journal(path, "set-parent", MAX_JOURNAL_BYTES)
    if doc is None:
        return None
    try:
        plan = plan_from_json(doc["plan"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidFormatError("unreadable set-parent journal (its plan); remove it if no set-parent was "
                                 "interrupted", path=path, field="journal.plan") from None
    journal.bind_header_plan(child, plan, path)
    return plan


def _with_file_name(plan: RelinkPlan, parent_path: str) -> RelinkPlan:
    """The plan with the header's parent unicode name set to the parent's file name.

    The specification calls the field the parent's file name, and libvhd's check compares it with the file name
    each locator ends in ("parent locator 0 name (x.vhd) does not match header name (../d/x.vhd)"); the path
    itself lives in the locators.
    """
    *data, (hoff, raw) = plan.writes
    h = DynamicHeader.parse(raw, verify_checksum=False)
    new = replace(h, parent_unicode_name_raw=DynamicHeader.encode_parent_name(os.path.basename(parent_path)))
    return replace(plan, writes=tuple(data) + ((hoff, new.pack()),))


def refuse_cycle(parent_disk: Disk, child_key: tuple[int, int], child: str) -> None:
    """A new parent whose chain holds the child itself (by device and inode) would make a loop."""
    for img in parent_disk.layers:
        st = os.fstat(img.fd)
        if (st.st_dev, st.st_ino) == child_key:
            raise ChainCycleError("the new parent's chain contains the child itself", path=child,
                                  field="parent", value=img.path)


def set_parent(child: str | os.PathLike[str], parent: str | os.PathLike[str], *, force: bool = False,
               parent_dirs: Sequence[str] | None = None, strict: bool = True) -> SetParentReport:
    """Make the differencing disk ``child`` name ``parent`` (see the module docstring)."""
    child_s, parent_s = os.fspath(child), os.fspath(parent)
    resumed = False
    pending = _journal_plan(child_s)
    if pending is not None:
        # Finish the interrupted run first: its header may be torn, and nothing else can be read until it is whole.
        apply_relink(pending)
        _remove_journal(journal_path(child_s))
        resumed = True
    with Image(child_s, "r", strict=strict) as cimg:
        if not cimg.is_differencing:
            raise ChainError("not a differencing disk: it has no parent to set", path=cimg.path,
                             field=FOOTER.field("disk_type"), value=int(cimg.disk_type))
        recorded = cimg.header.parent_unique_id
        child_id = os.fstat(cimg.fd)
        child_key = (child_id.st_dev, child_id.st_ino)
    # The new parent's whole chain must open (its own parents found, ids right) before the child names it.
    with open_chain(parent_s, "r", parent_dirs, strict=strict) as pdisk:
        refuse_cycle(pdisk, child_key, child_s)
        pimg = pdisk.leaf
        forced = pimg.unique_id != recorded
        if forced and not force:
            raise ParentMismatchError(
                f"{parent_s} has unique id {pimg.unique_id}, the child records {recorded}: it is not the parent "
                "the child was made from (a copy keeps the id; a different disk does not). Pass --force to record "
                "the new id if you know the content is the same", path=child_s,
                field=HEADER.field("parent_unique_id"), value=str(recorded))
        plan = _with_file_name(plan_relink(child_s, pimg), pimg.path)
        jpath = _write_journal(child_s, plan, parent_s)
        apply_relink(plan)
        _remove_journal(jpath)
        new_id = str(pimg.unique_id)
    # The child must now open with the new parent found where it is.
    dirs = [os.path.dirname(os.path.realpath(parent_s))] + list(parent_dirs or [])
    with open_chain(child_s, "r", dirs, strict=strict) as disk:
        if os.path.realpath(disk.layers[1].path) != os.path.realpath(parent_s):
            raise ChainError(f"after set-parent the child resolves to {disk.layers[1].path}, not {parent_s}",
                             path=child_s, field="parent locator")
        warnings = list(plan.warnings) + list(disk.warnings)
    return SetParentReport(child_s, parent_s, str(recorded), new_id, forced, resumed, warnings)

"""``remove_child``: once the target is durable (and verified, if asked), re-point the child's own children at
the target, then delete the merged layers (deepest first, the child last); and finishing such a removal that a
crash interrupted.

A journal beside the child (relink.write_journal), holding every relink's bytes, is written before the first
relink: a rerun after a crash in that phase relinks the journal's grandchildren again (mending a header torn
mid-write) and, if layers were already deleted so that the child's chain no longer opens, completes the removal
from the journal alone (:func:`finish_interrupted_removal`).
"""
from __future__ import annotations

import contextlib
import os
import time

from ... import kernels as K
from ...fileio import fsync_dir
from ...disk.chain import file_identity, is_within, resolve_parent
from ...disk.image import Image
from ...exceptions import ChainError, VHDError
from ...format.structs import FOOTER
from .layers import MergeChain
from .relink import (
    JournalError,
    RelinkPlan,
    apply_relink,
    bind_plans,
    dependents,
    journal_path,
    plan_relink,
    read_journal,
    write_journal,
)
from .report import CoalesceReport
from ...fileio import WriteIO

__all__ = ["children_to_relink", "finish_interrupted_removal", "interrupted_relinks", "relink_and_remove"]


def _own_journal(chain: MergeChain) -> dict | None:
    """The journal beside the child if an interrupted ``remove_child`` run of this same coalesce (same child,
    same target) left it; None otherwise."""
    rec = read_journal(chain.leaf.path)
    if rec and rec.get("child_unique_id") == str(chain.leaf.unique_id) \
            and rec.get("target_unique_id") == str(chain.target.unique_id):
        return rec
    return None


def interrupted_relinks(chain: MergeChain, dirs: list[str]) -> list[RelinkPlan]:
    """The relinks an interrupted ``remove_child`` run of this coalesce journaled, bound to disks found now in
    ``dirs`` (relink.bind_plans): a journal's relinks count only so, never by its names."""
    journal = _own_journal(chain)
    if not journal:
        return []
    leaf, target = chain.leaf, chain.target
    return bind_plans(journal, journal_path(leaf.path), [leaf.unique_id, target.unique_id], target, dirs)


def children_to_relink(leaf: Image, dirs: list[str], replay: list[RelinkPlan]) -> list[str]:
    """The child's own children (in ``dirs``, and those an interrupted run journaled), each opened for writing
    once now so that one in use fails the coalesce before the merge, not after it."""
    grandchildren = [d.path for d in dependents(leaf, dirs)]
    known = {os.path.realpath(g) for g in grandchildren}
    grandchildren += [p.path for p in replay if os.path.realpath(p.path) not in known]
    for g in grandchildren:
        Image(g, "r+", strict=False).close()
    return grandchildren


def relink_and_remove(chain: MergeChain, grandchildren: list[str], io: WriteIO, rep: CoalesceReport) -> None:
    """Journal every relink, re-point ``grandchildren`` at the target, then delete the merged layers and the
    journal."""
    leaf, target = chain.leaf, chain.target
    merged = [layer.path for layer in chain.sources]
    # Every relink's bytes go into the journal before the first is written: a header torn by a crash is then
    # rewritten whole by the rerun (interrupted_relinks, or finish_interrupted_removal once layers were deleted)
    # instead of leaving a grandchild with a bad checksum.
    plans = [plan_relink(g, target) for g in grandchildren]
    jpath = write_journal(leaf.path, {
        "version": 2, "child": os.path.realpath(leaf.path), "child_unique_id": str(leaf.unique_id),
        "target": os.path.realpath(target.path), "target_unique_id": str(target.unique_id),
        "merged": merged, "children": [os.path.realpath(g) for g in grandchildren],
        "relinks": [p.to_json() for p in plans]})
    for g, plan in zip(grandchildren, plans):
        apply_relink(plan, io=io)
        rep.warnings.extend(plan.warnings)
        rep.relinked.append(g)
    # The merged layers stay open, locked, until they are unlinked: no snapshot can take one as its parent.
    _remove_merged(merged, jpath, rep)


def _remove_merged(merged: list[str], jpath: str, rep: CoalesceReport) -> None:
    """Delete the merged layers deepest first and the child (beside which the journal lies) last, then the journal.

    A crash part-way leaves the child and its journal, so coalescing the child again finds the journal and
    finishes (:func:`finish_interrupted_removal`) instead of leaving layers that nothing references.
    """
    for p in list(reversed(merged[1:])) + merged[:1]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
        rep.removed.append(p)
    for d in sorted({os.path.dirname(os.path.realpath(p)) for p in merged}):
        fsync_dir(d)
    os.unlink(jpath)


def _lexists(p: str) -> bool:
    try:
        os.lstat(p)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True  # cannot tell: treat as present, so nothing is taken for deleted
    return True


def finish_interrupted_removal(child: str, into: str | None, warnings: list[str], parent_dirs: list[str],
                                search_dirs: list[str]) -> CoalesceReport | None:
    """Finish a ``remove_child`` run that died while deleting the merged layers (the child's chain no longer
    opens: some of its layers are gone, or the child itself is, and only the journal is left). None when there
    is no such run to finish: the caller goes on as usual.

    The journal exists only once the target was durable (and verified when asked) and holds every relink. It is
    believed only as far as it matches what is found now: its merged layers that still exist must be, by
    device and inode, the child's chain as it resolves (a prefix of it: layers are deleted deepest first), the
    rest must be gone; its target must carry the recorded unique id inside the chain's directories; its relinks
    must bind to the chain's children (relink.bind_plans). Anything else is a JournalError and nothing is
    deleted or written. Then the relinks are replayed and what is left of the merged layers is deleted.
    """
    child_real = os.path.realpath(child)
    jpath = journal_path(child)
    rec = read_journal(child)
    if not rec or rec.get("child") != child_real:
        return None
    merged = _journal_merged_layers(rec, jpath, child_real)
    left = _layers_left(merged, jpath)
    if left == len(merged):
        return None  # the chain is whole: the usual path redoes the merge and replays the (bound) relinks
    target_path = str(rec.get("target", ""))
    if into is not None and os.path.realpath(into) != target_path:
        return None
    child_dir = os.path.dirname(child_real)
    allowed = sorted({child_dir, *(os.path.realpath(d) for d in parent_dirs + search_dirs)})
    if left == 0:
        # Killed after the child's unlink, before the journal's: every relink and deletion is done.
        os.unlink(jpath)
        fsync_dir(child_dir)
        warnings.append(f"{child}: removed the journal of a finished coalesce into {target_path} (the run was "
                        "interrupted just before removing it)")
        rep = CoalesceReport(child=child_real, target=target_path, target_type="", merged_layers=list(merged),
                             backend=K.BACKEND, block_size=0)
        rep.warnings = list(warnings)
        return rep
    leaf_path = _match_chain(child, rec, merged[:left], allowed, jpath)
    if leaf_path is None:
        return None  # the child there now is another disk than the journal's
    if not is_within(os.path.realpath(target_path), allowed):
        raise JournalError(f"the journal's target {target_path} is outside the chain's directories", path=jpath,
                           field="target", value=target_path)
    with Image(target_path, "r") as target:
        if str(target.unique_id) != rec.get("target_unique_id"):
            raise ChainError("the journal of an interrupted coalesce names a target whose unique id changed since",
                             path=target_path, field=FOOTER.field("unique_id"), value=str(target.unique_id))
        rep = CoalesceReport(child=leaf_path, target=target.path, target_type=target.disk_type.label,
                             merged_layers=list(merged), backend=K.BACKEND, block_size=target.block_size or 0)
        with Image(child, "r", strict=False) as leaf:
            plans = bind_plans(rec, jpath, [leaf.unique_id, target.unique_id], target,
                               [os.path.realpath(d) for d in search_dirs] or [child_dir])
    t0 = time.perf_counter()
    for plan in plans:
        apply_relink(plan)
        rep.relinked.append(plan.path)
    rep.warnings = warnings + [f"{leaf_path}: finished the removal of an interrupted coalesce from its journal "
                               f"(merged into {target_path}; layers already deleted: "
                               f"{', '.join(p for p in merged[left:])})"]
    _remove_merged(merged[:left], jpath, rep)
    rep.seconds = time.perf_counter() - t0
    return rep


def _journal_merged_layers(rec: dict, jpath: str, child_real: str) -> list[str]:
    """The journal's merged layers, leaf first: a bounded list of paths starting with the child."""
    merged = rec.get("merged")
    if not isinstance(merged, list) or not merged or len(merged) > 4096 or not all(isinstance(p, str)
                                                                                  for p in merged):
        raise JournalError("the journal's list of merged layers is not a list of paths", path=jpath, field="merged")
    if merged[0] != child_real:
        raise JournalError("the journal's first merged layer is not the child it lies beside", path=jpath,
                           field="merged[0]", value=merged[0])
    return merged


def _layers_left(merged: list[str], jpath: str) -> int:
    """How many of the merged layers are still there: they must be a prefix (layers are deleted deepest first)."""
    present = [_lexists(p) for p in merged]
    if all(present):
        return len(merged)
    left = present.index(False)
    if any(present[left:]):
        raise JournalError("the journal's merged layers are not a prefix of the chain (layers are deleted deepest "
                           f"first, yet {merged[left]} is gone and a deeper one exists)", path=jpath, field="merged")
    return left


def _match_chain(child: str, rec: dict, remaining: list[str], allowed: list[str], jpath: str) -> str | None:
    """Check that the merged layers still present are the child's chain as it resolves now, file for file (by
    device and inode); return the child's path as opened, or None if the child is not the journal's."""
    walked: list[tuple[int, int]] = []
    img = Image(child, "r", strict=False)
    try:
        if str(img.unique_id) != rec.get("child_unique_id"):
            return None
        leaf_path = img.path
        while len(walked) < len(remaining):
            walked.append(file_identity(img))
            if len(walked) == len(remaining) or not img.is_differencing:
                break
            try:
                nxt = resolve_parent(img, allowed)
            except VHDError:
                break
            img.close()
            img = Image(nxt, "r", strict=False)
    finally:
        img.close()
    for i, p in enumerate(remaining):
        st = os.stat(p)
        if i >= len(walked) or (st.st_dev, st.st_ino) != walked[i]:
            raise JournalError(f"the journal names {p} as a merged layer, but it is not layer {i} of the child's "
                               "chain", path=jpath, field=f"merged[{i}]", value=p)
    return leaf_path


"""Coalesce: write every sector a differencing child holds into its parent (or, with ``into``, every layer from
the leaf down to an ancestor, into that ancestor, each sector once from the topmost layer that holds it).

How it stays fast: the work goes target block by target block (the target's existing blocks in their file order,
then new blocks in virtual order, appended). For each, the source layers' sector bitmaps are combined first (top
layer wins: a lower layer contributes only the sectors no higher layer holds), so each target sector is written
once:

* a full block from one layer is one kernel-side ``copy_file_range`` (or one vectored write when its bytes must be
  looked at: the zero test below);
* a partial block that goes into a new target block is assembled in memory (zeros, or the target's own bytes,
  with the ``merge_block`` kernel laying the source sectors over them) and written once;
* a partial block over an existing target block with few runs has just its runs written (no read of the target,
  no rewrite of the sectors it keeps; runs from ``bitmap_runs``); with many runs it is merged and written whole.
* zero-aware: a merged block that is all zeros, over a target block that is unallocated with nothing allocated
  under it, is not allocated (it reads as zeros already). Over a differencing target zeros must be written.

Writes into new file space go as vectors of 256 KiB pieces (single 2 MiB writes run several times slower on this
kernel: machine-facts.md). How the target's metadata stays behind its data, and the fault-injection hooks the
crash tests use, are in ``writer``.

Safety: refused (UnsafeOperationError naming the override) when other disks depend on the target or an
intermediate layer, when a parent's unique id is not the one its child records, or when a disk is in saved state.
``remove_child`` acts only once the target is durable (and verified, if asked): the child's children are relinked
to the target, then the merged layers are deleted (deepest first, the child last); a journal beside the child,
holding every relink's bytes, lets a rerun after a crash in that phase finish the job: it relinks the journal's
grandchildren again (mending a header torn mid-write) and, if layers were already deleted so that the child's
chain no longer opens, completes the removal from the journal alone.

The package, one job a module (``coalesce`` below runs them as its steps):

* ``layers``: open the child's chain read-only and find the target in it (:class:`~.layers.MergeChain`);
* ``safety``: the locks and the refusals before any write, and the ``force`` overrides;
* ``merge``: the block-by-block merge (:class:`~.merge.Merger`); ``writer``: its write ordering and fault hooks;
* ``resume``: the resumable merge's journal of merged blocks (``resume=True``);
* ``verify``: the content hashes before and after (``verify=True``);
* ``removal``: ``remove_child``'s relinks and deletions, and finishing them after a crash; ``relink``: the
  header rewrite of a re-pointed child and the removal journal's format;
* ``report``: :class:`CoalesceReport`.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterable, NamedTuple, Sequence

from ... import kernels as K
from ...progress import Stages
from .layers import MergeChain, open_chain
from .merge import DEFAULT_BATCH_BYTES, Merger, ProgressFn
from .relink import journal_path
from .removal import children_to_relink, finish_interrupted_removal, interrupted_relinks, relink_and_remove
from .report import CoalesceReport
from .resume import MergeProgress
# check_safety is looked up here when coalesce runs: tests wrap it to act while the chain is locked.
from .safety import (
    FORCE_CHOICES,
    FORCE_OTHER_CHILDREN,
    FORCE_PARENT_ID,
    FORCE_SAVED_STATE,
    check_safety,
    force_set,
    lock_chain,
)
from .verify import hash_chain, verify_target
from ...fileio import WriteIO

__all__ = ["coalesce", "CoalesceReport", "FORCE_CHOICES", "FORCE_OTHER_CHILDREN", "FORCE_PARENT_ID",
           "FORCE_SAVED_STATE", "DEFAULT_BATCH_BYTES", "journal_path"]


def coalesce(
    child: str | os.PathLike[str],
    *,
    into: str | os.PathLike[str] | None = None,
    verify: bool = False,
    progress: ProgressFn | None = None,
    remove_child: bool = False,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    parent_dirs: Sequence[str | os.PathLike[str]] | None = None,
    force: Iterable[str] = (),
    strict: bool = True,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    use_copy_range: bool = True,
    resume: bool = False,
) -> CoalesceReport:
    """Merge ``child`` into its parent (or every layer from ``child`` down to just above ``into`` into ``into``).

    ``verify`` hashes the chain's content per block before and the target's after (xxh3-128) and raises
    VerificationError at the first differing offset. ``remove_child`` then re-points the child's own children
    (found in ``search_dirs``, default the child's directory) at the target and deletes the merged layers.
    ``force`` overrides the safety refusals it names: 'other-children' (other disks depend on the target or an
    intermediate layer), 'parent-id' (a parent's unique id is not the one its child records), 'saved-state'.
    ``progress(done, total)`` is called with bytes of the virtual disk processed.
    ``resume`` keeps a journal of the blocks merged so far (vhdcore.ops.coalesce.resume), so that a rerun after a
    crash, a kill or a time limit merges only what was left (``blocks_resumed`` in the report).
    """
    started = time.perf_counter()
    forced = force_set(force)
    child = os.fspath(child)
    warnings: list[str] = []
    pdirs = [os.fspath(d) for d in (parent_dirs or ())]
    finished = finish_interrupted_removal(child, os.fspath(into) if into is not None else None, warnings, pdirs,
                                          [os.fspath(d) for d in (search_dirs or ())])
    if finished is not None:
        return finished
    with contextlib.ExitStack() as stack:
        chain = open_chain(stack, child, into, pdirs, strict, forced, warnings)
        dirs = _search_dirs(chain, search_dirs)
        writable_target = lock_chain(stack, chain, remove_child, strict)
        replay = interrupted_relinks(chain, dirs)
        check_safety(chain, dirs, forced, warnings, replay)
        grandchildren = children_to_relink(chain.leaf, dirs, replay) if remove_child else []
        # The target, for writing (its exclusive lock taken above), replaces its read-only image in the chain.
        chain.target.close()
        chain = chain.with_target(writable_target)

        report = _new_report(chain)
        io = stack.enter_context(contextlib.closing(WriteIO()))
        stage = _stage_progress(progress, verify)
        merger = Merger(chain, report, io, batch_bytes, use_copy_range, stage.merge)
        report.block_size = merger.unit
        before = hash_chain(chain, merger.unit, merger.limit, report, stage.verify_before) if verify else {}
        _merge(merger, chain, resume)
        report.target_size_after = chain.target.file_size
        if verify:
            verify_target(chain, before, merger.unit, merger.limit, strict, report, stage.verify_after)
        report.writes, report.syncs = io.writes, io.syncs
        if remove_child:
            relink_and_remove(chain, grandchildren, io, report)
        report.warnings = warnings + report.warnings
        report.seconds = time.perf_counter() - started
        return report


def _new_report(chain: MergeChain) -> CoalesceReport:
    target = chain.target
    return CoalesceReport(child=chain.leaf.path, target=target.path, target_type=target.disk_type.label,
                          merged_layers=[layer.path for layer in chain.sources], backend=K.BACKEND, block_size=0,
                          target_size_before=target.file_size)


def _search_dirs(chain: MergeChain, search_dirs: Sequence[str | os.PathLike[str]] | None) -> list[str]:
    """Where the chain's other disks are looked for: ``search_dirs``, by default the child's directory."""
    child_dir = os.path.dirname(os.path.realpath(chain.leaf.path))
    return [os.path.realpath(os.fspath(d)) for d in (search_dirs or [child_dir])]


class _StageProgress(NamedTuple):
    merge: ProgressFn | None
    verify_before: ProgressFn | None
    verify_after: ProgressFn | None


def _stage_progress(progress: ProgressFn | None, verify: bool) -> _StageProgress:
    """Each step's progress callback. With verify the job has three stages (hash the chain, merge, hash the
    result), each shown as it runs."""
    if not (verify and progress):
        return _StageProgress(progress, None, None)
    stages = Stages(progress, {"verify-before": 1, "merge": 2, "verify-after": 1})
    return _StageProgress(stages.stage("merge", "coalescing"), stages.stage("verify-before", "verifying"),
                          stages.stage("verify-after", "verifying"))


def _merge(merger: Merger, chain: MergeChain, resume: bool) -> None:
    """Run the merge; with ``resume``, under the journal of merged blocks, removed once the merge is complete."""
    merge_progress = MergeProgress(chain.sources, chain.target, merger.unit, merger.limit) if resume else None
    merger.run(merge_progress)
    if merge_progress is not None:
        merge_progress.remove()

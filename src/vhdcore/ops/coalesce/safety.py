"""Everything a coalesce checks before it writes, and the locks that keep those checks true until it is done.

Refused (UnsafeOperationError naming the override) when other disks depend on the target or an intermediate
layer, when a parent's unique id is not the one its child records (layers.py, at opening), or when a disk is in
saved state; a child larger than a parent it merges into is unsupported.
"""
from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Iterable

from ...disk.chain import file_identity
from ...disk.image import Image
from ...disk.locks import lock
from ...exceptions import ChainError, UnsafeOperationError, UnsupportedFeatureError
from ...format.structs import FOOTER
from .relink import RelinkPlan, dependents

if TYPE_CHECKING:
    from .layers import MergeChain

__all__ = ["FORCE_CHOICES", "FORCE_OTHER_CHILDREN", "FORCE_PARENT_ID", "FORCE_SAVED_STATE", "check_safety",
           "force_set", "lock_chain"]

FORCE_OTHER_CHILDREN = "other-children"
FORCE_PARENT_ID = "parent-id"
FORCE_SAVED_STATE = "saved-state"
FORCE_CHOICES = (FORCE_OTHER_CHILDREN, FORCE_PARENT_ID, FORCE_SAVED_STATE)

# A shared parent's directory and its siblings: at most this many are searched for its other children.
MAX_SIBLING_DIRS = 10_000


def force_set(force: Iterable[str]) -> set[str]:
    """The overrides asked for; an unknown one is a ValueError (a caller's mistake, not the disk's)."""
    out = set(force)
    unknown = out - set(FORCE_CHOICES)
    if unknown:
        raise ValueError(f"unknown force option(s) {sorted(unknown)}; choose from {', '.join(FORCE_CHOICES)}")
    return out


def lock_chain(stack: contextlib.ExitStack, chain: MergeChain, remove_child: bool, strict: bool) -> Image:
    """Lock the chain for the merge and return the target opened for writing (closed by ``stack``).

    Locks in the one order (vhdcore.disk.locks): the merged layers from the leaf down (exclusive when they will
    be deleted, so no snapshot can take one as its parent meanwhile), then the target, exclusive, before any
    safety check, so that no disk can come to depend on it between the check and the merge."""
    for layer in chain.sources:
        lock(layer, exclusive=remove_child, why="it cannot be merged while another process writes or reads it "
             "as a parent" if remove_child else "it cannot be merged while it changes")
    target = chain.target
    writable = stack.enter_context(Image(target.path, "r+", strict=strict))
    if file_identity(writable) != file_identity(target):
        raise ChainError("the target file was replaced while opening it", path=target.path, field="file")
    return writable


def check_safety(chain: MergeChain, dirs: list[str], force: set[str], warnings: list[str],
                 replay: list[RelinkPlan]) -> None:
    """Refuse (or, forced, warn about) what would make the merge change more than the chain: disks in saved
    state, a layer larger than its parent, and other disks that depend on a layer the merge changes (found in
    ``dirs``, each layer's own directory and, for a layer outside the child's, that directory's siblings).
    ``replay``: the relinks an interrupted run of this coalesce already made (their disks are not others)."""
    layers, k = chain.layers, chain.target_index
    sources, target = chain.sources, chain.target
    for img in sources + [target]:
        if img.footer.saved_state:
            if FORCE_SAVED_STATE not in force:
                raise UnsafeOperationError(
                    "the disk is in saved state (a suspended VM's disk): merging would change what the VM resumes "
                    f"on. Pass force '{FORCE_SAVED_STATE}' (--force {FORCE_SAVED_STATE}) to merge anyway",
                    path=img.path, offset=max(img.footer_offset, 0) + FOOTER.offset("saved_state"),
                    field=FOOTER.field("saved_state"), value=img.footer.saved_state)
            warnings.append(f"{img.path}: in saved state (merged anyway: force '{FORCE_SAVED_STATE}')")
    for i in range(len(sources)):
        if sources[i].size > layers[i + 1].size:
            raise UnsupportedFeatureError(
                f"the disk ({sources[i].size} bytes) is larger than its parent {layers[i + 1].path} "
                f"({layers[i + 1].size} bytes): its data past the parent's end has nowhere to go (resize the parent "
                "first)", path=sources[i].path, field=FOOTER.field("current_size"), value=sources[i].size)
    # Every disk whose view goes through a layer we change (the target and the intermediate layers) other than
    # the chain's own would see different content.
    already = {os.path.realpath(p.path) for p in replay}  # relinked by the interrupted run: bound, not named
    child_dir = os.path.dirname(os.path.realpath(layers[0].path))
    for i in range(1, k + 1):
        img = layers[i]
        layer_dir = os.path.dirname(os.path.realpath(img.path))
        scan = sorted(set(dirs) | {layer_dir} | (sibling_dirs(layer_dir) if layer_dir != child_dir else set()))
        deps = [d for d in dependents(img, scan, exclude=[layers[i - 1].path])
                if not (i == k and d.path in already)]
        if not deps:
            continue
        names = "; ".join(f"{d.path} ({d.reason})" for d in deps[:10]) + (
            f"; and {len(deps) - 10} more" if len(deps) > 10 else "")  # a shared base may have hundreds
        if FORCE_OTHER_CHILDREN not in force:
            raise UnsafeOperationError(
                f"other disks depend on {img.path} and would see their content change: {names}. Coalesce those "
                f"first, or pass force '{FORCE_OTHER_CHILDREN}' (--force {FORCE_OTHER_CHILDREN}) if they are "
                "disposable", path=img.path, field="children", value=len(deps))
        warnings.append(f"{img.path}: merged although other disks depend on it: {names}")


def sibling_dirs(layer_dir: str) -> set[str]:
    """The directories beside ``layer_dir`` (its parent's subdirectories, not through symlinks).

    A layer outside the child's own directory, found through --parent-dir, is typically a shared base (an
    image cache such as OpenStack's ``instances/_base`` beside ``instances/<vm>/``): its other children live in
    the sibling directories, not in its own, and a coalesce into it must know them before changing it."""
    up = os.path.dirname(layer_dir)
    out: set[str] = set()
    try:
        with os.scandir(up) as it:
            for entry in it:
                if len(out) >= MAX_SIBLING_DIRS:
                    break
                if entry.is_dir(follow_symlinks=False):
                    out.add(os.path.join(up, entry.name))
    except OSError:
        pass
    return out

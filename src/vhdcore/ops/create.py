"""Creating new VHD files: fixed, dynamic, and differencing children ("snapshots").

Every new file is written under a temporary name in its target directory and renamed into place once complete,
so a crash never leaves a half-made disk under the requested name.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

from ..destination import check_destination
from ..disk.chain import Disk, open_chain
from ..disk.locks import lock
from ..fileio import atomic_output
from ..format.layout import DEFAULT_BLOCK_SIZE, check_size, make_footer, write_dynamic_layout
from ..format.locators import parent_locators_for
from ..format.structs import NO_DATA_OFFSET, DiskType

__all__ = ["create", "snapshot"]


def create(path: str | os.PathLike[str], size: int, type: str = "dynamic", block_size: int = DEFAULT_BLOCK_SIZE,
           *, overwrite: bool = False) -> Disk:
    """Create a fixed or dynamic VHD of ``size`` bytes; returns it opened "r+".

    An existing file is never replaced unless ``overwrite`` is set (it may be somebody's disk).
    """
    path = os.fspath(path)
    check_destination(path, overwrite=overwrite)
    if type not in ("dynamic", "fixed"):
        raise ValueError(f"type must be 'dynamic' or 'fixed', not {type!r}")
    check_size(size, block_size if type == "dynamic" else None)
    with atomic_output(path) as (fd, _tmp):
        if type == "fixed":
            # A sparse file: the data area reads as zeros without being written.
            os.ftruncate(fd, size)
            os.pwrite(fd, make_footer(size, DiskType.FIXED, data_offset=NO_DATA_OFFSET).pack(), size)
        else:
            write_dynamic_layout(fd, size, block_size)
    return open_chain(path, "r+")


# Test hook: called with the parent's path once its lock is held (the race tests run a coalesce there).
_after_parent_locked: Callable[[str], None] | None = None


def snapshot(parent: str | os.PathLike[str], child: str | os.PathLike[str], *,
             block_size: int | None = None, parent_dirs: Sequence[str] | None = None,
             overwrite: bool = False) -> Disk:
    """Create a differencing child of ``parent``; returns the child's chain opened "r+".

    The child records the parent's unique id, its modification time (as blktap does; Windows writes 0) and its
    name, with W2ku, W2ru and MacX locators.
    """
    parent = os.fspath(parent)
    child = os.fspath(child)
    check_destination(child, sources=[parent], overwrite=overwrite)
    # Opening the parent's whole chain checks that it is usable before anything is written.
    with open_chain(parent, "r", parent_dirs=parent_dirs) as pdisk:
        check_destination(child, sources=[img.path for img in pdisk.layers], overwrite=overwrite)
        pimg = pdisk.leaf
        # Shared until the child is in place (vhdcore.disk.locks): a coalesce into the parent, or one that would
        # delete it, is refused meanwhile, and this one is refused while such a coalesce runs.
        lock(pimg, why="a coalesce is changing or removing it; take the snapshot afterwards")
        if _after_parent_locked is not None:
            _after_parent_locked(pimg.path)
        bs = block_size or pimg.block_size or DEFAULT_BLOCK_SIZE
        check_size(pdisk.size, bs)
        name, locs = parent_locators_for(parent, child)
        with atomic_output(child) as (fd, _tmp):
            write_dynamic_layout(fd, pdisk.size, bs, disk_type=DiskType.DIFFERENCING, parent=pimg, locators=locs,
                                 parent_name=name if len(name) <= 255 else os.path.basename(parent))
    dirs = [os.path.dirname(os.path.abspath(parent))] + list(parent_dirs or [])
    return open_chain(child, "r+", parent_dirs=dirs)

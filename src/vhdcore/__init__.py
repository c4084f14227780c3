"""vhdcore: a native-accelerated engine for Microsoft VHD virtual disks.

    import vhdcore
    with vhdcore.open("leaf.vhd") as disk:
        disk.read(0, 512)

The public API is re-exported here; operation modules are imported on first use so that ``import vhdcore``
stays cheap for scripts that only read.
"""
from __future__ import annotations

import importlib
from typing import Any

from .kernels import BACKEND
from .disk.chain import Disk, open_chain
from .ops.create import create, snapshot
from .exceptions import *  # noqa: F401,F403 - the hierarchy is part of the API
from .exceptions import __all__ as _exc_all
from .disk.extents import Extent
from .disk.image import Image

__version__ = "0.1.0"

MiB = 1024 * 1024
GiB = 1024 * MiB


def open(path, mode: str = "r", parent_dirs=None, *, strict: bool = True, resolver=None) -> Disk:  # noqa: A001
    """Open a VHD and its parents as one virtual disk (a context manager).

    ``mode`` "r" opens every file read-only; "r+" opens the leaf for writing (exclusive lock). Parents are
    looked for in the leaf's directory and in ``parent_dirs`` only. ``strict=False`` accepts bad checksums
    (reported in ``disk.warnings``).
    """
    return open_chain(path, mode, parent_dirs, strict=strict, resolver=resolver)


# name -> module that defines it, imported on first use. No module of the package shares a public function's
# name, so ``vhdcore.convert`` is always the function, whatever was imported before.
_LAZY = {
    "convert": "ops.convert",
    "coalesce": "ops.coalesce",
    "CoalesceReport": "ops.coalesce",
    "check": "ops.check",
    "repair": "ops.repair",
    "growth": "ops.growth",
    "GrowthReport": "ops.growth",
    "compact": "ops.compact",
    "export": "delivery.export",
    "ExportReport": "delivery.export",
    "verify": "delivery.verify",
    "compare": "ops.compare",
    "measure": "ops.measure",
    "resize": "ops.resize",
    "set_parent": "ops.setparent",
    "rebase": "ops.rebase",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'vhdcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["BACKEND", "Disk", "Extent", "Image", "open", "create", "snapshot", "MiB", "GiB", *_exc_all,
           *_LAZY]

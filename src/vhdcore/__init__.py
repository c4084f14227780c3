"""vhdcore: a native-accelerated engine for Microsoft VHD virtual disks.

    import vhdcore
    with vhdcore.open("leaf.vhd") as disk:
        disk.read(0, 512)

The public API is re-exported here; operation modules are imported on first use so that ``import vhdcore``
stays cheap for scripts that only read.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from ._kernels import BACKEND
from .chain import Disk, open_chain
from .create import create, snapshot
from .exceptions import *  # noqa: F401,F403 - the hierarchy is part of the API
from .exceptions import __all__ as _exc_all
from .extents import Extent
from .image import Image

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


# name -> module that defines it, imported lazily
_LAZY = {
    "convert": "convert",
    "coalesce": "coalesce",
    "CoalesceReport": "coalesce",
    "check": "check",
    "repair": "repair",
    "growth": "growth",
    "GrowthReport": "growth",
    "compact": "compact",
    "export": "export",
    "ExportReport": "export",
    "verify": "export",
    "compare": "compare",
    "measure": "measure",
    "resize": "resize",
    "set_parent": "setparent",
    "rebase": "rebase",
}


class _Package(types.ModuleType):
    """The package module, guarding the public functions that share their name with their module.

    When ``vhdcore.convert`` (the module) is first imported by any route other than ``__getattr__`` below (the
    CLI's ``from ..convert import convert``, a user's ``from vhdcore.convert import ConvertReport``), the import
    system binds the *module* as the package attribute, and ``vhdcore.convert(...)`` then fails with "'module'
    object is not callable". Binding the function instead keeps the documented API whatever was imported first.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'vhdcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["BACKEND", "Disk", "Extent", "Image", "open", "create", "snapshot", "MiB", "GiB", *_exc_all,
           *_LAZY]

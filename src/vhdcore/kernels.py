"""Kernel backend selection: the compiled Cython module, or its pure-Python twin.

``VHDCORE_PUREPYTHON=1`` (or ``true``/``yes``) forces the twin; otherwise the extension is used and, if it was
never built, the twin stands in with a RuntimeWarning. Callers use ``from . import _kernels as K`` and
``K.merge_block(...)``; ``BACKEND`` says which one answered ("cython" or "python").
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

__all__ = ["BACKEND", "load_backend", "bitmap_runs", "bitmap_count", "bitmap_set_range", "bitmap_or",
           "bitmap_andnot", "is_zero", "bytes_equal", "sector_zero_mask", "merge_block", "scan_bat",
           "count_runs_in_blocks"]

KERNELS = ("bitmap_runs", "bitmap_count", "bitmap_set_range", "bitmap_or", "bitmap_andnot", "is_zero",
           "bytes_equal", "sector_zero_mask", "merge_block", "scan_bat", "count_runs_in_blocks")

_MODULES = {"cython": "vhdcore._coalesce", "python": "vhdcore._coalesce_py"}


def load_backend(name: str) -> ModuleType:
    """The kernel module of one backend ("cython" or "python"), whatever the environment selects.

    Raises ImportError if the Cython extension is not built: tests use this to hold both to the same results.
    """
    try:
        module = _MODULES[name]
    except KeyError:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {sorted(_MODULES)}") from None
    return importlib.import_module(module)


def _select() -> tuple[str, ModuleType]:
    if os.environ.get("VHDCORE_PUREPYTHON", "").strip().lower() in ("1", "true", "yes"):
        return "python", load_backend("python")
    try:
        return "cython", load_backend("cython")
    except ImportError as exc:
        # Reached by an install built without a working C compiler (setup.py's fallback) or a checkout never built.
        warnings.warn(f"vhdcore: Cython kernels unavailable ({exc}); using the pure-Python twin, which is slower. "
                      "To build them, install a C compiler, then: pip install --no-cache-dir --force-reinstall "
                      "--no-deps vhdcore (in a checkout: make setup)", RuntimeWarning, stacklevel=2)
        return "python", load_backend("python")


BACKEND, _impl = _select()

bitmap_runs = _impl.bitmap_runs
bitmap_count = _impl.bitmap_count
bitmap_set_range = _impl.bitmap_set_range
bitmap_or = _impl.bitmap_or
bitmap_andnot = _impl.bitmap_andnot
is_zero = _impl.is_zero
bytes_equal = _impl.bytes_equal
sector_zero_mask = _impl.sector_zero_mask
merge_block = _impl.merge_block
scan_bat = _impl.scan_bat
count_runs_in_blocks = _impl.count_runs_in_blocks

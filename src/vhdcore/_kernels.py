"""Kernel backend selection: the Cython extension, or its pure-Python twin when VHDCORE_PUREPYTHON=1."""
from __future__ import annotations

import importlib
import os
import types
import warnings

_NAMES = ["bitmap_runs", "bitmap_count", "bitmap_set_range", "bitmap_or", "bitmap_andnot", "is_zero",
          "sector_zero_mask", "merge_block", "scan_bat", "count_runs_in_blocks"]


def load_backend(name: str) -> types.ModuleType:
    return importlib.import_module("vhdcore._coalesce" if name == "cython" else "vhdcore._coalesce_py")


if os.environ.get("VHDCORE_PUREPYTHON", "").lower() in ("1", "true", "yes"):
    _impl = load_backend("python")
    BACKEND = "python"
else:
    try:
        _impl = load_backend("cython")
        BACKEND = "cython"
    except ImportError:
        warnings.warn("vhdcore: Cython kernels not built, using the pure-Python twin", RuntimeWarning)
        _impl = load_backend("python")
        BACKEND = "python"

globals().update({n: getattr(_impl, n) for n in _NAMES})
__all__ = ["BACKEND", "load_backend", *_NAMES]

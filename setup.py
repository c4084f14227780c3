"""Builds the kernels extension; everything else is declared in pyproject.toml.

Three routes, so that an install never fails for want of a tool:
- Cython installed (a checkout): the extension is compiled from ``_coalesce.pyx``;
- no Cython (an sdist ships the generated ``_coalesce.c``): compiled from the C file;
- no working C compiler (or no source at all): no extension; vhdcore runs on the pure-Python twin
  (``vhdcore.BACKEND == "python"``), and the build says so once.
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PYX = "src/vhdcore/_coalesce.pyx"
C_SOURCE = "src/vhdcore/_coalesce.c"
DIRECTIVES = {"boundscheck": False, "wraparound": False, "cdivision": True}

FALLBACK_WARNING = """
WARNING: vhdcore's Cython kernels were not built ({reason}).
         vhdcore is installed anyway and runs on its pure-Python twin (vhdcore.BACKEND == "python"), which is
         correct but several times slower on coalesce, compact and export. To get the compiled kernels, install
         a C compiler (Debian: apt-get install gcc python3-dev), then reinstall past pip's cache of this build:
         pip install --no-cache-dir --force-reinstall --no-deps vhdcore
"""


_warned = []


def _warn_fallback(reason: str) -> None:
    # Once: after a failed compile, an editable install's copy of the missing .so fails too, for the same reason.
    if not _warned:
        _warned.append(reason)
        sys.stderr.write(FALLBACK_WARNING.format(reason=reason))


class OptionalBuildExt(build_ext):
    """build_ext whose failure (no compiler, CC=false, no Python headers) leaves a pure-Python install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # distutils reports a missing compiler in several ways (PlatformError, ExecError)
            _warn_fallback(f"{type(exc).__name__}: {exc}")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            _warn_fallback(f"{type(exc).__name__}: {exc}")


def _extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:
        cythonize = None
    if cythonize is not None and os.path.exists(os.path.join(HERE, PYX)):
        ext = Extension("vhdcore._coalesce", [PYX], extra_compile_args=["-O3"])
        return cythonize([ext], language_level=3, compiler_directives=DIRECTIVES)
    if os.path.exists(os.path.join(HERE, C_SOURCE)):
        return [Extension("vhdcore._coalesce", [C_SOURCE], extra_compile_args=["-O3"])]
    _warn_fallback(f"neither Cython nor the generated {C_SOURCE} is available")
    return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})

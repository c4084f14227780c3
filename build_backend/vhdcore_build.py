"""The PEP 517 backend: setuptools', asking for Cython only where the C source must be generated.

A checkout has only ``_coalesce.pyx`` (the generated ``_coalesce.c`` is not tracked), so building from it needs
Cython. An sdist ships the generated C file, so building from it needs setuptools and a C compiler, and not even
the compiler (setup.py falls back to the pure-Python twin). Asking for Cython there would make an isolated build
fail on a machine that can reach setuptools but not Cython, for nothing. An sdist is recognised by its PKG-INFO.
"""
from __future__ import annotations

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 - every hook not redefined here is setuptools' own

_CYTHON = "Cython>=3.0"


def _needs_cython() -> list[str]:
    return [] if os.path.exists("PKG-INFO") else [_CYTHON]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _needs_cython()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _needs_cython()


def get_requires_for_build_sdist(config_settings=None):
    # The sdist carries the generated C file: setup.py runs cythonize before the file list is made.
    return _setuptools.get_requires_for_build_sdist(config_settings) + _needs_cython()

"""Which optional client library each destination needs, and the one-line error when it is not installed.

The local work (read, coalesce, compact, export with gzip or zstd) needs only the core dependencies. Remote
destinations bring their client library as a pip extra: ``vhdcore[swift]`` (python-swiftclient) and
``vhdcore[s3]`` (boto3). A command that names such a destination checks for its library before it changes
anything, so a missing extra costs nothing but a one-line error naming the extra to install.
"""
from __future__ import annotations

import importlib.util

from .exceptions import MissingDependencyError

__all__ = ["MissingDependencyError", "require_scheme", "install_hint"]

# URL scheme -> (module to import, pip extra that provides it)
SCHEME_CLIENTS = {"swift": ("swiftclient", "swift"), "s3": ("boto3", "s3")}

# top-level module -> what to install; every other vhdcore import is a core dependency
_MODULE_EXTRA = {"swiftclient": "swift", "boto3": "s3", "botocore": "s3"}


def install_hint(module: str) -> str:
    """The pip command that brings ``module`` (a dotted name is reduced to its top-level package)."""
    top = module.split(".", 1)[0]
    extra = _MODULE_EXTRA.get(top)
    if extra is not None:
        return f"pip install 'vhdcore[{extra}]'"
    # A core dependency is missing: the install was partial (--no-deps, a removed package).
    return "pip install --force-reinstall vhdcore"


def require_scheme(scheme: str) -> None:
    """Raise :class:`MissingDependencyError` if the client library of ``swift``/``s3`` URLs is not installed."""
    entry = SCHEME_CLIENTS.get(scheme)
    if entry is None:
        return
    module, extra = entry
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"{scheme}:// needs the {extra!r} extra, which is not installed: pip install 'vhdcore[{extra}]'")

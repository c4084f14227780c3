"""Where delivered bytes go: a local file, OpenStack Swift (as a Static Large Object), or S3 (multipart).

Every destination is a :class:`Sink`: ``write(bytes)`` as the stream is produced, ``close()`` to commit and
get an :class:`UploadResult`, ``abort()`` to leave nothing behind. :func:`open_sink` picks one by URL:

* ``/path/to/file`` or ``file:///path/to/file``: :class:`~vhdcore.upload.local.LocalSink`
* ``swift://container/object/name``: :class:`~vhdcore.upload.swift.SwiftSink`
* ``s3://bucket/key``: :class:`~vhdcore.upload.s3.S3Sink`

:func:`~vhdcore.upload.pipeline.deliver` runs the whole pipeline (compress, digest, store) in one call.

A sink is also a callable (``sink(data)`` is ``sink.write(data)``), so it can be a compressor's output, and a
context manager that commits on a clean exit and aborts on an exception.

Remote failures that survive the retries raise :class:`UploadError` naming the destination, the segment
and what went wrong; OS errors of a local destination (ENOSPC, EACCES) pass through unchanged.
"""
from __future__ import annotations

import dataclasses
import os
import urllib.parse
from typing import Any

from .._extras import require_scheme
from ..exceptions import VHDError

__all__ = ["Sink", "UploadResult", "UploadError", "open_sink", "parse_destination", "deliver", "DeliveryResult"]


class UploadError(VHDError):
    """A remote upload failed after its retries (or a returned etag did not match what we sent).

    ``path`` is the destination URL, ``offset`` the byte offset in the uploaded stream of the failing
    segment (when there is one), ``field``/``value`` what was wrong (e.g. ``etag`` and the etag received).
    """


@dataclasses.dataclass
class UploadResult:
    """What a sink committed.

    ``etag`` is the store's identifier of the whole object (for a Swift SLO: md5 of the concatenated
    segment etags; for S3 multipart: ``md5-of-md5s-N``; for a single PUT or a local file: the md5 of the
    bytes, when known). ``segments`` lists the pieces with their md5 (``path``, ``etag``, ``size_bytes``).
    ``retries`` records every retried attempt as ``(segment index, attempt, reason)``.
    """

    destination: str
    size: int
    etag: str | None = None
    segments: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    retries: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Sink:
    """A destination for a byte stream. Subclasses implement ``write``, ``close`` and ``abort``."""

    #: the destination as a URL or path, for messages
    destination: str = ""
    #: bytes accepted by write() so far
    bytes_written: int = 0
    #: set once close() or abort() finished
    closed: bool = False
    #: what close() returned
    result: UploadResult | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> UploadResult:  # pragma: no cover - abstract
        """Commit: after it returns the whole stream is visible at the destination, atomically."""
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover - abstract
        """Give up: remove whatever was stored so far. Safe to call more than once, or after a failure."""
        raise NotImplementedError

    def __call__(self, data: bytes) -> None:
        self.write(data)

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.closed:
            self.close()


def parse_destination(dest: str | os.PathLike[str]) -> tuple[str, str, str]:
    """``(scheme, container_or_bucket, name)``; for local files ``("file", "", path)``."""
    text = os.fspath(dest)
    if "://" not in text:
        if not text:
            raise ValueError("empty destination")
        return "file", "", text
    parsed = urllib.parse.urlsplit(text)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URL must be local: {text}")
        return "file", "", urllib.parse.unquote(parsed.path)
    if scheme in ("swift", "s3"):
        container = parsed.netloc
        name = urllib.parse.unquote(parsed.path.lstrip("/"))
        if parsed.query or parsed.fragment:
            raise ValueError(f"{scheme} destination takes no query or fragment: {text}")
        if not container or not name:
            raise ValueError(f"{scheme} destination must be {scheme}://{'container' if scheme == 'swift' else 'bucket'}/name: {text}")
        if scheme == "swift" and "/" in container:  # pragma: no cover - urlsplit never puts '/' in netloc
            raise ValueError(f"swift container name cannot contain '/': {text}")
        return scheme, container, name
    raise ValueError(f"unsupported destination scheme {scheme!r} (use a path, file://, swift:// or s3://): {text}")


def open_sink(dest: str | os.PathLike[str], **opts: Any) -> Sink:
    """Open the sink for ``dest`` (see the module docstring); ``opts`` go to the sink's constructor.

    Options every sink takes: ``progress`` (``progress(done, total, **info)``). See each sink for the rest.
    """
    scheme, container, name = parse_destination(dest)
    require_scheme(scheme)
    if scheme == "file":
        from .local import LocalSink

        return LocalSink(name, **opts)
    if scheme == "swift":
        from .swift import SwiftSink

        return SwiftSink(container, name, **opts)
    from .s3 import S3Sink

    return S3Sink(container, name, **opts)


def __getattr__(name: str) -> Any:
    # deliver() pulls in the compressors; load it only when asked for.
    if name in ("deliver", "DeliveryResult"):
        from . import pipeline as _mod

        return getattr(_mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

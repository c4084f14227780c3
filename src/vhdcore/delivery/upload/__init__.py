"""Where delivered bytes go: a local file, OpenStack Swift (as a Static Large Object), or S3 (multipart).

Every destination is a :class:`Sink`: ``write(bytes)`` as the stream is produced, ``close()`` to commit and
get an :class:`UploadResult`, ``abort()`` to leave nothing behind. :func:`open_sink` picks one by URL:

* ``/path/to/file`` or ``file:///path/to/file``: :class:`~vhdcore.delivery.upload.local.LocalSink`
* ``swift://container/object/name``: :class:`~vhdcore.delivery.upload.swift.SwiftSink`
* ``s3://bucket/key``: :class:`~vhdcore.delivery.upload.s3.S3Sink`

:func:`~vhdcore.delivery.upload.pipeline.deliver` runs the whole pipeline (compress, digest, store) in one call.

A sink is also a callable (``sink(data)`` is ``sink.write(data)``), so it can be a compressor's output, and a
context manager that commits on a clean exit and aborts on an exception.

Remote failures that survive the retries raise :class:`UploadError` naming the destination, the segment
and what went wrong; OS errors of a local destination (ENOSPC, EACCES) pass through unchanged.
"""
from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from typing import Any

from ..._extras import require_scheme
from ...exceptions import ObjectNameError, UploadError

__all__ = ["Sink", "UploadResult", "UploadError", "ObjectNameError", "check_object_name", "open_sink",
           "parse_destination", "deliver", "DeliveryResult"]


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


# Object-store names are checked before any request: the HTTP clients normalise ``..`` segments and decode
# ``%2F``, so ``swift://images/../backups/x`` would otherwise reach another container. Limits are the servers'
# own defaults (Swift: 256-byte container, 1024-byte object names; S3: 3-63-byte bucket, 1024-byte key).
MAX_CONTAINER_BYTES = 256
MAX_OBJECT_BYTES = 1024
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def check_object_name(scheme: str, container: str, name: str) -> None:
    """Refuse names whose request could land elsewhere: empty, ``.`` or ``..`` segments, slashes or control
    characters in the container, encoded or literal path tricks, over-long names."""
    kind = "bucket" if scheme == "s3" else "container"
    if not container or container in (".", "..") or "/" in container or "\\" in container:
        raise ObjectNameError(f"invalid {scheme} {kind} name", value=container)
    if any(ord(c) < 0x20 or c == "\x7f" for c in container + name):
        raise ObjectNameError(f"{scheme} names may not hold control characters", value=container + "/" + name)
    if len(container.encode()) > MAX_CONTAINER_BYTES:
        raise ObjectNameError(f"{scheme} {kind} name longer than {MAX_CONTAINER_BYTES} bytes", value=container)
    if scheme == "s3" and (not _S3_BUCKET.fullmatch(container) or ".." in container):
        raise ObjectNameError("invalid S3 bucket name (3-63 characters: a-z, 0-9, '.', '-')", value=container)
    if not name:
        raise ObjectNameError(f"empty {scheme} object name", value=name)
    if len(name.encode()) > MAX_OBJECT_BYTES:
        raise ObjectNameError(f"{scheme} object name longer than {MAX_OBJECT_BYTES} bytes", value=len(name.encode()))
    for seg in name.split("/"):
        if seg in ("", ".", ".."):
            raise ObjectNameError(f"{scheme} object name with an empty, '.' or '..' segment", value=name)


def parse_destination(dest: str | os.PathLike[str]) -> tuple[str, str, str]:
    """``(scheme, container_or_bucket, name)``; for local files ``("file", "", path)``.

    Object-store names are validated here (:func:`check_object_name`), before any request is made.
    """
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
        if parsed.query or parsed.fragment:
            raise ValueError(f"{scheme} destination takes no query or fragment: {text}")
        # An encoded slash or backslash would be one segment here and a separator to the server.
        if re.search(r"%(2f|5c)", text, re.IGNORECASE):
            raise ObjectNameError(f"{scheme} URL with an encoded slash (%2F or %5C)", value=text)
        if "%" in container:
            raise ObjectNameError(f"{scheme} {'bucket' if scheme == 's3' else 'container'} name may not be "
                                  "percent-encoded", value=container)
        raw_name = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
        name = urllib.parse.unquote(raw_name)
        if not container or not name:
            raise ValueError(f"{scheme} destination must be {scheme}://{'container' if scheme == 'swift' else 'bucket'}/name: {text}")
        check_object_name(scheme, container, name)
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

"""Preflight: can this destination take the image? Asked before any long or irreversible work starts.

A job that would change its source (``image --coalesce-in-place``) must not begin unless the delivery can
succeed as far as can be known in advance, and every job should fail in seconds rather than after an hour of
compression. What is checked, per destination:

* a local file: the destination rule (:func:`vhdcore.destination.check_destination`: not a file of the source
  chain, not an existing file unless ``overwrite``, a regular file in an existing directory), the directory
  writable (a real temporary file is created and removed: access() does not know about read-only mounts or
  quotas), and free space for the worst-case output (the package's size plus what a compressor may add to
  incompressible data, plus the manifest);
* Swift: authentication, then the container and the segment container (present, or created when allowed);
* S3: the credentials and the bucket (present, or created when allowed).

The remote checks use the real sinks (same credentials, same clients), so what passes here is what the
upload will use.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable

from ...destination import check_destination
from ...exceptions import DestinationError, NoSpaceError  # noqa: F401 - NoSpaceError re-exported
from . import parse_destination

__all__ = ["preflight", "worst_case_output", "NoSpaceError"]

MiB = 1024 * 1024


def worst_case_output(package_size: int, compression: str, manifest: bool = True, known_zero: int = 0) -> int:
    """The most bytes an export of a ``package_size``-byte package can put on disk.

    Incompressible input grows a little under every compressor: zstd by at most ~1/256 plus its frame header,
    deflate (gzip) by 5 bytes per 64 KiB stored block plus header and trailer. One part in 128 plus 1 MiB
    covers both with room to spare. ``known_zero`` bytes of the package that the allocation map proves zero
    (a fixed or raw package of a sparse disk) shrink at least 1000-fold under both (deflate's limit is ~1032:1),
    so a compressed image of a mostly empty 2 TB disk does not ask for 2 TB. The xxh3 manifest takes under 64
    bytes per 2 MiB of virtual content.
    """
    out = package_size
    if compression != "none":
        zero = min(max(known_zero, 0), package_size)
        out = package_size - zero + zero // 1000
        out += out // 128 + MiB
    if manifest:
        out += (package_size // (2 * MiB) + 1) * 64 + 4096
    return out


def _local(path: str, needed: int, sources: Iterable[str], overwrite: bool, manifest: bool) -> dict[str, Any]:
    sources = list(sources)
    dest = check_destination(path, sources=sources, overwrite=overwrite)
    if manifest:
        from ..export import MANIFEST_SUFFIX

        # the manifest beside the image is ours to replace, but never one of the source's files
        check_destination(dest + MANIFEST_SUFFIX, sources=sources, overwrite=True)
    directory = os.path.dirname(dest)
    try:
        fd, probe = tempfile.mkstemp(prefix=".vhdcore-preflight-", dir=directory)
    except OSError as exc:
        raise DestinationError(f"the directory {directory} is not writable ({exc.strerror})", path=path,
                               field="directory") from exc
    os.close(fd)
    os.unlink(probe)
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    # An existing file (with overwrite) is replaced only once the new one is complete, so its space does
    # not count: the new file is written alongside it first.
    if free < needed:
        raise NoSpaceError(f"the file system of {directory} has {free} bytes free; the image may need up to "
                           f"{needed} bytes", path=path, field="free_space", value=free)
    return {"destination": path, "kind": "file", "free_bytes": free, "needed_bytes": needed}


def preflight(dest: str | os.PathLike[str], *, needed: int, sources: Iterable[str] = (), overwrite: bool = False,
              manifest: bool = True, **sink_options: Any) -> dict[str, Any]:
    """Check that ``dest`` can take an output of up to ``needed`` bytes (see the module docstring).

    Raises :class:`~vhdcore.destination.DestinationError` (local) or
    :class:`~vhdcore.delivery.upload.UploadError` (remote) naming what failed; returns what was checked.
    """
    text = os.fspath(dest)
    scheme, container, name = parse_destination(text)
    if scheme == "file":
        return _local(name, needed, sources, overwrite, manifest)
    opts = {k: v for k, v in sink_options.items() if k not in ("progress", "fsync")}
    if scheme == "swift":
        from .swift import SwiftSink

        sink: Any = SwiftSink(container, name, **opts)
    else:
        from .s3 import S3Sink

        sink = S3Sink(container, name, **opts)
    try:
        sink.preflight()
    finally:
        sink.abort()  # nothing was begun: this only stops the sink's idle worker pool and connections
    return {"destination": text, "kind": scheme, "container": container, "needed_bytes": needed}

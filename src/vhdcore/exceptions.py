"""vhdcore's exception hierarchy.

Every error vhdcore raises about a disk names the file, the byte offset and the field involved, so that a
pipeline log line is enough to find the problem with a hex editor. OS errors (permissions, ENOSPC) pass
through unchanged.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

__all__ = [
    "DestinationError",
    "DestinationExistsError",
    "NoSpaceError",
    "JournalError",
    "UploadError",
    "ObjectNameError",
    "MissingDependencyError",
    "CheckFailedError",
    "JobRecordError",
    "StageTimeout",
    "VHDError",
    "InvalidFormatError",
    "ChecksumError",
    "CorruptImageError",
    "UnsupportedFeatureError",
    "ChainError",
    "ParentNotFoundError",
    "ParentMismatchError",
    "ChainCycleError",
    "UnsafeOperationError",
    "ReadOnlyError",
    "LockError",
    "VerificationError",
]


def _fmt_value(value: Any) -> str:
    if isinstance(value, bytes):
        return repr(value[:32]) + ("..." if len(value) > 32 else "")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value} (0x{value:x})" if value >= 0 else str(value)
    return repr(value)


class VHDError(Exception):
    """Base of all vhdcore errors.

    ``path``, ``offset`` (byte offset in the file), ``field`` and ``value`` are filled in whenever they are
    known; ``str()`` names all of them in one line.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        offset: int | None = None,
        field: str | None = None,
        value: Any = None,
    ) -> None:
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.offset = offset
        self.field = field
        self.value = value
        super().__init__(message)

    def __str__(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        if self.field is not None:
            where.append(f"field {self.field}")
        text = self.message
        if self.field is not None and self.value is not None:
            text += f" (value {_fmt_value(self.value)})"
        return f"{': '.join([', '.join(where)] if where else [])}{': ' if where else ''}{text}"


class InvalidFormatError(VHDError, ValueError):
    """A structure does not follow the VHD format (cookie, version, size, range)."""


class ChecksumError(InvalidFormatError):
    """A footer or dynamic header checksum does not match its contents."""

    def __init__(self, message: str, *, structure: str, expected: int, actual: int, **kw: Any) -> None:
        kw.setdefault("field", "checksum")
        kw.setdefault("value", actual)
        super().__init__(message, **kw)
        self.structure = structure
        self.expected = expected
        self.actual = actual


class CorruptImageError(InvalidFormatError):
    """The structures parse but contradict the file: BAT past EOF, overlapping blocks, truncation."""


class UnsupportedFeatureError(VHDError):
    """A valid file that vhdcore does not handle (split VHD, saved state, VHDX given as VHD)."""


class ChainError(VHDError):
    """Something is wrong with the parent/child relationship of a differencing chain."""


class ParentNotFoundError(ChainError, FileNotFoundError):
    """No candidate from the locators or the parent unicode name exists in the allowed directories."""

    def __init__(self, message: str, *, tried: Sequence[str] = (), **kw: Any) -> None:
        super().__init__(message, **kw)
        self.tried = list(tried)

    def __str__(self) -> str:  # FileNotFoundError would otherwise format errno/filename
        text = VHDError.__str__(self)
        if self.tried:
            text += f" (tried: {', '.join(self.tried)})"
        return text


class ParentMismatchError(ChainError):
    """The parent's unique id is not the one the child recorded: the parent was replaced."""


class ChainCycleError(ChainError):
    """A chain that loops back on itself or is deeper than any sane chain."""


class UnsafeOperationError(ChainError):
    """An operation that would change what another disk sees, or lose data; overridable with force."""


class ReadOnlyError(VHDError):
    """A write was attempted on a disk opened read-only."""


class LockError(VHDError):
    """Another process holds the writer lock on the file."""


class VerificationError(VHDError):
    """Content after an operation differs from the content before it."""


def error_object(exc: BaseException) -> dict[str, Any]:
    """An error as every JSON document reports it (docs/json.md): ``code``, ``message``, ``path``, ``offset``,
    ``field``. ``code`` is the vhdcore exception's class name (``ParentNotFoundError``, ``UploadError``...), an OS
    error's errno name (``ENOENT``, ``ENOSPC``...), or ``InvalidArgument`` for a value that was refused."""
    import errno

    if isinstance(exc, VHDError):
        return {"code": type(exc).__name__, "message": exc.message, "path": exc.path, "offset": exc.offset,
                "field": exc.field}
    if isinstance(exc, OSError) and exc.errno is not None:
        return {"code": errno.errorcode.get(exc.errno, type(exc).__name__), "message": exc.strerror or str(exc),
                "path": exc.filename, "offset": None, "field": None}
    code = "InvalidArgument" if isinstance(exc, ValueError) else type(exc).__name__
    return {"code": code, "message": str(exc), "path": None, "offset": None, "field": None}


# Errors of particular operations and destinations (raised where their module says; defined here so that
# every public error is importable from vhdcore and from this one module).


class DestinationError(VHDError):
    """A destination the command must not write: part of its source, not a regular file, or no directory."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, **kw) -> None:
        kw.setdefault("field", "destination")
        super().__init__(message, path=path, **kw)


class DestinationExistsError(DestinationError, FileExistsError):
    """The destination exists and ``overwrite`` was not given."""

    def __str__(self) -> str:  # FileExistsError would otherwise format errno/filename
        return VHDError.__str__(self)


class NoSpaceError(DestinationError):
    """The destination's file system has less free space than the worst-case output needs."""


class JournalError(UnsafeOperationError):
    """A coalesce journal that does not describe this chain: refused, nothing deleted or written."""


class UploadError(VHDError):
    """A remote upload failed after its retries (or a returned etag did not match what we sent).

    ``path`` is the destination URL, ``offset`` the byte offset in the uploaded stream of the failing
    segment (when there is one), ``field``/``value`` what was wrong (e.g. ``etag`` and the etag received).
    """


class ObjectNameError(VHDError, ValueError):
    """A container, bucket or object name that could reach another object than the one it reads as."""

    def __init__(self, message: str, *, value: Any = None) -> None:
        super().__init__(message, field="object name", value=value)


class MissingDependencyError(VHDError, ImportError):
    """A feature's library is not installed; the message names what to ``pip install``."""


class CheckFailedError(VHDError):
    """The chain has findings severe enough that imaging it would ship a broken disk."""


class JobRecordError(VHDError):
    """A job record that cannot be read, or that describes another job than the one being run."""


class StageTimeout(VHDError):
    """A stage ran past its time limit and stopped at a consistent point; the job should be retried later."""

    retry_later = True

"""The machinery Swift SLO and S3 multipart uploads share: spooled segments, bounded parallel PUTs, retries.

The stream is cut into segments as it arrives. Each segment is spooled (:class:`Spool`: the first
``spool_memory`` bytes kept in memory as the very ``bytes`` objects the compressor produced, no copy; the
rest in an unnamed temporary file on local disk), so a failed PUT can be sent again without holding
gigabytes in RAM or asking the producer to go back. A sealed segment
is handed to a pool of ``concurrency`` upload threads; the writer blocks once ``concurrency`` segments wait
or travel, so at most ``concurrency + 1`` spools exist at a time.

Each segment's md5 is computed locally (in its upload thread, off the writer's path), sent with the PUT so
the store can check what it received, and compared with the etag the store returns; a mismatch, a
connection error or a 5xx/408/429 is retried with exponential backoff up to ``attempts`` times, then the
upload fails with :class:`~vhdcore.delivery.upload.UploadError`. On any failure, and on ``abort()``, every segment
that may have reached the store is deleted, unless the upload is resumable.

Resumable (``resume_state``, an :class:`~vhdcore.delivery.upload.resume.UploadState`): each stored segment is recorded
as it is stored; a segment the state records with the md5 of the bytes just regenerated, and which the store
still holds with that etag and size (:meth:`SegmentedSink._stored_etag`), is not sent again; a failure keeps
the stored segments for the next attempt; the commit removes the state.
"""
from __future__ import annotations

import bisect
import hashlib
import logging
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import IO, Any, Callable, TypeVar

from ...progress import ProgressCallback, as_progress
from . import Sink, UploadError, UploadResult

__all__ = ["SegmentedSink", "Segment", "Spool", "EtagMismatch"]

log = logging.getLogger("vhdcore.upload")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_READ_PIECE = 1 * MiB
_REPORT_EVERY = 1 * MiB
T = TypeVar("T")


class EtagMismatch(Exception):
    """The store returned an etag other than the md5 we computed for the bytes we sent."""

    def __init__(self, expected: str, received: str | None) -> None:
        super().__init__(f"etag mismatch: sent md5 {expected}, store returned {received!r}")
        self.expected = expected
        self.received = received


class _Aborted(Exception):
    """Internal: the sink is being aborted; stop retrying."""


def _seek_position(pos: int, size: int, offset: int, whence: int) -> int:
    """Where ``seek(offset, whence)`` lands in a body of ``size`` bytes read up to ``pos`` (clamped to it)."""
    if whence == 1:
        offset += pos
    elif whence == 2:
        offset += size
    return max(0, min(offset, size))


class Spool:
    """A segment's bytes, written once, then read as often as PUT attempts need.

    Pieces given as ``bytes`` are kept by reference (compressors hand over immutable ``bytes``; copying them
    into a BytesIO, then again into a rolled-over file, cost more CPU than the upload itself); other buffers
    are copied. Once ``memory`` bytes are held, further pieces go to an unnamed temporary file in ``dir``.
    """

    def __init__(self, memory: int, dir: str | None = None) -> None:
        self._memory = memory
        self._dir = dir
        self._pieces: list[bytes] = []
        self._starts: list[int] = []  # stream offset of each piece
        self._mem = 0  # bytes held in memory: the stream's [0, _mem)
        self._file: IO[bytes] | None = None  # the stream's [_mem, size)
        self.size = 0
        self._pos = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = memoryview(data).nbytes
        if not n:
            return 0
        if self._file is None and self._mem + n <= self._memory:
            self._starts.append(self._mem)
            self._pieces.append(data if type(data) is bytes else bytes(data))
            self._mem += n
        else:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self._dir, prefix="vhdcore-seg-")
            self._file.write(data)
        self.size += n
        return n

    def md5(self) -> str:
        h = hashlib.md5()
        for piece in self._pieces:
            h.update(piece)
        if self._file is not None:
            self._file.seek(0)
            while True:
                piece = self._file.read(_READ_PIECE)
                if not piece:
                    break
                h.update(piece)
        return h.hexdigest()

    def read(self, n: int = -1) -> bytes:
        left = self.size - self._pos
        if n is None or n < 0 or n > left:
            n = left
        parts: list[bytes] = []
        while n > 0:
            if self._pos < self._mem:
                i = bisect.bisect_right(self._starts, self._pos) - 1
                piece = self._pieces[i]
                off = self._pos - self._starts[i]
                k = min(n, len(piece) - off)
                parts.append(piece if off == 0 and k == len(piece) else piece[off : off + k])
            else:
                assert self._file is not None
                self._file.seek(self._pos - self._mem)
                got = self._file.read(n)
                if not got:  # pragma: no cover - our own temporary file cannot shrink
                    raise OSError(f"segment spool ended early at {self._pos} of {self.size} bytes")
                parts.append(got)
                k = len(got)
            self._pos += k
            n -= k
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = _seek_position(self._pos, self.size, offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self.closed = True
        self._pieces = []
        self._starts = []
        if self._file is not None:
            self._file.close()
            self._file = None


class Segment:
    """One piece of the stream: ``index`` (0-based), ``offset`` in the stream, ``size``, spool and md5."""

    __slots__ = ("index", "offset", "size", "spool", "md5", "etag", "name", "attempted", "extra")

    def __init__(self, index: int, offset: int, spool: Spool | None, size: int) -> None:
        self.index = index
        self.offset = offset
        self.size = size
        self.spool = spool
        self.md5: str | None = None
        self.etag: str | None = None
        self.name: str = ""
        self.attempted = False  # a PUT was started, so the store may hold it
        self.extra: dict[str, Any] = {}

    def compute_md5(self) -> str:
        assert self.spool is not None
        self.md5 = self.spool.md5()
        return self.md5

    def release(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


class CountingReader:
    """A read-only view of a spool that reports bytes read (once per position, so rewinds don't recount).

    HTTP clients read request bodies in 16 KiB blocks; reporting is batched to ``_REPORT_EVERY`` bytes so
    that progress bookkeeping does not cost more than the bytes it counts.
    """

    def __init__(self, spool: Spool, size: int, on_read: Callable[[int], None]) -> None:
        self._f = spool
        self._size = size
        self._on_read = on_read
        self._pos = 0
        self.reported = 0
        spool.seek(0)

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._pos
        if n is None or n < 0 or n > left:
            n = left
        data = self._f.read(n) if n else b""
        self._pos += len(data)
        if self._pos - self.reported >= _REPORT_EVERY or (self._pos == self._size and self._pos > self.reported):
            self._on_read(self._pos - self.reported)
            self.reported = self._pos
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = _seek_position(self._pos, self._size, offset, whence)
        self._f.seek(self._pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._size


class SegmentedSink(Sink):
    """Base of the segmented remote sinks; see the module docstring. Subclasses implement the hooks."""

    kind = "segmented"
    #: store limits, checked against the options
    MIN_SEGMENT = 64 * KiB
    MAX_SEGMENT = 5 * GiB
    MAX_SEGMENTS = 1000

    def __init__(
        self,
        destination: str,
        *,
        segment_size: int,
        concurrency: int = 2,
        attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 16.0,
        spool_memory: int = 64 * MiB,
        spool_dir: str | None = None,
        single_put_below: int | None = None,
        max_segments: int | None = None,
        expected_size: int | None = None,
        progress: ProgressCallback | None = None,
        resume_state: Any = None,
    ) -> None:
        if not self.MIN_SEGMENT <= segment_size <= self.MAX_SEGMENT:
            raise ValueError(
                f"segment_size must be between {self.MIN_SEGMENT} and {self.MAX_SEGMENT} bytes, not {segment_size}"
            )
        if concurrency < 1 or concurrency > 64:
            raise ValueError(f"concurrency must be 1-64, not {concurrency}")
        if attempts < 1 or attempts > 100:
            raise ValueError(f"attempts must be 1-100, not {attempts}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("backoff must be >= 0")
        self.destination = destination
        self.max_segments = self.MAX_SEGMENTS if max_segments is None else max_segments
        self.warnings: list[str] = []
        if expected_size is not None and -(-expected_size // segment_size) > self.max_segments:
            # Found out now rather than after max_segments segments have gone up: grow the segments so that
            # the stream fits (whole MiB), or refuse before anything is sent.
            need = -(-expected_size // self.max_segments)
            need = -(-need // MiB) * MiB
            if need > self.MAX_SEGMENT:
                raise UploadError(
                    f"a stream of up to {expected_size} bytes needs more than {self.max_segments} segments even "
                    f"of the largest size this store takes ({self.MAX_SEGMENT} bytes)",
                    path=destination, field="segment_size", value=segment_size,
                )
            self.warnings.append(f"{destination}: segment size raised from {segment_size} to {need} bytes so that "
                                 f"up to {expected_size} bytes fit in {self.max_segments} segments")
            log.warning("%s", self.warnings[-1])
            segment_size = need
        self.segment_size = segment_size
        self.concurrency = concurrency
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.spool_memory = spool_memory
        self.spool_dir = spool_dir
        # Streams shorter than this (by default: shorter than one segment) go up as one plain PUT.
        self.single_put_below = segment_size if single_put_below is None else single_put_below
        self.progress = as_progress(progress)
        self.bytes_written = 0
        self.bytes_sent = 0
        self.closed = False
        self.result: UploadResult | None = None
        self.retries: list[tuple[int, int, str]] = []
        self.segments: list[Segment] = []
        self.resume_state = resume_state
        self.segments_reused = 0  # segments an earlier attempt stored, verified and not sent again
        self._spool: Spool | None = None
        self._spool_len = 0
        self._begun = False
        self._closing = False
        self._aborting = threading.Event()
        self._error: BaseException | None = None
        self._inflight: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"vhdcore-{self.kind}")

    # ------------------------------------------------------------------ hooks
    def _begin(self) -> None:
        """Before the first segment PUT (in the writer's thread): create containers / the multipart upload."""

    def _segment_name(self, seg: Segment) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _segment_path(self, seg: Segment) -> str:
        """How the result names a segment (default: its name)."""
        return seg.name

    def _put_segment(self, seg: Segment, body: CountingReader) -> str:  # pragma: no cover - abstract
        """PUT one segment with ``seg.md5`` as its expected etag; return the etag the store reports."""
        raise NotImplementedError

    def _put_single(self, body: CountingReader, size: int, md5: str) -> str:  # pragma: no cover - abstract
        """PUT the whole (short) stream as one object; return the etag the store reports."""
        raise NotImplementedError

    def _complete(self, segments: list[Segment]) -> tuple[str | None, dict[str, Any]]:  # pragma: no cover
        """Commit the segments (manifest / complete multipart); return (object etag, extra result fields)."""
        raise NotImplementedError

    def _cleanup(self, segments: list[Segment]) -> None:  # pragma: no cover - abstract
        """Remove the given (possibly) uploaded segments and anything else this upload left behind."""
        raise NotImplementedError

    def _stored_etag(self, seg: Segment) -> str | None:
        """Resuming: the etag of the stored segment ``seg.name`` if the store holds it at ``seg.size`` bytes."""
        return None

    def _is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, (EtagMismatch, ConnectionError, TimeoutError, OSError))

    def _describe(self, exc: BaseException) -> tuple[str, Any]:
        """(field, value) naming what failed, for UploadError."""
        if isinstance(exc, EtagMismatch):
            return "etag", exc.received
        return "request", f"{type(exc).__name__}: {exc}"

    # ------------------------------------------------------------------ writer side
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed or self._closing:
            raise ValueError(f"sink is closed: {self.destination}")
        self._raise_if_failed()
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        pos = 0
        while pos < n:
            if self._spool is None:
                self._spool = Spool(min(self.spool_memory, self.segment_size), self.spool_dir)
                self._spool_len = 0
            take = min(self.segment_size - self._spool_len, n - pos)
            # A whole bytes object is kept as it is (no copy); a part of one is copied by the spool.
            self._spool.write(data if take == n and isinstance(data, bytes) else mv[pos : pos + take])
            self._spool_len += take
            pos += take
            if self._spool_len == self.segment_size:
                self._seal()
        self.bytes_written += n
        self._report()

    def _seal(self) -> None:
        """Hand the current spool to the upload pool; block while ``concurrency`` segments are pending."""
        assert self._spool is not None
        if len(self.segments) >= self.max_segments:
            err = UploadError(
                f"stream needs more than {self.max_segments} segments of {self.segment_size} bytes; "
                "use a larger segment size",
                path=self.destination, offset=self.bytes_written, field="segment_size", value=self.segment_size,
            )
            self._fail(err)
        if not self._begun:
            try:
                self._begin()
            except Exception as exc:
                self._fail(self._as_upload_error(exc, "starting the upload", None))
            self._begun = True
        offset = sum(s.size for s in self.segments)
        seg = Segment(len(self.segments), offset, self._spool, self._spool_len)
        seg.name = self._segment_name(seg)
        self.segments.append(seg)
        self._spool = None
        self._spool_len = 0
        self._inflight.add(self._pool.submit(self._upload_segment, seg))
        while len(self._inflight) > self.concurrency:
            self._wait_some()
        self._reap()

    def _wait_some(self, all_of_them: bool = False) -> None:
        done, _ = wait(self._inflight, return_when="ALL_COMPLETED" if all_of_them else FIRST_COMPLETED)
        self._settle(done)

    def _reap(self) -> None:
        self._settle({f for f in self._inflight if f.done()})

    def _settle(self, done: set) -> None:
        """Take finished uploads out of the in-flight set, keep the first failure, and raise it."""
        self._inflight -= done
        for fut in done:
            exc = fut.exception()
            if exc is not None and self._error is None:
                self._error = exc
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            self._fail(self._error)

    def _fail(self, exc: BaseException) -> None:
        """Abort (removing what was uploaded) and raise ``exc``."""
        self.abort()
        raise exc

    def _report(self) -> None:
        with self._lock:
            sent = self.bytes_sent
        total = self.bytes_written if self._closing else None
        self.progress(sent, total, state="uploading", written=self.bytes_written, destination=self.destination)

    def _on_sent(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n
        self._report()

    # ------------------------------------------------------------------ upload side
    def _with_retries(self, what: str, seg: Segment | None, attempt_fn: Callable[[], T]) -> T:
        index = seg.index if seg is not None else -1
        for attempt in range(1, self.attempts + 1):
            if self._aborting.is_set():
                raise _Aborted()
            try:
                return attempt_fn()
            except _Aborted:
                raise
            except Exception as exc:
                if not self._is_retryable(exc) or attempt == self.attempts or self._aborting.is_set():
                    raise self._as_upload_error(exc, what, seg, attempt) from exc
                reason = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.retries.append((index, attempt, reason))
                delay = min(self.backoff * (2 ** (attempt - 1)), self.max_backoff)
                log.warning("%s: %s failed (attempt %d/%d), retrying in %.2fs: %s",
                            self.destination, what, attempt, self.attempts, delay, reason)
                if self._aborting.wait(delay):
                    raise _Aborted() from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _as_upload_error(self, exc: BaseException, what: str, seg: Segment | None, attempt: int = 1) -> UploadError:
        if isinstance(exc, UploadError):
            return exc
        field, value = self._describe(exc)
        tries = f" after {attempt} attempt{'s' if attempt != 1 else ''}" if attempt > 1 else ""
        return UploadError(
            f"{what} failed{tries}: {exc}",
            path=self.destination, offset=seg.offset if seg is not None else None, field=field, value=value,
        )

    def _send(self, seg: Segment, put: Callable[[CountingReader], str]) -> str:
        """One attempt: PUT the spool through a counting reader, check the etag; undo progress on failure."""
        assert seg.spool is not None and seg.md5 is not None
        body = CountingReader(seg.spool, seg.size, self._on_sent)
        try:
            etag = put(body)
        except BaseException:
            self._on_sent(-body.reported)
            raise
        if (etag or "").strip('"').lower() != seg.md5:
            self._on_sent(-body.reported)
            raise EtagMismatch(seg.md5, etag)
        return seg.md5

    def _upload_segment(self, seg: Segment) -> None:
        if self._aborting.is_set():
            raise _Aborted()
        seg.compute_md5()
        state = self.resume_state
        try:
            if state is not None and seg.md5 is not None and state.recorded(seg.index, seg.name, seg.size, seg.md5):
                # Stored by an earlier attempt: reuse it when the store still holds these very bytes.
                stored = self._with_retries(f"checking stored segment {seg.index} ({seg.name})", seg,
                                            lambda: self._stored_etag(seg))
                if stored is not None and stored.strip('"').lower() == seg.md5:
                    seg.etag = seg.md5
                    with self._lock:
                        self.segments_reused += 1
                    self._on_sent(seg.size)
                    return

            def attempt() -> str:
                seg.attempted = True
                return self._send(seg, lambda body: self._put_segment(seg, body))

            seg.etag = self._with_retries(f"PUT of segment {seg.index} ({seg.name})", seg, attempt)
            if state is not None and seg.md5 is not None:
                state.stored(seg.index, seg.name, seg.size, seg.md5)
        finally:
            seg.release()

    # ------------------------------------------------------------------ commit / abort
    def close(self) -> UploadResult:
        if self.closed:
            if self.result is None:
                raise ValueError(f"upload was aborted: {self.destination}")
            return self.result
        self._raise_if_failed()
        self._closing = True
        try:
            if not self.segments and self._spool_len < self.single_put_below:
                etag, extra, segs = self._close_single(), {}, []
            else:
                if self._spool is not None and self._spool_len:
                    self._seal()
                elif self._spool is not None:
                    self._spool.close()
                    self._spool = None
                while self._inflight:
                    self._wait_some(all_of_them=True)
                etag, extra = self._complete(self.segments)
                segs = [
                    {"path": self._segment_path(s), "etag": s.etag, "size_bytes": s.size, **s.extra}
                    for s in self.segments
                ]
        except _Aborted:
            raise self._as_upload_error(RuntimeError("aborted"), "upload", None)
        except BaseException as exc:
            if not self.closed:
                self.abort()
            if isinstance(exc, Exception) and not isinstance(exc, (UploadError, ValueError)):
                raise self._as_upload_error(exc, "commit", None) from exc
            raise
        self._pool.shutdown(wait=True)
        self.closed = True
        if self.resume_state is not None:
            self.resume_state.remove()
            extra = {**extra, "segments_reused": self.segments_reused}
        self.result = UploadResult(
            destination=self.destination,
            size=self.bytes_written,
            etag=etag,
            segments=segs,
            retries=list(self.retries),
            elapsed=time.monotonic() - self._t0,
            extra={**extra, "warnings": list(self.warnings)} if self.warnings else extra,
        )
        self._report()
        return self.result

    def _close_single(self) -> str:
        spool = self._spool
        if spool is None:
            spool = Spool(0, self.spool_dir)
        seg = Segment(-1, 0, spool, self._spool_len)
        self._spool = None
        seg.compute_md5()
        try:
            return self._with_retries(
                "PUT of the object", seg,
                lambda: self._send(seg, lambda body: self._put_single(body, seg.size, seg.md5 or "")),
            )
        finally:
            seg.release()

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._aborting.set()
        for fut in self._inflight:
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._inflight.clear()
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        for seg in self.segments:
            seg.release()
        # A resumable upload keeps its stored segments (the state records them) for the next attempt.
        keep = self.resume_state is not None
        try:
            self._cleanup([] if keep else [s for s in self.segments if s.attempted])
        except Exception as exc:  # cleanup is best effort; the original error matters more
            log.warning("%s: cleanup after abort failed: %s", self.destination, exc)

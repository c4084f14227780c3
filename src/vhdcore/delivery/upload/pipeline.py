"""The delivery pipeline in one call: bytes -> compressor -> (digest threads, sink) -> committed object.

    result = deliver(chunks, "swift://images/vm-1.vhd.zst", compression="zstd", segment_size=256 * MiB)
    result.digests["md5"], result.upload.etag, result.size

``chunks`` is any iterable of byte buffers (a packaging generator) or a readable binary file object. The
pipeline owns the failure handling: if the producer, the compressor or the sink fails, the sink is aborted
(temporary file or uploaded segments removed), the compressor's threads and the digest threads are
stopped, and the original exception propagates.
"""
from __future__ import annotations

import dataclasses
import time
from typing import IO, Any, Iterable, Sequence

from ..compress import broadcast, open_compressor
from ..digests import StreamDigests
from ...progress import ProgressCallback, as_progress
from . import UploadResult, open_sink

__all__ = ["deliver", "DeliveryResult"]

MiB = 1024 * 1024


@dataclasses.dataclass
class DeliveryResult:
    """``size``: delivered (compressed) bytes; ``input_size``: bytes produced; ``digests``: of the delivered bytes."""

    destination: str
    compression: str
    level: int | None
    input_size: int
    size: int
    digests: dict[str, str]
    upload: UploadResult
    elapsed: float

    @property
    def ratio(self) -> float:
        return self.input_size / self.size if self.size else 0.0

    def glance_properties(self, os_hash_algo: str = "sha512") -> dict[str, Any]:
        """What Glance records for the image data: checksum (md5), os_hash_algo/value, size."""
        return {
            "checksum": self.digests["md5"],
            "os_hash_algo": os_hash_algo,
            "os_hash_value": self.digests[os_hash_algo],
            "size": self.size,
        }


def _pieces(source: Iterable[Any] | IO[bytes], read_size: int) -> Iterable[Any]:
    read = getattr(source, "readinto", None)
    if read is not None:
        buf = bytearray(read_size)
        view = memoryview(buf)
        while True:
            n = read(view)
            if not n:
                return
            yield view[:n]
        return
    read = getattr(source, "read", None)
    if read is not None:
        while True:
            data = read(read_size)
            if not data:
                return
            yield data
        return
    yield from source  # type: ignore[misc]


def deliver(
    source: Iterable[Any] | IO[bytes],
    dest: str,
    *,
    compression: str = "zstd",
    level: int | None = None,
    threads: int = 2,
    compressor_options: dict[str, Any] | None = None,
    digests: Sequence[str] = ("md5", "sha256", "sha512"),
    input_size: int | None = None,
    progress: ProgressCallback | None = None,
    read_size: int = 4 * MiB,
    sink_progress: ProgressCallback | None = None,
    upload_limiter: Any = None,
    **sink_options: Any,
) -> DeliveryResult:
    """Compress ``source`` into ``dest`` (path, ``swift://``, ``s3://``), hashing what is delivered.

    ``input_size`` (when known) gives progress a total and lets zstd record the content size.
    ``progress`` receives input bytes consumed (state ``saving`` for files, ``uploading`` for remote
    destinations); ``sink_options`` go to :func:`open_sink` (e.g. ``segment_size``, ``concurrency``), and
    ``sink_progress`` becomes the sink's own ``progress`` (bytes written locally or acknowledged by the store).
    ``upload_limiter`` (a token bucket) is paid for every byte handed to the sink: ``--max-upload-rate``.
    """
    t0 = time.monotonic()
    report = as_progress(progress)
    remote = "://" in dest and not dest.startswith("file://")
    state = "uploading" if remote else "saving"
    copts = dict(compressor_options or {})
    if compression in ("zstd", "zst") and input_size is not None:
        copts.setdefault("size_hint", input_size)

    if sink_progress is not None:
        sink_options["progress"] = sink_progress
    if remote and input_size is not None:
        # The most the compressor can emit for input_size bytes (zstd's and deflate's bounds are far below
        # 1/128 extra): lets a segmented sink size its segments before the first one goes up.
        sink_options.setdefault("expected_size", input_size if compression in ("none", "raw", None)
                                else input_size + input_size // 128 + MiB)
    sink = open_sink(dest, **sink_options)
    hasher = StreamDigests(digests) if digests else None
    comp = None
    done = 0
    try:
        out: Any = sink
        if upload_limiter is not None:
            def out(data: Any) -> None:  # the compressor's thread waits here: back-pressure up to the reader
                upload_limiter.consume(memoryview(data).nbytes)
                sink.write(data)
        outputs = (hasher, out) if hasher is not None else (out,)
        comp = open_compressor(compression, broadcast(*outputs), level=level, threads=threads, **copts)
        report(0, input_size, state=state, destination=dest)
        for piece in _pieces(source, read_size):
            comp.write(piece)
            done += len(piece) if not isinstance(piece, memoryview) else piece.nbytes
            report(done, input_size, state=state, destination=dest, delivered=comp.bytes_out)
        comp.close()
        upload = sink.close()
    except BaseException:
        if comp is not None:
            comp.abort()
        sink.abort()
        if hasher is not None:
            try:
                hasher.hexdigests()  # stops its threads
            except Exception:
                pass
        raise
    result = DeliveryResult(
        destination=dest,
        compression=comp.name,
        level=getattr(comp, "level", None),
        input_size=done,
        size=upload.size,
        digests=hasher.hexdigests() if hasher is not None else {},
        upload=upload,
        elapsed=time.monotonic() - t0,
    )
    report(done, done, state=state, destination=dest, delivered=result.size)
    return result

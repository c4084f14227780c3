"""Streaming compressors that use both cores: gzip (via ISA-L), zstd (via zstandard), or none.

All share one shape: ``write(chunk)`` as many times as needed, then ``close()``; compressed bytes go to the
output given at construction (a callable taking ``bytes`` or an object with ``write``) in stream order, one
call at a time (zstd and none call it from the thread that called ``write``/``close``; gzip from a thread of
its own, see :class:`_ChunkPipeline`; an exception the output raises comes back from the next call). The
output always receives immutable ``bytes`` objects that it may keep (a digest thread or an upload spool
holds on to them), and ``write`` copies what it keeps, so the caller may reuse its buffer as soon as
``write`` returns.

gzip: one gzip member made pigz-style. The input is cut into fixed-size chunks; each chunk is compressed
as raw deflate by a worker thread (ISA-L releases the GIL), primed with the previous chunk's last 32 KiB as
dictionary and ended with a sync flush so the pieces concatenate into one deflate stream; the crc32 of each
chunk is computed by the worker too and joined with ``crc32_combine``. A final empty block and the trailer
close the member. We measured this against the simpler "one complete gzip member per chunk" on 256 MiB of
disk-like data: same throughput (1.38-1.47 GB/s on 2 threads at level 1) and ratio within 0.1 %, so we
keep the single member: ``gzip -l`` and decoders that stop after the first member both see the whole file.

zstd: ``zstandard`` with ``threads=`` (its worker pool runs without the GIL). Long-distance matching is off
by default: on disk-like data it gained 2 % of size for 40 % less speed (and ~100 MiB more memory). When on,
it keeps a 128 MiB window (``window_log`` 27), the largest ``zstd -d`` accepts without ``--long``/``--memory``.

Level defaults (from docs machine-facts figures on this 2-core class of machine, 1 GiB of disk-like data):

* zstd **3**: ~1 070 MB/s on 2 threads at ratio 2.95, versus level 1 at ~1 550 MB/s and ratio 2.73. The
  output goes to durable local storage (~1.2-1.4 GB/s with sync) or to object storage (~200-250 MB/s into
  loopback Swift), so level 3 keeps pace with the slower of those while shrinking the upload by 8 %.
* gzip **1** (ISA-L levels run 0-3; the command line's ``--level`` takes gzip's 1-9, see :func:`isal_level`): ~1 900 MB/s on 2 threads at ratio 2.61; level 2 gains under 1 % of
  size for ~6 % more time, level 3 gains 1.5 % at half the speed. gzip is the compatibility format (Glance
  and ``tar -z`` readers); whoever wants ratio picks zstd.

Measured by benchmarks/bench_compress.py on 256 MiB of disk-like content, same run, 2 cores: zstd-3 731 MB/s
(ratio 2.89) vs the ``zstd -3 -T2`` CLI 660 MB/s (2.87); gzip ISA-L level 1 1 263 MB/s (2.67) vs ``pigz -1 -p2``
236 MB/s (2.71) and ``pigz -6 -p2`` 114 MB/s (2.87).

Memory is bounded: at most ``max_inflight`` chunks (default ``4 * threads``) are queued, being compressed
or being emitted; ``write`` waits for a slot when the bound is reached.
"""
from __future__ import annotations

import queue
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Union

__all__ = [
    "Compressor",
    "GzipCompressor",
    "ZstdCompressor",
    "NullCompressor",
    "open_compressor",
    "broadcast",
    "COMPRESSIONS",
    "DEFAULT_LEVELS",
    "isal_level",
    "EXTENSIONS",
]

KiB = 1024
MiB = 1024 * KiB

COMPRESSIONS = ("gzip", "zstd", "none")
DEFAULT_LEVELS = {"gzip": 1, "zstd": 3, "none": 0}
EXTENSIONS = {"gzip": ".gz", "zstd": ".zst", "none": ""}

# Deflate looks back at most 32 KiB, so that is all the priming dictionary a chunk can use.
_DEFLATE_WINDOW = 32 * KiB
# An empty final deflate block with fixed Huffman codes: BFINAL=1, BTYPE=01, end-of-block code.
_FINAL_EMPTY_BLOCK = b"\x03\x00"
# Long-distance matching window: 2**27 = 128 MiB is zstd's default decoder limit.
_ZSTD_LONG_WINDOW_LOG = 27
# Tells the emitter thread that no more chunks come.
_END = object()

Output = Union[Callable[[bytes], Any], Any]


def _output_callable(output: Output) -> Callable[[bytes], Any]:
    if callable(output) and not hasattr(output, "write"):
        return output
    write = getattr(output, "write", None)
    if write is None:
        raise TypeError(f"output must be a callable or have a write() method, not {type(output).__name__}")
    return write


class Compressor:
    """Base of the streaming compressors: ``write(chunk)``, ``close()``, ``abort()``.

    ``bytes_in``/``bytes_out`` count what went in and what has been handed to the output so far.
    Usable as a context manager: a clean exit closes, an exception aborts.
    """

    name = "none"
    extension = ""

    def __init__(self, output: Output) -> None:
        self._emit_fn = _output_callable(output)
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False

    def _emit(self, data: bytes) -> None:
        if data:
            self.bytes_out += len(data)
            self._emit_fn(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def abort(self) -> None:
        """Stop without finishing the stream; the output has received an incomplete stream."""
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"{self.name} compressor is closed")

    def __enter__(self) -> "Compressor":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class NullCompressor(Compressor):
    """Passes the bytes through unchanged (``compression="none"``)."""

    name = "none"
    extension = ""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n:
            self.bytes_in += n
            self._emit(bytes(data) if not isinstance(data, bytes) else data)

    def close(self) -> None:
        self.closed = True


def _deflate_chunk(level: int, data: bytes, zdict: bytes | None) -> tuple[bytes, int]:
    """Worker: raw deflate of one chunk ending in a sync flush (byte aligned, not final), and its crc32."""
    from isal import isal_zlib

    if zdict:
        cobj = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15, zdict=zdict)
    else:
        cobj = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
    out = cobj.compress(data) + cobj.flush(isal_zlib.Z_SYNC_FLUSH)
    return out, isal_zlib.crc32(data)


class _ChunkPipeline(Compressor):
    """Cuts the input into fixed chunks, compresses them on a bounded thread pool, emits results in order.

    The caller's thread only cuts and submits; an emitter thread of our own waits for each chunk in turn and
    hands its output on (digests, sink), so the caller goes on reading while the sink writes, and a sink that
    stalls (an upload waiting for a free PUT slot) leaves ``max_inflight`` chunks of work for the workers. On a
    local file the gain was small (export of 1.56 GiB: 2.70 s -> 2.63 s, 2 cores). Errors raised by the output
    are re-raised in the caller's thread at its next call.
    """

    def __init__(self, output: Output, threads: int, chunk_size: int, max_inflight: int | None) -> None:
        super().__init__(output)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        if chunk_size < 64 * KiB or chunk_size > 64 * MiB:
            raise ValueError(f"chunk_size must be between 64 KiB and 64 MiB, not {chunk_size}")
        self.threads = threads
        self.chunk_size = chunk_size
        self.max_inflight = max_inflight if max_inflight is not None else 4 * threads
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, not {self.max_inflight}")
        self._pending = bytearray()
        # One slot per chunk submitted and not yet emitted: write() waits for a slot, which bounds memory.
        self._slots = threading.Semaphore(self.max_inflight)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"vhdcore-{self.name}")
        self._emitter = threading.Thread(target=self._emit_loop, name=f"vhdcore-{self.name}-emit", daemon=True)
        self._emitter.start()

    # -- subclass hooks
    def _submit(self, chunk: bytes) -> Future[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _collect(self, result: Any, length: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish(self) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- pipeline
    def _emit_loop(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is _END:
                return
            fut, length = item
            try:
                if self._error is not None or self._stopping.is_set():
                    fut.cancel()
                else:
                    self._emit(self._collect(fut.result(), length))
            except BaseException as exc:
                self._error = exc
            finally:
                self._slots.release()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _dispatch(self, chunk: bytes) -> None:
        self._raise_pending_error()
        self._slots.acquire()
        self._queue.put((self._submit(chunk), len(chunk)))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        self._raise_pending_error()
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        if not n:
            return
        self.bytes_in += n
        cs = self.chunk_size
        pos = 0
        if self._pending:
            pos = min(cs - len(self._pending), n)
            self._pending += mv[:pos]
            if len(self._pending) < cs:
                return
            chunk = bytes(self._pending)
            self._pending.clear()
            self._dispatch(chunk)
        while n - pos >= cs:
            self._dispatch(bytes(mv[pos : pos + cs]))
            pos += cs
        if pos < n:
            self._pending += mv[pos:]

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._pending:
                chunk = bytes(self._pending)
                self._pending.clear()
                self._dispatch(chunk)
            self._queue.put(_END)
            self._emitter.join()
            self._raise_pending_error()
            self._emit(self._finish())
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self._pool.shutdown(wait=True)

    def abort(self) -> None:
        self.closed = True
        self._stopping.set()
        self._pending.clear()
        # The emitter cancels whatever is still queued once it sees _stopping, then meets the end marker.
        if self._emitter.is_alive():
            self._queue.put(_END)
            self._emitter.join()
        self._pool.shutdown(wait=True, cancel_futures=True)


class GzipCompressor(_ChunkPipeline):
    """One gzip member (RFC 1952) compressed in parallel chunks with ISA-L; see the module docstring."""

    name = "gzip"
    extension = ".gz"

    def __init__(
        self,
        output: Output,
        level: int = DEFAULT_LEVELS["gzip"],
        threads: int = 2,
        chunk_size: int = 4 * MiB,
        max_inflight: int | None = None,
        mtime: int = 0,
    ) -> None:
        from isal import isal_zlib

        if not 0 <= level <= 3:
            raise ValueError(f"gzip level must be an ISA-L level 0-3, not {level}")
        super().__init__(output, threads, chunk_size, max_inflight)
        self._crc32_combine = isal_zlib.crc32_combine
        self.level = level
        self._crc = 0
        self._size = 0
        self._prev_tail: bytes | None = None
        # mtime 0 = "not available": identical input gives identical output, which keeps digests reproducible.
        # XFL 4 = fastest algorithm (levels 0-1), 0 otherwise; OS 3 = Unix.
        xfl = 4 if level <= 1 else 0
        self._emit(b"\x1f\x8b\x08\x00" + struct.pack("<I", mtime & 0xFFFFFFFF) + bytes((xfl, 3)))

    def _submit(self, chunk: bytes) -> Future[Any]:
        zdict = self._prev_tail
        self._prev_tail = chunk[-_DEFLATE_WINDOW:]
        return self._pool.submit(_deflate_chunk, self.level, chunk, zdict)

    def _collect(self, result: tuple[bytes, int], length: int) -> bytes:
        out, crc = result
        self._crc = self._crc32_combine(self._crc, crc, length) if self._size else crc
        self._size += length
        return out

    def _finish(self) -> bytes:
        return _FINAL_EMPTY_BLOCK + struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF)


class ZstdCompressor(Compressor):
    """A zstd frame made by ``zstandard`` with ``threads`` workers, content checksum on."""

    name = "zstd"
    extension = ".zst"

    def __init__(
        self,
        output: Output,
        level: int = DEFAULT_LEVELS["zstd"],
        threads: int = 2,
        long: bool = False,
        size_hint: int | None = None,
    ) -> None:
        import zstandard

        super().__init__(output)
        if not 1 <= level <= 22:
            raise ValueError(f"zstd level must be 1-22, not {level}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = compress in the calling thread), not {threads}")
        self.level = level
        self.threads = threads
        self.long = long
        params: dict[str, Any] = dict(threads=threads, write_checksum=1, write_content_size=1)
        if long:
            params.update(enable_ldm=1, window_log=_ZSTD_LONG_WINDOW_LOG)
        cparams = zstandard.ZstdCompressionParameters.from_level(
            level, source_size=size_hint if size_hint is not None else 0, **params
        )
        cctx = zstandard.ZstdCompressor(compression_params=cparams)
        self._cobj = cctx.compressobj(size=size_hint if size_hint is not None else -1)
        self._lock = threading.Lock()  # zstd contexts are not thread-safe; writers may be

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        n = memoryview(data).nbytes
        if not n:
            return
        with self._lock:
            self.bytes_in += n
            self._emit(self._cobj.compress(data))

    def close(self) -> None:
        if self.closed:
            return
        import zstandard

        with self._lock:
            self.closed = True
            self._emit(self._cobj.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))


def broadcast(*outputs: Output) -> Callable[[bytes], None]:
    """One output that hands every piece to several (e.g. a digest thread and an upload sink), in order."""
    fns = [_output_callable(o) for o in outputs]

    def _all(data: bytes) -> None:
        for fn in fns:
            fn(data)

    return _all


# `gzip -1` ... `gzip -9` onto ISA-L's four levels: -1 the fastest (0), -2..-4 our measured default (1), -5..-7
# (gzip's own default -6 among them) 2, -8/-9 the densest (3). See the level figures in the module docstring.
GZIP_TO_ISAL = {1: 0, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2, 8: 3, 9: 3}


def isal_level(gzip_level: int) -> int:
    """The ISA-L level (0-3) that stands for ``gzip -N`` (N 1-9), as the command line's ``--level`` means it."""
    if gzip_level not in GZIP_TO_ISAL:
        raise ValueError(f"gzip level must be 1-9 (as gzip -1 ... -9), not {gzip_level}")
    return GZIP_TO_ISAL[gzip_level]


def open_compressor(
    compression: str,
    output: Output,
    level: int | None = None,
    threads: int = 2,
    **opts: Any,
) -> Compressor:
    """A compressor by name (``gzip``, ``zstd``, ``none``) writing to ``output``.

    ``level`` None takes the default of :data:`DEFAULT_LEVELS`; other keyword options go to the class
    (gzip: ``chunk_size``, ``max_inflight``, ``mtime``; zstd: ``long``, ``size_hint``).
    """
    kind = {"gz": "gzip", "zst": "zstd", "raw": "none", None: "none"}.get(compression, compression)
    if kind == "gzip":
        return GzipCompressor(output, level=DEFAULT_LEVELS["gzip"] if level is None else level, threads=threads, **opts)
    if kind == "zstd":
        return ZstdCompressor(output, level=DEFAULT_LEVELS["zstd"] if level is None else level, threads=threads, **opts)
    if kind == "none":
        if opts:
            raise TypeError(f"compression 'none' takes no options, got {sorted(opts)}")
        return NullCompressor(output)
    raise ValueError(f"unknown compression {compression!r}: expected one of {', '.join(COMPRESSIONS)}")

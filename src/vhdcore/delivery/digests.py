"""Digests of what we deliver, and a per-block content manifest for later verification.

:class:`StreamDigests` hashes the bytes that are uploaded (the *compressed* stream): md5 is what Glance
records as ``checksum``, sha256/sha512 what it records as ``os_hash_value``. md5 runs at ~840 MB/s on
this class of machine and sha512 not much faster, which is slower than the compressors; so each algorithm
runs in a thread of its own (hashlib releases the GIL on large buffers), fed by a bounded queue. The
producer only blocks when a hash falls more than ``queue_chunks`` pieces behind, which bounds memory.

:class:`XXH3Manifest` records xxh3-128 digests of fixed-size blocks of the *virtual content* (the bytes a
reader of the disk sees, before packaging and compression), as ``(offset, length, digest)`` entries that
serialise to JSON. ``vhdcore verify`` recomputes them from a copy (downloaded, converted, ...) and names
the first block that differs. xxh3 runs at ~27 GB/s, so this costs next to nothing in the pipeline.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import threading
from typing import Any, Iterable, Iterator, Sequence

import xxhash

from ..exceptions import InvalidFormatError, VerificationError

__all__ = ["StreamDigests", "XXH3Manifest", "BlockDigest", "GLANCE_HASH_ALGORITHMS"]

KiB = 1024
MiB = 1024 * KiB

# What Glance accepts as os_hash_algo (its "hashing_algorithm" option); sha512 is its default.
GLANCE_HASH_ALGORITHMS = ("sha256", "sha512")

# Pieces larger than this are split (zero-copy memoryview slices) so a queue bound in pieces bounds bytes.
_PIECE = 4 * MiB
_STOP = object()


class _HashWorker(threading.Thread):
    def __init__(self, name: str, depth: int) -> None:
        super().__init__(name=f"vhdcore-digest-{name}", daemon=True)
        self.algorithm = name
        self.hash = hashlib.new(name)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.abandoned = False

    def run(self) -> None:
        update = self.hash.update
        get = self.queue.get
        while True:
            item = get()
            if item is _STOP or self.abandoned:
                return
            if self.error is None:
                try:
                    update(item)
                except BaseException as exc:  # pragma: no cover - hashlib does not fail on bytes
                    self.error = exc


class StreamDigests:
    """md5/sha256/sha512 of a byte stream, each computed in its own thread.

    ``update(data)`` may be given ``bytes`` (kept by reference, never copied) or any buffer (copied once,
    since the caller may reuse it). Call :meth:`hexdigests` at the end; it waits for the threads.
    Usable as the output of a compressor or tee'd in front of an upload sink.
    """

    def __init__(self, algorithms: Sequence[str] = ("md5", "sha256", "sha512"), queue_chunks: int = 16) -> None:
        if not algorithms:
            raise ValueError("at least one digest algorithm is needed")
        if queue_chunks < 1:
            raise ValueError(f"queue_chunks must be >= 1, not {queue_chunks}")
        for name in algorithms:
            hashlib.new(name)  # ValueError for an unknown algorithm, before any thread starts
        self.algorithms = tuple(algorithms)
        self.size = 0
        self._workers = [_HashWorker(name, queue_chunks) for name in self.algorithms]
        for w in self._workers:
            w.start()
        self._result: dict[str, str] | None = None
        self._lock = threading.Lock()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._result is not None:
            raise ValueError("digests already finalised")
        if not isinstance(data, bytes):
            data = bytes(data)
        n = len(data)
        if not n:
            return
        with self._lock:  # keeps pieces in order when several threads feed us
            self.size += n
            pieces: Iterable[Any] = (data,) if n <= _PIECE else _split(data)
            for piece in pieces:
                for w in self._workers:
                    w.queue.put(piece)

    write = update  # so a StreamDigests can be a compressor's or a tee's output

    def __call__(self, data: bytes) -> None:
        self.update(data)

    def hexdigests(self) -> dict[str, str]:
        """``{"md5": ..., "sha256": ..., "sha512": ...}``; waits for the hashing threads to catch up."""
        with self._lock:
            if self._result is None:
                for w in self._workers:
                    w.queue.put(_STOP)
                for w in self._workers:
                    w.join()
                for w in self._workers:
                    if w.error is not None:
                        raise w.error
                self._result = {w.algorithm: w.hash.hexdigest() for w in self._workers}
            return dict(self._result)

    close = hexdigests

    def __del__(self) -> None:
        # Dropped without hexdigests() (a failed pipeline): let the threads end instead of waiting forever.
        for w in getattr(self, "_workers", ()):
            w.abandoned = True
            try:
                w.queue.put_nowait(_STOP)
            except queue.Full:
                pass  # busy: it sees `abandoned` after its current piece

    def glance_properties(self, os_hash_algo: str = "sha512") -> dict[str, Any]:
        """The image properties Glance keeps for these bytes: checksum, os_hash_algo, os_hash_value, size."""
        if os_hash_algo not in GLANCE_HASH_ALGORITHMS:
            raise ValueError(f"os_hash_algo must be one of {GLANCE_HASH_ALGORITHMS}, not {os_hash_algo!r}")
        d = self.hexdigests()
        return {"checksum": d["md5"], "os_hash_algo": os_hash_algo, "os_hash_value": d[os_hash_algo], "size": self.size}


def _split(data: bytes) -> Iterator[memoryview]:
    mv = memoryview(data)
    for i in range(0, len(data), _PIECE):
        yield mv[i : i + _PIECE]


@dataclasses.dataclass(frozen=True)
class BlockDigest:
    """xxh3-128 of virtual bytes [offset, offset + length)."""

    offset: int
    length: int
    digest: str


class XXH3Manifest:
    """xxh3-128 digests of consecutive fixed-size blocks of virtual content.

    Feed the content in order with :meth:`update` (any piece sizes) and :meth:`update_zeros` (runs of zero
    bytes, hashed without materialising more than one block of zeros), then :meth:`finish`. Every block
    is ``block_size`` long except possibly the last.
    """

    ALGORITHM = "xxh3_128"

    def __init__(self, block_size: int = 2 * MiB) -> None:
        if block_size < 4 * KiB or block_size > 1024 * MiB or block_size % 512:
            raise ValueError(f"block_size must be a multiple of 512 between 4 KiB and 1 GiB, not {block_size}")
        self.block_size = block_size
        self.entries: list[BlockDigest] = []
        self.size = 0  # bytes fed so far
        self._h = xxhash.xxh3_128()
        self._in_block = 0
        self._finished = False
        self._zero_digest: str | None = None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._finished:
            raise ValueError("manifest already finished")
        mv = memoryview(data).cast("B")
        pos, n = 0, mv.nbytes
        while pos < n:
            take = min(self.block_size - self._in_block, n - pos)
            self._h.update(mv[pos : pos + take])
            self._in_block += take
            pos += take
            if self._in_block == self.block_size:
                self._close_block()
        self.size += n

    def update_zeros(self, length: int) -> None:
        """Feed ``length`` zero bytes; whole zero blocks reuse one cached digest."""
        if length < 0:
            raise ValueError(f"length must be >= 0, not {length}")
        if self._in_block:
            head = min(self.block_size - self._in_block, length)
            self.update(bytes(head))
            length -= head
        whole, tail = divmod(length, self.block_size)
        if whole:
            if self._zero_digest is None:
                self._zero_digest = xxhash.xxh3_128_hexdigest(bytes(self.block_size))
            base = self.size
            self.entries.extend(
                BlockDigest(base + i * self.block_size, self.block_size, self._zero_digest) for i in range(whole)
            )
            self.size += whole * self.block_size
        if tail:
            self.update(bytes(tail))

    def _close_block(self) -> None:
        offset = len(self.entries) * self.block_size
        self.entries.append(BlockDigest(offset, self._in_block, self._h.hexdigest()))
        self._h.reset()
        self._in_block = 0

    def finish(self) -> "XXH3Manifest":
        if not self._finished:
            if self._in_block:
                self._close_block()
            self._finished = True
        return self

    # -- serialisation
    def to_dict(self) -> dict[str, Any]:
        self.finish()
        return {
            "algorithm": self.ALGORITHM,
            "block_size": self.block_size,
            "size": self.size,
            "blocks": [[e.offset, e.length, e.digest] for e in self.entries],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write the manifest to ``path`` atomically (an unpredictable O_EXCL temporary name, never a symlink
        followed); the caller has applied the destination rule to ``path``."""
        from ..fileio import atomic_output

        data = self.to_json().encode("ascii")
        with atomic_output(path) as (fd, _tmp):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

    @classmethod
    def from_dict(cls, doc: dict[str, Any], path: str | os.PathLike[str] | None = None) -> "XXH3Manifest":
        def bad(field: str, value: Any, why: str) -> InvalidFormatError:
            return InvalidFormatError(f"invalid xxh3 manifest: {why}", path=path, field=field, value=value)

        if not isinstance(doc, dict):
            raise bad("manifest", type(doc).__name__, "expected a JSON object")
        if doc.get("algorithm") != cls.ALGORITHM:
            raise bad("algorithm", doc.get("algorithm"), f"expected {cls.ALGORITHM}")
        bs, size, blocks = doc.get("block_size"), doc.get("size"), doc.get("blocks")
        if not isinstance(bs, int) or isinstance(bs, bool):
            raise bad("block_size", bs, "not an integer")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad("size", size, "not a non-negative integer")
        if not isinstance(blocks, list):
            raise bad("blocks", type(blocks).__name__, "not a list")
        try:
            m = cls(bs)
        except ValueError as exc:
            raise bad("block_size", bs, str(exc)) from None
        expected_count = -(-size // bs)
        if len(blocks) != expected_count:
            raise bad("blocks", len(blocks), f"{expected_count} blocks expected for size {size}")
        for i, entry in enumerate(blocks):
            off = i * bs
            length = min(bs, size - off)
            if (
                not isinstance(entry, list)
                or len(entry) != 3
                or entry[0] != off
                or entry[1] != length
                or not isinstance(entry[2], str)
                or len(entry[2]) != 32
            ):
                raise bad(f"blocks[{i}]", entry, f"expected [{off}, {length}, <32 hex digits>]")
            m.entries.append(BlockDigest(off, length, entry[2]))
        m.size = size
        m._finished = True
        return m

    @classmethod
    def from_json(cls, text: str, path: str | os.PathLike[str] | None = None) -> "XXH3Manifest":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise InvalidFormatError(f"invalid xxh3 manifest: {exc}", path=path, field="json") from None
        return cls.from_dict(doc, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "XXH3Manifest":
        with open(path, encoding="ascii", errors="replace") as f:
            return cls.from_json(f.read(), path)

    # -- comparison
    def mismatches(self, other: "XXH3Manifest") -> list[tuple[int, int]]:
        """``(offset, length)`` of every block whose digest differs (sizes and block sizes must agree)."""
        self.finish()
        other.finish()
        if self.block_size != other.block_size:
            raise ValueError(f"block sizes differ: {self.block_size} vs {other.block_size}")
        out = [(a.offset, a.length) for a, b in zip(self.entries, other.entries) if a.digest != b.digest]
        shorter = min(len(self.entries), len(other.entries))
        longer = self.entries if len(self.entries) > shorter else other.entries
        out.extend((e.offset, e.length) for e in longer[shorter:])
        return out

    def verify(self, other: "XXH3Manifest", path: str | os.PathLike[str] | None = None) -> None:
        """Raise :class:`VerificationError` at the first differing block (or a size difference)."""
        if self.size != other.size:
            raise VerificationError(
                f"virtual size differs: expected {self.size}, got {other.size}",
                path=path, offset=min(self.size, other.size), field="size", value=other.size,
            )
        bad = self.mismatches(other)
        if bad:
            off, length = bad[0]
            raise VerificationError(
                f"content differs in {len(bad)} block(s) of {self.block_size} bytes; first at offset {off}",
                path=path, offset=off, field="xxh3_128", value=length,
            )

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, XXH3Manifest):
            return NotImplemented
        return self.to_dict() == other.to_dict()

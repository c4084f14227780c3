"""``vhdcore verify``: does an exported copy (or an xxh3 manifest) hold the same virtual content as a source?

Either side may be:

* an **xxh3 manifest** (``DEST.xxh3.json`` as ``export`` writes it): compared per block;
* a **VHD** or chain on local disk (any writer's layout, opened by vhdcore): read through the allocation map;
* an **exported artifact**, local or ``swift://``/``s3://``, compressed (gzip, zstd: recognised by their
  magic numbers) or not, holding any package: a ``vhd`` stream (parsed as it arrives: footer copy, header,
  BAT, then the blocks in the order the BAT gives), ``fixed`` (content then footer) or ``raw`` (content),
  or a ``chain-tar`` (read within ``tarstream.TarLimits``; extracted into a temporary directory and opened as the
  chain it holds, or streamed without extraction when its leaf 0.vhd is a fixed disk, the whole chain).

The *target* is read once, in order, and cut into blocks; each block is compared with the *reference*: the
source chain (byte for byte, so a mismatch names the exact first differing offset) or a manifest (by xxh3-128,
so the offset is the first differing block's). A fixed VHD may be longer than its source by the zeros that
rounded it to a whole MiB. A mismatch stops the read (no need to download the rest of a broken upload).
"""
from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
import time
from typing import IO, Any, Callable, Iterator, Sequence

import numpy as np
import xxhash

from .. import kernels as K
from ..disk.chain import Disk, open_chain
from .digests import XXH3Manifest
from ..exceptions import CorruptImageError, InvalidFormatError, UnsupportedFeatureError, VHDError
from ..fileio import zero_fill
from ..format import rules as R
from .packages import iter_content
from ..progress import ProgressCallback, as_progress
from ..format.structs import (
    FOOTER,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER,
    HEADER_SIZE,
    SECTOR_SIZE,
    UNUSED_BAT_ENTRY,
    DiskType,
    DynamicHeader,
    Footer,
    bitmap_bytes,
)
from .tarstream import BLOCK as TAR_BLOCK, TarLimits, extract_chain_tar
from .tarstream import members as tar_members

__all__ = ["verify", "VerifyReport"]

KiB = 1024
MiB = 1024 * KiB
READ_SIZE = 8 * MiB
DEFAULT_BLOCK_SIZE = 2 * MiB
# A manifest of a 2 TiB disk at 4 KiB blocks is ~25 GB of JSON; nobody makes that. 2 MiB blocks: ~50 MB.
MAX_MANIFEST_BYTES = 512 * MiB
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZEROS = bytes(READ_SIZE)


@dataclasses.dataclass
class VerifyReport:
    """``match``: same content. ``offset``: first differing byte (a block's start when a manifest decided)."""

    target: str
    reference: str
    match: bool
    offset: int | None
    size: int
    block_size: int
    blocks: int
    target_kind: str
    reference_kind: str
    message: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (docs/json.md): the copy checked is the ``destination``, what it is checked against
        the ``source``."""
        d = dataclasses.asdict(self)
        names = {"target": "destination", "reference": "source", "target_kind": "destination_kind",
                 "reference_kind": "source_kind"}
        out = {names.get(k, k): v for k, v in d.items()}
        out.setdefault("warnings", [])  # verify has none of its own: a difference is the result, not a warning
        return out


class _Mismatch(Exception):
    def __init__(self, offset: int, why: str) -> None:
        super().__init__(why)
        self.offset = offset
        self.why = why


# --------------------------------------------------------------------------------------------- readers


class _ArtifactStream:
    """An exported artifact's bytes as they arrive (after decompression), read once and in order: exact reads,
    forward skips and a peek; counts the position."""

    def __init__(self, f: IO[bytes], name: str) -> None:
        self.f = f
        self.name = name
        self.pos = 0
        self._peeked = b""

    def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call the stream; a damaged compressed stream (zlib/ISA-L, zstd or EOF errors) becomes a VHDError."""
        try:
            return fn(*args)
        except (VHDError, OSError):
            raise
        except Exception as exc:
            raise CorruptImageError(f"the stream cannot be read: {type(exc).__name__}: {exc}", path=self.name,
                                    offset=self.pos, field="compressed stream", value=str(exc)) from None

    def peek(self, n: int) -> bytes:
        while len(self._peeked) < n:
            more = self._io(self.f.read, n - len(self._peeked))
            if not more:
                break
            self._peeked += more
        return self._peeked[:n]

    def readinto(self, mv: memoryview) -> int:
        if self._peeked:
            n = min(len(mv), len(self._peeked))
            mv[:n] = self._peeked[:n]
            self._peeked = self._peeked[n:]
        else:
            n = self._io(self.f.readinto, mv) or 0
        self.pos += n
        return n

    def read_exact_into(self, mv: memoryview, what: str) -> None:
        done = 0
        while done < len(mv):
            n = self.readinto(mv[done:])
            if not n:
                raise CorruptImageError(f"stream ends inside {what}", path=self.name, offset=self.pos, field=what)
            done += n

    def read_exact(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self.read_exact_into(memoryview(buf), what)
        return bytes(buf)

    def skip_to(self, offset: int, what: str) -> None:
        if offset < self.pos:
            raise UnsupportedFeatureError(
                f"{what} at offset {offset} lies before the stream position {self.pos}: this layout cannot be "
                "read as a stream; decompress the file and verify the file", path=self.name, offset=offset,
                field=what, value=offset)
        scratch = memoryview(bytearray(min(READ_SIZE, max(offset - self.pos, 1))))
        while self.pos < offset:
            self.read_exact_into(scratch[: min(len(scratch), offset - self.pos)], what)

    def drain(self) -> int:
        """Read to the end (so a decompressor checks its trailer); returns the bytes skipped."""
        n = 0
        buf = memoryview(bytearray(READ_SIZE))
        while True:
            k = self.readinto(buf)
            if not k:
                return n
            n += k


def _decompressed(f: IO[bytes], name: str) -> tuple[IO[bytes], str]:
    """``f`` itself or a decompressing reader over it, and the compression found by magic number."""
    head = f.peek(4)[:4] if hasattr(f, "peek") else b""
    if head[:2] == _GZIP_MAGIC:
        from isal import igzip

        return igzip.IGzipFile(fileobj=f, mode="rb"), "gzip"
    if head == _ZSTD_MAGIC:
        import zstandard

        # Long mode may use windows past zstd's default decoder limit; 2 GiB bounds the memory.
        return zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
            f, read_size=READ_SIZE, read_across_frames=True), "zstd"
    return f, "none"


# --------------------------------------------------------------------------------------------- sources

Pieces = Iterator[tuple[memoryview | None, int]]


class _Source:
    """One side of a comparison: a manifest, a random-access disk, or a content stream."""

    kind = ""
    manifest: XXH3Manifest | None = None
    disk: Disk | None = None
    size: int | None = None
    # A fixed VHD may carry zeros past the reference's size: the rounding up to a whole MiB of a fixed export.
    allow_zero_tail = False

    def __init__(self, name: str) -> None:
        self.name = name
        self._cleanup: list[Callable[[], None]] = []

    def pieces(self) -> Pieces:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        for fn in reversed(self._cleanup):
            try:
                fn()
            except Exception:
                pass
        self._cleanup.clear()


class _ManifestSource(_Source):
    kind = "manifest"

    def __init__(self, name: str, manifest: XXH3Manifest) -> None:
        super().__init__(name)
        self.manifest = manifest
        self.size = manifest.size


class _DiskSource(_Source):
    def __init__(self, name: str, disk: Disk, kind: str = "vhd") -> None:
        super().__init__(name)
        self.kind = kind
        self.disk = disk
        self.size = disk.size
        self.allow_zero_tail = disk.leaf.is_fixed
        self._cleanup.append(disk.close)

    def pieces(self) -> Pieces:
        for _, view, n in iter_content(self.disk):
            yield view, n


class _StreamSource(_Source):
    """A package stream (vhd, fixed or raw) read once, in order."""

    def __init__(self, name: str, reader: _ArtifactStream, compression: str) -> None:
        super().__init__(name)
        self.reader = reader
        self.compression = compression
        head = reader.peek(FOOTER_SIZE)
        self.kind = "vhd stream" if head[:8] == FOOTER_COOKIE else "raw"

    def pieces(self) -> Pieces:
        if self.kind == "vhd stream":
            return self._vhd_pieces()
        return self._flat_pieces()

    def _flat_pieces(self) -> Pieces:
        r = self.reader
        buf = memoryview(bytearray(READ_SIZE))
        tail = b""  # the last bytes seen: they may be a fixed VHD's footer
        total = 0
        while True:
            n = r.readinto(buf)
            if not n:
                break
            if n >= FOOTER_SIZE:
                if tail:
                    total += len(tail)
                    yield memoryview(tail), len(tail)
                if n > FOOTER_SIZE:
                    total += n - FOOTER_SIZE
                    yield buf[: n - FOOTER_SIZE], n - FOOTER_SIZE
                tail = bytes(buf[n - FOOTER_SIZE : n])
            else:
                joined = tail + bytes(buf[:n])
                if len(joined) > FOOTER_SIZE:
                    head = joined[: len(joined) - FOOTER_SIZE]
                    total += len(head)
                    yield memoryview(head), len(head)
                tail = joined[-FOOTER_SIZE:]
        if len(tail) == FOOTER_SIZE and tail[:8] == FOOTER_COOKIE:
            try:
                footer = Footer.parse(tail, path=self.name, offset=total)
            except VHDError:
                footer = None
            if footer is not None and footer.type == DiskType.FIXED and footer.current_size == total:
                self.kind = "fixed"
                self.allow_zero_tail = True
                self.size = total
                return
        if tail:
            total += len(tail)
            yield memoryview(tail), len(tail)
        self.size = total

    def _vhd_pieces(self) -> Pieces:
        r, name = self.reader, self.name
        footer = Footer.parse(r.read_exact(FOOTER_SIZE, "footer copy"), path=name, offset=0)
        if footer.type != DiskType.DYNAMIC:
            raise UnsupportedFeatureError(
                f"a {footer.type.label} VHD stream cannot be verified on its own (a differencing disk needs its "
                "parents: verify the chain-tar, or the files)", path=name, offset=FOOTER.offset("disk_type"),
                field=FOOTER.field("disk_type"), value=int(footer.disk_type))
        size = footer.current_size
        p = R.virtual_size_problem(size)
        if p is not None:
            raise InvalidFormatError("virtual size must be a multiple of 512 and at most 2 TiB", path=name,
                                     offset=p.offset, field=p.field, value=size)
        hoff = footer.data_offset
        r.skip_to(hoff, "header")
        h = DynamicHeader.parse(r.read_exact(HEADER_SIZE, "header"), path=name, offset=hoff)
        bs = h.block_size
        p = R.block_size_problem(bs)
        if p is not None:
            raise InvalidFormatError("block size must be a power of two from 512 B to 256 MiB", path=name,
                                     offset=hoff + p.offset, field=p.field, value=bs)
        needed = R.entries_needed(size, bs)
        mte = h.max_table_entries
        if R.table_entries_problem(mte, size, bs) is not None:
            # One message for every table-size problem, on the field that holds the count.
            raise InvalidFormatError(f"max table entries must be at least {needed} and not absurdly more",
                                     path=name, offset=hoff + HEADER.offset("max_table_entries"),
                                     field=HEADER.field("max_table_entries"), value=mte)
        r.skip_to(h.table_offset, "BAT")
        bat = np.frombuffer(r.read_exact(mte * 4, "BAT"), dtype=">u4").astype(np.int64)[:needed]
        blocks = np.flatnonzero(bat != UNUSED_BAT_ENTRY)
        starts = bat[blocks] * SECTOR_SIZE
        bm = bitmap_bytes(bs)
        if len(starts) > 1 and np.any(np.diff(starts) < bm + bs):
            raise UnsupportedFeatureError(
                "the blocks are not stored in the order of the virtual disk (or overlap): this layout cannot be "
                "read as a stream; decompress the file and verify the file", path=name, offset=h.table_offset,
                field="bat", value=int(len(blocks)))
        self.size = size
        buf = memoryview(bytearray(bs))
        covered = 0
        for b, start in zip(blocks.tolist(), starts.tolist()):
            r.skip_to(start + bm, f"block {b}")
            r.read_exact_into(buf, f"block {b}")
            voff = b * bs
            if voff > covered:
                yield None, voff - covered
            k = min(bs, size - voff)
            yield buf[:k], k
            covered = voff + k
        if size > covered:
            yield None, size - covered
        rest = r.drain()
        if rest < FOOTER_SIZE:
            raise CorruptImageError("stream ends before the footer", path=name, offset=r.pos, field="footer")


def _extract_chain_tar(reader: _ArtifactStream, name: str, directory: str, limits: TarLimits | None = None,
                       first: tuple[str, int] | None = None, rest: Iterator[tuple[str, int]] | None = None) -> str:
    """Extract a chain-tar stream (members N.vhd, regular files only; every size bounded: vhdcore.delivery.tarstream) into
    ``directory``; returns 0.vhd's path."""
    extract_chain_tar(reader, name, directory, limits, first, rest)
    leaf = os.path.join(directory, "0.vhd")
    if not os.path.exists(leaf):
        raise InvalidFormatError("the chain-tar has no 0.vhd (the leaf)", path=name, field="tar members",
                                 value=sorted(os.listdir(directory)))
    return leaf


class _Member(io.RawIOBase):
    """The next ``size`` bytes of an _ArtifactStream, then end of file: one tar member read in place."""

    def __init__(self, reader: _ArtifactStream, size: int) -> None:
        self._r = reader
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")[: self._left]
        n = self._r.readinto(mv) if len(mv) else 0
        if len(mv) and not n:
            raise CorruptImageError("stream ends inside the tar member", path=self._r.name, offset=self._r.pos,
                                    field="tar member")
        self._left -= n
        return n


class _FixedMemberSource(_StreamSource):
    """A chain-tar whose leaf 0.vhd is a fixed VHD: a fixed disk has no parent, so the chain is that one member,
    verified as it streams (content, then its footer) without being extracted."""

    def __init__(self, name: str, reader: _ArtifactStream, compression: str) -> None:
        super().__init__(name, reader, compression)
        self.kind = "raw"

    def pieces(self) -> Pieces:
        yield from self._flat_pieces()
        if self.kind != "fixed":
            raise InvalidFormatError("the chain-tar's 0.vhd is not a VHD (no fixed footer at its end)",
                                     path=self.name, field="tar member", value="0.vhd")
        self.kind = "chain-tar (fixed 0.vhd, streamed)"


class _Unpeek(io.RawIOBase):
    """The bytes an _ArtifactStream peeked at, then the rest of its stream (for consumers that need a plain file)."""

    def __init__(self, reader: _ArtifactStream) -> None:
        self._r = reader

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._r.readinto(memoryview(b).cast("B"))


def _open_manifest_bytes(data: bytes, name: str) -> XXH3Manifest:
    return XXH3Manifest.from_json(data.decode("ascii", errors="replace"), name)


def _open_source(spec: str, *, parent_dirs: Sequence[str] | None, strict: bool, tmp_dir: str | None,
                 remote_options: dict[str, Any], tar_limits: TarLimits | None = None) -> _Source:
    text = os.fspath(spec)
    remote = "://" in text and not text.startswith("file://")
    if remote:
        from .upload.fetch import open_download

        f = open_download(text, **remote_options)
    else:
        path = text[len("file://"):] if text.startswith("file://") else text
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory")
        with open(path, "rb") as probe:
            head = probe.read(FOOTER_SIZE)
            probe.seek(0, os.SEEK_END)
            fsize = probe.tell()
            tail = b""
            if fsize >= FOOTER_SIZE:
                probe.seek(fsize - FOOTER_SIZE)
                tail = probe.read(FOOTER_SIZE)
        if head[:8] == FOOTER_COOKIE or (tail[:8] == FOOTER_COOKIE and head[:2] != _GZIP_MAGIC
                                          and head[:4] != _ZSTD_MAGIC):
            disk = open_chain(path, "r", parent_dirs, strict=strict)
            return _DiskSource(text, disk, "vhd")
        f = open(path, "rb", buffering=READ_SIZE)
    try:
        if text.endswith(".json") or _peek(f, 1) == b"{":
            parts, total = [], 0
            while piece := f.read(4 * MiB):
                parts.append(piece)
                total += len(piece)
                if total > MAX_MANIFEST_BYTES:
                    raise InvalidFormatError("manifest larger than any real one", path=text, field="manifest",
                                             value=total)
            data = b"".join(parts)
            f.close()
            return _ManifestSource(text, _open_manifest_bytes(data, text))
        stream, compression = _decompressed(f, text)
        reader = _ArtifactStream(stream, text)
        if reader.peek(TAR_BLOCK)[257:262] == b"ustar":
            it = tar_members(reader, text, tar_limits)
            first = next(it, None)
            if first is not None and first[0] == "0.vhd" and first[1] >= FOOTER_SIZE \
                    and reader.peek(8) != FOOTER_COOKIE:
                # Not a dynamic/differencing disk (those start with their footer copy): a fixed base, streamed.
                src = _FixedMemberSource(text, _ArtifactStream(_Member(reader, first[1]), text), compression)
                src._cleanup.append(f.close)
                src._cleanup.append(stream.close)
                return src
            tmp = tempfile.mkdtemp(prefix="vhdcore-verify-", dir=tmp_dir)
            try:
                leaf = _extract_chain_tar(reader, text, tmp, tar_limits, first, it)
                disk = open_chain(leaf, "r", [tmp], strict=strict)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                stream.close()
                f.close()
            src = _DiskSource(text, disk, "chain-tar")
            src._cleanup.insert(0, lambda: shutil.rmtree(tmp, ignore_errors=True))
            return src
        src = _StreamSource(text, reader, compression)
        src._cleanup.append(f.close)
        src._cleanup.append(stream.close)
        return src
    except BaseException:
        f.close()
        raise


def _peek(f: IO[bytes], n: int) -> bytes:
    peek = getattr(f, "peek", None)
    return peek(n)[:n] if peek is not None else b""


# --------------------------------------------------------------------------------------------- comparison


class _Checker:
    """Cuts the target's content into blocks and compares each with the reference."""

    def __init__(self, reference: _Source, block_size: int, progress: ProgressCallback) -> None:
        self.ref = reference
        self.bs = block_size
        self.size = reference.size or 0
        self.buf = bytearray(block_size)
        self.view = memoryview(self.buf)
        self.fill = 0
        self.all_zero = True  # the current block came only from zero runs
        self.pos = 0  # target bytes consumed
        self.blocks = 0
        self.first_nonzero_tail: int | None = None
        self.progress = progress
        if reference.disk is not None:
            self.other = memoryview(bytearray(block_size))
        if reference.manifest is not None:
            self.zero_digest = xxhash.xxh3_128_hexdigest(bytes(block_size))

    def feed(self, view: memoryview | None, n: int) -> None:
        while n > 0:
            if self.pos >= self.size:
                self._tail(view, n)
                return
            if view is None and self.fill == 0 and n >= self.bs:
                whole = min(n, self.size - self.pos) // self.bs
                if whole:
                    self._zero_blocks(whole)
                    n -= whole * self.bs
                    continue
            take = min(n, self.bs - self.fill, self.size - self.pos)
            if view is None:
                # Zeros are written into the block only once it also holds data (lazily, below).
                if not self.all_zero:
                    zero_fill(self.view[self.fill : self.fill + take])
            else:
                if self.all_zero and self.fill:
                    zero_fill(self.view[: self.fill])
                self.view[self.fill : self.fill + take] = view[:take]
                self.all_zero = False
                view = view[take:]
            self.fill += take
            self.pos += take
            n -= take
            if self.fill == self.bs or self.pos == self.size:
                self._check_block()

    def _zero_blocks(self, count: int) -> None:
        """``count`` whole blocks of zeros from the target: the reference is asked where it holds data
        (its manifest entries, or its allocation map) instead of being read block by block."""
        start, end = self.pos, self.pos + count * self.bs
        ref = self.ref
        if ref.manifest is not None:
            first = start // self.bs
            for i, entry in enumerate(ref.manifest.entries[first : first + count]):
                if entry.digest != self.zero_digest:
                    off = start + i * self.bs
                    raise _Mismatch(off, f"block at offset {off} ({self.bs} bytes) differs from the manifest")
        else:
            assert ref.disk is not None
            for ext in ref.disk.allocated_extents(start, end - start):
                pos = ext.offset
                while pos < ext.end:
                    k = min(len(self.other), ext.end - pos)
                    part = self.other[:k]
                    ref.disk.readinto(pos, part)
                    if not K.is_zero(part):
                        off = pos + int(np.flatnonzero(np.frombuffer(part, dtype=np.uint8))[0])
                        raise _Mismatch(off, f"first difference at offset {off} (the target holds zeros there)")
                    pos += k
        self.pos = end
        self.blocks += count
        self.progress(self.pos, self.size, state="verifying")

    def _tail(self, view: memoryview | None, n: int) -> None:
        if view is not None and self.first_nonzero_tail is None and not K.is_zero(view[:n]):
            first = int(np.flatnonzero(np.frombuffer(view[:n], dtype=np.uint8))[0])
            self.first_nonzero_tail = self.pos + first
        self.pos += n

    def _check_block(self) -> None:
        start = self.pos - self.fill
        block = self.view[: self.fill]
        ref = self.ref
        if ref.manifest is not None:
            entry = ref.manifest.entries[start // self.bs]
            if self.all_zero:
                digest = (self.zero_digest if self.fill == self.bs
                          else xxhash.xxh3_128_hexdigest(bytes(self.fill)))
            else:
                digest = xxhash.xxh3_128_hexdigest(block)
            if digest != entry.digest:
                raise _Mismatch(start, f"block at offset {start} ({self.fill} bytes) differs from the manifest")
        else:
            assert ref.disk is not None
            other = self.other[: self.fill]
            ref.disk.readinto(start, other)
            if self.all_zero:
                if not K.is_zero(other):
                    off = start + int(np.flatnonzero(np.frombuffer(other, dtype=np.uint8))[0])
                    raise _Mismatch(off, f"first difference at offset {off} (the target holds zeros there)")
            elif block != other:
                diff = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) != np.frombuffer(other, dtype=np.uint8))
                off = start + int(diff[0])
                raise _Mismatch(off, f"first difference at offset {off}")
        self.blocks += 1
        self.fill = 0
        self.all_zero = True
        self.progress(self.pos, self.size, state="verifying")

    def finish(self, target: _Source) -> None:
        if self.pos < self.size:
            raise _Mismatch(self.pos, f"the target ends at {self.pos} bytes; the reference has {self.size}")
        if self.pos > self.size:
            if not (target.allow_zero_tail and self.pos == -(-self.size // MiB) * MiB):
                raise _Mismatch(self.size, f"the target has {self.pos} bytes; the reference has {self.size}")
            if self.first_nonzero_tail is not None:
                raise _Mismatch(self.first_nonzero_tail,
                                f"non-zero byte at {self.first_nonzero_tail} in the fixed VHD's rounding past "
                                f"the reference's {self.size} bytes")


def _compare_manifests(a: _Source, b: _Source) -> tuple[int, int | None, str]:
    ma, mb = a.manifest, b.manifest
    assert ma is not None and mb is not None
    if ma.block_size != mb.block_size:
        raise ValueError(f"the manifests use different block sizes ({ma.block_size}, {mb.block_size})")
    n = min(len(ma.entries), len(mb.entries))
    for i in range(n):
        if ma.entries[i].digest != mb.entries[i].digest:
            off = ma.entries[i].offset
            return i, off, f"block at offset {off} differs"
    if ma.size != mb.size:
        return n, min(ma.size, mb.size), f"sizes differ: {ma.size} and {mb.size} bytes"
    return n, None, "match"


def verify(
    target: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    *,
    block_size: int | None = None,
    parent_dirs: Sequence[str | os.PathLike[str]] | None = None,
    strict: bool = True,
    tmp_dir: str | None = None,
    progress: ProgressCallback | None = None,
    tar_limits: TarLimits | None = None,
    **remote_options: Any,
) -> VerifyReport:
    """Compare the virtual content of ``target`` with ``reference`` (see the module docstring).

    Returns a :class:`VerifyReport` whose ``match`` says whether they agree and ``offset`` where they first
    differ. Malformed inputs raise the usual :class:`~vhdcore.exceptions.VHDError`. A chain-tar is read within
    ``tar_limits`` (:class:`vhdcore.delivery.tarstream.TarLimits`: header and name sizes, members, expanded bytes).
    """
    t0 = time.monotonic()
    report = as_progress(progress)
    tname, rname = os.fspath(target), os.fspath(reference)
    dirs = [os.fspath(d) for d in (parent_dirs or ())]
    opened: list[_Source] = []
    try:
        t = _open_source(tname, parent_dirs=dirs, strict=strict, tmp_dir=tmp_dir, remote_options=remote_options,
                         tar_limits=tar_limits)
        opened.append(t)
        r = _open_source(rname, parent_dirs=dirs, strict=strict, tmp_dir=tmp_dir, remote_options=remote_options,
                         tar_limits=tar_limits)
        opened.append(r)
        if t.manifest is not None and r.manifest is not None:
            blocks, offset, msg = _compare_manifests(t, r)
            return VerifyReport(tname, rname, offset is None, offset, r.manifest.size, r.manifest.block_size,
                                blocks, t.kind, r.kind, msg, time.monotonic() - t0)
        # The reference must answer random questions: a manifest or a disk. The content side streams.
        if t.manifest is not None or (t.disk is not None and r.disk is None and r.manifest is None):
            content, ref = r, t
        else:
            content, ref = t, r
        if ref.manifest is None and ref.disk is None:
            # Two streams: the reference's manifest first, then the target against it.
            m = XXH3Manifest(block_size or DEFAULT_BLOCK_SIZE)
            for view, n in ref.pieces():
                if view is None:
                    m.update_zeros(n)
                else:
                    m.update(view)
            ref.manifest = m.finish()
            ref.size = m.size
        bs = ref.manifest.block_size if ref.manifest is not None else (block_size or DEFAULT_BLOCK_SIZE)
        checker = _Checker(ref, bs, report)
        try:
            for view, n in content.pieces():
                checker.feed(view, n)
            checker.finish(content)
        except _Mismatch as mm:
            return VerifyReport(tname, rname, False, mm.offset, ref.size or 0, bs, checker.blocks, t.kind, r.kind,
                                mm.why, time.monotonic() - t0)
        return VerifyReport(tname, rname, True, None, ref.size or 0, bs, checker.blocks, t.kind, r.kind,
                            f"{ref.size} bytes match", time.monotonic() - t0)
    finally:
        for s in opened:
            s.close()

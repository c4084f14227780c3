"""``vhdcore.export``: package a chain, compress, digest and deliver it in one pass; ``vhdcore.verify`` to check.

    report = vhdcore.export("leaf.vhd", "swift://images/vm-1.vhd.zst", package="vhd")
    report.digests["md5"], report.glance_properties(), report.size, report.manifest_path

One pass, no temporary file: a package generator (:mod:`vhdcore.delivery.packages`) reads the chain through
``disk.readinto`` on 8 MiB buffers and yields the package's bytes; :func:`vhdcore.delivery.upload.deliver` feeds them
to a compressor running on both cores, hashes what comes out (md5, sha256, sha512 in threads of their own)
and hands it to the destination's sink (an atomic local file, a Swift SLO, an S3 multipart upload). While
the virtual content streams by, an xxh3-128 manifest of it is taken per 2 MiB block and stored next to the
destination (``DEST.xxh3.json``), so a copy can be checked later with ``vhdcore verify``.

Progress follows the imaging task states the seed pipeline reported: ``preparing`` (25 %: opening the
chain, computing the allocation map), ``saving`` (local) or ``uploading`` (remote) from 50 %, ``complete``
(100 %); each update also carries the bytes ``read`` from the chain, ``compressed`` (produced by the
compressor) and ``sent`` (accepted by the destination, or acknowledged by the store).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from typing import Any, Sequence

from ..disk.chain import open_chain
from .compress import COMPRESSIONS
from .verify import VerifyReport, verify
from ..destination import check_destination
from .digests import XXH3Manifest
from .packages import PACKAGES, ChainTarPackage, Package, disk_manifest, open_package
from ..progress import ProgressCallback, TaskState, as_progress
from .upload import UploadResult, open_sink, parse_destination

__all__ = ["export", "ExportReport", "verify", "VerifyReport", "PACKAGES", "MANIFEST_SUFFIX",
           "compression_for"]

MiB = 1024 * 1024
MANIFEST_SUFFIX = ".xxh3.json"
DEFAULT_DIGESTS = ("md5", "sha256", "sha512")
# Compressed-file suffixes whose format vhdcore does not write: refused by compression "auto".
UNSUPPORTED_SUFFIXES = (".bz2", ".tbz2", ".tbz", ".xz", ".txz", ".lzma", ".lz", ".lz4", ".lzo", ".z", ".zip", ".7z",
                        ".br", ".sz")


@dataclasses.dataclass
class ExportReport:
    """What an export produced.

    ``package_size`` is the length of the package stream (what the compressor read), ``size`` the bytes
    delivered (after compression; what the digests cover), ``bytes_read`` what was read from the chain's
    files. ``zero_ranges`` (fixed and raw packages) are ``(offset, length)`` stretches of the package
    stream the allocation map proves zero. ``seconds`` is the whole export, ``stream_seconds`` the part
    after the allocation map was known.
    """

    source: str
    destination: str
    package: str
    compression: str
    level: int | None
    virtual_size: int
    package_size: int
    size: int
    bytes_read: int
    data_blocks: int
    zero_ranges: list[tuple[int, int]]
    digests: dict[str, str]
    manifest_path: str | None
    upload: UploadResult
    warnings: list[str]
    seconds: float
    stream_seconds: float
    manifest: XXH3Manifest | None = dataclasses.field(default=None, repr=False)

    @property
    def ratio(self) -> float:
        """Package bytes per delivered byte."""
        return self.package_size / self.size if self.size else 0.0

    @property
    def throughput(self) -> float:
        """Package bytes per second while streaming."""
        return self.package_size / self.stream_seconds if self.stream_seconds > 0 else 0.0

    def glance_properties(self, os_hash_algo: str = "sha512") -> dict[str, Any]:
        """What Glance records for the image data: ``checksum`` (md5), ``os_hash_algo``/``os_hash_value``, size."""
        if "md5" not in self.digests or os_hash_algo not in self.digests:
            raise ValueError(f"the export computed {sorted(self.digests)}; Glance needs md5 and {os_hash_algo}")
        return {"checksum": self.digests["md5"], "os_hash_algo": os_hash_algo,
                "os_hash_value": self.digests[os_hash_algo], "size": self.size}

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("manifest", "upload")}
        d["zero_ranges"] = [list(r) for r in self.zero_ranges]
        d["upload"] = self.upload.to_dict()
        d["ratio"] = round(self.ratio, 4)
        d["throughput"] = round(self.throughput)
        if self.manifest is not None:
            d["manifest_blocks"] = len(self.manifest)
            d["manifest_block_size"] = self.manifest.block_size
        return d


def compression_for(dest: str, compression: str = "auto") -> str:
    """``auto`` picks by the destination's name: ``.gz``/``.tgz`` gzip, ``.zst``/``.tzst`` zstd, a suffix of a
    compression vhdcore does not write (``.bz2``, ``.xz``, ...) is refused, anything else is none."""
    if compression != "auto":
        kind = {"gz": "gzip", "zst": "zstd", "raw": "none"}.get(compression, compression)
        if kind not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}: expected auto or one of {', '.join(COMPRESSIONS)}")
        return kind
    name = parse_destination(dest)[2].lower()
    if name.endswith((".gz", ".tgz")):
        return "gzip"
    if name.endswith((".zst", ".zstd", ".tzst")):
        return "zstd"
    other = next((s for s in UNSUPPORTED_SUFFIXES if name.endswith(s)), None)
    if other is not None:
        # Writing plain bytes under a name that promises bzip2/xz would mislead every reader of the file.
        raise ValueError(f"{dest}: the name ends with {other}, a compression vhdcore does not write; use .gz or .zst, "
                         f"or give --compress none to store it uncompressed under this name")
    return "none"


class _Progress:
    """Merges the pipeline's updates (package bytes, compressed bytes) with the sink's (bytes sent)."""

    def __init__(self, callback: ProgressCallback | None, pkg: Package, dest: str, remote: bool) -> None:
        self.cb = as_progress(callback)
        self.pkg = pkg
        self.dest = dest
        self.state = TaskState.UPLOADING if remote else TaskState.SAVING
        self.done = 0
        self.compressed = 0
        self.sent = 0
        self.t0 = time.monotonic()
        self._lock = threading.Lock()

    def emit(self, state: TaskState, done: int, total: int | None, **extra: Any) -> None:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        self.cb(done, total, state=state, read=self.pkg.bytes_read, compressed=self.compressed, sent=self.sent,
                rate=round(done / elapsed), destination=self.dest, package=self.pkg.name, **extra)

    def on_pipeline(self, done: int, total: int | None, **info: Any) -> None:
        with self._lock:
            self.done = done
            self.compressed = info.get("delivered", self.compressed)
            self.emit(self.state, done, self.pkg.size)

    def on_sink(self, done: int, total: int | None, **info: Any) -> None:
        with self._lock:
            self.sent = done
            self.emit(self.state, self.done, self.pkg.size)


def _manifest_file(dest: str, where: str | bool | os.PathLike[str]) -> str | None:
    """The local file the manifest goes to (None: nowhere, or an object store)."""
    if where is False:
        return None
    where = dest + MANIFEST_SUFFIX if where is True else os.fspath(where)
    if "://" in where and not where.startswith("file://"):
        return None
    return parse_destination(where)[2]


def _write_manifest(manifest: XXH3Manifest, dest: str, where: str | bool | os.PathLike[str],
                    sink_options: dict[str, Any]) -> str | None:
    if where is False:
        return None
    if where is True:
        where = dest + MANIFEST_SUFFIX
    where = os.fspath(where)
    if "://" in where and not where.startswith("file://"):
        opts = {k: v for k, v in sink_options.items() if k not in ("progress", "overwrite", "device", "resume_state")}
        with open_sink(where, **opts) as sink:
            sink.write(manifest.to_json().encode("ascii"))
        return where
    path = parse_destination(where)[2]
    manifest.dump(path)
    return path


def export(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    package: str = "vhd",
    compression: str = "auto",
    level: int | None = None,
    long: bool = False,
    threads: int = 2,
    digests: Sequence[str] = DEFAULT_DIGESTS,
    manifest: bool | str | os.PathLike[str] = True,
    manifest_block_size: int = 2 * MiB,
    block_size: int | None = None,
    parent_dirs: Sequence[str | os.PathLike[str]] | None = None,
    strict: bool = True,
    progress: ProgressCallback | None = None,
    unique_id: uuid.UUID | None = None,
    timestamp: int | None = None,
    zero_scan: bool | None = None,
    overwrite: bool = False,
    device: bool = False,
    read_limiter: Any = None,
    upload_limiter: Any = None,
    **sink_options: Any,
) -> ExportReport:
    """Package the chain at ``src`` and deliver it to ``dest`` (a path, ``swift://container/object``, ``s3://``).

    ``package``: ``vhd`` (a new dynamic VHD, the default), ``fixed``, ``chain-tar`` or ``raw``.
    ``compression``: ``auto`` (by the destination's extension), ``gzip``, ``zstd`` or ``none``; ``level``,
    ``long`` (zstd long-distance matching) and ``threads`` tune it. ``digests`` of the delivered bytes.
    ``manifest``: True writes the xxh3 manifest of the virtual content next to the destination as
    ``DEST.xxh3.json`` (uploaded beside a remote object), a path or URL puts it there, False skips it.
    ``block_size`` (vhd), ``unique_id`` and ``timestamp`` (vhd, fixed footers) shape the new disk;
    ``zero_scan`` (vhd; default: when a layer is a fixed VHD) reads the blocks once first to leave out all-zero ones.
    ``read_limiter`` / ``upload_limiter`` (:class:`vhdcore.throttle.TokenBucket`) cap the bytes read through
    the chain and the bytes handed to the destination, per second (``--max-read-rate``, ``--max-upload-rate``).
    Other keyword options go to the sink (``segment_size``, ``concurrency``, credentials, ``fsync``...).
    A local destination and a local manifest obey the destination rule (:mod:`vhdcore.destination`): an existing
    file only with ``overwrite``, a file of the chain never, a block device only with ``device`` (written in place).

    The image is committed (renamed into place, or the SLO manifest / multipart upload completed) before its
    manifest is written; if the manifest cannot be stored, the export raises with the image in place.
    """
    t0 = time.monotonic()
    src, dest = os.fspath(src), os.fspath(dest)
    if package not in PACKAGES:
        raise ValueError(f"unknown package {package!r}: expected one of {', '.join(PACKAGES)}")
    kind = compression_for(dest, compression)
    scheme, _container, local_dest = parse_destination(dest)
    remote = scheme != "file"
    manifest_file = _manifest_file(dest, manifest)

    def check_outputs(sources: list[str]) -> None:
        if not remote:
            check_destination(local_dest, sources=sources, overwrite=overwrite, allow_device=device)
        if manifest_file is not None:
            check_destination(manifest_file, sources=sources + ([local_dest] if not remote else []),
                              overwrite=overwrite)

    check_outputs([src])  # before a byte of the source is read
    if not remote:
        sink_options["overwrite"] = overwrite
        if device:
            sink_options["device"] = True
    if long and kind != "zstd":
        raise ValueError("long-distance matching is a zstd option")
    copts: dict[str, Any] = {"long": True} if long else {}
    report = as_progress(progress)
    report(0, None, state=TaskState.PREPARING, destination=dest, package=package)

    from .upload.pipeline import deliver  # the compressors load with it

    with open_chain(src, "r", parent_dirs, strict=strict) as disk:
        check_outputs([img.path for img in disk.layers])
        if read_limiter is not None:  # every read of the export (zero scan, package, manifest) pays the bucket
            from ..throttle import throttled_readinto

            disk.readinto = throttled_readinto(disk.readinto, read_limiter)  # type: ignore[method-assign]
        want_manifest = manifest is not False
        mf = XXH3Manifest(manifest_block_size) if want_manifest else None
        pkg = open_package(package, disk, mf, block_size=block_size, unique_id=unique_id, timestamp=timestamp,
                           zero_scan=zero_scan)
        side: dict[str, Any] = {}
        side_thread = None
        if want_manifest and isinstance(pkg, ChainTarPackage):
            # The tar holds files, not virtual content: take the manifest from the chain in a thread alongside.
            def _side() -> None:
                try:
                    side["manifest"] = disk_manifest(disk, manifest_block_size)
                except BaseException as exc:  # re-raised in the caller's thread
                    side["error"] = exc

            side_thread = threading.Thread(target=_side, name="vhdcore-export-manifest", daemon=True)
            side_thread.start()
        track = _Progress(progress, pkg, dest, remote)
        t_stream = time.monotonic()
        try:
            result = deliver(pkg.chunks(), dest, compression=kind, level=level, threads=threads,
                             compressor_options=copts, digests=tuple(digests), input_size=pkg.size,
                             upload_limiter=upload_limiter, progress=track.on_pipeline,
                             sink_progress=track.on_sink, **sink_options)
        finally:
            if side_thread is not None:
                side_thread.join()
        stream_seconds = time.monotonic() - t_stream
        if side_thread is not None:
            if "error" in side:
                raise side["error"]
            mf = side["manifest"]
        elif mf is not None:
            mf.finish()
        if result.input_size != pkg.size:  # pragma: no cover - a package that miscounts itself is our bug
            raise AssertionError(f"{package} package produced {result.input_size} bytes, announced {pkg.size}")
        manifest_path = _write_manifest(mf, dest, manifest, sink_options) if mf is not None else None
        rep = ExportReport(
            source=src, destination=dest, package=package, compression=result.compression, level=result.level,
            virtual_size=disk.size, package_size=pkg.size, size=result.size, bytes_read=pkg.bytes_read,
            data_blocks=pkg.data_blocks, zero_ranges=list(pkg.zero_ranges), digests=result.digests,
            manifest_path=manifest_path, upload=result.upload,
            warnings=list(disk.warnings) + pkg.warnings + list(result.upload.extra.get("warnings", ())),
            seconds=time.monotonic() - t0, stream_seconds=stream_seconds, manifest=mf,
        )
    track.emit(TaskState.COMPLETE, pkg.size, pkg.size, delivered=rep.size)
    return rep

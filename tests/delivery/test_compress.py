"""Streaming compressors: output checked by the standard tools (gunzip, gzip, zstd, tar), never by ourselves."""
from __future__ import annotations

import gzip
import io
import subprocess
import tarfile
import threading
import time
import zlib
from pathlib import Path

import pytest

from vhdcore.delivery.compress import (
    DEFAULT_LEVELS,
    GzipCompressor,
    NullCompressor,
    ZstdCompressor,
    broadcast,
    open_compressor,
)

pytestmark = pytest.mark.backend_independent

KiB = 1024
MiB = 1024 * KiB
ODD_PIECES = (1, 7, 4095, 65537, 333_333, 1_000_003, 3)


def feed(comp, data: bytes, pieces=ODD_PIECES) -> None:
    """Write ``data`` in a repeating pattern of odd piece sizes, from a reused buffer."""
    buf = bytearray()
    pos, i = 0, 0
    while pos < len(data):
        n = pieces[i % len(pieces)]
        buf[:] = data[pos : pos + n]
        comp.write(buf)
        buf[:] = b"\xee" * len(buf)  # the compressor must have copied what it keeps
        pos += n
        i += 1
    comp.close()


def compress_to(tmp_path: Path, kind: str, data: bytes, name: str = "out", **kw) -> Path:
    out = tmp_path / name
    with open(out, "wb") as f:
        comp = open_compressor(kind, f, **kw)
        feed(comp, data)
    return out


def run(*argv: str, input: bytes | None = None) -> bytes:
    r = subprocess.run(argv, input=input, capture_output=True)
    assert r.returncode == 0, f"{argv}: {r.stderr.decode(errors='replace')}"
    return r.stdout


@pytest.mark.parametrize("level", [0, 1, 3])
def test_gzip_round_trip_with_gunzip(tmp_path: Path, disk_bytes: bytes, level: int) -> None:
    # small chunks so the 2 threads get many of them, out of step with the odd write sizes
    out = compress_to(tmp_path, "gzip", disk_bytes, "d.gz", level=level, chunk_size=64 * KiB, max_inflight=3)
    run("gunzip", "-t", str(out))
    assert run("gzip", "-dc", str(out)) == disk_bytes
    assert gzip.decompress(out.read_bytes()) == disk_bytes
    compressed = out.read_bytes()
    assert len(compressed) < len(disk_bytes) * 0.8  # the content is compressible; something was done


def test_gzip_is_one_member_with_the_right_crc_and_size(tmp_path: Path, disk_bytes: bytes) -> None:
    out = compress_to(tmp_path, "gzip", disk_bytes, "d.gz", chunk_size=256 * KiB)
    raw = out.read_bytes()
    # gzip -lv reads the trailer of the (last) member: crc32 and size of the whole input only if one member
    fields = run("gzip", "-lv", str(out)).decode().splitlines()[1].split()
    assert int(fields[1], 16) == zlib.crc32(disk_bytes)
    assert int(fields[-3]) == len(disk_bytes)
    # exactly one member: zlib's gzip decoder stops at the end of the first member
    d = zlib.decompressobj(31)
    assert d.decompress(raw) == disk_bytes and d.eof and d.unused_data == b""


def test_gzip_output_does_not_depend_on_threads_or_write_sizes(disk_bytes: bytes) -> None:
    outs = []
    for threads, pieces in ((1, (MiB,)), (2, ODD_PIECES), (2, (len(disk_bytes),))):
        buf = io.BytesIO()
        feed(GzipCompressor(buf, threads=threads, chunk_size=128 * KiB), disk_bytes, pieces)
        outs.append(buf.getvalue())
    assert outs[0] == outs[1] == outs[2]


def test_gzip_compresses_on_two_threads_with_bounded_work(disk_bytes: bytes) -> None:
    seen_threads: set[str] = set()
    emit_threads: set[str] = set()
    lock = threading.Lock()
    counts = {"submitted": 0, "emitted": -1, "most": 0}  # -1: the gzip header is emitted before any chunk
    buf = io.BytesIO()

    def out(data: bytes) -> None:
        with lock:
            counts["emitted"] += 1
        emit_threads.add(threading.current_thread().name)
        buf.write(data)

    import vhdcore.delivery.compress as mod

    real = mod._deflate_chunk

    def spy(*a):
        seen_threads.add(threading.current_thread().name)
        time.sleep(0.002)  # slow workers, so that the writer runs ahead and meets the bound
        return real(*a)

    mod._deflate_chunk = spy
    comp = GzipCompressor(out, threads=2, chunk_size=64 * KiB, max_inflight=3)
    real_submit = comp._submit

    def submit(chunk: bytes):
        with lock:
            counts["submitted"] += 1
            counts["most"] = max(counts["most"], counts["submitted"] - max(counts["emitted"], 0))
        return real_submit(chunk)

    comp._submit = submit  # type: ignore[method-assign]
    try:
        for i in range(0, len(disk_bytes), 100_000):
            comp.write(disk_bytes[i : i + 100_000])
        comp.close()
    finally:
        mod._deflate_chunk = real
    assert len(seen_threads) == 2 and all(t.startswith("vhdcore-gzip") for t in seen_threads)
    # chunks go out from the emitter thread, the trailer from close()'s caller
    assert {t for t in emit_threads if t.startswith("vhdcore-gzip")} == {"vhdcore-gzip-emit"}
    assert counts["most"] == 3  # the writer ran ahead as far as allowed, and no further
    assert gzip.decompress(buf.getvalue()) == disk_bytes


def test_gzip_output_error_reaches_the_writer_and_stops_the_threads(disk_bytes: bytes) -> None:
    calls = {"n": 0}

    def out(data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")

    comp = GzipCompressor(out, threads=2, chunk_size=64 * KiB, max_inflight=2)
    with pytest.raises(OSError, match="No space left"):
        for i in range(0, len(disk_bytes), 64 * KiB):
            comp.write(disk_bytes[i : i + 64 * KiB])
        comp.close()
    comp.abort()
    assert not comp._emitter.is_alive()
    assert calls["n"] == 4  # nothing was emitted after the failure


def test_tar_reads_a_gzip_stream_we_made(tmp_path: Path, disk_bytes: bytes) -> None:
    # A tar of a disk image, as the seed's "tar -z" packaging produced, compressed by us.
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, payload in (("0.vhd", disk_bytes), ("1.vhd", disk_bytes[: 3 * MiB + 5])):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    out = compress_to(tmp_path, "gzip", tar_bytes.getvalue(), "image.tgz", chunk_size=64 * KiB)
    assert run("tar", "-tzf", str(out)).split() == [b"0.vhd", b"1.vhd"]
    dest = tmp_path / "x"
    dest.mkdir()
    run("tar", "-xzf", str(out), "-C", str(dest))
    assert (dest / "0.vhd").read_bytes() == disk_bytes
    assert (dest / "1.vhd").read_bytes() == disk_bytes[: 3 * MiB + 5]


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_empty_stream_is_valid(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "empty"
    with open(out, "wb") as f:
        open_compressor(kind, f).close()
    if kind == "gzip":
        run("gunzip", "-t", str(out))
        assert run("gzip", "-dc", str(out)) == b""
    elif kind == "zstd":
        assert run("zstd", "-dc", str(out)) == b""
    else:
        assert out.read_bytes() == b""


@pytest.mark.parametrize("level,long", [(1, False), (3, False), (3, True), (9, False)])
def test_zstd_round_trip_with_zstd_cli(tmp_path: Path, disk_bytes: bytes, level: int, long: bool) -> None:
    out = compress_to(tmp_path, "zstd", disk_bytes, "d.zst", level=level, long=long)
    run("zstd", "-tq", str(out))
    # plain `zstd -d`, no --long: long mode must stay inside the default decoder window
    assert run("zstd", "-dc", str(out)) == disk_bytes
    listing = run("zstd", "-lv", str(out)).decode()
    assert "XXH64" in listing  # content checksum is on, so zstd -t verified the bytes


def test_zstd_records_content_size_when_hinted(tmp_path: Path, disk_bytes: bytes) -> None:
    out = compress_to(tmp_path, "zstd", disk_bytes, "d.zst", size_hint=len(disk_bytes))
    listing = run("zstd", "-lv", str(out)).decode()
    assert f"({len(disk_bytes)} B)" in listing
    assert run("zstd", "-dc", str(out)) == disk_bytes


def test_zstd_threads_make_the_same_stream_content(disk_bytes: bytes) -> None:
    for threads in (0, 1, 2):
        buf = io.BytesIO()
        feed(ZstdCompressor(buf, threads=threads), disk_bytes)
        assert run("zstd", "-dc", input=buf.getvalue()) == disk_bytes


def test_zstd_output_is_the_same_bytes_for_the_same_level_and_threads(disk_bytes: bytes) -> None:
    # A resumed upload regenerates the stream and reuses stored segments whose md5 still matches (upload.resume).
    outs = set()
    for pieces in (ODD_PIECES, (1 * MiB,), (4 * MiB + 1, 17)):
        buf = io.BytesIO()
        feed(ZstdCompressor(buf, threads=2, level=3, size_hint=len(disk_bytes)), disk_bytes, pieces)
        outs.add(buf.getvalue())
    assert len(outs) == 1


def test_none_passes_bytes_through(disk_bytes: bytes) -> None:
    got: list[bytes] = []
    comp = NullCompressor(got.append)
    feed(comp, disk_bytes)
    assert all(type(x) is bytes for x in got)
    assert b"".join(got) == disk_bytes
    assert comp.bytes_in == comp.bytes_out == len(disk_bytes)


def test_output_receives_immutable_bytes_and_counts(disk_bytes: bytes) -> None:
    for kind in ("gzip", "zstd"):
        got: list[bytes] = []
        comp = open_compressor(kind, got.append)
        feed(comp, disk_bytes)
        assert got and all(type(x) is bytes and x for x in got)
        assert comp.bytes_in == len(disk_bytes)
        assert comp.bytes_out == sum(map(len, got))


def test_broadcast_feeds_every_output_in_order(disk_bytes: bytes) -> None:
    a, b = io.BytesIO(), []
    feed(open_compressor("gzip", broadcast(a, b.append), chunk_size=64 * KiB), disk_bytes)
    assert a.getvalue() == b"".join(b)
    assert gzip.decompress(a.getvalue()) == disk_bytes


def test_output_errors_propagate_and_stop_the_pool(disk_bytes: bytes) -> None:
    calls = 0

    def failing(data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(28, "No space left on device")

    comp = GzipCompressor(failing, chunk_size=64 * KiB)
    with pytest.raises(OSError, match="No space"):
        feed(comp, disk_bytes)
    comp.abort()
    assert comp._pool._shutdown
    with pytest.raises(ValueError):
        comp.write(b"more")


def test_context_manager_aborts_on_error() -> None:
    buf = io.BytesIO()
    with pytest.raises(RuntimeError):
        with open_compressor("gzip", buf) as comp:
            comp.write(b"x" * 100_000)
            raise RuntimeError("producer failed")
    assert comp.closed


def test_bad_options_are_refused() -> None:
    sink = io.BytesIO()
    with pytest.raises(ValueError, match="level"):
        open_compressor("gzip", sink, level=9)
    with pytest.raises(ValueError, match="level"):
        open_compressor("zstd", sink, level=0)
    with pytest.raises(ValueError, match="unknown compression"):
        open_compressor("lzma", sink)
    with pytest.raises(ValueError, match="chunk_size"):
        GzipCompressor(sink, chunk_size=10)
    with pytest.raises(TypeError):
        open_compressor("gzip", 42)
    assert DEFAULT_LEVELS == {"gzip": 1, "zstd": 3, "none": 0}

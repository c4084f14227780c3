"""Uploads to a real Swift (see tests/swift_server.py): SLO layout, etags, retries, fault injection, cleanup."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.swift_server import SwiftServer
from support.faultproxy import FaultProxy

from vhdcore.delivery.compress import broadcast, open_compressor
from vhdcore.delivery.digests import StreamDigests
from vhdcore.exceptions import VHDError
from vhdcore.delivery.upload import UploadError, open_sink
from vhdcore.delivery.upload.swift import SwiftSink, slo_etag

pytestmark = pytest.mark.backend_independent

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
FAST = dict(backoff=0.01, max_backoff=0.05)  # keep retries quick in tests


def creds(server: SwiftServer, auth_url: str | None = None) -> dict[str, Any]:
    return dict(auth_url=auth_url or server.auth_url, user=server.user, key=server.key)


def upload(dest: str, data: bytes, piece: int = 300_001, **opts: Any):
    sink = open_sink(dest, **opts)
    for i in range(0, len(data), piece):
        sink.write(data[i : i + piece])
    return sink, sink.close()


def segments_under(conn: Any, container: str, prefix: str) -> list[dict[str, Any]]:
    try:
        return conn.get_container(container, prefix=prefix, full_listing=True)[1]
    except Exception as exc:  # the segment container may not exist at all
        if getattr(exc, "http_status", None) == 404:
            return []
        raise


def swift_cli() -> str:
    venv_cli = Path(sys.executable).with_name("swift")
    return str(venv_cli) if venv_cli.exists() else "swift"


def test_slo_upload_round_trip(swift_server: SwiftServer, disk_bytes: bytes, tmp_path: Path) -> None:
    progress: list[tuple[int, Any]] = []
    sink, result = upload(
        "swift://images/vm-1/image.raw", disk_bytes, segment_size=1 * MiB, concurrency=2,
        progress=lambda done, total, **info: progress.append((done, total)), **creds(swift_server), **FAST,
    )
    assert isinstance(sink, SwiftSink)
    n_seg = -(-len(disk_bytes) // MiB)
    assert result.size == len(disk_bytes) and len(result.segments) == n_seg and not result.retries

    conn = swift_server.connection()
    # the bytes, through swiftclient and through the `swift` CLI
    headers, body = conn.get_object("images", "vm-1/image.raw")
    assert body == disk_bytes
    out = tmp_path / "download.raw"
    r = subprocess.run(
        [swift_cli(), "download", "images", "vm-1/image.raw", "-o", str(out)],
        env={**os.environ, **swift_server.env}, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == disk_bytes

    # the manifest lists every segment with the md5 of its bytes, in order
    _, raw = conn.get_object("images", "vm-1/image.raw", query_string="multipart-manifest=get")
    manifest = json.loads(raw)
    assert len(manifest) == n_seg
    expected_md5s = [hashlib.md5(disk_bytes[i : i + MiB]).hexdigest() for i in range(0, len(disk_bytes), MiB)]
    assert [m["hash"] for m in manifest] == expected_md5s
    assert [m["bytes"] for m in manifest] == [min(MiB, len(disk_bytes) - i) for i in range(0, len(disk_bytes), MiB)]
    assert all(m["name"].startswith("/images_segments/vm-1/image.raw/") for m in manifest)
    assert [m["name"] for m in manifest] == [s["path"] for s in result.segments]

    # each segment object really holds those bytes (its etag is Swift's md5 of what it stored)
    seg_objs = segments_under(conn, "images_segments", sink.prefix + "/")
    assert [o["hash"] for o in seg_objs] == expected_md5s

    # the SLO's etag: md5 of the concatenated segment etags
    head = conn.head_object("images", "vm-1/image.raw")
    assert head["x-static-large-object"].lower() == "true"
    assert int(head["content-length"]) == len(disk_bytes)
    assert head["etag"].strip('"') == hashlib.md5("".join(expected_md5s).encode()).hexdigest() == result.etag
    assert result.etag == slo_etag(expected_md5s)

    # progress: bytes sent only grow to the total, and the total is known at the end
    assert progress[-1] == (len(disk_bytes), len(disk_bytes))
    dones = [d for d, _ in progress]
    assert max(dones) == len(disk_bytes)


def test_short_stream_is_one_plain_object(swift_server: SwiftServer) -> None:
    _, result = upload("swift://images/small.bin", b"tiny image", segment_size=1 * MiB, **creds(swift_server))
    conn = swift_server.connection()
    head, body = conn.get_object("images", "small.bin")
    assert body == b"tiny image" and "x-static-large-object" not in head
    assert result.etag == hashlib.md5(b"tiny image").hexdigest() == head["etag"].strip('"')
    assert result.segments == []


def test_compressed_pipeline_with_digests(swift_server: SwiftServer, disk_bytes: bytes) -> None:
    digests = StreamDigests()
    sink = open_sink("swift://images/vm-2/image.raw.gz", segment_size=1 * MiB, **creds(swift_server))
    comp = open_compressor("gzip", broadcast(digests, sink), chunk_size=256 * KiB)
    for i in range(0, len(disk_bytes), 1_000_000):
        comp.write(disk_bytes[i : i + 1_000_000])
    comp.close()
    result = sink.close()
    _, body = swift_server.connection().get_object("images", "vm-2/image.raw.gz")
    assert gzip.decompress(body) == disk_bytes
    assert digests.hexdigests() == {a: hashlib.new(a, body).hexdigest() for a in ("md5", "sha256", "sha512")}
    assert result.size == len(body) == digests.size


@pytest.mark.parametrize("spool_memory", [64 * MiB, 200_000], ids=["in-memory", "spilled-to-disk"])
def test_dropped_connection_is_retried(swift_server: SwiftServer, fault_proxy: FaultProxy, disk_bytes: bytes,
                                       spool_memory: int) -> None:
    # With 200 000 bytes of memory, each 1 MiB segment is partly in memory, partly in its temporary file:
    # the retried PUT re-reads both.
    data = disk_bytes[: 3 * MiB + 1000]
    fault_proxy.drop_puts = 1
    sink, result = upload("swift://images/retry-drop.raw", data, segment_size=1 * MiB, spool_memory=spool_memory,
                          **creds(swift_server, fault_proxy.auth_url), **FAST)
    assert [e[0] for e in fault_proxy.events] == ["drop"]
    assert len(result.retries) == 1
    index, attempt, reason = result.retries[0]
    assert attempt == 1 and 0 <= index < 4 and "Connection" in reason
    conn = swift_server.connection()
    assert conn.get_object("images", "retry-drop.raw")[1] == data
    assert len(segments_under(conn, "images_segments", sink.prefix + "/")) == 4


def test_wrong_etag_once_is_retried(swift_server: SwiftServer, fault_proxy: FaultProxy, disk_bytes: bytes) -> None:
    data = disk_bytes[: 2 * MiB + 5]
    fault_proxy.bad_etag_puts = 1
    _, result = upload("swift://images/retry-etag.raw", data, segment_size=1 * MiB,
                       **creds(swift_server, fault_proxy.auth_url), **FAST)
    assert [e[0] for e in fault_proxy.events] == ["bad_etag"]
    assert len(result.retries) == 1 and "etag mismatch" in result.retries[0][2]
    assert swift_server.connection().get_object("images", "retry-etag.raw")[1] == data


def test_wrong_etag_every_time_fails_and_cleans_up(
    swift_server: SwiftServer, fault_proxy: FaultProxy, disk_bytes: bytes
) -> None:
    fault_proxy.bad_etag_puts = 1000
    sink = open_sink("swift://images/never.raw", segment_size=1 * MiB, attempts=3,
                     **creds(swift_server, fault_proxy.auth_url), **FAST)
    with pytest.raises(UploadError) as ei:
        for i in range(0, len(disk_bytes), 500_000):
            sink.write(disk_bytes[i : i + 500_000])
        sink.close()
    err = ei.value
    assert isinstance(err, VHDError)
    assert err.field == "etag" and err.value == "0123456789abcdef0123456789abcdef"
    assert err.path == "swift://images/never.raw" and err.offset is not None and err.offset % MiB == 0
    assert "after 3 attempts" in str(err)
    conn = swift_server.connection()
    # Swift did store the segments (only the response was rewritten); the abort removed them again
    assert fault_proxy.events and segments_under(conn, "images_segments", sink.prefix + "/") == []
    with pytest.raises(Exception) as nf:
        conn.head_object("images", "never.raw")
    assert getattr(nf.value, "http_status", None) == 404


def test_abort_deletes_uploaded_segments(swift_server: SwiftServer, disk_bytes: bytes) -> None:
    conn = swift_server.connection()
    sink = open_sink("swift://images/aborted.raw", segment_size=1 * MiB, **creds(swift_server))
    # Three sealed segments and a fourth spooling: with 2 concurrent PUTs the writer has waited for the
    # first segment to be stored before it could seal the third.
    sink.write(disk_bytes[: 3 * MiB + 10])
    assert len(sink.segments) == 3
    stored = segments_under(conn, "images_segments", sink.prefix + "/")
    assert stored and stored[0]["name"].endswith("/00000000")
    sink.abort()
    assert segments_under(conn, "images_segments", sink.prefix + "/") == []
    with pytest.raises(Exception):
        conn.head_object("images", "aborted.raw")
    with pytest.raises(ValueError):
        sink.write(b"more")


def test_failure_inside_with_block_aborts(swift_server: SwiftServer, disk_bytes: bytes) -> None:
    conn = swift_server.connection()
    with pytest.raises(RuntimeError):
        with open_sink("swift://images/with-abort.raw", segment_size=1 * MiB, **creds(swift_server)) as sink:
            sink.write(disk_bytes[: 2 * MiB])
            raise RuntimeError("the producer failed")
    assert segments_under(conn, "images_segments", sink.prefix + "/") == []


def test_bad_credentials_raise_upload_error(swift_server: SwiftServer) -> None:
    sink = open_sink("swift://images/denied.raw", segment_size=1 * MiB, auth_url=swift_server.auth_url,
                     user="admin:admin", key="wrong", **FAST)
    with pytest.raises(UploadError) as ei:
        sink.write(b"x" * (2 * MiB))
        sink.close()
    assert "401" in str(ei.value)


def test_credentials_from_the_environment(swift_server: SwiftServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in swift_server.env.items():
        monkeypatch.setenv(k, v)
    _, result = upload("swift://images/env.bin", b"abc" * 1000, segment_size=1 * MiB)
    assert swift_server.connection().get_object("images", "env.bin")[1] == b"abc" * 1000
    monkeypatch.delenv("ST_KEY")
    with pytest.raises(ValueError, match="credentials"):
        open_sink("swift://images/env2.bin")


def test_options_are_checked(swift_server: SwiftServer) -> None:
    with pytest.raises(ValueError, match="segment_size"):
        SwiftSink("c", "o", segment_size=6 * 1024**3, **creds(swift_server))
    with pytest.raises(ValueError, match="concurrency"):
        SwiftSink("c", "o", concurrency=0, **creds(swift_server))


def test_too_many_segments_is_refused(swift_server: SwiftServer) -> None:
    sink = open_sink("swift://images/huge.raw", segment_size=64 * KiB, max_segments=3, **creds(swift_server))
    with pytest.raises(UploadError, match="more than 3 segments") as ei:
        sink.write(b"\0" * (4 * 64 * KiB))
    assert ei.value.field == "segment_size"
    assert segments_under(swift_server.connection(), "images_segments", sink.prefix + "/") == []


def test_segments_grow_to_fit_a_known_size_before_anything_is_sent(swift_server: SwiftServer,
                                                                   disk_bytes: bytes) -> None:
    # 1000 segments of the 1 GiB default hold 1 TB: a bigger image used to fail at segment 1001, after the
    # first terabyte had gone up. Told the size up front, the sink grows its segments instead.
    from vhdcore.delivery.upload import deliver

    data = disk_bytes[: 5 * MiB + 3]
    result = deliver(iter([data]), "swift://images/grown.raw", compression="none", digests=(),
                     input_size=len(data), segment_size=64 * KiB, max_segments=3, **creds(swift_server))
    assert [s["size_bytes"] for s in result.upload.segments] == [2 * MiB, 2 * MiB, MiB + 3]
    assert "segment size raised from 65536 to 2097152" in result.upload.extra["warnings"][0]
    assert swift_server.connection().get_object("images", "grown.raw")[1] == data


def test_a_size_no_segmentation_can_hold_is_refused_up_front(swift_server: SwiftServer) -> None:
    with pytest.raises(UploadError, match="needs more than 2 segments") as ei:
        open_sink("swift://images/too-big.raw", segment_size=GiB, max_segments=2, expected_size=11 * GiB,
                  **creds(swift_server))
    assert ei.value.field == "segment_size"


def test_replacing_an_slo_deletes_its_old_segments(swift_server: SwiftServer, disk_bytes: bytes) -> None:
    conn = swift_server.connection()
    first, _ = upload("swift://images/replaced.raw", disk_bytes[: 2 * MiB + 1], segment_size=1 * MiB,
                      **creds(swift_server))
    assert len(segments_under(conn, "images_segments", first.prefix + "/")) == 3
    # kept on request (e.g. another manifest shares them)
    kept, r = upload("swift://images/replaced.raw", disk_bytes[: 2 * MiB], segment_size=1 * MiB,
                     leave_old_segments=True, **creds(swift_server))
    assert len(segments_under(conn, "images_segments", first.prefix + "/")) == 3
    # by default, replacing the SLO (here with a plain object) removes the old manifest's segments
    third, r = upload("swift://images/replaced.raw", b"small now", segment_size=1 * MiB, **creds(swift_server))
    assert segments_under(conn, "images_segments", kept.prefix + "/") == []
    assert len(segments_under(conn, "images_segments", first.prefix + "/")) == 3  # not part of the replaced SLO
    assert conn.get_object("images", "replaced.raw")[1] == b"small now"
    fourth, r = upload("swift://images/replaced.raw", disk_bytes[: 2 * MiB], segment_size=1 * MiB,
                       **creds(swift_server))
    assert r.extra["old_segments_deleted"] == 0  # the previous object was a plain one
    fifth, r = upload("swift://images/replaced.raw", disk_bytes[: 3 * MiB], segment_size=1 * MiB,
                      **creds(swift_server))
    assert r.extra["old_segments_deleted"] == 2 and r.extra["old_segments_left"] == 0
    assert segments_under(conn, "images_segments", fourth.prefix + "/") == []
    assert conn.get_object("images", "replaced.raw")[1] == disk_bytes[: 3 * MiB]

"""The whole delivery pipeline in one call: compress, digest, store; and its failure handling."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from support.swift_server import SwiftServer

from vhdcore.delivery.upload import DeliveryResult, deliver

pytestmark = pytest.mark.backend_independent

KiB = 1024
MiB = 1024 * KiB


def chunks(data: bytes, n: int = 1_048_573) -> Iterator[bytes]:
    for i in range(0, len(data), n):
        yield data[i : i + n]


@pytest.mark.parametrize("compression,check", [("gzip", ["gzip", "-dc"]), ("zstd", ["zstd", "-dc"]), ("none", ["cat"])])
def test_deliver_to_a_local_file(tmp_path: Path, disk_bytes: bytes, compression: str, check: list[str]) -> None:
    dest = tmp_path / f"image.{compression}"
    updates: list[tuple] = []
    result = deliver(chunks(disk_bytes), str(dest), compression=compression, input_size=len(disk_bytes),
                     fsync=False, progress=lambda d, t, **i: updates.append((d, t, i["state"])))
    assert isinstance(result, DeliveryResult)
    out = dest.read_bytes()
    assert subprocess.run([*check, str(dest)], capture_output=True, check=True).stdout == disk_bytes
    assert result.size == len(out) and result.input_size == len(disk_bytes)
    assert result.digests == {a: hashlib.new(a, out).hexdigest() for a in ("md5", "sha256", "sha512")}
    assert result.glance_properties()["checksum"] == hashlib.md5(out).hexdigest()
    assert updates[0] == (0, len(disk_bytes), "saving") and updates[-1] == (len(disk_bytes), len(disk_bytes), "saving")
    assert [d for d, _, _ in updates] == sorted(d for d, _, _ in updates)


def test_deliver_reads_a_file_object(tmp_path: Path, disk_bytes: bytes) -> None:
    dest = tmp_path / "image.zst"
    result = deliver(io.BytesIO(disk_bytes), str(dest), digests=("md5",), fsync=False, read_size=100_000)
    assert subprocess.run(["zstd", "-dc", str(dest)], capture_output=True, check=True).stdout == disk_bytes
    assert set(result.digests) == {"md5"}


def test_a_failing_producer_leaves_nothing(tmp_path: Path, disk_bytes: bytes) -> None:
    threads_before = set(threading.enumerate())

    def broken() -> Iterator[bytes]:
        yield disk_bytes[: 3 * MiB]
        raise OSError(5, "Input/output error reading the parent VHD")

    with pytest.raises(OSError, match="Input/output"):
        deliver(broken(), str(tmp_path / "image.gz"), compression="gzip")
    assert os.listdir(tmp_path) == []
    leftover = {t for t in set(threading.enumerate()) - threads_before if t.is_alive()}
    assert not leftover, leftover


def test_deliver_to_swift(swift_server: SwiftServer, disk_bytes: bytes) -> None:
    result = deliver(chunks(disk_bytes), "swift://images/deliver/image.raw.zst", compression="zstd",
                     segment_size=256 * KiB, auth_url=swift_server.auth_url, user=swift_server.user,
                     key=swift_server.key)
    _, body = swift_server.connection().get_object("images", "deliver/image.raw.zst")
    assert subprocess.run(["zstd", "-dc"], input=body, capture_output=True, check=True).stdout == disk_bytes
    assert result.digests["sha512"] == hashlib.sha512(body).hexdigest()
    assert len(result.upload.segments) == -(-len(body) // (256 * KiB))

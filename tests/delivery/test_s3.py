"""S3 multipart uploads through boto3, against Swift's real s3api middleware (see tests/swift_server.py)."""
from __future__ import annotations

import hashlib
from typing import Any

import pytest

from support.swift_server import SwiftServer

from vhdcore.delivery.upload import UploadError, open_sink
from vhdcore.delivery.upload.s3 import S3Sink, multipart_etag

pytestmark = pytest.mark.backend_independent

KiB = 1024
MiB = 1024 * KiB


def s3_opts(server: SwiftServer, **kw: Any) -> dict[str, Any]:
    return dict(endpoint_url=server.s3_endpoint, access_key=server.user, secret_key=server.key,
                backoff=0.01, max_backoff=0.05, **kw)


@pytest.fixture(scope="module")
def bucket(swift_server: SwiftServer) -> str:
    swift_server.s3_client().create_bucket(Bucket="vhd-images")
    return "vhd-images"


def test_multipart_round_trip(swift_server: SwiftServer, bucket: str, disk_bytes: bytes) -> None:
    data = disk_bytes * 2 + b"tail"  # ~10 MiB: two full 5 MiB parts and a short last one
    sent: list[int] = []
    sink = open_sink(f"s3://{bucket}/vm-1/disk.raw", **s3_opts(swift_server, part_size=5 * MiB,
                     progress=lambda done, total, **i: sent.append(done)))
    assert isinstance(sink, S3Sink)
    for i in range(0, len(data), 999_999):
        sink.write(data[i : i + 999_999])
    result = sink.close()
    parts = [data[i : i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    md5s = [hashlib.md5(p).hexdigest() for p in parts]
    assert [s["etag"] for s in result.segments] == md5s and len(md5s) == 3
    assert result.etag == multipart_etag(md5s) and result.etag.endswith("-3")

    s3 = swift_server.s3_client()
    head = s3.head_object(Bucket=bucket, Key="vm-1/disk.raw")
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"') == result.etag
    assert s3.get_object(Bucket=bucket, Key="vm-1/disk.raw")["Body"].read() == data
    # Swift's own view of it: an SLO whose manifest has the same three parts
    swift_head = swift_server.connection().head_object(bucket, "vm-1/disk.raw")
    assert swift_head["x-static-large-object"].lower() == "true"
    assert max(sent) == len(data)
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_short_stream_is_a_single_put(swift_server: SwiftServer, bucket: str) -> None:
    sink = open_sink(f"s3://{bucket}/small.bin", **s3_opts(swift_server))
    sink.write(b"small image")
    result = sink.close()
    assert result.etag == hashlib.md5(b"small image").hexdigest() and result.segments == []
    body = swift_server.s3_client().get_object(Bucket=bucket, Key="small.bin")["Body"].read()
    assert body == b"small image"


def test_abort_aborts_the_multipart_upload(swift_server: SwiftServer, bucket: str, disk_bytes: bytes) -> None:
    s3 = swift_server.s3_client()
    sink = open_sink(f"s3://{bucket}/aborted.raw", **s3_opts(swift_server, part_size=5 * MiB, concurrency=1))
    sink.write(disk_bytes * 2)  # two parts sealed; with one PUT at a time the first is stored by now
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [sink.upload_id]
    parts = s3.list_parts(Bucket=bucket, Key="aborted.raw", UploadId=sink.upload_id).get("Parts", [])
    assert parts and parts[0]["PartNumber"] == 1
    sink.abort()
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    with pytest.raises(Exception) as ei:
        s3.head_object(Bucket=bucket, Key="aborted.raw")
    assert ei.value.response["Error"]["Code"] in ("404", "NoSuchKey")


def test_missing_bucket_is_an_upload_error(swift_server: SwiftServer, disk_bytes: bytes) -> None:
    sink = open_sink("s3://no-such-bucket/x.raw", **s3_opts(swift_server, part_size=5 * MiB))
    with pytest.raises(UploadError) as ei:
        sink.write(disk_bytes * 2)
        sink.close()
    assert ei.value.field == "error_code" and ei.value.value == "NoSuchBucket"
    assert ei.value.path == "s3://no-such-bucket/x.raw"


def test_part_size_limits() -> None:
    with pytest.raises(ValueError, match="segment_size"):
        S3Sink("bkt", "k", part_size=1 * MiB, endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b")

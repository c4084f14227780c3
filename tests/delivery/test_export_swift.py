"""vhdcore.export into a real Swift (SLO) and its S3 API (multipart), read back with the swift CLI and boto3,
decompressed with the standard tools and compared with the source chain's content; retries and etag checks
through a fault-injecting relay; verify against the uploaded object."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.exportcheck import EXT, assert_package_holds, decompress
from support.faultproxy import FaultProxy
from support.swift_server import SwiftServer
from support.vhdtest import build_chain

from vhdcore.delivery.export import export, verify
from vhdcore.delivery.upload import UploadError

# The chain is read through the kernels, but those paths are covered per backend by tests/test_export.py;
# what is tested here is the delivery, so once is enough.
pytestmark = pytest.mark.backend_independent

KiB = 1024
MiB = 1024 * KiB
SEGMENT = 256 * KiB
FAST = dict(backoff=0.01, max_backoff=0.05)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("chain")
    paths, model = build_chain(d, 3, size=3 * MiB + 1024, block_size=256 * KiB, writes=20, seed=21)
    return paths[-1], bytes(model)


def creds(server: SwiftServer, auth_url: str | None = None) -> dict[str, Any]:
    return dict(auth_url=auth_url or server.auth_url, user=server.user, key=server.key)


def swift_cli() -> str:
    venv_cli = Path(sys.executable).with_name("swift")
    return str(venv_cli) if venv_cli.exists() else "swift"


def swift_download(server: SwiftServer, container: str, obj: str, out: Path) -> Path:
    r = subprocess.run([swift_cli(), "download", container, obj, "-o", str(out)],
                       env={**os.environ, **server.env}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("package", ["vhd", "fixed", "raw", "chain-tar"])
def test_export_to_swift_reads_back(swift_server: SwiftServer, chain: tuple[Path, bytes], tmp_path: Path,
                                    package: str, compression: str) -> None:
    leaf, model = chain
    obj = f"exports/{package}.img{EXT[compression]}"
    states: list[str] = []
    rep = export(leaf, f"swift://images/{obj}", package=package, segment_size=SEGMENT, **creds(swift_server),
                 progress=lambda d, t, **i: states.append(str(getattr(i["state"], "value", i["state"]))))
    assert rep.compression == compression
    assert states[0] == "preparing" and "uploading" in states and states[-1] == "complete"

    body = swift_download(swift_server, "images", obj, tmp_path / "download").read_bytes()
    assert len(body) == rep.size
    assert rep.digests == {a: hashlib.new(a, body).hexdigest() for a in ("md5", "sha256", "sha512")}
    plain = decompress(tmp_path / "download", compression, tmp_path / "plain")
    assert plain.stat().st_size == rep.package_size
    assert_package_holds(plain, package, model, tmp_path, depth=3)

    # The SLO manifest lists segments of SEGMENT bytes (the last shorter) with the md5 of their bytes.
    conn = swift_server.connection()
    segs = rep.upload.segments
    if rep.size > SEGMENT:
        _, raw = conn.get_object("images", obj, query_string="multipart-manifest=get")
        manifest = json.loads(raw)
        assert [m["hash"] for m in manifest] == [s["etag"] for s in segs]
        assert [m["bytes"] for m in manifest] == [min(SEGMENT, rep.size - i * SEGMENT) for i in range(len(segs))]
        assert [hashlib.md5(body[i * SEGMENT: (i + 1) * SEGMENT]).hexdigest() for i in range(len(segs))] == \
            [m["hash"] for m in manifest]
        container, name = manifest[-1]["name"].lstrip("/").split("/", 1)
        assert conn.get_object(container, name)[1] == body[(len(segs) - 1) * SEGMENT:]
        head = conn.head_object("images", obj)
        assert head["etag"].strip('"') == rep.upload.etag
        assert rep.upload.etag == hashlib.md5("".join(m["hash"] for m in manifest).encode()).hexdigest()
    # the manifest of the content went up beside it, and the object verifies against the source
    assert rep.manifest_path == f"swift://images/{obj}.xxh3.json"
    assert json.loads(conn.get_object("images", obj + ".xxh3.json")[1])["size"] == len(model)
    v = verify(f"swift://images/{obj}", leaf, **creds(swift_server))
    assert v.match, v.message


@pytest.fixture(scope="module")
def bucket(swift_server: SwiftServer) -> str:
    swift_server.s3_client().create_bucket(Bucket="vhd-exports")
    return "vhd-exports"


@pytest.mark.parametrize("package,compression", [("vhd", "zstd"), ("fixed", "gzip"), ("raw", "none"),
                                                 ("chain-tar", "none")])
def test_export_to_s3_multipart_reads_back(swift_server: SwiftServer, bucket: str, chain: tuple[Path, bytes],
                                           tmp_path: Path, package: str, compression: str) -> None:
    leaf, model = chain
    key = f"exports/{package}.img{EXT[compression]}"
    rep = export(leaf, f"s3://{bucket}/{key}", package=package, part_size=5 * MiB,
                 endpoint_url=swift_server.s3_endpoint, access_key=swift_server.user, secret_key=swift_server.key,
                 **FAST)
    s3 = swift_server.s3_client()
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert rep.digests["sha512"] == hashlib.sha512(body).hexdigest() and len(body) == rep.size
    if rep.size > 5 * MiB:  # uncompressed packages of this chain go up in parts
        assert len(rep.upload.segments) == -(-rep.size // (5 * MiB)) and rep.upload.etag.endswith(
            f"-{len(rep.upload.segments)}")
        assert s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"') == rep.upload.etag
    (tmp_path / "download").write_bytes(body)
    plain = decompress(tmp_path / "download", compression, tmp_path / "plain")
    assert_package_holds(plain, package, model, tmp_path, depth=3)
    v = verify(f"s3://{bucket}/{key}", leaf, endpoint_url=swift_server.s3_endpoint, access_key=swift_server.user,
               secret_key=swift_server.key)
    assert v.match, v.message


def test_a_dropped_connection_mid_upload_is_retried(swift_server: SwiftServer, fault_proxy: FaultProxy,
                                                    chain: tuple[Path, bytes], tmp_path: Path) -> None:
    leaf, model = chain
    fault_proxy.drop_puts = 1
    rep = export(leaf, "swift://images/retry/disk.raw", package="raw", segment_size=SEGMENT * 4,
                 **creds(swift_server, fault_proxy.auth_url), **FAST)
    assert [e[0] for e in fault_proxy.events] == ["drop"]
    assert len(rep.upload.retries) == 1 and rep.upload.retries[0][1] == 1
    assert swift_download(swift_server, "images", "retry/disk.raw", tmp_path / "d").read_bytes() == model
    assert rep.digests["md5"] == hashlib.md5(model).hexdigest()


def test_a_wrong_etag_is_detected_and_nothing_is_left(swift_server: SwiftServer, fault_proxy: FaultProxy,
                                                      chain: tuple[Path, bytes]) -> None:
    leaf, _ = chain
    fault_proxy.bad_etag_puts = 1000
    with pytest.raises(UploadError) as ei:
        export(leaf, "swift://images/broken/disk.vhd", segment_size=SEGMENT, attempts=2,
               **creds(swift_server, fault_proxy.auth_url), **FAST)
    assert ei.value.field == "etag" and "0123456789abcdef" in str(ei.value.value)
    conn = swift_server.connection()
    listing = conn.get_container("images", prefix="broken/")[1]
    assert listing == []  # neither the image nor its manifest
    try:
        segs = conn.get_container("images_segments", prefix="broken/")[1]
    except Exception as exc:  # the segment container may not exist
        assert getattr(exc, "http_status", None) == 404
        segs = []
    assert segs == []


def test_verify_a_damaged_upload_and_the_cli(swift_server: SwiftServer, chain: tuple[Path, bytes],
                                             tmp_path: Path) -> None:
    leaf, model = chain
    env = {**os.environ, **swift_server.env}
    r = subprocess.run([sys.executable, "-m", "vhdcore", "export", str(leaf), "swift://images/cli/disk.vhd.zst",
                        "--segment-size", "256K", "--json", "--progress", "none"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["compression"] == "zstd" and len(doc["upload"]["segments"]) >= 1
    r = subprocess.run([sys.executable, "-m", "vhdcore", "verify", "swift://images/cli/disk.vhd.zst", str(leaf)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # the manifest beside the object against the source chain, and a damaged copy against the manifest
    r = subprocess.run([sys.executable, "-m", "vhdcore", "verify", "swift://images/cli/disk.vhd.zst.xxh3.json",
                        str(leaf)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = bytearray(model)
    bad[2 * MiB + 1] ^= 0xFF
    conn = swift_server.connection()
    conn.put_object("images", "cli/damaged.raw", bytes(bad))
    v = verify("swift://images/cli/damaged.raw", leaf, **creds(swift_server))
    assert not v.match and v.offset == 2 * MiB + 1
    v = verify("swift://images/cli/damaged.raw", "swift://images/cli/disk.vhd.zst.xxh3.json", **creds(swift_server))
    assert not v.match and v.offset == 2 * MiB
    r = subprocess.run([sys.executable, "-m", "vhdcore", "verify", "swift://images/cli/missing.raw", str(leaf)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "404" in r.stderr

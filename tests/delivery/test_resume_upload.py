"""Resumable uploads of a job (vhdcore.jobs + vhdcore.delivery.upload.resume) against the real Swift and its S3 API.

An upload cut off after some segments (a dropped connection through the fault relay) leaves the job in state
``retry``; the rerun regenerates the same stream, reuses the stored segments (counted at the relay: they are
not PUT again) and commits an object whose bytes match the record's digests and the source chain."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from support.faultproxy import FaultProxy
from support.swift_server import SwiftServer
from support.vhdtest import build_chain

from vhdcore.jobs import run_job
from vhdcore.jobs.runner import is_retryable
from vhdcore.delivery.upload import UploadError

# What is tested is the delivery and the job around it; the kernels are covered per backend elsewhere.
pytestmark = pytest.mark.backend_independent

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("chain")
    paths, model = build_chain(d, 2, size=12 * MiB, block_size=512 * KiB, writes=40, seed=33)
    return paths[-1], bytes(model)


def _state(job_dir: Path) -> dict[str, Any]:
    return json.loads((job_dir / "upload-state.json").read_text())


def _qemu_content(vhd: bytes, work: Path) -> bytes:
    from support.exportcheck import qemu_raw

    (work / "out.vhd").write_bytes(vhd)
    return qemu_raw(work / "out.vhd", work / "out.raw").read_bytes()


def test_swift_upload_dropped_after_segments_is_retried_and_reuses_them(
        swift_server: SwiftServer, chain: tuple[Path, bytes], tmp_path: Path) -> None:
    leaf, model = chain
    proxy = FaultProxy(swift_server.proxy_port)
    try:
        opts = dict(auth_url=proxy.auth_url, user=swift_server.user, key=swift_server.key, compression="zstd",
                    segment_size=512 * KiB, concurrency=1, attempts=2, backoff=0.01, max_backoff=0.05, analyse=False)
        job = tmp_path / "job"
        dest = "swift://resume/vm-1.vhd.zst"
        proxy.pass_puts, proxy.drop_puts = 3, 10  # three segments stored, then the link keeps dying
        with pytest.raises(UploadError) as err:
            run_job(leaf, dest, job, **opts)
        assert is_retryable(err.value, "export")
        rec = json.loads((job / "job.json").read_text())
        assert rec["state"] == "retry"
        state = _state(job)
        stored = {e["index"]: e for e in state["segments"]}
        assert sorted(stored) == [0, 1, 2]
        conn = swift_server.connection()
        for e in stored.values():  # kept in the store for the next attempt, not cleaned up
            head = conn.head_object("resume_segments", e["name"])
            assert head["etag"] == e["md5"] and int(head["content-length"]) == e["size"]

        proxy.drop_puts, first = 0, len(proxy.puts)
        rec = run_job(leaf, dest, job, **opts)
        assert rec.state == "complete" and rec.data["attempt"] == 2
        resent = [p for p in proxy.puts[first:] if "_segments/" in p]
        out = rec.stage("export")["result"]
        assert out["segments_reused"] == 3
        total = len(json.loads(conn.get_object("resume", "vm-1.vhd.zst",
                                               query_string="multipart-manifest=get")[1]))
        assert total > 4 and len(resent) == total - 3  # only the missing segments went up again
        assert not any(e["name"].split("/")[-1] in {p.split("/")[-1] for p in resent} for e in stored.values())
        assert not (job / "upload-state.json").exists()

        _, body = conn.get_object("resume", "vm-1.vhd.zst")
        assert hashlib.sha256(body).hexdigest() == out["digests"]["sha256"] and len(body) == out["size"]
        import zstandard

        vhd = zstandard.ZstdDecompressor().decompressobj().decompress(body)
        assert _qemu_content(vhd, tmp_path) == model
    finally:
        proxy.close()


def test_upload_state_of_another_job_is_ignored(swift_server: SwiftServer, chain: tuple[Path, bytes],
                                                 tmp_path: Path) -> None:
    leaf, model = chain
    proxy = FaultProxy(swift_server.proxy_port)
    try:
        opts = dict(auth_url=proxy.auth_url, user=swift_server.user, key=swift_server.key, compression="none",
                    segment_size=1 * MiB, concurrency=1, attempts=1, backoff=0.01, max_backoff=0.05, analyse=False)
        job = tmp_path / "job"
        proxy.pass_puts, proxy.drop_puts = 2, 10
        with pytest.raises(UploadError):
            run_job(leaf, "swift://resume/vm-2.vhd", job, **opts)
        # a planted state naming other segments (and a bogus md5) is not trusted: everything is sent again
        state = _state(job)
        state["binding"]["job"] = "someone-else"
        (job / "upload-state.json").write_text(json.dumps(state))
        proxy.drop_puts, first = 0, len(proxy.puts)
        rec = run_job(leaf, "swift://resume/vm-2.vhd", job, **opts)
        assert rec.stage("export")["result"]["segments_reused"] == 0
        assert len([p for p in proxy.puts[first:] if "_segments/" in p]) == rec.stage("export")["result"]["size"] // MiB + 1
        _, body = swift_server.connection().get_object("resume", "vm-2.vhd")
        assert _qemu_content(body, tmp_path) == model
    finally:
        proxy.close()


def test_s3_multipart_dropped_is_resumed_with_the_same_upload_id(
        swift_server: SwiftServer, chain: tuple[Path, bytes], tmp_path: Path) -> None:
    leaf, model = chain
    swift_server.s3_client().create_bucket(Bucket="resume-s3")
    proxy = FaultProxy(swift_server.proxy_port, match="uploadId=")
    try:
        opts = dict(endpoint_url=proxy.url, access_key=swift_server.user, secret_key=swift_server.key,
                    compression="none", part_size=5 * MiB, concurrency=1, attempts=1, backoff=0.01, max_backoff=0.05,
                    analyse=False)
        job = tmp_path / "job"
        dest = "s3://resume-s3/vm-3.vhd"
        proxy.pass_puts, proxy.drop_puts = 1, 10
        with pytest.raises(UploadError):
            run_job(leaf, dest, job, **opts)
        state = _state(job)
        assert [e["index"] for e in state["segments"]] == [0] and state["token"]
        proxy.drop_puts, first = 0, len(proxy.puts)
        rec = run_job(leaf, dest, job, **opts)
        out = rec.stage("export")["result"]
        assert rec.state == "complete" and out["segments_reused"] == 1
        parts = -(-out["size"] // (5 * MiB))
        assert parts >= 3 and len(proxy.puts) - first == parts - 1
        assert all(f"uploadId={state['token']}" in p for p in proxy.puts[first:])  # the same multipart upload
        body = swift_server.s3_client().get_object(Bucket="resume-s3", Key="vm-3.vhd")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == out["digests"]["sha256"]
        assert _qemu_content(body, tmp_path) == model
    finally:
        proxy.close()


def test_swift_upload_sigkilled_mid_way_resumes(swift_server: SwiftServer, chain: tuple[Path, bytes],
                                                tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    leaf, model = chain
    proxy = FaultProxy(swift_server.proxy_port)
    job, dest = tmp_path / "job", "swift://resume/vm-4.vhd"
    opts = dict(auth_url=proxy.auth_url, user=swift_server.user, key=swift_server.key, compression="none",
                segment_size=512 * KiB, concurrency=1, analyse=False)
    code = ("import sys, json; from vhdcore.jobs import run_job; "
            "run_job(sys.argv[1], sys.argv[2], sys.argv[3], max_upload_rate=1024 * 1024, **json.loads(sys.argv[4]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(leaf), dest, str(job), json.dumps(opts)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end and proc.poll() is None:
            try:
                if len(_state(job)["segments"]) >= 3:
                    break
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        else:
            raise AssertionError(f"the upload never got going: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        recorded = len(_state(job)["segments"])
        first = len(proxy.puts)
        rec = run_job(leaf, dest, job, **opts)
        out = rec.stage("export")["result"]
        total = -(-out["size"] // (512 * KiB))
        resent = [p for p in proxy.puts[first:] if "_segments/" in p]
        assert rec.state == "complete" and out["segments_reused"] == recorded >= 3
        assert len(resent) == total - recorded, (len(resent), total, recorded)
        _, body = swift_server.connection().get_object("resume", "vm-4.vhd")
        assert hashlib.sha256(body).hexdigest() == out["digests"]["sha256"]
        assert _qemu_content(body, tmp_path) == model
        print(f"killed after {recorded} of {total} segments; rerun sent {len(resent)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proxy.close()

"""Upload to S3 (or an S3-compatible store such as Swift's s3api) with a boto3 multipart upload.

``s3://bucket/key``: the stream is cut into parts as it arrives (default 128 MiB; S3 allows 5 MiB-5 GiB
per part and 10 000 parts), each ``UploadPart`` sent with its ``Content-MD5`` (the store rejects a damaged
body) and the returned ETag compared with our md5; failed parts are retried, then
``CompleteMultipartUpload`` and a HEAD that checks size and the multipart ETag (``md5(md5s)-N``). Any
failure, or ``abort()``, calls ``AbortMultipartUpload`` so no parts are left billed, unless the upload is
resumable (``resume_state``): then the upload stays open, and the next attempt continues the recorded upload id
(``ListParts``) and skips the parts whose etag and size match the regenerated part's md5. A stream shorter than
one part goes up with one ``PutObject``.

Endpoint and credentials: ``endpoint_url`` (or ``S3_ENDPOINT_URL``/``AWS_ENDPOINT_URL``), ``region``
(``AWS_DEFAULT_REGION``, default ``us-east-1``), ``access_key``/``secret_key`` or boto3's usual chain
(``AWS_ACCESS_KEY_ID``...). Path-style addressing by default when an endpoint is given, since
S3-compatible servers rarely have wildcard DNS.
"""
from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

from . import UploadError, check_object_name
from .segmented import CountingReader, EtagMismatch, Segment, SegmentedSink

__all__ = ["S3Sink", "multipart_etag"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_RETRY_CODES = {"RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "InternalError", "ServiceUnavailable",
                "BadDigest", "Throttling", "ThrottlingException"}


def multipart_etag(part_md5s: list[str]) -> str:
    """The ETag S3 gives a multipart object: md5 of the concatenated binary part md5s, ``-`` part count."""
    joined = b"".join(bytes.fromhex(m) for m in part_md5s)
    return f"{hashlib.md5(joined).hexdigest()}-{len(part_md5s)}"


def _b64md5(hexdigest: str) -> str:
    return base64.b64encode(bytes.fromhex(hexdigest)).decode("ascii")


class S3Sink(SegmentedSink):
    """Stream to ``s3://bucket/key`` with a multipart upload (see the module docstring).

    Options: ``part_size`` (alias ``segment_size``; default 128 MiB), ``endpoint_url``, ``region``,
    ``access_key``/``secret_key``/``session_token``, ``addressing_style`` (``path``/``virtual``/``auto``),
    ``create_bucket`` (default False), ``content_type``, ``metadata``, ``verify`` (TLS), ``client`` (a
    ready boto3 S3 client), plus the shared ``concurrency``/``attempts``/``backoff``/``spool_*``/``progress``.
    """

    kind = "s3"
    MIN_SEGMENT = 5 * MiB  # S3's minimum for every part but the last
    MAX_SEGMENT = 5 * GiB
    MAX_SEGMENTS = 10000

    def __init__(
        self,
        bucket: str,
        key: str,
        *,
        part_size: int | None = None,
        segment_size: int | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        addressing_style: str | None = None,
        create_bucket: bool = False,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
        verify: bool | str | None = None,
        client: Any = None,
        **opts: Any,
    ) -> None:
        check_object_name("s3", bucket, key)  # before any request (also for direct API callers)
        size = part_size or segment_size or 128 * MiB
        super().__init__(f"s3://{bucket}/{key}", segment_size=size, **opts)
        self.bucket = bucket
        self.key = key
        self.create_bucket = create_bucket
        self.content_type = content_type
        self.metadata = dict(metadata or {})
        self.upload_id: str | None = None
        self._object_put = False
        if client is None:
            import boto3
            from botocore.config import Config

            endpoint_url = endpoint_url or os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
            style = addressing_style or ("path" if endpoint_url else "auto")
            config = Config(
                s3={"addressing_style": style},
                signature_version="s3v4",
                # One retry policy, ours: it also compares ETags and rewinds the spooled part.
                retries={"total_max_attempts": 1, "mode": "standard"},
                # We send Content-MD5 ourselves; plain bodies keep S3-compatible servers happy.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=max(10, self.concurrency + 2),
            )
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                aws_session_token=session_token,
                verify=verify,
                config=config,
            )
        self.client = client  # boto3 clients are thread-safe; the upload threads share it

    # -- policy
    def _is_retryable(self, exc: BaseException) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return err.get("Code") in _RETRY_CODES or status >= 500 or status in (408, 429)
        if isinstance(exc, (BotoConnectionError, EtagMismatch)):
            return True
        if isinstance(exc, BotoCoreError):
            return "Timeout" in type(exc).__name__ or "Connection" in type(exc).__name__
        return isinstance(exc, (ConnectionError, TimeoutError, OSError))

    def _describe(self, exc: BaseException) -> tuple[str, Any]:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            return "error_code", err.get("Code")
        return super()._describe(exc)

    # -- preflight
    def preflight(self) -> None:
        """Before any work: the credentials work and the bucket exists (or is created, when allowed)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (401, 403) or code in ("403", "AccessDenied", "InvalidAccessKeyId",
                                                "SignatureDoesNotMatch"):
                raise UploadError(f"S3 refused the credentials for bucket {self.bucket} ({code})",
                                  path=self.destination, field="auth", value=code) from exc
            if status != 404 and code not in ("404", "NoSuchBucket"):
                raise UploadError(f"S3 bucket {self.bucket} could not be checked ({code})",
                                  path=self.destination, field="bucket", value=code) from exc
        except Exception as exc:
            raise UploadError(f"S3 bucket {self.bucket} could not be checked ({type(exc).__name__}: {exc})",
                              path=self.destination, field="bucket") from exc
        if not self.create_bucket:
            raise UploadError(f"S3 bucket {self.bucket} does not exist (and creating it was not allowed)",
                              path=self.destination, field="bucket", value=self.bucket)
        try:
            self._ensure_bucket()
        except Exception as exc:
            raise UploadError(f"S3 bucket {self.bucket} does not exist and could not be created ({exc})",
                              path=self.destination, field="bucket", value=self.bucket) from exc

    # -- hooks
    def _ensure_bucket(self) -> None:
        if not self.create_bucket:
            return
        from botocore.exceptions import ClientError

        def create() -> None:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._with_retries(f"creating bucket {self.bucket}", None, create)

    def _begin(self) -> None:
        self._ensure_bucket()

        def create() -> str:
            resp = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self.key, ContentType=self.content_type, Metadata=self.metadata
            )
            return resp["UploadId"]

        state = self.resume_state
        self._stored_parts: dict[int, tuple[str, int]] = {}
        if state is not None and state.token is not None:
            parts = self._with_retries("ListParts", None, lambda: self._list_parts(state.token))
            if parts is not None:  # the recorded multipart upload is still open: continue it
                self.upload_id, self._stored_parts = state.token, parts
        if self.upload_id is None:
            self.upload_id = self._with_retries("CreateMultipartUpload", None, create)
        if state is not None:
            state.begin(self.upload_id)

    def _list_parts(self, upload_id: str) -> dict[int, tuple[str, int]] | None:
        """The parts stored under ``upload_id`` (number -> (etag, size)), or None if no such upload is open."""
        from botocore.exceptions import ClientError

        parts: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            try:
                resp = self.client.list_parts(Bucket=self.bucket, Key=self.key, UploadId=upload_id,
                                              PartNumberMarker=marker)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchUpload", "404"):
                    return None
                raise
            for p in resp.get("Parts", []):
                n, size = p.get("PartNumber"), p.get("Size")
                if type(n) is int and 1 <= n <= self.max_segments and type(size) is int:
                    parts[n] = (str(p.get("ETag", "")).strip('"'), size)
            nxt = resp.get("NextPartNumberMarker")
            if not resp.get("IsTruncated") or type(nxt) is not int or nxt <= marker or len(parts) > self.max_segments:
                return parts
            marker = nxt

    def _stored_etag(self, seg: Segment) -> str | None:
        stored = self._stored_parts.get(seg.index + 1)
        return stored[0] if stored is not None and stored[1] == seg.size else None

    def _segment_name(self, seg: Segment) -> str:
        return f"part {seg.index + 1}"

    def _put_segment(self, seg: Segment, body: CountingReader) -> str:
        assert seg.md5 is not None
        resp = self.client.upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=seg.index + 1,
            Body=body, ContentLength=seg.size, ContentMD5=_b64md5(seg.md5),
        )
        return resp.get("ETag", "")

    def _put_single(self, body: CountingReader, size: int, md5: str) -> str:
        self._ensure_bucket()
        resp = self.client.put_object(
            Bucket=self.bucket, Key=self.key, Body=body, ContentLength=size, ContentMD5=_b64md5(md5),
            ContentType=self.content_type, Metadata=self.metadata,
        )
        self._object_put = True
        return resp.get("ETag", "")

    def _close_single(self) -> str:
        etag = super()._close_single()
        self._check_head(etag, self.bytes_written)
        return etag

    def _complete(self, segments: list[Segment]) -> tuple[str | None, dict[str, Any]]:
        parts = [{"ETag": f'"{s.etag}"', "PartNumber": s.index + 1} for s in segments]
        expected = multipart_etag([s.etag or "" for s in segments])

        def complete() -> str:
            resp = self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
            )
            return resp.get("ETag", "").strip('"')

        got = self._with_retries("CompleteMultipartUpload", None, complete)
        self._object_put = True
        if got != expected:
            raise UploadError(f"multipart ETag differs from ours ({expected})", path=self.destination,
                              field="etag", value=got)
        self._check_head(expected, sum(s.size for s in segments))
        return expected, {"upload_id": self.upload_id, "parts": len(segments)}

    def _check_head(self, etag: str, size: int) -> None:
        resp = self._with_retries("HeadObject", None, lambda: self.client.head_object(Bucket=self.bucket, Key=self.key))
        got_size = resp.get("ContentLength")
        got_etag = resp.get("ETag", "").strip('"')
        if got_size != size:
            raise UploadError("uploaded object has the wrong size", path=self.destination,
                              field="ContentLength", value=got_size)
        if got_etag != etag:
            raise UploadError(f"uploaded object's ETag differs from ours ({etag})", path=self.destination,
                              field="etag", value=got_etag)

    def _cleanup(self, segments: list[Segment]) -> None:
        errors = []
        if self._object_put:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
            except Exception as exc:
                errors.append(f"DeleteObject: {exc}")
        elif self.upload_id is not None and self.resume_state is None:  # resumable: the parts are kept
            for attempt in range(3):
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
                    break
                except Exception as exc:
                    code = getattr(exc, "response", {}).get("Error", {}).get("Code")
                    if code == "NoSuchUpload":
                        break
                    if attempt == 2:
                        errors.append(f"AbortMultipartUpload: {exc}")
        if errors:
            raise UploadError(f"cleanup failed: {'; '.join(errors)}", path=self.destination,
                              field="cleanup", value=len(errors))

"""Read back what was delivered: a streaming GET of a ``swift://`` or ``s3://`` object (or a local file).

The counterpart of the sinks, used by ``vhdcore verify`` to check an uploaded image without a local copy:
:func:`open_download` returns a read-only binary stream (``read(n)``, ``close()``) that pulls the object
in pieces as it is consumed. Credentials come from the same options and environment as the sinks
(``ST_AUTH``/``ST_USER``/``ST_KEY`` or ``OS_STORAGE_URL``/``OS_AUTH_TOKEN`` for Swift; ``S3_ENDPOINT_URL``,
``AWS_*`` for S3). An object that cannot be fetched raises :class:`~vhdcore.delivery.upload.UploadError` naming it.
"""
from __future__ import annotations

import io
import os
from typing import IO, Any, Iterator

from ..._extras import require_scheme
from . import UploadError, parse_destination

__all__ = ["open_download"]

MiB = 1024 * 1024
CHUNK = 4 * MiB


class _IterStream(io.RawIOBase):
    """A readable stream over an iterator of byte chunks; ``on_close`` releases the connection."""

    def __init__(self, chunks: Iterator[bytes], on_close: Any = None) -> None:
        self._it = chunks
        self._buf = memoryview(b"")
        self._on_close = on_close

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        while not len(self._buf):
            try:
                self._buf = memoryview(next(self._it))
            except StopIteration:
                return 0
        n = min(len(out), len(self._buf))
        out[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        if not self.closed and self._on_close is not None:
            try:
                self._on_close()
            except Exception:
                pass
        super().close()


def _swift(container: str, name: str, url: str, opts: dict[str, Any]) -> IO[bytes]:
    from swiftclient import client as sc

    from .swift import swift_auth

    conn = sc.Connection(
        **swift_auth(opts.get("auth_url"), opts.get("user"), opts.get("key"), opts.get("storage_url"),
                     opts.get("auth_token"), opts.get("auth_version"), opts.get("os_options")),
        timeout=opts.get("timeout", 60.0),
        insecure=opts.get("insecure", False),
    )
    try:
        _, body = conn.get_object(container, name, resp_chunk_size=CHUNK)
    except sc.ClientException as exc:
        conn.close()
        raise UploadError(f"cannot download {url}: {exc.msg}", path=url, field="http_status",
                          value=exc.http_status) from None
    except Exception as exc:
        conn.close()
        raise UploadError(f"cannot download {url}: {exc}", path=url, field="connection", value=str(exc)) from None
    return io.BufferedReader(_IterStream(iter(body), on_close=conn.close), buffer_size=CHUNK)


def _s3(bucket: str, key: str, url: str, opts: dict[str, Any]) -> IO[bytes]:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    endpoint_url = opts.get("endpoint_url") or os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    client = opts.get("client") or boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url,
        region_name=opts.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_access_key_id=opts.get("access_key"), aws_secret_access_key=opts.get("secret_key"),
        aws_session_token=opts.get("session_token"),
        config=Config(s3={"addressing_style": opts.get("addressing_style") or ("path" if endpoint_url else "auto")},
                      response_checksum_validation="when_required"),
    )
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
    except (ClientError, BotoCoreError) as exc:
        raise UploadError(f"cannot download {url}: {exc}", path=url, field="s3", value=str(exc)) from None
    return io.BufferedReader(_IterStream(body.iter_chunks(CHUNK), on_close=body.close), buffer_size=CHUNK)


def open_download(url: str | os.PathLike[str], **opts: Any) -> IO[bytes]:
    """A binary stream of the object at ``url`` (``swift://``, ``s3://``, ``file://`` or a path)."""
    scheme, container, name = parse_destination(url)
    require_scheme(scheme)
    text = os.fspath(url)
    if scheme == "file":
        return open(name, "rb", buffering=CHUNK)
    if scheme == "swift":
        return _swift(container, name, text, opts)
    return _s3(container, name, text, opts)

"""Upload to OpenStack Swift (Rackspace Cloud Files) as a Static Large Object.

``swift://container/object`` becomes: segments ``<container>_segments/<object>/<timestamp>/<n>`` (n counted
from 0, eight digits, so they list in order), each PUT with its md5 as ``ETag`` (Swift itself rejects a
body that does not match with 422) and the returned etag checked again here; then the SLO manifest
(``?multipart-manifest=put``) listing ``path``/``etag``/``size_bytes`` of every segment; then a HEAD that
checks the object's size and its etag (the md5 of the concatenated segment md5s, as Swift defines it).
A stream shorter than one segment is stored as a plain object with a single PUT.

Authentication as the ``swift`` CLI does it (:func:`swift_auth`): ``auth_url``/``user``/``key`` (its
``-A/-U/-K``), TempAuth/Swauth v1 (``ST_AUTH``/``ST_USER``/``ST_KEY``), Keystone (``OS_AUTH_URL``,
``OS_USERNAME``, ``OS_PASSWORD`` and the other ``OS_*`` variables as swiftclient ``os_options``), or a ready
``storage_url`` + ``auth_token`` (``OS_STORAGE_URL``/``OS_AUTH_TOKEN``). One python-swiftclient ``Connection`` per upload thread (they are not thread-safe),
sharing the token obtained once; a 401 makes swiftclient re-authenticate once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from typing import Any

from . import UploadError, UploadResult, check_object_name
from .segmented import CountingReader, EtagMismatch, Segment, SegmentedSink

__all__ = ["SwiftSink", "slo_etag"]

log = logging.getLogger("vhdcore.upload")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# HTTP statuses worth another attempt: timeouts, throttling, 422 (Swift's "the body did not match ETag",
# i.e. damaged in transit), 498/499 (rate limit / client disconnect as Swift reports them) and 5xx.
_RETRY_STATUS = {408, 422, 429, 498, 499}
_PREFIX_TOKEN = re.compile(r"[0-9]{1,12}\.[0-9]{6}")  # the timestamp under which an upload's segments live


# OS_* variables of the `swift` CLI (python-swiftclient's shell) that become its ``os_options`` for Keystone.
_OS_OPTIONS = {
    "project_name": ("OS_PROJECT_NAME", "OS_TENANT_NAME"),
    "project_id": ("OS_PROJECT_ID", "OS_TENANT_ID"),
    "tenant_name": ("OS_TENANT_NAME",),
    "tenant_id": ("OS_TENANT_ID",),
    "user_id": ("OS_USER_ID",),
    "user_domain_name": ("OS_USER_DOMAIN_NAME",),
    "user_domain_id": ("OS_USER_DOMAIN_ID",),
    "project_domain_name": ("OS_PROJECT_DOMAIN_NAME",),
    "project_domain_id": ("OS_PROJECT_DOMAIN_ID",),
    "region_name": ("OS_REGION_NAME",),
    "service_type": ("OS_SERVICE_TYPE",),
    "endpoint_type": ("OS_ENDPOINT_TYPE", "OS_INTERFACE"),
    "auth_token": ("OS_AUTH_TOKEN",),
    "object_storage_url": ("OS_STORAGE_URL",),
}


def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


def swift_auth(auth_url: str | None = None, user: str | None = None, key: str | None = None,
               storage_url: str | None = None, auth_token: str | None = None,
               auth_version: str | None = None, os_options: dict[str, str] | None = None) -> dict[str, Any]:
    """python-swiftclient ``Connection`` arguments, resolved as the ``swift`` CLI resolves them.

    Explicit arguments (the CLI's ``-A/-U/-K``, ``--os-storage-url``/``--os-auth-token``) win; then
    ``ST_AUTH``/``ST_USER``/``ST_KEY`` (TempAuth, v1); then the Keystone variables ``OS_AUTH_URL``,
    ``OS_USERNAME``, ``OS_PASSWORD`` with ``OS_IDENTITY_API_VERSION``/``OS_AUTH_VERSION`` (default 3 when a
    project or domain is named, else 2.0) and the other ``OS_*`` settings passed on as ``os_options``. A ready
    ``OS_STORAGE_URL`` + ``OS_AUTH_TOKEN`` skips authentication altogether.
    """
    st = (_env("ST_AUTH"), _env("ST_USER"), _env("ST_KEY"))
    os_auth = (_env("OS_AUTH_URL"), _env("OS_USERNAME"), _env("OS_PASSWORD"))
    opts = {k: v for k, names in _OS_OPTIONS.items() if (v := _env(*names))}
    opts.update(os_options or {})
    explicit = auth_url or user or key
    if explicit or any(st):
        authurl, usr, ky = (auth_url or st[0], user or st[1], key or st[2])
        version = auth_version or _env("ST_AUTH_VERSION") or "1.0"
    elif any(os_auth):
        authurl, usr, ky = os_auth
        keystone3 = any(k in opts for k in ("project_domain_name", "project_domain_id", "user_domain_name",
                                             "user_domain_id", "project_name", "project_id"))
        version = auth_version or _env("OS_IDENTITY_API_VERSION", "OS_AUTH_VERSION") or ("3" if keystone3 else "2.0")
    else:
        authurl = usr = ky = None
        version = auth_version or "1.0"
    return dict(
        authurl=authurl, user=usr, key=ky,
        preauthurl=storage_url or opts.get("object_storage_url"),
        preauthtoken=auth_token or opts.get("auth_token"),
        auth_version=str(version),
        os_options={k: v for k, v in opts.items() if k not in ("auth_token", "object_storage_url")},
    )


def slo_etag(segment_md5s: list[str]) -> str:
    """The etag Swift reports for an SLO: md5 of the concatenated hex md5s of its segments."""
    return hashlib.md5("".join(segment_md5s).encode("ascii")).hexdigest()


class SwiftSink(SegmentedSink):
    """Stream to ``swift://container/object`` as an SLO (see the module docstring).

    Options: ``segment_size`` (default 1 GiB, at most 5 GiB, Swift's object size limit; grown when
    ``expected_size``, the most the stream can hold, would need more than 1000 segments: up to 5 TB),
    ``segment_container`` (default ``<container>_segments``), ``concurrency`` (parallel segment PUTs, default
    2), ``attempts``/``backoff`` (per request), ``spool_memory``/``spool_dir`` (where sealed segments wait),
    ``create_container`` (default True), ``content_type``, ``headers`` (extra headers for the object, e.g.
    ``X-Object-Meta-*``), ``timeout`` (seconds per socket operation), ``insecure``, ``progress``,
    ``leave_old_segments`` (default False: when our commit replaces an SLO, its old segments are deleted
    afterwards, as the ``swift`` CLI does, instead of being orphaned).
    """

    kind = "swift"
    MIN_SEGMENT = 64 * KiB
    MAX_SEGMENT = 5 * GiB
    MAX_SEGMENTS = 1000  # Swift's default max_manifest_segments

    def __init__(
        self,
        container: str,
        obj: str,
        *,
        auth_url: str | None = None,
        user: str | None = None,
        key: str | None = None,
        storage_url: str | None = None,
        auth_token: str | None = None,
        auth_version: str | None = None,
        os_options: dict[str, str] | None = None,
        segment_size: int = 1 * GiB,
        segment_container: str | None = None,
        create_container: bool = True,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        timeout: float | None = 60.0,
        insecure: bool = False,
        leave_old_segments: bool = False,
        **opts: Any,
    ) -> None:
        check_object_name("swift", container, obj)  # before any request (also for direct API callers)
        check_object_name("swift", segment_container or f"{container}_segments", obj)
        super().__init__(f"swift://{container}/{obj}", segment_size=segment_size, **opts)
        self.container = container
        self.obj = obj
        self.segment_container = segment_container or f"{container}_segments"
        self.create_container = create_container
        self.leave_old_segments = leave_old_segments
        self._old_left = 0
        self.content_type = content_type
        self.headers = dict(headers or {})
        self._conn_args: dict[str, Any] = dict(
            **swift_auth(auth_url, user, key, storage_url, auth_token, auth_version, os_options),
            timeout=timeout,
            insecure=insecure,
            retries=0,  # our own retry loop decides (it also checks etags and rewinds spools)
        )
        if not self._conn_args["preauthtoken"] and not all(
            self._conn_args[k] for k in ("authurl", "user", "key")
        ):
            raise ValueError("Swift credentials missing: pass -A/-U/-K, or set ST_AUTH/ST_USER/ST_KEY, "
                             "OS_AUTH_URL/OS_USERNAME/OS_PASSWORD, or OS_STORAGE_URL with OS_AUTH_TOKEN")
        # Each upload gets its own timestamped prefix, so a retried export never mixes segments with a
        # previous attempt's and abort() deletes only its own.
        # A resumable upload (``resume_state``) continues under the prefix its state recorded.
        state = self.resume_state
        token = state.token if state is not None else None
        if token is None or not _PREFIX_TOKEN.fullmatch(token):
            token = f"{time.time():.6f}"
        self._token = token
        self.prefix = f"{obj}/{token}"
        self._local = threading.local()
        self._auth_lock = threading.Lock()
        self._conns: list[Any] = []  # every Connection made, so close/abort can close them all
        self._manifest_put = False

    # -- connections
    def _authenticate(self) -> tuple[str, str]:
        with self._auth_lock:
            if not (self._conn_args["preauthurl"] and self._conn_args["preauthtoken"]):
                from swiftclient import client as sc

                conn = sc.Connection(**self._conn_args)
                url, token = conn.get_auth()
                conn.close()
                self._conn_args["preauthurl"], self._conn_args["preauthtoken"] = url, token
            return self._conn_args["preauthurl"], self._conn_args["preauthtoken"]

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            from swiftclient import client as sc

            self._authenticate()
            conn = sc.Connection(**self._conn_args)
            self._local.conn = conn
            with self._auth_lock:
                self._conns.append(conn)
        return conn

    def _close_connections(self) -> None:
        with self._auth_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass

    def close(self) -> UploadResult:
        try:
            return super().close()
        finally:
            self._close_connections()

    def abort(self) -> None:
        try:
            super().abort()
        finally:
            self._close_connections()

    def _drop_conn(self) -> None:
        """After a failed request the HTTP connection may be mid-stream; the next attempt starts afresh."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
            self._local.conn = None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._conn(), method)(*args, **kwargs)
        except BaseException:
            self._drop_conn()
            raise

    # -- policy
    def _is_retryable(self, exc: BaseException) -> bool:
        from swiftclient.exceptions import ClientException

        try:
            from requests.exceptions import RequestException
        except ImportError:  # pragma: no cover - swiftclient depends on requests
            RequestException = OSError  # type: ignore[misc,assignment]
        if isinstance(exc, ClientException):
            status = exc.http_status
            return status is None or status >= 500 or status in _RETRY_STATUS
        return isinstance(exc, (EtagMismatch, RequestException, ConnectionError, TimeoutError, OSError))

    def _describe(self, exc: BaseException) -> tuple[str, Any]:
        from swiftclient.exceptions import ClientException

        if isinstance(exc, ClientException) and exc.http_status is not None:
            return "http_status", f"{exc.http_status} {exc.http_reason or ''}".strip()
        return super()._describe(exc)

    # -- preflight
    def preflight(self) -> None:
        """Before any work: authenticate, and make sure both containers exist (creating them when allowed).

        Raises UploadError naming what failed (``field`` ``auth`` or ``container``); stores no object.
        """
        from swiftclient.exceptions import ClientException

        def fail(what: str, exc: BaseException, field: str) -> UploadError:
            status = getattr(exc, "http_status", None)
            detail = f"HTTP {status}" if status else f"{type(exc).__name__}: {exc}"
            return UploadError(f"{what} ({detail})", path=self.destination, field=field, value=status)

        try:
            self._authenticate()
        except Exception as exc:
            raise fail("Swift authentication failed: check -A/-U/-K, ST_AUTH/ST_USER/ST_KEY or "
                       "OS_STORAGE_URL/OS_AUTH_TOKEN", exc, "auth") from exc
        for c in dict.fromkeys((self.container, self.segment_container)):
            try:
                self._call("head_container", c)
                continue
            except ClientException as exc:
                if exc.http_status in (401, 403):
                    raise fail(f"Swift refused access to container {c}", exc, "auth") from exc
                if exc.http_status != 404:
                    raise fail(f"Swift container {c} could not be checked", exc, "container") from exc
            except Exception as exc:
                raise fail(f"Swift container {c} could not be checked", exc, "container") from exc
            if not self.create_container:
                raise UploadError(f"Swift container {c} does not exist (and creating it was not allowed)",
                                  path=self.destination, field="container", value=c)
            try:
                self._call("put_container", c)
            except Exception as exc:
                raise fail(f"Swift container {c} does not exist and could not be created", exc,
                           "container") from exc

    # -- hooks
    def _begin(self) -> None:
        if self.create_container:
            for c in (self.container, self.segment_container):
                self._with_retries(f"PUT of container {c}", None, lambda c=c: self._call("put_container", c))

        if self.resume_state is not None:
            self.resume_state.begin(self._token)

    def _segment_name(self, seg: Segment) -> str:
        return f"{self.prefix}/{seg.index:08d}"

    def _stored_etag(self, seg: Segment) -> str | None:
        from swiftclient.exceptions import ClientException

        try:
            hdrs = self._call("head_object", self.segment_container, seg.name)
        except ClientException as exc:
            if exc.http_status == 404:
                return None
            raise
        if int(hdrs.get("content-length", -1)) != seg.size:
            return None
        return str(hdrs.get("etag", ""))

    def _put_segment(self, seg: Segment, body: CountingReader) -> str:
        return self._call(
            "put_object", self.segment_container, seg.name, contents=body, content_length=seg.size,
            etag=seg.md5, chunk_size=256 * KiB, content_type="application/octet-stream",
        )

    def _segment_path(self, seg: Segment) -> str:
        return f"/{self.segment_container}/{seg.name}"

    def _put_single(self, body: CountingReader, size: int, md5: str) -> str:
        if self.create_container:
            self._with_retries(f"PUT of container {self.container}", None,
                               lambda: self._call("put_container", self.container))
        etag = self._call(
            "put_object", self.container, self.obj, contents=body, content_length=size, etag=md5,
            chunk_size=256 * KiB, content_type=self.content_type, headers=self.headers,
        )
        # From here the name holds our bytes (an older object there is gone), so a failed check deletes it.
        self._manifest_put = True
        return etag

    def _close_single(self) -> str:
        old = self._old_segments()
        etag = super()._close_single()
        self._check_head(etag, self.bytes_written, slo=False)
        self._old_left = self._delete_old_segments(old)
        return etag

    def _old_segments(self) -> list[tuple[str, str]]:
        """Segments of an SLO already stored at our name, which our commit will orphan (unless kept)."""
        if self.leave_old_segments:
            return []
        from swiftclient.exceptions import ClientException

        def get() -> list[tuple[str, str]]:
            try:
                hdrs = self._call("head_object", self.container, self.obj)
            except ClientException as exc:
                if exc.http_status == 404:
                    return []
                raise
            if str(hdrs.get("x-static-large-object", "")).lower() != "true":
                return []
            _, body = self._call("get_object", self.container, self.obj, query_string="multipart-manifest=get")
            out = []
            for entry in json.loads(body):
                container, _, name = str(entry.get("name", "")).lstrip("/").partition("/")
                if container and name:
                    out.append((container, name))  # SLO manifests hold the paths unquoted
            return out

        return self._with_retries("reading the previous object's manifest", None, get)

    def _delete_old_segments(self, old: list[tuple[str, str]]) -> int:
        """Best effort after a successful commit: returns how many old segments could not be deleted."""
        left = 0
        for container, name in old:
            if container == self.segment_container and name.startswith(self.prefix + "/"):
                continue  # ours (cannot happen with a fresh timestamp, but never delete what we just wrote)
            try:
                self._with_cleanup_retries(container, name)
            except Exception as exc:
                if getattr(exc, "http_status", None) != 404:
                    left += 1
                    log.warning("%s: could not delete old segment /%s/%s: %s", self.destination, container, name, exc)
        return left

    def _complete(self, segments: list[Segment]) -> tuple[str | None, dict[str, Any]]:
        manifest = [
            {"path": f"/{self.segment_container}/{s.name}", "etag": s.etag, "size_bytes": s.size} for s in segments
        ]
        body = json.dumps(manifest).encode()
        expected = slo_etag([s.etag or "" for s in segments])

        def put_manifest() -> str:
            etag = self._call(
                "put_object", self.container, self.obj, contents=body, content_type=self.content_type,
                headers=self.headers, query_string="multipart-manifest=put",
            )
            self._manifest_put = True
            return etag

        old = self._old_segments()
        self._with_retries("PUT of the SLO manifest", None, put_manifest)
        self._check_head(expected, sum(s.size for s in segments), slo=True)
        self._old_left = self._delete_old_segments(old)
        return expected, {
            "segment_container": self.segment_container,
            "manifest_segments": len(segments),
            "old_segments_deleted": len(old) - self._old_left,
            "old_segments_left": self._old_left,
        }

    def _check_head(self, etag: str, size: int, slo: bool) -> None:
        """The store's view of the committed object must match what we sent: size and etag."""
        hdrs = self._with_retries("HEAD of the object", None, lambda: self._call("head_object", self.container, self.obj))
        got_size = int(hdrs.get("content-length", -1))
        got_etag = hdrs.get("etag", "").strip('"')
        if got_size != size:
            raise UploadError("uploaded object has the wrong size", path=self.destination,
                              field="content-length", value=got_size)
        if got_etag != etag:
            raise UploadError(f"uploaded object's etag differs from ours ({etag})", path=self.destination,
                              field="etag", value=got_etag)
        if slo and str(hdrs.get("x-static-large-object", "")).lower() != "true":
            raise UploadError("uploaded object is not a Static Large Object", path=self.destination,
                              field="x-static-large-object", value=hdrs.get("x-static-large-object"))

    def _cleanup(self, segments: list[Segment]) -> None:
        from swiftclient.exceptions import ClientException

        def delete(container: str, name: str, **kw: Any) -> None:
            try:
                self._with_cleanup_retries(container, name, **kw)
            except ClientException as exc:
                if exc.http_status != 404:
                    raise

        failures = []
        if self._manifest_put:
            try:
                delete(self.container, self.obj)  # the manifest (or plain object) only; segments below
            except Exception as exc:
                failures.append(f"{self.container}/{self.obj}: {exc}")
        for s in segments:
            try:
                delete(self.segment_container, s.name)
            except Exception as exc:
                failures.append(f"{self.segment_container}/{s.name}: {exc}")
        if failures:
            raise UploadError(f"could not delete {len(failures)} object(s): {'; '.join(failures[:5])}",
                              path=self.destination, field="cleanup", value=len(failures))

    def _with_cleanup_retries(self, container: str, name: str, **kw: Any) -> None:
        # abort() has set the aborting flag, which stops _with_retries; deletes get their own short loop.
        from swiftclient.exceptions import ClientException

        for attempt in range(1, 4):
            try:
                self._call("delete_object", container, name, **kw)
                return
            except ClientException as exc:
                if exc.http_status == 404 or not self._is_retryable(exc) or attempt == 3:
                    raise
            except Exception as exc:
                if not self._is_retryable(exc) or attempt == 3:
                    raise
            time.sleep(min(self.backoff * attempt, 2.0))

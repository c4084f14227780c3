"""The embedded job: ``vhdcore image --job-dir D`` (and the body of every fleet worker's task).

:func:`run_job` runs :func:`vhdcore.pipeline.image` under a :class:`~.record.JobRecord`. What it adds:

* every state transition, stage start and end, byte count, rate and ETA goes into ``D/job.json``;
* resumable: run again with the same job directory after a crash or a kill, it continues the same job. A stage
  whose output verifies is not run again: a delivered image (its size and sha256 read back against the record)
  skips check, preflight, growth and export; an interrupted ``--coalesce-in-place`` continues where it
  stopped (``coalesce(resume=True)``: its progress journal lists the blocks already merged; then coalesce's own
  journal finishes the relink and removal). A local destination that did not exist when the job first started
  is the job's own: a rerun may replace it (an export interrupted between rename and record leaves one);
* stage time limits (``timeouts={"coalesce": s, "export": s, ...}``): the running stage checks its clock at
  every progress update of the thread that runs it and, past its limit, raises :class:`~.record.StageTimeout`
  there. That is a consistent point by construction: an export aborts its sink (no partial object is left), a
  coalesce aborts its target writer (the chain reads as before; the child still holds every sector). The job
  ends in state ``retry`` ("retry later") with the stages already done listed in the record's error;
* throttles: token buckets on the chain's reads (the export's reads, and the in-place coalesce's progress) and
  on the bytes handed to the destination; the ETA in the record uses the limit when the stage runs at it.

Errors are sorted for a scheduler: a stage timeout or a dropped upload (``UploadError``, a network error) is
``retry``; anything in check or preflight, and any other error, is ``failed`` (bad input does not get better by
waiting).
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any, Callable, Sequence

from ..exceptions import VHDError
from ..progress import ProgressCallback, as_progress
from .record import JobRecord, StageTimeout
from ..throttle import TokenBucket

__all__ = ["run_job", "job_options", "is_retryable", "EXIT_RETRY_LATER"]

EXIT_RETRY_LATER = 75  # EX_TEMPFAIL: "try again later", as mail transfer agents have always said it
CREDENTIAL_KEYS = ("key", "auth_token", "password", "secret", "aws_secret_access_key", "os_options")
STAGE_STATES = {"check": "preparing", "preflight": "preparing", "growth": "preparing", "compact": "preparing",
                "coalesce": "coalescing"}
CHUNK = 4 * 1024 * 1024


def job_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that define the job (recorded and compared on a rerun): credentials are never written down."""
    out = {}
    for k, v in sorted(options.items()):
        if k in CREDENTIAL_KEYS or v is None:
            continue
        out[k] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def is_retryable(exc: BaseException, stage: str | None) -> bool:
    """Retry later, or give up now? Preflight and check failures never get better by waiting."""
    if stage in ("check", "preflight"):
        return False
    if isinstance(exc, StageTimeout):
        return True
    from ..delivery.upload import UploadError

    if isinstance(exc, UploadError):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError)) and not isinstance(exc, VHDError)


def _hash_output(dest: str, remote_options: dict[str, Any], algo: str = "sha256") -> tuple[int, str]:
    from ..delivery.upload.fetch import open_download

    h = hashlib.new(algo)
    n = 0
    with open_download(dest, **remote_options) as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            h.update(b)
            n += len(b)
    return n, h.hexdigest()


def _output_verifies(rec: JobRecord, remote_options: dict[str, Any]) -> bool:
    """Is the image the record says was delivered still there, byte for byte (size and sha256)?"""
    out = (rec.stage("export").get("result") or {})
    want = (out.get("digests") or {}).get("sha256")
    if not want:
        return False
    try:
        size, got = _hash_output(rec.data["destination"], remote_options)
    except (OSError, VHDError):
        return False
    return size == out.get("size") and got == want


class _Tracker:
    """The progress callback handed to imaging: forwards to the user's reporter, records, enforces time limits."""

    def __init__(self, rec: JobRecord, progress: ProgressCallback | None, timeouts: dict[str, float],
                 limits: dict[str, TokenBucket], on_update: Callable[[JobRecord], None] | None) -> None:
        self.rec = rec
        self.forward = as_progress(progress)
        self.timeouts = {k: float(v) for k, v in timeouts.items() if v}
        self.limits = limits
        self.on_update = on_update
        self.owner = threading.get_ident()
        self.lock = threading.RLock()
        self.stage: str | None = None
        self.t_stage = time.monotonic()
        self.t_job = time.monotonic()
        self.done0 = 0
        self.paid = 0

    def enter(self, stage: str, state: str) -> None:
        with self.lock:
            self.stage, self.t_stage, self.done0, self.paid = stage, time.monotonic(), 0, 0
            self.rec.stage_started(stage, state)
        if self.on_update:
            self.on_update(self.rec)

    def check_deadline(self) -> None:
        limit = self.timeouts.get(self.stage or "")
        if limit is not None and threading.get_ident() == self.owner and time.monotonic() - self.t_stage > limit:
            raise StageTimeout(f"the {self.stage} stage ran past its time limit of {limit:g} s and was stopped at "
                               "a consistent point; retry later", field=f"{self.stage}_timeout", value=limit)

    def __call__(self, done: int, total: int | None = None, **info: Any) -> None:
        self.forward(done, total, **info)
        stage = info.get("stage")
        state = getattr(info.get("state"), "value", info.get("state"))
        if stage is None and state in ("complete", "failed"):
            return  # imaging's own end: the record's end is run_job's to write
        if stage and stage != self.stage and threading.get_ident() == self.owner:
            if state in ("complete", "failed", None, "running", "verifying"):
                state = STAGE_STATES.get(stage, "preparing")
            if stage == "export" and state == "preparing":
                remote = "://" in self.rec.data["destination"] and not self.rec.data["destination"].startswith(
                    "file://")
                state = "uploading" if remote else "saving"
            self.enter(stage, state)
        self.check_deadline()
        bucket = self.limits.get("read")
        if bucket is not None and self.stage == "coalesce" and threading.get_ident() == self.owner:
            bucket.consume(done - self.paid)  # the in-place merge reads the chain too: it pays the same bucket
            self.paid = done
        with self.lock:
            now = time.monotonic()
            in_stage = now - self.t_stage
            rate = (done - self.done0) / in_stage if in_stage > 0.2 else None
            if stage == "export" and self.limits:
                # at a throttle the pace is the limit: the ETA says so rather than extrapolating a burst
                cap = min(b.rate for b in self.limits.values())
                rate = min(rate, cap) if rate else cap
            eta = round((total - done) / rate, 1) if total and rate else None
            pct = info.get("job_percent")
            wrote = self.rec.tick(self.stage or str(stage), done, total, rate=round(rate) if rate else None, eta=eta,
                                  task_percent=round(pct, 2) if pct is not None else None,
                                  read=info.get("read"), sent=info.get("sent"))
        if wrote and self.on_update:
            self.on_update(self.rec)


def _summary(name: str, result: Any) -> dict[str, Any]:
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if isinstance(v, (str, int, float, bool, type(None)))}
    d = result.to_dict() if hasattr(result, "to_dict") else {}
    if name == "export":
        up = d.get("upload") or {}
        return {"destination": d.get("destination"), "size": d.get("size"), "package_size": d.get("package_size"),
                "bytes_read": d.get("bytes_read"), "digests": d.get("digests"), "etag": up.get("etag"),
                "manifest_path": d.get("manifest_path"), "package": d.get("package"),
                "compression": d.get("compression"),
                "segments_reused": (up.get("extra") or {}).get("segments_reused")}
    if name == "check":
        return {"clean": bool(getattr(result, "clean", False)), "findings": len(getattr(result, "findings", []))}
    keep = ("bytes_copied", "blocks_copied", "blocks_resumed", "merged_layers", "target", "used_bytes", "file_size", "reclaimable_bytes",
            "bytes_before", "bytes_after", "mode")
    return {k: d[k] for k in keep if k in d}


VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, where VHD timestamps count from


def _chain_identity(leaf: str, parent_dirs: Sequence[str] | None) -> list[dict[str, Any]]:
    """Each layer's path, size and mtime: the upload state is bound to the very files the stream comes from."""
    from ..disk.chain import open_chain

    with open_chain(leaf, "r", parent_dirs) as disk:
        paths = [img.path for img in disk.layers]
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"path": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _resumable_upload(rec: JobRecord, leaf: str, dest: str, parent_dirs: Sequence[str] | None,
                      recorded: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The export options that make a remote upload resumable across attempts of this job.

    The package's unique id and timestamp are drawn once and kept in the record, so every attempt regenerates
    the same byte stream; the upload state (``upload-state.json`` beside the record) lists the segments or
    parts already stored, bound to this job, destination, chain (paths, sizes, mtimes) and options.
    """
    import uuid

    from ..delivery.upload.resume import STATE_NAME, UploadState

    pinned = rec.data.get("package_identity")
    if not (isinstance(pinned, dict) and isinstance(pinned.get("unique_id"), str)
            and type(pinned.get("timestamp")) is int and 0 <= pinned["timestamp"] < 2 ** 32):
        pinned = {"unique_id": str(uuid.uuid4()), "timestamp": int(time.time()) - VHD_EPOCH}
        rec.data["package_identity"] = pinned
        rec.save()
    try:
        uid = uuid.UUID(pinned["unique_id"])
    except ValueError:
        uid = uuid.uuid4()
    out = dict(options)
    out.setdefault("unique_id", uid)
    out.setdefault("timestamp", pinned["timestamp"])
    binding = {"job": rec.id, "destination": dest, "options": recorded,
               "chain": _chain_identity(leaf, parent_dirs), "package_identity": pinned}
    out["resume_state"] = UploadState(os.path.join(rec.directory, STATE_NAME), binding)
    return out


def run_job(
    leaf: str | os.PathLike[str],
    dest: str,
    job_dir: str | os.PathLike[str],
    *,
    coalesce_in_place: bool = False,
    timeouts: dict[str, float | None] | None = None,
    max_read_rate: float | None = None,
    max_upload_rate: float | None = None,
    progress: ProgressCallback | None = None,
    on_update: Callable[[JobRecord], None] | None = None,
    job_id: str | None = None,
    host: str | None = None,
    parent_dirs: Sequence[str] | None = None,
    **options: Any,
) -> JobRecord:
    """Run (or continue) the imaging job recorded in ``job_dir``; returns its record in a final state.

    ``options`` are :func:`vhdcore.pipeline.image`'s (package, compression, level, compact, overwrite, analyse,
    and the sink's credentials, which are used but never recorded). The record ends ``complete``; on error it
    ends ``failed`` or ``retry`` and the error is raised again (``StageTimeout`` and ``UploadError`` are the
    retryable ones; :func:`is_retryable` tells).
    """
    from ..pipeline import image

    leaf = os.path.abspath(os.fspath(leaf))
    dest = os.fspath(dest)
    remote = "://" in dest and not dest.startswith("file://")
    if not remote:  # the record names the file wherever the job is continued from (a worker's cwd is not ours)
        dest = os.path.abspath(dest[len("file://"):] if dest.startswith("file://") else dest)
    recorded = job_options({**options, "coalesce_in_place": coalesce_in_place,
                            "parent_dirs": list(parent_dirs or []) or None})
    rec = JobRecord.open(job_dir, leaf=leaf, destination=dest, options=recorded, job_id=job_id, host=host)
    sink_creds = {k: v for k, v in options.items() if k in CREDENTIAL_KEYS or k in (
        "auth_url", "user", "auth_version", "storage_url", "endpoint_url", "region")}
    if rec.state == "complete" and _output_verifies(rec, sink_creds) and not (
            coalesce_in_place and rec.stage("coalesce").get("state") not in ("done", "skipped")):
        return rec  # a job delivered twice images once
    rec.begin_attempt()
    limits: dict[str, TokenBucket] = {}
    if max_read_rate:
        limits["read"] = TokenBucket(max_read_rate)
    if max_upload_rate:
        limits["upload"] = TokenBucket(max_upload_rate)
    track = _Tracker(rec, progress, dict(timeouts or {}), limits, on_update)
    rec.transition("preparing")
    if on_update:
        on_update(rec)
    warnings: list[str] = []
    try:
        exported = rec.stage("export").get("state") == "done" and _output_verifies(rec, sink_creds)
        if not exported:
            if rec.data.get("destination_existed") is None:
                rec.data["destination_existed"] = (not remote) and os.path.lexists(dest)
                rec.save()
            overwrite = bool(options.pop("overwrite", False)) or (
                not remote and rec.data["destination_existed"] is False and rec.data["attempt"] > 1)

            def on_stage(name: str, result: Any) -> None:
                with track.lock:
                    rec.stage_done(name, _summary(name, result))

            if remote:
                options = _resumable_upload(rec, leaf, dest, parent_dirs, recorded, options)
            rep = image(leaf, dest, coalesce_in_place=False, overwrite=overwrite, parent_dirs=parent_dirs,
                        progress=track, on_stage=on_stage, read_limiter=limits.get("read"),
                        upload_limiter=limits.get("upload"), **options)
            warnings.extend(rep.warnings)
        else:
            rec.stage_done("export", rec.stage("export").get("result"), skipped="the delivered image verifies")
        if coalesce_in_place:
            from ..disk.chain import open_chain
            from ..ops.coalesce import coalesce as do_coalesce
            from ..ops.coalesce import journal_path

            with open_chain(leaf, "r", parent_dirs) as disk:
                depth = len(disk.layers)
                base = disk.layers[-1].path
            if depth > 1 or os.path.exists(journal_path(leaf)):
                track.enter("coalesce", "coalescing")
                co = do_coalesce(leaf, into=base, remove_child=True, parent_dirs=parent_dirs, progress=track,
                                 resume=True)
                warnings.extend(co.warnings)
                rec.stage_done("coalesce", _summary("coalesce", co))
            else:
                rec.stage_done("coalesce", None, skipped="the chain is a single disk")
    except BaseException as exc:
        stage = track.stage
        if stage is not None and rec.stage(stage).get("state") == "running":
            rec.stage_stopped(stage, exc)
        retry = is_retryable(exc, stage)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            retry = True
        rec.fail(exc, retry=retry)
        if on_update:
            on_update(rec)
        raise
    out = dict(rec.stage("export").get("result") or {})
    if limits:
        out["throttles"] = {k: b.to_dict() for k, b in limits.items()}
    rec.complete(out, warnings)
    if on_update:
        on_update(rec)
    return rec

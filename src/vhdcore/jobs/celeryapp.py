"""The fleet: imaging jobs as Celery tasks, one queue per host (needs the ``fleet`` extra: ``celery[redis]``).

A job names chains that live on one hypervisor host, so it goes to that host's queue (``vhdcore.host.<H>``)
and only that host's worker (``vhdcore worker --host-id H``) takes it. The worker runs at most K jobs at once
(``--max-concurrent K``: K pool processes, prefetch 1, so a busy host does not hoard jobs another slot could
start). Each task is :func:`vhdcore.jobs.runner.run_job` with its record in ``STATE_DIR/<job id>/job.json``:

* ``acks_late`` + ``reject_on_worker_lost``: the message is acknowledged only when the job ended; a worker
  killed mid-job leaves it unacknowledged and the broker delivers it again (at once when a pool process dies,
  after the visibility timeout when the whole worker does), and the new run continues from the record;
* a per-job lock (``flock`` on ``STATE_DIR/<job id>.lock``, the job being on this host): a job id delivered twice
  images once: a second delivery while the first runs waits its turn, one after it finds the record
  ``complete`` with an output that verifies and returns that;
* the broker's visibility timeout (``--visibility-timeout``, default 24 h) is longer than the longest job, so a
  job still running is never handed to another worker;
* states: ``PENDING``/``QUEUED`` (25 %), then the job's own states as Celery custom states ``PREPARING``,
  ``COALESCING``, ``SAVING``, ``UPLOADING`` with ``meta`` = :func:`summary` (percent, stage percent, bytes,
  rate, ETA), ``RETRY``, then ``SUCCESS`` (100 %, the result is the summary with digests) or ``FAILURE``.
  Flower and any Celery client see the same;
* retries: a job ending in ``retry`` (stage timeout, dropped upload) is retried with exponential backoff and
  jitter (``retry_backoff * 2**n`` seconds, capped, times a random 0.5-1.0) up to ``max_retries``; a job ending
  ``failed`` (broken chain, bad destination, bad credentials: check and preflight, before any file is changed)
  fails at once with its reason.

The broker is a URL (``redis://``, ``amqp://`` for RabbitMQ, ...): nothing here assumes Redis. The result
backend defaults to the broker's URL when that is Redis, and must be given (``--result-backend``) otherwise.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import time
from typing import Any

from celery import Celery

from ..progress import task_percent
from .record import JobRecord

__all__ = ["make_app", "host_queue", "summary", "JobFailed", "CELERY_STATES", "DEFAULT_BROKER"]

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_VISIBILITY_TIMEOUT = 24 * 3600
TASK_NAME = "vhdcore.image"
# job record state -> Celery state (custom states for the running ones)
CELERY_STATES = {"queued": "QUEUED", "preparing": "PREPARING", "coalescing": "COALESCING", "saving": "SAVING",
                 "uploading": "UPLOADING", "complete": "SUCCESS", "failed": "FAILURE", "retry": "RETRY"}
# what a worker process knows about its host: set by ``vhdcore worker`` before the pool forks
WORKER: dict[str, Any] = {}


class JobFailed(Exception):
    """A job that ended ``failed`` (or ran out of retries); the message is the job's summary as JSON."""


def host_queue(host: str) -> str:
    if not host or not all(c.isalnum() or c in "-_." for c in host) or len(host) > 128:
        raise ValueError(f"a host id is 1-128 letters, digits, '-', '_' or '.': {host!r}")
    return f"vhdcore.host.{host}"


def summary(rec: JobRecord) -> dict[str, Any]:
    """What a Celery client sees of a job: its state, the 25/50/100 percent with the stage's own, bytes, rate, ETA."""
    d = rec.data
    p = d.get("progress") or {}
    state = d["state"]
    done, total = p.get("done") or 0, p.get("total")
    stage_pct = round(100.0 * min(done / total, 1.0), 2) if total else None
    if state == "complete":
        pct = 100.0
    elif state in ("coalescing", "saving", "uploading"):
        pct = round(task_percent(state, done, total), 2)
    else:
        pct = 25.0
    out = d.get("output") or {}
    return {"job": d["id"], "host": d.get("host"), "leaf": d["leaf"], "destination": d["destination"],
            "state": state, "stage": p.get("stage"), "percent": pct, "stage_percent": stage_pct,
            "job_percent": p.get("task_percent"), "done": done, "total": total, "rate": p.get("rate"),
            "eta": p.get("eta"), "attempt": d["attempt"], "updated": d.get("updated"),
            "digests": out.get("digests"), "size": out.get("size"), "error": d.get("error"),
            "warnings": d.get("warnings", [])}


def make_app(broker: str | None = None, result_backend: str | None = None, *,
             visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT) -> Celery:
    broker = broker or os.environ.get("VHDCORE_BROKER") or DEFAULT_BROKER
    if result_backend is None:
        result_backend = os.environ.get("VHDCORE_RESULT_BACKEND")
    if result_backend is None:
        if not broker.startswith(("redis://", "rediss://")):
            raise ValueError(f"the broker {broker} keeps no results: name a result backend (--result-backend, "
                             "VHDCORE_RESULT_BACKEND), e.g. redis://... or db+postgresql://...")
        result_backend = broker
    transport: dict[str, Any] = {"visibility_timeout": visibility_timeout}
    if broker.startswith(("redis://", "rediss://", "sentinel://")):
        # Redis has no acknowledgements of its own: kombu keeps delivered messages in an "unacked" set and puts
        # back those older than the visibility timeout. By default it looks only every ~100 s after the first
        # look at start; look every few seconds instead (one ZRANGE), so a killed worker's job comes back soon
        # after its visibility timeout.
        transport.update(unacked_restore_throttle=1,
                         unacked_restore_interval=max(1, min(10, int(visibility_timeout // 4) or 1)))
    app = Celery("vhdcore", broker=broker, backend=result_backend, set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_track_started=False, result_extended=True, result_expires=7 * 24 * 3600,
        task_default_queue="vhdcore.default",
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": visibility_timeout},
        broker_connection_retry_on_startup=True, broker_connection_max_retries=None,
        result_backend_always_retry=True, result_backend_max_retries=60,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
    )
    app.task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, max_retries=None)(_image_task)
    return app


@contextlib.contextmanager
def _job_lock(path: str):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a second delivery of a running job waits here, then finds it complete
        yield
    finally:
        os.close(fd)


def _inside(path: str, dirs: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in dirs)


def _backoff(retries: int, base: float, cap: float) -> float:
    return min(cap, base * 2 ** retries) * random.uniform(0.5, 1.0)


def _image_task(self: Any, leaf: str, dest: str, host: str, options: dict[str, Any],
                limits: dict[str, Any] | None = None, max_retries: int = 5, retry_backoff: float = 30.0,
                retry_backoff_max: float = 3600.0) -> dict[str, Any]:
    from .runner import run_job

    job_id = self.request.id
    if host != WORKER.get("host"):
        raise JobFailed(json.dumps({"job": job_id, "state": "failed", "error": {
            "code": "WrongHost", "message": f"job for host {host!r} delivered to {WORKER.get('host')!r}"}}))
    state_dir = WORKER["state_dir"]
    job_dir = os.path.join(state_dir, job_id)
    last = [0.0, None]

    def on_update(rec: JobRecord) -> None:
        # best effort: the record on the host is the truth; a broker/backend hiccup must not fail the job
        now = time.monotonic()
        st = CELERY_STATES[rec.state]
        if st in ("SUCCESS", "FAILURE", "RETRY"):
            return  # Celery writes these itself when the task returns, fails or retries
        if st == last[1] and now - last[0] < 1.0:
            return
        last[0], last[1] = now, st
        with contextlib.suppress(Exception):
            self.update_state(state=st, meta=summary(rec))

    with _job_lock(os.path.join(state_dir, job_id + ".lock")):
        chains = WORKER.get("chains_dirs") or []
        outputs = WORKER.get("output_dirs") or []
        local = "://" not in dest or dest.startswith("file://")
        refused = None
        if chains and not _inside(leaf, chains):
            refused = f"{leaf} is not under this host's chain directories ({', '.join(chains)})"
        elif outputs and local and not _inside(os.path.dirname(os.path.abspath(dest.removeprefix("file://"))),
                                                outputs):
            refused = f"{dest} is not under this host's output directories ({', '.join(outputs)})"
        if refused:
            rec = JobRecord.open(job_dir, leaf=os.path.abspath(leaf), destination=dest, options={}, job_id=job_id,
                                 host=host)
            rec.fail(PermissionError(refused), retry=False)
            raise JobFailed(json.dumps(summary(rec)))
        try:
            rec = run_job(leaf, dest, job_dir, job_id=job_id, host=host, on_update=on_update,
                          **(limits or {}), **options)
        except Exception as exc:
            rec = JobRecord.load(job_dir)
            if rec is not None and rec.state == "retry" and self.request.retries < max_retries:
                raise self.retry(exc=JobFailed(json.dumps(summary(rec))), max_retries=max_retries,
                                 countdown=_backoff(self.request.retries, retry_backoff, retry_backoff_max))
            if rec is None:
                raise JobFailed(json.dumps({"job": job_id, "state": "failed",
                                            "error": {"code": type(exc).__name__, "message": str(exc)}})) from None
            raise JobFailed(json.dumps(summary(rec))) from None
    return summary(rec)

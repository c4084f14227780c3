"""Submitting jobs to the fleet and asking after them (the Python API behind ``submit``, ``status``, ``jobs``).

    job_id = submit("/srv/chains/vm-1/leaf.vhd", "swift://images/vm-1.vhd.zst", host="hv-07",
                    broker="redis://queue:6379/0")
    status(job_id, broker=...)  # {"state": "saving", "percent": 71.2, "stage_percent": 42.4, "rate": ..., "eta": ...}

The list behind ``vhdcore jobs`` is an index the submitter keeps in the result backend: with Redis, a sorted set
per host (``vhdcore:jobs:<host>``, by submit time, trimmed to the newest 10,000) and one hash per job; other
backends have no such index and ``jobs`` lists what the workers report as active and reserved instead.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from .celeryapp import CELERY_STATES, TASK_NAME, JobFailed, host_queue, make_app

__all__ = ["submit", "status", "list_jobs", "INDEX_LIMIT"]

INDEX_LIMIT = 10_000
_FROM_CELERY = {v: k for k, v in CELERY_STATES.items()}


def _redis(app: Any) -> Any:
    client = getattr(app.backend, "client", None)
    return client if client is not None and hasattr(client, "zadd") else None


def submit(leaf: str, dest: str, *, host: str, broker: str | None = None, result_backend: str | None = None,
           options: dict[str, Any] | None = None, limits: dict[str, Any] | None = None, max_retries: int = 5,
           retry_backoff: float = 30.0, retry_backoff_max: float = 3600.0, job_id: str | None = None,
           app: Any = None) -> str:
    """Queue an imaging job for ``host``; returns its id. ``leaf`` is a path on that host."""
    app = app or make_app(broker, result_backend)
    queue = host_queue(host)
    job_id = job_id or str(uuid.uuid4())
    client = _redis(app)
    if client is not None:
        key = f"vhdcore:jobs:{host}"
        pipe = client.pipeline()
        pipe.zadd(key, {job_id: time.time()})
        pipe.zremrangebyrank(key, 0, -INDEX_LIMIT - 1)
        pipe.hset(f"vhdcore:job:{job_id}", mapping={"host": host, "leaf": leaf, "destination": dest,
                                                   "submitted": time.time()})
        pipe.expire(f"vhdcore:job:{job_id}", int(app.conf.result_expires or 7 * 24 * 3600))
        pipe.execute()
    # QUEUED with its meta, so status says 25 % and names the job before a worker has seen it
    app.backend.store_result(job_id, {"job": job_id, "host": host, "leaf": leaf, "destination": dest,
                                      "state": "queued", "percent": 25.0}, "QUEUED")
    app.send_task(TASK_NAME, args=(leaf, dest, host, dict(options or {})),
                  kwargs={"limits": dict(limits or {}), "max_retries": max_retries, "retry_backoff": retry_backoff,
                          "retry_backoff_max": retry_backoff_max},
                  task_id=job_id, queue=queue, routing_key=queue)
    return job_id


def status(job_id: str, *, broker: str | None = None, result_backend: str | None = None, app: Any = None
           ) -> dict[str, Any]:
    """The job's state as its Celery task reports it, in the vocabulary of the job record."""
    app = app or make_app(broker, result_backend)
    res = app.AsyncResult(job_id)
    st = res.state
    info = res.info
    out: dict[str, Any] = {"job": job_id, "celery_state": st}
    if isinstance(info, dict):
        out.update(info)
    elif isinstance(info, BaseException):
        try:
            detail = json.loads(str(info.args[0] if info.args else info))
            if isinstance(detail, dict):
                out.update(detail)
        except (ValueError, TypeError):
            out["error"] = {"code": type(info).__name__, "message": str(info)}
        if isinstance(info, JobFailed) or st == "FAILURE":
            out["state"] = "failed" if st == "FAILURE" else out.get("state", "retry")
    out["job"] = job_id
    if st == "PENDING":
        out.update(state="unknown", percent=None)  # never submitted here, or expired
    elif st == "SUCCESS":
        out.update(state="complete", percent=100.0)
    elif st == "RETRY":
        out["state"] = "retry"
    elif st in _FROM_CELERY:
        out["state"] = _FROM_CELERY[st]
    return out


def list_jobs(*, host: str | None = None, broker: str | None = None, result_backend: str | None = None,
              limit: int = 100, app: Any = None) -> list[dict[str, Any]]:
    """The newest ``limit`` jobs (of ``host``, or of every host), each with its :func:`status`."""
    app = app or make_app(broker, result_backend)
    client = _redis(app)
    ids: list[tuple[float, str]] = []
    if client is not None:
        keys = [f"vhdcore:jobs:{host}"] if host else [k.decode() if isinstance(k, bytes) else k
                                                       for k in client.scan_iter("vhdcore:jobs:*", count=1000)]
        for key in keys:
            for jid, score in client.zrevrange(key, 0, limit - 1, withscores=True):
                ids.append((score, jid.decode() if isinstance(jid, bytes) else jid))
    else:
        insp = app.control.inspect(timeout=2.0)
        for group in (insp.active() or {}, insp.reserved() or {}):
            for tasks in group.values():
                for t in tasks:
                    ids.append((t.get("time_start") or 0.0, t["id"]))
    ids.sort(reverse=True)
    out = [status(jid, app=app) for _, jid in ids[:limit]]
    return [j for j in out if host is None or j.get("host") in (host, None)]

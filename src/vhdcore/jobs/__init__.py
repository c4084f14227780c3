"""Imaging jobs: a durable record per job, resumable runs, stage time limits, throttles; and the fleet service.

* :mod:`.record` - the job record (``job.json`` in a job directory), rewritten atomically at every transition;
* :mod:`.throttle` - token buckets for ``--max-read-rate`` and ``--max-upload-rate``;
* :mod:`.runner` - :func:`run_job`: the embedded job (``vhdcore image --job-dir D``), resumable after a crash;
* :mod:`.celeryapp` / :mod:`.client` - the same job on Celery workers, one queue per host (``vhdcore worker``,
  ``submit``, ``status``, ``jobs``); needs the ``fleet`` extra (``celery[redis]``).
"""
from __future__ import annotations

from .record import JobRecord, JobRecordError, StageTimeout
from .runner import run_job
from ..throttle import TokenBucket

__all__ = ["JobRecord", "JobRecordError", "StageTimeout", "TokenBucket", "run_job"]

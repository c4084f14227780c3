"""The job record: one JSON file (``job.json``) in a job directory, the whole history of one imaging job.

It holds the job's identity and inputs (leaf, destination, options: a rerun in the same directory must name
the same job, or it is refused), every state transition with its UTC time and attempt, the progress of the
running stage (bytes done and total, rate, ETA), each stage's seconds and outcome, the delivered output
(size, digests, etag, manifest), warnings, and the error if the job failed. ``state`` is one of

    queued -> preparing -> [coalescing] -> saving | uploading -> complete
                                                     \\-> failed        (no point in retrying: bad input)
                                                     \\-> retry         (retry later: a stage ran past its time
                                                                        limit, or the upload was dropped)

Every rewrite goes through :func:`vhdcore.fileio.atomic_output` (a temporary file renamed over the old
one), so a crash or a kill at any moment leaves the previous record or the new one, never a torn one. State
transitions are fsynced; progress ticks (at most one a second) are not, since losing one costs nothing.

A record read back is input: its size is bounded, its JSON must parse to the fields written here, and it must
describe the job being run (same leaf, destination, options), else :class:`JobRecordError` names the file.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from ..fileio import atomic_output
from ..exceptions import JobRecordError, StageTimeout, error_object
from ..progress import utc_now

__all__ = ["JobRecord", "JobRecordError", "StageTimeout", "RECORD_NAME", "SCHEMA", "STATES", "TERMINAL"]

RECORD_NAME = "job.json"
SCHEMA = "vhdcore.job/1"
MAX_RECORD_BYTES = 8 * 1024 * 1024  # thousands of transitions fit; a larger file is not one we wrote
MAX_TRANSITIONS = 10_000            # a job retried forever must not grow its record without bound
STATES = ("queued", "preparing", "coalescing", "saving", "uploading", "complete", "failed", "retry")
TERMINAL = ("complete", "failed")
PROGRESS_INTERVAL = 1.0


class JobRecord:
    """The record of one job, kept in ``directory/job.json``. Attributes mirror the JSON (see :meth:`to_dict`)."""

    def __init__(self, directory: str | os.PathLike[str], data: dict[str, Any]) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.path = os.path.join(self.directory, RECORD_NAME)
        self.data = data
        self._last_tick = 0.0

    # ------------------------------------------------------------------ creation and loading

    @classmethod
    def create(cls, directory: str | os.PathLike[str], *, leaf: str, destination: str, options: dict[str, Any],
               job_id: str | None = None, host: str | None = None) -> "JobRecord":
        now = utc_now()
        rec = cls(directory, {
            "schema": SCHEMA, "id": job_id or str(uuid.uuid4()), "host": host, "leaf": leaf,
            "destination": destination, "options": options, "state": "queued", "created": now, "updated": now,
            "attempt": 0, "transitions": [{"state": "queued", "time": now, "attempt": 0}], "stages": {},
            "progress": None, "output": None, "warnings": [], "error": None, "destination_existed": None,
        })
        rec.save()
        return rec

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "JobRecord | None":
        """The record in ``directory``, or None if it has none yet."""
        path = os.path.join(os.fspath(directory), RECORD_NAME)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise JobRecordError(f"cannot open the job record: {e.strerror}", path=path) from e
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            raise JobRecordError(f"the job record is larger than {MAX_RECORD_BYTES} bytes; not one vhdcore wrote",
                                 path=path, field="size")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise JobRecordError(f"the job record is not valid JSON: {e}", path=path, offset=getattr(e, "pos", None))
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise JobRecordError(f"not a vhdcore job record (schema is not {SCHEMA!r})", path=path, field="schema")
        for key, typ in (("id", str), ("leaf", str), ("destination", str), ("options", dict), ("state", str),
                         ("transitions", list), ("stages", dict), ("warnings", list), ("attempt", int)):
            if not isinstance(data.get(key), typ):
                raise JobRecordError(f"the job record's {key!r} is missing or not a {typ.__name__}", path=path,
                                     field=key)
        if data["state"] not in STATES:
            raise JobRecordError(f"unknown job state {data['state']!r}", path=path, field="state")
        return cls(directory, data)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, leaf: str, destination: str, options: dict[str, Any],
             job_id: str | None = None, host: str | None = None) -> "JobRecord":
        """The record of this job in ``directory``: the existing one if it describes the same job, else a new one.

        A record of another job (another leaf, destination or options, or another id when one is given) is
        refused rather than overwritten: the directory belongs to that job.
        """
        os.makedirs(directory, exist_ok=True)
        rec = cls.load(directory)
        if rec is None:
            return cls.create(directory, leaf=leaf, destination=destination, options=options, job_id=job_id,
                              host=host)
        d = rec.data
        for key, want in (("leaf", leaf), ("destination", destination), ("options", options),
                          ("id", job_id if job_id is not None else d["id"])):
            if d.get(key) != want:
                raise JobRecordError(f"the job directory holds another job (its {key} is {d.get(key)!r}, this "
                                     f"job's is {want!r}); use another --job-dir", path=rec.path, field=key)
        return rec

    # ------------------------------------------------------------------ writing

    def save(self, durable: bool = True) -> None:
        self.data["updated"] = utc_now()
        blob = json.dumps(self.data, indent=1, default=str).encode()
        with atomic_output(self.path, mode=0o644, fsync=durable) as (fd, _tmp):
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def state(self) -> str:
        return self.data["state"]

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name) or {}

    def transition(self, state: str, **extra: Any) -> None:
        """Enter ``state`` (durably), appending it to the history with its time."""
        if state not in STATES:
            raise ValueError(f"unknown job state {state!r}")
        d = self.data
        d["state"] = state
        entry = {"state": state, "time": utc_now(), "attempt": d["attempt"]}
        entry.update(extra)
        d["transitions"].append(entry)
        if len(d["transitions"]) > MAX_TRANSITIONS:
            del d["transitions"][1 : len(d["transitions"]) - MAX_TRANSITIONS + 1]
        self.save()

    def begin_attempt(self) -> None:
        self.data["attempt"] += 1
        self.data["error"] = None

    def stage_started(self, name: str, state: str) -> None:
        st = self.data["stages"].setdefault(name, {})
        st.update(state="running", started=utc_now(), attempt=self.data["attempt"])
        st.pop("finished", None)
        st["runs"] = int(st.get("runs", 0)) + 1
        self._t_stage = time.monotonic()
        self.data["progress"] = {"stage": name, "done": 0, "total": None, "rate": None, "eta": None}
        if self.data["state"] != state:
            self.transition(state, stage=name)
        else:
            self.data["transitions"].append({"state": state, "stage": name, "time": utc_now(),
                                             "attempt": self.data["attempt"]})
            self.save()

    def stage_done(self, name: str, result: dict[str, Any] | None = None, skipped: str | None = None) -> None:
        st = self.data["stages"].setdefault(name, {})
        st.update(state="skipped" if skipped else "done", finished=utc_now())
        if skipped:
            st["reason"] = skipped
        else:
            st["seconds"] = round(time.monotonic() - getattr(self, "_t_stage", time.monotonic()), 3)
        if result is not None:
            st["result"] = result
        self.save()

    def stage_stopped(self, name: str, exc: BaseException) -> None:
        st = self.data["stages"].setdefault(name, {})
        st.update(state="stopped", finished=utc_now(),
                  seconds=round(time.monotonic() - getattr(self, "_t_stage", time.monotonic()), 3))
        st["error"] = error_object(exc)

    def tick(self, stage: str, done: int, total: int | None, *, rate: float | None, eta: float | None,
             task_percent: float | None, force: bool = False, **extra: Any) -> bool:
        """Record the running stage's progress; written at most once a second (not fsynced). True if written."""
        self.data["progress"] = {"stage": stage, "done": int(done), "total": total, "rate": rate, "eta": eta,
                                 "task_percent": task_percent, **extra}
        now = time.monotonic()
        if not force and now - self._last_tick < PROGRESS_INTERVAL:
            return False
        self._last_tick = now
        self.save(durable=False)
        return True

    def fail(self, exc: BaseException, *, retry: bool) -> None:
        err = error_object(exc)
        err["retry"] = retry
        done = [k for k, v in self.data["stages"].items() if v.get("state") in ("done", "skipped")]
        err["stages_done"] = done
        self.data["error"] = err
        self.transition("retry" if retry else "failed", error=err["code"])

    def complete(self, output: dict[str, Any], warnings: list[str]) -> None:
        self.data["output"] = output
        for w in warnings:
            if w not in self.data["warnings"]:
                self.data["warnings"].append(w)
        self.data["error"] = None
        if self.data.get("progress"):
            self.data["progress"].update(eta=0.0, task_percent=100.0)
        self.transition("complete")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)

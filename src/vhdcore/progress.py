"""Progress reporting for long operations (coalesce, compress, upload, export, imaging).

Every long operation accepts ``progress=`` : any callable ``progress(done, total, **info)``, where ``done`` and
``total`` are byte counts (``total`` is None when unknown, e.g. the compressed size of a stream still being
made) and ``info`` carries named extras such as ``state``, ``stage``, ``segment`` or ``rate``. Operations call it
often (every chunk); reporters throttle themselves, so calling is cheap.

Reporters (built by :func:`make_reporter` from ``--progress``):

* :class:`TerminalBar`: one updating line per stage on stderr (stage, percent of the whole job, bytes, rate,
  elapsed, ETA), left on screen when the stage ends; only on a TTY unless asked for explicitly;
* :class:`JsonLines`: one JSON object per update (throttled) for machines, one schema for every command
  (``command, stage, state, done, total, percent, task_percent, rate, eta, elapsed, time``), ending with one
  ``complete`` or ``failed`` event from :meth:`finish` (docs/json.md);
* :class:`NullProgress` (and ``None``) ignore everything.

A command of several stages (``image``: check, preflight, growth, compact, export, coalesce) maps each stage
onto the whole job with :class:`Stages`. The imaging task states mirror what the seed pipeline reported to its
orchestrator (preparing, coalescing, saving, uploading, complete); :func:`task_percent` still gives the seed's
coarse 25/50/100 figure for a state, for callers that want it.
"""
from __future__ import annotations

import datetime as _dt
import enum
import inspect
import json
import sys
import threading
import time
from typing import IO, Any, Callable, Protocol, runtime_checkable

__all__ = [
    "Progress",
    "ProgressCallback",
    "NullProgress",
    "TerminalBar",
    "JsonLines",
    "Tee",
    "Stages",
    "utc_now",
    "TaskState",
    "TASK_STATE_PERCENT",
    "task_percent",
    "as_progress",
    "make_reporter",
]


@runtime_checkable
class Progress(Protocol):
    """What a long operation calls: ``progress(done, total, **info)``."""

    def __call__(self, done: int, total: int | None, **info: Any) -> None: ...


ProgressCallback = Callable[..., None]


class TaskState(str, enum.Enum):
    """Imaging task states, as the seed pipeline reports them."""

    PREPARING = "preparing"
    COALESCING = "coalescing"
    SAVING = "saving"
    UPLOADING = "uploading"
    COMPLETE = "complete"


# Where each state starts on the 0-100 scale the orchestrator shows; the state after it is where it ends.
TASK_STATE_PERCENT: dict[TaskState, int] = {
    TaskState.PREPARING: 25,
    TaskState.COALESCING: 25,
    TaskState.SAVING: 50,
    TaskState.UPLOADING: 50,
    TaskState.COMPLETE: 100,
}
_NEXT_PERCENT: dict[TaskState, int] = {
    TaskState.PREPARING: 25,
    TaskState.COALESCING: 50,
    TaskState.SAVING: 100,
    TaskState.UPLOADING: 100,
    TaskState.COMPLETE: 100,
}


def task_percent(state: TaskState | str, done: int = 0, total: int | None = None) -> float:
    """Overall percentage for ``state`` with ``done`` of ``total`` bytes of that state finished.

    Without a known total the state's own starting figure is returned (the coarse seed behaviour).
    """
    st = TaskState(state)
    start, end = TASK_STATE_PERCENT[st], _NEXT_PERCENT[st]
    if not total or total <= 0 or end == start:
        return float(start)
    frac = min(max(done / total, 0.0), 1.0)
    return start + (end - start) * frac


def _percent(done: int, total: int | None) -> float | None:
    if total is None or total <= 0:
        return None
    return round(100.0 * min(max(done / total, 0.0), 1.0), 2)


class NullProgress:
    """Reports nothing."""

    def __call__(self, done: int, total: int | None, **info: Any) -> None:
        return None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - loop always returns


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds and a Z, the form every time in vhdcore's JSON takes."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


class _Reporter:
    """What the bar and the JSON lines share: the job's stages, throttling, and the numbers of one event.

    A *stage* is one part of a command's work (``export``, ``coalesce``, ``verify``...); operations name it with
    ``stage=`` or, for the imaging pipeline, with the task ``state``; a command of one stage is named by its
    ``command``. ``percent`` is the fraction of the stage's ``total``; ``task_percent`` the whole job's (an
    operation with several stages passes ``job_percent``; otherwise the stage is the job). ``rate`` is bytes per
    second within the stage, ``elapsed`` seconds since the job began, ``eta`` the seconds the job still needs at
    its pace so far (None until it can be told). Operations call from several threads, hence the lock.
    """

    def __init__(self, command: str = "", min_interval: float = 0.1) -> None:
        self.command = command
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._last = float("-inf")
        self._stage: str | None = None
        self._stage_t0 = self._t0
        self._stage_done0 = 0
        self._event: dict[str, Any] | None = None  # the latest event, shown or not
        self.finished = False

    def _make(self, done: int, total: int | None, info: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        now = time.monotonic()
        state = _value(info.pop("state", None))
        stage = _value(info.pop("stage", None)) or state or self.command or "work"
        job = info.pop("job_percent", None)
        changed = stage != self._stage
        if changed:
            self._stage, self._stage_t0, self._stage_done0 = stage, now, done
        pct = _percent(done, total)
        task = round(float(job), 2) if job is not None else pct
        elapsed = now - self._t0
        in_stage = now - self._stage_t0
        rate = round((done - self._stage_done0) / in_stage) if in_stage > 0.05 else None
        eta = None
        if task is not None and 0 < task < 100 and elapsed > 0.2:
            eta = round(elapsed * (100 - task) / task, 1)
        elif task is not None and task >= 100:
            eta = 0.0
        ev = {"command": self.command or None, "stage": stage, "state": state or "running", "done": done,
              "total": total, "percent": pct, "task_percent": task, "rate": rate, "eta": eta,
              "elapsed": round(elapsed, 3), "time": utc_now()}
        ev.update({k: _value(v) for k, v in info.items() if k not in ev})
        return ev, changed

    def _due(self, ev: dict[str, Any], changed: bool, force: bool) -> bool:
        now = time.monotonic()
        final = ev["total"] is not None and ev["total"] > 0 and ev["done"] >= ev["total"]
        if force or changed or final or now - self._last >= self.min_interval:
            self._last = now
            return True
        return False

    def __call__(self, done: int, total: int | None, **info: Any) -> None:
        if _value(info.get("state")) in ("complete", "failed"):
            # the job's end is the command's to announce (finish), once: an operation inside a larger job
            # saying it is complete is not the end of the job
            return
        force = bool(info.pop("force", False))
        with self._lock:
            if self.finished:
                return
            ev, changed = self._make(done, total, dict(info))
            previous = self._event
            self._event = ev
            if self._due(ev, changed, force):
                self._show(ev, previous if changed else None)

    def finish(self, error: BaseException | None = None) -> None:
        """The job's final event: ``complete`` (at 100 %) or ``failed`` (with the error's message)."""
        with self._lock:
            if self.finished:
                return
            self.finished = True
            last = self._event or {"stage": self.command or "work", "done": 0, "total": None}
            ev = dict(last)
            now = time.monotonic()
            ev.update(command=self.command or None, elapsed=round(now - self._t0, 3), time=utc_now(), eta=None)
            if error is None:
                ev.update(state="complete", task_percent=100.0, eta=0.0)
                if ev.get("total"):
                    ev.update(done=ev["total"], percent=100.0)
            else:
                ev.update(state="failed", error={"code": type(error).__name__,
                                                 "message": getattr(error, "message", None) or str(error)})
            self._end(last if self._event is not None else None, ev)

    def _show(self, ev: dict[str, Any], ended_stage: dict[str, Any] | None) -> None:  # pragma: no cover
        raise NotImplementedError

    def _end(self, last: dict[str, Any] | None, final: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    close = finish


class TerminalBar(_Reporter):
    """One updating line per stage on a terminal::

        image export [##########..........]  50.0% 1.2 GiB/2.4 GiB 310.0 MiB/s elapsed 0:04 ETA 0:04

    The percentage and the ETA are the whole job's; bytes and rate the stage's. When a stage ends its line is
    drawn once more with its last figures and left on screen (one final line per stage). Draws nothing when the
    stream is not a TTY unless ``force_tty`` (``--progress bar`` asks for it explicitly). :meth:`clear` wipes
    the line so that other text can be printed without landing on the bar.
    """

    def __init__(
        self,
        label: str = "",
        stream: IO[str] | None = None,
        min_interval: float = 0.1,
        width: int = 20,
        force_tty: bool = False,
    ) -> None:
        super().__init__(label, min_interval)
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = force_tty or bool(isatty and isatty())
        self._drawn = False
        self._closed: str | None = None  # the stage whose final line end_stage() already left

    def _line(self, ev: dict[str, Any]) -> str:
        head = " ".join(x for x in (self.command, ev["stage"] if ev["stage"] != self.command else "") if x)
        pct = ev["task_percent"]
        if pct is not None:
            fill = int(self.width * pct / 100)
            bar = f"[{'#' * fill}{'.' * (self.width - fill)}] {pct:5.1f}%"
        else:
            bar = f"[{'?' * self.width}]   ?  "
        size = _human(ev["done"]) + (f"/{_human(ev['total'])}" if ev["total"] else "")
        rate = f" {_human(ev['rate'])}/s" if ev["rate"] else ""
        tail = f" elapsed {_clock(ev['elapsed'])}"
        if ev["state"] not in ("complete", "failed"):
            tail += f" ETA {_clock(ev['eta'])}"
        state = f" {ev['state']}" if ev["state"] not in ("running", ev["stage"]) else ""
        return f"{head} {bar} {size}{rate}{tail}{state}".strip()

    def _draw(self, ev: dict[str, Any], newline: bool) -> None:
        self.stream.write("\r" + self._line(ev) + "\x1b[K" + ("\n" if newline else ""))
        self.stream.flush()
        self._drawn = not newline

    def _show(self, ev: dict[str, Any], ended_stage: dict[str, Any] | None) -> None:
        if not self.enabled:
            return
        if ended_stage is not None and ended_stage["stage"] != self._closed:
            self._draw(ended_stage, True)  # the stage that ended keeps its own final line
        self._closed = None
        self._draw(ev, False)

    def end_stage(self) -> None:
        """Leave the current stage's final line on screen now (before a CLI prints that stage's result)."""
        with self._lock:
            if self.enabled and self._event is not None and self._closed != self._event["stage"]:
                self._draw(self._event, True)
                self._closed = self._event["stage"]

    def _end(self, last: dict[str, Any] | None, final: dict[str, Any]) -> None:
        if self.enabled and final["stage"] != self._closed:
            self._draw(final, True)

    def clear(self) -> None:
        """Wipe the bar's line (before printing other text on the terminal); the next update redraws it."""
        with self._lock:
            if self.enabled and self._drawn:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._drawn = False


class JsonLines(_Reporter):
    """One JSON object per (throttled) update, the schema docs/json.md documents::

        {"command", "stage", "state", "done", "total", "percent", "task_percent", "rate", "eta", "elapsed",
         "time", ...extras}

    The last line of a job is its ``complete`` or ``failed`` event (:meth:`finish`). ``static`` fields are
    added to every line.
    """

    def __init__(self, stream: IO[str] | None = None, min_interval: float = 0.5, command: str = "",
                 **static: Any) -> None:
        super().__init__(command, min_interval)
        self.stream = stream if stream is not None else sys.stdout
        self.static = static

    def _write(self, ev: dict[str, Any]) -> None:
        rec = dict(ev)
        rec.update({k: v for k, v in self.static.items() if k not in rec})
        self.stream.write(json.dumps(rec, default=str) + "\n")
        self.stream.flush()

    def _show(self, ev: dict[str, Any], ended_stage: dict[str, Any] | None) -> None:
        self._write(ev)

    def _end(self, last: dict[str, Any] | None, final: dict[str, Any]) -> None:
        self._write(final)


class Stages:
    """Maps each stage's own ``done/total`` onto the whole job, for a command of several stages.

    ``weights`` are the stages in order with their share of the work (e.g. bytes each reads); ``stage(name)``
    returns the callback for that stage, which passes ``stage`` and ``job_percent`` on to ``progress``. A stage
    not in ``weights`` counts for nothing (its own percentage is still shown).
    """

    def __init__(self, progress: ProgressCallback | None, weights: dict[str, float]) -> None:
        self.progress = as_progress(progress)
        self.weights = {k: max(float(v), 0.0) for k, v in weights.items()}
        self.total = sum(self.weights.values()) or 1.0

    def _before(self, name: str) -> float:
        out = 0.0
        for k, w in self.weights.items():
            if k == name:
                return out
            out += w
        return out

    def stage(self, name: str, state: Any = None) -> ProgressCallback:
        start = self._before(name)
        w = self.weights.get(name, 0.0)

        def cb(done: int, total: int | None = None, **info: Any) -> None:
            frac = min(max(done / total, 0.0), 1.0) if total else 0.0
            info.pop("stage", None)
            if state is not None:
                info["state"] = state
            if _value(info.get("state")) == "complete":
                info["state"] = state  # the operation ended; the job goes on
            self.progress(done, total, stage=name, job_percent=100.0 * (start + w * frac) / self.total, **info)

        return cb


class Tee:
    """Forward every update to several reporters."""

    def __init__(self, *reporters: ProgressCallback | None) -> None:
        self.reporters = [r for r in reporters if r is not None]

    def __call__(self, done: int, total: int | None, **info: Any) -> None:
        for r in self.reporters:
            r(done, total, **dict(info))


def as_progress(progress: ProgressCallback | None) -> ProgressCallback:
    """``None`` -> a no-op; a plain ``f(done, total)`` -> wrapped to drop the extras; else unchanged.

    Operations then always call ``progress(done, total, **info)`` without checking.
    """
    if progress is None:
        return NullProgress()
    try:
        params = inspect.signature(progress).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume the full protocol
        return progress
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return progress
    plain = progress

    def _drop_info(done: int, total: int | None, **info: Any) -> None:
        plain(done, total)

    return _drop_info


def make_reporter(kind: str = "auto", label: str = "", stream: IO[str] | None = None) -> ProgressCallback:
    """Build a reporter by name: ``bar`` (drawn even when the stream is not a terminal: it was asked for),
    ``json``, ``none`` or ``auto`` (a bar on a TTY, else nothing). ``label`` is the command's name."""
    if kind in ("none", "null", "quiet"):
        return NullProgress()
    if kind == "json":
        return JsonLines(stream, command=label)
    if kind in ("bar", "auto"):
        return TerminalBar(label, stream, force_tty=kind == "bar")
    raise ValueError(f"unknown progress reporter {kind!r} (bar, json, none, auto)")

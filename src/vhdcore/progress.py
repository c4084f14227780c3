"""Progress reporting for long operations (coalesce, compress, upload, export).

Every long operation accepts ``progress=`` : any callable ``progress(done, total, **info)``, where ``done`` and
``total`` are byte counts (``total`` is None when unknown, e.g. the compressed size of a stream still being
made) and ``info`` carries named extras such as ``state``, ``segment`` or ``rate``. Operations call it often
(every chunk); reporters throttle themselves, so calling is cheap.

Three reporters:

* :class:`TerminalBar` draws one updating line on stderr, only when stderr is a TTY (a pipeline's log
  file must not fill with carriage returns);
* :class:`JsonLines` writes one JSON object per update (throttled) for machines: ``state``, ``done``,
  ``total``, ``percent`` and any extras;
* :class:`NullProgress` (and ``None``) ignore everything.

The imaging task states mirror what the seed pipeline reported to its orchestrator: the image is
``preparing``/``coalescing`` at 25 %, ``saving``/``uploading`` at 50 %, and ``complete`` at 100 %.
:func:`task_percent` maps a state plus the bytes done within it onto that scale, so a caller that only
understands the coarse states still sees the same numbers as before, and one that understands more sees
the steps in between.
"""
from __future__ import annotations

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


class _Throttled:
    """Shared throttling: an update is shown when ``min_interval`` passed, the state changed, or it is final.

    Operations call progress from several threads (upload workers, the writer), hence the lock.
    """

    def __init__(self, min_interval: float) -> None:
        self.min_interval = min_interval
        self._last = float("-inf")
        self._last_state: Any = None
        self._lock = threading.Lock()

    def _due(self, done: int, total: int | None, state: Any, force: bool) -> bool:
        now = time.monotonic()
        final = total is not None and total > 0 and done >= total
        if force or final or state != self._last_state or now - self._last >= self.min_interval:
            self._last = now
            self._last_state = state
            return True
        return False


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - loop always returns


class TerminalBar(_Throttled):
    """A one-line bar on a terminal: ``label [#####.....] 42.0% 1.2 GiB/2.9 GiB 310.0 MiB/s state``.

    Draws nothing when the stream is not a TTY (unless ``force_tty``), so redirected output stays clean.
    """

    def __init__(
        self,
        label: str = "",
        stream: IO[str] | None = None,
        min_interval: float = 0.1,
        width: int = 30,
        force_tty: bool = False,
    ) -> None:
        super().__init__(min_interval)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = force_tty or bool(isatty and isatty())
        self._t0 = time.monotonic()
        self._drawn = False

    def __call__(self, done: int, total: int | None, **info: Any) -> None:
        if not self.enabled:
            return
        state = info.get("state")
        with self._lock:
            if not self._due(done, total, state, False):
                return
            elapsed = max(time.monotonic() - self._t0, 1e-9)
            pct = _percent(done, total)
            if pct is not None:
                fill = int(self.width * pct / 100)
                bar = f"[{'#' * fill}{'.' * (self.width - fill)}] {pct:5.1f}% {_human(done)}/{_human(total or 0)}"
            else:
                bar = f"{_human(done)}"
            line = f"{self.label + ' ' if self.label else ''}{bar} {_human(done / elapsed)}/s"
            if state is not None:
                line += f" {getattr(state, 'value', state)}"
            self.stream.write("\r" + line + "\x1b[K")
            if pct is not None and pct >= 100:
                self.stream.write("\n")
            self.stream.flush()
            self._drawn = True


class JsonLines(_Throttled):
    """One JSON object per (throttled) update: ``{"state", "done", "total", "percent", ...extras}``.

    ``percent`` is the fraction of ``total`` (None when the total is unknown); when the update carries a
    task ``state`` a ``task_percent`` on the seed's 25/50/100 scale is added too.
    """

    def __init__(self, stream: IO[str] | None = None, min_interval: float = 0.5, **static: Any) -> None:
        super().__init__(min_interval)
        self.stream = stream if stream is not None else sys.stdout
        self.static = static

    def __call__(self, done: int, total: int | None, **info: Any) -> None:
        state = info.pop("state", None)
        force = bool(info.pop("force", False))
        with self._lock:
            if not self._due(done, total, state, force):
                return
            record: dict[str, Any] = dict(self.static)
            record.update(
                state=getattr(state, "value", state),
                done=done,
                total=total,
                percent=_percent(done, total),
            )
            if state is not None:
                try:
                    record["task_percent"] = round(task_percent(state, done, total), 2)
                except ValueError:  # an operation's own state name, not an imaging task state
                    pass
            record.update({k: getattr(v, "value", v) for k, v in info.items()})
            self.stream.write(json.dumps(record, default=str) + "\n")
            self.stream.flush()


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
    """Build a reporter by name: ``bar``, ``json``, ``none`` or ``auto`` (a bar on a TTY, else nothing)."""
    if kind in ("none", "null", "quiet"):
        return NullProgress()
    if kind == "json":
        return JsonLines(stream)
    if kind in ("bar", "auto"):
        return TerminalBar(label, stream)
    raise ValueError(f"unknown progress reporter {kind!r} (bar, json, none, auto)")

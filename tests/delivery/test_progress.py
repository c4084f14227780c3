"""Progress reporters: JSON lines for machines, a bar only on terminals, the seed's task states."""
from __future__ import annotations

import io
import json

import pytest

from vhdcore.progress import (
    JsonLines,
    NullProgress,
    TaskState,
    TerminalBar,
    Tee,
    as_progress,
    make_reporter,
    task_percent,
)

pytestmark = pytest.mark.backend_independent


def test_json_lines_records_and_throttling() -> None:
    out = io.StringIO()
    rep = JsonLines(out, min_interval=3600, operation="export")
    rep(0, 1000, state="coalescing")          # first: shown
    rep(10, 1000, state="coalescing")         # throttled
    rep(20, 1000, state="coalescing")         # throttled
    rep(0, None, state=TaskState.UPLOADING, segment=3)  # state change: shown
    rep(500, None, state="uploading")         # throttled
    rep(1000, 1000, state="uploading")        # final: shown
    rep(1000, 1000, state=TaskState.COMPLETE)  # state change: shown
    lines = [json.loads(l) for l in out.getvalue().splitlines()]
    assert [(l["state"], l["done"], l["total"], l["percent"]) for l in lines] == [
        ("coalescing", 0, 1000, 0.0),
        ("uploading", 0, None, None),
        ("uploading", 1000, 1000, 100.0),
        ("complete", 1000, 1000, 100.0),
    ]
    assert lines[0]["operation"] == "export" and lines[0]["task_percent"] == 25.0
    assert lines[1]["segment"] == 3 and lines[1]["task_percent"] == 50.0
    assert lines[2]["task_percent"] == 100.0


def test_json_lines_without_throttle_reports_every_update() -> None:
    out = io.StringIO()
    rep = JsonLines(out, min_interval=0)
    for i in range(5):
        rep(i, 4)
    assert len(out.getvalue().splitlines()) == 5


def test_task_states_of_the_seed() -> None:
    assert [s.value for s in TaskState] == ["preparing", "coalescing", "saving", "uploading", "complete"]
    assert task_percent("preparing") == 25
    assert task_percent("coalescing") == 25
    assert task_percent("coalescing", 50, 100) == 37.5
    assert task_percent("saving") == 50 and task_percent("uploading") == 50
    assert task_percent("uploading", 3, 4) == 87.5
    assert task_percent(TaskState.COMPLETE) == 100
    with pytest.raises(ValueError):
        task_percent("flying")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_bar_only_on_a_tty() -> None:
    plain = io.StringIO()
    TerminalBar("export", plain, min_interval=0)(5, 10)
    assert plain.getvalue() == ""
    tty = _Tty()
    bar = TerminalBar("export", tty, min_interval=0)
    bar(5, 10, state="uploading")
    bar(10, 10)
    text = tty.getvalue()
    assert "\r" in text and "export" in text and " 50.0%" in text and "100.0%" in text and "uploading" in text
    assert text.endswith("\n")


def test_helpers() -> None:
    calls: list[tuple] = []
    plain = as_progress(lambda done, total: calls.append((done, total)))
    plain(1, 2, state="saving", extra=1)  # a two-argument callback still works
    assert calls == [(1, 2)]
    assert isinstance(as_progress(None), NullProgress)
    seen: list[dict] = []
    tee = Tee(lambda d, t, **i: seen.append(i), None, lambda d, t, **i: seen.append(i))
    tee(1, 2, state="saving")
    assert seen == [{"state": "saving"}, {"state": "saving"}]
    assert isinstance(make_reporter("json", stream=io.StringIO()), JsonLines)
    assert isinstance(make_reporter("none"), NullProgress)
    with pytest.raises(ValueError):
        make_reporter("fireworks")

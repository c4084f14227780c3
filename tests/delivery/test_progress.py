"""Progress reporters: JSON lines for machines, a bar only on terminals, the seed's task states."""
from __future__ import annotations

import io
import json

import pytest

from vhdcore.progress import (
    JsonLines,
    NullProgress,
    Stages,
    TaskState,
    TerminalBar,
    Tee,
    as_progress,
    make_reporter,
    task_percent,
)

pytestmark = pytest.mark.backend_independent


SCHEMA_KEYS = {"command", "stage", "state", "done", "total", "percent", "task_percent", "rate", "eta", "elapsed",
               "time"}


def test_json_lines_records_and_throttling() -> None:
    out = io.StringIO()
    rep = JsonLines(out, min_interval=3600, command="export", operation="export")
    rep(0, 1000, state="coalescing")          # first: shown
    rep(10, 1000, state="coalescing")         # throttled
    rep(20, 1000, state="coalescing")         # throttled
    rep(0, None, state=TaskState.UPLOADING, segment=3)  # stage change: shown
    rep(500, None, state="uploading")         # throttled
    rep(1000, 1000, state="uploading")        # final: shown
    rep(1000, 1000, state=TaskState.COMPLETE)  # an operation's end is not the job's: not shown
    rep.finish()                              # the job's end: one complete event
    rep.finish()
    lines = [json.loads(l) for l in out.getvalue().splitlines()]
    assert [(l["state"], l["done"], l["total"], l["percent"]) for l in lines] == [
        ("coalescing", 0, 1000, 0.0),
        ("uploading", 0, None, None),
        ("uploading", 1000, 1000, 100.0),
        ("complete", 1000, 1000, 100.0),
    ]
    assert all(SCHEMA_KEYS <= set(l) for l in lines)
    assert lines[0]["operation"] == "export" and lines[0]["command"] == "export"
    assert lines[1]["segment"] == 3 and lines[1]["stage"] == "uploading"
    assert lines[-1]["task_percent"] == 100.0 and lines[-1]["eta"] == 0.0
    assert all(l["time"].endswith("Z") and "T" in l["time"] for l in lines)


def test_json_lines_failed_event() -> None:
    out = io.StringIO()
    rep = JsonLines(out, min_interval=0, command="coalesce")
    rep(5, 10)
    rep.finish(OSError(28, "No space left on device"))
    last = json.loads(out.getvalue().splitlines()[-1])
    assert last["state"] == "failed" and last["error"]["code"] == "OSError" and last["done"] == 5


def test_stages_map_onto_the_whole_job() -> None:
    seen: list[dict] = []
    st = Stages(lambda d, t, **i: seen.append(i), {"a": 1, "b": 3})
    st.stage("a", "preparing")(5, 10)
    st.stage("b", "saving")(3, 6)
    assert [(i["stage"], i["state"], i["job_percent"]) for i in seen] == [("a", "preparing", 12.5),
                                                                          ("b", "saving", 62.5)]


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


def test_terminal_bar_only_on_a_tty_unless_asked() -> None:
    plain = io.StringIO()
    TerminalBar("export", plain, min_interval=0)(5, 10)
    assert plain.getvalue() == ""
    asked = io.StringIO()
    make_reporter("bar", "export", stream=asked)(5, 10)  # --progress bar: drawn although not a terminal
    assert "50.0%" in asked.getvalue()
    tty = _Tty()
    bar = TerminalBar("image", tty, min_interval=0)
    bar(5, 10, stage="export", state="uploading", job_percent=40.0)
    bar(10, 10, stage="export", state="uploading", job_percent=80.0)
    bar(0, 4, stage="coalesce", state="coalescing", job_percent=80.0)
    bar(4, 4, stage="coalesce", state="coalescing", job_percent=100.0)
    bar(1, 1, state="complete")
    bar.finish()
    text = tty.getvalue()
    finals = [l.split("\r")[-1] for l in text.split("\n") if l]
    # one final line per stage; the percentages are the job's; elapsed and ETA shown while running
    assert len(finals) == 2, finals  # the job's end completes the last stage's line
    assert finals[0].startswith("image export [") and " 80.0%" in finals[0] and "10 B/10 B" in finals[0]
    assert finals[1].startswith("image coalesce [") and "100.0%" in finals[1] and "complete" in finals[1]
    assert "1 B/1 B" not in text and "ETA" not in finals[1]
    assert "elapsed 0:00 ETA" in text


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

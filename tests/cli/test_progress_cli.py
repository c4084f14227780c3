"""Progress as a user sees it: every long command's JSON lines follow one schema (docs/json.md) and end with one
complete or failed event; the bar, drawn on a real pseudo-terminal, shows stage, job percent, bytes, rate,
elapsed and ETA, leaves one final line per stage and never has other text printed onto it."""
from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.vhdtest import MiB, build_chain

# What is shown (events, the bar), not what the kernels compute: the Cython pass only, like test_json_schema.
pytestmark = pytest.mark.backend_independent

KEYS = {"command", "stage", "state", "done", "total", "percent", "task_percent", "rate", "eta", "elapsed", "time"}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _json_lines(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    r = subprocess.run([sys.executable, "-m", "vhdcore", *args, "--progress", "json"], capture_output=True,
                       text=True, cwd=cwd)
    return r, [json.loads(l) for l in r.stderr.splitlines() if l.startswith("{")]


def _check_schema(command: str, lines: list[dict]) -> None:
    assert lines, f"{command}: no progress lines"
    for ev in lines:
        assert KEYS <= set(ev), (command, sorted(KEYS - set(ev)))
        assert ev["command"] == command and isinstance(ev["stage"], str) and isinstance(ev["state"], str)
        assert ISO_UTC.match(ev["time"]), ev["time"]
        for k in ("percent", "task_percent"):
            assert ev[k] is None or 0.0 <= ev[k] <= 100.0, (k, ev)
        assert ev["eta"] is None or ev["eta"] >= 0 and ev["rate"] is None or ev["rate"] >= 0
        assert isinstance(ev["done"], int) and (ev["total"] is None or isinstance(ev["total"], int))
    ends = [ev for ev in lines if ev["state"] in ("complete", "failed")]
    assert ends == [lines[-1]], f"{command}: one final event, last"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("progress")
    build_chain(d, 3, size=4 * MiB, writes=20)
    return d


@pytest.mark.parametrize("args", [
    ["convert", "child2.vhd", "c.raw", "--to", "raw"],
    ["compact", "child2.vhd", "k.vhd", "--mode", "zero"],
    ["growth", "child2.vhd"],
    ["export", "child2.vhd", "e.vhd.zst"],
    ["verify", "e.vhd.zst", "child2.vhd"],
    ["image", "child2.vhd", "i.vhd.gz", "--no-growth"],
    ["coalesce", "child2.vhd", "--verify"],
], ids=lambda a: a[0])
def test_every_long_command_speaks_one_json_lines_schema(work: Path, args: list[str]) -> None:
    r, lines = _json_lines(args, work)
    assert r.returncode == 0, r.stderr
    _check_schema(args[0], lines)
    assert lines[-1]["state"] == "complete" and lines[-1]["task_percent"] == 100.0
    task = [ev["task_percent"] for ev in lines if ev["task_percent"] is not None]
    assert task == sorted(task), f"{args[0]}: the job's percentage never goes back"
    if args[0] == "coalesce":  # --verify shows its hashing passes too
        assert {"verify-before", "merge", "verify-after"} <= {ev["stage"] for ev in lines}


def test_a_failing_command_ends_with_a_failed_event(work: Path) -> None:
    r, lines = _json_lines(["export", "child2.vhd", "no-such-dir/e.vhd"], work)
    assert r.returncode == 1
    _check_schema("export", lines)
    assert lines[-1]["state"] == "failed" and lines[-1]["error"]["message"]


def _on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run with stdout and stderr on one pseudo-terminal, as a user at a shell sees it."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "vhdcore", *args], stdout=slave, stderr=slave, cwd=cwd,
                         env={**os.environ, "COLUMNS": "200"})
    os.close(slave)
    out = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(), out.decode(errors="replace").replace("\r\n", "\n")


def _visible_lines(text: str) -> list[str]:
    """What stays on screen of each line: the text after its last carriage return, escape codes removed."""
    return [re.sub(r"\x1b\[K", "", l.split("\r")[-1]) for l in text.split("\n") if l.strip()]


def test_bar_on_a_pseudo_terminal_coalesce_verify(tmp_path: Path) -> None:
    build_chain(tmp_path, 3, size=4 * MiB, writes=20)
    rc, text = _on_a_terminal(["coalesce", "child2.vhd", "--verify"], tmp_path)
    assert rc == 0, text
    bars = [l for l in _visible_lines(text) if l.startswith("coalesce ")]
    stages = [l.split()[1] for l in bars]
    assert stages == ["verify-before", "merge", "verify-after"], bars  # one final line per stage
    for l in bars:
        assert re.search(r"\] +\d+\.\d%", l) and "elapsed" in l and "/" in l, l
    assert "100.0%" in bars[-1] and "complete" in bars[-1]
    assert "1 B/1 B" not in text
    assert "ETA" in text  # shown while a stage runs


def test_bar_on_a_pseudo_terminal_image_keeps_stage_text_off_the_bar(tmp_path: Path) -> None:
    build_chain(tmp_path, 3, size=4 * MiB, writes=20)
    rc, text = _on_a_terminal(["image", "child2.vhd", "out.vhd.zst", "--no-growth", "--coalesce-in-place"],
                              tmp_path)
    assert rc == 0, text
    vis = _visible_lines(text)
    for l in vis:
        assert not (l.startswith("[") and "ETA" in l), f"stage text printed onto the bar: {l!r}"
    bars = [l.split()[1] for l in vis if l.startswith("image ")]
    assert bars == ["check", "preflight", "export", "coalesce"], vis
    assert "1 B/1 B" not in text
    assert any(l.startswith("[saving]") for l in vis) and any(l.startswith("[coalescing]") for l in vis)


def test_explicit_bar_is_drawn_when_stderr_is_not_a_terminal(work: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vhdcore", "growth", "child2.vhd", "--progress", "bar"],
                       capture_output=True, text=True, cwd=work)
    assert r.returncode == 0 and "growth [" in r.stderr and "%" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "vhdcore", "growth", "child2.vhd"], capture_output=True, text=True,
                       cwd=work)
    assert r.returncode == 0 and r.stderr == ""

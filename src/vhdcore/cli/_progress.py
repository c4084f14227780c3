"""The ``--progress`` option every long-running sub-command shares (reporters live in vhdcore.progress)."""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator

from ..progress import ProgressCallback, make_reporter


def add_progress_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=["auto", "bar", "json", "none"], default="auto",
                   help="progress display on stderr: a bar when it is a terminal (auto), a bar anyway (bar), JSON "
                        "lines for pipelines (json, docs/json.md), or none")


@contextlib.contextmanager
def progress_from_args(args: argparse.Namespace, label: str) -> Iterator[ProgressCallback]:
    """The reporter ``--progress`` asks for; on leaving, its final ``complete`` or ``failed`` event."""
    reporter = make_reporter(getattr(args, "progress", "auto"), label, stream=sys.stderr)
    finish = getattr(reporter, "finish", None)
    try:
        yield reporter
    except BaseException as exc:
        if finish is not None:
            finish(exc)
        raise
    if finish is not None:
        finish()

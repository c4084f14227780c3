"""The ``--progress`` option every long-running sub-command shares (reporters live in vhdcore.progress)."""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator

from ..progress import ProgressCallback, make_reporter


def add_progress_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=["auto", "bar", "json", "none"], default="auto",
                   help="progress display: a bar on a terminal (auto), JSON lines on stderr for pipelines, or none")


@contextlib.contextmanager
def progress_from_args(args: argparse.Namespace, label: str) -> Iterator[ProgressCallback]:
    reporter = make_reporter(getattr(args, "progress", "auto"), label, stream=sys.stderr)
    try:
        yield reporter
    finally:
        close = getattr(reporter, "close", None)
        if close is not None:
            close()

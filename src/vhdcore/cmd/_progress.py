"""The ``--progress`` option every long-running sub-command shares."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Callable, Iterator, Optional

ProgressFn = Callable[[int, int], None]


def add_progress_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=["auto", "bar", "json", "none"], default="auto",
                   help="progress display: a bar on a terminal (auto), JSON lines on stderr for pipelines, or none")


class _Reporter:
    def __init__(self, kind: str, label: str, stream=None) -> None:
        self.kind = kind
        self.label = label
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.last = 0.0
        self.last_done = -1

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        final = total and done >= total
        if not final and now - self.last < 0.2:
            return
        self.last = now
        self.last_done = done
        pct = 100.0 * done / total if total else 100.0
        if self.kind == "json":
            self.stream.write(json.dumps({"operation": self.label, "done": done, "total": total,
                                          "percent": round(pct, 1), "elapsed": round(now - self.t0, 3)}) + "\n")
        else:
            width = 30
            filled = int(width * pct / 100)
            rate = done / max(now - self.t0, 1e-6) / 1e6
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {pct:5.1f}% {rate:8.1f} MB/s")
            if final:
                self.stream.write("\n")
        self.stream.flush()


@contextlib.contextmanager
def progress_from_args(args: argparse.Namespace, label: str) -> Iterator[Optional[ProgressFn]]:
    kind = getattr(args, "progress", "auto")
    if kind == "auto":
        kind = "bar" if sys.stderr.isatty() else "none"
    if kind == "none":
        yield None
        return
    rep = _Reporter(kind, label)
    yield rep

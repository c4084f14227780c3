"""The resumable merge's journal: which target blocks an interrupted coalesce had already merged, durably.

``coalesce(..., resume=True)`` keeps ``.<child>.coalesce-progress`` beside the child. At a checkpoint (about
once a second, and when a stage time limit stops the merge) the target writer makes everything written so far
durable, data and metadata in their usual order (a state a crash could have left too), and only then is the
list of merged blocks written, atomically. A rerun skips those blocks, so it costs what was left. The file is
removed once the merge is complete.

The journal is input: it is used only if it describes this very merge (the child and target paths, the unit of
work, the target's unique id and inode, and every source layer's unique id, inode, size and modification time:
a source written to since, e.g. by a VM that ran on, invalidates it and the merge starts over), and its size
and block numbers are bounded. Anything else is ignored (and overwritten at the next checkpoint).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import numpy as np

from ...fileio import atomic_output, fsync_dir

__all__ = ["MergeProgress", "progress_path"]

SCHEMA = "vhdcore.coalesce-progress/1"
MAX_BYTES = 64 * 1024 * 1024
CHECKPOINT_SECONDS = 1.0
CHECKPOINT_BYTES = 256 * 1024 * 1024


def progress_path(child: str) -> str:
    d, name = os.path.split(os.path.abspath(child))
    return os.path.join(d, f".{name}.coalesce-progress")


def _layer_id(img: Any) -> list:
    st = os.fstat(img.fd)
    return [os.path.realpath(img.path), str(img.unique_id), st.st_ino, st.st_size, st.st_mtime_ns]


def _ranges(blocks: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for b in sorted(set(blocks)):
        if out and out[-1][1] == b:
            out[-1][1] = b + 1
        else:
            out.append([b, b + 1])
    return out


class MergeProgress:
    def __init__(self, sources: list[Any], target: Any, unit: int, limit: int) -> None:
        self.path = progress_path(sources[0].path)
        self.binding = {"child": os.path.realpath(sources[0].path), "target": os.path.realpath(target.path),
                        "unit": unit, "target_id": [str(target.unique_id), os.fstat(target.fd).st_ino],
                        "sources": [_layer_id(L) for L in sources]}
        self.max_block = -(-limit // unit)
        self.done: list[int] = []
        self.resumed = np.zeros(0, dtype=np.int64)
        self._t = time.monotonic()
        self._bytes = 0
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)
            if len(raw) > MAX_BYTES:
                return
            rec = json.loads(raw)
        except (OSError, ValueError):
            return
        if not isinstance(rec, dict) or rec.get("schema") != SCHEMA or rec.get("binding") != self.binding:
            return
        blocks: list[int] = []
        for r in rec.get("done", []):
            if (not isinstance(r, list) or len(r) != 2 or not all(isinstance(x, int) for x in r)
                    or not 0 <= r[0] < r[1] <= self.max_block):
                return  # not ours after all: ignore it whole
            blocks.extend(range(r[0], r[1]))
        self.resumed = np.asarray(sorted(set(blocks)), dtype=np.int64)
        self.done = list(self.resumed.tolist())

    def remaining(self, blocks: np.ndarray) -> np.ndarray:
        return blocks[~np.isin(blocks, self.resumed)] if len(self.resumed) else blocks

    def add(self, block: int, n: int) -> None:
        self.done.append(int(block))
        self._bytes += n

    def due(self) -> bool:
        return self._bytes >= CHECKPOINT_BYTES or (self._bytes and time.monotonic() - self._t >= CHECKPOINT_SECONDS)

    def save(self) -> None:
        """Write the journal. Call only after the target writer's checkpoint made those blocks durable."""
        blob = json.dumps({"schema": SCHEMA, "binding": self.binding, "done": _ranges(self.done)}).encode()
        with atomic_output(self.path, mode=0o600) as (fd, _tmp):
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
        self._t, self._bytes = time.monotonic(), 0

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        fsync_dir(os.path.dirname(self.path))

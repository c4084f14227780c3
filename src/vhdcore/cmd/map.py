"""vhdcore map: which layer holds each run of the virtual disk (like qemu-img map --output=json)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterator

from ..chain import Disk, open_chain
from ._common import add_open_arguments

NAME = "map"
HELP = "list the allocated extents of a disk, per layer of its chain"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="one JSON array, like qemu-img map --output=json")
    p.add_argument("--all", action="store_true", help="also list the runs that read as zeros")
    add_open_arguments(p)


def map_entries(disk: Disk, include_zero: bool = False) -> Iterator[dict]:
    """Extents, with runs of one layer that continue in its file joined."""
    cur: dict | None = None
    for ext in disk.extents():
        if ext.layer is None and not include_zero:
            if cur:
                yield cur
                cur = None
            continue
        if (cur is not None and ext.depth == cur["depth"] and cur["start"] + cur["length"] == ext.offset
                and (ext.layer is None or cur["offset"] + cur["length"] == ext.file_offset)):
            cur["length"] += ext.length
            continue
        if cur:
            yield cur
        cur = {"start": ext.offset, "length": ext.length, "depth": ext.depth, "data": ext.layer is not None,
               "zero": ext.layer is None, "offset": ext.file_offset if ext.layer is not None else None,
               "file": ext.layer.path if ext.layer is not None else None}
    if cur:
        yield cur


def run(args: argparse.Namespace) -> int:
    with open_chain(args.path, "r", args.parent_dir, strict=not args.ignore_checksums) as disk:
        entries = map_entries(disk, args.all)
        if args.json:
            out = sys.stdout
            out.write("[")
            for i, e in enumerate(entries):
                out.write(("," if i else "") + "\n  " + json.dumps(e))
            out.write("\n]\n")
            return 0
        print(f"{'start':>16} {'length':>14} {'depth':>5} {'file offset':>14}  file")
        for e in entries:
            off = "-" if e["offset"] is None else str(e["offset"])
            print(f"{e['start']:>16} {e['length']:>14} {e['depth']:>5} {off:>14}  {e['file'] or '(zeros)'}")
    return 0

"""vhdcore map: which layer holds each run of the virtual disk (like qemu-img map --output=json)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator

import numpy as np

from ..disk.chain import Disk, open_chain
from ..format.structs import UNUSED_BAT_ENTRY, DiskType
from ._common import add_open_arguments

NAME = "map"
HELP = "list the allocated extents of a disk, per layer of its chain"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="one JSON array of vhdcore's extents (with the file of each)")
    p.add_argument("--output", choices=["human", "json"], default=None,
                   help="json: the entries of qemu-img map --output=json (start, length, depth, present, zero, "
                        "data, offset), as qemu-img reports a fixed or dynamic VHD")
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


def _holes(fd: int, start: int, length: int) -> Iterator[tuple[int, int, bool]]:
    """``(offset, length, is_hole)`` pieces of a file range, by SEEK_DATA/SEEK_HOLE (what qemu's file layer asks)."""
    end = start + length
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            data = end
        data = min(data, end)
        if data > pos:
            yield pos, data - pos, True
            pos = data
            continue
        try:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        except OSError:
            hole = end
        yield pos, hole - pos, False
        pos = hole


def qemu_entries(disk: Disk) -> Iterator[dict]:
    """The map as ``qemu-img map --output=json`` reports it for a VHD (qemu's vpc driver).

    Every range is ``present`` (a VHD reads as zeros where nothing is allocated: qemu reports those ranges at the
    base's depth, ``zero`` and without ``data``); allocated ranges carry the file ``offset``; inside a fixed disk
    a hole of the (sparse) file is reported ``zero`` as well as ``data``, as qemu's file layer finds it.
    """
    base = len(disk.layers) - 1
    cur: dict | None = None
    top = disk.layers[0]

    def block_pieces() -> Iterator[dict]:
        # qemu's vpc driver never reads sector bitmaps: an allocated block is data, whole, at its file offset
        # (vhdcore's own map follows the bitmaps, as libvhd does; the content is the same where the block's
        # clear-bit sectors hold zeros, as every writer that follows the bitmap rule leaves them).
        bs = top.block_size
        pos = 0
        for b in np.flatnonzero(top.bat != UNUSED_BAT_ENTRY).tolist():  # cost: the allocated blocks only
            start = b * bs
            if start >= disk.size:
                break
            if start > pos:
                yield {"start": pos, "length": start - pos, "depth": 0, "present": True, "zero": True,
                       "data": False}
            n = min(bs, disk.size - start)
            yield {"start": start, "length": n, "depth": 0, "present": True, "zero": False, "data": True,
                   "offset": top.block_file_offset(b)}
            pos = start + n
        if pos < disk.size:
            yield {"start": pos, "length": disk.size - pos, "depth": 0, "present": True, "zero": True,
                   "data": False}

    def pieces() -> Iterator[dict]:
        if base == 0 and top.disk_type == DiskType.DYNAMIC:
            yield from block_pieces()
            return
        for ext in disk.extents():
            if ext.layer is None:
                yield {"start": ext.offset, "length": ext.length, "depth": base, "present": True, "zero": True,
                       "data": False}
            elif ext.layer.is_fixed:
                for off, n, hole in _holes(ext.layer.fd, ext.file_offset, ext.length):
                    yield {"start": ext.offset + off - ext.file_offset, "length": n, "depth": ext.depth,
                           "present": True, "zero": hole, "data": True, "offset": off}
            else:
                yield {"start": ext.offset, "length": ext.length, "depth": ext.depth, "present": True,
                       "zero": False, "data": True, "offset": ext.file_offset}

    for e in pieces():
        if (cur is not None and all(cur[k] == e[k] for k in ("depth", "present", "zero", "data"))
                and cur["start"] + cur["length"] == e["start"]
                and ("offset" not in e or cur["offset"] + cur["length"] == e["offset"])):
            cur["length"] += e["length"]
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


def run(args: argparse.Namespace) -> int:
    with open_chain(args.path, "r", args.parent_dir, strict=not args.ignore_checksums) as disk:
        if args.output == "json":
            if args.json or args.all:
                raise ValueError("--output=json lists every range already; it does not combine with --json/--all")
            out = sys.stdout
            out.write("[")
            for i, e in enumerate(qemu_entries(disk)):
                out.write((",\n" if i else "") + json.dumps(e))
            out.write("]\n")
            return 0
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

"""vhdcore resize: change a disk's virtual size (vhd-util resize, Resize-VHD, qemu-img resize)."""
from __future__ import annotations

import argparse

from ..ops.resize import resize
from ._common import add_open_arguments, human, parse_size, print_json
from ._progress import add_progress_argument, progress_from_args

NAME = "resize"
HELP = ("grow a fixed, dynamic or differencing disk (moving blocks out of the way of a larger BAT, journaled), "
        "or shrink it with --shrink when the cut-off tail holds no data")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("disk")
    p.add_argument("size", type=parse_size, help="the new virtual size (40G, 512M, bytes)")
    p.add_argument("--shrink", action="store_true", help="allow a smaller size (refused if the tail holds data)")
    p.add_argument("--json", action="store_true")
    add_progress_argument(p)
    add_open_arguments(p)


def run(args: argparse.Namespace) -> int:
    with progress_from_args(args, "resize") as progress:
        rep = resize(args.disk, args.size, shrink=args.shrink, parent_dirs=args.parent_dir, progress=progress)
    if args.json:
        print_json(rep.to_dict())
        return 0
    moved = (f"; moved {rep.blocks_moved} blocks and {rep.locators_moved} locators ({human(rep.bytes_moved)}) out "
             "of the larger BAT's way" if rep.blocks_moved or rep.locators_moved else "")
    note = " (finished an interrupted resize first)" if rep.resumed else ""
    print(f"{rep.path}: {rep.type}, {human(rep.old_size)} -> {human(rep.new_size)}{moved}{note}")
    return 0

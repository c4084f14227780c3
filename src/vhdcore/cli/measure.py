"""vhdcore measure: the size convert/compact would write, without writing it (qemu-img measure)."""
from __future__ import annotations

import argparse

from ..ops.compact import MODES
from ..ops.measure import TARGETS, measure
from ._common import add_open_arguments, human, parse_size, print_json
from ._progress import add_progress_argument, progress_from_args

NAME = "measure"
HELP = "the exact size of the file 'convert --to' or 'compact --mode' would write, without writing it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("--to", choices=list(TARGETS), default="dynamic")
    p.add_argument("--compact", choices=list(MODES), default=None, metavar="MODE",
                   help="measure 'vhdcore compact --mode MODE' instead of convert (full, quick, zero)")
    p.add_argument("--block-size", type=parse_size, default=None, help="dynamic output: default the source's")
    p.add_argument("--json", action="store_true")
    add_progress_argument(p)
    add_open_arguments(p)


def run(args: argparse.Namespace) -> int:
    with progress_from_args(args, "measure") as progress:
        rep = measure(args.src, args.to, compact=args.compact, block_size=args.block_size,
                      parent_dirs=args.parent_dir, strict=not args.ignore_checksums, progress=progress)
    if args.json:
        print_json(rep.to_dict())
        return 0
    # qemu-img measure's two lines, then ours.
    print(f"required size: {rep.file_size}")
    print(f"fully allocated size: {rep.fully_allocated_size}")
    what = f"compact --mode {rep.compact}" if rep.compact else f"convert --to {rep.to}"
    blocks = f", {rep.blocks} blocks of {human(rep.block_size)}" if rep.block_size else ""
    print(f"{what}: {human(rep.file_size)} file{blocks}")
    return 0

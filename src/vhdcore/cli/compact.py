"""vhdcore compact: a new dynamic VHD without zero blocks and (quick/full) the space the guest no longer uses."""
from __future__ import annotations

import argparse

from ..ops.compact import MODES, compact
from ._common import add_open_arguments, add_overwrite_argument, human, parse_size, print_json
from ._progress import add_progress_argument, progress_from_args

NAME = "compact"
HELP = "write a compacted copy of a chain: drop zero blocks and blocks the file systems do not use (Optimize-VHD)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--mode", choices=list(MODES), default="full",
                   help="zero: drop all-zero blocks; quick: also blocks free in the file systems; full: also zero "
                        "free sectors inside kept blocks (default)")
    p.add_argument("--block-size", type=parse_size, default=None, help="default: the source leaf's block size")
    p.add_argument("--json", action="store_true")
    add_overwrite_argument(p, "DST")
    add_progress_argument(p)
    add_open_arguments(p)


def run(args: argparse.Namespace) -> int:
    with progress_from_args(args, "compact") as progress:
        rep = compact(args.src, args.dst, mode=args.mode, block_size=args.block_size, parent_dirs=args.parent_dir,
                      strict=not args.ignore_checksums, progress=progress, overwrite=args.overwrite)
    if args.json:
        print_json(rep.to_dict())
        return 0
    d = rep.blocks_dropped
    print(f"{rep.destination}: {human(rep.bytes_before)} -> {human(rep.bytes_after)} "
          f"(reclaimed {human(rep.reclaimed_bytes)}), mode {rep.mode}, {rep.seconds:.2f} s")
    print(f"  blocks of {human(rep.block_size)}: {rep.blocks_considered} held, {rep.blocks_kept} kept, "
          f"{d['zero']} dropped as zeros, {d['free']} dropped as free space")
    if rep.mode == "full":
        print(f"  deleted data zeroed inside kept blocks: {human(rep.free_bytes_zeroed)}")
    for w in rep.warnings:
        print(f"  warning: {w}")
    return 0

"""vhdcore rebase: move a differencing disk onto another parent, keeping its content (qemu-img rebase, safe mode)."""
from __future__ import annotations

import argparse

from ..ops.rebase import rebase
from ._common import add_open_arguments, human, print_json
from ._progress import add_progress_argument, progress_from_args

NAME = "rebase"
HELP = ("put another parent under a differencing disk: the sectors the old and the new parent chain read "
        "differently are copied into the child first, then it is re-pointed (journaled; a rerun finishes)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("child")
    p.add_argument("new_parent", metavar="NEWPARENT")
    p.add_argument("--json", action="store_true")
    add_progress_argument(p)
    add_open_arguments(p)


def run(args: argparse.Namespace) -> int:
    with progress_from_args(args, "rebase") as progress:
        rep = rebase(args.child, args.new_parent, parent_dirs=args.parent_dir, strict=not args.ignore_checksums,
                     progress=progress)
    if args.json:
        print_json(rep.to_dict())
        return 0
    note = " (finished an interrupted rebase first)" if rep.resumed else ""
    print(f"{rep.child}: parent is now {rep.new_parent} (was {rep.old_parent}); copied {human(rep.bytes_copied)} "
          f"into the child, {rep.blocks_added} new blocks{note}")
    for w in rep.warnings:
        print(f"warning: {w}")
    return 0

"""vhdcore set-parent: re-point a child at its moved or copied parent (vhd-util modify -p, qemu-img rebase -u)."""
from __future__ import annotations

import argparse

from ..ops.setparent import set_parent
from ._common import add_open_arguments, print_json

NAME = "set-parent"
HELP = ("re-point a differencing disk at a parent that moved or was copied (header and locators only; "
        "the content is not copied: see rebase)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("child")
    p.add_argument("parent")
    p.add_argument("--force", action="store_true",
                   help="accept a parent whose unique id differs from the one the child records (records the new one)")
    p.add_argument("--json", action="store_true")
    add_open_arguments(p)


def run(args: argparse.Namespace) -> int:
    rep = set_parent(args.child, args.parent, force=args.force, parent_dirs=args.parent_dir,
                     strict=not args.ignore_checksums)
    if args.json:
        print_json(rep.to_dict())
        return 0
    note = " (finished an interrupted run first)" if rep.resumed else ""
    forced = f", unique id {rep.old_parent_unique_id} -> {rep.parent_unique_id}" if rep.forced else ""
    print(f"{rep.child}: parent is now {rep.parent}{forced}{note}")
    for w in rep.warnings:
        print(f"warning: {w}")
    return 0

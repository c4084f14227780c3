"""vhdcore snapshot: a new differencing child of a disk."""
from __future__ import annotations

import argparse

from ..ops.create import snapshot
from ._common import add_overwrite_argument, print_json

NAME = "snapshot"
HELP = "create a differencing child (snapshot) of PARENT"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("parent")
    p.add_argument("child")
    p.add_argument("--parent-dir", action="append", default=[], metavar="DIR",
                   help="where PARENT's own parents may be (repeatable)")
    p.add_argument("--json", action="store_true")
    add_overwrite_argument(p, "CHILD")


def run(args: argparse.Namespace) -> int:
    with snapshot(args.parent, args.child, parent_dirs=args.parent_dir, overwrite=args.overwrite) as disk:
        info = {"path": disk.leaf.path, "parent_path": disk.layers[1].path, "unique_id": str(disk.leaf.unique_id),
                "parent_unique_id": str(disk.leaf.header.parent_unique_id), "chain_depth": len(disk.layers), "warnings": list(disk.warnings)}
    if args.json:
        print_json(info)
    else:
        print(f"created {info['path']}: differencing child of {info['parent_path']} (chain depth {info['chain_depth']})")
    return 0

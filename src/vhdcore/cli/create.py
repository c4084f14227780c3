"""vhdcore create: a new fixed or dynamic VHD."""
from __future__ import annotations

import argparse

from ..format.layout import DEFAULT_BLOCK_SIZE
from ..ops.create import create
from ._common import add_overwrite_argument, parse_size, print_json

NAME = "create"
HELP = "create a fixed or dynamic VHD"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("--size", required=True, type=parse_size, help="virtual size, e.g. 40G (up to 2040G)")
    p.add_argument("--type", choices=["dynamic", "fixed"], default="dynamic")
    p.add_argument("--block-size", type=parse_size, default=DEFAULT_BLOCK_SIZE, help="dynamic disks: default 2M")
    add_overwrite_argument(p, "PATH")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    with create(args.path, args.size, type=args.type, block_size=args.block_size, overwrite=args.overwrite) as disk:
        info = {"path": disk.leaf.path, "type": args.type, "virtual_size": disk.size,
                "block_size": disk.leaf.block_size or None, "unique_id": str(disk.leaf.unique_id), "warnings": list(disk.warnings)}
    if args.json:
        print_json(info)
    else:
        print(f"created {info['path']}: {args.type}, {info['virtual_size']} bytes, id {info['unique_id']}")
    return 0

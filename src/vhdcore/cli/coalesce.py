"""vhdcore coalesce: merge a differencing child (or several layers) into its parent (or an ancestor)."""
from __future__ import annotations

import argparse

from ..ops.coalesce import FORCE_CHOICES, coalesce
from ._common import add_open_arguments, human, print_json
from ._progress import add_progress_argument, progress_from_args

NAME = "coalesce"
HELP = "write every sector a differencing child holds into its parent (or, with --into, an ancestor)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("child", help="the differencing disk to merge (the leaf, with --into)")
    p.add_argument("--into", metavar="ANCESTOR",
                   help="merge every layer from CHILD down to just above ANCESTOR into ANCESTOR, in one pass")
    p.add_argument("--verify", action="store_true",
                   help="hash the chain's content per block before and the target's after (xxh3-128); fail on a "
                        "difference")
    p.add_argument("--remove-child", action="store_true",
                   help="then re-point CHILD's own children (found in --search-dir) at the target and delete the "
                        "merged layers")
    p.add_argument("--search-dir", action="append", default=[], metavar="DIR",
                   help="where to look for disks that depend on the layers involved (repeatable; default: CHILD's "
                        "directory; the target's directory is always searched for its other children)")
    p.add_argument("--force", action="append", default=[], choices=FORCE_CHOICES, metavar="WHAT",
                   help="override one safety refusal (repeatable): other-children (other disks depend on the "
                        "target), parent-id (the parent's unique id differs from the one CHILD records), "
                        "saved-state (a disk is in saved state)")
    p.add_argument("--resume", action="store_true",
                   help="keep a journal of the blocks merged so far (.CHILD.coalesce-progress), and continue an "
                        "interrupted --resume run of this same merge from it: only the blocks it had not made "
                        "durable are merged (a journal whose disks changed since is ignored)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_progress_argument(p)
    add_open_arguments(p)


def run(args: argparse.Namespace) -> int:
    with progress_from_args(args, "coalesce") as progress:
        rep = coalesce(args.child, into=args.into, verify=args.verify, progress=progress,
                       remove_child=args.remove_child, search_dirs=args.search_dir or None,
                       parent_dirs=args.parent_dir, force=args.force, strict=not args.ignore_checksums,
                       resume=args.resume)
    if args.json:
        print_json(rep.to_dict())
        return 0
    merge_s = rep.seconds - rep.verify_seconds
    print(f"{rep.child} -> {rep.target} ({rep.target_type}): copied {human(rep.bytes_copied)} in {rep.blocks_copied} "
          f"blocks ({rep.full_blocks} full, {rep.partial_blocks} merged), {rep.blocks_allocated} newly allocated, "
          f"{rep.zero_blocks_skipped} all-zero blocks skipped")
    if rep.blocks_resumed:
        print(f"resumed: {rep.blocks_resumed} blocks an interrupted run had merged were not merged again")
    print(f"target grew by {human(rep.target_growth)}; {human(rep.shadowed_bytes)} of its old data was shadowed "
          f"(the duplicate data this removed); {merge_s:.2f} s, {rep.throughput / 1e6:.0f} MB/s")
    if rep.verified:
        print(f"verified: content identical ({rep.verify_seconds:.2f} s)")
    for p in rep.relinked:
        print(f"relinked {p} -> {rep.target}")
    for p in rep.removed:
        print(f"removed {p}")
    for w in rep.warnings:
        print(f"warning: {w}")
    return 0

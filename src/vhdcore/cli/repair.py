"""vhdcore repair: fix what can be fixed without guessing, with an undo file of every byte changed."""
from __future__ import annotations

import argparse

from ..ops.check import INFO
from ..exceptions import VHDError
from ..ops.repair import RepairReport, repair, undo
from ._common import print_json, report_error

NAME = "repair"
HELP = ("restore a torn footer from its copy, rewrite a bad footer copy, cut bytes after the footer, "
        "recompute checksums or set bitmap bits over hidden data on request; every change is backed up")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    p.add_argument("--fix-checksums", action="store_true",
                   help="recompute footer/header checksums whose other fields are all valid")
    p.add_argument("--set-bitmap-bits", action="store_true",
                   help="set the bitmap bits of sectors that hold data under a clear bit (BITMAP_CLEAR_DATA), "
                        "making that data readable; only when it is data the disk should hold")
    p.add_argument("--undo", metavar="UNDO_FILE", help="put back what an earlier repair changed, from its undo file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--parent-dir", action="append", default=[], metavar="DIR",
                   help="also look for parent disks in DIR when checking the result (repeatable)")


def print_report(rep: RepairReport) -> None:
    verb = "would" if rep.dry_run else "did"
    if not rep.actions:
        print(f"{rep.path}: nothing to repair")
    for act in rep.actions:
        print(f"{verb}: {act.description}")
    if rep.undo_path:
        print(f"old content saved in {rep.undo_path} (undo: vhdcore repair {rep.path} --undo {rep.undo_path})")
    for why in rep.not_repaired:
        print(f"not repaired: {why}")
    left = [f for f in rep.remaining if f.severity != INFO]
    if left:
        print(f"{len(left)} finding(s) {'would remain' if rep.dry_run else 'remain'}:")
        for f in left:
            print(f"  {f}")
    elif rep.actions:
        print(f"{rep.path}: {'would be clean' if rep.dry_run else 'clean'}")


def run(args: argparse.Namespace) -> int:
    try:
        if args.undo:
            undo(args.undo, args.path)
            print(f"{args.path}: restored from {args.undo}")
            return 0
        rep = repair(args.path, dry_run=args.dry_run, fix_checksums=args.fix_checksums,
                     set_bitmap_bits=args.set_bitmap_bits, parent_dirs=args.parent_dir)
    except (OSError, VHDError) as e:
        report_error(args, e)
        return 2
    if args.json:
        print_json(rep.to_dict())
    else:
        print_report(rep)
    return 0 if rep.clean else 1

"""vhdcore compare: are two disks' virtual contents the same (qemu-img compare; exit 0 same, 1 differ, 2 error)."""
from __future__ import annotations

import argparse
import sys

from ..ops.compare import compare
from ..exceptions import VHDError
from ._common import add_open_arguments, print_json
from ._progress import add_progress_argument, progress_from_args

NAME = "compare"
HELP = "compare two disks' virtual content: exit 0 identical, 1 different (first differing offset), 2 error"

EXIT_DIFFERENT = 1
EXIT_ERROR = 2  # qemu-img compare's status for "could not compare"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    add_progress_argument(p)
    add_open_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        with progress_from_args(args, "compare") as progress:
            res = compare(args.a, args.b, parent_dirs=args.parent_dir, strict=not args.ignore_checksums,
                          progress=progress)
    except (VHDError, OSError, ValueError) as e:
        # 1 means "different" here, so errors take 2, as qemu-img compare's do.
        print(f"vhdcore compare: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print_json(res.to_dict())
    else:
        if res.size_mismatch:
            print(f"Warning: Image size mismatch! ({res.size_a} and {res.size_b} bytes)")
        print("Images are identical." if res.identical else f"Content mismatch at offset {res.offset}!")
    return 0 if res.identical else EXIT_DIFFERENT

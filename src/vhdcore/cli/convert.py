"""vhdcore convert: the chain's virtual disk into one new raw, fixed or dynamic file."""
from __future__ import annotations

import argparse

from ..ops.convert import convert
from ._progress import add_progress_argument, progress_from_args
from ._common import add_open_arguments, add_overwrite_argument, human, parse_size, print_json

NAME = "convert"
HELP = "write the chain's virtual disk into one new file (raw output is sparse)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["raw", "fixed", "dynamic"], required=True)
    p.add_argument("--from", dest="source_format", choices=["auto", "vhd", "raw"], default="auto",
                   help="source: a VHD chain, or a raw image/block device (auto: raw when it has no VHD footer)")
    p.add_argument("--block-size", type=parse_size, default=None, help="dynamic output: default the source's")
    p.add_argument("--json", action="store_true")
    add_overwrite_argument(p, "DST")
    add_progress_argument(p)
    add_open_arguments(p)


def run(args: argparse.Namespace) -> int:
    with progress_from_args(args, "convert") as progress:
        rep = convert(args.src, args.dst, to=args.to, block_size=args.block_size, parent_dirs=args.parent_dir,
                      progress=progress, strict=not args.ignore_checksums, source_format=args.source_format,
                      overwrite=args.overwrite)
    if args.json:
        print_json(rep.to_dict())
    else:
        print(f"{rep.destination}: {rep.to}, {human(rep.virtual_size)} virtual, {human(rep.file_size)} file; "
              f"read {human(rep.bytes_read)}, wrote {human(rep.bytes_written)} in {rep.seconds:.2f} s")
    return 0

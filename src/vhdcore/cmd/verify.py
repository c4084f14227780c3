"""vhdcore verify: compare an exported copy (file, swift://, s3://, or an xxh3 manifest) with its source.
Exit 0 = same content, 1 = they differ (the first differing offset is printed), 2 = could not verify."""
from __future__ import annotations

import argparse
import sys

from ..contentcheck import verify
from ..exceptions import VHDError
from ..progress import make_reporter
from ..tarstream import TarLimits
from ._common import add_open_arguments, parse_size, print_json

NAME = "verify"
HELP = ("check that DEST-OR-FILE (an export, compressed or not, local or swift:// s3://, or its .xxh3.json manifest) "
        "holds SRC's content; exit 0 match, 1 differ, 2 could not verify")

EXIT_MATCH = 0
EXIT_DIFFER = 1
EXIT_COULD_NOT_VERIFY = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="DEST-OR-FILE")
    p.add_argument("src", metavar="SRC", help="the source chain (a VHD) or an xxh3 manifest")
    p.add_argument("--block-size", type=parse_size, default=None,
                   help="comparison block when no manifest is involved (default 2M)")
    p.add_argument("--tmp-dir", default=None, help="where a chain-tar is extracted (default the system's)")
    d = TarLimits()
    p.add_argument("--max-expanded", type=parse_size, default=d.max_expanded_bytes, metavar="SIZE",
                   help=f"chain-tar: refuse members expanding to more than SIZE together (default "
                        f"{d.max_expanded_bytes // 1024**3}G; a member must also fit in --tmp-dir's free space)")
    p.add_argument("--max-members", type=int, default=d.max_members, metavar="N",
                   help=f"chain-tar: at most N members (default {d.max_members})")
    p.add_argument("--max-tar-header", type=parse_size, default=d.max_header_bytes, metavar="SIZE",
                   help=f"chain-tar: largest pax extended header (default {d.max_header_bytes // 1024}K)")
    p.add_argument("--max-name", type=int, default=d.max_name_bytes, metavar="N",
                   help=f"chain-tar: longest member name in bytes (default {d.max_name_bytes})")
    p.add_argument("--progress", choices=["auto", "bar", "json", "none"], default="auto")
    p.add_argument("--json", action="store_true")
    add_open_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        rep = verify(args.target, args.src, block_size=args.block_size, parent_dirs=args.parent_dir,
                     strict=not args.ignore_checksums, tmp_dir=args.tmp_dir,
                     tar_limits=TarLimits(max_header_bytes=args.max_tar_header, max_name_bytes=args.max_name,
                                          max_members=args.max_members, max_expanded_bytes=args.max_expanded),
                     progress=make_reporter(args.progress, "verify", stream=sys.stderr))
    except (OSError, ValueError, VHDError) as e:
        print(f"vhdcore verify: could not verify: {e}", file=sys.stderr)
        return EXIT_COULD_NOT_VERIFY
    if args.json:
        print_json(rep.to_dict())
    elif rep.match:
        print(f"{rep.target}: matches {rep.reference} ({rep.size} bytes, {rep.blocks} blocks of {rep.block_size}; "
              f"{rep.target_kind} vs {rep.reference_kind})")
    else:
        print(f"{rep.target}: DIFFERS from {rep.reference} at offset {rep.offset}: {rep.message}")
    return EXIT_MATCH if rep.match else EXIT_DIFFER

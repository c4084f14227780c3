"""vhdcore verify: compare an exported copy (file, swift://, s3://, or an xxh3 manifest) with its source.
Exit 0 = same content, 1 = they differ (the first differing offset is printed), 2 = could not verify."""
from __future__ import annotations

import argparse
import errno
import os

from ..delivery.verify import verify
from ..exceptions import VHDError
from ..delivery.export import MANIFEST_SUFFIX
from ._progress import add_progress_argument, progress_from_args
from ._common import (add_open_arguments, add_remote_arguments, parse_size, print_json, report_error,
                      remote_options)
from ..delivery.tarstream import TarLimits

NAME = "verify"
HELP = ("check that DEST-OR-FILE (an export, compressed or not, local or swift:// s3://, or its .xxh3.json manifest) "
        "holds SRC's content (by default the manifest beside it); exit 0 match, 1 differ, 2 could not verify")

EXIT_MATCH = 0
EXIT_DIFFER = 1
EXIT_COULD_NOT_VERIFY = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="DEST-OR-FILE")
    p.add_argument("src", metavar="SRC", nargs="?", default=None,
                   help="the source chain (a VHD) or an xxh3 manifest (default: the DEST.xxh3.json manifest export "
                        "wrote beside DEST-OR-FILE)")
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
    add_progress_argument(p)
    p.add_argument("--json", action="store_true")
    add_open_arguments(p)
    add_remote_arguments(p)


def run(args: argparse.Namespace) -> int:
    src = args.src
    if src is None:
        src = args.target + MANIFEST_SUFFIX
        if "://" not in src and not os.path.exists(src):
            msg = f"no SRC given and no manifest beside {args.target} ({src})"
            report_error(args, FileNotFoundError(errno.ENOENT, msg, src), "could not verify", msg)
            return EXIT_COULD_NOT_VERIFY
    try:
        with progress_from_args(args, "verify") as progress:
            rep = verify(args.target, src, block_size=args.block_size, parent_dirs=args.parent_dir,
                         strict=not args.ignore_checksums, tmp_dir=args.tmp_dir, progress=progress,
                         tar_limits=TarLimits(max_header_bytes=args.max_tar_header, max_name_bytes=args.max_name,
                                              max_members=args.max_members, max_expanded_bytes=args.max_expanded),
                         **remote_options(args, args.target if args.target.startswith("swift://") else src))
    except (OSError, ValueError, VHDError) as e:
        report_error(args, e, "could not verify")
        return EXIT_COULD_NOT_VERIFY
    if args.json:
        print_json(rep.to_dict())
    elif rep.match:
        print(f"{rep.target}: matches {rep.reference} ({rep.size} bytes, {rep.blocks} blocks of {rep.block_size}; "
              f"{rep.target_kind} vs {rep.reference_kind})")
    else:
        print(f"{rep.target}: DIFFERS from {rep.reference} at offset {rep.offset}: {rep.message}")
    return EXIT_MATCH if rep.match else EXIT_DIFFER

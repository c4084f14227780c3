"""vhdcore image: the whole imaging job on a chain (check, growth report, coalesce, export, digests)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..pipeline import image
from ._common import (LEVEL_HELP, add_open_arguments, add_overwrite_argument,
                      add_remote_arguments, compression_level, human, print_json,
                      remote_options)
from ._job_options import add_job_arguments, wants_job
from ._progress import add_progress_argument, progress_from_args

NAME = "image"
HELP = ("image a chain: check it and the destination, report its growth, export and digest it through the chain "
        "(the chain is only read unless --coalesce-in-place)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("leaf", help="the chain's leaf (the server's current disk)")
    p.add_argument("dest", help="local path, swift://container/object or s3://bucket/key")
    p.add_argument("--package", choices=["vhd", "fixed", "chain-tar", "raw"], default="vhd")
    p.add_argument("--compress", dest="compression", choices=["auto", "gzip", "zstd", "none"], default="auto")
    p.add_argument("--level", type=int, default=None, help=LEVEL_HELP)
    p.add_argument("--compact", choices=["zero", "quick", "full"], default=None,
                   help="ship a compacted copy: without all-zero blocks (zero), also without blocks the file "
                        "systems mark free (quick), and with free sectors zeroed (full)")
    p.add_argument("--coalesce-in-place", action="store_true",
                   help="after the image was delivered, also merge every layer into the base and delete the "
                        "layers above it (changes the source chain; by default it is only read)")
    p.add_argument("--no-coalesce", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for scripts
    p.add_argument("--no-growth", dest="analyse", action="store_false", help="skip the growth report")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON at the end")
    add_overwrite_argument(p, "DEST (and its manifest)")
    add_progress_argument(p)
    add_open_arguments(p)
    add_remote_arguments(p)
    add_job_arguments(p)


def _print_stage(name: str, result: Any) -> None:
    out = sys.stdout
    if name == "check":
        n = len(result.findings)
        out.write(f"[preparing] check: {'clean' if result.clean else f'{n} finding(s)'}\n")
        for f in result.findings:
            out.write(f"    {f}\n")
    elif name == "preflight":
        need = human(result["needed_bytes"])
        free = f", {human(result['free_bytes'])} free" if "free_bytes" in result else ""
        out.write(f"[preparing] destination {result['destination']}: ready for up to {need}{free}\n")
    elif name == "growth":
        d = result.to_dict()
        used = d["used_bytes"]
        out.write(f"[preparing] growth: file systems use {human(used)}, the VHD chain is {human(d['file_size'])}; "
                  f"compaction would reclaim {human(d['reclaimable_bytes'])}; imaging estimate "
                  f"{d['imaging_estimate_seconds']['now'] / 60:.1f} min now, "
                  f"{d['imaging_estimate_seconds']['after_compaction'] / 60:.1f} min after compaction\n")
    elif name == "coalesce":
        d = result.to_dict()
        out.write(f"[coalescing] merged {human(d.get('bytes_copied', 0))} into {d.get('destination', '?')}"
                  f" in {d.get('seconds', 0):.2f} s\n")
    elif name == "compact":
        d = result.to_dict()
        out.write(f"[preparing] compact ({d.get('mode')}): {human(d.get('bytes_before', 0))} -> "
                  f"{human(d.get('bytes_after', 0))}\n")
    elif name == "export":
        out.write(f"[saving] {result.destination}: {result.package} + {result.compression}, {human(result.size)} "
                  f"from {human(result.package_size)} in {result.seconds:.2f} s\n")
        for k, v in result.digests.items():
            out.write(f"    {k:<7} {v}\n")
    out.flush()


def _stage_printer(progress: Any) -> Any:
    """Print a stage's result below the stage's final bar line, never onto a bar being drawn."""
    end_stage = getattr(progress, "end_stage", None)

    def on_stage(name: str, result: Any) -> None:
        if end_stage is not None:
            end_stage()
        _print_stage(name, result)

    return on_stage


def run(args: argparse.Namespace) -> int:
    if wants_job(args):
        from ._job import run_image_job

        return run_image_job(args, _stage_printer)
    with progress_from_args(args, "image") as progress:
        if args.coalesce_in_place and args.no_coalesce:
            raise ValueError("--coalesce-in-place and --no-coalesce contradict each other")
        rep = image(args.leaf, args.dest, coalesce_in_place=args.coalesce_in_place, analyse=args.analyse,
                    package=args.package, compression=args.compression,
                    level=compression_level(args.dest, args.compression, args.level), compact=args.compact,
                    overwrite=args.overwrite, parent_dirs=args.parent_dir, **remote_options(args, args.dest),
                    progress=progress, on_stage=None if args.json else _stage_printer(progress))
    if args.json:
        print_json(rep.to_dict())
    else:
        print("[complete] 100%")
    return 0

"""vhdcore check: every structural problem of a disk (and with --chain of every layer), with exit status
0 = clean, 1 = findings, 2 = could not check."""
from __future__ import annotations

import argparse

from ..ops.check import INFO, CheckReport, check
from ..exceptions import VHDError
from ._common import print_json, report_error

NAME = "check"
HELP = "verify a disk's footer, header, BAT, locators and parents; exit 0 clean, 1 findings, 2 could not check"

EXIT_CLEAN = 0
EXIT_FINDINGS = 1
EXIT_COULD_NOT_CHECK = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("--chain", action="store_true", help="check every layer of the chain in full, not just the leaf")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--parent-dir", action="append", default=[], metavar="DIR",
                   help="also look for parent disks in DIR (repeatable); the disk's own directory is always searched")
    p.add_argument("--explain", action="store_true", help="print the plain-language explanation of each code")


def print_report(rep: CheckReport, explain: bool = False) -> None:
    n_err, n_warn = len(rep.errors), len(rep.warnings)
    layers = f" ({len(rep.layers)} layers)" if len(rep.layers) > 1 else ""
    if rep.clean:
        print(f"{rep.path}: clean{layers}")
    else:
        print(f"{rep.path}: {n_err} error(s), {n_warn} warning(s){layers}")
    for f in rep.findings:
        where = f"offset {f.offset}" if f.offset is not None else "-"
        field = f" {f.field}" if f.field else ""
        prefix = f"  {f.path}: " if f.path != rep.path else "  "
        tag = "note" if f.severity == INFO else f.severity
        print(f"{prefix}{tag:<7} {f.code} [{where}{field}] {f.message}")
        if explain:
            print(f"          {f.explanation}")


def run(args: argparse.Namespace) -> int:
    try:
        rep = check(args.path, chain=args.chain, parent_dirs=args.parent_dir)
    except (OSError, VHDError) as e:
        report_error(args, e, "could not check")
        return EXIT_COULD_NOT_CHECK
    if args.json:
        print_json(rep.to_dict())
    else:
        print_report(rep, args.explain)
    return EXIT_CLEAN if rep.clean else EXIT_FINDINGS

"""Helpers shared by sub-commands: size parsing, JSON output, opening disks from arguments."""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """'40G', '512M', '2M', '1048576' -> bytes (binary units, as qemu-img and Hyper-V use)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 40G, 512M, 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def human(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def add_overwrite_argument(p: argparse.ArgumentParser, what: str = "the destination") -> None:
    """--overwrite, the same for every writing command (the rule: vhdcore.destination)."""
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} if it exists (default: refuse); a file of the source chain is always "
                        "refused, and so is anything that is not a regular file")


def add_open_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parent-dir", action="append", default=[], metavar="DIR",
                   help="also look for parent disks in DIR (repeatable); the disk's own directory is always searched")
    p.add_argument("--ignore-checksums", action="store_true",
                   help="accept footers and headers whose checksum is wrong (reported as warnings)")

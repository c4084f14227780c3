"""Helpers shared by sub-commands: size parsing, JSON output, opening disks from arguments."""
from __future__ import annotations

import argparse
import json
import re
import sys
from fractions import Fraction
from typing import Any

_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """'40G', '1.5G', '512M', '1048576' -> bytes (binary units, as qemu-img and Hyper-V use; decimals as qemu-img
    takes them, as long as the result is a whole number of bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 40G, 1.5G, 512M, 1048576)")
    n = Fraction(m.group(1)) * _UNITS[m.group(2).upper()]
    if n.denominator != 1:
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r} is {float(n)} bytes")
    return int(n)


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


def add_remote_arguments(p: argparse.ArgumentParser) -> None:
    """The ``swift`` CLI's authentication options; ST_* and OS_* variables are read as it reads them."""
    g = p.add_argument_group("Swift authentication (else ST_AUTH/ST_USER/ST_KEY, OS_AUTH_URL/OS_USERNAME/"
                             "OS_PASSWORD/OS_*, or OS_STORAGE_URL + OS_AUTH_TOKEN)")
    g.add_argument("-A", "--auth", dest="auth_url", default=None, metavar="URL", help="auth URL (as swift -A)")
    g.add_argument("-U", "--user", dest="user", default=None, help="user name (as swift -U)")
    g.add_argument("-K", "--key", dest="key", default=None, help="key or password (as swift -K)")
    g.add_argument("-V", "--auth-version", dest="auth_version", default=None, help="auth version (1.0, 2.0, 3)")
    g.add_argument("--os-storage-url", dest="storage_url", default=None, metavar="URL")
    g.add_argument("--os-auth-token", dest="auth_token", default=None, metavar="TOKEN")


def remote_options(args: argparse.Namespace, dest: str) -> dict[str, Any]:
    """The Swift options given on the command line, for a swift:// destination (nothing for others)."""
    opts = {k: getattr(args, k, None) for k in ("auth_url", "user", "key", "auth_version", "storage_url", "auth_token")}
    opts = {k: v for k, v in opts.items() if v}
    if opts and not str(dest).startswith("swift://"):
        raise ValueError("-A/-U/-K/-V/--os-storage-url/--os-auth-token apply to swift:// destinations")
    return opts


LEVEL_HELP = ("compression level: gzip 1-9 as gzip -1...-9, mapped onto ISA-L's 0-3 (1 -> 0, 2-4 -> 1, 5-7 -> 2, "
              "8-9 -> 3; default ISA-L 1); zstd 1-22 (default 3)")


def compression_level(dest: str, compression: str, level: int | None) -> int | None:
    """``--level`` as the user means it: gzip's 1-9 become the ISA-L level that stands for them."""
    from ..delivery.compress import isal_level
    from ..delivery.export import compression_for

    if level is not None and compression_for(dest, compression) == "gzip":
        return isal_level(level)
    return level


def print_json_error(exc: BaseException) -> None:
    """With ``--json``: the error object on stdout, where the report would have gone."""
    from ..exceptions import error_object

    print_json(error_object(exc))


def report_error(args: argparse.Namespace, exc: BaseException, what: str = "error", message: str | None = None) -> None:
    """A command that could not do its job: one line on stderr ("vhdcore CMD: WHAT: message", the message being
    ``exc``'s unless given); with --json also the error object (docs/json.md) on stdout."""
    print(f"vhdcore {args.command}: {what}: {exc if message is None else message}", file=sys.stderr)
    if getattr(args, "json", False):
        print_json_error(exc)

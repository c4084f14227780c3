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

"""The job options ``vhdcore image`` and ``vhdcore submit`` share: job directory, stage time limits, throttles."""
from __future__ import annotations

import argparse
from typing import Any

from ._common import parse_size


def parse_rate(text: str) -> int:
    """'50M' or '50M/s' -> bytes per second (binary units, as every size vhdcore takes)."""
    t = text.strip()
    if t.lower().endswith("/s"):
        t = t[:-2]
    n = parse_size(t)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"a rate must be more than 0 bytes per second: {text!r}")
    return n


def parse_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"a time limit must be more than 0 seconds: {text!r}")
    return v


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job limits")
    g.add_argument("--coalesce-timeout", type=parse_seconds, default=None, metavar="SECONDS",
                   help="stop the in-place coalesce at a consistent point after SECONDS; the job ends 'retry later'")
    g.add_argument("--export-timeout", type=parse_seconds, default=None, metavar="SECONDS",
                   help="stop the export (nothing partial is left) after SECONDS; the job ends 'retry later'")
    g.add_argument("--max-read-rate", type=parse_rate, default=None, metavar="RATE",
                   help="cap reads of the chain, e.g. 50M (bytes per second; token bucket)")
    g.add_argument("--max-upload-rate", type=parse_rate, default=None, metavar="RATE",
                   help="cap the bytes sent to the destination, e.g. 10M (bytes per second; token bucket)")


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job-dir", default=None, metavar="DIR",
                   help="keep the job's record in DIR/job.json; run again with the same DIR to continue the job "
                        "after a crash (stages whose output verifies are skipped)")
    add_limit_arguments(p)


def limit_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"timeouts": {"coalesce": args.coalesce_timeout, "export": args.export_timeout},
            "max_read_rate": args.max_read_rate, "max_upload_rate": args.max_upload_rate}


def wants_job(args: argparse.Namespace) -> bool:
    return bool(args.job_dir or args.coalesce_timeout or args.export_timeout or args.max_read_rate
                or args.max_upload_rate)

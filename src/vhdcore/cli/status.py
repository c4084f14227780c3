"""vhdcore status: a fleet job's state, percent, stage, bytes, rate and ETA (--watch follows it to the end)."""
from __future__ import annotations

import argparse
import sys
import time

from ._common import print_json
from ._fleet import add_broker_arguments, app_from_args, status_line

NAME = "status"
HELP = "show a submitted job's state, percent (25/50/100 plus the stage's), bytes, rate and ETA"
EXIT_FAILED = 1
EXIT_RETRY = 75


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="the id vhdcore submit printed")
    add_broker_arguments(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true", help="print each change until the job completes or fails")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --watch")


def _exit(j: dict) -> int:
    return {"failed": EXIT_FAILED, "unknown": EXIT_FAILED}.get(j.get("state"), 0)


def run(args: argparse.Namespace) -> int:
    from ..jobs.client import status

    app = app_from_args(args)
    last = None
    while True:
        j = status(args.job, app=app)
        if args.json and not args.watch:
            print_json(j)
            return _exit(j)
        line = status_line(j)
        if line != last:
            if args.json:
                import json

                sys.stdout.write(json.dumps(j, default=str) + "\n")
            else:
                print(line)
            sys.stdout.flush()
            last = line
        if not args.watch or j.get("state") in ("complete", "failed", "unknown"):
            return _exit(j)
        time.sleep(max(args.interval, 0.05))

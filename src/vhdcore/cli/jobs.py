"""vhdcore jobs: the newest submitted jobs (of one host with --host), one line each."""
from __future__ import annotations

import argparse

from ._common import print_json
from ._fleet import add_broker_arguments, app_from_args, status_line

NAME = "jobs"
HELP = "list submitted jobs with their state, percent, bytes, rate and ETA"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="only this host's jobs")
    add_broker_arguments(p)
    p.add_argument("--limit", type=int, default=100, help="at most this many, newest first (default 100)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..jobs.client import list_jobs

    jobs = list_jobs(host=args.host, app=app_from_args(args), limit=args.limit)
    if args.json:
        print_json({"jobs": jobs})
    else:
        for j in jobs:
            print(status_line(j))
    return 0

"""vhdcore submit: queue an imaging job for the host that holds the chain; prints the job id."""
from __future__ import annotations

import argparse

from ._common import compression_level, print_json
from ._fleet import add_broker_arguments, app_from_args
from ._job_options import add_limit_arguments

NAME = "submit"
HELP = "queue an imaging job on a host's worker (vhdcore worker); prints the job id"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("leaf", help="the chain's leaf, as a path on HOST")
    p.add_argument("dest", help="local path on HOST, swift://container/object or s3://bucket/key")
    p.add_argument("--host", required=True, help="the host whose worker images it")
    add_broker_arguments(p)
    p.add_argument("--package", choices=["vhd", "fixed", "chain-tar", "raw"], default="vhd")
    p.add_argument("--compress", dest="compression", choices=["auto", "gzip", "zstd", "none"], default="auto")
    p.add_argument("--level", type=int, default=None)
    p.add_argument("--coalesce-in-place", action="store_true",
                   help="after delivery, merge the chain into its base (changes the source chain)")
    p.add_argument("--no-growth", dest="analyse", action="store_false", help="skip the growth report")
    p.add_argument("--overwrite", action="store_true", help="replace an existing local destination")
    p.add_argument("--parent-dir", action="append", default=[], metavar="DIR")
    add_limit_arguments(p)
    p.add_argument("--max-retries", type=int, default=5, help="retries of a job that ends 'retry later' (default 5)")
    p.add_argument("--retry-backoff", type=float, default=30.0, metavar="SECONDS",
                   help="first retry after about this long, doubling each time, with jitter (default 30)")
    p.add_argument("--json", action="store_true", help="print {job, host, queue} as JSON")


def run(args: argparse.Namespace) -> int:
    from ..jobs.celeryapp import host_queue
    from ..jobs.client import submit

    app = app_from_args(args)
    options = {"package": args.package, "compression": args.compression, "analyse": args.analyse,
               "level": compression_level(args.dest, args.compression, args.level),
               "coalesce_in_place": args.coalesce_in_place, "overwrite": args.overwrite,
               "parent_dirs": args.parent_dir or None}
    limits = {"timeouts": {"coalesce": args.coalesce_timeout, "export": args.export_timeout},
              "max_read_rate": args.max_read_rate, "max_upload_rate": args.max_upload_rate}
    job = submit(args.leaf, args.dest, host=args.host, app=app, options={k: v for k, v in options.items()
                                                                         if v is not None},
                 limits=limits, max_retries=args.max_retries, retry_backoff=args.retry_backoff)
    if args.json:
        print_json({"job": job, "host": args.host, "queue": host_queue(args.host)})
    else:
        print(job)
    return 0

"""vhdcore worker: a Celery worker that images the jobs of one host (see vhdcore.jobs.celeryapp)."""
from __future__ import annotations

import argparse
import os

from ._fleet import add_broker_arguments, app_from_args

NAME = "worker"
HELP = "run the imaging jobs queued for one host (Celery worker: --host-id H, at most --max-concurrent K at once)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_broker_arguments(p)
    p.add_argument("--host-id", required=True, help="this host's id: only its queue (vhdcore.host.ID) is consumed")
    p.add_argument("--max-concurrent", type=int, default=1, metavar="K", help="images made at once (default 1)")
    p.add_argument("--state-dir", default=os.environ.get("VHDCORE_STATE_DIR") or os.path.expanduser(
        "~/.local/state/vhdcore/jobs"), metavar="DIR", help="where job records live (DIR/<job id>/job.json)")
    p.add_argument("--chains-dir", action="append", default=[], metavar="DIR",
                   help="accept only jobs whose leaf is under DIR (repeatable; default: any path)")
    p.add_argument("--output-dir", action="append", default=[], metavar="DIR",
                   help="accept only jobs whose local destination is under DIR (repeatable; default: any path; "
                        "swift:// and s3:// destinations are not affected)")
    p.add_argument("--visibility-timeout", type=float, default=None, metavar="SECONDS",
                   help="broker redelivers a job not acknowledged after this long; longer than the longest job "
                        "(default 24 h)")
    p.add_argument("--loglevel", default="WARNING", help="Celery log level (default WARNING)")


def run(args: argparse.Namespace) -> int:
    from ..jobs import celeryapp

    if args.max_concurrent < 1:
        raise ValueError("--max-concurrent must be at least 1")
    queue = celeryapp.host_queue(args.host_id)
    kw = {"visibility_timeout": args.visibility_timeout} if args.visibility_timeout else {}
    app = app_from_args(args, **kw)
    state_dir = os.path.abspath(args.state_dir)
    os.makedirs(state_dir, exist_ok=True)
    celeryapp.WORKER.update(host=args.host_id, state_dir=state_dir,
                            chains_dirs=[os.path.realpath(d) for d in args.chains_dir],
                            output_dirs=[os.path.realpath(d) for d in args.output_dir])
    app.worker_main(["worker", "-Q", queue, "-c", str(args.max_concurrent), "-P", "prefork",
                     "-n", f"vhdcore-{args.host_id}@%h", "--prefetch-multiplier", "1", "-l", args.loglevel,
                     "--without-gossip", "--without-mingle", "-E"])
    return 0

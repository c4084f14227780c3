"""``vhdcore image`` run as a recorded job (``--job-dir``, time limits, throttles): see vhdcore.jobs.runner."""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from typing import Any, Callable

from ._common import compression_level, human, print_json, remote_options
from ._job_options import limit_options
from ._progress import progress_from_args


def _print_record(rec: Any) -> None:
    d = rec.data
    out = d.get("output") or {}
    skipped = [k for k, v in d["stages"].items() if v.get("state") == "skipped"]
    print(f"[complete] job {d['id']} attempt {d['attempt']}: {d['destination']} {human(out.get('size') or 0)}"
          + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
    for k, v in (out.get("digests") or {}).items():
        print(f"    {k:<7} {v}")
    for name, st in d["stages"].items():
        if "seconds" in st:
            print(f"    {name:<9} {st['seconds']:.2f} s")


def run_image_job(args: argparse.Namespace, stage_printer: Callable[[Any], Any]) -> int:
    from ..jobs.record import JobRecord
    from ..jobs.runner import EXIT_RETRY_LATER, is_retryable, run_job

    if args.coalesce_in_place and args.no_coalesce:
        raise ValueError("--coalesce-in-place and --no-coalesce contradict each other")
    with contextlib.ExitStack() as stack:
        job_dir = args.job_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="vhdcore-job-"))
        try:
            with progress_from_args(args, "image") as progress:
                rec = run_job(args.leaf, args.dest, job_dir, coalesce_in_place=args.coalesce_in_place,
                              analyse=args.analyse, package=args.package, compression=args.compression,
                              level=compression_level(args.dest, args.compression, args.level),
                              compact=args.compact, overwrite=args.overwrite, parent_dirs=args.parent_dir or None,
                              progress=progress, **limit_options(args), **remote_options(args, args.dest))
        except Exception as exc:
            rec = JobRecord.load(job_dir)
            stage = (rec.data.get("error") or {}).get("stages_done") if rec else None
            if rec is not None and rec.state == "retry" or is_retryable(exc, None) and rec is None:
                done = f" (done: {', '.join(stage)})" if stage else ""
                print(f"vhdcore image: retry later: {exc}{done}", file=sys.stderr)
                if args.json:
                    print_json(rec.to_dict() if rec else {"error": str(exc)})
                return EXIT_RETRY_LATER
            raise
        if args.json:
            print_json(rec.to_dict())
        else:
            _print_record(rec)
    return 0

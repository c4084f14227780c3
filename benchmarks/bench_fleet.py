"""Fleet throughput: the same imaging jobs on 2 hosts x K Celery workers (K in 1, 2, 4) against the embedded
runner doing them one after another, in one run; and the queue's own cost per job.

Each "host" is a directory of chains (base with ``--mib`` MiB of random data, a differencing child with a few
rewrites) and a ``vhdcore worker --host-id`` process; a real redis-server (append-only file on, fsync every
second as production would run it) is the broker and result backend. Every job is ``image --package vhd
--compress zstd --no-growth`` to a local file. Reported:

* jobs per minute and MB/s of allocated data (10^6 bytes the exports read from the chains) for the embedded
  runner (``run_job`` in this process, one job after another) and for the fleet at each K (first submit to last
  completion), and each fleet figure as a ratio to the embedded one;
* overhead per job: submit-to-start (submit call to the worker's first record transition, one job at a time on
  an idle worker, median), the time of one state update (a custom-state ``store_result`` to Redis, median), and
  the time the job itself took inside the worker.

Run: ``python benchmarks/bench_fleet.py [--jobs-per-host 8] [--mib 24] [--workdir DIR] [--json]``.
The figures of the run that docs/SCALE.md uses are in that file.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import vhdcore  # noqa: E402
from support.fleet import Redis, Worker  # noqa: E402
from vhdcore.jobs import run_job  # noqa: E402
from vhdcore.jobs.celeryapp import make_app  # noqa: E402
from vhdcore.jobs.client import status, submit  # noqa: E402

MiB = 1024 * 1024
OPTIONS = {"package": "vhd", "compression": "zstd", "analyse": False}


def _t(s: str) -> float:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def build_host(d: Path, n: int, mib: int, seed: int) -> list[Path]:
    leaves = []
    rnd = __import__("random").Random(seed)
    for i in range(n):
        c = d / f"vm{i}"
        c.mkdir(parents=True)
        with vhdcore.create(c / "base.vhd", 2 * mib * MiB) as disk:
            for off in range(0, mib * MiB, MiB):
                disk.write(2 * off, rnd.randbytes(MiB))  # every other MiB: a sparse disk with real data
        with vhdcore.snapshot(c / "base.vhd", c / "leaf.vhd") as disk:
            for _ in range(16):
                disk.write(rnd.randrange(0, 2 * mib * MiB - 65536), rnd.randbytes(65536))
        leaves.append(c / "leaf.vhd")
    return leaves


def wait_all(app, ids, timeout=600.0) -> None:
    end = time.monotonic() + timeout
    pending = set(ids)
    while pending and time.monotonic() < end:
        for j in list(pending):
            st = status(j, app=app)["state"]
            if st == "failed":
                raise RuntimeError(f"job {j} failed: {status(j, app=app)}")
            if st == "complete":
                pending.discard(j)
        time.sleep(0.05)
    if pending:
        raise RuntimeError(f"{len(pending)} jobs not finished")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs-per-host", type=int, default=8)
    ap.add_argument("--mib", type=int, default=24, help="MiB of data in each chain's base")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--appendfsync", default="everysec", choices=["always", "everysec", "no"])
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-fleet-"))
    hosts = {}
    for h, seed in (("hv-a", 1), ("hv-b", 2)):
        leaves = sorted((work / h).glob("vm*/leaf.vhd")) if (work / h).exists() else []
        if len(leaves) < args.jobs_per_host:
            shutil.rmtree(work / h, ignore_errors=True)
            leaves = build_host(work / h, args.jobs_per_host, args.mib, seed)
        hosts[h] = leaves[: args.jobs_per_host]
    jobs = [(h, leaf) for h, leaves in hosts.items() for leaf in leaves]
    res: dict = {"jobs": len(jobs), "mib_per_job": args.mib, "cores": os.cpu_count()}

    def clean_out():
        shutil.rmtree(work / "out", ignore_errors=True)
        (work / "out").mkdir()
        shutil.rmtree(work / "jobs", ignore_errors=True)

    # warm the page cache and the code once, unmeasured
    clean_out()
    run_job(jobs[0][1], str(work / "out" / "warm.vhd.zst"), work / "jobs" / "warm", **OPTIONS)

    clean_out()
    t0 = time.monotonic()
    read = 0
    for i, (h, leaf) in enumerate(jobs):
        rec = run_job(leaf, str(work / "out" / f"e{i}.vhd.zst"), work / "jobs" / f"e{i}", **OPTIONS)
        read += rec.data["output"]["bytes_read"]
    emb = time.monotonic() - t0
    res["embedded"] = {"seconds": round(emb, 2), "jobs_per_min": round(len(jobs) / emb * 60, 1),
                       "MBps": round(read / emb / 1e6, 1), "bytes_read": read}

    shutil.rmtree(work / "redis", ignore_errors=True)
    redis = Redis(work / "redis", appendfsync=args.appendfsync)
    redis.start()
    try:
        app = make_app(redis.url)
        for k in (1, 2, 4):
            clean_out()
            ws = [Worker(redis.url, h, work / f"state-{k}-{h}", work / h, k).start() for h in hosts]
            try:
                # wait until both workers answer, so start-up is not counted
                for _ in range(200):
                    if len(app.control.ping(timeout=0.2) or []) >= len(ws):
                        break
                t0 = time.monotonic()
                ids = [submit(str(leaf), str(work / "out" / f"f{k}-{i}.vhd.zst"), host=h, app=app, options=OPTIONS)
                       for i, (h, leaf) in enumerate(jobs)]
                wait_all(app, ids)
                took = time.monotonic() - t0
                res[f"fleet_k{k}"] = {"seconds": round(took, 2), "jobs_per_min": round(len(jobs) / took * 60, 1),
                                      "MBps": round(read / took / 1e6, 1), "vs_embedded": round(emb / took, 3)}
                if k == 1:
                    # overhead: one job at a time on an idle worker
                    lat, inside = [], []
                    for i in range(6):
                        h, leaf = jobs[i % len(jobs)]
                        jid = str(uuid.uuid4())
                        ts = time.time()
                        submit(str(leaf), str(work / "out" / f"o{i}.vhd.zst"), host=h, app=app, options=OPTIONS,
                               job_id=jid)
                        wait_all(app, [jid])
                        rec = json.loads((work / f"state-{k}-{h}" / jid / "job.json").read_text())
                        start = next(_t(t["time"]) for t in rec["transitions"] if t["state"] == "preparing")
                        end = next(_t(t["time"]) for t in rec["transitions"] if t["state"] == "complete")
                        lat.append(start - ts)
                        inside.append(end - start)
                    n = 200
                    jid = str(uuid.uuid4())
                    t1 = time.perf_counter()
                    for i in range(n):
                        app.backend.store_result(jid, {"state": "saving", "done": i, "total": n}, "SAVING")
                    upd = (time.perf_counter() - t1) / n
                    res["overhead"] = {"submit_to_start_ms": round(statistics.median(lat) * 1000, 1),
                                       "state_update_ms": round(upd * 1000, 3),
                                       "job_inside_worker_ms": round(statistics.median(inside) * 1000, 1)}
            finally:
                for w in ws:
                    w.stop()
    finally:
        redis.stop()
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        e = res["embedded"]
        print(f"{len(jobs)} jobs of {args.mib} MiB data, {res['cores']} cores, redis appendfsync {args.appendfsync}")
        print(f"embedded   {e['seconds']:7.2f} s  {e['jobs_per_min']:7.1f} jobs/min  {e['MBps']:7.1f} MB/s")
        for k in (1, 2, 4):
            f = res[f"fleet_k{k}"]
            print(f"fleet K={k}  {f['seconds']:7.2f} s  {f['jobs_per_min']:7.1f} jobs/min  {f['MBps']:7.1f} MB/s"
                  f"  {f['vs_embedded']:.3f}x embedded")
        o = res["overhead"]
        print(f"overhead: submit to start {o['submit_to_start_ms']} ms, state update {o['state_update_ms']} ms, "
              f"job inside the worker {o['job_inside_worker_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fleet on real servers: redis-server (append-only file on) and `vhdcore worker` processes standing for hosts.

Runs in the Cython pass only: the fleet adds no kernel of its own."""
from __future__ import annotations

import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhdcore

pytest.importorskip("celery", reason="the fleet needs the 'fleet' extra (celery[redis])")

from support.fleet import Redis, Worker  # noqa: E402
from support.jsondoc import check_rules, documented_keys  # noqa: E402
from vhdcore.jobs.celeryapp import make_app  # noqa: E402
from vhdcore.jobs.client import list_jobs, status, submit  # noqa: E402
from support.vhdtest import build_chain, disk_sha256, file_sha256  # noqa: E402

pytestmark = [pytest.mark.backend_independent, pytest.mark.timeout(180)]
MiB = 1024 * 1024
RAW = {"package": "raw", "compression": "none", "analyse": False}
VHDCORE = [sys.executable, "-m", "vhdcore"]


def _t(s: str) -> float:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _wait(app, ids, timeout: float = 90.0) -> dict[str, dict]:
    end = time.monotonic() + timeout
    out: dict[str, dict] = {}
    while time.monotonic() < end:
        out = {j: status(j, app=app) for j in ids}
        if all(s["state"] in ("complete", "failed") for s in out.values()):
            return out
        time.sleep(0.25)
    raise AssertionError(f"jobs not finished: {[(j, s['state']) for j, s in out.items() if s['state'] not in ('complete', 'failed')]}")


def _record(state_dir: Path, job: str) -> dict:
    return json.loads((state_dir / job / "job.json").read_text())


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def _last_run(rec: dict) -> tuple[float, float]:
    """When the job's last attempt started imaging and when it completed, from the record's own timestamps."""
    tr = rec["transitions"]
    start = max(_t(t["time"]) for t in tr if t["state"] == "preparing" and t.get("stage") is None)
    end = max(_t(t["time"]) for t in tr if t["state"] == "complete")
    return start, end


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path / "redis").start()
    yield r
    r.stop()


@pytest.fixture
def workers(tmp_path):
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


def _libvhd_chain(c: Path, seed: int) -> Path:
    """base + child made and written by libvhd itself (vhd-util create/snapshot, vhdw = tapdisk's write path)."""
    import os
    import random

    util, vhdw = os.environ["VHD_UTIL"], os.environ["VHDW"]
    rnd = random.Random(seed)
    c.mkdir()
    subprocess.run([util, "create", "-n", "base.vhd", "-s", "4"], cwd=c, check=True, capture_output=True)
    for disk in ("base.vhd", "leaf.vhd"):
        if disk == "leaf.vhd":
            subprocess.run([util, "snapshot", "-n", "leaf.vhd", "-p", "base.vhd"], cwd=c, check=True,
                           capture_output=True)
        for i in range(6):
            data = c / "data.bin"
            data.write_bytes(rnd.randbytes(512 * rnd.randrange(1, 300)))
            subprocess.run([vhdw, disk, str(rnd.randrange(0, 8192 - 300)), data], cwd=c, check=True,
                           capture_output=True)
    (c / "data.bin").unlink()
    return c / "leaf.vhd"


def _host(tmp_path: Path, name: str, chains: int, size: int = 4 * MiB, libvhd: int = 0) -> tuple[Path, list[Path]]:
    d = tmp_path / name
    d.mkdir()
    leaves = []
    for i in range(chains):
        c = d / f"vm{i}"
        c.mkdir()
        paths, _ = build_chain(c, 2, size=size, block_size=512 * 1024, writes=25, seed=i + 100 * len(name))
        leaves.append(paths[-1])
    for i in range(libvhd):
        leaves.append(_libvhd_chain(d / f"libvhd{i}", seed=i + 7))
    (d / "out").mkdir()
    return d, leaves


def test_two_hosts_40_jobs_cap_and_digests(tmp_path, redis, workers):
    k = 2
    # vhdcore-made chains, and libvhd-made ones where XenServer's vhd-util and vhdw are available
    libvhd = 2 if os.environ.get("VHD_UTIL") and os.environ.get("VHDW") else 0
    hosts = {h: _host(tmp_path, h, 4, libvhd=libvhd) for h in ("hv-a", "hv-b")}
    for h, (d, _) in hosts.items():
        workers.append(Worker(redis.url, h, tmp_path / f"state-{h}", d, k).start())
    app = make_app(redis.url)
    sources = {h: {leaf: disk_sha256(leaf) for leaf in leaves} for h, (_, leaves) in hosts.items()}
    before = {p: file_sha256(p) for _, (d, _) in hosts.items() for p in d.rglob("*.vhd")}
    jobs: dict[str, tuple[str, Path, Path]] = {}
    for n in range(20):
        for h, (d, leaves) in hosts.items():
            leaf = leaves[n % len(leaves)]
            out = d / "out" / f"job{n}-{leaf.parent.name}.raw"
            jid = submit(str(leaf), str(out), host=h, app=app, options=RAW, limits={"max_read_rate": 32 * MiB})
            jobs[jid] = (h, leaf, out)
    done = _wait(app, list(jobs))
    for jid, (h, leaf, out) in jobs.items():
        s = done[jid]
        assert s["state"] == "complete" and s["percent"] == 100.0, s
        assert s["host"] == h and s["digests"]["sha256"] == file_sha256(out) == sources[h][leaf]
    for h in hosts:
        recs = [_record(tmp_path / f"state-{h}", j) for j, v in jobs.items() if v[0] == h]
        assert len(recs) == 20 and all(r["state"] == "complete" and r["host"] == h for r in recs)
        overlap = _max_overlap([_last_run(r) for r in recs])
        assert overlap <= k, (h, overlap)
        assert overlap == k, f"{h} never ran {k} jobs at once"  # the cap is also used, not just respected
    assert {p: file_sha256(p) for p in before} == before
    # the CLI sees the same
    listed = json.loads(subprocess.run(VHDCORE + ["jobs", "--host", "hv-a", "--broker", redis.url, "--json"],
                                       capture_output=True, text=True, check=True).stdout)["jobs"]
    assert len(listed) == 20 and {j["job"] for j in listed} == {j for j, v in jobs.items() if v[0] == "hv-a"}
    assert len(list_jobs(app=app)) == 40
    one = next(iter(jobs))
    st = json.loads(subprocess.run(VHDCORE + ["status", one, "--broker", redis.url, "--json"], capture_output=True,
                                   text=True, check=True).stdout)
    assert st["state"] == "complete" and st["digests"] == done[one]["digests"]
    # the fleet commands' documents follow docs/json.md like every other command's
    h, (d, leaves) = "hv-a", hosts["hv-a"]
    sub = json.loads(subprocess.run(VHDCORE + ["submit", leaves[0], d / "out" / "cli.raw", "--host", h, "--broker",
                                               redis.url, "--package", "raw", "--compress", "none", "--json"],
                                    capture_output=True, text=True, check=True).stdout)
    watch = subprocess.run(VHDCORE + ["status", sub["job"], "--broker", redis.url, "--watch", "--json",
                                      "--interval", "0.1"], capture_output=True, text=True, timeout=60)
    assert watch.returncode == 0, watch.stderr
    lines = [json.loads(x) for x in watch.stdout.splitlines()]
    assert lines[-1]["state"] == "complete" and lines[-1]["percent"] == 100.0
    assert all(a["percent"] <= b["percent"] for a, b in zip(lines, lines[1:]) if a["percent"] and b["percent"])
    for name, doc in (("submit", sub), ("status", st), ("status", lines[-1]), ("jobs", {"jobs": listed})):
        assert documented_keys()[name] <= set(doc), name
        check_rules(doc)


def test_worker_sigkill_mid_job_then_restart_finishes_it(tmp_path, redis, workers):
    # 32 MiB at 4 MiB/s: 8 s. The export reports its reads in 8 MiB steps, so with 16 MiB the record showed
    # done >= 4 MiB only just before the end, and the kill raced the completion (or never came).
    d, leaves = _host(tmp_path, "hv-k", 1, size=32 * MiB)
    state = tmp_path / "state-hv-k"
    w = Worker(redis.url, "hv-k", state, d, 1, visibility_timeout=4).start()
    workers.append(w)
    app = make_app(redis.url)
    leaf, out = leaves[0], d / "out" / "k.raw"
    # Dense data: a sparse chain's reads are over before the throttle bites (clear bitmap bits read as zeros).
    with vhdcore.open(leaf, "r+") as disk:
        disk.write(0, random.Random(5).randbytes(disk.size))
    before = {p: file_sha256(p) for p in d.rglob("*.vhd")}
    jid = submit(str(leaf), str(out), host="hv-k", app=app, options=RAW, limits={"max_read_rate": 4 * MiB})
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            rec = _record(state, jid)
            if rec["state"] == "saving" and (rec["progress"] or {}).get("done", 0) >= 4 * MiB:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("the job never got going")
    w.kill()  # the worker and its pool, mid-export
    rec = _record(state, jid)
    assert rec["state"] == "saving" and not out.exists()
    workers.append(Worker(redis.url, "hv-k", state, d, 1, visibility_timeout=4).start())
    s = _wait(app, [jid], timeout=60)[jid]
    assert s["state"] == "complete", s
    rec = _record(state, jid)
    assert rec["attempt"] == 2 and rec["stages"]["export"]["runs"] == 2
    assert file_sha256(out) == rec["output"]["digests"]["sha256"] == disk_sha256(leaf)
    assert {p: file_sha256(p) for p in before} == before


def test_redis_restart_mid_run_loses_no_job_and_runs_none_twice(tmp_path, redis, workers):
    d, leaves = _host(tmp_path, "hv-r", 3)
    state = tmp_path / "state-hv-r"
    workers.append(Worker(redis.url, "hv-r", state, d, 2, visibility_timeout=6).start())
    app = make_app(redis.url)
    jobs = {}
    for n in range(8):
        out = d / "out" / f"r{n}.raw"
        jobs[submit(str(leaves[n % 3]), str(out), host="hv-r", app=app, options=RAW,
                    limits={"max_read_rate": 4 * MiB})] = (leaves[n % 3], out)
    time.sleep(2.0)  # some jobs running, some still queued
    redis.stop()
    time.sleep(1.0)
    redis.start()  # same port, same directory: the append-only file brings the queue back
    done = _wait(app, list(jobs), timeout=120)
    for jid, (leaf, out) in jobs.items():
        assert done[jid]["state"] == "complete", done[jid]
        rec = _record(state, jid)
        assert rec["stages"]["export"]["runs"] == 1 and rec["attempt"] == 1, rec["transitions"]  # none twice
        assert file_sha256(out) == rec["output"]["digests"]["sha256"] == disk_sha256(leaf)


def test_broken_chain_fails_in_preflight_without_retry(tmp_path, redis, workers):
    d, leaves = _host(tmp_path, "hv-x", 1)
    orphan = d / "orphan"
    orphan.mkdir()
    shutil.copy(leaves[0], orphan / "leaf.vhd")  # its parent is not where its locators point
    state = tmp_path / "state-hv-x"
    workers.append(Worker(redis.url, "hv-x", state, d, 1, output_dir=d / "out").start())
    app = make_app(redis.url)
    before = {p: file_sha256(p) for p in d.rglob("*.vhd")}
    bad = submit(str(orphan / "leaf.vhd"), str(d / "out" / "x.raw"), host="hv-x", app=app, options=RAW)
    outside = submit(str(tmp_path / "elsewhere.vhd"), str(d / "out" / "y.raw"), host="hv-x", app=app, options=RAW)
    astray = submit(str(leaves[0]), str(tmp_path / "astray.raw"), host="hv-x", app=app, options=RAW)
    res = _wait(app, [bad, outside, astray], timeout=60)
    s = res[bad]
    assert s["state"] == "failed" and s["celery_state"] == "FAILURE"
    assert s["error"]["code"] == "CheckFailedError" and "parent" in s["error"]["message"], s["error"]
    assert s["error"]["retry"] is False and s["error"]["stages_done"] == ["check"]  # it ran, and found the chain broken
    rec = _record(state, bad)
    assert rec["attempt"] == 1 and [t["state"] for t in rec["transitions"]].count("failed") == 1
    assert "export" not in rec["stages"]
    assert res[outside]["state"] == "failed" and "chain directories" in res[outside]["error"]["message"]
    assert res[astray]["state"] == "failed" and "output directories" in res[astray]["error"]["message"]
    assert not (tmp_path / "astray.raw").exists()
    assert {p: file_sha256(p) for p in before} == before
    assert not list((d / "out").iterdir())


def test_same_job_delivered_twice_images_once_and_timeouts_retry_with_backoff(tmp_path, redis, workers):
    d, leaves = _host(tmp_path, "hv-t", 2, size=8 * MiB)
    state = tmp_path / "state-hv-t"
    workers.append(Worker(redis.url, "hv-t", state, d, 2).start())
    app = make_app(redis.url)
    # one job id sent twice (as a client retrying its submit would): both deliveries may run at once
    dup = submit(str(leaves[0]), str(d / "out" / "dup.raw"), host="hv-t", app=app, options=RAW,
                 limits={"max_read_rate": 8 * MiB})
    submit(str(leaves[0]), str(d / "out" / "dup.raw"), host="hv-t", app=app, options=RAW,
           limits={"max_read_rate": 8 * MiB}, job_id=dup)
    # a job whose export always runs past its limit: retried with backoff, then given up
    slow = submit(str(leaves[1]), str(d / "out" / "slow.raw"), host="hv-t", app=app, options=RAW,
                  limits={"max_read_rate": 4 * MiB, "timeouts": {"export": 0.3}}, max_retries=2, retry_backoff=0.4)
    res = _wait(app, [dup, slow], timeout=60)
    assert res[dup]["state"] == "complete"
    time.sleep(1.0)  # let the second delivery finish too
    rec = _record(state, dup)
    assert rec["attempt"] == 1 and rec["stages"]["export"]["runs"] == 1
    assert file_sha256(d / "out" / "dup.raw") == disk_sha256(leaves[0])
    s = res[slow]
    assert s["state"] == "failed" and s["error"]["code"] == "StageTimeout" and s["error"]["retry"] is True
    rec = _record(state, slow)
    assert rec["attempt"] == 3 and [t["state"] for t in rec["transitions"]].count("retry") == 3
    starts = [_t(t["time"]) for t in rec["transitions"] if t["state"] == "preparing" and t.get("stage") is None]
    ends = [_t(t["time"]) for t in rec["transitions"] if t["state"] == "retry"]
    gaps = [b - a for a, b in zip(ends, starts[1:])]
    assert 0.2 - 0.05 <= gaps[0] <= 0.4 + 0.5 and 0.4 - 0.05 <= gaps[1] <= 0.8 + 0.5, gaps  # 0.4*2^n*[0.5,1)
    assert not (d / "out" / "slow.raw").exists()


def test_worker_sigkill_mid_coalesce_then_restart_does_not_redo_merged_blocks(tmp_path, redis, workers):
    d, leaves = _host(tmp_path, "hv-c", 1, size=16 * MiB)
    state = tmp_path / "state-hv-c"
    w = Worker(redis.url, "hv-c", state, d, 1, visibility_timeout=4).start()
    workers.append(w)
    app = make_app(redis.url)
    leaf, out = leaves[0], d / "out" / "c.raw"
    base = leaf.with_name("base.vhd")
    with vhdcore.open(leaf, "r+") as disk:  # every block of the child to merge: 32 blocks of 512 KiB
        disk.write(0, random.Random(6).randbytes(disk.size))
    content = disk_sha256(leaf)
    jid = submit(str(leaf), str(out), host="hv-c", app=app, options={**RAW, "coalesce_in_place": True},
                 limits={"max_read_rate": 6 * MiB})
    journal = leaf.with_name(f".{leaf.name}.coalesce-progress")
    end = time.monotonic() + 40
    while time.monotonic() < end:
        try:
            rec = _record(state, jid)
            if rec["state"] == "coalescing" and journal.exists() and (rec["progress"] or {}).get("done", 0) >= 6 * MiB:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("the coalesce never got going")
    w.kill()  # mid-merge: the base is half-written, the child still holds every sector
    assert leaf.exists() and disk_sha256(leaf) == content
    workers.append(Worker(redis.url, "hv-c", state, d, 1, visibility_timeout=4).start())
    s = _wait(app, [jid], timeout=60)[jid]
    assert s["state"] == "complete", s
    rec = _record(state, jid)
    co = rec["stages"]["coalesce"]
    result = co["result"]
    # measured from the record: the rerun took up the merged blocks and merged only the rest, none twice
    assert rec["attempt"] == 2 and co["runs"] == 2 and rec["stages"]["export"]["state"] == "skipped"
    assert result["blocks_resumed"] > 0 and result["blocks_resumed"] + result["blocks_copied"] == 32, result
    assert not leaf.exists() and not journal.exists()
    assert disk_sha256(base) == content  # the chain's content, now all in the base
    assert file_sha256(out) == rec["output"]["digests"]["sha256"] == content
    print(f"resumed {result['blocks_resumed']} blocks, merged {result['blocks_copied']} after the kill")

"""The embedded job (vhdcore.jobs / `vhdcore image --job-dir`): record, resume after SIGKILL, stage time limits,
throttles. The job layer drives the same kernels either way, so these run in the Cython pass only."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhdcore
from vhdcore.jobs import JobRecord, JobRecordError, StageTimeout, TokenBucket, run_job
from support.vhdtest import build_chain, disk_sha256, file_sha256

pytestmark = pytest.mark.backend_independent
MiB = 1024 * 1024
VHDCORE = [sys.executable, "-m", "vhdcore"]


@pytest.fixture
def chain(tmp_path) -> list[Path]:
    paths, _ = build_chain(tmp_path, 3, size=48 * MiB, block_size=2 * MiB, writes=80, seed=15)
    return paths


def _record(job_dir: Path) -> dict:
    return json.loads((job_dir / "job.json").read_text())


def _bytes_of(paths: list[Path]) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in paths}


def _wait_for(pred, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_record_holds_transitions_stages_digests(chain, tmp_path):
    leaf, out, job = chain[-1], tmp_path / "out.vhd", tmp_path / "job"
    before = _bytes_of(chain)
    rec = run_job(leaf, str(out), job, compression="none")
    d = _record(job)
    assert d == rec.data and d["state"] == "complete" and d["attempt"] == 1
    states = [t["state"] for t in d["transitions"]]
    assert states[0] == "queued" and states[-1] == "complete" and "saving" in states
    assert all(t["time"].endswith("Z") for t in d["transitions"])
    for stage in ("check", "preflight", "growth", "export"):
        assert d["stages"][stage]["state"] == "done" and d["stages"][stage]["seconds"] >= 0
    assert d["output"]["digests"]["sha256"] == file_sha256(out)  # the digests are of the delivered bytes
    assert disk_sha256(out) == disk_sha256(leaf)
    assert d["progress"]["total"] and d["progress"]["task_percent"] == 100.0
    assert _bytes_of(chain) == before

    # run again: the delivered image verifies, nothing is redone
    mtime = out.stat().st_mtime_ns
    again = run_job(leaf, str(out), job, compression="none")
    assert again.data["attempt"] == 1 and out.stat().st_mtime_ns == mtime


def test_record_of_another_job_or_garbage_is_refused(chain, tmp_path):
    job = tmp_path / "job"
    run_job(chain[-1], str(tmp_path / "a.vhd"), job, compression="none")
    with pytest.raises(JobRecordError, match="another job"):
        run_job(chain[-1], str(tmp_path / "b.vhd"), job, compression="none")
    (job / "job.json").write_text("{not json")
    with pytest.raises(JobRecordError, match="not valid JSON"):
        JobRecord.load(job)
    (job / "job.json").write_text(json.dumps({"schema": "vhdcore.job/1", "id": 3}))
    with pytest.raises(JobRecordError, match="'id'"):
        JobRecord.load(job)


def test_export_timeout_stops_cleanly_and_the_rerun_completes(chain, tmp_path):
    leaf, out, job = chain[-1], tmp_path / "out.vhd", tmp_path / "job"
    before = _bytes_of(chain)
    r = subprocess.run(VHDCORE + ["image", leaf, out, "--compress", "none", "--job-dir", job, "--progress", "none",
                                  "--max-read-rate", "16M", "--export-timeout", "0.5"], capture_output=True, text=True)
    assert r.returncode == 75, r.stderr
    assert "retry later" in r.stderr
    d = _record(job)
    assert d["state"] == "retry" and d["error"]["code"] == "StageTimeout" and d["error"]["retry"] is True
    assert d["error"]["stages_done"] == ["check", "preflight", "growth"]
    assert d["stages"]["export"]["state"] == "stopped"
    assert sorted(os.listdir(tmp_path)) == sorted(["job", *[p.name for p in chain]])  # nothing partial left
    assert _bytes_of(chain) == before
    r = subprocess.run(VHDCORE + ["image", leaf, out, "--compress", "none", "--job-dir", job, "--progress", "none"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = _record(job)
    assert d["state"] == "complete" and d["attempt"] == 2
    assert [t["state"] for t in d["transitions"]].count("retry") == 1
    assert disk_sha256(out) == disk_sha256(leaf)


def test_coalesce_timeout_leaves_the_chain_readable_and_retries(chain, tmp_path):
    leaf, out, job = chain[-1], tmp_path / "out.vhd", tmp_path / "job"
    content = disk_sha256(leaf)
    with pytest.raises(StageTimeout):
        run_job(leaf, str(out), job, compression="none", coalesce_in_place=True, timeouts={"coalesce": 1e-6})
    d = _record(job)
    assert d["state"] == "retry" and "export" in d["error"]["stages_done"]
    assert all(p.exists() for p in chain) and disk_sha256(leaf) == content  # stopped at a consistent point
    rec = run_job(leaf, str(out), job, compression="none", coalesce_in_place=True)
    assert rec.state == "complete" and rec.stage("export")["state"] == "skipped"  # delivered image verified
    assert rec.stage("coalesce")["state"] == "done"
    assert not chain[1].exists() and not chain[2].exists()
    assert disk_sha256(chain[0]) == content == disk_sha256(out)


def _kill_when(proc: subprocess.Popen, job: Path, pred) -> None:
    def ready() -> bool:
        try:
            return pred(_record(job))
        except (FileNotFoundError, ValueError):
            return False
    _wait_for(ready)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_mid_export_then_rerun_continues_the_job(chain, tmp_path):
    leaf, out, job = chain[-1], tmp_path / "out.vhd", tmp_path / "job"
    before = _bytes_of(chain)
    cmd = VHDCORE + ["image", leaf, out, "--compress", "none", "--job-dir", job, "--progress", "none"]
    p = subprocess.Popen(cmd + ["--max-read-rate", "12M"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(p, job, lambda d: d["state"] == "saving" and (d["progress"] or {}).get("done", 0) > 8 * MiB)
    d = _record(job)
    assert d["state"] == "saving" and d["stages"]["export"]["state"] == "running"
    assert not out.exists() and _bytes_of(chain) == before
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = _record(job)
    assert d["state"] == "complete" and d["attempt"] == 2 and d["stages"]["export"]["runs"] == 2
    assert d["output"]["digests"]["sha256"] == file_sha256(out) and disk_sha256(out) == disk_sha256(leaf)
    assert _bytes_of(chain) == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_sigkill_after_delivery_skips_the_export_on_rerun(chain, tmp_path):
    """Killed in the in-place coalesce: the rerun verifies the delivered image, skips the export, and merges only
    the blocks the killed run had not journaled."""
    leaf, out, job = chain[-1], tmp_path / "out.vhd", tmp_path / "job"
    content = disk_sha256(leaf)
    cmd = VHDCORE + ["image", leaf, out, "--compress", "none", "--job-dir", job, "--progress", "none",
                     "--coalesce-in-place"]
    # the read limit makes the merge take seconds (it reads the chain): the kill lands inside it
    p = subprocess.Popen(cmd + ["--max-read-rate", "12M"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # killed well into the merge (past its first checkpoints, which come about once a second)
    _kill_when(p, job, lambda d: d["state"] == "coalescing" and (d["progress"] or {}).get("total")
               and d["progress"]["done"] >= 0.35 * d["progress"]["total"])
    mtime = out.stat().st_mtime_ns
    from vhdcore.ops.coalesce.resume import progress_path

    journaled = sum(b - a for a, b in json.loads(Path(progress_path(str(leaf))).read_text())["done"])
    assert journaled > 0  # the killed merge had made some blocks durable and said so
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = _record(job)
    assert d["state"] == "complete" and d["stages"]["coalesce"]["state"] == "done" and d["attempt"] == 2
    assert d["stages"]["export"]["state"] == "skipped" and out.stat().st_mtime_ns == mtime
    co = d["stages"]["coalesce"]["result"]
    assert co["blocks_resumed"] == journaled  # every block the killed run merged durably was not merged again
    assert disk_sha256(chain[0]) == content == disk_sha256(out)
    assert not chain[2].exists()


def test_token_bucket_holds_its_rate_with_a_fake_clock():
    now = [0.0]
    b = TokenBucket(1000, burst=100, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    for _ in range(100):
        b.consume(50)
    assert now[0] == pytest.approx(5.0, rel=0.01)  # 5000 bytes at 1000 B/s from an empty bucket
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_read_throttle_holds_50_MBps_and_the_eta_reflects_it(tmp_path):
    size = 256 * MiB
    with vhdcore.create(tmp_path / "big.vhd", size, type="fixed"):  # sparse on the host, allocated in the VHD
        pass
    # Read the source once first: a first read of a fresh sparse file runs at the host's hole-filling speed (~75
    # MB/s on some of our machines), which is not what this test measures; from the page cache the reader can
    # go far faster than the limit, so what holds the rate is the throttle.
    with open(tmp_path / "big.vhd", "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        while f.readinto(buf):
            pass
    rate = 50 * MiB
    samples: list[tuple[int, int, float]] = []

    def on_update(rec):
        p = rec.data.get("progress") or {}
        if rec.state == "saving" and p.get("eta") and p.get("total"):
            samples.append((p["done"], p["total"], p["eta"]))

    t0 = time.monotonic()
    rec = run_job(tmp_path / "big.vhd", str(tmp_path / "big.raw.zst"), tmp_path / "job", package="raw",
                  analyse=False, max_read_rate=rate, on_update=on_update)
    thr = rec.data["output"]["throttles"]["read"]
    assert thr["bytes"] >= size
    measured = thr["bytes"] / thr["seconds"]  # from the first read to the last
    # never more than 10 % over the limit; under it only as far as a busy machine may starve the reader
    assert 0.8 * rate <= measured <= 1.1 * rate, (measured / MiB, thr)
    assert time.monotonic() - t0 >= size / rate * 0.9
    assert thr["bytes"] / rec.stage("export")["seconds"] <= 1.1 * rate  # the whole stage, too
    mid = [s for s in samples if 0.2 < s[0] / s[1] < 0.8]
    assert mid, samples
    for done, total, eta in mid:  # what is left at the limit, not at the disk's own speed
        assert eta == pytest.approx((total - done) / rate, rel=0.3, abs=0.3), (done, total, eta)


def test_coalesce_timed_out_is_retried_and_completes_without_redoing_merged_blocks(chain, tmp_path):
    """Each attempt stops at its time limit with its merged blocks journaled; the next one merges only the rest."""
    leaf, out, job = chain[-1], tmp_path / "out.vhd", tmp_path / "job"
    content = disk_sha256(leaf)
    attempts = []
    for _ in range(12):
        try:
            rec = run_job(leaf, str(out), job, compression="none", coalesce_in_place=True, max_read_rate=24 * MiB,
                          timeouts={"coalesce": 0.5})
        except StageTimeout:
            attempts.append(_record(job)["stages"]["coalesce"])
            assert all(p.exists() for p in chain) and disk_sha256(leaf) == content  # consistent at every stop
            continue
        break
    else:
        raise AssertionError("the coalesce never completed")
    assert len(attempts) >= 2, attempts  # it did time out, more than once
    result = rec.stage("coalesce")["result"]
    assert result["blocks_resumed"] > 0  # the last attempt took up where the others stopped
    assert result["blocks_copied"] < result["blocks_resumed"]  # and merged only what was left
    assert disk_sha256(chain[0]) == content == disk_sha256(out)
    assert not chain[1].exists() and not chain[2].exists()
    assert not [n for n in os.listdir(tmp_path) if "coalesce" in n]  # journals gone


def test_coalesce_progress_journal_of_a_changed_chain_is_ignored(chain, tmp_path):
    from vhdcore.ops.coalesce import coalesce
    from vhdcore.ops.coalesce.resume import progress_path

    content = disk_sha256(chain[-1])
    with pytest.raises(StageTimeout):
        def stop(done, total, **info):
            if done > 4 * MiB:
                raise StageTimeout("stop here")
        coalesce(chain[-1], into=chain[0], resume=True, progress=stop)
    journal = Path(progress_path(str(chain[-1])))
    assert json.loads(journal.read_text())["done"]
    with vhdcore.open(chain[-1], "r+") as d:  # the VM ran on: the leaf changed after the interrupted merge
        d.write(0, b"\x5a" * 65536)
    rep = coalesce(chain[-1], into=chain[0], resume=True)
    assert rep.blocks_resumed == 0 and not journal.exists()  # the whole merge again, the new write with it
    with vhdcore.open(chain[0]) as d:
        assert d.read(0, 65536) == b"\x5a" * 65536
    assert content != disk_sha256(chain[0])

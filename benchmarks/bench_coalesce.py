"""Coalesce throughput against the physical baseline (``cp`` + sync of the child file), in the same run.

Scenarios (sizes from the issue; ``--scale`` shrinks them for a quick look):

* ``64k``: a 4 GiB dynamic parent (2 MiB blocks) and a child holding ~1.08 GB: N full blocks and N blocks with
  16 runs of 64 KiB (N = 344), half of each over blocks the parent already has, written in shuffled order like a
  running VM would. Timed: ``coalesce`` (which ends with fdatasync of the parent) against ``cp CHILD X && sync X``.
* ``4k``: the same, the partial blocks written as 256 runs of 4 KiB (the same bytes per block). The ratio of its
  time to the 64k case is the fragmentation cost (vhd-util: 8x).
* ``huge``: a 2040 GiB parent with 100 scattered child blocks (open, plan, merge, sync).
* ``verify``: the 64k case with ``verify=True``: the cost of hashing the chain before and the parent after.
* ``rss``: peak RSS of a coalesce in a fresh process for a 1 GiB and an 8 GiB child (``--rss-gib``).

Between repeats the parent is put back to its original allocation (its header, BAT and footer restored and the
file cut to its original length), so each repeat does the same work. Caches stay warm for both sides alike.
Each backend runs in its own process (``VHDCORE_PUREPYTHON=1`` for the Python twin).

    python benchmarks/bench_coalesce.py [--scale 1.0] [--repeat 3] [--backends cython,python] [--rss-gib 1,8]
    pytest benchmarks/bench_coalesce.py     # a scaled-down run under pytest-benchmark
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BLOCK = 2 * MiB
HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------------------------- building


class _Pool:
    """Incompressible bytes without paying for os.urandom per block: slices of one random pool."""

    def __init__(self, size: int = 64 * MiB, seed: int = 7) -> None:
        self.buf = random.Random(seed).randbytes(size)
        self.rnd = random.Random(seed + 1)

    def get(self, n: int) -> memoryview:
        off = self.rnd.randrange(0, (len(self.buf) - n) // 512) * 512
        return memoryview(self.buf)[off : off + n]


def build(workdir: Path, *, parent_size: int, n_each: int, run: int, seed: int = 3) -> dict[str, Any]:
    """Parent in workdir/p, child in workdir/c<run> (separate directories: the parent has one child per scan)."""
    import vhdcore

    pool = _Pool()
    rnd = random.Random(seed)
    pdir, cdir = workdir / "p", workdir / f"c{run}"
    pdir.mkdir(exist_ok=True)
    cdir.mkdir(exist_ok=True)
    parent, child = pdir / "parent.vhd", cdir / "child.vhd"
    nblocks = parent_size // BLOCK
    blocks = sorted(rnd.sample(range(nblocks), 2 * n_each))
    full = set(rnd.sample(blocks, n_each))
    partial = [b for b in blocks if b not in full]
    full_l = sorted(full)
    under = set(full_l[::2]) | set(partial[::2])  # half of each kind over a block the parent has
    if not parent.exists():
        with vhdcore.create(parent, parent_size) as d:
            for b in sorted(under):
                d.write(b * BLOCK, pool.get(BLOCK))
            d.flush()
    data_bytes = 0
    with vhdcore.snapshot(parent, child) as d:
        order = list(blocks)
        rnd.shuffle(order)
        for b in order:
            if b in full:
                d.write(b * BLOCK, pool.get(BLOCK))
                data_bytes += BLOCK
            else:
                step = BLOCK // 16 if run == 64 * KiB else 2 * run
                for r in range(0, BLOCK, step):
                    d.write(b * BLOCK + r, pool.get(run))
                    data_bytes += run
        d.flush()
    return {"parent": str(parent), "child": str(child), "data_bytes": data_bytes,
            "child_file_bytes": child.stat().st_size, "blocks": len(blocks)}


class ParentSnapshot:
    """The parent's metadata, to put it back to its original allocation between repeats."""

    def __init__(self, path: str) -> None:
        from vhdcore.disk.image import Image

        self.path = path
        with Image(path) as img:
            self.size = img.file_size
            self.meta_end = img.metadata_end
            self.footer_off = img.footer_offset
        with open(path, "rb") as f:
            self.head = f.read(self.meta_end)
            f.seek(self.footer_off)
            self.footer = f.read(512)

    def restore(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.ftruncate(fd, self.size)
            os.pwrite(fd, self.head, 0)
            os.pwrite(fd, self.footer, self.footer_off)
            os.fsync(fd)
        finally:
            os.close(fd)


def cp_sync(src: str, dst: str) -> float:
    if os.path.exists(dst):
        os.unlink(dst)
    os.sync()
    t = time.perf_counter()
    subprocess.run(["sh", "-c", 'cp "$0" "$1" && sync "$1"', src, dst], check=True)
    return time.perf_counter() - t


def once(case: dict, snap: ParentSnapshot, **kw) -> tuple[float, dict]:
    import vhdcore

    snap.restore()
    os.sync()
    t = time.perf_counter()
    # The 64k and 4k children share one parent (built once), each in a sibling directory of it: each is a
    # dependent the other's coalesce would refuse, so the refusal is overridden (the check still runs).
    rep = vhdcore.coalesce(case["child"], parent_dirs=[os.path.dirname(case["parent"])],
                           force=["other-children"], **kw)
    return time.perf_counter() - t, rep.to_dict()


def interleaved(case: dict, snap: ParentSnapshot, repeat: int, cp_out: str, **kw) -> tuple[list, list, dict]:
    """coalesce and cp+sync taking turns, so that both see the same load on a shared machine."""
    tc, tp, rep = [], [], {}
    for _ in range(repeat):
        t, rep = once(case, snap, **kw)
        tc.append(t)
        tp.append(cp_sync(case["child"], cp_out))
    return tc, tp, rep


# --------------------------------------------------------------------------------------------- scenarios


def run_backend(scale: float, repeat: int, workdir: Path) -> dict[str, Any]:
    import vhdcore

    out: dict[str, Any] = {"backend": vhdcore.BACKEND}
    n_each = max(8, int(344 * scale))
    parent_size = max(64 * MiB, int(4 * GiB * scale) // BLOCK * BLOCK)
    cases = {run: build(workdir, parent_size=parent_size, n_each=n_each, run=run) for run in (64 * KiB, 4 * KiB)}
    snap = ParentSnapshot(cases[64 * KiB]["parent"])
    med = statistics.median
    for run, name in ((64 * KiB, "64k"), (4 * KiB, "4k")):
        case = cases[run]
        tc, tp, rep = interleaved(case, snap, repeat, str(workdir / "cp.out"))
        t, tcp = med(tc), med(tp)
        out[name] = {
            "data_bytes": case["data_bytes"], "child_file_bytes": case["child_file_bytes"],
            "coalesce_s": round(t, 3), "cp_sync_s": round(tcp, 3),
            "coalesce_min_s": round(min(tc), 3), "cp_sync_min_s": round(min(tp), 3),
            "coalesce_MBps_data": round(case["data_bytes"] / t / 1e6, 1),
            "coalesce_MBps_childfile": round(case["child_file_bytes"] / t / 1e6, 1),
            "cp_MBps": round(case["child_file_bytes"] / tcp / 1e6, 1),
            "ratio_vs_cp": round(tcp / t, 3),
            # per repeat (each pair ran back to back), the median of the ratios
            "ratio_vs_cp_pairs": round(med(p / c for c, p in zip(tc, tp)), 3),
            "syncs": rep["syncs"], "writes": rep["writes"], "blocks_allocated": rep["blocks_allocated"],
        }
    out["4k_over_64k_time"] = round(out["4k"]["coalesce_s"] / out["64k"]["coalesce_s"], 3)
    out["4k_over_64k_min"] = round(out["4k"]["coalesce_min_s"] / out["64k"]["coalesce_min_s"], 3)
    # verification cost: plain and verified runs taking turns
    case = cases[64 * KiB]
    plain, ver, vs = [], [], []
    for _ in range(repeat):
        plain.append(once(case, snap)[0])
        t, rep = once(case, snap, verify=True)
        ver.append(t)
        vs.append(rep["verify_seconds"])
    out["verify"] = {"coalesce_s": round(med(plain), 3), "coalesce_verify_s": round(med(ver), 3),
                     "verify_s": round(med(vs), 3), "overhead": round(med(ver) / med(plain), 3),
                     "hash_MBps": round(2 * case["data_bytes"] / med(vs) / 1e6, 1)}
    snap.restore()
    # 2040 GiB parent, 100 scattered blocks
    out["huge"] = huge(workdir, repeat)
    return out


def huge(workdir: Path, repeat: int) -> dict[str, Any]:
    import vhdcore

    d = workdir / "huge"
    d.mkdir(exist_ok=True)
    size = 2040 * GiB
    pool = _Pool(8 * MiB)
    rnd = random.Random(11)
    nblocks = size // BLOCK
    parent, child = d / "parent.vhd", d / "child.vhd"
    times = []
    for i in range(repeat):
        for p in (parent, child):
            if p.exists():
                p.unlink()
        with vhdcore.create(parent, size) as disk:
            for b in rnd.sample(range(nblocks), 50):
                disk.write(b * BLOCK, pool.get(BLOCK))
        with vhdcore.snapshot(parent, child) as disk:
            for b in rnd.sample(range(nblocks), 100):
                if b % 2:
                    disk.write(b * BLOCK, pool.get(BLOCK))
                else:
                    disk.write(b * BLOCK + 64 * KiB, pool.get(256 * KiB))
        os.sync()
        t = time.perf_counter()
        rep = vhdcore.coalesce(child)
        times.append(time.perf_counter() - t)
    return {"virtual_size": size, "child_blocks": 100, "coalesce_s": round(statistics.median(times), 3),
            "blocks_allocated": rep.blocks_allocated, "syncs": rep.syncs}


def rss_child(workdir: Path, gib: int) -> dict[str, Any]:
    """Peak RSS of a coalesce of a child holding ``gib`` GiB, measured in a fresh process."""
    import vhdcore

    d = workdir / f"rss{gib}"
    d.mkdir(exist_ok=True)
    pool = _Pool()
    parent, child = d / "parent.vhd", d / "child.vhd"
    with vhdcore.create(parent, 2 * gib * GiB) as disk:
        pass
    with vhdcore.snapshot(parent, child) as disk:
        for b in range(0, gib * GiB // BLOCK):
            if b % 2:
                disk.write(2 * b * BLOCK, pool.get(BLOCK))
            else:
                for r in range(0, BLOCK, BLOCK // 16):
                    disk.write(2 * b * BLOCK + r, pool.get(64 * KiB))
    os.sync()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve, so a child would report this process's peak.
    hwm = "int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    code = ("import sys,time,vhdcore,vhdcore.ops.coalesce\n"
            f"base={hwm}\n"
            "t=time.perf_counter(); r=vhdcore.coalesce(sys.argv[1]); t=time.perf_counter()-t\n"
            f"print({hwm}, r.bytes_copied, t, base)")
    r = subprocess.run([sys.executable, "-c", code, str(child)], capture_output=True, text=True, check=True)
    peak_kib, copied, secs, base_kib = r.stdout.split()
    shutil.rmtree(d)
    return {"child_gib": gib, "peak_rss_mib": round(int(peak_kib) / 1024, 1),
            "import_rss_mib": round(int(base_kib) / 1024, 1), "bytes_copied": int(copied),
            "seconds": round(float(secs), 2)}


# --------------------------------------------------------------------------------------------- driver


def _child_main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-coalesce-", dir=args.dir))
    try:
        res = run_backend(args.scale, args.repeat, workdir)
        if args.rss_gib:
            res["rss"] = [rss_child(workdir, int(g)) for g in args.rss_gib.split(",")]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(res))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", default="cython,python")
    ap.add_argument("--rss-gib", default="", help="comma-separated child sizes for the RSS measurement, e.g. 1,8")
    ap.add_argument("--dir", default=None, help="where to build the disks (default: the system temp dir)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child_main(args)
        return
    results = []
    for backend in args.backends.split(","):
        env = dict(os.environ)
        env.pop("VHDCORE_PUREPYTHON", None)
        if backend == "python":
            env["VHDCORE_PUREPYTHON"] = "1"
        cmd = [sys.executable, str(HERE), "--child", "--scale", str(args.scale), "--repeat", str(args.repeat)]
        if args.dir:
            cmd += ["--dir", args.dir]
        if args.rss_gib and backend == args.backends.split(",")[0]:
            cmd += ["--rss-gib", args.rss_gib]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for res in results:
        print(f"== backend {res['backend']}")
        for name in ("64k", "4k"):
            c = res[name]
            print(f"  {name:>3} runs: coalesce {c['coalesce_s']:.3f} s (min {c['coalesce_min_s']:.3f}; "
                  f"{c['coalesce_MBps_data']:.0f} MB/s of data, {c['coalesce_MBps_childfile']:.0f} MB/s of child file)"
                  f" | cp+sync {c['cp_sync_s']:.3f} s (min {c['cp_sync_min_s']:.3f}; {c['cp_MBps']:.0f} MB/s) | "
                  f"vs cp {c['ratio_vs_cp']:.2f}x (pairs {c['ratio_vs_cp_pairs']:.2f}x) | syncs {c['syncs']}")
        print(f"  4k/64k time: {res['4k_over_64k_time']:.2f}x (min {res['4k_over_64k_min']:.2f}x)")
        v = res["verify"]
        print(f"  verify: {v['coalesce_verify_s']:.3f} s with verification vs {v['coalesce_s']:.3f} s without "
              f"({v['overhead']:.2f}x); hashing {v['verify_s']:.3f} s ({v['hash_MBps']:.0f} MB/s of data hashed)")
        h = res["huge"]
        print(f"  2040 GiB parent, 100 child blocks: {h['coalesce_s']:.3f} s")
        for r in res.get("rss", []):
            print(f"  RSS: {r['child_gib']} GiB child: peak {r['peak_rss_mib']} MiB (after import "
                  f"{r['import_rss_mib']} MiB), {r['seconds']} s")


# --------------------------------------------------------------------------------------------- pytest-benchmark


def test_coalesce_vs_cp(benchmark: Any, tmp_path: Path) -> None:
    """Scaled-down 64k case (1/8): coalesce timed by pytest-benchmark, cp+sync of the child in the same run."""
    case = build(tmp_path, parent_size=512 * MiB, n_each=43, run=64 * KiB)
    snap = ParentSnapshot(case["parent"])
    import vhdcore

    def setup():
        snap.restore()
        return (), {}

    benchmark.pedantic(lambda: vhdcore.coalesce(case["child"], parent_dirs=[os.path.dirname(case["parent"])]),
                       setup=setup, rounds=3, iterations=1)
    tcp = statistics.median(cp_sync(case["child"], str(tmp_path / "cp.out")) for _ in range(3))
    benchmark.extra_info.update(cp_sync_s=round(tcp, 3), ratio_vs_cp=round(tcp / benchmark.stats["median"], 3),
                                backend=vhdcore.BACKEND)


if __name__ == "__main__":
    main()

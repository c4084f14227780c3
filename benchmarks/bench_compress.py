"""Compression throughput: vhdcore's gzip and zstd against the `pigz` and `zstd -T2` CLIs on the same bytes.

The input is ~256 MiB of disk-like content made here: runs of real file bytes from /usr (skipping files that
are already compressed), 25 % zeros and 15 % random bytes, in runs of 4 KiB-2 MiB, like a populated guest file
system. Every variant compresses the same bytes in the same run to a file in the same directory (page
cache, no fsync), so the numbers compare with each other even on a busy shared machine; absolute MB/s move
with the machine's load. MB/s = 10^6 bytes of *input* per second.

Run as a script for a table (``python benchmarks/bench_compress.py [--mib 256] [--repeat 3] [--json]``) or
under pytest-benchmark (``pytest benchmarks/bench_compress.py``), where each variant is one benchmark and
``extra_info`` holds its ratio and its speed relative to its CLI peer.
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
from typing import Any, Callable

import pytest

KiB = 1024
MiB = 1024 * KiB
PIECE = 1 * MiB  # how the producer feeds our compressors (a coalesce loop hands over blocks of this order)
_PACKED = (".gz", ".xz", ".bz2", ".zst", ".zip", ".png", ".jpg", ".gif", ".pyc", ".whl", ".jar", ".deb")


def make_disk_like(path: Path, size: int, seed: int = 1) -> None:
    """Write ``size`` bytes of disk-like content to ``path`` (see the module docstring)."""
    rnd = random.Random(seed)
    files: list[str] = []
    for top in ("/usr/share", "/usr/lib"):
        for d, _, names in os.walk(top):
            files.extend(os.path.join(d, f) for f in names if not f.endswith(_PACKED))
    files.sort()
    rnd.shuffle(files)
    file_iter = iter(files)

    def file_bytes(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                p = next(file_iter)
            except StopIteration:  # a small /usr: cycle the words of what we have
                out += bytes(rnd.choice(b"abcdefghijklmnop \n") for _ in range(min(n - len(out), 4096)))
                continue
            try:
                if os.path.isfile(p) and not os.path.islink(p):
                    with open(p, "rb") as f:
                        out += f.read(n - len(out))
            except OSError:
                pass
        return bytes(out)

    written = 0
    with open(path, "wb") as f:
        while written < size:
            run = min(rnd.choice((4 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 2 * MiB)), size - written)
            r = rnd.random()
            if r < 0.25:
                f.write(bytes(run))
            elif r < 0.40:
                f.write(rnd.randbytes(run))
            else:
                f.write(file_bytes(run))
            written += run


def _ours(kind: str, level: int, digests: bool = False) -> Callable[[bytes, Path], int]:
    def run(data: bytes, out: Path) -> int:
        from vhdcore.delivery.compress import broadcast, open_compressor
        from vhdcore.delivery.digests import StreamDigests
        from vhdcore.delivery.upload.local import LocalSink

        sink = LocalSink(out, fsync=False)
        d = StreamDigests() if digests else None
        comp = open_compressor(kind, broadcast(d, sink) if d else sink, level=level, threads=2)
        mv = memoryview(data)
        for i in range(0, len(data), PIECE):
            comp.write(mv[i : i + PIECE])
        comp.close()
        if d is not None:
            d.hexdigests()
        return sink.close().size

    return run


def _cli(argv: list[str]) -> Callable[[Path, Path], int]:
    def run(src: Path, out: Path) -> int:
        with open(src, "rb") as fin, open(out, "wb") as fout:
            subprocess.run(argv, stdin=fin, stdout=fout, check=True)
        return out.stat().st_size

    return run


# (name, peer name or None, kind ("ours" takes bytes, "cli" takes the file), function, checker argv)
VARIANTS: list[tuple[str, str | None, str, Any, list[str]]] = [
    ("vhdcore zstd -3 (2 threads)", "zstd -3 -T2", "ours", _ours("zstd", 3), ["zstd", "-tq"]),
    ("zstd -3 -T2", None, "cli", _cli(["zstd", "-3", "-T2", "-c", "-q"]), ["zstd", "-tq"]),
    ("vhdcore zstd -1 (2 threads)", "zstd -1 -T2", "ours", _ours("zstd", 1), ["zstd", "-tq"]),
    ("zstd -1 -T2", None, "cli", _cli(["zstd", "-1", "-T2", "-c", "-q"]), ["zstd", "-tq"]),
    ("vhdcore gzip isal-1 (2 threads)", "pigz -1 -p2", "ours", _ours("gzip", 1), ["gzip", "-t"]),
    ("vhdcore gzip isal-1 + md5/sha256/sha512", "pigz -1 -p2", "ours", _ours("gzip", 1, True), ["gzip", "-t"]),
    ("vhdcore gzip isal-3 (2 threads)", "pigz -6 -p2", "ours", _ours("gzip", 3), ["gzip", "-t"]),
    ("pigz -1 -p2", None, "cli", _cli(["pigz", "-1", "-p", "2", "-c"]), ["gzip", "-t"]),
    ("pigz -6 -p2", None, "cli", _cli(["pigz", "-6", "-p", "2", "-c"]), ["gzip", "-t"]),
]


def measure(name: str, kind: str, fn: Any, data: bytes, src: Path, workdir: Path, repeat: int,
            check: list[str] | None) -> dict[str, Any]:
    out = workdir / "out.bin"
    times = []
    size = 0
    for _ in range(repeat):
        if out.exists():
            out.unlink()
        t = time.perf_counter()
        size = fn(data, out) if kind == "ours" else fn(src, out)
        times.append(time.perf_counter() - t)
    if check:
        subprocess.run([*check, str(out)], check=True)
    out.unlink()
    best = min(times)
    return {
        "name": name,
        "seconds_best": round(best, 3),
        "seconds_median": round(statistics.median(times), 3),
        "mb_per_s": round(len(data) / best / 1e6, 1),
        "ratio": round(len(data) / size, 3),
        "compressed_bytes": size,
    }


def run_all(mib: int, repeat: int, check: bool = True, variants=VARIANTS) -> list[dict[str, Any]]:
    for tool in ("zstd", "pigz", "gzip"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install zstd pigz gzip (scripts/bootstrap.sh does)")
    with tempfile.TemporaryDirectory(prefix="vhdcore-bench-") as tmp:
        work = Path(tmp)
        src = work / "disk.raw"
        make_disk_like(src, mib * MiB)
        data = src.read_bytes()
        results = [measure(n, k, f, data, src, work, repeat, c if check else None) for n, _, k, f, c in VARIANTS
                   if (n, _, k, f, c) in variants]
    by_name = {r["name"]: r for r in results}
    for name, peer, *_ in variants:
        if peer and peer in by_name and name in by_name:
            by_name[name]["vs_peer"] = peer
            by_name[name]["speed_vs_peer"] = round(by_name[name]["mb_per_s"] / by_name[peer]["mb_per_s"], 2)
            by_name[name]["ratio_vs_peer"] = round(by_name[name]["ratio"] / by_name[peer]["ratio"], 3)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="input size in MiB (default 256)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant; the best is reported")
    ap.add_argument("--no-check", action="store_true", help="skip testing each output with gzip -t / zstd -t")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    results = run_all(args.mib, args.repeat, check=not args.no_check)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{args.mib} MiB of disk-like content, {os.cpu_count()} CPUs, best of {args.repeat}")
    print(f"{'variant':42s} {'MB/s':>8s} {'ratio':>7s}  vs peer (speed, ratio)")
    for r in results:
        peer = f"  {r['speed_vs_peer']:.2f}x, {r['ratio_vs_peer']:.3f}x of {r['vs_peer']}" if "vs_peer" in r else ""
        print(f"{r['name']:42s} {r['mb_per_s']:8.1f} {r['ratio']:7.3f}{peer}")


# ---------------------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    mib = int(os.environ.get("VHDCORE_BENCH_MIB", "256"))
    src = tmp_path_factory.mktemp("bench-compress") / "disk.raw"
    make_disk_like(src, mib * MiB)
    return src, src.read_bytes()


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_compress_throughput(benchmark: Any, corpus: tuple[Path, bytes], variant: tuple, tmp_path: Path) -> None:
    name, peer, kind, fn, check = variant
    src, data = corpus
    out = tmp_path / "out.bin"

    def once() -> int:
        if out.exists():
            out.unlink()
        return fn(data, out) if kind == "ours" else fn(src, out)

    size = benchmark.pedantic(once, rounds=2, iterations=1)
    subprocess.run([*check, str(out)], check=True)
    benchmark.extra_info.update(ratio=round(len(data) / size, 3), input_bytes=len(data), peer=peer)


if __name__ == "__main__":
    sys.exit(main())

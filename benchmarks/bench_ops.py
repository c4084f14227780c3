"""The issue-16 operations against their peers, in one run (ratios within the run):

- import: a 4 GiB sparse raw file holding 1 GiB of data (512 runs of 2 MiB, spread) to a dynamic VHD, vhdcore
  ``convert --from raw`` against ``qemu-img convert -t writeback -f raw -O vpc``; both outputs fsynced, every round
  into new file space.
- compare: two 4 GiB dynamic disks with 1 GiB of data each, differing in one sector of the last data block (the
  whole data is read), ``vhdcore.compare`` against ``qemu-img compare -f vpc -F vpc``.
- resize: a 2 GiB dynamic disk made by vhd-util (16 blocks of data) grown to 2040 GiB, whose BAT (1044480 entries,
  4 MiB) takes the place of the first blocks: ``vhdcore.resize`` (in process, and the CLI as a process, as
  vhd-util runs) against ``vhd-util resize -j JOURNAL``. vhd-util does resize the file, but its own ``check``
  then rejects the result ("error calculating end of metadata", "failed to get batmap header": blktap's batmap
  is not carried past the larger table); vhdcore's result passes ``vhd-util check``. The timings compare work
  done, not equally correct results.

Measured on 2026-12-06 (2 cores shared with other engineers: load average 4-5 during the runs, so absolute
times swing by 2x between runs; the ratios are within one run; min of 3 rounds, page cache warm, ext4 on virtio):

    first run, before the bytes_equal kernel:
    import   vhdcore 1057 ms   qemu-img -t writeback 1557 ms   vhdcore 1.47x faster
    compare  vhdcore 1475 ms   qemu-img compare        476 ms   vhdcore 3.1x slower: the 1 MiB chunks were compared
             as memoryviews (``pa != pb``), element by element at ~1 GB/s
    resize   vhdcore   16 ms in process, 289 ms as a CLI process; vhd-util resize -j 57 ms
    with bytes_equal (memcmp without the GIL), two runs:
    import   vhdcore 1038 / 1358 ms   qemu-img 3192 / 3886 ms   vhdcore 3.1x / 2.9x faster
    compare  vhdcore  801 /  905 ms   qemu-img  445 /  595 ms   vhdcore 0.56x / 0.66x (1.5-1.8x slower): what
             remains is mostly preadv copying 2 GiB out of the page cache in one thread (cProfile: 0.35 of 0.48 s)
    resize   vhdcore   72 /   45 ms in process, 529 / 727 ms as a CLI process (Python start-up and imports);
             vhd-util 88 / 157 ms: in process 1.2x / 3.5x faster, as a process 4-6x slower
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest

from benchsupport import GiB, MiB, RATIOS, RESULTS, record

ROUNDS = 3
RAW_SIZE = 4 * GiB
RUN = 2 * MiB
RUNS = 512  # 1 GiB of data
STRIDE = RAW_SIZE // RUNS
RESIZE_TO_MIB = 2040 * 1024
VHD_UTIL = os.environ.get("VHD_UTIL") or "/work/shared/tools/vhd-util/vhd-util"


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(*paths) -> None:
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)


@pytest.fixture(scope="module")
def ops_data(tmp_path_factory):
    import vhdcore

    d = tmp_path_factory.mktemp("opsbench")
    rnd = random.Random(16)
    pool = rnd.randbytes(64 * MiB)
    raw = d / "sparse.raw"
    with open(raw, "wb") as f:
        f.truncate(RAW_SIZE)
        for i in range(RUNS):
            start = rnd.randrange(0, len(pool) - RUN) & ~511
            f.seek(i * STRIDE + (STRIDE - RUN if i % 2 else 0))
            f.write(memoryview(pool)[start : start + RUN])
    a = d / "a.vhd"
    vhdcore.convert(raw, a, to="dynamic", source_format="raw")
    b = d / "b.vhd"
    shutil.copyfile(a, b)
    last = (RUNS - 1) * STRIDE + STRIDE - RUN + RUN // 2  # inside the last data run (i = 511 is odd)
    with vhdcore.open(b, "r+") as disk:
        sector = bytearray(disk.read(last, 512))
        sector[100] ^= 0xFF
        disk.write(last, bytes(sector))
    yield {"dir": d, "raw": raw, "a": a, "b": b, "diff_at": last}
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------- import


@pytest.mark.benchmark(group="import a sparse raw file (durable)")
def test_import_vhdcore(benchmark, ops_data) -> None:
    import vhdcore

    out = ops_data["dir"] / "imp-vhdcore.vhd"

    def run() -> None:
        vhdcore.convert(ops_data["raw"], out, to="dynamic", source_format="raw")
        _fsync(out)

    benchmark.pedantic(run, setup=lambda: _unlink(out), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    with vhdcore.open(out) as disk:
        assert disk.allocated_bytes() == RUNS * RUN
    record("ops/import vhdcore", benchmark, RUNS * RUN)
    _unlink(out)


@pytest.mark.benchmark(group="import a sparse raw file (durable)")
def test_import_qemu_img(benchmark, ops_data) -> None:
    out = ops_data["dir"] / "imp-qemu.vhd"
    cmd = ["qemu-img", "convert", "-t", "writeback", "-f", "raw", "-O", "vpc", str(ops_data["raw"]), str(out)]

    def run() -> None:
        subprocess.run(cmd, check=True)
        _fsync(out)

    benchmark.pedantic(run, setup=lambda: _unlink(out), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vpc", str(ops_data["raw"]), str(out)])
    assert r.returncode == 0
    record("ops/import qemu-img", benchmark, RUNS * RUN)
    _unlink(out)


# --------------------------------------------------------------------------------------------- compare


@pytest.mark.benchmark(group="compare two 4 GiB disks differing in one sector")
def test_compare_vhdcore(benchmark, ops_data) -> None:
    from vhdcore.ops.compare import compare

    res = benchmark.pedantic(lambda: compare(ops_data["a"], ops_data["b"]), rounds=ROUNDS, iterations=1,
                             warmup_rounds=1)
    assert not res.identical and res.offset == ops_data["diff_at"]
    record("ops/compare vhdcore", benchmark, res.bytes_read)


@pytest.mark.benchmark(group="compare two 4 GiB disks differing in one sector")
def test_compare_qemu_img(benchmark, ops_data) -> None:
    cmd = ["qemu-img", "compare", "-f", "vpc", "-F", "vpc", str(ops_data["a"]), str(ops_data["b"])]
    r = benchmark.pedantic(lambda: subprocess.run(cmd, capture_output=True, text=True), rounds=ROUNDS, iterations=1,
                           warmup_rounds=1)
    assert r.returncode == 1 and f"offset {ops_data['diff_at']}" in r.stdout, r.stdout
    record("ops/compare qemu-img", benchmark, 2 * RUNS * RUN)


# --------------------------------------------------------------------------------------------- resize


@pytest.fixture(scope="module")
def resize_input(tmp_path_factory):
    import vhdcore

    if not os.access(VHD_UTIL, os.X_OK):
        pytest.skip("vhd-util not found (set VHD_UTIL)")
    d = tmp_path_factory.mktemp("resizebench")
    src = d / "pristine.vhd"
    subprocess.run([VHD_UTIL, "create", "-n", str(src), "-s", "2048"], check=True)
    with vhdcore.open(src, "r+") as disk:
        for i in range(16):
            disk.write(i * 64 * MiB, bytes([i + 1]) * RUN)
    yield d, src
    shutil.rmtree(d, ignore_errors=True)


def _fresh(d, src, name):
    out = d / name
    journal = d / (name + ".journal")

    def setup() -> None:
        _unlink(journal)
        shutil.copyfile(src, out)
        _fsync(out)

    return out, journal, setup


@pytest.mark.benchmark(group="resize a dynamic disk to 2040 GiB")
def test_resize_vhdcore(benchmark, resize_input) -> None:
    from vhdcore.ops.resize import resize

    d, src = resize_input
    out, _, setup = _fresh(d, src, "rs-vhdcore.vhd")
    rep = benchmark.pedantic(lambda: resize(out, RESIZE_TO_MIB * MiB), setup=setup, rounds=ROUNDS,
                             iterations=1, warmup_rounds=1)
    assert rep.blocks_moved >= 1
    assert subprocess.run([VHD_UTIL, "check", "-n", str(out)], capture_output=True).returncode == 0
    record("ops/resize vhdcore", benchmark, rep.bytes_moved)


@pytest.mark.benchmark(group="resize a dynamic disk to 2040 GiB")
def test_resize_vhdcore_cli(benchmark, resize_input) -> None:
    d, src = resize_input
    out, _, setup = _fresh(d, src, "rs-cli.vhd")
    cmd = [sys.executable, "-m", "vhdcore", "resize", str(out), f"{RESIZE_TO_MIB}M", "--progress", "none"]
    benchmark.pedantic(lambda: subprocess.run(cmd, check=True, capture_output=True), setup=setup, rounds=ROUNDS,
                       iterations=1, warmup_rounds=1)
    record("ops/resize vhdcore CLI process", benchmark, 1)


@pytest.mark.benchmark(group="resize a dynamic disk to 2040 GiB")
def test_resize_vhd_util(benchmark, resize_input) -> None:
    d, src = resize_input
    out, journal, setup = _fresh(d, src, "rs-vhdutil.vhd")
    cmd = [VHD_UTIL, "resize", "-n", str(out), "-s", str(RESIZE_TO_MIB), "-j", str(journal)]
    benchmark.pedantic(lambda: subprocess.run(cmd, check=True, capture_output=True), setup=setup, rounds=ROUNDS,
                       iterations=1, warmup_rounds=1)
    q = subprocess.run([VHD_UTIL, "query", "-n", str(out), "-v"], capture_output=True, text=True)
    assert q.stdout.strip() == str(RESIZE_TO_MIB)
    chk = subprocess.run([VHD_UTIL, "check", "-n", str(out)], capture_output=True, text=True)
    benchmark.extra_info["vhd-util check of its own result"] = "valid" if chk.returncode == 0 else "INVALID"
    record("ops/resize vhd-util", benchmark, 1)


# --------------------------------------------------------------------------------------------- ratios


def test_ops_ratios(request) -> None:
    if request.config.getoption("benchmark_disable", False):
        pytest.skip("benchmarks disabled (--benchmark-disable): no timings to compare")
    pairs = [("ops/import vhdcore", "ops/import qemu-img"), ("ops/compare vhdcore", "ops/compare qemu-img"),
             ("ops/resize vhdcore", "ops/resize vhd-util"), ("ops/resize vhdcore CLI process", "ops/resize vhd-util")]
    missing = [n for p in pairs for n in p if n not in RESULTS]
    assert not missing, f"run the whole file: no timings for {missing}"
    for ours, peer in pairs:
        a, b = RESULTS[ours], RESULTS[peer]
        RATIOS.append(f"{ours.split('/')[1]:<32} {a['min'] * 1e3:9.1f} ms   {peer.split('/')[1]:<20} "
                      f"{b['min'] * 1e3:9.1f} ms   time ratio {b['min'] / a['min']:.2f}x (>1: vhdcore faster)")

"""``convert --to dynamic`` of the 3-deep chain against ``qemu-img convert -O vpc`` of the dynamic disk (qemu cannot
read chains), with vhdcore on qemu's own input and a plain copy of the dynamic disk's file as the storage ceiling.

Every variant writes a new file in the same directory and makes it durable (vhdcore fsyncs its output, qemu-img's
default cache mode flushes once at the end, the copy is fsynced), and the output is deleted between rounds, so
each round writes into new file space. MB/s = bytes of virtual data held (allocated) in the output per second.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import RATIOS, RESULTS, record

ROUNDS = 3
GROUP = "convert to a dynamic VHD (durable output)"


def _out(bench_data, name: str):
    p = bench_data.dir / name

    def cleanup() -> None:
        if p.exists():
            p.unlink()

    return p, cleanup


def _allocated_output(path) -> int:
    import vhdcore

    with vhdcore.open(path) as d:
        return int(len(d.leaf.allocated_blocks())) * d.leaf.block_size


@pytest.mark.benchmark(group=GROUP)
def test_convert_chain_vhdcore(benchmark, bench_data) -> None:
    import vhdcore

    out, cleanup = _out(bench_data, "conv-chain.vhd")
    rep = benchmark.pedantic(lambda: vhdcore.convert(bench_data.chain[-1], out, to="dynamic"), setup=cleanup,
                             rounds=ROUNDS, iterations=1, warmup_rounds=1)
    nbytes = _allocated_output(out)
    assert rep.blocks_written * 2 * 1024 * 1024 == nbytes
    record("convert/vhdcore chain", benchmark, nbytes)
    cleanup()


@pytest.mark.benchmark(group=GROUP)
def test_convert_dynamic_vhdcore(benchmark, bench_data) -> None:
    import vhdcore

    out, cleanup = _out(bench_data, "conv-dyn.vhd")
    benchmark.pedantic(lambda: vhdcore.convert(bench_data.dyn, out, to="dynamic"), setup=cleanup, rounds=ROUNDS,
                       iterations=1, warmup_rounds=1)
    record("convert/vhdcore dynamic", benchmark, _allocated_output(out))
    cleanup()


@pytest.mark.benchmark(group=GROUP)
def test_convert_dynamic_qemu_img(benchmark, bench_data) -> None:
    out, cleanup = _out(bench_data, "conv-qemu.vhd")
    cmd = ["qemu-img", "convert", "-f", "vpc", "-O", "vpc", str(bench_data.dyn), str(out)]
    benchmark.pedantic(lambda: subprocess.run(cmd, check=True), setup=cleanup, rounds=ROUNDS, iterations=1,
                       warmup_rounds=1)
    record("convert/qemu-img dynamic", benchmark, _allocated_output(out))
    cleanup()


@pytest.mark.benchmark(group=GROUP)
def test_copy_dynamic_file(benchmark, bench_data) -> None:
    """The storage ceiling: the dynamic disk's file copied as it is (copy_file_range) and fsynced."""
    out, cleanup = _out(bench_data, "copy.vhd")

    def copy() -> None:
        shutil.copyfile(bench_data.dyn, out)
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    benchmark.pedantic(copy, setup=cleanup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record("convert/plain copy of dyn.vhd", benchmark, bench_data.dyn_allocated)
    cleanup()


def test_convert_ratios(request) -> None:
    if request.config.getoption("benchmark_disable", False):
        pytest.skip("benchmarks disabled (--benchmark-disable): no timings to compare")
    names = ["convert/vhdcore chain", "convert/vhdcore dynamic", "convert/qemu-img dynamic",
             "convert/plain copy of dyn.vhd"]
    missing = [n for n in names if n not in RESULTS]
    assert not missing, f"run the whole file: no timings for {missing}"
    r = {n: RESULTS[n] for n in names}
    q = r["convert/qemu-img dynamic"]
    for n in names[:2] + names[3:]:
        a = r[n]
        RATIOS.append(f"convert {n.split('/')[1]:<26} {a['min']:6.2f} s ({a['bytes'] / a['min'] / 1e6:7.1f} MB/s), "
                      f"qemu-img on the dynamic disk {q['min']:.2f} s ({q['bytes'] / q['min'] / 1e6:.1f} MB/s): "
                      f"time ratio qemu/this {q['min'] / a['min']:.2f}x, throughput ratio "
                      f"{(a['bytes'] / a['min']) / (q['bytes'] / q['min']):.2f}x")
    # No target was set for convert; this guards against regressions only. Measured here: vhdcore ~1.7x qemu-img's
    # time on the same input (qemu keeps 8 requests in flight on a thread pool; vhdcore reads and writes in turn).
    v = r["convert/vhdcore dynamic"]
    assert v["min"] <= q["min"] * 2.5, (v, q)

"""Shared set-up of the read and convert benchmarks, and the ratios they report.

Session fixtures build, once, in one temporary directory (one file system, page cache kept warm):
- ``dyn.vhd``: a 4 GiB dynamic disk (2 MiB blocks) with 1 GiB of data in 512 blocks spread over the disk;
- a 3-deep chain ``dyn.vhd <- child1.vhd <- child2.vhd``: each child holds full blocks and partial blocks (runs
  of 4-128 KiB, as a guest file system writes them), over allocated and unallocated base blocks;
- ``plain.raw``: the dynamic disk's 4 GiB as a plain, fully written file: the ceiling for a Python reader of 4 GiB
  (a sparse file is no ceiling: reading its holes costs the kernel more than a copy from the page cache);
- ``chain.raw``: the chain's virtual disk as a sparse raw file, to check that the chain reader is right.

Each benchmark stores its timings in ``benchsupport.RESULTS`` under a fixed name; ``bench_read.py`` and
``bench_convert.py`` end with a test that computes the ratios from them (and asserts the read targets), and
``pytest_terminal_summary`` prints every ratio at the end of the run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchsupport import RATIOS, RESULTS, BenchData, build_bench_data


def pytest_collect_file(parent: pytest.Collector, file_path: Path):
    """``make bench`` runs ``pytest benchmarks``: collect the bench_*.py files (the default pattern is test_*.py).
    A file named on the command line is collected by pytest itself."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_terminal_summary(terminalreporter) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("vhdcore benchmark throughput and ratios (same run)")
    for name, r in sorted(RESULTS.items()):
        tr.write_line(f"{name:<34} {r['bytes'] / r['min'] / 1e6:>9.1f} MB/s best, "
                      f"{r['bytes'] / r['median'] / 1e6:>9.1f} MB/s median  ({r['bytes'] / 1e6:.0f} MB)")
    for line in RATIOS:
        tr.write_line(line)


@pytest.fixture(scope="session")
def bench_data(tmp_path_factory) -> BenchData:
    d = tmp_path_factory.mktemp("vhdbench")
    yield build_bench_data(d)
    shutil.rmtree(d, ignore_errors=True)

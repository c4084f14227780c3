"""A short fuzzing run (hypothesis drawing bytes for the structure-aware mutator in tests/support/hostile/fuzzing.py)
and every crash fuzzing ever found (tests/data/regressions). The long run is fuzz/fuzz_vhd.py (atheris).

Each mutant goes to check, open (strict and lenient), map, reads and convert; every outcome must be a correct
result or a VHDError, within 2 s and 200 MB.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.hostile import fuzzing as F

# Examples per backend: about 10-20 s of the suite on two cores.
SHORT_RUN_EXAMPLES = int(os.environ.get("VHDCORE_FUZZ_EXAMPLES", "400"))


@pytest.fixture(scope="module")
def scratch():
    root = Path(tempfile.mkdtemp(prefix="vhdfuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    F.seeds()
    yield root
    if tracemalloc.is_tracing():
        tracemalloc.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("case", F.regression_cases(), ids=lambda p: p.name)
def test_regression(case: Path, tmp_path) -> None:
    m = F.load_regression(case, tmp_path / "m")
    F.run_limited(m, tmp_path)


def test_regressions_exist() -> None:
    """The crash files fuzzing found while this suite was written are kept (and stay fixed above)."""
    assert len(F.regression_cases()) >= 3


@pytest.mark.timeout(600)
def test_short_fuzz_run(scratch: Path) -> None:
    n = {"examples": 0, "opened": 0}

    @settings(max_examples=SHORT_RUN_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.binary(min_size=3, max_size=96))
    def one(data: bytes) -> None:
        d = scratch / "m"
        shutil.rmtree(d, ignore_errors=True)
        m = F.materialize(F.Plan.decode(data), d)
        try:
            out = F.run_limited(m, d, keep_tracing=True)
        except Exception as e:
            saved = F.save_regression(m, f"{type(e).__name__}: {e}", scratch / "crashes")
            raise AssertionError(f"{m.plan_text}\n-> {type(e).__name__}: {e}\nmutant kept in {saved} (copy it to "
                                 "tests/data/regressions/ once fixed)") from e
        n["examples"] += 1
        n["opened"] += out["open"] == "ok"

    one()
    # The mutator must reach past the parsers often enough to exercise reads, maps and convert.
    assert n["examples"] >= SHORT_RUN_EXAMPLES * 0.9
    assert n["opened"] >= n["examples"] * 0.15, n


def test_limits_are_enforced(scratch: Path) -> None:
    m = F.materialize(F.Plan.decode(b"\x05\x00\x00\x00\x00"), scratch / "limits")
    with pytest.raises(F.FuzzFailure, match="of CPU"):
        F.run_limited(m, scratch, time_limit=0.0)
    with pytest.raises(F.FuzzFailure, match="MiB"):
        F.run_limited(m, scratch, memory_limit=1024)
    out = F.run_limited(m, scratch)
    assert out["cpu_seconds"] < F.TIME_LIMIT and out["peak_bytes"] < F.MEMORY_LIMIT


def test_decoder_reaches_every_region_and_seed() -> None:
    """Every seed, region kind and operation is reachable from fuzzer bytes."""
    seeds = F.seeds()
    import random

    rnd = random.Random(0)
    got_seeds, got_regions, got_ops = set(), set(), set()
    for _ in range(3000):
        p = F.Plan.decode(rnd.randbytes(rnd.randrange(3, 60)))
        got_seeds.add(p.seed % len(seeds))
        for m in p.mutations:
            got_regions.add(m.region)
            got_ops.add(m.op)
    assert got_seeds == set(range(len(seeds)))
    assert got_regions == set(F.REGION_KINDS)
    assert {"truncate", "append", "bat-copy", "flip", "interesting64"} <= got_ops

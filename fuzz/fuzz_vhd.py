#!/usr/bin/env python3
"""Long-run, coverage-guided fuzzing of vhdcore with atheris (libFuzzer).

    .venv/bin/pip install atheris            # or: pip install -e ".[fuzz]"
    mkdir -p fuzz/corpus
    .venv/bin/python fuzz/fuzz_vhd.py fuzz/corpus -fork=2 -max_len=128 -len_control=0 -max_total_time=3600 \
        -timeout=20 -rss_limit_mb=4096

Use -fork: under atheris' comparison instrumentation numpy temporaries stay alive (~100 MB per thousand inputs),
so a single long-lived process grows; fork mode runs short-lived workers.

Each fuzzer input is decoded by tests/support/hostile/fuzzing.py into a mutation plan for a seed (corpus files and a
vhdcore-made chain); the mutant is fed to check, open, map, reads and convert. A failure (an exception that is
not a VHDError, a cross-check between check and open that does not hold, over 2 s or over 200 MB of traced
memory) saves the mutant under fuzz/crashes/<digest>/ (or $VHDCORE_FUZZ_CRASH_DIR) in the layout of
tests/data/regressions/, and libFuzzer stops with the input that caused it. Once fixed, move the directory to
tests/data/regressions/: tests/test_fuzz.py runs every case there.

libFuzzer's own -timeout is only a backstop for a real hang (the 2 s limit is enforced per input by the
harness, which also measures what libFuzzer cannot: time spent in one input's several targets). Options after
the corpus directory are libFuzzer's (-runs=N, -max_total_time=S, -jobs=N, ...).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["vhdcore"]):
    import vhdcore  # noqa: F401,E402
    import vhdcore.disk.chain  # noqa: F401,E402
    import vhdcore.ops.check  # noqa: F401,E402
    import vhdcore.ops.convert  # noqa: F401,E402
    import vhdcore.disk.image  # noqa: F401,E402
    import vhdcore.ops.repair  # noqa: F401,E402
    import vhdcore.format.structs  # noqa: F401,E402

from support.hostile import fuzzing as F  # noqa: E402

CRASH_DIR = Path(os.environ.get("VHDCORE_FUZZ_CRASH_DIR", ROOT / "fuzz" / "crashes"))
WORK = Path(tempfile.mkdtemp(prefix="vhdfuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


def test_one_input(data: bytes) -> None:
    d = WORK / "m"
    shutil.rmtree(d, ignore_errors=True)
    m = F.materialize(F.Plan.decode(data), d)
    try:
        F.run_limited(m, d, keep_tracing=True)
    except F.FuzzFailure as e:
        if str(e).startswith("took") and _fast_outside(m):
            return  # slow only under coverage instrumentation (several times slower) on a busy machine
        saved = F.save_regression(m, f"{type(e).__name__}: {e}", CRASH_DIR)
        print(f"\nvhdcore fuzz: {m.plan_text}\n  -> {type(e).__name__}: {e}\n  mutant saved in {saved}",
              file=sys.stderr, flush=True)
        raise
    except Exception as e:
        saved = F.save_regression(m, f"{type(e).__name__}: {e}", CRASH_DIR)
        print(f"\nvhdcore fuzz: {m.plan_text}\n  -> {type(e).__name__}: {e}\n  mutant saved in {saved}",
              file=sys.stderr, flush=True)
        raise


def _fast_outside(m: F.Mutant) -> bool:
    """Whether the mutant meets the time limit in a plain (uninstrumented) interpreter: the verdict that counts."""
    probe = F.save_regression(m, "time check", WORK / "probe")
    try:
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "hostile" / "fuzzing.py"), str(probe)],
                           capture_output=True, text=True, timeout=60)
        return r.returncode == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def main() -> None:
    F.seeds(WORK)  # built once, before libFuzzer starts timing inputs
    argv = list(sys.argv)
    # libFuzzer's -fork/-jobs modes start argv[0] through the shell: make that this interpreter and script.
    argv[0] = f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))}"
    if not any(a.startswith("-artifact_prefix=") for a in argv):
        # libFuzzer's raw crash inputs go beside the decoded mutants, not into the current directory.
        CRASH_DIR.mkdir(parents=True, exist_ok=True)
        argv.append(f"-artifact_prefix={CRASH_DIR}/")
    atheris.Setup(argv, test_one_input)
    try:
        atheris.Fuzz()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()

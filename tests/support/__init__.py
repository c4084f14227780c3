"""Helpers shared by the tests, the benchmarks and the fuzzer (``tests/`` is on ``sys.path``: see tests/conftest.py)."""
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
CORPUS = TESTS / "data" / "corpus"

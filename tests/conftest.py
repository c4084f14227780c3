"""Suite-wide set-up: markers, the backend switch, shared fixtures.

The suite runs twice (see the Makefile): once with the Cython kernels and once with VHDCORE_PUREPYTHON=1.
Tests marked ``backend_independent`` exercise no kernel and run only in the first pass.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Some test modules import helpers from others by bare name (test_cli, test_json_schema, test_image), as pytest
# imports every test module; their directories go on the path so that any one directory or file runs alone.
for _shared in ("cli", "disk"):
    sys.path.insert(1, str(Path(__file__).parent / _shared))

TESTS = Path(__file__).parent
CORPUS = TESTS / "data" / "corpus"
PURE_PYTHON = os.environ.get("VHDCORE_PUREPYTHON", "").lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backend_independent: exercises no kernel; runs in the Cython pass only")
    config.addinivalue_line("markers", "slow: long test, still part of the default suite")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not PURE_PYTHON:
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("backend_independent") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    return CORPUS


@pytest.fixture(scope="session", autouse=True)
def _backend_is_the_requested_one() -> None:
    """Fail loudly if the pass meant for Cython silently fell back to Python (or the reverse)."""
    import vhdcore

    expected = "python" if PURE_PYTHON else "cython"
    assert vhdcore.BACKEND == expected, f"kernel backend is {vhdcore.BACKEND}, this pass needs {expected}"


# Guest-file-system chains (real mkfs/sfdisk images), built once per session by growth_support and shared by the
# growth and compact tests.
@pytest.fixture(scope="module")
def mbr_chain(tmp_path_factory):
    from support import growth as gs

    gs.ensure_tools()
    return gs.build_once("mbr", lambda: gs.build_mbr_chain(tmp_path_factory.mktemp("mbr-chain")))


@pytest.fixture(scope="module")
def gpt_chain(tmp_path_factory):
    from support import growth as gs

    gs.ensure_tools()
    return gs.build_once("gpt", lambda: gs.build_gpt_chain(tmp_path_factory.mktemp("gpt-chain")))

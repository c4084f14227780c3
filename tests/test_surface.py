"""The public surface, pinned: ``vhdcore.__all__``, the operation functions, the CLI's commands.

A change here is a change of the API or of the command line: make it on purpose, in this file and in the docs,
in the same commit. Runs in the Cython pass only (it exercises no kernel).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import types

import pytest

import vhdcore

pytestmark = pytest.mark.backend_independent

# sorted(vhdcore.__all__), written out.
PUBLIC = [
    "BACKEND", "ChainCycleError", "ChainError", "CheckFailedError", "ChecksumError", "CoalesceReport",
    "CorruptImageError", "DestinationError", "DestinationExistsError", "Disk", "ExportReport", "Extent", "GiB",
    "GrowthReport", "Image", "InvalidFormatError", "JobRecordError", "JournalError", "LockError", "MiB",
    "MissingDependencyError", "NoSpaceError", "ObjectNameError", "ParentMismatchError", "ParentNotFoundError",
    "ReadOnlyError", "StageTimeout", "UnsafeOperationError", "UnsupportedFeatureError", "UploadError",
    "VHDError", "VerificationError", "check", "coalesce", "compact", "compare", "convert", "create", "export",
    "growth", "measure", "open", "rebase", "repair", "resize", "set_parent", "snapshot", "verify",
]

# vhdcore.<name> is the function of that name, never a module of the package.
FUNCTIONS = ["convert", "coalesce", "check", "repair", "growth", "compact", "export", "verify", "compare", "measure",
             "resize", "set_parent", "rebase", "create", "snapshot", "open"]

# vhdcore.cli.main.COMMANDS (the sub-command modules, in --help order) and the names --help shows for them.
COMMANDS = ["info", "map", "create", "snapshot", "convert", "coalesce", "check", "repair", "growth", "compact",
            "export", "verify", "image", "compare", "measure", "setparent", "resize", "rebase", "submit", "status",
            "jobs", "worker"]
HELP_NAMES = ["info", "map", "create", "snapshot", "convert", "coalesce", "check", "repair", "growth", "compact",
              "export", "verify", "image", "compare", "measure", "set-parent", "resize", "rebase", "submit",
              "status", "jobs", "worker"]


def test_all_is_pinned() -> None:
    assert len(vhdcore.__all__) == len(set(vhdcore.__all__)), "a name listed twice"
    assert sorted(vhdcore.__all__) == PUBLIC


def test_every_public_name_resolves() -> None:
    for name in PUBLIC:
        assert getattr(vhdcore, name) is not None, name
    star: dict = {}
    exec("from vhdcore import *", star)  # what a user's star import gets: every name, each resolved
    assert sorted(set(star) - {"__builtins__"}) == PUBLIC
    assert (star["MiB"], star["GiB"]) == (1 << 20, 1 << 30)
    assert issubclass(vhdcore.VHDError, Exception)
    for name in PUBLIC:
        obj = star[name]
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, vhdcore.VHDError), name  # one hierarchy for every public error


def _assert_functions(where: str) -> None:
    for name in FUNCTIONS:
        fn = getattr(vhdcore, name)
        assert inspect.isfunction(fn) and fn.__name__ == name, f"{where}: vhdcore.{name} is {fn!r}"


def test_operations_are_functions_in_this_process() -> None:
    _assert_functions("in the test process")
    assert type(vhdcore) is types.ModuleType, "vhdcore's module object was replaced"


# Run in a fresh interpreter, where nothing has been imported yet: import every module of the package (the
# modules defining the operations among them: vhdcore.ops.convert, vhdcore.ops.coalesce, ...), in the order
# given, then report what vhdcore.<name> is. A sub-module named like a function would replace the function
# with itself on import; the lazy attributes must not let the import order decide.
_PROBE = r"""
import importlib, inspect, json, pkgutil, sys, types
first_touch = sys.argv[1] == "touch-first"
import vhdcore
names = json.loads(sys.argv[2])
if first_touch:
    before = {n: getattr(vhdcore, n) for n in names}
imported = []
for m in pkgutil.walk_packages(vhdcore.__path__, "vhdcore."):
    if m.name == "vhdcore.__main__":
        continue  # it runs the command line
    try:
        importlib.import_module(m.name)
    except ModuleNotFoundError as e:  # an optional extra that is not installed; never one of ours
        if (e.name or "").startswith("vhdcore"):
            raise
        continue
    imported.append(m.name)
out = {n: [inspect.isfunction(getattr(vhdcore, n)), getattr(getattr(vhdcore, n), "__name__", None),
           getattr(getattr(vhdcore, n), "__module__", None)] for n in names}
if first_touch:
    out["_same_objects"] = all(getattr(vhdcore, n) is before[n] for n in names)
out["_plain_module"] = type(sys.modules["vhdcore"]) is types.ModuleType
out["_imported"] = imported
print(json.dumps(out))
"""


@pytest.mark.parametrize("order", ["import-first", "touch-first"])
def test_operations_are_functions_whatever_was_imported_first(order: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VHDCORE_PUREPYTHON"}
    r = subprocess.run([sys.executable, "-c", _PROBE, order, json.dumps(FUNCTIONS)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    imported = out.pop("_imported")
    assert out.pop("_plain_module") is True, "vhdcore's module object was replaced"
    if order == "touch-first":
        assert out.pop("_same_objects") is True, "importing a module replaced an operation already looked up"
    for name in FUNCTIONS:
        is_function, fn_name, module = out[name]
        assert is_function and fn_name == name, (order, name, out[name])
        # its defining module was among those imported before vhdcore.<name> was looked up
        assert module == "vhdcore" or module in imported, (name, module)
    for must in ("vhdcore.ops.convert", "vhdcore.ops.create", "vhdcore.delivery.export", "vhdcore.cli.main"):
        assert must in imported, must


def test_cli_command_list_is_pinned() -> None:
    from vhdcore.cli import main

    assert main.COMMANDS == COMMANDS
    # The loader skips a listed module that is missing, so each one must be there (and say its name).
    names = [importlib.import_module(f"vhdcore.cli.{c}").NAME for c in COMMANDS]
    assert names == HELP_NAMES
    sub = next(a for a in main.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == HELP_NAMES


def test_help_lists_the_pinned_commands() -> None:
    env = {**os.environ, "COLUMNS": "100"}
    r = subprocess.run([sys.executable, "-m", "vhdcore", "--help"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    listed = re.findall(r"^    (\S+)", r.stdout, re.MULTILINE)  # sub-commands; help continuation is indented more
    assert listed == HELP_NAMES, r.stdout


def test_a_command_imports_only_its_own_module() -> None:
    """A command's start-up loads that command's module only (each costs start-up time in every short call);
    --help still loads and lists them all (test above)."""
    code = ("import sys\nfrom vhdcore.cli import main as m\n"
            "try:\n    m.main(['set-parent', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(k for k in sys.modules if k.startswith('vhdcore.cli.'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(r.stdout.strip().splitlines()[-1].split())  # the last line; --help printed before it
    assert "vhdcore.cli.setparent" in loaded
    assert not loaded & {f"vhdcore.cli.{c}" for c in COMMANDS if c != "setparent"}, loaded

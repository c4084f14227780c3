"""Optional client libraries: a missing one is a one-line error naming what to install, found before any work.

A library is made missing the way Python itself records it: ``sys.modules[name] = None`` makes both
``import name`` and ``importlib.util.find_spec(name)`` report it absent, for this test only. (tests/test_packaging.py
checks the same against a real install without the extras.)
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

import vhdcore
from vhdcore.cli import main as cli
from vhdcore._extras import MissingDependencyError

pytestmark = pytest.mark.backend_independent


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)


def _chain(tmp_path: Path) -> tuple[Path, Path]:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    with vhdcore.create(base, 4 * vhdcore.MiB, type="dynamic") as d:
        d.write(0, b"base" * 128)
    vhdcore.snapshot(base, leaf).close()
    with vhdcore.open(leaf, "r+") as d:
        d.write(4096, b"leaf" * 128)
    return base, leaf


def _digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.mark.parametrize("url, module, extra", [("swift://images/disk.vhd.zst", "swiftclient", "swift"),
                                                ("s3://images/disk.vhd.zst", "boto3", "s3")])
def test_remote_destination_without_its_extra_is_one_line(tmp_path, monkeypatch, capsys, url, module, extra):
    _hide(monkeypatch, module)
    base, leaf = _chain(tmp_path)
    before = _digest(base, leaf)
    for command in ("export", "image"):
        assert cli.main([command, str(leaf), url, "--progress", "none"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pip install 'vhdcore[{extra}]'" in err, err
    # image checks before its coalesce: the chain is as it was, both files still there
    assert _digest(base, leaf) == before


def test_api_raises_an_import_error_naming_the_extra(tmp_path, monkeypatch):
    _hide(monkeypatch, "swiftclient")
    _, leaf = _chain(tmp_path)
    with pytest.raises(MissingDependencyError, match=r"vhdcore\[swift\]") as exc:
        vhdcore.export(leaf, "swift://images/disk.vhd")
    assert isinstance(exc.value, ImportError)
    from vhdcore.delivery.upload.fetch import open_download

    with pytest.raises(MissingDependencyError, match=r"vhdcore\[swift\]"):
        open_download("swift://images/disk.vhd")


def test_a_missing_core_library_is_one_line_too(tmp_path, monkeypatch, capsys):
    # zstandard is a core dependency; a partial install (--no-deps) still gets a line, not a traceback.
    _hide(monkeypatch, "zstandard")
    _, leaf = _chain(tmp_path)
    assert cli.main(["export", str(leaf), str(tmp_path / "out.vhd.zst"), "--progress", "none"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zstandard" in err and "pip install" in err, err
    assert "Traceback" not in err

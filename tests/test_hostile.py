"""Hand-made hostile files (tests/support/hostile/cases.py): each must give its exact exception from vhdcore.open, its
check findings, one CLI error line, and open nothing outside the allowed directories."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest

import vhdcore
from vhdcore.cli import main as cli
from vhdcore.ops.check import CODES, ERROR, INFO, WARNING, check
from vhdcore.exceptions import InvalidFormatError, LockError, ParentNotFoundError, VHDError
from vhdcore.ops.repair import repair, undo

from support.hostile.cases import CASES, Target

# --------------------------------------------------------------------------------------------- opened files

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextmanager
def opened_paths():
    """Every path opened (os.open, open()) inside the block, by this process."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def _inside(p: str, d: Path) -> bool:
    real = os.path.realpath(p)
    root = os.path.realpath(d)
    return real == root or real.startswith(root + os.sep)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _virtual_sha(path: Path, parent_dirs) -> str:
    h = hashlib.sha256()
    with vhdcore.open(path, parent_dirs=parent_dirs) as d:
        h.update(d.read(0, d.size))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- the cases


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def hostile(request, tmp_path) -> Target:
    return request.param.make(tmp_path)


def test_open_raises_the_exact_error(hostile: Target) -> None:
    t = hostile
    with opened_paths() as seen:
        if t.error is None:
            with vhdcore.open(t.path, parent_dirs=t.parent_dirs) as disk:
                for off, data in t.content.items():
                    assert disk.read(off, len(data)) == data
                if disk.size <= 64 * 1024 * 1024:
                    assert len(disk.read(0, disk.size)) == disk.size
        else:
            with pytest.raises(VHDError) as ei:
                vhdcore.open(t.path, parent_dirs=t.parent_dirs).close()
            e = ei.value
            assert type(e) is t.error, f"{type(e).__name__}: {e}"
            assert e.field == t.field, str(e)
            assert e.path is not None and str(e).startswith(e.path)
            if isinstance(e, ParentNotFoundError) and t.refused is not None:
                assert e.tried, str(e)
                assert any(t.refused in entry for entry in e.tried), e.tried
    if t.outside is not None:
        assert not [p for p in seen if _inside(p, t.outside)], "opened a file outside the allowed directories"


def test_check_reports_the_findings(hostile: Target) -> None:
    t = hostile
    with opened_paths() as seen:
        rep = check(t.path, chain=True, parent_dirs=t.parent_dirs)
    codes = rep.codes()
    assert t.findings <= codes, [str(f) for f in rep.findings]
    if t.clean:
        assert rep.clean, [str(f) for f in rep.findings]
    if t.error is not None:
        assert not rep.clean and rep.errors, "open() refuses this file, check must say why"
    for f in rep.findings:
        assert f.code in CODES and f.severity in (ERROR, WARNING, INFO) and f.message and f.path
        assert f.explanation
    if t.outside is not None:
        assert not [p for p in seen if _inside(p, t.outside)]
    d = rep.to_dict()
    assert d["clean"] == rep.clean and len(d["findings"]) == len(rep.findings)


def test_cli_prints_one_line(hostile: Target, capsys) -> None:
    t = hostile
    extra = [a for d in t.parent_dirs for a in ("--parent-dir", d)]
    rc = cli.main(["info", str(t.path), *extra])
    out, err = capsys.readouterr()
    if t.error is None:
        assert rc == 0
    else:
        assert rc != 0
        assert out == ""
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("vhdcore info: error: ")
    rc = cli.main(["check", "--chain", str(t.path), *extra])
    out, err = capsys.readouterr()
    assert rc == (0 if check(t.path, chain=True, parent_dirs=t.parent_dirs).clean else 1), out + err
    assert err == ""


def test_repair_then_undo(hostile: Target) -> None:
    t = hostile
    before = _sha(t.path)
    try:
        content_before = _virtual_sha(t.path, t.parent_dirs)
    except VHDError:
        content_before = None
    rep = repair(t.path, parent_dirs=t.parent_dirs)
    if not t.repairs_to_clean:
        # Repair must not pretend: a file it cannot fully fix keeps error findings, and nothing reachable is lost.
        if t.error is not None:
            assert not rep.clean
        if content_before is not None:
            assert _virtual_sha(t.path, t.parent_dirs) == content_before
        if not rep.changed:
            assert _sha(t.path) == before
            return
    else:
        assert rep.changed and rep.clean, (rep.actions, [str(f) for f in rep.remaining])
        assert check(t.path, chain=True, parent_dirs=t.parent_dirs).clean
        with vhdcore.open(t.path, "r+", parent_dirs=t.parent_dirs) as disk:  # writable again
            for off, data in t.content.items():
                assert disk.read(off, len(data)) == data
        if content_before is not None:
            assert _virtual_sha(t.path, t.parent_dirs) == content_before
    assert rep.undo_path and os.path.exists(rep.undo_path)
    undo(rep.undo_path, t.path)
    assert _sha(t.path) == before


# --------------------------------------------------------------------------------------------- the rest


@pytest.mark.backend_independent
def test_sparse_bat_is_not_read_into_memory(tmp_path) -> None:
    """The hostile case with a 133 MB BAT inside a sparse file: refused before any allocation."""
    t = next(c for c in CASES if c.name.startswith("BAT of 33M")).make(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(VHDError):
            vhdcore.open(t.path)
        check(t.path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak


@pytest.mark.backend_independent
@pytest.mark.timeout(30)
def test_fifo_and_directory_as_the_disk(tmp_path, capsys) -> None:
    fifo = tmp_path / "disk.vhd"
    os.mkfifo(fifo)
    with pytest.raises(InvalidFormatError) as ei:
        vhdcore.open(fifo)
    assert ei.value.field == "file"
    with pytest.raises(InvalidFormatError):
        check(fifo)
    with pytest.raises(InvalidFormatError):
        repair(fifo)
    assert cli.main(["repair", str(fifo)]) == 2
    assert cli.main(["check", str(fifo)]) == 2
    assert cli.main(["check", str(tmp_path)]) == 2
    assert cli.main(["check", str(tmp_path / "missing.vhd")]) == 2
    err = capsys.readouterr().err
    assert err.count("could not check") == 3


@pytest.mark.backend_independent
def test_concurrent_writers_refused_readers_fine(tmp_path) -> None:
    p = tmp_path / "d.vhd"
    vhdcore.create(p, 4 * 1024 * 1024).close()
    with vhdcore.open(p, "r+") as w:
        w.write(0, b"x" * 512)
        with pytest.raises(LockError) as ei:
            vhdcore.open(p, "r+")
        assert ei.value.field == "lock" and ei.value.path == str(p)
        with pytest.raises(LockError):
            repair(p)
        with vhdcore.open(p) as r:
            assert r.read(0, 1) == b"x"
        assert check(p).clean
    # Another process holding the writer lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, vhdcore
            d = vhdcore.open({str(p)!r}, "r+")
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockError):
            vhdcore.open(p, "r+")
        with vhdcore.open(p) as r:
            assert r.read(0, 1) == b"x"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with vhdcore.open(p, "r+"):
        pass


@pytest.mark.backend_independent
def test_repairable_flag_matches_what_repair_does(tmp_path) -> None:
    """Every finding check marks repairable is gone after repair (on the hostile cases that repair cleans)."""
    for c in CASES:
        d = tmp_path / str(CASES.index(c))
        d.mkdir()
        t = c.make(d)
        if t.error is not None and not t.repairs_to_clean:
            continue
        rep = check(t.path, parent_dirs=t.parent_dirs)
        fixable = {(f.code, f.path) for f in rep.findings if f.repairable}
        after = repair(t.path, parent_dirs=t.parent_dirs)
        left = {(f.code, f.path) for f in after.remaining}
        if t.repairs_to_clean:
            assert fixable and not (fixable & left), (c.name, fixable, left)


def test_a_path_swapped_after_its_check_is_refused(tmp_path, monkeypatch) -> None:
    # The race: a candidate is checked by path, then opened by path; someone renames a directory in between
    # so that the open lands outside. Simulated by blinding the check (realpath stops resolving symlinks):
    # what the descriptor really opened must still be refused.
    from support.hostile.cases import _escape, _u16

    t = _escape(tmp_path, [(b"W2ru", _u16(".\\parent.vhd"))])
    os.symlink(tmp_path / "outside" / "parent.vhd", tmp_path / "child" / "parent.vhd")
    monkeypatch.setattr(os.path, "realpath", os.path.abspath)
    with pytest.raises(ParentNotFoundError) as ei:
        vhdcore.open(t.path).close()
    assert any("the path changed while it was checked; refused" in entry for entry in ei.value.tried), ei.value.tried
    # and a resolver that hands over such a path (as --force parent-id's handler could) is refused on open
    from vhdcore.disk.chain import open_layers

    with pytest.raises(ParentNotFoundError, match="outside the allowed directories"):
        open_layers(t.path, resolver=lambda child, allowed: str(tmp_path / "child" / "parent.vhd"))

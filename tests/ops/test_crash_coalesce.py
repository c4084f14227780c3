"""Coalesce killed at every write: the chain reads as before, the target stays sound, a rerun finishes the job.

Three kinds of death, through the fault-injection point of vhdcore.fileio.WriteIO (VHDCORE_FAULT_*):

* SIGKILL of a ``python -m vhdcore coalesce`` subprocess just before its N-th write (and, for the merge's writes,
  after writing half of it: a torn write), for every N of a run;
* an I/O error on the N-th write, in process;
* a power cut: a run records its writes and syncs, and the test rebuilds the files a power cut could leave at
  each sync, with any subset of the writes not yet synced applied (the metadata-only subset is the one that
  would expose a BAT entry over unwritten data);
* SIGKILL after random delays once the target started to grow.

After each: the leaf (and a grandchild) read exactly as before; the target passes ``vhdcore.check`` (information
findings such as unused space allowed, nothing else); every sector of the target's own view is either what it
was or what it must become; and coalescing again completes with the right content, relinks and removes.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhdcore
from vhdcore.ops.check import INFO, check
from vhdcore.ops.coalesce import coalesce
from vhdcore.fileio import read_record
from vhdcore.ops.coalesce.relink import read_journal

from support.coalesce import content, layered_chain, sectors_old_or_new
from support.vhdtest import MiB, random_writes

BS = 512 * 1024


def _scenario(d: Path, target: str, grandchild: bool) -> dict:
    parent, child, model = layered_chain(d, block_size=BS, nblocks=12, target=target, seed=4)
    s = {"parent": parent.name, "child": child.name, "model": bytes(model), "parent_view": content(parent)}
    if grandchild:
        gm = bytearray(model)
        with vhdcore.snapshot(child, d / "grand.vhd") as g:
            random_writes(g, gm, random.Random(8), 6)
        s["grand_view"] = bytes(gm)
    return s


@pytest.fixture(scope="module", params=["dynamic", "differencing", "fixed"])
def pristine(request, tmp_path_factory) -> tuple[Path, dict, str]:
    d = tmp_path_factory.mktemp(f"pristine-{request.param}")
    return d, _scenario(d, request.param, grandchild=request.param != "fixed"), request.param


def _fresh(pristine_dir: Path, where: Path) -> Path:
    if where.exists():
        shutil.rmtree(where)
    shutil.copytree(pristine_dir, where)
    return where


def _assert_sound(d: Path, s: dict, removed_ok: bool = False) -> None:
    """What must hold at any instant of a coalesce."""
    child, parent = d / s["child"], d / s["parent"]
    if child.exists():
        assert content(child) == s["model"], "the child's view changed"
    else:
        assert removed_ok
    if "grand_view" in s:
        assert content(d / "grand.vhd") == s["grand_view"], "the grandchild's view changed"
    rep = check(parent)
    # A batch's data lands before its bitmap bits (crash order): until they are set, check sees that data under
    # clear bits (BITMAP_CLEAR_DATA) and every reader still gets the old content, which the lines below verify.
    bad = [str(f) for f in rep.findings if f.severity != INFO and f.code != "BITMAP_CLEAR_DATA"]
    assert not bad, bad
    now = content(parent)  # opened strictly: BAT past EOF or overlapping blocks would raise
    wrong = sectors_old_or_new(now, s["parent_view"], s["model"])
    assert len(wrong) == 0, f"target sectors neither old nor new: {wrong[:10]}"


def _assert_rerun_completes(d: Path, s: dict, remove_child: bool) -> None:
    child, parent = d / s["child"], d / s["parent"]
    if child.exists():
        coalesce(child, remove_child=remove_child, batch_bytes=BS)
        assert content(parent) == s["model"]
        if remove_child:
            assert not child.exists()
    assert content(parent) == s["model"]
    assert check(parent).clean or not [f for f in check(parent).findings if f.severity != INFO]
    if "grand_view" in s:
        assert content(d / "grand.vhd") == s["grand_view"]
        if remove_child:
            with vhdcore.open(d / "grand.vhd") as g:
                assert g.layers[1].path == str(parent)
            assert check(d / "grand.vhd", chain=True).clean
    assert not (d / f".{s['child']}.coalesce").exists() or child.exists()


def _count_writes(pristine_dir: Path, s: dict, work: Path, remove_child: bool) -> tuple[int, int]:
    """(an upper bound of the writes of the whole run, the writes of its merge phase), from an undisturbed run."""
    d = _fresh(pristine_dir, work / "count")
    rep = coalesce(d / s["child"], remove_child=remove_child, batch_bytes=BS)
    merge_writes = rep.writes  # counted before relinking
    # relinking: up to one write per locator (3) and the header, per grandchild
    return merge_writes + 4 * len(rep.relinked) + 1, merge_writes


def _run_killed(d: Path, s: dict, n: int, action: str, remove_child: bool) -> int:
    """coalesce in a forked process (a fresh interpreter per point would cost 0.3 s each) that the fault
    injection kills at its n-th write; returns its exit status, -SIGKILL when killed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child process
        code = 1
        try:
            os.environ.update(VHDCORE_FAULT_AFTER_WRITES=str(n), VHDCORE_FAULT_ACTION=action)
            coalesce(d / s["child"], remove_child=remove_child, batch_bytes=BS)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_sigkill_at_every_write(pristine, tmp_path) -> None:
    pdir, s, target = pristine
    remove_child = "grand_view" in s
    total, merge_writes = _count_writes(pdir, s, tmp_path, remove_child)
    assert merge_writes >= 8
    killed = 0
    # every write of the run (relinking included), plus one past the end (no crash at all)
    for n in range(1, total + 15):
        action = "torn" if n <= merge_writes and n % 2 == 0 else "kill"
        d = _fresh(pdir, tmp_path / "run")
        rc = _run_killed(d, s, n, action, remove_child)
        if rc == -signal.SIGKILL:
            killed += 1
            _assert_sound(d, s)
        else:
            assert rc == 0
            assert content(d / s["parent"]) == s["model"]
        _assert_rerun_completes(d, s, remove_child)
        if rc == 0:
            break
    assert killed >= merge_writes


def test_eio_at_every_write(pristine, tmp_path, monkeypatch) -> None:
    pdir, s, target = pristine
    remove_child = "grand_view" in s
    total, _ = _count_writes(pdir, s, tmp_path, remove_child)
    failed = 0
    for n in range(1, total + 15):
        d = _fresh(pdir, tmp_path / "run")
        monkeypatch.setenv("VHDCORE_FAULT_AFTER_WRITES", str(n))
        try:
            coalesce(d / s["child"], remove_child=remove_child, batch_bytes=BS)
        except OSError as e:
            assert "injected fault" in str(e)
            failed += 1
            done = False
        else:
            done = True
        monkeypatch.delenv("VHDCORE_FAULT_AFTER_WRITES")
        if not done:
            _assert_sound(d, s)
        _assert_rerun_completes(d, s, remove_child)
        if done:
            break
    assert failed >= total - 2


def _replay_states(record: list, files: dict[str, bytes]):
    """Files a power cut could leave: at each sync (and at the end), everything synced before it on each file,
    plus several subsets of the writes not yet synced (in their order)."""
    syncs = [i for i, op in enumerate(record) if op[0] == "S"] + [len(record)]
    rnd = random.Random(3)
    for cut in syncs:
        durable: set[int] = set()
        for f in files:
            last = max([i for i in range(cut) if record[i][0] == "S" and record[i][1] == f], default=-1)
            durable |= {i for i in range(last) if record[i][1] == f and record[i][0] != "S"}
        pending = [i for i in range(cut) if record[i][0] != "S" and i not in durable]
        subsets = {"none": [], "all": pending,
                   "metadata only": [i for i in pending if len(record[i][3]) <= 4096 and record[i][0] == "W"],
                   "data only": [i for i in pending if len(record[i][3]) > 4096 or record[i][0] == "T"]}
        for k in range(3):
            subsets[f"random {k}"] = [i for i in pending if rnd.random() < 0.5]
        for name, sub in subsets.items():
            chosen = sorted(durable | set(sub))
            state = {f: bytearray(b) for f, b in files.items()}
            for i in chosen:
                kind, f, off, data = record[i]
                buf = state[f]
                if kind == "W":
                    if len(buf) < off + len(data):
                        # Bytes nobody wrote read as a marker, not zeros: a BAT entry or bitmap bit over data
                        # that was not yet written then reads as neither the old nor the new content.
                        buf.extend(b"\xee" * (off + len(data) - len(buf)))
                    buf[off : off + len(data)] = data
                elif kind == "T":
                    del buf[off:]
                    buf.extend(bytes(max(0, off - len(buf))))
            yield cut, name, state


def test_power_cut_states(pristine, tmp_path, monkeypatch) -> None:
    pdir, s, target = pristine
    remove_child = "grand_view" in s
    d = _fresh(pdir, tmp_path / "rec")
    log = tmp_path / "record.bin"
    monkeypatch.setenv("VHDCORE_FAULT_RECORD", str(log))
    coalesce(d / s["child"], remove_child=False, batch_bytes=BS)
    monkeypatch.delenv("VHDCORE_FAULT_RECORD")
    record = [(k, os.path.basename(p), off, data) for k, p, off, data in read_record(str(log))]
    assert sum(1 for op in record if op[0] == "S") >= 2 or target == "fixed"
    names = {op[1] for op in record}
    files = {f: (pdir / f).read_bytes() for f in names}
    seen = 0
    for cut, name, state in _replay_states(record, files):
        w = _fresh(pdir, tmp_path / "state")
        for f, b in state.items():
            (w / f).write_bytes(bytes(b))
        try:
            _assert_sound(w, s)
        except AssertionError as e:
            raise AssertionError(f"power cut at record {cut}, {name} of the pending writes: {e}") from None
        seen += 1
        if seen % 7 == 0:  # a sample of the states: a rerun completes from them too
            _assert_rerun_completes(w, s, remove_child)
    assert seen >= 7


@pytest.mark.parametrize("seed", range(2))
def test_sigkill_at_random_moments(tmp_path, seed) -> None:
    """A bigger chain, killed at a random instant once the target file starts to change."""
    d = tmp_path / "c"
    d.mkdir()
    parent, child, model = layered_chain(d, block_size=2 * MiB, nblocks=24, seed=seed)
    s = {"parent": parent.name, "child": child.name, "model": bytes(model), "parent_view": content(parent)}
    st0 = parent.stat()
    p = subprocess.Popen([sys.executable, "-m", "vhdcore", "coalesce", str(child), "--progress", "none"],
                         stdout=subprocess.DEVNULL)
    rnd = random.Random(seed)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and p.poll() is None:
        st = parent.stat()
        if (st.st_size, st.st_mtime_ns) != (st0.st_size, st0.st_mtime_ns):
            break
        time.sleep(0.0005)
    time.sleep(rnd.uniform(0, 0.05))
    p.send_signal(signal.SIGKILL)
    p.wait()
    _assert_sound(d, s)
    _assert_rerun_completes(d, s, False)


def test_relink_header_torn_by_a_crash_is_mended_by_the_rerun(pristine, tmp_path) -> None:
    # The 1024-byte header of a relinked grandchild is one write across two sectors; a power cut can leave one
    # sector new and one old (a bad checksum). The journal holds every relink's bytes before the first write,
    # so the rerun rewrites the header whole.
    pdir, s, _ = pristine
    if "grand_view" not in s:
        pytest.skip("no grandchild in this scenario")
    total, merge_writes = _count_writes(pdir, s, tmp_path, True)
    torn_headers = 0
    for n in range(merge_writes + 1, total + 1):
        d = _fresh(pdir, tmp_path / "run")
        if _run_killed(d, s, n, "torn", True) != -signal.SIGKILL:
            continue
        try:
            view = content(d / "grand.vhd")
        except vhdcore.VHDError as exc:  # only a header the journal can rewrite may be unreadable
            assert "checksum" in str(exc), exc
            rec = read_journal(str(d / s["child"]))
            assert rec and str(d / "grand.vhd") in [r["path"] for r in rec["relinks"]]
            torn_headers += 1
        else:
            assert view == s["grand_view"]
        _assert_rerun_completes(d, s, True)
    assert torn_headers >= 1  # the case this test is about did happen

"""vhdcore repair: torn footers from crashes during block allocation (every write step, torn at sector
boundaries, and real SIGKILLs), trailing bytes, footer copies, checksums on request, undo."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import vhdcore
from vhdcore.cli import main as cli
from vhdcore.ops.check import INFO, analyse_file, check
from vhdcore.exceptions import InvalidFormatError
from vhdcore.disk.image import Image
from vhdcore.ops.repair import plan, repair, undo

from support.hostile import build as B
from support.vhdtest import MiB

SECTOR = 512


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _content(path: Path, parent_dirs=None) -> bytes:
    with vhdcore.open(path, parent_dirs=parent_dirs) as d:
        return d.read(0, d.size)


# --------------------------------------------------------------------------------------------- fault injection


def record_writes(path: Path, action, monkeypatch, parent_dirs=None) -> list[tuple[str, int, bytes]]:
    """Run ``action(disk)`` on ``path`` opened "r+", recording every write and truncate of the leaf, in order."""
    ops: list[tuple[str, int, bytes]] = []
    real_ftruncate = os.ftruncate
    with vhdcore.open(path, "r+", parent_dirs=parent_dirs) as disk:
        img = disk.leaf
        real_pwrite = img.pwrite

        def pwrite(offset, data):
            bufs = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
            blob = b"".join(bytes(b) for b in bufs)
            ops.append(("write", offset, blob))
            real_pwrite(offset, blob)

        def ftruncate(fd, n):
            if fd == img.fd:
                ops.append(("truncate", n, b""))
            real_ftruncate(fd, n)

        img.pwrite = pwrite
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        try:
            action(disk)
        finally:
            monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    return ops


def crash_states(ops):
    """(label, ops applied whole, torn op or None, sectors of it that landed) for every point a crash can hit.
    A torn write lands a prefix of whole sectors: a sector is the unit a disk writes atomically."""
    for k in range(len(ops) + 1):
        yield f"after {k} of {len(ops)} writes", ops[:k], None, 0
        if k < len(ops) and ops[k][0] == "write":
            n = len(ops[k][2]) // SECTOR
            for j in sorted({1, n // 2, n - 1} - {0, n}):
                yield f"after {k} writes and {j}/{n} sectors of the next", ops[:k], ops[k], j


def apply_state(original: bytes, dst: Path, done, torn, sectors: int) -> None:
    dst.write_bytes(original)
    with open(dst, "r+b") as f:
        for kind, off, data in done:
            if kind == "write":
                f.seek(off)
                f.write(data)
            else:
                f.truncate(off)
        if torn is not None:
            f.seek(torn[1])
            f.write(torn[2][: sectors * SECTOR])


def assert_each_sector_old_or_new(got: bytes, old: bytes, new: bytes, lo: int, hi: int, label: str) -> None:
    assert len(got) == len(old) == len(new)
    assert got[:lo] == old[:lo] and got[hi:] == old[hi:], f"{label}: data outside the write changed"
    for s in range(lo, hi, SECTOR):
        g = got[s : s + SECTOR]
        assert g == old[s : s + SECTOR] or g == new[s : s + SECTOR], f"{label}: sector at {s} is neither"


SCENARIOS = {
    # name: (base type, write offset, write length, allocates)
    "dynamic: one new block": ("dynamic", 3 * 256 * 1024 + 1000, 5000, True),
    "dynamic: write over two new blocks": ("dynamic", 6 * 256 * 1024 - 2048, 300 * 1024, True),
    "differencing: new block in the child": ("differencing", 9 * 256 * 1024 + 512, 4096, True),
    "differencing: existing child block, new sectors": ("differencing", 1 * 256 * 1024 + 200 * 1024, 8192, False),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_crash_at_every_step_of_a_write(tmp_path, monkeypatch, scenario) -> None:
    kind, off, n, allocates = SCENARIOS[scenario]
    rnd = random.Random(scenario)
    size = 4 * MiB
    base = tmp_path / "base.vhd"
    with vhdcore.create(base, size, block_size=256 * 1024) as d:
        d.write(0, rnd.randbytes(300 * 1024))
        d.write(2 * MiB, rnd.randbytes(70_000))
    disk = base
    if kind == "differencing":
        disk = tmp_path / "child.vhd"
        with vhdcore.snapshot(base, disk) as d:
            d.write(1 * 256 * 1024 + 4096, rnd.randbytes(8192))  # block 1 of the child: some sectors present
    old = _content(disk)
    original = disk.read_bytes()
    data = rnd.randbytes(n)
    work = tmp_path / "work.vhd"
    work.write_bytes(original)
    ops = record_writes(work, lambda dk: dk.write(off, data), monkeypatch, parent_dirs=[tmp_path])
    assert ops, "the write did nothing?"
    new = bytearray(old)
    new[off : off + n] = data
    lo, hi = off - off % SECTOR, -(-(off + n) // SECTOR) * SECTOR

    crashed = tmp_path / disk.name  # same name and directory as the real disk, so the child finds its parent
    states = repaired = 0
    for label, done, torn, sectors in crash_states(ops):
        states += 1
        os.replace(disk, tmp_path / "keep.vhd")
        try:
            apply_state(original, crashed, done, torn, sectors)
            rep = repair(crashed)
            repaired += rep.changed
            # A crash between a write's data and its bitmap leaves the unacknowledged data under clear bits:
            # check says so, repair leaves it (only --set-bitmap-bits would expose it), reads give the old content.
            left = [f for f in rep.remaining if f.severity != INFO]
            assert all(f.code == "BITMAP_CLEAR_DATA" for f in left), (label, rep.actions, [str(f) for f in left])
            assert not left or not allocates, label
            assert {f.code for f in check(crashed, chain=True).findings if f.severity != INFO} <= {
                "BITMAP_CLEAR_DATA"}, label
            got = _content(crashed)
            assert_each_sector_old_or_new(got, old, bytes(new), lo, hi, label)
            if not done and torn is None:
                assert got == old
            if len(done) == len(ops):
                assert got == bytes(new), label
            with vhdcore.open(crashed, "r+") as dk:  # and it takes the next write
                dk.write(0, b"after the crash" * 10)
        finally:
            os.replace(tmp_path / "keep.vhd", disk)
    assert states >= len(ops) + 1
    if allocates:
        # Crashes between writing the block and writing the new footer leave the footer torn.
        assert repaired >= 1, "no crash point needed a repair: the injection did not reach a block allocation"
    else:
        assert repaired == 0, "data then bitmap into an existing block never needs a repair"


# --------------------------------------------------------------------------------------------- SIGKILL

WRITER = textwrap.dedent("""
    import os, random, sys
    import vhdcore
    path, log, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rnd = random.Random(seed)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with vhdcore.open(path, "r+") as d:
        print("ready", flush=True)
        while True:
            n = rnd.randrange(1, 20_000)
            off = rnd.randrange(0, d.size - n)
            s = rnd.randrange(1 << 30)
            os.write(fd, f"I {off} {n} {s}\\n".encode())
            d.write(off, random.Random(s).randbytes(n))
            # A killed process loses nothing it wrote (the page cache keeps it), so every completed write counts
            # as done and no flush is needed: fsync time would only keep kills away from the writes.
            os.write(fd, b"D\\n")
""")


def _read_log(log: Path) -> tuple[list[tuple[int, int, int]], tuple[int, int, int] | None]:
    """The writes the log says completed, in order, and the one in flight when the writer died (if any)."""
    done: list[tuple[int, int, int]] = []
    pending = None
    for line in log.read_text().splitlines():
        parts = line.split()
        if parts[0] == "I":
            pending = tuple(int(x) for x in parts[1:])
        elif parts[0] == "D" and pending is not None:
            done.append(pending)
            pending = None
    return done, pending


def _expected_blocks(writes, block: int) -> dict[int, bytearray]:
    """Expected content of every block a write touched (the rest of the disk reads as zeros)."""
    out: dict[int, bytearray] = {}
    for off, n, s in writes:
        data = random.Random(s).randbytes(n) if s >= 0 else bytes([-s]) * n
        for b in range(off // block, (off + n - 1) // block + 1):
            buf = out.setdefault(b, bytearray(block))
            lo, hi = max(off, b * block), min(off + n, (b + 1) * block)
            buf[lo - b * block : hi - b * block] = data[lo - off : hi - off]
    return out


ROUNDS = 12
WANTED_HITS = 3
BLOCK = 2 * MiB


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_sigkill_during_writes(tmp_path, kind) -> None:
    """A writer SIGKILLed at random times: repair + check give a clean file, every completed write intact and
    the one in flight either there or not, sector by sector. 2 MiB blocks over a 1 GiB disk and small writes:
    almost every write allocates, and writing 2 MiB of new file space takes far longer than the rest of the
    loop, so most kills land inside a block allocation."""
    size = 1024 * MiB
    base = tmp_path / "base.vhd"
    base_writes = [(0, 200_000, -0x11), (700 * MiB + 5, 3000, -0x22)]  # seed < 0: a constant byte
    with vhdcore.create(base, size, block_size=BLOCK) as d:
        for off, n, s in base_writes:
            d.write(off, bytes([-s]) * n)
    log = tmp_path / "log"
    rnd = random.Random(kind)
    hits = rounds = 0
    while rounds < ROUNDS and hits < WANTED_HITS:
        rounds += 1
        if kind == "dynamic":
            disk = tmp_path / f"disk{rounds}.vhd"
            shutil.copy(base, disk)
            prior = list(base_writes)
        else:
            disk = tmp_path / f"child{rounds}.vhd"
            vhdcore.snapshot(base, disk).close()
            prior = list(base_writes)
        log.write_text("")
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(disk), str(log), str(rnd.randrange(1 << 30))],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rnd.uniform(0.005, 0.05))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        done, inflight = _read_log(log)
        rep = repair(disk)
        hits += rep.changed
        # A kill between a write's data and its bitmap bits leaves that data under clear bits (BITMAP_CLEAR_DATA,
        # as in test_crash_at_every_step_of_a_write): readers get the old content, which the checks below verify.
        left = [str(f) for f in rep.remaining if f.severity != INFO and f.code != "BITMAP_CLEAR_DATA"]
        assert not left, left
        assert {f.code for f in check(disk, chain=True).findings if f.severity != INFO} <= {"BITMAP_CLEAR_DATA"}
        old = _expected_blocks(prior + done, BLOCK)
        new = _expected_blocks(prior + done + ([inflight] if inflight else []), BLOCK)
        with vhdcore.open(disk) as d:
            for ext in d.allocated_extents():  # nothing allocated outside the blocks the writes touched
                assert ext.offset // BLOCK in new and (ext.end - 1) // BLOCK in new, ext
            for b in sorted(new):
                got = d.read(b * BLOCK, BLOCK)
                want_old = bytes(old.get(b, bytearray(BLOCK)))
                if inflight is None or got == want_old:
                    assert got == want_old, f"round {rounds}: block {b} lost completed writes"
                    continue
                off, n, _s = inflight
                lo = max(0, off - b * BLOCK) // SECTOR * SECTOR
                hi = min(BLOCK, -(-(off + n - b * BLOCK) // SECTOR) * SECTOR)
                assert_each_sector_old_or_new(got, want_old, bytes(new[b]), lo, hi, f"round {rounds} block {b}")
    print(f"{kind}: {hits} of {rounds} kills landed inside a block allocation and needed a repair")
    assert hits >= 1, "no kill landed inside a block allocation"


# --------------------------------------------------------------------------------------------- other repairs


def test_dry_run_changes_nothing(tmp_path, capsys) -> None:
    lay = B.build(tmp_path / "d.vhd", blocks=(0, 2))
    B.truncate(lay, lay.footer_offset + 100)  # torn footer
    before = _sha(lay.path)
    rep = repair(lay.path, dry_run=True)
    assert _sha(lay.path) == before and not rep.changed and rep.undo_path is None
    assert [a.code for a in rep.actions] == ["RESTORE_FOOTER"]
    assert rep.clean  # predicted
    assert cli.main(["repair", "--dry-run", str(lay.path)]) == 0
    out = capsys.readouterr().out
    assert f"would: write the footer copy from offset 0 at {lay.footer_offset}" in out
    assert _sha(lay.path) == before


def test_cli_repair_and_undo(tmp_path, capsys) -> None:
    lay = B.build(tmp_path / "d.vhd", blocks=(1,))
    with open(lay.path, "ab") as f:
        f.write(b"junk" * 1000)
    before = _sha(lay.path)
    assert cli.main(["repair", "--json", str(lay.path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["changed"] and doc["clean"] and [a["code"] for a in doc["actions"]] == ["TRUNCATE"]
    assert os.path.getsize(lay.path) == lay.file_size
    undo_file = doc["undo_path"]
    # The undo file holds the 4000 cut bytes.
    assert os.path.getsize(undo_file) >= 4000
    assert cli.main(["repair", str(lay.path), "--undo", undo_file]) == 0
    assert _sha(lay.path) == before
    assert cli.main(["repair", str(lay.path)]) == 0
    out = capsys.readouterr().out
    assert "did: cut the 4000 bytes after the footer" in out and "vhdcore repair" in out and "--undo" in out


def test_checksums_only_on_request(corpus_dir, tmp_path) -> None:
    expected = json.loads((corpus_dir / "expected.json").read_text())
    for name in ("image.vhd", "image-differential.vhd"):
        shutil.copy(corpus_dir / "dfvfs" / name, tmp_path / name)
    p = tmp_path / "image.vhd"
    before = _sha(p)
    rep = repair(p)
    assert not rep.changed and not rep.clean and _sha(p) == before
    assert any("--fix-checksums" in why for why in rep.not_repaired)
    rep = repair(p, fix_checksums=True)
    assert rep.changed and rep.clean, (rep.actions, rep.not_repaired)
    assert [a.code for a in rep.actions] == ["FIX_FOOTER_CHECKSUM", "REWRITE_FOOTER_COPY"]
    with vhdcore.open(p) as d:  # strict open works now, same content
        assert hashlib.sha256(d.read(0, d.size)).hexdigest() == expected["dfvfs/image.vhd"]["sha256"]
    child = tmp_path / "image-differential.vhd"
    rep = repair(child, fix_checksums=True)
    assert rep.clean, [str(f) for f in rep.remaining]
    assert {a.code for a in rep.actions} == {"FIX_FOOTER_CHECKSUM", "REWRITE_FOOTER_COPY", "FIX_HEADER_CHECKSUM"}
    assert check(child, chain=True).clean
    with vhdcore.open(child) as d:
        assert hashlib.sha256(d.read(0, d.size)).hexdigest() == expected["dfvfs/image-differential.vhd"]["sha256"]


def test_refuses_when_the_bat_is_damaged(tmp_path) -> None:
    lay = B.build(tmp_path / "d.vhd", blocks=(0, 1))
    B.set_bat(lay, 3, 0x00200000)  # past EOF
    B.truncate(lay, lay.footer_offset)  # and the footer lost
    before = _sha(lay.path)
    rep = repair(lay.path)
    assert not rep.changed and not rep.clean and _sha(lay.path) == before
    assert any("BAT_ENTRY_PAST_EOF" in why for why in rep.not_repaired)


def test_interrupted_repair_finishes_on_rerun(tmp_path) -> None:
    """A crash after the restored footer was written but before the cut: the next repair finishes the job."""
    lay = B.build(tmp_path / "d.vhd", blocks=(0, 3))
    old = _content(lay.path)
    with open(lay.path, "r+b") as f:  # a half-written block after the last one, footer gone
        f.seek(lay.footer_offset)
        f.write(os.urandom(100_000))
    actions, _ = plan(analyse_file(str(lay.path)))
    assert [a.code for a in actions] == ["RESTORE_FOOTER", "TRUNCATE"]
    with open(lay.path, "r+b") as f:
        f.seek(actions[0].offset)
        f.write(actions[0].data)
    rep = check(lay.path)
    assert rep.codes() == {"FILE_TRAILING_DATA"}
    rep = repair(lay.path)
    assert rep.clean and os.path.getsize(lay.path) == lay.file_size
    assert _content(lay.path) == old


def test_legacy_footer_copy_rewritten_as_512_bytes(tmp_path) -> None:
    lay = B.build(tmp_path / "d.vhd", blocks=(0,))
    B.truncate(lay, lay.file_size - 1)  # 511-byte footer: valid
    buf = B.read(lay.path)
    buf[:512] = bytes(512)  # and the copy lost
    B.write(lay.path, buf)
    rep = repair(lay.path)
    assert rep.clean and [a.code for a in rep.actions] == ["REWRITE_FOOTER_COPY"]
    assert B.read(lay.path)[:511] == B.read(lay.path)[-511:]


def test_repair_of_fixed_disk_trailing_bytes(tmp_path) -> None:
    lay = B.build(tmp_path / "f.vhd", size=2 * MiB, disk_type=B.DiskType.FIXED)
    with open(lay.path, "r+b") as f:
        f.write(b"guest data")
    with open(lay.path, "ab") as f:
        f.write(b"x" * 10_000)
    rep = repair(lay.path)
    assert rep.clean and os.path.getsize(lay.path) == 2 * MiB + 512
    assert _content(lay.path)[:10] == b"guest data"
    undo(rep.undo_path, lay.path)
    assert os.path.getsize(lay.path) == 2 * MiB + 512 + 10_000


def test_set_bitmap_bits_on_many_blocks_is_undone_exactly(tmp_path) -> None:
    """One undo record per bitmap set: more than the 64 records an undo file once held, all put back."""
    p = tmp_path / "many.vhd"
    bs = 64 * 1024
    with vhdcore.create(p, 8 * MiB, block_size=bs) as d:
        for b in range(100):
            d.write(b * bs, b"w" * SECTOR)  # vhdcore sets exactly this sector's bit
    with Image(str(p)) as im:
        starts = [int(im.bat[b]) * SECTOR for b in range(100)]
    fd = os.open(p, os.O_RDWR)
    try:
        for s in starts:  # data behind clear bits, as the old writer left it
            os.pwrite(fd, b"\x01" * SECTOR, s + SECTOR + 5 * SECTOR)
    finally:
        os.close(fd)
    original = p.read_bytes()
    a = analyse_file(str(p))
    assert len(a.clear_data) == 100 and sum(n for _b, _s, n in a.clear_data) == 100
    assert sum(f.code == "BITMAP_CLEAR_DATA" for f in a.findings) == 20  # listed; the rest summarised
    rep = repair(p, set_bitmap_bits=True)
    assert rep.changed and rep.clean and len(rep.actions) == 100
    with vhdcore.open(p) as d:
        assert all(d.read(b * bs + 5 * SECTOR, SECTOR) == b"\x01" * SECTOR for b in range(100))
    undo(rep.undo_path, p)
    assert p.read_bytes() == original


def test_undo_file_claiming_more_records_than_it_holds_is_refused(tmp_path) -> None:
    lay = B.build(tmp_path / "d.vhd")
    u = tmp_path / "bad.undo"
    u.write_bytes(struct.pack(">8sIQQIQ16s16s", b"VHDCUNDO", 2, 4096, 0, 10_000, 4096, bytes(16), bytes(16))
                  + bytes(64))
    with pytest.raises(InvalidFormatError) as e:
        undo(u, lay.path)
    assert e.value.field == "record count"

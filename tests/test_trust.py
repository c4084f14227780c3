"""Issue 11: nothing a file or a URL names is trusted. One regression test per reproduced case: journals, shared
parents, the snapshot lock, temporary names, device destinations, object URLs, archive bombs, --ignore-checksums,
undo files, leftovers after crashes; and an audit hook proving where coalesce, export and repair write."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

import vhdcore
from vhdcore.ops.coalesce import coalesce
from vhdcore.exceptions import CorruptImageError

from support.coalesce import content
from support.vhdtest import MiB, build_chain, file_sha256


def _bat_offset(path: Path) -> int:
    from vhdcore.disk.image import Image
    with Image(path, "r") as img:
        return img.header.table_offset


# --------------------------------------------------------------------------------------------- 8. --ignore-checksums


def test_ignore_checksums_keeps_the_bat_overlap_check(tmp_path) -> None:
    paths, _ = build_chain(tmp_path, 2, size=4 * MiB, block_size=512 * 1024, writes=20, seed=8)
    base, child = paths
    to = _bat_offset(base)
    raw = bytearray(base.read_bytes())
    bat = struct.unpack_from(">8I", raw, to)
    used = [e for e in bat if e != 0xFFFFFFFF]
    assert len(used) >= 2
    struct.pack_into(">I", raw, to + 4 * bat.index(used[1]), used[0])  # two entries share one block's storage
    base.write_bytes(raw)
    before = {p: file_sha256(p) for p in paths}
    for strict in (True, False):
        with pytest.raises(vhdcore.VHDError, match="overlap"):
            coalesce(child, strict=strict)
    assert {p: file_sha256(p) for p in paths} == before


# --------------------------------------------------------------------------------------------- 6. object URLs


@pytest.mark.backend_independent
@pytest.mark.parametrize("url", [
    "swift://images/../backups/important.vhd", "swift://../x.vhd", "swift://images/a/%2F..%2Fb.vhd",
    "swift://images/%2e%2e/backups/x.vhd", "swift://images/a//b.vhd", "swift://images/./x.vhd",
    "swift://images/x.vhd/", "swift://images/a%2fb.vhd", "swift://images/" + "n" * 1025, "swift://" + "c" * 257 + "/x",
    "swift://images/a\x00b", "s3://bucket/../x.vhd", "s3://Bad_Bucket/x.vhd", "s3://bucket/%2F..%2Fx",
    "s3://b/x.vhd", "s3://bucket/", "swift://./x.vhd",
])
def test_hostile_object_urls_refused_before_any_request(url, monkeypatch, capsys) -> None:
    from vhdcore.delivery.upload import ObjectNameError, open_sink, parse_destination
    from vhdcore.delivery.upload.s3 import S3Sink
    from vhdcore.delivery.upload.swift import SwiftSink

    def no_request(*a, **k):
        raise AssertionError("a request was made")

    monkeypatch.setattr(SwiftSink, "_conn", no_request)
    monkeypatch.setattr(S3Sink, "_ensure_bucket", no_request)
    monkeypatch.setenv("ST_AUTH", "http://127.0.0.1:9/auth/v1.0")
    monkeypatch.setenv("ST_USER", "u")
    monkeypatch.setenv("ST_KEY", "k")
    with pytest.raises(ValueError):
        parse_destination(url)
    with pytest.raises(ValueError):
        open_sink(url, client=object()) if url.startswith("s3") else open_sink(url)
    if "%" not in url and url.count("://") == 1 and "/" in url.split("://", 1)[1]:
        container, _, name = url.split("://", 1)[1].partition("/")
        cls = S3Sink if url.startswith("s3") else SwiftSink
        with pytest.raises(ObjectNameError):
            cls(container, name, client=object()) if cls is S3Sink else cls(container, name)


@pytest.mark.backend_independent
def test_ordinary_object_urls_still_parse() -> None:
    from vhdcore.delivery.upload import parse_destination
    assert parse_destination("swift://images/srv1/disk%20a.vhd") == ("swift", "images", "srv1/disk a.vhd")
    assert parse_destination("s3://my-bucket.x/a/b.vhd.zst") == ("s3", "my-bucket.x", "a/b.vhd.zst")


# --------------------------------------------------------------------------------------------- 9. undo files


@pytest.mark.backend_independent
def test_an_undo_file_refuses_another_disk(tmp_path) -> None:
    from support.hostile import build as B
    from vhdcore.exceptions import UnsafeOperationError
    from vhdcore.ops.repair import repair, undo

    a = B.build(tmp_path / "a.vhd", blocks=(1,))
    b = B.build(tmp_path / "b.vhd", blocks=(1, 2))
    for lay, junk in ((a, b"a" * 100_000), (b, b"b" * 3000)):
        with open(lay.path, "ab") as f:
            f.write(junk)
    a_before = file_sha256(a.path)
    rep_a = repair(a.path)
    repair(b.path)
    b_repaired = file_sha256(b.path)
    with pytest.raises(UnsafeOperationError, match="another disk"):
        undo(rep_a.undo_path, b.path)  # was: cut b to a's length and wrote a's bytes into it
    assert file_sha256(b.path) == b_repaired
    # The same disk grown since the repair (a writer appended a block): refused too, nothing written.
    size = os.path.getsize(a.path)
    with open(a.path, "ab") as f:
        f.write(b"x" * 512)
    with pytest.raises(UnsafeOperationError, match="changed since"):
        undo(rep_a.undo_path, a.path)
    os.truncate(a.path, size)
    undo(rep_a.undo_path, a.path)
    assert file_sha256(a.path) == a_before


# --------------------------------------------------------------------------------------------- 4. temp names


@pytest.mark.backend_independent
def test_planted_symlinks_for_the_manifest_temp_name_are_never_followed(tmp_path) -> None:
    from vhdcore.destination import DestinationError
    from vhdcore.delivery.export import export

    (tmp_path / "chain").mkdir()
    (tmp_path / "out").mkdir()
    paths, _ = build_chain(tmp_path / "chain", 2, size=2 * MiB, block_size=512 * 1024, writes=5, seed=4)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    dest = tmp_path / "out" / "d.vhd"
    # The old name was DEST.xxh3.json.tmp-<pid>: plant links for the next pids (and ours).
    for pid in range(os.getpid(), os.getpid() + 200):
        os.symlink(victim, f"{dest}.xxh3.json.tmp-{pid}")
    rep = export(paths[-1], dest, fsync=False)
    assert victim.read_bytes() == b"precious"
    assert os.path.isfile(rep.manifest_path) and not os.path.islink(rep.manifest_path)
    # --manifest naming a disk of the chain is refused whatever --overwrite says, before anything is written.
    before = file_sha256(paths[0])
    for overwrite, why in ((False, "exists"), (True, "file of the source chain")):
        with pytest.raises(DestinationError, match=why):
            export(paths[-1], tmp_path / "out" / "e.vhd", manifest=paths[0], overwrite=overwrite, fsync=False)
    assert file_sha256(paths[0]) == before and not (tmp_path / "out" / "e.vhd").exists()
    # An existing manifest is the same rule as an existing destination.
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(paths[-1], tmp_path / "out" / "f.vhd", manifest=rep.manifest_path, fsync=False)


# --------------------------------------------------------------------------------------------- 5. devices


@pytest.mark.backend_independent
def test_device_and_fifo_destinations_are_refused_by_every_writer(tmp_path, capsys) -> None:
    from vhdcore.cli import main as cli

    paths, _ = build_chain(tmp_path, 2, size=2 * MiB, block_size=512 * 1024, writes=5, seed=5)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for dest in ("/dev/null", str(fifo)):
        st = os.stat(dest)
        for argv in (["export", str(paths[-1]), dest, "--overwrite", "--no-manifest"],
                     ["convert", str(paths[-1]), dest, "--to", "raw", "--overwrite"],
                     ["compact", str(paths[-1]), dest, "--overwrite"],
                     ["snapshot", str(paths[-1]), dest, "--overwrite"],
                     ["create", dest, "--size", "1M", "--overwrite"]):
            assert cli.main(argv) != 0, argv
            err = capsys.readouterr().err
            assert "only regular files are written" in err and err.count("\n") == 1, (argv, err)
            now = os.stat(dest)
            assert (now.st_ino, now.st_mode, now.st_rdev) == (st.st_ino, st.st_mode, st.st_rdev)
    # An existing regular file: refused without --overwrite, the same message from every command.
    other = tmp_path / "other.vhd"
    other.write_bytes(b"x")
    for argv in (["export", str(paths[-1]), str(other), "--no-manifest"],
                 ["convert", str(paths[-1]), str(other), "--to", "raw"],
                 ["compact", str(paths[-1]), str(other)],
                 ["snapshot", str(paths[-1]), str(other)],
                 ["create", str(other), "--size", "1M"]):
        assert cli.main(argv) != 0, argv
        assert "the destination exists (a file); pass --overwrite" in capsys.readouterr().err
        assert other.read_bytes() == b"x"


# --------------------------------------------------------------------------------------------- 10. leftovers


@pytest.mark.backend_independent
def test_a_killed_exports_part_file_is_removed_by_the_next_run(tmp_path) -> None:
    import signal
    import subprocess
    import sys

    from vhdcore.delivery.export import export
    from vhdcore.delivery.upload.local import LocalSink

    paths, _ = build_chain(tmp_path, 2, size=2 * MiB, block_size=512 * 1024, writes=5, seed=10)
    dest = tmp_path / "out" / "d.vhd"
    dest.parent.mkdir()
    code = ("import sys, time\nfrom vhdcore.delivery.upload.local import LocalSink\n"
            f"s = LocalSink({str(dest)!r})\ns.write(b'x' * 1000000)\nprint(s.temp_path, flush=True)\ntime.sleep(60)\n")
    live = LocalSink(dest)  # a concurrent export to the same name: its part file is held, so it stays
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        part = proc.stdout.readline().strip()
        assert os.path.getsize(part) == 1000000
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        rep = export(paths[-1], dest, fsync=False, overwrite=True)
        assert not os.path.exists(part) and os.path.exists(live.temp_path)
        assert any(part in w and "did not finish" in w for w in rep.warnings)
    finally:
        live.abort()
    assert sorted(os.listdir(dest.parent)) == ["d.vhd", "d.vhd.xxh3.json"]


# --------------------------------------------------------------------------------------------- 1. journals


def _hostile_journal_setup(tmp_path: Path):
    """vm/: base.vhd <- mid.vhd <- grand.vhd; other/: another VM's base and child; outside/: a file."""
    vm, other, outside = tmp_path / "vm", tmp_path / "other", tmp_path / "outside"
    for d in (vm, other, outside):
        d.mkdir()
    paths, _ = build_chain(vm, 2, size=2 * MiB, block_size=512 * 1024, writes=10, seed=11)
    vhdcore.snapshot(paths[1], vm / "grand.vhd").close()
    opaths, _ = build_chain(other, 2, size=2 * MiB, block_size=512 * 1024, writes=10, seed=12)
    victim = outside / "victim.txt"
    victim.write_bytes(b"precious")
    return paths[0], paths[1], vm / "grand.vhd", opaths[1], victim


def _ids(path: Path) -> tuple[str, int]:
    from vhdcore.disk.image import Image
    with Image(path, "r") as img:
        return str(img.unique_id), img.footer.data_offset


@pytest.mark.backend_independent
@pytest.mark.parametrize("variant", ["outside-merged", "other-vm-relink", "bytes-over-grandchild",
                                     "symlinked-journal"])
def test_a_hostile_journal_is_refused_and_nothing_is_touched(tmp_path, variant) -> None:
    import json

    from vhdcore.ops.coalesce.relink import JournalError

    base, mid, grand, other_disk, victim = _hostile_journal_setup(tmp_path)
    mid_id, _ = _ids(mid)
    base_id, _ = _ids(base)
    rec = {"version": 2, "child": str(mid.resolve()), "child_unique_id": mid_id, "target": str(base.resolve()),
           "target_unique_id": base_id, "merged": [str(mid.resolve())], "children": [], "relinks": []}
    if variant == "outside-merged":
        rec["merged"] += [str(victim), str(tmp_path / "gone.vhd")]
    elif variant == "other-vm-relink":
        rec["merged"] += [str(tmp_path / "vm" / "gone.vhd")]
        oid, ohoff = _ids(other_disk)
        rec["relinks"] = [{"path": str(other_disk), "unique_id": oid, "writes": [[ohoff, (b"\xee" * 1024).hex()]]}]
    elif variant == "bytes-over-grandchild":
        rec["merged"] += [str(tmp_path / "vm" / "gone.vhd")]
        gid, ghoff = _ids(grand)
        rec["relinks"] = [{"path": str(grand), "unique_id": gid, "writes": [[0, (b"\xee" * 4096).hex()],
                                                                           [ghoff, (b"\xee" * 1024).hex()]]}]
    jpath = mid.parent / f".{mid.name}.coalesce"
    if variant == "symlinked-journal":
        planted = tmp_path / "outside" / "j.json"
        planted.write_text(json.dumps(rec))
        os.symlink(planted, jpath)
    else:
        jpath.write_text(json.dumps(rec))
    files = [base, mid, grand, other_disk, victim]
    before = {p: file_sha256(p) for p in files}
    with pytest.raises(JournalError):
        coalesce(mid)  # plain: no --remove-child
    with pytest.raises(JournalError):
        coalesce(mid, remove_child=True, search_dirs=[tmp_path / "vm", tmp_path / "other"])
    assert {p: file_sha256(p) for p in files} == before
    assert os.path.lexists(jpath)


@pytest.mark.backend_independent
def test_kill_between_unlinking_the_child_and_the_journal_reruns_cleanly(tmp_path, monkeypatch) -> None:
    import sys

    C = sys.modules["vhdcore.ops.coalesce"]
    paths, model = build_chain(tmp_path, 3, size=2 * MiB, block_size=512 * 1024, writes=10, seed=13)
    base, leaf = paths[0], paths[-1]
    real_unlink = os.unlink

    def dying_unlink(p, *a, **k):
        if str(p).endswith(".coalesce"):
            raise OSError(5, "simulated kill")
        return real_unlink(p, *a, **k)

    monkeypatch.setattr(C.os, "unlink", dying_unlink)
    with pytest.raises(OSError, match="simulated kill"):
        coalesce(leaf, into=base, remove_child=True)
    monkeypatch.setattr(C.os, "unlink", real_unlink)
    assert not leaf.exists() and (tmp_path / f".{leaf.name}.coalesce").exists()
    rep = coalesce(leaf, into=base, remove_child=True)  # was: "No such file ... leaf"
    assert "removed the journal of a finished coalesce" in rep.warnings[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.vhd"]
    assert content(base) == bytes(model)


# --------------------------------------------------------------------------------------------- 2. shared parents


@pytest.mark.backend_independent
def test_coalesce_into_a_shared_parent_found_through_parent_dir_is_refused(tmp_path, capsys) -> None:
    from vhdcore.cli import main as cli
    from vhdcore.exceptions import UnsafeOperationError

    base_dir = tmp_path / "_base"
    base_dir.mkdir()
    with vhdcore.create(base_dir / "golden.vhd", 2 * MiB, block_size=512 * 1024) as d:
        d.write(0, b"g" * 70000)
    disks = []
    for vm in ("vm1", "vm2"):
        (tmp_path / vm).mkdir()
        with vhdcore.snapshot(base_dir / "golden.vhd", tmp_path / vm / "disk.vhd") as d:
            d.write(4096, vm.encode() * 1000)
        disks.append(tmp_path / vm / "disk.vhd")
    vm2_view = content(disks[1], parent_dirs=[base_dir])
    before = file_sha256(base_dir / "golden.vhd")
    with pytest.raises(UnsafeOperationError, match="vm2/disk.vhd"):
        coalesce(disks[0], parent_dirs=[base_dir])
    assert cli.main(["coalesce", str(disks[0]), "--parent-dir", str(base_dir)]) != 0
    assert "vm2/disk.vhd" in capsys.readouterr().err
    assert file_sha256(base_dir / "golden.vhd") == before
    assert content(disks[1], parent_dirs=[base_dir]) == vm2_view
    rep = coalesce(disks[0], parent_dirs=[base_dir], force=["other-children"])
    assert any("vm2/disk.vhd" in w for w in rep.warnings)


# --------------------------------------------------------------------------------------------- 3. snapshot locks


@pytest.mark.backend_independent
def test_snapshot_and_coalesce_exclude_each_other(tmp_path, monkeypatch) -> None:
    """Deterministic interleavings (hooks at the point each holds its locks), both ways, leaf and middle layer."""
    import sys

    from vhdcore.exceptions import LockError, UnsafeOperationError

    C = sys.modules["vhdcore.ops.coalesce"]
    create_mod = sys.modules["vhdcore.ops.create"]
    paths, model = build_chain(tmp_path, 3, size=2 * MiB, block_size=512 * 1024, writes=10, seed=3)
    base, mid, leaf = paths
    real_check = C._check_safety
    seen: list[str] = []

    def snapshot_during_coalesce(parent: Path, child: Path):
        def check(*a, **k):
            with pytest.raises(LockError):
                vhdcore.snapshot(parent, child)
            seen.append(child.name)
            return real_check(*a, **k)
        return check

    # 1. the snapshot holds the middle layer: a coalesce into it is refused, nothing changes.
    mid_before = file_sha256(mid)
    monkeypatch.setattr(create_mod, "_after_parent_locked", lambda p: coalesce(leaf))
    with pytest.raises(LockError):
        vhdcore.snapshot(mid, tmp_path / "s0.vhd")
    monkeypatch.setattr(create_mod, "_after_parent_locked", None)
    assert file_sha256(mid) == mid_before and not (tmp_path / "s0.vhd").exists()
    #    ... and the reverse: a snapshot of the middle layer while a coalesce writes into it is refused.
    monkeypatch.setattr(C, "_check_safety", snapshot_during_coalesce(mid, tmp_path / "s1.vhd"))
    coalesce(leaf)
    assert seen == ["s1.vhd"] and not (tmp_path / "s1.vhd").exists()
    # 2. a snapshot of the leaf while coalesce --remove-child deletes it: refused (was: left orphaned).
    monkeypatch.setattr(C, "_check_safety", snapshot_during_coalesce(leaf, tmp_path / "s2.vhd"))
    rep = coalesce(leaf, remove_child=True)
    assert seen == ["s1.vhd", "s2.vhd"] and rep.removed == [str(leaf)]
    assert not (tmp_path / "s2.vhd").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert content(mid) == bytes(model)
    # 3. a snapshot that completed before the coalesce is a dependent: the coalesce into its parent is refused.
    monkeypatch.setattr(C, "_check_safety", real_check)
    vhdcore.snapshot(base, tmp_path / "s3.vhd").close()
    with pytest.raises(UnsafeOperationError, match="s3.vhd"):
        coalesce(mid)


def test_enospc_mid_coalesce_releases_the_reserved_region(tmp_path, monkeypatch) -> None:
    import errno

    from vhdcore.ops.check import check
    from vhdcore.ops.coalesce.writer import WriteIO

    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    with vhdcore.create(base, 16 * MiB, block_size=512 * 1024) as d:
        d.write(0, b"b" * 4096)
    with vhdcore.snapshot(base, child) as d:
        for i in range(32):
            d.write(i * 512 * 1024 + 1024, bytes([i + 1]) * 300_000)
        model = d.read(0, d.size)
    size_before = os.path.getsize(base)
    real = WriteIO.pwritev
    calls = []

    def full_disk(self, fd, bufs, offset):
        calls.append(offset)
        if len(calls) == 12:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real(self, fd, bufs, offset)

    monkeypatch.setattr(WriteIO, "pwritev", full_disk)
    with pytest.raises(OSError, match="No space left"):
        coalesce(child, batch_bytes=1 * MiB)
    monkeypatch.setattr(WriteIO, "pwritev", real)
    from vhdcore.disk.image import Image
    assert max(calls) > size_before + 8 * MiB  # a reserved region far past the old end was in use ...
    with Image(base, "r") as img:  # ... and was given back: the file ends right after its last committed block
        assert img.file_size == max(img.blocks_end, img.metadata_end) + 512 < max(calls)
    assert content(child) == model  # the chain still reads as before (the target may hold some merged data)
    assert check(base).clean


# --------------------------------------------------------------------------------------------- 7. tar bombs


def _tar_header(name: str, size: int, kind: bytes = b"0") -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    if size < 8**11:
        h[124:136] = b"%011o\0" % size
    else:
        h[124:136] = bytes([0x80]) + size.to_bytes(11, "big")
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


@pytest.mark.backend_independent
@pytest.mark.parametrize("bomb", ["pax-3G", "longname-3G", "member-over-limit", "too-many-members"])
def test_chain_tar_bombs_are_refused_before_reading_or_writing(tmp_path, bomb) -> None:
    import tracemalloc

    import zstandard

    from vhdcore.delivery.verify import verify
    from vhdcore.exceptions import InvalidFormatError
    from vhdcore.delivery.tarstream import TarLimits

    paths, _ = build_chain(tmp_path, 1, size=1 * MiB, block_size=512 * 1024, writes=2, seed=7)
    limits = None
    if bomb == "pax-3G":
        body = _tar_header("././@PaxHeader", 3 * 1024**3, b"x") + b"9 path=x\n" * 10_000
    elif bomb == "longname-3G":
        body = _tar_header("././@LongLink", 3 * 1024**3, b"L") + b"a" * 90_000
    elif bomb == "member-over-limit":  # 8 MiB of zeros: a few hundred bytes compressed
        body = _tar_header("0.vhd", 8 * MiB) + bytes(8 * MiB)
        limits = TarLimits(max_expanded_bytes=1 * MiB)
    else:
        body = b"".join(_tar_header(f"{i}.vhd", 512) + b"conectix" + bytes(504) for i in range(5))
        limits = TarLimits(max_members=4)
    archive = tmp_path / "bomb.tar.zst"
    archive.write_bytes(zstandard.ZstdCompressor().compress(body + bytes(1024)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tracemalloc.start()
    try:
        with pytest.raises(InvalidFormatError, match="limit|more than"):
            verify(archive, paths[0], tmp_dir=str(scratch), tar_limits=limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB
    assert os.listdir(scratch) == []  # nothing extracted is left behind


# --------------------------------------------------------------------------------------------- audit: where we write

_WRITES: list[tuple[str, str]] | None = None
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit_writes(event: str, args: tuple) -> None:
    if _WRITES is None:
        return
    paths: list = []
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS):
            paths = [args[0]]
    elif event in ("os.remove", "os.rmdir", "os.truncate", "os.mkdir", "os.chmod", "os.utime"):
        paths = [args[0]]
    elif event in ("os.rename", "os.link", "os.symlink"):
        paths = [args[0], args[1]]
    for p in paths:
        if isinstance(p, (str, bytes, os.PathLike)):
            _WRITES.append((event, os.path.realpath(os.fsdecode(p))))


import sys as _sys  # noqa: E402

_sys.addaudithook(_audit_writes)


@pytest.mark.backend_independent
def test_coalesce_export_and_repair_write_only_inside_the_chain_and_the_destination(tmp_path) -> None:
    """An audit hook sees every open for writing, unlink, rename and truncate this process makes."""
    global _WRITES
    import json

    from support.hostile import build as B
    from vhdcore.delivery.export import export
    from vhdcore.ops.repair import repair
    import vhdcore.delivery.upload.pipeline  # noqa: F401 - imported before the hook watches (its .pyc is Python's)

    vm, out, other, rdir = (tmp_path / n for n in ("vm", "out", "other", "r"))
    for d in (vm, out, other, rdir):
        d.mkdir()
    paths, _ = build_chain(vm, 3, size=2 * MiB, block_size=512 * 1024, writes=10, seed=21)
    vhdcore.snapshot(paths[-1], vm / "grand.vhd").close()
    build_chain(other, 2, size=2 * MiB, block_size=512 * 1024, writes=5, seed=22)
    lay = B.build(rdir / "d.vhd", blocks=(1,))
    with open(lay.path, "ab") as f:
        f.write(b"junk" * 100)
    # A planted journal naming the other directory must be refused without a write anywhere.
    (vm / f".{paths[1].name}.coalesce").write_text(json.dumps({
        "child": str(paths[1].resolve()), "child_unique_id": _ids(paths[1])[0], "target": str(paths[0].resolve()),
        "target_unique_id": _ids(paths[0])[0], "relinks": [],
        "merged": [str(paths[1].resolve()), str(other / "base.vhd"), str(other / "gone.vhd")]}))
    _WRITES = []
    try:
        with pytest.raises(vhdcore.VHDError):
            coalesce(paths[1], into=paths[0], remove_child=True)
        assert _WRITES == []
        os.unlink(vm / f".{paths[1].name}.coalesce")
        _WRITES = []
        coalesce(paths[-1], into=paths[0], remove_child=True, search_dirs=[vm])
        coalesce_writes = list(_WRITES)
        _WRITES = []
        export(vm / "grand.vhd", out / "g.vhd", fsync=False)
        export_writes = list(_WRITES)
        _WRITES = []
        repair(lay.path)
        repair_writes = list(_WRITES)
    finally:
        _WRITES = None
    for writes, allowed in ((coalesce_writes, [vm]), (export_writes, [out]), (repair_writes, [rdir])):
        assert writes, "the hook saw nothing: it would prove nothing"
        outside = [(e, p) for e, p in writes if "/__pycache__/" not in p
                   and not any(p.startswith(str(a.resolve()) + os.sep) for a in allowed)]
        assert outside == []
    assert ("os.remove", str((vm / paths[-1].name).resolve())) in coalesce_writes


@pytest.mark.backend_independent
def test_a_chain_tar_of_a_fixed_disk_is_verified_without_extraction(tmp_path) -> None:
    from vhdcore.delivery.verify import verify
    from vhdcore.delivery.export import export

    base = tmp_path / "fixed.vhd"
    with vhdcore.create(base, 2 * MiB, type="fixed") as d:
        d.write(12345, b"f" * 70000)
    export(base, tmp_path / "c.tar.zst", package="chain-tar", fsync=False, manifest=False)
    nowhere = str(tmp_path / "no-such-dir")  # extraction would need it: mkdtemp there fails
    rep = verify(tmp_path / "c.tar.zst", base, tmp_dir=nowhere)
    assert rep.match and rep.target_kind == "chain-tar (fixed 0.vhd, streamed)"
    with vhdcore.open(base, "r+") as d:
        d.write(0, b"x")
    assert not verify(tmp_path / "c.tar.zst", base, tmp_dir=nowhere).match


@pytest.mark.backend_independent
def test_image_refuses_its_destination_before_the_chain_is_coalesced(tmp_path, capsys) -> None:
    from vhdcore.cli import main as cli

    paths, _ = build_chain(tmp_path, 2, size=2 * MiB, block_size=512 * 1024, writes=5, seed=23)
    (tmp_path / "out.vhd").write_bytes(b"someone's file")
    before = {p: file_sha256(p) for p in paths}
    assert cli.main(["image", str(paths[-1]), str(tmp_path / "out.vhd"), "--no-growth"]) != 0
    assert "pass --overwrite" in capsys.readouterr().err
    assert {p: file_sha256(p) for p in paths} == before  # the chain was not coalesced
    assert (tmp_path / "out.vhd").read_bytes() == b"someone's file"
    assert cli.main(["image", str(paths[-1]), str(tmp_path / "out.vhd"), "--no-growth", "--overwrite"]) == 0

"""Structure-aware mutation of real VHD files and vhdcore-made chains, and the targets every mutant is fed to.

One decoder (``Plan.decode``) turns fuzzer bytes into a plan: a seed (a corpus file or a vhdcore chain), the
layer to damage, and a few mutations aimed at the footer, its copy, the dynamic header, the BAT, the sector
bitmaps, the parent locator entries and their data, or a truncation near a structure boundary; most plans
then recompute the checksums so that mutations get past checksum validation. Hypothesis (tests/test_fuzz.py)
and atheris (fuzz/fuzz_vhd.py) both draw bytes and share this decoder.

``run_targets`` feeds the mutant to check, open (strict and not), extents (map), reads and convert, and
asserts that every outcome is a correct result or a VHDError, plus two cross-checks: a file that check calls
clean opens and reads, and a file that strict open refuses is not clean. ``run_limited`` adds the limits:
2 s of CPU time (and 10 s of wall time, for inputs that block) and 200 MB of traced memory per input.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import random
import shutil
import struct
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import vhdcore
from vhdcore.ops.check import analyse_file, check
from vhdcore.ops.convert import convert
from vhdcore.ops.repair import repair
from vhdcore.exceptions import VHDError
from vhdcore.format.structs import FOOTER_SIZE, HEADER_SIZE, SECTOR_SIZE, checksum

TIME_LIMIT = 2.0
MEMORY_LIMIT = 200 * 1024 * 1024
READ_BUDGET = 32 * 1024 * 1024  # bytes of virtual disk read per open
EXTENT_BUDGET = 100_000  # extents looked at per open
TESTS = Path(__file__).resolve().parent.parent.parent
CORPUS = TESTS / "data" / "corpus"
REGRESSIONS = TESTS / "data" / "regressions"
KiB = 1024
MiB = 1024 * KiB


class FuzzFailure(AssertionError):
    """An outcome that is neither a correct result nor a VHDError, or over the time or memory limit."""


# --------------------------------------------------------------------------------------------- seeds


@dataclass
class Seed:
    name: str
    files: dict[str, bytes]  # file name -> content; the first is the disk to open (the leaf)
    regions: dict[str, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)  # file -> kind -> spans
    bounds: dict[str, list[int]] = field(default_factory=dict)  # file -> structure boundaries

    @property
    def leaf(self) -> str:
        return next(iter(self.files))


def _map_structures(path: Path) -> tuple[dict[str, list[tuple[int, int]]], list[int]]:
    """Where each structure of a sound file lies (from check's own analysis of the pristine file)."""
    a = analyse_file(str(path))
    size = a.file_size
    reg: dict[str, list[tuple[int, int]]] = {"footer": [(a.footer_offset, FOOTER_SIZE)]}
    bounds = [0, 511, 512, a.footer_offset, size - 1, size]
    if a.header_offset > 0:
        h = a.header
        reg["copy"] = [(0, FOOTER_SIZE)]
        reg["header"] = [(a.header_offset, 64)]
        reg["locators"] = [(a.header_offset + 576, 192)]
        reg["bat"] = [(h.table_offset, h.max_table_entries * 4)]
        bounds += [a.header_offset, a.header_offset + HEADER_SIZE, h.table_offset,
                   h.table_offset + h.max_table_entries * 4]
        bm = (a.block_size // SECTOR_SIZE + 7) // 8
        bm_pad = -(-bm // SECTOR_SIZE) * SECTOR_SIZE
        blocks = [int(e) * SECTOR_SIZE for e in a.bat if e != 0xFFFFFFFF][:64]
        reg["bitmap"] = [(b, bm) for b in blocks]
        reg["block"] = [(b + bm_pad, min(a.block_size, 64 * KiB)) for b in blocks]
        for b in blocks[:8]:
            bounds += [b, b + bm_pad, b + bm_pad + a.block_size]
        reg["locator data"] = [(loc.data_offset, loc.data_length) for _, loc in a.locators
                               if 0 < loc.data_length <= 4096]
        bounds += [loc.data_offset for _, loc in a.locators]
    reg = {k: [s for s in v if s[1] > 0 and s[0] + s[1] <= size] for k, v in reg.items()}
    reg = {k: v for k, v in reg.items() if v}
    return reg, sorted({b for b in bounds if 0 <= b <= size})


def _seed_from(name: str, paths: Sequence[Path]) -> Seed:
    s = Seed(name, {p.name: p.read_bytes() for p in paths})
    for p in paths:
        s.regions[p.name], s.bounds[p.name] = _map_structures(p)
    return s


def make_vhdcore_chain(directory: Path) -> list[Path]:
    """base (dynamic, 64 KiB blocks) <- child <- grandchild, 2 MiB, random writes: vhdcore's own layout."""
    rnd = random.Random(1234)
    base, child, grand = directory / "base.vhd", directory / "child.vhd", directory / "grand.vhd"
    size = 2 * MiB
    with vhdcore.create(base, size, block_size=64 * KiB) as d:
        for _ in range(12):
            n = rnd.randrange(1, 40_000)
            d.write(rnd.randrange(0, size - n), rnd.randbytes(n))
    for p, parent in ((child, base), (grand, child)):
        with vhdcore.snapshot(parent, p) as d:
            for _ in range(8):
                n = rnd.randrange(1, 20_000)
                d.write(rnd.randrange(0, size - n), rnd.randbytes(n))
    fixed = directory / "fixed.vhd"
    with vhdcore.create(fixed, 256 * KiB, type="fixed") as d:
        d.write(0, rnd.randbytes(256 * KiB))
    return [grand, child, base, fixed]


_SEEDS: list[Seed] | None = None


def seeds(workdir: Path | None = None) -> list[Seed]:
    """The seeds, built once per process: corpus files (single and chains) and a vhdcore-made chain."""
    global _SEEDS
    if _SEEDS is not None:
        return _SEEDS
    import tempfile

    c = CORPUS / "dfvfs"
    q = CORPUS / "qemu"
    out = [
        _seed_from("dfvfs ntfs-dynamic", [c / "ntfs-dynamic.vhd"]),
        _seed_from("dfvfs ntfs-fixed", [c / "ntfs-fixed.vhd"]),
        _seed_from("dfvfs ntfs-differential chain", [c / "ntfs-differential.vhd", c / "ntfs-parent.vhd"]),
        _seed_from("dfvfs image-differential chain", [c / "image-differential.vhd", c / "image.vhd"]),
        _seed_from("dfvfs ext2", [c / "ext2.vhd"]),
        _seed_from("qemu hyperv2012r2", [q / "hyperv2012r2-dynamic.vhd"]),
        _seed_from("qemu virtualpc", [q / "virtualpc-dynamic.vhd"]),
    ]
    d = Path(tempfile.mkdtemp(prefix="vhdfuzz-seeds-", dir=workdir))
    grand, child, base, fixed = make_vhdcore_chain(d)
    out.append(_seed_from("vhdcore chain", [grand, child, base]))
    out.append(_seed_from("vhdcore fixed", [fixed]))
    shutil.rmtree(d)
    _SEEDS = out
    return out


# --------------------------------------------------------------------------------------------- plans

INTERESTING_32 = [0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0x100, 0x1FF, 0x200, 0x201, 0x3FF, 0x400, 0xFFF, 0x1000,
                  0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x200000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
INTERESTING_64 = INTERESTING_32 + [1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 512, (1 << 64) - 1]
REGION_KINDS = ["footer", "copy", "header", "bat", "bitmap", "locators", "locator data", "block"]


class _Bytes:
    """A reader over fuzzer input that yields zeros once the input runs out (every input decodes)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def int(self, nbytes: int) -> int:
        chunk = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(chunk.ljust(nbytes, b"\0"), "big")

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)


@dataclass
class Mutation:
    op: str  # byte, u16, u32, u64, flip, bat-copy, truncate, append, zero
    region: str
    index: int  # which span of the region
    pos: int
    value: int

    def describe(self) -> str:
        return f"{self.op} {self.region}[{self.index}] +{self.pos} = {self.value:#x}"


@dataclass
class Plan:
    seed: int
    layer: int
    mutations: list[Mutation]
    fix_checksums: bool

    @classmethod
    def decode(cls, data: bytes) -> "Plan":
        r = _Bytes(data)
        seed = r.int(1)
        layer = r.int(1)
        flags = r.int(1)
        n = 1 + flags % 6
        muts = []
        for _ in range(n):
            op = ["byte", "u16", "u32", "u32", "u64", "flip", "interesting32", "interesting32", "interesting64",
                  "bat-copy", "truncate", "append", "zero", "u32"][r.int(1) % 14]
            region = REGION_KINDS[r.int(1) % len(REGION_KINDS)]
            muts.append(Mutation(op, region, r.int(1), r.int(3), r.int(8)))
            if r.exhausted:
                break
        return cls(seed, layer, muts, fix_checksums=(flags >> 4) % 4 != 0)

    def describe(self, seed_list: Sequence[Seed]) -> str:
        s = seed_list[self.seed % len(seed_list)]
        names = list(s.files)
        return (f"seed {s.name!r}, damage {names[self.layer % len(names)]}, checksums "
                f"{'recomputed' if self.fix_checksums else 'left'}: " + "; ".join(m.describe() for m in self.mutations))


def _apply(buf: bytearray, m: Mutation, regions: dict[str, list[tuple[int, int]]], bounds: list[int]) -> bytearray:
    if m.op == "truncate":
        b = bounds[m.index % len(bounds)]
        delta = [0, -1, 1, -SECTOR_SIZE, SECTOR_SIZE, -4, 4, -FOOTER_SIZE // 2][m.pos % 8]
        return buf[: max(0, min(len(buf), b + delta))]
    if m.op == "append":
        n = [1, 511, 512, 4096, 65536][m.value % 5]
        return buf + (bytes(n) if m.pos % 2 else bytes(random.Random(m.value).randbytes(n)))
    spans = regions.get(m.region) or regions.get("footer") or [(0, len(buf))]
    start, length = spans[m.index % len(spans)]
    if not buf:
        return buf
    start = min(start, len(buf) - 1)
    length = max(1, min(length, len(buf) - start))
    width = {"byte": 1, "u16": 2, "u32": 4, "u64": 8, "flip": 1, "interesting32": 4, "interesting64": 8,
             "bat-copy": 4, "zero": 1}[m.op]
    if m.op in ("u32", "interesting32", "bat-copy") and m.region in ("bat", "header", "footer", "copy"):
        pos = start + (m.pos % max(1, length // 4)) * 4
    else:
        pos = start + m.pos % length
    if pos + width > len(buf):
        return buf
    if m.op == "flip":
        buf[pos] ^= 1 << (m.value % 8)
    elif m.op == "zero":
        n = min(len(buf) - pos, [1, 4, 8, 64, 512][m.value % 5])
        buf[pos : pos + n] = bytes(n)
    elif m.op == "interesting32":
        struct.pack_into(">I", buf, pos, INTERESTING_32[m.value % len(INTERESTING_32)])
    elif m.op == "interesting64":
        struct.pack_into(">Q", buf, pos, INTERESTING_64[m.value % len(INTERESTING_64)])
    elif m.op == "bat-copy":
        # Another entry of the same table nudged by a little: overlaps, duplicates, neighbours.
        other = start + (m.value % max(1, length // 4)) * 4
        v = struct.unpack_from(">I", buf, other)[0] if other + 4 <= len(buf) else 0
        struct.pack_into(">I", buf, pos, (v + [0, 1, -1, 8, 128, 4096][(m.value >> 8) % 6]) & 0xFFFFFFFF)
    else:
        struct.pack_into({1: ">B", 2: ">H", 4: ">I", 8: ">Q"}[width], buf, pos, m.value & ((1 << (8 * width)) - 1))
    return buf


def _fix_checksums(buf: bytearray) -> None:
    """Recompute the checksums of whatever footer (end, copy at 0) and header the mutated file still has."""
    size = len(buf)
    for off in ({0, size - FOOTER_SIZE} if size >= FOOTER_SIZE else set()):
        if buf[off : off + 8] == b"conectix":
            struct.pack_into(">I", buf, off + 64, 0)
            struct.pack_into(">I", buf, off + 64, checksum(buf[off : off + FOOTER_SIZE], 64))
    if size >= FOOTER_SIZE and buf[size - FOOTER_SIZE : size - FOOTER_SIZE + 8] == b"conectix":
        hoff = struct.unpack_from(">Q", buf, size - FOOTER_SIZE + 16)[0]
        if hoff + HEADER_SIZE <= size and buf[hoff : hoff + 8] == b"cxsparse":
            struct.pack_into(">I", buf, hoff + 36, 0)
            struct.pack_into(">I", buf, hoff + 36, checksum(buf[hoff : hoff + HEADER_SIZE], 36))


@dataclass
class Mutant:
    directory: Path
    leaf: Path
    plan_text: str


def materialize(plan: Plan, directory: Path, seed_list: Sequence[Seed] | None = None) -> Mutant:
    seed_list = seed_list or seeds()
    s = seed_list[plan.seed % len(seed_list)]
    names = list(s.files)
    victim = names[plan.layer % len(names)]
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in s.files.items():
        data = bytearray(content)
        if name == victim:
            for m in plan.mutations:
                data = _apply(data, m, s.regions[name], s.bounds[name])
            if plan.fix_checksums:
                _fix_checksums(data)
        (directory / name).write_bytes(data)
    return Mutant(directory, directory / s.leaf, plan.describe(seed_list))


# --------------------------------------------------------------------------------------------- targets


def _exercise(disk: vhdcore.Disk, must_work: bool) -> None:
    """Map, reads and a stream over a bounded part of the disk. With ``must_work`` (strict open succeeded)
    any exception at all is a failure; otherwise VHDError is an acceptable outcome and is let through."""
    size = disk.size
    pos = 0
    n_ext = 0
    for ext in itertools.islice(disk.extents(), EXTENT_BUDGET):
        if ext.offset != pos or ext.length <= 0:
            raise FuzzFailure(f"extents do not tile the disk: {ext} after {pos}")
        pos = ext.end
        n_ext += 1
    if n_ext < EXTENT_BUDGET and pos != size:
        raise FuzzFailure(f"extents end at {pos}, the disk has {size} bytes")
    budget = READ_BUDGET
    for ext in itertools.islice(disk.allocated_extents(), EXTENT_BUDGET):
        if budget <= 0:
            break
        n = min(ext.length, budget, 4 * MiB)
        got = disk.read(ext.offset, n)
        want = ext.layer.pread(ext.file_offset, n)
        if got != want:
            raise FuzzFailure(f"read at {ext.offset} differs from the extent's file data at {ext.file_offset}")
        budget -= n
    rnd = random.Random(size)
    for _ in range(4):
        off = rnd.randrange(0, max(1, size))
        n = min(rnd.choice([1, 511, 4096, 70_000]), max(0, size - off))
        if len(disk.read(off, n)) != n:
            raise FuzzFailure("short read inside the disk")
    st = disk.stream()
    st.seek(max(0, size - 1000))
    st.read(2000)


def run_targets(m: Mutant, scratch: Path) -> dict:
    """Every consumer on one mutant; returns a summary, raises FuzzFailure on a bad outcome."""
    dirs = [str(m.directory)]
    outcome: dict = {}
    try:
        rep = check(m.leaf, chain=True, parent_dirs=dirs)
    except VHDError as e:
        if getattr(e, "field", None) == "file":
            raise FuzzFailure(f"check refused a regular file: {e}") from e
        raise FuzzFailure(f"check raised instead of reporting: {type(e).__name__}: {e}") from e
    outcome["check"] = sorted(rep.codes())
    strict_error: VHDError | None = None
    try:
        disk = vhdcore.open(m.leaf, parent_dirs=dirs)
    except VHDError as e:
        strict_error = e
        outcome["open"] = f"{type(e).__name__} {e.field}"
    else:
        outcome["open"] = "ok"
        with disk:
            try:
                _exercise(disk, must_work=True)
            except FuzzFailure:
                raise
            except Exception as e:  # noqa: BLE001 - any error after a strict open is a bug
                raise FuzzFailure(f"strict open succeeded but using the disk raised {type(e).__name__}: {e}") from e
    if rep.clean and strict_error is not None:
        raise FuzzFailure(f"check says clean but open raised {type(strict_error).__name__}: {strict_error}")
    if strict_error is not None and not rep.errors:
        raise FuzzFailure(f"open raised {type(strict_error).__name__} ({strict_error}) but check found no error: "
                          f"{[str(f) for f in rep.findings]}")
    try:
        with vhdcore.open(m.leaf, parent_dirs=dirs, strict=False) as disk:
            _exercise(disk, must_work=False)
        outcome["lenient"] = "ok"
    except VHDError as e:
        outcome["lenient"] = f"{type(e).__name__} {e.field}"
    if strict_error is None:
        with vhdcore.open(m.leaf, parent_dirs=dirs) as disk:
            size = disk.size
            to = "raw" if size <= 64 * MiB else "dynamic"
            dst = scratch / f"out.{to}"
            try:
                convert(m.leaf, dst, to=to, parent_dirs=dirs)
            except Exception as e:  # noqa: BLE001
                raise FuzzFailure(f"convert of a disk that opens raised {type(e).__name__}: {e}") from e
            _compare_output(disk, dst, to)
            dst.unlink()
        outcome["convert"] = to
    outcome["repair"] = _repair_target(m, scratch, strict_error is None)
    return outcome


def _digest_allocated(path: Path, dirs: list[str]) -> str:
    h = hashlib.sha256()
    budget = READ_BUDGET
    with vhdcore.open(path, parent_dirs=dirs) as disk:
        for ext in itertools.islice(disk.allocated_extents(), EXTENT_BUDGET):
            n = min(ext.length, budget)
            if n <= 0:
                break
            h.update(ext.offset.to_bytes(8, "big"))
            h.update(disk.read(ext.offset, n))
            budget -= n
    return h.hexdigest()


def _repair_target(m: Mutant, scratch: Path, opened: bool) -> str:
    """Repair a copy of the mutant (in the mutant's directory, so parents resolve): it may refuse, but what
    opened before must open after with the same content, and a repair that says clean must be clean."""
    dirs = [str(m.directory)]
    before = _digest_allocated(m.leaf, dirs) if opened else None
    original = m.leaf.read_bytes()
    try:
        rep = repair(m.leaf, parent_dirs=dirs)
    except VHDError as e:
        raise FuzzFailure(f"repair raised {type(e).__name__}: {e}") from e
    try:
        chain_clean = False
        if rep.clean:
            after = check(m.leaf, parent_dirs=dirs)
            if not after.clean:
                raise FuzzFailure(f"repair says clean, check says {[str(f) for f in after.findings]}")
            # Repair answers for the leaf (and its links to parents); the parents' own structure is theirs.
            chain_clean = check(m.leaf, chain=True, parent_dirs=dirs).clean
        if opened or chain_clean:
            try:
                got = _digest_allocated(m.leaf, dirs)
            except VHDError as e:
                raise FuzzFailure(f"after repair the disk no longer opens: {e}") from e
            if opened and got != before:
                raise FuzzFailure("repair changed the content of a disk that opened")
    finally:
        m.leaf.write_bytes(original)
        if rep.undo_path:
            os.unlink(rep.undo_path)
    return "changed" if rep.changed else "unchanged"


def _compare_output(disk: vhdcore.Disk, dst: Path, to: str) -> None:
    budget = READ_BUDGET
    if to == "raw":
        with open(dst, "rb") as f:
            for ext in itertools.islice(disk.allocated_extents(), EXTENT_BUDGET):
                n = min(ext.length, budget)
                if n <= 0:
                    break
                f.seek(ext.offset)
                if f.read(n) != disk.read(ext.offset, n):
                    raise FuzzFailure(f"converted raw differs at {ext.offset}")
                budget -= n
        return
    if not check(dst).clean:
        raise FuzzFailure("convert wrote a dynamic disk that check does not call clean")
    with vhdcore.open(dst) as out:
        for ext in itertools.islice(disk.allocated_extents(), EXTENT_BUDGET):
            n = min(ext.length, budget)
            if n <= 0:
                break
            if out.read(ext.offset, n) != disk.read(ext.offset, n):
                raise FuzzFailure(f"converted dynamic disk differs at {ext.offset}")
            budget -= n


def run_limited(m: Mutant, scratch: Path, time_limit: float = TIME_LIMIT, memory_limit: int = MEMORY_LIMIT,
                keep_tracing: bool = False) -> dict:
    """``run_targets`` under the limits: wall time and the peak of traced Python/numpy allocations.

    ``keep_tracing`` leaves tracemalloc running for the next input: long runs need it, since starting and
    stopping it for every input grows the process by ~35 MB per thousand inputs."""
    tracing = tracemalloc.is_tracing() or keep_tracing
    if not tracemalloc.is_tracing():
        tracemalloc.start()
    tracemalloc.reset_peak()
    # What the input itself allocates: the peak above what was already alive (seeds, caches, earlier inputs).
    baseline = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    c0 = time.process_time()
    try:
        outcome = run_targets(m, scratch)
    finally:
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        peak = tracemalloc.get_traced_memory()[1] - baseline
        if not tracing:
            tracemalloc.stop()
    outcome["seconds"] = round(elapsed, 3)
    outcome["cpu_seconds"] = round(cpu, 3)
    outcome["peak_bytes"] = peak
    # The limit is on CPU time, which a busy machine does not inflate; wall time only catches an input that
    # blocks (waiting is not computing), with room for a loaded machine.
    if cpu > time_limit:
        raise FuzzFailure(f"took {cpu:.2f} s of CPU (limit {time_limit} s)")
    if elapsed > max(10.0, 5 * time_limit):
        raise FuzzFailure(f"took {elapsed:.2f} s of wall time, {cpu:.2f} s of CPU: blocked on something")
    if peak > memory_limit:
        raise FuzzFailure(f"used {peak / MiB:.0f} MiB (limit {memory_limit / MiB:.0f} MiB)")
    return outcome


# --------------------------------------------------------------------------------------------- regressions


def save_regression(m: Mutant, reason: str, dest_root: Path = REGRESSIONS) -> Path:
    """Keep a failing mutant as a regression case: its files plus case.json (leaf, plan, what went wrong)."""
    digest = hashlib.sha256(b"".join((m.directory / n).read_bytes() for n in sorted(os.listdir(m.directory))
                                     if (m.directory / n).is_file())).hexdigest()[:16]
    dest = dest_root / digest
    dest.mkdir(parents=True, exist_ok=True)
    for p in m.directory.iterdir():
        if p.is_file() and p.suffix == ".vhd":
            # Compressed: mutants of mostly-empty corpus disks shrink from megabytes to kilobytes.
            with open(p, "rb") as src, gzip.GzipFile(dest / (p.name + ".gz"), "wb", compresslevel=9, mtime=0) as dst:
                shutil.copyfileobj(src, dst)
    (dest / "case.json").write_text(json.dumps({"leaf": m.leaf.name, "plan": m.plan_text, "failure": reason},
                                               indent=2) + "\n")
    return dest


def regression_cases(root: Path = REGRESSIONS) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "case.json").is_file()) if root.is_dir() else []


def load_regression(case_dir: Path, workdir: Path) -> Mutant:
    meta = json.loads((case_dir / "case.json").read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    for p in case_dir.iterdir():
        if p.name.endswith(".vhd.gz"):
            with gzip.open(p, "rb") as src, open(workdir / p.name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        elif p.suffix == ".vhd":
            shutil.copy(p, workdir / p.name)
    return Mutant(workdir, workdir / meta["leaf"], meta["plan"])


def main(argv: Sequence[str] | None = None) -> int:
    """``python tests/support/hostile/fuzzing.py CASE_DIR...``: run saved mutants under the limits (exit 1 on failure).
    The atheris driver uses it to confirm a time-limit failure outside the slower instrumented process."""
    import sys
    import tempfile

    status = 0
    for case in (argv if argv is not None else sys.argv[1:]):
        with tempfile.TemporaryDirectory() as tmp:
            m = load_regression(Path(case), Path(tmp) / "m")
            try:
                out = run_limited(m, Path(tmp))
            except Exception as e:  # noqa: BLE001
                print(f"{case}: FAIL {type(e).__name__}: {e}")
                status = 1
            else:
                print(f"{case}: ok {out}")
    return status


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(TESTS))
    raise SystemExit(main())

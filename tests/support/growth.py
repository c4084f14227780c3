"""Guest disks for the growth and compaction tests, built with the real tools and written into vhdcore chains the
way a hypervisor writes a guest's I/O: one layer per step, only the 64 KiB ranges the step changed.

A ``GuestChain`` holds a raw disk image (partitioned with sfdisk; file systems built in their own image files with
mkfs.ext4 -d / debugfs, mkntfs / ntfscp / ntfstruncate, mkfs.vfat / mcopy / mdel and written at their partition
offsets with dd) and, beside it, an independent model of what each VHD layer holds: one boolean per sector. The
expected figures of the tests come from that model, the raw bytes and the tools, never from vhdcore itself.

The disks are built once per test process (``build_once``) and shared by test_growth*.py and test_compact*.py.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import vhdcore

from support import TESTS
from support import guestimages as gi
from support.guestimages import MiB, dumpe2fs_free_blocks, dumpe2fs_header, run, sfdisk_json  # noqa: F401

KiB = 1024
SECTOR = 512
CHUNK = 64 * KiB  # the granularity a step's changes are written into its layer with
CORPUS = TESTS / "data" / "corpus" / "dfvfs"

# command -> Debian package; the guest layer's tools plus the checkers and extractors these tests use
TOOLS = {**gi.TOOLS, "e2fsck": "e2fsprogs", "ntfsfix": "ntfs-3g", "ntfscat": "ntfs-3g", "ntfscluster": "ntfs-3g",
         "mdir": "mtools", "fsck.fat": "dosfstools", "qemu-img": "qemu-utils", "xfs_repair": "xfsprogs"}


def ensure_tools() -> None:
    """Install whatever tool is missing (the suite runs as root on Debian, as scripts/bootstrap.sh does)."""
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = sorted({pkg for cmd, pkg in TOOLS.items() if not shutil.which(cmd)})
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content(seed: int, n: int) -> bytes:
    """Incompressible file content (numpy's generator: fast enough for tens of MB per test session)."""
    return np.random.default_rng(seed).bytes(n)


def read_sparse(path: Path, out: np.ndarray) -> np.ndarray:
    """``path``'s bytes into the zeroed array ``out``, reading only its data (holes of sparse files are slow to
    read and are zeros anyway)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = min(os.fstat(fd).st_size, len(out))
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
            if start >= end:
                break
            view = memoryview(out[start:end])
            got = 0
            while got < len(view):
                n = os.preadv(fd, [view[got:]], start + got)
                assert n > 0
                got += n
            pos = end
    finally:
        os.close(fd)
    return out


# ------------------------------------------------------------------------------------------------ partitions


@dataclass
class Part:
    num: int
    kind: str  # ext4 | ext2 | ntfs | fat16 | fat32 | swap | data (random bytes, no file system)
    offset: int
    size: int
    image: Path  # the file system built on its own; written into the disk at ``offset``
    files: dict[str, str] = field(default_factory=dict)  # path inside the file system -> sha256 of the content
    dirs: set[str] = field(default_factory=set)  # FAT directories made so far


class GuestChain:
    """A partitioned raw disk and the vhdcore chain that mirrors its history, with a per-sector model of the chain."""

    def __init__(self, root: Path, name: str, size: int, sfdisk_script: str) -> None:
        self.root = root
        self.name = name
        self.size = size
        self.raw = root / f"{name}.raw"
        with open(self.raw, "wb") as f:
            f.truncate(size)
        run("sfdisk", "-q", self.raw, input=sfdisk_script)
        table = sfdisk_json(self.raw)
        self.scheme = "gpt" if table["label"] == "gpt" else "mbr"
        self.bounds = {int(p["node"][len(str(self.raw)):]): (p["start"] * SECTOR, p["size"] * SECTOR)
                       for p in table["partitions"]}
        self.parts: dict[int, Part] = {}
        self.layers: list[Path] = []  # base first
        self.block_sizes: list[int] = []
        self.present: list[np.ndarray] = []  # per layer, base first: sectors the layer holds
        self.layer_blocks: list[int] = []  # per layer: allocated blocks
        self.layer_zero: list[tuple[int, int]] = []  # per layer: (blocks whose held data is zero, bytes held)
        self._prev = np.zeros(size, dtype=np.uint8)
        self.seq = 0

    # -- building file systems

    def tmpfile(self, suffix: str, data: bytes) -> Path:
        self.seq += 1
        p = self.root / f"{self.name}-{self.seq}{suffix}"
        p.write_bytes(data)
        return p

    def add(self, num: int, kind: str) -> Part:
        offset, size = self.bounds[num]
        img = self.root / f"{self.name}-p{num}.img"
        with open(img, "wb") as f:
            f.truncate(size)
        part = Part(num, kind, offset, size, img)
        self.parts[num] = part
        return part

    def ext(self, num: int, kind: str, mkfs: list[str], files: dict[str, bytes]) -> Part:
        part = self.add(num, kind)
        src = self.root / f"{self.name}-p{num}-src"
        for name, data in files.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(data)
            part.files[name] = sha(data)
        run("mke2fs", "-q", "-F", "-t", kind, *mkfs, *(["-d", src] if files else []), part.image)
        return part

    def ext_change(self, num: int, remove: list[str], add: dict[str, bytes]) -> None:
        part = self.parts[num]
        cmds = [f"rm /{n}" for n in remove]
        for name, data in add.items():
            cmds.append(f"write {self.tmpfile('.bin', data)} /{name}")
        script = self.tmpfile(".debugfs", ("\n".join(cmds) + "\n").encode())
        run("debugfs", "-w", "-f", script, part.image)
        for n in remove:
            del part.files[n]
        part.files.update({n: sha(d) for n, d in add.items()})

    def fat(self, num: int, bits: int, mkfs: list[str], files: dict[str, bytes]) -> Part:
        part = self.add(num, f"fat{bits}")
        part.image.unlink()
        run("mkfs.vfat", "-C", "-F", str(bits), *mkfs, part.image, str(part.size // 1024))
        self.fat_change(num, [], files)
        return part

    def fat_change(self, num: int, remove: list[str], add: dict[str, bytes]) -> None:
        part = self.parts[num]
        for n in remove:
            run("mdel", "-i", part.image, f"::{n}")
            del part.files[n]
        for name, data in add.items():
            parts = name.split("/")[:-1]
            for k in range(1, len(parts) + 1):
                d = "/".join(parts[:k])
                if d not in part.dirs:
                    run("mmd", "-i", part.image, f"::{d}")
                    part.dirs.add(d)
            run("mcopy", "-i", part.image, self.tmpfile(".bin", data), f"::{name}")
            part.files[name] = sha(data)

    def ntfs(self, num: int, mkfs: list[str], files: dict[str, bytes]) -> Part:
        part = self.add(num, "ntfs")
        run("mkntfs", "-F", "-Q", "-q", *mkfs, part.image)
        self.ntfs_change(num, [], files)
        return part

    def ntfs_change(self, num: int, truncate: list[str], add: dict[str, bytes]) -> None:
        """ntfs-3g's tools have no rm: truncating a file's $DATA to zero frees its clusters (the data stays)."""
        part = self.parts[num]
        if truncate:
            inodes = {n: i for i, n in (l.split(None, 1) for l in run("ntfsls", "-i", "-f", part.image).splitlines()
                                        if l.strip())}
            for n in truncate:
                run("ntfstruncate", "-f", part.image, inodes[n], "0")
                part.files[n] = sha(b"")
        for name, data in add.items():
            run("ntfscp", "-f", part.image, self.tmpfile(".bin", data), name)
            part.files[name] = sha(data)

    def xfs(self, num: int, seed: int, mkfs: list[str]) -> Part:
        """XFS through a mkfs.xfs prototype file (guestimages.build_xfs: 320 MiB, most of it the internal log)."""
        offset, size = self.bounds[num]
        x = gi.build_xfs(self.root, f"{self.name}-p{num}", seed, mkfs)
        assert x.path.stat().st_size <= size
        part = Part(num, "xfs", offset, size, x.path)
        src = self.root / f"{self.name}-p{num}-src"
        part.files = {f: sha((src / f).read_bytes()) for f in x.files}
        self.parts[num] = part
        return part

    def swap(self, num: int) -> Part:
        part = self.add(num, "swap")
        run("mkswap", part.image)
        return part

    def data(self, num: int, seed: int) -> Part:
        """A partition of random bytes and no file system (kept as it is by compaction)."""
        part = self.add(num, "data")
        part.image.write_bytes(content(seed, part.size))
        return part

    # -- layers

    def _image(self) -> np.ndarray:
        """The partitioned disk with every file system image at its offset (what ``dd conv=notrunc`` makes)."""
        now = read_sparse(self.raw, np.zeros(self.size, dtype=np.uint8))
        for part in self.parts.values():
            read_sparse(part.image, now[part.offset : part.offset + part.size])
        return now

    def commit(self, path: Path, block_size: int, disk_type: str = "dynamic",
               zero_ranges: list[tuple[int, int]] = ()) -> Path:
        """The disk's current content into a new layer: the base (every non-zero chunk, plus ``zero_ranges``
        written as zeros, as a guest that zero-fills), or a differencing child holding the changed chunks only."""
        now = self._image()
        chunks = now.view(np.uint64).reshape(-1, CHUNK // 8)
        if not self.layers:
            changed = chunks.any(axis=1)
        else:
            changed = (chunks != self._prev.view(np.uint64).reshape(-1, CHUNK // 8)).any(axis=1)
        for off, n in zero_ranges:
            assert not now[off : off + n].any(), "zero_ranges must hold zeros"
            changed[off // CHUNK : -(-(off + n) // CHUNK)] = True
        spc = CHUNK // SECTOR
        present = np.zeros(self.size // SECTOR, dtype=bool)
        if not self.layers:
            disk = vhdcore.create(path, self.size, type=disk_type, block_size=block_size)
        else:
            disk = vhdcore.snapshot(self.layers[-1], path, block_size=block_size)
        with disk:
            for c in np.flatnonzero(changed).tolist():
                disk.write(c * CHUNK, memoryview(now[c * CHUNK : (c + 1) * CHUNK]))
                present[c * spc : (c + 1) * spc] = True
        if not self.layers:
            if disk_type == "fixed":
                present[:] = True
            # A dynamic disk holds exactly the written sectors (their bitmap bits), as libvhd reads it.
        # Blocks of this layer, and those whose held sectors are all zero.
        spb = block_size // SECTOR
        nblk = -(-len(present) // spb)
        pad = np.zeros(nblk * spb, dtype=bool)
        pad[: len(present)] = present
        held = pad.reshape(nblk, spb)
        nz = np.zeros(nblk * spb, dtype=bool)
        nz[: len(present)] = nonzero_sectors(now)
        touched = held.any(axis=1)
        zero = touched & ~(held & nz.reshape(nblk, spb)).any(axis=1)
        self.layer_blocks.append(int(touched.sum()) if disk_type != "fixed" else -(-self.size // (2 * MiB)))
        self.layer_zero.append((int(zero.sum()), int(held[zero].sum()) * SECTOR))
        self.layers.append(path)
        self.block_sizes.append(block_size)
        self.present.append(present)
        self._prev = now
        return path

    @property
    def leaf(self) -> Path:
        return self.layers[-1]

    def content(self) -> np.ndarray:
        """The disk as it is now (what the chain's virtual disk must read as)."""
        return self._prev

    def allocated(self) -> np.ndarray:
        out = np.zeros(self.size // SECTOR, dtype=bool)
        for p in self.present:
            out |= p
        return out


# ------------------------------------------------------------------------------------------------ tool oracles


def ext4_needing_recovery(tmp_path: Path, size: int, seed: int, file_size: int) -> tuple[Path, Path]:
    """An ext4 (one file deleted) flagged as needing journal recovery, inside a dynamic VHD: (raw image, vhd).

    Its free map may be stale, so growth and compact must not trust it.
    """
    ensure_tools()
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(size)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(content(seed + i, file_size))
    run("mke2fs", "-q", "-F", "-t", "ext4", "-d", src, img)
    run("debugfs", "-w", "-R", "rm /f1", img)
    run("debugfs", "-w", "-R", "feature needs_recovery", img)
    vhd = tmp_path / "d.vhd"
    with vhdcore.create(vhd, size) as d:
        d.write(0, img.read_bytes())
    return img, vhd


def tool_used_bytes(kind: str, image: Path, size: int) -> int:
    """Bytes in use per the file system's own tool (whole file-system image of ``size`` bytes)."""
    if kind.startswith("ext"):
        h = dumpe2fs_header(image)
        return (int(h["Block count"]) - int(h["Free blocks"])) * int(h["Block size"])
    if kind == "ntfs":
        cs, _n, free = gi.ntfsinfo_counts(image)
        out = run("ntfscluster", "-i", "-f", image)
        free_bytes = int(out.split("bytes of free space")[1].split(":")[1].split()[0])
        assert free_bytes == free * cs, (free_bytes, free, cs)
        return size - free * cs
    if kind.startswith("fat"):
        used, total = gi.fsck_fat_clusters(image)
        cs = int(run("fsck.fat", "-n", "-v", image).split("bytes per cluster")[0].split()[-1])
        return size - (total - used) * cs
    raise AssertionError(kind)


def ext_free_sectors(image: Path, disk_sectors: int, offset: int) -> np.ndarray:
    """Disk sectors dumpe2fs lists as free blocks of the ext file system at ``offset``."""
    h = dumpe2fs_header(image)
    bs, n = int(h["Block size"]), int(h["Block count"])
    free_blocks = dumpe2fs_free_blocks(image, n)
    out = np.zeros(disk_sectors, dtype=bool)
    spb = bs // SECTOR
    s0 = offset // SECTOR
    out[s0 : s0 + n * spb] = np.repeat(free_blocks, spb)
    return out


def guest_free_sectors(fs, disk_sectors: int, shift: int = 0) -> np.ndarray:
    """Disk sectors the guest layer's bitmap marks free (its parsers are checked against the tools in tests/guest);
    ``shift`` moves the ranges of a file system read from its own image to its place on the disk."""
    out = np.zeros(disk_sectors, dtype=bool)
    for off, n in fs.free_ranges():
        out[(shift + off) // SECTOR : (shift + off + n) // SECTOR] = True
    return out


def image_free_sectors(part: Part, disk_sectors: int) -> np.ndarray:
    """The free sectors of a partition's file system, read from its own image file (not through a VHD)."""
    from vhdcore.guest import RawFileReader, analyse

    with RawFileReader(part.image) as r:
        [fs] = analyse(r, strict=True).filesystems
    return guest_free_sectors(fs, disk_sectors, part.offset)


def nonzero_sectors(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, SECTOR).any(axis=1)


# ------------------------------------------------------------------------------------------------ checks


def extract_partition(vhd: Path, part: Part, out: Path) -> Path:
    """A partition of a VHD's virtual disk as a plain file (through vhdcore's reader)."""
    with vhdcore.open(vhd) as d, open(out, "wb") as f:
        f.truncate(part.size)  # sparse: what no layer holds reads as zeros
        for e in d.allocated_extents(part.offset, part.size):
            os.pwrite(f.fileno(), d.read(e.offset, e.length), e.offset - part.offset)
    return out


def check_filesystem(kind: str, image: Path) -> None:
    """The file system's own checker, read-only, must find it clean."""
    if kind.startswith("ext"):
        p = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
    elif kind == "ntfs":
        out = run("ntfsfix", "-n", image)
        assert "NTFS partition" in out and "was processed successfully" in out, out
    elif kind == "xfs":
        p = subprocess.run(["xfs_repair", "-n", "-f", str(image)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
    elif kind.startswith("fat"):
        p = subprocess.run(["fsck.fat", "-n", str(image)], capture_output=True, text=True)
        # Clean: the version line and the summary, nothing in between.
        out = (p.stdout + p.stderr).strip().splitlines()
        assert p.returncode == 0 and len(out) == 2 and " clusters" in out[1], p.stdout + p.stderr
    else:
        raise AssertionError(kind)


def extract_files(part: Part, image: Path, into: Path) -> dict[str, str]:
    """Every file the test put in the file system, read back with the file system's own tool: name -> sha256."""
    into.mkdir(parents=True, exist_ok=True)
    names = sorted(part.files)
    out: dict[str, str] = {}
    if part.kind.startswith("ext"):
        cmds = [f"dump /{n} {into / n.replace('/', '__')}" for n in names]
        script = into / "dump.debugfs"
        script.write_text("\n".join(cmds) + "\n")
        run("debugfs", "-f", script, image)
        out = {n: sha((into / n.replace("/", "__")).read_bytes()) for n in names}
    elif part.kind.startswith("fat"):
        run("mcopy", "-s", "-n", "-i", image, "::/", into)
        out = {n: sha((into / n).read_bytes()) for n in names}
    elif part.kind == "ntfs":
        for n in names:
            data = subprocess.run(["ntfscat", "-f", str(image), n], capture_output=True, check=True).stdout
            out[n] = sha(data)
    elif part.kind == "xfs":
        # No extractor without mounting: each file's extents per xfs_db bmap, read from the image.
        sb = run("xfs_db", "-r", "-c", "sb 0", "-c", "p agblocks blocksize", image)
        agblocks = int(sb.split("agblocks = ")[1].split()[0])
        bs = int(sb.split("blocksize = ")[1].split()[0])
        cmds = [a for n in names for a in ("-c", f"path /{n}", "-c", "p core.size", "-c", "bmap")]
        files_out: list[tuple[int, list[tuple[int, int]]]] = []
        for line in run("xfs_db", "-r", *cmds, image).splitlines():
            if line.startswith("core.size = "):
                files_out.append((int(line.split("=")[1]), []))
            m = re.search(r"startblock \d+ \((\d+)/(\d+)\) count (\d+)", line)
            if m:
                files_out[-1][1].append((int(m.group(1)) * agblocks + int(m.group(2)), int(m.group(3))))
        assert len(files_out) == len(names)
        with open(image, "rb") as f:
            for n, (size, extents) in zip(names, files_out):
                data = bytearray()
                for start, count in extents:
                    f.seek(start * bs)
                    data += f.read(count * bs)
                out[n] = sha(bytes(data[:size]))
    return out


def fixed_copy(g: GuestChain) -> Path:
    """The chain collapsed into a sparse fixed VHD (made once per process)."""
    def make() -> Path:
        out = g.root / f"{g.name}-fixed.vhd"
        vhdcore.convert(g.leaf, out, to="fixed")
        return out
    return build_once(f"{g.name}-fixed", make)


def read_disk(path: Path) -> np.ndarray:
    """A chain's whole virtual disk (test disks are small)."""
    with vhdcore.open(path) as d:
        out = np.empty(d.size, np.uint8)
        d.readinto(0, out)
        return out


def build_once(key: str, builder, *args):
    """Build a disk once per test process (the growth and compact modules share them)."""
    if key not in _BUILT:
        _BUILT[key] = builder(*args)
    return _BUILT[key]


_BUILT: dict[str, object] = {}


# ------------------------------------------------------------------------------------------------ the disks


def files(seed: int, count: int, lo: int, hi: int, prefix: str) -> dict[str, bytes]:
    import random

    rnd = random.Random(seed)
    return {f"{prefix}{i:02d}.bin": content(seed * 1000 + i, rnd.randrange(lo, hi)) for i in range(count)}


def build_mbr_chain(root: Path) -> GuestChain:
    """MBR, 256 MiB: ext4 (176 MiB, ~80 MB of files), FAT16 (40 MiB), a partition of random bytes (8 MiB).

    Three layers with three block sizes: a dynamic base (2 MiB blocks, plus 4 MiB the guest zero-filled), a child
    (512 KiB) in which files are deleted and others written, a grandchild (1 MiB) in which more are deleted, one
    of them written in that same step.
    """
    g = GuestChain(root, "mbr", 256 * MiB, "label: dos\n"
                   "start=2048, size=176MiB, type=83\n"
                   "size=40MiB, type=6\n"
                   "size=8MiB, type=da\n")
    first = {f"d{i % 4}/{n}": d for i, (n, d) in enumerate(files(1, 36, 200_000, 4_000_000, "f").items())}
    g.ext(1, "ext4", ["-b", "4096", "-E", "lazy_itable_init=0"], first)
    g.fat(2, 16, ["-s", "4"], {f"sub/a{i}.bin" if i % 2 else f"a{i}.bin": d
                               for i, d in enumerate(files(2, 10, 20_000, 600_000, "x").values())})
    g.data(3, 3)
    ext_off = g.parts[1].offset
    # 4 MiB near the end of the ext4 that nothing uses yet, written as zeros (a guest that zero-filled it).
    zero_at = ext_off + 160 * MiB
    g.commit(root / "mbr-base.vhd", 2 * MiB, zero_ranges=[(zero_at, 4 * MiB)])

    names = sorted(g.parts[1].files)
    g.ext_change(1, names[1:24:2], {f"d{i % 4}/n{i}.bin": content(100 + i, 300_000 + 250_000 * i) for i in range(6)})
    fat_names = sorted(g.parts[2].files)
    g.fat_change(2, fat_names[:3], {f"b{i}.bin": content(200 + i, 150_000 + 80_000 * i) for i in range(2)})
    g.commit(root / "mbr-child1.vhd", 512 * KiB)

    names = sorted(g.parts[1].files)
    g.ext_change(1, [], {"tmp/gone.bin": content(300, 3_000_000)})
    g.ext_change(1, names[2:14:3] + ["tmp/gone.bin"],
                 {f"d{i % 4}/m{i}.bin": content(400 + i, 500_000 + 400_000 * i) for i in range(4)})
    g.commit(root / "mbr-child2.vhd", 1 * MiB)
    return g


def build_gpt_chain(root: Path) -> GuestChain:
    """GPT, 160 MiB: an EFI system partition (FAT32, 40 MiB), NTFS (48 MiB), Linux swap (4 MiB), ext2 (24 MiB,
    1 KiB blocks), a 1 MiB dynamic base and a 2 MiB child in which files are deleted and written."""
    g = GuestChain(root, "gpt", 160 * MiB, "label: gpt\n"
                   "size=40MiB, type=U, name=\"EFI system\"\n"
                   "size=48MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=data\n"
                   "size=4MiB, type=S, name=swap\n"
                   "size=24MiB, type=L, name=root\n")
    g.fat(1, 32, ["-s", "1"], {f"EFI/BOOT/e{i}.bin": d for i, d in enumerate(files(5, 6, 50_000, 900_000, "e")
                                                                             .values())})
    g.ntfs(2, [], {f"w{i}.bin": d for i, d in enumerate(files(6, 8, 100_000, 3_000_000, "w").values())})
    g.swap(3)
    g.ext(4, "ext2", ["-b", "1024"], {f"etc/c{i}.bin": d for i, d in enumerate(files(7, 8, 10_000, 900_000, "c")
                                                                              .values())})
    g.commit(root / "gpt-base.vhd", 1 * MiB)
    g.fat_change(1, ["EFI/BOOT/e1.bin", "EFI/BOOT/e4.bin"], {"EFI/new.bin": content(500, 700_000)})
    g.ntfs_change(2, ["w1.bin", "w3.bin", "w6.bin"], {"w8.bin": content(600, 1_500_000)})
    g.ext_change(4, ["etc/c2.bin", "etc/c5.bin"], {"etc/c9.bin": content(700, 400_000)})
    g.commit(root / "gpt-child.vhd", 2 * MiB)
    return g


# ------------------------------------------------------------------------------------------------ expectations


def free_sectors(g: GuestChain) -> dict[int, np.ndarray]:
    """Per partition number: the sectors its file system marks free (dumpe2fs for ext, the guest layer's
    tool-checked bitmaps of the partition's own image for NTFS and FAT); unknown partitions have none."""
    nsec = g.size // SECTOR
    out = {}
    for num, part in g.parts.items():
        if part.kind.startswith("ext"):
            out[num] = ext_free_sectors(part.image, nsec, part.offset)
        elif part.kind in ("ntfs", "fat16", "fat32"):
            out[num] = image_free_sectors(part, nsec)
        else:
            out[num] = np.zeros(nsec, dtype=bool)
    return out


def model_blocks(g: GuestChain, free_any: np.ndarray, block_size: int) -> dict[str, np.ndarray]:
    """Per block of ``block_size``: held by some layer / reads as zeros / every sector free or zero."""
    spb = block_size // SECTOR
    nsec = g.size // SECTOR
    nblk = -(-nsec // spb)

    def blocks(a: np.ndarray, fill: bool) -> np.ndarray:
        pad = np.full(nblk * spb, fill, dtype=bool)
        pad[:nsec] = a
        return pad.reshape(nblk, spb)

    zero_sec = ~nonzero_sectors(g.content())
    held = blocks(g.allocated(), False).any(axis=1)
    zero = held & blocks(zero_sec, True).all(axis=1)
    droppable = held & blocks(zero_sec | free_any, True).all(axis=1)
    return {"held": held, "zero": zero, "droppable": droppable}

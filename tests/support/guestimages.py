"""Real file systems built with their own tools, and the tools' own figures as oracles (helpers and fixtures).

Every image is a plain raw file (<= 64 MiB, or sparse) built once per session: file systems with mke2fs,
mkntfs, mkfs.vfat and populated/changed with debugfs, ntfscp/ntfstruncate, mtools; disks with sfdisk, the file
system images written at their partition offsets with dd.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

MiB = 1024 * 1024

# command -> Debian package (all listed in scripts/bootstrap.sh's DEB_PACKAGES)
TOOLS = {
    "mke2fs": "e2fsprogs", "debugfs": "e2fsprogs", "dumpe2fs": "e2fsprogs",
    "mkntfs": "ntfs-3g", "ntfscp": "ntfs-3g", "ntfsinfo": "ntfs-3g", "ntfstruncate": "ntfs-3g", "ntfsls": "ntfs-3g",
    "mkfs.vfat": "dosfstools", "fsck.fat": "dosfstools",
    "mcopy": "mtools", "mdel": "mtools", "mmd": "mtools", "mshowfat": "mtools",
    "mkfs.xfs": "xfsprogs", "xfs_db": "xfsprogs",
    "sfdisk": "fdisk", "mkswap": "util-linux", "dd": "coreutils",
}


def run(*cmd: str | os.PathLike, input: str | None = None) -> str:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", LC_ALL="C")
    p = subprocess.run([os.fspath(c) for c in cmd], input=input, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}): {p.stderr[-2000:]}")
    return p.stdout + p.stderr


@pytest.fixture(scope="session")
def guest_tools() -> None:
    """Install whatever file-system tool is missing (the suite runs as root on Debian, as bootstrap.sh does)."""
    missing = sorted({pkg for cmd, pkg in TOOLS.items()
                      if not shutil.which(cmd) and not Path("/usr/sbin", cmd).exists()
                      and not Path("/sbin", cmd).exists()})
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


class RawReader:
    """A raw image file as a DiskReader (a real file, read with pread); counts what it reads."""

    def __init__(self, path: os.PathLike | str, size: int | None = None) -> None:
        self.path = os.fspath(path)
        self.f = open(self.path, "rb")
        self.size = os.path.getsize(self.path) if size is None else size
        self.bytes_read = 0
        self.reads = 0

    def read(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        self.reads += 1
        self.bytes_read += n
        return os.pread(self.f.fileno(), n, offset)

    def close(self) -> None:
        self.f.close()


class BytesReader:
    """An image held in memory (for mutation tests: each mutant is one copy of a real image's bytes)."""

    def __init__(self, data: bytes | bytearray, path: str = "<mutant>") -> None:
        self.data = bytes(data)
        self.size = len(self.data)
        self.path = path

    def read(self, offset: int, n: int) -> bytes:
        return self.data[offset : offset + n]


def content(seed: int, n: int) -> bytes:
    """File content that is neither zero nor trivially compressible."""
    return random.Random(seed).randbytes(n)


def make_tree(root: Path, seed: int, count: int, max_size: int) -> list[str]:
    """A few directories of files; returns the file names relative to ``root``."""
    rnd = random.Random(seed)
    names = []
    for i in range(count):
        d = root / f"dir{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"file{i:02d}.bin"
        p.write_bytes(content(seed * 1000 + i, rnd.randrange(1, max_size)))
        names.append(str(p.relative_to(root)))
    return names


# ------------------------------------------------------------------------------------------------ ext2/3/4


@dataclass
class ExtImage:
    name: str
    path: Path
    files: list[str]  # files present in the final image (paths inside the file system)
    deleted: list[str] = field(default_factory=list)


def dumpe2fs_header(path: Path) -> dict[str, str]:
    out = run("dumpe2fs", "-h", path)
    return {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in out.splitlines() if ":" in l)}


def dumpe2fs_free_blocks(path: Path, nblocks: int, ratio: int = 1) -> np.ndarray:
    """Free blocks as dumpe2fs lists them group by group (a bool per block).

    Under bigalloc dumpe2fs names each free cluster range by the first blocks of its first and last clusters.
    """
    free = np.zeros(nblocks, dtype=bool)
    for line in run("dumpe2fs", path).splitlines():
        m = re.match(r"^\s+Free blocks: (.*)$", line)
        if not m:
            continue
        for part in filter(None, (p.strip() for p in m.group(1).split(","))):
            a, _, b = part.partition("-")
            free[int(a) : int(b or a) + ratio] = True
    return free


def debugfs_blocks(path: Path, name: str) -> list[int]:
    out = run("debugfs", "-R", f"blocks /{name}", path)
    return [int(x) for x in out.split() if x.isdigit()]


def build_ext(tmp: Path, name: str, size: int, mkfs: list[str], seed: int, sparse: bool = False) -> ExtImage:
    src = tmp / f"{name}-src"
    files = make_tree(src, seed, 12, 600_000) if not sparse else []
    img = tmp / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(size)
    run("mke2fs", "-q", "-F", *mkfs, *(["-d", src] if files else []), img)
    deleted: list[str] = []
    if files:
        # Delete some files (their blocks become free), then write new ones (which reuse some of that space).
        deleted = files[1:8:2]
        extra = []
        for i in range(3):
            p = tmp / f"{name}-new{i}.bin"
            p.write_bytes(content(seed * 77 + i, 300_000 + 200_000 * i))
            extra.append((p, f"dir{i}/new{i}.bin"))
        cmds = [f"rm /{d}" for d in deleted] + [f"write {p} /{n}" for p, n in extra]
        (tmp / f"{name}.debugfs").write_text("\n".join(cmds) + "\n")
        run("debugfs", "-w", "-f", tmp / f"{name}.debugfs", img)
        files = [f for f in files if f not in deleted] + [n for _, n in extra]
    return ExtImage(name, img, files, deleted)


EXT_VARIANTS = {
    # name: (size, mke2fs arguments)
    "ext4-64bit-flexbg": (48 * MiB, ["-t", "ext4", "-b", "4096", "-g", "2048", "-O", "64bit,flex_bg"]),
    "ext4-32bit-noflex": (40 * MiB, ["-t", "ext4", "-b", "4096", "-g", "4096", "-O", "^64bit,^flex_bg"]),
    "ext4-uninit-bg": (40 * MiB, ["-t", "ext4", "-b", "2048", "-g", "2048", "-O", "^metadata_csum,uninit_bg"]),
    "ext4-meta-bg": (32 * MiB, ["-t", "ext4", "-b", "1024", "-g", "512", "-O", "^resize_inode,meta_bg"]),
    "ext4-bigalloc": (64 * MiB, ["-t", "ext4", "-b", "4096", "-O", "bigalloc", "-C", "16384"]),
    "ext4-64k": (64 * MiB, ["-t", "ext4", "-b", "65536"]),
    "ext4-sparse-super2": (32 * MiB, ["-t", "ext4", "-b", "1024", "-g", "2048", "-O", "sparse_super2"]),
    "ext3": (40 * MiB, ["-t", "ext3", "-b", "4096", "-g", "4096"]),
    "ext2-1k": (32 * MiB, ["-t", "ext2", "-b", "1024"]),
    "ext2-nosparse": (24 * MiB, ["-t", "ext2", "-b", "1024", "-g", "1024", "-O", "^sparse_super,^resize_inode"]),
}


@pytest.fixture(scope="session")
def ext_images(guest_tools, tmp_path_factory) -> dict[str, ExtImage]:
    tmp = tmp_path_factory.mktemp("ext")
    return {name: build_ext(tmp, name, size, mkfs, seed)
            for seed, (name, (size, mkfs)) in enumerate(EXT_VARIANTS.items(), start=1)}


# ------------------------------------------------------------------------------------------------ NTFS


@dataclass
class NtfsImage:
    name: str
    path: Path
    files: list[str]
    truncated: list[str]


def ntfsinfo_counts(path: Path) -> tuple[int, int, int]:
    """(cluster size, clusters, free clusters) as ntfsinfo -m reports them."""
    out = run("ntfsinfo", "-m", path)
    cs = int(re.search(r"Cluster Size:\s*(\d+)", out).group(1))
    n = int(re.search(r"Volume Size in Clusters:\s*(\d+)", out).group(1))
    free = int(re.search(r"Free Clusters:\s*(\d+)", out).group(1))
    return cs, n, free


def ntfs_file_clusters(path: Path, name: str) -> list[tuple[int, int]]:
    """(lcn, length) runs of a file's $DATA per ntfsinfo."""
    out = run("ntfsinfo", "-v", "-F", name, path)
    runs = []
    in_runlist = False
    for line in out.splitlines():
        if "Runlist:" in line:
            in_runlist = True
            continue
        if in_runlist:
            parts = line.split()
            if len(parts) == 3 and all(p.startswith("0x") or p.startswith("-") for p in parts):
                if not parts[1].startswith("-"):
                    runs.append((int(parts[1], 16), int(parts[2], 16)))
                continue
            in_runlist = False
    return runs


def build_ntfs(tmp: Path, name: str, size: int, mkfs: list[str], seed: int) -> NtfsImage:
    img = tmp / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(size)
    run("mkntfs", "-F", "-Q", "-q", "-L", name[:16], *mkfs, img)
    files = []
    for i in range(8):
        p = tmp / f"{name}-{i}.bin"
        p.write_bytes(content(seed * 100 + i, 50_000 + 180_000 * (i % 4)))
        run("ntfscp", "-f", img, p, f"f{i}.bin")
        files.append(f"f{i}.bin")
    # "Delete" some: truncating a file's $DATA to zero frees its clusters; then write more into the holes.
    truncated = files[1:7:2]
    inodes = {n: i for i, n in (l.split() for l in run("ntfsls", "-i", "-f", img).splitlines() if l.strip())}
    for t in truncated:
        run("ntfstruncate", "-f", img, inodes[t], "0")
    for i in range(8, 11):
        p = tmp / f"{name}-{i}.bin"
        p.write_bytes(content(seed * 100 + i, 120_000))
        run("ntfscp", "-f", img, p, f"f{i}.bin")
        files.append(f"f{i}.bin")
    return NtfsImage(name, img, [f for f in files if f not in truncated], truncated)


NTFS_VARIANTS = {
    "ntfs-4k": (32 * MiB, []),
    "ntfs-512": (16 * MiB, ["-c", "512"]),
    "ntfs-64k": (48 * MiB, ["-c", "65536"]),
}


@pytest.fixture(scope="session")
def ntfs_images(guest_tools, tmp_path_factory) -> dict[str, NtfsImage]:
    tmp = tmp_path_factory.mktemp("ntfs")
    return {name: build_ntfs(tmp, name, size, mkfs, seed)
            for seed, (name, (size, mkfs)) in enumerate(NTFS_VARIANTS.items(), start=1)}


# ------------------------------------------------------------------------------------------------ FAT


@dataclass
class FatImage:
    name: str
    path: Path
    bits: int
    files: list[str]
    deleted: list[str]


def fsck_fat_clusters(path: Path) -> tuple[int, int]:
    """(used, total) data clusters from fsck.fat -n -v's last line."""
    m = re.search(r"(\d+) files?, (\d+)/(\d+) clusters", run("fsck.fat", "-n", "-v", path))
    return int(m.group(2)), int(m.group(3))


def fat_file_clusters(path: Path, name: str) -> list[int]:
    out = run("mshowfat", "-i", path, f"::{name}")
    clusters = []
    for a, b in re.findall(r"<(\d+)(?:-(\d+))?>", out):
        clusters.extend(range(int(a), int(b or a) + 1))
    return clusters


def build_fat(tmp: Path, name: str, size_kib: int, mkfs: list[str], bits: int, seed: int) -> FatImage:
    img = tmp / f"{name}.img"
    run("mkfs.vfat", "-C", "-F", str(bits), "-n", name[:11].upper(), *mkfs, img, str(size_kib))
    files = []
    run("mmd", "-i", img, "::sub")
    for i in range(10):
        p = tmp / f"{name}-{i}.bin"
        p.write_bytes(content(seed * 10 + i, 20_000 + 90_000 * (i % 3)))
        target = f"sub/f{i}.bin" if i % 2 else f"f{i}.bin"
        run("mcopy", "-i", img, p, f"::{target}")
        files.append(target)
    deleted = files[2:8:2]
    for d in deleted:
        run("mdel", "-i", img, f"::{d}")
    for i in range(10, 12):
        p = tmp / f"{name}-{i}.bin"
        p.write_bytes(content(seed * 10 + i, 150_000))
        run("mcopy", "-i", img, p, f"::f{i}.bin")
        files.append(f"f{i}.bin")
    return FatImage(name, img, bits, [f for f in files if f not in deleted], deleted)


FAT_VARIANTS = {
    "fat12": (8000, ["-s", "4"], 12),
    "fat16": (16000, ["-s", "2"], 16),
    "fat32": (40000, ["-s", "1"], 32),
    "fat32-4k": (300000, ["-s", "8"], 32),  # sparse-ish: 300 MB of which mostly untouched
}


@pytest.fixture(scope="session")
def fat_images(guest_tools, tmp_path_factory) -> dict[str, FatImage]:
    tmp = tmp_path_factory.mktemp("fat")
    return {name: build_fat(tmp, name, kib, mkfs, bits, seed)
            for seed, (name, (kib, mkfs, bits)) in enumerate(FAT_VARIANTS.items(), start=1)}


# ------------------------------------------------------------------------------------------------ XFS


@dataclass
class XfsImage:
    path: Path
    files: list[str]


def build_xfs(tmp: Path, name: str, seed: int, mkfs: list[str]) -> XfsImage:
    """XFS populated through a mkfs prototype file (no mount). Its 64 MiB internal log is the bulk of the image."""
    src = tmp / f"{name}-src"
    files = make_tree(src, seed, 12, 600_000)
    lines = ["boot", "0 0", "d--755 0 0"]
    for d in sorted({f.split("/")[0] for f in files}):
        lines.append(f"{d} d--755 0 0")
        for f in sorted(x for x in files if x.startswith(d + "/")):
            lines.append(f"{f.split('/')[1]} ---644 0 0 {src / f}")
        lines.append("$")
    lines.append("$")
    proto = tmp / f"{name}.proto"
    proto.write_text("\n".join(lines) + "\n")
    img = tmp / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(320 * MiB)
    run("mkfs.xfs", "-q", "-f", *mkfs, "-p", proto, img)
    return XfsImage(img, files)


def xfs_free_extents(path: Path, agblocks: int, nblocks: int) -> tuple[np.ndarray, int]:
    """Free blocks as xfs_db's freesp lists them (bnobt extents and free-list blocks), and its total."""
    out = run("xfs_db", "-r", "-c", "freesp -s -d", path)
    free = np.zeros(nblocks, dtype=bool)
    for agno, agbno, n in re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s*$", out, re.M):
        start = int(agno) * agblocks + int(agbno)
        free[start : start + int(n)] = True
    total = int(re.search(r"total free blocks (\d+)", out).group(1))
    return free, total


def xfs_file_blocks(path: Path, name: str, agblocks: int) -> list[tuple[int, int]]:
    out = run("xfs_db", "-r", "-c", f"path /{name}", "-c", "bmap", path)
    return [(int(a) * agblocks + int(b), int(n)) for a, b, n in
            re.findall(r"startblock \d+ \((\d+)/(\d+)\) count (\d+)", out)]


@pytest.fixture(scope="session")
def xfs_images(guest_tools, tmp_path_factory) -> dict[str, XfsImage]:
    tmp = tmp_path_factory.mktemp("xfs")
    return {"xfs-v5": build_xfs(tmp, "xfs-v5", 61, ["-d", "agcount=3"]),
            "xfs-1k": build_xfs(tmp, "xfs-1k", 62, ["-b", "size=1024", "-d", "agcount=4", "-l", "size=64m"]),
            "xfs-v4": build_xfs(tmp, "xfs-v4", 63, ["-m", "crc=0"])}


# ------------------------------------------------------------------------------------------------ disks


@dataclass
class DiskImage:
    path: Path
    scheme: str
    # partition number -> (kind, image path or None)
    layout: dict[int, tuple[str, Path | None]]


def put(disk: Path, image: Path, offset: int) -> None:
    """Write a file-system image into the disk at ``offset`` (conv=notrunc keeps the rest of the disk)."""
    run("dd", f"if={image}", f"of={disk}", "bs=64K", f"seek={offset}", "oflag=seek_bytes", "conv=notrunc,sparse",
        "status=none")


def sfdisk_json(disk: Path) -> dict:
    import json

    out = subprocess.run(["sfdisk", "-J", os.fspath(disk)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["partitiontable"]


@pytest.fixture(scope="session")
def small_fs(guest_tools, tmp_path_factory) -> dict[str, Path]:
    """Small file systems sized to fit the partitions of the disk fixtures."""
    tmp = tmp_path_factory.mktemp("small")
    out = {}
    out["ext4"] = build_ext(tmp, "p-ext4", 12 * MiB, ["-t", "ext4", "-b", "4096", "-g", "1024"], 41).path
    out["ext2"] = build_ext(tmp, "p-ext2", 6 * MiB, ["-t", "ext2", "-b", "1024"], 42).path
    out["ntfs"] = build_ntfs(tmp, "p-ntfs", 10 * MiB, [], 43).path
    out["fat16"] = build_fat(tmp, "p-fat16", 8 * 1024, ["-s", "1"], 16, 44).path
    out["fat32"] = build_fat(tmp, "p-fat32", 34 * 1024, ["-s", "1"], 32, 45).path
    swap = tmp / "swap.img"
    with open(swap, "wb") as f:
        f.truncate(2 * MiB)
    run("mkswap", swap)
    out["swap"] = swap
    return out


@pytest.fixture(scope="session")
def mbr_disk(small_fs, tmp_path_factory) -> DiskImage:
    """MBR: FAT16 (bootable), swap, a blank primary, an extended partition holding ext4, NTFS and ext2."""
    disk = tmp_path_factory.mktemp("mbr") / "mbr.img"
    with open(disk, "wb") as f:
        f.truncate(48 * MiB)
    run("sfdisk", "-q", disk, input=(
        "label: dos\n"
        "start=2048, size=8MiB, type=6, bootable\n"
        "size=2MiB, type=82\n"
        "size=34MiB, type=5\n"
        "start=45MiB, size=3MiB, type=83\n"  # primary 4, left blank
        "start=12MiB, size=12MiB, type=83\n"
        "start=25MiB, size=10MiB, type=7\n"
        "start=36MiB, size=6MiB, type=83\n"))
    layout = {1: ("fat16", small_fs["fat16"]), 2: ("swap", small_fs["swap"]), 4: ("blank", None),
              5: ("ext4", small_fs["ext4"]),
              6: ("ntfs", small_fs["ntfs"]), 7: ("ext2", small_fs["ext2"])}
    table = {p["node"][len(str(disk)):]: p for p in sfdisk_json(disk)["partitions"]}
    for num, (_, img) in layout.items():
        if img is not None:
            put(disk, img, table[str(num)]["start"] * 512)
    return DiskImage(disk, "mbr", layout)


@pytest.fixture(scope="session")
def gpt_disk(small_fs, tmp_path_factory) -> DiskImage:
    """GPT: an EFI system partition (FAT32), Linux ext4, Microsoft basic data NTFS, and an empty partition."""
    disk = tmp_path_factory.mktemp("gpt") / "gpt.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    run("sfdisk", "-q", disk, input=(
        "label: gpt\n"
        "size=34MiB, type=U, name=\"EFI system\"\n"
        "size=12MiB, type=L, name=root\n"
        "size=10MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=data\n"
        "size=2MiB, type=L, name=blank\n"))
    layout = {1: ("fat32", small_fs["fat32"]), 2: ("ext4", small_fs["ext4"]), 3: ("ntfs", small_fs["ntfs"]),
              4: ("blank", None)}
    table = {p["node"][len(str(disk)):]: p for p in sfdisk_json(disk)["partitions"]}
    for num, (_, img) in layout.items():
        if img is not None:
            put(disk, img, table[str(num)]["start"] * 512)
    return DiskImage(disk, "gpt", layout)

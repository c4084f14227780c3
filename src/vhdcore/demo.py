"""The README's main job on a built-in sample: a small server's disk chain, imaged the way a pipeline would.

``python -m vhdcore.demo [DIR]`` (``make demo``) builds a server-like chain with real tools — an ext4 file system
(e2fsprogs' mkfs.ext4 and debugfs) in an MBR partition (sfdisk), files written and deleted across two snapshots,
each snapshot holding only the sectors the guest changed, as a hypervisor would write them — and then runs the
whole imaging job on it: check the chain, print the growth report (why the VHD is bigger than what df shows),
export to a compressed file with the task states and a progress bar, print the digests, and (asked for explicitly,
after the delivery) coalesce the chain into its base in place.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile

from .cli import main as cli
from .ops.create import create, snapshot

MiB = 1024 * 1024
DISK_SIZE = 256 * MiB
PART_OFFSET = 1 * MiB  # the partition starts at LBA 2048, as fdisk and cloud images place it
CHUNK = 64 * 1024


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None and not os.path.exists(f"/sbin/{t}")]
    if missing:
        raise SystemExit(f"demo: missing tools {', '.join(missing)} (run 'make demo', which installs e2fsprogs and fdisk)")


def _tool(name: str) -> str:
    return shutil.which(name) or f"/sbin/{name}"


def _write_changes(disk, old: bytes, new: bytes) -> int:
    """Write into ``disk`` only the 64 KiB chunks that differ: what a guest's writes leave in a snapshot."""
    written = 0
    for off in range(0, len(new), CHUNK):
        chunk = new[off : off + CHUNK]
        if chunk != old[off : off + CHUNK]:
            disk.write(off, chunk)
            written += len(chunk)
    return written


def _fill_files(directory: str, rnd: random.Random, count: int, size: int, text: bool) -> None:
    os.makedirs(directory, exist_ok=True)
    words = [b"kernel", b"nginx", b"request", b"GET", b"200", b"cache", b"worker", b"timeout", b"db", b"user"]
    for i in range(count):
        with open(os.path.join(directory, f"file{i:03d}"), "wb") as f:
            if text:
                f.write(b" ".join(rnd.choice(words) for _ in range(size // 6))[:size])
            else:
                f.write(rnd.randbytes(size))


def build_server_chain(directory: str) -> str:
    """base.vhd (install) <- snap1.vhd (logs and an app written) <- leaf.vhd (a big download deleted, more logs)."""
    _need("mkfs.ext4", "debugfs", "sfdisk")
    rnd = random.Random(2026)
    work = tempfile.mkdtemp(prefix="build-", dir=directory)
    try:
        raw = os.path.join(work, "disk.raw")
        fs = os.path.join(work, "fs.img")
        with open(raw, "wb") as f:
            f.truncate(DISK_SIZE)
        subprocess.run([_tool("sfdisk"), "-q", raw], input=f"start={PART_OFFSET // 512}, type=83\n", text=True,
                       check=True, stdout=subprocess.DEVNULL)
        root = os.path.join(work, "root")
        _fill_files(os.path.join(root, "usr", "lib"), rnd, 40, 512 * 1024, text=False)
        _fill_files(os.path.join(root, "usr", "share", "doc"), rnd, 60, 64 * 1024, text=True)
        with open(fs, "wb") as f:
            f.truncate(DISK_SIZE - PART_OFFSET)
        _run(_tool("mkfs.ext4"), "-q", "-F", "-E", "lazy_itable_init=0,nodiscard", "-d", root, fs)

        def disk_bytes() -> bytes:
            with open(raw, "r+b") as r, open(fs, "rb") as f:
                r.seek(PART_OFFSET)
                shutil.copyfileobj(f, r, 4 * MiB)
            with open(raw, "rb") as r:
                return r.read()

        state = disk_bytes()
        base = os.path.join(directory, "base.vhd")
        with create(base, DISK_SIZE, block_size=2 * MiB) as d:
            _write_changes(d, bytes(len(state)), state)

        # Snapshot 1: the server runs; an application and its logs are written.
        _fill_files(os.path.join(work, "app"), rnd, 20, 1024 * 1024, text=False)
        _fill_files(os.path.join(work, "logs"), rnd, 30, 128 * 1024, text=True)
        cmds = ["mkdir /srv", "mkdir /var", "mkdir /var/log", "mkdir /srv/download"]
        cmds += [f"write {work}/app/file{i:03d} /srv/app{i:03d}" for i in range(20)]
        cmds += [f"write {work}/logs/file{i:03d} /var/log/log{i:03d}" for i in range(30)]
        big = os.path.join(work, "big.iso")
        with open(big, "wb") as f:
            f.write(rnd.randbytes(48 * MiB))
        cmds.append(f"write {big} /srv/download/big.iso")
        _debugfs(fs, cmds)
        new = disk_bytes()
        snap = os.path.join(directory, "snap1.vhd")
        with snapshot(base, snap) as d:
            _write_changes(d, state, new)
        state = new

        # Leaf: the big download and old logs are deleted (df shrinks, the VHD does not), new logs written.
        cmds = ["rm /srv/download/big.iso"] + [f"rm /var/log/log{i:03d}" for i in range(20)]
        _fill_files(os.path.join(work, "logs2"), rnd, 10, 256 * 1024, text=True)
        cmds += [f"write {work}/logs2/file{i:03d} /var/log/new{i:03d}" for i in range(10)]
        _debugfs(fs, cmds)
        new = disk_bytes()
        leaf = os.path.join(directory, "leaf.vhd")
        with snapshot(snap, leaf) as d:
            _write_changes(d, state, new)
        return leaf
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _debugfs(fs: str, cmds: list[str]) -> None:
    subprocess.run([_tool("debugfs"), "-w", "-f", "-", fs], input="\n".join(cmds) + "\n", text=True, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    directory = os.path.abspath(argv[0] if argv else tempfile.mkdtemp(prefix="vhdcore-demo-"))
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith((".vhd", ".zst", ".json", ".gz")):
            os.unlink(os.path.join(directory, name))
    print(f"== building a sample server chain in {directory} (ext4 in an MBR partition, two snapshots)")
    leaf = build_server_chain(directory)
    print("   base.vhd <- snap1.vhd <- leaf.vhd\n")
    steps = [
        ("vhdcore info", ["info", leaf]),
        ("vhdcore growth", ["growth", leaf]),
        ("vhdcore image (check, preflight, compact, export with zstd, digests, then the explicit in-place merge)",
         ["image", leaf, os.path.join(directory, "server-image.vhd.zst"), "--no-growth", "--compact", "full",
          "--coalesce-in-place", "--progress", "bar"]),
        ("vhdcore info of the coalesced base", ["info", os.path.join(directory, "base.vhd")]),
    ]
    for title, args in steps:
        print(f"$ {title}")
        rc = cli.main(args)
        print()
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())

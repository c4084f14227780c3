"""Checks shared by the export tests: does a decompressed package hold a chain's content, read by peer tools?"""
from __future__ import annotations

import os
from pathlib import Path

import vhdcore
from vhdcore.ops.check import check
from vhdcore.format.structs import DiskType, Footer
from support.vhdtest import qemu_raw, run

MiB = 1024 * 1024
DECOMPRESS = {"gzip": ["gzip", "-dc"], "zstd": ["zstd", "-dc"], "none": ["cat"]}
EXT = {"gzip": ".gz", "zstd": ".zst", "none": ""}


def decompress(path: Path, compression: str, out: Path) -> Path:
    """``path`` decompressed by the standard tool (gzip -dc, zstd -dc) into ``out``."""
    import subprocess

    with open(out, "wb") as f:
        subprocess.run([*DECOMPRESS[compression], str(path)], stdout=f, check=True)
    return out


def assert_package_holds(plain: Path, package: str, model: bytes, work: Path, depth: int) -> None:
    """``plain`` (an uncompressed package) holds ``model``: vhd and fixed through qemu-img, raw as bytes,
    chain-tar extracted by tar and opened as a ``depth``-layer chain; VHDs check clean."""
    size = len(model)
    if package == "vhd":
        assert qemu_raw(plain, work / "q.raw").read_bytes() == model
        assert check(plain).clean
    elif package == "fixed":
        rounded = -(-size // MiB) * MiB
        content = plain.read_bytes()
        assert len(content) == rounded + 512
        footer = Footer.parse(content[-512:])
        assert footer.current_size == rounded and footer.type == DiskType.FIXED
        assert content[:size] == model and not any(content[size:rounded])
        assert qemu_raw(plain, work / "q.raw").read_bytes()[:size] == model
        assert check(plain).clean
    elif package == "raw":
        assert plain.read_bytes() == model
    else:
        out = work / "extracted"
        out.mkdir()
        run(["tar", "-xf", plain, "-C", out])
        names = [f"{i}.vhd" for i in range(depth)]
        assert sorted(p.name for p in out.iterdir()) == sorted(names)
        with vhdcore.open(out / "0.vhd") as disk:
            assert [os.path.basename(im.path) for im in disk.layers] == names
            assert disk.read(0, disk.size) == model
        report = check(out / "0.vhd", chain=True)
        assert report.clean, [str(f) for f in report.findings]

"""vhdcore info: what Get-VHD and qemu-img info tell, for a disk and its chain."""
from __future__ import annotations

import argparse

from ..disk.chain import Disk, open_chain
from ..format.geometry import MAX_GEOMETRY, libvhd_chs, timestamp_to_datetime
from ..disk.image import Image
from ..format.structs import QEMU_TRUSTED_CREATORS
from ._common import add_open_arguments, human, print_json

NAME = "info"
HELP = "show a disk's type, sizes, allocation, creator, ids and chain"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_open_arguments(p)


def layer_info(img: Image) -> dict:
    f = img.footer
    d: dict = {
        "path": img.path,
        "type": img.disk_type.label,
        "virtual_size": img.size,
        "chs_size": img.chs_size,
        "geometry": {"cylinders": img.geometry.cylinders, "heads": img.geometry.heads,
                     "sectors_per_track": img.geometry.sectors_per_track},
        "file_size": img.file_size,
        "creator_app": f.creator_app_text,
        "creator_version": f.creator_version_text,
        "creator_os": f.creator_os_text,
        "timestamp": iso_utc(f.timestamp),
        "unique_id": str(f.unique_id),
        "saved_state": bool(f.saved_state),
        # What the two readers that look at creator and geometry make of them (README: compatibility).
        "qemu_size": img.size if (f.creator_app in QEMU_TRUSTED_CREATORS or img.geometry == MAX_GEOMETRY)
        else img.chs_size,
        "libvhd_geometry_ok": img.geometry.pack() <= libvhd_chs(img.size).pack(),
    }
    if img.is_fixed:
        d.update(block_size=None, allocated_blocks=None, allocated_bytes=img.size)
    else:
        n = int(len(img.allocated_blocks()))
        d.update(block_size=img.block_size, max_table_entries=img.max_table_entries, allocated_blocks=n,
                 allocated_bytes=n * img.block_size)
    if img.is_differencing:
        h = img.header
        d.update(parent_unique_id=str(h.parent_unique_id), parent_unicode_name=h.parent_unicode_name,
                 parent_timestamp=iso_utc(h.parent_timestamp),
                 parent_locators=[{"platform": src, "path": p} for src, p in img.parent_candidates() if src != "name"])
    d["warnings"] = list(img.warnings)
    return d


def iso_utc(ts: int) -> str:
    """A VHD timestamp (seconds since 2000-01-01 UTC) as ISO 8601 UTC, the form of every time in the JSON."""
    return timestamp_to_datetime(ts).strftime("%Y-%m-%dT%H:%M:%SZ")


def disk_info(disk: Disk) -> dict:
    leaf = layer_info(disk.leaf)
    leaf["chain_depth"] = len(disk.layers)
    leaf["chain"] = [layer_info(img) for img in disk.layers[1:]]
    if disk.leaf.is_differencing:
        leaf["parent_path"] = disk.layers[1].path
    leaf["warnings"] = list(disk.warnings)
    return leaf


def run(args: argparse.Namespace) -> int:
    with open_chain(args.path, "r", args.parent_dir, strict=not args.ignore_checksums) as disk:
        info = disk_info(disk)
    if args.json:
        print_json(info)
        return 0
    rows = [
        ("path", info["path"]),
        ("type", info["type"]),
        ("virtual size", f"{human(info['virtual_size'])} ({info['virtual_size']} bytes)"),
    ]
    if info["chs_size"] != info["virtual_size"] and info["geometry"]["cylinders"] != 65535:
        g = info["geometry"]
        rows.append(("CHS size", f"{human(info['chs_size'])} ({info['chs_size']} bytes; C/H/S "
                                 f"{g['cylinders']}/{g['heads']}/{g['sectors_per_track']}) - differs from the "
                                 "footer's size; Virtual PC sizes the disk by CHS"))
    rows.append(("file size", f"{human(info['file_size'])} ({info['file_size']} bytes)"))
    if info["block_size"]:
        rows.append(("block size", human(info["block_size"])))
        rows.append(("allocated", f"{info['allocated_blocks']} blocks, {human(info['allocated_bytes'])}"))
    rows += [
        ("creator", f"{info['creator_app']} {info['creator_version']} ({info['creator_os']})"),
        ("qemu reads", f"{human(info['qemu_size'])} ({info['qemu_size']} bytes"
                       + ("" if info["qemu_size"] == info["virtual_size"] else "; sized by CHS: creator not one "
                          "qemu trusts for the footer's size") + ")"),
        ("libvhd geometry", "accepted" if info["libvhd_geometry_ok"] else
         "too large for the size: vhd-util check rejects this footer"),
        ("timestamp", info["timestamp"]),
        ("unique id", info["unique_id"]),
    ]
    if "parent_unique_id" in info:
        rows.append(("parent", info.get("parent_path", "?")))
        rows.append(("parent id", info["parent_unique_id"]))
    rows.append(("chain depth", str(info["chain_depth"])))
    if info["saved_state"]:
        rows.append(("saved state", "yes"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for w in info["warnings"]:
        print(f"warning: {w}")
    return 0

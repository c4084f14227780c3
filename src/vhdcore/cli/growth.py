"""vhdcore growth: why the VHD is larger than the file systems in it, and what compaction would reclaim."""
from __future__ import annotations

import argparse

from ..ops.growth import SECONDS_PER_GB, GrowthReport, growth
from ._common import add_open_arguments, human, parse_size, print_json
from ._progress import add_progress_argument, progress_from_args

NAME = "growth"
HELP = "explain a chain's size: file-system use vs VHD allocation, deleted-file space, duplicates, imaging time"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--block-size", type=parse_size, default=None,
                   help="grid of the join and of the compaction estimate (default: the leaf's block size)")
    p.add_argument("--blocks", action="store_true", help="one row per allocated block (block_table in --json, a "
                   "table at the end of the text report)")
    add_progress_argument(p)
    add_open_arguments(p)


def run(args: argparse.Namespace) -> int:
    with progress_from_args(args, "growth") as progress:
        rep = growth(args.path, parent_dirs=args.parent_dir, strict=not args.ignore_checksums,
                     block_size=args.block_size, block_table=args.blocks, progress=progress)
    if args.json:
        print_json(rep.to_dict())
    else:
        print(render(rep))
        if args.blocks:
            print(render_blocks(rep))
    return 0


def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s // 60 % 60:02d} min"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def render(rep: GrowthReport) -> str:
    """The human report; it opens with the seed table (used vs VHD size, reclaimable, imaging estimate)."""
    est = rep.imaging_estimate_seconds
    after = rep.compacted_size["full"]
    lines = [f"{rep.path}: {len(rep.layers)} layer(s), {human(rep.virtual_size)} virtual disk", ""]
    lines += _table([
        ["", "used by file systems", "VHD files now", "after compaction"],
        ["size", human(rep.used_bytes), human(rep.file_size), human(after)],
        [f"imaging estimate ({SECONDS_PER_GB / 60:g} min/GB)", "", duration(est["now"]),
         duration(est["after_compaction"])],
    ], {1, 2, 3})
    lines.append(f"  reclaimable by compaction: {human(rep.reclaimable_bytes)}")
    lines.append("")
    free_alloc = sum(fs.free_allocated_bytes for fs in rep.filesystems)
    free_nz = sum(fs.free_allocated_nonzero_bytes for fs in rep.filesystems)
    lines.append("Where the VHD files' bytes go")
    block_bytes = sum(l.block_bytes for l in rep.layers)
    lines += _table([
        ["metadata (footers, header, BAT, locators, sector bitmaps)", human(rep.metadata_bytes)],
        ["block data areas", human(block_bytes)],
        ["  block space holding no data of the disk (unwritten sectors, past the end)",
         human(block_bytes - rep.allocated_bytes)],
        ["  duplicates of data a lower layer holds", human(rep.shadowed_bytes)],
        ["  blocks holding only zeros", human(rep.zero_block_bytes)],
        ["padding and space no structure refers to", human(sum(l.other_bytes for l in rep.layers))],
        ["deleted-file space the VHD holds (free in the file systems)", human(free_alloc)],
        ["  of which still holding deleted data", human(free_nz)],
    ], {1})
    lines.append("")
    lines.append("Layers (leaf first)")
    rows = [["file", "type", "size", "holds", "shadows lower", "zero blocks"]]
    for l in rep.layers:
        rows.append([l.path, l.type, human(l.file_size), human(l.allocated_bytes), human(l.shadowed_bytes),
                     f"{l.zero_blocks} ({human(l.zero_block_bytes)})"])
    lines += _table(rows, {2, 3, 4, 5})
    lines.append("")
    lines.append(f"Guest: {rep.partition_table} partition table")
    rows = [["partition", "file system", "offset", "size", "used", "VHD holds", "free held", "with data"]]
    for fs in rep.filesystems:
        unknown = fs.type == "unknown"
        rows.append(["-" if fs.partition is None else str(fs.partition), fs.type + ("" if fs.trusted or unknown
                     else " (untrusted)"), str(fs.offset), human(fs.size), "?" if unknown else human(fs.used_bytes),
                     human(fs.allocated_bytes), "-" if unknown else human(fs.free_allocated_bytes),
                     "-" if unknown else human(fs.free_allocated_nonzero_bytes)])
    lines += _table(rows, {2, 3, 4, 5, 6, 7})
    b = rep.blocks
    lines.append("")
    lines.append(f"Blocks of {human(rep.block_size)}: {b['allocated']} held, {b['zero']} all zeros, {b['free']} free in "
                 f"the file systems, {b['kept']} kept by compaction (zero mode: {human(rep.compacted_size['zero'])})")
    if rep.warnings:
        lines.append("")
        lines.append("Warnings")
        lines += [f"  - {w}" for w in rep.warnings]
    lines.append("")
    lines.append(f"analysed in {rep.seconds:.2f} s")
    return "\n".join(lines)


def render_blocks(rep: GrowthReport) -> str:
    """The ``--blocks`` table: one row per allocated block of the join grid."""
    rows = [["block", "offset", "allocated", "fs used", "free held", "with data", "zero", "compaction"]]
    for b in rep.block_table or []:
        rows.append([str(b["block"]), str(b["offset"]), human(b["allocated"]), human(b["fs_used"]),
                     human(b["free_allocated"]), human(b["free_allocated_nonzero"]), "yes" if b["zero"] else "no",
                     b["compact"]])
    return "\n".join([f"Blocks of {human(rep.block_size)} (allocated ones)"] + _table(rows, {0, 1, 2, 3, 4, 5}))

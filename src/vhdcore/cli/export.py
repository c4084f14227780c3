"""vhdcore export: package a chain (vhd, fixed, chain-tar, raw), compress it, digest it, store or upload it."""
from __future__ import annotations

import argparse

from ..delivery.compress import COMPRESSIONS
from ..delivery.export import DEFAULT_DIGESTS, PACKAGES, export
from ..delivery.upload import parse_destination
from ._progress import add_progress_argument, progress_from_args
from ._common import (LEVEL_HELP, add_open_arguments, add_overwrite_argument, add_remote_arguments,
                      compression_level, human, parse_size,
                      print_json, remote_options)

NAME = "export"
HELP = "package the chain, compress, checksum and write it to a file, swift://container/object or s3://bucket/key"


def _digests(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(a.strip().lower() for a in text.split(",") if a.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="the leaf of the chain (its parents are found as for every command)")
    p.add_argument("dest", help="a local path, swift://container/object (ST_AUTH/ST_USER/ST_KEY) or s3://bucket/key")
    p.add_argument("--package", choices=PACKAGES, default="vhd",
                   help="vhd: one new dynamic VHD (default); fixed: a fixed VHD rounded to whole MiB; chain-tar: the "
                        "chain's files as 0.vhd (leaf)..N.vhd (base) in a tar; raw: the virtual disk's bytes")
    p.add_argument("--compress", choices=("auto", *COMPRESSIONS), default="auto",
                   help="auto (default) picks by the destination's name: .gz gzip, .zst zstd, else none")
    p.add_argument("--level", type=int, default=None, help=LEVEL_HELP)
    p.add_argument("--long", action="store_true", help="zstd long-distance matching (128 MiB window)")
    p.add_argument("--threads", type=int, default=2, help="compression threads (default 2)")
    p.add_argument("--digests", type=_digests, default=DEFAULT_DIGESTS, metavar="LIST",
                   help="comma-separated digests of the delivered bytes (default md5,sha256,sha512; 'none')")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--manifest", default=None, metavar="PATH",
                   help="where to put the xxh3 manifest of the content (default DEST.xxh3.json beside DEST)")
    m.add_argument("--no-manifest", action="store_true", help="do not write the xxh3 manifest")
    p.add_argument("--block-size", type=parse_size, default=None, help="vhd package: block size (default the source's)")
    p.add_argument("--segment-size", type=parse_size, default=None,
                   help="swift: SLO segment size (default 1G, at most 5G); s3: part size (default 128M)")
    p.add_argument("--concurrency", type=int, default=None, help="parallel segment uploads (default 2)")
    p.add_argument("--no-fsync", action="store_true", help="local destination: skip the durability syncs")
    add_progress_argument(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_overwrite_argument(p, "DEST (and the manifest)")
    p.add_argument("--device", action="store_true",
                   help="DEST may be a block device: written in place (any other non-regular file is refused)")
    add_open_arguments(p)
    add_remote_arguments(p)


def run(args: argparse.Namespace) -> int:
    sink_options: dict = {}
    if parse_destination(args.dest)[0] == "file":
        if args.no_fsync:
            sink_options["fsync"] = False
        if args.segment_size or args.concurrency:
            raise ValueError("--segment-size and --concurrency apply to swift:// and s3:// destinations")
    else:
        if args.segment_size:
            sink_options["segment_size"] = args.segment_size
        if args.concurrency:
            sink_options["concurrency"] = args.concurrency
    sink_options.update(remote_options(args, args.dest))
    manifest = False if args.no_manifest else (args.manifest or True)
    level = compression_level(args.dest, args.compress, args.level)
    with progress_from_args(args, "export") as reporter:
        rep = export(args.src, args.dest, package=args.package, compression=args.compress, level=level,
                     long=args.long, threads=args.threads, digests=args.digests, manifest=manifest,
                     block_size=args.block_size, parent_dirs=args.parent_dir, strict=not args.ignore_checksums,
                     progress=reporter, overwrite=args.overwrite, device=args.device,
                     **sink_options)
    if args.json:
        print_json(rep.to_dict())
        return 0
    level = f"-{rep.level}" if rep.compression != "none" and rep.level is not None else ""
    print(f"{rep.destination}: {rep.package} package, {rep.compression}{level}: {human(rep.package_size)} -> "
          f"{human(rep.size)} (ratio {rep.ratio:.2f}) in {rep.seconds:.2f} s, {rep.throughput / 1e6:.0f} MB/s; "
          f"read {human(rep.bytes_read)} of {human(rep.virtual_size)} virtual")
    for alg, value in rep.digests.items():
        print(f"  {alg:<7} {value}")
    if rep.upload.segments:
        print(f"  {len(rep.upload.segments)} segment(s), etag {rep.upload.etag}"
              + (f", {len(rep.upload.retries)} retried" if rep.upload.retries else ""))
    if rep.manifest_path:
        print(f"  manifest {rep.manifest_path}")
    for w in rep.warnings:
        print(f"  warning: {w}")
    return 0

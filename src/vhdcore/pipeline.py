"""The whole imaging job, the way a pipeline runs it: check, preflight, growth report, export, (coalesce).

A server's disk is a chain base <- snapshot <- ... <- leaf. Imaging checks every layer, checks the destination
can take the image (preflight), reports why the disk is the size it is and what the image will cost, then
packages, compresses, check-sums and delivers the chain's content, reading through the chain. The source
files are never written unless the caller asks for the seed pipeline's in-place merge (``coalesce_in_place``),
which then runs last, once the image is delivered: nothing that can fail before it changes a source byte.
"""
from __future__ import annotations

import inspect
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .exceptions import CheckFailedError
from .progress import ProgressCallback, Stages, TaskState, as_progress


@dataclass
class ImagingReport:
    source: str
    destination: str
    check: dict
    growth: dict | None
    coalesce: dict | None
    compact: dict | None
    export: dict
    seconds: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "check": self.check,
                "growth": self.growth, "coalesce": self.coalesce, "compact": self.compact, "export": self.export,
                "seconds": round(sum(self.seconds.values()), 3), "stage_seconds": self.seconds,
                "warnings": self.warnings}


# Each stage's share of the whole job, for the percentage and ETA a user sees: roughly the bytes each moves
# relative to the export (check and preflight read metadata only; growth reads the file systems' bitmaps).
STAGE_WEIGHTS = {"check": 2, "preflight": 1, "growth": 10, "compact": 60, "export": 100, "coalesce": 50}


def _preflight(leaf: str, dest: str, *, package: str, compression: str, overwrite: bool,
               parent_dirs: Sequence[str] | None, export_options: dict[str, Any]) -> dict[str, Any]:
    """Check the destination can take the worst-case image, before anything long or irreversible starts."""
    from .disk.chain import open_chain
    from .delivery.export import compression_for, export as do_export
    from .delivery.packages import open_package
    from .delivery.upload.preflight import preflight, worst_case_output

    kind = compression_for(dest, compression)
    with open_chain(leaf, "r", parent_dirs) as disk:
        sources = [img.path for img in disk.layers]
        # zero_scan off: the package as large as it can be, and no read of the data for a number
        pkg = open_package(package, disk, None, zero_scan=False)
        size, zero = pkg.size, sum(n for _, n in getattr(pkg, "zero_ranges", ()))
    manifest = export_options.get("manifest", True) is not False
    needed = worst_case_output(size, kind, manifest, known_zero=zero)
    # what export() does not take itself goes to the sink: the same credentials and options the upload will use
    own = set(inspect.signature(do_export).parameters)
    sink_options = {k: v for k, v in export_options.items() if k not in own}
    return preflight(dest, needed=needed, sources=sources, overwrite=overwrite, manifest=manifest, **sink_options)


def image(
    leaf: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    coalesce_in_place: bool = False,
    analyse: bool = True,
    package: str = "vhd",
    compression: str = "auto",
    level: int | None = None,
    compact: str | None = None,
    overwrite: bool = False,
    parent_dirs: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    on_stage: Callable[[str, Any], None] | None = None,
    **export_options: Any,
) -> ImagingReport:
    """Image the chain ending at ``leaf`` into ``dest``.

    The source chain is only read: the image is exported through the chain (the output is byte-identical to
    exporting a coalesced base). First the chain is checked and the destination preflighted (local: the
    destination rule, a writable directory, free space for the worst-case output; Swift/S3: authentication
    and the container or bucket), so a job that cannot deliver fails before it starts.

    ``coalesce_in_place`` also merges every layer above the base into the base and removes them, as the seed
    pipeline did; it runs only after the image was delivered, so any failure before leaves every source file
    byte-identical. ``compact`` ("zero", "quick" or "full") first writes a compacted copy of the chain beside
    the leaf, so deleted-file space and zero blocks are not shipped; the copy is removed after the export.
    ``overwrite`` allows replacing an existing local destination. ``on_stage(name, result)`` is called after
    each stage with its report (for a CLI to print as it goes).
    """
    from .ops.check import check as do_check
    from .ops.coalesce import coalesce as do_coalesce
    from .delivery.export import export as do_export
    from .ops.growth import growth as do_growth
    from ._extras import require_scheme
    from .delivery.upload import parse_destination

    leaf = os.fspath(leaf)
    dest = os.fspath(dest)
    # Before the coalesce changes the chain: a destination whose client library is missing fails now.
    require_scheme(parse_destination(dest)[0])
    seconds: dict[str, float] = {}
    warnings: list[str] = []
    remote = "://" in dest and not dest.startswith("file://")
    wanted = {"check", "preflight", "export"} | ({"growth"} if analyse else set()) | (
        {"compact"} if compact else set()) | ({"coalesce"} if coalesce_in_place else set())
    stages = Stages(progress, {k: w for k, w in STAGE_WEIGHTS.items() if k in wanted})
    prog = as_progress(progress)

    t = time.monotonic()
    stages.stage("check", TaskState.PREPARING)(0, None)
    chk = do_check(leaf, chain=True, parent_dirs=parent_dirs)
    seconds["check"] = round(time.monotonic() - t, 3)
    if on_stage:
        on_stage("check", chk)
    errors = [f for f in chk.findings if getattr(f, "severity", "") == "error"]
    if errors:
        first = errors[0]
        raise CheckFailedError(f"chain check found {len(errors)} error(s), first: {first.code}: {first.message}",
                               path=first.path, offset=first.offset, field=first.field)

    t = time.monotonic()
    stages.stage("preflight", TaskState.PREPARING)(0, None)
    pre = _preflight(leaf, dest, package=package, compression=compression, overwrite=overwrite,
                     parent_dirs=parent_dirs, export_options=export_options)
    seconds["preflight"] = round(time.monotonic() - t, 3)
    if on_stage:
        on_stage("preflight", pre)

    gr = None
    if analyse:
        t = time.monotonic()
        gr = do_growth(leaf, parent_dirs=parent_dirs, progress=stages.stage("growth", TaskState.PREPARING))
        seconds["growth"] = round(time.monotonic() - t, 3)
        if on_stage:
            on_stage("growth", gr)

    source = leaf
    compacted = None
    cr = None
    if compact:
        from .ops.compact import compact as do_compact

        t = time.monotonic()
        fd, compacted = tempfile.mkstemp(prefix=".compacted-", suffix=".vhd", dir=os.path.dirname(os.path.abspath(leaf)))
        os.close(fd)
        os.unlink(compacted)
        cr = do_compact(leaf, compacted, mode=compact, parent_dirs=parent_dirs,
                        progress=stages.stage("compact", TaskState.PREPARING))
        seconds["compact"] = round(time.monotonic() - t, 3)
        warnings.extend(getattr(cr, "warnings", []) or [])
        if on_stage:
            on_stage("compact", cr)
        source = compacted

    t = time.monotonic()
    if not remote:
        export_options.setdefault("overwrite", overwrite)  # preflight applied the rule; the sink replaces
    try:
        ex = do_export(source, dest, package=package, compression=compression, level=level,
                       parent_dirs=parent_dirs,
                       progress=stages.stage("export", TaskState.UPLOADING if remote else TaskState.SAVING),
                       **export_options)
    finally:
        if compacted is not None and os.path.exists(compacted):
            os.unlink(compacted)
    seconds["export"] = round(time.monotonic() - t, 3)
    warnings.extend(ex.warnings)
    if on_stage:
        on_stage("export", ex)

    co = None
    if coalesce_in_place:
        from .disk.chain import open_chain

        with open_chain(leaf, "r", parent_dirs) as disk:
            depth = len(disk.layers)
            base = disk.layers[-1].path
        if depth > 1:
            t = time.monotonic()
            co = do_coalesce(leaf, into=base, remove_child=True, parent_dirs=parent_dirs,
                             progress=stages.stage("coalesce", TaskState.COALESCING))
            seconds["coalesce"] = round(time.monotonic() - t, 3)
            warnings.extend(co.warnings)
            if on_stage:
                on_stage("coalesce", co)
    prog(0, None, state=TaskState.COMPLETE)  # for callers that follow the states; a CLI reporter's finish() ends
    return ImagingReport(
        source=leaf, destination=dest, check=chk.to_dict(), growth=gr.to_dict() if gr else None,
        coalesce=co.to_dict() if co else None, compact=cr.to_dict() if cr else None, export=ex.to_dict(),
        seconds=seconds, warnings=warnings)

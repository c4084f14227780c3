"""The whole imaging job, the way a pipeline runs it: check, growth report, coalesce, export.

A server's disk is a chain base <- snapshot <- ... <- leaf. Imaging checks every layer, reports why the disk is
the size it is and what the image will cost, merges the chain into its base (so the snapshots' duplicates are
gone), then packages, compresses, check-sums and delivers the result. Progress is reported with the task states
the seed orchestrator understands (preparing/coalescing 25 %, saving/uploading 50 %, complete 100 %).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .exceptions import VHDError
from .progress import ProgressCallback, TaskState, as_progress


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
                "seconds": self.seconds, "warnings": self.warnings}


class CheckFailedError(VHDError):
    """The chain has findings severe enough that imaging it would ship a broken disk."""


def _stage(progress: ProgressCallback, state: TaskState) -> Callable[..., None]:
    """A progress callback for one stage that tags every update with the task state."""

    def cb(done: int, total: int | None = None, **info: Any) -> None:
        info.pop("state", None)
        progress(done, total, state=state, **info)

    return cb


def image(
    leaf: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    coalesce: bool = True,
    analyse: bool = True,
    package: str = "vhd",
    compression: str = "auto",
    level: int | None = None,
    compact: str | None = None,
    parent_dirs: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    on_stage: Callable[[str, Any], None] | None = None,
    **export_options: Any,
) -> ImagingReport:
    """Image the chain ending at ``leaf`` into ``dest``.

    With ``coalesce`` (the default) every layer above the base is merged into the base and removed, as the
    seed pipeline does before upload; without it the chain is exported as it is (export reads through it).
    ``compact`` ("zero", "quick" or "full") first writes a compacted copy of the (coalesced) disk beside it, so
    deleted-file space and zero blocks are not shipped; the copy is removed after the export.
    ``on_stage(name, result)`` is called after each stage with its report (for a CLI to print as it goes).
    """
    from .check import check as do_check
    from .coalesce import coalesce as do_coalesce
    from .export import export as do_export
    from .growth import growth as do_growth

    prog = as_progress(progress)
    leaf = os.fspath(leaf)
    dest = os.fspath(dest)
    seconds: dict[str, float] = {}
    warnings: list[str] = []

    t = time.monotonic()
    prog(0, None, state=TaskState.PREPARING)
    chk = do_check(leaf, chain=True, parent_dirs=parent_dirs)
    seconds["check"] = round(time.monotonic() - t, 3)
    if on_stage:
        on_stage("check", chk)
    errors = [f for f in chk.findings if getattr(f, "severity", "") == "error"]
    if errors:
        first = errors[0]
        raise CheckFailedError(f"chain check found {len(errors)} error(s), first: {first.code}: {first.message}",
                               path=first.path, offset=first.offset, field=first.field)

    # The destination rule before the chain is touched (coalesce changes it): a refusal must cost nothing.
    from .chain import open_chain
    from .destination import check_destination
    from .export import _manifest_file

    overwrite = bool(export_options.get("overwrite", False))
    with open_chain(leaf, "r", parent_dirs) as disk:
        chain_files = [img.path for img in disk.layers]
    if "://" not in dest or dest.startswith("file://"):
        local = dest[len("file://"):] if dest.startswith("file://") else dest
        check_destination(local, sources=chain_files, overwrite=overwrite,
                          allow_device=bool(export_options.get("device", False)))
        chain_files.append(local)
    mfile = _manifest_file(dest, export_options.get("manifest", True))
    if mfile is not None:
        check_destination(mfile, sources=chain_files, overwrite=overwrite)

    gr = None
    if analyse:
        t = time.monotonic()
        gr = do_growth(leaf, parent_dirs=parent_dirs)
        seconds["growth"] = round(time.monotonic() - t, 3)
        if on_stage:
            on_stage("growth", gr)

    co = None
    source = leaf
    if coalesce:
        from .chain import open_chain

        with open_chain(leaf, "r", parent_dirs) as disk:
            depth = len(disk.layers)
            base = disk.layers[-1].path
        if depth > 1:
            t = time.monotonic()
            co = do_coalesce(leaf, into=base, remove_child=True, parent_dirs=parent_dirs,
                             progress=_stage(prog, TaskState.COALESCING))
            seconds["coalesce"] = round(time.monotonic() - t, 3)
            warnings.extend(co.warnings)
            source = base
            if on_stage:
                on_stage("coalesce", co)

    compacted = None
    cr = None
    if compact:
        from .compact import compact as do_compact

        t = time.monotonic()
        fd, compacted = tempfile.mkstemp(prefix=".compacted-", suffix=".vhd", dir=os.path.dirname(os.path.abspath(source)))
        os.close(fd)
        os.unlink(compacted)
        cr = do_compact(source, compacted, mode=compact, parent_dirs=parent_dirs,
                        progress=_stage(prog, TaskState.PREPARING))
        seconds["compact"] = round(time.monotonic() - t, 3)
        warnings.extend(getattr(cr, "warnings", []) or [])
        if on_stage:
            on_stage("compact", cr)
        source = compacted

    t = time.monotonic()
    remote = "://" in dest
    try:
        ex = do_export(source, dest, package=package, compression=compression, level=level,
                       parent_dirs=parent_dirs,
                       progress=_stage(prog, TaskState.UPLOADING if remote else TaskState.SAVING), **export_options)
    finally:
        if compacted is not None and os.path.exists(compacted):
            os.unlink(compacted)
    seconds["export"] = round(time.monotonic() - t, 3)
    warnings.extend(ex.warnings)
    if on_stage:
        on_stage("export", ex)
    prog(1, 1, state=TaskState.COMPLETE)
    return ImagingReport(
        source=leaf, destination=dest, check=chk.to_dict(), growth=gr.to_dict() if gr else None,
        coalesce=co.to_dict() if co else None, compact=cr.to_dict() if cr else None, export=ex.to_dict(),
        seconds=seconds, warnings=warnings)

"""docs/json.md as the tests read it: each command's documented keys and the vocabulary's rules."""
from __future__ import annotations

import re

from support import TESTS

DOC = TESTS.parent / "docs" / "json.md"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
BANNED = {"target", "reference", "child", "parent", "throughput_mb_s", "target_kind", "reference_kind"}


def documented_keys() -> dict[str, set[str]]:
    """``### command`` followed by its ``keys:`` line, from docs/json.md."""
    out: dict[str, set[str]] = {}
    cmd = None
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            cmd = line[4:].strip()
        elif line.startswith("keys:") and cmd is not None:
            out[cmd] = {k.strip() for k in line[5:].split(",")}
            cmd = None
    return out


def check_rules(obj, where: str = "$") -> None:
    """The vocabulary's rules, at every depth of a document."""
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            check_rules(v, f"{where}[{i}]")
        return
    if not isinstance(obj, dict):
        return
    for k, v in obj.items():
        at = f"{where}.{k}"
        assert k not in BANNED, f"{at}: a role has one name (docs/json.md)"
        if k == "warnings":
            assert isinstance(v, list) and all(isinstance(w, str) for w in v), f"{at}: warnings are a list"
        if k in ("size", "package_size", "virtual_size", "file_size") or k.endswith("_bytes") or \
                k.startswith("bytes_") or (k.endswith("_size") and k not in ("block_size",)):
            vals = list(v.values()) if isinstance(v, dict) else [v]  # e.g. compacted_size per mode
            assert all(x is None or (isinstance(x, int) and not isinstance(x, bool)) for x in vals), \
                f"{at}: sizes are whole bytes"
        if k in ("time", "timestamp") or k.endswith(("_timestamp", "_time")):
            assert v is None or (isinstance(v, str) and ISO_UTC.match(v)), f"{at}: {v!r} is not ISO 8601 UTC"
        if k in ("seconds", "elapsed", "eta") or (k.endswith("_seconds") and not isinstance(v, dict)):
            assert v is None or isinstance(v, (int, float)) and not isinstance(v, bool), f"{at}: seconds"
        if k in ("throughput", "rate"):
            assert v is None or isinstance(v, int), f"{at}: bytes per second"
        check_rules(v, at)

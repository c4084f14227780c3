"""Issue 11: nothing a file or a URL names is trusted. One regression test per reproduced case: journals, shared
parents, the snapshot lock, temporary names, device destinations, object URLs, archive bombs, --ignore-checksums,
undo files, leftovers after crashes; and an audit hook proving where coalesce, export and repair write."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

import vhdcore
from vhdcore.coalesce import coalesce
from vhdcore.exceptions import CorruptImageError

from coalesce_support import content
from vhdtest import MiB, build_chain, file_sha256


def _bat_offset(path: Path) -> int:
    from vhdcore.image import Image
    with Image(path, "r") as img:
        return img.header.table_offset


# --------------------------------------------------------------------------------------------- 8. --ignore-checksums


@pytest.mark.backend_independent
def test_ignore_checksums_keeps_the_bat_overlap_check(tmp_path) -> None:
    paths, _ = build_chain(tmp_path, 2, size=4 * MiB, block_size=512 * 1024, writes=20, seed=8)
    base, child = paths
    to = _bat_offset(base)
    raw = bytearray(base.read_bytes())
    bat = struct.unpack_from(">8I", raw, to)
    used = [e for e in bat if e != 0xFFFFFFFF]
    assert len(used) >= 2
    struct.pack_into(">I", raw, to + 4 * bat.index(used[1]), used[0])  # two entries share one block's storage
    base.write_bytes(raw)
    before = {p: file_sha256(p) for p in paths}
    for strict in (True, False):
        with pytest.raises(vhdcore.VHDError, match="overlap"):
            coalesce(child, strict=strict)
    assert {p: file_sha256(p) for p in paths} == before

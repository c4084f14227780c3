"""The segment spool: bytes kept by reference in memory, the rest in a temporary file, read back any number of times."""
from __future__ import annotations

import hashlib
import os
import random

import pytest

from vhdcore.delivery.upload.segmented import CountingReader, Spool

pytestmark = pytest.mark.backend_independent


def pieces(seed: int, count: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.randbytes(rnd.choice((1, 511, 4096, 70_000, 300_001))) for _ in range(count)]


@pytest.mark.parametrize("memory", [0, 1, 100_000, 10**9])
def test_spool_reads_back_what_was_written_across_memory_and_file(tmp_path, memory: int) -> None:
    parts = pieces(memory, 40)
    data = b"".join(parts)
    spool = Spool(memory, str(tmp_path))
    for i, p in enumerate(parts):
        # bytes, bytearray and memoryview slices, as the sink hands them over
        spool.write(p if i % 3 == 0 else bytearray(p) if i % 3 == 1 else memoryview(b"x" + p)[1:])
    assert spool.size == len(data)
    assert spool.md5() == hashlib.md5(data).hexdigest()
    rnd = random.Random(1)
    for _ in range(3):  # every PUT attempt starts over and reads in its own block size
        spool.seek(0)
        block = rnd.choice((16_384, 65_537, 1 << 20))
        got = bytearray()
        while chunk := spool.read(block):
            assert len(chunk) <= block
            got += chunk
        assert got == data
    spool.seek(len(data) - 10)
    assert spool.read() == data[-10:] and spool.read(5) == b""
    spool.seek(-3, 2)
    assert spool.tell() == len(data) - 3
    spool.close()
    assert os.listdir(tmp_path) == []  # the temporary file had no name to leave behind


def test_spool_keeps_bytes_without_copying() -> None:
    spool = Spool(1 << 20)
    piece = os.urandom(4096)
    spool.write(piece)
    spool.seek(0)
    assert spool.read(4096) is piece


def test_counting_reader_reports_each_byte_once_in_batches() -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    spool = Spool(1 << 30)
    spool.write(data)
    seen: list[int] = []
    body = CountingReader(spool, len(data), seen.append)
    while body.read(16_384):
        pass
    assert sum(seen) == len(data) == body.reported
    assert len(seen) <= 4  # 16 KiB reads, reported per MiB and at the end
    body2 = CountingReader(spool, len(data), seen.append)  # a retry rewinds: a new reader from offset 0
    assert body2.read(10) == data[:10]

"""Digests of the delivered bytes (checked against hashlib over the output file) and the xxh3 manifest."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import xxhash

from vhdcore.delivery.compress import broadcast, open_compressor
from vhdcore.delivery.digests import StreamDigests, XXH3Manifest
from vhdcore.exceptions import InvalidFormatError, VerificationError
from vhdcore.delivery.upload.local import LocalSink

pytestmark = pytest.mark.backend_independent

KiB = 1024
MiB = 1024 * KiB


def file_hashes(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    return {a: hashlib.new(a, data).hexdigest() for a in ("md5", "sha256", "sha512")}


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_digests_of_the_delivered_file_equal_hashlib(tmp_path: Path, disk_bytes: bytes, kind: str) -> None:
    dest = tmp_path / f"image.{kind}"
    digests = StreamDigests()
    sink = LocalSink(dest, fsync=False)
    comp = open_compressor(kind, broadcast(digests, sink))
    for i in range(0, len(disk_bytes), 777_777):
        comp.write(disk_bytes[i : i + 777_777])
    comp.close()
    result = sink.close()
    assert digests.hexdigests() == file_hashes(dest)
    assert digests.size == result.size == dest.stat().st_size == comp.bytes_out


def test_pieces_of_any_size_and_type(disk_bytes: bytes) -> None:
    d = StreamDigests(queue_chunks=2)
    big = disk_bytes * 2  # > 4 MiB: split into zero-copy pieces
    d.update(big)
    d.update(bytearray(b"abc"))
    d.update(memoryview(b"0123456789")[2:7])
    d.update(b"")
    whole = big + b"abc" + b"23456"
    assert d.hexdigests() == {a: hashlib.new(a, whole).hexdigest() for a in ("md5", "sha256", "sha512")}
    assert d.size == len(whole)
    # hexdigests() is idempotent and the object refuses more data afterwards
    assert d.hexdigests()["md5"] == hashlib.md5(whole).hexdigest()
    with pytest.raises(ValueError):
        d.update(b"late")


def test_each_algorithm_hashes_in_its_own_thread() -> None:
    before = set(threading.enumerate())
    d = StreamDigests()
    mine = set(threading.enumerate()) - before
    assert {t.name for t in mine} == {"vhdcore-digest-md5", "vhdcore-digest-sha256", "vhdcore-digest-sha512"}
    d.update(os.urandom(100_000))
    d.hexdigests()
    assert not any(t.is_alive() for t in mine)  # the threads end with hexdigests()


def test_empty_stream_and_glance_properties() -> None:
    d = StreamDigests()
    props = d.glance_properties()
    assert props == {
        "checksum": hashlib.md5(b"").hexdigest(),
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(b"").hexdigest(),
        "size": 0,
    }
    with pytest.raises(ValueError):
        StreamDigests(("md5", "no-such-hash"))


def test_manifest_blocks_match_xxh3_of_each_block(disk_bytes: bytes) -> None:
    bs = 64 * KiB
    m = XXH3Manifest(block_size=bs)
    pos = 0
    for n in (1, 70_000, 3, 200_000, 65_536) * 40:
        m.update(disk_bytes[pos : pos + n])
        pos += n
    m.update(disk_bytes[pos:])
    m.finish()
    assert m.size == len(disk_bytes)
    assert len(m) == -(-len(disk_bytes) // bs)
    for e in m.entries:
        assert e.digest == xxhash.xxh3_128_hexdigest(disk_bytes[e.offset : e.offset + e.length])
    assert m.entries[-1].length == len(disk_bytes) % bs


def test_update_zeros_equals_feeding_zeros() -> None:
    bs = 16 * KiB
    a, b = XXH3Manifest(bs), XXH3Manifest(bs)
    for m, zeros in ((a, lambda n: a.update(bytes(n))), (b, b.update_zeros)):
        m.update(b"head" * 1000)
        zeros(5 * bs + 123)
        m.update(b"\x01" * 100)
        zeros(bs)
        m.finish()
    assert a.to_dict() == b.to_dict()
    assert a == b


def test_manifest_json_round_trip_and_verify(tmp_path: Path, disk_bytes: bytes) -> None:
    m = XXH3Manifest(32 * KiB)
    m.update(disk_bytes)
    path = tmp_path / "image.xxh3.json"
    m.dump(path)
    doc = json.loads(path.read_text())
    assert doc["algorithm"] == "xxh3_128" and doc["size"] == len(disk_bytes)
    assert doc["blocks"][1] == [32 * KiB, 32 * KiB, xxhash.xxh3_128_hexdigest(disk_bytes[32 * KiB : 64 * KiB])]
    loaded = XXH3Manifest.load(path)
    assert loaded == m
    loaded.verify(m)

    damaged = bytearray(disk_bytes)
    damaged[3 * MiB + 17] ^= 1
    other = XXH3Manifest(32 * KiB)
    other.update(damaged)
    assert m.mismatches(other) == [(3 * MiB, 32 * KiB)]
    with pytest.raises(VerificationError) as ei:
        m.verify(other, path="copy.raw")
    assert ei.value.offset == 3 * MiB and "copy.raw" in str(ei.value)

    shorter = XXH3Manifest(32 * KiB)
    shorter.update(disk_bytes[:-1])
    with pytest.raises(VerificationError, match="size"):
        m.verify(shorter)


@pytest.mark.parametrize(
    "doc,field",
    [
        ("[]", "manifest"),
        ('{"algorithm": "md5", "block_size": 4096, "size": 0, "blocks": []}', "algorithm"),
        ('{"algorithm": "xxh3_128", "block_size": 1000, "size": 0, "blocks": []}', "block_size"),
        ('{"algorithm": "xxh3_128", "block_size": 4096, "size": -1, "blocks": []}', "size"),
        ('{"algorithm": "xxh3_128", "block_size": 4096, "size": 4097, "blocks": []}', "blocks"),
        ('{"algorithm": "xxh3_128", "block_size": 4096, "size": 10, "blocks": [[0, 9, "%s"]]}' % ("0" * 32), "blocks[0]"),
        ("{not json", "json"),
    ],
)
def test_malformed_manifest_names_the_field(doc: str, field: str) -> None:
    with pytest.raises(InvalidFormatError) as ei:
        XXH3Manifest.from_json(doc, path="m.json")
    assert ei.value.field == field and ei.value.path == "m.json"


def test_abandoned_digests_stop_their_threads() -> None:
    import gc
    import time

    before = set(threading.enumerate())
    d = StreamDigests()
    d.update(b"x" * 1000)
    mine = set(threading.enumerate()) - before
    del d
    gc.collect()
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in mine) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in mine)

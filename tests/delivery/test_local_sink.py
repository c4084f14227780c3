"""The local file sink: atomic (nothing at the final name until close), abort leaves nothing."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from vhdcore.delivery.upload import UploadError, open_sink, parse_destination
from vhdcore.delivery.upload.local import LocalSink

pytestmark = pytest.mark.backend_independent


def test_write_close_renames_into_place(tmp_path: Path, disk_bytes: bytes) -> None:
    dest = tmp_path / "image.vhd.gz"
    seen: list[tuple] = []
    sink = open_sink(str(dest), progress=lambda d, t, **i: seen.append((d, t, i.get("state"))))
    assert isinstance(sink, LocalSink)
    for i in range(0, len(disk_bytes), 1_000_001):
        sink.write(disk_bytes[i : i + 1_000_001])
        # no partial file is ever visible at the final name; the temp file sits beside it
        assert not dest.exists()
        assert Path(sink.temp_path).parent == tmp_path
    result = sink.close()
    assert dest.read_bytes() == disk_bytes
    assert result.size == len(disk_bytes) and result.destination == str(dest)
    assert os.listdir(tmp_path) == ["image.vhd.gz"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask
    assert seen[-1] == (len(disk_bytes), len(disk_bytes), "saving")
    assert sink.close() is result  # idempotent


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "x.raw")
    sink.write(b"partial" * 1000)
    assert len(os.listdir(tmp_path)) == 1  # the temporary file
    sink.abort()
    sink.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        sink.close()


def test_exception_in_with_block_aborts(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with open_sink(f"file://{tmp_path}/y.raw") as sink:
            sink.write(b"abc")
            raise RuntimeError("producer died")
    assert os.listdir(tmp_path) == []


def test_clean_with_block_commits(tmp_path: Path) -> None:
    with open_sink(tmp_path / "z.raw") as sink:
        sink.write(b"abc")
    assert (tmp_path / "z.raw").read_bytes() == b"abc"
    assert sink.result is not None and sink.result.size == 3


def test_replacing_an_existing_file_is_atomic(tmp_path: Path) -> None:
    dest = tmp_path / "image.raw"
    dest.write_bytes(b"old image")
    sink = LocalSink(dest, md5=True)
    sink.write(b"new image, longer")
    assert dest.read_bytes() == b"old image"  # readers see the old file until close
    result = sink.close()
    assert dest.read_bytes() == b"new image, longer"
    assert result.etag == hashlib.md5(b"new image, longer").hexdigest()


def test_no_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "keep.raw"
    dest.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        LocalSink(dest, overwrite=False)
    sink = LocalSink(tmp_path / "new.raw", overwrite=False)
    sink.write(b"1")
    (tmp_path / "new.raw").write_bytes(b"appeared meanwhile")
    with pytest.raises(FileExistsError):
        sink.close()
    assert (tmp_path / "new.raw").read_bytes() == b"appeared meanwhile"
    assert sorted(os.listdir(tmp_path)) == ["keep.raw", "new.raw"]


def test_destination_parsing() -> None:
    assert parse_destination("/a/b.vhd") == ("file", "", "/a/b.vhd")
    assert parse_destination("file:///a/b%20c.vhd") == ("file", "", "/a/b c.vhd")
    assert parse_destination("swift://images/dir/obj.vhd.gz") == ("swift", "images", "dir/obj.vhd.gz")
    assert parse_destination("s3://bucket/k/e/y") == ("s3", "bucket", "k/e/y")
    for bad in ("swift://images", "s3:///key", "ftp://x/y", "", "swift://c/o?x=1", "file://host/x"):
        with pytest.raises(ValueError):
            parse_destination(bad)
    assert issubclass(UploadError, Exception)

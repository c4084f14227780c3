"""The destination rule every writing command shares (vhdcore.destination)."""
import os
import stat

import pytest

from vhdcore.destination import DestinationError, DestinationExistsError, check_destination
from vhdcore.fileio import atomic_output

pytestmark = pytest.mark.backend_independent  # path and file rules only: no kernel


def test_new_file_in_existing_directory(tmp_path):
    assert check_destination(tmp_path / "out.vhd") == str(tmp_path / "out.vhd")


def test_missing_directory_refused(tmp_path):
    with pytest.raises(DestinationError, match="does not exist"):
        check_destination(tmp_path / "nope" / "out.vhd")


def test_existing_file_needs_overwrite(tmp_path):
    p = tmp_path / "out.vhd"
    p.write_bytes(b"x")
    with pytest.raises(DestinationExistsError, match="--overwrite"):
        check_destination(p)
    with pytest.raises(FileExistsError):  # callers that catch the builtin still work
        check_destination(p)
    assert check_destination(p, overwrite=True) == str(p)


@pytest.mark.parametrize("how", ["path", "symlink", "hardlink", "dotdot"])
def test_source_file_refused_even_with_overwrite(tmp_path, how):
    src = tmp_path / "base.vhd"
    src.write_bytes(b"disk")
    (tmp_path / "sub").mkdir()
    if how == "path":
        dest = src
    elif how == "symlink":
        dest = tmp_path / "link.vhd"
        dest.symlink_to(src)
    elif how == "hardlink":
        dest = tmp_path / "hard.vhd"
        os.link(src, dest)
    else:
        dest = tmp_path / "sub" / ".." / "base.vhd"
    with pytest.raises(DestinationError, match="source chain"):
        check_destination(dest, sources=[src], overwrite=True)
    assert src.read_bytes() == b"disk"


def test_devices_and_fifos_refused(tmp_path):
    with pytest.raises(DestinationError, match="character device"):
        check_destination("/dev/null", overwrite=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DestinationError, match="FIFO"):
        check_destination(fifo, overwrite=True)
    with pytest.raises(DestinationError, match="directory"):
        check_destination(tmp_path, overwrite=True)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_dangling_symlink_is_an_existing_name(tmp_path):
    link = tmp_path / "out.vhd"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(DestinationExistsError, match="symlink"):
        check_destination(link)


def test_atomic_output_ignores_planted_symlinks(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    # Whatever name a predictable scheme would pick, a symlink there must not be followed.
    for i in range(50):
        (tmp_path / f".out.vhd.{i}.tmp").symlink_to(victim)
    with atomic_output(tmp_path / "out.vhd") as (fd, tmp):
        assert not os.path.islink(tmp)
        os.write(fd, b"new")
    assert (tmp_path / "out.vhd").read_bytes() == b"new"
    assert victim.read_bytes() == b"keep"


def test_atomic_output_removes_temp_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "out.vhd") as (fd, tmp):
            os.write(fd, b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []

"""CHS geometry: the specification's algorithm, checked against what qemu-img, Windows, Hyper-V and Virtual PC wrote."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vhdcore.format.geometry import (
    MAX_CHS_SECTORS,
    MAX_GEOMETRY,
    VHD_EPOCH,
    Geometry,
    chs_from_size,
    geometry_for_new_disk,
    timestamp_to_datetime,
    vhd_timestamp,
)
from support.vhdtest import run

pytestmark = pytest.mark.backend_independent

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"
GiB = 1024**3


def footer_fields(path: Path) -> tuple[int, Geometry]:
    blob = path.read_bytes()[-512:]
    size, geo = struct.unpack_from(">QI", blob, 48)
    return size, Geometry.unpack(geo)


def spec_chs(total_sectors: int) -> tuple[int, int, int]:
    """The specification's appendix, transcribed line by line (floating point where the spec divides)."""
    if total_sectors > 65535 * 16 * 255:
        total_sectors = 65535 * 16 * 255
    if total_sectors >= 65535 * 16 * 63:
        sectors_per_track = 255
        heads = 16
        cylinder_times_heads = total_sectors // sectors_per_track
    else:
        sectors_per_track = 17
        cylinder_times_heads = total_sectors // sectors_per_track
        heads = (cylinder_times_heads + 1023) // 1024
        if heads < 4:
            heads = 4
        if cylinder_times_heads >= heads * 1024 or heads > 16:
            sectors_per_track = 31
            heads = 16
            cylinder_times_heads = total_sectors // sectors_per_track
        if cylinder_times_heads >= heads * 1024:
            sectors_per_track = 63
            heads = 16
            cylinder_times_heads = total_sectors // sectors_per_track
    return cylinder_times_heads // heads, heads, sectors_per_track


@pytest.mark.parametrize("sectors", [1, 17, 68, 4095, 20480, 69632, 69633, 1032192, 2 * 1024 * 1024,
                                     65535 * 16 * 63 - 1, 65535 * 16 * 63, 65535 * 16 * 255 - 1,
                                     65535 * 16 * 255, 65535 * 16 * 255 + 1, 2040 * GiB // 512])
def test_spec_algorithm(sectors: int) -> None:
    assert tuple(chs_from_size(sectors * 512)) == spec_chs(sectors)


def test_known_sizes() -> None:
    # 4 MiB: what Windows 10 recorded for the dfvfs NTFS disks.
    assert chs_from_size(4 * 1024**2) == Geometry(120, 4, 17)
    # 127 GiB (Hyper-V's default): every spt=255 row.
    assert chs_from_size(136365211648) == Geometry(65278, 16, 255)
    assert chs_from_size(2040 * GiB) == MAX_GEOMETRY == Geometry(65535, 16, 255)
    assert MAX_GEOMETRY.total_sectors == MAX_CHS_SECTORS
    # Every size over the cap gives the cap.
    assert chs_from_size(MAX_CHS_SECTORS * 512 + 10 * GiB) == MAX_GEOMETRY


def test_virtual_pc_chs_size_of_corpus_disk() -> None:
    size, geo = footer_fields(CORPUS / "qemu/virtualpc-dynamic.vhd")
    assert size == 136365211648
    assert geo == chs_from_size(size)
    assert geo.size == 136363130880  # what Virtual PC (and qemu for "vpc " disks) take as the disk size


@pytest.mark.parametrize("name", ["dfvfs/ntfs-fixed.vhd", "dfvfs/ntfs-dynamic.vhd", "dfvfs/ntfs-differential.vhd",
                                  "dfvfs/ext2.vhd", "qemu/hyperv2012r2-dynamic.vhd", "qemu/virtualpc-dynamic.vhd"])
def test_other_writers_use_the_spec_algorithm(name: str) -> None:
    size, geo = footer_fields(CORPUS / name)
    assert chs_from_size(size) == geo


@pytest.mark.parametrize("requested", ["1M", "10M", "33M", "100M", "127M", "500M", "3G", "31G", "32G", "127G",
                                       "200G", "2040G", "20000K"])
def test_qemu_img_geometry(tmp_path: Path, requested: str) -> None:
    """qemu-img create -f vpc sizes the disk by the spec's CHS (rounded up) and records that geometry."""
    p = tmp_path / "q.vhd"
    run(["qemu-img", "create", "-q", "-f", "vpc", p, requested])
    size, geo = footer_fields(p)
    assert chs_from_size(size) == geo
    if geo != MAX_GEOMETRY:
        assert geo.size == size
        assert geometry_for_new_disk(size) == geo


def test_geometry_pack_unpack() -> None:
    g = Geometry(65278, 16, 255)
    assert g.pack() == 0xFEFE10FF
    assert Geometry.unpack(g.pack()) == g
    assert Geometry.unpack(0xFFFFFFFF) == Geometry(65535, 255, 255)
    assert g.total_sectors == 65278 * 16 * 255 and g.size == g.total_sectors * 512


@pytest.mark.parametrize("size", [4 * 1024**2, 8 * 1024**2 + 512, 10 * 1024**3, 2040 * GiB, 512])
def test_geometry_for_new_disk(size: int) -> None:
    """Always the spec's CHS: libvhd rejects a larger geometry; qemu trusts the creator (qem2) for the size."""
    assert geometry_for_new_disk(size) == chs_from_size(size)


def test_timestamps() -> None:
    assert vhd_timestamp(VHD_EPOCH) == 0
    assert vhd_timestamp(VHD_EPOCH - 100) == 0  # clamped, not negative
    assert vhd_timestamp(VHD_EPOCH + 2**33) == 0xFFFFFFFF
    assert vhd_timestamp(VHD_EPOCH + 12345.9) == 12345
    assert timestamp_to_datetime(0).isoformat() == "2000-01-01T00:00:00+00:00"
    assert timestamp_to_datetime(86400 * 366).year == 2001  # 2000 was a leap year
    now = vhd_timestamp()
    assert abs(now - vhd_timestamp(None)) <= 1 and now > 700_000_000

"""NTFS cluster allocation, read from the boot sector, the MFT and the $Bitmap system file.

Path to the bitmap: boot sector -> MFT record 0 ($MFT, whose $DATA runs locate every record) -> MFT record 6
($Bitmap) -> its unnamed $DATA attribute, non-resident, decoded from its mapping pairs. Records are checked
("FILE" signature) and their update-sequence fixups applied. When $Bitmap's $DATA is spread over several records
an $ATTRIBUTE_LIST in the base record names them; that is followed too (bounded).

Used clusters are the set bits among the volume's ``total_sectors / sectors_per_cluster`` clusters, the figure
``ntfsinfo -m`` derives its "Free Clusters" from.
"""
from __future__ import annotations

import struct

import numpy as np

from .base import FileSystemUsage, Region, clear_tail, count_set_bits

__all__ = ["is_ntfs", "read_ntfs", "decode_runs"]

FIXUP_STRIDE = 512  # update sequence arrays protect every 512 bytes, whatever the sector size
MFT_RECORD_MFT = 0
MFT_RECORD_VOLUME = 3
MFT_RECORD_BITMAP = 6
AT_VOLUME_NAME = 0x60
AT_ATTRIBUTE_LIST = 0x20
AT_DATA = 0x80
AT_END = 0xFFFFFFFF
MAX_RUNS = 1 << 20  # mapping pairs decoded per attribute
MAX_ATTRS_PER_RECORD = 512
MAX_EXTENT_RECORDS = 256  # records an attribute list may send us to


def is_ntfs(region: Region) -> bool:
    return region.size >= 512 and region.read(3, 8, "ntfs.oem_id") == b"NTFS    "


def decode_runs(data: bytes, start: int, end: int, lowest_vcn: int, nclusters: int, err, base_off: int,
                ) -> list[tuple[int, int, int | None]]:
    """Mapping pairs -> ``[(vcn, length, lcn or None for a sparse run)]``.

    Each pair is a header byte (low nibble: bytes of the length, high nibble: bytes of the signed LCN delta),
    the length, then the delta from the previous run's LCN. Runs must stay inside the volume.
    """
    runs: list[tuple[int, int, int | None]] = []
    pos = start
    vcn = lowest_vcn
    lcn = 0
    while True:
        if pos >= end:
            raise err("mapping pairs run past their attribute", base_off + pos, "ntfs.mapping_pairs", pos)
        header = data[pos]
        if header == 0:
            return runs
        if len(runs) >= MAX_RUNS:
            raise err(f"more than {MAX_RUNS} data runs", base_off + pos, "ntfs.mapping_pairs", len(runs))
        nlen, noff = header & 0x0F, header >> 4
        if nlen == 0 or nlen > 8 or noff > 8 or pos + 1 + nlen + noff > end:
            raise err("malformed mapping pair header", base_off + pos, "ntfs.mapping_pairs", header)
        length = int.from_bytes(data[pos + 1 : pos + 1 + nlen], "little", signed=True)
        if length <= 0 or length > nclusters:
            raise err("data run length out of range", base_off + pos, "ntfs.run_length", length)
        if noff == 0:
            runs.append((vcn, length, None))
        else:
            lcn += int.from_bytes(data[pos + 1 + nlen : pos + 1 + nlen + noff], "little", signed=True)
            if lcn < 0 or lcn + length > nclusters:
                raise err(f"data run [{lcn}, {lcn + length}) outside the volume's {nclusters} clusters",
                          base_off + pos, "ntfs.run_lcn", lcn)
            runs.append((vcn, length, lcn))
        vcn += length
        pos += 1 + nlen + noff


class _Volume:
    def __init__(self, region: Region) -> None:
        self.region = region
        err = region.error
        bs = region.read(0, 512, "ntfs.boot_sector")
        if bs[3:11] != b"NTFS    ":
            raise err("no NTFS boot sector", 3, "ntfs.oem_id", bs[3:11])
        bps, spc_raw = struct.unpack_from("<HB", bs, 0x0B)
        total_sectors, mft_lcn, _mirr_lcn = struct.unpack_from("<QQQ", bs, 0x28)
        cpr, = struct.unpack_from("<b", bs, 0x40)
        self.serial, = struct.unpack_from("<Q", bs, 0x48)
        if bps not in (256, 512, 1024, 2048, 4096):
            raise err("bytes per sector must be a power of two in [256, 4096]", 0x0B, "ntfs.bytes_per_sector", bps)
        # Values over 0x80 encode 2^(256 - value) sectors (used for clusters over 64 KiB).
        spc = spc_raw if spc_raw <= 0x80 else 1 << (256 - spc_raw) if 256 - spc_raw <= 12 else 0
        if spc == 0 or spc & (spc - 1):
            raise err("sectors per cluster is not a power of two", 0x0D, "ntfs.sectors_per_cluster", spc_raw)
        self.bps = bps
        self.cluster_size = cs = bps * spc
        if cs > 2 * 1024 * 1024:
            raise err("cluster size over 2 MiB", 0x0D, "ntfs.sectors_per_cluster", spc_raw)
        if total_sectors == 0 or total_sectors * bps > region.size:
            raise err(f"volume of {total_sectors} sectors is larger than its partition ({region.size} bytes)",
                      0x28, "ntfs.total_sectors", total_sectors)
        self.total_sectors = total_sectors
        self.nclusters = total_sectors // spc
        if self.nclusters == 0:
            raise err("volume smaller than one cluster", 0x28, "ntfs.total_sectors", total_sectors)
        # Positive: clusters per record; negative: 2^-value bytes.
        rs = cpr * cs if cpr > 0 else 1 << -cpr if -31 <= cpr < 0 else 0
        if rs < 256 or rs > 65536 or rs & (rs - 1) or rs % FIXUP_STRIDE:
            raise err("MFT record size out of range", 0x40, "ntfs.clusters_per_mft_record", cpr)
        self.record_size = rs
        if mft_lcn == 0 or mft_lcn >= self.nclusters:
            raise err("$MFT cluster outside the volume", 0x30, "ntfs.mft_lcn", mft_lcn)
        self.mft_lcn = mft_lcn
        self.mft_runs: list[tuple[int, int, int | None]] | None = None

    # ------------------------------------------------------------------ MFT records
    def record(self, number: int) -> tuple[bytes, int]:
        """MFT record ``number`` with fixups applied, and its offset in the volume."""
        rs, cs = self.record_size, self.cluster_size
        byte = number * rs
        if self.mft_runs is None:
            off = self.mft_lcn * cs + byte  # records before $MFT's runs are known: the first ones are contiguous
        else:
            off = self._map(self.mft_runs, byte, rs, "$MFT")
        raw = bytearray(self.region.read(off, rs, f"ntfs.mft_record[{number}]"))
        err = self.region.error
        if raw[:4] != b"FILE":
            raise err(f"MFT record {number} lacks its FILE signature", off, "ntfs.record.magic", bytes(raw[:4]))
        usa_off, usa_count = struct.unpack_from("<HH", raw, 4)
        if usa_count != rs // FIXUP_STRIDE + 1 or usa_off < 0x28 or usa_off + 2 * usa_count > rs \
                or usa_off & 1:
            raise err(f"MFT record {number} has a bad update sequence array", off + 4, "ntfs.record.usa",
                      (usa_off, usa_count))
        usn = raw[usa_off : usa_off + 2]
        for i in range(1, usa_count):
            end = i * FIXUP_STRIDE
            if raw[end - 2 : end] != usn:
                raise err(f"MFT record {number}: torn write (update sequence number mismatch in sector {i - 1})",
                          off + end - 2, "ntfs.record.usn", bytes(raw[end - 2 : end]))
            raw[end - 2 : end] = raw[usa_off + 2 * i : usa_off + 2 * i + 2]
        flags, = struct.unpack_from("<H", raw, 0x16)
        if not flags & 1:
            raise err(f"MFT record {number} is not in use", off + 0x16, "ntfs.record.flags", flags)
        return bytes(raw), off

    def _map(self, runs: list[tuple[int, int, int | None]], byte: int, n: int, what: str) -> int:
        """Volume offset of ``n`` bytes at ``byte`` of a non-resident stream (they must not cross a run)."""
        cs = self.cluster_size
        vcn = byte // cs
        for rvcn, length, lcn in runs:
            if rvcn <= vcn < rvcn + length:
                if lcn is None:
                    break
                if (byte + n - 1) // cs >= rvcn + length:
                    raise self.region.error(f"{what}: record crosses a data-run boundary", None, f"ntfs.{what}",
                                            byte)
                return lcn * cs + byte - rvcn * cs
        raise self.region.error(f"{what}: offset {byte} is not mapped by its data runs", None, f"ntfs.{what}", byte)

    def attributes(self, rec: bytes, rec_off: int, number: int):
        """(type, name, is_non_resident, attribute offset) for each attribute of a record, bounded."""
        err = self.region.error
        pos, = struct.unpack_from("<H", rec, 0x14)
        used, = struct.unpack_from("<I", rec, 0x18)
        limit = min(used, len(rec))
        for _ in range(MAX_ATTRS_PER_RECORD):
            if pos + 8 > limit:
                raise err(f"MFT record {number}: attributes run past the record", rec_off + pos, "ntfs.attr", pos)
            atype, alen = struct.unpack_from("<II", rec, pos)
            if atype == AT_END:
                return
            if alen < 16 or alen & 7 or pos + alen > limit:
                raise err(f"MFT record {number}: bad attribute length", rec_off + pos + 4, "ntfs.attr.length", alen)
            nonres, name_len, name_off = struct.unpack_from("<BBH", rec, pos + 8)
            if name_len and pos + name_off + 2 * name_len > pos + alen:
                raise err(f"MFT record {number}: attribute name outside the attribute", rec_off + pos + 10,
                          "ntfs.attr.name_offset", name_off)
            name = rec[pos + name_off : pos + name_off + 2 * name_len].decode("utf-16-le", "replace")
            yield atype, name, bool(nonres), pos, alen
            pos += alen
        raise err(f"MFT record {number}: more than {MAX_ATTRS_PER_RECORD} attributes", rec_off, "ntfs.attr", pos)

    def nonresident(self, rec: bytes, rec_off: int, pos: int, alen: int) -> tuple[int, int, int, list]:
        """(lowest_vcn, highest_vcn, data_size, runs) of a non-resident attribute."""
        err = self.region.error
        if alen < 0x40:
            raise err("non-resident attribute header too short", rec_off + pos + 4, "ntfs.attr.length", alen)
        low, high, mp_off = struct.unpack_from("<QQH", rec, pos + 0x10)
        _alloc, data_size, _init = struct.unpack_from("<QQQ", rec, pos + 0x28)
        if mp_off < 0x40 or mp_off >= alen or high + 1 < low:
            raise err("bad non-resident attribute header", rec_off + pos + 0x20, "ntfs.attr.mapping_pairs_offset",
                      mp_off)
        runs = decode_runs(rec, pos + mp_off, pos + alen, low, self.nclusters, err, rec_off)
        covered = sum(r[1] for r in runs)
        if runs and covered != high - low + 1:
            raise err(f"data runs cover {covered} clusters, the attribute says VCNs {low}..{high}",
                      rec_off + pos + 0x18, "ntfs.attr.highest_vcn", high)
        return low, high, data_size, runs

    def data_runs(self, number: int, name: str = "") -> tuple[int, list[tuple[int, int, int | None]]]:
        """(data_size, runs) of record ``number``'s non-resident $DATA stream ``name``, across extent records."""
        rec, off = self.record(number)
        extents: list[tuple[int, int, int, list]] = []
        attr_list = None
        for atype, aname, nonres, pos, alen in self.attributes(rec, off, number):
            if atype == AT_DATA and aname == name:
                if not nonres:
                    raise self.region.error(f"MFT record {number}: $DATA is resident", off + pos, "ntfs.attr.flags",
                                            0)
                extents.append(self.nonresident(rec, off, pos, alen))
            elif atype == AT_ATTRIBUTE_LIST:
                attr_list = (nonres, pos, alen)
        if attr_list is not None:
            extents.extend(self._listed_extents(number, rec, off, attr_list, name))
        if not extents:
            raise self.region.error(f"MFT record {number} has no $DATA attribute", off, "ntfs.attr", number)
        extents.sort(key=lambda e: e[0])
        runs: list[tuple[int, int, int | None]] = []
        expect = 0
        data_size = None
        for low, high, size, ext_runs in extents:
            if low != expect:
                raise self.region.error(f"MFT record {number}: $DATA extents leave a gap at VCN {expect}", off,
                                        "ntfs.attr.lowest_vcn", low)
            if low == 0:
                data_size = size
            runs.extend(ext_runs)
            expect = high + 1
        assert data_size is not None
        return data_size, runs

    def _listed_extents(self, number: int, rec: bytes, off: int, attr_list: tuple[bool, int, int], name: str):
        nonres, pos, alen = attr_list
        if nonres:
            size, runs = self.nonresident(rec, off, pos, alen)[2:]
            if size > MAX_EXTENT_RECORDS * 64:
                raise self.region.error("attribute list too long", off + pos, "ntfs.attribute_list", size)
            data = self.read_stream(runs, size, "attribute_list")
        else:
            vlen, voff = struct.unpack_from("<IH", rec, pos + 0x10)
            if voff + vlen > alen:
                raise self.region.error("resident attribute value outside its attribute", off + pos + 0x14,
                                        "ntfs.attr.value_offset", voff)
            data = rec[pos + voff : pos + voff + vlen]
        out = []
        p = 0
        seen = {number}
        for _ in range(MAX_EXTENT_RECORDS * 8):
            if p + 26 > len(data):
                break
            atype, elen, nlen, noff, _low, ref = struct.unpack_from("<IHBBQQ", data, p)
            if elen < 26 or p + elen > len(data):
                break
            ename = data[p + noff : p + noff + 2 * nlen].decode("utf-16-le", "replace")
            ext_rec = ref & 0xFFFFFFFFFFFF
            p += elen
            if atype != AT_DATA or ename != name or ext_rec in seen:
                continue
            seen.add(ext_rec)
            if len(seen) > MAX_EXTENT_RECORDS:
                raise self.region.error("attribute list names too many records", off + pos,
                                        "ntfs.attribute_list", len(seen))
            xrec, xoff = self.record(ext_rec)
            for xtype, xname, xnonres, xpos, xalen in self.attributes(xrec, xoff, ext_rec):
                if xtype == AT_DATA and xname == name and xnonres:
                    out.append(self.nonresident(xrec, xoff, xpos, xalen))
        return out

    def read_stream(self, runs: list[tuple[int, int, int | None]], size: int, what: str) -> bytes:
        cs = self.cluster_size
        out = bytearray(size)
        for vcn, length, lcn in runs:
            lo = vcn * cs
            if lo >= size:
                break
            n = min(length * cs, size - lo)
            if lcn is not None:
                out[lo : lo + n] = self.region.read(lcn * cs, n, f"ntfs.{what}")
        return bytes(out)

    def volume_label(self) -> str | None:
        try:
            rec, off = self.record(MFT_RECORD_VOLUME)
            for atype, _, nonres, pos, alen in self.attributes(rec, off, MFT_RECORD_VOLUME):
                if atype == AT_VOLUME_NAME and not nonres:
                    vlen, voff = struct.unpack_from("<IH", rec, pos + 0x10)
                    if voff + vlen <= alen:
                        return rec[pos + voff : pos + voff + vlen].decode("utf-16-le", "replace") or None
        except ValueError:
            return None
        return None


def read_ntfs(region: Region, partition_index: int | None = None) -> FileSystemUsage:
    """Parse the NTFS volume that starts at ``region`` offset 0."""
    vol = _Volume(region)
    _, vol.mft_runs = vol.data_runs(MFT_RECORD_MFT)
    size, runs = vol.data_runs(MFT_RECORD_BITMAP)
    n = vol.nclusters
    need = -(-n // 8)
    # $Bitmap is rounded up to 8 bytes; anything much larger than the volume needs is not a real bitmap.
    if size < need or size > need + 4096 + vol.cluster_size:
        raise region.error(f"$Bitmap holds {size} bytes, the volume's {n} clusters need {need}", None,
                           "ntfs.bitmap.data_size", size)
    bitmap = np.frombuffer(vol.read_stream(runs, need, "bitmap"), dtype=np.uint8).copy()
    clear_tail(bitmap, n)
    used = count_set_bits(bitmap, n)
    cs = vol.cluster_size
    fs_size = min(region.size, (vol.total_sectors + 1) * vol.bps)  # + the backup boot sector after the last one
    free_bytes = (n - used) * cs
    return FileSystemUsage(
        type="ntfs", offset=region.offset, size=fs_size, cluster_size=cs, cluster_count=n, used_clusters=used,
        bitmap=bitmap, bitmap_origin=region.offset, used_bytes=fs_size - free_bytes, free_bytes=free_bytes,
        partition_index=partition_index, label=vol.volume_label(), uuid=f"{vol.serial:016X}",
        metadata_bytes=fs_size - n * cs,
        details={"bytes_per_sector": vol.bps, "total_sectors": vol.total_sectors, "clusters": n,
                 "free_clusters": n - used, "mft_record_size": vol.record_size, "mft_lcn": vol.mft_lcn,
                 "bitmap_runs": len(runs)})

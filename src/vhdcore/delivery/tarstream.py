"""Reading a chain-tar stream with every size bounded before it is believed.

A tar header is 512 bytes of fields from outside: a pax extended header or a GNU long name announces how many
bytes follow, and a member announces its size. Python's ``tarfile`` reads such headers whole into memory and
extracts whatever size a member claims, so a small archive can claim gigabytes. This reader parses the few
things a chain-tar holds (regular members named ``N.vhd``, optionally behind pax or GNU long-name headers) and
checks every announced size against :class:`TarLimits` (and a member's size against the free space where it
goes) before reading or writing a byte of it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Iterator, Protocol

from ..exceptions import InvalidFormatError

__all__ = ["TarLimits", "members", "extract_chain_tar", "BLOCK"]

KiB = 1024
GiB = 1024**3
BLOCK = 512
_MEMBER = re.compile(r"(\d{1,4})\.vhd")


@dataclasses.dataclass(frozen=True)
class TarLimits:
    """Bounds for reading a chain-tar (``verify --max-...`` raise them).

    ``max_header_bytes``: a pax extended header or GNU long-name record (ours are under 1 KiB);
    ``max_name_bytes``: a member name; ``max_members``: members (a chain's depth);
    ``max_expanded_bytes``: the members' sizes together (what extraction writes to disk).
    """

    max_header_bytes: int = 64 * KiB
    max_name_bytes: int = 255
    max_members: int = 128
    max_expanded_bytes: int = 256 * GiB


class _Stream(Protocol):
    pos: int

    def read_exact(self, n: int, what: str) -> bytes: ...

    def read_exact_into(self, mv: memoryview, what: str) -> None: ...

    def peek(self, n: int) -> bytes: ...


def _number(raw: bytes, name: str, offset: int, what: str) -> int:
    if raw and raw[0] & 0x80:  # GNU base-256 (big sizes)
        if raw[0] == 0xFF:
            raise InvalidFormatError(f"negative tar {what}", path=name, offset=offset, field=f"tar {what}")
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
    text = raw.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise InvalidFormatError(f"tar {what} is not an octal number", path=name, offset=offset,
                                 field=f"tar {what}", value=text[:32]) from None


def _pax_records(data: bytes, name: str, offset: int) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:pos + 1] == b"\0":
            break
        sp = data.find(b" ", pos, pos + 20)
        try:
            n = int(data[pos:sp]) if sp > pos else -1
        except ValueError:
            n = -1
        if n <= 0 or pos + n > len(data) or data[pos + n - 1:pos + n] != b"\n":
            raise InvalidFormatError("malformed pax extended header", path=name, offset=offset + pos,
                                     field="tar pax header")
        key, _, value = data[sp + 1:pos + n - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += n
    return out


def members(r: _Stream, name: str, limits: TarLimits | None = None) -> Iterator[tuple[str, int]]:
    """The regular members of a chain-tar stream, as ``(name, size)`` with ``r`` positioned at the member's data.

    The caller reads exactly ``size`` bytes before asking for the next member (this generator then skips the
    padding). Names are checked (``N.vhd`` only) and every bound of ``limits`` is applied before a member's
    bytes are read; InvalidFormatError names the offset and the bound exceeded."""
    lim = limits or TarLimits()
    count = 0
    total = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        at = r.pos
        if not r.peek(BLOCK):
            return  # no end-of-archive blocks: accepted, as tar does
        h = r.read_exact(BLOCK, "tar header")
        if h == bytes(BLOCK):
            return
        stored = _number(h[148:156], name, at + 148, "header checksum")
        if stored != sum(h[:148]) + 8 * 32 + sum(h[156:]):
            raise InvalidFormatError("tar header checksum mismatch (not a tar, or damaged)", path=name, offset=at,
                                     field="tar header checksum", value=stored)
        size = _number(h[124:136], name, at + 124, "size")
        kind = h[156:157]
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"g", b"L"):
            bound = lim.max_name_bytes + 1 if kind == b"L" else lim.max_header_bytes
            if size > bound:
                what = "GNU long name" if kind == b"L" else "pax extended header"
                raise InvalidFormatError(f"tar {what} of {size} bytes (limit {bound})", path=name, offset=at + 124,
                                         field=f"tar {what}", value=size)
            data = r.read_exact(padded, "tar extended header")[:size]
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind == b"x":
                pax = _pax_records(data, name, at + BLOCK)
            continue
        if kind not in (b"0", b"\0", b"7"):
            raise InvalidFormatError("a chain-tar holds only regular files named N.vhd", path=name, offset=at + 156,
                                     field="tar member type", value=kind.decode("latin-1"))
        member = h[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if h[257:262] == b"ustar" and h[345:500].strip(b"\0"):
            member = h[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + member
        member = pax.get("path", long_name if long_name is not None else member)
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                size = -1
            if size < 0:
                raise InvalidFormatError("pax size is not a number", path=name, offset=at, field="tar pax size")
            padded = -(-size // BLOCK) * BLOCK
        long_name, pax = None, {}
        if len(member.encode()) > lim.max_name_bytes or not _MEMBER.fullmatch(member):
            raise InvalidFormatError("a chain-tar holds only regular files named N.vhd", path=name, offset=at,
                                     field="tar member", value=member[:lim.max_name_bytes])
        if count >= lim.max_members:
            raise InvalidFormatError(f"a chain-tar of more than {lim.max_members} members", path=name, offset=at,
                                     field="tar members", value=count + 1)
        count += 1
        total += size
        if total > lim.max_expanded_bytes:
            raise InvalidFormatError(f"the chain-tar's members expand to more than {lim.max_expanded_bytes} bytes "
                                     "(raise the limit to verify it)", path=name, offset=at + 124,
                                     field="tar expanded size", value=total)
        start = r.pos
        yield member, size
        if r.pos != start + size:  # pragma: no cover - a caller that did not read its member is our bug
            raise AssertionError("tar member not read to its end")
        if padded > size:
            r.read_exact(padded - size, "tar padding")


def extract_chain_tar(r: _Stream, name: str, directory: str, limits: TarLimits | None = None,
                      first: tuple[str, int] | None = None, rest: Iterator[tuple[str, int]] | None = None
                      ) -> list[str]:
    """Extract the members of a chain-tar stream into ``directory`` (created exclusively, never through a
    symlink, each checked against the free space there first); returns their names. ``first``/``rest``: a
    member already announced by :func:`members` and the generator it came from."""
    it = rest if rest is not None else members(r, name, limits)
    out: list[str] = []
    buf = memoryview(bytearray(4 * 1024 * 1024))
    pending = [first] if first is not None else []
    for member, size in _chain(pending, it):
        free = shutil.disk_usage(directory).free
        if size > free:
            raise InvalidFormatError(f"member {member} of {size} bytes does not fit in {directory} ({free} bytes "
                                     "free)", path=name, offset=r.pos, field="tar member size", value=size)
        fd = os.open(os.path.join(directory, member), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            left = size
            while left:
                k = min(left, len(buf))
                r.read_exact_into(buf[:k], f"tar member {member}")
                view = buf[:k]
                while view:
                    view = view[os.write(fd, view):]
                left -= k
        finally:
            os.close(fd)
        out.append(member)
    return out


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest

"""Streaming zip writer with the layout of the reference IDS (ids-protocol.md §6.1).

The reference server writes zips with Java's ``ZipOutputStream``: every entry uses method
DEFLATED (level 0 when not compressing, so a 52-byte text becomes 57 bytes; the default level
when compressing), general-purpose flags ``0x0808`` (data descriptor follows the data, names are
UTF-8), sizes and CRC in a data descriptor after the data, and a central directory at the end.
This module produces the same layout as an iterator of byte chunks, so a download never holds a
whole zip in memory. Entry times are taken from the caller (derived from catalogue metadata), so
two downloads of the same selection are byte-identical and resuming at an offset is safe.

Zip64 records are added automatically when a size or offset does not fit in 32 bits or there are
more than 65535 entries.

Public API:

* :class:`ZipSource` — one entry: name, path of the bytes on disk, modification time.
* :func:`zip_stream` — iterator of chunks of the zip; duplicate names are silently skipped.
* :func:`write_zip` — the same, written to a binary file object; returns the byte count.
* :func:`dos_datetime` — (date, time) DOS fields of an epoch time.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["EMPTY_ZIP_SIZE", "ZipSource", "dos_datetime", "skip_bytes", "write_zip", "zip_stream"]

#: size in bytes of a zip without entries (only the end-of-central-directory record)
EMPTY_ZIP_SIZE = 22

_CHUNK = 1 << 20
_FLAGS = 0x0808  # bit 3: data descriptor; bit 11: UTF-8 names
_METHOD_DEFLATED = 8
_VERSION = 20
_VERSION_ZIP64 = 45
_MAX32 = 0xFFFFFFFF
_MAX16 = 0xFFFF
# DOS encoding of 1980-01-01 00:00:00, used for earlier times (as Java does)
_DOS_MIN = ((0 << 9) | (1 << 5) | 1, 0)


@dataclass(frozen=True)
class ZipSource:
    """One zip entry: ``name`` inside the zip, ``path`` of its bytes, ``mtime`` (epoch seconds).

    ``opener`` may replace ``path`` when the bytes come from elsewhere (a callable returning a
    binary file object); exactly one of them is used, ``opener`` first.

    Constructing one never raises (the file is opened when the entry is written).
    """

    name: str
    path: Path | None
    mtime: float
    opener: Callable[[], BinaryIO] | None = None

    def open(self) -> BinaryIO:
        """Open the entry's bytes for reading; raises ``OSError`` when they cannot be read."""
        if self.opener is not None:
            return self.opener()
        if self.path is None:
            raise OSError(f"zip entry {self.name!r} has no data source")
        return open(self.path, "rb")


def dos_datetime(mtime: float) -> tuple[int, int]:
    """Return the (date, time) DOS fields for ``mtime`` in local time (2-second resolution).

    Times before 1980 map to 1980-01-01 00:00:00 and times after 2107 to the last DOS second.

    Never raises.
    """
    try:
        t = time.localtime(mtime)
    except (OverflowError, OSError, ValueError):
        return _DOS_MIN
    if t.tm_year < 1980:
        return _DOS_MIN
    if t.tm_year > 2107:
        return ((127 << 9) | (12 << 5) | 31, (23 << 11) | (59 << 5) | 29)
    date = ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
    tod = (t.tm_hour << 11) | (t.tm_min << 5) | (min(t.tm_sec, 59) // 2)
    return date, tod


@dataclass
class _Written:
    name: bytes
    date: int
    tod: int
    crc: int
    csize: int
    size: int
    offset: int


def _central_record(e: _Written) -> bytes:
    extra = b""
    size, csize, offset = e.size, e.csize, e.offset
    fields: list[int] = []
    if e.size >= _MAX32:
        fields.append(e.size)
        size = _MAX32
    if e.csize >= _MAX32:
        fields.append(e.csize)
        csize = _MAX32
    if e.offset >= _MAX32:
        fields.append(e.offset)
        offset = _MAX32
    version = _VERSION
    if fields:
        extra = struct.pack("<HH", 0x0001, 8 * len(fields)) + b"".join(
            struct.pack("<Q", f) for f in fields
        )
        version = _VERSION_ZIP64
    return (
        struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            version,
            version,
            _FLAGS,
            _METHOD_DEFLATED,
            e.tod,
            e.date,
            e.crc,
            csize,
            size,
            len(e.name),
            len(extra),
            0,
            0,
            0,
            0,
            offset,
        )
        + e.name
        + extra
    )


def _end_records(count: int, cd_offset: int, cd_size: int) -> bytes:
    out = b""
    if count >= _MAX16 or cd_offset >= _MAX32 or cd_size >= _MAX32:
        zip64_offset = cd_offset + cd_size
        out += struct.pack(
            "<IQHHIIQQQQ",
            0x06064B50,
            44,
            _VERSION_ZIP64,
            _VERSION_ZIP64,
            0,
            0,
            count,
            count,
            cd_size,
            cd_offset,
        )
        out += struct.pack("<IIQI", 0x07064B50, 0, zip64_offset, 1)
        count16 = min(count, _MAX16)
        out += struct.pack(
            "<IHHHHIIH",
            0x06054B50,
            0,
            0,
            count16,
            count16,
            min(cd_size, _MAX32),
            min(cd_offset, _MAX32),
            0,
        )
        return out
    return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, cd_offset, 0)


def zip_stream(
    entries: Iterable[ZipSource], compress: bool, chunk_size: int = _CHUNK
) -> Iterator[bytes]:
    """Yield the bytes of a zip holding ``entries`` in the given order.

    Every entry is DEFLATED: level 0 when ``compress`` is false, zlib's default level otherwise.
    A second entry with a name already written is skipped without a trace. Raises ``OSError``
    (from the iteration) when an entry's bytes cannot be read; the zip is then incomplete.
    """
    level = zlib.Z_DEFAULT_COMPRESSION if compress else 0
    written: list[_Written] = []
    seen: set[str] = set()
    offset = 0
    for entry in entries:
        if entry.name in seen:
            continue
        seen.add(entry.name)
        name = entry.name.encode("utf-8")
        date, tod = dos_datetime(entry.mtime)
        header = struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            _VERSION,
            _FLAGS,
            _METHOD_DEFLATED,
            tod,
            date,
            0,
            0,
            0,
            len(name),
            0,
        )
        start = offset
        yield header + name
        offset += len(header) + len(name)
        comp = zlib.compressobj(level, zlib.DEFLATED, -15)
        crc = 0
        size = 0
        csize = 0
        with entry.open() as f:
            while True:
                block = f.read(chunk_size)
                if not block:
                    break
                crc = zlib.crc32(block, crc)
                size += len(block)
                out = comp.compress(block)
                if out:
                    csize += len(out)
                    yield out
        out = comp.flush()
        csize += len(out)
        if csize >= _MAX32 or size >= _MAX32:
            desc = struct.pack("<IIQQ", 0x08074B50, crc, csize, size)
        else:
            desc = struct.pack("<IIII", 0x08074B50, crc, csize, size)
        yield out + desc
        offset += csize + len(desc)
        written.append(_Written(name, date, tod, crc, csize, size, start))
    central = b"".join(_central_record(e) for e in written)
    yield central + _end_records(len(written), offset, len(central))


def write_zip(fileobj: BinaryIO, entries: Iterable[ZipSource], compress: bool) -> int:
    """Write the zip of ``entries`` (as :func:`zip_stream`) to ``fileobj``; return its size.

    Raises ``OSError`` when an entry cannot be read or the target cannot be written.
    """
    total = 0
    for chunk in zip_stream(entries, compress):
        fileobj.write(chunk)
        total += len(chunk)
    return total


def skip_bytes(chunks: Iterable[bytes], offset: int) -> Iterator[bytes]:
    """Yield ``chunks`` without their first ``offset`` bytes (the IDS Range semantics).

    Never raises itself; what iterating ``chunks`` raises passes through.
    """
    remaining = offset
    for chunk in chunks:
        if remaining:
            if len(chunk) <= remaining:
                remaining -= len(chunk)
                continue
            chunk = chunk[remaining:]
            remaining = 0
        yield chunk

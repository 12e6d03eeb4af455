"""Unit tests of the streaming zip writer (ids-protocol.md §6.1 layout)."""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from idsfs.emulator.zipstream import (
    EMPTY_ZIP_SIZE,
    ZipSource,
    dos_datetime,
    skip_bytes,
    write_zip,
    zip_stream,
)

CONTENT = b"df1 test content very compressible very compressible"
MTIME = time.mktime((2024, 5, 1, 10, 0, 0, 0, 0, -1))


def _make(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _zip(entries: list[ZipSource], compress: bool) -> bytes:
    return b"".join(zip_stream(entries, compress))


def test_reference_sizes_level0_and_default(tmp_path: Path) -> None:
    assert len(CONTENT) == 52
    p = _make(tmp_path, "a", CONTENT)
    for compress, expected in ((False, 57), (True, 36)):
        data = _zip([ZipSource("ids/F/I/N/A/ds1/a/df1", p, MTIME)], compress)
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            (info,) = z.infolist()
            assert info.compress_type == zipfile.ZIP_DEFLATED
            assert info.compress_size == expected
            assert info.file_size == 52
            assert zlib.crc32(CONTENT) == info.CRC
            assert info.flag_bits & 0x0808 == 0x0808
            assert info.date_time == (2024, 5, 1, 10, 0, 0)
            assert z.read(info) == CONTENT
            assert z.testzip() is None


def test_empty_zip_is_22_bytes() -> None:
    data = _zip([], False)
    assert len(data) == EMPTY_ZIP_SIZE == 22
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.namelist() == []


def test_duplicate_name_skipped_and_order_kept(tmp_path: Path) -> None:
    a = _make(tmp_path, "a", b"first")
    b = _make(tmp_path, "b", b"second")
    c = _make(tmp_path, "c", b"third")
    data = _zip(
        [ZipSource("x/1", a, MTIME), ZipSource("x/1", b, MTIME), ZipSource("x/é 2", c, MTIME)],
        True,
    )
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.namelist() == ["x/1", "x/é 2"]
        assert z.read("x/1") == b"first"
        assert z.read("x/é 2") == b"third"


def test_deterministic_and_data_descriptor_layout(tmp_path: Path) -> None:
    p = _make(tmp_path, "a", CONTENT)
    entries = [ZipSource("n", p, MTIME)]
    one = _zip(entries, False)
    two = _zip(entries, False)
    assert one == two
    # local header: sizes and CRC zero, flags 0x0808, method 8
    sig, ver, flags, method, _t, _d, crc, csize, size, nlen, xlen = struct.unpack(
        "<IHHHHHIIIHH", one[:30]
    )
    assert (sig, flags, method, crc, csize, size, nlen, xlen) == (
        0x04034B50,
        0x0808,
        8,
        0,
        0,
        0,
        1,
        0,
    )
    assert ver == 20
    desc = one[30 + 1 + 57 : 30 + 1 + 57 + 16]
    assert struct.unpack("<IIII", desc) == (0x08074B50, zlib.crc32(CONTENT), 57, 52)


def test_empty_file_and_large_file_streaming(tmp_path: Path) -> None:
    empty = _make(tmp_path, "e", b"")
    big_data = bytes(range(256)) * 20000  # 5 MB, several chunks
    big = _make(tmp_path, "big", big_data)
    chunks = list(
        zip_stream(
            [ZipSource("e", empty, MTIME), ZipSource("big", big, MTIME)], False, chunk_size=65536
        )
    )
    assert max(len(c) for c in chunks) < 200000  # streamed, never one huge block
    data = b"".join(chunks)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.read("e") == b""
        assert z.read("big") == big_data
        assert z.testzip() is None


def test_write_zip_and_skip_bytes(tmp_path: Path) -> None:
    p = _make(tmp_path, "a", CONTENT)
    entries = [ZipSource("n", p, MTIME)]
    buf = io.BytesIO()
    n = write_zip(buf, entries, True)
    assert n == len(buf.getvalue())
    full = buf.getvalue()
    for off in (0, 1, 20, len(full) - 1, len(full), len(full) + 100):
        assert b"".join(skip_bytes(zip_stream(entries, True), off)) == full[off:]


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        _zip([ZipSource("n", tmp_path / "missing", MTIME)], False)


def test_dos_datetime_clamps() -> None:
    assert dos_datetime(0) == ((1 << 5) | 1, 0)
    d, t = dos_datetime(MTIME + 1)  # odd second rounds down
    assert d == ((2024 - 1980) << 9) | (5 << 5) | 1
    assert t == (10 << 11)


def test_zip64_central_directory_for_large_offsets() -> None:
    # fake a huge entry by an opener producing many zero bytes quickly is too slow; instead
    # check the zip64 helper records directly through a stream of tiny entries count > 65535
    entries = [
        ZipSource(f"e{i}", None, MTIME, opener=lambda: io.BytesIO(b"")) for i in range(65536)
    ]
    data = _zip(entries, False)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = z.namelist()
        assert len(names) == 65536
        assert names[-1] == "e65535"

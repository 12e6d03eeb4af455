"""Tests of idsfs._crc: the fast CRC32 gives zlib's values, with and without isal."""

from __future__ import annotations

import importlib
import os
import sys
import zlib

import pytest

from idsfs import _crc


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 1 << 20, (1 << 20) + 13])
def test_same_values_as_zlib(size: int) -> None:
    data = os.urandom(size)
    assert _crc.crc32(data) == zlib.crc32(data)
    assert _crc.crc32(memoryview(data)) == zlib.crc32(data)
    half = size // 2
    running = _crc.crc32(memoryview(data)[half:], _crc.crc32(memoryview(data)[:half]))
    assert running == zlib.crc32(data)
    assert _crc.crc32(bytearray(data), 12345) == zlib.crc32(data, 12345)


def test_isal_is_used_when_installed() -> None:
    try:
        import isal.isal_zlib  # noqa: F401
    except ImportError:
        assert _crc.IMPLEMENTATION == "zlib"
    else:
        assert _crc.IMPLEMENTATION == "isal"


def test_falls_back_to_zlib_without_isal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)  # import fails
    try:
        fallback = importlib.reload(_crc)
        assert fallback.IMPLEMENTATION == "zlib"
        assert fallback.crc32 is zlib.crc32
    finally:
        monkeypatch.undo()
        importlib.reload(_crc)

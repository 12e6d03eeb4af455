"""IDSClient.put of a regular file: sendfile on plain HTTP, a CRC32 given by the caller."""

from __future__ import annotations

import io
import os
import socket
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
import requests

from idsfs.errors import IDSNotFoundError, IDSResponseError
from idsfs.ids import DataSelection, IDSClient

DATA = os.urandom(2 * 1024 * 1024 + 4321)


def stored(world: Any, new_id: int) -> bytes:
    with world.ids.getData(DataSelection({"datafileIds": [new_id]})) as stream:
        return bytes(stream.read())


@pytest.fixture
def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int | None]]:
    """(offset, count) of every socket.sendfile call of the test's thread."""
    me = threading.get_ident()
    calls: list[tuple[int, int | None]] = []
    real = socket.socket.sendfile

    def spy(self: socket.socket, file: Any, offset: int = 0, count: int | None = None) -> int:
        if threading.get_ident() == me:  # not the emulator's (in this process)
            calls.append((offset, count))
        return real(self, file, offset, count)

    monkeypatch.setattr(socket.socket, "sendfile", spy)
    return calls


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src.bin"
    path.write_bytes(DATA)
    return path


def test_regular_file_goes_out_with_sendfile(world, source, sendfile_calls) -> None:
    with open(source, "rb") as f:
        f.seek(1000)
        new_id = world.ids.put(f, "sendfile.bin", world.ds3, world.fmt)
        assert f.tell() == len(DATA)  # consumed, as by reading it
    assert stored(world, new_id) == DATA[1000:]
    assert sum(count or 0 for _, count in sendfile_calls) == len(DATA) - 1000
    df = world.icat.get("Datafile", new_id)
    assert df.checksum == f"{zlib.crc32(DATA[1000:]):x}"


def test_given_crc32_is_used_without_reading_the_file(world, source, sendfile_calls,
                                                      monkeypatch) -> None:
    reads: list[int] = []
    real_preadv = os.preadv

    def preadv(fd: int, buffers: Any, offset: int) -> int:
        reads.append(offset)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    with open(source, "rb", buffering=0) as f:
        new_id = world.ids.put(f, "given.bin", world.ds3, world.fmt, crc32=zlib.crc32(DATA))
    assert stored(world, new_id) == DATA
    assert sendfile_calls == [(0, len(DATA))] and not reads


def test_wrong_crc32_is_a_mismatch(world, source) -> None:
    with open(source, "rb") as f, pytest.raises(IDSResponseError, match="checksum") as exc:
        world.ids.put(f, "wrong.bin", world.ds3, world.fmt, crc32=zlib.crc32(DATA) ^ 1)
    wrong = exc.value.datafile_id  # type: ignore[attr-defined]
    assert isinstance(wrong, int)
    world.ids.delete(DataSelection({"datafileIds": [wrong]}))
    with pytest.raises(IDSNotFoundError):
        world.ids.getSize(DataSelection({"datafileIds": [wrong]}))


def test_crc32_needs_a_regular_binary_file(world, source) -> None:
    for bad in (DATA, io.BytesIO(DATA), iter([DATA])):
        with pytest.raises(ValueError, match="crc32"):
            world.ids.put(bad, "x.bin", world.ds3, world.fmt, crc32=0)
    with open(source, "rb") as f, pytest.raises(ValueError, match="crc32"):
        world.ids.put(io.BufferedReader(_Wrapper(f)), "x.bin", world.ds3, world.fmt, crc32=0)


class _Wrapper(io.RawIOBase):
    """A raw reader over a file that is not the file itself."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return int(self.f.readinto(b))

    def fileno(self) -> int:
        return int(self.f.fileno())


def test_file_that_shrinks_while_sent(world, tmp_path, sendfile_calls) -> None:
    path = tmp_path / "shrinks.bin"
    path.write_bytes(DATA)
    with open(path, "rb") as f:
        real = socket.socket.sendfile

        def shrink_then_send(self: socket.socket, file: Any, offset: int = 0,
                             count: int | None = None) -> int:
            os.truncate(path, 1024 * 1024)
            return real(self, file, offset, count)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(socket.socket, "sendfile", shrink_then_send)
            with pytest.raises(ValueError, match="shrank"):
                world.ids.put(f, "shrinks.bin", world.ds3, world.fmt, crc32=zlib.crc32(DATA))


def test_foreign_session_reads_the_file(world, source, sendfile_calls) -> None:
    # a requests.Session of the caller has urllib3's own connections: no sendfile
    with requests.Session() as session:
        client = IDSClient(world.emu.ids_url, world.root, session=session)
        with open(source, "rb") as f:
            new_id = client.put(f, "foreign.bin", world.ds3, world.fmt)
        with open(source, "rb") as f, pytest.raises(IDSResponseError, match="checksum"):
            client.put(f, "foreign-wrong.bin", world.ds3, world.fmt, crc32=1)
    assert stored(world, new_id) == DATA and not sendfile_calls

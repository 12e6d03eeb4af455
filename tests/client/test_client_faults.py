"""Retries, timeouts and resumed downloads under the emulator's fault injection."""

from __future__ import annotations

import io
import itertools
import os
import threading
import time
import zipfile
import zlib

import pytest

from idsfs.download import download, download_to, upload
from idsfs.errors import (
    ConnectionLostError,
    IDSDataNotOnlineError,
    IDSInternalError,
    IDSResponseError,
    TransportTimeoutError,
    TruncatedStreamError,
)
from idsfs.ids import DataSelection, FileChunk

BIG = os.urandom(3 * 1024 * 1024 + 123)


def sel(**ids: list[int]) -> DataSelection:
    return DataSelection({f"{k}Ids": v for k, v in ids.items()})


@pytest.fixture
def big(world) -> int:
    """Id of a 3 MiB datafile in ds3."""
    return world.ids.put(BIG, "big.bin", world.ds3, world.fmt)


def test_drop_gives_truncated_stream(world, big) -> None:
    world.emu.faults.drop(after_bytes=1000, endpoint="ids/getData", count=1)
    with world.ids.getData(sel(datafile=[big])) as stream:
        assert stream.content_length == len(BIG)
        with pytest.raises(TruncatedStreamError) as info:
            stream.read()
    assert info.value.expected == len(BIG) and info.value.received <= 1000
    assert isinstance(info.value, IDSResponseError)
    assert isinstance(info.value, ConnectionLostError)
    # the client is still usable
    with world.ids.getData(sel(datafile=[big])) as stream:
        assert stream.read() == BIG


def test_download_resumes_after_drops(world, big, tmp_path) -> None:
    world.emu.faults.drop(after_bytes=1024 * 1024, endpoint="ids/getData", count=2)
    world.emu.counters.reset()
    seen: list[tuple[int, int | None]] = []
    result = download(world.ids, sel(datafile=[big]), tmp_path / "big.bin",
                      expected_size=len(BIG), progress=lambda d, t: seen.append((d, t)),
                      backoff=0.01)
    assert (tmp_path / "big.bin").read_bytes() == BIG
    assert result.resumes == 2 and result.size == len(BIG) and result.filename == "big.bin"
    assert world.emu.counters.get("ids/getData") == 3
    assert seen[-1] == (len(BIG), len(BIG))
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    assert not (tmp_path / "big.bin.part").exists()


def test_download_gives_up_and_resume_continues(world, big, tmp_path) -> None:
    world.emu.faults.drop(after_bytes=512 * 1024, endpoint="ids/getData", count=1)
    dest = tmp_path / "out.bin"
    with pytest.raises(ConnectionLostError):
        download(world.ids, sel(datafile=[big]), dest, retries=0, backoff=0.01)
    part = tmp_path / "out.bin.part"
    assert part.exists() and not dest.exists()
    assert 0 < part.stat().st_size < len(BIG)
    result = download(world.ids, sel(datafile=[big]), dest, resume=True, backoff=0.01)
    assert dest.read_bytes() == BIG
    assert result.size == len(BIG)
    with pytest.raises(FileExistsError):
        download(world.ids, sel(datafile=[big]), dest)


def test_download_checks_size(world, big, tmp_path) -> None:
    with pytest.raises(IDSResponseError):
        download(world.ids, sel(datafile=[big]), tmp_path / "x", expected_size=len(BIG) + 1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.part").exists()


def test_zipped_download_restarts_from_zero(world, big, tmp_path) -> None:
    world.emu.faults.drop(after_bytes=100_000, endpoint="ids/getData", count=1)
    world.emu.counters.reset()
    dest = tmp_path / "all.zip"
    result = download(world.ids, sel(dataset=[world.ds3, world.ds1]), dest, backoff=0.01)
    assert result.resumes == 1
    with zipfile.ZipFile(dest) as z:
        assert z.testzip() is None
        assert BIG in [z.read(n) for n in z.namelist()]


def test_download_to_prepared_id(world, big) -> None:
    pid = world.ids.prepareData(sel(datafile=[big]))
    world.emu.faults.drop(after_bytes=700_000, endpoint="ids/getData", count=1)
    out = io.BytesIO()
    size, resumes, _name = download_to(world.ids, pid, out, backoff=0.01)
    assert out.getvalue() == BIG and size == len(BIG) and resumes == 1


def test_busy_503_is_retried(world) -> None:
    world.emu.faults.error(503, "ids/getSize", count=2, message="Data is busy")
    world.emu.counters.reset()
    assert world.ids.getSize(sel(dataset=[world.ds1])) == 104
    assert world.emu.counters.get("ids/getSize") == 3


def test_not_online_503_is_not_retried(world) -> None:
    world.emu.faults.error(503, "ids/getData", count=1,
                           message="Before getData can proceed, restoration was requested")
    world.emu.counters.reset()
    with pytest.raises(IDSDataNotOnlineError):
        world.ids.getData(sel(dataset=[world.ds1]))
    assert world.emu.counters.get("ids/getData") == 1


def test_retries_are_bounded(world) -> None:
    client = world.ids_client(world.root, retries=2)
    world.emu.faults.error(503, "ids/getStatus", count=10, message="Data is busy")
    world.emu.counters.reset()
    with pytest.raises(IDSDataNotOnlineError):
        client.getStatus(sel(dataset=[world.ds1]))
    assert world.emu.counters.get("ids/getStatus") == 3


def test_writes_are_not_retried(world) -> None:
    world.emu.faults.error(503, "ids/put", count=1, message="Data is busy")
    world.emu.faults.error(500, "ids/prepareData", count=1)
    world.emu.counters.reset()
    with pytest.raises(IDSDataNotOnlineError):
        world.ids.put(b"abc", "busy.dat", world.ds3, world.fmt)
    with pytest.raises(IDSInternalError):
        world.ids.prepareData(sel(dataset=[world.ds1]))
    assert world.emu.counters.get("ids/put") == 1
    assert world.emu.counters.get("ids/prepareData") == 1
    assert world.ids.put(b"abc", "busy.dat", world.ds3, world.fmt) > 0


def test_dropped_small_answer_is_retried(world) -> None:
    world.emu.faults.drop(after_bytes=1, endpoint="ids/getSize", count=1)
    world.emu.counters.reset()
    assert world.ids.getSize(sel(dataset=[world.ds1])) == 104
    assert world.emu.counters.get("ids/getSize") == 2


def test_stalled_stream_times_out(world, big) -> None:
    client = world.ids_client(world.root, timeout=(5.0, 0.3), retries=0)
    world.emu.faults.stall(after_bytes=4096, seconds=None, endpoint="ids/getData", count=1)
    try:
        with client.getData(sel(datafile=[big])) as stream, \
                pytest.raises(TransportTimeoutError):
            stream.read()
    finally:
        world.emu.faults.release_stalls()


def test_abort_breaks_off_a_stalled_read_in_another_thread(world, big) -> None:
    client = world.ids_client(world.root, timeout=(5.0, 30.0), retries=0)
    world.emu.faults.stall(after_bytes=4096, seconds=None, endpoint="ids/getData", count=1)
    outcome: list[BaseException | bytes] = []
    try:
        with client.getData(sel(datafile=[big])) as stream:
            assert stream.read(4096) == BIG[:4096]  # the next read blocks: the server stalls

            def reader() -> None:
                try:
                    outcome.append(stream.read(1 << 20))
                except BaseException as exc:  # handed to the test
                    outcome.append(exc)

            thread = threading.Thread(target=reader)
            thread.start()
            time.sleep(0.1)  # (an abort before the read starts fails it the same way)
            start = time.monotonic()
            stream.abort()
            thread.join(5.0)
            assert not thread.is_alive() and time.monotonic() - start < 1.0
            assert len(outcome) == 1 and isinstance(outcome[0], ConnectionLostError)
            assert "aborted" in str(outcome[0])
            with pytest.raises(ConnectionLostError):
                stream.read(10)
            stream.abort()  # again: nothing happens
    finally:
        world.emu.faults.release_stalls()
    # the broken connection was not given back to the pool
    with client.getData(sel(datafile=[big])) as stream:
        assert stream.read() == BIG


def test_abort_after_the_end_leaves_the_pooled_connection_alone(world, big) -> None:
    client = world.ids_client(world.root, retries=0)
    with client.getData(sel(datafile=[big])) as stream:
        assert stream.read() == BIG
        stream.abort()  # the connection is back in the pool: must not be shut down
        assert stream.read(10) == b""
    for _ in range(3):
        with client.getData(sel(datafile=[big]), offset=10) as stream:
            assert stream.read() == BIG[10:]


def test_stalled_call_is_retried_after_timeout(world) -> None:
    client = world.ids_client(world.root, timeout=(5.0, 0.3), retries=2)
    world.emu.faults.stall(after_bytes=0, seconds=2.0, endpoint="ids/getStatus", count=1)
    world.emu.counters.reset()
    try:
        assert client.getStatus(sel(dataset=[world.ds1])) == "ONLINE"
    finally:
        world.emu.faults.release_stalls()
    assert world.emu.counters.get("ids/getStatus") == 2


def test_upload_with_progress(world, tmp_path) -> None:
    path = tmp_path / "local.bin"
    path.write_bytes(BIG)
    os.utime(path, (1_500_000_000, 1_500_000_000))
    seen: list[int] = []
    new_id = upload(world.ids, path, None, world.ds3, world.fmt,
                    progress=lambda done, total: seen.append(done))
    assert seen[-1] == len(BIG)
    df = world.icat.get("Datafile", new_id)
    assert df.name == "local.bin" and df.fileSize == len(BIG)
    assert df.datafileModTime.timestamp() == 1_500_000_000
    with open(path, "rb") as f:
        other = upload(world.ids, f, "again.bin", world.ds3, world.fmt)
    with world.ids.getData(sel(datafile=[other])) as stream:
        assert stream.read() == BIG


def test_put_sends_file_chunks_with_sendfile(world, tmp_path, monkeypatch) -> None:
    """FileChunk items of an iterable body: CRC32 from their data, bytes sent from their
    file with sendfile (framed as chunks), other items as usual; a file shorter than its
    chunk fails the put and nothing is stored."""
    path = tmp_path / "spool.bin"
    path.write_bytes(BIG)
    sent: list[int] = []
    real = FileChunk.sendfile_to

    def counting(self: FileChunk, sock) -> None:
        sent.append(len(self))
        real(self, sock)

    monkeypatch.setattr(FileChunk, "sendfile_to", counting)
    with open(path, "rb", buffering=0) as f:
        items = [FileChunk(BIG[:1000], f, 0), b"", memoryview(BIG)[1000:5000],
                 FileChunk(b"", f, 5000), FileChunk(BIG[5000:], f, 5000)]
        new_id = world.ids.put(iter(items), "chunks.bin", world.ds3, world.fmt)
    assert sent == [1000, len(BIG) - 5000]
    with world.ids.getData(sel(datafile=[new_id])) as stream:
        assert stream.read() == BIG
    assert world.icat.get("Datafile", new_id).checksum == f"{zlib.crc32(BIG):x}"
    with open(path, "rb", buffering=0) as f, pytest.raises(ValueError, match="shrank"):
        world.ids.put(iter([FileChunk(BIG + b"more", f, 0)]), "short.bin", world.ds3,
                      world.fmt)
    names = world.icat.search(f"SELECT df.name FROM Datafile df WHERE df.dataset.id = "
                              f"{world.ds3}")
    assert "short.bin" not in names


def test_put_of_regular_file_uses_content_length(world, tmp_path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(BIG)
    with open(path, "rb") as f:
        f.seek(100)
        new_id = world.ids.put(f, "tail.bin", world.ds3, world.fmt)
    with world.ids.getData(sel(datafile=[new_id])) as stream:
        assert stream.read() == BIG[100:]

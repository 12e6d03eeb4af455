"""Unit tests of idsfs.upload without servers: names, spool directory, records."""

from __future__ import annotations

import errno
import functools
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from idsfs.aio import ThreadBridge
from idsfs.errors import SpoolError
from idsfs.upload import (
    DEFAULT_DATAFILE_FORMAT,
    FAILED,
    PENDING,
    Upload,
    Uploader,
    _version_key,
    default_spool_dir,
    icat_date,
    parse_format,
)


def uploader(spool: Path, owner: str = "http://icat alice") -> Uploader:
    # open_spool and the records need no server: the clients are never called here
    nothing: Any = None
    return Uploader(nothing, nothing, ThreadBridge(), spool, owner=owner)


def test_defaults_match_the_config() -> None:
    from idsfs import config, fs

    assert config.DEFAULT_DATAFILE_FORMAT == DEFAULT_DATAFILE_FORMAT
    assert config.DEFAULT_DATASET_TYPE == fs.DEFAULT_DATASET_TYPE


def test_parse_format_and_versions() -> None:
    assert parse_format("binary") == ("binary", None)
    assert parse_format(" NeXus : 4.4 ") == ("NeXus", "4.4")
    for bad in ("", ":1", "x:"):
        with pytest.raises(ValueError):
            parse_format(bad)
    assert sorted(["4.10", "4.9", "4.4a", "10"], key=_version_key) == ["4.4a", "4.9", "4.10",
                                                                       "10"]


def test_icat_date() -> None:
    assert icat_date(1_500_000_000_123) == "2017-07-14T02:40:00.123+00:00"
    assert icat_date(0) == "1970-01-01T00:00:00.000+00:00"


def test_default_spool_dir() -> None:
    root = default_spool_dir("https://icat.example.org:8181/icat", "db/jdoe", "/mnt/ids", uid=0)
    assert root.parent == Path("/var/cache/idsfs/spool")
    assert root.name.startswith("icat.example.org-db_jdoe-")
    env = {"XDG_CACHE_HOME": "/home/j/.xdg", "HOME": "/home/j"}
    user = default_spool_dir("https://icat.example.org", "jdoe", "/mnt/ids", uid=1000,
                             environ=env)
    assert user.parent == Path("/home/j/.xdg/idsfs/spool")
    plain = default_spool_dir("https://icat.example.org", "jdoe", "/mnt/ids", uid=1000,
                              environ={"HOME": "/home/j"})
    assert plain.parent == Path("/home/j/.cache/idsfs/spool")
    # another mount point, user or server: another spool
    others = {default_spool_dir("https://icat.example.org", "jdoe", "/mnt/other", uid=1000,
                                environ=env),
              default_spool_dir("https://icat.example.org", "jane", "/mnt/ids", uid=1000,
                                environ=env),
              default_spool_dir("https://other.example.org", "jdoe", "/mnt/ids", uid=1000,
                                environ=env)}
    assert user not in others and len(others) == 3


def test_spool_is_made_lazily_and_locked(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    first = uploader(spool)
    assert first.open_spool() == [] and not spool.exists()  # a mount that never writes
    up = trio.run(functools.partial(first.create, dataset_id=7, name="a/b.dat",
                                    display="x/a/b.dat", format_id=3))
    assert spool.stat().st_mode & 0o777 == 0o700
    assert up.data_path.exists() and json.loads(up.meta_path.read_text())["state"] == "writing"
    second = uploader(spool)
    with pytest.raises(SpoolError) as exc:
        second.open_spool()
    assert exc.value.errno == errno.EBUSY and "another idsfs daemon" in str(exc.value)
    first.close_spool()
    assert len(second.open_spool()) == 1
    second.close_spool()


def test_records_found_at_start_up(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()

    def record(uid: str, state: str, owner: str = "http://icat alice", **extra: Any) -> Upload:
        up = Upload(spool, uid, dataset_id=1, name=f"{state}.dat", display=f"ds/{state}.dat",
                    format_id=2, owner=owner)
        up.state = state
        for key, value in extra.items():
            setattr(up, key, value)
        up.data_path.write_bytes(b"data")
        up.save()
        return up

    record("a" * 32, "writing")
    record("b" * 32, "uploading")
    record("c" * 32, "pending", reason="500")
    record("d" * 32, "done", datafile_id=9)
    record("e" * 32, "pending", owner="http://other bob")
    (spool / f"{'f' * 32}.json").write_text("{not json")
    for i, text in enumerate(("[]", "null", "42")):  # JSON, but not a record
        (spool / f"{str(i + 1) * 32}.json").write_text(text)
    missing = record("0" * 32, "pending")
    missing.data_path.unlink()
    u = uploader(spool)
    found = {up.name: up for up in u.open_spool()}
    assert set(found) == {"writing.dat", "uploading.dat", "pending.dat"}
    writing = found["writing.dat"]
    assert writing.state == FAILED and "open for writing" in writing.reason
    assert found["uploading.dat"].state == PENDING and found["uploading.dat"].maybe_landed
    assert found["pending.dat"].state == PENDING and found["pending.dat"].reason == "500"
    assert not (spool / f"{'d' * 32}.json").exists()  # done: cleaned up
    assert (spool / f"{'e' * 32}.json").exists()  # another owner's: left alone
    assert (spool / f"{'f' * 32}.json.bad").exists()
    assert (spool / f"{'0' * 32}.json.bad").exists()
    assert all((spool / f"{str(i + 1) * 32}.json.bad").exists() for i in range(3))
    assert len(u.pending_lines()) == 3
    status = u.status()
    assert status["spool_dir"] == str(spool)
    # idsfs status: held (until the user acts) apart from pending (retried by itself)
    assert [line.split(" ")[0] for line in status["held"]] == ["ds/writing.dat"]
    assert sorted(line.split(" ")[0] for line in status["pending"]) == [
        "ds/pending.dat", "ds/uploading.dat"]
    assert status["left_alone"] == 1
    u.close_spool()


class SpoolSpy:
    """Wraps the ``os`` calls spool I/O uses; records which thread made each call on a
    spool file, and can hold a call until the test lets it go."""

    NAMES = ("open", "pwrite", "pread", "ftruncate", "fsync", "write", "replace", "unlink",
             "close")

    def __init__(self, spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.spool = str(spool)
        self.calls: list[tuple[str, int]] = []
        self.fds: set[int] = set()
        self.hold: dict[str, Callable[..., bool]] = {}  # name -> predicate on the args
        self.held = threading.Event()
        self.go_on = threading.Event()
        self.real = {n: getattr(os, n) for n in self.NAMES}
        for name in self.NAMES:
            monkeypatch.setattr(os, name, self._spy(name))

    def _ours(self, name: str, args: tuple[Any, ...]) -> bool:
        if name in ("open", "replace", "unlink"):
            return str(args[0]).startswith(self.spool)
        return bool(args) and args[0] in self.fds

    def _spy(self, name: str) -> Callable[..., Any]:
        real = self.real[name]

        def call(*args: Any, **kwargs: Any) -> Any:
            ours = self._ours(name, args)
            if ours:
                self.calls.append((name, threading.get_ident()))
                stop = self.hold.get(name)
                if stop is not None and stop(*args):
                    del self.hold[name]
                    self.held.set()
                    assert self.go_on.wait(5), "held call never let go"
            result = real(*args, **kwargs)
            if ours and name == "open":
                self.fds.add(result)
            elif ours and name == "close":
                self.fds.discard(args[0])
            return result

        return call


def test_spool_io_runs_in_worker_threads_and_a_stalled_disk_stalls_one_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = tmp_path / "spool"
    u = uploader(spool)
    spy = SpoolSpy(spool, monkeypatch)
    spy.hold["pwrite"] = lambda fd, data, offset: bytes(data[:5]) == b"stall"

    async def main() -> int:
        trio_thread = threading.get_ident()
        slow = await u.create(dataset_id=1, name="slow", display="ds/slow", format_id=1)
        other = await u.create(dataset_id=1, name="other", display="ds/other", format_id=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(u.write, slow, 0, b"stall the disk")
            await trio.to_thread.run_sync(spy.held.wait, 5)
            # the disk holds one pwrite: the trio thread serves everything else meanwhile
            assert await u.write(other, 0, b"hello world") == 11
            await u.truncate(other, 5)
            assert await u.read(other, 0, 100) == b"hello"
            await u.fsync(other)
            await u.save(other, durable=True)
            assert slow.size == 0 and slow.generation == 0  # applied only once written
            spy.go_on.set()
        assert slow.size == 14 and slow.generation == 1 and slow.sequential
        assert await u.read(slow, 0, 100) == b"stall the disk"
        for up in (slow, other):
            up.handles = 0
            up.cancelled = True
            await u.released(up)
        assert not u.uploads and not list(spool.glob("*.data"))
        return trio_thread

    trio_thread = trio.run(main)
    names = {name for name, _ in spy.calls}
    assert {"open", "pwrite", "pread", "ftruncate", "fsync", "replace", "unlink",
            "close"} <= names
    on_trio = [name for name, thread in spy.calls if thread == trio_thread]
    assert not on_trio, f"spool I/O on the trio thread: {on_trio}"
    u.close_spool()


def test_writes_of_one_file_apply_in_arrival_order(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spool = tmp_path / "spool"
    u = uploader(spool)
    spy = SpoolSpy(spool, monkeypatch)
    spy.hold["pwrite"] = lambda fd, data, offset: offset == 0

    async def main() -> None:
        up = await u.create(dataset_id=1, name="f", display="ds/f", format_id=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(u.write, up, 0, b"first")
            await trio.to_thread.run_sync(spy.held.wait, 5)
            nursery.start_soon(u.write, up, 5, b"second")
            await trio.sleep(0.05)
            assert up.size == 0  # the second waits for the first
            spy.go_on.set()
        # appended in order: still a sequential file (a live upload could follow it)
        assert up.size == 11 and up.sequential and up.generation == 2
        assert await u.read(up, 0, 20) == b"firstsecond"

    trio.run(main)
    u.close_spool()


def test_the_newest_record_wins_over_a_slow_older_save(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spool = tmp_path / "spool"
    u = uploader(spool)

    async def main() -> None:
        up = await u.create(dataset_id=1, name="f", display="ds/f", format_id=1)
        spy = SpoolSpy(spool, monkeypatch)
        spy.hold["write"] = lambda fd, data: b'"reason": "older"' in bytes(data)
        async with trio.open_nursery() as nursery:
            up.reason = "older"
            nursery.start_soon(u.save, up)
            await trio.to_thread.run_sync(spy.held.wait, 5)
            up.reason = "newer"
            nursery.start_soon(u.save, up)
            nursery.start_soon(u.save, up)  # nothing new: skipped or the same
            await trio.sleep(0.05)
            spy.go_on.set()
        assert json.loads(up.meta_path.read_text())["reason"] == "newer"
        assert not list(spool.glob(".*.tmp"))
        await u.forget(up)
        up.reason = "after removal"
        await u.save(up)  # never brings a removed record back
        assert not up.meta_path.exists()

    trio.run(main)
    u.close_spool()


def test_write_behind_returns_before_the_disk_and_reports_its_error_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = tmp_path / "spool"
    u = uploader(spool)
    spy = SpoolSpy(spool, monkeypatch)
    spy.hold["pwrite"] = lambda fd, data, offset: offset == 0

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(u.run)  # write-behind needs the uploader's task nursery
            up = await u.create(dataset_id=1, name="f", display="ds/f", format_id=1)
            assert await u.write(up, 0, b"held ") == 5  # accepted: its pwrite is held
            await trio.to_thread.run_sync(spy.held.wait, 5)
            assert await u.write(up, 5, b"queued") == 6
            assert up.size == 11 and up.queued_bytes == 11
            got: list[bytes] = []

            async def read() -> None:
                got.append(await u.read(up, 0, 100))

            nursery.start_soon(read)
            await trio.sleep(0.05)
            assert not got  # a read waits for the bytes behind
            spy.go_on.set()
            await u.fsync(up)
            await trio.sleep(0)
            assert got == [b"held queued"] and up.queued_bytes == 0
            # a failing disk: the write is accepted, the error comes with the next call
            real = spy.real["pwrite"]

            def full(fd: int, data: Any, offset: int) -> int:
                if offset >= 11:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(fd, data, offset)

            monkeypatch.setattr(os, "pwrite", full)
            assert await u.write(up, 11, b"lost") == 4
            with pytest.raises(SpoolError) as exc:
                await u.fsync(up)
            assert exc.value.errno == errno.ENOSPC
            with pytest.raises(SpoolError):
                await u.write(up, 15, b"more")
            assert up.write_error and up.size == 11  # the size the spool really has
            monkeypatch.setattr(os, "pwrite", real)
            await u.truncate(up, 0)  # written again from the start: usable again
            assert await u.write(up, 0, b"ok") == 2
            assert await u.read(up, 0, 10) == b"ok" and not up.write_error
            up.cancelled = True
            await u.released(up)
            nursery.cancel_scope.cancel()

    trio.run(main)
    u.close_spool()


def test_a_spool_file_that_cannot_be_opened_fails_the_writes_not_the_daemon(
        tmp_path: Path) -> None:
    # The write behind must reopen the spool file and cannot (deleted under it):
    # the error goes to the next call on the file; the uploader's task nursery
    # (the daemon's) goes on.
    spool = tmp_path / "spool"
    u = uploader(spool)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(u.run)
            up = await u.create(dataset_id=1, name="f", display="ds/f", format_id=1)
            assert await u.write(up, 0, b"first") == 5
            await u.fsync(up)
            await u._close_fd(up)
            up.data_path.unlink()
            assert await u.write(up, 5, b"behind") == 6  # accepted, then the drain fails
            with pytest.raises(SpoolError) as exc:
                await u.fsync(up)
            assert exc.value.errno == errno.ENOENT
            assert up.write_error and up.queued_bytes == 0
            other = await u.create(dataset_id=1, name="g", display="ds/g", format_id=1)
            assert await u.write(other, 0, b"fine") == 4  # the uploader still works
            await u.fsync(other)
            assert await u.read(other, 0, 10) == b"fine"
            for gone in (up, other):
                gone.cancelled = True
                await u.released(gone)
            nursery.cancel_scope.cancel()

    trio.run(main)
    u.close_spool()


@pytest.mark.parametrize("behind", [True, False], ids=["write-behind", "direct"])
def test_writes_carry_the_spool_crc32_while_only_appending(tmp_path: Path, behind: bool) -> None:
    import random
    import zlib

    spool = tmp_path / "spool"
    u = uploader(spool)
    rnd = random.Random(5)

    async def append(up: Upload, n: int) -> None:
        await u.write(up, up.size, rnd.randbytes(n))

    async def check(up: Upload) -> None:
        await u.fsync(up)  # the writes behind are in the spool file
        assert up.spool_crc == zlib.crc32(up.data_path.read_bytes())

    async def scenario() -> None:
        up = await u.create(dataset_id=1, name="f", display="ds/f", format_id=1)
        assert up.spool_crc == 0
        for _ in range(40):
            await append(up, rnd.choice([1, 7, 4096, 65536, 1 << 20]))
        await check(up)
        await u.write(up, 3, b"xyz")  # anywhere but the end: the bytes must be read again
        await u.fsync(up)
        assert up.spool_crc is None
        await append(up, 100)
        assert up.spool_crc is None
        await u.truncate(up, 0)  # written again from the start: carried again
        for _ in range(10):
            await append(up, rnd.randrange(1, 300000))
        await check(up)
        await u.truncate(up, up.size)  # the same size changes nothing
        await check(up)
        await u.truncate(up, up.size - 10)
        assert up.spool_crc is None
        await u.truncate(up, 0)
        await u.write(up, 10, b"hole")  # a hole before it
        await u.fsync(up)
        assert up.spool_crc is None
        up.cancelled = True
        await u.released(up)

    async def main() -> None:
        if not behind:
            await scenario()
            return
        async with trio.open_nursery() as nursery:
            await nursery.start(u.run)
            await scenario()
            nursery.cancel_scope.cancel()

    trio.run(main)
    u.close_spool()

"""idsfs.transfer with faults (drops, stalls, 500, busy) and two-level storage
(prepareData/isPrepared, one restore per file, restore timeout and failure,
expired preparedIds, status)."""

from __future__ import annotations

import errno

import pytest
import trio
from transferkit import KiB, MiB, World, make_transfer, make_world, random_bytes, read_all, run
from transferkit import running as running_transfer

import idsfs.transfer as transfer_mod
from idsfs.errors import (
    DataBusyError,
    IDSInternalError,
    IncompleteDownloadError,
    RestoreFailedError,
    RestoreTimeoutError,
    TransportTimeoutError,
)
from idsfs.transfer import ARCHIVED, ONLINE, RESTORE_FAILED, RESTORING

BS = 64 * KiB


@pytest.fixture
def world(emulator) -> World:
    return make_world(emulator)


def count(world: World, endpoint: str) -> int:
    return world.emu.counters.get(endpoint)


# ------------------------------------------------------------------ broken streams


def test_dropped_streams_are_resumed(world: World) -> None:
    data = random_bytes(2 * MiB + 3)
    df = world.put("drop.bin", data)
    transfer = make_transfer(world.client(), block_size=BS)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            world.emu.faults.drop(after_bytes=300_000, endpoint="ids/getData", count=2)
            reader = await transfer.open(df)
            assert await read_all(reader, 128 * KiB) == data
            await reader.close()

    run(body)
    assert count(world, "ids/getData") == 3
    assert transfer.stats().resumes == 2


def test_every_stream_dropped_still_completes_with_progress(world: World) -> None:
    data = random_bytes(1 * MiB)
    df = world.put("drops.bin", data)
    transfer = make_transfer(world.client(), block_size=BS)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            world.emu.faults.drop(after_bytes=200_000, endpoint="ids/getData")
            reader = await transfer.open(df)
            assert await read_all(reader, 128 * KiB) == data
            await reader.close()
            world.emu.faults.clear()

    run(body)
    assert 5 <= count(world, "ids/getData") <= 7


def test_stream_without_progress_fails_with_eio(world: World,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer_mod, "FAILED_READ_HOLD", 0.1)
    data = random_bytes(300 * KiB)
    df = world.put("dead.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, resume_retries=3)

    async def body() -> None:
        async with running_transfer(transfer):
            reader = await transfer.open(df)
            assert bytes(await reader.read(0, 10)) == data[:10]  # stream at block 1 now
            await transfer.close_streams()
            world.emu.counters.reset()
            world.emu.faults.drop(after_bytes=0, endpoint="ids/getData")
            with pytest.raises(IncompleteDownloadError) as info:
                await reader.read(2 * BS, 10)
            assert info.value.errno == 5
            assert "3 attempts in a row brought no new byte" in str(info.value)
            # three streams in a row without a byte: the first and two resumes
            assert count(world, "ids/getData") == 3
            world.emu.faults.clear()
            with pytest.raises(IncompleteDownloadError):  # at once, during the hold
                await reader.read(2 * BS, 10)
            assert count(world, "ids/getData") == 3
            await trio.sleep(0.1)
            # nothing wrong was cached: the next read works
            assert bytes(await reader.read(2 * BS, 10)) == data[2 * BS:2 * BS + 10]
            await reader.close()

    run(body)
    assert transfer.stats().failures >= 1


def test_resumes_without_progress_after_progress_are_bounded(world: World) -> None:
    data = random_bytes(1 * MiB)
    df = world.put("stall-drop.bin", data)
    transfer = make_transfer(world.client(timeout=(5.0, 0.5)), block_size=BS,
                             resume_retries=3)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            # the first stream brings block 0 and a part of block 1, then stalls
            world.emu.faults.stall(after_bytes=100_000, endpoint="ids/getData", count=1)
            reader = await transfer.open(df)
            try:
                async with trio.open_nursery() as nursery:
                    async def drop_the_resumes() -> None:
                        while not any(s.bytes >= BS for s in transfer.stats().streams):
                            await trio.sleep(0.005)
                        # before the read timeout: every resume is dropped at once
                        world.emu.faults.drop(after_bytes=0, endpoint="ids/getData")

                    nursery.start_soon(drop_the_resumes)
                    with pytest.raises(IncompleteDownloadError) as info:
                        await reader.read(0, 2 * BS)
                    assert info.value.offset == BS  # (the part of block 1 is not kept)
            finally:
                world.emu.faults.clear()
            await reader.close()

    run(body)
    # the stalled stream, then three resumes in a row that bring nothing
    assert count(world, "ids/getData") == 4
    assert transfer.stats().resumes == 3


def test_stalled_stream_is_resumed_after_the_read_timeout(world: World) -> None:
    data = random_bytes(1 * MiB)
    df = world.put("stall.bin", data)
    transfer = make_transfer(world.client(timeout=(5.0, 0.3)), block_size=BS)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            world.emu.faults.stall(after_bytes=100_000, endpoint="ids/getData", count=1)
            reader = await transfer.open(df)
            assert await read_all(reader, 128 * KiB) == data
            await reader.close()
            world.emu.faults.release_stalls()

    run(body)
    assert count(world, "ids/getData") == 2
    assert transfer.stats().resumes == 1


async def _stall_a_read(world: World, transfer, df) -> object:
    """Open ``df`` and start a read that stalls inside the pump thread; cancel it there."""
    world.emu.faults.stall(after_bytes=100_000, endpoint="ids/getData", count=1)
    reader = await transfer.open(df)
    with trio.CancelScope() as scope:
        async def cancel_when_stalled() -> None:
            # block 0 (64 KiB) arrives, block 1 stalls at 100 000 bytes
            while not any(s.bytes >= BS for s in transfer.stats().streams):
                await trio.sleep(0.005)
            await trio.sleep(0.05)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_stalled)
            await reader.read(0, 2 * BS)
    assert scope.cancelled_caught
    return reader


async def _threads_end_within(transfer, seconds: float) -> float:
    start = trio.current_time()
    while transfer._bridge.stats().threads_busy or transfer.stats().streams:
        assert trio.current_time() - start < seconds, "the pump thread is still reading"
        await trio.sleep(0.005)
    return trio.current_time() - start


def test_stalled_stream_of_a_closed_file_is_broken_off_at_once(world: World) -> None:
    data = random_bytes(1 * MiB)
    df = world.put("stall-close.bin", data)
    # a read timeout far longer than the test may wait
    transfer = make_transfer(world.client(timeout=(5.0, 30.0)), block_size=BS)

    async def body() -> None:
        async with running_transfer(transfer):
            try:
                reader = await _stall_a_read(world, transfer, df)
                await reader.close()  # the last reader: nobody wants the stalled blocks
                assert await _threads_end_within(transfer, 1.0) < 1.0
            finally:
                world.emu.faults.release_stalls()
            reader = await transfer.open(df)
            assert await read_all(reader, 128 * KiB) == data
            await reader.close()

    run(body)
    stats = transfer.stats()
    assert stats.resumes == 0 and stats.failures == 0


def test_close_streams_breaks_off_a_stalled_readahead(world: World) -> None:
    data = random_bytes(1 * MiB)
    df = world.put("stall-delete.bin", data)
    transfer = make_transfer(world.client(timeout=(5.0, 30.0)), block_size=BS)

    async def body() -> None:
        async with running_transfer(transfer):
            try:
                reader = await _stall_a_read(world, transfer, df)
                # the file is still open, but nobody waits for the stalled blocks
                # (as before a delete, which the stream's IDS lock would make busy)
                assert await transfer.close_streams(df.id) == 1
                assert await _threads_end_within(transfer, 1.0) < 1.0
            finally:
                world.emu.faults.release_stalls()
            assert bytes(await reader.read(0, len(data))) == data
            await reader.close()

    run(body)
    assert transfer.stats().resumes == 0


def test_internal_error_on_open_is_retried_within_the_bound(world: World) -> None:
    data = random_bytes(200 * KiB)
    df = world.put("e500.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, resume_retries=2)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.faults.error(500, "ids/getData", count=2)
            reader = await transfer.open(df)
            assert await read_all(reader) == data
            await reader.close()
            await transfer.close_streams()
            transfer.cache.clear()
            world.emu.faults.error(500, "ids/getData")
            reader = await transfer.open(df)
            with pytest.raises(IDSInternalError):
                await reader.read(0, 10)
            await reader.close()
            world.emu.faults.clear()

    run(body)


def test_a_server_that_never_answers_is_waited_for_by_the_client_tries_only(
        world: World) -> None:
    # getData gets no answer within the read timeout: the IDSClient tries
    # 1 + retries times; the transfer does not repeat all of that (it did,
    # resume_retries + 1 times: 16 read timeouts for one read with the defaults)
    data = random_bytes(200 * KiB)
    df = world.put("hung.bin", data)
    ids = world.client(timeout=(5.0, 0.3), retries=1)
    calls = []
    get_data = ids.getData

    def counted(*args, **kw):
        calls.append(kw.get("offset"))
        return get_data(*args, **kw)

    ids.getData = counted  # type: ignore[method-assign]
    transfer = make_transfer(ids, block_size=BS, resume_retries=3)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.faults.latency(1.0, "ids/getData")
            reader = await transfer.open(df)
            with pytest.raises(TransportTimeoutError):
                await reader.read(0, 10)
            await reader.close()
            world.emu.faults.clear()

    run(body)
    assert calls == [0]


def test_busy_is_retried_then_ebusy(world: World) -> None:
    data = random_bytes(200 * KiB)
    df = world.put("busy.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, busy_wait=0.5)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.faults.error(503, "ids/getData", message="Data is busy", count=5)
            reader = await transfer.open(df)
            assert await read_all(reader) == data
            await reader.close()
            transfer.cache.clear()
            world.emu.faults.error(503, "ids/getData", message="Data is busy")
            reader = await transfer.open(df)
            with pytest.raises(DataBusyError) as info:
                await reader.read(0, 10)
            assert info.value.errno == 16
            await reader.close()
            world.emu.faults.clear()

    run(body)
    assert transfer.stats().busy_retries >= 2


# ------------------------------------------------------------------ two-level storage


@pytest.fixture
def two_level(emulator_factory) -> World:
    return make_world(emulator_factory(storage="datafile", restore_delay=0.3))


def test_online_two_level_file_is_prepared_once(two_level: World) -> None:
    world = two_level
    data = random_bytes(500 * KiB)
    df = world.put("online.bin", data)
    transfer = make_transfer(world.client(), block_size=BS)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            for _ in range(3):
                reader = await transfer.open(df)
                assert await read_all(reader) == data
                await reader.close()
                transfer.cache.clear()
            assert await transfer.status(df) == ONLINE

    run(body)
    assert count(world, "ids/prepareData") == 1
    assert count(world, "ids/isPrepared") == 1
    assert count(world, "ids/getData") == 3
    assert count(world, "ids/getStatus") == 0  # known online from isPrepared


def test_archived_file_restored_once_for_many_readers(two_level: World) -> None:
    world = two_level
    data = random_bytes(700 * KiB)
    df = world.put("archived.bin", data)
    world.archive(df)
    transfer = make_transfer(world.client(), block_size=BS)
    results: list[bytes] = []
    statuses: list[str] = []

    async def one() -> None:
        reader = await transfer.open(df)
        results.append(await read_all(reader, 100_000))
        await reader.close()

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            assert await transfer.status(df) == ARCHIVED
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(one)
                await trio.sleep(0.1)
                statuses.append(await transfer.status(df))
                stats = transfer.stats()
                assert len(stats.restores) == 1 and stats.restores[0].datafile_id == df.id
            assert await transfer.status(df) == ONLINE

    run(body)
    assert len(results) == 8 and all(r == data for r in results)
    assert statuses == [RESTORING]
    assert count(world, "ids/prepareData") == 1
    assert count(world, "ids/getStatus") == 1  # the first, ARCHIVED; then from the mount
    # restore_delay 0.3 s, polls from 0.02 s doubling to 0.1 s: a handful, not 8 x that
    assert 2 <= count(world, "ids/isPrepared") <= 10
    assert count(world, "ids/getData") == 1


def test_restore_timeout_then_later_read_without_new_restore(emulator_factory) -> None:
    world = make_world(emulator_factory(storage="datafile", restore_delay=1.0))
    data = random_bytes(100 * KiB)
    df = world.put("slow.bin", data)
    world.archive(df)
    transfer = make_transfer(world.client(), block_size=BS, restore_wait=0.2)
    errors: list[BaseException] = []

    async def one() -> None:
        reader = await transfer.open(df)
        try:
            await reader.read(0, 10)
        except RestoreTimeoutError as exc:
            errors.append(exc)
        finally:
            await reader.close()

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(one)
            assert len(errors) == 4
            assert all(e.errno == errno.ENODATA and e.datafile_id == df.id for e in errors)
            assert await transfer.status(df) in (ARCHIVED, RESTORING)
            # the restore goes on; a later read waits for the same one
            transfer.restore_wait = 10.0
            reader = await transfer.open(df)
            assert await read_all(reader) == data
            await reader.close()

    run(body)
    assert count(world, "ids/prepareData") == 1
    assert transfer.stats().restore_timeouts >= 1


def test_a_failed_read_answers_the_same_range_at_once_for_a_while(
        emulator_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel repeats a failed readahead read for one page, and readers that
    # waited for the same pages ask again: one wait for them all, not one each.
    world = make_world(emulator_factory(storage="datafile", restore_delay=3.0))
    df = world.put("held.bin", random_bytes(4 * BS))
    world.archive(df)
    monkeypatch.setattr(transfer_mod, "FAILED_READ_HOLD", 0.6)
    transfer = make_transfer(world.client(), block_size=BS, restore_wait=0.25)

    async def timed_failure(reader, offset: int, size: int) -> float:
        start = trio.current_time()
        with pytest.raises(RestoreTimeoutError) as info:
            await reader.read(offset, size)
        assert info.value.errno == errno.ENODATA and info.value.datafile_id == df.id
        return trio.current_time() - start

    async def body() -> None:
        async with running_transfer(transfer):
            first = await transfer.open(df)
            second = await transfer.open(df)        # another reader of the same file
            assert await timed_failure(first, 0, 2 * BS) >= 0.25
            assert await timed_failure(first, 0, 4096) < 0.1     # the kernel's page retry
            assert await timed_failure(second, BS, 4096) < 0.1   # a reader that waited
            assert await timed_failure(second, 3 * BS, 10) >= 0.25  # another range waits
            # ... and the first range is still held (the kernel's parallel requests
            # fail one after another; each is repeated): not only the latest one
            assert await timed_failure(first, 0, 4096) < 0.1
            await trio.sleep(0.6)
            assert await timed_failure(first, 0, 4096) >= 0.25   # the hold is over
            await first.close()
            await second.close()

    run(body)


def test_an_ids_that_forgets_every_prepared_id_does_not_spin_past_restore_wait(
        two_level: World) -> None:
    # isPrepared answering 404 each time (e.g. IDS nodes behind a load balancer
    # without sticky sessions): prepared again and again, paced, until the deadline.
    world = two_level
    df = world.put("forgotten.bin", random_bytes(1000))
    world.archive(df)
    world.emu.faults.error(404, "ids/isPrepared")
    transfer = make_transfer(world.client(), restore_wait=0.5, poll_interval=0.1,
                             max_poll_interval=0.1)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            reader = await transfer.open(df)
            start = trio.current_time()
            with pytest.raises(RestoreTimeoutError, match="forgot its preparedId"):
                await reader.read(0, 10)
            assert 0.5 <= trio.current_time() - start < 2.0
            await reader.close()

    run(body)
    assert 3 <= count(world, "ids/prepareData") <= 8  # about one per poll interval


def test_restore_wait_zero_polls_once(two_level: World) -> None:
    world = two_level
    df = world.put("zero.bin", random_bytes(1000))
    world.archive(df)
    transfer = make_transfer(world.client(), restore_wait=0.0)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            reader = await transfer.open(df)
            with pytest.raises(RestoreTimeoutError):
                await reader.read(0, 10)
            await reader.close()

    run(body)
    assert count(world, "ids/prepareData") == 1
    assert count(world, "ids/isPrepared") == 1


def test_restore_failure_is_eio_then_retried_after_the_hold(
    two_level: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = two_level
    data = random_bytes(100 * KiB)
    df = world.put("fail.bin", data)
    world.archive(df)
    world.emu.storage.fail_next_restores(1)
    monkeypatch.setattr(transfer_mod, "FAILED_RESTORE_HOLD", 0.5)
    monkeypatch.setattr(transfer_mod, "FAILED_READ_HOLD", 0.2)
    transfer = make_transfer(world.client(), block_size=BS)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            reader = await transfer.open(df)
            with pytest.raises(RestoreFailedError) as info:
                await reader.read(0, 10)
            assert info.value.errno == 5
            assert await transfer.status(df) == RESTORE_FAILED
            prepares = count(world, "ids/prepareData")
            with pytest.raises(RestoreFailedError):  # within the hold: no new attempt
                await reader.read(0, 10)
            assert count(world, "ids/prepareData") == prepares == 1
            await trio.sleep(0.5)
            assert await read_all(reader) == data  # prepared again: restored
            await reader.close()

    run(body)
    assert count(world, "ids/prepareData") == 2


def test_status_is_cached(two_level: World) -> None:
    world = two_level
    df = world.put("st.bin", b"abc")
    world.archive(df)
    transfer = make_transfer(world.client(), status_ttl=0.3)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            for _ in range(5):
                assert await transfer.status(df) == ARCHIVED
            assert count(world, "ids/getStatus") == 1
            await trio.sleep(0.35)
            assert await transfer.status(df) == ARCHIVED
            assert count(world, "ids/getStatus") == 2

    run(body)


def test_a_file_in_use_keeps_its_restore_state_when_the_lru_is_full(
        two_level: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world = two_level
    monkeypatch.setattr(transfer_mod, "PREPARED_IDS", 2)
    data = random_bytes(200 * KiB)
    df = world.put("lru.bin", data)
    others = [world.put(f"other{i}.bin", b"x") for i in range(3)]
    world.archive(df)
    transfer = make_transfer(world.client(), block_size=BS)
    results: list[bytes] = []

    async def one() -> None:
        reader = await transfer.open(df)
        results.append(await read_all(reader))
        await reader.close()

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one)
                while not transfer.stats().restores:
                    await trio.sleep(0.005)
                for other in others:  # more datafiles than the LRU holds
                    assert await transfer.status(other) == ONLINE
                assert count(world, "ids/getStatus") == len(others)
                # the waiting file's state was not evicted: no second getStatus
                assert await transfer.status(df) == RESTORING
                assert count(world, "ids/getStatus") == len(others)
                assert [r.datafile_id for r in transfer.stats().restores] == [df.id]
                nursery.start_soon(one)  # a second reader joins the same restore

    run(body)
    assert results == [data, data]
    assert count(world, "ids/prepareData") == 1


def test_expired_prepared_id_is_replaced(emulator_factory) -> None:
    world = make_world(emulator_factory(storage="datafile", prepared_count=1))
    a = world.put("a.bin", random_bytes(150 * KiB))
    b = world.put("b.bin", random_bytes(150 * KiB))
    transfer = make_transfer(world.client(), block_size=BS)

    async def read(df) -> bytes:
        reader = await transfer.open(df)
        try:
            return await read_all(reader)
        finally:
            await reader.close()

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            assert await read(a) == world.content[a.id]
            assert await read(b) == world.content[b.id]  # a's preparedId is pruned now
            transfer.cache.clear()
            assert await read(a) == world.content[a.id]

    run(body)
    assert count(world, "ids/prepareData") == 3


def test_data_archived_again_is_waited_for(two_level: World) -> None:
    world = two_level
    data = random_bytes(200 * KiB)
    df = world.put("again.bin", data)
    transfer = make_transfer(world.client(), block_size=BS)

    async def read() -> bytes:
        reader = await transfer.open(df)
        try:
            return await read_all(reader)
        finally:
            await reader.close()

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            assert await read() == data
            await trio.to_thread.run_sync(world.archive, df)
            transfer.cache.clear()
            assert await read() == data  # getData 503 -> isPrepared restores it

    run(body)
    assert count(world, "ids/prepareData") == 1
    assert count(world, "ids/getData") >= 3  # ok, 503, ok


def test_dataset_storage_unit(emulator_factory) -> None:
    world = make_world(emulator_factory(storage="dataset", restore_delay=0.1))
    one = world.put("one.bin", random_bytes(100 * KiB), dataset="dsA")
    two = world.put("two.bin", random_bytes(70 * KiB), dataset="dsA")
    world.archive(one)  # archives the whole dataset
    transfer = make_transfer(world.client(), block_size=BS)

    async def body() -> None:
        async with running_transfer(transfer):
            for df in (one, two):
                reader = await transfer.open(df)
                assert await read_all(reader) == world.content[df.id]
                await reader.close()

    run(body)


def test_waiting_for_a_restore_does_not_block_other_files(emulator_factory) -> None:
    world = make_world(emulator_factory(storage="datafile", restore_delay=1.5))
    archived = world.put("wait.bin", random_bytes(100 * KiB))
    online = world.put("now.bin", random_bytes(300 * KiB), dataset="ds2")  # not locked
    world.archive(archived)
    transfer = make_transfer(world.client(), block_size=BS, max_pumps=1)
    took: list[float] = []

    async def slow() -> None:
        reader = await transfer.open(archived)
        assert await read_all(reader) == world.content[archived.id]
        await reader.close()

    async def body() -> None:
        async with running_transfer(transfer), trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.sleep(0.2)
            stats = transfer.stats()
            assert [r.datafile_id for r in stats.restores] == [archived.id]
            assert stats.restores[0].readers == 1
            assert any(s.state == "opening" for s in stats.streams)
            start = trio.current_time()
            reader = await transfer.open(online)
            assert await read_all(reader) == world.content[online.id]
            await reader.close()
            took.append(trio.current_time() - start)
            assert len(transfer.stats().restores) == 1  # still waiting

    run(body)
    assert took[0] < 1.0


def test_bytes_beyond_filesize_are_ignored(
    two_level: World, caplog: pytest.LogCaptureFixture
) -> None:
    world = two_level
    data = random_bytes(200 * KiB)
    df = world.put("long.bin", data)
    world.icat.update(df, fileSize=len(data) - 1000)
    shorter = world.datafile(df.id)
    transfer = make_transfer(world.client(), block_size=BS)

    async def body() -> None:
        async with running_transfer(transfer):
            reader = await transfer.open(shorter)
            assert await read_all(reader) == data[:len(data) - 1000]
            assert len(await reader.read(len(data) - 1000, 10)) == 0
            # preparedId answers are not cut (no Content-Length): the stream's thread
            # reads past fileSize after the last block (closing the file first
            # would break the stream off before that)
            with trio.fail_after(10):
                while "more bytes than its fileSize" not in caplog.text:
                    await trio.sleep(0.01)
            await reader.close()

    with caplog.at_level("WARNING", logger="idsfs.transfer"):
        run(body)


def test_prepare_and_status_with_an_expired_session(two_level: World) -> None:
    world = two_level
    df = world.put("sess2.bin", random_bytes(100 * KiB))
    client = world.client()
    renewals: list[int] = []

    async def renew() -> bool:
        renewals.append(1)
        client.sessionId = world.emu.login("root")
        return True

    transfer = make_transfer(client, block_size=BS, renew_session=renew)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.expire_sessions()
            assert await transfer.status(df) == ONLINE  # getStatus: 403, renewed, again
            world.emu.expire_sessions()
            reader = await transfer.open(df)
            assert await read_all(reader) == world.content[df.id]  # prepareData likewise
            await reader.close()
            # the preparedId does not need the session: expired, reads still work
            world.emu.expire_sessions()
            transfer.cache.clear()
            reader = await transfer.open(df)
            assert await read_all(reader) == world.content[df.id]
            await reader.close()

    run(body)
    assert renewals == [1, 1]

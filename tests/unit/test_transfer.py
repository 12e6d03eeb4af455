"""idsfs.transfer against a single-level emulator: bytes, streams, readahead,
single flight, idle streams and locks, versions, sessions, checksums."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import random
import traceback

import pytest
import trio
from transferkit import KiB, MiB, World, make_transfer, make_world, random_bytes, read_all, run
from transferkit import running as running_transfer

import idsfs.transfer as transfer_mod
from idsfs.errors import (
    ChecksumMismatchError,
    IDSDataNotOnlineError,
    IDSInsufficientPrivilegesError,
    IDSResponseError,
    IncompleteDownloadError,
    TransferError,
)
from idsfs.ids import DataSelection
from idsfs.transfer import ONLINE, Transfer

BS = 64 * KiB


@pytest.fixture
def world(emulator) -> World:
    return make_world(emulator)


def getdata(world: World) -> int:
    return world.emu.counters.get("ids/getData")


SIZES = [0, 1, BS - 1, BS, BS + 1, 3 * MiB + 123]


def test_sequential_reads_match_stored_bytes(world: World) -> None:
    files = [world.put(f"f{size}.bin", random_bytes(size)) for size in SIZES]
    transfer = make_transfer(world.client(), block_size=BS)

    async def body() -> None:
        async with running_transfer(transfer):
            for df in files:
                reader = await transfer.open(df)
                assert reader.size == df.fileSize and reader.datafile_id == df.id
                for chunk in (4096, 128 * KiB, 1 * MiB):
                    got = await read_all(reader, chunk)
                    assert got == world.content[df.id], (df.fileSize, chunk)
                # reads are short only at EOF
                if df.fileSize:
                    tail = await reader.read(df.fileSize - 1, 100)
                    assert bytes(tail) == world.content[df.id][-1:]
                assert len(await reader.read(df.fileSize, 10)) == 0
                assert len(await reader.read(df.fileSize + 12345, 10)) == 0
                await reader.close()

    run(body)
    # the empty file needs no request
    assert transfer.stats().bytes_fetched == sum(SIZES)


def test_random_reads_match_stored_bytes(world: World) -> None:
    data = random_bytes(2 * MiB + 777)
    df = world.put("random.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, capacity=512 * KiB)
    rng = random.Random(4)

    async def body() -> None:
        async with running_transfer(transfer):
            reader = await transfer.open(df)
            for _ in range(150):
                offset = rng.randrange(0, len(data) + 10)
                size = rng.choice([1, 100, 4096, BS, 3 * BS + 5, 300 * KiB])
                got = await reader.read(offset, size)
                assert bytes(got) == data[offset:offset + size]
            await reader.close()

    run(body)
    assert transfer.stats().failures == 0


def test_open_makes_no_ids_call(world: World) -> None:
    df = world.put("a.bin", random_bytes(100))
    transfer = make_transfer(world.client(), single_level=True)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            reader = await transfer.open(df)
            assert world.emu.counters.total("ids/*") == 0
            assert bytes(await reader.read(0, 100)) == world.content[df.id]
            assert world.emu.counters.total("ids/*") == 1  # one getData
            await reader.close()

    run(body)


def test_sequential_read_reuses_one_stream(world: World) -> None:
    data = random_bytes(4 * MiB + 5)
    df = world.put("big.bin", data)
    transfer = make_transfer(world.client(), block_size=BS)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            reader = await transfer.open(df)
            assert await read_all(reader, 128 * KiB) == data
            await reader.close()

    run(body)
    stats = transfer.stats()
    assert getdata(world) == 1
    assert stats.streams_opened == 1
    assert stats.blocks_fetched == -(-len(data) // BS)
    assert stats.stream_reuses == stats.blocks_fetched - 1
    assert stats.streams == ()  # closed at EOF
    data = stats.as_dict()
    assert data["streams_opened"] == 1 and data["in_flight"] == 0
    assert data["cache"]["capacity"] == 64 * MiB and 0 <= data["cache"]["hit_rate"] <= 1
    json.dumps(data)


def test_readahead_grows_on_sequential_reads_only(world: World) -> None:
    data = random_bytes(4 * MiB)
    df = world.put("ra.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, max_readahead=8 * BS, max_gap=0)
    cache = transfer.cache

    async def until_fetched(n: int) -> None:
        with trio.fail_after(10):
            while cache.stats().bytes_fetched < n:
                await trio.sleep(0.005)

    async def body() -> None:
        async with running_transfer(transfer):
            reader = await transfer.open(df)
            key = reader.key
            # sequential reads from 0: the window doubles (1, 2, 4, 8 blocks)
            for i in range(4):
                assert bytes(await reader.read(i * BS, BS)) == data[i * BS:(i + 1) * BS]
            await until_fetched(12 * BS)
            assert all(cache.contains(key, i) for i in range(4, 12))
            await trio.sleep(0.05)
            assert not cache.contains(key, 12)  # 3 + 8 is the last one
            readahead = transfer.stats().readahead_blocks
            assert readahead >= 8
            # a random read resets it: nothing more is prefetched
            await reader.read(40 * BS, 100)
            await trio.sleep(0.05)
            assert not cache.contains(key, 41)
            assert transfer.stats().readahead_blocks == readahead
            await reader.close()

    run(body)


def test_read_through_small_gap_and_new_stream_for_far_offset(world: World) -> None:
    data = random_bytes(8 * MiB)
    df = world.put("gaps.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, max_readahead=0, max_gap=4 * BS)
    cache = transfer.cache

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            reader = await transfer.open(df)
            key = reader.key
            assert bytes(await reader.read(0, 10)) == data[:10]
            assert getdata(world) == 1
            # 3 blocks further: read through on the same stream, gap blocks cached
            off = 4 * BS + 7
            assert bytes(await reader.read(off, 10)) == data[off:off + 10]
            assert getdata(world) == 1
            for i in (1, 2, 3):
                with trio.fail_after(5):
                    while not cache.contains(key, i):
                        await trio.sleep(0.005)
            hits = cache.stats().hits
            assert bytes(await reader.read(2 * BS, BS)) == data[2 * BS:3 * BS]
            assert cache.stats().hits == hits + 1
            # far away: a new stream at that offset
            off = 100 * BS
            assert bytes(await reader.read(off, 10)) == data[off:off + 10]
            assert getdata(world) == 2
            # and back to where the first stream stands: reused
            assert bytes(await reader.read(5 * BS, 10)) == data[5 * BS:5 * BS + 10]
            assert getdata(world) == 2
            await reader.close()

    run(body)


def test_sixteen_readers_of_one_file_fetch_each_block_once(world: World) -> None:
    data = random_bytes(3 * MiB + 17)
    df = world.put("shared.bin", data)
    transfer = make_transfer(world.client(), block_size=BS)
    results: list[bytes] = []

    async def one(chunk: int) -> None:
        reader = await transfer.open(df)
        results.append(await read_all(reader, chunk))
        await reader.close()

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(one, [4 * KiB, 128 * KiB, 1 * MiB, 100_000][i % 4])

    run(body)
    assert len(results) == 16 and all(r == data for r in results)
    blocks = -(-len(data) // BS)
    stats = transfer.stats()
    assert stats.blocks_fetched == blocks
    assert stats.bytes_fetched == len(data)
    assert stats.cache.misses + stats.cache.prefetches == blocks
    assert world.emu.counters.bytes_sent("ids/getData") <= 2 * len(data)
    assert getdata(world) <= 3


def test_sixteen_readers_of_different_files(world: World) -> None:
    files = [world.put(f"p{i}.bin", random_bytes(300 * KiB + i)) for i in range(16)]
    transfer = make_transfer(world.client(), block_size=BS)
    ok: list[int] = []

    async def one(df) -> None:
        reader = await transfer.open(df)
        assert await read_all(reader, 128 * KiB) == world.content[df.id]
        await reader.close()
        ok.append(df.id)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            async with trio.open_nursery() as nursery:
                for df in files:
                    nursery.start_soon(one, df)

    run(body)
    assert len(ok) == 16
    assert getdata(world) == 16


def test_idle_stream_is_closed_and_releases_the_lock(world: World) -> None:
    data = random_bytes(48 * MiB)
    df = world.put("locked.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, max_readahead=0,
                             stream_idle_timeout=0.3)
    sel = DataSelection({"datafileIds": [df.id]})

    async def body() -> None:
        async with running_transfer(transfer):
            reader = await transfer.open(df)
            assert bytes(await reader.read(0, 100)) == data[:100]
            assert len(transfer.stats().streams) == 1
            # the open getData stream holds a SHARED lock: delete is refused
            client = world.client(retries=0)
            with pytest.raises(IDSDataNotOnlineError, match=r"(?i)busy"):
                await trio.to_thread.run_sync(client.delete, sel)
            with trio.fail_after(5):
                while transfer.stats().streams:
                    await trio.sleep(0.02)
            # the server notices the closed connection and releases the lock
            with trio.fail_after(5):
                while True:
                    try:
                        await trio.to_thread.run_sync(client.delete, sel)
                        break
                    except IDSDataNotOnlineError:
                        await trio.sleep(0.05)
            await reader.close()

    run(body)


def test_last_close_closes_streams_at_once(world: World) -> None:
    data = random_bytes(48 * MiB)
    df = world.put("close.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, stream_idle_timeout=60)

    async def body() -> None:
        async with running_transfer(transfer):
            first = await transfer.open(df)
            second = await transfer.open(df)
            assert bytes(await first.read(0, 100)) == data[:100]
            await first.read(BS, 100)
            await first.close()
            assert transfer.stats().streams  # the second reader still has the file open
            await second.close()
            with trio.fail_after(2):  # not after the 60 s idle timeout
                while transfer.stats().streams:
                    await trio.sleep(0.005)
            assert await transfer.close_streams() == 0

    run(body)


def test_close_streams_for_a_datafile(world: World) -> None:
    data = random_bytes(48 * MiB)
    df = world.put("cs.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, max_readahead=0,
                             stream_idle_timeout=60)

    async def body() -> None:
        async with running_transfer(transfer):
            reader = await transfer.open(df)
            await reader.read(0, 100)
            assert await transfer.close_streams(df.id + 1000) == 0
            assert await transfer.close_streams(df.id) == 1
            with trio.fail_after(5):  # at once, or when its pump has finished
                while transfer.stats().streams:
                    await trio.sleep(0.005)
            assert bytes(await reader.read(BS, 10)) == data[BS:BS + 10]
            await reader.close()

    run(body)


def test_keep_cache_only_for_unchanged_versions(world: World) -> None:
    data = random_bytes(200 * KiB)
    df = world.put("v.bin", data)
    transfer = make_transfer(world.client(), block_size=BS)
    changed = dataclasses.replace(df, modTime=(df.modTime or dt.datetime.now(dt.UTC))
                                  + dt.timedelta(seconds=5))

    async def body() -> None:
        async with running_transfer(transfer):
            first = await transfer.open(df)
            assert first.keep_cache
            await read_all(first)
            await first.close()
            again = await transfer.open(df)
            assert again.keep_cache
            assert transfer.cache.stats().blocks == 4
            await again.close()
            newer = await transfer.open(changed)
            assert not newer.keep_cache
            assert transfer.cache.stats().blocks == 0  # old blocks dropped
            assert await read_all(newer) == data
            await newer.close()
            assert (await transfer.open(changed)).keep_cache

    run(body)


def test_status_on_single_level_is_online_without_calls(world: World) -> None:
    df = world.put("s.bin", b"x")
    transfer = make_transfer(world.client())

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            assert await transfer.status(df) == ONLINE
            assert await transfer.status(df) == ONLINE
            assert world.emu.counters.total("ids/*") == 1  # isTwoLevel, once

    run(body)


def test_expired_session_is_renewed_through_the_hook(world: World) -> None:
    df = world.put("sess.bin", random_bytes(100 * KiB))
    client = world.client()
    calls: list[int] = []

    async def renew() -> bool:
        calls.append(1)
        client.sessionId = world.emu.login("root")
        return True

    transfer = make_transfer(client, renew_session=renew, single_level=True)
    plain = make_transfer(world.client(), single_level=True)

    async def body() -> None:
        async with running_transfer(transfer), running_transfer(plain):
            world.emu.expire_sessions()
            reader = await transfer.open(df)
            assert await read_all(reader) == world.content[df.id]
            assert calls == [1]
            await reader.close()
            other = await plain.open(df)
            with pytest.raises(IDSInsufficientPrivilegesError):
                await other.read(0, 10)
            await other.close()

    run(body)


def test_swapped_session_id_is_used_without_the_hook(world: World) -> None:
    df = world.put("swap.bin", random_bytes(1000))
    client = world.client()
    transfer = make_transfer(client, single_level=True)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.expire_sessions()
            client.sessionId = world.emu.login("root")  # what the daemon does after re-login
            reader = await transfer.open(df)
            assert await read_all(reader) == world.content[df.id]
            await reader.close()

    run(body)


def test_checksum_mismatch_fails_the_read_and_drops_the_blocks(world: World) -> None:
    data = random_bytes(300 * KiB)
    df = world.put("crc.bin", data)
    wrong = dataclasses.replace(df, checksum="00000000" if df.checksum != "00000000" else "1")
    transfer = make_transfer(world.client(), block_size=BS, verify_checksum=True)
    lenient = make_transfer(world.client(), block_size=BS)  # the default: no CRC32

    async def body() -> None:
        async with running_transfer(transfer), running_transfer(lenient):
            reader = await transfer.open(wrong)
            with pytest.raises(ChecksumMismatchError) as info:
                await read_all(reader, BS)
            assert info.value.errno == 5 and info.value.datafile_id == df.id
            assert transfer.cache.stats().blocks == 0
            depths = []
            for _ in range(20):  # every read of the open file fails, with the same error
                with pytest.raises(ChecksumMismatchError) as again:
                    await reader.read(0, 10)
                depths.append(len(traceback.extract_tb(again.value.__traceback__)))
            # its traceback does not grow with each raise (the first of these reads
            # fails in the cache, the next ones from the failed-read hold)
            assert max(depths[1:]) == min(depths[1:]) <= depths[0]
            await reader.close()
            ok = await lenient.open(wrong)
            assert await read_all(ok, BS) == data
            await ok.close()
            right = await transfer.open(df)
            assert await read_all(right, BS) == data
            await right.close()

    run(body)


def test_file_shorter_than_filesize_fails_instead_of_short_read(world: World) -> None:
    data = random_bytes(100 * KiB)
    df = world.put("short.bin", data)
    world.icat.update(df, fileSize=len(data) + 1000)
    longer = world.datafile(df.id)
    assert longer.fileSize == len(data) + 1000
    transfer = make_transfer(world.client(), block_size=BS, resume_retries=2)

    async def body() -> None:
        async with running_transfer(transfer):
            reader = await transfer.open(longer)
            assert bytes(await reader.read(0, BS)) == data[:BS]
            with pytest.raises(IncompleteDownloadError) as info:
                await reader.read(BS, BS)
            assert info.value.offset == len(data) and info.value.errno == 5
            await reader.close()

    run(body)
    # the first stream ends short after its bytes; two resumes in a row bring nothing
    assert transfer.stats().resumes == 2


def test_an_answer_longer_than_the_rest_of_the_file_is_refused(world: World) -> None:
    # IDS announces more bytes than the fileSize the mount knows leaves from the
    # offset (IDS sends Content-Length = ICAT's fileSize - offset: the two
    # disagree, or a proxy ignored the range): nothing is read, instead of the
    # first bytes passing for the file or for the bytes at the offset.
    data = random_bytes(100 * KiB)
    df = world.put("long.bin", data)
    shorter = dataclasses.replace(df, fileSize=len(data) - 1000)
    transfer = make_transfer(world.client(), block_size=BS)

    async def body() -> None:
        async with running_transfer(transfer):
            for offset in (0, BS):
                reader = await transfer.open(shorter)
                with pytest.raises(IDSResponseError, match="disagree") as info:
                    await reader.read(offset, BS)
                assert info.value.__cause__ is None  # refused here, not a server error
                await reader.close()

    run(body)


def test_aclose_closes_streams_and_refuses_reads(world: World) -> None:
    data = random_bytes(48 * MiB)
    df = world.put("ac.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, stream_idle_timeout=60)

    async def body() -> None:
        async with running_transfer(transfer):
            reader = await transfer.open(df)
            await reader.read(0, 10)
            assert transfer.stats().streams
            await transfer.aclose()
            assert transfer.stats().streams == ()
            with pytest.raises(TransferError):
                await reader.read(30 * MiB, 10)
            with pytest.raises(TransferError):
                await transfer.open(df)

    run(body)


def test_transfer_started_lazily_without_run(world: World) -> None:
    data = random_bytes(500 * KiB)
    df = world.put("lazy.bin", data)
    transfer = make_transfer(world.client(), block_size=BS)

    async def body() -> None:
        reader = await transfer.open(df)
        assert await read_all(reader) == data
        await reader.close()
        await transfer.aclose()

    run(body)


def test_cancelled_read_leaves_the_block_to_the_next_reader(world: World) -> None:
    data = random_bytes(1 * MiB)
    df = world.put("cancel.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, max_readahead=0)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.faults.latency(0.3, "ids/getData", count=1)
            world.emu.counters.reset()
            reader = await transfer.open(df)
            with trio.move_on_after(0.1) as scope:
                await reader.read(0, 10)
            assert scope.cancelled_caught
            assert bytes(await reader.read(0, 10)) == data[:10]
            assert await read_all(reader) == data
            await reader.close()

    run(body)
    assert getdata(world) == 1


def test_parameters_are_checked(world: World) -> None:
    from idsfs.aio import ThreadBridge
    from idsfs.blockcache import BlockCache

    ids = world.client()
    with pytest.raises(ValueError):
        Transfer(ids, ThreadBridge(), BlockCache(1 << 20), restore_wait=-1)
    with pytest.raises(ValueError):
        Transfer(ids, ThreadBridge(), BlockCache(1 << 20), restore_wait=1, poll_interval=0)
    transfer = Transfer(ids, ThreadBridge(), BlockCache(1 << 20), restore_wait=1)

    async def body() -> None:
        with pytest.raises(ValueError):
            await transfer.open(object())
        reader = await transfer.open(world.put("p.bin", b"abc"))
        with pytest.raises(ValueError):
            await reader.read(-1, 1)
        await reader.close()
        await reader.close()
        with pytest.raises(ValueError):
            await reader.read(0, 1)
        await transfer.aclose()

    run(body)


def test_release_delivered_drops_blocks_of_a_sole_reader_only(world: World) -> None:
    data = random_bytes(16 * BS)
    df = world.put("release.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, max_readahead=0)
    cache = transfer.cache

    async def body() -> None:
        async with running_transfer(transfer):
            reader = await transfer.open(df)
            reader.release_delivered = True
            assert bytes(await reader.read(0, BS)) == data[:BS]
            assert not cache.contains(reader.key, 0)  # delivered whole: released
            assert bytes(await reader.read(BS, 100)) == data[BS:BS + 100]
            assert cache.contains(reader.key, 1)  # only partly delivered: kept
            second = await transfer.open(df)  # another reader of the file: keep everything
            assert bytes(await reader.read(2 * BS, BS)) == data[2 * BS:3 * BS]
            assert cache.contains(reader.key, 2)
            await second.close()
            plain = await transfer.open(df)  # without release_delivered nothing is released
            await reader.close()
            assert bytes(await plain.read(3 * BS, BS)) == data[3 * BS:4 * BS]
            assert cache.contains(plain.key, 3)
            await plain.close()
            assert cache.stats().released == 1

    run(body)


def test_release_delivered_counts_reads_smaller_than_a_block(world: World) -> None:
    # The kernel's requests may be smaller than a block (128 KiB requests, 1 MiB blocks
    # when the readahead cannot be raised): a block leaves the cache once its bytes were
    # all delivered, in whatever order the reads arrived.
    data = random_bytes(4 * BS)
    df = world.put("release-small.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, max_readahead=0)
    cache = transfer.cache
    quarter = BS // 4

    async def body() -> None:
        async with running_transfer(transfer):
            reader = await transfer.open(df)
            reader.release_delivered = True
            for i in (0, 2, 1):
                assert bytes(await reader.read(i * quarter, quarter)) == \
                    data[i * quarter:(i + 1) * quarter]
                assert cache.contains(reader.key, 0)  # three quarters delivered: kept
            assert bytes(await reader.read(3 * quarter, quarter)) == data[3 * quarter:BS]
            assert not cache.contains(reader.key, 0)  # all of it delivered: released
            # a read across a block boundary completes the first block only
            assert bytes(await reader.read(BS, BS + 10)) == data[BS:2 * BS + 10]
            assert not cache.contains(reader.key, 1) and cache.contains(reader.key, 2)
            await reader.close()
            assert cache.stats().released == 2

    run(body)


def test_readahead_survives_requests_arriving_slightly_out_of_order(world: World) -> None:
    data = random_bytes(40 * BS)
    df = world.put("reorder.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, max_readahead=8 * BS, max_gap=0)

    async def body() -> None:
        async with running_transfer(transfer):
            world.emu.counters.reset()
            reader = await transfer.open(df)
            # the kernel's parallel readahead requests: 0 1 2 3, then 5 before 4, ...
            for i in (0, 1, 2, 3, 5, 4, 6, 8, 7, 9, 10, 11):
                assert bytes(await reader.read(i * BS, BS)) == data[i * BS:(i + 1) * BS]
            stats = transfer.stats()
            assert stats.readahead_blocks >= 12  # the window kept growing
            assert getdata(world) == 1  # one stream served it all
            await reader.close()

    run(body)


def test_a_sequential_reader_keeps_its_pump_thread(world: World) -> None:
    data = random_bytes(48 * BS)
    df = world.put("linger.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, max_readahead=4 * BS)

    async def body() -> None:
        async with running_transfer(transfer):
            reader = await transfer.open(df)
            before = transfer._bridge.stats().total
            for i in range(48):
                assert bytes(await reader.read(i * BS, BS)) == data[i * BS:(i + 1) * BS]
                await trio.sleep(0.005)  # a reader slower than the stream: the pump waits
            calls = transfer._bridge.stats().total - before
            # one getData and a pump thread that waits for the next queued block
            # instead of ending (and being started again) after every block
            assert calls <= 8, calls
            await reader.close()

    run(body)


def test_malloc_is_tuned_only_when_asked(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(transfer_mod, "tune_malloc", calls.append)
    make_transfer(world.client(), capacity=8 * MiB)
    assert calls == []  # a library leaves its host process's allocator alone
    make_transfer(world.client(), capacity=8 * MiB, malloc_tuning=True)
    assert calls == [4 * MiB]


#: Run in a child (the settings are process-wide): tune_malloc(argv[1]), then
#: 200 MiB of 1 MiB buffers are made and freed; prints the share of them the
#: heap still holds (1.0: kept for reuse, less: trimmed, given back).
_KEEP_PROBE = """
import sys
from idsfs.transfer import tune_malloc
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
assert tune_malloc(int(sys.argv[1]))
base = rss()
blocks = [bytearray(1 << 20) for _ in range(200)]
peak = rss()
del blocks
print((rss() - base) / (peak - base))
"""


@pytest.mark.parametrize("cache_size", [1 << 30, 8 << 30, 10**30])
def test_tune_malloc_keeps_freed_blocks_for_caches_of_any_size(cache_size: int) -> None:
    # mallopt takes a C int: 8 GiB used to wrap around to 0 (everything freed
    # trimmed at once, the opposite of the intent), 10**30 raised ArgumentError.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _KEEP_PROBE, str(cache_size // 2)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) > 0.9


def test_release_free_memory_gives_the_kept_buffers_back() -> None:
    # what an idle daemon does: the heap kept freed buffers for reuse, now they go
    import subprocess
    import sys

    probe = _KEEP_PROBE.replace("print(", "kept = (") + (
        "from idsfs.transfer import release_free_memory\n"
        "assert release_free_memory()\n"
        "print(kept, (rss() - base) / (peak - base))\n")
    done = subprocess.run([sys.executable, "-c", probe, str(1 << 30)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    kept, after = map(float, done.stdout.split())
    assert kept > 0.9 and after < 0.2


def test_a_failing_block_hand_over_fails_the_read_not_the_trio_run(
        world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The hand-over of a fetched block runs as a run_sync_soon callback, where an
    # exception would crash trio (TrioInternalError): a bug there fails the read.
    data = random_bytes(4 * BS)
    df = world.put("handover.bin", data)
    transfer = make_transfer(world.client(), block_size=BS, max_readahead=0)

    def broken(*args: object) -> None:
        raise RuntimeError("bug in the hand-over")

    async def body() -> None:
        async with running_transfer(transfer):
            reader = await transfer.open(df)
            monkeypatch.setattr(transfer, "_finish_claim", broken)
            with pytest.raises(TransferError, match="internal error: bug in the hand-over"):
                await reader.read(0, BS)
            monkeypatch.undo()
            assert bytes(await reader.read(0, BS)) == data[:BS]  # the next read works
            await reader.close()

    # no failed-read hold: the same range is read again at once
    with caplog.at_level(logging.ERROR, logger="idsfs.transfer"), \
            pytest.MonkeyPatch.context() as no_hold:
        no_hold.setattr(transfer_mod, "FAILED_READ_HOLD", 0.0)
        run(body)
    assert "handing a fetched block over failed" in caplog.text

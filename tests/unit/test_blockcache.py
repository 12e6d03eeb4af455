"""Tests of idsfs.blockcache: byte-sized LRU of blocks with single-flight misses."""

from __future__ import annotations

import errno
import random

import pytest
import trio

from idsfs.blockcache import (
    DEFAULT_BLOCK_SIZE,
    BlockCache,
    BlockLengthError,
    FileKey,
    check_block_size,
)

BS = 4096


def content(datafile_id: int, size: int) -> bytes:
    """Deterministic, position-dependent file content."""
    rng = random.Random(datafile_id)
    return rng.randbytes(size)


class Source:
    """A fetch function over in-memory files that records its calls."""

    def __init__(self, files: dict[int, bytes], delay: float = 0.0) -> None:
        self.files = files
        self.delay = delay
        self.calls: list[tuple[int, int, int]] = []

    def fetch_for(self, datafile_id: int):
        async def fetch(offset: int, length: int) -> bytes:
            self.calls.append((datafile_id, offset, length))
            if self.delay:
                await trio.sleep(self.delay)
            return self.files[datafile_id][offset : offset + length]

        return fetch


@pytest.mark.parametrize("size", [4096, 8192, 1 << 20, 1 << 26])
def test_valid_block_sizes(size: int) -> None:
    assert check_block_size(size) == size
    assert BlockCache(0, size).block_size == size


@pytest.mark.parametrize("size", [0, 1, 2048, 4095, 4097, 12288, 1 << 27, True, 4096.0])
def test_invalid_block_sizes(size: object) -> None:
    with pytest.raises(ValueError, match="power of two"):
        check_block_size(size)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BlockCache(1 << 20, size)  # type: ignore[arg-type]


def test_defaults_and_bad_arguments() -> None:
    assert BlockCache(1 << 20).block_size == DEFAULT_BLOCK_SIZE == 1 << 20
    with pytest.raises(ValueError, match="capacity"):
        BlockCache(-1)
    with pytest.raises(ValueError, match="file size"):
        FileKey(1, -5)


def test_block_geometry() -> None:
    cache = BlockCache(10 * BS, BS)
    f = FileKey(1, 3 * BS + 100)
    assert cache.block_count(f) == 4
    assert cache.block_count(FileKey(2, 0)) == 0
    assert cache.block_count(FileKey(2, BS)) == 1
    assert [cache.block_length(f, i) for i in range(4)] == [BS, BS, BS, 100]
    with pytest.raises(ValueError, match="outside"):
        cache.block_length(f, 4)
    with pytest.raises(ValueError, match="outside"):
        cache.block_length(f, -1)
    assert cache.block_span(f, 0, 1) == range(0, 1)
    assert cache.block_span(f, BS - 1, 2) == range(0, 2)
    assert cache.block_span(f, 0, 10 * BS) == range(0, 4)
    assert cache.block_span(f, f.size, 10) == range(0)
    assert cache.block_span(f, 5, 0) == range(0)
    with pytest.raises(ValueError):
        cache.block_span(f, -1, 5)
    with pytest.raises(ValueError):
        cache.block_span(f, 0, -5)


def test_range_assembly_across_blocks_and_at_eof() -> None:
    size = 3 * BS + 100
    data = content(1, size)
    src = Source({1: data})
    f = FileKey(1, size)
    cases = [
        (0, 10),
        (BS - 3, 6),  # straddles blocks 0 and 1
        (BS, BS),  # exactly block 1
        (10, 3 * BS),  # four blocks, partial at both ends
        (0, size),  # the whole file
        (3 * BS + 50, 1000),  # runs past EOF: short
        (size - 1, 1),
        (size, 10),  # at EOF: empty
        (size + 5000, 10),  # past EOF: empty
        (77, 0),  # zero size
    ]

    async def main() -> None:
        cache = BlockCache(100 * BS, BS)
        for offset, n in cases:
            got = await cache.get_range(f, offset, n, src.fetch_for(1))
            assert isinstance(got, memoryview)
            assert got.readonly
            assert bytes(got) == data[offset : offset + n], (offset, n)
        # Each block was fetched once, with the right length (short at EOF).
        assert sorted(src.calls) == [(1, 0, BS), (1, BS, BS), (1, 2 * BS, BS), (1, 3 * BS, 100)]
        stats = cache.stats()
        assert stats.misses == 4
        assert stats.bytes == size
        assert stats.blocks == 4

    trio.run(main)


def test_read_inside_one_block_is_a_view_of_the_cached_block() -> None:
    data = content(2, 2 * BS)
    src = Source({2: data})
    f = FileKey(2, 2 * BS)

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        a = await cache.get_range(f, 100, 50, src.fetch_for(2))
        b = await cache.get_range(f, 200, 50, src.fetch_for(2))
        assert a.obj is b.obj  # both views of the one cached block: no copy
        assert len(a.obj) == BS
        with pytest.raises(TypeError):
            a[0] = 1  # read-only: nobody can change cached data

    trio.run(main)


def test_bytearray_blocks_are_returned_read_only() -> None:
    f = FileKey(3, BS)

    async def fetch(offset: int, length: int) -> bytearray:
        return bytearray(b"x" * length)

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        view = await cache.get_range(f, 0, 10, fetch)
        assert view.readonly
        block = await cache.get_block(f, 0, fetch)
        assert block.readonly
        assert bytes(block) == b"x" * BS

    trio.run(main)


def test_memoryview_fetch_result_accepted_and_other_types_refused() -> None:
    f = FileKey(4, 100)

    async def fetch_view(offset: int, length: int) -> memoryview:
        return memoryview(b"y" * (length + 10))[:length]

    async def fetch_str(offset: int, length: int) -> str:
        return "z" * length

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        assert bytes(await cache.get_range(f, 0, 100, fetch_view)) == b"y" * 100
        with pytest.raises(TypeError, match="bytes-like"):
            await cache.get_range(FileKey(5, 100), 0, 100, fetch_str)  # type: ignore[arg-type]
        assert not cache.contains(FileKey(5, 100), 0)

    trio.run(main)


def test_hits_after_miss() -> None:
    data = content(1, 2 * BS)
    src = Source({1: data})
    f = FileKey(1, 2 * BS)

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        for _ in range(3):
            assert bytes(await cache.get_range(f, 0, 2 * BS, src.fetch_for(1))) == data
        assert len(src.calls) == 2
        stats = cache.stats()
        assert (stats.misses, stats.hits, stats.waits) == (2, 4, 0)
        assert stats.lookups == 6
        assert stats.hit_rate == pytest.approx(4 / 6)
        assert stats.bytes_fetched == 2 * BS
        assert stats.bytes_served == 3 * 2 * BS

    trio.run(main)


def test_lru_eviction_is_by_bytes() -> None:
    # Capacity: two full blocks plus a short last block of 100 bytes.
    files = {1: content(1, 3 * BS), 2: content(2, 100)}
    src = Source(files)
    f1, f2 = FileKey(1, 3 * BS), FileKey(2, 100)

    async def main() -> None:
        cache = BlockCache(2 * BS + 100, BS)
        await cache.get_range(f2, 0, 100, src.fetch_for(2))  # 100 bytes
        await cache.get_range(f1, 0, 2 * BS, src.fetch_for(1))  # blocks 0, 1: full now
        stats = cache.stats()
        assert (stats.bytes, stats.blocks, stats.evictions) == (2 * BS + 100, 3, 0)
        await cache.get_range(f2, 0, 1, src.fetch_for(2))  # touch: f2 is most recent
        await cache.get_range(f1, 2 * BS, BS, src.fetch_for(1))  # needs BS bytes
        # The least recently used block (f1 block 0) went, the 100-byte block stayed.
        assert not cache.contains(f1, 0)
        assert cache.contains(f1, 1)
        assert cache.contains(f1, 2)
        assert cache.contains(f2, 0)
        stats = cache.stats()
        assert stats.evictions == 1
        assert stats.bytes == 2 * BS + 100 <= cache.capacity

    trio.run(main)


def test_memory_stays_within_capacity_under_random_reads() -> None:
    rng = random.Random(7)
    files = {i: content(i, rng.randrange(0, 9 * BS)) for i in range(1, 30)}
    src = Source(files)
    capacity = 5 * BS + 1234

    async def main() -> None:
        cache = BlockCache(capacity, BS)
        for _ in range(600):
            fid = rng.randrange(1, 30)
            f = FileKey(fid, len(files[fid]))
            offset = rng.randrange(0, f.size + 10)
            n = rng.randrange(0, 3 * BS)
            got = await cache.get_range(f, offset, n, src.fetch_for(fid))
            assert bytes(got) == files[fid][offset : offset + n]
            stats = cache.stats()
            assert stats.bytes <= capacity
            assert stats.bytes == sum(
                cache.block_length(FileKey(k[0], k[2]), k[3]) for k in cache._lru
            )
        assert cache.stats().evictions > 0

    trio.run(main)


def test_zero_capacity_disables_caching_but_reads_work() -> None:
    data = content(1, 3 * BS)
    src = Source({1: data})
    f = FileKey(1, 3 * BS)

    async def main() -> None:
        cache = BlockCache(0, BS)
        for _ in range(2):
            got = await cache.get_range(f, 10, 2 * BS, src.fetch_for(1))
            assert bytes(got) == data[10 : 10 + 2 * BS]
        assert len(src.calls) == 6
        assert cache.stats().bytes == 0

    trio.run(main)


def test_single_flight_many_readers_one_fetch() -> None:
    data = content(1, BS)
    src = Source({1: data}, delay=0.02)
    f = FileKey(1, BS)

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        results: list[bytes] = []

        async def reader(offset: int) -> None:
            results.append(bytes(await cache.get_range(f, offset, 100, src.fetch_for(1))))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(reader, i * 10)
        assert len(src.calls) == 1
        assert sorted(results) == sorted(data[i * 10 : i * 10 + 100] for i in range(20))
        stats = cache.stats()
        assert (stats.misses, stats.waits, stats.hits, stats.fetching) == (1, 19, 0, 0)

    trio.run(main)


def test_fetch_error_reaches_every_waiter_and_nothing_is_cached() -> None:
    class Boom(Exception):
        pass

    f = FileKey(1, BS)
    calls = 0

    async def failing(offset: int, length: int) -> bytes:
        nonlocal calls
        calls += 1
        await trio.sleep(0.02)
        raise Boom("server said no")

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        errors: list[BaseException] = []

        async def reader() -> None:
            try:
                await cache.get_range(f, 0, 10, failing)
            except Boom as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(reader)
        assert calls == 1
        assert len(errors) == 8
        assert all(e is errors[0] for e in errors)
        assert not cache.contains(f, 0)
        assert cache.stats().fetch_errors == 1
        # The next read tries again (no negative caching).
        good = Source({1: b"k" * BS})
        assert bytes(await cache.get_range(f, 0, 3, good.fetch_for(1))) == b"kkk"
        assert calls == 1 and len(good.calls) == 1

    trio.run(main)


@pytest.mark.parametrize("returned", [0, 1, BS - 1, BS + 1])
def test_wrong_length_block_is_an_error_and_never_cached(returned: int) -> None:
    f = FileKey(9, 3 * BS)

    async def fetch(offset: int, length: int) -> bytes:
        await trio.sleep(0.01)
        return b"w" * returned

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        errors: list[BlockLengthError] = []

        async def reader() -> None:
            try:
                await cache.get_range(f, BS + 5, 10, fetch)
            except BlockLengthError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(reader)
        assert len(errors) == 3
        exc = errors[0]
        assert isinstance(exc, OSError)
        assert exc.errno == errno.EIO
        assert (exc.datafile_id, exc.block_index, exc.offset) == (9, 1, BS)
        assert (exc.expected, exc.received) == (BS, returned)
        assert not cache.contains(f, 1)
        assert cache.stats().bytes == 0

    trio.run(main)


def test_short_last_block_must_have_exact_length() -> None:
    f = FileKey(9, 2 * BS + 10)

    async def too_short(offset: int, length: int) -> bytes:
        return b"s" * (length - 1 if offset == 2 * BS else length)

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        assert bytes(await cache.get_range(f, 0, 5, too_short)) == b"sssss"
        with pytest.raises(BlockLengthError) as info:
            await cache.get_range(f, 2 * BS, 10, too_short)
        assert (info.value.expected, info.value.received) == (10, 9)

    trio.run(main)


def test_cancelled_fetcher_does_not_strand_waiters() -> None:
    data = content(1, BS)
    f = FileKey(1, BS)
    calls: list[str] = []

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        fetch_started = trio.Event()

        async def slow_fetch(offset: int, length: int) -> bytes:
            calls.append("slow")
            fetch_started.set()
            await trio.sleep_forever()
            raise AssertionError("unreachable")  # pragma: no cover

        async def quick_fetch(offset: int, length: int) -> bytes:
            calls.append("quick")
            await trio.sleep(0.01)
            return data[offset : offset + length]

        results: list[bytes] = []

        async def waiter() -> None:
            results.append(bytes(await cache.get_range(f, 0, 10, quick_fetch)))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                fetcher_scope = trio.CancelScope()

                async def fetcher() -> None:
                    with fetcher_scope:
                        await cache.get_range(f, 0, 10, slow_fetch)

                nursery.start_soon(fetcher)
                await fetch_started.wait()
                for _ in range(5):
                    nursery.start_soon(waiter)
                await trio.sleep(0.01)
                assert cache.stats().waits == 5
                fetcher_scope.cancel()
        assert fetcher_scope.cancelled_caught
        assert results == [data[:10]] * 5
        assert calls == ["slow", "quick"]  # exactly one waiter took over the fetch
        assert cache.contains(f, 0)
        assert cache.stats().fetch_errors == 0

    trio.run(main)


def test_cancelled_waiter_does_not_disturb_the_fetch() -> None:
    data = content(1, BS)
    src = Source({1: data}, delay=0.05)
    f = FileKey(1, BS)

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        got: list[bytes] = []

        async def reader() -> None:
            got.append(bytes(await cache.get_range(f, 0, 4, src.fetch_for(1))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.01)
            with trio.move_on_after(0.01) as scope:
                await cache.get_range(f, 0, 4, src.fetch_for(1))
            assert scope.cancelled_caught
        assert got == [data[:4]]
        assert len(src.calls) == 1
        assert cache.contains(f, 0)

    trio.run(main)


def test_invalidate_drops_all_versions_of_one_datafile() -> None:
    files = {1: content(1, 3 * BS), 2: content(2, 2 * BS)}
    src = Source(files)
    f1_old, f1_new, f2 = FileKey(1, 3 * BS, "t1"), FileKey(1, 3 * BS, "t2"), FileKey(2, 2 * BS)

    async def main() -> None:
        cache = BlockCache(100 * BS, BS)
        await cache.get_range(f1_old, 0, 3 * BS, src.fetch_for(1))
        await cache.get_range(f1_new, 0, BS, src.fetch_for(1))  # new version: new key, a miss
        await cache.get_range(f2, 0, 2 * BS, src.fetch_for(2))
        assert len(src.calls) == 6
        assert cache.invalidate(1) == 4
        assert cache.invalidate(1) == 0
        assert not any(cache.contains(f1_old, i) for i in range(3))
        assert not cache.contains(f1_new, 0)
        assert cache.contains(f2, 0) and cache.contains(f2, 1)
        stats = cache.stats()
        assert (stats.blocks, stats.bytes, stats.invalidated) == (2, 2 * BS, 4)
        await cache.get_range(f1_new, 0, 10, src.fetch_for(1))
        assert len(src.calls) == 7
        cache.clear()
        assert cache.stats().bytes == 0
        assert cache.stats().invalidated == 7

    trio.run(main)


def test_invalidate_during_fetch_delivers_but_does_not_cache() -> None:
    data = content(1, BS)
    src = Source({1: data}, delay=0.05)
    f = FileKey(1, BS)

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        got: list[bytes] = []

        async def reader() -> None:
            got.append(bytes(await cache.get_range(f, 0, 8, src.fetch_for(1))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(reader)
            await trio.sleep(0.01)
            assert cache.is_fetching(f, 0)
            cache.invalidate(1)
            assert not cache.is_fetching(f, 0)
            nursery.start_soon(reader)  # after invalidation: a new fetch
        assert got == [data[:8]] * 3
        assert len(src.calls) == 2
        # Only the fetch started after the invalidation was cached.
        assert cache.stats().blocks == 1

    trio.run(main)


def test_prefetch_fills_cache_and_readers_join_it() -> None:
    data = content(1, 4 * BS)
    src = Source({1: data}, delay=0.03)
    f = FileKey(1, 4 * BS)

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        fetched: list[bool] = []

        async def prefetch(i: int) -> None:
            fetched.append(await cache.prefetch(f, i, src.fetch_for(1)))

        got: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefetch, 2)
            await trio.sleep(0.005)
            assert cache.is_fetching(f, 2)
            nursery.start_soon(prefetch, 2)  # already in flight: nothing to do

            async def reader() -> None:
                got.append(bytes(await cache.get_range(f, 2 * BS, 10, src.fetch_for(1))))

            nursery.start_soon(reader)
        assert sorted(fetched) == [False, True]
        assert got == [data[2 * BS : 2 * BS + 10]]
        assert len(src.calls) == 1
        assert not await cache.prefetch(f, 2, src.fetch_for(1))  # cached now
        stats = cache.stats()
        assert (stats.prefetches, stats.misses, stats.waits) == (1, 0, 1)
        with pytest.raises(ValueError):
            await cache.prefetch(f, 4, src.fetch_for(1))

    trio.run(main)


def test_get_block() -> None:
    data = content(1, BS + 7)
    src = Source({1: data})
    f = FileKey(1, BS + 7)

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        assert bytes(await cache.get_block(f, 1, src.fetch_for(1))) == data[BS:]
        with pytest.raises(ValueError):
            await cache.get_block(f, 2, src.fetch_for(1))

    trio.run(main)


def test_empty_file_never_fetches() -> None:
    async def fetch(offset: int, length: int) -> bytes:
        raise AssertionError("no fetch for an empty file")

    async def main() -> None:
        cache = BlockCache(10 * BS, BS)
        assert bytes(await cache.get_range(FileKey(1, 0), 0, 100, fetch)) == b""

    trio.run(main)


def test_release_drops_only_blocks_entirely_inside_the_range() -> None:
    size = 10 * BS + 100  # ten full blocks and a short one
    data = content(5, size)
    src = Source({5: data})
    f = FileKey(5, size)

    async def main() -> None:
        cache = BlockCache(100 * BS, BS)
        view = await cache.get_range(f, 0, size, src.fetch_for(5))
        assert cache.stats().blocks == 11
        kept = await cache.get_range(f, 0, 10, src.fetch_for(5))
        assert cache.release(f, 0, BS) == 1  # block 0
        assert bytes(kept) == data[:10]  # a view given out before stays valid
        assert cache.release(f, 100, BS) == 0  # block 0 is gone, block 1 only partly inside
        assert cache.release(f, BS + 1, 2 * BS) == 1  # block 2 only
        assert cache.release(f, 10 * BS, 1 << 20) == 1  # the short last block (to EOF)
        assert cache.release(f, 3 * BS, 0) == 0
        with pytest.raises(ValueError):
            cache.release(f, -1, BS)
        assert cache.release(f, 3 * BS, 7 * BS) == 7  # blocks 3..9
        stats = cache.stats()
        assert (stats.blocks, stats.bytes, stats.released) == (1, BS, 10)
        assert stats.evictions == 0 and stats.invalidated == 0
        calls = len(src.calls)
        assert bytes(await cache.get_range(f, 0, size, src.fetch_for(5))) == data
        assert len(src.calls) == calls + 10  # released blocks are fetched again, block 1 not
        assert bytes(view) == data

    trio.run(main)

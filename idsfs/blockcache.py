"""LRU cache of datafile blocks, sized in bytes, with single-flight misses.

A datafile is cut into blocks of a fixed size (a power of two, at least 4 KiB,
default 1 MiB); the last block of a file is shorter when the file size is not a
multiple of the block size. :meth:`BlockCache.get_range` serves a read of any
offset and size from the blocks that cover it, asking a caller-supplied
``fetch(offset, length)`` coroutine for each block that is not cached.

Keys
----
A block is cached under ``(datafile id, version, file size, block index)``,
taken from a :class:`FileKey`. ``version`` is an opaque token the caller derives
from the catalogue (for example the datafile's ``modTime``); when ICAT reports a
new version or size, the new key simply misses, and :meth:`BlockCache.invalidate`
drops every block of a datafile at once.

Single flight
-------------
Concurrent misses on one block start one fetch: the first task runs ``fetch``,
the others wait for it. If the fetch fails with an exception, every waiter gets
that same exception and nothing is cached (the next read tries again). If the
fetching task is cancelled, the waiters are woken and one of them starts a new
fetch, so no waiter is stranded.

Data is checked before it is cached or returned: a fetch must return exactly
the block's length (``min(block size, file size - block offset)``). Fewer or
more bytes raise :class:`BlockLengthError` (an :class:`OSError` with ``EIO``) in
the fetching task and all waiters; short or wrong data is never cached and never
returned. ``fetch`` is responsible for resuming a dropped stream; the cache only
refuses a block that is incomplete.

Releasing delivered blocks
--------------------------
:meth:`BlockCache.release` drops the blocks lying entirely inside a range that
a reader has been given and will not ask for again (the FUSE layer: the kernel
keeps what it read in its page cache). The FUSE layer does this only for
files larger than the whole cache, which could not stay cached anyway: their
read then recycles a few block buffers, which stay in the CPU caches, instead
of cycling through ``capacity`` bytes of memory and evicting every other file
(measured: about a quarter less CPU per GB read, see docs/benchmarks.md).

Memory
------
Cached blocks are counted by their length, so the cache holds at most
``capacity`` bytes of data (plus a few hundred bytes of bookkeeping per block,
under 5 % at the 4 KiB minimum block size). Beyond that, memory is only held by
reads in progress: a block being fetched, the buffer a multi-block read
assembles, and blocks still referenced by a returned :class:`memoryview`
(evicted blocks stay alive until the view is released). That is bounded by the
reads in flight, not by the number of files read. A capacity smaller than one
block disables caching but keeps single flight.

Thread safety
-------------
A :class:`BlockCache` belongs to one trio run and must only be used from the trio
thread: its state is touched without locks. ``fetch`` may of course delegate to
a worker thread through :mod:`idsfs.aio`.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

import cachetools
import trio

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "BlockCache",
    "BlockLengthError",
    "CacheStats",
    "Fetch",
    "FileKey",
    "check_block_size",
]

#: Default block size: 1 MiB.
DEFAULT_BLOCK_SIZE = 1 << 20
#: Smallest allowed block size: 4 KiB.
MIN_BLOCK_SIZE = 1 << 12
#: Largest allowed block size: 64 MiB.
MAX_BLOCK_SIZE = 1 << 26

#: The data a fetch returns: a new buffer whose ownership passes to the cache.
Block = bytes | bytearray

#: ``fetch(offset, length)``: return exactly ``length`` bytes of the file from ``offset``.
Fetch = Callable[[int, int], Awaitable[bytes | bytearray | memoryview]]

_Key = tuple[int, Hashable, int, int]


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` if it is a valid block size.

    Valid sizes are powers of two from :data:`MIN_BLOCK_SIZE` (4 KiB) to
    :data:`MAX_BLOCK_SIZE` (64 MiB).

    Raises:
        ValueError: for any other value.
    """
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size < MIN_BLOCK_SIZE
        or block_size > MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"block size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} "
            f"bytes, not {block_size!r}"
        )
    return block_size


@dataclass(frozen=True, slots=True)
class FileKey:
    """What the cache needs to know about one datafile.

    Attributes:
        datafile_id: the ICAT id of the datafile.
        size: its size in bytes (ICAT ``fileSize``); reads stop there.
        version: any hashable token that changes when the content may have
            changed (e.g. ``modTime``); blocks of other versions are not used.

    Raises:
        ValueError: if ``size`` is negative.
    """

    datafile_id: int
    size: int
    version: Hashable = None

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"file size must be >= 0, not {self.size}")


class BlockLengthError(OSError):
    """A fetch returned a block of the wrong length (errno ``EIO``).

    Attributes:
        datafile_id, block_index, offset: which block was fetched.
        expected: the length the block must have.
        received: the length the fetch returned.

    Raised by :meth:`BlockCache.get_range` and :meth:`BlockCache.prefetch`.
    """

    def __init__(
        self, datafile_id: int, block_index: int, offset: int, expected: int, received: int
    ) -> None:
        kind = "short" if received < expected else "long"
        super().__init__(
            errno.EIO,
            f"{kind} block for datafile {datafile_id}: {received} bytes at offset {offset}, "
            f"expected {expected}",
        )
        self.datafile_id = datafile_id
        self.block_index = block_index
        self.offset = offset
        self.expected = expected
        self.received = received


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of a :class:`BlockCache`'s counters (for ``idsfs status``).

    Attributes:
        capacity: the configured size in bytes.
        block_size: the block size in bytes.
        bytes: bytes of data cached now.
        blocks: blocks cached now.
        fetching: fetches in progress.
        hits: block lookups served from the cache.
        misses: block lookups that started a fetch.
        waits: block lookups that waited for another task's fetch.
        prefetches: fetches started by :meth:`BlockCache.prefetch`.
        fetch_errors: fetches that failed (including wrong lengths).
        evictions: blocks dropped to make room.
        invalidated: blocks dropped by :meth:`BlockCache.invalidate` or
            :meth:`BlockCache.clear`.
        released: blocks dropped by :meth:`BlockCache.release`.
        bytes_fetched: bytes returned by successful fetches.
        bytes_served: bytes returned by :meth:`BlockCache.get_range`.

    Constructing one never raises.
    """

    capacity: int
    block_size: int
    bytes: int
    blocks: int
    fetching: int
    hits: int
    misses: int
    waits: int
    prefetches: int
    fetch_errors: int
    evictions: int
    invalidated: int
    bytes_fetched: int
    bytes_served: int
    released: int = 0

    @property
    def lookups(self) -> int:
        """Block lookups by reads: ``hits + misses + waits``. Never raises."""
        return self.hits + self.misses + self.waits

    @property
    def hit_rate(self) -> float:
        """``hits / lookups`` (0.0 before the first lookup). Never raises."""
        lookups = self.lookups
        return self.hits / lookups if lookups else 0.0


class _Flight:
    """One fetch in progress, which other tasks may wait for."""

    __slots__ = ("data", "done", "error", "valid")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: Block | None = None  # set on success
        self.error: Exception | None = None  # set on failure
        self.valid = True  # False once the datafile was invalidated meanwhile


class _BlockLRU(cachetools.LRUCache[_Key, Block]):
    """An LRU cache sized by the length of its values that reports evictions."""

    def __init__(self, maxsize: int, on_evict: Callable[[_Key], None]) -> None:
        super().__init__(maxsize, getsizeof=len)
        self._on_evict = on_evict

    def popitem(self) -> tuple[_Key, Block]:
        key, value = super().popitem()
        self._on_evict(key)
        return key, value


class BlockCache:
    """An LRU cache of datafile blocks, sized in bytes, with single-flight misses.

    See the module documentation for keys, single flight, memory bounds and the
    rule that a cache is only used from the trio thread.

    Args:
        capacity: the most bytes of block data kept (``--cache-size``). Less
            than one block disables caching (reads still work).
        block_size: the block size (``--block-size``), checked by
            :func:`check_block_size`.

    Raises:
        ValueError: if ``capacity`` is negative or ``block_size`` is invalid.
    """

    def __init__(self, capacity: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"cache capacity must be an integer >= 0, not {capacity!r}")
        self._block_size = check_block_size(block_size)
        self._shift = block_size.bit_length() - 1
        self._capacity = capacity
        self._lru = _BlockLRU(max(capacity, 1), self._evicted)
        self._by_file: dict[int, set[_Key]] = {}
        self._pending: dict[_Key, _Flight] = {}
        self._hits = 0
        self._misses = 0
        self._waits = 0
        self._prefetches = 0
        self._fetch_errors = 0
        self._evictions = 0
        self._invalidated = 0
        self._released = 0
        self._bytes_fetched = 0
        self._bytes_served = 0

    @property
    def block_size(self) -> int:
        """The block size in bytes. Never raises."""
        return self._block_size

    @property
    def capacity(self) -> int:
        """The configured size in bytes. Never raises."""
        return self._capacity

    def block_span(self, file: FileKey, offset: int, size: int) -> range:
        """Return the indexes of the blocks covering ``[offset, offset + size)`` of ``file``.

        The range is clipped to the file's size, so it is empty at or past EOF.

        Raises:
            ValueError: if ``offset`` or ``size`` is negative.
        """
        _check_range(offset, size)
        end = min(offset + size, file.size)
        if offset >= end:
            return range(0)
        return range(offset >> self._shift, ((end - 1) >> self._shift) + 1)

    def block_count(self, file: FileKey) -> int:
        """Return the number of blocks of ``file`` (0 for an empty file). Never raises."""
        return (file.size + self._block_size - 1) >> self._shift

    def block_length(self, file: FileKey, index: int) -> int:
        """Return the length of block ``index`` of ``file`` (shorter at EOF).

        Raises:
            ValueError: if the block lies outside the file.
        """
        offset = index << self._shift
        if index < 0 or offset >= file.size:
            raise ValueError(
                f"block {index} is outside datafile {file.datafile_id} of {file.size} bytes"
            )
        return min(self._block_size, file.size - offset)

    def contains(self, file: FileKey, index: int) -> bool:
        """Return whether block ``index`` of ``file`` is cached (without touching LRU order).

        Never raises.
        """
        return self._key(file, index) in self._lru

    def is_fetching(self, file: FileKey, index: int) -> bool:
        """Return whether a fetch of block ``index`` of ``file`` is in progress. Never raises."""
        return self._key(file, index) in self._pending

    async def get_range(self, file: FileKey, offset: int, size: int, fetch: Fetch) -> memoryview:
        """Return up to ``size`` bytes of ``file`` from ``offset``, as a read-only memoryview.

        The result is shorter than ``size`` only at EOF (empty at or past EOF).
        Blocks are fetched in ascending order, each with
        ``await fetch(block offset, block length)``. A read inside one block
        returns a view of the cached block without copying; a read across
        blocks is assembled into one new buffer.

        Raises:
            ValueError: if ``offset`` or ``size`` is negative.
            BlockLengthError: a fetch returned the wrong number of bytes.
            TypeError: a fetch returned something other than a bytes-like object.
            Exception: whatever ``fetch`` raised (the same exception in every
                task waiting for that block).
        """
        span = self.block_span(file, offset, size)
        if not span:
            return memoryview(b"")
        end = min(offset + size, file.size)
        length = end - offset
        first = span.start
        if len(span) == 1:
            block = await self._get_block(file, first, fetch, prefetch=False)
            start = offset - (first << self._shift)
            view = memoryview(block)[start : start + length]
        else:
            out = bytearray(length)
            pos = 0
            for index in span:
                block = await self._get_block(file, index, fetch, prefetch=False)
                block_offset = index << self._shift
                start = max(offset, block_offset) - block_offset
                stop = min(end, block_offset + len(block)) - block_offset
                out[pos : pos + stop - start] = memoryview(block)[start:stop]
                pos += stop - start
            view = memoryview(out)
        self._bytes_served += length
        return view.toreadonly()

    async def get_block(self, file: FileKey, index: int, fetch: Fetch) -> memoryview:
        """Return block ``index`` of ``file`` as a read-only memoryview, fetching it if needed.

        Raises:
            ValueError: if the block lies outside the file.
            BlockLengthError, TypeError, Exception: as for :meth:`get_range`.
        """
        self.block_length(file, index)
        block = await self._get_block(file, index, fetch, prefetch=False)
        return memoryview(block).toreadonly()

    async def prefetch(self, file: FileKey, index: int, fetch: Fetch) -> bool:
        """Fetch block ``index`` of ``file`` into the cache unless it is cached or being fetched.

        Meant for readahead tasks: readers that need the block meanwhile wait
        for this fetch instead of starting their own. Not counted as a lookup.

        Returns:
            ``True`` if this call fetched the block, ``False`` if there was
            nothing to do.

        Raises:
            ValueError: if the block lies outside the file.
            BlockLengthError, TypeError, Exception: as for :meth:`get_range`.
        """
        self.block_length(file, index)
        key = self._key(file, index)
        if key in self._lru or key in self._pending:
            return False
        await self._fetch(file, index, key, fetch, prefetch=True)
        return True

    def invalidate(self, datafile_id: int) -> int:
        """Drop every cached block of a datafile, whatever its version.

        Fetches of that datafile in progress still deliver their data to the
        tasks waiting for them, but it is not cached, and later reads start new
        fetches.

        Returns:
            The number of blocks dropped.

        Never raises.
        """
        keys = self._by_file.pop(datafile_id, set())
        for key in keys:
            del self._lru[key]
        for key, flight in list(self._pending.items()):
            if key[0] == datafile_id:
                flight.valid = False
                del self._pending[key]
        self._invalidated += len(keys)
        return len(keys)

    def release(self, file: FileKey, offset: int, size: int) -> int:
        """Drop the cached blocks of ``file`` that lie entirely in ``[offset, offset + size)``.

        For data the caller has delivered and will not ask for again (see the
        module documentation); blocks only partly inside the range stay, and
        fetches in progress are not affected. A block still referenced by a
        returned memoryview lives on until the view is released.

        Returns:
            The number of blocks dropped.

        Raises:
            ValueError: if ``offset`` or ``size`` is negative.
        """
        _check_range(offset, size)
        end = min(offset + size, file.size)
        index = (offset + self._block_size - 1) >> self._shift  # the first block in the range
        dropped = 0
        while index << self._shift < end and min((index + 1) << self._shift, file.size) <= end:
            key = self._key(file, index)
            index += 1
            if self._lru.pop(key, None) is not None:
                dropped += 1
                keys = self._by_file.get(key[0])
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._by_file[key[0]]
        self._released += dropped
        return dropped

    def clear(self) -> None:
        """Drop every cached block (fetches in progress are not cached either). Never raises."""
        self._invalidated += len(self._lru)
        self._lru.clear()
        self._by_file.clear()
        for flight in self._pending.values():
            flight.valid = False
        self._pending.clear()

    def stats(self) -> CacheStats:
        """Return a snapshot of the counters. Never raises."""
        return CacheStats(
            capacity=self._capacity,
            block_size=self._block_size,
            bytes=self._lru.currsize,
            blocks=len(self._lru),
            fetching=len(self._pending),
            hits=self._hits,
            misses=self._misses,
            waits=self._waits,
            prefetches=self._prefetches,
            fetch_errors=self._fetch_errors,
            evictions=self._evictions,
            invalidated=self._invalidated,
            bytes_fetched=self._bytes_fetched,
            bytes_served=self._bytes_served,
            released=self._released,
        )

    # -- internals -----------------------------------------------------------------------

    @staticmethod
    def _key(file: FileKey, index: int) -> _Key:
        return (file.datafile_id, file.version, file.size, index)

    async def _get_block(self, file: FileKey, index: int, fetch: Fetch, *, prefetch: bool) -> Block:
        """Return one block from the cache, an in-flight fetch, or a new fetch."""
        key = self._key(file, index)
        while True:
            block = self._lru.get(key)
            if block is not None:
                self._hits += 1
                return block
            flight = self._pending.get(key)
            if flight is None:
                return await self._fetch(file, index, key, fetch, prefetch=prefetch)
            self._waits += 1
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error.with_traceback(None)  # shared by every waiter
            if flight.data is not None:
                return flight.data
            # The fetching task was cancelled: look again, and fetch if nobody else does.

    async def _fetch(
        self, file: FileKey, index: int, key: _Key, fetch: Fetch, *, prefetch: bool
    ) -> Block:
        """Run ``fetch`` for one block as the single flight for ``key``."""
        flight = _Flight()
        self._pending[key] = flight
        if prefetch:
            self._prefetches += 1
        else:
            self._misses += 1
        offset = index << self._shift
        expected = min(self._block_size, file.size - offset)
        try:
            data = _as_block(await fetch(offset, expected))
            if len(data) != expected:
                raise BlockLengthError(file.datafile_id, index, offset, expected, len(data))
            flight.data = data
        except Exception as exc:
            flight.error = exc
            self._fetch_errors += 1
            raise
        finally:
            # On cancellation neither data nor error is set: waiters look again.
            if self._pending.get(key) is flight:
                del self._pending[key]
            flight.done.set()
        self._bytes_fetched += expected
        if flight.valid:
            self._store(key, data)
        return data

    def _store(self, key: _Key, data: Block) -> None:
        if len(data) > self._capacity or key in self._lru:
            return
        self._lru[key] = data
        self._by_file.setdefault(key[0], set()).add(key)

    def _evicted(self, key: _Key) -> None:
        """Called by the LRU when it drops ``key`` to make room."""
        self._evictions += 1
        keys = self._by_file.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_file[key[0]]


def _check_range(offset: int, size: int) -> None:
    if offset < 0 or size < 0:
        raise ValueError(f"offset and size must be >= 0, not {offset}, {size}")


def _as_block(data: object) -> Block:
    """Return fetched data as bytes or bytearray, or raise TypeError."""
    if isinstance(data, bytes | bytearray):
        return data
    if isinstance(data, memoryview):
        return data.tobytes()
    raise TypeError(f"fetch must return a bytes-like object, not {type(data).__name__}")

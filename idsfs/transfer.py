"""Reading datafiles through IDS for the mount: streams, readahead, restores.

:class:`Transfer` is what ``fs.py`` calls to read a datafile. ``open`` makes no
IDS call; :meth:`Reader.read` asks the :class:`~idsfs.blockcache.BlockCache` for
the blocks covering the range, and the cache asks this module for each block it
does not hold. Everything here runs on the trio thread; blocking calls go
through the :class:`~idsfs.aio.ThreadBridge`.

How a block is fetched
----------------------
* **Access.** Single-level servers (``isTwoLevel`` false, asked once unless the
  caller says so) are read with the session: ``getData`` in sessionId mode for
  the one datafile. On two-level servers the first read of a datafile calls
  ``prepareData`` (``zip=false``, that datafile only) and polls ``isPrepared``
  with back-off until it answers ``true``; the preparedId is kept (an LRU of
  :data:`PREPARED_IDS` entries) and used for every later ``getData``. A
  preparedId the server no longer knows (404) is replaced by a new
  ``prepareData`` once per request.
* **Streams.** ``getData`` is sent with ``Range: bytes=N-``. The IDS can only
  send from ``N`` to the end, so the answer stays open as a *stream* after the
  block was read and serves the next block when a read asks for exactly the
  offset where it stands (the stream's *tail*). Blocks asked for while a stream
  is busy are queued on it in order (a *claim* per block); one worker thread per
  stream (the *pump*) reads the queued blocks straight into the new block
  buffers with :meth:`DataStream.readinto` and hands each one over as soon as it
  is complete. A read at another offset (random access) opens a new stream
  there. Streams that have nothing to do are *idle*; they are closed after
  ``stream_idle_timeout`` seconds, when there are more than ``max_idle_streams``
  (oldest first) or more than :data:`MAX_STREAMS_PER_FILE` of one file, and when
  the last reader of the file closes it: an open ``getData`` holds a SHARED lock
  on the dataset in the IDS, which makes ``delete`` fail with "Data is busy".
  A stream still reading blocks that nobody waits for any more is then broken
  off at once (:meth:`DataStream.abort <idsfs.ids.DataStream.abort>` shuts its
  socket down), as it is by :meth:`Transfer.close_streams` and at shutdown:
  its pump thread never waits for the read timeout of a stalled server.
* **Readahead.** Each :class:`Reader` watches its reads: a read starting where
  the previous one ended is sequential and doubles the readahead window (from
  one block up to ``max_readahead`` bytes, and at most a quarter of the cache);
  any other read resets it. On a sequential read the blocks of the read and of
  the window after it that are neither cached nor queued are queued at once,
  in order, on the stream that stands there, so one pump reads them back to
  back. A queued block nobody has asked for yet goes into the cache when it is
  read; a read that comes for it meanwhile waits for it. A read a little ahead
  of a stream (less than ``max_gap``) is served by reading through the gap
  (those blocks go into the cache too) instead of opening a new stream.
* **Integrity.** A read never returns short or wrong bytes silently: it is
  short only at the end of the file (ICAT ``fileSize``). A stream that ends
  before ``fileSize`` or breaks (dropped connection, read timeout of the
  IDSClient) is resumed by a new ``getData`` at the offset reached; when
  ``resume_retries`` streams in a row (the first one included) bring no new
  byte, the read fails with :class:`~idsfs.errors.IncompleteDownloadError`
  (``EIO``). With
  ``verify_checksum`` (off by default: the CRC32 costs about 0.15 CPU-seconds
  per GB on the 2-core test machine with ISA-L's, 0.5 with zlib's; see
  :mod:`idsfs._crc`), a stream read
  from offset 0 to the end is checked against the ICAT CRC32 ``checksum``; a
  mismatch drops the file's cached blocks and fails that read and every later
  read of the open file with :class:`~idsfs.errors.ChecksumMismatchError`
  (``EIO``) until the last reader closes it.

Archived data and errors
------------------------
* On two-level servers ``prepareData`` starts the restore of archived data;
  ``isPrepared`` is polled (starting at ``poll_interval`` seconds, doubling up
  to ``max_poll_interval``) by one task at a time for all readers of the
  datafile, so a file is restored once however many reads wait for it. Each read
  waits at most ``restore_wait`` seconds, then fails with
  :class:`~idsfs.errors.RestoreTimeoutError` (``ENODATA``); the restore goes on
  in the IDS and a later read finds the same preparedId and waits again. A
  ``getData`` answering 503 "not online" after that (the data was archived
  again) goes back to polling.
* ``isPrepared``/``getStatus`` answering 500 "Restore failed" gives
  :class:`~idsfs.errors.RestoreFailedError` (``EIO``) to every read waiting for
  the file, and to new reads for :data:`FAILED_RESTORE_HOLD` seconds; after that
  the next read prepares the file again, which makes the IDS try once more.
* "Data is busy" (503, a lock held by another operation): the IDSClient already
  retries a few times; this module goes on retrying with back-off for up to
  ``busy_wait`` seconds, then raises :class:`~idsfs.errors.DataBusyError`
  (``EBUSY``).
* Session changes: the daemon may replace ``ids.sessionId`` after a re-login;
  every call reads the current value. A call made with the session
  (``prepareData``, sessionId-mode ``getData``, ``getStatus``) that answers
  403 is repeated once if the session id changed meanwhile, or if the optional
  ``renew_session`` coroutine (given by the daemon) returns ``True``;
  otherwise the 403 propagates
  (:class:`~idsfs.errors.IDSInsufficientPrivilegesError`, ``EACCES``).
  PreparedId calls need no session and are not affected by its expiry.
* A ``getData`` that fails with 500 (other than "Restore failed") is tried
  again, at most ``resume_retries`` times with back-off. A transport error
  (refused, reset, no answer within the read timeout) propagates once the
  IDSClient's own retries are spent: trying those again here would multiply
  the time a read waits for a server that does not answer. Every other IDS
  error propagates unchanged (see the errno table in docs/semantics.md).

Status
------
:meth:`Transfer.status` answers ``ONLINE``, ``ARCHIVED``, ``RESTORING`` or
``RESTORE_FAILED`` for the ``user.ids.status`` extended attribute: ``ONLINE``
without a call on single-level servers, ``RESTORING`` while reads of this mount
wait for the file, else ``getStatus`` for that datafile, cached for
``status_ttl`` seconds (one call at a time per datafile).

Keeping the kernel page cache
-----------------------------
:attr:`Reader.keep_cache` is ``True`` unless the datafile's size or version
(the record's ``version`` token, else its ``modTime``, checksum and location as
ICAT reported them) differs from the one seen at its previous open in this
mount; ``fs.py`` passes it to the kernel as ``keep_cache``. Cached blocks are
keyed by that version too, so a changed datafile never serves old blocks.

Lifecycle
---------
The background tasks (stream pumps, cache stores, the idle-stream janitor) run in
:meth:`Transfer.run`, which the daemon starts in its nursery
(``await nursery.start(transfer.run)``); if it has not been started when the
first file is opened, the transfer starts it as a trio system task.
:meth:`Transfer.aclose` stops it and closes every stream.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import cachetools
import trio

from idsfs._crc import crc32
from idsfs.aio import ThreadBridge
from idsfs.blockcache import BlockCache, CacheStats, FileKey
from idsfs.errors import (
    ChecksumMismatchError,
    DataBusyError,
    IDSDataNotOnlineError,
    IdsfsError,
    IDSInsufficientPrivilegesError,
    IDSInternalError,
    IDSNotFoundError,
    IDSResponseError,
    IncompleteDownloadError,
    RestoreFailedError,
    RestoreTimeoutError,
    ServerError,
    TransferError,
    TransportError,
)
from idsfs.ids import DataSelection, DataStream, IDSClient

__all__ = [
    "ARCHIVED",
    "FAILED_READ_HOLD",
    "FAILED_RESTORE_HOLD",
    "MAX_STREAMS_PER_FILE",
    "ONLINE",
    "PREPARED_IDS",
    "RESTORE_FAILED",
    "RESTORING",
    "Reader",
    "RestoreInfo",
    "StreamInfo",
    "Transfer",
    "TransferStats",
    "release_free_memory",
    "tune_malloc",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Values of :meth:`Transfer.status` (the ``user.ids.status`` attribute).
ONLINE = "ONLINE"
ARCHIVED = "ARCHIVED"
RESTORING = "RESTORING"
RESTORE_FAILED = "RESTORE_FAILED"

#: Seconds a recorded "Restore failed" answers new reads before the file is prepared again.
FAILED_RESTORE_HOLD = 10.0
#: Seconds a failed read of an open datafile answers the reads of the same
#: range that come next, at once, with the same error: the kernel repeats a
#: failed readahead read for one page, and readers that waited for the same
#: pages ask again; without this each of them would wait (``restore_wait``,
#: ``busy_wait``, the read timeout) once more.
FAILED_READ_HOLD = 2.0
#: Failed reads of one open file held so at a time (the kernel's parallel readahead
#: requests fail one after another, and each is repeated for one page).
_FAILED_KEPT = 8
#: Idle streams kept per datafile version (more are closed, oldest first).
MAX_STREAMS_PER_FILE = 4
#: PreparedIds remembered (datafile id -> preparedId), least recently used dropped.
PREPARED_IDS = 4096
#: Seconds a pump thread that served every queued block waits for the next one
#: before it ends: a sequential reader queues one more block per read, and
#: starting a thread again for each costs the trio thread more than the wait.
PUMP_LINGER = 0.05
#: Blocks a Reader counts partly delivered bytes of (for ``release_delivered``).
_MAX_PARTIAL = 1024
#: Bytes a pump reads per ``readinto`` call: the unit of progress when a stream breaks.
#: One 1 MiB call needs the GIL once where four 256 KiB calls needed it four times
#: (measured: about 0.25 CPU-seconds per GB less on the 2-core test machine).
READ_CHUNK = 1 << 20


def _uninitialised_bytearray() -> Callable[[int], bytearray] | None:
    """CPython's ``PyByteArray_FromStringAndSize(NULL, n)``: a bytearray without zero-filling.

    Block buffers are filled completely by the socket before anyone sees them,
    so zeroing them first only costs time (a cold 1 MiB memset per block).
    ``None`` where the C API is not reachable (then ``bytearray(n)`` is used).
    """
    try:
        import ctypes

        make = ctypes.pythonapi.PyByteArray_FromStringAndSize
        make.restype = ctypes.py_object
        make.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
        probe = make(None, 16)
        if not isinstance(probe, bytearray) or len(probe) != 16:
            return None
    except (ImportError, AttributeError, OSError, TypeError):  # not CPython
        return None
    return functools.partial(make, None)


_MAKE_BUFFER = _uninitialised_bytearray()


def _new_buffer(length: int) -> bytearray:
    """A new bytearray of ``length`` bytes whose content will be overwritten."""
    if _MAKE_BUFFER is not None and length > 0:
        return _MAKE_BUFFER(length)
    return bytearray(length)


def tune_malloc(heap_keep: int) -> bool:
    """Make glibc reuse freed block buffers instead of mapping new memory per block.

    By default glibc serves a 1 MiB request with a fresh ``mmap`` (or trims the
    heap after frees), so every new block buffer is page-faulted in again: about
    0.3 CPU-seconds per GB read, measured. This sets ``M_MMAP_THRESHOLD`` to
    32 MiB (blocks come from the heap, where freed blocks are reused) and
    ``M_TRIM_THRESHOLD`` to ``heap_keep`` bytes (free heap kept before it is
    given back; at least 64 MiB, at most what a C ``int`` holds, just under
    2 GiB). Process-wide; returns False where it is not glibc. Never raises.
    """
    import ctypes

    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    int_max = 2**31 - 1  # mallopt takes an int: a larger value would wrap around
    ok = mallopt(m_mmap_threshold, 32 << 20) == 1
    return bool(mallopt(m_trim_threshold, min(max(heap_keep, 64 << 20), int_max)) == 1 and ok)


def release_free_memory() -> bool:
    """Give the free memory of every malloc heap back to the system (glibc ``malloc_trim``).

    :func:`tune_malloc` makes glibc keep freed block buffers for reuse; a
    daemon that has gone idle calls this to hand them back (its RSS then shows
    what is in use). Walks the heaps: run it in a worker thread. Returns False
    where it is not glibc. Never raises.
    """
    import ctypes

    trim = _libc_function("malloc_trim", [ctypes.c_size_t])
    if trim is None:
        return False
    trim(0)
    return True


def _libc_function(name: str, argtypes: list[Any]) -> Any:
    """The C library's function ``name`` returning an ``int``, typed with ``argtypes``.

    None where there is no such C library function (not glibc). Never raises.
    """
    try:
        import ctypes
        import ctypes.util

        path = ctypes.util.find_library("c")
        if not path:
            return None
        function = getattr(ctypes.CDLL(path), name)
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


def _again(error: IdsfsError) -> IdsfsError:
    """A new exception like ``error`` (same type, message and attributes), caused by it.

    Raising the one stored instance again from several reads would pile their
    tracebacks onto it. Never raises.
    """
    again = type(error).__new__(type(error), *error.args)
    again.args = error.args
    again.__dict__.update(error.__dict__)
    again.__cause__ = error
    again.repeated = True
    return again


def _is_restore_failed(exc: IDSInternalError) -> bool:
    return "restore failed" in exc.message.lower()


def _describe(datafile: Any) -> tuple[int, int, Hashable, str | None]:
    """Return (id, size, version, checksum) of a datafile record.

    Accepts :class:`idsfs.model.Datafile` (``id``, ``fileSize``, ``modTime``,
    ``checksum``, ``location``) or any record with ``id`` (or ``datafile_id``)
    and ``fileSize`` (or ``size``); ``version`` is used when the record has one.
    """
    ident = getattr(datafile, "id", None)
    if ident is None:
        ident = getattr(datafile, "datafile_id", None)
    if not isinstance(ident, int) or isinstance(ident, bool):
        raise ValueError(f"datafile record without an integer id: {type(datafile).__name__}")
    size = getattr(datafile, "fileSize", None)
    if size is None:
        size = getattr(datafile, "size", None)
    size = int(size or 0)
    checksum = getattr(datafile, "checksum", None)
    version = getattr(datafile, "version", None)
    if version is None:
        version = (
            getattr(datafile, "modTime", None),
            getattr(datafile, "datafileModTime", None),
            checksum,
            getattr(datafile, "location", None),
        )
    return ident, size, version, checksum if isinstance(checksum, str) else None


# ----------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One open ``getData`` stream (for ``idsfs status``).

    Attributes:
        datafile_id: the datafile read.
        offset: the file offset the stream stands at.
        bytes: bytes read from it (resumed parts included).
        seconds: time spent reading it.
        rate: ``bytes / seconds`` in bytes per second (0 before any read).
        state: ``"opening"``, ``"reading"`` or ``"idle"``.
        queued: blocks waiting to be read from it.
    """

    datafile_id: int
    offset: int
    bytes: int
    seconds: float
    rate: float
    state: str
    queued: int


@dataclass(frozen=True, slots=True)
class RestoreInfo:
    """A datafile whose reads wait for it to come online.

    Attributes: ``datafile_id``, ``readers`` (reads waiting), ``seconds``
    (since the first of them began waiting).
    """

    datafile_id: int
    readers: int
    seconds: float


@dataclass(frozen=True, slots=True)
class TransferStats:
    """A snapshot of what :class:`Transfer` does and did (for ``idsfs status``).

    Attributes:
        streams: the open streams (reading, opening or idle).
        restores: datafiles reads are waiting for.
        bytes_fetched: bytes read from IDS.
        blocks_fetched: blocks completed.
        streams_opened: ``getData`` streams opened (first opens and resumes).
        stream_reuses: blocks read from a stream opened for an earlier block.
        resumes: streams reopened after they ended early or broke.
        readahead_blocks: blocks fetched by readahead.
        prepares: ``prepareData`` calls.
        polls: ``isPrepared`` calls.
        status_calls: ``getStatus`` calls.
        busy_retries: "Data is busy" answers retried.
        restore_timeouts: reads that gave up waiting for a restore.
        failures: block fetches that failed.
        first_byte_seconds: mean time from sending ``getData`` to its answer.
        cache: the block cache's statistics.
    """

    streams: tuple[StreamInfo, ...]
    restores: tuple[RestoreInfo, ...]
    bytes_fetched: int
    blocks_fetched: int
    streams_opened: int
    stream_reuses: int
    resumes: int
    readahead_blocks: int
    prepares: int
    polls: int
    status_calls: int
    busy_retries: int
    restore_timeouts: int
    failures: int
    first_byte_seconds: float
    cache: CacheStats

    @property
    def in_flight(self) -> int:
        """Streams opening or reading now. Never raises."""
        return sum(1 for s in self.streams if s.state != "idle")

    @property
    def rate(self) -> float:
        """Summed rate of the streams reading now, in bytes per second. Never raises."""
        return sum(s.rate for s in self.streams if s.state == "reading")

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as plain JSON-able data (``in_flight`` and ``rate`` included).

        Never raises.
        """
        data = dataclasses.asdict(self)
        data["in_flight"] = self.in_flight
        data["rate"] = self.rate
        data["cache"]["hit_rate"] = self.cache.hit_rate
        return data


# ----------------------------------------------------------------------------
# Internal state


class _Remote:
    """What the IDS knows about one datafile id: preparedId, online, status."""

    __slots__ = (
        "failed_at",
        "failure",
        "id",
        "next_poll",
        "online",
        "poll_delay",
        "poll_lock",
        "polls",
        "prep_lock",
        "prepared_id",
        "status",
        "status_at",
        "status_lock",
        "wait_since",
        "waiting",
    )

    def __init__(self, ident: int, poll_delay: float) -> None:
        self.id = ident
        self.prepared_id: str | None = None
        self.online = False  # isPrepared said true for prepared_id
        self.prep_lock = trio.Lock()
        self.poll_lock = trio.Lock()
        self.polls = 0  # isPrepared answers received
        self.next_poll = 0.0
        self.poll_delay = poll_delay
        self.waiting = 0
        self.wait_since: float | None = None
        self.failure: RestoreFailedError | None = None
        self.failed_at = -1.0
        self.status: str | None = None
        self.status_at = 0.0
        self.status_lock = trio.Lock()


class _Claim:
    """One block wanted from a stream: its buffer and how far it is filled."""

    __slots__ = ("buf", "cancelled", "error", "event", "finished", "got", "length", "offset",
                 "readahead", "view")

    def __init__(self, offset: int, length: int, readahead: bool) -> None:
        self.offset = offset
        self.length = length
        # Allocated here, on the trio thread, so that every block buffer comes from
        # one malloc arena (freed blocks are reused; see tune_malloc).
        self.buf: bytearray | None = _new_buffer(length)
        self.view: memoryview | None = memoryview(self.buf)
        self.got = 0  # bytes filled (written by the pump thread)
        self.event = trio.Event()
        self.error: BaseException | None = None
        self.finished = False
        self.cancelled = False  # nobody waits for it any more
        self.readahead = readahead


class _Stream:
    """A ``getData`` answer read sequentially, with the blocks queued on it.

    ``claims`` and ``pumping`` are shared with the pump thread (under
    ``lock``); ``ds``, ``pos`` and ``crc`` belong to the pump while it runs and
    to the trio thread otherwise; ``tail`` is trio-only.
    """

    __slots__ = ("active_time", "broken", "bytes", "claims", "closed", "crc", "doomed", "ds",
                 "eof", "file", "idle_since", "in_thread", "lock", "opening", "pos", "pumping",
                 "queued", "tail")

    def __init__(self, file: _Open, offset: int) -> None:
        self.file = file
        self.ds: DataStream | None = None
        self.pos = offset  # file offset of the next byte ds delivers (or where to open)
        self.tail = offset  # pos after every queued claim
        self.lock = threading.Condition()  # notified when claims come or the stream breaks
        self.claims: deque[_Claim] = deque()
        self.pumping = False
        self.opening = False
        self.broken = False  # the stream must not be read any more (its thread stops)
        self.in_thread = False  # a pump thread is using ds (under lock)
        self.closed = False
        self.doomed = False  # close it once its queued claims are served
        self.eof = False
        self.crc: int | None = 0 if offset == 0 and file.checksum else None
        self.idle_since = time.monotonic()
        self.bytes = 0
        self.active_time = 0.0
        self.queued = 0  # claims ever queued


class _Open:
    """One version of a datafile that readers have open: its streams."""

    __slots__ = ("checksum", "claims", "failed", "fetch", "key", "readers", "remote", "spoiled",
                 "streams")

    def __init__(self, key: FileKey, remote: _Remote, checksum: str | None) -> None:
        self.key = key
        self.remote = remote
        self.checksum = checksum
        self.readers = 0
        self.streams: list[_Stream] = []
        self.claims: dict[int, _Claim] = {}  # outstanding claims by offset
        self.fetch: Callable[[int, int], Awaitable[bytearray]] | None = None
        self.spoiled: ChecksumMismatchError | None = None  # fails every later read
        # the latest failed reads (at most _FAILED_KEPT): when, their range, their error
        self.failed: deque[tuple[float, int, int, IdsfsError]] = deque(maxlen=_FAILED_KEPT)


class _PumpResult:
    """What one pump thread call achieved."""

    __slots__ = ("error", "progress", "short")

    def __init__(self) -> None:
        self.progress = 0
        self.error: BaseException | None = None
        self.short = False  # the body ended before the claim was filled


# ----------------------------------------------------------------------------
# Transfer


class Transfer:
    """Reads datafiles through IDS into a :class:`BlockCache` (see the module docstring).

    Args:
        ids: the IDS client; its ``sessionId`` may be replaced at any time.
        bridge: the thread bridge for every blocking call.
        cache: the block cache reads go through.
        restore_wait: seconds a read waits for archived data to come online
            before :class:`~idsfs.errors.RestoreTimeoutError` (``--restore-wait``).
        single_level: ``True``/``False`` if known, ``None`` to ask ``isTwoLevel``
            once, at the first read or status query.
        max_readahead: the most bytes prefetched ahead of sequential reads
            (0 disables readahead).
        stream_idle_timeout: seconds an idle stream stays open.
        max_idle_streams: idle streams kept open at most (all files together).
        busy_wait: seconds "Data is busy" is retried before
            :class:`~idsfs.errors.DataBusyError`.
        resume_retries: ``getData`` streams in a row that may bring no new
            byte: the read fails when that many ended early or broke without
            one (0: a stream that ends early or breaks is not resumed). Also
            the number of times a ``getData`` answering 500 or not answering
            is tried again.
        resume_backoff: first pause before such an attempt (doubled each time).
        poll_interval: first pause between ``isPrepared`` polls (doubled).
        max_poll_interval: the longest pause between polls.
        status_ttl: seconds a ``getStatus`` answer is reused.
        verify_checksum: compare the CRC32 of every stream read from offset 0 to
            the end with the ICAT checksum.
        max_pumps: streams read at the same time at most (each needs a thread
            of the bridge while it reads); default: three quarters of the
            bridge's threads, at least 1.
        max_gap: a read up to this many bytes after where a stream stands is
            served by reading through the gap (the blocks in between go into
            the cache) instead of opening a new stream.
        malloc_tuning: call :func:`tune_malloc` (process-wide glibc settings)
            so that block buffers are recycled from the heap. Off by default:
            a library must not change its host process's allocator; the
            daemon, which owns its process, turns it on.
        renew_session: optional coroutine called when a call with the session
            answers 403; it returns ``True`` if it renewed ``ids.sessionId``
            (the call is then repeated once).

    Raises:
        ValueError: for negative times or sizes.
    """

    def __init__(
        self,
        ids: IDSClient,
        bridge: ThreadBridge,
        cache: BlockCache,
        *,
        restore_wait: float,
        single_level: bool | None = None,
        max_readahead: int = 16 << 20,
        stream_idle_timeout: float = 5.0,
        max_idle_streams: int = 16,
        busy_wait: float = 10.0,
        resume_retries: int = 3,
        resume_backoff: float = 0.1,
        poll_interval: float = 0.25,
        max_poll_interval: float = 5.0,
        status_ttl: float = 5.0,
        verify_checksum: bool = False,
        max_pumps: int | None = None,
        max_gap: int = 4 << 20,
        malloc_tuning: bool = False,
        renew_session: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        for name, value in (
            ("restore_wait", restore_wait), ("max_readahead", max_readahead),
            ("stream_idle_timeout", stream_idle_timeout), ("max_idle_streams", max_idle_streams),
            ("busy_wait", busy_wait), ("resume_retries", resume_retries),
            ("resume_backoff", resume_backoff), ("status_ttl", status_ttl),
            ("max_gap", max_gap),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, not {value!r}")
        if poll_interval <= 0 or max_poll_interval < poll_interval:
            raise ValueError("poll_interval must be > 0 and <= max_poll_interval")
        if max_pumps is None:
            max_pumps = max(1, bridge.max_threads * 3 // 4)
        if max_pumps < 1:
            raise ValueError(f"max_pumps must be >= 1, not {max_pumps!r}")
        self._ids = ids
        self._bridge = bridge
        self._cache = cache
        self.restore_wait = float(restore_wait)
        self._two_level: bool | None = None if single_level is None else not single_level
        self._level_lock = trio.Lock()
        self.max_readahead = int(max_readahead)
        self.stream_idle_timeout = float(stream_idle_timeout)
        self.max_idle_streams = int(max_idle_streams)
        self.busy_wait = float(busy_wait)
        self.resume_retries = int(resume_retries)
        self.resume_backoff = float(resume_backoff)
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.status_ttl = float(status_ttl)
        self.verify_checksum = verify_checksum
        self.max_gap = int(max_gap)
        if malloc_tuning:
            tune_malloc(cache.capacity // 2)
        self._pump_limiter = trio.CapacityLimiter(max_pumps)
        self._renew_session = renew_session
        self._renew_lock = trio.Lock()

        self._remotes: cachetools.LRUCache[int, _Remote] = cachetools.LRUCache(PREPARED_IDS)
        # The remotes of open files (datafile id -> remote, number of _Opens): never
        # evicted, whatever the LRU drops, so a file has one preparedId and one
        # restore state while it is in use.
        self._in_use: dict[int, tuple[_Remote, int]] = {}
        self._opens: dict[FileKey, _Open] = {}
        self._to_store: deque[tuple[_Open, _Claim]] = deque()
        self._versions: cachetools.LRUCache[int, tuple[int, Hashable]] = cachetools.LRUCache(
            PREPARED_IDS * 4
        )
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._starting: trio.Event | None = None
        self._stopped = False
        self._service_scope: trio.CancelScope | None = None

        self._bytes = 0
        self._blocks = 0
        self._opened = 0
        self._reuses = 0
        self._resumes = 0
        self._ra_blocks = 0
        self._prepares = 0
        self._polls = 0
        self._status_calls = 0
        self._busy_retries = 0
        self._restore_timeouts = 0
        self._failures = 0
        self._ttfb_total = 0.0
        self._ttfb_count = 0

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the background tasks until cancelled or :meth:`aclose`; closes all streams at exit.

        Start it with ``await nursery.start(transfer.run)``.

        Raises:
            RuntimeError: if it is already running or was closed.
        """
        if self._nursery is not None or self._stopped:
            raise RuntimeError("Transfer.run is already running or the transfer was closed")
        try:
            with trio.CancelScope() as scope:
                self._service_scope = scope
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._token = trio.lowlevel.current_trio_token()
                    task_status.started()
                    await self._janitor()
        finally:
            self._nursery = None
            self._service_scope = None
            self._close_everything()

    async def aclose(self) -> None:
        """Stop the background tasks and close every stream. Reads fail afterwards.

        Streams a thread is reading are broken off (their threads end at once).
        Raises only ``trio.Cancelled`` (at its last checkpoint, when the
        caller is cancelled; everything is closed by then).
        """
        self._stopped = True
        if self._service_scope is not None:
            self._service_scope.cancel()
        self._close_everything()
        await trio.lowlevel.checkpoint()

    async def _ensure_running(self) -> None:
        """Start :meth:`run` as a system task if nobody started it."""
        if self._stopped:
            raise TransferError("the transfer is closed")
        if self._nursery is not None:
            return
        if self._starting is None:
            self._starting = started = trio.Event()

            async def service() -> None:
                try:
                    await self.run(task_status=_SetOnStart(started))
                except Exception:  # a system task must not raise
                    log.exception("transfer service failed")
                finally:
                    started.set()

            trio.lowlevel.spawn_system_task(service, name="idsfs transfer")
        await self._starting.wait()
        if self._nursery is None:
            raise TransferError("the transfer service could not start")

    def _close_everything(self) -> None:
        """Close every stream now (on the trio thread; socket closes do not block)."""
        for opened in list(self._opens.values()):
            for stream in list(opened.streams):
                self._fail_claims(stream, TransferError("the mount is shutting down",
                                                        opened.key.datafile_id))
                self._abort(stream)

    # -- public API --------------------------------------------------------------------

    async def open(self, datafile: Any) -> Reader:
        """Return a :class:`Reader` for ``datafile``; no IDS call is made.

        ``datafile`` is an :class:`idsfs.model.Datafile` or a record with
        ``id`` and ``fileSize`` (or ``size``), and optionally ``modTime``,
        ``checksum``, ``location`` or a ready ``version`` token.

        Raises:
            ValueError: the record has no integer id.
            TransferError: the transfer was closed.
        """
        ident, size, version, checksum = _describe(datafile)
        await self._ensure_running()
        key = FileKey(ident, size, version)
        previous = self._versions.get(ident)
        keep_cache = previous is None or previous == (size, version)
        if not keep_cache:
            dropped = self._cache.invalidate(ident)
            log.debug("datafile %d changed: %d cached blocks dropped", ident, dropped)
        self._versions[ident] = (size, version)
        opened = self._opens.get(key)
        if opened is None:
            remote = self._remote(ident)
            opened = _Open(key, remote, checksum if self.verify_checksum else None)
            opened.fetch = functools.partial(self._fetch, opened)
            self._opens[key] = opened
            pins = self._in_use.get(ident, (remote, 0))[1]
            self._in_use[ident] = (remote, pins + 1)
        opened.readers += 1
        return Reader(self, opened, keep_cache)

    async def status(self, datafile: Any) -> str:
        """Return ``ONLINE``, ``ARCHIVED``, ``RESTORING`` or ``RESTORE_FAILED`` for a datafile.

        Cheap: no call on single-level servers, ``RESTORING`` while this mount
        waits for the file, else ``getStatus`` cached for ``status_ttl``
        seconds.

        Raises:
            ValueError: the record has no integer id.
            IDSError, TransportError: ``getStatus`` (or ``isTwoLevel``) failed,
                e.g. :class:`~idsfs.errors.IDSInsufficientPrivilegesError`
                (a "Restore failed" answer is not raised: it gives
                ``RESTORE_FAILED``).
        """
        ident = _describe(datafile)[0]
        if not await self._is_two_level():
            return ONLINE
        remote = self._remote(ident)
        now = trio.current_time()
        if remote.failure is not None and now - remote.failed_at < FAILED_RESTORE_HOLD:
            return RESTORE_FAILED
        if remote.waiting and not remote.online:
            return RESTORING
        if remote.status is not None and now - remote.status_at < self.status_ttl:
            return remote.status
        async with remote.status_lock:
            now = trio.current_time()
            if remote.status is not None and now - remote.status_at < self.status_ttl:
                return remote.status
            self._status_calls += 1
            try:
                value = await self._session_call(
                    self._ids.getStatus, DataSelection({"datafileIds": [ident]}), name="getStatus"
                )
            except IDSInternalError as exc:
                if not _is_restore_failed(exc):
                    raise
                value = RESTORE_FAILED
            value = value.strip().upper()
            remote.status, remote.status_at = value, trio.current_time()
            if value == ONLINE and remote.prepared_id is not None:
                remote.online = True
            return value

    async def close_streams(self, datafile_id: int | None = None) -> int:
        """Close the streams of one datafile (or all), releasing their IDS locks.

        Idle streams are closed now, and so are streams reading only blocks
        nobody waits for (read ahead; their threads are broken off); streams
        reading blocks a read waits for are closed as soon as those blocks are
        read, and take no new ones. Returns the number of streams closed or
        marked. Never raises.
        """
        chosen = [
            s
            for opened in self._opens.values()
            if datafile_id is None or opened.key.datafile_id == datafile_id
            for s in opened.streams
            if not s.doomed
        ]
        self._abort_unwanted(chosen)
        idle = []
        for stream in chosen:
            stream.doomed = True
            if self._is_idle(stream):
                self._drop_stream(stream)
                idle.append(stream)
        await self._close_streams(idle)
        return len(chosen)

    def stats(self) -> TransferStats:
        """Return a snapshot of the counters, streams and waits (trio thread only).

        Never raises.
        """
        streams = []
        for opened in self._opens.values():
            for s in opened.streams:
                state = "opening" if s.opening else "reading" if s.pumping else "idle"
                rate = s.bytes / s.active_time if s.active_time > 0 else 0.0
                streams.append(StreamInfo(opened.key.datafile_id, s.pos, s.bytes,
                                          s.active_time, rate, state, len(s.claims)))
        now = time.monotonic()
        remotes = {r.id: r for r in list(self._remotes.values())}
        remotes.update((ident, r) for ident, (r, _) in self._in_use.items())
        restores = tuple(
            RestoreInfo(r.id, r.waiting, now - (r.wait_since or now))
            for r in remotes.values()
            if r.waiting
        )
        return TransferStats(
            streams=tuple(streams),
            restores=restores,
            bytes_fetched=self._bytes,
            blocks_fetched=self._blocks,
            streams_opened=self._opened,
            stream_reuses=self._reuses,
            resumes=self._resumes,
            readahead_blocks=self._ra_blocks,
            prepares=self._prepares,
            polls=self._polls,
            status_calls=self._status_calls,
            busy_retries=self._busy_retries,
            restore_timeouts=self._restore_timeouts,
            failures=self._failures,
            first_byte_seconds=self._ttfb_total / self._ttfb_count if self._ttfb_count else 0.0,
            cache=self._cache.stats(),
        )

    @property
    def cache(self) -> BlockCache:
        """The block cache reads go through (``fs.py`` reads its ``capacity``). Never raises."""
        return self._cache

    # -- helpers -------------------------------------------------------------------------

    def _remote(self, ident: int) -> _Remote:
        """The one :class:`_Remote` of a datafile: an open file's, else the LRU's (or new)."""
        used = self._in_use.get(ident)
        remote = used[0] if used is not None else self._remotes.get(ident)
        if remote is None:
            remote = _Remote(ident, self.poll_interval)
        self._remotes[ident] = remote  # (again: the most recently used)
        return remote

    async def _is_two_level(self) -> bool:
        if self._two_level is None:
            async with self._level_lock:
                if self._two_level is None:
                    self._two_level = await self._bridge.run(
                        self._ids.isTwoLevel, name="isTwoLevel"
                    )
        return self._two_level

    async def _session_call(self, fn: Callable[..., T], *args: Any, name: str) -> T:
        """Run a call that uses the session; repeat it once after a renewed session."""
        used = self._ids.sessionId
        try:
            return await self._bridge.run(fn, *args, name=name)
        except IDSInsufficientPrivilegesError:
            if not await self._session_renewed(used):
                raise
            log.info("%s: session renewed after 403, trying once more", name)
        return await self._bridge.run(fn, *args, name=name)

    async def _session_renewed(self, used: str | None) -> bool:
        """True if ``ids.sessionId`` differs from ``used`` now or after ``renew_session``."""
        if self._ids.sessionId != used:
            return True
        if self._renew_session is None:
            return False
        async with self._renew_lock:
            if self._ids.sessionId != used:
                return True
            try:
                return bool(await self._renew_session())
            except Exception:  # the 403 is what the read reports
                log.warning("renewing the session failed", exc_info=True)
                return False

    # -- fetching ------------------------------------------------------------------------

    async def _fetch(self, opened: _Open, offset: int, length: int,
                     readahead: bool = False) -> bytearray:
        """The cache's fetch: queue a claim for the block on a stream and wait for it.

        Must not checkpoint before the claim is queued, so that blocks asked for
        in order are queued on a stream in that order.
        """
        if self._nursery is None or self._stopped:
            raise TransferError("the mount is shutting down", opened.key.datafile_id)
        if opened.spoiled is not None:
            raise opened.spoiled.with_traceback(None)  # shared: its traceback must not grow
        claim = opened.claims.get(offset)
        if claim is not None and claim.length == length and claim.finished:
            if claim.error is None and claim.buf is not None:
                # read ahead, on its way into the cache: the cache stores it now
                claim.cancelled = False  # (so _store_all leaves it alone)
                return claim.buf
            claim = None
        if claim is not None and claim.length == length:
            claim.cancelled = False  # adopt a queued claim nobody waits for
        else:
            stream, gap = self._stream_for(opened, offset)
            claim = _Claim(offset, length, readahead)
            self._queue(stream, [*gap, claim])
        try:
            await claim.event.wait()
        except trio.Cancelled:
            claim.cancelled = True
            raise
        if claim.error is not None:
            raise claim.error.with_traceback(None)  # shared by every waiter
        assert claim.buf is not None
        return claim.buf

    def _read_ahead(self, opened: _Open, first: int, last: int) -> None:
        """Queue claims for the blocks ``first..last`` that are neither cached nor wanted yet.

        Synchronous (no checkpoint): the claims nobody waits for are adopted by
        the reads that come for them or go into the cache when read.
        """
        if self._nursery is None or self._stopped or opened.spoiled is not None:
            return
        cache = self._cache
        key = opened.key
        block = cache.block_size
        run: list[_Claim] = []
        for index in range(first, last + 1):
            offset = index * block
            if cache.contains(key, index) or cache.is_fetching(key, index) or (
                offset in opened.claims
            ):
                if run:
                    self._queue_unwanted(opened, run)
                    run = []
                continue
            claim = _Claim(offset, min(block, key.size - offset), True)
            claim.cancelled = True
            run.append(claim)
        if run:
            self._queue_unwanted(opened, run)

    def _queue_unwanted(self, opened: _Open, claims: list[_Claim]) -> None:
        stream, gap = self._stream_for(opened, claims[0].offset)
        self._queue(stream, gap + claims)

    def _stream_for(self, opened: _Open, offset: int) -> tuple[_Stream, list[_Claim]]:
        """Choose the stream to read ``offset`` from, and the gap claims to queue first.

        A stream whose tail is ``offset`` is best. A stream whose tail lies
        less than ``max_gap`` bytes before it reads the blocks in between too
        (as claims nobody waits for yet: reads asking for them adopt them, the
        others go into the cache). Otherwise a new stream starts at ``offset``.
        """
        best: _Stream | None = None
        for stream in opened.streams:
            if stream.closed or stream.eof or stream.broken or stream.doomed:
                continue
            if stream.tail == offset:
                best = stream
                break
            if stream.tail < offset <= stream.tail + self.max_gap and (
                best is None or stream.tail > best.tail
            ):
                best = stream
        if best is None:
            stream = _Stream(opened, offset)
            opened.streams.append(stream)
            return stream, []
        gap = []
        block = self._cache.block_size
        size = opened.key.size
        at = best.tail
        while at < offset:
            length = min(block, size - at)
            existing = opened.claims.get(at)
            if existing is not None and not existing.finished:
                break  # cannot happen: claims are queued in order per stream
            claim = _Claim(at, length, True)
            claim.cancelled = True
            gap.append(claim)
            at += length
        if at != offset:
            stream = _Stream(opened, offset)
            opened.streams.append(stream)
            return stream, []
        return best, gap

    def _queue(self, stream: _Stream, claims: list[_Claim]) -> None:
        """Queue ``claims`` (contiguous, from the stream's tail) and start its pump if idle."""
        assert self._nursery is not None
        opened = stream.file
        for claim in claims:
            opened.claims[claim.offset] = claim
        self._reuses += len(claims) - (0 if stream.queued else 1)
        stream.queued += len(claims)
        stream.tail = claims[-1].offset + claims[-1].length
        with stream.lock:
            stream.claims.extend(claims)
            start = not stream.pumping
            if start:
                stream.pumping = True
            else:
                stream.lock.notify()  # a lingering pump thread takes them
        if start:
            self._nursery.start_soon(self._pump, stream)

    async def _pump(self, stream: _Stream) -> None:
        """Serve the claims queued on ``stream`` until there are none (a background task)."""
        opened = stream.file
        ident = opened.key.datafile_id
        no_progress = 0
        pause = self.resume_backoff
        to_close: list[_Stream] = []
        try:
            while True:
                with stream.lock:
                    if stream.ds is None or opened.readers == 0:
                        self._skip_cancelled(stream)
                    done = not stream.claims or stream.closed or stream.broken
                    if done:
                        stream.pumping = False
                    else:
                        head = stream.claims[0]
                if done:
                    # Decided without a checkpoint, so no claim can slip in meanwhile.
                    to_close = self._retire(stream)
                    break
                start = head.offset + head.got
                if stream.ds is None or stream.pos != start:
                    if stream.ds is not None:
                        await self._close_streams([stream])
                    if stream.pos != start:
                        stream.crc = 0 if start == 0 and opened.checksum else None
                    stream.pos = start
                    await self._open_stream(stream)
                # Only reading takes a pump slot: waiting for a restore must not.
                async with self._pump_limiter:
                    t0 = time.monotonic()
                    result = await self._bridge.run(
                        self._pump_thread, stream, name="getData read",
                        on_abandon=functools.partial(self._break, stream),
                    )
                    stream.active_time += time.monotonic() - t0
                if result.progress:
                    no_progress, pause = 0, self.resume_backoff
                if stream.broken or (result.error is None and not result.short):
                    # all queued claims served, the stream must move, or it was
                    # broken off (aborted: not a failure to resume)
                    continue
                # The body ended early or broke: resume where it stopped.
                await self._close_streams([stream])
                if not result.progress:
                    no_progress += 1
                why = result.error or "the body ended early"
                if self.resume_retries == 0 or no_progress >= self.resume_retries:
                    tried = (f"{no_progress} attempts in a row brought no new byte"
                             if self.resume_retries else "resuming is off")
                    raise IncompleteDownloadError(
                        f"datafile {ident}: download stopped at offset {stream.pos} of "
                        f"{opened.key.size} bytes ({why}); {tried}",
                        ident, stream.pos,
                    ) from result.error
                self._resumes += 1
                log.info("datafile %d: stream stopped at offset %d (%s); resuming",
                         ident, stream.pos, why)
                if no_progress:
                    await trio.sleep(pause)
                    pause = min(pause * 2, 5.0)
        except trio.Cancelled:
            self._fail_claims(stream, TransferError(f"datafile {ident}: read cancelled", ident))
            self._abort(stream)
            raise
        except Exception as exc:
            self._failures += 1
            if not isinstance(exc, TransferError | ServerError | TransportError):
                log.exception("datafile %d: unexpected error while reading", ident)
            self._fail_claims(stream, exc)
            self._abort(stream)
            return
        await self._close_streams(to_close)

    def _retire(self, stream: _Stream) -> list[_Stream]:
        """A pump ends: drop the stream or let it idle; return the streams to close."""
        if stream.claims:  # the stream was closed under its claims
            ident = stream.file.key.datafile_id
            self._fail_claims(stream, TransferError(f"datafile {ident}: stream closed", ident))
        if (stream.closed or stream.eof or stream.doomed or stream.broken
                or stream.file.readers == 0 or stream.ds is None):
            self._drop_stream(stream)
            return [stream]
        stream.idle_since = time.monotonic()
        return self._trim_idle(stream.file)

    def _skip_cancelled(self, stream: _Stream) -> None:
        """Drop leading claims nobody waits for any more (under ``stream.lock``)."""
        while stream.claims and stream.claims[0].cancelled and stream.claims[0].got == 0:
            claim = stream.claims.popleft()
            self._finish_claim(stream.file, claim, TransferError("not needed any more"))

    def _pump_thread(self, stream: _Stream) -> _PumpResult:
        """Worker thread: read the queued claims from ``stream.ds`` in order.

        Returns when no claim is left, when the head claim does not start where
        the stream stands, when nobody needs the head claim any more, or when
        the body ends early or breaks (``short``/``error``; the bytes read up
        to there are kept). A stream marked ``broken`` meanwhile is closed here.
        """
        result = _PumpResult()
        with stream.lock:
            if stream.broken:
                return result
            stream.in_thread = True
        try:
            self._pump_claims(stream, result)
        finally:
            with stream.lock:
                stream.in_thread = False
                broken = stream.broken
            if broken:
                self._close_ds(stream)
        return result

    def _pump_claims(self, stream: _Stream, result: _PumpResult) -> None:
        ds = stream.ds
        assert ds is not None
        opened = stream.file
        size = opened.key.size
        token = self._token
        while not stream.broken:
            with stream.lock:
                if not stream.claims:
                    stream.lock.wait(PUMP_LINGER)
                    if not stream.claims or stream.broken:
                        return
                claim = stream.claims[0]
            if claim.offset + claim.got != stream.pos:
                return  # the pump reopens the stream where the claim starts
            if claim.cancelled and claim.got == 0 and opened.readers == 0:
                return  # nobody needs the rest: the pump drops it
            view = claim.view
            assert view is not None
            try:
                while claim.got < claim.length:
                    n = ds.readinto(view[claim.got:min(claim.length, claim.got + READ_CHUNK)])
                    if not n:
                        result.short = True
                        return
                    claim.got += n
                    stream.pos += n
                    stream.bytes += n
                    result.progress += n
                    if stream.broken:
                        return
            except TransportError as exc:
                result.error = exc
                return
            error: BaseException | None = None
            if stream.crc is not None:
                stream.crc = crc32(view, stream.crc)
            at_eof = stream.pos >= size
            if at_eof:
                stream.eof = True
                error = self._check_crc(stream)
            with stream.lock:
                if stream.claims and stream.claims[0] is claim:
                    stream.claims.popleft()
            if token is None:
                return
            try:
                token.run_sync_soon(self._finish_claim_safely, opened, claim, error)
            except trio.RunFinishedError:
                return
            if at_eof:
                self._drain(stream, ds)  # after the hand-over: the last read need not wait
                return

    def _check_crc(self, stream: _Stream) -> BaseException | None:
        """The stream read the whole file from 0: compare its CRC32 with ICAT's, if asked."""
        opened = stream.file
        if not (self.verify_checksum and stream.crc is not None and opened.checksum):
            return None
        ident = opened.key.datafile_id
        # IDS writes the CRC32 as Java's Long.toHexString: no leading zeros.
        actual = f"{stream.crc:x}"
        expected = opened.checksum.strip().lower()
        try:
            same = int(expected, 16) == stream.crc
        except ValueError:
            same = True  # not a CRC32 (another checksum kind): nothing to compare
        if same:
            return None
        return ChecksumMismatchError(
            f"datafile {ident}: the CRC32 of the bytes read ({actual}) differs from "
            f"the ICAT checksum ({expected})", ident, expected, actual,
        )

    @staticmethod
    def _drain(stream: _Stream, ds: DataStream) -> None:
        """Worker thread: the stream reached fileSize; read the end of the body and close it."""
        opened = stream.file
        try:
            extra = ds.read(1)
        except TransportError:
            extra = b""
        if extra:
            log.warning("datafile %d: the IDS sends more bytes than its fileSize %d; "
                        "the rest is ignored", opened.key.datafile_id, opened.key.size)
        ds.close()

    def _finish_claim_safely(self, opened: _Open, claim: _Claim,
                             error: BaseException | None) -> None:
        """:meth:`_finish_claim` as a ``run_sync_soon`` callback: it must not raise.

        An exception escaping such a callback would crash the trio run
        (``TrioInternalError``); a bug here fails the waiting reads instead.
        """
        try:
            self._finish_claim(opened, claim, error)
        except Exception as exc:
            log.exception("handing a fetched block over failed")
            if not claim.event.is_set():
                claim.error = TransferError(f"internal error: {exc}", opened.key.datafile_id)
                claim.finished = True
                claim.event.set()

    def _finish_claim(self, opened: _Open, claim: _Claim, error: BaseException | None) -> None:
        """Trio thread: hand a finished (or failed) claim to whoever waits for it."""
        if claim.finished:
            return
        claim.finished = True
        claim.error = error
        keep = error is None and claim.cancelled and self._nursery is not None
        if opened.claims.get(claim.offset) is claim and not keep:
            del opened.claims[claim.offset]
        if error is None:
            self._bytes += claim.length
            self._blocks += 1
            if claim.readahead:
                self._ra_blocks += 1
            if keep:
                # Read, but nobody waits for it (any more): into the cache. Until
                # then a read finds it in ``opened.claims``.
                self._to_store.append((opened, claim))
                if len(self._to_store) == 1:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._store_all)
        elif isinstance(error, ChecksumMismatchError):
            # Every byte of this version is suspect: drop them, fail all reads
            # until the last reader closes (a new open tries again).
            opened.spoiled = error
            self._cache.invalidate(opened.key.datafile_id)
        claim.event.set()

    async def _store_all(self) -> None:
        """Put the blocks of finished claims nobody waited for into the cache."""
        block = self._cache.block_size
        while self._to_store:
            opened, claim = self._to_store.popleft()
            data = claim.buf
            assert data is not None
            if opened.spoiled is not None or not claim.cancelled:  # spoiled, or a read took it
                if opened.claims.get(claim.offset) is claim:
                    del opened.claims[claim.offset]
                self._forget_if_unused(opened)
                continue

            async def ready(offset: int, length: int, data: bytearray = data) -> bytearray:
                return data

            try:
                await self._cache.prefetch(opened.key, claim.offset // block, ready)
            except Exception:  # only an optimisation
                log.debug("storing a read-ahead block failed", exc_info=True)
            finally:
                if opened.claims.get(claim.offset) is claim:
                    del opened.claims[claim.offset]
                self._forget_if_unused(opened)

    def _fail_claims(self, stream: _Stream, error: BaseException) -> None:
        with stream.lock:
            claims = list(stream.claims)
            stream.claims.clear()
            stream.pumping = False
            stream.lock.notify_all()
        for claim in claims:
            self._finish_claim(stream.file, claim, error)

    async def _open_stream(self, stream: _Stream) -> None:
        """Send ``getData`` at ``stream.pos`` and set ``stream.ds`` (restores, retries)."""
        opened = stream.file
        remote = opened.remote
        ident = opened.key.datafile_id
        restore_deadline: float | None = None
        busy_deadline: float | None = None
        busy_pause = 0.1
        reprepared = False
        session_retried = False
        failures = 0
        pause = self.resume_backoff
        stream.opening = True
        try:
            while True:
                two_level = await self._is_two_level()
                if two_level:
                    if restore_deadline is None:
                        restore_deadline = trio.current_time() + self.restore_wait
                    selection: DataSelection | str = await self._prepared(remote, restore_deadline)
                else:
                    selection = DataSelection({"datafileIds": [ident]})
                used = self._ids.sessionId
                t0 = time.monotonic()
                try:
                    ds = await self._bridge.run(
                        functools.partial(self._ids.getData, selection, offset=stream.pos),
                        name="getData",
                    )
                except IDSDataNotOnlineError as exc:
                    if two_level and not exc.busy:
                        assert restore_deadline is not None
                        if trio.current_time() >= restore_deadline:
                            self._restore_timeouts += 1
                            raise RestoreTimeoutError(
                                f"datafile {ident} is not online (getData answers 503) after "
                                f"{self.restore_wait:g} s; try again later", ident,
                                self.restore_wait,
                            ) from exc
                        log.info("datafile %d: not online any more; waiting for it", ident)
                        if remote.prepared_id == selection:
                            remote.online = False
                        await trio.sleep(self.poll_interval)
                        continue
                    now = trio.current_time()
                    if busy_deadline is None:
                        busy_deadline = now + self.busy_wait
                    if now >= busy_deadline:
                        raise DataBusyError(
                            f"datafile {ident}: the IDS reports it busy (locked by another "
                            f"operation) for more than {self.busy_wait:g} s", ident,
                        ) from exc
                    self._busy_retries += 1
                    await trio.sleep(min(busy_pause, busy_deadline - now))
                    busy_pause = min(busy_pause * 2, 2.0)
                    continue
                except IDSNotFoundError:
                    if two_level and not reprepared:
                        reprepared = True
                        if remote.prepared_id == selection:
                            remote.prepared_id = None
                            remote.online = False
                        continue
                    raise
                except IDSInsufficientPrivilegesError:
                    if two_level or session_retried or not await self._session_renewed(used):
                        raise
                    session_retried = True
                    continue
                except IDSInternalError as exc:
                    # A 500 may be passing (storage I/O): tried again, within the resume
                    # bound. (A transport failure propagates: the IDSClient retried it
                    # already, each try waiting up to the read timeout for a hung
                    # server; trying the whole again would multiply that wait.)
                    failures += 1
                    if failures > self.resume_retries or _is_restore_failed(exc):
                        raise
                    log.info("datafile %d: getData failed (%s); trying again", ident, exc)
                    await trio.sleep(pause)
                    pause = min(pause * 2, 5.0)
                    continue
                self._ttfb_total += time.monotonic() - t0
                self._ttfb_count += 1
                self._opened += 1
                if stream.broken or stream.closed:
                    ds.close()
                    raise TransferError(f"datafile {ident}: stream closed while opening", ident)
                self._check_length(ds, opened.key.size, stream.pos, ident)
                ds.fill_whole = True  # the FUSE thread keeps the GIL busy: one wait per block
                stream.ds = ds
                return
        finally:
            stream.opening = False

    @staticmethod
    def _check_length(ds: DataStream, size: int, offset: int, ident: int) -> None:
        """Refuse (closing ``ds``) an answer whose ``Content-Length`` cannot be the rest of
        the file from ``offset``: more bytes than ICAT's ``size`` leaves
        (IDSResponseError: the stored file is longer than the catalogue says, or
        the server ignored the range), or, past the start, fewer
        (IncompleteDownloadError: the stored file ends early, or the answer
        starts elsewhere than asked). At offset 0 fewer bytes are read up to
        where they end, as a stream that ends early is.
        """
        have = ds.content_length
        expected = size - offset
        if have is None or have == expected or (have < expected and offset == 0):
            return
        ds.close()
        what = (f"datafile {ident}: IDS answers {have} bytes from offset {offset}, but "
                f"ICAT's fileSize ({size}) leaves {expected}")
        if have > expected:
            raise IDSResponseError(f"{what}: the stored file and the catalogue disagree, or "
                                   f"the server ignored the range; not read")
        raise IncompleteDownloadError(f"{what}: the stored bytes end early, or the answer "
                                      f"does not start at the offset asked for", ident, offset)

    # -- preparation and restores ----------------------------------------------------------

    async def _prepared(self, remote: _Remote, deadline: float) -> str:
        """Return a preparedId whose data is online, preparing and waiting as needed.

        Raises:
            RestoreTimeoutError: not online by ``deadline``.
            RestoreFailedError: the IDS reports the restore failed.
        """
        rounds = 0
        while True:
            now = trio.current_time()
            if remote.failure is not None and now - remote.failed_at < FAILED_RESTORE_HOLD:
                raise remote.failure.with_traceback(None)  # shared: keep it from growing
            pid = remote.prepared_id
            if pid is None and rounds:
                # the IDS forgot the preparedId this read waited for (404): prepare
                # again, but not in a tight loop, and not past the deadline
                if now >= deadline:
                    self._restore_timeouts += 1
                    raise RestoreTimeoutError(
                        f"datafile {remote.id} was not online within {self.restore_wait:g} s "
                        f"(the IDS forgot its preparedId, {rounds} times)", remote.id,
                        self.restore_wait)
                await trio.sleep(min(remote.poll_delay, deadline - now))
                pid = remote.prepared_id  # another read may have prepared it meanwhile
            rounds += 1
            if pid is None:
                async with remote.prep_lock:
                    pid = remote.prepared_id
                    if pid is None:
                        self._prepares += 1
                        pid = await self._session_call(
                            self._ids.prepareData,
                            DataSelection({"datafileIds": [remote.id]}),
                            name="prepareData",
                        )
                        pid = pid.strip()
                        remote.prepared_id = pid
                        remote.online = False
                        remote.failure = None
                        remote.poll_delay = self.poll_interval
                        remote.next_poll = 0.0
            if remote.online:
                return pid
            await self._wait_online(remote, pid, deadline)
            if remote.online and remote.prepared_id == pid:
                return pid

    async def _wait_online(self, remote: _Remote, pid: str, deadline: float) -> None:
        """Poll ``isPrepared`` (one caller at a time) until online, or raise at ``deadline``.

        Every caller sees at least one answer given after it began waiting, so
        a ``restore_wait`` of 0 still asks once. Returns early when the
        preparedId was replaced (the caller prepares again).

        Raises:
            RestoreTimeoutError: still not online at ``deadline``.
            RestoreFailedError: the IDS reports that the restore failed.
        """
        began = trio.current_time()
        polls_before = remote.polls
        remote.waiting += 1
        if remote.wait_since is None:
            remote.wait_since = time.monotonic()
        try:
            while True:
                if remote.failure is not None and remote.failed_at >= began:
                    raise remote.failure.with_traceback(None)
                if remote.online or remote.prepared_id != pid:
                    return
                polled = remote.polls > polls_before
                if polled and trio.current_time() >= deadline:
                    self._restore_timeouts += 1
                    raise RestoreTimeoutError(
                        f"datafile {remote.id} is archived and was not restored within "
                        f"{self.restore_wait:g} s; the restore goes on, try again later",
                        remote.id, trio.current_time() - began,
                    )
                # Waiting for the lock (another caller's poll) and for the next
                # poll time ends at the deadline once we have seen an answer.
                with trio.move_on_at(deadline if polled else float("inf")):
                    async with remote.poll_lock:
                        if remote.online or remote.prepared_id != pid or remote.failure:
                            continue
                        wake = remote.next_poll
                        if not (remote.polls > polls_before):
                            wake = min(wake, deadline)
                        await trio.sleep_until(wake)
                        await self._poll(remote, pid)
        finally:
            remote.waiting -= 1
            if not remote.waiting:
                remote.wait_since = None

    async def _poll(self, remote: _Remote, pid: str) -> None:
        """One ``isPrepared`` call; updates ``remote`` (holding its poll lock)."""
        self._polls += 1
        try:
            ready = await self._bridge.run(self._ids.isPrepared, pid, name="isPrepared")
        except IDSNotFoundError:
            log.info("datafile %d: preparedId expired; preparing again", remote.id)
            if remote.prepared_id == pid:
                remote.prepared_id = None
                remote.online = False
            return
        except IDSInternalError as exc:
            if not _is_restore_failed(exc):
                raise
            failure = RestoreFailedError(
                f"datafile {remote.id}: the IDS could not restore it from archive storage",
                remote.id,
            )
            failure.__cause__ = exc
            remote.failure = failure
            remote.failed_at = trio.current_time()
            remote.prepared_id = None
            remote.online = False
            remote.status, remote.status_at = RESTORE_FAILED, remote.failed_at
            raise failure from exc
        finally:
            remote.polls += 1
        now = trio.current_time()
        remote.next_poll = now + remote.poll_delay
        remote.poll_delay = min(remote.poll_delay * 2, self.max_poll_interval)
        if ready and remote.prepared_id == pid:
            remote.online = True
            remote.poll_delay = self.poll_interval
            remote.status, remote.status_at = ONLINE, now

    # -- stream housekeeping -------------------------------------------------------------

    @staticmethod
    def _is_idle(stream: _Stream) -> bool:
        return not stream.pumping and not stream.claims and not stream.closed

    def _drop_stream(self, stream: _Stream) -> None:
        """Forget ``stream`` (its body is closed by the caller)."""
        stream.closed = True
        opened = stream.file
        if stream in opened.streams:
            opened.streams.remove(stream)
        self._forget_if_unused(opened)

    @staticmethod
    def _break(stream: _Stream) -> bool:
        """Mark ``stream`` broken; its pump thread, if any, stops at once and closes the body.

        A thread blocked reading the body is woken by :meth:`DataStream.abort`
        (the socket is shut down), so neither the thread nor the connection
        (and the IDS lock it holds) waits for the read timeout. Returns whether
        a thread is in the stream. Never raises.
        """
        with stream.lock:
            stream.broken = True
            stream.lock.notify_all()
            in_thread = stream.in_thread
            if in_thread and stream.ds is not None:
                stream.ds.abort()
        return in_thread

    def _abort(self, stream: _Stream) -> None:
        """Drop ``stream`` and close its body now, or break off its running thread,
        which closes it. Never raises."""
        in_thread = self._break(stream)
        self._drop_stream(stream)
        if not in_thread:
            self._close_ds(stream)

    def _abort_unwanted(self, streams: list[_Stream]) -> None:
        """Break off the streams among ``streams`` that read only blocks nobody waits for.

        Their pump threads end now instead of when the blocks are read (or the
        read timeout expires on a stalled server), and their connections close.
        Streams still sending ``getData`` finish opening as before.
        """
        for stream in streams:
            if stream.closed or stream.opening or not stream.pumping:
                continue
            with stream.lock:
                unwanted = all(c.cancelled for c in stream.claims)
            if unwanted:
                ident = stream.file.key.datafile_id
                self._fail_claims(stream, TransferError(
                    f"datafile {ident}: not needed any more", ident))
                self._abort(stream)

    def _forget_if_unused(self, opened: _Open) -> None:
        if (opened.readers == 0 and not opened.streams and not opened.claims
                and self._opens.get(opened.key) is opened):
            del self._opens[opened.key]
            ident = opened.key.datafile_id
            remote, pins = self._in_use.get(ident, (opened.remote, 1))
            if pins > 1:
                self._in_use[ident] = (remote, pins - 1)
            else:
                self._in_use.pop(ident, None)

    @staticmethod
    def _close_ds(stream: _Stream) -> None:
        ds, stream.ds = stream.ds, None
        if ds is not None:
            try:
                ds.close()
            except Exception:  # closing must not fail a read
                log.debug("closing a stream failed", exc_info=True)

    async def _close_streams(self, streams: list[_Stream]) -> None:
        """Close the bodies of dropped streams in a worker thread."""
        bodies = [s.ds for s in streams if s.ds is not None]
        for s in streams:
            s.ds = None
        if not bodies:
            return

        def close_all() -> None:
            for ds in bodies:
                try:
                    ds.close()
                except Exception:  # closing must not fail anything
                    log.debug("closing a stream failed", exc_info=True)

        with trio.CancelScope(shield=True):
            await self._bridge.run(close_all, name="close streams")

    def _trim_idle(self, opened: _Open) -> list[_Stream]:
        """Drop the idle streams beyond the per-file and global limits; return them."""
        idle_file = [s for s in opened.streams if self._is_idle(s)]
        doomed: list[_Stream] = []
        if len(idle_file) > MAX_STREAMS_PER_FILE:
            idle_file.sort(key=lambda s: s.idle_since)
            doomed.extend(idle_file[: len(idle_file) - MAX_STREAMS_PER_FILE])
        idle_all = [
            s for o in self._opens.values() for s in o.streams
            if self._is_idle(s) and s not in doomed
        ]
        if len(idle_all) > self.max_idle_streams:
            idle_all.sort(key=lambda s: s.idle_since)
            doomed.extend(idle_all[: len(idle_all) - self.max_idle_streams])
        for s in doomed:
            self._drop_stream(s)
        return doomed

    async def _janitor(self) -> None:
        """Close streams idle for longer than ``stream_idle_timeout`` (runs in :meth:`run`)."""
        period = min(1.0, max(0.01, self.stream_idle_timeout / 4))
        while True:
            await trio.sleep(period)
            limit = time.monotonic() - self.stream_idle_timeout
            doomed = [
                s for o in self._opens.values() for s in o.streams
                if self._is_idle(s) and s.idle_since <= limit
            ]
            if doomed:
                log.debug("closing %d idle streams", len(doomed))
                for s in doomed:
                    self._drop_stream(s)
                await self._close_streams(doomed)

    async def _reader_closed(self, opened: _Open) -> None:
        opened.readers -= 1
        if opened.readers > 0:
            return
        self._abort_unwanted(list(opened.streams))
        idle = [s for s in opened.streams if self._is_idle(s)]
        for s in idle:
            self._drop_stream(s)
        self._forget_if_unused(opened)
        await self._close_streams(idle)


class _SetOnStart:
    """A ``task_status`` that sets an event when :meth:`Transfer.run` has started."""

    def __init__(self, event: trio.Event) -> None:
        self._event = event

    def started(self, value: object = None) -> None:
        self._event.set()


# ----------------------------------------------------------------------------
# Reader


class Reader:
    """An open datafile: reads through the block cache, with readahead.

    Made by :meth:`Transfer.open` (its constructor is not public API).

    Attributes:
        datafile_id: the datafile's ICAT id.
        size: its ICAT ``fileSize``; reads stop there (``fs.py`` compares it
            with ``transfer.cache.capacity``).
        key: the cache's :class:`~idsfs.blockcache.FileKey` of this version.
        keep_cache: whether the kernel may keep the pages it cached at an
            earlier open: ``False`` when the datafile's size or version differs
            from the one seen at its previous open in this mount (``fs.py``
            passes it on as FUSE ``keep_cache``).
        release_delivered: ``False`` by default; set it when whoever reads
            keeps what it was given (the kernel's page cache behind a FUSE
            read): once the reads of this reader have returned every byte of
            a block (in one read or several smaller ones, e.g. the kernel's
            128 KiB requests with 1 MiB blocks), the block leaves the block
            cache at once while this is the only reader of the file
            (:meth:`BlockCache.release <idsfs.blockcache.BlockCache.release>`).
    """

    datafile_id: int
    size: int
    key: FileKey
    keep_cache: bool
    release_delivered: bool

    def __init__(self, transfer: Transfer, opened: _Open, keep_cache: bool) -> None:
        self._transfer = transfer
        self._opened = opened
        self.key = opened.key
        self.datafile_id = opened.key.datafile_id
        self.size = opened.key.size
        self.keep_cache = keep_cache
        self.release_delivered = False
        self._closed = False
        self._partial: dict[int, int] = {}  # block index -> bytes of it delivered so far
        self._next: int | None = None  # where a sequential read would start
        self._window = 0  # readahead blocks
        self._ra_next = 0  # first block readahead has not queued yet
        cache = transfer.cache
        self._bs = cache.block_size
        self._nblocks = cache.block_count(self.key)
        limit = min(transfer.max_readahead, cache.capacity // 4)
        self._max_window = max(0, limit // self._bs)

    def __repr__(self) -> str:
        return f"<Reader datafile={self.datafile_id} size={self.size} closed={self._closed}>"

    async def read(self, offset: int, size: int) -> memoryview:
        """Return up to ``size`` bytes from ``offset``, as a read-only memoryview.

        Shorter than ``size`` only at the end of the file (empty at or past it).

        Raises:
            ValueError: negative ``offset`` or ``size``, or the reader is closed.
            RestoreTimeoutError, RestoreFailedError, DataBusyError,
            IncompleteDownloadError, ChecksumMismatchError, TransferError: see
                the module docstring.
            IDSError, TransportError: other IDS or network failures.
            BlockLengthError: a block of the wrong length (should not happen).
        """
        if self._closed:
            raise ValueError("read from a closed Reader")
        if offset < 0 or size < 0:
            raise ValueError(f"offset and size must be >= 0, not {offset}, {size}")
        end = min(offset + size, self.size)
        if end > offset:
            first = offset // self._bs
            last = (end - 1) // self._bs
            previous = self._next
            if offset == previous or (previous is None and offset == 0):
                self._window = min(max(1, self._window * 2), self._max_window)
                self._next = end
            elif previous is not None and self._window and \
                    abs(offset - previous) <= max(self._window, 2) * self._bs:
                # The kernel sends the requests of its readahead in parallel and
                # they may arrive a little out of order: still sequential.
                self._next = max(previous, end)
            else:
                self._window = 0
                self._ra_next = first
                self._next = end
            if self._window:
                # Queue the read's own blocks and the window after them now, in
                # order, so that one stream serves them back to back; the read
                # then finds its blocks queued and waits for them.
                start = max(self._ra_next, first)
                stop = min(self._nblocks - 1, last + self._window)
                if start <= stop:
                    self._transfer._read_ahead(self._opened, start, stop)
                    self._ra_next = stop + 1
        opened = self._opened
        assert opened.fetch is not None
        cache = self._transfer.cache
        if opened.failed:  # (empty on the hot path of reads that succeed)
            now = trio.current_time()
            for when, start, stop, error in reversed(opened.failed):
                if now - when < FAILED_READ_HOLD and offset < stop \
                        and start < offset + max(size, 1):
                    raise _again(error)
        try:
            view = await cache.get_range(self.key, offset, size, opened.fetch)
        except IdsfsError as exc:
            opened.failed.append((trio.current_time(), offset, offset + max(size, 1), exc))
            raise
        if self.release_delivered and opened.readers == 1 and len(view):
            self._delivered(offset, offset + len(view))
        return view

    def _delivered(self, start: int, end: int) -> None:
        """Count ``[start, end)`` as delivered; release the blocks now delivered whole."""
        bs = self._bs
        cache = self._transfer.cache
        index = start // bs
        while index * bs < end:
            block_start = index * bs
            block_end = min(block_start + bs, self.size)
            got = self._partial.pop(index, 0) + min(end, block_end) - max(start, block_start)
            if got >= block_end - block_start:
                cache.release(self.key, block_start, block_end - block_start)
            else:
                if len(self._partial) >= _MAX_PARTIAL:  # random reads: start counting afresh
                    self._partial.clear()
                self._partial[index] = got
            index += 1

    async def close(self) -> None:
        """Release the file; the last reader closes its idle streams. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        await self._transfer._reader_closed(self._opened)

"""Main and archive storage of the IDS emulator, with the deferred-operation queue.

Layout under ``data_dir`` (everything survives a restart):

* ``main/<location>`` — main ("fast") storage; new files get the location
  ``<investigationId>/<datasetId>/<random uuid>`` like the reference file plugin.
* ``archive/`` — archive storage of two-level servers. Storage unit DATASET: one zip per dataset,
  ``archive/<invId>/<dsId>.zip``, entries named ``ids/<fac>/<inv>/<visit>/<ds>/<datafile>``.
  Storage unit DATAFILE: a copy of each file at ``archive/<location>``.
* ``markers/<id>`` — "a write to archive is outstanding" markers (an archive request is refused,
  silently, while one exists, so data that never reached the archive is never dropped). The
  queue lives in memory: at start-up the emulator queues the write of every marked item again
  (:meth:`outstanding_writes`).
* ``prepared/`` — prepared-id records (:mod:`idsfs.emulator.prepared`).

"Online" is decided by presence in main storage: the dataset directory ``main/<invId>/<dsId>``
for unit DATASET, the datafile's location for unit DATAFILE (ids-protocol.md §7.2).

The deferred-operation queue implements the merge tables of ids-protocol.md §7.2 and is worked
off by a background thread every ``settings.queue_interval`` seconds. Each operation runs in its
own thread with the dataset lock the reference server takes (SHARED for writes, EXCLUSIVE for
archive/restore/delete); an item whose lock cannot be obtained stays queued for the next tick.
``settings.restore_delay`` adds that many seconds to every restore and archive, so RESTORING is
observable. A failed restore records the item (dataset id or datafile id) in the failure set.

DATASET write and restore need the dataset's current located datafiles from ICAT; they come from
the :class:`MetadataSource` given to the constructor or set later with :meth:`set_metadata`
(the IDS API installs one reading the catalogue as the IDS reader account).

Files stored outside the IDS API (demo data, test fixtures) on a two-level server must be
followed by ``queue(item, DeferredOp.WRITE)`` or :meth:`archive_now`, as the API does after a
``put``.

Test hooks: :meth:`archive_now`, :meth:`restore_now`, :meth:`fail_restores`,
:meth:`fail_next_restores`, :meth:`wait_idle`. :meth:`close` stops the background thread.

Errors: :class:`StorageError` (a ``ValueError``) for a location that would leave the storage
directory; ``OSError`` for I/O failures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from idsfs.emulator.datainfo import DfInfo, DsInfo, zip_entry_name
from idsfs.emulator.locks import AlreadyLockedError, Lock, LockManager, LockType
from idsfs.emulator.prepared import PreparedStore
from idsfs.emulator.zipstream import ZipSource, write_zip

if TYPE_CHECKING:
    from idsfs.emulator.settings import EmulatorSettings

__all__ = [
    "DeferredOp",
    "MetadataSource",
    "RequestedState",
    "Storage",
    "StorageError",
    "StoredFile",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class StorageError(ValueError):
    """A location is unusable (absolute, empty, or escaping the storage directory).

    Raised by :meth:`Storage.main_path`, :meth:`Storage.archive_path` and the methods that
    use them (:meth:`Storage.put`, :meth:`Storage.open`,
    :meth:`Storage.delete_archive_copy`).
    """


class DeferredOp(Enum):
    """Operations that can be queued (DELETE only for storage unit DATAFILE).

    ``DeferredOp(value)`` raises ``ValueError`` for an unknown value.
    """

    WRITE = "WRITE"
    ARCHIVE = "ARCHIVE"
    RESTORE = "RESTORE"
    DELETE = "DELETE"


class RequestedState(Enum):
    """State of a queued item, as getServiceStatus reports it.

    ``RequestedState(value)`` raises ``ValueError`` for an unknown value.
    """

    WRITE_REQUESTED = "WRITE_REQUESTED"
    WRITE_THEN_ARCHIVE_REQUESTED = "WRITE_THEN_ARCHIVE_REQUESTED"
    ARCHIVE_REQUESTED = "ARCHIVE_REQUESTED"
    RESTORE_REQUESTED = "RESTORE_REQUESTED"
    DELETE_REQUESTED = "DELETE_REQUESTED"


class MetadataSource(Protocol):
    """What storage needs to know from the catalogue.

    What an implementation raises is logged by storage and fails that write or restore (a
    failed restore is recorded).
    """

    def dataset_files(self, ds: DsInfo) -> list[DfInfo]:
        """Return the datafiles of ``ds`` that have a location, as ICAT has them now.

        May raise; see :class:`MetadataSource`.
        """
        ...


@dataclass(frozen=True)
class StoredFile:
    """Result of storing a stream: location, byte count and CRC32 (unsigned).

    Constructing one never raises.
    """

    location: str
    size: int
    crc: int


_R = RequestedState
# merge tables of ids-protocol.md §7.2: (pending, new op) -> new state; None = remove entry;
# a missing key = unchanged. "restart delay" handled separately.
_DS_MERGE: dict[tuple[RequestedState | None, DeferredOp], RequestedState | None] = {
    (None, DeferredOp.WRITE): _R.WRITE_REQUESTED,
    (None, DeferredOp.ARCHIVE): _R.ARCHIVE_REQUESTED,
    (None, DeferredOp.RESTORE): _R.RESTORE_REQUESTED,
    (_R.WRITE_REQUESTED, DeferredOp.ARCHIVE): _R.WRITE_THEN_ARCHIVE_REQUESTED,
    (_R.WRITE_THEN_ARCHIVE_REQUESTED, DeferredOp.RESTORE): _R.WRITE_REQUESTED,
    (_R.ARCHIVE_REQUESTED, DeferredOp.WRITE): _R.WRITE_THEN_ARCHIVE_REQUESTED,
    (_R.ARCHIVE_REQUESTED, DeferredOp.RESTORE): _R.RESTORE_REQUESTED,
    (_R.RESTORE_REQUESTED, DeferredOp.WRITE): _R.WRITE_REQUESTED,
    (_R.RESTORE_REQUESTED, DeferredOp.ARCHIVE): _R.ARCHIVE_REQUESTED,
}
_DF_MERGE: dict[tuple[RequestedState | None, DeferredOp], RequestedState | None] = {
    (None, DeferredOp.WRITE): _R.WRITE_REQUESTED,
    (None, DeferredOp.ARCHIVE): _R.ARCHIVE_REQUESTED,
    (None, DeferredOp.RESTORE): _R.RESTORE_REQUESTED,
    (None, DeferredOp.DELETE): _R.DELETE_REQUESTED,
    (_R.WRITE_REQUESTED, DeferredOp.ARCHIVE): _R.WRITE_THEN_ARCHIVE_REQUESTED,
    (_R.WRITE_REQUESTED, DeferredOp.DELETE): None,
    (_R.WRITE_THEN_ARCHIVE_REQUESTED, DeferredOp.RESTORE): _R.WRITE_REQUESTED,
    (_R.WRITE_THEN_ARCHIVE_REQUESTED, DeferredOp.DELETE): None,
    (_R.ARCHIVE_REQUESTED, DeferredOp.RESTORE): None,
    (_R.ARCHIVE_REQUESTED, DeferredOp.DELETE): _R.DELETE_REQUESTED,
    (_R.RESTORE_REQUESTED, DeferredOp.ARCHIVE): _R.ARCHIVE_REQUESTED,
    (_R.RESTORE_REQUESTED, DeferredOp.DELETE): _R.DELETE_REQUESTED,
}


def _check_location(location: str) -> tuple[str, ...]:
    if not location or location.startswith("/") or "\x00" in location:
        raise StorageError(f"invalid location {location!r}")
    parts = tuple(p for p in location.split("/") if p)
    if not parts or any(p in (".", "..") for p in parts):
        raise StorageError(f"invalid location {location!r}")
    return parts


class Storage:
    """Main + archive storage, dataset locks, prepared records and the deferred-op queue.

    ``settings.storage`` selects ``single`` (one level), ``dataset`` or ``datafile`` (two-level
    with that storage unit). Thread-safe. Construct, use, then :meth:`close`.

    Constructing one raises ``OSError`` when the directories cannot be created and
    ``ValueError`` for an unknown ``settings.storage``.
    """

    def __init__(
        self,
        data_dir: Path,
        settings: EmulatorSettings,
        metadata: MetadataSource | None = None,
    ) -> None:
        """Create the directories under ``data_dir`` and start the queue thread (two-level).

        Raises ``OSError`` if the directories cannot be created and ``ValueError`` for an
        unknown ``settings.storage``.
        """
        mode = str(getattr(settings, "storage", "single")).lower()
        if mode not in ("single", "dataset", "datafile"):
            raise ValueError(f"unknown storage mode {mode!r}")
        self.settings = settings
        self.mode = mode
        self.data_dir = Path(data_dir)
        self.main_dir = self.data_dir / "main"
        self.archive_dir = self.data_dir / "archive"
        self.marker_dir = self.data_dir / "markers"
        for d in (self.main_dir, self.archive_dir, self.marker_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.prepared = PreparedStore(
            self.data_dir / "prepared", int(getattr(settings, "prepared_count", 10000))
        )
        self.locks = LockManager()
        self.metadata = metadata
        self.queue_interval = max(0.001, float(getattr(settings, "queue_interval", 0.05)))
        self.dataset_write_delay = float(getattr(settings, "dataset_write_delay", 0.0))
        self.datafile_op_delay = float(getattr(settings, "datafile_op_delay", 0.0))
        self.restore_delay = float(getattr(settings, "restore_delay", 0.0))

        self._mutex = threading.RLock()
        self._idle = threading.Condition(self._mutex)
        self._queue: dict[int, RequestedState] = {}
        self._items: dict[int, DsInfo | DfInfo] = {}
        self._changing: dict[int, RequestedState] = {}
        self._changing_items: dict[int, DsInfo | DfInfo] = {}
        self._write_times: dict[int, float] = {}
        self._process_time: float | None = None
        self._failures: set[int] = set()
        # items whose queued restore succeeded: their failure is forgotten when the
        # operation ends (_done), together with leaving _changing, so that getStatus
        # never sees "no failure" while the item still counts as restoring
        self._recovered: set[int] = set()
        self._fail_always = False
        self._fail_count = 0
        self._workers: set[threading.Thread] = set()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.two_level:
            self._ticker = threading.Thread(target=self._run_ticker, name="ids-queue", daemon=True)
            self._ticker.start()

    # ------------------------------------------------------------------ configuration
    @property
    def two_level(self) -> bool:
        """True for two-level storage (unit DATASET or DATAFILE). Never raises."""
        return self.mode != "single"

    @property
    def unit(self) -> str | None:
        """``"DATASET"``, ``"DATAFILE"`` or ``None`` for single-level storage. Never raises."""
        return {"dataset": "DATASET", "datafile": "DATAFILE"}.get(self.mode)

    def set_metadata(self, metadata: MetadataSource) -> None:
        """Install the catalogue view used by DATASET writes and restores. Never raises."""
        self.metadata = metadata

    def close(self) -> None:
        """Stop the queue thread and wait (a bounded time) for running operations. Never raises."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        with self._mutex:
            workers = list(self._workers)
        for w in workers:
            w.join(timeout=5)

    # ------------------------------------------------------------------ main storage
    def main_path(self, location: str) -> Path:
        """Return the main-storage path of ``location``; raises :class:`StorageError`."""
        return self.main_dir.joinpath(*_check_location(location))

    def archive_path(self, location: str) -> Path:
        """Return the DATAFILE-unit archive path of ``location``; raises StorageError."""
        return self.archive_dir.joinpath(*_check_location(location))

    def dataset_dir(self, ds: DsInfo) -> Path:
        """Return the main-storage directory of dataset ``ds``. Never raises."""
        return self.main_dir / str(ds.inv_id) / str(ds.id)

    def archive_zip(self, ds: DsInfo) -> Path:
        """Return the DATASET-unit archive zip path of ``ds``. Never raises."""
        return self.archive_dir / str(ds.inv_id) / f"{ds.id}.zip"

    def new_location(self, inv_id: int, ds_id: int) -> str:
        """Return a fresh location ``<invId>/<dsId>/<uuid>`` for a new file. Never raises."""
        return f"{inv_id}/{ds_id}/{uuid.uuid4()}"

    def put(
        self,
        inv_id: int,
        ds_id: int,
        stream: BinaryIO,
        location: str | None = None,
        corrupt: Callable[[int], int] | None = None,
    ) -> StoredFile:
        """Store ``stream`` (read to EOF) as a new main-storage file and return its facts.

        The location is ``<invId>/<dsId>/<uuid>`` unless ``location`` is given. ``corrupt``
        (fault injection) maps the computed CRC to the reported one. On any error the partial
        file is removed and the error re-raised (``OSError``, :class:`StorageError`, or what
        the stream raises).
        """
        loc = location if location is not None else self.new_location(inv_id, ds_id)
        path = self.main_path(loc)
        path.parent.mkdir(parents=True, exist_ok=True)
        crc = 0
        size = 0
        try:
            with open(path, "xb") as f:
                while True:
                    block = stream.read(_CHUNK)
                    if not block:
                        break
                    crc = zlib.crc32(block, crc)
                    size += len(block)
                    f.write(block)
        except BaseException:
            self.delete(loc)
            raise
        if corrupt is not None:
            crc = corrupt(crc) & 0xFFFFFFFF
        return StoredFile(loc, size, crc)

    def exists(self, location: str) -> bool:
        """Return whether ``location`` is present in main storage.

        Never raises for an invalid location (False). Raises ``OSError`` only when the
        storage directory cannot be examined (e.g. no permission).
        """
        try:
            return self.main_path(location).is_file()
        except StorageError:
            return False

    def open(self, location: str) -> BinaryIO:
        """Open the main-storage file at ``location`` for reading; raises OSError/StorageError."""
        return open(self.main_path(location), "rb")

    def delete(self, location: str) -> None:
        """Remove ``location`` from main storage and any directories left empty by it.

        An invalid or missing location is ignored; raises ``OSError`` when the file exists
        but cannot be removed.
        """
        try:
            path = self.main_path(location)
        except StorageError:
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._prune_dirs(path.parent, self.main_dir)

    @staticmethod
    def _prune_dirs(directory: Path, root: Path) -> None:
        while directory != root and root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def dataset_online(self, ds: DsInfo) -> bool:
        """Return whether dataset ``ds`` has its directory in main storage.

        Raises ``OSError`` only when the storage directory cannot be examined (e.g. no
        permission).
        """
        return self.dataset_dir(ds).is_dir()

    def is_online(self, item: DsInfo | DfInfo) -> bool:
        """Return whether ``item`` (dataset or datafile) is present in main storage.

        Raises ``OSError`` only when the storage directory cannot be examined (e.g. no
        permission).
        """
        if isinstance(item, DsInfo):
            return self.dataset_online(item)
        return self.exists(item.location)

    def has_archive_copy(self, item: DsInfo | DfInfo) -> bool:
        """Return whether the archive holds a copy of ``item``.

        Raises ``OSError`` only when the storage directory cannot be examined (e.g. no
        permission).
        """
        if isinstance(item, DsInfo):
            return self.archive_zip(item).is_file()
        try:
            return self.archive_path(item.location).is_file()
        except StorageError:
            return False

    def delete_archive_copy(self, item: DsInfo | DfInfo) -> None:
        """Remove the archive copy of ``item`` if there is one.

        Raises :class:`StorageError` for a datafile with an invalid location and ``OSError``
        when the copy exists but cannot be removed.
        """
        path = (
            self.archive_zip(item) if isinstance(item, DsInfo) else self.archive_path(item.location)
        )
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._prune_dirs(path.parent, self.archive_dir)

    # ------------------------------------------------------------------ queue
    def queue(self, item: DsInfo | DfInfo, op: DeferredOp) -> None:
        """Record ``op`` for ``item`` merged with what is pending (ids-protocol.md §7.2).

        Items are datasets for unit DATASET and datafiles for unit DATAFILE. Raises
        ``ValueError`` on single-level storage or for an item of the wrong kind, ``OSError``
        if a write marker cannot be created.
        """
        if not self.two_level:
            raise ValueError("no deferred operations on single-level storage")
        want = DsInfo if self.mode == "dataset" else DfInfo
        if not isinstance(item, want):
            raise ValueError(f"{type(item).__name__} queued on {self.unit} storage")
        if self.mode == "dataset" and op is DeferredOp.DELETE:
            raise ValueError("DELETE is not queued for storage unit DATASET")
        with self._mutex:
            key = item.id
            pending = self._queue.get(key)
            table = _DS_MERGE if self.mode == "dataset" else _DF_MERGE
            if self.mode == "datafile" and self._process_time is None:
                self._process_time = time.monotonic() + self.datafile_op_delay
            if op is DeferredOp.WRITE:
                self._create_marker(key)
                if self.mode == "dataset":
                    # every WRITE (re)starts the dataset write delay
                    self._write_times[key] = time.monotonic() + self.dataset_write_delay
            if (pending, op) not in table:
                return
            new = table[(pending, op)]
            if new is None:
                self._queue.pop(key, None)
                self._items.pop(key, None)
            else:
                self._queue[key] = new
                self._items[key] = item
            self._idle.notify_all()

    def maybe_offline(self) -> set[int]:
        """Ids with an operation other than a plain pending write queued or running.

        Never raises.
        """
        with self._mutex:
            union = dict(self._changing)
            union.update(self._queue)
        return {k for k, v in union.items() if v is not RequestedState.WRITE_REQUESTED}

    def restoring(self) -> set[int]:
        """Ids with a restore queued or running. Never raises."""
        with self._mutex:
            union = dict(self._changing)
            union.update(self._queue)
        return {k for k, v in union.items() if v is RequestedState.RESTORE_REQUESTED}

    def pending(self, item_id: int) -> RequestedState | None:
        """The queued (else running) state of ``item_id``, or None. Never raises."""
        with self._mutex:
            return self._queue.get(item_id, self._changing.get(item_id))

    def ops_queue(self) -> list[dict[str, str]]:
        """getServiceStatus ``opsQueue``: queued and running operations. Never raises."""
        with self._mutex:
            union: dict[int, tuple[Any, RequestedState]] = {
                k: (self._changing_items[k], v) for k, v in self._changing.items()
            }
            union.update({k: (self._items[k], v) for k, v in self._queue.items()})
        return [{"data": str(item), "request": st.value} for item, st in union.values()]

    def idle(self) -> bool:
        """True when nothing is queued or running. Never raises."""
        with self._mutex:
            return not self._queue and not self._changing

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is queued or running; return False on timeout. Never raises."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queue or self._changing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.05))
        return True

    # ------------------------------------------------------------------ failures
    def failures(self) -> list[int]:
        """Ids (datasets or datafiles by unit) whose last restore failed, ascending.

        Never raises.
        """
        with self._mutex:
            return sorted(self._failures)

    def has_failed(self, item_id: int) -> bool:
        """Return whether a restore failure is recorded for ``item_id``. Never raises."""
        with self._mutex:
            return item_id in self._failures

    def clear_failure(self, item_id: int) -> None:
        """Forget a recorded restore failure (``reset``, ``prepareData``). Never raises."""
        with self._mutex:
            self._failures.discard(item_id)

    def _record(self, item_id: int, ok: bool) -> None:
        with self._mutex:
            if ok and item_id in self._changing:
                self._recovered.add(item_id)  # forgotten by _done
            elif ok:  # run directly (restore_now), not as a queued operation
                self._failures.discard(item_id)
            else:
                self._recovered.discard(item_id)
                self._failures.add(item_id)

    def fail_restores(self, always: bool = True) -> None:
        """Test hook: make every restore fail (``always``) or stop doing so. Never raises."""
        with self._mutex:
            self._fail_always = always
            if not always:
                self._fail_count = 0

    def fail_next_restores(self, count: int = 1) -> None:
        """Test hook: make the next ``count`` restores fail. Never raises."""
        with self._mutex:
            self._fail_count += max(0, count)

    def _forced_failure(self) -> bool:
        with self._mutex:
            if self._fail_always:
                return True
            if self._fail_count > 0:
                self._fail_count -= 1
                return True
            return False

    # ------------------------------------------------------------------ markers
    def _marker(self, item_id: int) -> Path:
        return self.marker_dir / str(item_id)

    def _create_marker(self, item_id: int) -> None:
        self._marker(item_id).touch(exist_ok=True)

    def _remove_marker(self, item_id: int) -> None:
        self._marker(item_id).unlink(missing_ok=True)

    def outstanding_writes(self) -> list[int]:
        """The ids (datasets or datafiles, by storage unit) with a write marker, sorted.

        After a restart these are the writes to archive that were queued or running when the
        server stopped (the queue itself lives in memory). Raises ``OSError`` when the marker
        directory cannot be read.
        """
        return sorted(int(p.name) for p in self.marker_dir.iterdir() if p.name.isdigit())

    def drop_outstanding_write(self, item_id: int) -> None:
        """Remove the write marker of ``item_id`` (an item that no longer exists).

        Raises ``OSError`` when the marker exists but cannot be removed.
        """
        self._remove_marker(item_id)

    def write_outstanding(self, item_id: int) -> bool:
        """Return whether a write to archive of ``item_id`` is outstanding (marker present).

        Raises ``OSError`` only when the storage directory cannot be examined (e.g. no
        permission).
        """
        return self._marker(item_id).exists()

    # ------------------------------------------------------------------ background ticks
    def _run_ticker(self) -> None:
        while not self._stop.wait(self.queue_interval):
            try:
                if self.mode == "dataset":
                    self._tick_dataset()
                else:
                    self._tick_datafile()
            except Exception:
                log.exception("deferred operation queue tick failed")

    def _start(self, name: str, target: Callable[[], None]) -> None:
        def run() -> None:
            try:
                target()
            except Exception:
                log.exception("%s failed", name)
            finally:
                with self._mutex:
                    self._workers.discard(threading.current_thread())

        t = threading.Thread(target=run, name=name, daemon=True)
        with self._mutex:
            self._workers.add(t)
        t.start()

    def _done(self, item_id: int) -> None:
        with self._mutex:
            if item_id in self._recovered:
                self._recovered.discard(item_id)
                self._failures.discard(item_id)
            self._changing.pop(item_id, None)
            self._changing_items.pop(item_id, None)
            self._idle.notify_all()

    def _tick_dataset(self) -> None:
        with self._mutex:
            now = time.monotonic()
            new_ops: dict[int, RequestedState] = {}
            for key, state in list(self._queue.items()):
                if key in self._changing:
                    continue
                ds = self._items[key]
                assert isinstance(ds, DsInfo)
                if state in (_R.WRITE_REQUESTED, _R.WRITE_THEN_ARCHIVE_REQUESTED):
                    if now < self._write_times.get(key, 0.0):
                        continue
                    try:
                        lock = self.locks.lock(key, LockType.SHARED)
                    except AlreadyLockedError:
                        continue
                    self._write_times.pop(key, None)
                    self._take(key, ds, _R.WRITE_REQUESTED)
                    if state is _R.WRITE_THEN_ARCHIVE_REQUESTED:
                        new_ops[key] = _R.ARCHIVE_REQUESTED
                    self._start(f"ds-write-{key}", self._job(ds, lock, self._ds_write))
                else:
                    try:
                        lock = self.locks.lock(key, LockType.EXCLUSIVE)
                    except AlreadyLockedError:
                        continue
                    self._take(key, ds, state)
                    work = self._ds_archive if state is _R.ARCHIVE_REQUESTED else self._ds_restore
                    self._start(f"ds-{state.value.lower()}-{key}", self._job(ds, lock, work))
            for key, state in new_ops.items():
                self._queue[key] = state
                self._items[key] = self._changing_items[key]

    def _take(self, key: int, item: DsInfo | DfInfo, state: RequestedState) -> None:
        del self._queue[key]
        del self._items[key]
        self._changing[key] = state
        self._changing_items[key] = item

    def _job(self, ds: DsInfo, lock: Lock, work: Callable[[DsInfo], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work(ds)
            finally:
                self._done(ds.id)
                lock.release()

        return run

    def _tick_datafile(self) -> None:
        with self._mutex:
            if (
                self._process_time is None
                or time.monotonic() <= self._process_time
                or not self._queue
            ):
                return
            self._process_time = None
            batches: dict[RequestedState, list[DfInfo]] = {s: [] for s in RequestedState}
            locks: dict[RequestedState, dict[int, Lock]] = {s: {} for s in RequestedState}
            new_ops: dict[int, RequestedState] = {}
            for key, state in list(self._queue.items()):
                if key in self._changing:
                    continue
                df = self._items[key]
                assert isinstance(df, DfInfo)
                kind = _R.WRITE_REQUESTED if state is _R.WRITE_THEN_ARCHIVE_REQUESTED else state
                held = locks[kind]
                if df.ds_id not in held:
                    ltype = LockType.SHARED if kind is _R.WRITE_REQUESTED else LockType.EXCLUSIVE
                    try:
                        held[df.ds_id] = self.locks.lock(df.ds_id, ltype)
                    except AlreadyLockedError:
                        continue
                self._take(key, df, kind)
                batches[kind].append(df)
                if state is _R.WRITE_THEN_ARCHIVE_REQUESTED:
                    new_ops[key] = _R.ARCHIVE_REQUESTED
            for key, state in new_ops.items():
                self._queue[key] = state
                self._items[key] = self._changing_items[key]
            if self._queue:
                self._process_time = 0.0
            works: dict[RequestedState, Callable[[DfInfo], None]] = {
                _R.WRITE_REQUESTED: self._df_write,
                _R.ARCHIVE_REQUESTED: self._df_archive,
                _R.RESTORE_REQUESTED: self._df_restore,
                _R.DELETE_REQUESTED: self._df_delete,
            }
            for kind, work in works.items():
                if batches[kind]:
                    self._start(
                        f"df-{kind.value.lower()}",
                        self._df_job(batches[kind], list(locks[kind].values()), work),
                    )
                else:
                    for lock in locks[kind].values():
                        lock.release()

    def _df_job(
        self, dfs: list[DfInfo], locks: list[Lock], work: Callable[[DfInfo], None]
    ) -> Callable[[], None]:
        def run() -> None:
            try:
                for df in dfs:
                    try:
                        work(df)
                    except Exception:
                        log.exception("operation on datafile %s failed", df.id)
                    finally:
                        self._done(df.id)
            finally:
                for lock in locks:
                    lock.release()

        return run

    def _delay(self) -> None:
        if self.restore_delay > 0:
            self._stop.wait(self.restore_delay)

    # ------------------------------------------------------------------ DATASET workers
    def _dataset_files(self, ds: DsInfo) -> list[DfInfo]:
        if self.metadata is None:
            raise RuntimeError("storage has no metadata source")
        return sorted(self.metadata.dataset_files(ds), key=lambda d: d.id)

    def _ds_write(self, ds: DsInfo) -> None:
        try:
            if not self.dataset_online(ds):
                self.delete_archive_copy(ds)
            else:
                target = self.archive_zip(ds)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                entries = [
                    ZipSource(zip_entry_name(ds, df), self.main_path(df.location), df.mtime)
                    for df in self._dataset_files(ds)
                ]
                with open(tmp, "wb") as f:
                    write_zip(f, entries, compress=True)
                os.replace(tmp, target)
            self._remove_marker(ds.id)
        except Exception:
            log.exception("write of dataset %s failed", ds)

    def _ds_archive(self, ds: DsInfo) -> None:
        self._delay()
        if self.write_outstanding(ds.id):
            log.warning("archive of %s refused: a write to archive is outstanding", ds)
            return
        shutil.rmtree(self.dataset_dir(ds), ignore_errors=True)
        self._prune_dirs(self.dataset_dir(ds).parent, self.main_dir)

    def _ds_restore(self, ds: DsInfo) -> None:
        if self.dataset_online(ds):
            return
        self._delay()
        try:
            if self._forced_failure():
                raise OSError("restore failure forced by a test hook")
            files = self._dataset_files(ds)
            expected = {zip_entry_name(ds, df): df for df in files}
            archive = self.archive_zip(ds)
            if not archive.is_file():
                if files:
                    raise OSError(f"no archive copy of {ds}")
            else:
                seen: set[str] = set()
                with zipfile.ZipFile(archive) as z:
                    for info in z.infolist():
                        df = expected.get(info.filename)
                        if df is None or info.filename in seen:
                            raise OSError(f"spurious entry {info.filename!r} in archive of {ds}")
                        seen.add(info.filename)
                        target = self.main_path(df.location)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        tmp = target.with_name(target.name + ".restoring")
                        with z.open(info) as src, open(tmp, "wb") as dst:
                            shutil.copyfileobj(src, dst, _CHUNK)
                        os.replace(tmp, target)
                missing = set(expected) - seen
                if missing:
                    raise OSError(f"archive of {ds} lacks {len(missing)} entries")
            self._record(ds.id, True)
        except Exception as exc:
            log.warning("restore of %s failed: %s", ds, exc, exc_info=True)
            shutil.rmtree(self.dataset_dir(ds), ignore_errors=True)
            self._prune_dirs(self.dataset_dir(ds).parent, self.main_dir)
            self._record(ds.id, False)

    # ------------------------------------------------------------------ DATAFILE workers
    def _df_write(self, df: DfInfo) -> None:
        src = self.main_path(df.location)
        target = self.archive_path(df.location)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
        self._remove_marker(df.id)

    def _df_archive(self, df: DfInfo) -> None:
        self._delay()
        if self.write_outstanding(df.id):
            log.warning("archive of %s refused: a write to archive is outstanding", df)
            return
        self.delete(df.location)

    def _df_restore(self, df: DfInfo) -> None:
        if self.exists(df.location):
            return
        self._delay()
        target = self.main_path(df.location)
        try:
            if self._forced_failure():
                raise OSError("restore failure forced by a test hook")
            src = self.archive_path(df.location)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".restoring")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
            self._record(df.id, True)
        except Exception as exc:
            log.warning("restore of datafile %s failed: %s", df.id, exc, exc_info=True)
            self.delete(df.location)
            self._record(df.id, False)

    def _df_delete(self, df: DfInfo) -> None:
        self.delete_archive_copy(df)
        self._remove_marker(df.id)

    # ------------------------------------------------------------------ test hooks
    def _hook_items(self, items: Iterable[DsInfo | DfInfo]) -> list[DsInfo | DfInfo]:
        out = list(items)
        want = DsInfo if self.mode == "dataset" else DfInfo
        for item in out:
            if not isinstance(item, want):
                raise ValueError(f"{type(item).__name__} given for {self.unit} storage")
        return out

    def archive_now(self, items: Iterable[DsInfo | DfInfo]) -> None:
        """Test hook: write each item to archive and remove it from main storage, now.

        Pending queue entries for the items are dropped. Raises ``ValueError`` on single-level
        storage or for items of the wrong kind, :class:`AlreadyLockedError` when an item's
        dataset is locked, ``OSError`` on I/O errors.
        """
        if not self.two_level:
            raise ValueError("archive_now needs two-level storage")
        for item in self._hook_items(items):
            ds_id = item.id if isinstance(item, DsInfo) else item.ds_id
            with self.locks.lock(ds_id, LockType.EXCLUSIVE):
                with self._mutex:
                    self._queue.pop(item.id, None)
                    self._items.pop(item.id, None)
                    self._write_times.pop(item.id, None)
                    self._idle.notify_all()
                if isinstance(item, DsInfo):
                    self._ds_write(item)
                    if self.write_outstanding(item.id):
                        raise OSError(f"write of {item} to archive failed")
                    self._ds_archive_now(item)
                else:
                    if self.exists(item.location):
                        self._df_write(item)
                    self._remove_marker(item.id)
                    self.delete(item.location)

    def _ds_archive_now(self, ds: DsInfo) -> None:
        shutil.rmtree(self.dataset_dir(ds), ignore_errors=True)
        self._prune_dirs(self.dataset_dir(ds).parent, self.main_dir)

    def restore_now(self, items: Iterable[DsInfo | DfInfo]) -> None:
        """Test hook: restore each item into main storage now (failures are recorded as by
        the queue). Raises ``ValueError``/:class:`AlreadyLockedError` like :meth:`archive_now`.
        """
        if not self.two_level:
            raise ValueError("restore_now needs two-level storage")
        for item in self._hook_items(items):
            ds_id = item.id if isinstance(item, DsInfo) else item.ds_id
            with self.locks.lock(ds_id, LockType.EXCLUSIVE):
                if isinstance(item, DsInfo):
                    self._ds_restore(item)
                else:
                    self._df_restore(item)

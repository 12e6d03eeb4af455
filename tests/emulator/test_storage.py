"""Unit tests of the IDS emulator's storage: main/archive, queue merge rules, workers, hooks,
locks and prepared-id records (no HTTP; the catalogue is replaced by a dict of datafiles)."""

from __future__ import annotations

import io
import threading
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest

from idsfs.emulator.datainfo import DfInfo, DsInfo, zip_entry_name
from idsfs.emulator.locks import AlreadyLockedError, LockManager, LockType
from idsfs.emulator.prepared import Prepared, PreparedStore
from idsfs.emulator.settings import EmulatorSettings
from idsfs.emulator.storage import DeferredOp, RequestedState, Storage, StorageError

CONTENT = b"df1 test content very compressible very compressible"


class Meta:
    """Catalogue stand-in: the located datafiles of each dataset."""

    def __init__(self) -> None:
        self.files: dict[int, list[DfInfo]] = {}

    def dataset_files(self, ds: DsInfo) -> list[DfInfo]:
        return list(self.files.get(ds.id, []))


def _ds(ds_id: int, inv_id: int = 1) -> DsInfo:
    return DsInfo(ds_id, inv_id, f"ds{ds_id}", "I", "N/A", "F")


def _store(storage: Storage, meta: Meta, ds: DsInfo, df_id: int, data: bytes) -> DfInfo:
    stored = storage.put(ds.inv_id, ds.id, io.BytesIO(data))
    df = DfInfo(df_id, f"a/df{df_id}", stored.location, "simple/root", "simple/root", ds.id, 0.0)
    meta.files.setdefault(ds.id, []).append(df)
    return df


def _make(tmp_path: Path, storage: str, **kw: float) -> tuple[Storage, Meta]:
    meta = Meta()
    settings = EmulatorSettings(storage=storage, queue_interval=0.01, **kw)
    s = Storage(tmp_path, settings, meta)
    return s, meta


@pytest.fixture
def single(tmp_path: Path):
    s, meta = _make(tmp_path, "single")
    yield s, meta
    s.close()


@pytest.fixture
def dataset(tmp_path: Path):
    s, meta = _make(tmp_path, "dataset")
    yield s, meta
    s.close()


@pytest.fixture
def datafile(tmp_path: Path):
    s, meta = _make(tmp_path, "datafile")
    yield s, meta
    s.close()


# ---------------------------------------------------------------- main storage


def test_put_computes_crc_size_and_location(single) -> None:
    s, _ = single
    stored = s.put(7, 42, io.BytesIO(CONTENT))
    inv, ds, name = stored.location.split("/")
    assert (inv, ds) == ("7", "42") and len(name) == 36
    assert stored.size == 52 and stored.crc == zlib.crc32(CONTENT)
    with s.open(stored.location) as f:
        assert f.read() == CONTENT
    assert s.exists(stored.location)
    empty = s.put(7, 42, io.BytesIO(b""))
    assert (empty.size, empty.crc) == (0, 0)


def test_put_corrupt_hook_and_failure_cleanup(single) -> None:
    s, _ = single
    stored = s.put(1, 2, io.BytesIO(b"x"), corrupt=lambda c: c ^ 1)
    assert stored.crc == zlib.crc32(b"x") ^ 1

    class Boom(io.RawIOBase):
        def __init__(self) -> None:
            self.n = 0

        def read(self, n: int = -1) -> bytes:
            self.n += 1
            if self.n > 2:
                raise OSError("client went away")
            return b"abc"

    with pytest.raises(OSError):
        s.put(1, 3, Boom())  # type: ignore[arg-type]
    assert not (s.main_dir / "1" / "3").exists()  # partial file and empty dirs removed


def test_delete_prunes_empty_directories(single) -> None:
    s, _ = single
    a = s.put(1, 2, io.BytesIO(b"a"))
    b = s.put(1, 2, io.BytesIO(b"b"))
    s.delete(a.location)
    assert (s.main_dir / "1" / "2").is_dir()
    s.delete(b.location)
    assert not (s.main_dir / "1").exists()
    s.delete(b.location)  # idempotent


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "1/../../x", "a/./b"])
def test_bad_locations_rejected(single, bad: str) -> None:
    s, _ = single
    with pytest.raises(StorageError):
        s.main_path(bad)
    assert not s.exists(bad)


def test_given_location_with_apostrophe(single) -> None:
    s, _ = single
    stored = s.put(1, 2, io.BytesIO(CONTENT), location="1/2/Person's file")
    assert stored.location == "1/2/Person's file"
    assert (s.main_dir / "1" / "2" / "Person's file").read_bytes() == CONTENT


def test_single_level_has_no_queue(single) -> None:
    s, _ = single
    assert not s.two_level and s.unit is None
    with pytest.raises(ValueError):
        s.queue(_ds(1), DeferredOp.ARCHIVE)
    assert s.ops_queue() == [] and s.idle()


# ---------------------------------------------------------------- merge tables

DS_CASES = [
    (None, "WRITE", "WRITE_REQUESTED"),
    (None, "ARCHIVE", "ARCHIVE_REQUESTED"),
    (None, "RESTORE", "RESTORE_REQUESTED"),
    ("WRITE", "WRITE", "WRITE_REQUESTED"),
    ("WRITE", "ARCHIVE", "WRITE_THEN_ARCHIVE_REQUESTED"),
    ("WRITE", "RESTORE", "WRITE_REQUESTED"),
    ("WRITE_THEN_ARCHIVE", "WRITE", "WRITE_THEN_ARCHIVE_REQUESTED"),
    ("WRITE_THEN_ARCHIVE", "ARCHIVE", "WRITE_THEN_ARCHIVE_REQUESTED"),
    ("WRITE_THEN_ARCHIVE", "RESTORE", "WRITE_REQUESTED"),
    ("ARCHIVE", "WRITE", "WRITE_THEN_ARCHIVE_REQUESTED"),
    ("ARCHIVE", "ARCHIVE", "ARCHIVE_REQUESTED"),
    ("ARCHIVE", "RESTORE", "RESTORE_REQUESTED"),
    ("RESTORE", "WRITE", "WRITE_REQUESTED"),
    ("RESTORE", "ARCHIVE", "ARCHIVE_REQUESTED"),
    ("RESTORE", "RESTORE", "RESTORE_REQUESTED"),
]

_SETUP = {
    None: [],
    "WRITE": ["WRITE"],
    "WRITE_THEN_ARCHIVE": ["WRITE", "ARCHIVE"],
    "ARCHIVE": ["ARCHIVE"],
    "RESTORE": ["RESTORE"],
    "DELETE": ["DELETE"],
}


@pytest.mark.parametrize(("pending", "op", "result"), DS_CASES)
def test_dataset_merge_table(tmp_path: Path, pending: str | None, op: str, result: str) -> None:
    # a huge write delay and queue interval keep the ticker from executing anything
    meta = Meta()
    s = Storage(
        tmp_path,
        EmulatorSettings(storage="dataset", queue_interval=3600, dataset_write_delay=3600),
        meta,
    )
    try:
        ds = _ds(5)
        for o in _SETUP[pending]:
            s.queue(ds, DeferredOp[o])
        s.queue(ds, DeferredOp[op])
        assert s.pending(5) is RequestedState[result]
        assert s.ops_queue() == [{"data": "1/5 (F/I/N/A/ds5)", "request": result}]
    finally:
        s.close()


DF_CASES = [
    (None, "DELETE", "DELETE_REQUESTED"),
    ("WRITE", "WRITE", "WRITE_REQUESTED"),
    ("WRITE", "ARCHIVE", "WRITE_THEN_ARCHIVE_REQUESTED"),
    ("WRITE", "RESTORE", "WRITE_REQUESTED"),
    ("WRITE", "DELETE", None),
    ("WRITE_THEN_ARCHIVE", "WRITE", "WRITE_THEN_ARCHIVE_REQUESTED"),
    ("WRITE_THEN_ARCHIVE", "RESTORE", "WRITE_REQUESTED"),
    ("WRITE_THEN_ARCHIVE", "DELETE", None),
    ("ARCHIVE", "WRITE", "ARCHIVE_REQUESTED"),
    ("ARCHIVE", "RESTORE", None),
    ("ARCHIVE", "DELETE", "DELETE_REQUESTED"),
    ("RESTORE", "WRITE", "RESTORE_REQUESTED"),
    ("RESTORE", "ARCHIVE", "ARCHIVE_REQUESTED"),
    ("RESTORE", "DELETE", "DELETE_REQUESTED"),
    ("DELETE", "WRITE", "DELETE_REQUESTED"),
    ("DELETE", "ARCHIVE", "DELETE_REQUESTED"),
    ("DELETE", "RESTORE", "DELETE_REQUESTED"),
]


@pytest.mark.parametrize(("pending", "op", "result"), DF_CASES)
def test_datafile_merge_table(
    tmp_path: Path, pending: str | None, op: str, result: str | None
) -> None:
    s = Storage(
        tmp_path, EmulatorSettings(storage="datafile", queue_interval=3600, datafile_op_delay=3600)
    )
    try:
        df = DfInfo(9, "f", "1/2/x", "u", "u", 2, 0.0)
        for o in _SETUP[pending]:
            s.queue(df, DeferredOp[o])
        s.queue(df, DeferredOp[op])
        state = s.pending(9)
        assert (state.value if state else None) == result
        if result:
            assert s.ops_queue() == [{"data": "1/2/x", "request": result}]
    finally:
        s.close()


def test_queue_rejects_wrong_item_kind(dataset, datafile) -> None:
    s, _ = dataset
    with pytest.raises(ValueError):
        s.queue(DfInfo(1, "f", "1/2/x", "u", "u", 2, 0.0), DeferredOp.ARCHIVE)
    with pytest.raises(ValueError):
        s.queue(_ds(1), DeferredOp.DELETE)
    s2, _ = datafile
    with pytest.raises(ValueError):
        s2.queue(_ds(1), DeferredOp.ARCHIVE)


# ---------------------------------------------------------------- DATASET workers


def test_dataset_write_archive_restore_cycle(dataset) -> None:
    s, meta = dataset
    ds = _ds(3)
    df1 = _store(s, meta, ds, 11, CONTENT)
    df2 = _store(s, meta, ds, 12, b"second file")
    s.queue(ds, DeferredOp.WRITE)
    assert s.write_outstanding(3)
    assert s.wait_idle(5)
    assert not s.write_outstanding(3)
    with zipfile.ZipFile(s.archive_zip(ds)) as z:
        assert sorted(z.namelist()) == sorted(zip_entry_name(ds, d) for d in (df1, df2))
        assert z.read(zip_entry_name(ds, df1)) == CONTENT
    s.queue(ds, DeferredOp.ARCHIVE)
    assert s.maybe_offline() == {3}
    assert s.wait_idle(5)
    assert not s.dataset_online(ds) and not (s.main_dir / "1").exists()
    s.queue(ds, DeferredOp.RESTORE)
    assert s.restoring() == {3}
    assert s.wait_idle(5)
    assert s.dataset_online(ds)
    with s.open(df1.location) as f:
        assert f.read() == CONTENT
    assert s.failures() == []


def test_archive_refused_while_write_outstanding(tmp_path: Path) -> None:
    s, meta = _make(tmp_path, "dataset", dataset_write_delay=3600)
    try:
        ds = _ds(3)
        _store(s, meta, ds, 11, CONTENT)
        s.queue(ds, DeferredOp.WRITE)
        s._queue.clear()  # drop the write but keep its marker: archive must be refused
        s._items.clear()
        s.queue(ds, DeferredOp.ARCHIVE)
        assert s.wait_idle(5)
        assert s.dataset_online(ds)
    finally:
        s.close()


def test_write_then_archive(dataset) -> None:
    s, meta = dataset
    ds = _ds(4)
    _store(s, meta, ds, 21, CONTENT)
    s.queue(ds, DeferredOp.WRITE)
    s.queue(ds, DeferredOp.ARCHIVE)
    assert s.wait_idle(5)
    assert s.archive_zip(ds).is_file() and not s.dataset_online(ds)


def test_write_of_empty_dataset_deletes_archive_copy(dataset) -> None:
    s, meta = dataset
    ds = _ds(4)
    df = _store(s, meta, ds, 21, CONTENT)
    s.archive_now([ds])
    s.restore_now([ds])
    assert s.archive_zip(ds).is_file()
    s.delete(df.location)
    meta.files[4] = []
    s.queue(ds, DeferredOp.WRITE)
    assert s.wait_idle(5)
    assert not s.archive_zip(ds).exists()


@pytest.mark.parametrize("defect", ["ok", "missing", "spurious", "duplicate", "no-archive"])
def test_dataset_restore_checks_archive_entries(dataset, defect: str) -> None:
    s, meta = dataset
    ds = _ds(6)
    df1 = _store(s, meta, ds, 31, CONTENT)
    df2 = _store(s, meta, ds, 32, b"other")
    s.archive_now([ds])
    path = s.archive_zip(ds)
    if defect != "ok":
        names = [zip_entry_name(ds, df1), zip_entry_name(ds, df2)]
        if defect == "missing":
            names = names[:1]
        elif defect == "spurious":
            names.append(zip_entry_name(ds, df1) + "x")
        elif defect == "duplicate":
            names.append(names[0])
        path.unlink()
        if defect != "no-archive":
            with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as z:
                warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
                for n in names:
                    z.writestr(n, b"data")
    s.queue(ds, DeferredOp.RESTORE)
    assert s.wait_idle(5)
    if defect == "ok":
        assert s.dataset_online(ds) and s.failures() == []
    else:
        assert not s.dataset_online(ds)
        assert s.failures() == [6] and s.has_failed(6)
        s.clear_failure(6)
        assert s.failures() == []


def test_forced_restore_failures(dataset) -> None:
    s, meta = dataset
    ds = _ds(7)
    _store(s, meta, ds, 41, CONTENT)
    s.archive_now([ds])
    s.fail_next_restores(1)
    s.queue(ds, DeferredOp.RESTORE)
    assert s.wait_idle(5)
    assert s.failures() == [7] and not s.dataset_online(ds)
    s.queue(ds, DeferredOp.RESTORE)  # hook consumed: this one works and clears the flag
    assert s.wait_idle(5)
    assert s.failures() == [] and s.dataset_online(ds)
    s.archive_now([ds])
    s.fail_restores(True)
    for _ in range(2):
        s.queue(ds, DeferredOp.RESTORE)
        assert s.wait_idle(5)
        assert s.failures() == [7]
    s.fail_restores(False)
    s.restore_now([ds])
    assert s.dataset_online(ds) and s.failures() == []


def test_a_restore_that_succeeds_clears_its_failure_as_it_stops_restoring(dataset) -> None:
    # getStatus reads the failures, then what is restoring: a restore that worked
    # must leave both at once, or a poll in between saw RESTORING instead of
    # "Restore failed" or ONLINE (a flaky I6)
    import threading

    s, meta = dataset
    ds = _ds(9)
    _store(s, meta, ds, 61, CONTENT)
    s.archive_now([ds])
    s.fail_next_restores(1)
    s.queue(ds, DeferredOp.RESTORE)
    assert s.wait_idle(5) and s.failures() == [9]
    reached, finish = threading.Event(), threading.Event()
    done = s._done

    def held_done(item_id: int) -> None:  # the restore worked; it has not ended yet
        reached.set()
        finish.wait(5)
        done(item_id)

    s._done = held_done
    try:
        s.queue(ds, DeferredOp.RESTORE)
        assert reached.wait(5) and s.dataset_online(ds)
        assert 9 in s.restoring() and s.failures() == [9]
    finally:
        finish.set()
    assert s.wait_idle(5)
    assert s.failures() == [] and 9 not in s.restoring()


def test_restore_delay_makes_restoring_visible(tmp_path: Path) -> None:
    s, meta = _make(tmp_path, "dataset", restore_delay=0.3)
    try:
        ds = _ds(8)
        _store(s, meta, ds, 51, CONTENT)
        s.archive_now([ds])
        s.queue(ds, DeferredOp.RESTORE)
        deadline = time.monotonic() + 5
        while not s.locks.is_locked(8):  # picked up: running, EXCLUSIVE lock held
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert s.restoring() == {8}
        assert s.ops_queue() == [{"data": str(ds), "request": "RESTORE_REQUESTED"}]
        assert [(i.id, i.type) for i in s.locks.info()] == [(8, LockType.EXCLUSIVE)]
        assert not s.dataset_online(ds)
        assert s.wait_idle(5)
        assert s.dataset_online(ds) and s.locks.info() == []
    finally:
        s.close()


def test_locked_item_stays_queued(dataset) -> None:
    s, meta = dataset
    ds = _ds(9)
    _store(s, meta, ds, 61, CONTENT)
    s.archive_now([ds])
    lock = s.locks.lock(9, LockType.SHARED)  # e.g. a download in progress
    s.queue(ds, DeferredOp.RESTORE)
    time.sleep(0.1)
    assert s.pending(9) is RequestedState.RESTORE_REQUESTED
    assert not s.wait_idle(0.05)
    lock.release()
    assert s.wait_idle(5)
    assert s.dataset_online(ds)


def test_archive_now_refuses_locked_dataset(dataset) -> None:
    s, meta = dataset
    ds = _ds(10)
    _store(s, meta, ds, 71, CONTENT)
    with s.locks.lock(10, LockType.SHARED), pytest.raises(AlreadyLockedError):
        s.archive_now([ds])
    assert s.dataset_online(ds)


# ---------------------------------------------------------------- DATAFILE workers


def test_datafile_cycle_and_delete(datafile) -> None:
    s, meta = datafile
    ds = _ds(2)
    df = _store(s, meta, ds, 81, CONTENT)
    sib = _store(s, meta, ds, 82, b"sibling")
    s.queue(df, DeferredOp.WRITE)
    s.queue(sib, DeferredOp.WRITE)
    assert s.wait_idle(5)
    assert s.archive_path(df.location).read_bytes() == CONTENT
    s.queue(df, DeferredOp.ARCHIVE)
    s.queue(sib, DeferredOp.ARCHIVE)
    assert s.wait_idle(5)
    assert not s.exists(df.location) and not s.exists(sib.location)
    s.queue(df, DeferredOp.RESTORE)
    assert s.wait_idle(5)
    assert s.exists(df.location) and not s.exists(sib.location)  # siblings stay archived
    s.queue(sib, DeferredOp.DELETE)
    assert s.wait_idle(5)
    assert not s.archive_path(sib.location).exists()


def test_datafile_restore_failure_and_hooks(datafile) -> None:
    s, meta = datafile
    ds = _ds(2)
    df = _store(s, meta, ds, 91, CONTENT)
    s.archive_now([df])
    assert not s.exists(df.location) and s.has_archive_copy(df)
    s.archive_path(df.location).unlink()
    s.queue(df, DeferredOp.RESTORE)
    assert s.wait_idle(5)
    assert s.failures() == [91]


def test_datafile_write_then_archive_and_delay(tmp_path: Path) -> None:
    s, meta = _make(tmp_path, "datafile", datafile_op_delay=0.2)
    try:
        ds = _ds(2)
        df = _store(s, meta, ds, 95, CONTENT)
        t0 = time.monotonic()
        s.queue(df, DeferredOp.WRITE)
        s.queue(df, DeferredOp.ARCHIVE)
        assert s.wait_idle(5)
        assert time.monotonic() - t0 >= 0.2
        assert not s.exists(df.location) and s.has_archive_copy(df)
    finally:
        s.close()


# ---------------------------------------------------------------- persistence


def test_restart_keeps_files_and_markers(tmp_path: Path) -> None:
    s, meta = _make(tmp_path, "dataset", dataset_write_delay=3600)
    ds = _ds(3)
    df = _store(s, meta, ds, 11, CONTENT)
    s.queue(ds, DeferredOp.WRITE)
    s.close()
    s2, _ = _make(tmp_path, "dataset")
    try:
        assert s2.exists(df.location) and s2.write_outstanding(3)
        assert s2.idle()  # the queue itself is not persisted
    finally:
        s2.close()


# ---------------------------------------------------------------- locks


def test_lock_rules() -> None:
    m = LockManager()
    a = m.lock(1, LockType.SHARED)
    b = m.lock(1, LockType.SHARED)
    with pytest.raises(AlreadyLockedError):
        m.lock(1, LockType.EXCLUSIVE)
    assert [(i.id, i.type, i.count) for i in m.info()] == [(1, LockType.SHARED, 2)]
    a.release()
    a.release()  # idempotent: does not release b's hold
    assert m.info()[0].count == 1
    b.release()
    assert m.info() == []
    with m.lock(2, LockType.EXCLUSIVE):
        with pytest.raises(AlreadyLockedError):
            m.lock(2, LockType.SHARED)
        with pytest.raises(AlreadyLockedError):
            m.lock_all([1, 2], LockType.SHARED)
        assert not m.is_locked(1)  # all or nothing
    with m.lock_all([3, 4, 3], LockType.EXCLUSIVE) as ls:
        assert len(ls.locks) == 2
    assert m.info() == []


def test_lock_manager_threads() -> None:
    m = LockManager()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(500):
                m.lock(1, LockType.SHARED).release()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and m.info() == []


# ---------------------------------------------------------------- prepared records


def _prepared(n: int) -> Prepared:
    dfs = tuple(DfInfo(i, f"f{i}", f"1/2/{i}", "u", "u", 2, 1.5) for i in range(1, n + 1))
    return Prepared(True, False, dfs, (_ds(2),), frozenset({3}))


def test_prepared_roundtrip_and_prune(tmp_path: Path) -> None:
    store = PreparedStore(tmp_path / "prepared", 3)
    ids = [store.create(_prepared(i)) for i in range(1, 6)]
    assert len(store) == 3
    assert store.get(ids[0]) is None and store.get(ids[1]) is None
    got = store.get(ids[4])
    assert got == _prepared(5)
    assert all(len(i) == 36 and i == i.lower() for i in ids)
    # restart: same records, the oldest is still pruned first
    store2 = PreparedStore(tmp_path / "prepared", 3)
    assert store2.get(ids[2]) == _prepared(3)
    new = store2.create(_prepared(1))
    assert store2.get(ids[2]) is None and store2.get(new) == _prepared(1)
    assert store2.get("../../etc/passwd") is None
    # a smaller limit after restart prunes at once
    store3 = PreparedStore(tmp_path / "prepared", 1)
    assert len(store3) == 1 and store3.get(new) == _prepared(1)

"""Write path, handler level: every emulator fault during an upload.

For each fault: what ``close`` answers, that the spool survives as a pending
upload (record + bytes), that the retry lands exactly one datafile with the
right bytes (compared with the emulator's stored file and the ICAT checksum),
and that nothing half-registered remains.
"""

from __future__ import annotations

import errno
import json
import os

import trio
from writekit import DEMO_VISIT, DS, WriteTree, crc_hex, datafiles_named, dataset_id, stored_bytes

from idsfs.ids import IDSClient

NAME = "result.dat"


def records(t: WriteTree) -> list[dict]:
    return [json.loads(p.read_text()) for p in t.spool.glob("*.json")]


def assert_one_good_datafile(emu, ds_id: int, data: bytes, name: str = NAME) -> int:
    rows = datafiles_named(emu, ds_id, name)
    assert len(rows) == 1, rows
    did, size, checksum, location = rows[0]
    assert size == len(data) and checksum == crc_hex(data) and location
    assert stored_bytes(emu, did) == data
    return did


async def fail_then_retry(t: WriteTree, emu, data: bytes, expect_state: str = "pending") -> int:
    """Write NAME; close must fail with EIO leaving a pending spool; then let it retry."""
    ds_id = await dataset_id(t)
    t.uploader.retry_delay = 0.3  # long enough to look at the pending state
    fh, _ = await t.create(f"{DS}/{NAME}")
    await t.write_all(fh, data)
    code = await t.close(fh)
    assert code == errno.EIO
    recs = records(t)
    assert len(recs) == 1 and recs[0]["state"] == expect_state, recs
    (spool_file,) = t.spool.glob("*.data")
    assert spool_file.read_bytes() == data
    state = await t.xattr(f"{DS}/{NAME}", "user.idsfs.upload")
    assert state.startswith(expect_state + ":"), state
    assert NAME in (await t.xattr(DS, "user.idsfs.upload"))
    assert f"{DS}/{NAME}" in " ".join(t.uploader.pending_lines())
    assert (await t.walk(f"{DS}/{NAME}")).st_size == len(data)
    await t.settle()
    assert not list(t.spool.glob("*.data")) and not records(t)
    assert await t.read_file(f"{DS}/{NAME}") == data
    return assert_one_good_datafile(emu, ds_id, data)


def test_server_error_500(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)
    data = os.urandom(200_000)

    async def body(t: WriteTree) -> None:
        fresh_emu.faults.error(500, "ids/put", count=1)
        await fail_then_retry(t, fresh_emu, data)

    t.run(body)


def test_corrupted_checksum_removes_the_wrong_datafile(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)
    data = os.urandom(100_000)

    async def body(t: WriteTree) -> None:
        fresh_emu.faults.corrupt_checksum("ids/put", count=1)
        # while pending, the wrong datafile the server registered is gone already
        ds_id = await dataset_id(t)
        t.uploader.retry_delay = 0.5
        fh, _ = await t.create(f"{DS}/{NAME}")
        await t.write_all(fh, data)
        assert await t.close(fh) == errno.EIO
        assert datafiles_named(fresh_emu, ds_id, NAME) == []
        await t.settle()
        assert_one_good_datafile(fresh_emu, ds_id, data)
        assert fresh_emu.counters.get("ids/put") == 2
        assert fresh_emu.counters.get("ids/delete") == 1

    t.run(body)


def test_dropped_answer_is_checked_in_icat_not_uploaded_twice(fresh_emu, wtree) -> None:
    """The connection drops after the body was sent: the datafile is there, close says so."""
    t = wtree(fresh_emu)
    data = os.urandom(150_000)

    async def body(t: WriteTree) -> None:
        ds_id = await dataset_id(t)
        fresh_emu.faults.drop(after_bytes=5, endpoint="ids/put", count=1)
        fresh_emu.counters.reset()
        assert await t.write_file(f"{DS}/{NAME}", data) == 0
        assert fresh_emu.counters.get("ids/put") == 1
        assert_one_good_datafile(fresh_emu, ds_id, data)
        assert not records(t)

    t.run(body)


def test_dropped_answer_and_icat_down_resolved_by_the_retry(fresh_emu, wtree) -> None:
    """Dropped answer and ICAT unable to say whether it landed: close fails, the retry
    finds the datafile in ICAT and does not put again."""
    t = wtree(fresh_emu)
    data = os.urandom(120_000)

    async def body(t: WriteTree) -> None:
        ds_id = await dataset_id(t)
        t.uploader.retry_delay = 0.3
        fh, _ = await t.create(f"{DS}/{NAME}")
        await t.write_all(fh, data)
        fresh_emu.faults.drop(after_bytes=0, endpoint="ids/put", count=1)
        fresh_emu.faults.error(500, "icat/entityManager", count=2)
        fresh_emu.counters.reset()
        assert await t.close(fh) == errno.EIO
        (rec,) = records(t)
        assert rec["state"] == "pending" and rec["maybe_landed"] is True
        await t.settle()
        assert fresh_emu.counters.get("ids/put") == 1
        assert_one_good_datafile(fresh_emu, ds_id, data)

    t.run(body)


def test_session_expired_once_is_renewed_at_close(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)
    data = os.urandom(50_000)

    async def body(t: WriteTree) -> None:
        ds_id = await dataset_id(t)
        fh, _ = await t.create(f"{DS}/{NAME}")
        await t.write_all(fh, data)
        fresh_emu.faults.expire_session("ids/put", count=1)
        assert await t.close(fh) == 0  # logged in again and repeated at once
        assert t.renewals >= 1
        assert_one_good_datafile(fresh_emu, ds_id, data)

    t.run(body)


def test_session_expiry_that_persists_fails_close_then_retries(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)
    data = os.urandom(50_000)

    async def body(t: WriteTree) -> None:
        fresh_emu.faults.expire_session("ids/put", count=2)
        await fail_then_retry(t, fresh_emu, data)

    t.run(body)


def test_name_taken_meanwhile_is_a_conflict_nothing_overwritten(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)
    data = os.urandom(10_000)
    theirs = b"someone else's file"

    async def body(t: WriteTree) -> None:
        ds_id = await dataset_id(t)
        fh, _ = await t.create(f"{DS}/{NAME}")
        await t.write_all(fh, data)
        # bob stores a file of the same name before our close
        from fshelp import login
        bob = login(fresh_emu, "bob")
        ids = IDSClient(fresh_emu.ids_url, sessionId=bob.sessionId)
        fmt = bob.search("SELECT f.id FROM DatafileFormat f WHERE f.name = 'text'")[0]
        their_id = ids.put(theirs, NAME, ds_id, fmt)
        ids.close()
        bob.close()
        assert await t.close(fh) == errno.EIO
        (rec,) = records(t)
        assert rec["state"] == "conflict"
        assert (await t.xattr(f"{DS}/{NAME}", "user.idsfs.upload")).startswith("conflict:")
        await trio.sleep(0.3)  # no background retry of a conflict
        rows = datafiles_named(fresh_emu, ds_id, NAME)
        assert [r[0] for r in rows] == [their_id]
        assert stored_bytes(fresh_emu, their_id) == theirs
        assert (t.spool / f"{rec['uid']}.data").read_bytes() == data
        # deleting the local file drops the spool, not their datafile
        await t.ops.unlink(await t.ino(DS), NAME.encode(), t.ctx)
        assert not records(t)
        assert [r[0] for r in datafiles_named(fresh_emu, ds_id, NAME)] == [their_id]
        # another conflict, resolved by giving ours a free name: stored under it at once
        fh, _ = await t.create(f"{DS}/{NAME}", flags=os.O_WRONLY | os.O_CREAT)
        await t.write_all(fh, data)
        assert await t.close(fh) == errno.EIO
        await t.ops.rename(await t.ino(DS), NAME.encode(), await t.ino(DS), b"mine.dat",
                           0, t.ctx)
        await t.settle()
        (mine,) = datafiles_named(fresh_emu, ds_id, "mine.dat")
        assert stored_bytes(fresh_emu, mine[0]) == data
        assert [r[0] for r in datafiles_named(fresh_emu, ds_id, NAME)] == [their_id]
        assert not records(t)

    t.run(body)



def test_put_into_archived_dataset_waits_then_lands_after_the_restore(tmp_path, wtree) -> None:
    """Two-level storage with unit DATASET: a put into an archived dataset answers 503 and
    makes IDS restore it (ids-protocol.md §7.3); close retries within its bound, then fails
    with EIO; the pending upload lands once the dataset is online."""
    from fshelp import settings

    from idsfs.emulator import Emulator

    emu = Emulator(settings(tmp_path / "two-level", demo=True, storage="dataset",
                            restore_delay=1.0))
    emu.start()
    try:
        t = wtree(emu, online_wait=0.3)
        data = os.urandom(40_000)
        path = f"{DEMO_VISIT}/processed data"

        async def body(t: WriteTree) -> None:
            ds_id = int(await t.xattr(path, "user.ids.id"))
            fh, _ = await t.create(f"{path}/{NAME}")
            await t.write_all(fh, data)
            assert await t.close(fh) == errno.EIO
            state = await t.xattr(f"{path}/{NAME}", "user.idsfs.upload")
            # archived (restore requested), or locked by that restore meanwhile
            assert state.startswith(("pending: the dataset is archived",
                                     "pending: the dataset is locked")), state
            assert datafiles_named(emu, ds_id, NAME) == []
            await t.settle(timeout=30)
            assert_one_good_datafile(emu, ds_id, data)

        t.run(body)
    finally:
        emu.stop()

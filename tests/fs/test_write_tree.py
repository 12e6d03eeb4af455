"""Write path, handler level: unlink, mkdir, rmdir, rename checked against ICAT and IDS,
pending uploads across restarts, status lines, statfs."""

from __future__ import annotations

import errno
import json
import os

import pyfuse3
import pytest
from fshelp import login
from writekit import (
    DEMO_VISIT,
    DS,
    WriteTree,
    datafiles_named,
    dataset_id,
    setattr_fields,
    stored_bytes,
)

from idsfs.model import Datafile, parse_date


def icat(emu, query: str) -> list:
    root = login(emu, "root")
    try:
        return root.search(query)
    finally:
        root.close()


def test_unlink_deletes_through_ids_and_dirs_stay_until_rmdir(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        ds_ino = await t.ino(DS)
        await t.ops.mkdir(ds_ino, b"sub", 0o755, t.ctx)
        assert await t.write_file(f"{DS}/sub/a.txt", b"a") == 0
        assert await t.write_file(f"{DS}/top.txt", b"top") == 0
        (row,) = datafiles_named(fresh_emu, ds, "sub/a.txt")
        fresh_emu.counters.reset()
        await t.ops.unlink(await t.ino(f"{DS}/sub"), b"a.txt", t.ctx)
        assert fresh_emu.counters.get("ids/delete") == 1
        assert datafiles_named(fresh_emu, ds, "sub/a.txt") == []
        assert icat(fresh_emu, f"SELECT df.id FROM Datafile df WHERE df.id = {row[0]}") == []
        assert await t.names(f"{DS}/sub") == []            # empty, but still there
        assert "sub" in await t.names(DS)
        await t.ops.unlink(ds_ino, b"top.txt", t.ctx)
        assert "top.txt" not in await t.names(DS)
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.unlink(ds_ino, b"top.txt", t.ctx)
        assert exc.value.errno == errno.ENOENT
        await t.ops.rmdir(ds_ino, b"sub", t.ctx)
        assert "sub" not in await t.names(DS)
        # unlink of an existing demo datafile
        victim = (await t.names(DS))[0]
        await t.ops.unlink(ds_ino, victim.encode(), t.ctx)
        assert datafiles_named(fresh_emu, ds, victim) == []

    t.run(body)


def test_unlink_of_a_datafile_the_ids_keeps_busy_is_ebusy(fresh_emu, wtree) -> None:
    # IDS answers "Data is busy" (someone reads the dataset): retried briefly, then
    # EBUSY, not ENODATA (which says "archived")
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        assert await t.write_file(f"{DS}/locked", b"x") == 0
        fresh_emu.faults.error(503, "ids/delete", message="Data is busy")
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.unlink(await t.ino(DS), b"locked", t.ctx)
        assert exc.value.errno == errno.EBUSY
        assert fresh_emu.counters.get("ids/delete") == 6
        fresh_emu.faults.clear()
        assert datafiles_named(fresh_emu, ds, "locked")
        await t.ops.unlink(await t.ino(DS), b"locked", t.ctx)
        assert datafiles_named(fresh_emu, ds, "locked") == []

    t.run(body)


def test_a_stale_name_never_deletes_or_renames_the_datafile_under_its_new_name(
        fresh_emu, wtree) -> None:
    # Another client renamed a datafile after this mount listed it: rm or mv of
    # the old name must not reach it by id under its new name (ENOENT instead).
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        ds_ino = await t.ino(DS)
        for name in ("keep", "rn"):
            assert await t.write_file(f"{DS}/{name}", name.encode()) == 0
        assert {"keep", "rn"} <= set(await t.names(DS))  # listed here
        root = login(fresh_emu, "root")
        try:
            for name in ("keep", "rn"):
                (row,) = datafiles_named(fresh_emu, ds, name)
                root.update(Datafile(id=row[0]), name=f"{name}-elsewhere")
        finally:
            root.close()
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.unlink(ds_ino, b"keep", t.ctx)
        assert exc.value.errno == errno.ENOENT
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.rename(ds_ino, b"rn", ds_ino, b"rn-mine", 0, t.ctx)
        assert exc.value.errno == errno.ENOENT
        assert datafiles_named(fresh_emu, ds, "keep-elsewhere")
        assert datafiles_named(fresh_emu, ds, "rn-elsewhere")
        assert datafiles_named(fresh_emu, ds, "rn-mine") == []
        names = await t.names(DS)  # listed afresh
        assert "keep-elsewhere" in names and "keep" not in names

    t.run(body)


def test_files_in_new_folders_do_not_fetch_the_dataset_again(fresh_emu, wtree) -> None:
    # cp -r into a dataset: the first file of each folder made with mkdir was
    # looked up by fetching the whole dataset listing again (quadratic in the
    # dataset's size); a fresh dataset listing already says the folder is empty
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds_ino = await t.ino(DS)
        assert await t.write_file(f"{DS}/warm", b"w") == 0  # format known, listing fresh
        await t.names(DS)
        fresh_emu.counters.reset()
        for i in range(10):
            await t.ops.mkdir(ds_ino, f"d{i}".encode(), 0o755, t.ctx)
            assert await t.write_file(f"{DS}/d{i}/f", b"x") == 0
        # one query per stored file (its new record), none to list the dataset again
        assert fresh_emu.counters.get("icat/entityManager") == 10
        assert fresh_emu.counters.get("ids/put") == 10

    t.run(body)


def test_mkdir_creates_a_dataset_rmdir_deletes_it_when_empty(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        visit = await t.ino(DEMO_VISIT)
        attr = await t.ops.mkdir(visit, b"my results", 0o755, t.ctx)
        assert attr.st_mode & 0o777 == 0o755
        ds = await dataset_id(t, f"{DEMO_VISIT}/my results")
        rows = icat(fresh_emu, f"SELECT ds.name, ds.type.name, ds.complete FROM Dataset ds "
                               f"WHERE ds.id = {ds}")
        assert rows == [("my results", "processed", False)]
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.mkdir(visit, b"my results", 0o755, t.ctx)
        assert exc.value.errno == errno.EEXIST
        assert await t.write_file(f"{DEMO_VISIT}/my results/out.txt", b"out") == 0
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.rmdir(visit, b"my results", t.ctx)
        assert exc.value.errno == errno.ENOTEMPTY
        await t.ops.unlink(await t.ino(f"{DEMO_VISIT}/my results"), b"out.txt", t.ctx)
        await t.ops.rmdir(visit, b"my results", t.ctx)
        assert icat(fresh_emu, f"SELECT ds.id FROM Dataset ds WHERE ds.id = {ds}") == []
        assert "my results" not in await t.names(DEMO_VISIT)
        # a dataset holding datafiles without location (not shown) is not deleted either
        await t.ops.mkdir(visit, b"hidden", 0o755, t.ctx)
        hid = await dataset_id(t, f"{DEMO_VISIT}/hidden")
        root = login(fresh_emu, "root")
        root.create({"Datafile": {"name": "no data", "dataset": {"id": hid}}})
        root.close()
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.rmdir(visit, b"hidden", t.ctx)
        assert exc.value.errno == errno.ENOTEMPTY

    t.run(body)


def test_missing_dataset_type_or_format_is_enotsup(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu, dataset_type="no such type", datafile_format="nosuchformat:9")

    async def body(t: WriteTree) -> None:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.mkdir(await t.ino(DEMO_VISIT), b"x", 0o755, t.ctx)
        assert exc.value.errno == errno.ENOTSUP
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.create(f"{DS}/y")
        assert exc.value.errno == errno.ENOTSUP
        assert not list(t.spool.glob("*.data"))

    t.run(body)


def test_format_version_chosen_and_sent(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu, datafile_format="NeXus")

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        assert await t.write_file(f"{DS}/scan.nxs", b"nexus") == 0
        rows = icat(fresh_emu, f"SELECT df.datafileFormat.name, df.datafileFormat.version "
                               f"FROM Datafile df WHERE df.dataset.id = {ds} "
                               f"AND df.name = 'scan.nxs'")
        assert rows == [("NeXus", "4.4")]

    t.run(body)


def test_rename_within_dataset_and_refusals(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        ds_ino = await t.ino(DS)
        assert await t.write_file(f"{DS}/a.txt", b"A") == 0
        assert await t.write_file(f"{DS}/b.txt", b"B") == 0
        (a,) = datafiles_named(fresh_emu, ds, "a.txt")
        await t.ops.rename(ds_ino, b"a.txt", ds_ino, b"c.txt", 0, t.ctx)
        assert datafiles_named(fresh_emu, ds, "a.txt") == []
        (c,) = datafiles_named(fresh_emu, ds, "c.txt")
        assert c[0] == a[0]
        names = await t.names(DS)
        assert "c.txt" in names and "a.txt" not in names
        # into a (new) directory of the same dataset
        sub = await t.ops.mkdir(ds_ino, b"moved", 0o755, t.ctx)
        await t.ops.rename(ds_ino, b"c.txt", sub.st_ino, b"c.txt", 0, t.ctx)
        assert datafiles_named(fresh_emu, ds, "moved/c.txt")
        assert await t.read_file(f"{DS}/moved/c.txt") == b"A"
        # onto an existing datafile: refused without the replace option
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.rename(sub.st_ino, b"c.txt", ds_ino, b"b.txt", 0, t.ctx)
        assert exc.value.errno == errno.EACCES
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.rename(sub.st_ino, b"c.txt", ds_ino, b"b.txt",
                               pyfuse3.RENAME_NOREPLACE, t.ctx)
        assert exc.value.errno == errno.EEXIST
        # to another dataset: EXDEV (mv copies and deletes)
        other = await t.ino(f"{DEMO_VISIT}/processed data")
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.rename(ds_ino, b"b.txt", other, b"b.txt", 0, t.ctx)
        assert exc.value.errno == errno.EXDEV
        # directories of file names: EXDEV; visits and above: EPERM
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.rename(ds_ino, b"moved", ds_ino, b"moved2", 0, t.ctx)
        assert exc.value.errno == errno.EXDEV
        inv = await t.ino("DEMO/DEMO-2024-001")
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.rename(inv, b"1", inv, b"one", 0, t.ctx)
        assert exc.value.errno == errno.EPERM
        # a dataset within its visit: renamed in ICAT
        visit = await t.ino(DEMO_VISIT)
        await t.ops.rename(visit, b"processed data", visit, b"processed-v2", 0, t.ctx)
        assert "processed-v2" in await t.names(DEMO_VISIT)
        assert icat(fresh_emu, "SELECT ds.id FROM Dataset ds WHERE ds.name = 'processed-v2'")

    t.run(body)


def test_a_renamed_file_is_found_at_its_new_place_through_its_inode(fresh_emu, wtree) -> None:
    # The kernel keeps the inode of a renamed entry and asks no new lookup:
    # open, read and getxattr of that inode must find the file where it went.
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds_ino = await t.ino(DS)
        assert await t.write_file(f"{DS}/a.txt", b"A") == 0
        ino = await t.ino(f"{DS}/a.txt")
        sub = await t.ops.mkdir(ds_ino, b"sub", 0o755, t.ctx)
        for parent, name, icat_name in ((sub.st_ino, b"a.txt", b"sub/a.txt"),
                                        (ds_ino, b"b.txt", b"b.txt")):
            old_parent = ds_ino if parent == sub.st_ino else sub.st_ino
            old_name = b"a.txt"
            await t.ops.rename(old_parent, old_name, parent, name, 0, t.ctx)
            assert await t.ops.getxattr(ino, b"user.ids.name", t.ctx) == icat_name
            info = await t.ops.open(ino, os.O_RDONLY, t.ctx)
            try:
                assert bytes(await t.ops.read(info.fh, 0, 10)) == b"A"
            finally:
                await t.ops.release(info.fh)

    t.run(body)


def test_mkdir_succeeds_when_icat_created_the_dataset_but_listing_it_fails(
        fresh_emu, wtree) -> None:
    # The create worked; the query that lists the visit again fails: mkdir
    # succeeds (the dataset exists) and the next listing shows it.
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        visit = await t.ino(DEMO_VISIT)
        await t.ops.mkdir(visit, b"first", 0o755, t.ctx)  # type and facility now known
        await t.names(DEMO_VISIT)
        fresh_emu.counters.reset()
        fresh_emu.faults.error(500, "icat/entityManager", count=1)
        attr = await t.ops.mkdir(visit, b"made anyway", 0o755, t.ctx)
        assert fresh_emu.counters.get("icat/write") == 1
        assert fresh_emu.faults.fired["error"] == 1
        ds = await dataset_id(t, f"{DEMO_VISIT}/made anyway")
        assert attr.st_ino == await t.ino(f"{DEMO_VISIT}/made anyway")
        assert icat(fresh_emu, f"SELECT ds.name FROM Dataset ds WHERE ds.id = {ds}") == [
            "made anyway"]
        assert "made anyway" in await t.names(DEMO_VISIT)
        assert await t.write_file(f"{DEMO_VISIT}/made anyway/f", b"f") == 0

    t.run(body)


def test_unlink_and_rename_while_an_unwritten_file_is_stored(fresh_emu, wtree) -> None:
    # touch f; rm f (vim's swap-file probe, mktemp, rsync of empty files): the
    # file closed unwritten is stored in the background, and the unlink or
    # rename that follows must not leave its entry behind.
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        ds_ino = await t.ino(DS)
        fresh_emu.faults.latency(0.3, "ids/put")
        fh, _ = await t.create(f"{DS}/ghost")
        assert await t.close(fh) == 0
        await t.upload_started("ghost")
        await t.ops.unlink(ds_ino, b"ghost", t.ctx)
        assert "ghost" not in await t.names(DS)
        assert datafiles_named(fresh_emu, ds, "ghost") == []
        fh, _ = await t.create(f"{DS}/ghost")       # the name is free again
        assert await t.close(fh) == 0

        fh, _ = await t.create(f"{DS}/.e1.XXXXXX")
        assert await t.close(fh) == 0
        await t.upload_started(".e1.XXXXXX")
        await t.ops.rename(ds_ino, b".e1.XXXXXX", ds_ino, b"e1", 0, t.ctx)
        names = await t.names(DS)
        assert "e1" in names and ".e1.XXXXXX" not in names
        assert datafiles_named(fresh_emu, ds, ".e1.XXXXXX") == []
        (row,) = datafiles_named(fresh_emu, ds, "e1")
        assert stored_bytes(fresh_emu, row[0]) == b""
        assert await t.read_file(f"{DS}/e1") == b""

    t.run(body)


def test_a_time_set_while_an_unwritten_file_is_stored_reaches_icat(fresh_emu, wtree) -> None:
    # rsync -a of an empty file: create, close (stored in the background), then
    # utime while that put is on its way. The put carried the old time; the new
    # one must still end up in ICAT, or the next rsync sees the file as changed.
    import trio

    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        fresh_emu.counters.reset()
        fresh_emu.faults.stall(0, 0.5, "ids/put")  # the answer waits, the datafile is stored
        fh, ino = await t.create(f"{DS}/empty.synced")
        assert await t.close(fh) == 0
        await t.upload_started("empty.synced")
        with trio.fail_after(5):  # the put (carrying the old time) has reached IDS
            while fresh_emu.counters.get("ids/put") < 1:
                await trio.sleep(0.005)
        attr = pyfuse3.EntryAttributes()
        attr.st_mtime_ns = 1_400_000_000_250_000_000
        await t.ops.setattr(ino, attr, setattr_fields(mtime=True), None, t.ctx)
        await t.settle()
        (row,) = datafiles_named(fresh_emu, ds, "empty.synced")
        (stored,) = icat(fresh_emu, f"SELECT df.datafileModTime FROM Datafile df "
                                    f"WHERE df.id = {row[0]}")
        assert parse_date(stored).timestamp() == 1_400_000_000.25
        assert (await t.walk(f"{DS}/empty.synced")).st_mtime_ns == 1_400_000_000_250_000_000

    t.run(body)


def test_a_rename_done_in_icat_succeeds_even_if_reading_it_back_fails(fresh_emu, wtree) -> None:
    # ICAT renamed it, then the query that fetches the renamed datafile fails:
    # mv succeeded (no EIO) and the dataset is listed afresh, showing the new name.
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        from idsfs.errors import ICATInternalError

        ds = await dataset_id(t)
        ds_ino = await t.ino(DS)
        assert await t.write_file(f"{DS}/z1", b"Z") == 0
        fetch = t.catalog.fetch_datafile
        calls = []
        failures = []

        async def failing_once(*args):
            calls.append(args)
            if len(calls) == 2:  # the first: the check of the name before the rename
                failures.append(args)
                raise ICATInternalError("refused by the test")
            return await fetch(*args)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(t.catalog, "fetch_datafile", failing_once)
            await t.ops.rename(ds_ino, b"z1", ds_ino, b"z2", 0, t.ctx)
        assert failures
        assert datafiles_named(fresh_emu, ds, "z2") and not datafiles_named(fresh_emu, ds, "z1")
        names = await t.names(DS)
        assert "z2" in names and "z1" not in names
        assert await t.read_file(f"{DS}/z2") == b"Z"

    t.run(body)


def test_rename_with_replace_replaces_the_target(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu, replace=True)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        ds_ino = await t.ino(DS)
        assert await t.write_file(f"{DS}/target", b"old") == 0
        assert await t.write_file(f"{DS}/.target.tmp", b"new") == 0
        await t.ops.rename(ds_ino, b".target.tmp", ds_ino, b"target", 0, t.ctx)
        (row,) = datafiles_named(fresh_emu, ds, "target")
        assert stored_bytes(fresh_emu, row[0]) == b"new"
        assert datafiles_named(fresh_emu, ds, ".target.tmp") == []

    t.run(body)


def test_rename_over_a_datafile_keeps_it_until_the_source_has_the_name(
        fresh_emu, wtree) -> None:
    # mv new old (--replace): the old datafile is deleted only once the new one
    # has its name; when that rename fails, the old one keeps its name and bytes.
    t = wtree(fresh_emu, replace=True)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        ds_ino = await t.ino(DS)
        assert await t.write_file(f"{DS}/target", b"old") == 0
        assert await t.write_file(f"{DS}/.target.tmp", b"new") == 0
        (old,) = datafiles_named(fresh_emu, ds, "target")
        rename = t.catalog.rename_datafile
        calls: list[str] = []

        async def failing_second(record, new_name):
            calls.append(new_name)
            if len(calls) == 2:  # the source's rename onto the name
                from idsfs.errors import ICATValidationError
                raise ICATValidationError("refused by the test")
            return await rename(record, new_name)

        with pytest.MonkeyPatch.context() as mp, pytest.raises(pyfuse3.FUSEError) as info:
            mp.setattr(t.catalog, "rename_datafile", failing_second)
            await t.ops.rename(ds_ino, b".target.tmp", ds_ino, b"target", 0, t.ctx)
        assert info.value.errno == errno.EINVAL
        assert calls[0].startswith(".idsfs-replaced-") and calls[1:] == ["target", "target"]
        (row,) = datafiles_named(fresh_emu, ds, "target")  # back under its name, untouched
        assert row[0] == old[0] and stored_bytes(fresh_emu, row[0]) == b"old"
        assert datafiles_named(fresh_emu, ds, ".target.tmp")
        await t.ops.rename(ds_ino, b".target.tmp", ds_ino, b"target", 0, t.ctx)
        (row,) = datafiles_named(fresh_emu, ds, "target")
        assert stored_bytes(fresh_emu, row[0]) == b"new"
        assert icat(fresh_emu, f"SELECT df.id FROM Datafile df WHERE df.id = {old[0]}") == []
        assert sorted(await t.names(DS)).count("target") == 1
        assert not any(n.startswith(".idsfs-replaced-") for n in await t.names(DS))

    t.run(body)


def test_rsync_pattern_rename_of_a_just_closed_file(fresh_emu, wtree) -> None:
    """rsync: write a temporary name, close, rename (maybe before the release arrives)."""
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        ds_ino = await t.ino(DS)
        fh, _ = await t.create(f"{DS}/.data.bin.Xy12")
        await t.ops.write(fh, 0, b"rsynced")
        await t.ops.flush(fh)                       # close() returned
        await t.ops.rename(ds_ino, b".data.bin.Xy12", ds_ino, b"data.bin", 0, t.ctx)
        await t.ops.release(fh)
        (row,) = datafiles_named(fresh_emu, ds, "data.bin")
        assert stored_bytes(fresh_emu, row[0]) == b"rsynced"
        assert datafiles_named(fresh_emu, ds, ".data.bin.Xy12") == []
        assert "data.bin" in await t.names(DS)
        assert ".data.bin.Xy12" not in await t.names(DS)
        # a rename before the first close just renames the upload
        fh, _ = await t.create(f"{DS}/.early")
        await t.ops.write(fh, 0, b"early")
        await t.ops.rename(ds_ino, b".early", ds_ino, b"early", 0, t.ctx)
        assert await t.close(fh) == 0
        assert datafiles_named(fresh_emu, ds, "early")

    t.run(body)


def test_unlink_of_a_pending_upload_drops_it(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        t.uploader.retry_delay = 100.0
        fresh_emu.faults.error(500, "ids/put", count=1)
        assert await t.write_file(f"{DS}/doomed", b"x") == errno.EIO
        assert list(t.spool.glob("*.data"))
        await t.ops.unlink(await t.ino(DS), b"doomed", t.ctx)
        assert not list(t.spool.glob("*"))  or all(p.name == ".lock" for p in t.spool.iterdir())
        assert "doomed" not in await t.names(DS)
        assert datafiles_named(fresh_emu, ds, "doomed") == []

    t.run(body)


def test_pending_uploads_survive_a_restart(fresh_emu, wtree, tmp_path) -> None:
    spool = tmp_path / "spool"
    t1 = wtree(fresh_emu, spool=spool)
    data = os.urandom(70_000)

    async def first(t: WriteTree) -> None:
        t.uploader.retry_delay = 100.0
        fresh_emu.faults.error(503, "ids/put", count=1000)
        t.uploader.online_wait = 0.0
        assert await t.write_file(f"{DS}/later.bin", data) == errno.EIO
        # a file open for writing when the daemon stops: held, not uploaded
        fh, _ = await t.create(f"{DS}/half.bin")
        await t.ops.write(fh, 0, b"half")
        lines = t.uploader.pending_lines()
        assert any("later.bin" in line and "pending" in line for line in lines)
        status = t.uploader.status()
        assert status["writing"] == 1 and len(status["pending"]) == 1
        assert status["held"] == [] and status["left_alone"] == 0

    t1.run(first, wait=0.3)
    recs = {json.loads(p.read_text())["name"]: json.loads(p.read_text())
            for p in spool.glob("*.json")}
    assert recs["later.bin"]["state"] == "pending"
    assert recs["half.bin"]["state"] == "failed"
    fresh_emu.faults.clear()
    t2 = wtree(fresh_emu, spool=spool)

    async def second(t: WriteTree) -> None:
        ds = await dataset_id(t)
        await t.settle()
        (row,) = datafiles_named(fresh_emu, ds, "later.bin")
        assert stored_bytes(fresh_emu, row[0]) == data
        # the interrupted file is held and listed, never uploaded by itself
        assert datafiles_named(fresh_emu, ds, "half.bin") == []
        state = await t.xattr(f"{DS}/half.bin", "user.idsfs.upload")
        assert state.startswith("failed: the mount stopped")
        assert await t.read_file(f"{DS}/half.bin") == b"half"
        # writing it again from the start stores it
        fh = await t.open(f"{DS}/half.bin", os.O_WRONLY | os.O_TRUNC)
        await t.ops.write(fh, 0, b"whole")
        assert await t.close(fh) == 0
        (row,) = datafiles_named(fresh_emu, ds, "half.bin")
        assert stored_bytes(fresh_emu, row[0]) == b"whole"

    t2.run(second)


def test_attempt_in_progress_at_a_crash_is_not_uploaded_twice(fresh_emu, wtree, tmp_path) -> None:
    """A record left as 'uploading' whose put did land: the restart finds it in ICAT."""
    spool = tmp_path / "spool"
    t1 = wtree(fresh_emu, spool=spool)

    async def first(t: WriteTree) -> None:
        assert await t.write_file(f"{DS}/landed.bin", b"landed") == 0

    # keep the spool and rewrite its record as a crash in the middle of the put leaves it
    t1.run(first)
    from idsfs.upload import Upload
    ds = None

    async def find(t: WriteTree) -> None:
        nonlocal ds
        ds = await dataset_id(t)

    wtree(fresh_emu, spool=tmp_path / "other").run(find)
    up = Upload(spool, "ab" * 16, dataset_id=ds, name="landed.bin", display="landed.bin",
                format_id=None, owner=f"{fresh_emu.icat_url} alice")
    up.data_path.write_bytes(b"landed")
    up.size = 6
    up.state = "uploading"
    up.maybe_landed = True
    up.save()
    puts = fresh_emu.counters.get("ids/put")
    t2 = wtree(fresh_emu, spool=spool)

    async def second(t: WriteTree) -> None:
        await t.settle()
        assert fresh_emu.counters.get("ids/put") == puts
        assert len(datafiles_named(fresh_emu, ds, "landed.bin")) == 1
        assert not list(spool.glob("*.json"))

    t2.run(second)


def test_statfs_shows_the_spool_space(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        st = await t.ops.statfs(t.ctx)
        assert st.f_bavail > 0 and st.f_bfree == st.f_bavail

    t.run(body)

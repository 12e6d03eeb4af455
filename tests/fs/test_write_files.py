"""Write path, handler level: when uploads happen, random writes, truncation, reading
back before close, names, EEXIST, refusals, live uploads, replace."""

from __future__ import annotations

import errno
import json
import logging
import os

import pyfuse3
import pytest
import trio
from writekit import (
    DEMO_VISIT,
    DS,
    WriteTree,
    crc_hex,
    datafiles_named,
    dataset_id,
    setattr_fields,
    stored_bytes,
)


def test_random_writes_truncate_and_reads_before_close(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        fh, ino = await t.create(f"{DS}/random.bin", flags=os.O_RDWR | os.O_CREAT)
        await t.ops.write(fh, 100, b"B" * 50)          # a hole before it
        await t.ops.write(fh, 0, b"A" * 10)
        assert (await t.ops.getattr(ino, t.ctx)).st_size == 150
        assert await t.ops.read(fh, 0, 20) == b"A" * 10 + b"\0" * 10
        # truncate through setattr (as ftruncate does), then append
        fields = setattr_fields(size=True)
        attr = pyfuse3.EntryAttributes()
        attr.st_size = 120
        assert (await t.ops.setattr(ino, attr, fields, fh, t.ctx)).st_size == 120
        await t.ops.write(fh, 120, b"C" * 5)
        expected = b"A" * 10 + b"\0" * 90 + b"B" * 20 + b"C" * 5
        assert await t.ops.read(fh, 0, 4096) == expected
        # another open for reading sees the same bytes before the close
        other = await t.open(f"{DS}/random.bin", os.O_RDONLY)
        assert await t.ops.read(other, 0, 4096) == expected
        await t.ops.release(other)
        assert fresh_emu.counters.get("ids/put") == 0
        assert await t.close(fh) == 0
        (row,) = datafiles_named(fresh_emu, ds, "random.bin")
        assert stored_bytes(fresh_emu, row[0]) == expected

    t.run(body)


def test_upload_happens_at_the_last_writers_close(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        fh1, _ = await t.create(f"{DS}/two.txt")
        fh2 = await t.open(f"{DS}/two.txt", os.O_WRONLY | os.O_APPEND)
        await t.ops.write(fh1, 0, b"first ")
        assert await t.close(fh1) == 0          # another writer still has it open
        assert fresh_emu.counters.get("ids/put") == 0
        await t.ops.write(fh2, 6, b"second")
        assert await t.close(fh2) == 0
        assert fresh_emu.counters.get("ids/put") == 1
        (row,) = datafiles_named(fresh_emu, ds, "two.txt")
        assert stored_bytes(fresh_emu, row[0]) == b"first second"

    t.run(body)


def test_flush_of_a_dup_then_more_writes_replaces_our_own_upload(fresh_emu, wtree) -> None:
    """close() of one descriptor of a handle uploads; writes through another descriptor of
    the same handle and its close store the file again (our first datafile replaced)."""
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        fh, ino = await t.create(f"{DS}/dup.txt")
        await t.ops.write(fh, 0, b"one")
        await t.ops.flush(fh)                    # close() of a dup'd descriptor
        (first,) = datafiles_named(fresh_emu, ds, "dup.txt")
        assert stored_bytes(fresh_emu, first[0]) == b"one"
        await t.ops.write(fh, 3, b" two")
        assert (await t.ops.getattr(ino, t.ctx)).st_size == 7
        assert await t.close(fh) == 0
        rows = datafiles_named(fresh_emu, ds, "dup.txt")
        assert len(rows) == 1 and rows[0][0] != first[0]
        assert stored_bytes(fresh_emu, rows[0][0]) == b"one two"
        assert not [n for n in await t.names(DS) if n.startswith(".idsfs-replace-")]
        assert await t.read_file(f"{DS}/dup.txt") == b"one two"

    t.run(body)


def test_file_never_written_is_stored_after_release(fresh_emu, wtree) -> None:
    """touch / a shell redirection: nothing at the first close; stored once, empty."""
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        fh, _ = await t.create(f"{DS}/empty")
        await t.ops.flush(fh)
        assert fresh_emu.counters.get("ids/put") == 0
        await t.ops.release(fh)
        await t.settle()
        (row,) = datafiles_named(fresh_emu, ds, "empty")
        assert row[1] == 0 and row[2] == crc_hex(b"")
        assert fresh_emu.counters.get("ids/put") == 1
        assert "empty" in await t.names(DS)

    t.run(body)


def test_shell_redirection_pattern_uploads_once(fresh_emu, wtree) -> None:
    """open, close of the original fd before any write, write, close: one put."""
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        fh, _ = await t.create(f"{DS}/out.log")
        await t.ops.flush(fh)                   # the shell closes its fd after dup2
        await t.ops.write(fh, 0, b"hello\n")
        assert await t.close(fh) == 0
        assert fresh_emu.counters.get("ids/put") == 1
        (row,) = datafiles_named(fresh_emu, ds, "out.log")
        assert stored_bytes(fresh_emu, row[0]) == b"hello\n"

    t.run(body)


def test_modification_time_sent_and_settable(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        fh, ino = await t.create(f"{DS}/timed.dat")
        await t.ops.write(fh, 0, b"x")
        fields = setattr_fields(mtime=True)
        attr = pyfuse3.EntryAttributes()
        attr.st_mtime_ns = 1_500_000_000_123_000_000
        await t.ops.setattr(ino, attr, fields, fh, t.ctx)
        assert await t.close(fh) == 0
        st = await t.walk(f"{DS}/timed.dat")
        assert st.st_mtime_ns == 1_500_000_000_123_000_000
        # touch -d on the stored datafile changes datafileModTime in ICAT
        attr.st_mtime_ns = 1_600_000_000_000_000_000
        await t.ops.setattr(st.st_ino, attr, fields, None, t.ctx)
        assert (await t.walk(f"{DS}/timed.dat")).st_mtime_ns == 1_600_000_000_000_000_000
        # mode and owner changes are accepted without effect
        fields = setattr_fields(mode=True)
        attr.st_mode = 0o100600
        assert (await t.ops.setattr(st.st_ino, attr, fields, None, t.ctx)).st_mode == 0o100444

    t.run(body)


def test_names_in_subdirectories_and_unstorable_names(fresh_emu, wtree, caplog) -> None:
    caplog.set_level(logging.INFO, "idsfs.fs")
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        root_ino = await t.ino(DS)
        a = await t.ops.mkdir(root_ino, b"deep", 0o755, t.ctx)
        b = await t.ops.mkdir(a.st_ino, b"er", 0o755, t.ctx)
        assert await t.names(f"{DS}/deep") == ["er"]
        assert await t.write_file(f"{DS}/deep/er/x.txt", b"deep") == 0
        (row,) = datafiles_named(fresh_emu, ds, "deep/er/x.txt")
        assert stored_bytes(fresh_emu, row[0]) == b"deep"
        assert await t.xattr(f"{DS}/deep/er/x.txt", "user.ids.name") == "deep/er/x.txt"
        assert b.st_ino == (await t.walk(f"{DS}/deep/er")).st_ino
        # escapes: %2F in a file name is a '/' inside the component
        assert await t.write_file(f"{DS}/a%2F%2Fb", b"slashes") == 0
        assert datafiles_named(fresh_emu, ds, "a//b")
        for bad in (b"x%FE12", b"a%2Eb", b"\xff\xfe", b"%FD"):
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await t.ops.create(root_ino, bad, 0o644, os.O_WRONLY | os.O_CREAT, t.ctx)
            assert exc.value.errno == errno.EINVAL, bad
        # the program sees EINVAL; the log (default level) says why and what to write
        assert "not in canonical form, write 'a.b'" in caplog.text
        # a 250-byte file name is fine for the kernel, but below deep/er the ICAT name
        # would have 258 characters (ICAT's limit is 255)
        er = await t.ino(f"{DS}/deep/er")
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.create(er, b"n" * 250, 0o644, os.O_WRONLY | os.O_CREAT, t.ctx)
        assert exc.value.errno == errno.ENAMETOOLONG
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.mkdir(er, b"m" * 250, 0o755, t.ctx)
        assert exc.value.errno == errno.ENAMETOOLONG
        assert fresh_emu.counters.get("ids/put") == 2

    t.run(body)


def test_open_for_writing_while_the_close_uploads(fresh_emu, wtree) -> None:
    # Two writers of one new name: the first close is uploading when the second
    # opens with O_TRUNC, and the first handle goes away meanwhile. The upload
    # must not be forgotten under the second writer (its spool deleted: the
    # write behind then crashed the daemon, or its bytes were lost): the second
    # writer's bytes are stored, once.
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        fresh_emu.faults.stall(0, 0.5, "ids/put", count=1)  # stored; its answer waits
        fh1, ino = await t.create(f"{DS}/two-writers")
        await t.write_all(fh1, b"first" * 200)
        opened: list[int] = []

        async def second() -> None:
            await trio.sleep(0.2)  # the first close is uploading now
            info = await t.ops.open(ino, os.O_WRONLY | os.O_TRUNC, t.ctx)
            opened.append(info.fh)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await t.ops.flush(fh1)
            await t.ops.release(fh1)
        (fh2,) = opened
        await t.write_all(fh2, b"second" * 100)
        assert await t.close(fh2) == 0
        await t.settle()
        (row,) = datafiles_named(fresh_emu, ds, "two-writers")
        assert stored_bytes(fresh_emu, row[0]) == b"second" * 100
        assert await t.read_file(f"{DS}/two-writers") == b"second" * 100
        assert not [up for up in t.uploader.uploads.values() if up.state != "done"]

    t.run(body)


def test_written_while_its_empty_version_is_stored_in_the_background(fresh_emu, wtree) -> None:
    # `: > f; echo data > f`: the empty file is stored in the background at its
    # release; the second open must not lose "data" (or crash the daemon)
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        fresh_emu.faults.stall(0, 0.4, "ids/put", count=1)
        fh, ino = await t.create(f"{DS}/redone")
        assert await t.close(fh) == 0
        await t.upload_started("redone")
        info = await t.ops.open(ino, os.O_WRONLY | os.O_TRUNC, t.ctx)
        await t.write_all(info.fh, b"data\n")
        assert await t.close(info.fh) == 0
        await t.settle()
        (row,) = datafiles_named(fresh_emu, ds, "redone")
        assert stored_bytes(fresh_emu, row[0]) == b"data\n"
        assert await t.read_file(f"{DS}/redone") == b"data\n"

    t.run(body)


def test_a_file_just_stored_in_the_background_never_goes_missing(fresh_emu, wtree) -> None:
    # `: > f; touch -d ... f`: the empty file is stored in the background; between
    # "landed" and the tree showing the new datafile, an open for writing took the
    # file's local entry away and found no datafile yet: ENOENT (the kernel then
    # kept the name as missing for the TTL). It must be the datafile, at once.
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        landed = trio.Event()
        show = t.ops._landed

        async def slow_show(up):  # the new record's query takes a while
            landed.set()
            await trio.sleep(0.3)
            await show(up)

        t.uploader.on_landed = slow_show
        fh, ino = await t.create(f"{DS}/just-stored")
        assert await t.close(fh) == 0
        with trio.fail_after(5):
            await landed.wait()
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.open(ino, os.O_WRONLY | os.O_TRUNC, t.ctx)
        assert exc.value.errno == errno.EACCES  # a stored datafile, not a missing name
        st = await t.walk(f"{DS}/just-stored")
        assert st.st_size == 0
        assert await t.xattr(f"{DS}/just-stored", "user.ids.id")

    t.run(body)


def test_existing_names_eexist_and_refused_writes(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)

    async def body(t: WriteTree) -> None:
        root_ino = await t.ino(DS)
        existing = (await t.names(DS))[0]
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.create(root_ino, existing.encode(), 0o644,
                               os.O_WRONLY | os.O_CREAT | os.O_EXCL, t.ctx)
        assert exc.value.errno == errno.EEXIST
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await t.open(f"{DS}/{existing}", flags)
            assert exc.value.errno == errno.EACCES
        with pytest.raises(pyfuse3.FUSEError) as exc:  # O_CREAT without O_EXCL: same refusal
            await t.ops.create(root_ino, existing.encode(), 0o644,
                               os.O_WRONLY | os.O_CREAT | os.O_TRUNC, t.ctx)
        assert exc.value.errno == errno.EACCES
        attr = await t.walk(f"{DS}/{existing}")
        assert attr.st_mode & 0o777 == 0o444
        assert (await t.walk(DS)).st_mode & 0o777 == 0o755
        assert (await t.walk("DEMO")).st_mode & 0o777 == 0o555
        # files only in datasets: not in a visit, not higher up
        visit = await t.ino(DEMO_VISIT)
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.create(visit, b"stray", 0o644, os.O_WRONLY | os.O_CREAT, t.ctx)
        assert exc.value.errno == errno.EPERM
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.mkdir(pyfuse3.ROOT_INODE, b"newfacility", 0o755, t.ctx)
        assert exc.value.errno == errno.EPERM
        assert fresh_emu.counters.get("ids/put") == 0

    t.run(body)


def test_read_only_refuses_everything_with_erofs(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu, read_only=True)

    async def body(t: WriteTree) -> None:
        ds_ino = await t.ino(DS)
        name = (await t.names(DS))[0]
        calls = [
            t.ops.create(ds_ino, b"n", 0o644, os.O_WRONLY | os.O_CREAT, t.ctx),
            t.ops.mkdir(ds_ino, b"d", 0o755, t.ctx),
            t.ops.unlink(ds_ino, name.encode(), t.ctx),
            t.ops.rmdir(await t.ino(DEMO_VISIT), b"raw", t.ctx),
            t.ops.rename(ds_ino, name.encode(), ds_ino, b"other", 0, t.ctx),
            t.ops.open(await t.ino(f"{DS}/{name}"), os.O_WRONLY, t.ctx),
            t.ops.setxattr(ds_ino, b"user.x", b"1", t.ctx),
        ]
        for call in calls:
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await call
            assert exc.value.errno == errno.EROFS
        assert (await t.walk(DS)).st_mode & 0o777 == 0o555

    t.run(body)


def test_live_upload_follows_a_sequential_writer(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu, live_threshold=256 * 1024)
    data = os.urandom(3 << 20)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        fh, _ = await t.create(f"{DS}/live.bin")
        await t.write_all(fh, data[: 1 << 20])
        up = next(iter(t.uploader.uploads.values()))
        assert up.live is not None                       # started while writing
        await trio.sleep(0.2)
        assert up.live.sent > 0
        await t.write_all(fh, data[1 << 20:], offset=1 << 20)
        assert await t.close(fh) == 0
        assert t.uploader.stats().live_aborted == 0
        (row,) = datafiles_named(fresh_emu, ds, "live.bin")
        assert stored_bytes(fresh_emu, row[0]) == data
        assert row[2] == crc_hex(data)

    t.run(body)


def test_live_upload_given_up_on_a_random_write(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu, live_threshold=256 * 1024)
    data = bytearray(os.urandom(2 << 20))

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        fh, _ = await t.create(f"{DS}/patched.bin")
        await t.write_all(fh, bytes(data))
        await t.ops.write(fh, 10, b"PATCH")
        data[10:15] = b"PATCH"
        assert await t.close(fh) == 0
        assert t.uploader.stats().live_aborted == 1
        rows = datafiles_named(fresh_emu, ds, "patched.bin")
        assert len(rows) == 1
        assert stored_bytes(fresh_emu, rows[0][0]) == bytes(data)

    t.run(body)


def test_replace_option_stores_new_then_deletes_old(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu, replace=True)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        assert await t.write_file(f"{DS}/doc.txt", b"version 1") == 0
        (old,) = datafiles_named(fresh_emu, ds, "doc.txt")
        assert (await t.walk(f"{DS}/doc.txt")).st_mode & 0o777 == 0o644
        # overwrite (O_TRUNC)
        fh = await t.open(f"{DS}/doc.txt", os.O_WRONLY | os.O_TRUNC)
        await t.ops.write(fh, 0, b"version 2")
        assert await t.close(fh) == 0
        rows = datafiles_named(fresh_emu, ds, "doc.txt")
        assert len(rows) == 1 and rows[0][0] != old[0]
        assert stored_bytes(fresh_emu, rows[0][0]) == b"version 2"
        # append (no O_TRUNC): the old bytes are copied into the spool first
        fh = await t.open(f"{DS}/doc.txt", os.O_WRONLY | os.O_APPEND)
        await t.ops.write(fh, 9, b" + more")
        assert await t.close(fh) == 0
        (row,) = datafiles_named(fresh_emu, ds, "doc.txt")
        assert stored_bytes(fresh_emu, row[0]) == b"version 2 + more"
        assert await t.read_file(f"{DS}/doc.txt") == b"version 2 + more"
        assert not [n for n in await t.names(DS) if n.startswith(".idsfs-")]

    t.run(body)


def test_writes_during_the_copy_of_the_old_bytes_are_kept(fresh_emu, wtree) -> None:
    # Open without O_TRUNC (--replace): the first change copies the old bytes into
    # the spool. A write that comes meanwhile (another handle, another thread)
    # waits for that copy instead of being overwritten by it.
    t = wtree(fresh_emu, replace=True)
    old = bytes(range(256)) * 4096  # 1 MiB

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        assert await t.write_file(f"{DS}/big.bin", old) == 0
        fresh_emu.faults.latency(0.3, "ids/getData")  # a slow copy
        first = await t.open(f"{DS}/big.bin", os.O_WRONLY)
        second = await t.open(f"{DS}/big.bin", os.O_RDWR)
        sizes: list[int] = []

        async def late_write() -> None:
            await trio.sleep(0.1)  # the copy has begun
            assert await t.ops.write(second, 700_000, b"SECOND") == 6
            sizes.append((await t.ops.getattr(await t.ino(f"{DS}/big.bin"), t.ctx)).st_size)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(late_write)
            assert await t.ops.write(first, 10, b"FIRST") == 5
        assert sizes == [len(old)]
        assert bytes(await t.ops.read(second, 700_000, 6)) == b"SECOND"
        assert await t.close(second) == 0
        assert await t.close(first) == 0
        expected = bytearray(old)
        expected[10:15] = b"FIRST"
        expected[700_000:700_006] = b"SECOND"
        (row,) = datafiles_named(fresh_emu, ds, "big.bin")
        assert stored_bytes(fresh_emu, row[0]) == bytes(expected)

    t.run(body)


def test_replace_keeps_the_old_datafile_when_the_upload_fails(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu, replace=True)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        assert await t.write_file(f"{DS}/keep.txt", b"old content") == 0
        (old,) = datafiles_named(fresh_emu, ds, "keep.txt")
        t.uploader.retry_delay = 0.3
        fresh_emu.faults.error(500, "ids/put", count=1)
        fh = await t.open(f"{DS}/keep.txt", os.O_WRONLY | os.O_TRUNC)
        await t.ops.write(fh, 0, b"new content")
        assert await t.close(fh) == errno.EIO
        # the old datafile is untouched while the new one is pending
        assert [r[0] for r in datafiles_named(fresh_emu, ds, "keep.txt")] == [old[0]]
        assert stored_bytes(fresh_emu, old[0]) == b"old content"
        await t.settle()
        (row,) = datafiles_named(fresh_emu, ds, "keep.txt")
        assert row[0] != old[0] and stored_bytes(fresh_emu, row[0]) == b"new content"

    t.run(body)


def test_rm_of_a_file_whose_replacement_is_pending_deletes_the_file(fresh_emu, wtree) -> None:
    # rm removes the name: the new bytes waiting for their upload and the old
    # datafile they were to replace both go (the old one does not come back).
    t = wtree(fresh_emu, replace=True)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        assert await t.write_file(f"{DS}/gone.txt", b"old content") == 0
        (old,) = datafiles_named(fresh_emu, ds, "gone.txt")
        t.uploader.retry_delay = 100.0
        fresh_emu.faults.error(500, "ids/put", count=1)
        fh = await t.open(f"{DS}/gone.txt", os.O_WRONLY | os.O_TRUNC)
        await t.ops.write(fh, 0, b"new content")
        assert await t.close(fh) == errno.EIO  # pending; the old datafile untouched
        assert [r[0] for r in datafiles_named(fresh_emu, ds, "gone.txt")] == [old[0]]
        await t.ops.unlink(await t.ino(DS), b"gone.txt", t.ctx)
        assert datafiles_named(fresh_emu, ds, "gone.txt") == []
        assert "gone.txt" not in await t.names(DS)
        assert not await t.exists(f"{DS}/gone.txt")
        assert not [p for p in t.spool.iterdir() if p.name != ".lock"]

    t.run(body)


def test_replace_resumes_after_a_crash_between_put_and_delete(fresh_emu, wtree, tmp_path) -> None:
    """A record saved after the put of the new datafile (temporary name), before the old one
    was deleted: the next mount finishes the replace without a second put."""
    spool = tmp_path / "spool"
    t1 = wtree(fresh_emu, replace=True, spool=spool)
    state: dict[str, int] = {}

    async def first(t: WriteTree) -> None:
        ds = await dataset_id(t)
        assert await t.write_file(f"{DS}/swap.txt", b"old") == 0
        (old,) = datafiles_named(fresh_emu, ds, "swap.txt")
        state.update(ds=ds, old=old[0])
        # the delete of the old datafile fails: the upload stops after its put
        fresh_emu.faults.error(500, "ids/delete", count=100)
        t.uploader.retry_delay = 100.0
        fh = await t.open(f"{DS}/swap.txt", os.O_WRONLY | os.O_TRUNC)
        await t.ops.write(fh, 0, b"new")
        assert await t.close(fh) == errno.EIO
        (rec,) = [json.loads(p.read_text()) for p in spool.glob("*.json")]
        assert rec["replace_id"] == old[0] and rec["temp_name"] and rec["datafile_id"]
        # both exist now: nothing was lost
        assert datafiles_named(fresh_emu, ds, "swap.txt")
        assert datafiles_named(fresh_emu, ds, rec["temp_name"])

    t1.run(first, wait=0.2)
    fresh_emu.faults.clear()
    puts = fresh_emu.counters.get("ids/put")
    t2 = wtree(fresh_emu, replace=True, spool=spool)

    async def second(t: WriteTree) -> None:
        assert await t.read_file(f"{DS}/swap.txt") == b"new"   # the pending upload shows
        await t.settle()
        (row,) = datafiles_named(fresh_emu, state["ds"], "swap.txt")
        assert row[0] != state["old"] and stored_bytes(fresh_emu, row[0]) == b"new"
        assert fresh_emu.counters.get("ids/put") == puts

    t2.run(second)


def test_replace_open_without_change_replaces_nothing(fresh_emu, wtree) -> None:
    """touch of an existing datafile (--replace): no download, no upload, only the time;
    O_TRUNC without writes stores the empty file; the first write fetches the old bytes."""
    t = wtree(fresh_emu, replace=True)

    async def body(t: WriteTree) -> None:
        ds = await dataset_id(t)
        assert await t.write_file(f"{DS}/keep.dat", b"0123456789") == 0
        (old,) = datafiles_named(fresh_emu, ds, "keep.dat")
        fresh_emu.counters.reset()
        fh = await t.open(f"{DS}/keep.dat", os.O_WRONLY)
        fields = setattr_fields(mtime=True)
        attr = pyfuse3.EntryAttributes()
        attr.st_mtime_ns = 1_234_567_890_000_000_000
        await t.ops.setattr(await t.ino(f"{DS}/keep.dat"), attr, fields, fh, t.ctx)
        assert await t.close(fh) == 0
        await t.settle()
        assert fresh_emu.counters.get("ids/put") == 0
        assert fresh_emu.counters.get("ids/getData") == 0
        assert [r[0] for r in datafiles_named(fresh_emu, ds, "keep.dat")] == [old[0]]
        assert (await t.walk(f"{DS}/keep.dat")).st_mtime_ns == 1_234_567_890_000_000_000
        # a write in the middle: the old bytes come first; the size is the old one before
        fh = await t.open(f"{DS}/keep.dat", os.O_RDWR)
        assert (await t.walk(f"{DS}/keep.dat")).st_size == 10
        await t.ops.write(fh, 4, b"ab")
        assert await t.ops.read(fh, 0, 100) == b"0123ab6789"
        assert await t.close(fh) == 0
        (row,) = datafiles_named(fresh_emu, ds, "keep.dat")
        assert stored_bytes(fresh_emu, row[0]) == b"0123ab6789"
        # O_TRUNC and nothing written: the file is empty now
        fh = await t.open(f"{DS}/keep.dat", os.O_WRONLY | os.O_TRUNC)
        assert await t.close(fh) == 0
        await t.settle()
        (row,) = datafiles_named(fresh_emu, ds, "keep.dat")
        assert row[1] == 0 and stored_bytes(fresh_emu, row[0]) == b""

    t.run(body)

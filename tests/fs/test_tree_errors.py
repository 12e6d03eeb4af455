"""Errors become errno values through the one table; nothing but FUSEError escapes."""

from __future__ import annotations

import errno
import logging

import pyfuse3
import pytest
import trio
from fshelp import DEMO_VISIT, Tree, login

from idsfs import errors, naming
from idsfs.blockcache import BlockLengthError
from idsfs.fs import ERRNO_TABLE, errno_for
from idsfs.icat import ICATClient


def _server(cls: type[errors.ServerError]) -> errors.ServerError:
    return cls("message", 500)


@pytest.mark.parametrize(("exc", "code"), [
    (_server(errors.ICATSessionError), errno.EACCES),
    (_server(errors.ICATPrivilegesError), errno.EACCES),
    (_server(errors.IDSInsufficientPrivilegesError), errno.EACCES),
    (_server(errors.ICATNoObjectError), errno.ENOENT),
    (_server(errors.IDSNotFoundError), errno.ENOENT),
    (errors.RestoreTimeoutError("slow", 1, waited=3.0), errno.ENODATA),
    (errors.DataBusyError("busy", 1), errno.EBUSY),
    (errors.RestoreFailedError("failed", 1), errno.EIO),
    (errors.IncompleteDownloadError("short", 1, offset=5), errno.EIO),
    (_server(errors.IDSDataNotOnlineError), errno.ENODATA),
    (_server(errors.ICATObjectExistsError), errno.EEXIST),
    (_server(errors.ICATParameterError), errno.EINVAL),
    (_server(errors.ICATValidationError), errno.EINVAL),
    (_server(errors.IDSBadRequestError), errno.EINVAL),
    (naming.InvalidNameError("a%2Eb", "not canonical"), errno.EINVAL),
    (naming.NameTooLongError("x" * 300, "too long"), errno.ENAMETOOLONG),
    (_server(errors.IDSNotImplementedError), errno.EROFS),
    (_server(errors.IDSInsufficientStorageError), errno.ENOSPC),
    (errors.ConnectError("refused"), errno.EIO),
    (errors.TransportTimeoutError("slow"), errno.EIO),
    (_server(errors.IDSResponseError), errno.EIO),
    (_server(errors.ICATInternalError), errno.EIO),
    (BlockLengthError(1, 0, 0, 10, 5), errno.EIO),
    (RuntimeError("bug"), errno.EIO),
    (pyfuse3.FUSEError(errno.EXDEV), errno.EXDEV),
])
def test_errno_table(exc: BaseException, code: int) -> None:
    assert errno_for(exc) == code


def test_table_entries_are_exception_classes() -> None:
    for cls, code in ERRNO_TABLE:
        assert issubclass(cls, BaseException)
        assert code is None or code in errno.errorcode


def test_icat_500_is_eio_and_the_next_call_works(fresh_emu, tree) -> None:
    t = tree(fresh_emu)

    async def body(t: Tree) -> None:
        fresh_emu.faults.error(500, "icat/entityManager", count=1)
        with pytest.raises(pyfuse3.FUSEError) as info:
            await t.ops.opendir(pyfuse3.ROOT_INODE, t.ctx)
        assert info.value.errno == errno.EIO
        assert await t.names("") == ["DEMO"]

    t.run(body)


@pytest.mark.parametrize(("status", "code"), [(400, errno.EINVAL), (404, errno.ENOENT),
                                              (412, errno.EINVAL)])
def test_icat_error_codes(fresh_emu, tree, status: int, code: int) -> None:
    t = tree(fresh_emu)

    async def body(t: Tree) -> None:
        await t.names("DEMO")
        fresh_emu.faults.error(status, "icat/entityManager", count=1)
        with pytest.raises(pyfuse3.FUSEError) as info:
            await t.walk("DEMO/DEMO-2024-002/N%2FA/logs")
        assert info.value.errno == code
        assert (await t.walk("DEMO/DEMO-2024-002/N%2FA/logs")).st_ino != 0

    t.run(body)


def test_session_error_answer_logs_in_again(fresh_emu, tree) -> None:
    """ICAT answering SESSION (403) once: the client logs in again and the call works."""
    t = tree(fresh_emu)

    async def body(t: Tree) -> None:
        logins = fresh_emu.counters["icat/login"]
        fresh_emu.faults.error(403, "icat/entityManager", count=1)
        assert await t.names("") == ["DEMO"]
        assert fresh_emu.counters["icat/login"] == logins + 1

    t.run(body)


def test_expired_session_logs_in_again(fresh_emu, tree) -> None:
    t = tree(fresh_emu)

    async def body(t: Tree) -> None:
        assert await t.names("") == ["DEMO"]
        fresh_emu.expire_sessions()
        logins = fresh_emu.counters["icat/login"]
        assert await t.names("DEMO") == ["DEMO-2024-001", "DEMO-2024-002", "DEMO-2025-003"]
        assert fresh_emu.counters["icat/login"] == logins + 1

    t.run(body)


def test_expired_session_without_credentials_is_eacces(fresh_emu, tree) -> None:
    adopted = ICATClient(fresh_emu.icat_url, sessionId=fresh_emu.login("alice"))
    t = tree(fresh_emu, icat=adopted)

    async def body(t: Tree) -> None:
        assert await t.names("") == ["DEMO"]
        fresh_emu.expire_sessions()
        with pytest.raises(pyfuse3.FUSEError) as info:
            await t.walk("DEMO/DEMO-2024-001")
        assert info.value.errno == errno.EACCES

    t.run(body)


def test_unreachable_icat_is_eio(fresh_emu, tree) -> None:
    client = login(fresh_emu, "alice", retries=0, timeout=2.0)
    t = tree(fresh_emu, icat=client)

    async def body(t: Tree) -> None:
        assert await t.names("") == ["DEMO"]
        fresh_emu.stop()
        t.catalog.invalidate_all()
        for call in (t.ops.opendir(pyfuse3.ROOT_INODE, t.ctx),
                     t.ops.lookup(pyfuse3.ROOT_INODE, b"DEMO", t.ctx),
                     t.ops.getattr(pyfuse3.ROOT_INODE, t.ctx)):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await call
            assert info.value.errno == errno.EIO

    t.run(body)


def test_a_bad_row_is_eio(fresh_emu, tree, caplog) -> None:
    """An unusable ICAT answer (here: a page that is not the tuples asked for) is EIO."""
    t = tree(fresh_emu)

    async def body(t: Tree) -> None:
        original = t.icat.search

        def broken(query: str) -> list:
            return [("not an id",)] if "FROM Facility" in query else original(query)

        t.icat.search = broken  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="idsfs.fs"), \
                pytest.raises(pyfuse3.FUSEError) as info:
            await t.ops.opendir(pyfuse3.ROOT_INODE, t.ctx)
        assert info.value.errno == errno.EIO
        assert "ICATResponseError" in caplog.text

    t.run(body)


class _BrokenTransfer:
    """A read path with a bug: every call raises something no table row knows."""

    async def open(self, datafile: object) -> object:
        raise RuntimeError("bug in open")

    async def status(self, datafile: object) -> str:
        raise KeyError("bug in status")


def test_unexpected_exceptions_become_eio_with_a_traceback(demo_emu, tree, caplog) -> None:
    t = tree(demo_emu, transfer=_BrokenTransfer())

    async def body(t: Tree) -> None:
        tiny = await t.ino(f"{DEMO_VISIT}/raw/tiny.txt")
        with caplog.at_level(logging.ERROR, logger="idsfs.fs"):
            for call in (t.ops.open(tiny, 0, t.ctx),
                         t.ops.getxattr(tiny, b"user.ids.status", t.ctx)):
                with pytest.raises(pyfuse3.FUSEError) as info:
                    await call
                assert info.value.errno == errno.EIO
        records = [r for r in caplog.records if r.name == "idsfs.fs"]
        assert len(records) == 2
        assert all(r.exc_info is not None for r in records)
        assert "RuntimeError" in caplog.text and "KeyError" in caplog.text

    t.run(body)


def test_forget_never_raises(demo_emu, tree, caplog) -> None:
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        with caplog.at_level(logging.ERROR, logger="idsfs.fs"):
            await t.ops.forget([(12345,)])  # type: ignore[list-item]
        assert "forget failed" in caplog.text

    t.run(body)


def test_bad_handles(demo_emu, tree) -> None:
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await t.ops.read(999, 0, 10)
        assert info.value.errno == errno.EBADF
        await t.ops.release(999)
        await t.ops.releasedir(999)
        for call in (t.ops.getattr(424242, t.ctx), t.ops.opendir(424242, t.ctx),
                     t.ops.lookup(424242, b"x", t.ctx)):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await call
            assert info.value.errno == errno.ENOENT
        tiny = await t.ino(f"{DEMO_VISIT}/raw/tiny.txt")
        with pytest.raises(pyfuse3.FUSEError) as info:
            await t.ops.opendir(tiny, t.ctx)
        assert info.value.errno == errno.ENOTDIR
        with pytest.raises(pyfuse3.FUSEError) as info:
            await t.ops.open(await t.ino(DEMO_VISIT), 0, t.ctx)
        assert info.value.errno == errno.EISDIR
        with pytest.raises(pyfuse3.FUSEError) as info:  # no transfer configured
            await t.ops.open(tiny, 0, t.ctx)
        assert info.value.errno == errno.ENOSYS

    t.run(body)


def test_cancellation_is_not_swallowed(fresh_emu, tree) -> None:
    """A cancelled handler ends with trio.Cancelled, not with a FUSEError."""
    t = tree(fresh_emu)

    async def body(t: Tree) -> None:
        fresh_emu.faults.latency(1.0, "icat/entityManager", count=1)
        with trio.move_on_after(0.1) as scope:
            await t.ops.opendir(pyfuse3.ROOT_INODE, t.ctx)
        assert scope.cancelled_caught
        assert await t.names("") == ["DEMO"]

    t.run(body)

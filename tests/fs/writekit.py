"""Helpers of the write-path handler tests: the file system with an Uploader, under trio.

:class:`WriteTree` builds what the daemon builds for a read-write mount (ICAT
client logged in over HTTP to an in-process emulator, ThreadBridge, Catalog,
Transfer, IDSClient, Uploader with a spool directory, Operations with
``read_only=False``) and runs the uploader's and the transfer's background
tasks in a nursery around the test body. Only the kernel is missing: handlers
are called directly (see tests/fs/conftest.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import trio
from fshelp import DEMO_VISIT, GID, PASSWORDS, UID, login

from idsfs.aio import ThreadBridge
from idsfs.blockcache import BlockCache
from idsfs.catalog import Catalog
from idsfs.emulator import Emulator
from idsfs.fs import Operations
from idsfs.icat import ICATClient
from idsfs.ids import DataSelection, IDSClient
from idsfs.transfer import Transfer
from idsfs.upload import Uploader

__all__ = ["DEMO_VISIT", "PASSWORDS", "WriteTree", "crc_hex", "datafiles_named", "fuse_errno",
           "setattr_fields", "stored_bytes", "write_trees"]


class WriteTree:
    """A read-write file system of one user, driven through its handlers."""

    def __init__(self, emu: Emulator, spool: Path, user: str = "alice", *,
                 replace: bool = False, read_only: bool = False, metadata_ttl: float = 60.0,
                 datafile_format: str = "binary", dataset_type: str = "processed",
                 online_wait: float = 0.5, retry_delay: float = 0.05,
                 live_threshold: int = 1 << 20, max_live: int = 2,
                 icat: ICATClient | None = None) -> None:
        self.emu = emu
        self.spool = spool
        self.user = user
        self.icat = icat or login(emu, user)
        self.options = dict(replace=replace, read_only=read_only)
        self.metadata_ttl = metadata_ttl
        self.datafile_format = datafile_format
        self.dataset_type = dataset_type
        self.online_wait = online_wait
        self.retry_delay = retry_delay
        self.live_threshold = live_threshold
        self.max_live = max_live
        self.ctx = pyfuse3.RequestContext()
        self.ops: Operations
        self.catalog: Catalog
        self.uploader: Uploader
        self.ids: IDSClient
        self.renewals = 0

    def shutdown(self) -> None:
        """Log out of the test's ICAT client."""
        self.icat.close()

    async def _renew(self) -> bool:
        """Like the daemon's renew_session: ask ICAT (which re-logs in), pass the id on."""
        self.renewals += 1
        before = self.ids.sessionId
        with contextlib.suppress(Exception):
            await trio.to_thread.run_sync(self.icat.session_info)
        self.ids.sessionId = self.icat.sessionId
        return self.ids.sessionId != before

    def run(self, body: Callable[[WriteTree], Awaitable[Any]], *, wait: float = 5.0) -> Any:
        """Build the stack inside trio, run ``body(self)``, close the uploader (``wait``)."""

        async def main() -> Any:
            bridge = ThreadBridge()
            self.catalog = Catalog(self.icat, bridge, metadata_ttl=self.metadata_ttl)
            self.ids = IDSClient(self.emu.ids_url, sessionId=self.icat.sessionId)
            self.icat.add_session_listener(
                lambda sid: setattr(self.ids, "sessionId", sid) if sid else None)
            transfer = Transfer(self.ids, bridge, BlockCache(8 << 20, 64 << 10),
                                restore_wait=5.0, poll_interval=0.02, max_poll_interval=0.1)
            self.uploader = Uploader(
                self.ids, self.icat, bridge, self.spool, datafile_format=self.datafile_format,
                owner=f"{self.emu.icat_url} {self.user}", retry_delay=self.retry_delay,
                max_retry_delay=0.5, online_wait=self.online_wait, renew_session=self._renew,
                live_threshold=self.live_threshold, max_live=self.max_live, live_stall=5.0)
            self.uploader.open_spool()
            self.ops = Operations(self.catalog, transfer, uid=UID, gid=GID,
                                  uploader=self.uploader, dataset_type=self.dataset_type,
                                  **self.options)
            async with trio.open_nursery() as nursery:
                await nursery.start(transfer.run)
                await nursery.start(self.uploader.run)
                try:
                    return await body(self)
                finally:
                    with trio.CancelScope(shield=True):
                        await self.uploader.aclose(wait)
                        await transfer.aclose()
                    nursery.cancel_scope.cancel()

        try:
            return trio.run(main)
        finally:
            self.ids.close()

    # -- handler helpers ----------------------------------------------------------------

    async def lookup(self, parent: int, name: str | bytes) -> pyfuse3.EntryAttributes:
        raw = name.encode() if isinstance(name, str) else name
        return await self.ops.lookup(parent, raw, self.ctx)

    async def walk(self, path: str) -> pyfuse3.EntryAttributes:
        """Look up every component of ``path``; FUSEError(ENOENT) on a miss."""
        attr = await self.ops.getattr(pyfuse3.ROOT_INODE, self.ctx)
        for part in [p for p in path.split("/") if p]:
            attr = await self.lookup(attr.st_ino, part)
            if attr.st_ino == 0:
                raise pyfuse3.FUSEError(errno.ENOENT)
        return attr

    async def ino(self, path: str) -> int:
        return (await self.walk(path)).st_ino

    async def exists(self, path: str) -> bool:
        try:
            await self.walk(path)
            return True
        except pyfuse3.FUSEError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise

    async def names(self, path: str) -> list[str]:
        ino = await self.ino(path)
        fh = await self.ops.opendir(ino, self.ctx)
        out: list[str] = []
        try:
            start = 0
            while True:
                from fshelp import Token

                token = Token(50)
                await self.ops.readdir(fh, start, token)  # type: ignore[arg-type]
                out.extend(n.decode() for n, _, _ in token.entries if n not in (b".", b".."))
                if len(token.entries) < 50:
                    return out
                start = token.entries[-1][2]
        finally:
            await self.ops.releasedir(fh)

    async def create(self, path: str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     mode: int = 0o644) -> tuple[int, int]:
        """``create`` the file at ``path``; return ``(fh, ino)``."""
        parent, _, name = path.rpartition("/")
        pino = await self.ino(parent)
        info, attr = await self.ops.create(pino, name.encode(), mode, flags, self.ctx)
        return info.fh, attr.st_ino

    async def open(self, path: str, flags: int) -> int:
        info = await self.ops.open(await self.ino(path), flags, self.ctx)
        return info.fh

    async def write_all(self, fh: int, data: bytes, offset: int = 0,
                        block: int = 128 * 1024) -> None:
        view = memoryview(data)
        for start in range(0, len(view), block):
            chunk = bytes(view[start:start + block])
            assert await self.ops.write(fh, offset + start, chunk) == len(chunk)

    async def close(self, fh: int) -> int:
        """flush + release like close(2); return the errno of the flush (0 when it succeeded)."""
        try:
            await self.ops.flush(fh)
            code = 0
        except pyfuse3.FUSEError as exc:
            code = exc.errno
        await self.ops.release(fh)
        return code

    async def write_file(self, path: str, data: bytes, **kw: Any) -> int:
        """Create, write, close; return the flush's errno (0 = stored)."""
        fh, _ = await self.create(path, **kw)
        await self.write_all(fh, data)
        return await self.close(fh)

    async def read_file(self, path: str) -> bytes:
        ino = await self.ino(path)
        info = await self.ops.open(ino, os.O_RDONLY, self.ctx)
        out = bytearray()
        try:
            while True:
                chunk = await self.ops.read(info.fh, len(out), 1 << 20)
                if not chunk:
                    return bytes(out)
                out += chunk
        finally:
            await self.ops.release(info.fh)

    async def xattr(self, path: str, name: str) -> str:
        value = await self.ops.getxattr(await self.ino(path), name.encode(), self.ctx)
        return value.decode("utf-8", "surrogatepass")

    async def upload_started(self, name: str, timeout: float = 5.0) -> None:
        """Wait until the uploader is storing ``name`` (e.g. closed unwritten: in the
        background)."""
        with trio.fail_after(timeout):
            while not any(up.in_progress and up.name == name
                          for up in self.uploader.uploads.values()):
                await trio.sleep(0.005)

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until every upload landed and left the spool, or is held (failed, conflict)."""
        with trio.fail_after(timeout):
            while any(up.state not in ("failed", "conflict")
                      for up in self.uploader.uploads.values()):
                await trio.sleep(0.02)


#: the demo dataset the write tests write into
DS = f"{DEMO_VISIT}/raw"


async def dataset_id(t: WriteTree, path: str = DS) -> int:
    """The ICAT id of the dataset directory ``path`` (its ``user.ids.id``)."""
    return int(await t.xattr(path, "user.ids.id"))


@contextlib.contextmanager
def write_trees(tmp_path: Path) -> Iterator[Callable[..., WriteTree]]:
    """Factory ``make(emulator, user="alice", *, spool=None, **options)`` of
    :class:`WriteTree`s whose spool is under ``tmp_path``; their ICAT clients are
    closed at the end (the ``wtree`` fixture of conftest.py)."""
    made: list[WriteTree] = []

    def make(emu: Emulator, user: str = "alice", *, spool: Path | None = None,
             **options: Any) -> WriteTree:
        t = WriteTree(emu, spool or tmp_path / f"spool-{user}", user, **options)
        made.append(t)
        return t

    try:
        yield make
    finally:
        for t in made:
            t.shutdown()


def setattr_fields(**changed: bool) -> Any:
    """A stand-in for ``pyfuse3.SetattrFields`` (whose attributes Python cannot set)."""
    from types import SimpleNamespace

    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
             "update_gid", "update_size")
    return SimpleNamespace(**{n: bool(changed.get(n.removeprefix("update_"))) for n in names})


def fuse_errno(exc: BaseException) -> int:
    assert isinstance(exc, pyfuse3.FUSEError), exc
    return exc.errno


def datafiles_named(emu: Emulator, dataset_id: int, name: str) -> list[tuple[Any, ...]]:
    """Every Datafile of that name in the dataset, as root sees them (id, size, checksum,
    location)."""
    root = login(emu, "root")
    try:
        from idsfs.icat import quote

        return root.search(
            f"SELECT df.id, df.fileSize, df.checksum, df.location FROM Datafile df "
            f"WHERE df.dataset.id = {dataset_id} AND df.name = {quote(name)}")
    finally:
        root.close()


def stored_bytes(emu: Emulator, datafile_id: int) -> bytes:
    """The bytes IDS serves for a datafile (read as root, independent of the mount)."""
    root = login(emu, "root")
    try:
        ids = IDSClient(emu.ids_url, sessionId=root.sessionId)
        try:
            with ids.getData(DataSelection({"datafileIds": [datafile_id]})) as stream:
                return stream.read()
        finally:
            ids.close()
    finally:
        root.close()


def crc_hex(data: bytes) -> str:
    """The checksum ICAT stores for ``data`` (CRC32, lower-case hex, no leading zeros)."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:x}"

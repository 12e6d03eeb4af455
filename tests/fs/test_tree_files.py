"""open/read/release wiring, keep_cache across opens and user.ids.status, with the real
read path (idsfs.transfer) on the emulator."""

from __future__ import annotations

import errno
from pathlib import Path

import pyfuse3
import pytest
from fshelp import DEMO_VISIT, FakeClock, Tree, login, settings

from idsfs.aio import ThreadBridge
from idsfs.blockcache import BlockCache
from idsfs.emulator import Emulator, demo
from idsfs.ids import IDSClient
from idsfs.transfer import Transfer


def real_transfer(t: Tree, bridge: ThreadBridge) -> Transfer:
    ids = IDSClient(t.emu.ids_url, sessionId=t.icat.sessionId)
    return Transfer(ids, bridge, BlockCache(8 << 20, 64 << 10), restore_wait=5.0,
                    poll_interval=0.02, max_poll_interval=0.1)


def spec_of(emu: Emulator, dataset: str, name: str) -> demo.FileSpec:
    for inv in demo.plan(emu.settings.seed, emu.settings.demo_large_size):
        if inv.name == "DEMO-2024-001" and inv.visit_id == "1":
            for ds in inv.datasets:
                if ds.name == dataset:
                    return next(s for s in ds.files if s.name == name)
    raise LookupError(name)


def test_open_read_release(demo_emu, tree) -> None:
    t = tree(demo_emu, transfer=real_transfer)
    spec = spec_of(demo_emu, "raw", "block+1.bin")

    async def body(t: Tree) -> None:
        ino = await t.ino(f"{DEMO_VISIT}/raw/block+1.bin")
        demo_emu.counters.reset()
        info = await t.ops.open(ino, 0, t.ctx)
        assert demo_emu.counters.total("ids/*") == 0  # open makes no IDS call
        seed = demo_emu.settings.seed
        data = await t.ops.read(info.fh, 0, 4096)
        assert bytes(data) == demo.expected_bytes(seed, spec, 0, 4096)
        tail = await t.ops.read(info.fh, spec.size - 10, 4096)
        assert bytes(tail) == demo.expected_bytes(seed, spec, spec.size - 10, 10)
        assert bytes(await t.ops.read(info.fh, spec.size, 4096)) == b""
        await t.ops.release(info.fh)
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await t.ops.read(info.fh, 0, 10)
        assert exc.value.errno == errno.EBADF

    t.run(body)


def test_keep_cache_only_while_the_datafile_is_unchanged(fresh_emu, tree) -> None:
    clock = FakeClock()
    t = tree(fresh_emu, transfer=real_transfer, metadata_ttl=5.0, clock=clock)
    root = login(fresh_emu, "root")

    async def body(t: Tree) -> None:
        ino = await t.ino(f"{DEMO_VISIT}/raw/tiny.txt")
        fid = int((await t.xattrs(ino))["user.ids.id"])

        async def open_close() -> bool:
            info = await t.ops.open(ino, 0, t.ctx)
            await t.ops.read(info.fh, 0, 10)
            await t.ops.release(info.fh)
            return bool(info.keep_cache)

        assert await open_close() is False  # first open: nothing to keep
        assert await open_close() is True
        clock.advance(6.0)  # a refetch that shows no change keeps the cache
        assert await open_close() is True
        root.update({"Datafile": {"id": fid, "description": "changed"}})  # new modTime
        assert await open_close() is True  # not seen yet (TTL)
        clock.advance(6.0)
        assert await open_close() is False
        assert await open_close() is True
        # the kernel forgot the inode: its pages are gone, the next open starts over
        await t.ops.forget([(ino, t.ops.lookup_count(ino))])
        ino2 = await t.ino(f"{DEMO_VISIT}/raw/tiny.txt")
        assert ino2 == ino
        assert await open_close() is False

    try:
        t.run(body)
    finally:
        root.close()


def test_open_of_a_deleted_datafile(fresh_emu, tree) -> None:
    clock = FakeClock()
    t = tree(fresh_emu, transfer=real_transfer, metadata_ttl=5.0, clock=clock)
    root = login(fresh_emu, "root")

    async def body(t: Tree) -> None:
        ino = await t.ino(f"{DEMO_VISIT}/raw/one byte.bin")
        fid = int((await t.xattrs(ino))["user.ids.id"])
        root.delete({"Datafile": {"id": fid}})
        clock.advance(6.0)
        with pytest.raises(pyfuse3.FUSEError) as info:
            await t.ops.open(ino, 0, t.ctx)
        assert info.value.errno == errno.ENOENT

    try:
        t.run(body)
    finally:
        root.close()


def test_status_single_level(demo_emu, tree) -> None:
    t = tree(demo_emu, transfer=real_transfer)

    async def body(t: Tree) -> None:
        ino = await t.ino(f"{DEMO_VISIT}/raw/tiny.txt")
        names = await t.ops.listxattr(ino, t.ctx)
        assert b"user.ids.status" in names
        assert await t.ops.getxattr(ino, b"user.ids.status", t.ctx) == b"ONLINE"
        # directories have no status
        raw = await t.ino(f"{DEMO_VISIT}/raw")
        assert b"user.ids.status" not in await t.ops.listxattr(raw, t.ctx)

    t.run(body)


def test_status_two_level_archived(tmp_path: Path, tree) -> None:
    with Emulator(settings(tmp_path / "data", demo=True, storage="dataset")) as emu:
        t = tree(emu, transfer=real_transfer)

        async def body(t: Tree) -> None:
            emu.counters.reset()
            archived = await t.ino(f"{DEMO_VISIT}/processed data/it's mine.txt")
            assert emu.counters.total("ids/*") == 0  # listing never asks IDS
            status = await t.ops.getxattr(archived, b"user.ids.status", t.ctx)
            assert status == b"ARCHIVED"
            assert emu.counters["ids/getStatus"] == 1

        t.run(body)

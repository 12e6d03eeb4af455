"""Helpers of the transfer tests (tests/unit/test_transfer*.py): a populated
emulator, a Transfer wired to it, and a runner for trio test bodies."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from idsfs.aio import ThreadBridge
from idsfs.blockcache import BlockCache
from idsfs.icat import ICATClient
from idsfs.ids import DataSelection, IDSClient
from idsfs.model import (
    Datafile,
    DatafileFormat,
    Dataset,
    DatasetType,
    Facility,
    Investigation,
    InvestigationType,
)
from idsfs.transfer import Transfer

KiB = 1024
MiB = 1024 * 1024


@dataclass
class World:
    """An emulator with one investigation, datasets and datafiles of known bytes."""

    emu: Any
    icat: ICATClient
    ids: IDSClient
    sid: str
    fmt: int
    inv: int
    datasets: dict[str, int] = field(default_factory=dict)
    content: dict[int, bytes] = field(default_factory=dict)  # datafile id -> bytes
    ids_by_name: dict[str, int] = field(default_factory=dict)

    def put(self, name: str, data: bytes, dataset: str = "ds1") -> Datafile:
        """Store a datafile through IDS put; return its ICAT record."""
        if dataset not in self.datasets:
            dt = self.icat.search("SELECT t FROM DatasetType t")[0]
            self.datasets[dataset] = self.icat.create(Dataset(
                name=dataset, investigation=Investigation(id=self.inv), type=dt,
                complete=False))
        df_id = self.ids.put(data, name, self.datasets[dataset], self.fmt)
        self.content[df_id] = data
        self.ids_by_name[name] = df_id
        return self.datafile(df_id)

    def datafile(self, df_id: int) -> Datafile:
        return self.icat.get(Datafile, df_id)

    def client(self, **kw: Any) -> IDSClient:
        kw.setdefault("backoff", 0.01)
        kw.setdefault("timeout", (5.0, 5.0))
        return IDSClient(self.emu.ids_url, self.sid, **kw)

    def wait_idle(self, timeout: float = 20.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while self.ids.getServiceStatus()["opsQueue"]:
            assert time.monotonic() < deadline, "IDS did not become idle"
            time.sleep(0.01)

    def archive(self, df: Datafile) -> None:
        self.wait_idle()
        self.ids.archive(DataSelection({"datafileIds": [df.id]}))
        self.wait_idle()
        assert self.ids.getStatus(DataSelection({"datafileIds": [df.id]})) == "ARCHIVED"


def make_world(emu: Any) -> World:
    icat = ICATClient(emu.icat_url, backoff=0.01)
    sid = icat.login("simple", {"username": "root", "password": "root-secret"})
    fac = Facility(id=icat.create(Facility(name="F")))
    it = InvestigationType(id=icat.create(InvestigationType(name="exp", facility=fac)))
    icat.create(DatasetType(name="raw", facility=fac))
    fmt = icat.create(DatafileFormat(name="bin", version="1", facility=fac))
    inv = icat.create(Investigation(name="I", visitId="1", title="t", facility=fac, type=it))
    ids = IDSClient(emu.ids_url, sid, backoff=0.01)
    return World(emu=emu, icat=icat, ids=ids, sid=sid, fmt=fmt, inv=inv)


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def make_transfer(ids: IDSClient, *, capacity: int = 64 * MiB, block_size: int = 64 * KiB,
                  threads: int = 16, **kw: Any) -> Transfer:
    """A Transfer with quick test timings (overridable)."""
    kw.setdefault("restore_wait", 10.0)
    kw.setdefault("poll_interval", 0.02)
    kw.setdefault("max_poll_interval", 0.1)
    kw.setdefault("resume_backoff", 0.01)
    kw.setdefault("busy_wait", 2.0)
    return Transfer(ids, ThreadBridge(threads), BlockCache(capacity, block_size), **kw)


@asynccontextmanager
async def running(transfer: Transfer) -> AsyncIterator[Transfer]:
    """Run ``transfer`` in a nursery for the body; closed afterwards."""
    async with trio.open_nursery() as nursery:
        await nursery.start(transfer.run)
        try:
            yield transfer
        finally:
            await transfer.aclose()


def run(fn: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    """Run an async test body under trio with an overall time limit."""

    async def main() -> None:
        with trio.fail_after(timeout):
            await fn()

    trio.run(main)


async def read_all(reader: Any, chunk: int = 128 * KiB) -> bytes:
    out = bytearray()
    offset = 0
    while True:
        view = await reader.read(offset, chunk)
        if not len(view):
            return bytes(out)
        out += view
        offset += len(view)

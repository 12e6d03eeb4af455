"""Helpers of the handler-level tests (see conftest.py): the Tree driver, odd data."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from idsfs.aio import ThreadBridge
from idsfs.catalog import Catalog
from idsfs.emulator import Emulator, EmulatorSettings
from idsfs.fs import Operations
from idsfs.icat import ICATClient

PASSWORDS = {"root": "root-pw", "alice": "alice-pw", "bob": "bob-pw"}
UID, GID = 1234, 5678
#: the first visit of the demo data
DEMO_VISIT = "DEMO/DEMO-2024-001/1"


def settings(data_dir: Path, **overrides: Any) -> EmulatorSettings:
    values: dict[str, Any] = {
        "users": PASSWORDS,
        "roots": {"root"},
        "data_dir": data_dir,
        "queue_interval": 0.02,
        "demo": False,
        "demo_large_size": 1024 * 1024,
    }
    values.update(overrides)
    return EmulatorSettings(**values)


def login(emu: Emulator, user: str, **options: Any) -> ICATClient:
    client = ICATClient(emu.icat_url, **options)
    client.login("simple", {"username": user, "password": PASSWORDS[user]})
    return client


# ----------------------------------------------------------------------------- readdir



@dataclass
class Token:
    """Stands for the kernel's readdir buffer: takes ``capacity`` entries."""

    capacity: int
    entries: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = field(default_factory=list)


def fake_readdir_reply(token: Token, name: bytes, attr: pyfuse3.EntryAttributes,
                       next_id: int) -> bool:
    assert isinstance(name, bytes)
    if len(token.entries) >= token.capacity:
        return False
    token.entries.append((name, attr, next_id))
    return True


def attrs(attr: pyfuse3.EntryAttributes) -> dict[str, Any]:
    """EntryAttributes as a dict (with the timeouts)."""
    out = dict(attr.__getstate__())
    out["entry_timeout"] = attr.entry_timeout
    out["attr_timeout"] = attr.attr_timeout
    return out


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ----------------------------------------------------------------------------- tree


class Tree:
    """The file system of one session, driven through its handlers."""

    def __init__(self, emu: Emulator, icat: ICATClient, *, transfer: Any = None,
                 metadata_ttl: float = 60.0, page_size: int = 1000,
                 clock: Callable[[], float] | None = None) -> None:
        self.emu = emu
        self.icat = icat
        self.transfer = transfer
        self.ttl = metadata_ttl
        self.page_size = page_size
        self.clock = clock
        self.ctx = pyfuse3.RequestContext()
        self.ops: Operations
        self.catalog: Catalog

    def run(self, body: Callable[[Tree], Awaitable[Any]]) -> Any:
        """Build bridge, catalogue and operations inside trio and run ``body(self)``."""

        async def main() -> Any:
            bridge = ThreadBridge()
            options: dict[str, Any] = {"metadata_ttl": self.ttl, "page_size": self.page_size}
            if self.clock is not None:
                options["clock"] = self.clock
            self.catalog = Catalog(self.icat, bridge, **options)
            built = callable(self.transfer) and not hasattr(self.transfer, "open")
            transfer = self.transfer(self, bridge) if built else self.transfer
            self.ops = Operations(self.catalog, transfer, uid=UID, gid=GID)
            try:
                return await body(self)
            finally:
                if built and hasattr(transfer, "aclose"):
                    await transfer.aclose()

        return trio.run(main)

    # -- handler helpers ----------------------------------------------------------------

    async def lookup(self, parent: int, name: str | bytes) -> pyfuse3.EntryAttributes:
        raw = name.encode() if isinstance(name, str) else name
        return await self.ops.lookup(parent, raw, self.ctx)

    async def walk(self, path: str | list[str]) -> pyfuse3.EntryAttributes:
        """Look up every component of ``path`` from the root; FUSEError(ENOENT) on a miss."""
        parts = path if isinstance(path, list) else [p for p in path.split("/") if p]
        attr = await self.ops.getattr(pyfuse3.ROOT_INODE, self.ctx)
        for part in parts:
            attr = await self.lookup(attr.st_ino, part)
            if attr.st_ino == 0:
                raise pyfuse3.FUSEError(errno.ENOENT)
        return attr

    async def ino(self, path: str) -> int:
        return (await self.walk(path)).st_ino

    async def readdir_all(self, ino: int, capacity: int = 7
                          ) -> list[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        """opendir, readdir in chunks of ``capacity``, releasedir."""
        fh = await self.ops.opendir(ino, self.ctx)
        try:
            return await self.readdir_from(fh, 0, capacity=capacity, until_end=True)
        finally:
            await self.ops.releasedir(fh)

    async def readdir_from(self, fh: int, start: int, *, capacity: int = 7,
                           until_end: bool = False
                           ) -> list[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        out: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = []
        while True:
            token = Token(capacity)
            await self.ops.readdir(fh, start, token)  # type: ignore[arg-type]
            out.extend(token.entries)
            if not until_end or len(token.entries) < capacity:
                return out
            start = token.entries[-1][2]

    async def names(self, path: str) -> list[str]:
        """File names in a directory (without . and ..)."""
        entries = await self.readdir_all(await self.ino(path))
        return [n.decode() for n, _, _ in entries if n not in (b".", b"..")]

    async def xattrs(self, ino: int) -> dict[str, str]:
        names = await self.ops.listxattr(ino, self.ctx)
        return {n.decode(): (await self.ops.getxattr(ino, n, self.ctx)).decode(
            "utf-8", "surrogatepass") for n in names}



# ----------------------------------------------------------------------------- odd data


@dataclass
class Odd:
    """Ids of what :func:`populate_odd` made."""

    facility: int
    investigations: dict[str, int] = field(default_factory=dict)
    datasets: dict[str, int] = field(default_factory=dict)
    datafiles: dict[str, int] = field(default_factory=dict)
    dataset_type: int = 0
    investigation_type: int = 0


#: datasets of investigation "odd"/"v1": dataset name -> datafile names
ODD_DATASETS: dict[str, list[str]] = {
    "clash": ["a", "a/b", "a/c"],
    "slashes": ["x//y", "/abs/path/x", "dir/", "a/b/", "/", "a/../b", "a/./b"],
    "percent": ["50% done", "my%20file.pdf", "%2F", "%FF", "%FD"],
    "nul": ["a\x00b"],
    "long": ["n" * 255, "é" * 130 + ".dat", "日本" * 100],
    "..": ["inside dotdot"],
    ".": ["inside dot"],
    "": ["inside empty"],
    "N/A": ["inside slash"],
    "日本" * 100: ["inside long"],
}


def populate_odd(emu: Emulator) -> Odd:
    """Create the odd-name data as root (datafiles get a fake location)."""
    root = login(emu, "root")
    try:
        fac = root.create({"Facility": {"name": "ODD"}})
        odd = Odd(facility=fac)
        odd.investigation_type = root.create(
            {"InvestigationType": {"name": "t", "facility": {"id": fac}}})
        odd.dataset_type = root.create({"DatasetType": {"name": "t", "facility": {"id": fac}}})
        users = {name: root.create({"User": {"name": f"simple/{name}"}})
                 for name in ("alice", "bob")}

        def investigation(name: str, visit: str, members: tuple[str, ...]) -> int:
            iid = root.create({"Investigation": {
                "name": name, "visitId": visit, "title": f"{name} {visit}",
                "facility": {"id": fac}, "type": {"id": odd.investigation_type}}})
            for member in members:
                root.create({"InvestigationUser": {
                    "role": "member", "user": {"id": users[member]},
                    "investigation": {"id": iid}}})
            odd.investigations[f"{name}|{visit}"] = iid
            return iid

        both = ("alice", "bob")
        main = investigation("odd", "v1", both)
        investigation("same", "a", both)
        investigation("same", "b", both)
        investigation("same", "N/A", both)
        investigation("..", ".", both)
        investigation("O'Neil\x00x", "1", both)
        investigation("é" * 200, "x", both)
        investigation("alice-only", "1", ("alice",))
        investigation("bob-only", "1", ("bob",))
        investigation("nobody", "1", ())
        for ds_name, files in ODD_DATASETS.items():
            did = root.create({"Dataset": {
                "name": ds_name, "complete": False, "investigation": {"id": main},
                "type": {"id": odd.dataset_type}, "description": f"dataset {ds_name!r}"}})
            odd.datasets[ds_name] = did
            for n, file_name in enumerate(files):
                fid = root.create({"Datafile": {
                    "name": file_name, "dataset": {"id": did}, "location": f"fake/{did}/{n}",
                    "fileSize": 100 + n, "checksum": f"{n:x}",
                    "description": f"file {n}", "doi": f"10.0/{did}.{n}",
                    "datafileModTime": "2024-01-02T03:04:05.678+00:00",
                    "datafileCreateTime": "2024-01-01T00:00:00.000+00:00"}})
                odd.datafiles[f"{ds_name}|{file_name}"] = fid
        # a datafile without location is not shown
        did = odd.datasets["clash"]
        odd.datafiles["clash|no location"] = root.create({"Datafile": {
            "name": "no location", "dataset": {"id": did}, "fileSize": 5}})
        return odd
    finally:
        root.close()

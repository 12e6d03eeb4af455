"""Helpers of the write-path mount tests (tests/mount/test_write*.py).

Everything is checked against the servers' state, read as root with idsfs's
own clients (independent of the mount): the Datafile rows in ICAT and the bytes
IDS serves for them.
"""

from __future__ import annotations

import json
import subprocess
import zlib
from pathlib import Path
from typing import Any

from mountharness import USERS

from idsfs.icat import ICATClient, quote
from idsfs.ids import DataSelection, IDSClient

DEMO_VISIT = "DEMO/DEMO-2024-001/1"
RAW = f"{DEMO_VISIT}/raw"


def run(*argv: str | Path, check: bool = True, timeout: float = 120,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command (text output); ``check`` raises with its stderr on failure."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, check=False, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({done.returncode}): {done.stderr}")
    return done


class Servers:
    """Root's view of an emulator's ICAT and IDS."""

    def __init__(self, emu: Any) -> None:
        self.emu = emu
        self.icat = ICATClient(emu.icat_url)
        self.icat.login("simple", {"username": "root", "password": USERS["root"]})
        self.ids = IDSClient(emu.ids_url, sessionId=self.icat.sessionId)

    def close(self) -> None:
        self.ids.close()
        self.icat.close()

    def dataset_id(self, visit_id: str, name: str, inv: str = "DEMO-2024-001") -> int:
        rows = self.icat.search(
            f"SELECT ds.id FROM Dataset ds WHERE ds.name = {quote(name)} AND "
            f"ds.investigation.name = {quote(inv)} AND ds.investigation.visitId = "
            f"{quote(visit_id)}")
        assert len(rows) == 1, rows
        return int(rows[0])

    def datafiles(self, dataset_id: int, name: str | None = None) -> list[tuple[Any, ...]]:
        """(id, name, fileSize, checksum, location) of the dataset's datafiles (by name)."""
        where = f"df.dataset.id = {dataset_id}"
        if name is not None:
            where += f" AND df.name = {quote(name)}"
        return self.icat.search(
            f"SELECT df.id, df.name, df.fileSize, df.checksum, df.location FROM Datafile df "
            f"WHERE {where} ORDER BY df.name")

    def names(self, dataset_id: int) -> set[str]:
        return {row[1] for row in self.datafiles(dataset_id)}

    def content(self, datafile_id: int) -> bytes:
        with self.ids.getData(DataSelection({"datafileIds": [datafile_id]})) as stream:
            return stream.read()

    def assert_stored(self, dataset_id: int, name: str, data: bytes) -> int:
        """Exactly one datafile ``name`` with these bytes (size, ICAT checksum, IDS content)."""
        rows = self.datafiles(dataset_id, name)
        assert len(rows) == 1, rows
        did, _, size, checksum, location = rows[0]
        assert size == len(data) and location
        assert checksum == f"{zlib.crc32(data) & 0xFFFFFFFF:x}"
        assert self.content(did) == data
        return int(did)


def spool_records(spool: Path) -> list[dict[str, Any]]:
    """The upload records in a spool directory."""
    return [json.loads(p.read_text()) for p in sorted(spool.glob("*.json"))]


def write_args(spool: Path, *extra: str) -> tuple[str, ...]:
    """``idsfs mount`` options of the write tests: own spool, quick retries, short wait."""
    return ("--spool-dir", str(spool), "--upload-retry", "0.2s", "--upload-wait", "10s",
            *extra)

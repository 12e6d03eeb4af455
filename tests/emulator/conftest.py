"""The standard fixture of behaviours.md for the IDS protocol tests (owned by the IDS part).

Facility ``F`` with DatasetType, InvestigationType and DatafileFormat ``test_format``/``42.0.0``;
investigation ``I`` (visitId ``N/A``) with ds1 {df1 (name ``a/df1_<ts>``), df2}, ds2 {df3, df4
(location contains ``Person's file``)} and empty ds3; every datafile 52 bytes of text with ICAT
``fileSize`` 52 and ``checksum`` = hex CRC32. Sessions ``root`` (ICAT root and IDS root user)
and ``forbidden`` (valid login, no rights). ``alice`` is a member of ``I``.

Two-level variants start with ds1 and ds2 archived (only in archive storage), ds3 empty.

* ``std_factory(storage="single", archived=True, **settings)`` builds one :class:`Std`.
* ``std`` — single-level; ``std2`` — two-level, parametrised over DATASET and DATAFILE;
  ``std_ds``/``std_df`` — one storage unit only.
"""

from __future__ import annotations

import io
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from emukit import ROOT_USER

from idsfs.emulator import Emulator
from idsfs.emulator.catalogue import READER
from idsfs.emulator.ids_api import storage_items

CONTENT = {
    n: f"df{n} test content very compressible very compressible".encode() for n in range(1, 5)
}


@dataclass
class Std:
    """A running emulator with the standard fixture and request helpers."""

    emu: Emulator
    http: requests.Session
    root: str
    forbidden: str
    alice: str
    fac: int
    inv: int
    ds1: int
    ds2: int
    ds3: int
    df1: int
    df2: int
    df3: int
    df4: int
    fmt: int
    ds_type: int
    names: dict[int, str] = field(default_factory=dict)
    locations: dict[int, str] = field(default_factory=dict)

    @property
    def ids(self) -> str:
        return self.emu.ids_url

    @property
    def dfs(self) -> list[int]:
        return [self.df1, self.df2, self.df3, self.df4]

    def content(self, df_id: int) -> bytes:
        return CONTENT[self.dfs.index(df_id) + 1]

    # ---------------------------------------------------------------- HTTP helpers
    def get(
        self,
        endpoint: str,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        **params: Any,
    ) -> requests.Response:
        return self.http.get(
            f"{self.ids}/{endpoint}",
            params=_params(params),
            headers=headers,
            stream=stream,
            timeout=30,
        )

    def post(self, endpoint: str, **data: Any) -> requests.Response:
        return self.http.post(f"{self.ids}/{endpoint}", data=_params(data), timeout=30)

    def delete(self, **params: Any) -> requests.Response:
        return self.http.delete(f"{self.ids}/delete", params=_params(params), timeout=30)

    def put(self, data: bytes, **params: Any) -> requests.Response:
        return self.http.put(
            f"{self.ids}/put",
            params=_params(params),
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
        )

    def upload(self, name: str, data: bytes, ds: int | None = None) -> int:
        r = self.put(
            data,
            sessionId=self.root,
            name=name,
            datasetId=ds or self.ds1,
            datafileFormatId=self.fmt,
        )
        assert r.status_code == 201, r.text
        return int(r.json()["id"])

    def prepare(self, **data: Any) -> str:
        data.setdefault("sessionId", self.root)
        r = self.post("prepareData", **data)
        assert r.status_code == 200, r.text
        return r.text

    def status(self, **params: Any) -> str:
        params.setdefault("sessionId", self.root)
        r = self.get("getStatus", **params)
        assert r.status_code == 200, r.text
        return r.text

    def service_status(self) -> dict[str, Any]:
        r = self.get("getServiceStatus", sessionId=self.root)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Poll getServiceStatus until the opsQueue is empty (behaviours.md "wait idle")."""
        deadline = time.monotonic() + timeout
        while self.service_status()["opsQueue"]:
            assert time.monotonic() < deadline, "IDS did not become idle"
            time.sleep(0.02)

    def poll(self, check: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.02)

    # ---------------------------------------------------------------- storage views
    @property
    def main(self):
        return self.emu.storage.main_dir

    @property
    def archive(self):
        return self.emu.storage.archive_dir

    def ds_dir(self, ds: int):
        return self.main / str(self.inv) / str(ds)

    def online(self, df_id: int) -> bool:
        return (self.main / self.locations[df_id]).is_file()

    def icat(self, query: str) -> list[Any]:
        return self.emu.catalogue.search(READER, query)

    def icat_datafile(self, df_id: int) -> dict[str, Any]:
        return self.emu.catalogue.get(READER, "Datafile", df_id)["Datafile"]

    @staticmethod
    def zip_entries(data: bytes) -> dict[str, tuple[bytes, zipfile.ZipInfo]]:
        return zip_entries(data)


def _params(params: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, list | tuple | set):
            out[key] = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            out[key] = "true" if value else "false"
        else:
            out[key] = str(value)
    return out


def zip_entries(data: bytes) -> dict[str, tuple[bytes, zipfile.ZipInfo]]:
    """Name → (content, info) of every entry of a zip; checks the CRCs."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None
        return {i.filename: (z.read(i), i) for i in z.infolist()}


def populate(emu: Emulator, archived: bool = True) -> Std:
    """Create the standard fixture in ``emu`` (through the catalogue and the storage)."""
    cat = emu.catalogue
    st = emu.storage

    def one(entity: dict[str, Any]) -> int:
        return int(cat.write(ROOT_USER, entity)[0])

    fac = one({"Facility": {"name": "F"}})
    it = one({"InvestigationType": {"name": "experiment", "facility": {"id": fac}}})
    dt = one({"DatasetType": {"name": "raw", "facility": {"id": fac}}})
    fmt = one(
        {"DatafileFormat": {"name": "test_format", "version": "42.0.0", "facility": {"id": fac}}}
    )
    inv = one(
        {
            "Investigation": {
                "name": "I",
                "visitId": "N/A",
                "title": "the investigation",
                "facility": {"id": fac},
                "type": {"id": it},
            }
        }
    )
    alice_user = one({"User": {"name": "simple/alice"}})
    one(
        {
            "InvestigationUser": {
                "user": {"id": alice_user},
                "investigation": {"id": inv},
                "role": "member",
            }
        }
    )
    ds = [
        one({"Dataset": {"name": f"ds{i}", "investigation": {"id": inv}, "type": {"id": dt}}})
        for i in (1, 2, 3)
    ]
    ts = time.strftime("%Y%m%d%H%M%S")
    names = {1: f"a/df1_{ts}", 2: f"df2_{ts}", 3: f"df3_{ts}", 4: f"df4_{ts}"}
    owner = {1: ds[0], 2: ds[0], 3: ds[1], 4: ds[1]}
    df_ids: dict[int, int] = {}
    locations: dict[int, str] = {}
    for n in (1, 2, 3, 4):
        location = f"{inv}/{owner[n]}/Person's file" if n == 4 else None
        stored = st.put(inv, owner[n], io.BytesIO(CONTENT[n]), location=location)
        df_id = one(
            {
                "Datafile": {
                    "name": names[n],
                    "dataset": {"id": owner[n]},
                    "datafileFormat": {"id": fmt},
                    "location": stored.location,
                    "fileSize": stored.size,
                    "checksum": f"{zlib.crc32(CONTENT[n]):x}",
                }
            }
        )
        df_ids[n] = df_id
        locations[df_id] = stored.location
    if st.two_level and archived:
        st.archive_now(storage_items(cat, st, [ds[0], ds[1]], []))
    http = requests.Session()
    return Std(
        emu=emu,
        http=http,
        root=emu.login("root"),
        forbidden=emu.login("forbidden"),
        alice=emu.login("alice"),
        fac=fac,
        inv=inv,
        ds1=ds[0],
        ds2=ds[1],
        ds3=ds[2],
        df1=df_ids[1],
        df2=df_ids[2],
        df3=df_ids[3],
        df4=df_ids[4],
        fmt=fmt,
        ds_type=dt,
        names={df_ids[n]: names[n] for n in names},
        locations=locations,
    )


StdFactory = Callable[..., Std]


@pytest.fixture
def std_factory(emulator_factory: Callable[..., Emulator]) -> Iterator[StdFactory]:
    """Build standard fixtures: ``std_factory(storage=..., archived=..., **settings)``."""
    made: list[Std] = []

    def make(storage: str = "single", archived: bool = True, **overrides: Any) -> Std:
        emu = emulator_factory(storage=storage, **overrides)
        std = populate(emu, archived=archived)
        made.append(std)
        return std

    try:
        yield make
    finally:
        for std in made:
            std.http.close()


@pytest.fixture
def std(std_factory: StdFactory) -> Std:
    """Single-level standard fixture."""
    return std_factory()


@pytest.fixture(params=["dataset", "datafile"])
def std2(request: pytest.FixtureRequest, std_factory: StdFactory) -> Std:
    """Two-level standard fixture (ds1, ds2 archived) for storage unit DATASET and DATAFILE."""
    return std_factory(storage=request.param)


@pytest.fixture
def std_ds(std_factory: StdFactory) -> Std:
    """Two-level standard fixture, storage unit DATASET."""
    return std_factory(storage="dataset")


@pytest.fixture
def std_df(std_factory: StdFactory) -> Std:
    """Two-level standard fixture, storage unit DATAFILE."""
    return std_factory(storage="datafile")

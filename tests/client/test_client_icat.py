"""ICATClient over HTTP against the emulator: sessions, queries, writes, errors."""

from __future__ import annotations

import threading
import time

import pytest

from idsfs.errors import (
    ICATNoObjectError,
    ICATObjectExistsError,
    ICATParameterError,
    ICATPrivilegesError,
    ICATSessionError,
    ICATValidationError,
)
from idsfs.icat import ICATClient, quote
from idsfs.model import Datafile, Dataset, DatasetType, Facility, Investigation


def login(emu, user: str = "root", **kw) -> ICATClient:
    kw.setdefault("backoff", 0.01)
    client = ICATClient(emu.icat_url, **kw)
    client.login("simple", {"username": user, "password": f"{user}-secret"})
    return client


def test_url_completion(emulator) -> None:
    base = emulator.icat_url.rsplit("/icat", 1)[0]
    assert ICATClient(base).url == ICATClient(base + "/icat/").url == base + "/icat/"
    with pytest.raises(ValueError):
        ICATClient("ftp://x")


def test_version_and_properties(emulator) -> None:
    icat = ICATClient(emulator.icat_url)
    assert icat.version().startswith("6.")
    props = icat.properties()
    assert props["maxEntities"] > 0 and props["lifetimeMinutes"] > 0
    assert any(a["mnemonic"] == "simple" for a in props["authenticators"])


def test_login_info_refresh_logout(emulator) -> None:
    icat = ICATClient(emulator.icat_url)
    with pytest.raises(RuntimeError):
        icat.session_info()
    sid = icat.login("simple", {"username": "alice", "password": "alice-secret"})
    assert icat.sessionId == sid and len(sid) == 36
    info = icat.session_info()
    assert info.userName == "simple/alice"
    assert 119 < info.remainingMinutes <= 120
    time.sleep(0.05)
    icat.refresh()
    assert icat.session_info().remainingMinutes > info.remainingMinutes - 0.001
    icat.logout()
    assert icat.sessionId is None
    other = ICATClient(emulator.icat_url, sessionId=sid)
    with pytest.raises(ICATSessionError) as exc:
        other.session_info()
    assert exc.value.status == 403 and sid not in str(exc.value)
    icat.logout()  # nothing to do


def test_bad_logins(emulator) -> None:
    icat = ICATClient(emulator.icat_url)
    with pytest.raises(ICATSessionError) as info:
        icat.login("simple", {"username": "alice", "password": "wrong-password"})
    assert "wrong-password" not in str(info.value)
    with pytest.raises(ICATSessionError):
        icat.login("typo", {"username": "alice", "password": "alice-secret"})
    assert icat.sessionId is None
    assert "alice-secret" not in repr(icat)


def test_search_shapes(world) -> None:
    icat = world.icat
    invs = icat.search("SELECT inv FROM Investigation inv INCLUDE inv.facility")
    assert len(invs) == 1 and isinstance(invs[0], Investigation)
    assert invs[0].facility is not None and invs[0].facility.name == "F"
    assert invs[0].createTime is not None and invs[0].createTime.tzinfo is not None
    assert icat.search(f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {world.ds1}") \
        == [2]
    rows = icat.search("SELECT df.id, df.name, df.fileSize FROM Datafile df "
                       f"WHERE df.dataset.id = {world.ds2} ORDER BY df.name")
    assert rows == [(world.df[3], "df3", 52), (world.df[4], "df4 Person's file", 52)]
    name = "df4 Person's file"
    found = icat.search(f"SELECT df FROM Datafile df WHERE df.name = {quote(name)}")
    assert [d.id for d in found] == [world.df[4]]
    assert icat.search("SELECT SUM(df.fileSize) FROM Datafile df WHERE df.id < 0") == [None]


def test_search_is_filtered_by_authorisation(world) -> None:
    forbidden = login(world.emu, "forbidden")
    assert forbidden.search("SELECT ds FROM Dataset ds") == []
    alice = login(world.emu, "alice")
    assert len(alice.search("SELECT ds FROM Dataset ds")) == 3


def test_search_all_pages(world) -> None:
    icat = world.icat
    icat.create([Dataset(name=f"extra{i:02d}", investigation=Investigation(id=world.inv),
                         type=DatasetType(id=icat.search("SELECT t.id FROM DatasetType t")[0]),
                         complete=False) for i in range(7)])
    world.emu.counters.reset()
    names = [ds.name for ds in icat.search_all(
        f"SELECT ds FROM Dataset ds WHERE ds.investigation.id = {world.inv} ORDER BY ds.name",
        page_size=3)]
    assert names == sorted(names) and len(names) == 10
    assert world.emu.counters.get("icat/entityManager") == 4
    with pytest.raises(ValueError):
        list(icat.search_all("SELECT ds FROM Dataset ds LIMIT 0, 5"))


def test_max_entities(emulator_factory) -> None:
    emu = emulator_factory(max_entities=3)
    icat = login(emu)
    icat.create([Facility(name=f"fac{i}") for i in range(5)])
    with pytest.raises(ICATValidationError) as info:
        icat.search("SELECT f FROM Facility f")
    assert info.value.status == 412
    assert len(list(icat.search_all("SELECT f FROM Facility f ORDER BY f.id", 3))) == 5


def test_get_by_id(world) -> None:
    df = world.icat.get("Datafile df INCLUDE df.dataset.investigation", world.df[1])
    assert isinstance(df, Datafile) and df.name == "a/df1"
    assert df.dataset is not None and df.dataset.id == world.ds1
    assert df.dataset.investigation is not None and df.dataset.investigation.name == "I"
    assert world.icat.get(Dataset, world.ds3).name == "ds3"
    with pytest.raises(ICATNoObjectError) as info:
        world.icat.get("Datafile", 999999)
    assert info.value.status == 404
    with pytest.raises(ICATPrivilegesError):
        login(world.emu, "forbidden").get("Datafile", world.df[1])


def test_create_update_delete(world) -> None:
    icat = world.icat
    fac = icat.create(Facility(name="W", fullName="Facility W"))
    assert isinstance(fac, int)
    with pytest.raises(ICATObjectExistsError) as info:
        icat.create([Facility(name="W2"), Facility(name="W")])
    assert info.value.offset == 1 and info.value.status == 412
    assert icat.search("SELECT f FROM Facility f WHERE f.name = 'W2'") == []  # rolled back
    with pytest.raises(ICATValidationError) as info2:
        icat.create([Facility(name="ok"), Facility()])
    assert info2.value.offset == 1
    icat.update(Facility(id=fac), fullName="renamed")
    assert icat.get(Facility, fac).fullName == "renamed"
    icat.update({"Facility": {"id": fac, "description": "via mapping"}})
    assert icat.get(Facility, fac).description == "via mapping"
    assert icat.get(Facility, fac).name == "W"
    icat.delete(Facility(id=fac))
    with pytest.raises(ICATNoObjectError):
        icat.get(Facility, fac)
    with pytest.raises(ICATNoObjectError) as info3:
        icat.delete([Facility(id=-1)])
    assert info3.value.offset == 0
    with pytest.raises(ICATParameterError):
        icat.search("SELEKT nonsense")
    with pytest.raises(ICATPrivilegesError):
        login(world.emu, "alice").create(Facility(name="not allowed"))


def test_relogin_on_session_error(world) -> None:
    icat = login(world.emu, "alice")
    seen: list[str | None] = []
    icat.add_session_listener(seen.append)
    old = icat.sessionId
    world.emu.expire_sessions(old)
    assert len(icat.search("SELECT ds FROM Dataset ds")) == 3
    assert icat.sessionId != old and seen == [icat.sessionId]
    # an adopted session has no credentials: the error goes to the caller
    adopted = ICATClient(world.emu.icat_url, sessionId=icat.sessionId)
    world.emu.expire_sessions(icat.sessionId)
    with pytest.raises(ICATSessionError):
        adopted.search("SELECT ds FROM Dataset ds")


def test_relogin_via_fault(world) -> None:
    icat = login(world.emu, "alice")
    world.emu.faults.expire_session("icat/entityManager", count=1)
    assert icat.search("SELECT COUNT(ds) FROM Dataset ds") == [3]


def test_automatic_refresh(world) -> None:
    icat = login(world.emu, "alice", refresh_margin=10**6)  # always "about to expire"
    world.emu.counters.reset()
    icat.search("SELECT COUNT(ds) FROM Dataset ds")
    icat.search("SELECT COUNT(ds) FROM Dataset ds")
    assert world.emu.counters.get("icat/refresh") == 2
    lazy = login(world.emu, "alice")
    world.emu.counters.reset()
    lazy.search("SELECT COUNT(ds) FROM Dataset ds")
    assert world.emu.counters.get("icat/refresh") == 0


def test_threads_share_one_client(world) -> None:
    icat = login(world.emu, "alice")
    errors: list[BaseException] = []
    world.emu.expire_sessions(icat.sessionId)
    world.emu.counters.reset()

    def work() -> None:
        try:
            for _ in range(5):
                assert icat.search("SELECT COUNT(df) FROM Datafile df") == [4]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert world.emu.counters.get("icat/login") == 1  # one re-login for all threads

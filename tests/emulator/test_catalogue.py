"""The ICAT catalogue in-process: sessions, query execution and result shapes,
authorisation, constraints, transactions, cascading delete, persistence and threads.

The HTTP layer is tested in test_icat_rest.py.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from idsfs.emulator.catalogue import READER, Catalogue, ICATException
from idsfs.emulator.schema import format_date, parse_date, parse_timestamp_literal
from idsfs.emulator.settings import EmulatorSettings

USERS = {
    "root": "root-pw",
    "alice": "alice-pw",
    "bob": "bob-pw",
    "carol": "carol-pw",
    "forbidden": "forbidden-pw",
}
ROOT = "simple/root"
ALICE = "simple/alice"
BOB = "simple/bob"
CAROL = "simple/carol"
FORBIDDEN = "simple/forbidden"
DATE_RE = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}$"


def settings(**over: Any) -> EmulatorSettings:
    values: dict[str, Any] = {"users": USERS, "roots": {"root"}}
    values.update(over)
    return EmulatorSettings(**values)


@pytest.fixture
def make(tmp_path: Path):
    opened: list[Catalogue] = []

    def factory(name: str = "cat.sqlite", **over: Any) -> Catalogue:
        c = Catalogue(tmp_path / name, settings(**over))
        opened.append(c)
        return c

    yield factory
    for c in opened:
        c.close()


@pytest.fixture
def cat(make) -> Catalogue:
    return make()


def err(fn, *args) -> ICATException:
    with pytest.raises(ICATException) as info:
        fn(*args)
    return info.value


@dataclass
class World:
    facility: int
    inv_type: int
    ds_type: int
    fmt: int
    inv_i: int
    inv_j: int
    ds1: int
    ds2: int
    ds3: int
    ds_j: int
    df1: int
    df2: int
    df3: int
    df4: int
    df_j: int
    bogus: int
    users: dict[str, int]


def user_id(cat: Catalogue, name: str) -> int:
    return cat.search(ROOT, f"SELECT u.id FROM User u WHERE u.name = '{name}'")[0]


def populate(cat: Catalogue) -> World:
    """The standard fixture: investigation I (alice PI, carol visitor) with ds1..ds3 and
    df1..df4 (+ a location-less datafile in ds1); investigation J (bob) with one file."""
    for name in ("alice", "bob", "carol", "forbidden", "root"):
        cat.login("simple", {"username": name, "password": USERS[name]})
    users = {n: user_id(cat, f"simple/{n}") for n in ("alice", "bob", "carol", "forbidden")}
    [fac] = cat.write(ROOT, {"Facility": {"name": "F", "fullName": "Facility F"}})
    ref = {"id": fac}
    it, dt, fmt = cat.write(
        ROOT,
        [
            {"InvestigationType": {"name": "experiment", "facility": ref}},
            {"DatasetType": {"name": "raw", "facility": ref}},
            {"DatafileFormat": {"name": "test_format", "version": "42.0.0", "facility": ref}},
        ],
    )
    inv_i, inv_j = cat.write(
        ROOT,
        [
            {"Investigation": {"name": "I", "visitId": "N/A", "title": "Investigation I",
                               "facility": ref, "type": {"id": it},
                               "startDate": "2024-01-01T00:00:00.000+00:00"}},
            {"Investigation": {"name": "J", "visitId": "1", "title": "Investigation J",
                               "facility": ref, "type": {"id": it}}},
        ],
    )  # fmt: skip
    cat.write(
        ROOT,
        [
            {"InvestigationUser": {"role": "PI", "user": {"id": users["alice"]},
                                   "investigation": {"id": inv_i}}},
            {"InvestigationUser": {"role": "visitor", "user": {"id": users["carol"]},
                                   "investigation": {"id": inv_i}}},
            {"InvestigationUser": {"role": "member", "user": {"id": users["bob"]},
                                   "investigation": {"id": inv_j}}},
        ],
    )  # fmt: skip

    def dataset(inv: int, name: str, files: list[dict[str, Any]]) -> int:
        [ds] = cat.write(
            ROOT,
            {"Dataset": {"name": name, "investigation": {"id": inv}, "type": {"id": dt},
                         "datafiles": files}},
        )  # fmt: skip
        return ds

    def f(name: str, location: str | None, size: int = 52, **more: Any) -> dict[str, Any]:
        d = {"name": name, "location": location, "fileSize": size, "checksum": "abc",
             "datafileFormat": {"id": fmt}, **more}  # fmt: skip
        return d

    ds1 = dataset(inv_i, "ds1", [
        f("a/df1_1", "1/1/one", datafileModTime="2024-05-01T10:00:00.000+00:00"),
        f("df2", "1/1/two"),
        f("bogus", None, 7),
    ])  # fmt: skip
    ds2 = dataset(inv_i, "ds2", [f("df3", "1/2/three"), f("df4", "Person's file")])
    ds3 = dataset(inv_i, "ds3", [])
    ds_j = dataset(inv_j, "dsJ", [f("dfJ", "2/9/j", 10)])
    ids = {}
    for ds in (ds1, ds2, ds_j):
        q = f"SELECT df.id, df.name FROM Datafile df WHERE df.dataset.id = {ds}"
        ids.update({r[1]: r[0] for r in cat.search(ROOT, q)})
    return World(
        fac, it, dt, fmt, inv_i, inv_j, ds1, ds2, ds3, ds_j,
        ids["a/df1_1"], ids["df2"], ids["df3"], ids["df4"], ids["dfJ"], ids["bogus"], users,
    )  # fmt: skip


@pytest.fixture
def world(cat: Catalogue) -> World:
    return populate(cat)


# ===================================================================== sessions


def test_login_and_session_info(cat):
    sid = cat.login("simple", {"username": "alice", "password": "alice-pw"})
    assert len(sid) == 36 and sid == sid.lower() and sid.count("-") == 4
    assert cat.user_of(sid) == ALICE
    user, remaining = cat.session_info(sid)
    assert user == ALICE
    assert 119 < remaining <= 120
    other = cat.login("simple", {"username": "alice", "password": "alice-pw"})
    assert other != sid


def test_login_failures_are_session_errors(cat):
    e = err(cat.login, "typo", {"username": "alice", "password": "alice-pw"})
    assert (e.code, e.status, e.offset) == ("SESSION", 403, None)
    assert "typo" in e.message and "not recognised" in e.message
    e = err(cat.login, "simple", {"username": "alice", "password": "wrong"})
    assert e.code == "SESSION" and "wrong" not in e.message
    assert err(cat.login, "simple", {"username": "nobody", "password": "x"}).code == "SESSION"
    assert err(cat.login, "simple", {"username": "alice"}).code == "SESSION"
    assert err(cat.login, "simple", {}).code == "SESSION"
    # the IDS reader account has no password and cannot log in
    assert err(cat.login, "simple", {"username": "_ids_reader", "password": ""}).code == "SESSION"


def test_first_login_creates_the_user_entity(cat):
    assert cat.search(ROOT, "SELECT COUNT(u) FROM User u WHERE u.name = 'simple/bob'") == [0]
    cat.login("simple", {"username": "bob", "password": "bob-pw"})
    cat.login("simple", {"username": "bob", "password": "bob-pw"})
    [u] = cat.search(ROOT, "SELECT u FROM User u WHERE u.name = 'simple/bob'")
    assert u["User"]["createId"] == BOB


def test_bad_session_ids_never_echoed(cat):
    for sid in (None, "", "0d9a3706-80d4-4d29-9ff3-4d65d4308a24"):
        e = err(cat.user_of, sid)
        assert e.code == "SESSION"
        assert "0d9a3706" not in e.message
    assert err(cat.session_info, "nope").code == "SESSION"
    assert err(cat.refresh, "nope").code == "SESSION"
    assert err(cat.logout, "nope").code == "SESSION"


def test_expiry_refresh_logout(make):
    cat = make(session_minutes=0.005)  # 0.3 s
    sid = cat.login("simple", {"username": "alice", "password": "alice-pw"})
    assert cat.user_of(sid) == ALICE
    time.sleep(0.35)
    e = err(cat.user_of, sid)
    assert e.code == "SESSION" and "expired" in e.message
    assert err(cat.session_info, sid).code == "SESSION"
    cat.refresh(sid)  # refresh works on an expired, not purged session
    assert cat.user_of(sid) == ALICE
    cat.logout(sid)
    assert err(cat.user_of, sid).code == "SESSION"
    assert err(cat.logout, sid).code == "SESSION"


def test_refresh_extends_remaining_time(cat):
    sid = cat.login("simple", {"username": "alice", "password": "alice-pw"})
    time.sleep(0.05)
    _, before = cat.session_info(sid)
    cat.refresh(sid)
    _, after = cat.session_info(sid)
    assert after > before


def test_expire_one_or_all(cat):
    a = cat.login("simple", {"username": "alice", "password": "alice-pw"})
    b = cat.login("simple", {"username": "bob", "password": "bob-pw"})
    c = cat.login("simple", {"username": "carol", "password": "carol-pw"})
    assert cat.expire(a) == 1
    assert cat.expire(a) == 0
    assert err(cat.user_of, a).code == "SESSION"
    assert cat.user_of(b) == BOB
    assert cat.is_logged_in(BOB) and not cat.is_logged_in(ALICE)
    assert cat.expire() == 2
    assert err(cat.user_of, b).code == "SESSION"
    assert err(cat.user_of, c).code == "SESSION"
    assert cat.expire("unknown") == 0


def test_is_root_and_properties(cat):
    assert cat.is_root(ROOT)
    assert not cat.is_root(ALICE) and not cat.is_root(READER) and not cat.is_root("root")
    p = cat.properties()
    assert p["maxEntities"] == 10000
    assert p["lifetimeMinutes"] == 120
    [auth] = p["authenticators"]
    assert auth["mnemonic"] == "simple"
    assert auth["keys"] == [{"name": "username"}, {"name": "password", "hide": True}]
    assert isinstance(p["containerType"], str)


def test_sessions_and_entities_survive_reopen(tmp_path):
    s = settings()
    c1 = Catalogue(tmp_path / "c.sqlite", s)
    sid = c1.login("simple", {"username": "alice", "password": "alice-pw"})
    w = populate(c1)
    c1.delete(ROOT, {"Datafile": {"id": w.df4}})
    c1.close()
    with pytest.raises(ICATException):
        c1.search(ROOT, "SELECT f FROM Facility f")
    c2 = Catalogue(tmp_path / "c.sqlite", s)
    try:
        assert c2.user_of(sid) == ALICE
        assert c2.search(ROOT, "SELECT COUNT(df) FROM Datafile df") == [5]
        # ids are never reused, even for deleted objects after a restart
        [new] = c2.write(ROOT, {"Facility": {"name": "G"}})
        assert new > w.df4 and new > w.bogus
    finally:
        c2.close()


# ===================================================================== result shapes


def test_entity_json_shape(cat, world):
    [row] = cat.search(ROOT, f"SELECT df FROM Datafile df WHERE df.id = {world.df1}")
    assert list(row) == ["Datafile"]
    df = row["Datafile"]
    for key in ("id", "createId", "createTime", "modId", "modTime"):
        assert key in df
    assert df["createId"] == ROOT and df["modId"] == ROOT
    import re

    assert re.match(DATE_RE, df["createTime"]) and re.match(DATE_RE, df["modTime"])
    assert df["name"] == "a/df1_1" and df["fileSize"] == 52 and df["location"] == "1/1/one"
    assert df["datafileModTime"] == format_date(parse_date("2024-05-01T10:00:00.000+00:00"))
    # null attributes omitted, many-to-one absent unless included, one-to-many always arrays
    assert "description" not in df and "doi" not in df and "datafileCreateTime" not in df
    assert "dataset" not in df and "datafileFormat" not in df
    for key in ("parameters", "dataCollectionDatafiles", "sourceDatafiles", "destDatafiles"):
        assert df[key] == []
    [ds] = cat.search(ROOT, f"SELECT ds FROM Dataset ds WHERE ds.id = {world.ds1}")
    assert ds["Dataset"]["complete"] is False
    assert ds["Dataset"]["datafiles"] == []


def test_scalar_tuple_and_aggregate_shapes(cat, world):
    assert cat.search(
        ROOT, f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {world.ds1}"
    ) == [3]
    assert cat.search(ROOT, f"SELECT df.name FROM Datafile df WHERE df.id = {world.df2}") == ["df2"]
    rows = cat.search(ROOT, "SELECT f.id, f.name FROM Facility f")
    assert rows == [[world.facility, "F"]]
    assert cat.search(ROOT, "SELECT ds.id FROM Dataset ds ORDER BY ds.id LIMIT 0, 1") == [world.ds1]
    empty = f"SELECT SUM(df.fileSize) FROM Datafile df WHERE df.dataset.id = {world.ds3}"
    assert cat.search(ROOT, empty) == [None]
    assert cat.search(
        ROOT, f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {world.ds3}"
    ) == [0]
    located = f"df.dataset.investigation.id = {world.inv_i} AND df.location IS NOT NULL"
    assert cat.search(ROOT, f"SELECT SUM(df.fileSize) FROM Datafile df WHERE {located}") == [208]
    [avg] = cat.search(ROOT, f"SELECT AVG(df.fileSize) FROM Datafile df WHERE {located}")
    assert avg == 52.0 and isinstance(avg, float)
    [[lo, hi]] = cat.search(ROOT, "SELECT MIN(df.fileSize), MAX(df.fileSize) FROM Datafile df")
    assert (lo, hi) == (7, 52)
    [newest] = cat.search(ROOT, "SELECT MAX(df.datafileModTime) FROM Datafile df")
    assert parse_date(newest) == parse_date("2024-05-01T10:00:00.000+00:00")
    assert cat.search(ROOT, f"SELECT ds.complete FROM Dataset ds WHERE ds.id = {world.ds1}") == [
        False
    ]
    # entities inside tuples are wrapped; a null left-joined entity is null
    rows = cat.search(
        ROOT,
        f"SELECT ds.name, df FROM Dataset ds LEFT JOIN ds.datafiles df WHERE ds.id = {world.ds3}",
    )
    assert rows == [["ds3", None]]
    rows = cat.search(ROOT, f"SELECT ds, ds.name FROM Dataset ds WHERE ds.id = {world.ds2}")
    assert rows[0][0]["Dataset"]["id"] == world.ds2 and rows[0][1] == "ds2"
    # an entity-valued path is an entity of the target type
    [inv] = cat.search(ROOT, f"SELECT ds.investigation FROM Dataset ds WHERE ds.id = {world.ds2}")
    assert inv["Investigation"]["id"] == world.inv_i


def test_distinct_and_duplicates(cat, world):
    q = "SELECT inv FROM Investigation inv JOIN inv.datasets ds WHERE inv.name = 'I'"
    assert len(cat.search(ROOT, q)) == 3  # JPQL keeps duplicates
    assert len(cat.search(ROOT, q.replace("SELECT inv", "SELECT DISTINCT inv"))) == 1
    assert cat.search(ROOT, "SELECT COUNT(DISTINCT df.dataset) FROM Datafile df") == [3]


def test_include_shapes(cat, world):
    [row] = cat.search(
        ROOT, f"SELECT df FROM Datafile df WHERE df.id = {world.df1} INCLUDE df.dataset"
    )
    ds = row["Datafile"]["dataset"]
    assert "Dataset" not in ds and ds["id"] == world.ds1 and ds["datafiles"] == []
    assert "investigation" not in ds
    [row] = cat.search(
        ROOT,
        f"SELECT ds FROM Dataset ds WHERE ds.id = {world.ds1} "
        "INCLUDE ds.investigation inv, inv.facility, ds.datafiles, ds.parameters",
    )
    ds = row["Dataset"]
    assert ds["investigation"]["facility"]["name"] == "F"
    assert sorted(d["name"] for d in ds["datafiles"]) == ["a/df1_1", "bogus", "df2"]
    assert ds["parameters"] == []
    assert "type" not in ds
    rows = cat.search(ROOT, "SELECT it FROM InvestigationType it INCLUDE 1")
    assert rows[0]["InvestigationType"]["facility"]["id"] == world.facility
    [row] = cat.search(ROOT, f"SELECT ds FROM Dataset ds WHERE ds.id = {world.ds1} INCLUDE 1")
    assert set(row["Dataset"]) >= {"investigation", "type"}
    assert row["Dataset"]["datafiles"] == []  # INCLUDE 1 = many-to-one only
    # old style
    rows = cat.search(ROOT, "Datafile INCLUDE Dataset, Investigation")
    assert all("investigation" in r["Datafile"]["dataset"] for r in rows)


def test_get_by_id(cat, world):
    got = cat.get(ROOT, "Datafile df INCLUDE df.dataset.investigation", world.df3)
    assert got["Datafile"]["dataset"]["investigation"]["name"] == "I"
    got = cat.get(ROOT, "Dataset INCLUDE Investigation, Facility", world.ds2)
    assert got["Dataset"]["investigation"]["facility"]["name"] == "F"
    assert cat.get(ALICE, "Dataset", world.ds1)["Dataset"]["name"] == "ds1"
    e = err(cat.get, ROOT, "Dataset", 999999)
    assert (e.code, e.status, e.message) == (
        "NO_SUCH_OBJECT_FOUND",
        404,
        "Dataset[id:999999] not found.",
    )
    e = err(cat.get, ROOT, "Datafile", world.ds1)  # ids are unique across types
    assert e.code == "NO_SUCH_OBJECT_FOUND"
    assert err(cat.get, ROOT, "Nothing", world.ds1).code == "BAD_PARAMETER"


# ===================================================================== query features


def names(rows: list[Any]) -> list[str]:
    return [next(iter(r.values()))["name"] for r in rows]


def test_where_operators(cat, world):
    def q(where: str) -> list[str]:
        return sorted(cat.search(ROOT, f"SELECT df.name FROM Datafile df WHERE {where}"))

    assert q("df.fileSize = 10") == ["dfJ"]
    assert q("df.fileSize <> 52") == ["bogus", "dfJ"]
    assert q("df.fileSize != 52") == ["bogus", "dfJ"]
    assert q("df.fileSize < 10") == ["bogus"]
    assert q("df.fileSize <= 10") == ["bogus", "dfJ"]
    assert q("df.fileSize > 10") == ["a/df1_1", "df2", "df3", "df4"]
    assert q("df.fileSize >= 10 AND df.fileSize < 52") == ["dfJ"]
    assert q("df.name LIKE 'df_'") == ["df2", "df3", "df4", "dfJ"]
    assert q("df.name LIKE 'DF%'") == []  # LIKE is case-sensitive
    assert q("df.name NOT LIKE '%f%'") == ["bogus"]
    assert q("df.name LIKE 'a/%'") == ["a/df1_1"]
    assert q("df.name LIKE '%!_1' ESCAPE '!'") == ["a/df1_1"]
    assert q("df.name IN ('df2', 'df3', 'zz')") == ["df2", "df3"]
    assert q("df.name NOT IN ('df2', 'df3')") == ["a/df1_1", "bogus", "df4", "dfJ"]
    assert q("df.fileSize BETWEEN 7 AND 10") == ["bogus", "dfJ"]
    assert q("df.fileSize NOT BETWEEN 7 AND 10") == ["a/df1_1", "df2", "df3", "df4"]
    assert q("df.location IS NULL") == ["bogus"]
    assert q("df.location = 'Person''s file'") == ["df4"]
    assert q("NOT (df.fileSize = 52 OR df.fileSize = 7)") == ["dfJ"]
    assert q("df.fileSize = 7 OR df.name = 'dfJ' AND df.fileSize = 10") == ["bogus", "dfJ"]
    assert q("(df.fileSize = 7 OR df.name = 'dfJ') AND df.fileSize = 10") == ["dfJ"]
    assert q("df.datafileModTime IS NOT NULL") == ["a/df1_1"]
    assert q("df.datafileFormat IS NULL") == []
    assert q("UPPER(df.name) = 'DFJ'") == ["dfJ"]
    assert q("LOWER(df.name) LIKE 'dfj'") == ["dfJ"]
    assert q("LENGTH(df.name) = 7") == ["a/df1_1"]
    assert q("df.dataset.investigation.name = 'J'") == ["dfJ"]
    assert q("df.dataset.investigation.facility.name = 'F' AND df.dataset.name = 'ds2'") == [
        "df3",
        "df4",
    ]


def test_dates_and_ts_literals(cat, world):
    cutoff = "2024-05-01 10:00:00"
    ms = parse_timestamp_literal(cutoff)
    q = "SELECT df.name FROM Datafile df WHERE df.datafileModTime {} {{ts {}}}"
    assert cat.search(ROOT, q.format(">=", cutoff)) == (
        ["a/df1_1"] if ms <= parse_date("2024-05-01T10:00:00.000+00:00") else []
    )
    # modTime of everything is now, after 2020
    assert (
        len(
            cat.search(
                ROOT, "SELECT df FROM Datafile df WHERE df.modTime > {ts 2020-01-01 00:00:00}"
            )
        )
        == 6
    )
    assert (
        cat.search(ROOT, "SELECT df FROM Datafile df WHERE df.modTime < {ts 2020-01-01 00:00:00}")
        == []
    )
    # a date compared with an ICAT date string
    rows = cat.search(
        ROOT,
        "SELECT df.name FROM Datafile df "
        "WHERE df.datafileModTime = '2024-05-01T12:00:00.000+02:00'",
    )
    assert rows == ["a/df1_1"]
    rows = cat.search(
        ROOT,
        "SELECT inv.name FROM Investigation inv WHERE inv.startDate BETWEEN "
        "{ts 2023-12-30 00:00:00} AND {ts 2024-01-02 00:00:00}",
    )
    assert rows == ["I"]


def test_user_parameter_and_member_query(cat, world):
    q = (
        "SELECT inv FROM Investigation inv JOIN inv.investigationUsers iu "
        "WHERE iu.user.name = :user ORDER BY inv.name LIMIT 0, 500"
    )
    assert names(cat.search(ALICE, q)) == ["I"]
    assert names(cat.search(BOB, q)) == ["J"]
    assert cat.search(ROOT, q) == []  # root is no member of anything
    assert cat.search(ROOT, "SELECT u.name FROM User u WHERE u.name = :user") == [ROOT]


def test_joins(cat, world):
    rows = cat.search(
        ROOT,
        "SELECT DISTINCT ds.name FROM Dataset ds JOIN ds.datafiles df "
        "WHERE df.location IS NOT NULL ORDER BY ds.name",
    )
    assert rows == ["ds1", "ds2", "dsJ"]
    rows = cat.search(
        ROOT,
        "SELECT ds.name, COUNT(df) FROM Dataset ds LEFT JOIN ds.datafiles df "
        f"WHERE ds.investigation.id = {world.inv_i} GROUP BY ds.name ORDER BY ds.name",
    )
    assert rows == [["ds1", 3], ["ds2", 2], ["ds3", 0]]
    rows = cat.search(
        ROOT,
        "SELECT df.name FROM Datafile df, df.dataset ds, "
        "IN(ds.investigation.investigationUsers) iu "
        "WHERE iu.role = 'visitor' AND df.location IS NOT NULL ORDER BY df.name",
    )
    assert rows == ["a/df1_1", "df2", "df3", "df4"]
    rows = cat.search(
        ROOT,
        "SELECT f.name, t.name FROM Facility f, DatasetType t WHERE t.facility = f",
    )
    assert rows == [["F", "raw"]]
    rows = cat.search(ROOT, "SELECT ds.name FROM Dataset ds WHERE ds.datafiles IS EMPTY")
    assert rows == ["ds3"]
    rows = cat.search(
        ROOT, "SELECT ds.name FROM Dataset ds WHERE ds.datafiles IS NOT EMPTY ORDER BY ds.name"
    )
    assert rows == ["ds1", "ds2", "dsJ"]
    rows = cat.search(
        ROOT,
        "SELECT ds.name FROM Dataset ds JOIN ds.datafiles df GROUP BY ds.name "
        "HAVING COUNT(df) > 1 ORDER BY COUNT(df) DESC, ds.name",
    )
    assert rows == ["ds1", "ds2"]


def test_order_and_limit_paging(cat, world):
    q = "SELECT df.name FROM Datafile df WHERE df.location IS NOT NULL ORDER BY df.name"
    everything = cat.search(ROOT, q)
    assert everything == ["a/df1_1", "df2", "df3", "df4", "dfJ"]
    assert cat.search(ROOT, q + " DESC") == everything[::-1]
    assert cat.search(ROOT, q + " LIMIT 0, 2") == everything[:2]
    assert cat.search(ROOT, q + " LIMIT 2, 2") == everything[2:4]
    assert cat.search(ROOT, q + " LIMIT 4, 2") == everything[4:]
    assert cat.search(ROOT, q + " LIMIT 9, 2") == []
    assert cat.search(ROOT, q + " LIMIT 1, *") == everything[1:]
    rows = cat.search(
        ROOT,
        "SELECT df.fileSize, df.name FROM Datafile df ORDER BY df.fileSize DESC, df.name ASC",
    )
    assert [r[1] for r in rows] == ["a/df1_1", "df2", "df3", "df4", "dfJ", "bogus"]


def test_keywords_and_variables_case(cat, world):
    rows = cat.search(ROOT, "select DF.name from Datafile df where Df.name = 'df2' order by dF.id")
    assert rows == ["df2"]
    assert err(cat.search, ROOT, "SELECT df FROM datafile df").code == "BAD_PARAMETER"
    assert err(cat.search, ROOT, "SELECT df.Name FROM Datafile df").code == "BAD_PARAMETER"


def test_bare_entity_name_query(cat, world):
    assert len(cat.search(ROOT, "Datafile")) == 6
    assert len(cat.search(ALICE, "Datafile")) == 5
    assert cat.search(ROOT, "Facility")[0]["Facility"]["name"] == "F"


def test_empty_query_is_bad_parameter(cat):
    assert err(cat.search, ROOT, "").code == "BAD_PARAMETER"
    assert err(cat.search, ROOT, "   ").code == "BAD_PARAMETER"
    assert err(cat.get, ROOT, "", 1).code == "BAD_PARAMETER"


def test_max_entities(make):
    cat = make(max_entities=5)
    w = populate(cat)
    e = err(cat.search, ROOT, "SELECT df FROM Datafile df")  # 6 rows
    assert (e.code, e.status, e.offset) == ("VALIDATION", 412, None)
    assert "5" in e.message
    assert err(cat.search, ROOT, "SELECT df.id FROM Datafile df").code == "VALIDATION"
    assert err(cat.search, ROOT, "SELECT df FROM Datafile df LIMIT 0, *").code == "VALIDATION"
    assert err(cat.search, ROOT, "SELECT df FROM Datafile df LIMIT 0, 6").code == "VALIDATION"
    assert len(cat.search(ROOT, "SELECT df FROM Datafile df LIMIT 0, 5")) == 5
    assert len(cat.search(ROOT, "SELECT df FROM Datafile df LIMIT 5, *")) == 1
    assert cat.search(ROOT, "SELECT COUNT(df) FROM Datafile df") == [6]
    # INCLUDEd entities count too: 3 datasets + 5 files > 5
    e = err(
        cat.search,
        ROOT,
        f"SELECT ds FROM Dataset ds WHERE ds.investigation.id = {w.inv_i} INCLUDE ds.datafiles",
    )
    assert e.code == "VALIDATION"
    e = err(cat.get, ROOT, "Investigation inv INCLUDE inv.datasets ds, ds.datafiles", w.inv_i)
    assert e.code == "VALIDATION"
    assert cat.get(ROOT, "Dataset ds INCLUDE ds.datafiles", w.ds1)["Dataset"]["datafiles"]


# ===================================================================== authorisation


def test_search_filters_silently(cat, world):
    q = "SELECT df.name FROM Datafile df WHERE df.location IS NOT NULL ORDER BY df.name"
    assert cat.search(ALICE, q) == ["a/df1_1", "df2", "df3", "df4"]
    assert cat.search(CAROL, q) == ["a/df1_1", "df2", "df3", "df4"]
    assert cat.search(BOB, q) == ["dfJ"]
    assert cat.search(FORBIDDEN, q) == []
    assert cat.search(READER, q) == ["a/df1_1", "df2", "df3", "df4", "dfJ"]
    assert cat.search(ROOT, q) == ["a/df1_1", "df2", "df3", "df4", "dfJ"]
    assert cat.search(FORBIDDEN, "SELECT COUNT(df) FROM Datafile df") == [0]
    assert cat.search(FORBIDDEN, "SELECT SUM(df.fileSize) FROM Datafile df") == [None]
    assert cat.search(FORBIDDEN, "SELECT inv FROM Investigation inv") == []
    assert cat.search(BOB, "SELECT COUNT(inv) FROM Investigation inv") == [1]
    # public entity types
    for user in (FORBIDDEN, ALICE, BOB):
        assert cat.search(user, "SELECT COUNT(f) FROM Facility f") == [1]
        assert cat.search(user, "SELECT COUNT(t) FROM DatasetType t") == [1]
        assert cat.search(user, "SELECT COUNT(x) FROM DatafileFormat x") == [1]
        assert cat.search(user, "SELECT COUNT(t) FROM InvestigationType t") == [1]
        assert cat.search(user, "SELECT COUNT(u) FROM User u") == [5]
    # InvestigationUser: members of the same investigation
    assert cat.search(ALICE, "SELECT COUNT(iu) FROM InvestigationUser iu") == [2]
    assert cat.search(BOB, "SELECT COUNT(iu) FROM InvestigationUser iu") == [1]
    assert cat.search(FORBIDDEN, "SELECT COUNT(iu) FROM InvestigationUser iu") == [0]
    # the restriction applies to the selected entity: dataset names via datafiles
    assert cat.search(BOB, "SELECT DISTINCT df.dataset.name FROM Datafile df") == ["dsJ"]
    assert (
        cat.search(FORBIDDEN, f"SELECT df.dataset.id FROM Datafile df WHERE df.id = {world.df1}")
        == []
    )
    # ... but not to other variables of the FROM clause (as in ICAT): facility names are public
    assert cat.search(FORBIDDEN, "SELECT inv.facility.name FROM Investigation inv") == ["F", "F"]


def test_included_entities_are_filtered(cat, world):
    [row] = cat.search(
        ALICE,
        f"SELECT u FROM User u WHERE u.id = {world.users['bob']} INCLUDE u.investigationUsers",
    )
    assert row["User"]["investigationUsers"] == []  # bob's membership of J is not alice's business
    [row] = cat.search(
        BOB, f"SELECT u FROM User u WHERE u.id = {world.users['bob']} INCLUDE u.investigationUsers"
    )
    assert len(row["User"]["investigationUsers"]) == 1
    [row] = cat.search(
        FORBIDDEN,
        f"SELECT t FROM DatasetType t WHERE t.id = {world.ds_type} INCLUDE t.datasets",
    )
    assert row["DatasetType"]["datasets"] == []
    got = cat.get(BOB, "DatasetType t INCLUDE t.datasets", world.ds_type)
    assert [d["name"] for d in got["DatasetType"]["datasets"]] == ["dsJ"]


def test_get_by_id_404_before_403(cat, world):
    e = err(cat.get, FORBIDDEN, "Datafile", 987654)
    assert e.code == "NO_SUCH_OBJECT_FOUND"
    e = err(cat.get, FORBIDDEN, "Datafile", world.df1)
    assert (e.code, e.status, e.message) == (
        "INSUFFICIENT_PRIVILEGES",
        403,
        "READ access to this Datafile is not allowed.",
    )
    assert err(cat.get, BOB, "Investigation", world.inv_i).code == "INSUFFICIENT_PRIVILEGES"
    assert cat.get(BOB, "Investigation", world.inv_j)["Investigation"]["name"] == "J"
    assert cat.get(READER, "Datafile", world.df1)["Datafile"]["name"] == "a/df1_1"
    assert cat.get(FORBIDDEN, "Facility", world.facility)["Facility"]["name"] == "F"


def test_writers_may_create_update_delete_datasets_and_datafiles(cat, world):
    # carol has role "visitor": any role is a writer role by default
    [ds] = cat.write(
        CAROL,
        {"Dataset": {"name": "new", "complete": False, "investigation": {"id": world.inv_i},
                     "type": {"id": world.ds_type}}},
    )  # fmt: skip
    [df] = cat.write(CAROL, {"Datafile": {"name": "x", "dataset": {"id": ds}}})
    got = cat.get(ALICE, "Datafile df INCLUDE df.dataset", df)["Datafile"]
    assert got["createId"] == CAROL and got["modId"] == CAROL and got["dataset"]["id"] == ds
    assert cat.write(ALICE, {"Datafile": {"id": df, "name": "y"}}) == []
    got = cat.get(ALICE, "Datafile", df)["Datafile"]
    assert got["name"] == "y" and got["modId"] == ALICE and got["createId"] == CAROL
    cat.delete(ALICE, {"Datafile": {"id": df}})
    cat.delete(CAROL, [{"Dataset": {"id": ds}}])
    assert cat.search(ROOT, f"SELECT COUNT(x) FROM Dataset x WHERE x.id = {ds}") == [0]


def test_non_writers_are_refused(cat, world):
    def denied(user: str, entities: Any, access: str = "CREATE") -> ICATException:
        e = err(cat.write, user, entities)
        assert (e.code, e.status, e.offset) == ("INSUFFICIENT_PRIVILEGES", 403, 0)
        assert e.message.startswith(access)
        return e

    new_ds = {"Dataset": {"name": "n", "investigation": {"id": world.inv_i},
                          "type": {"id": world.ds_type}}}  # fmt: skip
    denied(BOB, new_ds)
    denied(FORBIDDEN, new_ds)
    denied(READER, new_ds)
    denied(BOB, {"Datafile": {"name": "x", "dataset": {"id": world.ds1}}})
    denied(ALICE, {"Facility": {"name": "G"}})
    denied(ALICE, {"DatasetType": {"name": "t2", "facility": {"id": world.facility}}})
    denied(ALICE, {"Investigation": {"name": "K", "visitId": "1", "title": "t",
                                     "facility": {"id": world.facility},
                                     "type": {"id": world.inv_type}}})  # fmt: skip
    denied(ALICE, {"InvestigationUser": {"role": "PI", "user": {"id": world.users["forbidden"]},
                                         "investigation": {"id": world.inv_i}}})  # fmt: skip
    denied(BOB, {"Datafile": {"id": world.df1, "name": "stolen"}}, "UPDATE")
    denied(ALICE, {"Investigation": {"id": world.inv_i, "title": "mine"}}, "UPDATE")
    denied(ALICE, {"Facility": {"id": world.facility, "fullName": "x"}}, "UPDATE")
    # moving a datafile into a dataset the user may not write
    denied(ALICE, {"Datafile": {"id": world.df1, "dataset": {"id": world.ds_j}}})
    e = err(cat.delete, BOB, {"Datafile": {"id": world.df1}})
    assert (e.code, e.offset) == ("INSUFFICIENT_PRIVILEGES", 0)
    assert e.message == "DELETE access to this Datafile is not allowed."
    assert err(cat.delete, ALICE, {"Investigation": {"id": world.inv_i}}).code == (
        "INSUFFICIENT_PRIVILEGES"
    )
    assert err(cat.delete, READER, {"Datafile": {"id": world.df1}}).code == (
        "INSUFFICIENT_PRIVILEGES"
    )
    # nothing changed
    assert cat.search(ROOT, "SELECT COUNT(df) FROM Datafile df") == [6]
    assert cat.get(ROOT, "Datafile", world.df1)["Datafile"]["name"] == "a/df1_1"


def test_writer_roles_setting(tmp_path):
    @dataclass(frozen=True)
    class Restricted:
        users: Any
        roots: Any
        session_minutes: float = 120.0
        max_entities: int = 10000
        writer_roles: tuple[str, ...] = ("PI",)

    cat = Catalogue(tmp_path / "w.sqlite", Restricted(USERS, frozenset({"root"})))  # type: ignore[arg-type]
    try:
        w = populate(cat)
        new = {"Datafile": {"name": "z", "dataset": {"id": w.ds1}}}
        assert err(cat.write, CAROL, new).code == "INSUFFICIENT_PRIVILEGES"  # visitor
        [df] = cat.write(ALICE, new)  # PI
        assert err(cat.delete, CAROL, {"Datafile": {"id": df}}).code == "INSUFFICIENT_PRIVILEGES"
        cat.delete(ALICE, {"Datafile": {"id": df}})
        assert cat.search(
            CAROL, f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {w.ds1}"
        ) == [3]
    finally:
        cat.close()


def test_data_collections_belong_to_their_creator(cat, world):
    [dc] = cat.write(
        ALICE,
        {"DataCollection": {"dataCollectionDatafiles": [{"datafile": {"id": world.df1}}],
                            "dataCollectionDatasets": [{"dataset": {"id": world.ds2}}]}},
    )  # fmt: skip
    got = cat.get(
        ALICE,
        "DataCollection c INCLUDE c.dataCollectionDatafiles d, d.datafile, "
        "c.dataCollectionDatasets s, s.dataset",
        dc,
    )["DataCollection"]
    assert got["dataCollectionDatafiles"][0]["datafile"]["id"] == world.df1
    assert got["dataCollectionDatasets"][0]["dataset"]["id"] == world.ds2
    assert cat.search(BOB, "SELECT COUNT(c) FROM DataCollection c") == [0]
    assert err(cat.get, BOB, "DataCollection", dc).code == "INSUFFICIENT_PRIVILEGES"
    # deleting the datafile cascades to the collection's link
    cat.delete(ROOT, {"Datafile": {"id": world.df1}})
    assert cat.search(ALICE, "SELECT COUNT(x) FROM DataCollectionDatafile x") == [0]
    cat.delete(ALICE, {"DataCollection": {"id": dc}})
    assert cat.search(ROOT, "SELECT COUNT(x) FROM DataCollectionDataset x") == [0]


# ===================================================================== writes and constraints


def test_create_returns_ids_in_order_update_returns_nothing(cat, world):
    ids = cat.write(ROOT, [{"Facility": {"name": n}} for n in ("A", "B", "C")])
    assert ids == sorted(ids) and len(set(ids)) == 3
    got = [cat.get(ROOT, "Facility", i)["Facility"]["name"] for i in ids]
    assert got == ["A", "B", "C"]
    mixed = cat.write(
        ROOT, [{"Facility": {"id": ids[0], "url": "http://a"}}, {"Facility": {"name": "D"}}]
    )
    assert len(mixed) == 1
    assert cat.get(ROOT, "Facility", ids[0])["Facility"]["url"] == "http://a"
    assert cat.write(ROOT, {"Facility": {"id": ids[1], "fullName": "Bee"}}) == []
    assert cat.write(ROOT, []) == []


def test_server_fields_and_update_timestamps(cat, world):
    before = cat.get(ROOT, "Datafile", world.df2)["Datafile"]
    time.sleep(0.01)
    cat.write(ALICE, {"Datafile": {"id": world.df2, "description": "d", "createId": "hacker"}})
    after = cat.get(ROOT, "Datafile", world.df2)["Datafile"]
    assert after["createId"] == ROOT and after["createTime"] == before["createTime"]
    assert after["modId"] == ALICE
    assert parse_date(after["modTime"]) > parse_date(before["modTime"])
    assert after["description"] == "d"
    # null sets a field to null (and it disappears from the JSON)
    cat.write(ALICE, {"Datafile": {"id": world.df2, "description": None}})
    assert "description" not in cat.get(ROOT, "Datafile", world.df2)["Datafile"]


def test_value_types(cat, world):
    cat.write(
        ROOT,
        {"Dataset": {"id": world.ds3, "complete": True, "startDate": "2024-02-03T04:05:06.789Z",
                     "endDate": "2024-02-03T06:05:06.789+02:00"}},
    )  # fmt: skip
    ds = cat.get(ROOT, "Dataset", world.ds3)["Dataset"]
    assert ds["complete"] is True
    assert parse_date(ds["startDate"]) == parse_date(ds["endDate"])
    assert parse_date(ds["startDate"]) % 1000 == 789
    cat.write(ROOT, {"Facility": {"id": world.facility, "daysUntilRelease": 3}})
    assert cat.get(ROOT, "Facility", world.facility)["Facility"]["daysUntilRelease"] == 3
    for body in (
        {"Dataset": {"id": world.ds3, "complete": "yes"}},
        {"Dataset": {"id": world.ds3, "complete": 1}},
        {"Dataset": {"id": world.ds3, "name": 5}},
        {"Dataset": {"id": world.ds3, "fileSize": "5"}},
        {"Dataset": {"id": world.ds3, "fileSize": 5.5}},
        {"Dataset": {"id": world.ds3, "startDate": "2024-02-03"}},
        {"Dataset": {"id": world.ds3, "startDate": "2024-02-03T04:05:06Z"}},
        {"Dataset": {"id": world.ds3, "startDate": "2024-02-30T04:05:06.000Z"}},
        {"Dataset": {"id": world.ds3, "startDate": 12345}},
        {"Facility": {"id": world.facility, "daysUntilRelease": 2**31}},
        {"Dataset": {"id": "x"}},
    ):
        e = err(cat.write, ROOT, body)
        assert (e.code, e.offset) == ("BAD_PARAMETER", 0), body


@pytest.mark.parametrize(
    ("entities", "code", "offset", "message"),
    [
        ("rubbish", "BAD_PARAMETER", 0, "in json"),
        ('{"Facility": {"name": "W"}', "BAD_PARAMETER", 0, "in json"),
        (
            [{"Facility": {"name": "W"}}, {"Facility": {}}],
            "VALIDATION",
            1,
            "Facility: name cannot be null.",
        ),
        ({"Datafile": [{"name": "x"}]}, "BAD_PARAMETER", 0, "must be a JSON object"),
        ([{"Facility": {"name": "W"}}, {"Nothing": {}}], "BAD_PARAMETER", 1, "Unknown entity type"),
        ([{"Facility": {"name": "W"}, "Dataset": {}}], "BAD_PARAMETER", 0, "exactly one key"),
        ([{"Facility": {"name": "W"}}, 5], "BAD_PARAMETER", 1, "exactly one key"),
        (
            {"Facility": {"name": "W", "colour": "red"}},
            "BAD_PARAMETER",
            0,
            "Field colour not found in Facility",
        ),
        (
            {"Facility": {"name": "W", "datasetTypes": [{"id": 3}]}},
            "BAD_PARAMETER",
            0,
            "must not have an id",
        ),
        (
            {"Facility": {"name": "W", "datasetTypes": {"name": "x"}}},
            "BAD_PARAMETER",
            0,
            "must be an array",
        ),
        (
            {"Facility": {"name": "W", "instruments": [{"name": "x"}]}},
            "BAD_PARAMETER",
            0,
            "not supported",
        ),
        (
            {"Facility": {"id": 424242, "url": "x"}},
            "NO_SUCH_OBJECT_FOUND",
            0,
            "Facility[id:424242] not found.",
        ),
    ],
)
def test_write_errors(cat, entities, code, offset, message):
    e = err(cat.write, ROOT, entities)
    assert (e.code, e.offset) == (code, offset)
    assert message in e.message
    assert cat.search(ROOT, "SELECT COUNT(f) FROM Facility f") == [0]  # rolled back


def test_references(cat, world):
    e = err(cat.write, ROOT, [{"Facility": {"name": "X"}},
                              {"Dataset": {"name": "n", "investigation": {"id": 123456},
                                           "type": {"id": world.ds_type}}}])  # fmt: skip
    assert (e.code, e.status, e.offset) == ("NO_SUCH_OBJECT_FOUND", 404, 1)
    assert e.message == "Investigation[id:123456] not found."
    e = err(cat.write, ROOT, {"Dataset": {"name": "n", "investigation": {"name": "I"},
                                          "type": {"id": world.ds_type}}})  # fmt: skip
    assert (e.code, e.offset) == ("BAD_PARAMETER", 0)
    e = err(cat.write, ROOT, {"Dataset": {"name": "n", "investigation": world.inv_i,
                                          "type": {"id": world.ds_type}}})  # fmt: skip
    assert e.code == "BAD_PARAMETER"
    e = err(cat.write, ROOT, {"Dataset": {"name": "n", "type": {"id": world.ds_type}}})
    assert (e.code, e.message) == ("VALIDATION", "Dataset: investigation cannot be null.")
    # extra fields next to the id update the referenced entity
    cat.write(ROOT, {"Dataset": {"name": "n", "investigation": {"id": world.inv_i, "summary": "S"},
                                 "type": {"id": world.ds_type}}})  # fmt: skip
    assert cat.get(ROOT, "Investigation", world.inv_i)["Investigation"]["summary"] == "S"
    assert cat.search(ROOT, "SELECT COUNT(f) FROM Facility f WHERE f.name = 'X'") == [0]


def test_not_null_and_lengths(cat, world):
    def fac(**fields: Any) -> dict[str, Any]:
        return {"Facility": {"name": "L", **fields}}

    ok = cat.write(ROOT, fac(fullName="x" * 255, description="d" * 1023))
    assert ok
    e = err(cat.write, ROOT, [{"Facility": {"name": "M"}}, fac(name="n" * 256)])
    assert (e.code, e.status, e.offset) == ("VALIDATION", 412, 1)
    assert e.message == "Facility: name cannot have length > 255"
    e = err(cat.write, ROOT, fac(name="L2", description="d" * 1024))
    assert e.message == "Facility: description cannot have length > 1023"
    # Java counts UTF-16 units: 128 emoji = 256 units
    assert err(cat.write, ROOT, fac(name="\U0001f600" * 128)).code == "VALIDATION"
    assert cat.write(ROOT, fac(name="\u00e9" * 255))
    base = {"name": "S", "visitId": "1", "title": "t", "facility": {"id": world.facility},
            "type": {"id": world.inv_type}}  # fmt: skip
    assert cat.write(ROOT, {"Investigation": {**base, "summary": "s" * 4000}})
    e = err(cat.write, ROOT, {"Investigation": {**base, "visitId": "2", "summary": "s" * 4001}})
    assert e.message == "Investigation: summary cannot have length > 4000"
    e = err(cat.write, ROOT, {"Investigation": {**base, "visitId": "3", "title": None}})
    assert e.message == "Investigation: title cannot be null."
    assert cat.write(
        ROOT, {"Datafile": {"name": "long", "location": "l" * 511, "dataset": {"id": world.ds3}}}
    )
    e = err(
        cat.write,
        ROOT,
        {"Datafile": {"name": "long2", "location": "l" * 512, "dataset": {"id": world.ds3}}},
    )
    assert e.message == "Datafile: location cannot have length > 511"
    # update to null of a not-null field
    e = err(cat.write, ROOT, {"Dataset": {"id": world.ds3, "name": None}})
    assert (e.code, e.message) == ("VALIDATION", "Dataset: name cannot be null.")
    # defaults
    [ds] = cat.write(ROOT, {"Dataset": {"name": "defaults", "investigation": {"id": world.inv_i},
                                        "type": {"id": world.ds_type}}})  # fmt: skip
    got = cat.get(ROOT, "Dataset", ds)["Dataset"]
    assert got["complete"] is False and got["fileSize"] == 0 and got["fileCount"] == 0


def test_uniqueness(cat, world):
    cat.write(ROOT, {"Facility": {"name": "W"}})
    e = err(cat.write, ROOT, {"Facility": {"name": "W"}})
    assert (e.code, e.status, e.offset, e.message) == (
        "OBJECT_ALREADY_EXISTS",
        412,
        0,
        "Facility exists with name = 'W'",
    )
    e = err(cat.write, ROOT, [{"Facility": {"name": "V"}}, {"Facility": {"name": "V"}}])
    assert (e.code, e.offset) == ("OBJECT_ALREADY_EXISTS", 1)
    assert cat.search(ROOT, "SELECT COUNT(f) FROM Facility f WHERE f.name = 'V'") == [0]
    e = err(cat.write, ALICE, {"Datafile": {"name": "df2", "dataset": {"id": world.ds1}}})
    assert e.code == "OBJECT_ALREADY_EXISTS"
    assert e.message == f"Datafile exists with dataset = 'id:{world.ds1}', name = 'df2'"
    # the same name in another dataset is fine
    assert cat.write(ALICE, {"Datafile": {"name": "df2", "dataset": {"id": world.ds3}}})
    # rename onto an existing name
    e = err(cat.write, ALICE, {"Datafile": {"id": world.df3, "name": "df4"}})
    assert (e.code, e.offset) == ("OBJECT_ALREADY_EXISTS", 0)
    # renaming to its own name is not a clash
    assert cat.write(ALICE, {"Datafile": {"id": world.df3, "name": "df3"}}) == []
    # children of one create: duplicates among siblings
    e = err(cat.write, ROOT, {"Dataset": {"name": "dup", "investigation": {"id": world.inv_i},
                                          "type": {"id": world.ds_type},
                                          "datafiles": [{"name": "a"}, {"name": "a"}]}},
            )  # fmt: skip
    assert (e.code, e.offset) == ("OBJECT_ALREADY_EXISTS", 0)
    e = err(cat.write, ROOT, {"DatafileFormat": {"name": "test_format", "version": "42.0.0",
                                                 "facility": {"id": world.facility}}})  # fmt: skip
    assert e.message == (
        f"DatafileFormat exists with facility = 'id:{world.facility}', "
        "name = 'test_format', version = '42.0.0'"
    )


def test_nested_children_created(cat, world):
    [ds] = cat.write(
        ALICE,
        {"Dataset": {"name": "tree", "investigation": {"id": world.inv_i},
                     "type": {"id": world.ds_type},
                     "datafiles": [{"name": "a", "fileSize": 1}, {"name": "b", "fileSize": 2}]}},
    )  # fmt: skip
    got = cat.get(ALICE, "Dataset ds INCLUDE ds.datafiles", ds)["Dataset"]
    assert sorted(d["name"] for d in got["datafiles"]) == ["a", "b"]
    assert all(d["createId"] == ALICE for d in got["datafiles"])
    # children can be added in an update too
    cat.write(ALICE, {"Dataset": {"id": ds, "datafiles": [{"name": "c"}]}})
    assert cat.search(ALICE, f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {ds}") == [3]


def test_transaction_rolls_back_everything(cat, world):
    before = cat.search(ROOT, "SELECT COUNT(df) FROM Datafile df")
    e = err(
        cat.write,
        ALICE,
        [
            {"Datafile": {"name": "t1", "dataset": {"id": world.ds1}}},
            {"Datafile": {"id": world.df1, "name": "renamed"}},
            {"Datafile": {"name": "t2", "dataset": {"id": world.ds_j}}},
        ],
    )
    assert (e.code, e.offset) == ("INSUFFICIENT_PRIVILEGES", 2)
    assert cat.search(ROOT, "SELECT COUNT(df) FROM Datafile df") == before
    assert cat.get(ROOT, "Datafile", world.df1)["Datafile"]["name"] == "a/df1_1"


def test_move_datafile_needs_write_on_both(cat, world):
    cat.write(ALICE, {"Datafile": {"id": world.df2, "dataset": {"id": world.ds3}}})
    assert (
        cat.get(ROOT, "Datafile df INCLUDE df.dataset", world.df2)["Datafile"]["dataset"]["id"]
        == world.ds3
    )


# ===================================================================== delete


def test_delete_cascades(cat, world):
    count = "SELECT COUNT(x) FROM {} x"
    cat.delete(ROOT, {"Investigation": {"id": world.inv_i}})
    assert cat.search(ROOT, count.format("Investigation")) == [1]
    assert cat.search(ROOT, count.format("Dataset")) == [1]
    assert cat.search(ROOT, count.format("Datafile")) == [1]
    assert cat.search(ROOT, count.format("InvestigationUser")) == [1]
    assert cat.search(ROOT, count.format("User")) == [5]  # users are not children
    cat.delete(ROOT, {"Facility": {"id": world.facility}})
    for entity in ("Investigation", "Dataset", "Datafile", "DatasetType", "DatafileFormat",
                   "InvestigationType", "InvestigationUser"):  # fmt: skip
        assert cat.search(ROOT, count.format(entity)) == [0], entity


def test_delete_errors_and_offsets(cat, world):
    e = err(cat.delete, ROOT, {"Dataset": {"id": -1}})
    assert (e.code, e.status, e.offset, e.message) == (
        "NO_SUCH_OBJECT_FOUND", 404, 0, "Dataset[id:-1] not found."
    )  # fmt: skip
    e = err(cat.delete, ROOT, [{"Dataset": {"id": world.ds3}}, {"Dataset": {"id": 777777}}])
    assert (e.code, e.offset) == ("NO_SUCH_OBJECT_FOUND", 1)
    assert cat.search(ROOT, f"SELECT COUNT(x) FROM Dataset x WHERE x.id = {world.ds3}") == [1]
    # deleting an object twice in one request: the second is gone already
    e = err(cat.delete, ROOT, [{"Dataset": {"id": world.ds3}}, {"Dataset": {"id": world.ds3}}])
    assert (e.code, e.offset) == ("NO_SUCH_OBJECT_FOUND", 1)
    for bad_doc in (
        "rubbish",
        {"Dataset": {"id": world.ds3, "name": "x"}},
        {"Dataset": {}},
        {"Nothing": {"id": 1}},
        {"Dataset": {"id": "1"}},
        [{"Dataset": {"id": 1}, "Datafile": {"id": 2}}],
    ):
        e = err(cat.delete, ROOT, bad_doc)
        assert (e.code, e.offset) == ("BAD_PARAMETER", None), bad_doc
    assert Catalogue.parse_delete('[{"Dataset": {"id": 5}}, {"Datafile": {"id": 6}}]') == [
        ("Dataset", 5),
        ("Datafile", 6),
    ]
    cat.delete(ROOT, Catalogue.parse_delete(json.dumps({"Dataset": {"id": world.ds3}})))
    assert cat.search(ROOT, f"SELECT COUNT(x) FROM Dataset x WHERE x.id = {world.ds3}") == [0]


def test_delete_many_datafiles_like_ids_does(cat, world):
    cat.delete(ALICE, [{"Datafile": {"id": i}} for i in (world.df1, world.df2, world.df3)])
    rows = cat.search(ALICE, "SELECT df.name FROM Datafile df ORDER BY df.name")
    assert rows == ["bogus", "df4"]


def test_clone(cat, world):
    new = cat.clone(ROOT, "Datafile", world.df1, {"name": "clone"})
    got = cat.get(ROOT, "Datafile df INCLUDE df.dataset", new)["Datafile"]
    assert got["location"] == "1/1/one" and got["dataset"]["id"] == world.ds1
    assert err(cat.clone, ROOT, "Datafile", world.df1, {}).code == "OBJECT_ALREADY_EXISTS"
    ds = cat.clone(ROOT, "Dataset", world.ds2, {"name": "ds2 copy"})
    assert cat.search(ROOT, f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {ds}") == [2]
    assert err(cat.clone, ROOT, "Datafile", 999999, {}).code == "NO_SUCH_OBJECT_FOUND"
    assert err(cat.clone, FORBIDDEN, "Datafile", world.df1, {"name": "z"}).code == (
        "INSUFFICIENT_PRIVILEGES"
    )


# ===================================================================== concurrency and speed


def test_thread_safety(cat, world):
    errors: list[BaseException] = []
    created: list[int] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        try:
            for i in range(20):
                ids = cat.write(
                    ALICE, {"Datafile": {"name": f"t{n}-{i}", "dataset": {"id": world.ds3}}}
                )
                with lock:
                    created.extend(ids)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(40):
                [n] = cat.search(
                    ALICE, f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {world.ds3}"
                )
                assert 0 <= n <= 80
                rows = cat.search(BOB, "SELECT df.name FROM Datafile df")
                assert rows == ["dfJ"]
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    def sessions() -> None:
        try:
            for _ in range(20):
                sid = cat.login("simple", {"username": "carol", "password": "carol-pw"})
                assert cat.user_of(sid) == CAROL
                cat.logout(sid)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(3)]
    threads += [threading.Thread(target=sessions) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(created) == len(set(created)) == 80
    assert cat.search(
        ROOT, f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {world.ds3}"
    ) == [80]


def test_listing_queries_use_indexes(cat, world, tmp_path):
    """The FS listing queries are index lookups (no full scan of Datafile)."""
    from idsfs.emulator.query import compile_search, parse_search

    con = sqlite3.connect(tmp_path / "cat.sqlite")
    try:
        for query in (
            "SELECT df.id, df.name, df.fileSize, df.modTime, df.datafileModTime, df.checksum, "
            "df.location FROM Datafile df WHERE df.dataset.id = 7 AND df.location IS NOT NULL "
            "ORDER BY df.name LIMIT 0, 1000",
            "SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = 7 AND df.location IS NOT NULL",
            "SELECT df FROM Datafile df WHERE df.dataset.id = 7 AND df.name = 'a.dat'",
            "SELECT ds FROM Dataset ds WHERE ds.investigation.id = 42 ORDER BY ds.name "
            "LIMIT 0, 500",
        ):
            for restricted in (False, True):
                c = compile_search(parse_search(query), ALICE, restricted, 10000)
                plan = " | ".join(
                    str(r[3]) for r in con.execute("EXPLAIN QUERY PLAN " + c.sql, c.params)
                )
                assert "SCAN t0" not in plan, (query, plan)
                assert "USING" in plan, plan
    finally:
        con.close()


def test_ten_thousand_datafiles(cat, world):
    """10,000 datafiles in one dataset: pages of 1,000 tuples, counts, sums, a lookup."""
    files = [{"name": f"f{i:05d}", "location": f"l/{i}", "fileSize": i} for i in range(10000)]
    [ds] = cat.write(
        ROOT,
        {"Dataset": {"name": "big", "investigation": {"id": world.inv_i},
                     "type": {"id": world.ds_type}, "datafiles": files}},
    )  # fmt: skip
    base = (
        "SELECT df.id, df.name, df.fileSize, df.modTime, df.datafileModTime, df.checksum, "
        f"df.location FROM Datafile df WHERE df.dataset.id = {ds} AND df.location IS NOT NULL "
        "ORDER BY df.name LIMIT {}, 1000"
    )
    t0 = time.perf_counter()
    page = cat.search(ALICE, base.format(3000))
    elapsed = time.perf_counter() - t0
    assert len(page) == 1000 and page[0][1] == "f03000" and page[-1][1] == "f03999"
    assert page[0][4] is None and page[0][2] == 3000
    seen: list[str] = []
    for off in range(0, 10000, 1000):
        seen += [r[1] for r in cat.search(ALICE, base.format(off))]
    assert seen == [f["name"] for f in files]
    assert cat.search(ALICE, f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {ds}") == [
        10000
    ]
    assert cat.search(
        ALICE, f"SELECT SUM(df.fileSize) FROM Datafile df WHERE df.dataset.id = {ds}"
    ) == [sum(range(10000))]
    assert cat.search(BOB, base.format(0)) == []
    # exactly maxEntities rows is fine, one more is not (alice sees 10,005 datafiles)
    assert (
        len(cat.search(ALICE, f"SELECT df.id FROM Datafile df WHERE df.dataset.id = {ds}")) == 10000
    )
    assert err(cat.search, ALICE, "SELECT df.id FROM Datafile df").code == "VALIDATION"
    print(f"1000 of 10000 datafile tuples in {elapsed * 1000:.1f} ms")
    cat.delete(ALICE, {"Dataset": {"id": ds}})
    assert cat.search(ROOT, "SELECT COUNT(df) FROM Datafile df") == [6]

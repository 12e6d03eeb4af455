"""ICAT REST API of the emulator over HTTP with plain ``requests``.

Every item of behaviours.md section N is a test named ``test_N<k>_...``; the
list of icat-rest.md §8 is covered by the tests named ``..._S8_<k>_...`` (several
items coincide with N items and share a test); the queries of icat-rest.md §7
that the filesystem uses are each a case of ``test_S7_queries``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import pytest
import requests

DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}")
TIMEOUT = 10


# --------------------------------------------------------------------------- helpers


class Icat:
    """A tiny ICAT REST client written for these tests (form/query encoding by hand)."""

    def __init__(self, emulator: Any, http: requests.Session) -> None:
        self.url = emulator.icat_url
        self.http = http
        self.passwords = dict(emulator.settings.users)  # the accounts of tests/conftest.py

    def login_response(self, plugin: str, username: str, password: str) -> requests.Response:
        doc = {"plugin": plugin, "credentials": [{"username": username}, {"password": password}]}
        return self.http.post(
            f"{self.url}/session", data={"json": json.dumps(doc)}, timeout=TIMEOUT
        )

    def login(self, username: str) -> str:
        r = self.login_response("simple", username, self.passwords[username])
        assert r.status_code == 200, r.text
        return r.json()["sessionId"]

    def get(self, sid: str | None, query: str | None, **params: Any) -> requests.Response:
        p: dict[str, Any] = dict(params)
        if sid is not None:
            p["sessionId"] = sid
        if query is not None:
            p["query"] = query
        return self.http.get(f"{self.url}/entityManager", params=p, timeout=TIMEOUT)

    def search(self, sid: str, query: str) -> Any:
        r = self.get(sid, query)
        assert r.status_code == 200, (query, r.text)
        return r.json()

    def post(self, sid: str | None, entities: Any) -> requests.Response:
        data: dict[str, Any] = {}
        if sid is not None:
            data["sessionId"] = sid
        if entities is not None:
            data["entities"] = entities if isinstance(entities, str) else json.dumps(entities)
        return self.http.post(f"{self.url}/entityManager", data=data, timeout=TIMEOUT)

    def write(self, sid: str, entities: Any) -> list[int]:
        r = self.post(sid, entities)
        assert r.status_code == 200, r.text
        return r.json()

    def delete(self, sid: str | None, entities: Any) -> requests.Response:
        p: dict[str, Any] = {}
        if sid is not None:
            p["sessionId"] = sid
        if entities is not None:
            p["entities"] = entities if isinstance(entities, str) else json.dumps(entities)
        return self.http.delete(f"{self.url}/entityManager", params=p, timeout=TIMEOUT)


def error(r: requests.Response, status: int, code: str, offset: Any = "absent") -> dict[str, Any]:
    """Assert an ICAT error response and return its body."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers.get("Content-Type", "").startswith("application/json")
    body = r.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    if offset == "absent":
        assert "offset" not in body, body
    else:
        assert body.get("offset") == offset, body
    return body


@pytest.fixture
def icat(emulator, http) -> Icat:
    return Icat(emulator, http)


@pytest.fixture
def root(icat) -> str:
    return icat.login("root")


@dataclass
class Data:
    facility: int
    inv_type: int
    ds_type: int
    fmt: int
    inv_i: int
    inv_j: int
    ds1: int
    ds2: int
    ds3: int
    df: dict[str, int]
    alice: str
    bob: str
    forbidden: str


@pytest.fixture
def data(icat, root) -> Data:
    """Facility F, investigation I (alice) with ds1 (df1 'a/df1', df2, a bogus file),
    ds2 (df3, df4 "Person's file"), ds3 (empty); investigation J (bob)."""
    alice, bob, forbidden = icat.login("alice"), icat.login("bob"), icat.login("forbidden")
    users = {r[1]: r[0] for r in icat.search(root, "SELECT u.id, u.name FROM User u")}
    [fac] = icat.write(root, {"Facility": {"name": "F"}})
    f = {"id": fac}
    it, dt, fmt = icat.write(
        root,
        [
            {"InvestigationType": {"name": "experiment", "facility": f}},
            {"DatasetType": {"name": "raw", "facility": f}},
            {"DatafileFormat": {"name": "test_format", "version": "42.0.0", "facility": f}},
        ],
    )
    inv_i, inv_j = icat.write(
        root,
        [
            {"Investigation": {"name": name, "visitId": "N/A", "title": name, "facility": f,
                               "type": {"id": it}}}
            for name in ("I", "J")
        ],
    )  # fmt: skip
    icat.write(
        root,
        [
            {"InvestigationUser": {"role": "PI", "user": {"id": users["simple/alice"]},
                                   "investigation": {"id": inv_i}}},
            {"InvestigationUser": {"role": "member", "user": {"id": users["simple/bob"]},
                                   "investigation": {"id": inv_j}}},
        ],
    )  # fmt: skip

    def files(*specs: tuple[str, str | None]) -> list[dict[str, Any]]:
        return [
            {"name": n, "location": loc, "fileSize": 52, "checksum": "1c291ca3",
             "datafileFormat": {"id": fmt}, "datafileModTime": "2024-04-30T09:00:00.000+00:00"}
            for n, loc in specs
        ]  # fmt: skip

    def dataset(inv: int, name: str, content: list[dict[str, Any]]) -> int:
        doc = {"Dataset": {"name": name, "complete": False, "investigation": {"id": inv},
                           "type": {"id": dt}, "datafiles": content}}  # fmt: skip
        return icat.write(root, doc)[0]

    ds1 = dataset(
        inv_i, "ds1", files(("a/df1", f"{inv_i}/1/one"), ("df2", "x/two"), ("bogus", None))
    )
    ds2 = dataset(inv_i, "ds2", files(("df3", "x/three"), ("df4", "Person's file")))
    ds3 = dataset(inv_i, "ds3", [])
    dataset(inv_j, "dsJ", files(("dfJ", "j/j")))
    df = {r[1]: r[0] for r in icat.search(root, "SELECT df.id, df.name FROM Datafile df")}
    return Data(fac, it, dt, fmt, inv_i, inv_j, ds1, ds2, ds3, df, alice, bob, forbidden)


# --------------------------------------------------------------------------- N: sessions


def test_N1_login_and_session_info(icat):
    r = icat.login_response("simple", "alice", icat.passwords["alice"])
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    sid = r.json()["sessionId"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", sid)
    r = icat.http.get(f"{icat.url}/session/{sid}", timeout=TIMEOUT)
    assert r.status_code == 200
    body = r.json()
    assert body["userName"] == "simple/alice"
    assert 119 < body["remainingMinutes"] < 120.0001


def test_N2_S8_13_logout_refresh(icat):
    sid = icat.login("alice")
    r = icat.http.delete(f"{icat.url}/session/{sid}", timeout=TIMEOUT)
    assert r.status_code == 204 and r.content == b""
    error(icat.http.get(f"{icat.url}/session/{sid}", timeout=TIMEOUT), 403, "SESSION")
    error(icat.get(sid, "SELECT f FROM Facility f"), 403, "SESSION")
    error(icat.http.delete(f"{icat.url}/session/{sid}", timeout=TIMEOUT), 403, "SESSION")
    sid = icat.login("alice")
    time.sleep(0.1)
    before = icat.http.get(f"{icat.url}/session/{sid}", timeout=TIMEOUT).json()["remainingMinutes"]
    assert 119 < before < 120
    r = icat.http.put(f"{icat.url}/session/{sid}", timeout=TIMEOUT)
    assert r.status_code == 204 and r.content == b""
    after = icat.http.get(f"{icat.url}/session/{sid}", timeout=TIMEOUT).json()["remainingMinutes"]
    assert after > before


def test_N3_S8_12_unknown_plugin(icat):
    body = error(icat.login_response("typo", "alice", icat.passwords["alice"]), 403, "SESSION")
    assert "typo" in body["message"]
    error(icat.login_response("simple", "alice", "wrong"), 403, "SESSION")


def test_login_request_errors(icat):
    error(icat.http.post(f"{icat.url}/session", data={}, timeout=TIMEOUT), 400, "BAD_PARAMETER")
    r = icat.http.post(f"{icat.url}/session", data={"json": "{not json"}, timeout=TIMEOUT)
    error(r, 400, "BAD_PARAMETER")
    # non-string credential values are ignored, so the password is missing
    doc = {"plugin": "simple", "credentials": [{"username": "alice"}, {"password": 5}]}
    r = icat.http.post(f"{icat.url}/session", data={"json": json.dumps(doc)}, timeout=TIMEOUT)
    error(r, 403, "SESSION")


def test_session_errors_do_not_echo_the_id(icat):
    sid = "0d9a3706-80d4-4d29-9ff3-4d65d4308a24"
    for r in (
        icat.http.get(f"{icat.url}/session/{sid}", timeout=TIMEOUT),
        icat.http.put(f"{icat.url}/session/{sid}", timeout=TIMEOUT),
        icat.get(sid, "SELECT f FROM Facility f"),
        icat.post(sid, {"Facility": {"name": "x"}}),
    ):
        body = error(r, 403, "SESSION")
        assert sid not in body["message"]
    error(icat.http.get(f"{icat.url}/session/", timeout=TIMEOUT), 403, "SESSION")


def test_expired_session_via_fault_injection(emulator, icat):
    sid = icat.login("alice")
    assert emulator.catalogue.expire(sid) == 1
    body = error(icat.http.get(f"{icat.url}/session/{sid}", timeout=TIMEOUT), 403, "SESSION")
    assert "expired" in body["message"]
    error(icat.get(sid, "SELECT f FROM Facility f"), 403, "SESSION")
    assert icat.http.put(f"{icat.url}/session/{sid}", timeout=TIMEOUT).status_code == 204
    assert icat.get(sid, "SELECT f FROM Facility f").status_code == 200


def test_short_session_lifetime(emulator_factory, http):
    emu = emulator_factory(session_minutes=0.005)  # 0.3 s
    icat = Icat(emu, http)
    sid = icat.login("alice")
    assert (
        icat.http.get(f"{icat.url}/properties", timeout=TIMEOUT).json()["lifetimeMinutes"] == 0.005
    )
    time.sleep(0.35)
    error(icat.get(sid, "SELECT f FROM Facility f"), 403, "SESSION")


# --------------------------------------------------------------------------- N: writes


def test_N4_S8_9_entities_not_json(icat, root):
    body = error(icat.post(root, "rubbish"), 400, "BAD_PARAMETER", offset=0)
    assert "rubbish" in body["message"]


def test_N5_S8_8_not_null_with_offset(icat, root):
    body = error(
        icat.post(root, [{"Facility": {"name": "W"}}, {"Facility": {}}]), 412, "VALIDATION", 1
    )
    assert body["message"] == "Facility: name cannot be null."
    assert icat.search(root, "SELECT COUNT(f) FROM Facility f") == [0]


def test_N6_S8_7_duplicates(icat, root):
    assert len(icat.write(root, {"Facility": {"name": "W"}})) == 1
    body = error(icat.post(root, {"Facility": {"name": "W"}}), 412, "OBJECT_ALREADY_EXISTS", 0)
    assert body["message"] == "Facility exists with name = 'W'"
    r = icat.post(root, [{"Facility": {"name": "V"}}, {"Facility": {"name": "V"}}])
    error(r, 412, "OBJECT_ALREADY_EXISTS", 1)
    assert icat.search(root, "SELECT f.name FROM Facility f ORDER BY f.name") == ["W"]


def test_N7_array_as_value(icat, root):
    error(icat.post(root, {"Datafile": [{"name": "x"}]}), 400, "BAD_PARAMETER", 0)


def test_S8_10_create_ids_in_order_update_returns_empty(icat, root):
    ids = icat.write(root, [{"Facility": {"name": n}} for n in ("b", "a", "c")])
    assert len(ids) == 3 and len(set(ids)) == 3
    names = [icat.search(root, f"SELECT f.name FROM Facility f WHERE f.id = {i}")[0] for i in ids]
    assert names == ["b", "a", "c"]
    assert icat.write(root, {"Facility": {"id": ids[0], "fullName": "Bee"}}) == []
    assert icat.write(root, [{"Facility": {"id": ids[1], "url": "u"}}]) == []
    [f] = icat.search(root, f"SELECT f FROM Facility f WHERE f.id = {ids[0]}")
    assert f["Facility"]["fullName"] == "Bee"


def test_write_check_order_and_other_errors(icat, root, data):
    # session first, then entities missing
    error(icat.post("not-a-session", None), 403, "SESSION")
    error(icat.post(root, None), 400, "BAD_PARAMETER")
    error(icat.post(root, {"Nothing": {"name": "x"}}), 400, "BAD_PARAMETER", 0)
    error(icat.post(root, {"Facility": {"name": "x", "bad": 1}}), 400, "BAD_PARAMETER", 0)
    error(icat.post(root, {"Facility": {"id": 987654, "url": "x"}}), 404, "NO_SUCH_OBJECT_FOUND", 0)
    r = icat.post(root, [{"Facility": {"name": "ok"}},
                         {"Dataset": {"name": "x", "investigation": {"id": 987654},
                                      "type": {"id": data.ds_type}}}])  # fmt: skip
    body = error(r, 404, "NO_SUCH_OBJECT_FOUND", 1)
    assert body["message"] == "Investigation[id:987654] not found."
    r = icat.post(root, {"Dataset": {"id": data.ds1, "startDate": "2024-01-01"}})
    error(r, 400, "BAD_PARAMETER", 0)
    r = icat.post(data.bob, {"Datafile": {"name": "x", "dataset": {"id": data.ds1}}})
    body = error(r, 403, "INSUFFICIENT_PRIVILEGES", 0)
    assert body["message"] == "CREATE access to this Datafile is not allowed."
    r = icat.post(root, {"Facility": {"name": "x" * 256}})
    body = error(r, 412, "VALIDATION", 0)
    assert body["message"] == "Facility: name cannot have length > 255"
    assert icat.search(root, "SELECT COUNT(f) FROM Facility f") == [1]


def test_N8_S8_11_delete_cascade_and_missing(icat, root, data):
    ids = icat.write(
        root,
        [{"Dataset": {"name": f"d{i}", "investigation": {"id": data.inv_j},
                      "type": {"id": data.ds_type},
                      "datafiles": [{"name": "f", "location": "l"}]}} for i in range(5)],
    )  # fmt: skip
    count = (
        f"SELECT COUNT(ds) FROM Dataset ds WHERE ds.investigation.id = {data.inv_j} "
        "AND ds.name LIKE 'd_'"
    )
    assert icat.search(root, count) == [5]
    r = icat.delete(root, {"Dataset": {"id": ids[0]}})
    assert r.status_code == 204 and r.content == b""
    assert icat.search(root, count) == [4]
    r = icat.delete(root, [{"Dataset": {"id": ids[1]}}, {"Dataset": {"id": ids[2]}}])
    assert r.status_code == 204
    assert icat.search(root, count) == [2]
    body = error(icat.delete(root, {"Dataset": {"id": -1}}), 404, "NO_SUCH_OBJECT_FOUND", 0)
    assert body["message"] == "Dataset[id:-1] not found."
    # the cascade removed the datafiles of the deleted datasets
    assert icat.search(
        root, f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {ids[0]}"
    ) == [0]
    assert icat.search(
        root, f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {ids[3]}"
    ) == [1]
    # deleting an investigation removes its datasets, datafiles and memberships
    assert icat.delete(root, {"Investigation": {"id": data.inv_i}}).status_code == 204
    for entity in ("Dataset", "Datafile", "InvestigationUser"):
        q = f"SELECT COUNT(x) FROM {entity} x WHERE x.id IN ({data.ds1}, {data.df['df3']})"
        assert icat.search(root, q) == [0]


def test_delete_check_order(icat, root, data):
    error(icat.delete("not-a-session", None), 400, "BAD_PARAMETER")
    error(icat.delete("not-a-session", "rubbish"), 400, "BAD_PARAMETER")
    error(icat.delete("not-a-session", {"Dataset": {"id": 1, "name": "x"}}), 400, "BAD_PARAMETER")
    error(icat.delete("not-a-session", {"Dataset": {"id": data.ds1}}), 403, "SESSION")
    r = icat.delete(data.bob, [{"Dataset": {"id": data.ds3}}])
    body = error(r, 403, "INSUFFICIENT_PRIVILEGES", 0)
    assert body["message"] == "DELETE access to this Dataset is not allowed."
    r = icat.delete(root, [{"Dataset": {"id": data.ds3}}, {"Dataset": {"id": 5555555}}])
    error(r, 404, "NO_SUCH_OBJECT_FOUND", 1)
    assert icat.search(root, f"SELECT COUNT(ds) FROM Dataset ds WHERE ds.id = {data.ds3}") == [1]


# --------------------------------------------------------------------------- N: reads


def test_N9_S8_1_query_missing_before_session(icat):
    body = error(icat.get("not-a-session", None), 400, "BAD_PARAMETER")
    assert "query" in body["message"]
    error(icat.get(None, None), 400, "BAD_PARAMETER")
    error(icat.get("not-a-session", "SELECT f FROM Facility f"), 403, "SESSION")
    error(icat.get(None, "SELECT f FROM Facility f"), 403, "SESSION")


def test_N10_S8_4_result_shapes(icat, root, data):
    assert icat.search(
        root, f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {data.ds1}"
    ) == [3]
    rows = icat.search(root, "SELECT ds.id FROM Dataset ds LIMIT 0, 1")
    assert len(rows) == 1 and isinstance(rows[0], int)
    rows = icat.search(root, "SELECT it FROM InvestigationType it INCLUDE 1")
    assert rows == [{"InvestigationType": rows[0]["InvestigationType"]}]
    it = rows[0]["InvestigationType"]
    assert it["facility"]["id"] == data.facility and "Facility" not in it["facility"]
    assert it["investigations"] == []
    rows = icat.search(root, "SELECT f.id, f.name FROM Facility f")
    assert rows == [[data.facility, "F"]]


def test_S8_5_sum_of_nothing_is_null(icat, root, data):
    q = f"SELECT SUM(df.fileSize) FROM Datafile df WHERE df.dataset.id = {data.ds3}"
    r = icat.get(root, q)
    assert r.status_code == 200 and r.text.replace(" ", "") == "[null]"
    assert icat.search(root, q.replace(str(data.ds3), str(data.ds2))) == [104]


def test_N11_S8_6_too_many_results(emulator_factory, http):
    emu = emulator_factory(max_entities=3)
    icat = Icat(emu, http)
    root = icat.login("root")
    icat.write(root, [{"Facility": {"name": f"F{i}"}} for i in range(4)])
    body = error(icat.get(root, "SELECT f FROM Facility f"), 412, "VALIDATION")
    assert "3" in body["message"]
    error(icat.get(root, "SELECT f.name FROM Facility f LIMIT 0, *"), 412, "VALIDATION")
    assert len(icat.search(root, "SELECT f FROM Facility f ORDER BY f.id LIMIT 0, 3")) == 3
    assert len(icat.search(root, "SELECT f FROM Facility f ORDER BY f.id LIMIT 3, 3")) == 1
    assert icat.search(root, "SELECT COUNT(f) FROM Facility f") == [4]
    props = http.get(f"{emu.icat_url}/properties", timeout=TIMEOUT).json()
    assert props["maxEntities"] == 3


def test_N11_S8_2_S8_3_authorisation(icat, root, data):
    # get by id: nonexistent 404 (before the privilege check), unreadable 403
    body = error(icat.get(data.forbidden, "Datafile", id=987654), 404, "NO_SUCH_OBJECT_FOUND")
    assert body["message"] == "Datafile[id:987654] not found."
    body = error(
        icat.get(data.forbidden, "Datafile", id=data.df["df2"]), 403, "INSUFFICIENT_PRIVILEGES"
    )
    assert body["message"] == "READ access to this Datafile is not allowed."
    error(icat.get(data.bob, "Investigation", id=data.inv_i), 403, "INSUFFICIENT_PRIVILEGES")
    # searches drop unreadable rows silently
    q = "SELECT df.name FROM Datafile df WHERE df.location IS NOT NULL ORDER BY df.name"
    assert icat.search(data.alice, q) == ["a/df1", "df2", "df3", "df4"]
    assert icat.search(data.bob, q) == ["dfJ"]
    assert icat.search(data.forbidden, q) == []
    assert icat.search(data.forbidden, "SELECT COUNT(inv) FROM Investigation inv") == [0]
    assert icat.search(root, "SELECT COUNT(inv) FROM Investigation inv") == [2]
    assert icat.search(data.forbidden, "SELECT f.name FROM Facility f") == ["F"]
    got = icat.get(data.alice, "Dataset ds INCLUDE ds.investigation", id=data.ds1).json()
    assert got["Dataset"]["investigation"]["name"] == "I"


def test_N12_S8_14_entity_fields_and_unknown_path(icat, root, data):
    for entity in ("Facility", "Investigation", "Dataset", "Datafile", "InvestigationUser", "User"):
        for row in icat.search(root, f"SELECT x FROM {entity} x"):
            obj = row[entity]
            for key in ("id", "createId", "createTime", "modId", "modTime"):
                assert key in obj, (entity, key)
            assert DATE_RE.match(obj["createTime"]) and DATE_RE.match(obj["modTime"])
            assert obj["createId"] == "simple/root" or entity == "User"
    for path in ("nothing", "lucene/data", "port", "jpql", "entityManager/x"):
        body = error(icat.http.get(f"{icat.url}/{path}", timeout=TIMEOUT), 501, "NOT_IMPLEMENTED")
        assert "not implemented" in body["message"]


def test_get_by_id_forms(icat, root, data):
    r = icat.get(root, "Datafile df INCLUDE df.dataset.investigation", id=data.df["df3"])
    assert r.status_code == 200
    got = r.json()
    assert list(got) == ["Datafile"]
    assert got["Datafile"]["dataset"]["investigation"]["id"] == data.inv_i
    got = icat.get(root, "Dataset INCLUDE Investigation, Facility", id=data.ds2).json()
    assert got["Dataset"]["investigation"]["facility"]["name"] == "F"
    error(icat.get(root, "Dataset", id="abc"), 400, "BAD_PARAMETER")
    error(icat.get(root, "Nothing", id=data.ds1), 400, "BAD_PARAMETER")
    error(icat.get(root, "Dataset ds INCLUDE ds.nothing", id=data.ds1), 400, "BAD_PARAMETER")


def test_search_errors(icat, root, data):
    for query in (
        'SELECT ds FROM Dataset ds WHERE ds.name = "x"',
        "SELECT ds FROM Dataset ds WHERE ds.nothing = 1",
        "SELECT ds FROM Dataset ds INCLUDE 1, ds.investigation",
        "SELECT ds FROM Dataset ds INCLUDE ds.investigation, ds.investigation",
        "SELECT ds.name FROM Dataset ds INCLUDE ds.investigation",
        "SELECT ds FROM Dataset ds JOIN FETCH ds.datafiles df",
        "DELETE FROM Dataset ds",
    ):
        body = error(icat.get(root, query), 400, "BAD_PARAMETER")
        assert "offset" not in body


def test_version_properties_user(icat, root):
    r = icat.http.get(f"{icat.url}/version", timeout=TIMEOUT)
    assert r.status_code == 200
    version = r.json()["version"]
    assert re.fullmatch(r"6\.\d+\.\d+", version)
    props = icat.http.get(f"{icat.url}/properties", timeout=TIMEOUT).json()
    assert props["maxEntities"] == 10000 and props["lifetimeMinutes"] == 120
    assert props["authenticators"][0]["mnemonic"] == "simple"
    assert {"name": "password", "hide": True} in props["authenticators"][0]["keys"]
    assert isinstance(props["containerType"], str)
    r = icat.http.get(f"{icat.url}/user/simple%2Froot", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == {"loggedIn": True}
    r = icat.http.get(f"{icat.url}/user/simple/bob", timeout=TIMEOUT)
    assert r.json() == {"loggedIn": False}


def test_cloner(icat, root, data):
    r = icat.http.post(
        f"{icat.url}/cloner",
        data={"sessionId": root, "name": "Datafile", "id": data.df["a/df1"],
              "keys": json.dumps({"name": "clone of df1"})},
        timeout=TIMEOUT,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    new = r.json()["id"]
    [row] = icat.search(root, f"SELECT df.name, df.location FROM Datafile df WHERE df.id = {new}")
    assert row == ["clone of df1", f"{data.inv_i}/1/one"]
    r = icat.http.post(f"{icat.url}/cloner", data={"sessionId": "x", "name": "Datafile", "id": 1},
                       timeout=TIMEOUT)  # fmt: skip
    error(r, 403, "SESSION")


# --------------------------------------------------------------------------- §7 queries


def _section7_cases(d: Data) -> list[tuple[str, Any]]:
    located = f"df.dataset.id = {d.ds1} AND df.location IS NOT NULL"
    return [
        # investigations visible to the user, with their facility (ORDER BY before INCLUDE)
        (
            "SELECT inv FROM Investigation inv ORDER BY inv.name, inv.visitId "
            "INCLUDE inv.facility LIMIT 0, 500",
            lambda rows: (
                [r["Investigation"]["name"] for r in rows] == ["I"]
                and rows[0]["Investigation"]["facility"]["name"] == "F"
            ),
        ),
        (
            "SELECT inv FROM Investigation inv JOIN inv.investigationUsers iu "
            "WHERE iu.user.name = :user ORDER BY inv.name LIMIT 0, 500",
            lambda rows: [r["Investigation"]["name"] for r in rows] == ["I"],
        ),
        ("SELECT COUNT(inv) FROM Investigation inv", [1]),
        (
            "SELECT inv FROM Investigation inv WHERE inv.facility.name = 'F' AND inv.name = 'I' "
            "AND inv.visitId = 'N/A'",
            lambda rows: len(rows) == 1 and rows[0]["Investigation"]["id"] == d.inv_i,
        ),
        (
            "SELECT inv FROM Investigation inv WHERE inv.facility.name = 'F' AND inv.name = 'J' "
            "AND inv.visitId = 'N/A'",
            [],  # J exists but alice may not read it
        ),
        (
            f"SELECT ds FROM Dataset ds WHERE ds.investigation.id = {d.inv_i} ORDER BY ds.name "
            "LIMIT 0, 500",
            lambda rows: [r["Dataset"]["name"] for r in rows] == ["ds1", "ds2", "ds3"],
        ),
        (f"SELECT COUNT(ds) FROM Dataset ds WHERE ds.investigation.id = {d.inv_i}", [3]),
        (
            f"SELECT ds FROM Dataset ds WHERE ds.investigation.id = {d.inv_i} AND ds.name = 'ds2'",
            lambda rows: [r["Dataset"]["id"] for r in rows] == [d.ds2],
        ),
        (
            f"SELECT df FROM Datafile df WHERE {located} ORDER BY df.name LIMIT 0, 1000",
            lambda rows: (
                [r["Datafile"]["name"] for r in rows] == ["a/df1", "df2"]
                and all(
                    {"id", "name", "fileSize", "checksum", "location", "modTime", "datafileModTime"}
                    <= set(r["Datafile"])
                    for r in rows
                )
            ),
        ),
        (
            "SELECT df.id, df.name, df.fileSize, df.modTime, df.datafileModTime, df.checksum, "
            f"df.location FROM Datafile df WHERE {located} ORDER BY df.name LIMIT 0, 1000",
            lambda rows: (
                [r[:3] for r in rows] == [[d.df["a/df1"], "a/df1", 52], [d.df["df2"], "df2", 52]]
                and all(DATE_RE.match(r[3]) and DATE_RE.match(r[4]) for r in rows)
                and [r[5:] for r in rows]
                == [["1c291ca3", f"{d.inv_i}/1/one"], ["1c291ca3", "x/two"]]
            ),
        ),
        (f"SELECT COUNT(df) FROM Datafile df WHERE {located}", [2]),
        (f"SELECT SUM(df.fileSize) FROM Datafile df WHERE {located}", [104]),
        (
            f"SELECT SUM(df.fileSize) FROM Datafile df WHERE df.dataset.id = {d.ds3} "
            "AND df.location IS NOT NULL",
            [None],
        ),
        (
            f"SELECT df FROM Datafile df WHERE df.dataset.id = {d.ds1} AND df.name = 'df2'",
            lambda rows: [r["Datafile"]["id"] for r in rows] == [d.df["df2"]],
        ),
        (
            f"SELECT df FROM Datafile df WHERE df.dataset.id = {d.ds2} "
            "AND df.location = 'Person''s file'",
            lambda rows: [r["Datafile"]["name"] for r in rows] == ["df4"],
        ),
        (
            f"SELECT f FROM DatafileFormat f WHERE f.facility.id = {d.facility} "
            "ORDER BY f.name, f.version",
            lambda rows: [r["DatafileFormat"]["version"] for r in rows] == ["42.0.0"],
        ),
        (
            f"SELECT t FROM DatasetType t WHERE t.facility.id = {d.facility}",
            lambda rows: [r["DatasetType"]["name"] for r in rows] == ["raw"],
        ),
        (
            f"SELECT df FROM Datafile df WHERE df.dataset.id = {d.ds1} "
            "AND df.modTime > {ts 2024-05-01 00:00:00}",
            lambda rows: len(rows) == 3,
        ),
        (
            f"SELECT df FROM Datafile df WHERE df.dataset.id = {d.ds1} "
            "AND df.datafileModTime > {ts 2024-05-01 00:00:00}",
            [],
        ),
    ]


def test_S7_queries(icat, data):
    for query, expected in _section7_cases(data):
        rows = icat.search(data.alice, query)
        if callable(expected):
            assert expected(rows), (query, rows)
        else:
            assert rows == expected, (query, rows)
    got = icat.get(data.alice, "Datafile df INCLUDE df.dataset.investigation", id=data.df["df2"])
    assert got.json()["Datafile"]["dataset"]["investigation"]["name"] == "I"


def test_S7_include_before_order_by_is_rejected(icat, data):
    """The first query of icat-rest.md §7 puts INCLUDE before ORDER BY; ICAT's grammar
    (§4.1) requires ORDER BY first, so like ICAT the emulator answers 400."""
    r = icat.get(
        data.alice,
        "SELECT inv FROM Investigation inv INCLUDE inv.facility ORDER BY inv.name, inv.visitId "
        "LIMIT 0, 500",
    )
    body = error(r, 400, "BAD_PARAMETER")
    assert "ORDER BY must come before INCLUDE" in body["message"]


def test_S7_paging(icat, root, data):
    icat.write(
        root,
        [{"Datafile": {"name": f"p{i:02d}", "location": f"p/{i}", "dataset": {"id": data.ds3}}}
         for i in range(25)],
    )  # fmt: skip
    base = (
        "SELECT df.id, df.name FROM Datafile df WHERE df.dataset.id = {} AND df.location IS NOT "
        "NULL ORDER BY df.{} LIMIT {}, 10"
    )
    by_name = []
    for offset in (0, 10, 20, 30):
        page = icat.search(data.alice, base.format(data.ds3, "name", offset))
        assert len(page) == {0: 10, 10: 10, 20: 5, 30: 0}[offset]
        by_name += [r[1] for r in page]
    assert by_name == [f"p{i:02d}" for i in range(25)]
    by_id = []
    for offset in (0, 10, 20):
        by_id += [r[0] for r in icat.search(data.alice, base.format(data.ds3, "id", offset))]
    assert by_id == sorted(by_id) and len(set(by_id)) == 25


def test_S7_filesystem_writes(icat, root, data):
    # mkdir: a new dataset by a member
    [ds] = icat.write(
        data.alice,
        {"Dataset": {"name": "new", "complete": False, "investigation": {"id": data.inv_i},
                     "type": {"id": data.ds_type}}},
    )  # fmt: skip
    # rename a datafile; a clash is 412
    assert icat.write(data.alice, {"Datafile": {"id": data.df["df2"], "name": "b.dat"}}) == []
    r = icat.post(data.alice, {"Datafile": {"id": data.df["df3"], "name": "df4"}})
    error(r, 412, "OBJECT_ALREADY_EXISTS", 0)
    error(icat.post(data.bob, {"Datafile": {"id": data.df["df3"], "name": "z"}}), 403,
          "INSUFFICIENT_PRIVILEGES", 0)  # fmt: skip
    # move a datafile to another dataset
    assert icat.write(data.alice, {"Datafile": {"id": data.df["df3"], "dataset": {"id": ds}}}) == []
    q = f"SELECT df.name FROM Datafile df WHERE df.dataset.id = {ds}"
    assert icat.search(data.alice, q) == ["df3"]
    # rmdir (cascades)
    assert icat.delete(data.alice, {"Dataset": {"id": ds}}).status_code == 204
    assert icat.search(
        root, f"SELECT COUNT(df) FROM Datafile df WHERE df.id = {data.df['df3']}"
    ) == [0]


# --------------------------------------------------------------------------- state


def test_restart_keeps_sessions_and_entities(emulator_factory, http, tmp_path):
    data_dir = tmp_path / "kept"
    emu = emulator_factory(data_dir=data_dir)
    icat = Icat(emu, http)
    root = icat.login("root")
    [fac] = icat.write(root, {"Facility": {"name": "Persistent"}})
    emu.stop()
    emu2 = emulator_factory(data_dir=data_dir)
    icat2 = Icat(emu2, http)
    assert icat2.http.get(f"{icat2.url}/session/{root}", timeout=TIMEOUT).json()["userName"] == (
        "simple/root"
    )
    assert icat2.search(root, "SELECT f.id, f.name FROM Facility f") == [[fac, "Persistent"]]
    [new] = icat2.write(root, {"Facility": {"name": "After"}})
    assert new > fac


def test_concurrent_clients(emulator):
    import threading

    failures: list[BaseException] = []
    setup = Icat(emulator, requests.Session())
    root = setup.login("root")
    [fac] = setup.write(root, {"Facility": {"name": "C"}})

    def client(n: int) -> None:
        try:
            with requests.Session() as s:
                icat = Icat(emulator, s)
                sid = icat.login("root" if n % 2 == 0 else "alice")
                for i in range(10):
                    if n % 2 == 0:
                        icat.write(
                            sid, {"DatasetType": {"name": f"t{n}-{i}", "facility": {"id": fac}}}
                        )
                    rows = icat.search(sid, "SELECT COUNT(t) FROM DatasetType t")
                    assert isinstance(rows[0], int)
                icat.http.delete(f"{icat.url}/session/{sid}", timeout=TIMEOUT)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert setup.search(root, "SELECT COUNT(t) FROM DatasetType t") == [30]
    setup.http.close()


def test_large_form_body_is_read_whole(icat, root):
    """A create request of a few hundred KB arrives whole (a body spans many socket reads)."""
    entities = [{"Facility": {"name": f"bulk facility {i:05d}", "description": "x" * 100}}
                for i in range(2000)]
    ids = icat.write(root, entities)
    assert len(ids) == 2000
    query = "SELECT COUNT(f) FROM Facility f WHERE f.name LIKE 'bulk facility %'"
    assert icat.search(root, query) == [2000]

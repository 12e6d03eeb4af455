"""IDS protocol tests, behaviours.md sections A-D (discovery, validation, authorisation,
preparation and information calls), with plain ``requests`` against the emulator."""

from __future__ import annotations

import re
import urllib.parse

import pytest
import requests

UUID_RE = re.compile(r"[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}")


def err(r: requests.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["code"] == code and isinstance(body["message"], str)
    assert set(body) == {"code", "message"}
    return body


def ids_of(r: requests.Response) -> set[int]:
    assert r.status_code == 200, r.text
    return set(r.json()["ids"])


# ------------------------------------------------------------------------------- A


def test_A1_ping_and_version(std) -> None:
    r = std.get("ping")
    assert r.status_code == 200 and r.content == b"IdsOK"
    assert r.headers["Content-Type"].startswith("text/plain")
    r = std.get("version")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    version = r.json()["version"]
    assert isinstance(version, str)
    assert tuple(int(x) for x in version.split(".")[:3]) >= (1, 11, 0)


def test_A2_read_only_and_two_level_single(std) -> None:
    assert std.get("isReadOnly").text == "false"
    assert std.get("isTwoLevel").text == "false"


def test_A2_two_level(std2) -> None:
    assert std2.get("isTwoLevel").text == "true"
    assert std2.get("isReadOnly").text == "false"


def test_A3_icat_url(std) -> None:
    r = std.get("getIcatUrl")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    url = urllib.parse.urlsplit(r.text)
    assert url.scheme == "http" and url.hostname == "127.0.0.1" and url.port == std.emu.port
    # ICAT answers below that URL
    assert requests.get(f"{r.text}/icat/version", timeout=10).json()["version"].startswith("6.")


@pytest.mark.parametrize("path", ["getApiVersion", "noSuchCall", "ping/extra"])
def test_A4_unknown_path_501(std, path: str) -> None:
    r = std.http.get(f"{std.ids}/{path}")
    assert r.status_code == 501 and r.json()["code"] == "NOT_IMPLEMENTED"


def test_A5_void_calls_204_empty(std2) -> None:
    s = std2
    for r in (
        s.post("restore", sessionId=s.root, datasetIds=s.ds1),
        s.post("archive", sessionId=s.root, datasetIds=s.ds3),
        s.post("reset", sessionId=s.root, datasetIds=s.ds1),
    ):
        assert r.status_code == 204 and r.content == b""
    s.wait_idle()
    assert s.post("write", sessionId=s.root, datasetIds=s.ds1).status_code == 204
    s.wait_idle()
    r = s.delete(sessionId=s.root, datafileIds=s.df2)
    assert r.status_code == 204 and r.content == b""
    assert "Content-Length" not in r.headers or r.headers["Content-Length"] == "0"


def _framing_ok(r: requests.Response) -> None:
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE, PUT"
    assert r.headers["Access-Control-Allow-Headers"] == "Content-Type"
    if r.status_code == 204:
        return
    has_length = "Content-Length" in r.headers
    chunked = r.headers.get("Transfer-Encoding", "").lower() == "chunked"
    assert has_length != chunked, r.headers


def test_A6_framing_and_cors(std) -> None:
    s = std
    pid = s.prepare(datafileIds=s.df1)
    responses = [
        s.get("ping"),
        s.get("version"),
        s.get("getSize", sessionId=s.root, datasetIds=s.ds1),
        s.get("getDatafileIds", preparedId=pid),
        s.get("getData", sessionId=s.root, datafileIds=s.df1),
        s.get("getData", sessionId=s.root, datasetIds=s.ds1),
        s.get("getData", preparedId=pid),
        s.get("getData", preparedId=pid, headers={"Range": "bytes=5-"}),
        s.get("getStatus", sessionId="nonsense"),
        s.post("reset", preparedId=pid),
        s.http.get(f"{s.ids}/unknown"),
    ]
    for r in responses:
        _framing_ok(r)


def test_A7_error_envelope_per_class(std_factory) -> None:
    single = std_factory()
    err(single.get("getStatus", sessionId="bad"), 400, "BadRequestException")
    err(
        single.get("getStatus", sessionId=single.forbidden, datafileIds=single.df1),
        403,
        "InsufficientPrivilegesException",
    )
    err(
        single.get("isPrepared", preparedId="88888888-4444-4444-4444-cccccccccccc"),
        404,
        "NotFoundException",
    )
    single.upload("dup", b"x")
    err(
        single.put(
            b"y",
            sessionId=single.root,
            name="dup",
            datasetId=single.ds1,
            datafileFormatId=single.fmt,
        ),
        500,
        "InternalException",
    )
    err(
        single.post("archive", sessionId=single.root, datasetIds=single.ds1),
        501,
        "NotImplementedException",
    )
    two = std_factory(storage="dataset")
    err(two.get("getData", sessionId=two.root, datasetIds=two.ds1), 503, "DataNotOnlineException")


# ------------------------------------------------------------------------------- B


def test_B1_is_prepared_bad_and_unknown(std) -> None:
    err(std.get("isPrepared", preparedId="99999999"), 400, "BadRequestException")
    err(std.get("isPrepared", preparedId="bad preparedId format"), 400, "BadRequestException")
    err(std.get("isPrepared"), 400, "BadRequestException")
    err(
        std.get("isPrepared", preparedId="88888888-4444-4444-4444-cccccccccccc"),
        404,
        "NotFoundException",
    )


def test_B2_get_data_bad_and_unknown_prepared(std) -> None:
    err(std.get("getData", preparedId="bad preparedId format"), 400, "BadRequestException")
    err(
        std.get("getData", preparedId="aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"),
        404,
        "NotFoundException",
    )


def test_B3_prepare_bad_and_unknown_session(std) -> None:
    err(std.post("prepareData", sessionId="bad sessionId format"), 400, "BadRequestException")
    err(
        std.post("prepareData", sessionId="bad sessionId format", datafileIds=std.dfs),
        400,
        "BadRequestException",
    )
    err(std.post("prepareData", datafileIds=std.df1), 400, "BadRequestException")
    err(
        std.post(
            "prepareData", sessionId="aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa", datafileIds=std.df1
        ),
        403,
        "InsufficientPrivilegesException",
    )


def test_B4_upper_case_session_rejected(std) -> None:
    upper = std.root.upper()
    assert upper != std.root
    err(std.post("prepareData", sessionId=upper, datafileIds=std.df1), 400, "BadRequestException")
    err(std.get("getStatus", sessionId=upper, datafileIds=std.df1), 400, "BadRequestException")
    err(std.get("getData", sessionId=upper, datafileIds=std.df1), 400, "BadRequestException")


def test_B5_id_list_parsing(std) -> None:
    s = std
    for bad in ("abc", "", f"{s.df1},,{s.df2}", f" {s.df1}", f"{s.df1} ", "1.5", "0x10"):
        err(
            s.http.get(f"{s.ids}/getDatafileIds", params={"sessionId": s.root, "datafileIds": bad}),
            400,
            "BadRequestException",
        )
    for good in (
        f"{s.df1},{s.df2},",
        f"{s.df1} , {s.df2}",
        f"{s.df1},{s.df2},{s.df1}",
        f"+{s.df1},{s.df2}",
    ):
        r = s.http.get(f"{s.ids}/getDatafileIds", params={"sessionId": s.root, "datafileIds": good})
        assert ids_of(r) == {s.df1, s.df2}
    # a negative id parses and is then simply not found
    err(s.get("getDatafileIds", sessionId=s.root, datafileIds=-5), 404, "NotFoundException")
    err(s.get("getDatafileIds", sessionId=s.root, datasetIds="x"), 400, "BadRequestException")
    err(
        s.get("getDatafileIds", sessionId=s.root, investigationIds="1;2"),
        400,
        "BadRequestException",
    )


def test_B6_bad_range_forms(std) -> None:
    s = std
    pid = s.prepare(datafileIds=s.df1)
    for rng in (
        "bytes=-10-",
        "bytes=0-99",
        "bytes=-500",
        "bytes= 5-",
        "bytes=5-,7-",
        "items=5-",
        "bytes=5",
    ):
        err(s.get("getData", preparedId=pid, headers={"Range": rng}), 400, "BadRequestException")
        err(
            s.get("getData", sessionId=s.root, datafileIds=s.df1, headers={"Range": rng}),
            400,
            "BadRequestException",
        )
    # the Range check comes before everything else
    err(
        s.get("getData", preparedId="bad", headers={"Range": "bytes=0-1"}),
        400,
        "BadRequestException",
    )


def test_B7_prepared_id_wins_over_garbage_session(std) -> None:
    s = std
    pid = s.prepare(datafileIds=s.df1)
    r = s.get("getData", preparedId=pid, sessionId="garbage", datafileIds="junk")
    assert r.status_code == 200 and r.content == s.content(s.df1)
    assert s.get("getSize", preparedId=pid, sessionId="garbage").text == "52"
    assert s.get("getStatus", preparedId=pid, sessionId="garbage").text == "ONLINE"
    assert ids_of(s.get("getDatafileIds", preparedId=pid, sessionId="garbage")) == {s.df1}
    # an empty preparedId value still selects preparedId mode
    err(
        s.get("getSize", preparedId="", sessionId=s.root, datafileIds=s.df1),
        400,
        "BadRequestException",
    )


# ------------------------------------------------------------------------------- C


def test_C1_forbidden_user(std) -> None:
    s = std
    err(
        s.get("getData", sessionId=s.forbidden, datafileIds=s.dfs),
        403,
        "InsufficientPrivilegesException",
    )
    err(
        s.get("getStatus", sessionId=s.forbidden, datafileIds=s.dfs),
        403,
        "InsufficientPrivilegesException",
    )
    err(
        s.post("prepareData", sessionId=s.forbidden, datafileIds=s.dfs),
        403,
        "InsufficientPrivilegesException",
    )
    err(
        s.get("getData", sessionId=s.forbidden, datasetIds=s.ds1),
        403,
        "InsufficientPrivilegesException",
    )
    # investigation ids are filtered silently instead
    assert ids_of(s.get("getDatafileIds", sessionId=s.forbidden, investigationIds=s.inv)) == set()
    # a member may read
    assert ids_of(s.get("getDatafileIds", sessionId=s.alice, investigationIds=s.inv)) == set(s.dfs)


def test_C2_service_status_needs_root(std) -> None:
    err(
        std.get("getServiceStatus", sessionId=std.forbidden), 403, "InsufficientPrivilegesException"
    )
    err(std.get("getServiceStatus", sessionId=std.alice), 403, "InsufficientPrivilegesException")
    # no format check here: garbage gives 403 too
    err(std.get("getServiceStatus", sessionId="garbage"), 403, "InsufficientPrivilegesException")
    assert std.get("getServiceStatus", sessionId=std.root).status_code == 200


def test_C3_anonymous_status(std) -> None:
    s = std
    r = s.get("getStatus", datasetIds=s.ds1)
    assert r.status_code == 200 and r.text == "ONLINE"
    err(s.get("getStatus", datasetIds=[s.ds1, s.ds2, s.ds3, 9999999]), 404, "NotFoundException")


def test_C3_anonymous_status_two_level(std2) -> None:
    assert std2.get("getStatus", datasetIds=std2.ds1).text == "ARCHIVED"


def test_C4_two_level_archive_write_bad_sessions(std2) -> None:
    s = std2
    for ep in ("archive", "write", "restore"):
        err(
            s.post(ep, sessionId="bad sessionId format", datasetIds=s.ds1),
            400,
            "BadRequestException",
        )
        err(
            s.post(ep, sessionId="aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa", datasetIds=s.ds1),
            403,
            "InsufficientPrivilegesException",
        )


def test_C5_expired_or_logged_out_session(std) -> None:
    s = std
    sid = s.emu.login("alice")
    assert s.get("getStatus", sessionId=sid, datafileIds=s.df1).text == "ONLINE"
    s.emu.expire_sessions(sid)
    calls = [
        s.get("getStatus", sessionId=sid, datafileIds=s.df1),
        s.get("getData", sessionId=sid, datafileIds=s.df1),
        s.get("getDatafileIds", sessionId=sid, datasetIds=s.ds1),
        s.get("getSize", sessionId=sid, datasetIds=[s.ds1, s.ds2]),
        s.post("prepareData", sessionId=sid, datafileIds=s.df1),
        s.post("reset", sessionId=sid, datafileIds=s.df1),
        s.delete(sessionId=sid, datafileIds=s.df1),
        s.put(b"x", sessionId=sid, name="n", datasetId=s.ds1, datafileFormatId=s.fmt),
    ]
    for r in calls:
        err(r, 403, "InsufficientPrivilegesException")
    sid2 = s.emu.login("alice")
    s.http.delete(f"{s.emu.icat_url}/session/{sid2}")
    err(s.get("getData", sessionId=sid2, datafileIds=s.df1), 403, "InsufficientPrivilegesException")


# ------------------------------------------------------------------------------- D


def test_D1_prepare_returns_uuid(std) -> None:
    pid = std.prepare(datafileIds=std.dfs)
    assert UUID_RE.fullmatch(pid)


def test_D2_single_level_is_prepared_immediately(std) -> None:
    pid = std.prepare(datafileIds=std.dfs)
    r = std.get("isPrepared", preparedId=pid)
    assert r.status_code == 200 and r.text == "true"


def test_D3_prepare_not_found(std) -> None:
    s = std
    err(
        s.post("prepareData", sessionId=s.root, datafileIds=[s.df1, s.df2, s.df3, 99999]),
        404,
        "NotFoundException",
    )
    err(s.post("prepareData", sessionId=s.root, datafileIds=99999), 404, "NotFoundException")
    err(s.post("prepareData", sessionId=s.root, datasetIds=99999), 404, "NotFoundException")


def test_D4_prepared_datafile_ids(std) -> None:
    s = std
    cases = [
        ({"datasetIds": s.ds1}, {s.df1, s.df2}),
        ({"datasetIds": [s.ds1, s.ds2]}, set(s.dfs)),
        ({"datafileIds": s.df1}, {s.df1}),
        ({"datafileIds": s.df1, "datasetIds": s.ds1}, {s.df1, s.df2}),
    ]
    for sel, expected in cases:
        pid = s.prepare(**sel)
        r = s.get("getDatafileIds", preparedId=pid)
        ids = r.json()["ids"]
        assert ids == sorted(expected)  # ascending, no duplicates


def test_D5_session_datafile_ids(std) -> None:
    s = std
    assert ids_of(
        s.get("getDatafileIds", sessionId=s.root, datasetIds=s.ds1, datafileIds=s.df1)
    ) == {s.df1, s.df2}
    assert ids_of(s.get("getDatafileIds", sessionId=s.root, datafileIds=s.df1)) == {s.df1}
    assert ids_of(s.get("getDatafileIds", sessionId=s.root, investigationIds=s.inv)) == set(s.dfs)
    icat_ids = set(
        s.icat(
            f"SELECT df.id FROM Datafile df WHERE df.dataset.id = {s.ds1} "
            "AND df.location IS NOT NULL"
        )
    )
    assert ids_of(s.get("getDatafileIds", sessionId=s.root, datasetIds=s.ds1)) == icat_ids


def test_D6_datafile_ids_json_shapes(std) -> None:
    s = std
    pid = s.prepare(datafileIds=s.df1, compress=True)
    body = s.get("getDatafileIds", preparedId=pid).json()
    assert body == {"zip": False, "compress": True, "ids": [s.df1]}
    pid = s.prepare(datasetIds=s.ds1)
    assert s.get("getDatafileIds", preparedId=pid).json()["zip"] is True
    body = s.get("getDatafileIds", sessionId=s.root, datasetIds=s.ds1).json()
    assert set(body) == {"ids"}


def test_D7_get_size(std) -> None:
    s = std
    for sel in (
        {"datafileIds": s.dfs},
        {"datasetIds": [s.ds1, s.ds2, s.ds3]},
        {"investigationIds": s.inv},
        {"investigationIds": s.inv, "datafileIds": s.dfs},
    ):
        r = s.get("getSize", sessionId=s.root, **sel)
        assert r.status_code == 200 and r.text == "208", (sel, r.text)
    assert s.get("getSize", sessionId=s.root, datasetIds=s.ds3).text == "0"
    assert s.get("getSize", sessionId=s.root, datasetIds=s.ds1).text == "104"
    assert s.get("getSize", sessionId=s.root, datafileIds=s.df1).text == "52"
    pid = s.prepare(datasetIds=[s.ds1, s.ds2])
    assert s.get("getSize", preparedId=pid).text == "208"


def test_D8_size_is_metadata(std) -> None:
    s = std
    pid = s.prepare(datafileIds=s.dfs)
    s.emu.catalogue.write("simple/root", {"Datafile": {"id": s.df1, "fileSize": 53}})
    assert s.get("getSize", sessionId=s.root, datafileIds=s.dfs).text == "209"
    assert s.get("getSize", sessionId=s.root, datasetIds=s.ds1).text == "105"
    assert s.get("getSize", preparedId=pid).text == "209"


def test_D9_get_size_not_found(std) -> None:
    s = std
    err(s.get("getSize", sessionId=s.root, datafileIds=99563), 404, "NotFoundException")
    err(s.get("getSize", sessionId=s.root, datafileIds=[99563, 99564]), 404, "NotFoundException")
    # fast path: a forbidden object is reported as not found too
    err(s.get("getSize", sessionId=s.forbidden, datasetIds=s.ds3), 404, "NotFoundException")
    err(
        s.get("getSize", sessionId=s.forbidden, datasetIds=[s.ds1, s.ds3]),
        403,
        "InsufficientPrivilegesException",
    )


def test_D10_single_level_status(std) -> None:
    s = std
    assert s.status(datafileIds=s.dfs) == "ONLINE"
    pid = s.prepare(datafileIds=s.dfs)
    assert s.get("getStatus", preparedId=pid).text == "ONLINE"
    err(
        s.get("getStatus", sessionId=s.root, datasetIds=[s.ds1, s.ds2, s.ds3, 9999999]),
        404,
        "NotFoundException",
    )


def test_D11_unknown_investigation(std) -> None:
    s = std
    r = s.get("getDatafileIds", sessionId=s.root, investigationIds=99999)
    assert r.status_code == 200 and r.json() == {"ids": []}
    err(s.get("getSize", sessionId=s.root, investigationIds=99999), 404, "NotFoundException")
    # more than one id: no existence check
    assert s.get("getSize", sessionId=s.root, investigationIds=[99999, 99998]).text == "0"


def test_D12_two_level_prepare_without_ids(std2) -> None:
    r = std2.post("prepareData", sessionId=std2.root)
    assert r.status_code == 200 and UUID_RE.fullmatch(r.text)
    assert std2.get("isPrepared", preparedId=r.text).text == "true"

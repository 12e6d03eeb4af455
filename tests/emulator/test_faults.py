"""Fault injection and counters (idsfs.emulator.faults, /admin/faults, /admin/counters).

Each switch is exercised through the Python API and through the admin
endpoint, against a running emulator. Besides the real API endpoints the
tests register two data routes of their own on the emulator's router
(``ids/testData`` and ``icat/testData``) so that every fault can be observed
on a body of known content.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from idsfs.emulator import Emulator
from idsfs.emulator.faults import FaultInjector, FaultRule, api_error_body
from idsfs.emulator.http import FileResponse, Request, Response, StreamResponse

DATA = os.urandom(2 * 1024 * 1024 + 5)


def add_test_routes(emu: Emulator, tmp_path: Path) -> None:
    path = tmp_path / "payload.bin"
    path.write_bytes(DATA)

    def file_route(req: Request) -> Response:
        return FileResponse(200, path)

    def stream_route(req: Request) -> Response:
        def gen():
            for i in range(0, len(DATA), 65536):
                yield DATA[i : i + 65536]

        return StreamResponse(200, gen())

    emu.router.add("GET", "/ids/testData", file_route, "ids/testData")
    emu.router.add("GET", "/ids/testStream", stream_route, "ids/testStream")
    emu.router.add("GET", "/icat/testData", file_route, "icat/testData")


@pytest.fixture
def emu(emulator: Emulator, tmp_path: Path) -> Emulator:
    add_test_routes(emulator, tmp_path)
    return emulator


def raw_get(emu: Emulator, path: str, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """GET over a fresh socket, reading the body until the server closes or it is complete."""
    with socket.create_connection(("127.0.0.1", emu.port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("status", "path", "code"),
    [
        (500, "/ids/testData", "InternalException"),
        (503, "/ids/testData", "DataNotOnlineException"),
        (500, "/icat/testData", "INTERNAL"),
        (503, "/icat/testData", "INTERNAL"),
    ],
)
def test_error_python_api(emu, status, path, code):
    emu.faults.error(status)
    r = requests.get(emu.url + path)
    assert r.status_code == status
    assert r.json()["code"] == code
    assert set(r.json()) == {"code", "message"}
    assert r.headers["Access-Control-Allow-Origin"] == "*"


def test_error_admin_endpoint_and_count(emu, http):
    r = http.post(
        emu.admin_url + "/faults",
        json={"kind": "error", "status": 503, "endpoint": "ids/testData", "count": 2},
    )
    assert r.status_code == 200
    (rule_id,) = r.json()["ids"]
    listed = http.get(emu.admin_url + "/faults").json()
    assert [rule["id"] for rule in listed["rules"]] == [rule_id]
    assert listed["rules"][0]["count"] == 2
    assert http.get(emu.url + "/ids/testStream").status_code == 200  # other endpoint
    assert http.get(emu.url + "/ids/testData").status_code == 503
    assert http.get(emu.url + "/ids/testData").status_code == 503
    assert http.get(emu.url + "/ids/testData").status_code == 200  # spent
    assert http.get(emu.admin_url + "/faults").json()["rules"] == []
    assert http.get(emu.admin_url + "/faults").json()["fired"]["error"] == 2


def test_error_form_fields_and_pattern(emu, http):
    r = http.post(emu.admin_url + "/faults", data={"kind": "error", "endpoint": "ids/test*"})
    assert r.status_code == 200
    assert http.get(emu.url + "/ids/testData").status_code == 500
    assert http.get(emu.url + "/ids/testStream").status_code == 500
    assert http.get(emu.url + "/icat/testData").status_code == 200
    assert http.delete(emu.admin_url + "/faults").status_code == 204
    assert http.get(emu.url + "/ids/testData").status_code == 200


def test_error_fraction_is_reproducible_with_seed(emu, http):
    def pattern() -> list[int]:
        emu.faults.clear()
        emu.faults.seed(42)
        emu.faults.error(503, "ids/testStream", probability=0.3)
        return [http.get(emu.url + "/ids/testStream").status_code for _ in range(40)]

    first = pattern()
    assert first == pattern()
    assert 3 <= first.count(503) <= 25
    assert set(first) == {200, 503}


def test_remove_one_rule(emu, http):
    a = emu.faults.error(500, "ids/testData")
    b = emu.faults.error(503, "ids/testStream")
    assert http.delete(emu.admin_url + "/faults", params={"id": a}).status_code == 204
    assert http.delete(emu.admin_url + "/faults", params={"id": a}).status_code == 404
    assert http.get(emu.url + "/ids/testData").status_code == 200
    assert http.get(emu.url + "/ids/testStream").status_code == 503
    assert emu.faults.remove(b)


def test_bad_rules_are_refused(emu, http):
    for body in (
        {"kind": "explode"},
        {"kind": "error", "status": 200},
        {"kind": "error", "probability": 2},
        {"kind": "latency"},
        {"kind": "error", "colour": "red"},
    ):
        r = http.post(emu.admin_url + "/faults", json=body)
        assert r.status_code == 400, body
        assert r.json()["code"] == "BAD_REQUEST"
    r = http.post(
        emu.admin_url + "/faults", data="{nope", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert emu.faults.rules() == []


# ------------------------------------------------------------------ latency


def test_latency_python_api_and_admin(emu, http):
    http.get(emu.url + "/ids/testStream")  # warm connection
    emu.faults.latency(0.3, "ids/testStream", count=1)
    start = time.monotonic()
    assert http.get(emu.url + "/ids/testStream").status_code == 200
    assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    http.get(emu.url + "/ids/testStream")
    assert time.monotonic() - start < 0.3  # spent
    http.post(emu.admin_url + "/faults", json={"kind": "latency", "seconds": 0.25, "count": 1})
    start = time.monotonic()
    http.get(emu.url + "/ids/testData")
    assert time.monotonic() - start >= 0.25


def test_latency_from_settings(emulator_factory, http):
    emu = emulator_factory(latency=0.2)
    start = time.monotonic()
    http.get(emu.ids_url + "/nothing")
    assert time.monotonic() - start >= 0.2
    start = time.monotonic()
    http.get(emu.admin_url + "/counters")  # admin is never delayed
    assert time.monotonic() - start < 0.2


# ------------------------------------------------------------------ dropped connections


@pytest.mark.parametrize("path", ["/ids/testData", "/ids/testStream"])
def test_drop_after_n_bytes(emu, path):
    emu.faults.drop(after_bytes=100000, endpoint=path.lstrip("/"), count=1)
    status, headers, body = raw_get(emu, path)
    assert status == 200
    if "content-length" in headers:
        assert headers["content-length"] == str(len(DATA))
        assert body == DATA[:100000]
    else:
        assert b"0\r\n\r\n" not in body[-5:]  # chunked body never terminated
    with pytest.raises(requests.exceptions.RequestException):
        emu.faults.drop(after_bytes=1000, endpoint=path.lstrip("/"), count=1)
        requests.get(emu.url + path).content  # noqa: B018
    assert requests.get(emu.url + path).content == DATA


def test_drop_via_admin_with_requests_client(emu, http):
    http.post(emu.admin_url + "/faults", json={"kind": "drop", "after_bytes": 0, "count": 1})
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(emu.url + "/ids/testData").content  # noqa: B018
    assert http.get(emu.url + "/ids/testData").content == DATA


def test_drop_does_not_touch_error_responses(emu, http):
    emu.faults.drop(after_bytes=5)
    r = http.get(emu.ids_url + "/nothing")
    assert r.status_code == 501 and r.json()["code"] == "NOT_IMPLEMENTED"


# ------------------------------------------------------------------ stalls


def test_stall_for_seconds(emu):
    emu.faults.stall(after_bytes=1000, seconds=0.4, endpoint="ids/testData", count=1)
    start = time.monotonic()
    status, _, body = raw_get(emu, "/ids/testData")
    assert time.monotonic() - start >= 0.4
    assert status == 200 and body == DATA


def test_stall_until_released_via_admin(emu, http):
    http.post(
        emu.admin_url + "/faults",
        json={"kind": "stall", "after_bytes": 5000, "endpoint": "ids/testStream"},
    )
    result: dict[str, bytes] = {}

    def reader() -> None:
        result["body"] = raw_get(emu, "/ids/testStream", timeout=30)[2]

    thread = threading.Thread(target=reader)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive(), "the stream should be stalled"
    assert http.post(emu.admin_url + "/faults/release").status_code == 204
    thread.join(10)
    assert not thread.is_alive()
    assert DATA[:5000] in result["body"] and len(result["body"]) > len(DATA)  # chunk framing
    emu.faults.clear()


def test_stall_forever_is_released_by_stop(emulator_factory, tmp_path):
    emu = emulator_factory()
    add_test_routes(emu, tmp_path)
    emu.faults.stall(after_bytes=10)
    thread = threading.Thread(target=lambda: raw_get(emu, "/ids/testData", timeout=30))
    thread.start()
    deadline = time.monotonic() + 10
    while emu.faults.fired["stall"] < 1 or emu.counters.bytes_sent("ids/testData") < 10:
        assert time.monotonic() < deadline, "the response never reached its stall"
        time.sleep(0.01)
    start = time.monotonic()
    emu.stop()
    assert time.monotonic() - start < 5
    thread.join(10)
    assert not thread.is_alive()


# ------------------------------------------------------------------ checksum flag


def test_corrupt_checksum_flag():
    faults = FaultInjector()
    assert not faults.should_corrupt_checksum("ids/put")
    faults.corrupt_checksum(count=1)
    assert not faults.should_corrupt_checksum("ids/getData")
    assert faults.should_corrupt_checksum("ids/put")
    assert not faults.should_corrupt_checksum("ids/put")


def test_corrupt_checksum_via_admin(emu, http):
    http.post(emu.admin_url + "/faults", json={"kind": "corrupt_checksum", "endpoint": "ids/put"})
    assert emu.faults.should_corrupt_checksum("ids/put")


# ------------------------------------------------------------------ rules from start / CLI form


def test_rule_parse_cli_form():
    rule = FaultRule.parse("error:status=503,endpoint=ids/getData,count=2,probability=0.5")
    assert (rule.kind, rule.status, rule.endpoint, rule.count, rule.probability) == (
        "error",
        503,
        "ids/getData",
        2,
        0.5,
    )
    assert FaultRule.parse("stall:after_bytes=10").seconds is None
    for bad in ("boom", "error:status", "error:status=abc", "drop:after_bytes=-1"):
        with pytest.raises(ValueError):
            FaultRule.parse(bad)


def test_rules_from_settings(emulator_factory, tmp_path, http):
    emu = emulator_factory(faults=(FaultRule.parse("error:status=503,endpoint=ids/testData"),))
    add_test_routes(emu, tmp_path)
    assert http.get(emu.url + "/ids/testData").status_code == 503


def test_api_error_body():
    assert api_error_body("ids", 404, "m") == {"code": "NotFoundException", "message": "m"}
    assert api_error_body("icat", 403, "m") == {"code": "SESSION", "message": "m"}
    assert api_error_body("admin", 500, "m")["code"] == "INTERNAL"


# ------------------------------------------------------------------ counters


def test_counters_python_api_and_admin(emu, http):
    emu.counters.reset()
    for _ in range(3):
        http.get(emu.url + "/ids/testData")
    http.get(emu.ids_url + "/nothing")
    emu.faults.error(500, "ids/testStream", count=1)
    http.get(emu.url + "/ids/testStream")
    http.get(emu.admin_url + "/counters")  # not counted
    deadline = time.monotonic() + 5
    while emu.counters.total() < 5 and time.monotonic() < deadline:
        time.sleep(0.01)  # counted just after the response went out
    assert emu.counters["ids/testData"] == 3
    assert emu.counters.bytes_sent("ids/testData") == 3 * len(DATA)
    assert emu.counters.total("ids/*") == 5
    snap = http.get(emu.admin_url + "/counters").json()
    assert snap["ids/testData"] == {"requests": 3, "bytes_sent": 3 * len(DATA), "errors": 0}
    assert snap["ids/testStream"]["errors"] == 1
    assert snap["ids/(unknown)"]["requests"] == 1
    assert not any(name.startswith("admin/") for name in snap)
    assert http.delete(emu.admin_url + "/counters").status_code == 204
    assert emu.counters.snapshot() == {}


def test_counters_under_concurrency(emu):
    emu.counters.reset()

    def client() -> None:
        with requests.Session() as s:
            for _ in range(20):
                s.get(emu.ids_url + "/nothing")

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    deadline = time.monotonic() + 5
    while emu.counters["ids/(unknown)"] < 120 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert emu.counters["ids/(unknown)"] == 120


# ------------------------------------------------------------------ on the real IDS/ICAT API


def make_dataset(emu: Emulator) -> tuple[int, int]:
    """A facility/investigation/dataset readable by alice; returns (dataset id, format id)."""
    root = "simple/root"
    cat = emu.catalogue
    (fac,) = cat.write(root, [{"Facility": {"name": "F"}}])
    (itype,) = cat.write(root, [{"InvestigationType": {"name": "t", "facility": {"id": fac}}}])
    (dtype,) = cat.write(root, [{"DatasetType": {"name": "t", "facility": {"id": fac}}}])
    (fmt,) = cat.write(
        root, [{"DatafileFormat": {"name": "f", "version": "1", "facility": {"id": fac}}}]
    )
    (inv,) = cat.write(
        root,
        [
            {
                "Investigation": {
                    "name": "I",
                    "visitId": "1",
                    "title": "t",
                    "facility": {"id": fac},
                    "type": {"id": itype},
                }
            }
        ],
    )
    (user,) = cat.write(root, [{"User": {"name": "simple/alice"}}])
    cat.write(
        root,
        [{"InvestigationUser": {"role": "r", "user": {"id": user}, "investigation": {"id": inv}}}],
    )
    (ds,) = cat.write(
        root,
        [{"Dataset": {"name": "ds", "investigation": {"id": inv}, "type": {"id": dtype}}}],
    )
    return ds, fmt


def put(emu: Emulator, sid: str, ds: int, fmt: int, name: str, data: bytes) -> requests.Response:
    return requests.put(
        emu.ids_url + "/put",
        params={"sessionId": sid, "name": name, "datasetId": ds, "datafileFormatId": fmt},
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )


def test_corrupt_checksum_on_ids_put(emulator):
    import zlib

    ds, fmt = make_dataset(emulator)
    sid = emulator.login("alice")
    data = b"some bytes to upload"
    emulator.faults.corrupt_checksum(count=1)
    r = put(emulator, sid, ds, fmt, "a.dat", data)
    assert r.status_code == 201
    assert r.json()["checksum"] != zlib.crc32(data)
    r = put(emulator, sid, ds, fmt, "b.dat", data)
    assert r.json()["checksum"] == zlib.crc32(data)  # spent


def test_drop_and_counters_on_ids_getdata(emulator):
    ds, fmt = make_dataset(emulator)
    sid = emulator.login("alice")
    df = put(emulator, sid, ds, fmt, "big.bin", DATA).json()["id"]
    emulator.counters.reset()
    emulator.faults.drop(after_bytes=4096, endpoint="ids/getData", count=1)
    status, headers, body = raw_get(emulator, f"/ids/getData?sessionId={sid}&datafileIds={df}")
    assert status == 200 and headers["content-length"] == str(len(DATA))
    assert body == DATA[:4096]
    r = requests.get(emulator.ids_url + "/getData", params={"sessionId": sid, "datafileIds": df})
    assert r.content == DATA
    deadline = time.monotonic() + 5
    while emulator.counters["ids/getData"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert emulator.counters["ids/getData"] == 2
    assert emulator.counters.bytes_sent("ids/getData") == len(DATA) + 4096
    assert emulator.counters["ids/put"] == 0  # put happened before the reset


def test_expire_session_rule(emulator, http):
    ds, _ = make_dataset(emulator)
    sid = emulator.login("alice")
    params = {"sessionId": sid, "datasetIds": ds}
    assert http.get(emulator.ids_url + "/getDatafileIds", params=params).status_code == 200
    http.post(
        emulator.admin_url + "/faults",
        json={"kind": "expire_session", "endpoint": "ids/getDatafileIds", "count": 1},
    )
    r = http.get(emulator.ids_url + "/getDatafileIds", params=params)
    assert r.status_code == 403
    assert r.json()["code"] == "InsufficientPrivilegesException"
    r = http.get(emulator.icat_url + f"/session/{sid}")
    assert r.status_code == 403 and r.json()["code"] == "SESSION"
    other = emulator.login("alice")  # a new login works
    assert http.get(emulator.icat_url + f"/session/{other}").status_code == 200


def test_expire_all_sessions(emulator, http):
    a, b = emulator.login("alice"), emulator.login("bob")
    r = http.post(emulator.admin_url + "/expire")
    assert r.status_code == 200 and r.json()["expired"] >= 2
    for sid in (a, b):
        assert http.get(emulator.icat_url + f"/session/{sid}").status_code == 403
    c, d = emulator.login("alice"), emulator.login("bob")
    assert http.post(emulator.admin_url + "/expire", data={"sessionId": c}).json() == {"expired": 1}
    assert http.get(emulator.icat_url + f"/session/{c}").status_code == 403
    assert http.get(emulator.icat_url + f"/session/{d}").status_code == 200
    assert emulator.expire_sessions() >= 1  # Python API
    assert http.get(emulator.icat_url + f"/session/{d}").status_code == 403

"""The Emulator application: URL layout, error rendering per API, lifecycle, concurrency.

Items: A4 (unknown path → 501 NOT_IMPLEMENTED, for IDS and ICAT), A6 on real
endpoints, N12 (second half: unknown ICAT path), restart of the process on
the same data directory, several clients at once.
"""

from __future__ import annotations

import json
import threading
import zlib
from pathlib import Path

import pytest
import requests
from emukit import minimal_dataset

from idsfs.emulator import Emulator, EmulatorSettings
from idsfs.emulator.http import Request, Response


def test_a4_unknown_paths_are_501(emulator, http):
    for url in (
        emulator.ids_url + "/getApiVersion",
        emulator.ids_url + "/nosuchcall",
        emulator.ids_url,
        emulator.icat_url + "/lucene/data",
        emulator.icat_url + "/nothing",
    ):
        r = http.get(url)
        assert r.status_code == 501, url
        body = r.json()
        assert body["code"] == "NOT_IMPLEMENTED"
        assert isinstance(body["message"], str)
        assert r.headers["Access-Control-Allow-Origin"] == "*"


def test_admin_unknown_path_is_404(emulator, http):
    r = http.get(emulator.admin_url + "/nothing")
    assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"


def test_uncaught_errors_use_each_api_format(emulator, http):
    def boom(request: Request) -> Response:
        raise RuntimeError("kaputt")

    emulator.router.add("GET", "/ids/boom", boom, "ids/boom")
    emulator.router.add("GET", "/icat/boom", boom, "icat/boom")
    r = http.get(emulator.ids_url + "/boom")
    assert r.status_code == 500
    assert r.json() == {"code": "InternalException", "message": "RuntimeError kaputt"}
    r = http.get(emulator.icat_url + "/boom")
    assert r.status_code == 500
    assert r.json() == {"code": "INTERNAL", "message": "RuntimeError kaputt"}


def test_wrong_method_on_known_path(emulator, http):
    r = http.delete(emulator.ids_url + "/ping")
    assert r.status_code == 405
    assert r.json()["code"] == "InternalException"
    assert "GET" in r.headers["Allow"]


def test_a6_on_real_endpoints(emulator, http):
    for r in (
        http.get(emulator.ids_url + "/ping"),
        http.get(emulator.ids_url + "/version"),
        http.get(emulator.icat_url + "/version"),
        http.get(emulator.icat_url + "/properties"),
        http.get(emulator.ids_url + "/isPrepared", params={"preparedId": "bad"}),
    ):
        assert ("Content-Length" in r.headers) != (r.headers.get("Transfer-Encoding") == "chunked")
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE, PUT"
        assert r.headers["Access-Control-Allow-Headers"] == "Content-Type"
    assert http.get(emulator.ids_url + "/ping").text == "IdsOK"


def test_urls_and_settings_after_start(emulator):
    assert emulator.port > 0
    assert emulator.icat_url == f"http://127.0.0.1:{emulator.port}/icat"
    assert emulator.ids_url == f"http://127.0.0.1:{emulator.port}/ids"
    assert emulator.settings.port == emulator.port
    assert emulator.settings.icat_url == emulator.icat_url
    assert emulator.data_dir is not None and emulator.data_dir.is_dir()
    assert emulator.running


def test_reprs_hide_passwords(emulator):
    text = repr(emulator) + repr(emulator.settings)
    for password in emulator.settings.users.values():
        assert password not in text
    assert "alice" in repr(emulator.settings)


def test_login_helper(emulator, http):
    sid = emulator.login("alice")
    assert http.get(emulator.icat_url + f"/session/{sid}").json()["userName"] == "simple/alice"
    with pytest.raises(KeyError):
        emulator.login("mallory")


def test_temporary_data_dir_is_removed(tmp_path):
    emu = Emulator(EmulatorSettings(users={"root": "pw"}, roots={"root"}))
    emu.start()
    data = emu.data_dir
    assert data is not None and data.is_dir()
    emu.stop()
    emu.stop()  # idempotent
    assert not data.exists()
    assert not emu.running


def test_given_data_dir_is_kept(tmp_path):
    data = tmp_path / "keep"
    with Emulator(EmulatorSettings(data_dir=data)):
        pass
    assert (data / "catalogue.sqlite").is_file()


def test_start_twice_and_port_in_use(emulator):
    with pytest.raises(RuntimeError):
        emulator.start()
    other = Emulator(EmulatorSettings(port=emulator.port))
    with pytest.raises(OSError):
        other.start()
    assert not other.running


def test_invalid_settings():
    for kwargs in (
        {"storage": "tape"},
        {"users": {"a": "b"}, "roots": {"c"}},
        {"port": 70000},
        {"queue_interval": 0},
        {"users": {"a/b": "c"}},
    ):
        with pytest.raises(ValueError):
            EmulatorSettings(**kwargs)


def test_several_clients_at_once(emulator):
    """Uploads, downloads, ICAT logins and searches from 6 threads with their own sessions."""
    ds, fmt = minimal_dataset(emulator)
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with requests.Session() as s:
                login = {"plugin": "simple", "credentials": [{"username": "root"}]}
                login["credentials"].append({"password": emulator.settings.users["root"]})
                sid = s.post(emulator.icat_url + "/session", data={"json": json.dumps(login)})
                sid = sid.json()["sessionId"]
                for i in range(5):
                    data = bytes([n, i]) * (5000 * (i + 1))
                    r = s.put(
                        emulator.ids_url + "/put",
                        params={
                            "sessionId": sid,
                            "name": f"c{n}-{i}",
                            "datasetId": ds,
                            "datafileFormatId": fmt,
                        },
                        data=iter([data[:100], data[100:]]),
                        headers={"Content-Type": "application/octet-stream"},
                    )
                    assert r.status_code == 201, r.text
                    assert r.json()["checksum"] == zlib.crc32(data)
                    got = s.get(
                        emulator.ids_url + "/getData",
                        params={"sessionId": sid, "datafileIds": r.json()["id"]},
                    )
                    assert got.content == data
                    q = f"SELECT df.name FROM Datafile df WHERE df.name = 'c{n}-{i}'"
                    found = s.get(
                        emulator.icat_url + "/entityManager",
                        params={"sessionId": sid, "query": q},
                    )
                    assert found.json() == [f"c{n}-{i}"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    sid = emulator.login("root")
    r = requests.get(
        emulator.icat_url + "/entityManager",
        params={"sessionId": sid, "query": "SELECT COUNT(df) FROM Datafile df"},
    )
    assert r.json() == [30]


def test_restart_same_data_dir_keeps_files_and_sessions(emulator_factory, tmp_path: Path):
    data = tmp_path / "same"
    first = emulator_factory(data_dir=data)
    ds, fmt = minimal_dataset(first)
    sid = first.login("alice")
    root_sid = first.login("root")
    r = requests.put(
        first.ids_url + "/put",
        params={"sessionId": root_sid, "name": "x", "datasetId": ds, "datafileFormatId": fmt},
        data=b"kept across restarts",
        headers={"Content-Type": "application/octet-stream"},
    )
    df = r.json()["id"]
    prepared = requests.post(
        first.ids_url + "/prepareData", data={"sessionId": root_sid, "datafileIds": df}
    ).text
    first.stop()
    second = emulator_factory(data_dir=data)
    assert second.port != 0
    assert requests.get(second.icat_url + f"/session/{sid}").status_code == 200
    r = requests.get(second.ids_url + "/getData", params={"preparedId": prepared})
    assert r.status_code == 200 and r.content == b"kept across restarts"
    r = requests.get(second.ids_url + "/getData", params={"sessionId": root_sid, "datafileIds": df})
    assert r.content == b"kept across restarts"

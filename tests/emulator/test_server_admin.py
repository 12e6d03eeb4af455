"""The admin API's storage hooks and status (idsfs.emulator.admin) on two-level emulators."""

from __future__ import annotations

import pytest
import requests
from emukit import minimal_dataset

from idsfs.emulator import Emulator


def setup_file(emu: Emulator) -> tuple[str, int, int]:
    """A dataset with one uploaded datafile, readable by alice; (alice sid, ds id, df id)."""
    ds, fmt = minimal_dataset(emu, members=("alice",))
    sid = emu.login("alice")
    r = requests.put(
        emu.ids_url + "/put",
        params={"sessionId": sid, "name": "f.dat", "datasetId": ds, "datafileFormatId": fmt},
        data=b"admin hook data",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    return sid, ds, r.json()["id"]


def status(emu: Emulator, sid: str, ds: int) -> str:
    return requests.get(
        emu.ids_url + "/getStatus", params={"sessionId": sid, "datasetIds": ds}
    ).text


@pytest.mark.parametrize("storage", ["dataset", "datafile"])
def test_archive_restore_wait_idle(emulator_factory, storage, http):
    emu = emulator_factory(storage=storage)
    sid, ds, df = setup_file(emu)
    assert http.get(emu.admin_url + "/storage/wait-idle", params={"timeout": 20}).json() == {
        "idle": True
    }
    assert status(emu, sid, ds) == "ONLINE"
    r = http.post(emu.admin_url + "/storage/archive", data={"datasetIds": ds})
    assert r.status_code == 204, r.text
    assert status(emu, sid, ds) == "ARCHIVED"
    r = http.post(emu.admin_url + "/storage/restore", json={"datafileIds": str(df)})
    assert r.status_code == 204, r.text
    assert status(emu, sid, ds) == "ONLINE"
    got = http.get(emu.ids_url + "/getData", params={"sessionId": sid, "datafileIds": df})
    assert got.content == b"admin hook data"


def test_archive_of_a_locked_dataset_is_a_clear_409(emulator_factory, http):
    emu = emulator_factory(storage="dataset")
    sid, ds, df = setup_file(emu)
    http.get(emu.admin_url + "/storage/wait-idle")
    emu.faults.stall(after_bytes=4, endpoint="ids/getData")
    with http.get(emu.ids_url + "/getData", params={"sessionId": sid, "datafileIds": df},
                  stream=True) as held:  # an open download holds a shared lock
        assert held.status_code == 200
        r = http.post(emu.admin_url + "/storage/archive", data={"datasetIds": ds})
        assert r.status_code == 409 and r.json() == {"code": "LOCKED",
                                                     "message": f"dataset {ds} is locked"}
        emu.faults.clear()
    assert status(emu, sid, ds) == "ONLINE"


def test_fail_next_restore(emulator_factory, http):
    emu = emulator_factory(storage="dataset")
    sid, ds, _ = setup_file(emu)
    http.get(emu.admin_url + "/storage/wait-idle")
    http.post(emu.admin_url + "/storage/archive", data={"datasetIds": ds})
    assert http.post(emu.admin_url + "/storage/fail-restores", data={"count": 1}).status_code == 204
    r = http.post(emu.ids_url + "/restore", data={"sessionId": sid, "datasetIds": ds})
    assert r.status_code == 204
    assert http.get(emu.admin_url + "/storage/wait-idle").json()["idle"]
    r = http.get(emu.ids_url + "/getStatus", params={"sessionId": sid, "datasetIds": ds})
    assert r.status_code == 500 and r.json()["message"] == "Restore failed"  # I1
    r = http.post(emu.ids_url + "/reset", data={"sessionId": sid, "datasetIds": ds})
    assert r.status_code == 204
    assert status(emu, sid, ds) == "ARCHIVED"  # I2
    assert http.post(emu.admin_url + "/storage/fail-restores", data={"always": "false"}).ok


def test_storage_hook_errors(emulator_factory, emulator, http):
    # single-level: no archive
    r = http.post(emulator.admin_url + "/storage/archive", data={"datasetIds": 1})
    assert r.status_code == 400
    emu = emulator_factory(storage="dataset")
    for body in ({"datasetIds": "x"}, {"datasetIds": "999999"}):
        r = http.post(emu.admin_url + "/storage/archive", data=body)
        assert r.status_code == 400, body
    assert http.post(emu.admin_url + "/storage/fail-restores").status_code == 400
    r = http.get(emu.admin_url + "/storage/wait-idle", params={"timeout": "soon"})
    assert r.status_code == 400


def test_status(emulator, http):
    info = http.get(emulator.admin_url + "/status").json()
    assert info["ids"] == emulator.ids_url and info["icat"] == emulator.icat_url
    assert info["storage"] == "single"
    assert info["users"] == sorted(emulator.settings.users)
    assert info["roots"] == ["root"]
    text = http.get(emulator.admin_url + "/status").text
    for password in emulator.settings.users.values():
        assert password not in text

"""Demo data (idsfs.emulator.demo): content, odd names, real bytes, restart persistence.

Everything is checked over HTTP with plain ``requests``: ICAT searches for the
metadata, IDS getData for the bytes.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import requests

from idsfs.emulator import Emulator
from idsfs.emulator.demo import LONG_NAME, LONG_UTF8_NAME, FileSpec, expected_bytes, plan

LARGE = 3 * 1024 * 1024 + 123  # demo_large_size used here (small, to stay quick)


def search(emu: Emulator, sid: str, query: str) -> list[Any]:
    r = requests.get(emu.icat_url + "/entityManager", params={"sessionId": sid, "query": query})
    assert r.status_code == 200, r.text
    return r.json()


def datafiles(emu: Emulator, sid: str) -> list[dict[str, Any]]:
    rows = search(emu, sid, "SELECT df FROM Datafile df ORDER BY df.id")
    return [row["Datafile"] for row in rows]


@pytest.fixture
def demo(emulator_factory) -> Emulator:
    return emulator_factory(demo=True, demo_large_size=LARGE)


def test_demo_structure(demo):
    sid = demo.login("root")
    assert search(demo, sid, "SELECT f.name FROM Facility f") == ["DEMO"]
    invs = search(demo, sid, "SELECT i FROM Investigation i ORDER BY i.id")
    visits = sorted((i["Investigation"]["name"], i["Investigation"]["visitId"]) for i in invs)
    assert visits == [
        ("DEMO-2024-001", "1"),
        ("DEMO-2024-001", "2"),
        ("DEMO-2024-002", "N/A"),
        ("DEMO-2025-003", "2025A"),
    ]
    assert set(search(demo, sid, "SELECT t.name FROM InvestigationType t")) == {
        "experiment",
        "calibration",
    }
    # an empty dataset exists
    counts = search(demo, sid, "SELECT COUNT(df) FROM Datafile df WHERE df.dataset.name = 'empty'")
    assert counts == [0]
    assert "empty" in search(demo, sid, "SELECT ds.name FROM Dataset ds")


def test_every_configured_user_reads_the_demo(demo):
    root_count = len(datafiles(demo, demo.login("root")))
    assert root_count > 30
    for user in ("alice", "bob", "forbidden"):
        sid = demo.login(user)
        assert len(datafiles(demo, sid)) == root_count, user
        assert len(search(demo, sid, "SELECT i.id FROM Investigation i")) == 4


def test_odd_names(demo):
    sid = demo.login("alice")
    df_names = {d["name"] for d in datafiles(demo, sid)}
    ds_names = set(search(demo, sid, "SELECT ds.name FROM Dataset ds"))
    names = df_names | ds_names
    assert any("/" in n for n in df_names) and any("/" in n for n in ds_names)
    assert any(" " in n for n in names)
    assert any("'" in n for n in df_names) and any("'" in n for n in ds_names)
    assert any(not n.isascii() for n in df_names) and any(not n.isascii() for n in ds_names)
    assert LONG_NAME in df_names and len(LONG_NAME) == 255
    assert LONG_UTF8_NAME in df_names and len(LONG_UTF8_NAME.encode()) > 255


def test_sizes_checksums_times(demo):
    files = datafiles(demo, demo.login("alice"))
    sizes = [d["fileSize"] for d in files]
    assert min(sizes) == 0 and max(sizes) == LARGE
    assert any(s == 1 for s in sizes) and any(s > 1024 * 1024 for s in sizes)
    for d in files:
        assert d["location"] and d["checksum"] == d["checksum"].lower()
        assert int(d["checksum"], 16) <= 0xFFFFFFFF
        assert d["datafileModTime"] and d["datafileCreateTime"]


def _download(emu: Emulator, sid: str, df_id: int, offset: int = 0) -> requests.Response:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    return requests.get(
        emu.ids_url + "/getData",
        params={"sessionId": sid, "datafileIds": str(df_id)},
        headers=headers,
    )


def _spec(name: str) -> FileSpec:
    for inv in plan(1, LARGE):
        for ds in inv.datasets:
            for spec in ds.files:
                if spec.name == name:
                    return spec
    raise KeyError(name)


def test_bytes_match_metadata_and_generator(demo):
    sid = demo.login("alice")
    files = {d["name"]: d for d in datafiles(demo, sid)}
    for name in ("large.bin", "tiny.txt", "empty.dat", "sub/dir/result.csv", LONG_UTF8_NAME):
        meta = files[name]
        r = _download(demo, sid, meta["id"])
        assert r.status_code == 200, r.text
        assert len(r.content) == meta["fileSize"]
        assert f"{zlib.crc32(r.content):x}" == meta["checksum"]
        assert r.content == expected_bytes(demo.settings.seed, _spec(name))
    # blocks of a large file differ (block number in front) and offsets are predictable
    large = files["large.bin"]
    r = _download(demo, sid, large["id"], offset=2 * 1024 * 1024 - 4)
    assert r.status_code == 206
    assert r.content[:12] == expected_bytes(1, _spec("large.bin"), 2 * 1024 * 1024 - 4, 12)
    assert r.content[4:12] == (2).to_bytes(8, "big")
    text = _download(demo, sid, files["tiny.txt"]["id"]).content
    assert text.isascii() and len(text) == 52


def test_same_seed_same_content(emulator_factory):
    a = emulator_factory(demo=True, demo_large_size=LARGE)
    b = emulator_factory(demo=True, demo_large_size=LARGE)
    c = emulator_factory(demo=True, demo_large_size=LARGE, seed=7)

    def sums(emu: Emulator) -> dict[str, str]:
        return {d["name"]: d["checksum"] for d in datafiles(emu, emu.login("root"))}

    assert sums(a) == sums(b)
    assert sums(a) != sums(c)


def test_restart_keeps_everything_and_adds_new_users(emulator_factory, tmp_path):
    data = tmp_path / "persist"
    first = emulator_factory(demo=True, demo_large_size=LARGE, data_dir=data)
    before = datafiles(first, first.login("root"))
    investigations = search(first, first.login("root"), "SELECT i.id FROM Investigation i")
    # data written by a user survives too
    sid = first.login("alice")
    ds_id = search(first, sid, "SELECT ds.id FROM Dataset ds WHERE ds.name = 'empty'")[0]
    fmt = search(first, sid, "SELECT f.id FROM DatafileFormat f WHERE f.name = 'binary'")[0]
    r = requests.put(
        first.ids_url + "/put",
        params={"sessionId": sid, "name": "mine.bin", "datasetId": ds_id, "datafileFormatId": fmt},
        data=b"persisted bytes",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    new_id = r.json()["id"]
    first.stop()

    users = dict(first.settings.users, carol="carol-secret")
    second = emulator_factory(demo=True, demo_large_size=LARGE, data_dir=data, users=users)
    root_sid = second.login("root")
    after = datafiles(second, root_sid)
    assert [d for d in after if d["id"] != new_id] == before  # nothing duplicated or changed
    assert search(second, root_sid, "SELECT i.id FROM Investigation i") == investigations
    # the old session is still valid after the restart (sessions persist)
    assert search(second, sid, "SELECT COUNT(i) FROM Investigation i") == [4]
    # the new user can read the demo
    carol = second.login("carol")
    assert len(datafiles(second, carol)) == len(after)
    r = _download(second, carol, new_id)
    assert r.content == b"persisted bytes"


@pytest.mark.parametrize("storage", ["dataset", "datafile"])
def test_two_level_starts_partly_archived(emulator_factory, storage):
    emu = emulator_factory(demo=True, demo_large_size=LARGE, storage=storage)
    sid = emu.login("alice")
    assert emu.storage.wait_idle(30)
    rows = search(
        emu,
        sid,
        "SELECT ds FROM Dataset ds ORDER BY ds.id INCLUDE ds.investigation",
    )
    archived, online = [], []
    for row in rows:
        ds = row["Dataset"]
        inv = ds["investigation"]
        if ds["name"] == "empty":
            continue
        status = requests.get(
            emu.ids_url + "/getStatus", params={"sessionId": sid, "datasetIds": ds["id"]}
        ).text
        key = (inv["name"], inv["visitId"], ds["name"])
        (archived if status == "ARCHIVED" else online).append(key)
        assert status in ("ARCHIVED", "ONLINE")
    assert ("DEMO-2024-001", "1", "processed data") in archived
    assert ("DEMO-2024-001", "2", "raw") in archived
    assert ("DEMO-2024-001", "1", "raw") in online
    assert ("DEMO-2024-002", "N/A", "calibration") in online
    # archived data gives 503 and gets restored
    df = search(
        emu,
        sid,
        "SELECT df.id FROM Datafile df WHERE df.dataset.name = 'processed data'",
    )[0]
    r = _download(emu, sid, df)
    assert r.status_code == 503
    assert r.json()["code"] == "DataNotOnlineException"


def test_demo_needs_a_root(tmp_path):
    from idsfs.emulator import EmulatorSettings

    with pytest.raises(ValueError, match="root"):
        EmulatorSettings(users={"a": "b"}, demo=True)

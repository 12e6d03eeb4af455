"""IDS protocol tests, behaviours.md sections J (locks), K (datafiles without location) and
L (configuration), plus restart persistence and concurrent clients."""

from __future__ import annotations

import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests


def err(r, status: int, code: str, message: str | None = None) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["code"] == code
    if message is not None:
        assert r.json()["message"] == message


def lock_list(s) -> list[dict]:
    return s.service_status()["locks"]


# ------------------------------------------------------------------------------- J


def test_J1_J2_open_stream_holds_shared_lock(std) -> None:
    s = std
    s.emu.faults.stall(after_bytes=10, endpoint="ids/getData", count=1)
    stream = s.get("getData", sessionId=s.root, datasetIds=s.ds1, stream=True)
    try:
        assert stream.status_code == 200
        err(
            s.delete(sessionId=s.root, datafileIds=s.df2),
            503,
            "DataNotOnlineException",
            "Data is busy",
        )
        status = s.service_status()
        assert status["locks"] == [{"id": s.ds1, "type": "SHARED", "count": 1}]
        assert status["lockCount"] == 1
        # other datasets are not affected
        assert s.delete(sessionId=s.root, datafileIds=s.df4).status_code == 204
    finally:
        s.emu.faults.release_stalls()
        data = stream.content
        stream.close()
    assert len(s.zip_entries(data)) == 2
    s.poll(lambda: s.service_status()["lockCount"] == 0)
    assert lock_list(s) == []
    assert s.delete(sessionId=s.root, datafileIds=s.df2).status_code == 204


def test_J1_abandoned_stream_releases_lock(std) -> None:
    s = std
    s.emu.faults.stall(after_bytes=10, endpoint="ids/getData", count=1)
    stream = s.get("getData", sessionId=s.root, datafileIds=s.df1, stream=True)
    assert stream.status_code == 200 and lock_list(s)
    stream.close()  # client goes away mid-stream
    s.emu.faults.release_stalls()
    s.poll(lambda: lock_list(s) == [])


def test_J3_concurrent_downloads_and_upload(std) -> None:
    s = std
    s.emu.faults.stall(after_bytes=10, endpoint="ids/getData", count=2)
    a = s.get("getData", sessionId=s.root, datasetIds=s.ds1, stream=True)
    b = requests.get(
        f"{s.ids}/getData",
        params={"sessionId": s.root, "datasetIds": s.ds1},
        stream=True,
        timeout=30,
    )
    try:
        assert (a.status_code, b.status_code) == (200, 200)
        assert lock_list(s) == [{"id": s.ds1, "type": "SHARED", "count": 2}]
        r = s.put(
            b"during download", sessionId=s.root, name="j3", datasetId=s.ds1, datafileFormatId=s.fmt
        )
        assert r.status_code == 201
    finally:
        s.emu.faults.release_stalls()
        contents = [a.content, b.content]
        a.close()
        b.close()
    for data in contents:
        assert len(s.zip_entries(data)) == 2


def test_J4_upload_invisible_until_done(std) -> None:
    s = std
    gate = threading.Event()
    result: dict = {}

    def body():
        yield b"first part "
        gate.wait(20)
        yield b"second part"

    def upload():
        result["r"] = requests.put(
            f"{s.ids}/put",
            params={
                "sessionId": s.root,
                "name": "j4",
                "datasetId": s.ds1,
                "datafileFormatId": s.fmt,
            },
            data=body(),
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
        )

    t = threading.Thread(target=upload)
    t.start()
    try:
        s.poll(lambda: len(list(s.ds_dir(s.ds1).iterdir())) == 3)  # bytes are arriving
        assert s.icat("SELECT COUNT(df) FROM Datafile df WHERE df.name = 'j4'") == [0]
        ids = s.get("getDatafileIds", sessionId=s.root, datasetIds=s.ds1).json()["ids"]
        assert sorted(ids) == sorted([s.df1, s.df2])
        assert lock_list(s) == [{"id": s.ds1, "type": "SHARED", "count": 1}]
    finally:
        gate.set()
        t.join(30)
    r = result["r"]
    assert r.status_code == 201
    assert r.json()["checksum"] == zlib.crc32(b"first part second part")
    assert s.icat("SELECT COUNT(df) FROM Datafile df WHERE df.name = 'j4'") == [1]
    assert lock_list(s) == []


# ------------------------------------------------------------------------------- K


def _add_bogus(s) -> dict[int, int]:
    out = {}
    for ds in (s.ds1, s.ds2, s.ds3):
        out[ds] = int(
            s.emu.catalogue.write(
                "simple/root", {"Datafile": {"name": "bogus", "dataset": {"id": ds}}}
            )[0]
        )
    return out


def test_K1_K2_bogus_files_ignored(std) -> None:
    s = std
    _add_bogus(s)
    r = s.get("getData", sessionId=s.root, datasetIds=s.ds3)
    assert r.status_code == 200 and s.zip_entries(r.content) == {}
    assert s.get("getSize", sessionId=s.root, datasetIds=s.ds3).text == "0"
    assert s.get("getSize", sessionId=s.root, datasetIds=s.ds1).text == "104"
    r = s.get("getData", sessionId=s.root, datasetIds=s.ds1)
    assert set(s.zip_entries(r.content)) == {
        f"ids/F/I/N/A/ds1/{s.names[s.df1]}",
        f"ids/F/I/N/A/ds1/{s.names[s.df2]}",
    }
    assert sorted(
        s.get("getDatafileIds", sessionId=s.root, investigationIds=s.inv).json()["ids"]
    ) == sorted(s.dfs)


def test_K1_two_level_empty_dataset(std2) -> None:
    s = std2
    _add_bogus(s)
    r = s.get("getData", sessionId=s.root, datasetIds=s.ds3)
    assert r.status_code == 200 and s.zip_entries(r.content) == {}
    assert s.status(datasetIds=s.ds3) == "ONLINE"


def test_K3_bogus_file_not_found(std) -> None:
    s = std
    bogus = _add_bogus(s)[s.ds1]
    err(s.get("getData", sessionId=s.root, datafileIds=bogus), 404, "NotFoundException")
    err(s.get("getSize", sessionId=s.root, datafileIds=bogus), 404, "NotFoundException")
    err(s.get("getSize", sessionId=s.root, datafileIds=[bogus, s.df1]), 404, "NotFoundException")
    err(s.post("prepareData", sessionId=s.root, datafileIds=bogus), 404, "NotFoundException")


def test_K3_two_level_restore_bogus(std2) -> None:
    s = std2
    bogus = _add_bogus(s)[s.ds1]
    err(s.post("restore", sessionId=s.root, datafileIds=bogus), 404, "NotFoundException")
    err(s.get("getData", sessionId=s.root, datafileIds=bogus), 404, "NotFoundException")


def test_K4_put_archive_restore_with_bogus(std2) -> None:
    s = std2
    _add_bogus(s)
    assert s.post("restore", sessionId=s.root, datasetIds=s.ds1).status_code == 204
    s.wait_idle()
    new = s.put(b"new file", sessionId=s.root, name="k4", datasetId=s.ds1, datafileFormatId=s.fmt)
    assert new.status_code == 201
    s.wait_idle()
    assert s.post("archive", sessionId=s.root, datasetIds=s.ds1).status_code == 204
    s.wait_idle()
    assert not s.ds_dir(s.ds1).exists()
    assert s.post("restore", sessionId=s.root, datasetIds=s.ds1).status_code == 204
    s.wait_idle()
    files = sorted(p.name for p in s.ds_dir(s.ds1).iterdir())
    expected = sorted(
        Path(loc).name for loc in (s.locations[s.df1], s.locations[s.df2], new.json()["location"])
    )
    assert files == expected


# ------------------------------------------------------------------------------- L


def test_L1_read_only(std_factory) -> None:
    s = std_factory(read_only=True)
    assert s.get("isReadOnly").text == "true"
    err(
        s.put(b"x", sessionId=s.root, name="n", datasetId=s.ds1, datafileFormatId=s.fmt),
        501,
        "NotImplementedException",
    )
    err(s.delete(sessionId=s.root, datafileIds=s.df1), 501, "NotImplementedException")
    err(s.post("write", sessionId=s.root, datafileIds=s.df1), 501, "NotImplementedException")
    r = s.get("getData", sessionId=s.root, datafileIds=s.df1)
    assert r.status_code == 200 and r.content == s.content(s.df1)


def test_L1_read_only_two_level(std_factory) -> None:
    s = std_factory(storage="dataset", read_only=True)
    err(s.post("write", sessionId=s.root, datasetIds=s.ds3), 501, "NotImplementedException")
    # archive/restore are not blocked by readOnly
    assert s.post("restore", sessionId=s.root, datasetIds=s.ds1).status_code == 204
    s.wait_idle()
    w = std_factory(storage="dataset", read_only=True, enable_write=True)
    assert w.post("write", sessionId=w.root, datasetIds=w.ds3).status_code == 204


def test_L2_links_disabled(std) -> None:
    s = std
    err(
        s.post("getLink", sessionId=s.root, datafileId=s.df1, username="me"),
        501,
        "NotImplementedException",
    )
    err(s.post("getLink", sessionId="bad"), 501, "NotImplementedException")


def test_L3_links_enabled(std_factory) -> None:
    for unit in ("dataset", "datafile"):
        s = std_factory(storage=unit, link_lifetime_seconds=60)
        err(
            s.post("getLink", sessionId=s.root, datafileId=s.df1, username="me"),
            503,
            "DataNotOnlineException",
        )
        s.wait_idle()
        r = s.post("getLink", sessionId=s.root, datafileId=s.df1, username="me")
        assert r.status_code == 200, r.text
        assert Path(r.text).read_bytes() == s.content(s.df1)


def test_L3_link_errors(std_factory) -> None:
    s = std_factory(link_lifetime_seconds=60)
    err(
        s.post("getLink", sessionId="bad", datafileId=s.df1, username="me"),
        400,
        "BadRequestException",
    )
    err(
        s.post("getLink", sessionId=s.root, datafileId="x", username="me"),
        400,
        "BadRequestException",
    )
    err(
        s.post("getLink", sessionId=s.root, datafileId=99999, username="me"),
        404,
        "NotFoundException",
    )
    err(
        s.post("getLink", sessionId=s.forbidden, datafileId=s.df1, username="me"),
        403,
        "InsufficientPrivilegesException",
    )
    r = s.post("getLink", sessionId=s.root, datafileId=s.df4, username="me")
    assert r.status_code == 200 and Path(r.text).read_bytes() == s.content(s.df4)


# ------------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("storage", ["single", "dataset"])
def test_restart_keeps_prepared_ids_and_files(std_factory, emulator_factory, storage) -> None:
    s = std_factory(storage=storage, prepared_count=3)
    data_dir = s.emu.data_dir
    if storage != "single":
        restored = s.prepare(datasetIds=s.ds2)
        s.poll(lambda: s.get("isPrepared", preparedId=restored).text == "true")
    pids = [s.prepare(datafileIds=s.df3, zip=True) for _ in range(4)]
    new = s.upload("persisted", b"kept across restarts", ds=s.ds3)
    s.emu.stop()
    emu = emulator_factory(storage=storage, prepared_count=3, data_dir=data_dir)
    ids = emu.ids_url
    # the oldest prepared id was pruned, the others survive
    r = requests.get(f"{ids}/getDatafileIds", params={"preparedId": pids[0]}, timeout=10)
    assert r.status_code == 404
    for pid in pids[1:]:
        r = requests.get(f"{ids}/getData", params={"preparedId": pid}, timeout=10)
        assert r.status_code == 200
        assert s.zip_entries(r.content)[f"ids/F/I/N/A/ds2/{s.names[s.df3]}"][0] == s.content(s.df3)
    # sessions and stored files survive
    r = requests.get(f"{ids}/getData", params={"sessionId": s.root, "datafileIds": new}, timeout=10)
    assert r.status_code == 200 and r.content == b"kept across restarts"
    if storage != "single":
        status = requests.get(f"{ids}/getStatus", params={"datasetIds": s.ds1}, timeout=10)
        assert status.text == "ARCHIVED"


@pytest.mark.parametrize("storage", ["dataset", "datafile"])
def test_restart_resumes_outstanding_writes_to_archive(std_factory, emulator_factory,
                                                       storage) -> None:
    # The deferred-operation queue lives in memory; the write markers on disk do not. A write
    # to archive still outstanding when the server stops is queued again at start-up, so the
    # marker does not block archive requests for ever and the archive gets the new file.
    slow = {"dataset_write_delay": 60.0, "datafile_op_delay": 60.0}
    s = std_factory(storage=storage, archived=False, **slow)
    data_dir = s.emu.data_dir
    new = s.upload("written late", b"bytes that must reach the archive", ds=s.ds3)
    marked = s.ds3 if storage == "dataset" else new
    assert s.emu.storage.write_outstanding(marked)
    s.emu.stop()
    emu = emulator_factory(storage=storage, data_dir=data_dir)
    assert emu.storage.wait_idle(20)
    assert not emu.storage.write_outstanding(marked)
    ids = emu.ids_url
    r = requests.post(f"{ids}/archive", data={"sessionId": s.root, "datasetIds": s.ds3},
                      timeout=10)
    assert r.status_code == 204, r.text
    assert emu.storage.wait_idle(20)
    status = requests.get(f"{ids}/getStatus", params={"sessionId": s.root,
                                                      "datafileIds": new}, timeout=10)
    assert status.text == "ARCHIVED"  # the archive request was honoured
    # and the bytes come back from the archive
    r = requests.post(f"{ids}/restore", data={"sessionId": s.root, "datafileIds": new},
                      timeout=10)
    assert r.status_code == 204, r.text
    assert emu.storage.wait_idle(20)
    r = requests.get(f"{ids}/getData", params={"sessionId": s.root, "datafileIds": new},
                     timeout=10)
    assert r.status_code == 200 and r.content == b"bytes that must reach the archive"


# ------------------------------------------------------------------------------- concurrency


def test_concurrent_clients(std) -> None:
    s = std
    n = 8

    def work(i: int) -> None:
        with requests.Session() as http:
            data = (f"client {i} ".encode()) * (1000 + i * 777)
            r = http.put(
                f"{s.ids}/put",
                params={
                    "sessionId": s.root,
                    "name": f"c{i}",
                    "datasetId": s.ds1 if i % 2 else s.ds2,
                    "datafileFormatId": s.fmt,
                },
                data=data,
                headers={"Content-Type": "application/octet-stream"},
                timeout=30,
            )
            assert r.status_code == 201, r.text
            assert r.json()["checksum"] == zlib.crc32(data)
            df = r.json()["id"]
            for _ in range(3):
                got = http.get(
                    f"{s.ids}/getData", params={"sessionId": s.root, "datafileIds": df}, timeout=30
                )
                assert got.content == data
                z = http.get(
                    f"{s.ids}/getData",
                    params={"sessionId": s.root, "datasetIds": s.ds1},
                    timeout=30,
                )
                assert z.status_code == 200 and len(z.content) > 22
            pid = http.post(
                f"{s.ids}/prepareData", data={"sessionId": s.root, "datafileIds": df}, timeout=30
            ).text
            assert (
                http.get(
                    f"{s.ids}/getData",
                    params={"preparedId": pid},
                    headers={"Range": "bytes=7-"},
                    timeout=30,
                ).content
                == data[7:]
            )

    with ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(work, i) for i in range(n)]:
            f.result()
    ids = s.get("getDatafileIds", sessionId=s.root, investigationIds=s.inv).json()["ids"]
    assert len(ids) == 4 + n
    assert s.service_status()["locks"] == []

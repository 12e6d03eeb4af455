"""Interoperability: python-icat's ``icat.ids.IDSClient`` (unmodified) against the emulator.

The session id comes from the emulator's ICAT REST API through plain ``requests``; everything
else goes through python-icat's own urllib-based client.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib

import pytest
import requests

icat_ids = pytest.importorskip("icat.ids")
icat_exception = pytest.importorskip("icat.exception")


def rest_login(std, user: str = "root", password: str = "root-secret") -> str:
    r = requests.post(
        f"{std.emu.icat_url}/session",
        data={
            "json": json.dumps(
                {"plugin": "simple", "credentials": [{"username": user}, {"password": password}]}
            )
        },
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.json()["sessionId"]


@pytest.fixture
def client(std):
    return icat_ids.IDSClient(std.ids + "/", sessionId=rest_login(std))


def sel(**ids):
    return icat_ids.DataSelection(ids)


def test_pyicat_discovery(std, client) -> None:
    client.ping()
    assert client.version() == {"version": "2.1.1"}
    assert client.apiversion == "2.1.1"
    assert client.getApiVersion() == "2.1.1"
    assert client.isReadOnly() is False
    assert client.isTwoLevel() is False
    assert client.getIcatUrl().startswith("http://127.0.0.1:")
    status = client.getServiceStatus()
    assert status["opsQueue"] == [] and status["locks"] == []


def test_pyicat_information_calls(std, client) -> None:
    assert client.getStatus(sel(datasetIds=[std.ds1])) == "ONLINE"
    assert client.getSize(sel(investigationIds=[std.inv])) == 208
    assert sorted(client.getDatafileIds(sel(datasetIds=[std.ds1]))) == sorted([std.df1, std.df2])
    anonymous = icat_ids.IDSClient(std.ids + "/")
    assert anonymous.getStatus(sel(datasetIds=[std.ds1])) == "ONLINE"
    pid = client.prepareData(sel(datasetIds=[std.ds2]))
    assert client.getSize(pid) == 104
    assert client.getStatus(pid) == "ONLINE"
    assert sorted(client.getDatafileIds(pid)) == sorted([std.df3, std.df4])
    client.reset(pid)


def test_pyicat_prepare_and_get_data(std, client) -> None:
    pid = client.prepareData(sel(datafileIds=[std.df1]))
    assert client.isPrepared(pid) is True
    with client.getData(pid) as f:
        assert f.read() == std.content(std.df1)
    with client.getData(pid, offset=20) as f:
        assert f.status == 206
        assert f.read() == std.content(std.df1)[20:]
    with client.getData(sel(datafileIds=[std.df1, std.df2]), compressFlag=True) as f:
        data = f.read()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = z.infolist()
        assert [i.compress_size for i in infos] == [36, 36]
    zpid = client.prepareData(sel(datasetIds=[std.ds1]), zipFlag=True)
    with client.getData(zpid) as f:
        full = f.read()
    with client.getData(zpid, offset=100) as f:
        assert f.read() == full[100:]
    assert "sessionId=" in client.getDataUrl(sel(datafileIds=[std.df1]))


def test_pyicat_errors(std, client) -> None:
    with pytest.raises(icat_exception.IDSBadRequestError) as e:
        client.isPrepared("-=- INVALID ID -=-")
    assert e.value.status == 400 and e.value.type == "BadRequestException"
    with pytest.raises(icat_exception.IDSNotFoundError):
        client.getData(sel(datasetIds=[-11]))
    forbidden = icat_ids.IDSClient(
        std.ids + "/", sessionId=rest_login(std, "forbidden", "forbidden-secret")
    )
    with pytest.raises(icat_exception.IDSInsufficientPrivilegesError):
        forbidden.getData(sel(datafileIds=[std.df1]))
    with pytest.raises(icat_exception.IDSNotImplementedError):
        client.archive(sel(datasetIds=[std.ds1]))


def test_pyicat_put_and_delete(std, client) -> None:
    data = b"uploaded through python-icat\n" * 5000
    df_id = client.put(
        io.BytesIO(data),
        "pyicat.txt",
        std.ds1,
        std.fmt,
        description="from python-icat",
        datafileModTime=1_700_000_000_000,
    )
    assert isinstance(df_id, int)
    record = std.icat_datafile(df_id)
    assert record["checksum"] == f"{zlib.crc32(data):x}" and record["fileSize"] == len(data)
    assert record["description"] == "from python-icat"
    with client.getData(sel(datafileIds=[df_id])) as f:
        assert f.read() == data
    client.delete(sel(datafileIds=[df_id]))
    with pytest.raises(icat_exception.IDSNotFoundError):
        client.getStatus(sel(datafileIds=[df_id]))


def test_pyicat_put_detects_corrupted_checksum(std, client) -> None:
    std.emu.faults.corrupt_checksum(count=1)
    with pytest.raises(icat_exception.IDSResponseError):
        client.put(io.BytesIO(b"abc"), "corrupt.txt", std.ds1, std.fmt)


@pytest.mark.parametrize("storage", ["dataset", "datafile"])
def test_pyicat_two_level_archive_restore(std_factory, storage) -> None:
    std = std_factory(storage=storage)
    client = icat_ids.IDSClient(std.ids + "/", sessionId=rest_login(std))
    assert client.isTwoLevel() is True
    selection = sel(datasetIds=[std.ds1])
    assert client.getStatus(selection) == "ARCHIVED"
    with pytest.raises(icat_exception.IDSDataNotOnlineError):
        client.getData(selection)

    # python-icat's restoreData loop, without its 30 s sleep
    def loop() -> bool:
        status = client.getStatus(selection)
        if status == "ARCHIVED":
            client.restore(selection)
        return status == "ONLINE"

    std.poll(loop)
    with client.getData(selection) as f:
        assert len(zipfile.ZipFile(io.BytesIO(f.read())).namelist()) == 2
    client.archive(selection)
    assert client.getStatus(selection) == "ARCHIVED"
    std.wait_idle()
    assert not std.ds_dir(std.ds1).exists()
    pid = client.prepareData(sel(datafileIds=[std.df1]))
    std.poll(lambda: client.isPrepared(pid))
    with client.getData(pid) as f:
        assert f.read() == std.content(std.df1)
    client.write(sel(datafileIds=[std.df1]))
    std.wait_idle()

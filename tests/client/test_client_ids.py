"""Every IDSClient method over HTTP against the emulator, with the error
codes of behaviours.md M3-M10 and the DataStream behaviour."""

from __future__ import annotations

import getpass
import io
import os
import threading
import zipfile
import zlib
from pathlib import Path

import pytest
import requests

from idsfs.errors import (
    IDSBadRequestError,
    IDSError,
    IDSInsufficientPrivilegesError,
    IDSInternalError,
    IDSNotFoundError,
    IDSNotImplementedError,
    IDSResponseError,
)
from idsfs.ids import DataSelection, DataStream, IDSClient


def sel(**ids: list[int]) -> DataSelection:
    return DataSelection({f"{k}Ids": v for k, v in ids.items()})


# ------------------------------------------------------------------ discovery (M3)


def test_discovery_calls(world) -> None:
    ids = world.ids
    assert ids.ping() is None
    assert ids.version()["version"] == str(ids.apiversion)
    assert ids.apiversion >= "1.11.0"
    assert ids.getApiVersion() == str(ids.apiversion)
    assert ids.getIcatUrl().rstrip("/").startswith(world.emu.icat_url.rstrip("/").rsplit(
        "/icat", 1)[0])
    assert ids.isReadOnly() is False
    assert ids.isTwoLevel() is False
    status = ids.getServiceStatus()
    assert status["opsQueue"] == [] and "locks" in status and "failures" in status


def test_m3_constructor_calls_version_once(world) -> None:
    world.emu.counters.reset()
    client = world.ids_client(world.root)
    assert world.emu.counters.get("ids/version") == 1
    assert client.apiversion == world.ids.apiversion


def test_service_status_needs_root(world) -> None:
    with pytest.raises(IDSInsufficientPrivilegesError) as info:
        world.ids_client(world.alice).getServiceStatus()
    assert info.value.status == 403 and info.value.type == "InsufficientPrivilegesException"


# ------------------------------------------------------------------ information


def test_size_status_ids(world) -> None:
    ids = world.ids
    everything = sel(investigation=[world.inv])
    assert ids.getSize(everything) == 4 * 52
    assert ids.getSize(sel(dataset=[world.ds1], datafile=[world.df[1]])) == 2 * 52
    assert ids.getSize(sel(dataset=[world.ds3])) == 0
    assert ids.getStatus(everything) == "ONLINE"
    assert sorted(ids.getDatafileIds(everything)) == sorted(world.df.values())
    assert ids.getDatafileIds(sel(dataset=[world.ds3])) == []


def test_m8_no_session(world) -> None:
    anon = world.ids_client(None)
    world.emu.counters.reset()
    assert anon.getStatus(sel(dataset=[world.ds1])) == "ONLINE"
    with pytest.raises(RuntimeError):
        anon.getSize(sel(dataset=[world.ds1]))
    with pytest.raises(RuntimeError):
        anon.getData(sel(dataset=[world.ds1]))
    with pytest.raises(RuntimeError):
        anon.prepareData(sel(dataset=[world.ds1]))
    with pytest.raises(RuntimeError):
        anon.delete(sel(datafile=[world.df[1]]))
    with pytest.raises(RuntimeError):
        anon.put(b"x", "n", world.ds1, world.fmt)
    assert world.emu.counters.get("ids/getSize") == 0
    assert world.emu.counters.get("ids/getStatus") == 1


def test_m9_selection_types(world) -> None:
    ids = world.ids
    for call in (ids.getSize, ids.getStatus, ids.getDatafileIds, ids.getData, ids.reset):
        with pytest.raises(TypeError):
            call([world.df[1]])  # type: ignore[arg-type]
    for call in (ids.archive, ids.restore, ids.write, ids.prepareData, ids.delete):
        with pytest.raises(TypeError):
            call("a-prepared-id")  # type: ignore[arg-type]
    # a str is a preparedId
    with pytest.raises(IDSBadRequestError):
        ids.getSize("not-a-uuid")
    with pytest.raises(IDSNotFoundError):
        ids.getSize("aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa")


# ------------------------------------------------------------------ errors (M5-M7)


def test_m6_python_icat_exception_cases(world) -> None:
    with pytest.raises(IDSBadRequestError) as info:
        world.ids.isPrepared("-=- INVALID ID -=-")
    assert (info.value.status, info.value.type) == (400, "BadRequestException")
    with pytest.raises(IDSNotFoundError) as info2:
        world.ids.getData(DataSelection({"datasetIds": [-11]}))
    assert (info2.value.status, info2.value.type) == (404, "NotFoundException")


def test_prepared_ids_are_not_in_errors_or_logs(world, caplog: pytest.LogCaptureFixture) -> None:
    # a preparedId is a download token: IDS quotes it ("The preparedId ... is not known")
    known = world.ids.prepareData(sel(datafile=[world.df[1]]))
    unknown = "0d9a3706-80d4-4d29-9ff3-4d65d4308a24"
    caplog.set_level("DEBUG")
    raised: list[Exception] = []
    for call in (world.ids.isPrepared, world.ids.getData, world.ids.getStatus):
        with pytest.raises(IDSNotFoundError) as info:
            call(unknown)
        raised.append(info.value)
    with pytest.raises(IDSBadRequestError) as bad:
        world.ids.isPrepared("not a uuid at all")
    raised.append(bad.value)
    assert "***" in raised[0].message
    for exc in raised:
        for text in (str(exc), repr(exc), exc.message):
            assert unknown not in text and "not a uuid at all" not in text
    assert unknown not in caplog.text and "not a uuid at all" not in caplog.text
    assert world.ids.isPrepared(known) in (True, False)
    assert known not in caplog.text


def test_each_status_code(world) -> None:
    ids = world.ids
    with pytest.raises(IDSInsufficientPrivilegesError):
        world.ids_client(world.forbidden).getSize(sel(datafile=[world.df[1], world.df[2]]))
    with pytest.raises(IDSInsufficientPrivilegesError):
        world.ids_client("aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa").prepareData(sel(dataset=[1]))
    with pytest.raises(IDSBadRequestError):
        world.ids_client("Not-A-Session").getData(sel(dataset=[world.ds1]))
    with pytest.raises(IDSNotImplementedError) as info:
        ids.archive(sel(dataset=[world.ds1]))
    assert info.value.status == 501
    with pytest.raises(IDSNotImplementedError):
        ids.getLink(world.df[1])
    world.emu.faults.error(500, "ids/getSize", count=1)
    with pytest.raises(IDSInternalError) as info3:
        ids.getSize(sel(dataset=[world.ds1]))
    assert info3.value.status == 500
    with pytest.raises(IDSError) as info4:
        ids._call("GET", "getApiVersion", idempotent=True)
    assert type(info4.value) is IDSError and info4.value.type == "NOT_IMPLEMENTED"


def test_m10_write_on_single_level(world) -> None:
    with pytest.raises(IDSNotImplementedError):
        world.ids.write(sel(dataset=[world.ds1]))


# ------------------------------------------------------------------ getData


def test_getdata_single_file_and_offsets(world) -> None:
    ids = world.ids
    one = sel(datafile=[world.df[3]])
    with ids.getData(one) as stream:
        assert isinstance(stream, DataStream)
        assert stream.status == 200 and stream.offset == 0
        assert stream.content_length == 52
        assert stream.getheader("Content-Disposition") == 'attachment; filename="df3"'
        assert stream.read() == world.content(3)
    with ids.getData(one, offset=10) as stream:  # M3: Range: bytes=10-
        assert stream.status == 206
        assert stream.read() == world.content(3)[10:]
    with ids.getData(one, offset=1000) as stream:
        assert stream.status == 206 and stream.read() == b""
    with pytest.raises(ValueError):
        ids.getData(one, offset=-1)


def test_getdata_stream_interfaces(world) -> None:
    ids = world.ids
    one = sel(datafile=[world.df[1]])
    with ids.getData(one) as stream:
        buf = bytearray(20)
        assert stream.readinto(buf) == 20
        assert bytes(buf) == world.content(1)[:20]
        assert stream.read(2) == world.content(1)[20:22]
        assert stream.length == 30
        rest = b"".join(stream)
        assert rest == world.content(1)[22:]
        assert stream.read(5) == b""
    assert stream.closed
    out = io.BytesIO()
    with ids.getData(one) as stream:
        assert stream.copyto(out, blocksize=7) == 52
    assert out.getvalue() == world.content(1)
    # closing in the middle and going on with the same client
    stream = ids.getData(one)
    assert stream.read(1) == world.content(1)[:1]
    stream.close()
    with pytest.raises(ValueError):
        stream.read(1)
    assert ids.getSize(one) == 52
    # io wrappers work on top of it
    with ids.getData(one) as stream:
        assert io.BufferedReader(stream).read() == world.content(1)


def test_getdata_zip_and_flags(world) -> None:
    ids = world.ids
    with ids.getData(sel(dataset=[world.ds1, world.ds2]), compressFlag=True,
                     outname="all") as stream:
        assert stream.content_length is None  # chunked
        assert stream.getheader("Content-Disposition") == 'attachment; filename="all.zip"'
        data = stream.read()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        contents = sorted(z.read(n) for n in z.namelist())
        assert z.testzip() is None
    assert contents == sorted(world.content(n) for n in (1, 2, 3, 4))
    with ids.getData(sel(datafile=[world.df[2]]), zipFlag=True) as stream:
        data = stream.read()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert [z.read(n) for n in z.namelist()] == [world.content(2)]


def test_prepared_download(world) -> None:
    ids = world.ids
    pid = ids.prepareData(sel(datafile=[world.df[4]]))
    assert len(pid) == 36
    assert ids.isPrepared(pid) is True
    assert ids.getSize(pid) == 52
    assert ids.getStatus(pid) == "ONLINE"
    assert ids.getDatafileIds(pid) == [world.df[4]]
    anon = world.ids_client(None)  # a preparedId needs no session
    with anon.getData(pid, offset=5) as stream:
        assert stream.status == 206 and stream.read() == world.content(4)[5:]
    assert anon.reset(pid) is None
    zpid = ids.prepareData(sel(dataset=[world.ds1]), compressFlag=True, zipFlag=True)
    with anon.getData(zpid) as stream, zipfile.ZipFile(io.BytesIO(stream.read())) as z:
        assert len(z.namelist()) == 2


def test_getdataurl(world) -> None:
    url = world.ids.getDataUrl(sel(datafile=[world.df[2]]), outname="x.bin")
    assert world.root in url and "outname=x.bin" in url
    r = requests.get(url, timeout=10)
    assert r.status_code == 200 and r.content == world.content(2)
    pid = world.ids.prepareData(sel(datafile=[world.df[2]]))
    url = world.ids.getDataUrl(pid)
    assert "preparedId=" + pid in url and world.root not in url
    assert requests.get(url, timeout=10).content == world.content(2)


def test_parallel_downloads_share_one_client(world) -> None:
    ids = world.ids
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def fetch(n: int) -> None:
        try:
            for _ in range(5):
                with ids.getData(sel(datafile=[world.df[n]])) as s:
                    results[n] = s.read()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(n,)) for n in (1, 2, 3, 4) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == {n: world.content(n) for n in (1, 2, 3, 4)}


# ------------------------------------------------------------------ put / delete (M4)


@pytest.mark.parametrize(
    "make_input",
    [
        lambda data: data,
        lambda data: io.BytesIO(data),
        lambda data: iter([data[:3], b"", data[3:]]),
        lambda data: bytearray(data),
    ],
    ids=["bytes", "file", "iterable", "bytearray"],
)
def test_put_inputs(world, make_input) -> None:
    data = b"hello idsfs \xe2\x82\xac" * 1000
    new_id = world.ids.put(make_input(data), "new.dat", world.ds3, world.fmt,
                           description="d", datafileCreateTime=1_600_000_000_000,
                           datafileModTime=1_600_000_001_000)
    assert isinstance(new_id, int)
    with world.ids.getData(sel(datafile=[new_id])) as s:
        assert s.read() == data
    df = world.icat.get("Datafile", new_id)
    assert df.fileSize == len(data) and df.checksum == f"{zlib.crc32(data):x}"
    assert df.description == "d"
    assert df.datafileModTime.timestamp() == 1_600_000_001
    assert df.createId == "simple/root"


def test_put_empty_and_errors(world) -> None:
    ids = world.ids
    empty = ids.put(b"", "empty", world.ds3, world.fmt)
    assert ids.getSize(sel(datafile=[empty])) == 0
    with pytest.raises(ValueError):
        ids.put(None, "x", world.ds3, world.fmt)
    with pytest.raises(TypeError):
        ids.put("text", "x", world.ds3, world.fmt)
    with pytest.raises(IDSInternalError):  # duplicate name: ICAT OBJECT_ALREADY_EXISTS -> 500
        ids.put(b"again", "empty", world.ds3, world.fmt)
    with pytest.raises(IDSNotFoundError):
        ids.put(b"x", "y", 999999, world.fmt)
    with pytest.raises(IDSInsufficientPrivilegesError):
        world.ids_client(world.forbidden).put(b"x", "y", world.ds3, world.fmt)


def test_m4_put_checksum_mismatch(world) -> None:
    world.emu.faults.corrupt_checksum(count=1)
    with pytest.raises(IDSResponseError, match="checksum"):
        world.ids.put(b"some bytes", "corrupt.dat", world.ds3, world.fmt)
    assert world.emu.counters.get("ids/put") >= 1


def test_delete(world) -> None:
    ids = world.ids
    new_id = ids.put(b"to be deleted", "gone.dat", world.ds3, world.fmt)
    assert ids.delete(sel(datafile=[new_id])) is None
    with pytest.raises(IDSNotFoundError):
        ids.getSize(sel(datafile=[new_id]))
    with pytest.raises(IDSInsufficientPrivilegesError):
        world.ids_client(world.forbidden).delete(sel(datafile=[world.df[1]]))


def test_read_only_server(emulator_factory) -> None:
    emu = emulator_factory(read_only=True)
    ro = IDSClient(emu.ids_url, emu.login("root"))
    assert ro.isReadOnly() is True
    with pytest.raises(IDSNotImplementedError):
        ro.put(b"x", "x", 1, 1)
    with pytest.raises(IDSNotImplementedError):
        ro.delete(sel(datafile=[1]))


def test_getlink_enabled(world_factory) -> None:
    w = world_factory(link_lifetime_seconds=60)
    path = w.ids.getLink(w.df[1], username=getpass.getuser())
    assert isinstance(path, str) and os.path.isabs(path)
    link = Path(path)
    # a hard link to the stored file, under the server's data directory, named as the datafile
    assert link.name == "df1"
    assert link.resolve().is_relative_to(Path(w.emu.settings.data_dir).resolve())
    assert link.read_bytes() == w.content(1)
    assert link.stat().st_nlink >= 2
    again = w.ids.getLink(w.df[1])  # username defaults to the local login name
    assert again != path and Path(again).read_bytes() == w.content(1)
    with pytest.raises(IDSNotFoundError):
        w.ids.getLink(999999, username="someone")


def test_getlink_disabled(world) -> None:
    with pytest.raises(IDSNotImplementedError) as info:
        world.ids.getLink(world.df[1], username=getpass.getuser())
    assert info.value.status == 501

"""IDS protocol tests, behaviours.md sections F (put) and G (delete), with plain ``requests``."""

from __future__ import annotations

import json
import zipfile
import zlib
from datetime import datetime

import pytest

DATA21 = b"twenty-one bytes!!!!!"


def err(r, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["code"] == code


def files_in(path) -> list:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ------------------------------------------------------------------------------- F


def test_F1_put_answer(std) -> None:
    s = std
    assert len(DATA21) == 21
    r = s.put(
        DATA21,
        sessionId=s.root,
        name="f1",
        datasetId=s.ds1,
        datafileFormatId=s.fmt,
        description="A rather splendid datafile",
    )
    assert r.status_code == 201
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"id", "checksum", "location", "size"}
    assert body["checksum"] == zlib.crc32(DATA21) and body["size"] == 21
    assert isinstance(body["id"], int) and isinstance(body["location"], str)
    assert body["location"].startswith(f"{s.inv}/{s.ds1}/")
    assert (s.main / body["location"]).read_bytes() == DATA21


def test_F2_put_metadata_defaults(std) -> None:
    s = std
    r = s.put(
        DATA21,
        sessionId=s.root,
        name="f2",
        datasetId=s.ds1,
        datafileFormatId=s.fmt,
        description="A rather splendid datafile",
    )
    df = s.icat_datafile(r.json()["id"])
    assert df["description"] == "A rather splendid datafile"
    for key in ("doi", "datafileCreateTime", "datafileModTime"):
        assert key not in df


def _ms(icat_date: str) -> int:
    return round(datetime.fromisoformat(icat_date).timestamp() * 1000)


def test_F3_put_times_and_doi(std) -> None:
    s = std
    r = s.put(
        DATA21,
        sessionId=s.root,
        name="f3",
        datasetId=s.ds1,
        datafileFormatId=s.fmt,
        doi="7.1.3",
        datafileCreateTime=420000,
        datafileModTime=42000,
    )
    df = s.icat_datafile(r.json()["id"])
    assert df["doi"] == "7.1.3"
    assert _ms(df["datafileCreateTime"]) == 420000
    assert _ms(df["datafileModTime"]) == 42000


def test_F4_icat_record_and_round_trip(std) -> None:
    s = std
    data = b"\x00\x01binary\xff" * 1000
    r = s.put(data, sessionId=s.alice, name="by alice", datasetId=s.ds1, datafileFormatId=s.fmt)
    assert r.status_code == 201, r.text
    df_id = r.json()["id"]
    df = s.icat_datafile(df_id)
    assert df["checksum"] == f"{zlib.crc32(data):x}"
    assert df["fileSize"] == len(data) and df["location"]
    assert df["createId"] == df["modId"] == "simple/alice"
    got = s.get("getData", sessionId=s.alice, datafileIds=df_id)
    assert got.content == data


def test_F5_put_validation(std) -> None:
    s = std
    base = {"sessionId": s.root, "name": "x", "datasetId": s.ds1, "datafileFormatId": s.fmt}

    def put(**changes):
        params = {**base, **changes}
        return s.put(b"abc", **{k: v for k, v in params.items() if v is not None})

    err(put(sessionId="bad"), 400, "BadRequestException")
    err(put(name=None), 400, "BadRequestException")
    err(put(datasetId="abc"), 400, "BadRequestException")
    err(put(datasetId=None), 400, "BadRequestException")
    err(put(datafileFormatId="abc"), 400, "BadRequestException")
    err(put(datafileFormatId=None), 400, "BadRequestException")
    err(put(datafileModTime="yesterday"), 400, "BadRequestException")
    err(put(datafileCreateTime="1.5"), 400, "BadRequestException")
    err(put(datasetId=99999), 404, "NotFoundException")
    err(put(sessionId=s.forbidden), 403, "InsufficientPrivilegesException")
    err(
        put(sessionId="aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"),
        403,
        "InsufficientPrivilegesException",
    )
    err(put(datafileFormatId=99999), 404, "NotFoundException")
    # nothing was left behind by the failures
    assert len(files_in(s.ds_dir(s.ds1))) == 2
    assert s.icat(f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {s.ds1}") == [2]


def test_F5_put_read_only_first(std_factory) -> None:
    s = std_factory(read_only=True)
    err(s.put(b"x", sessionId="bad"), 501, "NotImplementedException")


def test_F6_duplicate_name(std) -> None:
    s = std
    r = s.put(
        b"new content",
        sessionId=s.root,
        name=s.names[s.df2],
        datasetId=s.ds1,
        datafileFormatId=s.fmt,
    )
    err(r, 500, "InternalException")
    assert r.json()["message"].startswith("OBJECT_ALREADY_EXISTS")
    assert (s.main / s.locations[s.df2]).read_bytes() == s.content(s.df2)
    assert len(files_in(s.ds_dir(s.ds1))) == 2  # no orphan bytes


def test_F7_empty_body(std) -> None:
    s = std
    r = s.put(b"", sessionId=s.root, name="empty", datasetId=s.ds1, datafileFormatId=s.fmt)
    assert r.status_code == 201
    body = r.json()
    assert body["size"] == 0 and body["checksum"] == 0
    assert s.icat_datafile(body["id"])["checksum"] == "0"
    assert s.get("getData", sessionId=s.root, datafileIds=body["id"]).content == b""


def test_F7_chunked_upload(std) -> None:
    s = std
    chunks = [b"a" * 100_000, b"b" * 5, b"c" * 70_000]
    r = s.http.put(
        f"{s.ids}/put",
        params={
            "sessionId": s.root,
            "name": "chunked",
            "datasetId": s.ds1,
            "datafileFormatId": s.fmt,
        },
        data=iter(chunks),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201
    assert r.json()["size"] == 170_005 and r.json()["checksum"] == zlib.crc32(b"".join(chunks))


def test_F8_put_into_archived_dataset_unit(std_ds) -> None:
    s = std_ds
    err(
        s.put(b"x", sessionId=s.root, name="n", datasetId=s.ds1, datafileFormatId=s.fmt),
        503,
        "DataNotOnlineException",
    )
    s.poll(lambda: s.status(datasetIds=s.ds1) == "ONLINE")  # the restore was requested
    assert (
        s.put(b"x", sessionId=s.root, name="n", datasetId=s.ds1, datafileFormatId=s.fmt).status_code
        == 201
    )
    # an empty dataset needs no restore
    assert (
        s.put(b"y", sessionId=s.root, name="n", datasetId=s.ds3, datafileFormatId=s.fmt).status_code
        == 201
    )


def test_F9_put_into_archived_datafile_unit(std_df) -> None:
    s = std_df
    r = s.put(b"x", sessionId=s.root, name="n", datasetId=s.ds1, datafileFormatId=s.fmt)
    assert r.status_code == 201
    assert not s.online(s.df1)


def test_F10_put_then_archive(std2) -> None:
    s = std2
    assert s.post("restore", sessionId=s.root, datasetIds=s.ds1).status_code == 204
    s.wait_idle()
    assert s.ds_dir(s.ds1).is_dir()
    a = s.put(
        b"first",
        sessionId=s.root,
        name="p1",
        datasetId=s.ds1,
        datafileFormatId=s.fmt,
        description="one",
    )
    b = s.put(
        b"second",
        sessionId=s.root,
        name="p2",
        datasetId=s.ds1,
        datafileFormatId=s.fmt,
        doi="10.1/2",
    )
    assert (a.status_code, b.status_code) == (201, 201)
    s.wait_idle()
    assert s.post("archive", sessionId=s.root, datasetIds=s.ds1).status_code == 204
    s.wait_idle()
    assert not s.ds_dir(s.ds1).exists()
    assert s.icat_datafile(a.json()["id"])["description"] == "one"
    assert s.icat_datafile(b.json()["id"])["doi"] == "10.1/2"
    # and the data comes back
    pid = s.prepare(datafileIds=[a.json()["id"], b.json()["id"]])
    s.poll(lambda: s.get("isPrepared", preparedId=pid).text == "true")
    entries = s.zip_entries(s.get("getData", preparedId=pid).content)
    assert {c for c, _ in entries.values()} == {b"first", b"second"}


def _multipart_put(s, wrap: bool, name: str | None = "mp", **extra):
    fields = [("sessionId", s.root), ("datasetId", str(s.ds1)), ("datafileFormatId", str(s.fmt))]
    if name:
        fields.append(("name", name))
    if wrap:
        fields.append(("wrap", "true"))
    fields.extend(extra.items())
    files = [(k, (None, v)) for k, v in fields] + [("file", ("upload.txt", DATA21))]
    return s.http.post(f"{s.ids}/put", files=files)


def test_F11_multipart_put(std) -> None:
    s = std
    r = _multipart_put(s, wrap=False)
    assert r.status_code == 201
    body = r.json()
    assert body["checksum"] == zlib.crc32(DATA21) and body["size"] == 21
    r = _multipart_put(s, wrap=True, name="mp2")
    assert r.status_code == 201
    text = r.text
    prefix = '<html><script type="text/javascript">window.name=\''
    assert text.startswith(prefix) and text.endswith("';</script></html>")
    inner = json.loads(text[len(prefix) : -len("';</script></html>")].replace("\\'", "'"))
    assert inner["size"] == 21
    # the part's filename is the default name
    r = _multipart_put(s, wrap=False, name=None)
    assert s.icat_datafile(r.json()["id"])["name"] == "upload.txt"
    # unknown field, not multipart
    err(_multipart_put(s, wrap=False, name="mp3", color="red"), 400, "BadRequestException")
    err(s.http.post(f"{s.ids}/put", data={"sessionId": s.root}), 400, "BadRequestException")
    # errors are wrapped too when asked
    r = _multipart_put(s, wrap=True, name="mp2")
    assert r.status_code == 500 and r.text.startswith(prefix)


def test_F_location_escaping() -> None:
    from idsfs.emulator.ids_api import escape_location, wrap_json

    assert escape_location("a/Person's file") == "a/Person\\'s file"
    assert escape_location("a\\b") == "a\\\\b"
    assert json.loads(json.dumps({"l": escape_location("Person's")}))["l"] == "Person\\'s"
    assert "\\'" in wrap_json('{"a":"it\'s"}')


def test_F_corrupted_checksum_fault(std) -> None:
    s = std
    s.emu.faults.corrupt_checksum(count=1)
    r = s.put(DATA21, sessionId=s.root, name="bad crc", datasetId=s.ds1, datafileFormatId=s.fmt)
    assert r.status_code == 201
    assert r.json()["checksum"] == zlib.crc32(DATA21) ^ 0xFFFFFFFF
    assert s.icat_datafile(r.json()["id"])["checksum"] == f"{zlib.crc32(DATA21) ^ 0xFFFFFFFF:x}"
    r = s.put(DATA21, sessionId=s.root, name="good crc", datasetId=s.ds1, datafileFormatId=s.fmt)
    assert r.json()["checksum"] == zlib.crc32(DATA21)


# ------------------------------------------------------------------------------- G


def test_G1_delete_datafile(std) -> None:
    s = std
    assert s.status(datafileIds=s.df4) == "ONLINE"
    r = s.delete(sessionId=s.root, datafileIds=s.df4)
    assert r.status_code == 204
    err(s.get("getStatus", sessionId=s.root, datafileIds=s.df4), 404, "NotFoundException")
    assert not (s.main / s.locations[s.df4]).exists()


def test_G2_delete_dataset(std) -> None:
    s = std
    assert s.ds_dir(s.ds2).is_dir()
    assert s.delete(sessionId=s.root, datasetIds=s.ds2).status_code == 204
    assert s.status(datasetIds=s.ds2) == "ONLINE"
    assert not s.ds_dir(s.ds2).exists()
    assert s.emu.catalogue.get("simple/root", "Dataset", s.ds2)["Dataset"]["name"] == "ds2"


def _clone_df1(s) -> int:
    return int(
        s.emu.catalogue.write(
            "simple/root",
            {
                "Datafile": {
                    "name": "clone",
                    "dataset": {"id": s.ds1},
                    "location": s.locations[s.df1],
                    "fileSize": 52,
                    "checksum": f"{zlib.crc32(s.content(s.df1)):x}",
                }
            },
        )[0]
    )


def test_G3_G4_clones_share_files(std) -> None:
    s = std
    clone = _clone_df1(s)
    assert s.get("getSize", sessionId=s.root, datasetIds=s.ds1).text == "156"
    entries = s.zip_entries(s.get("getData", sessionId=s.root, datasetIds=s.ds1).content)
    assert len(entries) == 3
    assert entries["ids/F/I/N/A/ds1/clone"][0] == s.content(s.df1)
    expected = [(s.df1, 2, 2), (s.df2, 1, 1), (clone, 0, 0)]
    for df, n_files, n_icat in expected:
        assert s.delete(sessionId=s.root, datafileIds=df).status_code == 204
        assert len(files_in(s.ds_dir(s.ds1))) == n_files
        assert s.icat(f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {s.ds1}") == [
            n_icat
        ]
    assert not s.ds_dir(s.ds1).exists()


def test_G5_delete_archived(std2) -> None:
    s = std2
    r = s.delete(sessionId=s.root, datasetIds=s.ds1)
    if s.emu.storage.unit == "DATASET":
        err(r, 503, "DataNotOnlineException")
        assert s.icat(f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {s.ds1}") == [2]
    else:
        assert r.status_code == 204
        s.wait_idle()
        assert s.icat(f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {s.ds1}") == [0]
        assert not (s.archive / s.locations[s.df1]).exists()


def test_G6_delete_rewrites_dataset_archive(std_ds) -> None:
    s = std_ds
    assert s.post("restore", sessionId=s.root, datasetIds=s.ds2).status_code == 204
    s.wait_idle()
    assert s.delete(sessionId=s.root, datafileIds=s.df4).status_code == 204
    s.wait_idle()
    with zipfile.ZipFile(s.archive / str(s.inv) / f"{s.ds2}.zip") as z:
        assert z.namelist() == [f"ids/F/I/N/A/ds2/{s.names[s.df3]}"]


def test_G7_delete_restored_dataset(std2) -> None:
    s = std2
    assert s.post("restore", sessionId=s.root, datasetIds=s.ds2).status_code == 204
    s.wait_idle()
    assert s.ds_dir(s.ds2).is_dir()
    assert s.delete(sessionId=s.root, datasetIds=s.ds2).status_code == 204
    s.wait_idle()
    assert not s.ds_dir(s.ds2).exists()
    assert not (s.archive / str(s.inv) / f"{s.ds2}.zip").exists()
    assert not (s.archive / str(s.inv) / str(s.ds2)).exists()


@pytest.mark.parametrize("user", ["forbidden", "bad"])
def test_G_delete_errors(std, user: str) -> None:
    s = std
    sid = s.forbidden if user == "forbidden" else "bad"
    r = s.delete(sessionId=sid, datafileIds=s.df1)
    err(
        r,
        403 if user == "forbidden" else 400,
        "InsufficientPrivilegesException" if user == "forbidden" else "BadRequestException",
    )
    assert s.online(s.df1)

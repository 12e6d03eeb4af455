"""IDS protocol tests, behaviours.md section E (getData), with plain ``requests``."""

from __future__ import annotations

import re
import zlib

import pytest

ZIP_NAME_RE = re.compile(r'attachment; filename="\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}\.zip"')


def entry_name(s, df_id: int) -> str:
    ds = s.ds1 if df_id in (s.df1, s.df2) else s.ds2
    ds_name = "ds1" if ds == s.ds1 else "ds2"
    return f"ids/F/I/N/A/{ds_name}/{s.names[df_id]}"


def check_zip(s, data: bytes, df_ids: list[int], csize: int | None = None) -> None:
    entries = s.zip_entries(data)
    assert set(entries) == {entry_name(s, d) for d in df_ids}
    for d in df_ids:
        content, info = entries[entry_name(s, d)]
        icat = s.icat_datafile(d)
        assert content == s.content(d)
        assert f"{info.CRC:x}" == icat["checksum"]
        assert info.file_size == icat["fileSize"]
        assert info.compress_type == 8
        if csize is not None:
            assert info.compress_size == csize


def test_E1_zip_of_four_files_level0(std) -> None:
    r = std.get("getData", sessionId=std.root, datafileIds=std.dfs)
    assert r.status_code == 200
    check_zip(std, r.content, std.dfs, 57)


def test_E2_zip_compressed(std) -> None:
    r = std.get("getData", sessionId=std.root, datafileIds=std.dfs, compress=True)
    assert r.status_code == 200
    check_zip(std, r.content, std.dfs, 36)


def test_E3_single_file_is_raw(std) -> None:
    for flags in ({}, {"compress": True}, {"zip": "false"}, {"zip": "yes"}):
        r = std.get("getData", sessionId=std.root, datafileIds=std.df1, **flags)
        assert r.status_code == 200 and r.content == std.content(std.df1), flags


def test_E4_single_file_zipped(std) -> None:
    r = std.get("getData", sessionId=std.root, datafileIds=std.df1, zip=True)
    check_zip(std, r.content, [std.df1], 57)
    r = std.get("getData", sessionId=std.root, datafileIds=std.df1, zip="TRUE", compress=True)
    check_zip(std, r.content, [std.df1], 36)


def test_E5_investigation(std) -> None:
    r = std.get("getData", sessionId=std.root, investigationIds=std.inv)
    check_zip(std, r.content, std.dfs)


def test_E6_entry_names(std) -> None:
    r = std.get("getData", sessionId=std.root, datasetIds=[std.ds1, std.ds2])
    names = set(std.zip_entries(r.content))
    assert f"ids/F/I/N/A/ds1/{std.names[std.df1]}" in names
    assert std.names[std.df1].startswith("a/df1_")
    assert names == {entry_name(std, d) for d in std.dfs}


def test_E7_prepared_flags(std) -> None:
    s = std
    for flags, kind in (
        ({}, "raw"),
        ({"compress": True}, "raw"),
        ({"zip": True}, 57),
        ({"zip": True, "compress": True}, 36),
    ):
        pid = s.prepare(datafileIds=s.df1, **flags)
        r = s.get("getData", preparedId=pid, zip="true", compress="true")  # ignored here
        assert r.status_code == 200
        if kind == "raw":
            assert r.content == s.content(s.df1)
        else:
            check_zip(s, r.content, [s.df1], kind)


def test_E8_prepared_multi_selections(std) -> None:
    s = std
    for sel, expected in (
        ({"datafileIds": s.dfs}, s.dfs),
        ({"datasetIds": s.ds1}, [s.df1, s.df2]),
        ({"datasetIds": s.ds1, "datafileIds": s.dfs}, s.dfs),
    ):
        pid = s.prepare(zip=False, **sel)
        r = s.get("getData", preparedId=pid)
        check_zip(s, r.content, expected, 57)
        # entries in ascending datafile id order
        order = [name for name in s.zip_entries(r.content)]
        assert order == [entry_name(s, d) for d in sorted(expected)]


@pytest.mark.parametrize(
    "flags", [{}, {"compress": True}, {"zip": True}, {"zip": True, "compress": True}]
)
def test_E9_offset_reads(std, flags) -> None:
    s = std
    for sel in ({"datafileIds": s.df1}, {"datasetIds": s.ds1}):
        pid = s.prepare(**sel, **flags)
        full = s.get("getData", preparedId=pid)
        assert full.status_code == 200
        part = s.get("getData", preparedId=pid, headers={"Range": "bytes=20-"})
        assert part.status_code == 206
        assert part.content == full.content[20:]
        # session mode gives the same bytes (deterministic zips)
        again = s.get("getData", sessionId=s.root, headers={"Range": "bytes=20-"}, **sel, **flags)
        assert again.status_code == 206 and again.content == full.content[20:]


def test_E9_offset_reads_two_level(std2) -> None:
    s = std2
    pid = s.prepare(datafileIds=s.df3)
    s.poll(lambda: s.get("isPrepared", preparedId=pid).text == "true")
    full = s.get("getData", preparedId=pid)
    part = s.get("getData", preparedId=pid, headers={"Range": "bytes=20-"})
    assert (full.status_code, part.status_code) == (200, 206)
    assert part.content == full.content[20:] == s.content(s.df3)[20:]


def test_E10_range_edges(std) -> None:
    s = std
    r = s.get("getData", sessionId=s.root, datafileIds=s.df1, headers={"Range": "bytes=0-"})
    assert r.status_code == 200 and r.content == s.content(s.df1)
    r = s.get("getData", sessionId=s.root, datafileIds=s.df1, headers={"Range": "bytes=1000-"})
    assert r.status_code == 206 and r.content == b""
    assert r.headers["Content-Length"] == "0"
    r = s.get("getData", sessionId=s.root, datafileIds=s.df1, headers={"Range": "bytes=52-"})
    assert r.status_code == 206 and r.content == b""
    pid = s.prepare(datasetIds=s.ds1)
    r = s.get("getData", preparedId=pid, headers={"Range": "bytes=100000-"})
    assert r.status_code == 206 and r.content == b""
    r = s.get("getData", preparedId=pid, headers={"Range": "bytes=99999999999999999999-"})
    assert r.status_code == 500 and r.json()["code"] == "InternalException"


def test_E11_download_headers(std) -> None:
    s = std
    pid = s.prepare(datafileIds=s.dfs)
    for r in (
        s.get("getData", sessionId=s.root, datafileIds=s.df1),
        s.get("getData", sessionId=s.root, datafileIds=s.df1, headers={"Range": "bytes=3-"}),
        s.get("getData", preparedId=pid),
        s.get("getData", preparedId=pid, headers={"Range": "bytes=3-"}),
    ):
        assert r.headers["Content-Type"] == "application/octet-stream"
        assert r.headers["Accept-Ranges"] == "bytes"
        assert r.headers["Content-Disposition"].startswith('attachment; filename="')
        assert "Content-Range" not in r.headers


def test_E12_content_length_single_file(std) -> None:
    s = std
    r = s.get("getData", sessionId=s.root, datafileIds=s.df1, headers={"Range": "bytes=20-"})
    assert r.status_code == 206 and r.headers["Content-Length"] == "32"
    assert "Transfer-Encoding" not in r.headers
    r = s.get("getData", sessionId=s.root, datafileIds=s.df1)
    assert r.headers["Content-Length"] == "52"
    pid = s.prepare(datafileIds=s.df1)
    for r in (
        s.get("getData", sessionId=s.root, datafileIds=s.df1, zip=True),
        s.get("getData", sessionId=s.root, datasetIds=s.ds1),
        s.get("getData", preparedId=pid),
        s.get("getData", preparedId=pid, headers={"Range": "bytes=20-"}),
    ):
        assert "Content-Length" not in r.headers
        assert r.headers["Transfer-Encoding"] == "chunked"


def test_E12_content_length_is_icat_file_size(std) -> None:
    s = std
    s.emu.catalogue.write("simple/root", {"Datafile": {"id": s.df2, "fileSize": 40}})
    r = s.get("getData", sessionId=s.root, datafileIds=s.df2, headers={"Range": "bytes=10-"})
    assert r.headers["Content-Length"] == "30"
    assert r.content == s.content(s.df2)[10:40]


def test_E13_disposition_names(std) -> None:
    s = std

    def disp(**kw) -> str:
        return s.get("getData", sessionId=s.root, **kw).headers["Content-Disposition"]

    assert disp(datafileIds=s.df1) == f'attachment; filename="{s.names[s.df1]}"'
    assert ZIP_NAME_RE.fullmatch(disp(datasetIds=s.ds1))
    assert disp(datasetIds=s.ds1, outname="x") == 'attachment; filename="x.zip"'
    assert disp(datasetIds=s.ds1, outname="x.zip") == 'attachment; filename="x.zip"'
    assert disp(datasetIds=s.ds1, outname="x.ZIP") == 'attachment; filename="x.ZIP.zip"'
    assert disp(datasetIds=s.ds1, outname="zip") == 'attachment; filename="zip"'
    assert disp(datafileIds=s.df1, outname="x") == 'attachment; filename="x"'
    pid = s.prepare(datafileIds=s.df1)
    r = s.get("getData", preparedId=pid, outname="y.dat")
    assert r.headers["Content-Disposition"] == 'attachment; filename="y.dat"'


def test_E14_empty_zips(std) -> None:
    s = std
    for r in (
        s.get("getData", sessionId=s.root, datasetIds=s.ds3),
        s.get("getData", sessionId=s.root),
        s.get("getData", preparedId=s.prepare()),
    ):
        assert r.status_code == 200
        assert len(r.content) == 22 and s.zip_entries(r.content) == {}


def test_E15_prepared_then_deleted(std) -> None:
    s = std
    pid = s.prepare(datafileIds=[s.df1, s.df2])
    assert s.delete(sessionId=s.root, datafileIds=s.df1).status_code == 204
    r = s.get("getData", preparedId=pid)
    assert r.status_code == 404 and r.json()["code"] == "NotFoundException"
    # information calls do not check: getSize skips the deleted file
    assert s.get("getSize", preparedId=pid).text == "52"


def test_E16_big_selections_with_small_max_entities(std_factory) -> None:
    s = std_factory(max_entities=20)
    new = [s.upload(f"big{i}", f"file {i}".encode()) for i in range(45)]
    assert (
        len(
            s.get("getDatafileIds", sessionId=s.root, datasetIds=s.ds1, datafileIds=s.df1).json()[
                "ids"
            ]
        )
        == 47
    )
    assert len(s.get("getDatafileIds", sessionId=s.root, datafileIds=new[:30]).json()["ids"]) == 30
    r = s.get("getDatafileIds", sessionId=s.root, investigationIds=s.inv)
    assert len(r.json()["ids"]) == 49
    r = s.get("getData", sessionId=s.root, datasetIds=s.ds1)
    entries = s.zip_entries(r.content)
    assert len(entries) == 47
    assert entries["ids/F/I/N/A/ds1/big7"][0] == b"file 7"
    pid = s.prepare(investigationIds=s.inv)
    assert len(s.get("getDatafileIds", preparedId=pid).json()["ids"]) == 49
    size = sum(len(f"file {i}") for i in range(45)) + 208
    assert s.get("getSize", preparedId=pid).text == str(size)


def test_E_crc_matches_content_for_uploads(std) -> None:
    s = std
    data = bytes(range(256)) * 1000
    df = s.upload("bin", data)
    r = s.get("getData", sessionId=s.root, datafileIds=df, zip=True, compress=True)
    content, info = s.zip_entries(r.content)["ids/F/I/N/A/ds1/bin"]
    assert content == data and zlib.crc32(data) == info.CRC

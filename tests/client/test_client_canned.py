"""IDSClient/ICATClient against canned answers: malformed responses (M7),
old server versions (M10), retry classification, TLS, proxies, redaction.

Only things the emulator cannot produce are tested here (see conftest.py).
"""

from __future__ import annotations

import json
import logging
import ssl

import pytest

from idsfs.errors import (
    ConnectError,
    ICATError,
    ICATResponseError,
    IDSDataNotOnlineError,
    IDSError,
    IDSResponseError,
    TLSError,
    TruncatedStreamError,
    VersionMethodError,
)
from idsfs.icat import ICATClient
from idsfs.ids import DataSelection, IDSClient, Version

SID = "0d9a3706-80d4-4d29-9ff3-4d65d4308a24"
JSON = {"Content-Type": "application/json"}


def client(canned, **kw) -> IDSClient:
    kw.setdefault("backoff", 0.01)
    return IDSClient(canned.url + "/ids", SID, **kw)


def test_constructor_calls_version_once(canned) -> None:
    ids = client(canned)
    assert ids.apiversion == "2.1.1"
    assert isinstance(ids.apiversion, Version)
    assert canned.hits("/ids/version") == 1


def test_m7_non_json_error_is_plain_ids_error(canned) -> None:
    canned.answer("/ids/isReadOnly", 500, "<html>Internal trouble</html>",
                  {"Content-Type": "text/html"})
    ids = client(canned)
    with pytest.raises(IDSError) as info:
        ids.isReadOnly()
    assert type(info.value) is IDSError and info.value.status == 500
    assert canned.hits("/ids/isReadOnly") == 1  # 500 is not retried


def test_m7_unknown_path_gives_plain_ids_error(canned) -> None:
    ids = client(canned)
    with pytest.raises(IDSError) as info:
        ids._call("GET", "noSuchCall", idempotent=True)
    assert type(info.value) is IDSError
    assert (info.value.status, info.value.type) == (501, "NOT_IMPLEMENTED")


def test_unusable_bodies_raise_response_error(canned) -> None:
    canned.answer("/ids/ping", body="NotIds")
    canned.answer("/ids/getSize", body="lots")
    canned.answer("/ids/getDatafileIds", body='{"nope": 1}', headers=JSON)
    canned.answer("/ids/put", 201, body="<html>", headers=JSON)
    ids = client(canned)
    with pytest.raises(IDSResponseError):
        ids.ping()
    with pytest.raises(IDSResponseError):
        ids.getSize(DataSelection({"datafileIds": [1]}))
    with pytest.raises(IDSResponseError):
        ids.getDatafileIds("a-prepared-id")
    with pytest.raises(IDSResponseError):
        ids.put(b"abc", "x", 1, 1)


def test_m10_version_gating(canned) -> None:
    canned.answer("/ids/version", 501, '{"code":"NOT_IMPLEMENTED","message":"no"}', JSON)
    canned.answer("/ids/getApiVersion", body="1.7.0")
    canned.answer("/ids/write", 501, '{"code":"NOT_IMPLEMENTED","message":"no"}', JSON)
    ids = client(canned)
    assert ids.apiversion == "1.7.0"
    assert ids.getApiVersion() == "1.7.0"
    with pytest.raises(VersionMethodError):
        ids.getSize("prepared")
    with pytest.raises(VersionMethodError):
        ids.getStatus("prepared")
    with pytest.raises(VersionMethodError):
        ids.write(DataSelection({"datasetIds": [1]}))
    assert canned.hits("/ids/getSize") == 0


def test_legacy_version_probe(canned) -> None:
    canned.answer("/ids/version", 404, "not here")
    canned.answer("/ids/ping", body="IdsOK")
    canned.answer("/ids/isReadOnly", body="false")
    ids = client(canned)
    assert ids.apiversion == "1.2.0"


def test_503_busy_is_retried_but_not_archived(canned) -> None:
    busy = (503, JSON, b'{"code":"DataNotOnlineException","message":"Data is busy"}')
    ok = (200, {}, b"ONLINE")
    canned.routes["/ids/getStatus"] = [busy, busy, ok]
    ids = client(canned, retries=3)
    assert ids.getStatus(DataSelection({"datasetIds": [1]})) == "ONLINE"
    assert canned.hits("/ids/getStatus") == 3

    canned.answer("/ids/getSize", 503,
                  '{"code":"DataNotOnlineException","message":"archived; restore requested"}',
                  JSON)
    with pytest.raises(IDSDataNotOnlineError):
        ids.getSize(DataSelection({"datasetIds": [1]}))
    assert canned.hits("/ids/getSize") == 1


def test_proxy_503_html_is_retried_then_raised(canned) -> None:
    canned.answer("/ids/isTwoLevel", 503, "<html>overloaded</html>", {"Retry-After": "0"})
    ids = client(canned, retries=2)
    with pytest.raises(IDSError) as info:
        ids.isTwoLevel()
    assert info.value.status == 503 and info.value.type is None
    assert canned.hits("/ids/isTwoLevel") == 3


def test_writes_are_never_retried(canned) -> None:
    busy = '{"code":"DataNotOnlineException","message":"Data is busy"}'
    for path in ("/ids/delete", "/ids/prepareData", "/ids/put", "/ids/archive"):
        canned.answer(path, 503, busy, JSON)
    ids = client(canned, retries=3)
    sel = DataSelection({"datafileIds": [1]})
    for call in (lambda: ids.delete(sel), lambda: ids.prepareData(sel),
                 lambda: ids.put(b"x", "n", 1, 1), lambda: ids.archive(sel)):
        with pytest.raises(IDSDataNotOnlineError):
            call()
    for path in ("/ids/delete", "/ids/prepareData", "/ids/put", "/ids/archive"):
        assert canned.hits(path) == 1


def test_connection_refused_is_connect_error(dead_port) -> None:
    with pytest.raises(ConnectError) as info:
        IDSClient(f"http://127.0.0.1:{dead_port}/ids", SID, retries=1, backoff=0.01)
    assert SID not in str(info.value)


def test_truncated_content_length(canned) -> None:
    canned.answer("/ids/getData", 200, b"x" * 50, {"Content-Length": "100", "X-Close": "1"})
    ids = client(canned)
    stream = ids.getData(DataSelection({"datafileIds": [1]}))
    assert stream.content_length == 100
    with pytest.raises(TruncatedStreamError) as info:
        stream.read()
    assert info.value.received == 50 and info.value.expected == 100
    assert stream.closed or stream.read(1) == b""


def test_an_offset_answered_from_byte_0_is_an_error_not_wrong_bytes(canned) -> None:
    # A proxy that drops Range answers 200 with the whole body: reading it as the
    # bytes from the offset would return wrong data without a word.
    ids = client(canned)
    selection = DataSelection({"datafileIds": [1]})
    canned.answer("/ids/getData", 200, b"0123456789")
    with pytest.raises(IDSResponseError, match=r"getData from offset 4: the server answered "
                                               r"200, not 206"):
        ids.getData(selection, offset=4)
    canned.answer("/ids/getData", 206, b"23456789", {"Content-Range": "bytes 2-9/10"})
    with pytest.raises(IDSResponseError, match=r"offset 4: the server sent bytes from 2"):
        ids.getData(selection, offset=4)
    canned.answer("/ids/getData", 206, b"456789")  # as the IDS answers: 206, no Content-Range
    with ids.getData(selection, offset=4) as stream:
        assert stream.read() == b"456789"
    canned.answer("/ids/getData", 200, b"0123456789")
    with ids.getData(selection) as stream:  # offset 0: 200
        assert stream.read() == b"0123456789"


def test_session_id_never_logged_or_shown(canned, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    body = json.dumps({"code": "InsufficientPrivilegesException",
                       "message": f"session {SID} expired"})
    canned.answer("/ids/getStatus", 403, body, JSON)
    ids = client(canned)
    with pytest.raises(IDSError) as info:
        ids.getStatus(DataSelection({"datafileIds": [1]}))
    assert SID not in str(info.value) and SID not in repr(info.value)
    assert SID not in repr(ids)
    stream_text = ""
    canned.answer("/ids/getData", 200, b"abc")
    with ids.getData(DataSelection({"datafileIds": [1]})) as stream:
        stream_text = repr(stream) + stream.geturl()
        assert stream.read() == b"abc"
    assert SID not in stream_text and "sessionId=***" in stream_text
    assert SID not in caplog.text
    assert "getStatus" in caplog.text  # the requests were logged
    # but the wire carried the real id
    assert any(SID in s.path for s in canned.seen if "getStatus" in s.path)


def test_get_requests_send_no_cache_headers(canned) -> None:
    canned.answer("/ids/isTwoLevel", body="TRUE")
    ids = client(canned)
    assert ids.isTwoLevel() is True
    seen = next(s for s in canned.seen if s.path.startswith("/ids/isTwoLevel"))
    assert seen.headers.get("Cache-Control") == "no-cache"
    assert seen.headers.get("Pragma") == "no-cache"


def test_proxy_is_used(canned) -> None:
    ids = IDSClient("http://ids.invalid/ids", SID, proxy={"http": canned.url})
    assert ids.apiversion == "2.1.1"
    assert canned.seen[0].path == "http://ids.invalid/ids/version"


def test_tls_verification_on_by_default(canned_tls) -> None:
    with pytest.raises(TLSError):
        IDSClient(canned_tls.url + "/ids", SID, retries=0)


def test_ssl_context_is_honoured(canned_tls, tls_files) -> None:
    cert, _key = tls_files
    ctx = ssl.create_default_context(cafile=str(cert))
    ids = IDSClient(canned_tls.url + "/ids", SID, sslContext=ctx)
    assert ids.apiversion == "2.1.1"
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    ids2 = IDSClient(canned_tls.url + "/ids", SID, verify=str(cert))
    assert ids2.apiversion == "2.1.1"


def test_icat_malformed_and_unknown_errors(canned) -> None:
    canned.answer("/icat/version", 200, "not json")
    canned.answer("/icat/properties", 418, '{"code":"TEAPOT","message":"short and stout"}', JSON)
    icat = ICATClient(canned.url, backoff=0.01)
    with pytest.raises(ICATResponseError):
        icat.version()
    with pytest.raises(ICATError) as info:
        icat.properties()
    assert type(info.value) is ICATError and info.value.status == 418


def test_icat_unusable_rows_and_ids_are_response_errors(canned) -> None:
    """Well-formed JSON of the wrong shape is an ICATResponseError, never a raw
    ValueError/TypeError/AttributeError from parsing it."""
    icat = ICATClient(canned.url, backoff=0.01, sessionId=SID)
    bad_rows = [
        '[{"Dataset": {"id": "not a number"}}]',
        '[{"Dataset": {"id": 1, "startDate": 12}}]',
        '[{"Dataset": {"id": 1, "investigation": [1]}}]',
    ]
    for body in bad_rows:
        canned.answer("/icat/entityManager", 200, body, JSON)
        with pytest.raises(ICATResponseError) as info:
            icat.search("SELECT ds FROM Dataset ds")
        assert isinstance(info.value.__cause__, ValueError), body
    for body in ('["x"]', "[null]", "[[1]]"):
        canned.answer("/icat/entityManager", 200, body, JSON)
        with pytest.raises(ICATResponseError):
            icat.create({"Facility": {"name": "F"}})


def test_ids_unusable_text_answers_are_response_errors(canned) -> None:
    canned.answer("/ids/getDatafileIds", 200, '{"ids": [1, "two"]}', JSON)
    canned.answer("/ids/getStatus", 200, b"ONLINE\xff\xfe")
    canned.answer("/ids/prepareData", 200, b"\xff\xfe")
    ids = client(canned)
    with pytest.raises(IDSResponseError):
        ids.getDatafileIds("a-prepared-id")
    with pytest.raises(IDSResponseError):
        ids.getStatus(DataSelection({"datafileIds": [1]}))
    with pytest.raises(IDSResponseError):
        ids.prepareData(DataSelection({"datafileIds": [1]}))


def test_version_gate_keeps_a_clean_cause(canned) -> None:
    """A new enough server's own error is raised as it is (not made its own cause)."""
    canned.answer("/ids/getIcatUrl", 500, '{"code":"InternalException","message":"boom"}', JSON)
    ids = client(canned)
    with pytest.raises(IDSError) as info:
        ids.getIcatUrl()
    assert info.value.message == "boom"
    assert info.value.__cause__ is not info.value

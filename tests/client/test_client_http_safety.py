"""Answers a client must not trust: redirects, encoded bodies, shifted ranges,
garbage where a boolean or a preparedId belongs, hostile JSON, and a server
that reads an upload slowly.

These answers come from small servers on 127.0.0.1 (the ``canned`` fixture
or a listener started here): the emulator never sends them.
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterator

import pytest

from idsfs.errors import ICATResponseError, IDSResponseError, TransportTimeoutError
from idsfs.icat import ICATClient
from idsfs.ids import DataSelection, IDSClient

SID = "0d9a3706-80d4-4d29-9ff3-4d65d4308a24"
JSON = {"Content-Type": "application/json"}


def client(canned, **kw) -> IDSClient:
    kw.setdefault("backoff", 0.01)
    return IDSClient(canned.url + "/ids", SID, **kw)


@pytest.fixture
def elsewhere() -> Iterator[socket.socket]:
    """A listening socket that must never be connected to (nothing accepts on it,
    but the kernel completes connections into its backlog, where they are seen)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def connections(sock: socket.socket) -> int:
    """The number of connections made to ``sock`` so far (accepted and closed here)."""
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def url_of(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


# ---------------------------------------------------------------------------------------
# 1. redirects are never followed


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_login_redirect_is_not_followed(canned, elsewhere, status) -> None:
    target = url_of(elsewhere) + "/icat/session?sessionId=" + SID
    canned.answer("/icat/session", status, "", {"Location": target})
    icat = ICATClient(canned.url, backoff=0.01, timeout=5)
    with pytest.raises(ICATResponseError) as info:
        icat.login("db", {"username": "root", "password": "hunter2-secret"})
    message = str(info.value)
    assert info.value.status == status
    assert str(status) in message and url_of(elsewhere) in message
    assert "configure" in message and "directly" in message
    assert SID not in message and "hunter2-secret" not in message
    assert connections(elsewhere) == 0
    assert canned.hits("/icat/session") == 1
    assert icat.sessionId is None


def test_ids_redirects_are_not_followed(canned, elsewhere) -> None:
    target = url_of(elsewhere) + "/ids/put"
    canned.answer("/ids/put", 307, "", {"Location": target})
    canned.answer("/ids/isReadOnly", 308, "", {"Location": "/other/isReadOnly"})
    canned.answer("/ids/getData", 302, "", {"Location": url_of(elsewhere) + "/getData"})
    ids = client(canned, timeout=5)
    with pytest.raises(IDSResponseError) as info:
        ids.put(b"the data of the upload", "x", 1, 1)
    assert info.value.status == 307 and target in str(info.value)
    assert SID not in str(info.value)
    assert canned.hits("/ids/put") == 1
    with pytest.raises(IDSResponseError) as info:
        ids.isReadOnly()
    # a relative Location is shown resolved against the request URL
    assert canned.url + "/other/isReadOnly" in str(info.value)
    assert canned.hits("/ids/isReadOnly") == 1  # not retried
    with pytest.raises(IDSResponseError):
        ids.getData(DataSelection({"datafileIds": [1]}))
    assert connections(elsewhere) == 0
    assert not any(s.path.startswith("/other") for s in canned.seen)


def test_redirect_location_is_redacted(canned) -> None:
    canned.answer("/ids/getData", 307, "",
                  {"Location": "http://127.0.0.1:1/ids/abc123-prepared/getData"
                                          f"?preparedId=abc123&sessionId={SID}"})
    ids = client(canned)
    with pytest.raises(IDSResponseError) as info:
        ids.getData("abc123-prepared")
    assert SID not in str(info.value) and "abc123" not in str(info.value)
    assert "http://127.0.0.1:1/ids/***/getData?preparedId=***&sessionId=***" in str(info.value)


# ---------------------------------------------------------------------------------------
# 2. an encoded getData body is never returned as the file's bytes


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "x-gzip", "identity, gzip"])
def test_encoded_get_data_body_is_refused(canned, encoding) -> None:
    gz = gzip.compress(b"the file's real bytes")
    canned.answer("/ids/getData", 200, gz, {"Content-Encoding": encoding})
    ids = client(canned)
    for offset, status in ((0, 200), (3, 206)):
        canned.answer("/ids/getData", status, gz, {"Content-Encoding": encoding})
        with pytest.raises(IDSResponseError, match="Content-Encoding"):
            ids.getData(DataSelection({"datafileIds": [1]}), offset=offset)
    seen = [s for s in canned.seen if s.path.startswith("/ids/getData")]
    assert seen and all(s.headers.get("Accept-Encoding") == "identity" for s in seen)


def test_identity_encoding_is_accepted(canned) -> None:
    canned.answer("/ids/getData", 200, b"plain bytes", {"Content-Encoding": " Identity "})
    with client(canned).getData(DataSelection({"datafileIds": [1]})) as stream:
        assert stream.read() == b"plain bytes"


# ---------------------------------------------------------------------------------------
# 3. a Content-Range on a ranged answer must start at the offset asked for


@pytest.mark.parametrize(("content_range", "problem"), [
    ("bytes 2-7/10", "sent bytes from 2"),
    ("bytes 0-5/*", "sent bytes from 0"),
    ("bytes */10", "sent a Content-Range that is not a byte range"),
    ("items 4-9/10", "sent a Content-Range that is not a byte range"),
    ("bytes 4-", "sent a Content-Range that is not a byte range"),
    ("garbage", "sent a Content-Range that is not a byte range"),
    ("bytes 4-3/10", "sent an empty or reversed"),
    ("bytes 4-7/10", r"sent 6 bytes \(Content-Length\)"),
])
def test_content_range_elsewhere_is_refused(canned, content_range, problem) -> None:
    canned.answer("/ids/getData", 206, b"456789", {"Content-Range": content_range})
    with pytest.raises(IDSResponseError, match=f"getData from offset 4: the server {problem}"):
        client(canned).getData(DataSelection({"datafileIds": [1]}), offset=4)


@pytest.mark.parametrize("content_range", ["bytes 4-9/10", "BYTES 4-9/*", " bytes  4-9/10 "])
def test_content_range_at_the_offset_is_accepted(canned, content_range) -> None:
    canned.answer("/ids/getData", 206, b"456789", {"Content-Range": content_range})
    with client(canned).getData(DataSelection({"datafileIds": [1]}), offset=4) as stream:
        assert stream.read() == b"456789"


# ---------------------------------------------------------------------------------------
# 4. garbage is not a boolean, a preparedId or an ICAT URL

HTML = "<html><body>Welcome to the proxy</body></html>"


@pytest.mark.parametrize("call", ["isReadOnly", "isTwoLevel", "isPrepared"])
@pytest.mark.parametrize("body", [HTML, "", "yes", "1", "truely", "true false"])
def test_a_boolean_answer_must_be_true_or_false(canned, call, body) -> None:
    canned.answer(f"/ids/{call}", 200, body, {"Content-Type": "text/html"})
    ids = client(canned)
    args = ("0d9a3706-80d4-4d29-9ff3-4d65d4308a25",) if call == "isPrepared" else ()
    with pytest.raises(IDSResponseError, match=f"{call}: the answer is not true or false") as info:
        getattr(ids, call)(*args)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(("body", "expected"), [
    ("true", True), ("false", False), ("TRUE", True), ("False", False),
    (" true\n", True), ("\tfalse\r\n", False),
])
def test_boolean_answers_that_are_accepted(canned, body, expected) -> None:
    for call in ("isReadOnly", "isTwoLevel", "isPrepared"):
        canned.answer(f"/ids/{call}", 200, body)
    ids = client(canned)
    assert ids.isReadOnly() is expected
    assert ids.isTwoLevel() is expected
    assert ids.isPrepared("0d9a3706-80d4-4d29-9ff3-4d65d4308a25") is expected


@pytest.mark.parametrize("body", ["-5", HTML, "12.5"])
def test_get_size_answer_must_be_a_number_of_bytes(canned, body) -> None:
    canned.answer("/ids/getSize", 200, body)
    ids = client(canned)
    with pytest.raises(IDSResponseError, match="getSize: not a"):
        ids.getSize(DataSelection({"datafileIds": [1]}))


@pytest.mark.parametrize("body", [HTML, "", "   ", "an id with spaces", "x" * 257,
                                  "id\x00nul", "caf\u00e9-id"])
def test_prepare_data_answer_must_be_a_prepared_id(canned, body) -> None:
    canned.answer("/ids/prepareData", 200, body)
    with pytest.raises(IDSResponseError, match="prepareData: the answer is not a preparedId"):
        client(canned).prepareData(DataSelection({"datafileIds": [1]}))


def test_prepare_data_error_quotes_the_answer_redacted(canned) -> None:
    canned.answer("/ids/prepareData", 200, f"<p>session {SID} expired</p>")
    with pytest.raises(IDSResponseError) as info:
        client(canned).prepareData(DataSelection({"datafileIds": [1]}))
    assert SID not in str(info.value) and "expired" in str(info.value)


@pytest.mark.parametrize("body", ["0d9a3706-80d4-4d29-9ff3-4d65d4308a25",
                                  "0d9a3706-80d4-4d29-9ff3-4d65d4308a25\n", "x" * 256])
def test_prepared_ids_that_are_accepted(canned, body) -> None:
    canned.answer("/ids/prepareData", 200, body)
    assert client(canned).prepareData(DataSelection({"datafileIds": [1]})) == body.strip()


@pytest.mark.parametrize("body", [HTML, "", "icat.example.org", "ftp://icat.example.org",
                                  "https://icat.example.org/<script>"])
def test_get_icat_url_answer_must_be_a_url(canned, body) -> None:
    canned.answer("/ids/getIcatUrl", 200, body, {"Content-Type": "text/html"})
    with pytest.raises(IDSResponseError, match=r"the IDS's getIcatUrl answered .*"
                                                r"not an http\(s\) URL"):
        client(canned).getIcatUrl()


def test_get_icat_url_is_stripped(canned) -> None:
    canned.answer("/ids/getIcatUrl", 200, " https://icat.example.org:8181\n")
    assert client(canned).getIcatUrl() == "https://icat.example.org:8181"


# ---------------------------------------------------------------------------------------
# 5. hostile JSON: huge numbers and deep nesting are unusable answers, not crashes

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("answer", [
    '{"id": 1e400, "checksum": 0, "size": 0}',
    '{"id": 7, "checksum": 1e400, "size": 0}',
    '{"id": -1e400, "checksum": 0, "size": 0}',
    '{"id": NaN, "checksum": 0, "size": 0}',
    '{"id": 1.5, "checksum": 0, "size": 0}',
    '{"id": true, "checksum": 0, "size": 0}',
    '{"id": ' + DEEP + ', "checksum": 0}',
    DEEP,
    "[1, 2]",
])
def test_unusable_put_answers_are_response_errors(canned, answer) -> None:
    canned.answer("/ids/put", 201, answer, JSON)
    with pytest.raises(IDSResponseError, match=r"^put: ") as info:
        client(canned).put(b"", "x", 1, 1)
    assert info.value.__cause__ is not None
    assert len(str(info.value)) < 300


def test_put_answer_with_integers_is_accepted(canned) -> None:
    canned.answer("/ids/put", 201, '{"id": 7, "checksum": 0, "size": 0, "location": "x"}', JSON)
    assert client(canned).put(b"", "x", 1, 1) == 7


@pytest.mark.parametrize("call", ["getDatafileIds", "getServiceStatus"])
@pytest.mark.parametrize("answer", [DEEP, '{"ids": [' + "[" * 5000 + "]" * 5000 + "]}"])
def test_deeply_nested_json_is_a_response_error(canned, call, answer) -> None:
    canned.answer(f"/ids/{call}", 200, answer, JSON)
    ids = client(canned)
    with pytest.raises(IDSResponseError, match=f"^{call}: response is nested too deeply") as info:
        if call == "getDatafileIds":
            ids.getDatafileIds(DataSelection({"datafileIds": [1]}))
        else:
            ids.getServiceStatus()
    assert isinstance(info.value.__cause__, RecursionError)


def test_huge_numbers_in_get_datafile_ids_are_a_response_error(canned) -> None:
    canned.answer("/ids/getDatafileIds", 200, '{"ids": [1, 1e400]}', JSON)
    with pytest.raises(IDSResponseError, match="getDatafileIds"):
        client(canned).getDatafileIds(DataSelection({"datafileIds": [1]}))


def test_deeply_nested_version_answer_is_a_response_error(canned) -> None:
    canned.answer("/ids/version", 200, DEEP, JSON)
    canned.answer("/ids/getApiVersion", 200, "1.9.0")
    # version() falls back to the legacy probe for an unusable answer, as for other IDS errors
    assert IDSClient(canned.url + "/ids", SID).apiversion == "1.9.0"


# ---------------------------------------------------------------------------------------
# 6. the ping error says what came back, once, and nothing else


@pytest.mark.parametrize(("body", "shown"), [
    ("<html>hello</html>", "'<html>hello</html>'"),
    ("IdsOK OK", "'IdsOK OK'"),
    ("", "''"),
    ("x" * 500, "'" + "x" * 100 + "...'"),
])
def test_ping_error_message(canned, body, shown) -> None:
    canned.answer("/ids/ping", 200, body, {"Content-Type": "text/html"})
    with pytest.raises(IDSResponseError) as info:
        client(canned).ping()
    assert str(info.value) == f"ping answered {shown}, not IdsOK"
    assert info.value.message == str(info.value)
    assert "None" not in str(info.value)


def test_ping_accepts_surrounding_whitespace(canned) -> None:
    canned.answer("/ids/ping", 200, " IdsOK\r\n")
    client(canned).ping()


# ---------------------------------------------------------------------------------------
# 7. sending a request body is bounded by the read timeout, not the connect timeout

CONNECT_TIMEOUT = 0.3
READ_TIMEOUT = 8.0
PAUSE = 1.2  # longer than the connect timeout, far shorter than the read timeout


class SlowReader:
    """An IDS stand-in that answers ``version`` at once and, for ``put``, reads the
    headers, pauses, then reads the body and answers with its id, CRC32 and size.

    Its receive buffer is small, so a large body fills the client's send buffer
    and the client blocks in ``send`` for the whole pause.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.tls = tls
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.listener.getsockname()[1]}/ids"
        self.received: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self._exchange(conn)
        except (OSError, ValueError):  # the client gave up (a test of that) or broke off
            conn.close()

    def _exchange(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True)
        with conn, conn.makefile("rb") as rfile:
            while True:
                request = rfile.readline()
                if not request:
                    return
                headers = {}
                while (line := rfile.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                if b" /ids/version" in request:
                    self._answer(conn, 200, b'{"version":"2.1.1"}')
                    continue
                time.sleep(PAUSE)
                body = self._body(rfile, headers)
                self.received.append(len(body))
                answer = json.dumps({"id": 7, "checksum": zlib.crc32(body),
                                     "size": len(body), "location": "x"})
                self._answer(conn, 201, answer.encode())

    @staticmethod
    def _body(rfile, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            return rfile.read(int(headers["content-length"]))
        parts = []
        while size := int(rfile.readline().strip(), 16):
            parts.append(rfile.read(size))
            rfile.readline()
        rfile.readline()
        return b"".join(parts)

    @staticmethod
    def _answer(conn: socket.socket, status: int, body: bytes) -> None:
        conn.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def slow_reader() -> Iterator[SlowReader]:
    server = SlowReader()
    yield server
    server.close()


BIG = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than the socket buffers hold


@pytest.mark.parametrize("kind", ["bytes", "file", "file-crc"])
def test_a_slowly_read_upload_is_bounded_by_the_read_timeout(slow_reader, tmp_path,
                                                             kind) -> None:
    ids = IDSClient(slow_reader.url, SID, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
    source = tmp_path / "big"
    source.write_bytes(BIG)
    started = time.monotonic()
    if kind == "bytes":
        assert ids.put(BIG, "big", 1, 1) == 7
    else:
        with open(source, "rb") as f:
            crc = zlib.crc32(BIG) if kind == "file-crc" else None
            assert ids.put(f, "big", 1, 1, crc32=crc) == 7
    assert time.monotonic() - started >= PAUSE
    assert slow_reader.received == [len(BIG)]
    # the same pooled connection again: urllib3 resets the socket to the connect timeout
    assert ids.put(BIG, "big", 1, 1) == 7
    assert slow_reader.received == [len(BIG)] * 2


def test_a_slowly_read_upload_over_tls(tls_files) -> None:
    cert, key = tls_files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = SlowReader(ctx)
    try:
        client_ctx = ssl.create_default_context(cafile=str(cert))
        ids = IDSClient(server.url, SID, client_ctx, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        assert ids.put(BIG, "big", 1, 1) == 7
        assert server.received == [len(BIG)]
    finally:
        server.close()


def test_an_upload_nobody_reads_still_times_out(slow_reader) -> None:
    # the read timeout bounds sending: a server that stops reading fails the put
    ids = IDSClient(slow_reader.url, SID, timeout=(CONNECT_TIMEOUT, PAUSE / 3))
    started = time.monotonic()
    with pytest.raises(TransportTimeoutError):
        ids.put(BIG, "big", 1, 1)
    assert time.monotonic() - started < PAUSE * 3

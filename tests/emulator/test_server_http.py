"""The emulator's HTTP/1.1 server (idsfs.emulator.http) on 127.0.0.1.

Covers behaviours.md A6 (framing and CORS on every response) at the server
level, plus keep-alive, chunked request bodies, Expect: 100-continue, HEAD,
OPTIONS, bad requests, client disconnects and concurrency.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from idsfs.emulator.http import (
    CORS_HEADERS,
    FileResponse,
    HTTPError,
    HTTPServer,
    Request,
    Response,
    Router,
    StreamResponse,
    empty_response,
    json_response,
    redact,
    text_response,
)


class Recorder:
    """Collects on_close calls of responses."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.event = threading.Event()

    def cb(self, name: str):
        def close() -> None:
            self.closed.append(name)
            self.event.set()

        return close


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    return path


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def server(big_file: Path, rec: Recorder) -> Iterator[HTTPServer]:
    router = Router()
    router.prefix("/api")

    def echo(req: Request) -> Response:
        data = req.body.read()
        return json_response(
            {
                "len": len(data),
                "head": data[:20].decode("latin-1"),
                "query": req.query,
                "te": req.headers.get("transfer-encoding"),
                "path": req.path,
            }
        )

    def form(req: Request) -> Response:
        return json_response(req.form())

    def multipart(req: Request) -> Response:
        parts = req.multipart()
        return json_response([[p.name, p.filename, len(p.data)] for p in parts])

    def stream(req: Request) -> Response:
        n = int(req.arg("n") or 10)
        size = int(req.arg("size") or 1000)

        def gen() -> Iterator[bytes]:
            for i in range(n):
                yield bytes([65 + i % 26]) * size

        return StreamResponse(200, gen(), on_close=rec.cb("stream"))

    def stream_fail_early(req: Request) -> Response:
        def gen() -> Iterator[bytes]:
            raise HTTPError(404, {"code": "NotFoundException", "message": "gone"})
            yield b""  # pragma: no cover

        return StreamResponse(200, gen(), on_close=rec.cb("early"))

    def stream_fail_late(req: Request) -> Response:
        def gen() -> Iterator[bytes]:
            yield b"x" * 100000
            raise OSError("disk on fire")

        return StreamResponse(200, gen(), on_close=rec.cb("late"))

    def file(req: Request) -> Response:
        off = int(req.arg("offset") or 0)
        length = req.arg("length")
        return FileResponse(
            206 if off else 200,
            big_file,
            off,
            int(length) if length is not None else None,
            on_close=rec.cb("file"),
        )

    def boom(req: Request) -> Response:
        raise ZeroDivisionError("oops")

    def teapot(req: Request) -> Response:
        raise HTTPError(418, {"code": "Teapot", "message": "short and stout"}, [("X-A", "b")])

    def nobody(req: Request) -> Response:
        return Response(200, b"", "text/plain", [("Content-Length", "99"), ("X-Ok", "1")])

    router.add("GET", "/api/ping", lambda r: text_response("pong"), "api/ping")
    router.add("PUT", "/api/echo", echo, "api/echo")
    router.add("POST", "/api/echo", echo, "api/echo")
    router.add("POST", "/api/form", form, "api/form")
    router.add("POST", "/api/multipart", multipart, "api/multipart")
    router.add("GET", "/api/stream", stream, "api/stream")
    router.add("GET", "/api/early", stream_fail_early, "api/early")
    router.add("GET", "/api/late", stream_fail_late, "api/late")
    router.add("GET", "/api/file", file, "api/file")
    router.add("GET", "/api/boom", boom, "api/boom")
    router.add("GET", "/api/teapot", teapot, "api/teapot")
    router.add("GET", "/api/nobody", nobody, "api/nobody")
    router.add("DELETE", "/api/void", lambda r: empty_response(), "api/void")
    router.add("GET", "/api/item/{name}", lambda r: json_response(r.path_params), "api/item")
    router.add("GET", "/api/tree/{rest:path}", lambda r: json_response(r.path_params), "api/tree")
    srv = HTTPServer(router, keepalive_timeout=10)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# ------------------------------------------------------------------ raw socket helpers


def raw_connect(server: HTTPServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, raw_head: str):
        self.status = status
        self.headers = headers
        self.body = body
        self.raw_head = raw_head


def read_response(f, head_only: bool = False) -> RawResponse:
    """Read one response from a socket file, honouring its framing."""
    status_line = f.readline().decode("latin-1")
    assert status_line.startswith("HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    lines = [status_line]
    while True:
        line = f.readline().decode("latin-1")
        lines.append(line)
        if line in ("\r\n", ""):
            break
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = b""
    if head_only or status in (204, 304) or 100 <= status < 200:
        return RawResponse(status, headers, body, "".join(lines))
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                assert f.readline() == b"\r\n"
                break
            body += f.read(size)
            assert f.read(2) == b"\r\n"
    elif "content-length" in headers:
        body = f.read(int(headers["content-length"]))
    else:
        body = f.read()
    return RawResponse(status, headers, body, "".join(lines))


def check_framing(resp: RawResponse) -> None:
    """A6: exactly one of Content-Length / chunked (none for 204), CORS always."""
    has_cl = "content-length" in resp.headers
    has_te = resp.headers.get("transfer-encoding") == "chunked"
    if resp.status in (204, 304):
        assert not has_cl and not has_te
    else:
        assert has_cl != has_te, resp.raw_head
    for name, value in CORS_HEADERS:
        assert resp.headers[name.lower()] == value


# ------------------------------------------------------------------ framing and CORS (A6)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/ping", 200),
        ("GET", "/api/stream", 200),
        ("GET", "/api/file", 200),
        ("GET", "/api/file?offset=5", 206),
        ("DELETE", "/api/void", 204),
        ("GET", "/api/boom", 500),
        ("GET", "/api/teapot", 418),
        ("GET", "/api/early", 404),
        ("GET", "/api/unknown", 501),
        ("GET", "/elsewhere", 501),
        ("POST", "/api/ping", 405),
        ("OPTIONS", "/api/ping", 200),
        ("HEAD", "/api/ping", 200),
        ("HEAD", "/api/stream", 200),
    ],
)
def test_a6_framing_and_cors_on_every_response(server, method, path, status):
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        resp = read_response(f, head_only=method == "HEAD")
        assert resp.status == status
        check_framing(resp)
        if method == "HEAD":
            # nothing follows the head: the next request on the connection works
            sock.sendall(b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n")
            nxt = read_response(f)
            assert nxt.body == b"pong"


def test_exact_bytes_of_text_and_json_bodies(server):
    r = requests.get(f"{server.base_url}/api/ping")
    assert r.content == b"pong"
    assert r.headers["Content-Type"] == "text/plain"
    assert r.headers["Content-Length"] == "4"
    r = requests.get(f"{server.base_url}/api/teapot")
    assert r.status_code == 418
    assert r.json() == {"code": "Teapot", "message": "short and stout"}
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["X-A"] == "b"


def test_handler_cannot_override_framing_headers(server):
    r = requests.get(f"{server.base_url}/api/nobody")
    assert r.headers["Content-Length"] == "0"
    assert r.headers["X-Ok"] == "1"


def test_stream_is_chunked_and_complete(server, rec):
    r = requests.get(f"{server.base_url}/api/stream?n=30&size=70000")
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in r.headers
    assert len(r.content) == 30 * 70000
    assert r.content[:70000] == b"A" * 70000
    assert rec.event.wait(5) and rec.closed == ["stream"]


def test_small_chunks_are_coalesced_but_complete(server):
    r = requests.get(f"{server.base_url}/api/stream?n=5000&size=3")
    assert len(r.content) == 15000


def test_file_response_offset_and_length(server, big_file, rec):
    data = big_file.read_bytes()
    r = requests.get(f"{server.base_url}/api/file")
    assert r.status_code == 200 and r.content == data
    assert r.headers["Content-Length"] == str(len(data))
    r = requests.get(f"{server.base_url}/api/file?offset=1000&length=5000")
    assert r.status_code == 206 and r.content == data[1000:6000]
    r = requests.get(f"{server.base_url}/api/file?offset={len(data) + 10}")
    assert r.status_code == 206 and r.content == b""
    assert r.headers["Content-Length"] == "0"
    deadline = time.monotonic() + 5
    while rec.closed.count("file") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # on_close runs just after the last byte went out
    assert rec.closed.count("file") == 3


def test_file_shorter_than_announced_length_closes_connection(server, big_file):
    size = big_file.stat().st_size
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(f"GET /api/file?length={size + 100} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status = f.readline()
        assert b"200" in status
        while f.readline() not in (b"\r\n", b""):
            pass
        body = f.read()  # until the server closes
        assert len(body) == size


def test_stream_error_before_first_chunk_is_an_error_response(server, rec):
    r = requests.get(f"{server.base_url}/api/early")
    assert r.status_code == 404
    assert r.json() == {"code": "NotFoundException", "message": "gone"}
    assert rec.event.wait(5) and rec.closed == ["early"]


def test_stream_error_after_first_chunk_truncates(server, rec, caplog):
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /api/late HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises((AssertionError, ValueError)):
            read_response(f)  # no terminating chunk: the connection just ends
    assert rec.event.wait(5) and rec.closed == ["late"]


def test_uncaught_exception_uses_prefix_renderer(server):
    r = requests.get(f"{server.base_url}/api/boom")
    assert r.status_code == 500
    assert r.json()["code"] == "INTERNAL"
    assert "ZeroDivisionError" in r.json()["message"]


# ------------------------------------------------------------------ routing


def test_unknown_path_and_wrong_method(server):
    r = requests.get(f"{server.base_url}/api/nope")
    assert r.status_code == 501 and r.json()["code"] == "NOT_IMPLEMENTED"
    r = requests.put(f"{server.base_url}/api/ping")
    assert r.status_code == 405
    assert r.headers["Allow"] == "GET, HEAD, OPTIONS"
    assert set(r.json()) == {"code", "message"}


def test_path_parameters_are_decoded(server):
    r = requests.get(f"{server.base_url}/api/item/a%20b%C3%A9")
    assert r.json() == {"name": "a bé"}
    r = requests.get(f"{server.base_url}/api/tree/x/y/z")
    assert r.json() == {"rest": "x/y/z"}
    assert requests.get(f"{server.base_url}/api/item/a/b").status_code == 501


def test_router_rejects_duplicate_routes():
    router = Router()
    router.add("GET", "/a", lambda r: empty_response(), "a")
    with pytest.raises(ValueError):
        router.add("GET", "/a", lambda r: empty_response(), "a")


def test_options_and_head(server):
    r = requests.options(f"{server.base_url}/api/echo")
    assert r.status_code == 200
    assert r.headers["Allow"] == "POST, PUT, OPTIONS"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = requests.options(f"{server.base_url}/api/none")
    assert r.status_code == 501
    r = requests.head(f"{server.base_url}/api/file")
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["Content-Length"]) > 3 * 1024 * 1024


# ------------------------------------------------------------------ request parsing


def test_query_keeps_blank_values(server):
    r = requests.put(f"{server.base_url}/api/echo?datafileIds=&a=1&a=2&sp=x+y%2Bz", data=b"")
    assert r.json()["query"] == {"datafileIds": [""], "a": ["1", "2"], "sp": ["x y+z"]}


def test_content_length_body(server):
    data = os.urandom(300000)
    r = requests.put(f"{server.base_url}/api/echo", data=data)
    assert r.json()["len"] == 300000
    assert r.json()["te"] is None


def test_chunked_body_from_requests_generator(server):
    def gen():
        for _ in range(50):
            yield b"0123456789" * 1000

    r = requests.put(f"{server.base_url}/api/echo", data=gen())
    assert r.json()["len"] == 500000
    assert r.json()["te"] == "chunked"


def test_chunked_body_with_extensions_and_trailers_then_keepalive(server):
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(
            b"PUT /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
            b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        first = read_response(f)
        assert first.status == 200
        assert b'"len":15' in first.body and b"hello0123456789" in first.body
        second = read_response(f)
        assert second.body == b"pong"


def test_malformed_chunked_body_is_400_and_closes(server):
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(
            b"PUT /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nhello\r\n0\r\n\r\n"
        )
        resp = read_response(f)
        assert resp.status == 400
        check_framing(resp)
        assert f.read() == b""  # closed


def test_unread_body_is_drained_for_keepalive(server):
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        body = b"x" * 100000
        sock.sendall(b"GET /api/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + body)
        assert read_response(f).body == b"pong"
        sock.sendall(b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(f).body == b"pong"


def test_expect_100_continue(server):
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(
            b"PUT /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert f.readline() == b"\r\n"
        sock.sendall(b"abcd")
        resp = read_response(f)
        assert resp.status == 200 and b'"len":4' in resp.body


def test_expect_100_not_read_closes_instead_of_waiting(server):
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(
            b"GET /api/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        resp = read_response(f)
        assert resp.status == 200 and resp.body == b"pong"
        assert resp.headers.get("connection") == "close"


def test_urlencoded_form(server):
    r = requests.post(f"{server.base_url}/api/form", data={"a": "1 2", "b": "", "c": "é"})
    assert r.json() == {"a": ["1 2"], "b": [""], "c": ["é"]}


def test_multipart_parts_in_order(server):
    files = [
        ("sessionId", (None, "abc")),
        ("name", (None, "n")),
        ("file", ("data.bin", os.urandom(2 * 1024 * 1024), "application/octet-stream")),
    ]
    r = requests.post(f"{server.base_url}/api/multipart", files=files)
    assert r.json() == [["sessionId", None, 3], ["name", None, 1], ["file", "data.bin", 2097152]]


def test_multipart_refuses_other_bodies(server):
    r = requests.post(f"{server.base_url}/api/multipart", data=b"plain")
    assert r.status_code == 500  # ValueError reaches the prefix renderer


@pytest.mark.parametrize(
    "raw",
    [
        b"NONSENSE\r\n\r\n",
        b"GET /api/ping HTTP/2.0\r\n\r\n",
        b"GET /api/ping HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET /api/ping HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET /api/ping HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /api/ping HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET noslash HTTP/1.1\r\n\r\n",
        b"GET http://[::1/api/ping HTTP/1.1\r\n\r\n",  # absolute target, malformed host
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    ],
)
def test_bad_requests_get_400_and_close(server, raw):
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(raw)
        resp = read_response(f)
        assert resp.status == 400
        check_framing(resp)
        assert resp.headers.get("connection") == "close"
    # the server still serves
    assert requests.get(f"{server.base_url}/api/ping").text == "pong"


# ------------------------------------------------------------------ connections


def test_keepalive_many_requests_one_connection(server):
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        for _ in range(20):
            sock.sendall(b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = read_response(f)
            assert resp.body == b"pong"
            assert "connection" not in resp.headers


def test_pipelined_requests(server):
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n" * 5)
        for _ in range(5):
            assert read_response(f).body == b"pong"


def test_connection_close_and_http10(server):
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        resp = read_response(f)
        assert resp.headers["connection"] == "close"
        assert f.read() == b""
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /api/stream?n=2&size=10 HTTP/1.0\r\n\r\n")
        resp = read_response(f)
        assert "transfer-encoding" not in resp.headers  # HTTP/1.0 gets a close-delimited body
        assert resp.body == b"A" * 10 + b"B" * 10
    with raw_connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /api/ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = read_response(f)
        assert resp.headers["connection"] == "keep-alive"
        sock.sendall(b"GET /api/ping HTTP/1.0\r\n\r\n")
        assert read_response(f).body == b"pong"


def test_client_disconnect_mid_stream(server, rec, caplog):
    caplog.set_level(logging.DEBUG, logger="idsfs.emulator.http")
    with raw_connect(server) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /api/stream?n=2000&size=100000 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(1000)
    assert rec.event.wait(10), "on_close not called after the client went away"
    assert rec.closed == ["stream"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert requests.get(f"{server.base_url}/api/ping").text == "pong"


def test_client_disconnect_mid_file(server, rec, caplog):
    with raw_connect(server) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /api/file HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(1000)
    assert rec.event.wait(10)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_client_disconnect_mid_upload(server, caplog):
    with raw_connect(server) as sock:
        sock.sendall(b"PUT /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nabc")
    deadline = time.monotonic() + 10
    while server._conns:  # the connection's thread is done (and has logged) when it leaves
        assert time.monotonic() < deadline, "the server never finished the connection"
        time.sleep(0.01)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert requests.get(f"{server.base_url}/api/ping").text == "pong"


def test_concurrent_clients(server, big_file):
    data = big_file.read_bytes()
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with requests.Session() as s:
                for _ in range(10):
                    assert s.get(f"{server.base_url}/api/ping").text == "pong"
                    r = s.put(f"{server.base_url}/api/echo", data=b"y" * (i * 1000))
                    assert r.json()["len"] == i * 1000
                r = s.get(f"{server.base_url}/api/file")
                assert r.content == data
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_a_stalled_reader_does_not_block_others(server):
    with raw_connect(server) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /api/stream?n=1000&size=100000 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(100)
        start = time.monotonic()
        for _ in range(5):
            assert requests.get(f"{server.base_url}/api/ping").text == "pong"
        assert time.monotonic() - start < 5


def test_stop_closes_idle_keepalive_connections(big_file):
    router = Router()
    router.add("GET", "/x", lambda r: text_response("x"), "x")
    srv = HTTPServer(router)
    srv.start()
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    f = sock.makefile("rb")
    assert read_response(f).body == b"x"
    start = time.monotonic()
    srv.stop()
    assert time.monotonic() - start < 3
    assert f.read() == b""
    sock.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()


def test_debug_log_redacts_session_ids(server, caplog):
    caplog.set_level(logging.DEBUG, logger="idsfs.emulator.http")
    sid = "0d9a3706-80d4-4d29-9ff3-4d65d4308a24"
    requests.get(f"{server.base_url}/api/item/{sid}?sessionId=secret-value&x=1")
    deadline = time.monotonic() + 5
    text = ""
    while "/api/item/" not in text and time.monotonic() < deadline:
        time.sleep(0.01)  # the request line is logged just after the response went out
        text = "\n".join(r.getMessage() for r in caplog.records)
    assert "/api/item/" in text
    assert sid not in text and "secret-value" not in text


def test_redact():
    assert redact("/x?sessionId=abc&preparedId=def&a=1") == "/x?sessionId=***&preparedId=***&a=1"
    assert redact("session/0d9a3706-80d4-4d29-9ff3-4d65d4308a24") == "session/***"
    # a session id that is not UUID-shaped (a client may send anything) is hidden too
    assert redact("GET /icat/session/NotAUuidSecret42 -> 403") == "GET /icat/session/*** -> 403"
    assert redact("/icat/session/s3cret?x=1") == "/icat/session/***?x=1"

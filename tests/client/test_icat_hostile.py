"""ICATClient against answers no ICAT sends: each is one ICATResponseError, never a bare
Python error (OverflowError, RecursionError)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from idsfs.errors import ICATError, ICATResponseError
from idsfs.icat import ICATClient


class _Canned(http.server.BaseHTTPRequestHandler):
    body = b""
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def canned() -> Iterator[tuple[str, type[_Canned]]]:
    handler = type("Handler", (_Canned,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,  # nested deeper than the JSON parser's recursion
    json.dumps([{"Datafile": {"id": 1, "name": "x", "fileSize": 1e300}}]).replace(
        "1e+300", "1e400").encode(),  # a number no integer can hold (infinity)
])
def test_unusable_answers_are_icat_response_errors(canned, body: bytes) -> None:
    url, handler = canned
    handler.body = body
    icat = ICATClient(url, sessionId="s1", retries=0)
    try:
        with pytest.raises(ICATResponseError):
            icat.search("SELECT df FROM Datafile df")
    finally:
        icat.close()


def test_an_error_answer_nested_too_deeply_is_an_icat_error(canned) -> None:
    url, handler = canned
    handler.status, handler.body = 500, b"[" * 100_000
    icat = ICATClient(url, sessionId="s1", retries=0)
    try:
        with pytest.raises(ICATError) as exc:
            icat.search("SELECT df FROM Datafile df")
        assert exc.value.status == 500
    finally:
        icat.close()

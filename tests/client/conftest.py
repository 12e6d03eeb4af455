"""Fixtures of the client tests.

``canned`` is a tiny local HTTP server that answers each path with a canned
(status, headers, body) and records the requests it saw. It is used only
where the emulator cannot produce the answer: malformed responses, an old
server version, a proxy, TLS with a private CA. Everything else talks to
the emulator (``emulator`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import http.server
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class CannedServer:
    url: str
    routes: dict[str, Answer | list[Answer] | Callable[[Seen], Answer]] = field(
        default_factory=dict
    )
    seen: list[Seen] = field(default_factory=list)

    def answer(self, path: str, status: int = 200, body: bytes | str = b"",
               headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.routes[path] = (status, dict(headers or {}), data)

    def hits(self, path: str) -> int:
        return sum(1 for s in self.seen if s.path.split("?")[0].endswith(path))


def _handler(server: CannedServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    body += self.rfile.read(size)
                    self.rfile.readline()
            else:
                body = self.rfile.read(length) if length else b""
            seen = Seen(self.command, self.path, dict(self.headers.items()), body)
            server.seen.append(seen)
            path = self.path.split("?")[0]
            if path.startswith("http://"):  # proxy request in absolute form
                path = "/" + path.split("/", 3)[3]
            route = server.routes.get(path)
            if route is None:
                status, headers, data = (501, {"Content-Type": "application/json"},
                                         b'{"code":"NOT_IMPLEMENTED","message":"no such path"}')
            elif callable(route):
                status, headers, data = route(seen)
            elif isinstance(route, list):
                status, headers, data = route.pop(0) if len(route) > 1 else route[0]
                headers = dict(headers)
            else:
                status, headers, data = route
                headers = dict(headers)
            self.send_response(status)
            if headers.pop("X-Close", None):  # drop the connection after the body
                self.close_connection = True
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _any

    return Handler


def _serve(tls: ssl.SSLContext | None = None) -> Iterator[CannedServer]:
    server = CannedServer(url="")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    httpd.daemon_threads = True
    scheme = "http"
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    server.url = f"{scheme}://127.0.0.1:{httpd.server_address[1]}"
    server.answer("/ids/version", body='{"version":"2.1.1"}',
                  headers={"Content-Type": "application/json"})
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def canned() -> Iterator[CannedServer]:
    """A canned-answer HTTP server on 127.0.0.1 (``/ids/version`` answers 2.1.1)."""
    yield from _serve()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (needs openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
def canned_tls(tls_files: tuple[Path, Path]) -> Iterator[CannedServer]:
    """The canned server over HTTPS with the self-signed ``tls_files`` certificate."""
    cert, key = tls_files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    yield from _serve(ctx)


@pytest.fixture
def dead_port() -> int:
    """A local port with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------
# A populated emulator, built through the clients' own HTTP calls


CONTENT = {n: f"df{n} content of the client test world".encode().ljust(52, b".")
           for n in range(1, 5)}


@dataclass
class World:
    """An emulator with F / I / ds1{df1,df2} ds2{df3,df4} ds3{} and logged-in clients."""

    emu: Any
    icat: Any  # ICATClient logged in as root
    ids: Any  # IDSClient with root's session
    root: str
    alice: str
    forbidden: str
    fac: int
    inv: int
    fmt: int
    ds1: int
    ds2: int
    ds3: int
    df: dict[int, int]  # n -> datafile id
    names: dict[int, str]

    def content(self, n: int) -> bytes:
        return CONTENT[n]

    def ids_client(self, session: str | None = None, **kw: Any) -> Any:
        from idsfs.ids import IDSClient

        kw.setdefault("backoff", 0.01)
        return IDSClient(self.emu.ids_url, session, **kw)

    def wait_idle(self, timeout: float = 20.0, *, locks: bool = False) -> None:
        """Poll until the IDS queue is empty (and, with ``locks``, no dataset is locked)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            status = self.ids.getServiceStatus()
            if not status["opsQueue"] and not (locks and status["locks"]):
                return
            assert time.monotonic() < deadline, f"IDS did not become idle: {status}"
            time.sleep(0.02)


def build_world(emu: Any, archived: bool = False) -> World:
    from idsfs.icat import ICATClient
    from idsfs.ids import DataSelection, IDSClient
    from idsfs.model import (
        DatafileFormat,
        Dataset,
        DatasetType,
        Facility,
        Investigation,
        InvestigationType,
        InvestigationUser,
        User,
    )

    icat = ICATClient(emu.icat_url, backoff=0.01)
    root = icat.login("simple", {"username": "root", "password": "root-secret"})
    fac = Facility(id=icat.create(Facility(name="F")))
    it = InvestigationType(id=icat.create(InvestigationType(name="exp", facility=fac)))
    dt = DatasetType(id=icat.create(DatasetType(name="raw", facility=fac)))
    fmt = icat.create(DatafileFormat(name="test_format", version="42.0.0", facility=fac))
    inv = Investigation(id=icat.create(Investigation(
        name="I", visitId="N/A", title="the investigation", facility=fac, type=it)))
    alice_user = User(id=icat.create(User(name="simple/alice")))
    icat.create(InvestigationUser(user=alice_user, investigation=inv, role="member"))
    ds_ids = icat.create([Dataset(name=f"ds{i}", investigation=inv, type=dt, complete=False)
                          for i in (1, 2, 3)])
    ids = IDSClient(emu.ids_url, root, backoff=0.01)
    names = {1: "a/df1", 2: "df2", 3: "df3", 4: "df4 Person's file"}
    owner = {1: ds_ids[0], 2: ds_ids[0], 3: ds_ids[1], 4: ds_ids[1]}
    df = {n: ids.put(CONTENT[n], names[n], owner[n], fmt) for n in (1, 2, 3, 4)}
    world = World(
        emu=emu, icat=icat, ids=ids, root=root, alice=emu.login("alice"),
        forbidden=emu.login("forbidden"), fac=fac.id or 0, inv=inv.id or 0, fmt=fmt,
        ds1=ds_ids[0], ds2=ds_ids[1], ds3=ds_ids[2], df=df, names=names,
    )
    if archived and ids.isTwoLevel():
        world.wait_idle()
        ids.archive(DataSelection({"datasetIds": [ds_ids[0], ds_ids[1]]}))
        world.wait_idle()
    return world


@pytest.fixture
def world(emulator: Any) -> World:
    """Single-level emulator with the client test world."""
    return build_world(emulator)


@pytest.fixture
def world_factory(emulator_factory: Callable[..., Any]) -> Callable[..., World]:
    """Build worlds on emulators with other settings (``storage="dataset"`` ...)."""

    def make(archived: bool = False, **settings: Any) -> World:
        return build_world(emulator_factory(**settings), archived=archived)

    return make

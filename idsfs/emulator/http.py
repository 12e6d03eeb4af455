"""The emulator's HTTP/1.1 server: requests, responses, routing, framing.

This module is the guide for writing an API module (``icat_api.py``,
``ids_api.py``, ``admin.py``). It knows nothing about ICAT or IDS; it gives
each handler a parsed :class:`Request` and sends back the :class:`Response`
the handler returns, enforcing the wire rules of ids-protocol.md §1 itself:

* every response carries the CORS headers (:data:`CORS_HEADERS`);
* every response with a body carries exactly one of ``Content-Length`` and
  ``Transfer-Encoding: chunked`` (204/304 carry neither); handlers never set
  ``Content-Length``, ``Transfer-Encoding`` or ``Connection`` themselves (such
  headers are dropped);
* HTTP/1.1 keep-alive, chunked *request* bodies, ``Expect: 100-continue``,
  ``HEAD`` (a GET route answered without body), ``OPTIONS`` (CORS preflight,
  200 with ``Allow``), malformed requests (400, connection closed), client
  disconnects (logged at debug level, never a traceback).

Registering routes
------------------
::

    from idsfs.emulator.http import HTTPError, Request, Response, Router, json_response

    def register(router: Router, ...) -> None:
        router.add("GET", "/ids/ping", lambda req: text_response("IdsOK"), "ids/ping")
        router.add("GET", "/icat/session/{sessionId}", session_info, "icat/session")

* ``path`` is matched against the URL-decoded request path. ``{name}`` matches
  one non-empty path segment (no ``/``), ``{name:path}`` the (possibly empty)
  rest of the path; the values are in ``request.path_params``.
* ``endpoint_name`` (e.g. ``ids/getData``) names the route for fault injection
  and the request counters; it is also in ``request.endpoint``.
* A ``GET`` route also answers ``HEAD``. A path that exists with another
  method is answered by the prefix's error renderer with status 405 and an
  ``Allow`` header (the spec leaves 405 vs 500 open).
* :meth:`Router.prefix` sets, per URL prefix (``/ids``, ``/icat``, ``/admin``),
  the renderer of unknown paths (501 ``NOT_IMPLEMENTED`` for ICAT and IDS) and
  of uncaught exceptions (IDS: 500 ``InternalException``, ICAT: 500
  ``INTERNAL``). ``app.py`` installs those for ``/ids`` and ``/icat``; an API
  module may call ``router.prefix`` again to replace them.

The Request
-----------
``method``, ``path`` (decoded, no query), ``query`` (``dict[str, list[str]]``,
blank values kept: ``datafileIds=`` gives ``[""]``), ``arg(name)`` (first
value or None), ``has(name)``, ``headers`` (case-insensitive:
``request.headers.get("range")``), ``body`` (a binary file-like that reads
exactly the request body, ``Content-Length`` or chunked; reads return ``b""``
at its end), ``form()`` (the urlencoded body, same shape as ``query``;
``farg(name)`` gives its first value), ``multipart()`` (list of :class:`Part`
in body order), ``client_address``, ``path_params``, ``endpoint`` and
``context`` (a dict for the API's own use).

Read the request body inside the handler (not in a streaming iterator): when
the handler returns, whatever is left of the body is read and discarded so
that the connection can be reused.

Responses
---------
* ``Response(status, body=b"", content_type=None, headers=None)`` — bytes.
* :func:`json_response` (``application/json``), :func:`text_response`
  (``text/plain``, no trailing newline), :func:`empty_response` (204).
* ``StreamResponse(status, chunks, content_type=..., headers=..., on_close=...,
  content_length=None)`` — ``chunks`` is an iterable of bytes, sent chunked
  (or with ``Content-Length`` when ``content_length`` is given). The first
  chunk is fetched *before* the status line is sent, so an iterator that raises
  :class:`HTTPError` (or anything) before yielding still produces a proper
  error response. A failure after that truncates the body and closes the
  connection (the client sees an incomplete body, never a false success).
* ``FileResponse(status, path, offset=0, length=None, ...)`` — a file (or an
  open binary file object) sent with ``Content-Length`` through
  ``socket.sendfile`` (zero copy; this is the fast path for getData). If the
  file turns out shorter than ``length`` the connection is closed early.
* ``on_close`` (all response kinds) is called exactly once, after the last byte
  was sent or the sending failed (client gone, fault injection, HEAD, an error
  response replacing the stream, server stopping). Use it to release locks.

Errors
------
Raise ``HTTPError(status, {"code": ..., "message": ...})`` anywhere in a
handler (or in a streaming iterator before its first chunk) to answer with that
JSON body. API modules with their own exception classes convert them to
:class:`HTTPError` (or return a Response) themselves, e.g. with a decorator
around their handlers; any other exception reaches the prefix's error renderer
(logged with its traceback at ERROR level).

Hooks (fault injection and counters)
------------------------------------
:class:`HTTPServer` takes an optional :class:`ServerHooks` (``faults.py``
implements it): ``before(request)`` runs after routing and before the handler
(may sleep, may return a Response that replaces the handler's),
``body_plan(request, response)`` may return a :class:`BodyPlan` (drop the connection or
stall after N body bytes), ``responding(request, status)`` runs just before
the status line goes out, ``sending(request, n)`` before every ``n`` body
bytes are handed to the socket (so a client that has read a response always
finds it counted), ``after(request, status, bytes_sent)`` runs when the
exchange is over.
"""

from __future__ import annotations

import contextlib
import email.utils
import io
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import IO, Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger("idsfs.emulator.http")

#: headers sent on every response (ids-protocol.md §1, CORS)
CORS_HEADERS: tuple[tuple[str, str], ...] = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, POST, DELETE, PUT"),
    ("Access-Control-Allow-Headers", "Content-Type"),
)

SERVER_NAME = "idsfs-emulator"

#: limits of the request head
MAX_REQUEST_LINE = 65536
MAX_HEADER_LINE = 65536
MAX_HEADERS = 200
#: a urlencoded body larger than this is refused (400)
MAX_FORM_BYTES = 64 * 1024 * 1024
#: chunks smaller than this are coalesced before they are written
_COALESCE = 64 * 1024
#: headers a handler may not set (the server owns the framing)
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})
#: statuses that never carry a body
_NO_BODY_STATUSES = frozenset({204, 304})
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_SECRET_PARAMS_RE = re.compile(r"((?:^|[?&\s])(?:sessionId|preparedId)=)[^&\s]*", re.IGNORECASE)
#: ICAT's ``session/{sessionId}`` path: whatever the id looks like, it is a secret.
_SESSION_PATH_RE = re.compile(r"(/session/)[^/?#\s]+")


class HTTPError(Exception):
    """Raised by a handler to answer with ``status`` and the JSON ``payload``."""

    def __init__(
        self,
        status: int,
        payload: Mapping[str, Any],
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Remember the status, JSON payload and extra headers of the answer."""
        super().__init__(f"{status} {payload.get('code', '')}: {payload.get('message', '')}")
        self.status = status
        self.payload = dict(payload)
        self.headers = list(headers)


class BadRequestSyntax(Exception):
    """The request is not valid HTTP (answered 400, connection closed).

    Raised by :class:`Request` and the request-body readers (a malformed or short body);
    handlers may let it escape, which answers 400.
    """


class ClientGone(Exception):
    """The peer closed the connection or the connection was aborted on purpose.

    Raised inside the server when a request body could not be read; it ends the connection.
    """


# --------------------------------------------------------------------------- headers


class Headers:
    """Case-insensitive, order-keeping view of request headers.

    ``get(name)`` returns the values of repeated headers joined with ``", "``;
    ``get_all(name)`` returns the list. Constructing one never raises.
    """

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        """Build from ``(name, value)`` pairs."""
        self._items: list[tuple[str, str]] = []
        self._index: dict[str, list[str]] = {}
        for name, value in items:
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        """Append one header. Never raises."""
        self._items.append((name, value))
        self._index.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: str | None = None) -> str | None:
        """Return the (joined) value of ``name`` or ``default``. Never raises."""
        values = self._index.get(name.lower())
        return ", ".join(values) if values else default

    def get_all(self, name: str) -> list[str]:
        """Return every value of ``name`` (possibly empty). Never raises."""
        return list(self._index.get(name.lower(), ()))

    def __contains__(self, name: object) -> bool:
        """True when a header of that name was sent."""
        return isinstance(name, str) and name.lower() in self._index

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """Iterate over ``(name, value)`` pairs in the order received."""
        return iter(self._items)

    def __len__(self) -> int:
        """Number of header lines."""
        return len(self._items)

    def __repr__(self) -> str:
        """Show the header names only (values may hold secrets)."""
        return f"Headers({[n for n, _ in self._items]!r})"


# --------------------------------------------------------------------------- request bodies


class _Body(io.RawIOBase):
    """Base of the request-body readers: counts bytes, sends 100-continue lazily."""

    def __init__(self, rfile: BinaryIO, on_first_read: Callable[[], None] | None) -> None:
        super().__init__()
        self._rfile = rfile
        self._on_first_read = on_first_read
        self.bytes_read = 0
        self.done = False
        self.failed = False

    def readable(self) -> bool:
        """Request bodies are readable."""
        return True

    def _start(self) -> None:
        if self._on_first_read is not None:
            callback, self._on_first_read = self._on_first_read, None
            callback()

    @property
    def started(self) -> bool:
        """True once the handler (or the drain) began reading."""
        return self._on_first_read is None

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` with body bytes; 0 at the end of the body."""
        if self.done:
            return 0
        self._start()
        view = memoryview(buffer).cast("B")
        try:
            n = self._readinto(view)
        except OSError:
            self.failed = True
            raise
        self.bytes_read += n
        return n

    def _readinto(self, view: memoryview) -> int:
        raise NotImplementedError

    def read(self, size: int | None = -1) -> bytes:
        """Return up to ``size`` body bytes (what is available, at least 1); b"" at the end.

        Reads without first allocating ``size`` bytes, so large reads stay cheap.
        """
        if size is None or size < 0:
            return self.readall()
        if self.done or size == 0:
            return b""
        self._start()
        try:
            data = self._read1(size)
        except OSError:
            self.failed = True
            raise
        self.bytes_read += len(data)
        return data

    def _read1(self, size: int) -> bytes:
        raise NotImplementedError

    def read_exact(self, view: memoryview) -> None:
        """Fill ``view`` completely from the connection (BadRequestSyntax at EOF)."""
        pos = 0
        while pos < len(view):
            n = self._rfile.readinto(view[pos:])  # type: ignore[attr-defined]
            if not n:
                raise BadRequestSyntax("request body ended early")
            pos += n

    def drain(self, limit: int | None = None) -> bool:
        """Read and discard the rest of the body; False if more than ``limit`` remained."""
        buf = bytearray(256 * 1024)
        total = 0
        while not self.done:
            n = self.readinto(buf)
            total += n
            if limit is not None and total > limit:
                return False
        return True


class _LengthBody(_Body):
    """A body delimited by ``Content-Length``."""

    def __init__(
        self, rfile: BinaryIO, length: int, on_first_read: Callable[[], None] | None
    ) -> None:
        super().__init__(rfile, on_first_read)
        self.length = length
        self._left = length
        self.done = length == 0

    def _readinto(self, view: memoryview) -> int:
        want = min(len(view), self._left)
        if want == 0:
            return 0
        n = self._rfile.readinto(view[:want])  # type: ignore[attr-defined]
        if not n:
            raise BadRequestSyntax("request body shorter than Content-Length")
        self._consumed(n)
        return n

    def _read1(self, size: int) -> bytes:
        data = self._rfile.read1(min(size, self._left))  # type: ignore[attr-defined]
        if not data:
            raise BadRequestSyntax("request body shorter than Content-Length")
        self._consumed(len(data))
        return bytes(data)

    def _consumed(self, n: int) -> None:
        self._left -= n
        if self._left == 0:
            self.done = True


class _ChunkedBody(_Body):
    """A body sent with ``Transfer-Encoding: chunked`` (trailers are discarded)."""

    def __init__(self, rfile: BinaryIO, on_first_read: Callable[[], None] | None) -> None:
        super().__init__(rfile, on_first_read)
        self._left = 0  # bytes left in the current chunk

    def _next_chunk(self) -> None:
        line = self._rfile.readline(MAX_HEADER_LINE + 1)
        if not line.endswith(b"\n"):
            raise BadRequestSyntax("bad chunk header")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadRequestSyntax("bad chunk size") from None
        if size < 0 or not size_text or size_text.startswith((b"-", b"+", b"0x", b"0X")):
            raise BadRequestSyntax("bad chunk size")
        if size == 0:
            for _ in range(MAX_HEADERS + 1):  # trailer section
                trailer = self._rfile.readline(MAX_HEADER_LINE + 1)
                if not trailer.endswith(b"\n"):
                    raise BadRequestSyntax("bad chunked trailer")
                if trailer in (b"\r\n", b"\n"):
                    self.done = True
                    return
            raise BadRequestSyntax("too many trailer lines")
        self._left = size

    def _readinto(self, view: memoryview) -> int:
        if self._left == 0:
            self._next_chunk()
            if self.done:
                return 0
        want = min(len(view), self._left)
        n = self._rfile.readinto(view[:want])  # type: ignore[attr-defined]
        if not n:
            raise BadRequestSyntax("chunked body ended early")
        self._consumed(n)
        return n

    def _read1(self, size: int) -> bytes:
        if self._left == 0:
            self._next_chunk()
            if self.done:
                return b""
        data = self._rfile.read1(min(size, self._left))  # type: ignore[attr-defined]
        if not data:
            raise BadRequestSyntax("chunked body ended early")
        self._consumed(len(data))
        return bytes(data)

    def _consumed(self, n: int) -> None:
        self._left -= n
        if self._left == 0:
            crlf = self._rfile.readline(3)
            if crlf not in (b"\r\n", b"\n"):
                raise BadRequestSyntax("chunk not followed by CRLF")


@dataclass
class Part:
    """One part of a ``multipart/form-data`` body.

    ``file`` holds the part's bytes (spooled to disk above 1 MiB), positioned
    at 0; ``filename`` is None for plain form fields. Constructing one never raises.
    """

    name: str
    filename: str | None
    headers: Headers
    file: IO[bytes]

    @property
    def content_type(self) -> str | None:
        """The part's ``Content-Type`` header. Never raises."""
        return self.headers.get("content-type")

    @property
    def data(self) -> bytes:
        """All bytes of the part. Raises ``OSError`` if the spooled part cannot be read back."""
        self.file.seek(0)
        data = self.file.read()
        self.file.seek(0)
        return data

    @property
    def text(self) -> str:
        """The part decoded as UTF-8 (invalid bytes replaced).

        Raises ``OSError`` if the spooled part cannot be read back.
        """
        return self.data.decode("utf-8", "replace")


# --------------------------------------------------------------------------- request


class Request:
    """One parsed HTTP request, as handlers see it (see the module docstring).

    Constructing one raises :class:`BadRequestSyntax` for a target that is neither absolute
    (``http://...``) nor ``*`` nor a path, or an absolute one whose host part is malformed
    (``urlsplit``'s "Invalid IPv6 URL"): the server answers both with 400.
    """

    def __init__(
        self,
        method: str,
        target: str,
        http_version: str,
        headers: Headers,
        body: _Body,
        client_address: tuple[str, int],
    ) -> None:
        """Parse ``target`` into path and query; raises BadRequestSyntax."""
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers
        self.body: _Body = body
        self.client_address = client_address
        if target.startswith(("http://", "https://")):
            try:
                parts = urlsplit(target)
            except ValueError as exc:  # e.g. "Invalid IPv6 URL"
                raise BadRequestSyntax(f"bad request target: {exc}") from exc
            raw_path, raw_query = parts.path or "/", parts.query
        elif target == "*" or target.startswith("/"):
            raw_path, _, raw_query = target.partition("?")
        else:
            raise BadRequestSyntax("bad request target")
        raw_path = raw_path.partition("#")[0]
        self.raw_path = raw_path
        self.raw_query = raw_query
        self.path = unquote(raw_path, errors="replace")
        self.query: dict[str, list[str]] = parse_qs(
            raw_query, keep_blank_values=True, errors="replace"
        )
        self.path_params: dict[str, str] = {}
        self.endpoint = ""
        self.context: dict[str, Any] = {}
        self._form: dict[str, list[str]] | None = None
        self._multipart: list[Part] | None = None

    def arg(self, name: str) -> str | None:
        """First value of query parameter ``name``, or None when absent. Never raises."""
        values = self.query.get(name)
        return values[0] if values else None

    def has(self, name: str) -> bool:
        """True when query parameter ``name`` is present (even with an empty value).

        Never raises.
        """
        return name in self.query

    @property
    def content_type(self) -> str:
        """The media type of the body, lower case, without parameters ("" if none). Never raises."""
        value = self.headers.get("content-type") or ""
        return value.split(";", 1)[0].strip().lower()

    def form(self) -> dict[str, list[str]]:
        """The urlencoded body as ``dict[str, list[str]]`` (parsed once, lazily).

        A body of another declared content type gives ``{}`` (JAX-RS form
        parameters are only read from ``application/x-www-form-urlencoded``).
        Raises :class:`HTTPError` 400 for a body above :data:`MAX_FORM_BYTES`.
        """
        if self._form is None:
            ctype = self.content_type
            if ctype not in ("", "application/x-www-form-urlencoded"):
                self._form = {}
            else:
                data = bytearray()
                while len(data) <= MAX_FORM_BYTES:
                    piece = self.body.read(MAX_FORM_BYTES + 1 - len(data))
                    if not piece:
                        break
                    data += piece
                if len(data) > MAX_FORM_BYTES:
                    raise HTTPError(400, {"code": "BAD_REQUEST", "message": "form too large"})
                text = data.decode("utf-8", "replace")
                self._form = parse_qs(text, keep_blank_values=True, errors="replace")
        return self._form

    def farg(self, name: str) -> str | None:
        """First value of form field ``name`` (urlencoded body), or None.

        Raises what :meth:`form` raises (:class:`HTTPError` 400 for a form that is too
        large) and, while reading the body, :class:`BadRequestSyntax` for a malformed body
        and ``OSError`` when the connection fails.
        """
        values = self.form().get(name)
        return values[0] if values else None

    def multipart(self) -> list[Part]:
        """The ``multipart/form-data`` body as parts in body order (parsed once).

        Raises :class:`ValueError` when the body is not multipart or is
        malformed (the caller maps it to its API's 400).
        """
        if self._multipart is None:
            self._multipart = _parse_multipart(self)
        return self._multipart

    def redacted_target(self) -> str:
        """The request target with session/prepared ids hidden (for logs). Never raises."""
        return redact(self.target)

    def __repr__(self) -> str:
        """Method and redacted target."""
        return f"<Request {self.method} {self.redacted_target()}>"


def redact(text: str) -> str:
    """Hide ``sessionId``/``preparedId`` values, the id of a ``/session/ID`` path
    and anything UUID-shaped in ``text``.

    Never raises.
    """
    text = _SECRET_PARAMS_RE.sub(r"\1***", text)
    text = _SESSION_PATH_RE.sub(r"\1***", text)
    return _UUID_RE.sub("***", text)


def _parse_multipart(request: Request) -> list[Part]:
    from werkzeug.http import parse_options_header
    from werkzeug.sansio.multipart import NEED_DATA, Data, Epilogue, Field, File, MultipartDecoder

    ctype, options = parse_options_header(request.headers.get("content-type") or "")
    boundary = options.get("boundary")
    if ctype.lower() != "multipart/form-data" or not boundary:
        raise ValueError("the body is not multipart/form-data")
    decoder = MultipartDecoder(boundary.encode("latin-1"))
    parts: list[Part] = []
    current: Part | None = None
    finished = False
    eof = False
    while not finished:
        event = decoder.next_event()
        if event is NEED_DATA:
            if eof:
                raise ValueError("multipart body ended early")
            data = request.body.read(256 * 1024)
            if not data:
                eof = True
                decoder.receive_data(None)
            else:
                decoder.receive_data(data)
        elif isinstance(event, File | Field):
            filename = event.filename if isinstance(event, File) else None
            # closed with the request's parts (garbage collected)
            spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=1024 * 1024)  # noqa: SIM115
            current = Part(event.name, filename, Headers(event.headers.items()), spool)
            parts.append(current)
        elif isinstance(event, Data):
            if current is None:
                raise ValueError("multipart data outside a part")
            current.file.write(event.data)
            if not event.more_data:
                current.file.seek(0)
                current = None
        elif isinstance(event, Epilogue):
            finished = True
    return parts


# --------------------------------------------------------------------------- responses


class Response:
    """A response with a bytes body (sent with ``Content-Length``).

    Constructing one never raises.
    """

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """Keep the parts; ``on_close`` runs once when the response is done."""
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers: list[tuple[str, str]] = list(headers)
        self.on_close = on_close
        self._closed = False

    def close(self) -> None:
        """Run ``on_close`` (once); errors in it are logged, never raised."""
        if self._closed:
            return
        self._closed = True
        if self.on_close is not None:
            try:
                self.on_close()
            except Exception:
                logger.exception("on_close callback failed")

    def header(self, name: str) -> str | None:
        """The first extra header ``name`` set by the handler, or None. Never raises."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


class StreamResponse(Response):
    """A response whose body comes from an iterable of bytes (sent chunked).

    Constructing one never raises.
    """

    def __init__(
        self,
        status: int,
        chunks: Iterable[bytes],
        content_type: str | None = "application/octet-stream",
        headers: Iterable[tuple[str, str]] = (),
        on_close: Callable[[], None] | None = None,
        content_length: int | None = None,
    ) -> None:
        """``content_length`` given: sent with Content-Length instead of chunked."""
        super().__init__(status, b"", content_type, headers, on_close)
        self.chunks = chunks
        self.content_length = content_length
        self._source: Iterable[bytes] | None = None  # the original iterable after prefetch

    def close(self) -> None:
        """Close the iterator(s) (if they have ``close``), then run ``on_close``.

        Errors of the iterators' ``close`` and of ``on_close`` are logged, never raised.
        """
        if not self._closed:
            for source in (self.chunks, self._source):
                closer = getattr(source, "close", None)
                if callable(closer):
                    try:
                        closer()
                    except Exception:
                        logger.exception("closing a response stream failed")
        super().close()


class FileResponse(Response):
    """A response sending ``length`` bytes of a file from ``offset`` (sendfile).

    Constructing one never raises (the file is opened when the response is sent).
    """

    def __init__(
        self,
        status: int,
        file: str | os.PathLike[str] | BinaryIO,
        offset: int = 0,
        length: int | None = None,
        content_type: str | None = "application/octet-stream",
        headers: Iterable[tuple[str, str]] = (),
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """``file`` is a path or an open binary file (closed by the server).

        ``length`` None means "to the end of the file" (the size is taken when
        the response is sent).
        """
        super().__init__(status, b"", content_type, headers, on_close)
        self.file = file
        self.offset = offset
        self.length = length


def json_response(
    payload: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()
) -> Response:
    """A compact JSON response (``application/json``).

    Raises ``TypeError`` for a payload that is not JSON-serialisable and ``ValueError`` for
    a circular one.
    """
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Response(status, body, "application/json", headers)


def text_response(text: str, status: int = 200, content_type: str = "text/plain") -> Response:
    """A ``text/plain`` response; ``text`` is sent as UTF-8 without a trailing newline.

    Raises ``UnicodeEncodeError`` for a text holding lone surrogates.
    """
    return Response(status, text.encode("utf-8"), content_type)


def empty_response(status: int = 204) -> Response:
    """An empty response (204 No Content by default). Never raises."""
    return Response(status)


def error_response(status: int, code: str, message: str, **extra: Any) -> Response:
    """A JSON error response ``{"code": code, "message": message, **extra}``.

    Raises ``TypeError`` for an ``extra`` value that is not JSON-serialisable.
    """
    return json_response({"code": code, "message": message, **extra}, status)


# --------------------------------------------------------------------------- routing

Handler = Callable[[Request], Response]
#: renders a request for an unknown path
UnknownRenderer = Callable[[Request], Response]
#: renders an uncaught exception raised while handling a request
ErrorRenderer = Callable[[Request, BaseException], Response]


@dataclass
class _Route:
    method: str
    pattern: str
    regex: re.Pattern[str]
    handler: Handler
    endpoint: str


@dataclass
class _Prefix:
    prefix: str
    unknown: UnknownRenderer
    error: ErrorRenderer


def _default_unknown(request: Request) -> Response:
    return error_response(
        501, "NOT_IMPLEMENTED", f"{request.method} {request.path} is not implemented"
    )


def _default_error(request: Request, exc: BaseException) -> Response:
    return error_response(500, "INTERNAL", f"{type(exc).__name__} {exc}")


_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")


def _compile(pattern: str) -> re.Pattern[str]:
    if not pattern.startswith("/"):
        raise ValueError(f"route path must start with '/': {pattern!r}")
    out = []
    pos = 0
    for m in _PARAM_RE.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>.*)" if m.group(2) else f"(?P<{m.group(1)}>[^/]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out))


class Router:
    """Maps (method, path) to a handler and an endpoint name; thread-safe to read.

    Routes are normally all added before the server starts; adding later is
    allowed (guarded by a lock). Constructing one never raises.
    """

    def __init__(self) -> None:
        """An empty router whose fallback renderers answer 501 / 500 with generic JSON."""
        self._exact: dict[str, list[_Route]] = {}
        self._patterns: list[_Route] = []
        self._prefixes: list[_Prefix] = []
        self._lock = threading.Lock()

    def add(self, method: str, path: str, handler: Handler, endpoint_name: str) -> None:
        """Register ``handler`` for ``method`` (``GET``, ``POST``, ...) on ``path``.

        Raises ValueError when the same method and path are registered twice.
        """
        method = method.upper()
        route = _Route(method, path, _compile(path), handler, endpoint_name)
        with self._lock:
            existing = self._exact.get(path, []) + [r for r in self._patterns if r.pattern == path]
            if any(r.method == method for r in existing):
                raise ValueError(f"route {method} {path} registered twice")
            if _PARAM_RE.search(path):
                self._patterns.append(route)
            else:
                self._exact.setdefault(path, []).append(route)

    def prefix(
        self,
        prefix: str,
        unknown: UnknownRenderer | None = None,
        error: ErrorRenderer | None = None,
    ) -> None:
        """Set the renderers of unknown paths and uncaught errors below ``prefix``.

        ``prefix`` is a path such as ``/ids``; it covers ``/ids`` and ``/ids/...``.
        The longest matching prefix wins. Omitted renderers keep the defaults. Never raises.
        """
        prefix = "/" + prefix.strip("/")
        with self._lock:
            self._prefixes = [p for p in self._prefixes if p.prefix != prefix]
            self._prefixes.append(
                _Prefix(prefix, unknown or _default_unknown, error or _default_error)
            )
            self._prefixes.sort(key=lambda p: len(p.prefix), reverse=True)

    def _prefix_of(self, path: str) -> _Prefix:
        for p in self._prefixes:
            if path == p.prefix or path.startswith(p.prefix + "/"):
                return p
        return _Prefix("", _default_unknown, _default_error)

    def prefix_name(self, path: str) -> str:
        """The registered prefix covering ``path`` without slashes (``ids``), or "".

        Never raises.
        """
        return self._prefix_of(path).prefix.strip("/")

    def resolve(self, request: Request) -> Handler | None:
        """Set ``request.endpoint``/``path_params``; return the handler or None. Never raises."""
        with self._lock:
            candidates: list[tuple[_Route, dict[str, str]]] = [
                (r, {}) for r in self._exact.get(request.path, ())
            ]
            if not candidates:
                for r in self._patterns:
                    m = r.regex.fullmatch(request.path)
                    if m:
                        candidates.append((r, m.groupdict()))
        prefix = self._prefix_of(request.path).prefix.strip("/")
        methods = {r.method for r, _ in candidates}
        if "GET" in methods:
            methods.add("HEAD")
        request.context["allowed_methods"] = sorted(methods)
        for r, params in candidates:
            if r.method == request.method or (request.method == "HEAD" and r.method == "GET"):
                request.endpoint = r.endpoint
                request.path_params = params
                return r.handler
        if candidates:
            request.endpoint = candidates[0][0].endpoint
        else:
            request.endpoint = f"{prefix}/(unknown)" if prefix else "(unknown)"
        return None

    def render_unknown(self, request: Request) -> Response:
        """The prefix's answer for a path that matches no route.

        Raises what the prefix's renderer raises (the emulator's never do).
        """
        return self._prefix_of(request.path).unknown(request)

    def render_error(self, request: Request, exc: BaseException) -> Response:
        """The prefix's answer for an uncaught exception.

        Raises what the prefix's renderer raises (the emulator's never do).
        """
        return self._prefix_of(request.path).error(request, exc)

    def endpoints(self) -> list[str]:
        """All endpoint names registered (sorted, unique). Never raises."""
        with self._lock:
            names = {r.endpoint for rs in self._exact.values() for r in rs}
            names.update(r.endpoint for r in self._patterns)
        return sorted(names)


# --------------------------------------------------------------------------- hooks


@dataclass
class BodyPlan:
    """What to do to a response body (fault injection).

    ``drop_after``: send at most this many body bytes, then close the
    connection. ``stall_after``: after this many body bytes call ``stall()``
    (which blocks for as long as the stall lasts) once, then go on. Constructing one never raises.
    """

    drop_after: int | None = None
    stall_after: int | None = None
    stall: Callable[[], None] | None = None


class ServerHooks:
    """Interception points of :class:`HTTPServer` (the defaults do nothing).

    Constructing one never raises; the server logs what :meth:`after` raises and answers 500
    for what :meth:`before` raises.
    """

    def before(self, request: Request) -> Response | None:
        """Called after routing, before the handler; a Response replaces the handler's.

        Never raises here.
        """
        return None

    def body_plan(self, request: Request, response: Response) -> BodyPlan | None:
        """A plan to cut or stall the body of ``response``, or None. Never raises here."""
        return None

    def responding(self, request: Request, status: int) -> None:
        """Called just before the status line of the response is sent. Never raises here."""

    def sending(self, request: Request, n: int) -> None:
        """Called before ``n`` more body bytes are handed to the socket. Never raises here."""

    def after(self, request: Request, status: int, bytes_sent: int) -> None:
        """Called once when the exchange is over (also after failures). Never raises here."""


# --------------------------------------------------------------------------- the server


class _Abort(Exception):
    """Close the connection now (fault injection or a broken response)."""


@dataclass
class _Exchange:
    """Per-request sending state."""

    sock: socket.socket
    plan: BodyPlan | None
    progress: Callable[[int], None] | None = None
    sent: int = 0
    stalled: bool = False
    status: int = 0

    def count(self, n: int) -> None:
        """Account ``n`` body bytes about to be handed to the socket (may be negative)."""
        self.sent += n
        if self.progress is not None and n:
            self.progress(n)

    def allow(self, n: int) -> int:
        """How many of the next ``n`` body bytes may go out now (stalls inline)."""
        plan = self.plan
        if plan is None:
            return n
        limit = n
        if plan.stall_after is not None and not self.stalled:
            room = plan.stall_after - self.sent
            if room <= 0:
                self.stalled = True
                if plan.stall is not None:
                    plan.stall()
            else:
                limit = min(limit, room)
        if plan.drop_after is not None:
            room = plan.drop_after - self.sent
            if room <= 0:
                raise _Abort("connection dropped (fault injection)")
            limit = min(limit, room)
        return limit


def _sendv(sock: socket.socket, buffers: list[bytes | memoryview]) -> None:
    """Send all ``buffers`` with as few system calls as possible."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views[:512])
        while sent:
            first = views[0]
            if sent >= len(first):
                sent -= len(first)
                views.pop(0)
            else:
                views[0] = first[sent:]
                sent = 0


class HTTPServer:
    """A threaded HTTP/1.1 keep-alive server dispatching to a :class:`Router`.

    ``start()`` binds and serves in background threads (one per connection);
    ``stop()`` closes the listener and every connection. Constructing one never raises.
    """

    def __init__(
        self,
        router: Router,
        host: str = "127.0.0.1",
        port: int = 0,
        hooks: ServerHooks | None = None,
        keepalive_timeout: float = 120.0,
    ) -> None:
        """Configure; nothing is bound until :meth:`start`."""
        self.router = router
        self.host = host
        self.requested_port = port
        self.hooks = hooks or ServerHooks()
        self.keepalive_timeout = keepalive_timeout
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self.port = 0

    # ---------------------------------------------------------------- lifecycle

    def bind(self) -> None:
        """Bind and listen (port 0 = a free port, stored in :attr:`port`); OSError if not.

        Connections are queued but not served until :meth:`start`.

        Raises ``OSError`` (``socket.gaierror`` for an unknown host) when it cannot bind.
        """
        if self._listener is not None:
            return
        infos = socket.getaddrinfo(
            self.host, self.requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, socktype, proto, _, addr = infos[0]
        sock = socket.socket(family, socktype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self.port = sock.getsockname()[1]

    def start(self) -> None:
        """Bind (unless :meth:`bind` was called) and serve in background threads.

        Raises ``OSError`` when it cannot bind (see :meth:`bind`).
        """
        self.bind()
        if self._accept_thread is not None:
            return
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"emulator-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the listening socket (IPv6 hosts bracketed). Never raises."""
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, wait up to ``timeout`` for handlers.

        Never raises.
        """
        self._stopping.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._conns_lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for _, thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, addr = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)  # e.g. EMFILE: back off instead of spinning
                continue
            thread = threading.Thread(
                target=self._serve_connection,
                args=(conn, addr),
                daemon=True,
                name=f"emulator-conn-{addr[1] if len(addr) > 1 else ''}",
            )
            with self._conns_lock:
                self._conns[conn] = thread
            thread.start()

    # ---------------------------------------------------------------- connections

    def _serve_connection(self, sock: socket.socket, addr: Any) -> None:
        client = (str(addr[0]), int(addr[1])) if isinstance(addr, tuple) else ("", 0)
        rfile = None
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rfile = sock.makefile("rb", buffering=256 * 1024)
            while not self._stopping.is_set():
                sock.settimeout(self.keepalive_timeout)
                try:
                    keep = self._one_request(sock, rfile, client)
                except (TimeoutError, ClientGone, ConnectionError):
                    break
                except OSError as exc:
                    logger.debug("connection from %s failed: %s", client, exc)
                    break
                if not keep:
                    break
        except Exception:
            logger.exception("unexpected error on a connection from %s", client)
        finally:
            if rfile is not None:
                with contextlib.suppress(OSError):
                    rfile.close()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            sock.close()
            with self._conns_lock:
                self._conns.pop(sock, None)

    def _read_head(self, rfile: BinaryIO) -> tuple[str, str, str, Headers] | None:
        line = rfile.readline(MAX_REQUEST_LINE + 1)
        skipped = 0
        while line in (b"\r\n", b"\n"):  # tolerate empty lines before a request
            skipped += 1
            if skipped > 8:
                raise BadRequestSyntax("empty request")
            line = rfile.readline(MAX_REQUEST_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_REQUEST_LINE or not line.endswith(b"\n"):
            raise BadRequestSyntax("request line too long")
        try:
            text = line.decode("latin-1").rstrip("\r\n")
            method, target, version = text.split(" ")
        except ValueError:
            raise BadRequestSyntax("malformed request line") from None
        if not re.fullmatch(r"HTTP/1\.[0-9]", version):
            raise BadRequestSyntax(f"unsupported protocol version {version!r}")
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", method) or not target:
            raise BadRequestSyntax("malformed request line")
        headers = Headers()
        for _ in range(MAX_HEADERS + 1):
            hline = rfile.readline(MAX_HEADER_LINE + 1)
            if not hline.endswith(b"\n"):
                raise BadRequestSyntax("header line too long or connection closed")
            if hline in (b"\r\n", b"\n"):
                return method, target, version, headers
            if hline[:1] in (b" ", b"\t"):
                raise BadRequestSyntax("obsolete header line folding")
            name, sep, value = hline.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip() or " " in name:
                raise BadRequestSyntax("malformed header line")
            headers.add(name, value.strip())
        raise BadRequestSyntax("too many header lines")

    def _one_request(self, sock: socket.socket, rfile: BinaryIO, client: tuple[str, int]) -> bool:
        """Serve one request; return True to keep the connection open."""
        try:
            head = self._read_head(rfile)
        except BadRequestSyntax as exc:
            self._send_bad_request(sock, str(exc))
            return False
        if head is None:
            return False
        method, target, version, headers = head
        started = time.monotonic()

        # keep-alive decision from the request side
        conn_tokens = {t.strip().lower() for t in (headers.get("connection") or "").split(",")}
        http10 = version == "HTTP/1.0"
        keep = "keep-alive" in conn_tokens if http10 else "close" not in conn_tokens

        # the body reader
        expect_100 = (headers.get("expect") or "").lower() == "100-continue" and not http10
        continue_sent = False

        def send_continue() -> None:
            nonlocal continue_sent
            if expect_100 and not continue_sent:
                continue_sent = True
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        try:
            te = (headers.get("transfer-encoding") or "").lower()
            if te:
                codings = [c.strip() for c in te.split(",") if c.strip()]
                if codings != ["chunked"]:
                    raise BadRequestSyntax(f"unsupported Transfer-Encoding {te!r}")
                body: _Body = _ChunkedBody(rfile, send_continue)
                keep = keep and "content-length" not in headers
            else:
                lengths = {v.strip() for v in headers.get_all("content-length")}
                if len(lengths) > 1:
                    raise BadRequestSyntax("conflicting Content-Length headers")
                length_text = lengths.pop() if lengths else "0"
                if not length_text.isdigit():
                    raise BadRequestSyntax("bad Content-Length")
                body = _LengthBody(rfile, int(length_text), send_continue)
            request = Request(method, target, version, headers, body, client)
        except BadRequestSyntax as exc:
            self._send_bad_request(sock, str(exc))
            return False

        handler = self.router.resolve(request)
        exchange = _Exchange(sock, None, lambda n: self.hooks.sending(request, n))
        response: Response | None = None
        try:
            response = self._run_handler(request, handler)
            # finish reading the request body so the connection can be reused
            sock.settimeout(self.keepalive_timeout)
            if not body.done:
                if expect_100 and not body.started:
                    keep = False  # the client waits for 100-continue: do not read
                else:
                    try:
                        body.drain()
                    except BadRequestSyntax:
                        keep = False
            sock.settimeout(None)
            if method != "HEAD" and response.status not in _NO_BODY_STATUSES:
                exchange.plan = self.hooks.body_plan(request, response)
            keep = self._send(request, response, exchange, keep)
        except _Abort as exc:
            logger.debug("%s %s: %s", method, request.redacted_target(), exc)
            keep = False
        except (ClientGone, ConnectionError, TimeoutError) as exc:
            logger.debug("%s %s: client gone (%s)", method, request.redacted_target(), exc)
            keep = False
        except OSError as exc:
            logger.debug("%s %s: connection error (%s)", method, request.redacted_target(), exc)
            keep = False
        finally:
            if response is not None:
                response.close()
            try:
                self.hooks.after(request, exchange.status, exchange.sent)
            except Exception:
                logger.exception("request hook failed")
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "%s %s %s -> %s %d bytes %.3fs",
                    client[0],
                    method,
                    request.redacted_target(),
                    exchange.status or "-",
                    exchange.sent,
                    time.monotonic() - started,
                )
        return keep and not self._stopping.is_set()

    def _run_handler(self, request: Request, handler: Handler | None) -> Response:
        """Run hooks and the handler; never raises (errors become responses)."""
        try:
            if request.method == "OPTIONS":
                allowed = request.context.get("allowed_methods")
                if allowed or request.path == "*":
                    methods = allowed or ["DELETE", "GET", "HEAD", "POST", "PUT"]
                    return Response(200, b"", None, [("Allow", ", ".join([*methods, "OPTIONS"]))])
                return self.router.render_unknown(request)
            hooked = self.hooks.before(request)
            if hooked is not None:
                return hooked
            if handler is None:
                allowed = request.context.get("allowed_methods")
                if allowed:
                    resp = self.router.render_error(
                        request, RuntimeError(f"HTTP method {request.method} is not allowed")
                    )
                    resp.status = 405
                    resp.headers.append(("Allow", ", ".join([*allowed, "OPTIONS"])))
                    return resp
                return self.router.render_unknown(request)
            response = handler(request)
            if not isinstance(response, Response):
                raise TypeError(f"handler returned {type(response).__name__}, not a Response")
            if isinstance(response, StreamResponse):
                return self._prefetch(request, response)
            return response
        except HTTPError as exc:
            return json_response(exc.payload, exc.status, exc.headers)
        except BadRequestSyntax as exc:
            return error_response(400, "BadRequest", str(exc))
        except Exception as exc:
            if request.body.failed:
                raise ClientGone("connection failed while reading the request body") from exc
            return self._render_exception(request, exc)

    def _render_exception(self, request: Request, exc: Exception) -> Response:
        logger.error(
            "%s %s failed: %s: %s",
            request.method,
            request.redacted_target(),
            type(exc).__name__,
            redact(str(exc)),
            exc_info=exc,
        )
        try:
            return self.router.render_error(request, exc)
        except Exception:
            logger.exception("error renderer failed")
            return error_response(500, "INTERNAL", "internal error")

    def _prefetch(self, request: Request, response: StreamResponse) -> Response:
        """Fetch the first chunk so that early failures become error responses."""
        iterator = iter(response.chunks)
        try:
            first = next(iterator)
        except StopIteration:
            first = None
        except HTTPError as exc:
            response.close()
            return json_response(exc.payload, exc.status, exc.headers)
        except Exception as exc:  # noqa: BLE001 - logged by _render_exception
            response.close()
            return self._render_exception(request, exc)

        def chained() -> Iterator[bytes]:
            if first is not None:
                yield first
            yield from iterator

        response._source = iterator
        response.chunks = chained()
        return response

    # ---------------------------------------------------------------- sending

    def _send_bad_request(self, sock: socket.socket, message: str) -> None:
        logger.debug("bad request: %s", message)
        body = json.dumps({"code": "BadRequest", "message": message}).encode()
        head = self._head(400, "application/json", [], [("Content-Length", str(len(body)))], False)
        with contextlib.suppress(OSError):
            sock.settimeout(5.0)
            sock.sendall(head + body)

    def _head(
        self,
        status: int,
        content_type: str | None,
        extra: list[tuple[str, str]],
        framing: list[tuple[str, str]],
        keep: bool,
        http10: bool = False,
    ) -> bytes:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines.append(f"Date: {email.utils.formatdate(usegmt=True)}")
        lines.append(f"Server: {SERVER_NAME}")
        lines.extend(f"{k}: {v}" for k, v in CORS_HEADERS)
        if content_type and status not in _NO_BODY_STATUSES:
            lines.append(f"Content-Type: {content_type}")
        for k, v in extra:
            if k.lower() in _FRAMING_HEADERS or "\n" in k or "\n" in v or "\r" in v:
                continue
            lines.append(f"{k}: {v}")
        lines.extend(f"{k}: {v}" for k, v in framing)
        if not keep:
            lines.append("Connection: close")
        elif http10:
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")

    def _send(self, request: Request, response: Response, ex: _Exchange, keep: bool) -> bool:
        """Send ``response``; return whether the connection stays usable."""
        status = response.status
        ex.status = status
        try:
            self.hooks.responding(request, status)
        except Exception:
            logger.exception("request hook failed")
        head_only = request.method == "HEAD"
        http10 = request.http_version == "HTTP/1.0"
        sock = ex.sock
        ctype = response.content_type
        if status in _NO_BODY_STATUSES or (100 <= status < 200):
            sock.sendall(self._head(status, None, response.headers, [], keep, http10))
            return keep

        if isinstance(response, FileResponse):
            return self._send_file(request, response, ex, keep, head_only, http10)

        if isinstance(response, StreamResponse):
            length = response.content_length
            if length is not None:
                framing = [("Content-Length", str(length))]
            elif http10:
                framing = []
                keep = False
            else:
                framing = [("Transfer-Encoding", "chunked")]
            sock.sendall(self._head(status, ctype, response.headers, framing, keep, http10))
            if head_only:
                return keep
            chunked = length is None and not http10
            remaining = length
            pending: list[bytes] = []
            pending_size = 0
            for chunk in _guard(response.chunks):
                if not chunk:
                    continue
                if remaining is not None:
                    if len(chunk) > remaining:
                        raise _Abort("stream longer than its Content-Length")
                    remaining -= len(chunk)
                if len(chunk) < _COALESCE:
                    pending.append(bytes(chunk))
                    pending_size += len(chunk)
                    if pending_size < _COALESCE:
                        continue
                    chunk = b"".join(pending)
                elif pending:
                    self._write_body(ex, b"".join(pending), chunked)
                pending.clear()
                pending_size = 0
                self._write_body(ex, chunk, chunked)
            if pending:
                self._write_body(ex, b"".join(pending), chunked)
            if remaining:
                raise _Abort("stream shorter than its Content-Length")
            if chunked:
                sock.sendall(b"0\r\n\r\n")
            return keep

        body = response.body
        head = self._head(
            status, ctype, response.headers, [("Content-Length", str(len(body)))], keep, http10
        )
        if head_only or not body:
            sock.sendall(head)
            return keep
        if ex.plan is None and len(body) <= _COALESCE:
            ex.count(len(body))
            sock.sendall(head + body)
            return keep
        sock.sendall(head)
        self._write_body(ex, body, False)
        return keep

    def _write_body(self, ex: _Exchange, data: bytes | memoryview, chunked: bool) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = ex.allow(len(view))
            piece = view[:n]
            ex.count(n)
            if chunked:
                _sendv(ex.sock, [f"{n:x}\r\n".encode(), piece, b"\r\n"])
            else:
                ex.sock.sendall(piece)
            view = view[n:]

    def _send_file(
        self,
        request: Request,
        response: FileResponse,
        ex: _Exchange,
        keep: bool,
        head_only: bool,
        http10: bool,
    ) -> bool:
        fobj = response.file
        own = not hasattr(fobj, "read")
        f: BinaryIO = open(fobj, "rb") if own else fobj  # type: ignore[arg-type, assignment]  # noqa: SIM115
        try:
            length = response.length
            if length is None:
                length = max(0, os.fstat(f.fileno()).st_size - response.offset)
            head = self._head(
                response.status,
                response.content_type,
                response.headers,
                [("Content-Length", str(length))],
                keep,
                http10,
            )
            ex.sock.sendall(head)
            if head_only:
                return keep
            offset = response.offset
            left = length
            while left > 0:
                n = ex.allow(left)
                ex.count(n)
                sent = ex.sock.sendfile(f, offset, n)
                if sent < n:
                    ex.count(sent - n)
                if sent <= 0:
                    raise _Abort("file shorter than the announced length")
                offset += sent
                left -= sent
            return keep
        finally:
            f.close()


def _guard(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Iterate ``chunks``; an exception after the headers were sent aborts the connection."""
    iterator = iter(chunks)
    while True:
        try:
            chunk = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            logger.error("response stream failed: %s: %s", type(exc).__name__, redact(str(exc)))
            raise _Abort("response stream failed") from exc
        yield chunk

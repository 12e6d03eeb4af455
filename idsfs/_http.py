"""HTTP plumbing shared by :mod:`idsfs.ids` and :mod:`idsfs.icat` (private).

One :class:`Transport` per client wraps one ``requests.Session`` (connection
pool), applies timeouts, TLS settings and proxies, retries idempotent calls,
translates every ``requests``/``urllib3``/socket exception into the
:class:`~idsfs.errors.TransportError` family and error answers into
:class:`~idsfs.errors.ServerError` subclasses, and logs each request with
secrets redacted.

Redirects are never followed: a 3xx answer raises the client's response
error (:class:`~idsfs.errors.IDSResponseError` or
:class:`~idsfs.errors.ICATResponseError`) naming the status and the
redacted ``Location``. Following one would send the login form (password),
the session id or an upload's bytes to wherever the answer points; the
configured URL alone decides where they go.

Retry rule (see docs/client.md): only calls marked idempotent by the client
are retried, at most ``retries`` times with exponential back-off, when the
connection failed (refused, reset, timed out before an answer) or the server
answered 502/503/504 in a way the caller's ``is_busy`` predicate accepts.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlencode, urljoin

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.util

from idsfs.errors import (
    ConnectError,
    ConnectionLostError,
    ICATError,
    ICATResponseError,
    IDSError,
    IDSResponseError,
    ServerError,
    TLSError,
    TransportError,
    TransportTimeoutError,
    redact,
)

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "Timeout",
    "Transport",
    "translate_exception",
]

Timeout = float | tuple[float, float]

#: (connect, read) seconds. The read timeout bounds every wait for data on the
#: socket, so a stalled server ends a call after at most that long.
DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 120.0)
#: Number of retries of an idempotent call (so up to 1 + 3 attempts).
DEFAULT_RETRIES = 3
#: First back-off delay in seconds; doubled per attempt, capped at MAX_BACKOFF.
DEFAULT_BACKOFF = 0.25
MAX_BACKOFF = 8.0
#: Connections kept per host: enough for the FUSE layer's worker threads.
POOL_MAXSIZE = 32
#: Error bodies longer than this are cut before parsing.
MAX_ERROR_BODY = 64 * 1024
#: A redirect's Location is cut to this length in the error message.
_MAX_LOCATION = 300

RETRY_STATUSES = frozenset({502, 503, 504})
#: Request parameters whose values are secrets: error messages that quote them
#: (IDS: "The preparedId <id> is not known") show ``***`` instead.
SECRET_PARAMS = ("sessionId", "preparedId")


class _RedactingFilter(logging.Filter):
    """Redact session ids from records of urllib3's own loggers (it logs URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = ()
        return True


for _name in ("urllib3.connectionpool", "urllib3.connection", "urllib3.poolmanager"):
    logging.getLogger(_name).addFilter(_RedactingFilter())


class _SendUnderReadTimeout:
    """Connection mixin: the request (a large put body) is sent under the read timeout.

    urllib3 leaves the socket at the *connect* timeout while it sends the
    request, so an IDS that pauses reading a large upload for longer than the
    connect timeout (10 s by default) failed the put, whatever read timeout
    was configured. Here the connection is opened under the connect timeout
    as before, and every send then runs under :attr:`send_timeout`, which the
    pool (:class:`_SendTimeoutPool`) sets to the request's read timeout.
    """

    #: Timeout of each send, in seconds (None: leave the socket's as urllib3 set it).
    send_timeout: float | None = None
    sock: socket.socket | None
    auto_open: int

    def _ready_to_send(self) -> None:
        """Connect if needed (under the connect timeout), then apply :attr:`send_timeout`."""
        if self.sock is None and self.auto_open:
            self.connect()  # type: ignore[attr-defined]
        sock, timeout = self.sock, self.send_timeout
        if sock is not None and timeout is not None and sock.gettimeout() != timeout:
            sock.settimeout(timeout)

    def send(self, data: Any) -> None:
        """Send ``data`` as ``http.client`` does, under :attr:`send_timeout`.

        Raises what ``http.client``'s ``send`` raises (``TimeoutError`` when
        the server reads nothing for that long).
        """
        self._ready_to_send()
        super().send(data)  # type: ignore[misc]


class _PlainConnection(_SendUnderReadTimeout, urllib3.connection.HTTPConnection):
    """A plain HTTP connection that sends body items offering ``sendfile_to(sock)``
    with ``sendfile``: a put of a regular file (``idsfs.ids._FileRegion``, with
    Content-Length), and the ``idsfs.ids.FileChunk`` items of a chunked put body
    (framed here; see :meth:`request`).

    Everything else is sent as by urllib3. Sending (``socket.sendfile`` too) is
    bounded by the read timeout (see :class:`_SendUnderReadTimeout`).
    """

    def send(self, data: Any) -> None:
        """Send ``data``: with ``sendfile`` when it offers ``sendfile_to``, else as
        :class:`_SendUnderReadTimeout` does. Raises ``OSError`` (e.g.
        ``TimeoutError``) when sending fails, ``ValueError`` from a file shorter
        than announced."""
        self._ready_to_send()
        sender = getattr(data, "sendfile_to", None)
        if sender is not None and type(self.sock) is socket.socket:
            sender(self.sock)
            return
        super().send(data)

    def request(self, method: str, url: str, body: Any = None, headers: Any = None,
                **kwargs: Any) -> None:
        """urllib3's ``request``; the items of a chunked body that offer
        ``sendfile_to`` (``idsfs.ids.FileChunk``) are framed and sent here, the
        others go to urllib3 as usual. Raises what urllib3's ``request`` raises
        and ``ValueError`` from a chunk whose file is shorter than the chunk."""
        if kwargs.get("chunked") and getattr(body, "chunks_may_sendfile", False):
            body = self._send_file_chunks(body)
        super().request(method, url, body=body, headers=headers, **kwargs)

    def _send_file_chunks(self, body: Iterable[Any]) -> Iterator[Any]:
        for chunk in body:
            sender = getattr(chunk, "sendfile_to", None)
            if sender is None or type(self.sock) is not socket.socket:
                yield chunk
                continue
            self.send(b"%x\r\n" % len(chunk))
            sender(self.sock)
            self.send(b"\r\n")


class _TLSConnection(_SendUnderReadTimeout, urllib3.connection.HTTPSConnection):
    """urllib3's HTTPS connection, sending under the read timeout."""


class _SendTimeoutPool(urllib3.connectionpool.HTTPConnectionPool):
    """Pool mixin: gives each request's connection its read timeout as ``send_timeout``."""

    def _make_request(self, conn: Any, *args: Any, **kwargs: Any) -> Any:
        timeout = self._get_timeout(kwargs.get("timeout", self.timeout))
        conn.send_timeout = urllib3.util.Timeout.resolve_default_timeout(timeout.read_timeout)
        return super()._make_request(conn, *args, **kwargs)


class _PlainPool(_SendTimeoutPool):
    """urllib3's HTTP pool with :class:`_PlainConnection` connections."""

    ConnectionCls = _PlainConnection


class _TLSPool(_SendTimeoutPool, urllib3.connectionpool.HTTPSConnectionPool):
    """urllib3's HTTPS pool with :class:`_TLSConnection` connections."""

    ConnectionCls = _TLSConnection


class _SSLContextAdapter(requests.adapters.HTTPAdapter):
    """An HTTPAdapter whose HTTPS connections use a given ``ssl.SSLContext``.

    ``requests`` has no SSLContext parameter; this passes the context to
    urllib3's pool manager and stops ``requests`` from overriding its
    verification settings with the certifi bundle.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None, **kwargs: Any) -> None:
        self._ssl_context = ssl_context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        if self._ssl_context is not None:
            kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            **self.poolmanager.pool_classes_by_scheme, "http": _PlainPool, "https": _TLSPool}

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        if self._ssl_context is not None:
            proxy_kwargs["ssl_context"] = self._ssl_context
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        if self._ssl_context is not None and host_params.get("scheme") == "https":
            for key in ("cert_reqs", "ca_certs", "ca_cert_dir"):
                pool_kwargs.pop(key, None)
            pool_kwargs["ssl_context"] = self._ssl_context
        return host_params, pool_kwargs

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        if self._ssl_context is None:
            super().cert_verify(conn, url, verify, cert)


def make_session(ssl_context: ssl.SSLContext | None = None) -> requests.Session:
    """Return a ``requests.Session`` with a connection pool sized for threads. Never raises."""
    session = requests.Session()
    adapter = _SSLContextAdapter(
        ssl_context, pool_connections=4, pool_maxsize=POOL_MAXSIZE, max_retries=0
    )
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _root_cause(exc: BaseException) -> BaseException:
    """Follow the wrapped reasons of requests/urllib3 exceptions."""
    seen = 0
    cur: BaseException = exc
    while seen < 10:
        seen += 1
        nxt: Any = None
        if isinstance(cur, urllib3.exceptions.MaxRetryError):
            nxt = cur.reason
        elif cur.args and isinstance(cur.args[0], BaseException):
            nxt = cur.args[0]
        elif len(cur.args) > 1 and isinstance(cur.args[1], BaseException):
            nxt = cur.args[1]
        if nxt is None:
            break
        cur = nxt
    return cur


def translate_exception(exc: BaseException, url: str | None) -> TransportError:
    """Return the :class:`TransportError` for a transport-level exception.

    ``url`` must already be redacted. Handles ``requests``, ``urllib3``,
    ``http.client``, ``ssl`` and socket exceptions. Never raises.
    """
    root = _root_cause(exc)
    where = f" ({url})" if url else ""
    detail = redact(str(root) or type(root).__name__)
    if isinstance(exc, requests.exceptions.SSLError) or isinstance(root, ssl.SSLError):
        return TLSError(f"TLS failure{where}: {detail}", url)
    # urllib3's NewConnectionError derives from ConnectTimeoutError: test it first.
    if isinstance(
        root,
        urllib3.exceptions.NewConnectionError
        | urllib3.exceptions.NameResolutionError
        | ConnectionRefusedError
        | socket.gaierror,
    ):
        return ConnectError(f"cannot connect{where}: {detail}", url)
    if isinstance(
        exc,
        requests.exceptions.Timeout
        | urllib3.exceptions.TimeoutError
        | socket.timeout
        | TimeoutError,
    ) or isinstance(root, urllib3.exceptions.TimeoutError | TimeoutError):
        return TransportTimeoutError(f"timed out{where}: {detail}", url)
    if isinstance(exc, requests.exceptions.ProxyError):
        return ConnectError(f"proxy failure{where}: {detail}", url)
    if isinstance(
        exc,
        requests.exceptions.ConnectionError
        | requests.exceptions.ChunkedEncodingError
        | urllib3.exceptions.ProtocolError
        | http.client.HTTPException
        | OSError,
    ):
        return ConnectionLostError(f"connection lost{where}: {detail}", url)
    return TransportError(f"HTTP request failed{where}: {detail}", url)


class Transport:
    """Send requests for one client; thread-safe.

    ``secrets`` is a callable returning the strings to redact (the current
    session id), evaluated per request so a swapped session id is covered;
    the values of :data:`SECRET_PARAMS` a request sends are redacted from
    its error too.
    ``error_factory(status, body, reason, secrets)`` builds the ServerError
    for an error answer; the class of what it builds (an IDS or an ICAT
    error) selects the response error raised for a redirect.

    Constructing one raises ``ValueError`` when ``retries`` is negative or
    ``timeout`` is not a positive number or a ``(connect, read)`` pair of
    them.
    """

    def __init__(
        self,
        *,
        logger: logging.Logger,
        error_factory: Callable[[int, bytes, str, Iterable[str | None]], ServerError],
        secrets: Callable[[], Iterable[str | None]],
        timeout: Timeout = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        verify: bool | str = True,
        ssl_context: ssl.SSLContext | None = None,
        proxies: Mapping[str, str] | None = None,
        session: requests.Session | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.log = logger
        self.error_factory = error_factory
        self.response_error = _response_error_class(error_factory)
        self.secrets = secrets
        self.timeout = _check_timeout(timeout)
        self.retries = retries
        self.backoff = backoff
        self.verify = verify
        self.proxies = dict(proxies) if proxies else None
        self._own_session = session is None
        self.session = session if session is not None else make_session(ssl_context)
        self._closed = threading.Event()

    def close(self) -> None:
        """Close the pooled connections (only of a session created here). Never raises."""
        self._closed.set()
        if self._own_session:
            self.session.close()

    def redact(self, text: str) -> str:
        """Redact the secrets of this transport from ``text``.

        Raises only what the ``secrets`` callable raises (the clients' never do).
        """
        return redact(text, self.secrets())

    def display_url(self, url: str, params: Mapping[str, Any] | None = None) -> str:
        """Return ``url`` with ``params`` appended, secrets redacted (for logs).

        Raises what the ``secrets`` callable raises (the clients' never do).
        """
        if params:
            url = f"{url}?{urlencode(params)}"
        return self.redact(url)

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        idempotent: bool = False,
        is_busy: Callable[[ServerError], bool] | None = None,
        timeout: Timeout | None = None,
    ) -> requests.Response:
        """Send one request and return the successful (status < 300) response.

        Retries when ``idempotent`` (see the module docstring). Raises the
        ServerError built by ``error_factory`` for an error status, the
        response error of the client (``IDSResponseError``/``ICATResponseError``,
        ``status`` set) for a redirect (3xx: never followed), and a
        TransportError subclass when no answer was obtained. With
        ``stream=True`` the body of a successful response is left unread.
        """
        shown = self.display_url(url, params)
        attempts = 1 + (self.retries if idempotent else 0)
        delay = self.backoff
        for attempt in range(1, attempts + 1):
            start = time.monotonic()
            try:
                response = self.session.request(
                    method,
                    url,
                    params=params,
                    data=data,
                    headers=headers,
                    stream=True,
                    timeout=timeout if timeout is not None else self.timeout,
                    verify=self.verify,
                    proxies=self.proxies,
                    allow_redirects=False,
                )
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError,
                    http.client.HTTPException) as exc:
                err = translate_exception(exc, shown)
                elapsed = time.monotonic() - start
                if attempt < attempts and not self._closed.is_set():
                    self.log.info(
                        "%s %s failed after %.3f s (%s); retry %d/%d in %.2f s",
                        method, shown, elapsed, err, attempt, attempts - 1, delay,
                    )
                    if not self._closed.wait(delay):  # close() ends the wait
                        delay = min(delay * 2, MAX_BACKOFF)
                        continue
                self.log.info("%s %s failed after %.3f s: %s", method, shown, elapsed, err)
                raise err from exc

            status = response.status_code
            if 300 <= status < 400:
                error = self._redirect_error(response, method, url, shown,
                                             _sent_secrets(params, data))
                self.log.info("%s %s -> %d: %s", method, shown, status, error.message)
                raise error
            if status < 400:
                if not stream:
                    try:
                        _ = response.content
                    except (requests.RequestException, urllib3.exceptions.HTTPError,
                            OSError, http.client.HTTPException) as exc:
                        response.close()
                        err = translate_exception(exc, shown)
                        if attempt < attempts and not self._closed.is_set():
                            self.log.info("%s %s: body lost (%s); retry %d/%d in %.2f s",
                                          method, shown, err, attempt, attempts - 1, delay)
                            if not self._closed.wait(delay):
                                delay = min(delay * 2, MAX_BACKOFF)
                                continue
                        raise err from exc
                self.log.debug(
                    "%s %s -> %d (%.3f s)", method, shown, status, time.monotonic() - start
                )
                return response

            error = self._error_from(response, shown, _sent_secrets(params, data))
            retry = (
                attempt < attempts
                and status in RETRY_STATUSES
                and is_busy is not None
                and is_busy(error)
                and not self._closed.is_set()
            )
            if retry:
                wait = _retry_after(response, delay)
                self.log.info(
                    "%s %s -> %d %s; retry %d/%d in %.2f s",
                    method, shown, status, error.message, attempt, attempts - 1, wait,
                )
                if not self._closed.wait(wait):
                    delay = min(delay * 2, MAX_BACKOFF)
                    continue
            self.log.debug("%s %s -> %d %s", method, shown, status, error.message)
            raise error
        raise AssertionError("unreachable")  # pragma: no cover

    def _redirect_error(self, response: requests.Response, method: str, url: str,
                        shown: str, sent: tuple[str, ...] = ()) -> ServerError:
        """The error for a 3xx answer (closed here): status and redacted Location.

        ``sent``: secrets the request carried (redacted from the Location too).
        """
        status = response.status_code
        location = response.headers.get("Location")
        response.close()
        if location:
            target = redact(urljoin(url, location.strip()), (*self.secrets(), *sent))
            if len(target) > _MAX_LOCATION:
                target = target[:_MAX_LOCATION] + "..."
            where = f"a redirect to {target}"
        else:
            where = "a redirect without a Location"
        reason = f" {response.reason}" if response.reason else ""
        message = (
            f"{method} {shown}: the server answered {status}{reason}, {where}; redirects "
            "are not followed (they could carry the password, session or data elsewhere): "
            "if that is the right server, configure its URL directly"
        )
        return self.response_error(message, status)

    def _error_from(self, response: requests.Response, shown: str,
                    sent: tuple[str, ...] = ()) -> ServerError:
        """Read a (bounded) error body and build the ServerError; closes it.

        ``sent``: secrets the request carried (redacted from the message too).
        """
        try:
            body = response.raw.read(MAX_ERROR_BODY, decode_content=True) or b""
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError,
                http.client.HTTPException):
            body = b""
        finally:
            response.close()
        return self.error_factory(
            response.status_code, body, response.reason or "", (*self.secrets(), *sent)
        )


def _response_error_class(
    error_factory: Callable[[int, bytes, str, Iterable[str | None]], ServerError],
) -> type[ServerError]:
    """The "unusable answer" class of the service whose errors ``error_factory`` builds."""
    probe = error_factory(500, b"", "", ())
    if isinstance(probe, IDSError):
        return IDSResponseError
    if isinstance(probe, ICATError):
        return ICATResponseError
    return type(probe)


def _sent_secrets(*parts: Any) -> tuple[str, ...]:
    """The values of :data:`SECRET_PARAMS` in the query or form mappings of a request."""
    found: list[str] = []
    for part in parts:
        if isinstance(part, Mapping):
            for name in SECRET_PARAMS:
                value = part.get(name)
                if isinstance(value, str) and value:
                    found.append(value)
    return tuple(found)


def _retry_after(response: requests.Response, default: float) -> float:
    value = response.headers.get("Retry-After")
    if value:
        try:
            return max(0.0, min(float(value), MAX_BACKOFF))
        except ValueError:
            pass
    return default


def _check_timeout(timeout: Timeout) -> Timeout:
    if isinstance(timeout, tuple):
        if len(timeout) != 2 or any(t is None or t <= 0 for t in timeout):
            raise ValueError("timeout must be a positive number or (connect, read)")
        return (float(timeout[0]), float(timeout[1]))
    if timeout is None or timeout <= 0:
        raise ValueError("timeout must be a positive number or (connect, read)")
    return float(timeout)

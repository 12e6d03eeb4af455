"""A small client of ICAT's REST API (``icat-rest.md``).

::

    from idsfs.icat import ICATClient
    from idsfs.model import Dataset

    icat = ICATClient("https://icat.example.org")
    icat.login("db", {"username": "jdoe", "password": secret})
    for ds in icat.search_all("SELECT ds FROM Dataset ds WHERE ds.investigation.id = 42 "
                              "ORDER BY ds.id"):
        print(ds.name)

Results are the frozen dataclasses of :mod:`idsfs.model`; errors are the
:class:`~idsfs.errors.ICATError` classes. Session handling:

* The session is refreshed (``PUT session/{id}``) before a call once less
  than ``refresh_margin`` of its lifetime is left (default: half the
  lifetime seen at login, at most 30 minutes).
* When the client logged in itself it keeps the credentials (in memory
  only; never logged or shown in a repr) and, on an ICAT ``SESSION`` error,
  logs in again once and repeats the call. ICAT checks the session before
  doing anything, so repeating even a write is safe in that case. A re-login
  that ICAT refuses (a changed password, a locked account) is logged as a
  warning and not tried again for :data:`RELOGIN_BACKOFF` seconds, doubling
  up to :data:`MAX_RELOGIN_BACKOFF`: meanwhile calls fail at once with the
  refusal, so a busy caller does not send ICAT (and a directory service
  behind it, which may lock the account) a login per call.
* Listeners registered with :meth:`ICATClient.add_session_listener` are told
  the new session id (e.g. to update an ``IDSClient.sessionId``).
* A session given by the caller (no credentials) that ICAT refuses after it
  worked is logged once, as a warning, the first time a call is refused (one
  refused at its first call is only raised).

Thread safety: one client may be used from several threads; login, refresh
and re-login are serialised by a lock, the calls themselves run in parallel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import requests

from idsfs import _http
from idsfs._http import DEFAULT_BACKOFF, DEFAULT_RETRIES, DEFAULT_TIMEOUT, Timeout
from idsfs.errors import (
    ICATError,
    ICATResponseError,
    ICATSessionError,
    ServerError,
    TransportError,
    icat_error_from_response,
)
from idsfs.model import BEANS, Entity

__all__ = ["ICATClient", "SessionInfo", "quote"]

log = logging.getLogger("idsfs.icat")

E = TypeVar("E", bound=Entity)

#: Refresh the session when less than this many seconds are left (upper bound).
MAX_REFRESH_MARGIN = 30 * 60.0
#: Seconds a refused re-login is not tried again (doubling per refusal in a row)...
RELOGIN_BACKOFF = 10.0
#: ... up to this many.
MAX_RELOGIN_BACKOFF = 600.0


def quote(value: str) -> str:
    """Return ``value`` as a JPQL string literal (``'`` doubled, in quotes). Never raises."""
    return "'" + str(value).replace("'", "''") + "'"


@dataclass(frozen=True)
class SessionInfo:
    """What ``GET session/{id}`` tells: the user name and the time left.

    Constructing one never raises.
    """

    userName: str
    remainingMinutes: float


def _is_busy(error: ServerError) -> bool:
    """Retry 502/503/504 answers that are not ICAT error JSON (proxies)."""
    return error.type is None


_LIMIT_RE = re.compile(r"\bLIMIT\s+\d+\s*,", re.IGNORECASE)
_ORDER_RE = re.compile(r"\bORDER\s+BY\b", re.IGNORECASE)


class ICATClient:
    """Client of one ICAT server.

    ``url`` is the ICAT base URL (``https://host:8181``); ``/icat`` is
    appended unless the path already ends with it. Keyword options:
    ``timeout`` (seconds or ``(connect, read)``), ``retries`` and ``backoff``
    (idempotent calls only), ``verify`` (``False`` or a CA bundle path),
    ``sslContext`` (an ``ssl.SSLContext`` that replaces ``verify``),
    ``proxy`` (``{"https": "http://proxy:3128"}``), ``session`` (a
    ``requests.Session`` to share), ``sessionId`` (adopt an existing ICAT
    session) and ``refresh_margin`` (seconds; see the module docstring).

    Constructing does not contact the server; it raises ``ValueError`` for a
    URL that is not http(s).

    Errors of every call: an ICAT error answer raises the
    :class:`~idsfs.errors.ICATError` subclass of its code, an answer that
    cannot be used :class:`~idsfs.errors.ICATResponseError`, no answer a
    :class:`~idsfs.errors.TransportError` subclass (after the retries of
    idempotent calls); a call that needs a session raises ``RuntimeError``
    before login. The methods name the errors particular to them.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        verify: bool | str = True,
        sslContext: ssl.SSLContext | None = None,
        proxy: Mapping[str, str] | None = None,
        session: requests.Session | None = None,
        sessionId: str | None = None,
        refresh_margin: float | None = None,
    ) -> None:
        if not isinstance(url, str) or not re.match(r"^https?://", url):
            raise ValueError(f"ICAT URL must start with http:// or https://: {url!r}")
        base = url.rstrip("/")
        if not base.endswith("/icat"):
            base += "/icat"
        self.url = base + "/"
        self._lock = threading.RLock()
        self._session_id: str | None = sessionId
        self._auth: tuple[str, dict[str, str]] | None = None
        self._expires: float | None = None  # monotonic time of expiry, when known
        self._lifetime: float | None = None
        self._refresh_margin = refresh_margin
        self._listeners: list[Callable[[str | None], None]] = []
        self._lost_reported: str | None = None  # the adopted session last seen expire
        self._worked: str | None = None  # the session of the last call that succeeded
        self._login_secrets: tuple[str, ...] = ()
        #: a refused re-login: (monotonic time before which none is tried, refusals in a
        #: row, ICAT's message)
        self._relogin_refused: tuple[float, int, str] | None = None
        self._transport = _http.Transport(
            logger=log,
            error_factory=icat_error_from_response,
            secrets=self._secrets,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            verify=verify,
            ssl_context=sslContext,
            proxies=proxy,
            session=session,
        )

    def _secrets(self) -> tuple[str | None, ...]:
        auth = self._auth
        remembered = auth[1].values() if auth is not None else ()
        return (self._session_id, *remembered, *self._login_secrets)

    def __repr__(self) -> str:
        state = "logged in" if self._session_id else "no session"
        return f"<ICATClient url={self.url!r} {state}>"

    def close(self) -> None:
        """Close pooled connections (does not log out).

        Never raises.
        """
        self._transport.close()

    def __enter__(self) -> ICATClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ session

    @property
    def sessionId(self) -> str | None:
        """The current ICAT session id (``None`` before login).

        Setting it adopts an existing session (credentials kept from an
        earlier login are dropped, so no automatic re-login happens). Neither
        reading nor setting it raises (a session listener's exceptions are
        logged).
        """
        return self._session_id

    @sessionId.setter
    def sessionId(self, value: str | None) -> None:
        """Adopt the session ``value`` (see the getter). Never raises."""
        with self._lock:
            self._auth = None
            self._expires = None
            self._set_session(value)

    def add_session_listener(self, listener: Callable[[str | None], None]) -> None:
        """Call ``listener(new_session_id)`` whenever the session id changes.

        Never raises; a listener's own exceptions are logged, not raised.
        """
        self._listeners.append(listener)

    def _set_session(self, value: str | None) -> None:
        changed = value != self._session_id
        self._session_id = value
        if changed:
            for listener in list(self._listeners):
                try:
                    listener(value)
                except Exception:
                    log.exception("session listener failed")

    def login(self, auth: str, credentials: Mapping[str, str], *, remember: bool = True) -> str:
        """Log in with authenticator ``auth`` (e.g. ``"db"``) and return the session id.

        ``credentials`` maps keys to values (``{"username": ..., "password":
        ...}``). With ``remember`` the credentials stay in memory for an
        automatic re-login. Raises :class:`~idsfs.errors.ICATSessionError`
        when the login is refused, :class:`~idsfs.errors.ICATResponseError`
        when the answer has no session id, and the errors of every call.
        """
        creds = {str(k): str(v) for k, v in credentials.items()}
        with self._lock:
            sid = self._do_login(auth, creds)
            self._auth = (auth, creds) if remember else None
            self._relogin_refused = None
            self._set_session(sid)
            self._note_lifetime()
            return sid

    def _do_login(self, auth: str, creds: Mapping[str, str]) -> str:
        doc = {"plugin": auth, "credentials": [{k: v} for k, v in creds.items()]}
        # Keep the password out of any error message even if not remembered.
        self._login_secrets = tuple(creds.values())
        try:
            response = self._transport.request(
                "POST", self.url + "session", data={"json": json.dumps(doc)}, idempotent=False
            )
        finally:
            self._login_secrets = ()
        result = self._decode(response)
        if not isinstance(result, dict) or not isinstance(result.get("sessionId"), str):
            raise ICATResponseError("login: response has no sessionId")
        log.debug("logged in to %s with authenticator %s", self.url, auth)
        return str(result["sessionId"])

    def _note_lifetime(self) -> None:
        """Record when the session expires (best effort, never raises)."""
        try:
            info = self._session_info_raw()
        except (ICATError, TransportError):
            self._expires = None
            return
        seconds = info.remainingMinutes * 60.0
        self._lifetime = seconds
        self._expires = time.monotonic() + seconds

    def _margin(self) -> float:
        if self._refresh_margin is not None:
            return self._refresh_margin
        if self._lifetime:
            return min(self._lifetime / 2, MAX_REFRESH_MARGIN)
        return MAX_REFRESH_MARGIN

    def _session_info_raw(self) -> SessionInfo:
        sid = self._require_session()
        response = self._transport.request(
            "GET", self.url + "session/" + sid, idempotent=True, is_busy=_is_busy
        )
        doc = self._decode(response)
        try:
            return SessionInfo(str(doc["userName"]), float(doc["remainingMinutes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ICATResponseError("session info: unexpected response") from exc

    def session_info(self) -> SessionInfo:
        """Return the user name and remaining minutes of the current session.

        Raises ``RuntimeError`` before login, :class:`~idsfs.errors.ICATSessionError` for an
        expired session, :class:`~idsfs.errors.ICATResponseError` for an unusable answer, and
        the errors of every call.
        """
        return self._with_session(self._session_info_raw, refresh=False)

    def refresh(self) -> None:
        """Extend the session to its full lifetime (``PUT session/{id}``).

        Raises ``RuntimeError`` before login, :class:`~idsfs.errors.ICATSessionError` for an
        expired session, and the errors of every call.
        """
        with self._lock:
            sid = self._require_session()
            self._transport.request(
                "PUT", self.url + "session/" + sid, idempotent=True, is_busy=_is_busy
            )
            if self._lifetime:
                self._expires = time.monotonic() + self._lifetime
            else:
                self._note_lifetime()

    def logout(self) -> None:
        """End the session and forget the credentials.

        An already unknown or expired session is not an error.

        Raises the errors of every call other than ICATSessionError.
        """
        with self._lock:
            sid = self._session_id
            self._auth = None
            self._expires = None
            if sid:
                with contextlib.suppress(ICATSessionError):
                    self._transport.request("DELETE", self.url + "session/" + sid)
            self._set_session(None)

    def _require_session(self) -> str:
        sid = self._session_id
        if not sid:
            raise RuntimeError("Must be logged in to make this call.")
        return sid

    def _maybe_refresh(self) -> None:
        expires = self._expires
        if expires is None or expires - time.monotonic() > self._margin():
            return
        with self._lock:
            expires = self._expires
            if expires is None or expires - time.monotonic() > self._margin():
                return
            try:
                self.refresh()
                log.debug("session refreshed")
            except ICATSessionError:
                if self._auth is None:
                    raise
                self._relogin(self._session_id)

    def _relogin(self, failed_sid: str | None) -> None:
        """Log in again with the remembered credentials, unless a re-login was refused
        moments ago (then raise that refusal again: ICATSessionError)."""
        with self._lock:
            if self._session_id != failed_sid:
                return  # another thread already replaced it
            assert self._auth is not None
            auth, creds = self._auth
            refused = self._relogin_refused
            now = time.monotonic()
            if refused is not None and now < refused[0]:
                raise ICATSessionError(
                    f"{refused[2]} (the re-login was refused; next try in "
                    f"{refused[0] - now:.0f} s)", 403, type="SESSION")
            log.info("ICAT session expired; logging in again")
            try:
                sid = self._do_login(auth, creds)
            except ICATSessionError as exc:
                count = refused[1] + 1 if refused is not None else 1
                wait = min(RELOGIN_BACKOFF * 2 ** (count - 1), MAX_RELOGIN_BACKOFF)
                self._relogin_refused = (time.monotonic() + wait, count, exc.message)
                log.warning("ICAT refused to log %s in again with authenticator %s (%s): "
                            "calls fail until the next try in %.0f s; after a change of "
                            "password, mount again", creds.get("username", "the user"),
                            auth, exc.message, wait)
                raise
            self._relogin_refused = None
            self._set_session(sid)
            self._note_lifetime()

    def _with_session(self, call: Callable[[], Any], *, refresh: bool = True) -> Any:
        """Run ``call`` (which reads self._session_id); re-login once on SESSION."""
        if refresh:
            self._maybe_refresh()
        sid = self._session_id
        try:
            result = call()
        except ICATSessionError:
            if self._auth is None:
                # said once per session, and only of one that worked before (a session
                # refused at its first call is the caller's error to report)
                if sid is not None and sid == self._worked and sid != self._lost_reported:
                    self._lost_reported = sid
                    log.warning("ICAT refuses the session (expired or logged out) and there "
                                "are no credentials to log in again")
                raise
            self._relogin(sid)
            return call()
        self._worked = sid
        return result

    # ------------------------------------------------------------------ plumbing

    def _decode(self, response: requests.Response) -> Any:
        text = response.content.decode("utf-8", errors="replace")
        if not text:
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise ICATResponseError(
                f"response is not JSON: {self._transport.redact(text[:200])!r}"
            ) from exc

    def _entity_manager(
        self, method: str, params: Mapping[str, Any], *, idempotent: bool
    ) -> Any:
        def call() -> Any:
            full = {"sessionId": self._require_session(), **params}
            if method == "POST":
                response = self._transport.request(
                    method, self.url + "entityManager", data=full, idempotent=idempotent,
                    is_busy=_is_busy,
                )
            else:
                response = self._transport.request(
                    method, self.url + "entityManager", params=full, idempotent=idempotent,
                    is_busy=_is_busy,
                )
            return self._decode(response)

        return self._with_session(call)

    # ------------------------------------------------------------------ queries

    @staticmethod
    def _row(row: Any) -> Any:
        """A result row as model objects; raises ICATResponseError for unparsable entities."""
        if isinstance(row, dict) and len(row) == 1:
            (key, value), = row.items()
            if key in BEANS and isinstance(value, dict):
                try:
                    return BEANS[key].from_json(row)
                except ValueError as exc:
                    raise ICATResponseError(f"unusable {key} in the response: {exc}") from exc
        if isinstance(row, list):
            return tuple(ICATClient._row(x) for x in row)
        return row

    def search(self, query: str) -> list[Any]:
        """Run a JPQL search and return the rows.

        Entity rows become model objects (entity types without a model class
        stay dicts), a single selected value becomes that value (number,
        string, ``None``; dates stay strings), several selected values become
        a tuple. Rows the user may not read are silently missing (ICAT
        filters). Raises :class:`~idsfs.errors.ICATParameterError` for a bad
        query and :class:`~idsfs.errors.ICATValidationError` when the result
        exceeds the server's ``maxEntities`` (use :meth:`search_all`).
        """
        result = self._entity_manager("GET", {"query": query}, idempotent=True)
        if not isinstance(result, list):
            raise ICATResponseError("search: response is not a JSON array")
        return [self._row(row) for row in result]

    def search_all(self, query: str, page_size: int = 1000) -> Iterator[Any]:
        """Yield all rows of ``query``, fetched in pages with ``LIMIT``.

        ``query`` must not have a LIMIT clause. Give it an ``ORDER BY`` on a
        unique key (e.g. ``ORDER BY ds.id``): without one the server's row
        order may change between pages, and rows may be repeated or missed.
        ``page_size`` must not exceed the server's ``maxEntities`` (including
        INCLUDEd objects). Raises ``ValueError`` for a query with LIMIT.
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        if _LIMIT_RE.search(query):
            raise ValueError("search_all adds LIMIT itself; remove it from the query")
        if not _ORDER_RE.search(query):
            log.debug("search_all without ORDER BY: paging order is not guaranteed")
        offset = 0
        while True:
            rows = self.search(f"{query} LIMIT {offset}, {page_size}")
            yield from rows
            if len(rows) < page_size:
                return
            offset += page_size

    def get(self, query: str | type[E], id: int) -> Any:
        """Return the object of type/query ``query`` with primary key ``id``.

        ``query`` is an entity name with optional INCLUDE
        (``"Datafile df INCLUDE df.dataset"``) or a model class. Raises
        :class:`~idsfs.errors.ICATNoObjectError` (missing) or
        :class:`~idsfs.errors.ICATPrivilegesError` (not readable).
        """
        text = query.BeanName if isinstance(query, type) else query
        result = self._entity_manager("GET", {"query": text, "id": str(int(id))},
                                      idempotent=True)
        row = self._row(result)
        if not isinstance(row, Entity):
            raise ICATResponseError("get: response is not an entity object")
        return row

    # ------------------------------------------------------------------ writes

    @staticmethod
    def _entities_json(objs: Entity | Mapping[str, Any] | Sequence[Any]) -> tuple[str, bool]:
        single = isinstance(objs, Entity | Mapping)
        items: Iterable[Any] = [objs] if single else objs
        docs = []
        for obj in items:
            if isinstance(obj, Entity):
                docs.append(obj.to_json())
            elif isinstance(obj, Mapping):
                docs.append(dict(obj))
            else:
                raise TypeError(f"expected a model object or an entity mapping, not "
                                f"{type(obj).__name__}")
        return json.dumps(docs[0] if single else docs), single

    def create(self, objs: Entity | Mapping[str, Any] | Sequence[Any]) -> Any:
        """Create one object (returns its id) or a list of them (returns the ids).

        Objects are model instances without ``id`` (or ``{"Type": {...}}``
        mappings); many-to-one fields must refer to objects with ids. All
        objects of one call are created in one transaction. Never retried.
        Raises e.g. :class:`~idsfs.errors.ICATObjectExistsError` with
        ``offset`` = index of the offending object.
        """
        text, single = self._entities_json(objs)
        result = self._entity_manager("POST", {"entities": text}, idempotent=False)
        if not isinstance(result, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in result):
            raise ICATResponseError("create: response is not a JSON array of ids")
        ids = list(result)
        if single:
            if len(ids) != 1:
                raise ICATResponseError(f"create: expected one id, got {len(ids)}")
            return ids[0]
        return ids

    def update(self, obj: Entity | Mapping[str, Any], **changes: Any) -> None:
        """Update an existing object.

        ``update(obj)`` sends all non-None fields of ``obj`` (which needs an
        ``id``); ``update(obj, name="b.dat")`` sends only ``id`` and the given
        fields (model objects for relations, datetimes for dates). A mapping
        ``{"Datafile": {"id": 12, "name": "b.dat"}}`` is sent as is.

        Raises ``ValueError`` for a model object without id, ``TypeError`` for other arguments,
        and the ICAT errors of the call (e.g. :class:`~idsfs.errors.ICATPrivilegesError`,
        :class:`~idsfs.errors.ICATObjectExistsError`).
        """
        if isinstance(obj, Entity):
            if obj.id is None:
                raise ValueError("update needs an object with id")
            if changes:
                obj = dataclasses.replace(obj, **changes)
                doc: Any = obj.to_json(fields=list(changes))
            else:
                doc = obj.to_json()
        elif isinstance(obj, Mapping):
            if changes:
                raise TypeError("field changes can only be given with a model object")
            doc = dict(obj)
        else:
            raise TypeError(f"expected a model object or an entity mapping, not "
                            f"{type(obj).__name__}")
        self._entity_manager("POST", {"entities": json.dumps(doc)}, idempotent=False)

    def delete(self, objs: Entity | Mapping[str, Any] | Sequence[Any]) -> None:
        """Delete one object or a list of them (cascading to their children).

        Objects are model instances with ``id`` or ``{"Type": {"id": N}}``.
        Remember that deleting Datafiles here leaves their bytes in IDS: use
        ``IDSClient.delete`` for file content.

        Raises ``ValueError`` for a model object without id and the ICAT errors of the call
        (e.g. :class:`~idsfs.errors.ICATPrivilegesError`).
        """
        single = isinstance(objs, Entity | Mapping)
        items = [objs] if single else list(objs)  # type: ignore[list-item]
        refs = [o.ref() if isinstance(o, Entity) else dict(o) for o in items]
        text = json.dumps(refs[0] if single else refs)
        self._entity_manager("DELETE", {"entities": text}, idempotent=False)

    # ------------------------------------------------------------------ server info

    def version(self) -> str:
        """Return the ICAT server version (e.g. ``"6.2.1"``).

        Raises :class:`~idsfs.errors.ICATResponseError` for an unusable answer and the errors of
        every call.
        """
        response = self._transport.request(
            "GET", self.url + "version", idempotent=True, is_busy=_is_busy
        )
        doc = self._decode(response)
        if not isinstance(doc, dict) or "version" not in doc:
            raise ICATResponseError("version: unexpected response")
        return str(doc["version"])

    def properties(self) -> dict[str, Any]:
        """Return the server properties (``maxEntities``, ``lifetimeMinutes``,
        ``authenticators``, ...).

        Raises :class:`~idsfs.errors.ICATResponseError` for an unusable answer and the errors of
        every call.
        """
        response = self._transport.request(
            "GET", self.url + "properties", idempotent=True, is_busy=_is_busy
        )
        doc = self._decode(response)
        if not isinstance(doc, dict):
            raise ICATResponseError("properties: unexpected response")
        return doc

"""The ICAT REST resources of the emulator (icat-rest.md §3), under ``/icat/``.

:func:`register` adds the routes to the emulator's :class:`~.http.Router`:

=========  ==========================  ============================================
POST       ``/icat/session``           login (form field ``json``)
GET        ``/icat/session/{id}``      ``{"userName", "remainingMinutes"}``
PUT        ``/icat/session/{id}``      refresh, 204
DELETE     ``/icat/session/{id}``      logout, 204
GET        ``/icat/entityManager``     search (``query``) or get by ``id``
POST       ``/icat/entityManager``     create/update (form ``entities``)
DELETE     ``/icat/entityManager``     delete (query ``entities``), 204
GET        ``/icat/version``           ``{"version": "6.2.1"}``
GET        ``/icat/properties``        maxEntities, lifetimeMinutes, authenticators
GET        ``/icat/user/{name}``       ``{"loggedIn": bool}``
POST       ``/icat/cloner``            ``{"id": N}`` (form ``name``, ``id``, ``keys``)
=========  ==========================  ============================================

Endpoint names (fault injection rules and request counters): ``icat/login``,
``icat/session`` (GET session), ``icat/refresh``, ``icat/logout``,
``icat/entityManager`` (GET: search and get by id), ``icat/write`` (POST
entityManager), ``icat/delete`` (DELETE entityManager), ``icat/version``,
``icat/properties``, ``icat/user``, ``icat/cloner``.

Each handler checks its parameters and the session in the order icat-rest.md
§3.6-3.8 prescribes. Errors: every :class:`~.schema.ICATException` raised by a
handler (or by the catalogue) is turned into the JSON body ``{"code",
"message"[, "offset"]}`` with the status of its code by the :func:`_icat`
decorator; ``offset`` is present only for errors of the entities of a POST or
DELETE ``entityManager``. Unknown paths below ``/icat`` get 501
``NOT_IMPLEMENTED`` and uncaught exceptions 500 ``INTERNAL`` (renderers set
here for the ``/icat`` prefix). Session ids are never part of a message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .catalogue import ICAT_VERSION, Catalogue
from .http import Request, Response, Router, empty_response, json_response
from .schema import ICATException, bad

if TYPE_CHECKING:
    from .settings import EmulatorSettings

logger = logging.getLogger("idsfs.emulator.icat")

Handler = Callable[[Request], Response]


def _error(exc: ICATException) -> Response:
    return json_response(exc.to_json(), exc.status)


def _icat(handler: Handler) -> Handler:
    """Wrap a handler: ICATException -> ICAT error JSON with the code's status."""

    def wrapped(request: Request) -> Response:
        try:
            return handler(request)
        except ICATException as exc:
            return _error(exc)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def _unknown(request: Request) -> Response:
    return _error(
        ICATException(
            "NOT_IMPLEMENTED",
            f"{request.method} {request.path} is an operation not implemented by this ICAT server",
        )
    )


def _uncaught(request: Request, exc: BaseException) -> Response:
    return _error(ICATException("INTERNAL", f"{type(exc).__name__} {exc}"))


def _parse_id(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError as exc:
        raise bad(f"id must be an integer, not {text!r}") from exc
    if not -(2**63) <= value < 2**63:
        raise bad(f"id is out of range: {text}")
    return value


def _credentials(doc: Any) -> tuple[Any, dict[str, str]]:
    """``{"plugin": ..., "credentials": [{"k": "v"}, ...]}`` -> (plugin, mapping).

    Non-string credential values are ignored, as ICAT's streaming parser does.
    """
    if not isinstance(doc, dict):
        raise bad("json must be an object with plugin and credentials")
    plugin = doc.get("plugin")
    creds: dict[str, str] = {}
    raw = doc.get("credentials", [])
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise bad("credentials must be an array of single-key objects")
    for item in raw:
        if not isinstance(item, dict):
            raise bad("credentials must be an array of single-key objects")
        for key, value in item.items():
            if isinstance(value, str):
                creds[key] = value
    return plugin, creds


class IcatApi:
    """The handlers of the ICAT resources, bound to one catalogue.

    Constructing one never raises. Its handlers raise ``ICATException``, which the wrapper
    :func:`register` installs turns into ICAT's error JSON with the code's status; every
    catalogue call may also raise INTERNAL (closed catalogue, database failure).
    """

    def __init__(self, catalogue: Catalogue, settings: EmulatorSettings) -> None:
        """Serve ``catalogue``."""
        self.catalogue = catalogue
        self.settings = settings

    # sessions
    def login(self, request: Request) -> Response:
        """POST session: form field ``json`` -> ``{"sessionId": ...}``.

        Raises ``ICATException`` (answered as ICAT's error JSON by the route's wrapper):
        BAD_PARAMETER for a missing or malformed ``json`` field, SESSION for refused
        credentials or an unknown authenticator (see ``Catalogue.login``).
        """
        text = request.farg("json")
        if text is None:
            raise bad("json must not be null")
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise bad(f"json is not valid JSON: {exc}") from exc
        plugin, creds = _credentials(doc)
        sid = self.catalogue.login(plugin, creds)
        return json_response({"sessionId": sid})

    def session_info(self, request: Request) -> Response:
        """GET session/{id}: ``{"userName", "remainingMinutes"}``.

        Raises ``ICATException`` (answered as ICAT's error JSON by the route's wrapper):
        SESSION for an unknown or expired session.
        """
        user, remaining = self.catalogue.session_info(request.path_params.get("sessionId", ""))
        return json_response({"userName": user, "remainingMinutes": remaining})

    def refresh(self, request: Request) -> Response:
        """PUT session/{id}: refresh, 204.

        Raises ``ICATException`` (answered as ICAT's error JSON by the route's wrapper):
        SESSION for an unknown or expired session.
        """
        self.catalogue.refresh(request.path_params.get("sessionId", ""))
        return empty_response()

    def logout(self, request: Request) -> Response:
        """DELETE session/{id}: logout, 204.

        Raises ``ICATException`` (answered as ICAT's error JSON by the route's wrapper):
        SESSION for an unknown or expired session.
        """
        self.catalogue.logout(request.path_params.get("sessionId", ""))
        return empty_response()

    def no_session(self, request: Request) -> Response:
        """session/ with an empty id: 403 SESSION.

        Raises ``ICATException`` (answered as ICAT's error JSON by the route's wrapper):
        always SESSION.
        """
        raise ICATException("SESSION", "Unable to find user by sessionid")

    # entity manager
    def em_get(self, request: Request) -> Response:
        """GET entityManager: query missing 400, then session 403, then search or get.

        Raises ``ICATException`` (answered as ICAT's error JSON by the route's wrapper):
        BAD_PARAMETER for a missing or malformed query or id, SESSION, and what the search
        or get raises (e.g. NO_SUCH_OBJECT_FOUND, INSUFFICIENT_PRIVILEGES).
        """
        query = request.arg("query")
        if query is None:
            raise bad("query is not set")
        user = self.catalogue.user_of(request.arg("sessionId"))
        id_text = request.arg("id")
        if id_text is None:
            return json_response(self.catalogue.search(user, query))
        return json_response(self.catalogue.get(user, query, _parse_id(id_text)))

    def em_post(self, request: Request) -> Response:
        """POST entityManager: session 403, then entities missing 400, then write.

        Raises ``ICATException`` (answered as ICAT's error JSON by the route's wrapper):
        SESSION, BAD_PARAMETER for missing or malformed entities, and what the write raises
        (VALIDATION, OBJECT_ALREADY_EXISTS, INSUFFICIENT_PRIVILEGES, ...).
        """
        user = self.catalogue.user_of(request.farg("sessionId"))
        entities = request.farg("entities")
        if entities is None:
            raise bad("entities is not set")
        return json_response(self.catalogue.write(user, entities))

    def em_delete(self, request: Request) -> Response:
        """DELETE entityManager: entities missing / bad JSON 400, then session 403, delete.

        Raises ``ICATException`` (answered as ICAT's error JSON by the route's wrapper):
        BAD_PARAMETER for missing or malformed entities, SESSION, and what the delete raises
        (NO_SUCH_OBJECT_FOUND, INSUFFICIENT_PRIVILEGES, ...).
        """
        entities = request.arg("entities")
        if entities is None:
            raise bad("entities is not set")
        parsed = Catalogue.parse_delete(entities)
        user = self.catalogue.user_of(request.arg("sessionId"))
        self.catalogue.delete(user, parsed)
        return empty_response()

    # other resources
    def version(self, request: Request) -> Response:
        """GET version. Never raises."""
        return json_response({"version": ICAT_VERSION})

    def properties(self, request: Request) -> Response:
        """GET properties. Never raises."""
        return json_response(self.catalogue.properties())

    def user(self, request: Request) -> Response:
        """GET user/{name}: whether the user holds a live session.

        Raises ``ICATException`` (answered as ICAT's error JSON by the route's wrapper):
        INTERNAL only (closed catalogue, database failure).
        """
        return json_response({"loggedIn": self.catalogue.is_logged_in(request.path_params["name"])})

    def cloner(self, request: Request) -> Response:
        """POST cloner: form ``sessionId``, ``name``, ``id``, ``keys`` -> ``{"id": N}``.

        Raises ``ICATException`` (answered as ICAT's error JSON by the route's wrapper):
        SESSION, BAD_PARAMETER for a missing or malformed field, and what the clone raises
        (NO_SUCH_OBJECT_FOUND, OBJECT_ALREADY_EXISTS, ...).
        """
        user = self.catalogue.user_of(request.farg("sessionId"))
        name = request.farg("name")
        id_text = request.farg("id")
        if name is None or id_text is None:
            raise bad("name and id must be set")
        keys_text = request.farg("keys")
        keys: Any = {}
        if keys_text:
            try:
                keys = json.loads(keys_text)
            except ValueError as exc:
                raise bad(f"keys is not valid JSON: {exc}") from exc
            if not isinstance(keys, dict):
                raise bad("keys must be a JSON object")
        new_id = self.catalogue.clone(user, name, _parse_id(id_text), keys)
        return json_response({"id": new_id})


def register(router: Router, catalogue: Catalogue, settings: EmulatorSettings) -> None:
    """Add the ICAT routes (and the ``/icat`` error renderers) to ``router``. Never raises."""
    api = IcatApi(catalogue, settings)
    router.prefix("/icat", _unknown, _uncaught)
    routes: list[tuple[str, str, Handler, str]] = [
        ("POST", "/icat/session", api.login, "icat/login"),
        ("GET", "/icat/session/{sessionId}", api.session_info, "icat/session"),
        ("PUT", "/icat/session/{sessionId}", api.refresh, "icat/refresh"),
        ("DELETE", "/icat/session/{sessionId}", api.logout, "icat/logout"),
        ("GET", "/icat/session/", api.no_session, "icat/session"),
        ("PUT", "/icat/session/", api.no_session, "icat/refresh"),
        ("DELETE", "/icat/session/", api.no_session, "icat/logout"),
        ("GET", "/icat/entityManager", api.em_get, "icat/entityManager"),
        ("POST", "/icat/entityManager", api.em_post, "icat/write"),
        ("DELETE", "/icat/entityManager", api.em_delete, "icat/delete"),
        ("GET", "/icat/version", api.version, "icat/version"),
        ("GET", "/icat/properties", api.properties, "icat/properties"),
        ("GET", "/icat/user/{name:path}", api.user, "icat/user"),
        ("POST", "/icat/cloner", api.cloner, "icat/cloner"),
    ]
    for method, path, handler, name in routes:
        router.add(method, path, _icat(handler), name)

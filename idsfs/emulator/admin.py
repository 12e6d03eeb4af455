"""The admin API under ``/admin``: fault injection, counters, session expiry, storage hooks.

A test tool, not part of ICAT or IDS: it has no authentication (bind the
emulator to 127.0.0.1, the default). Admin requests are never faulted and never
counted. Bodies may be JSON (``Content-Type: application/json``) or an
urlencoded form with the same keys. Errors answer ``{"code": ..., "message":
...}`` with 400 (bad input) or 404 (unknown admin path).

=======  ============================  ==============================================
Method   Path                          Effect
=======  ============================  ==============================================
GET      /admin/status                 URLs, storage kind, user names, rules, counters
GET      /admin/faults                 ``{"rules": [...], "fired": {kind: n}}``
POST     /admin/faults                 add rule(s): a JSON object or list of objects
                                       (keys of ``faults.FaultRule``), or form fields;
                                       answers ``{"ids": [...]}``
DELETE   /admin/faults                 remove every rule (``?id=N``: only that one)
                                       and release stalled streams; 204
POST     /admin/faults/release         release stalled streams; 204
POST     /admin/expire                 expire every ICAT session, or only
                                       ``sessionId``; ``{"expired": n}``
GET      /admin/counters               ``{endpoint: {"requests", "bytes_sent",
                                       "errors"}}``
DELETE   /admin/counters               reset the counters; 204
POST     /admin/storage/archive        two-level: archive now (``datasetIds`` /
                                       ``datafileIds``); 204
POST     /admin/storage/restore        two-level: restore now; 204
POST     /admin/storage/fail-restores  ``count=N``: fail the next N restores;
                                       ``always=true|false``: fail all restores
                                       from now on / stop doing so; 204
GET      /admin/storage/wait-idle      wait (``timeout`` seconds, default 30) until
                                       the deferred-operation queue is empty;
                                       ``{"idle": true|false}``
=======  ============================  ==============================================

The storage routes exist when the IDS part provides the hooks (``Storage``
methods ``archive_now``, ``restore_now``, ``fail_next_restores``,
``fail_restores``, ``wait_idle`` and ``ids_api.storage_items``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from idsfs.emulator.faults import FaultRule, parse_rules_json
from idsfs.emulator.http import (
    HTTPError,
    Request,
    Response,
    Router,
    empty_response,
    json_response,
)

if TYPE_CHECKING:
    from idsfs.emulator.app import Emulator


def _bad(message: str) -> HTTPError:
    return HTTPError(400, {"code": "BAD_REQUEST", "message": message})


def _params(request: Request) -> dict[str, Any]:
    """Query parameters plus the body (JSON object or form), first values only."""
    out: dict[str, Any] = {k: v[0] for k, v in request.query.items() if v}
    if request.content_type == "application/json":
        text = request.body.read().decode("utf-8", "replace")
        if text.strip():
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _bad(f"body is not valid JSON: {exc}") from exc
            if not isinstance(data, dict):
                raise _bad("body must be a JSON object")
            out.update(data)
    elif request.method in ("POST", "PUT", "DELETE"):
        out.update({k: v[0] for k, v in request.form().items() if v})
    return out


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _ids(value: Any, name: str) -> list[int]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, list) else [p for p in str(value).split(",") if p.strip()]
    try:
        return [int(p) for p in items]
    except (TypeError, ValueError):
        raise _bad(f"{name} must be a comma-separated list of ids") from None


def register(router: Router, emulator: Emulator) -> None:
    """Add the ``/admin`` routes for ``emulator`` to ``router``.

    Never raises; the admin handlers raise ``HTTPError`` (400 for bad input, 404 for an
    unknown rule, 501 for a missing part), which the server answers as JSON.
    """
    faults = emulator.faults
    counters = emulator.counters

    def status(request: Request) -> Response:
        settings = emulator.settings
        return json_response(
            {
                "icat": emulator.icat_url,
                "ids": emulator.ids_url,
                "storage": settings.storage,
                "readOnly": settings.read_only,
                "users": sorted(settings.users),
                "roots": sorted(settings.roots),
                "dataDir": str(emulator.data_dir),
                "faults": faults.to_json(),
                "counters": counters.snapshot(),
            }
        )

    def get_faults(request: Request) -> Response:
        return json_response(faults.to_json())

    def add_faults(request: Request) -> Response:
        try:
            if request.content_type == "application/json":
                rules = parse_rules_json(request.body.read().decode("utf-8", "replace"))
            else:
                fields = {k: v[0] for k, v in request.form().items() if v}
                fields.update({k: v[0] for k, v in request.query.items() if v})
                rules = [FaultRule.from_mapping(fields)]
        except ValueError as exc:
            raise _bad(str(exc)) from exc
        return json_response({"ids": [faults.add(rule) for rule in rules]})

    def clear_faults(request: Request) -> Response:
        rule_id = request.arg("id")
        if rule_id is None:
            faults.clear()
        else:
            try:
                ok = faults.remove(int(rule_id))
            except ValueError:
                raise _bad("id must be an integer") from None
            if not ok:
                raise HTTPError(404, {"code": "NOT_FOUND", "message": f"no rule {rule_id}"})
        return empty_response()

    def release(request: Request) -> Response:
        faults.release_stalls()
        return empty_response()

    def expire(request: Request) -> Response:
        params = _params(request)
        if emulator.catalogue is None:
            raise HTTPError(501, {"code": "NOT_IMPLEMENTED", "message": "no catalogue"})
        return json_response({"expired": faults.expire_sessions(params.get("sessionId") or None)})

    def get_counters(request: Request) -> Response:
        return json_response(counters.snapshot())

    def reset_counters(request: Request) -> Response:
        counters.reset()
        return empty_response()

    router.add("GET", "/admin/status", status, "admin/status")
    router.add("GET", "/admin/faults", get_faults, "admin/faults")
    router.add("POST", "/admin/faults", add_faults, "admin/faults")
    router.add("DELETE", "/admin/faults", clear_faults, "admin/faults")
    router.add("POST", "/admin/faults/release", release, "admin/faults/release")
    router.add("POST", "/admin/expire", expire, "admin/expire")
    router.add("GET", "/admin/counters", get_counters, "admin/counters")
    router.add("DELETE", "/admin/counters", reset_counters, "admin/counters")
    _register_storage(router, emulator)


def _register_storage(router: Router, emulator: Emulator) -> None:
    """Storage test hooks, when the storage and the IDS API provide them."""
    storage = emulator.storage
    if storage is None:
        return
    from idsfs.emulator.app import _optional_module

    ids_api = _optional_module("ids_api")
    items_of: Callable[..., Any] | None = getattr(ids_api, "storage_items", None)

    def items(request: Request) -> list[Any]:
        if items_of is None:
            raise HTTPError(501, {"code": "NOT_IMPLEMENTED", "message": "no storage_items"})
        params = _params(request)
        ds_ids = _ids(params.get("datasetIds"), "datasetIds")
        df_ids = _ids(params.get("datafileIds"), "datafileIds")
        try:
            return list(items_of(emulator.catalogue, storage, ds_ids, df_ids))
        except (KeyError, LookupError, ValueError) as exc:
            raise _bad(str(exc)) from exc

    def archive(request: Request) -> Response:
        from idsfs.emulator.locks import AlreadyLockedError

        try:
            storage.archive_now(items(request))
        except ValueError as exc:
            raise _bad(str(exc)) from exc
        except AlreadyLockedError as exc:  # e.g. a getData stream holds it: try later
            raise HTTPError(409, {"code": "LOCKED", "message": str(exc)}) from exc
        return empty_response()

    def restore(request: Request) -> Response:
        try:
            storage.restore_now(items(request))
        except ValueError as exc:
            raise _bad(str(exc)) from exc
        return empty_response()

    def fail_restores(request: Request) -> Response:
        params = _params(request)
        if "always" in params:
            storage.fail_restores(_flag(params["always"]))
        if "count" in params:
            try:
                storage.fail_next_restores(int(params["count"]))
            except ValueError:
                raise _bad("count must be an integer") from None
        if "always" not in params and "count" not in params:
            raise _bad("give count=N or always=true|false")
        return empty_response()

    def wait_idle(request: Request) -> Response:
        try:
            timeout = float(request.arg("timeout") or 30.0)
        except ValueError:
            raise _bad("timeout must be a number") from None
        return json_response({"idle": bool(storage.wait_idle(timeout))})

    for name, method, path, handler in (
        ("archive_now", "POST", "/admin/storage/archive", archive),
        ("restore_now", "POST", "/admin/storage/restore", restore),
        ("fail_next_restores", "POST", "/admin/storage/fail-restores", fail_restores),
        ("wait_idle", "GET", "/admin/storage/wait-idle", wait_idle),
    ):
        if callable(getattr(storage, name, None)):
            router.add(method, path, handler, path.removeprefix("/"))

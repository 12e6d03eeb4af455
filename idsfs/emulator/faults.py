"""Fault injection and per-endpoint request counters of the emulator.

:class:`FaultInjector` holds a list of :class:`FaultRule` objects. Each rule
has a ``kind``, an ``endpoint`` pattern (an endpoint name such as
``ids/getData``, or a shell-style pattern such as ``ids/*``; None = every
endpoint), a ``probability`` (fraction of matching requests it hits, drawn from
a ``random.Random`` seeded with ``seed``, so runs are reproducible) and an
optional ``count`` (hit only the next N matching requests, then the rule is
spent and removed). Kinds:

``latency``
    sleep ``seconds`` before the request is handled.
``error``
    answer ``status`` (500, 503, ...) instead of calling the handler, with the
    JSON error body the API would send: IDS ``InternalException`` (500) /
    ``DataNotOnlineException`` (503) / ..., ICAT ``INTERNAL`` (5xx) / ...
``drop``
    send only ``after_bytes`` bytes of a successful response body, then close
    the connection (the client sees a truncated body).
``stall``
    after ``after_bytes`` body bytes stop sending for ``seconds`` (None =
    until :meth:`FaultInjector.release_stalls` or :meth:`FaultInjector.clear`).
``expire_session``
    expire the ICAT session named by the request's ``sessionId`` (query or
    form; ICAT ``session/{id}`` paths too) just before it is handled, so the
    call fails as with a session that timed out.
``corrupt_checksum``
    consulted by the IDS ``put`` handler (see below); changes nothing here.

Rules are set from the start (``EmulatorSettings.faults``/``latency``, the
CLI options ``--latency``, ``--fault``), from Python
(``emulator.faults.add(...)`` or the helpers :meth:`~FaultInjector.error`,
:meth:`~FaultInjector.drop`, ...) or over HTTP (``/admin/faults``, see
``admin.py``). ``/admin/...`` requests are never faulted nor counted.

For the IDS helper (``ids_api.py``): the ``put`` handler calls
``faults.should_corrupt_checksum(request.endpoint)`` once per upload, after the
body was stored; when it returns True the server behaves as if it had received
different bytes: it uses ``crc ^ 0xFFFFFFFF`` as the checksum it registers in
ICAT and returns in the JSON, so the client's CRC comparison fails.

Forced expiry of all (or one) sessions right now: :meth:`FaultInjector.expire_sessions`
(calls ``Catalogue.expire``).

:class:`Counters` counts requests, response body bytes and error answers
(status >= 400) per endpoint name; tests and benchmarks read and reset them
through ``emulator.counters`` or ``/admin/counters``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from idsfs.emulator.http import BodyPlan, Request, Response, ServerHooks, json_response

#: the kinds of rule a FaultInjector knows
KINDS: tuple[str, ...] = ("latency", "error", "drop", "stall", "expire_session", "corrupt_checksum")

_IDS_CODES = {
    400: "BadRequestException",
    403: "InsufficientPrivilegesException",
    404: "NotFoundException",
    501: "NotImplementedException",
    503: "DataNotOnlineException",
}
_ICAT_CODES = {
    400: "BAD_PARAMETER",
    403: "SESSION",
    404: "NO_SUCH_OBJECT_FOUND",
    412: "VALIDATION",
    501: "NOT_IMPLEMENTED",
}


def api_error_body(api: str, status: int, message: str) -> dict[str, str]:
    """The JSON error body ``api`` (``ids``/``icat``/other) would send with ``status``.

    Never raises.
    """
    if api == "ids":
        return {"code": _IDS_CODES.get(status, "InternalException"), "message": message}
    if api == "icat":
        return {"code": _ICAT_CODES.get(status, "INTERNAL"), "message": message}
    return {"code": "INTERNAL", "message": message}


@dataclass
class FaultRule:
    """One fault rule (see the module docstring for the kinds and fields).

    Raises ValueError from ``__post_init__`` for an unknown kind or a value
    out of range.
    """

    kind: str
    endpoint: str | None = None
    probability: float = 1.0
    count: int | None = None
    seconds: float | None = None
    status: int = 500
    after_bytes: int = 0
    message: str | None = None
    id: int = 0

    def __post_init__(self) -> None:
        """Validate the rule; raises ValueError."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {', '.join(KINDS)}")
        if not 0.0 <= float(self.probability) <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        if self.count is not None and int(self.count) < 1:
            raise ValueError("count must be at least 1")
        if self.seconds is not None and float(self.seconds) < 0:
            raise ValueError("seconds must not be negative")
        if self.kind == "latency" and self.seconds is None:
            raise ValueError("a latency rule needs seconds")
        if not 400 <= int(self.status) <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        if int(self.after_bytes) < 0:
            raise ValueError("after_bytes must not be negative")
        if self.endpoint == "":
            self.endpoint = None

    def matches(self, endpoint: str) -> bool:
        """True when the rule applies to ``endpoint``. Never raises."""
        if self.endpoint is None:
            return True
        return endpoint == self.endpoint or fnmatch.fnmatchcase(endpoint, self.endpoint)

    def to_json(self) -> dict[str, Any]:
        """The rule as a JSON-able dict. Never raises."""
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FaultRule:
        """Build a rule from a dict of strings or typed values (CLI, admin API).

        Raises ValueError for unknown keys or unparsable values.
        """
        known = {f.name for f in dataclasses.fields(cls)} - {"id"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        if "kind" not in data:
            raise ValueError("a fault needs a kind")
        kwargs: dict[str, Any] = {}
        try:
            for key, value in data.items():
                if value is None or value == "":
                    continue
                if key in ("probability", "seconds"):
                    kwargs[key] = float(value)
                elif key in ("count", "status", "after_bytes"):
                    kwargs[key] = int(value)
                else:
                    kwargs[key] = str(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad fault value: {exc}") from exc
        return cls(**kwargs)

    @classmethod
    def parse(cls, spec: str) -> FaultRule:
        """Parse the CLI form ``KIND[:key=value,...]``.

        Example: ``error:status=503,endpoint=ids/getData,count=2``.
        Raises ValueError when malformed.
        """
        kind, _, rest = spec.partition(":")
        data: dict[str, str] = {"kind": kind.strip()}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"fault option {item!r} is not key=value")
            data[key.strip()] = value.strip()
        return cls.from_mapping(data)


def _session_of(request: Request) -> str | None:
    """The ICAT session id a request carries (query, form, or ICAT session path)."""
    sid = request.arg("sessionId")
    if sid is None and request.method in ("POST",):
        try:
            form = request.form()
        except Exception:  # noqa: BLE001 - a malformed body simply carries no session
            form = {}
        values = form.get("sessionId")
        sid = values[0] if values else None
    if sid is None:
        sid = request.path_params.get("sessionId")
    return sid


class Counters:
    """Thread-safe per-endpoint counts: requests, response body bytes, errors (>= 400).

    Constructing one never raises.
    """

    def __init__(self) -> None:
        """Start with everything at zero."""
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, int]] = {}

    def record(self, endpoint: str, status: int, bytes_sent: int) -> None:
        """Count one request to ``endpoint`` answered with ``status``. Never raises."""
        with self._lock:
            entry = self._data.setdefault(endpoint, {"requests": 0, "bytes_sent": 0, "errors": 0})
            entry["requests"] += 1
            entry["bytes_sent"] += bytes_sent
            if status >= 400:
                entry["errors"] += 1

    def add_bytes(self, endpoint: str, n: int) -> None:
        """Add ``n`` response body bytes to ``endpoint``. Never raises."""
        with self._lock:
            entry = self._data.setdefault(endpoint, {"requests": 0, "bytes_sent": 0, "errors": 0})
            entry["bytes_sent"] += n

    def get(self, endpoint: str) -> int:
        """Number of requests counted for ``endpoint`` (0 if none). Never raises."""
        with self._lock:
            return self._data.get(endpoint, {}).get("requests", 0)

    def __getitem__(self, endpoint: str) -> int:
        """Same as :meth:`get`."""
        return self.get(endpoint)

    def bytes_sent(self, endpoint: str | None = None) -> int:
        """Response body bytes sent for ``endpoint`` (None = all endpoints). Never raises."""
        with self._lock:
            if endpoint is None:
                return sum(e["bytes_sent"] for e in self._data.values())
            return self._data.get(endpoint, {}).get("bytes_sent", 0)

    def total(self, pattern: str | None = None) -> int:
        """Requests over all endpoints matching the shell-style ``pattern`` (None = all).

        Never raises.
        """
        with self._lock:
            return sum(
                e["requests"]
                for name, e in self._data.items()
                if pattern is None or fnmatch.fnmatchcase(name, pattern)
            )

    def snapshot(self) -> dict[str, dict[str, int]]:
        """A copy: endpoint -> {"requests", "bytes_sent", "errors"}. Never raises."""
        with self._lock:
            return {name: dict(entry) for name, entry in sorted(self._data.items())}

    def reset(self) -> None:
        """Set every counter back to zero. Never raises."""
        with self._lock:
            self._data.clear()


class FaultInjector(ServerHooks):
    """The rule set plus the server hooks that apply it (thread-safe).

    ``expire`` is the catalogue's ``expire(session_id=None) -> int`` (set by
    the Emulator); ``counters`` receives every non-admin request. Constructing one never raises.
    """

    def __init__(
        self,
        seed: int = 1,
        counters: Counters | None = None,
        expire: Callable[[str | None], int] | None = None,
    ) -> None:
        """No rules yet; random choices come from ``random.Random(seed)``."""
        self._lock = threading.Condition()
        self._rules: list[FaultRule] = []
        self._next_id = 1
        self._random = random.Random(seed)
        self._stall_generation = 0
        self._closed = False
        self.counters = counters if counters is not None else Counters()
        self.expire = expire
        #: how many times each kind fired (for tests)
        self.fired: dict[str, int] = dict.fromkeys(KINDS, 0)

    # ---------------------------------------------------------------- rule management

    def add(self, rule: FaultRule | None = None, /, **fields: Any) -> int:
        """Add ``rule`` (or a rule built from ``fields``); return its id.

        Raises ``ValueError`` for a bad rule and ``TypeError`` when both a rule and
        fields are given.
        """
        if rule is None:
            rule = FaultRule.from_mapping(fields)
        elif fields:
            raise TypeError("give either a FaultRule or keyword fields, not both")
        rule = dataclasses.replace(rule)
        with self._lock:
            rule.id = self._next_id
            self._next_id += 1
            self._rules.append(rule)
        return rule.id

    def latency(self, seconds: float, endpoint: str | None = None, **kw: Any) -> int:
        """Add ``seconds`` of latency to matching requests; returns the rule id.

        Raises ``ValueError`` for a value out of range and ``TypeError`` for an unknown
        keyword.
        """
        return self.add(FaultRule("latency", endpoint, seconds=seconds, **kw))

    def error(self, status: int = 500, endpoint: str | None = None, **kw: Any) -> int:
        """Answer matching requests with ``status`` and the API's error JSON; rule id.

        Raises ``ValueError`` for a value out of range and ``TypeError`` for an unknown
        keyword.
        """
        return self.add(FaultRule("error", endpoint, status=status, **kw))

    def drop(self, after_bytes: int = 0, endpoint: str | None = None, **kw: Any) -> int:
        """Close the connection after ``after_bytes`` body bytes; rule id.

        Raises ``ValueError`` for a value out of range and ``TypeError`` for an unknown
        keyword.
        """
        return self.add(FaultRule("drop", endpoint, after_bytes=after_bytes, **kw))

    def stall(
        self,
        after_bytes: int = 0,
        seconds: float | None = None,
        endpoint: str | None = None,
        **kw: Any,
    ) -> int:
        """Stop sending after ``after_bytes`` for ``seconds`` (None = until released).

        Raises ``ValueError`` for a value out of range and ``TypeError`` for an unknown
        keyword.
        """
        return self.add(
            FaultRule("stall", endpoint, after_bytes=after_bytes, seconds=seconds, **kw)
        )

    def expire_session(self, endpoint: str | None = None, **kw: Any) -> int:
        """Expire the session of matching requests just before they are handled; rule id.

        Raises ``ValueError`` for a value out of range and ``TypeError`` for an unknown
        keyword.
        """
        return self.add(FaultRule("expire_session", endpoint, **kw))

    def corrupt_checksum(self, endpoint: str | None = "ids/put", **kw: Any) -> int:
        """Make matching IDS ``put`` calls report (and register) a wrong CRC32; rule id.

        Raises ``ValueError`` for a value out of range and ``TypeError`` for an unknown
        keyword.
        """
        return self.add(FaultRule("corrupt_checksum", endpoint, **kw))

    def remove(self, rule_id: int) -> bool:
        """Remove one rule; True if it existed. Never raises."""
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) != before

    def rules(self) -> list[FaultRule]:
        """Copies of the active rules. Never raises."""
        with self._lock:
            return [dataclasses.replace(r) for r in self._rules]

    def clear(self) -> None:
        """Remove every rule and release every stalled stream. Never raises."""
        with self._lock:
            self._rules.clear()
        self.release_stalls()

    def release_stalls(self) -> None:
        """Let every currently stalled stream go on. Never raises."""
        with self._lock:
            self._stall_generation += 1
            self._lock.notify_all()

    def seed(self, seed: int) -> None:
        """Restart the random sequence from ``seed``. Never raises."""
        with self._lock:
            self._random.seed(seed)

    def close(self) -> None:
        """Release stalls for good (no stall blocks after this); used at shutdown. Never raises."""
        with self._lock:
            self._closed = True
        self.release_stalls()

    def expire_sessions(self, session_id: str | None = None) -> int:
        """Expire one session (or all) now; returns how many.

        Raises ``RuntimeError`` when no catalogue is attached, and what the catalogue's
        ``expire`` raises (``ICATException`` INTERNAL once it is closed).
        """
        if self.expire is None:
            raise RuntimeError("no catalogue attached to the fault injector")
        return self.expire(session_id)

    # ---------------------------------------------------------------- decisions

    def _take(self, kind: str, endpoint: str) -> list[FaultRule]:
        """The rules of ``kind`` that fire for this request (counts consumed)."""
        fired: list[FaultRule] = []
        with self._lock:
            for rule in list(self._rules):
                if rule.kind != kind or not rule.matches(endpoint):
                    continue
                if rule.probability < 1.0 and self._random.random() >= rule.probability:
                    continue
                fired.append(dataclasses.replace(rule))
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count <= 0:
                        self._rules.remove(rule)
            if fired:
                self.fired[kind] += len(fired)
        return fired

    def should_corrupt_checksum(self, endpoint: str = "ids/put") -> bool:
        """True when a ``corrupt_checksum`` rule fires for this ``put`` (consumes it).

        Never raises.
        """
        return bool(self._take("corrupt_checksum", endpoint))

    def _stall_for(self, seconds: float | None, generation: int) -> None:
        """Block until ``seconds`` passed or stalls planned in ``generation`` are released."""
        with self._lock:
            if self._closed:
                return
            deadline = None if seconds is None else time.monotonic() + seconds
            while self._stall_generation == generation and not self._closed:
                if deadline is None:
                    self._lock.wait(1.0)
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._lock.wait(left)

    # ---------------------------------------------------------------- server hooks

    @staticmethod
    def _exempt(request: Request) -> bool:
        return request.endpoint.startswith("admin/")

    def before(self, request: Request) -> Response | None:
        """Apply latency, session expiry and error rules to ``request``.

        Raises only what the catalogue's ``expire`` raises (``ICATException`` INTERNAL once
        the catalogue is closed), which the server answers with 500.
        """
        if self._exempt(request):
            return None
        endpoint = request.endpoint
        delay = sum(r.seconds or 0.0 for r in self._take("latency", endpoint))
        if delay > 0:
            time.sleep(delay)
        if self._take("expire_session", endpoint) and self.expire is not None:
            sid = _session_of(request)
            if sid:
                self.expire(sid)
        errors = self._take("error", endpoint)
        if errors:
            rule = errors[0]
            api = endpoint.split("/", 1)[0]
            message = rule.message or f"Injected fault: {rule.status} on {endpoint}"
            return json_response(api_error_body(api, rule.status, message), rule.status)
        return None

    def body_plan(self, request: Request, response: Response) -> BodyPlan | None:
        """Drop/stall plans for successful (2xx) response bodies. Never raises."""
        if self._exempt(request) or not 200 <= response.status < 300:
            return None
        drops = self._take("drop", request.endpoint)
        stalls = self._take("stall", request.endpoint)
        if not drops and not stalls:
            return None
        plan = BodyPlan()
        if drops:
            plan.drop_after = min(r.after_bytes for r in drops)
        if stalls:
            rule = stalls[0]
            plan.stall_after = rule.after_bytes
            # A release after the plan was made (the client may already have the
            # status line) must also release a stall the stream has not reached yet.
            with self._lock:
                generation = self._stall_generation
            plan.stall = lambda: self._stall_for(rule.seconds, generation)
        return plan

    def responding(self, request: Request, status: int) -> None:
        """Count the request and its status (admin requests are not counted). Never raises."""
        if not self._exempt(request):
            self.counters.record(request.endpoint, status, 0)

    def sending(self, request: Request, n: int) -> None:
        """Count ``n`` body bytes about to be sent. Never raises."""
        if not self._exempt(request):
            self.counters.add_bytes(request.endpoint, n)

    def to_json(self) -> dict[str, Any]:
        """Rules and fire counts, JSON-able (for ``GET /admin/faults``). Never raises."""
        with self._lock:
            return {
                "rules": [r.to_json() for r in self._rules],
                "fired": dict(self.fired),
            }


def parse_rules_json(text: str) -> list[FaultRule]:
    """Parse a JSON object or list of objects into rules; raises ValueError if malformed."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"fault JSON is not valid: {exc}") from exc
    items = data if isinstance(data, list) else [data]
    rules = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("a fault must be a JSON object")
        rules.append(FaultRule.from_mapping(item))
    return rules

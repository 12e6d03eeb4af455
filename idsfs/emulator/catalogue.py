"""The ICAT half of the emulator: :class:`Catalogue`, an ICAT on SQLite.

One SQLite file (``<data_dir>/catalogue.sqlite``) holds the entities of
:mod:`.schema` and the sessions, so a restart with the same data directory
keeps everything. The class is thread-safe: reads run concurrently on pooled
connections (WAL mode, each read one consistent snapshot), writes are
serialised by a lock and run in one transaction per call, so any error rolls
back the whole request (icat-rest.md §3.7).

Public API (the emulator contract)::

    Catalogue(db_path, settings)        close()
    login(plugin, credentials) -> sid   user_of(sid) -> user name
    session_info(sid) -> (user, remainingMinutes)
    refresh(sid)   logout(sid)   expire(sid=None) -> count   is_root(user)
    search(user, query) -> list         get(user, query, id) -> {"Entity": {...}}
    write(user, entities) -> [ids]      delete(user, entities)
    properties() -> dict

``user`` is an ICAT user name (``simple/<name>``), :data:`READER` (read
everything, write nothing) or a root name. All failures are
:class:`ICATException` with the code, message and ``offset`` the REST API
returns; the HTTP status is ``exc.status``.

Extras used by the REST layer and the IDS side:

* :meth:`Catalogue.parse_delete` — validates a DELETE ``entities`` document
  without a user (the REST layer does this before checking the session, as
  ICAT does); :meth:`delete` accepts its result.
* :meth:`Catalogue.is_logged_in` — for ``GET user/{name}``.
* :meth:`Catalogue.clone` — the ``cloner`` resource (copy an entity and its
  one-to-many children with some attributes changed).

Fast paths for IDS: none are needed beyond the public methods. A search such
as ``SELECT df.id, df.location, df.fileSize FROM Datafile df WHERE
df.dataset.id IN (...) AND df.location IS NOT NULL`` is one indexed SQL
statement (foreign keys and names are indexed; ``x.rel.id`` reads the foreign
key column without a join), a few milliseconds for thousands of rows.

Authorisation: see :mod:`.policy` (root users from ``settings.roots``; READ
conditions are part of the SQL of every search). The optional settings field
``writer_roles`` (a collection of InvestigationUser roles) restricts who may
create/update/delete Datasets and Datafiles; absent or None means any role.
"""

from __future__ import annotations

import hmac
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import policy
from .policy import READER
from .query import IncludeNode, build_include, compile_search, is_phantom, parse_get, parse_search
from .schema import (
    BOOLEAN,
    DATE,
    DOUBLE,
    ENTITIES,
    INTEGER,
    LONG,
    STRING,
    EntityDef,
    ICATException,
    bad,
    ddl,
    decode,
    format_date,
    now_ms,
    parse_date,
    q,
    render,
)

if TYPE_CHECKING:
    from .settings import EmulatorSettings

__all__ = ["READER", "Catalogue", "ICATException"]

#: the authenticator mnemonic the emulator offers
PLUGIN = "simple"
#: version reported by GET /icat/version
ICAT_VERSION = "6.2.1"
#: expired sessions are purged this many seconds after they expired (ICAT: hourly job)
PURGE_AFTER = 3600.0
_SERVER_FIELDS = frozenset({"createId", "createTime", "modId", "modTime"})
_INT_RANGE = {LONG: (-(2**63), 2**63 - 1), INTEGER: (-(2**31), 2**31 - 1)}
_POOL_SIZE = 16


def _session_error(message: str) -> ICATException:
    return ICATException("SESSION", message)


def _not_found(entity: str, entity_id: Any) -> ICATException:
    return ICATException("NO_SUCH_OBJECT_FOUND", f"{entity}[id:{entity_id}] not found.")


def _denied(access: str, entity: str) -> ICATException:
    return ICATException(
        "INSUFFICIENT_PRIVILEGES", f"{access} access to this {entity} is not allowed."
    )


def _java_length(text: str) -> int:
    """Length as Java counts it (UTF-16 code units)."""
    return len(text.encode("utf-16-le")) // 2


def _json_ids(ids: Any) -> str:
    return json.dumps(sorted(int(i) for i in ids))


class Catalogue:
    """An ICAT catalogue on SQLite: sessions, search/get/write/delete, authorisation.

    Raises :class:`ICATException` from every public method as ICAT would;
    ``sqlite3`` errors that should not happen become ``INTERNAL``.
    """

    def __init__(self, db_path: Path, settings: EmulatorSettings) -> None:
        """Open (creating if needed) the catalogue in ``db_path``."""
        self._path = str(db_path)
        self._settings = settings
        self._roots = frozenset(f"{PLUGIN}/{r}" for r in settings.roots)
        self._passwords = {name: pw.encode() for name, pw in settings.users.items()}
        self._lifetime = float(settings.session_minutes) * 60.0
        self._max = int(settings.max_entities)
        roles = getattr(settings, "writer_roles", None)
        self._writer_roles: str | None = json.dumps(sorted(roles)) if roles is not None else None
        self._pool: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._closed = False
        con = self._connect()
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("BEGIN IMMEDIATE")
            for stmt in ddl():
                con.execute(stmt)
            row = con.execute("SELECT value FROM icat_meta WHERE key = 'next_id'").fetchone()
            top = 0
            for e in ENTITIES.values():
                top = max(
                    top, con.execute(f"SELECT COALESCE(MAX(id), 0) FROM {e.table}").fetchone()[0]
                )
            self._next_id = max(top + 1, row[0] if row else 1)
            con.execute(
                "INSERT OR REPLACE INTO icat_meta (key, value) VALUES ('next_id', ?)",
                (self._next_id,),
            )
            con.execute("COMMIT")
        except BaseException:
            con.close()
            raise
        self._pool.append(con)

    # ---------------------------------------------------------------- connections
    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(
            self._path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA case_sensitive_like=ON")
        return con

    def _acquire(self) -> sqlite3.Connection:
        with self._pool_lock:
            if self._closed:
                raise ICATException("INTERNAL", "the catalogue is closed")
            if self._pool:
                return self._pool.pop()
        return self._connect()

    def _release(self, con: sqlite3.Connection) -> None:
        with self._pool_lock:
            if not self._closed and len(self._pool) < _POOL_SIZE:
                self._pool.append(con)
                return
        con.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        con = self._acquire()
        try:
            con.execute("BEGIN")
            try:
                yield con
            finally:
                if con.in_transaction:
                    con.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise ICATException("INTERNAL", f"database error: {exc}") from exc
        finally:
            self._release(con)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock:
            con = self._acquire()
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    yield con
                    con.execute(
                        "UPDATE icat_meta SET value = ? WHERE key = 'next_id'", (self._next_id,)
                    )
                    con.execute("COMMIT")
                except BaseException:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                    raise
            except sqlite3.IntegrityError as exc:
                raise ICATException("OBJECT_ALREADY_EXISTS", f"constraint violated: {exc}") from exc
            except sqlite3.Error as exc:
                raise ICATException("INTERNAL", f"database error: {exc}") from exc
            finally:
                self._release(con)

    def close(self) -> None:
        """Close every pooled connection; later calls fail with INTERNAL. Idempotent.

        Never raises.
        """
        with self._pool_lock:
            self._closed = True
            pool, self._pool = self._pool, []
        for con in pool:
            con.close()

    # ---------------------------------------------------------------- sessions
    def login(self, plugin: str, credentials: Mapping[str, str]) -> str:
        """Authenticate with ``plugin`` (only ``simple``) and return a new session id.

        The user name is ``simple/<username>``; a User entity of that name is
        created on first login. Raises SESSION for an unknown plugin, missing or
        wrong credentials.
        """
        if plugin != PLUGIN:
            raise _session_error(f"Authenticator mnemonic {plugin!r} not recognised")
        username = credentials.get("username")
        password = credentials.get("password")
        if not isinstance(username, str) or not username or not isinstance(password, str):
            raise _session_error("The simple authenticator needs a username and a password")
        expected = self._passwords.get(username)
        if expected is None or not hmac.compare_digest(expected, password.encode()):
            raise _session_error("The username and password do not match")
        user = f"{PLUGIN}/{username}"
        sid = str(uuid.uuid4())
        now = time.time()
        with self._write() as con:
            con.execute("DELETE FROM icat_session WHERE expires < ?", (now - PURGE_AFTER,))
            con.execute(
                "INSERT INTO icat_session (id, user_name, expires) VALUES (?, ?, ?)",
                (sid, user, now + self._lifetime),
            )
            if con.execute('SELECT 1 FROM "User" WHERE "name" = ?', (user,)).fetchone() is None:
                ts = now_ms()
                con.execute(
                    'INSERT INTO "User" (id, "createId", "createTime", "modId", "modTime", "name")'
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (self._alloc_id(), user, ts, user, ts, user),
                )
        return sid

    def _session_row(self, session_id: str | None) -> tuple[str, float]:
        if not session_id or not isinstance(session_id, str):
            raise _session_error("Unable to find user by sessionid")
        with self._read() as con:
            row = con.execute(
                "SELECT user_name, expires FROM icat_session WHERE id = ?", (session_id,)
            ).fetchone()
        if row is None:
            raise _session_error("Unable to find user by sessionid")
        return row[0], row[1]

    def user_of(self, session_id: str | None) -> str:
        """The user name of a live session; raises SESSION if missing, unknown or expired."""
        user, expires = self._session_row(session_id)
        if expires <= time.time():
            raise _session_error("Session has expired")
        return user

    def session_info(self, session_id: str) -> tuple[str, float]:
        """``(userName, remainingMinutes)`` of a live session; raises SESSION otherwise."""
        user, expires = self._session_row(session_id)
        remaining = expires - time.time()
        if remaining <= 0:
            raise _session_error("Session has expired")
        return user, remaining / 60.0

    def refresh(self, session_id: str) -> None:
        """Reset the expiry to now + lifetime (also for an expired, not yet purged session).

        Raises SESSION for an unknown session id.
        """
        self._session_row(session_id)
        with self._write() as con:
            cur = con.execute(
                "UPDATE icat_session SET expires = ? WHERE id = ?",
                (time.time() + self._lifetime, session_id),
            )
            if cur.rowcount == 0:
                raise _session_error("Unable to find user by sessionid")

    def logout(self, session_id: str) -> None:
        """Remove the session (also when expired); raises SESSION for an unknown id."""
        if not session_id or not isinstance(session_id, str):
            raise _session_error("Unable to find user by sessionid")
        with self._write() as con:
            cur = con.execute("DELETE FROM icat_session WHERE id = ?", (session_id,))
            if cur.rowcount == 0:
                raise _session_error("Unable to find user by sessionid")

    def expire(self, session_id: str | None = None) -> int:
        """Fault injection: make one session (or all) expired now; return how many were live.

        Expired sessions can still be refreshed (as in ICAT until the purge).

        Raises ``ICATException`` INTERNAL when the catalogue is closed or its database fails.
        """
        now = time.time()
        with self._write() as con:
            if session_id is None:
                cur = con.execute(
                    "UPDATE icat_session SET expires = ? WHERE expires > ?", (now - 0.001, now)
                )
            else:
                cur = con.execute(
                    "UPDATE icat_session SET expires = ? WHERE id = ? AND expires > ?",
                    (now - 0.001, session_id, now),
                )
            return cur.rowcount

    def is_logged_in(self, user: str) -> bool:
        """True when ``user`` holds at least one live session.

        Raises ``ICATException`` INTERNAL when the catalogue is closed or its database
        fails.
        """
        with self._read() as con:
            row = con.execute(
                "SELECT 1 FROM icat_session WHERE user_name = ? AND expires > ? LIMIT 1",
                (user, time.time()),
            ).fetchone()
        return row is not None

    def is_root(self, user: str) -> bool:
        """True for the ICAT root users (``simple/<name>`` for each of ``settings.roots``).

        Never raises.
        """
        return user in self._roots

    def properties(self) -> dict[str, Any]:
        """The ``GET properties`` object (icat-rest.md §3.9). Never raises."""
        minutes = self._lifetime / 60.0
        return {
            "maxEntities": self._max,
            "lifetimeMinutes": int(minutes) if minutes.is_integer() else minutes,
            "authenticators": [
                {
                    "mnemonic": PLUGIN,
                    "keys": [{"name": "username"}, {"name": "password", "hide": True}],
                    "friendly": "Simple",
                }
            ],
            "containerType": "Emulator",
        }

    # ---------------------------------------------------------------- reading
    def _unrestricted(self, user: str) -> bool:
        return user in self._roots or user == READER

    def search(self, user: str, query: str) -> list[Any]:
        """Run a search query (icat-rest.md §4) for ``user``; rows it may not read are absent.

        Entities come wrapped by type name, single scalars bare, several items
        as arrays. Raises BAD_PARAMETER for syntax errors and unknown names,
        VALIDATION when more than ``maxEntities`` rows or entities would be
        returned.
        """
        if not isinstance(query, str) or not query.strip():
            raise bad("query must not be empty")
        parsed = parse_search(query)
        restricted = not self._unrestricted(user)
        compiled = compile_search(parsed, user, restricted, self._max)
        with self._read() as con:
            rows = con.execute(compiled.sql, compiled.params).fetchall()
            if len(rows) > self._max:
                raise self._too_many()
            items = compiled.items
            pairs: list[tuple[Any, dict[str, Any]]] = []
            out: list[Any] = []
            if len(items) == 1:
                it = items[0]
                if it.entity is not None:
                    name = it.entity.name
                    for row in rows:
                        if row[0] is None:
                            out.append(None)
                            continue
                        d = render(it.entity, row)
                        pairs.append((row, d))
                        out.append({name: d})
                else:
                    fn = _DECODERS.get(it.kind or STRING)
                    if fn is None:
                        out = [row[0] for row in rows]
                    else:
                        out = [None if row[0] is None else fn(row[0]) for row in rows]
            elif all(it.entity is None for it in items):
                decoders = [(it.start, _DECODERS.get(it.kind or STRING)) for it in items]
                out = [
                    [row[i] if fn is None or row[i] is None else fn(row[i]) for i, fn in decoders]
                    for row in rows
                ]
            else:
                for row in rows:
                    out.append([self._item_value(it, row) for it in items])
            if compiled.include is not None and pairs:
                self._include(con, user, restricted, compiled.include, pairs, len(pairs))
        return out

    @staticmethod
    def _item_value(it: Any, row: tuple[Any, ...]) -> Any:
        if it.entity is None:
            return _scalar(it.kind or STRING, row[it.start])
        part = row[it.start : it.start + it.width]
        if part[0] is None:
            return None
        return {it.entity.name: render(it.entity, part)}

    def _too_many(self) -> ICATException:
        return ICATException("VALIDATION", f"attempt to return more than {self._max} entities")

    def _fetch(
        self,
        con: sqlite3.Connection,
        user: str,
        restricted: bool,
        e: EntityDef,
        column: str,
        ids: set[Any],
    ) -> list[tuple[Any, ...]]:
        """Rows of ``e`` whose ``column`` is in ``ids`` and which ``user`` may read."""
        if not ids:
            return []
        cols = ", ".join(f"a.{q(c)}" for c in e.columns)
        sql = (
            f"SELECT {cols} FROM {e.table} a WHERE a.{q(column)} IN "
            "(SELECT value FROM json_each(:ids))"
        )
        if restricted:
            cond = policy.read_condition(e.name, policy.alias_columns("a"))
            if cond is not None:
                sql += f" AND ({cond})"
        sql += " ORDER BY a.id"
        return con.execute(sql, {"ids": _json_ids(ids), "u": user}).fetchall()

    def _include(
        self,
        con: sqlite3.Connection,
        user: str,
        restricted: bool,
        node: IncludeNode,
        pairs: list[tuple[Any, dict[str, Any]]],
        counted: int,
    ) -> int:
        """Fill the included relationships of ``pairs`` (row, JSON) per ``node``.

        Returns the running count of returned entities; raises VALIDATION when
        it exceeds ``maxEntities``.
        """
        e = node.entity
        for fname, child in node.children.items():
            if is_phantom(child):
                continue
            new_pairs: list[tuple[Any, dict[str, Any]]] = []
            if fname in e.many_by_name:
                rel = e.many_by_name[fname]
                idx = e.columns.index(rel.column)
                ids = {row[idx] for row, _ in pairs if row[idx] is not None}
                found = {
                    r[0]: r for r in self._fetch(con, user, restricted, child.entity, "id", ids)
                }
                for row, d in pairs:
                    r = found.get(row[idx])
                    if r is not None:
                        dd = render(child.entity, r)
                        d[fname] = dd
                        new_pairs.append((r, dd))
            else:
                orel = e.ones_by_name[fname]
                target = child.entity
                col = target.many_by_name[orel.mapped_by].column
                cidx = target.columns.index(col)
                ids = {row[0] for row, _ in pairs}
                groups: dict[Any, list[tuple[Any, ...]]] = {}
                for r in self._fetch(con, user, restricted, target, col, ids):
                    groups.setdefault(r[cidx], []).append(r)
                for row, d in pairs:
                    lst = []
                    for r in groups.get(row[0], ()):
                        dd = render(target, r)
                        lst.append(dd)
                        new_pairs.append((r, dd))
                    d[fname] = lst
            counted += len(new_pairs)
            if counted > self._max:
                raise self._too_many()
            if child.children and new_pairs:
                counted = self._include(con, user, restricted, child, new_pairs, counted)
        return counted

    def get(self, user: str, query: str, entity_id: int) -> dict[str, Any]:
        """Get one entity by id: ``{"Dataset": {...}}`` with the INCLUDEs of ``query``.

        ``query`` is ``Entity [var] [INCLUDE ...]``. Raises BAD_PARAMETER for a
        bad query, NO_SUCH_OBJECT_FOUND when the id does not exist (checked
        first), INSUFFICIENT_PRIVILEGES when ``user`` may not read it.
        """
        if not isinstance(query, str) or not query.strip():
            raise bad("query must not be empty")
        g = parse_get(query)
        e = ENTITIES[g.entity]
        include = build_include(e, g.var, g.include)
        if isinstance(entity_id, bool) or not isinstance(entity_id, int):
            raise bad(f"id must be an integer, not {entity_id!r}")
        restricted = not self._unrestricted(user)
        with self._read() as con:
            cols = ", ".join(f"a.{q(c)}" for c in e.columns)
            row = con.execute(
                f"SELECT {cols} FROM {e.table} a WHERE a.id = ?", (entity_id,)
            ).fetchone()
            if row is None:
                raise _not_found(e.name, entity_id)
            if restricted and not self._allowed_read(con, user, e, entity_id):
                raise _denied("READ", e.name)
            d = render(e, row)
            if include is not None:
                self._include(con, user, restricted, include, [(row, d)], 1)
        return {e.name: d}

    def _allowed_read(
        self, con: sqlite3.Connection, user: str, e: EntityDef, entity_id: int
    ) -> bool:
        cond = policy.read_condition(e.name, policy.alias_columns("a"))
        if cond is None:
            return True
        sql = f"SELECT 1 FROM {e.table} a WHERE a.id = :id AND ({cond})"
        return con.execute(sql, {"id": entity_id, "u": user}).fetchone() is not None

    # ---------------------------------------------------------------- writing
    def _alloc_id(self) -> int:
        """Next id of the global sequence (call with the write lock held)."""
        i = self._next_id
        self._next_id += 1
        return i

    def _may_write(self, con: sqlite3.Connection, user: str, e: EntityDef, entity_id: int) -> bool:
        if user in self._roots:
            return True
        if user == READER:
            return False
        cond = policy.write_condition(
            e.name, policy.alias_columns("a"), self._writer_roles is not None
        )
        sql = f"SELECT 1 FROM {e.table} a WHERE a.id = :id AND ({cond})"
        params = {"id": entity_id, "u": user, "wr": self._writer_roles}
        return con.execute(sql, params).fetchone() is not None

    def write(self, user: str, entities: str | Any) -> list[int]:
        """Create/update entities (POST entityManager); return the new top-level ids in order.

        ``entities``: the JSON text (or its parsed value), one object or an
        array of ``{"Entity": {...}}``. Everything runs in one transaction. Errors
        carry ``offset`` = index of the failing top-level entity: BAD_PARAMETER
        (not JSON, bad shape, unknown entity/field, wrong value type),
        NO_SUCH_OBJECT_FOUND (referenced or updated id missing), VALIDATION
        (not-null, length), OBJECT_ALREADY_EXISTS (uniqueness),
        INSUFFICIENT_PRIVILEGES.

        Raises ``ICATException`` with those codes (INTERNAL when the catalogue is closed or
        its database fails).
        """
        data = entities
        if isinstance(entities, str | bytes):
            try:
                data = json.loads(entities)
            except ValueError as exc:
                shown = entities if len(entities) <= 200 else entities[:200] + "..."
                raise bad(f"{exc} in json {shown!r}", 0) from exc
        items = data if isinstance(data, list) else [data]
        ids: list[int] = []
        with self._write() as con:
            for index, el in enumerate(items):
                try:
                    if not isinstance(el, dict) or len(el) != 1:
                        raise bad("each entity must be an object with exactly one key, its type")
                    name, body = next(iter(el.items()))
                    if name not in ENTITIES:
                        raise bad(f"Unknown entity type {name!r}")
                    if not isinstance(body, dict):
                        raise bad(f"The value of {name} must be a JSON object")
                    e = ENTITIES[name]
                    if "id" in body:
                        self._update(con, user, e, body)
                    else:
                        ids.append(self._create(con, user, e, body, None))
                except ICATException as exc:
                    exc.offset = index
                    raise
        return ids

    def _parse_fields(
        self, con: sqlite3.Connection, e: EntityDef, body: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[tuple[Any, list[Any]]], list[tuple[EntityDef, dict[str, Any]]]]:
        """Convert a JSON body to column values, one-to-many children and nested updates."""
        values: dict[str, Any] = {}
        children: list[tuple[Any, list[Any]]] = []
        nested: list[tuple[EntityDef, dict[str, Any]]] = []
        for key, val in body.items():
            if key == "id" or key in _SERVER_FIELDS:
                continue
            if key in e.attr_by_name:
                values[key] = _convert(e, e.attr_by_name[key], val)
            elif key in e.many_by_name:
                rel = e.many_by_name[key]
                target = ENTITIES[rel.target]
                if val is None:
                    values[rel.column] = None
                    continue
                if not isinstance(val, dict):
                    raise bad(f"{e.name}.{key} must be an object with an id")
                if "id" not in val:
                    raise bad(f"{e.name}.{key} must reference an existing {target.name} by its id")
                rid = _int_id(val["id"], f"{e.name}.{key}.id")
                if (
                    con.execute(f"SELECT 1 FROM {target.table} WHERE id = ?", (rid,)).fetchone()
                    is None
                ):
                    raise _not_found(target.name, rid)
                values[rel.column] = rid
                if len(val) > 1:
                    nested.append((target, val))
            elif key in e.ones_by_name:
                if not isinstance(val, list):
                    raise bad(f"{e.name}.{key} must be an array")
                for child in val:
                    if not isinstance(child, dict):
                        raise bad(f"the elements of {e.name}.{key} must be objects")
                    if "id" in child:
                        raise bad(
                            f"the elements of {e.name}.{key} are created and must not have an id"
                        )
                children.append((e.ones_by_name[key], val))
            elif key in e.phantoms:
                if val not in (None, []):
                    raise bad(f"{e.name}.{key} is not supported by this ICAT emulator")
            else:
                raise bad(f"Field {key} not found in {e.name}")
        return values, children, nested

    def _validate(self, e: EntityDef, row: Mapping[str, Any]) -> None:
        for a in e.attrs:
            v = row.get(a.name)
            if v is None:
                if a.not_null:
                    raise ICATException("VALIDATION", f"{e.name}: {a.name} cannot be null.")
            elif a.kind == STRING and _java_length(v) > a.length:
                raise ICATException(
                    "VALIDATION", f"{e.name}: {a.name} cannot have length > {a.length}"
                )
        for m in e.many:
            if m.not_null and row.get(m.column) is None:
                raise ICATException("VALIDATION", f"{e.name}: {m.name} cannot be null.")

    def _check_unique(
        self, con: sqlite3.Connection, e: EntityDef, row: Mapping[str, Any], exclude: int | None
    ) -> None:
        if not e.unique:
            return
        conds: list[str] = []
        params: list[Any] = []
        shown: list[str] = []
        for f in e.unique:
            if f in e.many_by_name:
                col = e.many_by_name[f].column
                shown.append(f"{f} = 'id:{row.get(col)}'")
            else:
                col = f
                shown.append(f"{f} = '{decode(e.attr_by_name[f].kind, row.get(col))}'")
            conds.append(f"{q(col)} IS ?")
            params.append(row.get(col))
        sql = f"SELECT id FROM {e.table} WHERE {' AND '.join(conds)}"
        if exclude is not None:
            sql += " AND id <> ?"
            params.append(exclude)
        if con.execute(sql + " LIMIT 1", params).fetchone() is not None:
            raise ICATException("OBJECT_ALREADY_EXISTS", f"{e.name} exists with {', '.join(shown)}")

    def _create(
        self,
        con: sqlite3.Connection,
        user: str,
        e: EntityDef,
        body: Mapping[str, Any],
        parent: tuple[str, int] | None,
    ) -> int:
        values, children, nested = self._parse_fields(con, e, body)
        if parent is not None:
            values[parent[0]] = parent[1]
        for a in e.attrs:
            if a.name not in values and a.default is not None:
                values[a.name] = int(a.default) if a.kind == BOOLEAN else a.default
        self._validate(e, values)
        self._check_unique(con, e, values, None)
        new_id = self._alloc_id()
        ts = now_ms()
        values.update(id=new_id, createId=user, createTime=ts, modId=user, modTime=ts)
        cols = e.columns
        con.execute(
            f"INSERT INTO {e.table} ({', '.join(q(c) for c in cols)}) "
            f"VALUES ({', '.join('?' for _ in cols)})",
            [values.get(c) for c in cols],
        )
        if not self._may_write(con, user, e, new_id):
            raise _denied("CREATE", e.name)
        self._write_related(con, user, nested, children, new_id)
        return new_id

    def _update(
        self, con: sqlite3.Connection, user: str, e: EntityDef, body: Mapping[str, Any]
    ) -> None:
        entity_id = _int_id(body["id"], f"{e.name}.id")
        cols = e.columns
        row = con.execute(
            f"SELECT {', '.join(q(c) for c in cols)} FROM {e.table} WHERE id = ?", (entity_id,)
        ).fetchone()
        if row is None:
            raise _not_found(e.name, entity_id)
        if not self._may_write(con, user, e, entity_id):
            raise _denied("UPDATE", e.name)
        values, children, nested = self._parse_fields(con, e, body)
        current = dict(zip(cols, row, strict=True))
        key_rel_changed = any(
            current[e.many_by_name[f].column] != values[e.many_by_name[f].column]
            for f in e.unique
            if f in e.many_by_name and e.many_by_name[f].column in values
        )
        if key_rel_changed and not self._may_write(con, user, e, entity_id):
            raise _denied("DELETE", e.name)
        changed = {c: v for c, v in values.items() if current.get(c) != v}
        if changed:
            merged = {**current, **values}
            self._validate(e, merged)
            unique_cols = {e.many_by_name[f].column if f in e.many_by_name else f for f in e.unique}
            if unique_cols & changed.keys():
                self._check_unique(con, e, merged, entity_id)
            changed.update(modId=user, modTime=now_ms())
            sets = ", ".join(f"{q(c)} = ?" for c in changed)
            con.execute(f"UPDATE {e.table} SET {sets} WHERE id = ?", [*changed.values(), entity_id])
            if key_rel_changed and not self._may_write(con, user, e, entity_id):
                raise _denied("CREATE", e.name)
        else:
            self._validate(e, current)
        self._write_related(con, user, nested, children, entity_id)

    def _write_related(
        self,
        con: sqlite3.Connection,
        user: str,
        nested: list[tuple[EntityDef, dict[str, Any]]],
        children: list[tuple[Any, list[Any]]],
        owner_id: int,
    ) -> None:
        """Update the nested many-to-one objects given with ids and create the
        one-to-many children given inline, pointing at ``owner_id``."""
        for target, val in nested:
            self._update(con, user, target, val)
        for orel, lst in children:
            child_e = ENTITIES[orel.target]
            col = child_e.many_by_name[orel.mapped_by].column
            for child in lst:
                self._create(con, user, child_e, child, (col, owner_id))

    # ---------------------------------------------------------------- deleting
    @staticmethod
    def parse_delete(entities: str | Any) -> list[tuple[str, int]]:
        """Validate a DELETE ``entities`` document; return ``[(entity name, id), ...]``.

        Each element must be ``{"Entity": {"id": N}}`` with nothing but ``id``.
        Raises BAD_PARAMETER (without offset) otherwise.
        """
        data = entities
        if isinstance(entities, str | bytes):
            try:
                data = json.loads(entities)
            except ValueError as exc:
                shown = entities if len(entities) <= 200 else entities[:200] + "..."
                raise bad(f"{exc} in json {shown!r}") from exc
        items = data if isinstance(data, list) else [data]
        out: list[tuple[str, int]] = []
        for el in items:
            if isinstance(el, tuple) and len(el) == 2 and el[0] in ENTITIES:
                out.append((el[0], _int_id(el[1], f"{el[0]}.id")))
                continue
            if not isinstance(el, dict) or len(el) != 1:
                raise bad("each entity must be an object with exactly one key, its type")
            name, body = next(iter(el.items()))
            if name not in ENTITIES:
                raise bad(f"Unknown entity type {name!r}")
            if not isinstance(body, dict) or set(body) != {"id"}:
                raise bad(f"only the id may be given for an entity to delete ({name})")
            out.append((name, _int_id(body["id"], f"{name}.id")))
        return out

    def delete(self, user: str, entities: str | Any) -> None:
        """Delete entities and, cascading, all their one-to-many children (one transaction).

        ``entities``: JSON text, its parsed value, or the result of
        :meth:`parse_delete`. DELETE permission is needed on every removed
        object. Raises BAD_PARAMETER (shape), NO_SUCH_OBJECT_FOUND and
        INSUFFICIENT_PRIVILEGES with ``offset`` = index of the failing element.
        """
        items = self.parse_delete(entities)
        with self._write() as con:
            for index, (name, entity_id) in enumerate(items):
                try:
                    self._delete_one(con, user, ENTITIES[name], entity_id)
                except ICATException as exc:
                    exc.offset = index
                    raise

    def _delete_one(self, con: sqlite3.Connection, user: str, e: EntityDef, entity_id: int) -> None:
        if con.execute(f"SELECT 1 FROM {e.table} WHERE id = ?", (entity_id,)).fetchone() is None:
            raise _not_found(e.name, entity_id)
        doomed: dict[str, set[int]] = {e.name: {entity_id}}
        frontier: list[tuple[EntityDef, set[int]]] = [(e, {entity_id})]
        while frontier:
            nxt: list[tuple[EntityDef, set[int]]] = []
            for parent, ids in frontier:
                for orel in parent.ones:
                    child = ENTITIES[orel.target]
                    col = child.many_by_name[orel.mapped_by].column
                    found = {
                        r[0]
                        for r in con.execute(
                            f"SELECT id FROM {child.table} WHERE {q(col)} IN "
                            "(SELECT value FROM json_each(?))",
                            (_json_ids(ids),),
                        )
                    }
                    found -= doomed.setdefault(child.name, set())
                    if found:
                        doomed[child.name] |= found
                        nxt.append((child, found))
            frontier = nxt
        if user not in self._roots:
            for name, ids in doomed.items():
                if ids and not self._may_write_all(con, user, ENTITIES[name], ids):
                    raise _denied("DELETE", name)
        for name, ids in doomed.items():
            if ids:
                con.execute(
                    f"DELETE FROM {ENTITIES[name].table} WHERE id IN "
                    "(SELECT value FROM json_each(?))",
                    (_json_ids(ids),),
                )

    def _may_write_all(
        self, con: sqlite3.Connection, user: str, e: EntityDef, ids: set[int]
    ) -> bool:
        if user == READER:
            return False
        cond = policy.write_condition(
            e.name, policy.alias_columns("a"), self._writer_roles is not None
        )
        sql = (
            f"SELECT COUNT(*) FROM {e.table} a WHERE a.id IN (SELECT value FROM json_each(:ids))"
            f" AND ({cond})"
        )
        params = {"ids": _json_ids(ids), "u": user, "wr": self._writer_roles}
        return con.execute(sql, params).fetchone()[0] == len(ids)

    # ---------------------------------------------------------------- cloning
    def clone(self, user: str, entity: str, entity_id: int, keys: Mapping[str, Any]) -> int:
        """Copy an entity with its one-to-many children; ``keys`` overrides attributes.

        Returns the new id. Needs READ on the original and CREATE on every copy.
        Raises BAD_PARAMETER, NO_SUCH_OBJECT_FOUND, INSUFFICIENT_PRIVILEGES,
        VALIDATION or OBJECT_ALREADY_EXISTS like :meth:`write`.
        """
        if entity not in ENTITIES:
            raise bad(f"Unknown entity type {entity!r}")
        e = ENTITIES[entity]
        with self._write() as con:
            cols = ", ".join(q(c) for c in e.columns)
            row = con.execute(f"SELECT {cols} FROM {e.table} WHERE id = ?", (entity_id,)).fetchone()
            if row is None:
                raise _not_found(e.name, entity_id)
            if not self._unrestricted(user) and not self._allowed_read(con, user, e, entity_id):
                raise _denied("READ", e.name)
            values, children, _ = self._parse_fields(con, e, keys)
            if children:
                raise bad("only attributes and many-to-one relationships may be changed by clone")
            return self._clone_row(con, user, e, row, values)

    def _clone_row(
        self,
        con: sqlite3.Connection,
        user: str,
        e: EntityDef,
        row: tuple[Any, ...],
        values: dict[str, Any],
    ) -> int:
        current = dict(zip(e.columns, row, strict=True))
        merged = {**current, **values}
        self._validate(e, merged)
        self._check_unique(con, e, merged, None)
        new_id = self._alloc_id()
        ts = now_ms()
        merged.update(id=new_id, createId=user, createTime=ts, modId=user, modTime=ts)
        con.execute(
            f"INSERT INTO {e.table} ({', '.join(q(c) for c in e.columns)}) "
            f"VALUES ({', '.join('?' for _ in e.columns)})",
            [merged[c] for c in e.columns],
        )
        if not self._may_write(con, user, e, new_id):
            raise _denied("CREATE", e.name)
        for orel in e.ones:
            child = ENTITIES[orel.target]
            col = child.many_by_name[orel.mapped_by].column
            ccols = ", ".join(q(c) for c in child.columns)
            for crow in con.execute(
                f"SELECT {ccols} FROM {child.table} WHERE {q(col)} = ? ORDER BY id", (row[0],)
            ).fetchall():
                self._clone_row(con, user, child, crow, {col: new_id})
        return new_id


# ---------------------------------------------------------------- value conversion
#: stored value -> JSON value per result kind (absent: the value as stored)
_DECODERS: dict[str, Any] = {DATE: format_date, BOOLEAN: bool, DOUBLE: float, "count": int}


def _scalar(kind: str, value: Any) -> Any:
    if value is None:
        return None
    fn = _DECODERS.get(kind)
    return value if fn is None else fn(value)


def _int_id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{what} must be an integer, not {json.dumps(value)}")
    return value


def _convert(e: EntityDef, a: Any, val: Any) -> Any:
    """A JSON value for attribute ``a`` -> the stored value; BAD_PARAMETER if the type is wrong."""
    if val is None:
        return None
    where = f"{e.name}.{a.name}"
    if a.kind == STRING:
        if not isinstance(val, str):
            raise bad(f"{where} must be a string, not {json.dumps(val)}")
        return val
    if a.kind in (LONG, INTEGER):
        if isinstance(val, bool) or not isinstance(val, int):
            raise bad(f"{where} must be an integer, not {json.dumps(val)}")
        lo, hi = _INT_RANGE[a.kind]
        if not lo <= val <= hi:
            raise bad(f"{where} is out of range: {val}")
        return val
    if a.kind == DOUBLE:
        if isinstance(val, bool) or not isinstance(val, int | float):
            raise bad(f"{where} must be a number, not {json.dumps(val)}")
        return float(val)
    if a.kind == BOOLEAN:
        if not isinstance(val, bool):
            raise bad(f"{where} must be true or false, not {json.dumps(val)}")
        return 1 if val else 0
    if a.kind == DATE:
        if not isinstance(val, str):
            raise bad(f"Badly formatted date for {where}: {json.dumps(val)}")
        return parse_date(val)
    raise bad(f"{where} has an unsupported type")

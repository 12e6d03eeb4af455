"""The ICAT entity model of the emulator (icat-rest.md §6) and its SQLite tables.

Every entity is described once by an :class:`EntityDef`: its attributes (type,
maximum string length, not-null, default), its many-to-one relationships
(stored as a foreign-key column ``<field>_id``), its one-to-many relationships
(the inverse of a many-to-one of the child entity; in ICAT they all cascade on
delete) and its uniqueness constraint. The catalogue (writes, rendering) and
the query compiler (paths, joins) work only from these definitions.

"Phantom" one-to-many fields are relationships of the real ICAT schema whose
target entity the emulator does not model (parameters, samples, keywords, ...).
They appear in entity JSON as empty arrays, as ICAT's do when nothing is
linked, may be named in an INCLUDE (they stay empty) and may be given as empty
arrays on create; anything else about them is answered with BAD_PARAMETER.

The SQLite layout: one table per entity, named like the entity (quoted), with
``id INTEGER PRIMARY KEY``, the common columns ``createId``, ``createTime``,
``modId``, ``modTime``, one column per attribute (dates as epoch milliseconds,
booleans as 0/1) and one ``<field>_id`` column per many-to-one relationship.
Ids come from one global sequence (like ICAT's), so an id is unique across
entity types and never reused.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

#: HTTP status of each ICAT error code (icat-rest.md §2.2)
ERROR_STATUS: dict[str, int] = {
    "BAD_PARAMETER": 400,
    "SESSION": 403,
    "INSUFFICIENT_PRIVILEGES": 403,
    "NO_SUCH_OBJECT_FOUND": 404,
    "OBJECT_ALREADY_EXISTS": 412,
    "VALIDATION": 412,
    "INTERNAL": 500,
    "NOT_IMPLEMENTED": 501,
}


class ICATException(Exception):
    """An ICAT error: ``code`` (e.g. ``BAD_PARAMETER``), ``message``, ``offset``.

    ``offset`` is the index of the offending top-level entity of a write or
    delete request (icat-rest.md §2.1), None everywhere else. ``status`` is
    the HTTP status of the code. Messages never contain session ids or
    passwords.

    Raised by the catalogue and the ICAT handlers; constructing one raises
    ``ValueError`` for an unknown ``code``.
    """

    def __init__(self, code: str, message: str, offset: int | None = None) -> None:
        """Create the error; raises ValueError for an unknown ``code``."""
        if code not in ERROR_STATUS:
            raise ValueError(f"unknown ICAT error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.offset = offset

    @property
    def status(self) -> int:
        """The HTTP status for this error's code. Never raises."""
        return ERROR_STATUS[self.code]

    def to_json(self) -> dict[str, Any]:
        """The error body: ``code``, ``message`` and, when set, ``offset``. Never raises."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.offset is not None:
            body["offset"] = self.offset
        return body

    def __repr__(self) -> str:
        """Code, message and offset."""
        return f"ICATException({self.code!r}, {self.message!r}, offset={self.offset!r})"


def bad(message: str, offset: int | None = None) -> ICATException:
    """A BAD_PARAMETER error (helper). Never raises."""
    return ICATException("BAD_PARAMETER", message, offset)


#: attribute kinds
STRING = "string"
LONG = "long"
INTEGER = "int"
DOUBLE = "double"
BOOLEAN = "bool"
DATE = "date"

#: fields every entity has (EntityBaseBean); server-set
COMMON_FIELDS: tuple[str, ...] = ("id", "createId", "createTime", "modId", "modTime")


@dataclass(frozen=True)
class Attr:
    """A plain attribute: ``kind`` is one of the kind constants above.

    Constructing one never raises.
    """

    name: str
    kind: str = STRING
    length: int = 255
    not_null: bool = False
    default: object = None


@dataclass(frozen=True)
class ManyToOne:
    """A reference to one entity of type ``target`` (column ``<name>_id``).

    Constructing one never raises.
    """

    name: str
    target: str
    not_null: bool = False

    @property
    def column(self) -> str:
        """The foreign-key column holding the referenced id. Never raises."""
        return f"{self.name}_id"


@dataclass(frozen=True)
class OneToMany:
    """The children of type ``target`` whose many-to-one ``mapped_by`` points here.

    Constructing one never raises.
    """

    name: str
    target: str
    mapped_by: str


@dataclass
class EntityDef:
    """One entity type: attributes, relationships, uniqueness constraint.

    Constructing one never raises.
    """

    name: str
    attrs: tuple[Attr, ...]
    many: tuple[ManyToOne, ...] = ()
    ones: tuple[OneToMany, ...] = ()
    unique: tuple[str, ...] = ()
    phantoms: tuple[str, ...] = ()
    attr_by_name: dict[str, Attr] = field(init=False, repr=False)
    many_by_name: dict[str, ManyToOne] = field(init=False, repr=False)
    ones_by_name: dict[str, OneToMany] = field(init=False, repr=False)
    #: column names in the order of :attr:`columns` (used by SELECTs and rendering)
    columns: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Build the lookup tables."""
        self.attr_by_name = {a.name: a for a in self.attrs}
        self.many_by_name = {m.name: m for m in self.many}
        self.ones_by_name = {o.name: o for o in self.ones}
        self.columns = (
            *COMMON_FIELDS,
            *(a.name for a in self.attrs),
            *(m.column for m in self.many),
        )

    @property
    def table(self) -> str:
        """The quoted SQL table name. Never raises."""
        return q(self.name)

    def has_field(self, name: str) -> bool:
        """True when ``name`` is any field of this entity (also phantom/common). Never raises."""
        return (
            name in COMMON_FIELDS
            or name in self.attr_by_name
            or name in self.many_by_name
            or name in self.ones_by_name
            or name in self.phantoms
        )


def q(identifier: str) -> str:
    """Quote an SQL identifier (only ever applied to names from the schema). Never raises."""
    return '"' + identifier.replace('"', '""') + '"'


def _s(name: str, length: int = 255, not_null: bool = False) -> Attr:
    return Attr(name, STRING, length, not_null)


ENTITIES: dict[str, EntityDef] = {
    e.name: e
    for e in (
        EntityDef(
            "Facility",
            attrs=(
                _s("name", not_null=True),
                _s("fullName"),
                _s("description", 1023),
                _s("url"),
                Attr("daysUntilRelease", INTEGER),
            ),
            ones=(
                OneToMany("investigations", "Investigation", "facility"),
                OneToMany("investigationTypes", "InvestigationType", "facility"),
                OneToMany("datasetTypes", "DatasetType", "facility"),
                OneToMany("datafileFormats", "DatafileFormat", "facility"),
            ),
            unique=("name",),
            phantoms=(
                "applications",
                "facilityCycles",
                "instruments",
                "parameterTypes",
                "sampleTypes",
                "dataPublications",
                "dataPublicationTypes",
            ),
        ),
        EntityDef(
            "InvestigationType",
            attrs=(_s("name", not_null=True), _s("description")),
            many=(ManyToOne("facility", "Facility", True),),
            ones=(OneToMany("investigations", "Investigation", "type"),),
            unique=("name", "facility"),
        ),
        EntityDef(
            "Investigation",
            attrs=(
                _s("name", not_null=True),
                _s("visitId", not_null=True),
                _s("title", not_null=True),
                _s("summary", 4000),
                _s("doi"),
                Attr("startDate", DATE),
                Attr("endDate", DATE),
                Attr("releaseDate", DATE),
                Attr("fileSize", LONG, default=0),
                Attr("fileCount", LONG, default=0),
            ),
            many=(
                ManyToOne("facility", "Facility", True),
                ManyToOne("type", "InvestigationType", True),
            ),
            ones=(
                OneToMany("datasets", "Dataset", "investigation"),
                OneToMany("investigationUsers", "InvestigationUser", "investigation"),
            ),
            unique=("facility", "name", "visitId"),
            phantoms=(
                "investigationGroups",
                "investigationInstruments",
                "keywords",
                "parameters",
                "publications",
                "samples",
                "shifts",
                "studyInvestigations",
            ),
        ),
        EntityDef(
            "User",
            attrs=(
                _s("name", not_null=True),
                _s("fullName"),
                _s("givenName"),
                _s("familyName"),
                _s("affiliation"),
                _s("email"),
                _s("orcidId"),
            ),
            ones=(OneToMany("investigationUsers", "InvestigationUser", "user"),),
            unique=("name",),
            phantoms=("userGroups", "instrumentScientists", "studies", "dataPublicationUsers"),
        ),
        EntityDef(
            "InvestigationUser",
            attrs=(_s("role", not_null=True),),
            many=(
                ManyToOne("user", "User", True),
                ManyToOne("investigation", "Investigation", True),
            ),
            unique=("user", "investigation", "role"),
        ),
        EntityDef(
            "DatasetType",
            attrs=(_s("name", not_null=True), _s("description")),
            many=(ManyToOne("facility", "Facility", True),),
            ones=(OneToMany("datasets", "Dataset", "type"),),
            unique=("facility", "name"),
        ),
        EntityDef(
            "Dataset",
            attrs=(
                _s("name", not_null=True),
                _s("description"),
                _s("doi"),
                _s("location", 511),
                Attr("complete", BOOLEAN, not_null=True, default=False),
                Attr("startDate", DATE),
                Attr("endDate", DATE),
                Attr("fileSize", LONG, default=0),
                Attr("fileCount", LONG, default=0),
            ),
            many=(
                ManyToOne("investigation", "Investigation", True),
                ManyToOne("type", "DatasetType", True),
            ),
            ones=(
                OneToMany("datafiles", "Datafile", "dataset"),
                OneToMany("dataCollectionDatasets", "DataCollectionDataset", "dataset"),
            ),
            unique=("investigation", "name"),
            phantoms=("parameters", "datasetInstruments", "datasetTechniques"),
        ),
        EntityDef(
            "DatafileFormat",
            attrs=(
                _s("name", not_null=True),
                _s("version", not_null=True),
                _s("description"),
                _s("type"),
            ),
            many=(ManyToOne("facility", "Facility", True),),
            ones=(OneToMany("datafiles", "Datafile", "datafileFormat"),),
            unique=("facility", "name", "version"),
        ),
        EntityDef(
            "Datafile",
            attrs=(
                _s("name", not_null=True),
                _s("description"),
                _s("doi"),
                _s("location", 511),
                Attr("fileSize", LONG, default=0),
                _s("checksum"),
                Attr("datafileCreateTime", DATE),
                Attr("datafileModTime", DATE),
            ),
            many=(
                ManyToOne("dataset", "Dataset", True),
                ManyToOne("datafileFormat", "DatafileFormat"),
            ),
            ones=(OneToMany("dataCollectionDatafiles", "DataCollectionDatafile", "datafile"),),
            unique=("dataset", "name"),
            phantoms=("parameters", "sourceDatafiles", "destDatafiles"),
        ),
        EntityDef(
            "DataCollection",
            attrs=(_s("doi"),),
            ones=(
                OneToMany("dataCollectionDatafiles", "DataCollectionDatafile", "dataCollection"),
                OneToMany("dataCollectionDatasets", "DataCollectionDataset", "dataCollection"),
            ),
            phantoms=(
                "dataCollectionInvestigations",
                "parameters",
                "jobsAsInput",
                "jobsAsOutput",
                "dataPublications",
            ),
        ),
        EntityDef(
            "DataCollectionDatafile",
            attrs=(),
            many=(
                ManyToOne("dataCollection", "DataCollection", True),
                ManyToOne("datafile", "Datafile", True),
            ),
            unique=("dataCollection", "datafile"),
        ),
        EntityDef(
            "DataCollectionDataset",
            attrs=(),
            many=(
                ManyToOne("dataCollection", "DataCollection", True),
                ManyToOne("dataset", "Dataset", True),
            ),
            unique=("dataCollection", "dataset"),
        ),
    )
}

#: entity types every user with a session may read (emulator policy, icat-rest.md §5)
PUBLIC_ENTITIES: frozenset[str] = frozenset(
    {"Facility", "InvestigationType", "DatasetType", "DatafileFormat", "User"}
)


def _check_model() -> None:
    """Consistency of the model above (run at import; a programming error if it fails)."""
    for e in ENTITIES.values():
        for m in e.many:
            assert m.target in ENTITIES, (e.name, m.name)
        for o in e.ones:
            child = ENTITIES[o.target]
            assert child.many_by_name[o.mapped_by].target == e.name, (e.name, o.name)
        for u in e.unique:
            assert u in e.attr_by_name or u in e.many_by_name, (e.name, u)


_check_model()


def _sql_type(kind: str) -> str:
    return {
        STRING: "TEXT",
        LONG: "INTEGER",
        INTEGER: "INTEGER",
        DOUBLE: "REAL",
        BOOLEAN: "INTEGER",
        DATE: "INTEGER",
    }[kind]


def ddl() -> list[str]:
    """SQL statements creating every table and index (idempotent). Never raises."""
    out: list[str] = [
        "CREATE TABLE IF NOT EXISTS icat_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS icat_session ("
        " id TEXT PRIMARY KEY, user_name TEXT NOT NULL, expires REAL NOT NULL)",
        "CREATE INDEX IF NOT EXISTS icat_session_user ON icat_session (user_name)",
    ]
    for e in ENTITIES.values():
        cols = [
            "id INTEGER PRIMARY KEY",
            '"createId" TEXT NOT NULL',
            '"createTime" INTEGER NOT NULL',
            '"modId" TEXT NOT NULL',
            '"modTime" INTEGER NOT NULL',
        ]
        cols += [f"{q(a.name)} {_sql_type(a.kind)}" for a in e.attrs]
        cols += [f"{q(m.column)} INTEGER" for m in e.many]
        out.append(f"CREATE TABLE IF NOT EXISTS {e.table} ({', '.join(cols)})")
        if e.unique:
            ucols = ", ".join(
                q(e.many_by_name[u].column) if u in e.many_by_name else q(u) for u in e.unique
            )
            out.append(
                f"CREATE UNIQUE INDEX IF NOT EXISTS {q(e.name + '_unique')} ON {e.table} ({ucols})"
            )
        for m in e.many:
            out.append(
                f"CREATE INDEX IF NOT EXISTS {q(e.name + '_' + m.column)} "
                f"ON {e.table} ({q(m.column)})"
            )
        if "name" in e.attr_by_name and e.unique[:1] != ("name",):
            out.append(f'CREATE INDEX IF NOT EXISTS {q(e.name + "_name")} ON {e.table} ("name")')
        if e.name == "Datafile":
            out.append('CREATE INDEX IF NOT EXISTS "Datafile_location" ON "Datafile" ("location")')
    return out


# --------------------------------------------------------------------------------------
# dates: stored as epoch milliseconds, shown in ICAT's format in the local time zone

_DATE_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\.(\d{3})(Z|[+-]\d{2}:?\d{2})$"
)
_TS_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})$")


def format_date(ms: int) -> str:
    """Epoch milliseconds -> ``yyyy-MM-ddTHH:mm:ss.SSS+hh:mm`` (server's local zone).

    Never raises for the dates the catalogue stores (years 1 to 9999). Beyond,
    ``time.localtime`` raises ``OverflowError`` or ``OSError``.
    """
    seconds, millis = divmod(int(ms), 1000)
    t = time.localtime(seconds)
    off = t.tm_gmtoff // 60
    sign = "+" if off >= 0 else "-"
    hh, mm = divmod(abs(off), 60)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03d%s%02d:%02d" % (  # noqa: UP031 (speed)
        t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, millis, sign, hh, mm
    )  # fmt: skip


def parse_date(text: str) -> int:
    """ICAT date string -> epoch milliseconds; raises BAD_PARAMETER when malformed."""
    m = _DATE_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise bad(f"Badly formatted date {text!r}: expected yyyy-MM-ddTHH:mm:ss.SSS and a zone")
    y, mo, d, h, mi, s, ms, zone = m.groups()
    if zone == "Z":
        tz = UTC
    else:
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=tz)
    except ValueError as exc:
        raise bad(f"Badly formatted date {text!r}: {exc}") from exc
    return int(dt.timestamp()) * 1000 + int(ms)


def parse_timestamp_literal(text: str) -> int:
    """``yyyy-mm-dd hh:mm:ss`` (server's local zone) -> epoch ms.

    Raises ``ICATException`` BAD_PARAMETER when ``text`` is malformed or not a date.
    """
    m = _TS_RE.match(text)
    if not m:
        raise bad(f"Badly formatted timestamp literal {{ts {text}}}: expected yyyy-mm-dd hh:mm:ss")
    try:
        dt = datetime(*(int(g) for g in m.groups()))
    except ValueError as exc:
        raise bad(f"Badly formatted timestamp literal {{ts {text}}}: {exc}") from exc
    return int(dt.timestamp()) * 1000


def now_ms() -> int:
    """The current time in epoch milliseconds. Never raises."""
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------------------
# rendering rows as ICAT JSON


def decode(kind: str, value: Any) -> Any:
    """A stored column value of attribute ``kind`` -> its JSON value.

    Never raises for the dates the catalogue stores (years 1 to 9999).
    """
    if value is None:
        return None
    if kind == DATE:
        return format_date(value)
    if kind == BOOLEAN:
        return bool(value)
    return value


def render(e: EntityDef, row: tuple[Any, ...] | list[Any]) -> dict[str, Any]:
    """One stored row (in :attr:`EntityDef.columns` order) -> the entity's JSON object.

    Common fields first, then every non-null attribute, then every one-to-many
    field as an empty array (filled in by INCLUDE processing); many-to-one
    fields are absent (added only when included).

    Never raises for the dates the catalogue stores (years 1 to 9999).
    """
    out: dict[str, Any] = {
        "id": row[0],
        "createId": row[1],
        "createTime": format_date(row[2]),
        "modId": row[3],
        "modTime": format_date(row[4]),
    }
    i = 5
    for a in e.attrs:
        v = row[i]
        i += 1
        if v is not None:
            out[a.name] = decode(a.kind, v)
    for o in e.ones:
        out[o.name] = []
    for p in e.phantoms:
        out[p] = []
    return out

"""Frozen dataclasses for the ICAT entities idsfs uses.

One class per entity type of ``icat-rest.md`` §6 (Facility, InvestigationType,
Investigation, User, InvestigationUser, DatasetType, Dataset, DatafileFormat,
Datafile) plus DataCollection (for :class:`idsfs.ids.DataSelection`). Each
has the class attribute ``BeanName`` (the ICAT entity name, as in python-icat)
and the common fields ``id``, ``createId``, ``createTime``, ``modId``,
``modTime``. Field names are ICAT's (camelCase) so that queries, JSON and
attributes use one vocabulary.

* ICAT dates become timezone-aware :class:`datetime.datetime` objects.
* Many-to-one relations (``Datafile.dataset``, ``Dataset.investigation`` ...)
  are nested model objects, or ``None`` when ICAT did not include them.
* One-to-many relations are tuples, empty unless included in the query.
* Unknown JSON fields are ignored (newer servers may add some).

:meth:`Entity.from_json` / :func:`entity_from_json` parse ICAT's JSON;
:meth:`Entity.to_json` produces what ``POST entityManager`` expects.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

__all__ = [
    "BEANS",
    "DataCollection",
    "Datafile",
    "DatafileFormat",
    "Dataset",
    "DatasetType",
    "Entity",
    "Facility",
    "Investigation",
    "InvestigationType",
    "InvestigationUser",
    "User",
    "entity_from_json",
    "format_date",
    "parse_date",
]

E = TypeVar("E", bound="Entity")

#: Fields set by the ICAT server, never sent on create/update.
SERVER_FIELDS = frozenset({"createId", "createTime", "modId", "modTime"})


def parse_date(value: str) -> _dt.datetime:
    """Parse an ICAT date (``2024-05-01T10:00:00.000+00:00`` or ``...Z``).

    Returns an aware datetime; a value without zone is taken as UTC.
    Raises ``ValueError`` for anything that is not ISO-8601 date-time text.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a date string, got {type(value).__name__}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    result = _dt.datetime.fromisoformat(text)
    if result.tzinfo is None:
        result = result.replace(tzinfo=_dt.UTC)
    return result


def format_date(value: _dt.datetime) -> str:
    """Format a datetime the way ICAT accepts it on input.

    ``yyyy-MM-ddTHH:mm:ss.SSS+hh:mm``; a naive datetime is taken as local time.

    Raises ``ValueError`` (``OverflowError`` or ``OSError`` on some platforms)
    only for a naive datetime that cannot be converted to local time (e.g.
    ``datetime.min``).
    """
    if value.tzinfo is None:
        value = value.astimezone()
    return value.isoformat(timespec="milliseconds")


@dataclass(frozen=True, kw_only=True, repr=False)
class Entity:
    """Common base: the fields every ICAT entity has.

    Instances are immutable and hashable; use :func:`dataclasses.replace` to
    derive a changed copy. Constructing one never raises.
    """

    BeanName: ClassVar[str] = "Entity"

    id: int | None = None
    createId: str | None = field(default=None, compare=False)
    createTime: _dt.datetime | None = field(default=None, compare=False)
    modId: str | None = field(default=None, compare=False)
    modTime: _dt.datetime | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or value == () or f.name in SERVER_FIELDS:
                continue
            parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # ------------------------------------------------------------------ JSON

    @classmethod
    def from_json(cls: type[E], data: Mapping[str, Any]) -> E:
        """Build an instance from ICAT JSON.

        ``data`` is either wrapped (``{"Dataset": {...}}``, as search results
        and get-by-id return it) or the bare field object (as nested
        relations appear). When called on :class:`Entity` itself a wrapped
        object selects the right subclass. Raises ``ValueError`` when the
        wrapper names another type or the data cannot be parsed.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if len(data) == 1:
            (key, inner), = data.items()
            if key in BEANS and isinstance(inner, Mapping):
                target = BEANS[key]
                if cls is not Entity and not issubclass(target, cls):
                    raise ValueError(f"expected {cls.BeanName}, got {key}")
                return typing.cast(E, target._from_fields(inner))
        if cls is Entity:
            raise ValueError("cannot tell the entity type of an unwrapped JSON object")
        return cls._from_fields(data)

    @classmethod
    def _from_fields(cls: type[E], data: Mapping[str, Any]) -> E:
        kinds = _field_kinds(cls)
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            kind = kinds.get(name)
            if kind is None or value is None:
                continue
            try:
                kwargs[name] = _convert(kind, value)
            except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(1e400)
                raise ValueError(f"{cls.BeanName}.{name}: bad value {value!r}") from exc
        return cls(**kwargs)

    def to_json(self, *, fields: Iterable[str] | None = None) -> dict[str, Any]:
        """Return ``{"<BeanName>": {...}}`` for ``POST entityManager``.

        Includes ``id`` when set (then ICAT updates the object), every other
        non-``None`` attribute (or only the names in ``fields``), many-to-one
        relations as ``{"id": N}`` and dates in ICAT's format. Server-set
        fields and empty one-to-many tuples are left out. Raises
        ``ValueError`` if a related object has no id or a field is unknown.
        """
        kinds = _field_kinds(type(self))
        names = list(kinds) if fields is None else list(fields)
        out: dict[str, Any] = {}
        if self.id is not None:
            out["id"] = self.id
        for name in names:
            if name == "id" or (name in SERVER_FIELDS and fields is None):
                continue
            if name not in kinds:
                raise ValueError(f"{self.BeanName} has no field {name!r}")
            value = getattr(self, name)
            if value is None:
                if fields is not None:
                    out[name] = None
                continue
            kind = kinds[name]
            if isinstance(kind, tuple):
                if value:
                    out[name] = [child.to_json()[child.BeanName] for child in value]
            elif isinstance(kind, type) and issubclass(kind, Entity):
                if value.id is None:
                    raise ValueError(f"{self.BeanName}.{name} refers to an object without id")
                out[name] = {"id": value.id}
            elif kind is _dt.datetime:
                out[name] = format_date(value)
            else:
                out[name] = value
        return {self.BeanName: out}

    def ref(self) -> dict[str, Any]:
        """Return ``{"<BeanName>": {"id": N}}`` (what ``delete`` sends).

        Raises ``ValueError`` if the object has no id.
        """
        if self.id is None:
            raise ValueError(f"{self.BeanName} without id")
        return {self.BeanName: {"id": self.id}}


def _convert(kind: Any, value: Any) -> Any:
    if isinstance(kind, tuple):
        (child,) = kind
        if not isinstance(value, list):
            raise TypeError("expected a list")
        return tuple(child._from_fields(v) for v in value if isinstance(v, Mapping))
    if isinstance(kind, type) and issubclass(kind, Entity):
        if not isinstance(value, Mapping):
            raise TypeError("expected an object")
        return kind._from_fields(value)
    if kind is _dt.datetime:
        return parse_date(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise TypeError("expected a boolean")
    if kind is int:
        if isinstance(value, bool):
            raise TypeError("expected an integer")
        return int(value)
    if kind is float:
        return float(value)
    if kind is str:
        return str(value)
    return value


@functools.cache
def _field_kinds(cls: type[Entity]) -> dict[str, Any]:
    """Map each dataclass field of ``cls`` to the kind of value it holds."""
    hints = typing.get_type_hints(cls, globalns=globals())
    kinds: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kinds[f.name] = _kind_of(hints[f.name])
    return kinds


def _kind_of(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _kind_of(args[0])
        return object
    if origin is tuple:
        args = typing.get_args(hint)
        return (args[0],)
    return hint


# ------------------------------------------------------------------ entities


@dataclass(frozen=True, kw_only=True, repr=False)
class Facility(Entity):
    """ICAT ``Facility``: unique by ``name``. Constructing one never raises."""

    BeanName: ClassVar[str] = "Facility"

    name: str | None = None
    fullName: str | None = None
    description: str | None = None
    url: str | None = None
    daysUntilRelease: int | None = None


@dataclass(frozen=True, kw_only=True, repr=False)
class InvestigationType(Entity):
    """ICAT ``InvestigationType``: unique by (``name``, ``facility``).

    Constructing one never raises.
    """

    BeanName: ClassVar[str] = "InvestigationType"

    name: str | None = None
    description: str | None = None
    facility: Facility | None = None


@dataclass(frozen=True, kw_only=True, repr=False)
class User(Entity):
    """ICAT ``User``: ``name`` equals the session user name (``db/jdoe``).

    Constructing one never raises.
    """

    BeanName: ClassVar[str] = "User"

    name: str | None = None
    fullName: str | None = None
    givenName: str | None = None
    familyName: str | None = None
    affiliation: str | None = None
    email: str | None = None
    orcidId: str | None = None
    investigationUsers: tuple[InvestigationUser, ...] = ()


@dataclass(frozen=True, kw_only=True, repr=False)
class Investigation(Entity):
    """ICAT ``Investigation``: unique by (``facility``, ``name``, ``visitId``).

    Constructing one never raises.
    """

    BeanName: ClassVar[str] = "Investigation"

    name: str | None = None
    visitId: str | None = None
    title: str | None = None
    summary: str | None = None
    doi: str | None = None
    startDate: _dt.datetime | None = None
    endDate: _dt.datetime | None = None
    releaseDate: _dt.datetime | None = None
    fileSize: int | None = None
    fileCount: int | None = None
    facility: Facility | None = None
    type: InvestigationType | None = None
    datasets: tuple[Dataset, ...] = ()
    investigationUsers: tuple[InvestigationUser, ...] = ()


@dataclass(frozen=True, kw_only=True, repr=False)
class InvestigationUser(Entity):
    """ICAT ``InvestigationUser``: links a User to an Investigation with a role.

    Constructing one never raises.
    """

    BeanName: ClassVar[str] = "InvestigationUser"

    role: str | None = None
    user: User | None = None
    investigation: Investigation | None = None


@dataclass(frozen=True, kw_only=True, repr=False)
class DatasetType(Entity):
    """ICAT ``DatasetType``: unique by (``facility``, ``name``). Constructing one never raises."""

    BeanName: ClassVar[str] = "DatasetType"

    name: str | None = None
    description: str | None = None
    facility: Facility | None = None


@dataclass(frozen=True, kw_only=True, repr=False)
class Dataset(Entity):
    """ICAT ``Dataset``: unique by (``investigation``, ``name``). Constructing one never raises."""

    BeanName: ClassVar[str] = "Dataset"

    name: str | None = None
    description: str | None = None
    doi: str | None = None
    location: str | None = None
    complete: bool | None = None
    startDate: _dt.datetime | None = None
    endDate: _dt.datetime | None = None
    fileSize: int | None = None
    fileCount: int | None = None
    investigation: Investigation | None = None
    type: DatasetType | None = None
    datafiles: tuple[Datafile, ...] = ()


@dataclass(frozen=True, kw_only=True, repr=False)
class DatafileFormat(Entity):
    """ICAT ``DatafileFormat``: unique by (``facility``, ``name``, ``version``).

    Constructing one never raises.
    """

    BeanName: ClassVar[str] = "DatafileFormat"

    name: str | None = None
    version: str | None = None
    description: str | None = None
    type: str | None = None
    facility: Facility | None = None


@dataclass(frozen=True, kw_only=True, repr=False)
class Datafile(Entity):
    """ICAT ``Datafile``: unique by (``dataset``, ``name``).

    ``location`` ``None`` means the IDS holds no bytes for it; ``checksum`` is
    the CRC32 as lowercase hex that IDS ``put`` stores. Constructing one never raises.
    """

    BeanName: ClassVar[str] = "Datafile"

    name: str | None = None
    description: str | None = None
    doi: str | None = None
    location: str | None = None
    fileSize: int | None = None
    checksum: str | None = None
    datafileCreateTime: _dt.datetime | None = None
    datafileModTime: _dt.datetime | None = None
    dataset: Dataset | None = None
    datafileFormat: DatafileFormat | None = None


@dataclass(frozen=True, kw_only=True, repr=False)
class DataCollectionDataset(Entity):
    """ICAT ``DataCollectionDataset``: a Dataset linked into a DataCollection.

    Constructing one never raises.
    """

    BeanName: ClassVar[str] = "DataCollectionDataset"

    dataset: Dataset | None = None


@dataclass(frozen=True, kw_only=True, repr=False)
class DataCollectionDatafile(Entity):
    """ICAT ``DataCollectionDatafile``: a Datafile linked into a DataCollection.

    Constructing one never raises.
    """

    BeanName: ClassVar[str] = "DataCollectionDatafile"

    datafile: Datafile | None = None


@dataclass(frozen=True, kw_only=True, repr=False)
class DataCollectionInvestigation(Entity):
    """ICAT ``DataCollectionInvestigation`` (ICAT >= 5.0). Constructing one never raises."""

    BeanName: ClassVar[str] = "DataCollectionInvestigation"

    investigation: Investigation | None = None


@dataclass(frozen=True, kw_only=True, repr=False)
class DataCollection(Entity):
    """ICAT ``DataCollection``: a named set of datasets, datafiles, investigations.

    The link objects are kept as ICAT has them (``dataCollectionDatasets``
    etc.); :attr:`datasets`, :attr:`datafiles` and :attr:`investigations`
    give the linked objects directly. Constructing one never raises.
    """

    BeanName: ClassVar[str] = "DataCollection"

    doi: str | None = None
    dataCollectionDatasets: tuple[DataCollectionDataset, ...] = ()
    dataCollectionDatafiles: tuple[DataCollectionDatafile, ...] = ()
    dataCollectionInvestigations: tuple[DataCollectionInvestigation, ...] = ()

    @property
    def datasets(self) -> tuple[Dataset, ...]:
        """The linked datasets. Never raises."""
        return tuple(x.dataset for x in self.dataCollectionDatasets if x.dataset is not None)

    @property
    def datafiles(self) -> tuple[Datafile, ...]:
        """The linked datafiles. Never raises."""
        return tuple(x.datafile for x in self.dataCollectionDatafiles if x.datafile is not None)

    @property
    def investigations(self) -> tuple[Investigation, ...]:
        """The linked investigations. Never raises."""
        return tuple(
            x.investigation
            for x in self.dataCollectionInvestigations
            if x.investigation is not None
        )


#: ICAT entity name -> model class
BEANS: dict[str, type[Entity]] = {
    cls.BeanName: cls
    for cls in (
        Facility,
        InvestigationType,
        Investigation,
        User,
        InvestigationUser,
        DatasetType,
        Dataset,
        DatafileFormat,
        Datafile,
        DataCollection,
        DataCollectionDataset,
        DataCollectionDatafile,
        DataCollectionInvestigation,
    )
}


def entity_from_json(data: Mapping[str, Any], bean: str | type[Entity] | None = None) -> Entity:
    """Parse one ICAT entity from JSON.

    ``data`` is a wrapped object (``{"Datafile": {...}}``), or a bare field
    object when ``bean`` (entity name or model class) says its type. Raises
    ``ValueError`` for an unknown entity name or unparsable data.
    """
    if bean is None:
        return Entity.from_json(data)
    cls = BEANS.get(bean) if isinstance(bean, str) else bean
    if cls is None:
        raise ValueError(f"unknown ICAT entity type {bean!r}")
    return cls.from_json(data)

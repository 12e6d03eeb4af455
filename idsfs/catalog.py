"""The tree's ICAT queries: paged, attribute-carrying, TTL-cached directory listings.

:class:`Catalog` turns what an ICAT session may read into the directory tree the
mount shows (the IDS zip layout)::

    /                                   facilities
    <facility>/                         investigation names
    <facility>/<name>/                  visits: one directory per visitId
    <facility>/<name>/<visitId>/        datasets of that investigation
    .../<dataset>/[<dir>/...]<file>     datafiles; '/' inside a datafile name makes directories

Names become file names through :mod:`idsfs.naming` (escaping, shortening,
clashes; ``docs/naming.md``). Investigations of one name share a directory.

Queries
-------
Each directory is one listing, fetched with one ICAT search per page: tuple
queries (``SELECT x.id, x.name, ...``) that carry every attribute the tree
shows, so ``ls -l`` needs no further call. Pages are ``ORDER BY x.id`` with
``x.id > <last id of the previous page> ... LIMIT 0, <page>`` (keyset paging,
stable while objects come and go); the page size is ``page_size`` bounded by
the server's ``maxEntities`` (``GET properties``, read once). Datafiles without
``location`` hold no data in IDS and are left out. ICAT filters every search
by what the session may read, so the tree shows nothing else. Listing a
facility also fills the listings of its investigation-name directories.
The catalogue never calls IDS.

Caching
-------
Listings are kept for ``metadata_ttl`` seconds. A name looked up in a cached
listing is answered from it, also when the name does not exist (that is the
negative entry: no query until the listing expires). Concurrent requests for
one listing share one fetch. The attributes of a node are those of its entry in
its parent's listing; a directory's link count (2 + subdirectories) needs its
own listing, so :meth:`Catalog.cached_nlink` tells whether it is known without
a query. :meth:`Catalog.invalidate` drops listings (for the write path).

The datafile record
-------------------
:class:`DatafileRecord` is what the read path gets for a datafile
(``transfer.open``/``transfer.status``): ``id``, ``size`` (= ``fileSize``),
``version`` (a hashable token that changes when ICAT's ``modTime`` or
``fileSize`` change), and ICAT's field names (``fileSize``, ``modTime``,
``datafileModTime``, ``checksum``, ``location``, ...) so that code written for
:class:`idsfs.model.Datafile` reads it the same way.

Errors: ICAT and transport errors of :mod:`idsfs.errors` pass through
unchanged (``fs.py`` maps them to errno); an unusable row raises
:class:`~idsfs.errors.ICATResponseError`.

Thread safety: a :class:`Catalog` belongs to one trio run and is used from the
trio thread only; ICAT calls run in worker threads through the
:class:`~idsfs.aio.ThreadBridge`.
"""

from __future__ import annotations

import datetime as _dt
import enum
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from idsfs import naming
from idsfs.aio import ThreadBridge
from idsfs.errors import ICATError, ICATResponseError
from idsfs.icat import ICATClient, quote
from idsfs.model import parse_date

__all__ = [
    "DEFAULT_METADATA_TTL",
    "DEFAULT_PAGE_SIZE",
    "ROOT_KEY",
    "Catalog",
    "CatalogStats",
    "DatafileRecord",
    "Kind",
    "Listing",
    "Node",
    "NodeKey",
    "Usage",
]

log = logging.getLogger("idsfs.catalog")

#: Default seconds a listing is kept.
DEFAULT_METADATA_TTL = 60.0
#: Default rows per ICAT query (bounded by the server's maxEntities).
DEFAULT_PAGE_SIZE = 1000

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_NS = _dt.timedelta(microseconds=1)


class Kind(enum.IntEnum):
    """What a tree node stands for."""

    ROOT = 0
    #: an ICAT Facility
    FACILITY = 1
    #: the investigations of one name in one facility (merged directory)
    NAME = 2
    #: one Investigation (a visit)
    INVESTIGATION = 3
    #: one Dataset
    DATASET = 4
    #: a datafile path prefix inside a dataset (no ICAT object)
    FOLDER = 5
    #: one Datafile
    DATAFILE = 6


@dataclass(frozen=True, slots=True)
class NodeKey:
    """The identity of a tree node, stable while the ICAT object exists.

    Attributes:
        kind: what the node stands for.
        id: the ICAT id (facility, investigation, dataset, datafile); the
            facility id for ``NAME``; the dataset id for ``FOLDER``; 0 for the root.
        path: ``(investigation name,)`` for ``NAME``; the ICAT path components
            for ``FOLDER`` (``("raw", "2024")`` for datafiles ``raw/2024/...``);
            empty otherwise.
    """

    kind: Kind
    id: int
    path: tuple[str, ...] = ()

    @property
    def is_dir(self) -> bool:
        """Whether nodes of this key are directories."""
        return self.kind is not Kind.DATAFILE

    def __str__(self) -> str:
        extra = "/" + "/".join(self.path) if self.path else ""
        return f"{self.kind.name.lower()}:{self.id}{extra}"


#: The key of the mount's root directory.
ROOT_KEY = NodeKey(Kind.ROOT, 0)


def _ns(value: _dt.datetime | None) -> int:
    """Nanoseconds since the epoch (0 for None)."""
    if value is None:
        return 0
    return ((value - _EPOCH) // _NS) * 1000


def _date(value: Any) -> _dt.datetime | None:
    """Parse an ICAT date of a listing (aware; UTC when the zone is missing)."""
    if value is None:
        return None
    try:
        result = _dt.datetime.fromisoformat(value)  # ICAT's own format, the usual case
    except (TypeError, ValueError):
        try:
            return parse_date(str(value))
        except ValueError as exc:
            raise ICATResponseError(f"ICAT sent a bad date: {str(value)[:40]!r}") from exc
    return result if result.tzinfo is not None else result.replace(tzinfo=_dt.UTC)


@dataclass(frozen=True, slots=True)
class DatafileRecord:
    """One datafile as the tree knows it (what ``transfer`` reads).

    Attributes use ICAT's field names. ``name`` is the whole ICAT name
    (slashes included).
    """

    id: int
    name: str
    dataset_id: int
    fileSize: int
    modTime: _dt.datetime | None
    datafileModTime: _dt.datetime | None = None
    datafileCreateTime: _dt.datetime | None = None
    checksum: str | None = None
    location: str | None = None
    description: str | None = None
    doi: str | None = None

    @property
    def size(self) -> int:
        """The size in bytes (``fileSize``)."""
        return self.fileSize

    @property
    def version(self) -> tuple[int, int]:
        """A token that changes when the datafile changes: (modTime in ns, fileSize)."""
        return (_ns(self.modTime), self.fileSize)

    @property
    def mtime_ns(self) -> int:
        """Modification time shown: ``datafileModTime``, else ``modTime`` (ns)."""
        return _ns(self.datafileModTime or self.modTime)

    @property
    def ctime_ns(self) -> int:
        """Change time shown: ICAT's ``modTime`` (ns)."""
        return _ns(self.modTime)


@dataclass(frozen=True, slots=True)
class Node:
    """One entry of the tree with the attributes its listing carried.

    Attributes:
        key: its identity.
        parent: the key of the directory listing it.
        name: the file name shown.
        size: bytes for files, 0 for directories.
        mtime_ns: modification time (ns since the epoch).
        ctime_ns: change time (ns since the epoch).
        datafile: the datafile record (files only).
        extra: extended attributes of directories, ``(name, value)`` pairs.
    """

    key: NodeKey
    parent: NodeKey
    name: str
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    datafile: DatafileRecord | None = None
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def is_dir(self) -> bool:
        """Whether the node is a directory."""
        return self.key.kind is not Kind.DATAFILE

    def xattrs(self) -> dict[str, str]:
        """The node's static extended attributes (``user.ids.*``), name -> value.

        Attributes whose ICAT value is null are left out. ``user.ids.status``
        is dynamic and not included here.
        """
        df = self.datafile
        if df is None:
            return dict(self.extra)
        out = {"user.ids.id": str(df.id), "user.ids.name": df.name,
               "user.ids.dataset.id": str(df.dataset_id)}
        for attr, value in (("checksum", df.checksum), ("location", df.location),
                            ("description", df.description), ("doi", df.doi)):
            if value is not None:
                out["user.ids." + attr] = value
        return out


def _extra(**values: object) -> tuple[tuple[str, str], ...]:
    """Build directory xattrs from keyword values; None values are left out."""
    return tuple(
        ("user.ids." + name.replace("_", "."), str(value))
        for name, value in values.items()
        if value is not None
    )


class Listing:
    """The entries of one directory, in file-name order, as fetched at one time.

    Attributes:
        key: the directory's key.
        entries: the entries (:class:`Node`), in file-name order.
        fetched: the catalogue clock's time of the fetch.
        subdirs: how many entries are directories.
    """

    __slots__ = ("_by_key", "_by_name", "entries", "fetched", "key", "subdirs", "total_size")

    def __init__(self, key: NodeKey, entries: Iterable[Node], fetched: float) -> None:
        self.key = key
        self.entries: tuple[Node, ...] = tuple(entries)
        self.fetched = fetched
        self._by_name = {node.name: node for node in self.entries}
        self._by_key = {node.key: node for node in self.entries}
        self.subdirs = sum(1 for node in self.entries if node.is_dir)
        self.total_size = sum(node.size for node in self.entries)

    def get(self, name: str) -> Node | None:
        """Return the entry shown as ``name``, or ``None``."""
        return self._by_name.get(name)

    def find(self, key: NodeKey) -> Node | None:
        """Return the entry with key ``key``, or ``None``."""
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Any:
        return iter(self.entries)

    def __repr__(self) -> str:
        return f"<Listing {self.key} of {len(self.entries)} entries>"


@dataclass(frozen=True, slots=True)
class Usage:
    """What the listings fetched so far hold (for ``statfs``).

    Attributes:
        bytes: the total ``fileSize`` of the datafiles listed.
        files: datafiles listed.
        directories: directories listed (the root included).
    """

    bytes: int
    files: int
    directories: int


@dataclass(frozen=True, slots=True)
class CatalogStats:
    """Counters of a :class:`Catalog` (for tests and ``idsfs status``).

    Attributes:
        queries: ICAT searches made.
        fetches: listing fetches (one or more queries each).
        hits: listing requests answered from the cache.
        misses: listing requests that had to fetch (or wait for a fetch).
        cached: listings in the cache now (fresh or not yet pruned).
    """

    queries: int
    fetches: int
    hits: int
    misses: int
    cached: int


@dataclass(slots=True)
class _Flight:
    """One fetch in progress; waiters share its outcome."""

    done: trio.Event = field(default_factory=trio.Event)
    ok: bool = False
    error: Exception | None = None


class Catalog:
    """ICAT listings for the tree: one query per directory page, TTL-cached.

    Args:
        icat: a logged-in ICAT client (it re-logs in by itself when it can).
        bridge: the thread bridge every ICAT call goes through.
        metadata_ttl: seconds a listing is kept (0: every request fetches).
        page_size: rows per ICAT query; the server's ``maxEntities`` bounds it.
        clock: monotonic clock in seconds (tests pass a fake one).

    Raises:
        ValueError: ``metadata_ttl`` negative or ``page_size`` < 1.
    """

    def __init__(
        self,
        icat: ICATClient,
        bridge: ThreadBridge,
        *,
        metadata_ttl: float = DEFAULT_METADATA_TTL,
        page_size: int = DEFAULT_PAGE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if metadata_ttl < 0:
            raise ValueError(f"metadata_ttl must be >= 0, not {metadata_ttl!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an integer >= 1, not {page_size!r}")
        self._icat = icat
        self._bridge = bridge
        self._ttl = float(metadata_ttl)
        self._page_size = page_size
        self._page_limit: int | None = None  # page_size bounded by maxEntities, once known
        self._clock = clock
        self._listings: dict[NodeKey, Listing] = {}
        self._parents: dict[NodeKey, NodeKey] = {}
        self._flights: dict[NodeKey, _Flight] = {}
        self._usage: dict[NodeKey, tuple[int, int, int]] = {}
        self._totals = [0, 0, 0]
        self._next_prune = clock() + self._ttl
        now_ns = time.time_ns()
        self._root = Node(ROOT_KEY, ROOT_KEY, "", mtime_ns=now_ns, ctime_ns=now_ns)
        self._queries = 0
        self._fetches = 0
        self._hits = 0
        self._misses = 0

    # ------------------------------------------------------------------ public

    @property
    def metadata_ttl(self) -> float:
        """Seconds a listing is kept."""
        return self._ttl

    @property
    def root(self) -> Node:
        """The root node (its times are the catalogue's creation time)."""
        return self._root

    async def listing(self, key: NodeKey) -> Listing | None:
        """Return the listing of directory ``key``, fetching it when not cached or expired.

        Returns ``None`` when the directory no longer exists (a datafile path
        prefix whose datafiles are gone). An ICAT object that was deleted lists
        as empty. Raises ``ValueError`` for a datafile key, and the ICAT and
        transport errors of :mod:`idsfs.errors`.
        """
        if not key.is_dir:
            raise ValueError(f"{key} is not a directory")
        cached = self._fresh(key)
        if cached is not None:
            self._hits += 1
            return cached
        self._misses += 1
        unit = self._unit(key)
        flight = self._flights.get(unit)
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.ok:
                return self._listings.get(key)
            # the fetch was cancelled: fetch again (below)
        while (other := self._flights.get(unit)) is not None:
            await other.done.wait()
        flight = _Flight()
        self._flights[unit] = flight
        try:
            await self._fetch(unit)
            flight.ok = True
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[unit]
            flight.done.set()
        return self._listings.get(key)

    async def lookup(self, parent: NodeKey, name: bytes | str) -> Node | None:
        """Return the entry ``name`` of directory ``parent``, or ``None`` if there is none.

        Answered from the parent's listing (fetched if needed); a name that is
        not valid UTF-8 is never found. Raises what :meth:`listing` raises.
        """
        if isinstance(name, bytes):
            try:
                name = name.decode("utf-8")
            except UnicodeDecodeError:
                return None
        listing = await self.listing(parent)
        return None if listing is None else listing.get(name)

    async def refresh(self, node: Node) -> Node | None:
        """Return ``node`` as its parent's current listing shows it, or ``None`` if gone.

        The root is always there. Raises what :meth:`listing` raises.
        """
        if node.key == ROOT_KEY:
            return self._root
        listing = await self.listing(node.parent)
        return None if listing is None else listing.find(node.key)

    async def resolve(self, key: NodeKey) -> Node | None:
        """Return the node of a directory key seen in an earlier listing, or ``None``.

        Used for ``..``: only directories whose parent the catalogue has seen
        can be resolved. Raises what :meth:`listing` raises.
        """
        if key == ROOT_KEY:
            return self._root
        parent = self._parents.get(key)
        if parent is None:
            return None
        listing = await self.listing(parent)
        return None if listing is None else listing.find(key)

    def parent_of(self, key: NodeKey) -> NodeKey | None:
        """The key of the directory that last listed directory ``key`` (root: itself)."""
        if key == ROOT_KEY:
            return ROOT_KEY
        return self._parents.get(key)

    async def nlink(self, key: NodeKey) -> int:
        """Return the link count: 1 for a file, 2 + subdirectories for a directory.

        May fetch the directory's listing. Raises what :meth:`listing` raises.
        """
        if not key.is_dir:
            return 1
        listing = await self.listing(key)
        return 2 + (listing.subdirs if listing is not None else 0)

    def cached_nlink(self, key: NodeKey) -> int | None:
        """The link count if known without a query (fresh listing cached), else ``None``."""
        if not key.is_dir:
            return 1
        listing = self._fresh(key)
        return None if listing is None else 2 + listing.subdirs

    def invalidate(self, *keys: NodeKey) -> None:
        """Forget the cached listings of the directories ``keys``.

        A dataset or one of its folders drops the whole dataset (all its
        folders); a facility drops its investigation-name directories too.
        The next request fetches again. Call after writes (put, delete, mkdir).
        """
        for key in keys:
            unit = self._unit(key)
            if unit.kind is Kind.DATASET:
                doomed = [k for k in self._listings
                          if k.id == unit.id and k.kind in (Kind.DATASET, Kind.FOLDER)]
            elif unit.kind is Kind.FACILITY:
                doomed = [k for k in self._listings
                          if k == unit or (k.kind is Kind.NAME and k.id == unit.id)]
            else:
                doomed = [unit]
            for k in doomed:
                self._listings.pop(k, None)

    def invalidate_all(self) -> None:
        """Forget every cached listing."""
        self._listings.clear()

    def usage(self) -> Usage:
        """Sizes and counts of everything listed so far (latest listing of each directory)."""
        size, files, dirs = self._totals
        return Usage(bytes=size, files=files, directories=dirs + 1)

    def stats(self) -> CatalogStats:
        """Return the counters."""
        return CatalogStats(
            queries=self._queries,
            fetches=self._fetches,
            hits=self._hits,
            misses=self._misses,
            cached=len(self._listings),
        )

    # ------------------------------------------------------------------ cache

    def _fresh(self, key: NodeKey) -> Listing | None:
        listing = self._listings.get(key)
        if listing is None or self._clock() - listing.fetched >= self._ttl:
            return None
        return listing

    @staticmethod
    def _unit(key: NodeKey) -> NodeKey:
        """The key whose fetch produces the listing of ``key``."""
        if key.kind is Kind.FOLDER:
            return NodeKey(Kind.DATASET, key.id)
        return key

    def _store(self, listing: Listing) -> None:
        self._listings[listing.key] = listing
        for node in listing.entries:
            if node.is_dir:
                self._parents[node.key] = listing.key

    def _account(self, unit: NodeKey, size: int, files: int, dirs: int) -> None:
        old = self._usage.get(unit, (0, 0, 0))
        new = (size, files, dirs)
        self._usage[unit] = new
        for i in range(3):
            self._totals[i] += new[i] - old[i]

    def _prune(self) -> None:
        now = self._clock()
        if now < self._next_prune:
            return
        self._next_prune = now + max(self._ttl, 1.0)
        stale = [k for k, v in self._listings.items() if now - v.fetched >= self._ttl]
        for k in stale:
            del self._listings[k]

    # ------------------------------------------------------------------ queries

    async def _page(self) -> int:
        if self._page_limit is None:
            size = self._page_size
            try:
                props = await self._bridge.run(self._icat.properties, name="ICAT properties")
                max_entities = props.get("maxEntities")
                if isinstance(max_entities, int) and not isinstance(max_entities, bool) \
                        and max_entities > 0:
                    size = min(size, max_entities)
            except ICATError as exc:  # a server without properties: keep the configured size
                log.warning("cannot read ICAT properties (%s); page size %d",
                            type(exc).__name__, size)
            self._page_limit = size
        return self._page_limit

    async def _search(self, query: str) -> list[Any]:
        self._queries += 1
        return await self._bridge.run(self._icat.search, query, name="ICAT search")

    async def _paged(self, template: str, width: int) -> list[tuple[Any, ...]]:
        """All rows of ``template`` (with ``{after}`` and ``{count}``), keyset-paged on id.

        Every row must be a tuple of ``width`` values starting with the id.
        """
        size = await self._page()
        rows: list[tuple[Any, ...]] = []
        after = 0
        while True:
            page = await self._search(template.format(after=after, count=size))
            for row in page:
                if not isinstance(row, tuple) or len(row) != width \
                        or isinstance(row[0], bool) or not isinstance(row[0], int):
                    raise ICATResponseError(f"unexpected row in a listing: {str(row)[:80]}")
            rows.extend(page)
            if len(page) < size:
                return rows
            after = max(row[0] for row in page)

    async def _fetch(self, unit: NodeKey) -> None:
        self._fetches += 1
        self._prune()
        kind = unit.kind
        if kind is Kind.ROOT:
            await self._fetch_root()
        elif kind is Kind.FACILITY:
            await self._fetch_facility(unit.id)
        elif kind is Kind.NAME:
            await self._fetch_name(unit)
        elif kind is Kind.INVESTIGATION:
            await self._fetch_investigation(unit.id)
        elif kind is Kind.DATASET:
            await self._fetch_dataset(unit.id)
        else:  # pragma: no cover - _unit never returns other kinds
            raise ValueError(f"cannot list {unit}")

    async def _fetch_root(self) -> None:
        rows = await self._paged(
            "SELECT f.id, f.name, f.fullName, f.description, f.modTime FROM Facility f "
            "WHERE f.id > {after} ORDER BY f.id LIMIT 0, {count}",
            5,
        )
        now = self._clock()
        by_id = {row[0]: row for row in rows}
        directory = naming.Directory((_text(row[1]), row[0], True) for row in rows)
        nodes = []
        for entry in directory.entries:
            fid, name, full_name, description, mod = by_id[entry.ids[0]]
            t = _ns(_date(mod))
            nodes.append(Node(
                NodeKey(Kind.FACILITY, fid), ROOT_KEY, entry.file_name, mtime_ns=t, ctime_ns=t,
                extra=_extra(id=fid, name=name, fullName=full_name, description=description),
            ))
        self._store(Listing(ROOT_KEY, nodes, now))
        self._account(ROOT_KEY, 0, 0, len(nodes))

    _INVESTIGATIONS = (
        "SELECT inv.id, inv.name, inv.visitId, inv.title, inv.doi, inv.modTime "
        "FROM Investigation inv WHERE inv.facility.id = {facility}{extra} "
        "AND inv.id > {{after}} ORDER BY inv.id LIMIT 0, {{count}}"
    )

    async def _fetch_facility(self, facility_id: int) -> None:
        rows = await self._paged(
            self._INVESTIGATIONS.format(facility=facility_id, extra=""), 6
        )
        now = self._clock()
        groups: dict[str, list[tuple[Any, ...]]] = {}
        for row in rows:
            groups.setdefault(_text(row[1]), []).append(row)
        directory = naming.Directory((name, None, True) for name in groups)
        key = NodeKey(Kind.FACILITY, facility_id)
        nodes = []
        for entry in directory.entries:
            name_key = NodeKey(Kind.NAME, facility_id, (entry.name,))
            visits = self._name_listing(name_key, groups[entry.name], now)
            nodes.append(self._name_node(name_key, key, entry.file_name, visits))
        self._store(Listing(key, nodes, now))
        self._account(key, 0, 0, len(nodes))

    def _name_listing(self, key: NodeKey, rows: Sequence[tuple[Any, ...]], now: float) -> Listing:
        by_id = {row[0]: row for row in rows}
        directory = naming.Directory((_text(row[2]), row[0], True) for row in rows)
        nodes = []
        for entry in directory.entries:
            iid, name, visit, title, doi, mod = by_id[entry.ids[0]]
            t = _ns(_date(mod))
            nodes.append(Node(
                NodeKey(Kind.INVESTIGATION, iid), key, entry.file_name, mtime_ns=t, ctime_ns=t,
                extra=_extra(id=iid, name=name, visitId=visit, title=title, doi=doi),
            ))
        listing = Listing(key, nodes, now)
        self._store(listing)
        self._account(key, 0, 0, len(nodes))
        return listing

    @staticmethod
    def _name_node(key: NodeKey, parent: NodeKey, file_name: str, visits: Listing) -> Node:
        t = max((node.mtime_ns for node in visits.entries), default=0)
        ids = " ".join(str(i) for i in sorted(node.key.id for node in visits.entries))
        return Node(key, parent, file_name, mtime_ns=t, ctime_ns=t,
                    extra=_extra(name=key.path[0], investigation_ids=ids))

    async def _fetch_name(self, key: NodeKey) -> None:
        name = key.path[0]
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate cannot be sent: list the facility
            await self._fetch_facility(key.id)
            return
        rows = await self._paged(
            self._INVESTIGATIONS.format(
                facility=key.id, extra=f" AND inv.name = {quote(name)}"
            ),
            6,
        )
        self._name_listing(key, rows, self._clock())

    async def _fetch_investigation(self, investigation_id: int) -> None:
        rows = await self._paged(
            "SELECT ds.id, ds.name, ds.description, ds.doi, ds.location, ds.modTime "
            f"FROM Dataset ds WHERE ds.investigation.id = {investigation_id} "
            "AND ds.id > {after} ORDER BY ds.id LIMIT 0, {count}",
            6,
        )
        now = self._clock()
        key = NodeKey(Kind.INVESTIGATION, investigation_id)
        by_id = {row[0]: row for row in rows}
        directory = naming.Directory((_text(row[1]), row[0], True) for row in rows)
        nodes = []
        for entry in directory.entries:
            did, name, description, doi, location, mod = by_id[entry.ids[0]]
            t = _ns(_date(mod))
            nodes.append(Node(
                NodeKey(Kind.DATASET, did), key, entry.file_name, mtime_ns=t, ctime_ns=t,
                extra=_extra(id=did, name=name, description=description, doi=doi,
                             location=location, investigation_id=investigation_id),
            ))
        self._store(Listing(key, nodes, now))
        self._account(key, 0, 0, len(nodes))

    async def _fetch_dataset(self, dataset_id: int) -> None:
        rows = await self._paged(
            "SELECT df.id, df.name, df.fileSize, df.modTime, df.datafileModTime, "
            "df.datafileCreateTime, df.checksum, df.location, df.description, df.doi "
            f"FROM Datafile df WHERE df.dataset.id = {dataset_id} AND df.location IS NOT NULL "
            "AND df.id > {after} ORDER BY df.id LIMIT 0, {count}",
            10,
        )
        now = self._clock()
        records: dict[int, DatafileRecord] = {}
        for row in rows:
            did, name, size, mod, dmod, dcreate, checksum, location, description, doi = row
            records[did] = DatafileRecord(
                id=did, name=_text(name), dataset_id=dataset_id,
                fileSize=size if isinstance(size, int) and size > 0 else 0,
                modTime=_date(mod), datafileModTime=_date(dmod),
                datafileCreateTime=_date(dcreate), checksum=checksum, location=location,
                description=description, doi=doi,
            )
        if any("/" in rec.name for rec in records.values()):
            tree = naming.DatafileTree((rec.name, rec.id) for rec in records.values())
            self._store_tree(dataset_id, tree, records, now)
        else:  # no directories: one flat listing (what DatafileTree would make, cheaper)
            self._store_flat(dataset_id, records, now)

    def _store_flat(self, dataset_id: int, records: Mapping[int, DatafileRecord],
                    now: float) -> None:
        key = NodeKey(Kind.DATASET, dataset_id)
        directory = naming.Directory((rec.name, rec.id, False) for rec in records.values())
        nodes = []
        size = 0
        for entry in directory.entries:
            rec = records[entry.ids[0]]
            nodes.append(Node(
                NodeKey(Kind.DATAFILE, rec.id), key, entry.file_name, size=rec.fileSize,
                mtime_ns=rec.mtime_ns, ctime_ns=rec.ctime_ns, datafile=rec,
            ))
            size += rec.fileSize
        self._store(Listing(key, nodes, now))
        self._drop_folders(dataset_id, ())
        self._account(key, size, len(nodes), 0)

    def _drop_folders(self, dataset_id: int, keep: Iterable[NodeKey]) -> None:
        """Forget the folder listings of a dataset that are not in ``keep``."""
        current = set(keep)
        for stale in [k for k in self._listings
                      if k.kind is Kind.FOLDER and k.id == dataset_id and k not in current]:
            del self._listings[stale]

    def _store_tree(
        self,
        dataset_id: int,
        tree: naming.DatafileTree,
        records: Mapping[int, DatafileRecord],
        now: float,
    ) -> None:
        dataset_key = NodeKey(Kind.DATASET, dataset_id)
        # latest mtime of the datafiles below each folder (by tree path)
        folder_mtime: dict[tuple[str, ...], int] = {}
        for rec in records.values():
            path = tree.path_of(rec.id)
            if path is None or len(path) < 2:
                continue
            t = rec.mtime_ns
            for depth in range(1, len(path)):
                prefix = path[:depth]
                if folder_mtime.get(prefix, -1) < t:
                    folder_mtime[prefix] = t
        components: dict[tuple[str, ...], tuple[str, ...]] = {(): ()}
        keys: dict[tuple[str, ...], NodeKey] = {(): dataset_key}
        files = dirs = 0
        size = 0
        for path in tree.directories:
            directory = tree.directory(path)
            assert directory is not None
            key = keys[path]
            nodes = []
            for entry in directory.entries:
                if entry.is_dir:
                    child = (*path, entry.file_name)
                    comps = (*components[path], entry.name)
                    components[child] = comps
                    child_key = NodeKey(Kind.FOLDER, dataset_id, comps)
                    keys[child] = child_key
                    t = folder_mtime.get(child, 0)
                    nodes.append(Node(
                        child_key, key, entry.file_name, mtime_ns=t, ctime_ns=t,
                        extra=_extra(name="/".join(comps), dataset_id=dataset_id),
                    ))
                    dirs += 1
                else:
                    rec = records[entry.ids[0]]
                    nodes.append(Node(
                        NodeKey(Kind.DATAFILE, rec.id), key, entry.file_name, size=rec.fileSize,
                        mtime_ns=rec.mtime_ns, ctime_ns=rec.ctime_ns, datafile=rec,
                    ))
                    files += 1
                    size += rec.fileSize
            self._store(Listing(key, nodes, now))
        # folders that vanished since the last fetch must not linger
        self._drop_folders(dataset_id, keys.values())
        self._account(dataset_key, size, files, dirs)


def _text(value: Any) -> str:
    """An ICAT name as text (a missing name becomes the empty name)."""
    return "" if value is None else str(value)

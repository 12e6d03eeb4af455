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

Expired listings are dropped (at most once per ``metadata_ttl``, when a fetch
starts), and with them what only they backed: the parent links of the
directories they listed and their share of :meth:`Catalog.usage`. So memory
follows what was listed recently, not everything a long-running mount ever
listed; ``..`` of a directory whose parent's listing expired is found again
(:meth:`Catalog.resolve`).

The datafile record
-------------------
:class:`DatafileRecord` is what the read path gets for a datafile
(``transfer.open``/``transfer.status``): ``id``, ``size`` (= ``fileSize``),
``version`` (a hashable token that changes when ICAT's ``modTime`` or
``fileSize`` change), and ICAT's field names (``fileSize``, ``modTime``,
``datafileModTime``, ``checksum``, ``location``, ...) so that code written for
:class:`idsfs.model.Datafile` reads it the same way.

Local entries and changes made through the mount
------------------------------------------------
Files being written through the mount (``SPOOL`` nodes, not yet datafiles) and
directories made with ``mkdir`` inside a dataset (``FOLDER`` nodes that no
datafile name has yet) are *local entries*: :meth:`Catalog.add_local` puts them
into the tree in front of the ICAT listings (a local entry hides a listed one
of the same name), :meth:`Catalog.remove_local` takes them out. Changes this
mount made in ICAT are applied to the cached listings at once, without a new
query of the whole directory: :meth:`Catalog.datafile_added` (one query for the
new datafile), :meth:`Catalog.remove_datafile`, :meth:`Catalog.rename_datafile`;
directories of datafile names that an unlink or rename leaves empty become
local directories, so they stay until ``rmdir`` as on a local disk. Dataset
changes (:meth:`Catalog.create_dataset`, :meth:`Catalog.delete_dataset`,
:meth:`Catalog.rename_dataset`) refetch the visit's listing.

Errors: ICAT and transport errors of :mod:`idsfs.errors` pass through
unchanged (``fs.py`` maps them to errno); an unusable row raises
:class:`~idsfs.errors.ICATResponseError`.

Thread safety: a :class:`Catalog` belongs to one trio run and is used from the
trio thread only; ICAT calls run in worker threads through the
:class:`~idsfs.aio.ThreadBridge`.
"""

from __future__ import annotations

import bisect
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
from idsfs.errors import ICATError, ICATResponseError, IdsfsError, MissingTypeError
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
    #: a file written through this mount that is not a datafile (yet): the
    #: dataset id and the upload's id (``path=(uid,)``) are its key
    SPOOL = 7


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
        """Whether nodes of this key are directories. Raises nothing."""
        return self.kind not in (Kind.DATAFILE, Kind.SPOOL)

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
        """The size in bytes (``fileSize``). Raises nothing."""
        return self.fileSize

    @property
    def version(self) -> tuple[int, int]:
        """A token that changes when the datafile changes: (modTime in ns, fileSize).

        Raises TypeError when ``modTime`` is a naive datetime (the catalogue
        makes only aware ones).
        """
        return (_ns(self.modTime), self.fileSize)

    @property
    def mtime_ns(self) -> int:
        """Modification time shown: ``datafileModTime``, else ``modTime`` (ns).

        Raises TypeError when that time is a naive datetime (the catalogue
        makes only aware ones).
        """
        return _ns(self.datafileModTime or self.modTime)

    @property
    def ctime_ns(self) -> int:
        """Change time shown: ICAT's ``modTime`` (ns).

        Raises TypeError when ``modTime`` is a naive datetime (the catalogue
        makes only aware ones).
        """
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
        local: for ``SPOOL`` nodes the upload (``idsfs.upload.Upload``) whose
            spool holds the file; attributes come from it.
    """

    key: NodeKey
    parent: NodeKey
    name: str
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    datafile: DatafileRecord | None = None
    extra: tuple[tuple[str, str], ...] = ()
    local: Any = field(default=None, compare=False)

    @property
    def is_dir(self) -> bool:
        """Whether the node is a directory. Raises nothing."""
        return self.key.is_dir

    def xattrs(self) -> dict[str, str]:
        """The node's static extended attributes (``user.ids.*``), name -> value.

        Attributes whose ICAT value is null are left out. ``user.ids.status``
        is dynamic and not included here. Raises nothing.
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


def _name_of(node: Node) -> str:
    return node.name


def _extra(**values: object) -> tuple[tuple[str, str], ...]:
    """Build directory xattrs from keyword values; None values are left out."""
    return tuple(
        ("user.ids." + name.replace("_", "."), str(value))
        for name, value in values.items()
        if value is not None
    )


#: Times a listing is fetched again because it was changed here while ICAT answered.
_REFETCHES = 2


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
        """Return the entry shown as ``name``, or ``None``. Raises nothing."""
        return self._by_name.get(name)

    def _insert(self, node: Node) -> None:
        """Add ``node`` in file-name order (its name must be new here)."""
        entries = self.entries
        i = bisect.bisect_left(entries, node.name, key=_name_of)
        self.entries = (*entries[:i], node, *entries[i:])
        self._by_name[node.name] = node
        self._by_key[node.key] = node
        if node.is_dir:
            self.subdirs += 1
        self.total_size += node.size

    def _remove(self, key: NodeKey) -> Node | None:
        """Take the entry with key ``key`` out; return it (None if absent)."""
        node = self._by_key.pop(key, None)
        if node is None:
            return None
        self._by_name.pop(node.name, None)
        self.entries = tuple(n for n in self.entries if n.key != key)
        if node.is_dir:
            self.subdirs -= 1
        self.total_size -= node.size
        return node

    def find(self, key: NodeKey) -> Node | None:
        """Return the entry with key ``key``, or ``None``. Raises nothing."""
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
        # changes made here to the listings of a unit (see _base_listing)
        self._changes: dict[NodeKey, int] = {}
        self._usage: dict[NodeKey, tuple[int, int, int]] = {}
        self._totals = [0, 0, 0]
        self._next_prune = clock() + self._ttl
        now_ns = time.time_ns()
        self._root = Node(ROOT_KEY, ROOT_KEY, "", mtime_ns=now_ns, ctime_ns=now_ns)
        self._queries = 0
        self._fetches = 0
        self._hits = 0
        self._misses = 0
        # local entries: parent key -> file name -> node, and key -> node
        self._local: dict[NodeKey, dict[str, Node]] = {}
        self._local_keys: dict[NodeKey, Node] = {}
        # (facility id, dataset type name) -> DatasetType id
        self._types: dict[tuple[int, str], int] = {}

    # ------------------------------------------------------------------ public

    @property
    def metadata_ttl(self) -> float:
        """Seconds a listing is kept. Raises nothing."""
        return self._ttl

    @property
    def root(self) -> Node:
        """The root node (its times are the catalogue's creation time). Raises nothing."""
        return self._root

    async def listing(self, key: NodeKey) -> Listing | None:
        """Return the listing of directory ``key``, fetching it when not cached or expired.

        Local entries (see the module docstring) are merged in. Returns
        ``None`` when the directory no longer exists (a datafile path prefix
        whose datafiles are gone). An ICAT object that was deleted lists as
        empty.

        Raises:
            ValueError: ``key`` is not a directory's key.
            ICATError: what ICAT answered (e.g. ``ICATSessionError`` when the
                session expired and could not be renewed), or
                :class:`~idsfs.errors.ICATResponseError` for an answer the
                listing cannot use (a bad row or date, paging that would not end).
            TransportError: the ICAT server could not be reached or stopped answering.

        A task that waits for a fetch another task started gets that fetch's exception.
        """
        base = await self._base_listing(key)
        return self._merge(key, base)

    def _merge(self, key: NodeKey, base: Listing | None) -> Listing | None:
        """``base`` with the local entries of ``key`` in front (a new Listing if any)."""
        local = self._local.get(key)
        if not local:
            if base is None and key in self._local_keys:
                return Listing(key, (), self._clock())
            return base
        fetched = base.fetched if base is not None else self._clock()
        if base is None:
            return Listing(key, sorted(local.values(), key=_name_of), fetched)
        keys = {node.key for node in local.values()}
        entries = [node for node in base.entries if node.name not in local and node.key not in keys]
        entries.extend(local.values())
        entries.sort(key=_name_of)
        return Listing(key, entries, fetched)

    async def _base_listing(self, key: NodeKey) -> Listing | None:
        """The ICAT listing of ``key`` (cached or fetched), without local entries."""
        if not key.is_dir:
            raise ValueError(f"{key} is not a directory")
        cached = self._fresh(key)
        if cached is not None:
            self._hits += 1
            return cached
        unit = self._unit(key)
        if unit != key and self._fresh(unit) is not None:
            # The dataset's listing is fresh and made none for this folder: ICAT
            # has nothing under it (a folder made here with mkdir). Fetching the
            # whole dataset again for each of them made nested copies quadratic.
            self._hits += 1
            return None
        self._misses += 1
        flight = self._flights.get(unit)
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error.with_traceback(None)  # shared by every waiter
            if flight.ok:
                return self._listings.get(key)
            # the fetch was cancelled: fetch again (below)
        while (other := self._flights.get(unit)) is not None:
            await other.done.wait()
        flight = _Flight()
        self._flights[unit] = flight
        try:
            for _ in range(_REFETCHES + 1):
                changes = self._changes.get(unit, 0)
                await self._fetch(unit)
                if self._changes.get(unit, 0) == changes:
                    break
                # changed here while ICAT answered (a file stored or deleted): the
                # answer may predate the change (a file just stored would be missing:
                # ENOENT for a name that exists), so it is asked again
            else:
                # still changing: the last answer serves the requests waiting now only
                self._expire(unit)
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
        not valid UTF-8 is never found. Raises what :meth:`listing` raises
        (``ValueError`` when ``parent`` is not a directory's key).
        """
        if isinstance(name, bytes):
            try:
                name = name.decode("utf-8")
            except UnicodeDecodeError:
                return None
        local = self._local.get(parent)
        if local is not None:
            node = local.get(name)
            if node is not None:
                return node
        listing = await self._base_listing(parent)
        return None if listing is None else listing.get(name)

    async def refresh(self, node: Node) -> Node | None:
        """Return ``node`` as its parent's current listing shows it, or ``None`` if gone.

        The root is always there. Raises what :meth:`listing` raises.
        """
        if node.key == ROOT_KEY:
            return self._root
        local = self._local_keys.get(node.key)
        if local is not None:
            return local
        if node.key.kind is Kind.SPOOL:
            return None
        listing = await self.listing(node.parent)
        return None if listing is None else listing.find(node.key)

    async def resolve(self, key: NodeKey) -> Node | None:
        """Return the node of directory ``key`` as its parent's listing shows it, or ``None``.

        Used for ``..``. The parent is the one a cached listing recorded;
        when that listing has expired it is found again: from the key itself
        (facility, investigation name, folder) or with one ICAT query
        (investigation, dataset). ``None`` when the directory is gone or not
        readable. Raises what :meth:`listing` raises, and
        :class:`~idsfs.errors.ICATResponseError` when ICAT answers that
        query with an unusable row.
        """
        if key == ROOT_KEY:
            return self._root
        parent = await self._parent_key(key)
        if parent is None:
            return None
        listing = await self.listing(parent)
        return None if listing is None else listing.find(key)

    async def _parent_key(self, key: NodeKey) -> NodeKey | None:
        """The key of the directory listing directory ``key`` (None: unknown or gone)."""
        known = self._parents.get(key)
        if known is not None:
            return known
        kind = key.kind
        if kind is Kind.FACILITY:
            return ROOT_KEY
        if kind is Kind.NAME:
            return NodeKey(Kind.FACILITY, key.id)
        if kind is Kind.FOLDER:
            return _folder_parent(key)
        if kind is Kind.INVESTIGATION:
            rows = await self._search(
                f"SELECT inv.facility.id, inv.name FROM Investigation inv WHERE inv.id = {key.id}")
            if not rows:
                return None
            row = rows[0]
            if not isinstance(row, tuple) or len(row) != 2 or not _is_id(row[0]):
                raise ICATResponseError(f"unexpected row for an investigation: {str(row)[:80]}")
            return NodeKey(Kind.NAME, row[0], (_text(row[1]),))
        if kind is Kind.DATASET:
            rows = await self._search(
                f"SELECT ds.investigation.id FROM Dataset ds WHERE ds.id = {key.id}")
            if not rows:
                return None
            if not _is_id(rows[0]):
                raise ICATResponseError(f"unexpected row for a dataset: {str(rows[0])[:80]}")
            return NodeKey(Kind.INVESTIGATION, rows[0])
        return None

    def parent_of(self, key: NodeKey) -> NodeKey | None:
        """The key of the directory whose cached listing holds directory ``key``, else None.

        The root is its own parent. Known only while that listing is cached
        (or ``key`` is a local directory); :meth:`resolve` also finds the
        others. Raises nothing.
        """
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

    def local_subdirs(self, key: NodeKey) -> int:
        """How many local directories ``key`` holds that its cached ICAT listing does not.

        Raises nothing.
        """
        local = self._local.get(key)
        if not local:
            return 0
        base = self._listings.get(key)
        return sum(1 for name, node in local.items()
                   if node.is_dir and (base is None or base.get(name) is None))

    def cached_nlink(self, key: NodeKey) -> int | None:
        """The link count if known without a query (fresh listing cached), else ``None``.

        Raises nothing.
        """
        if not key.is_dir:
            return 1
        listing = self._fresh(key)
        if listing is None:
            if key in self._local_keys and key.kind is Kind.FOLDER:
                return 2 + self.local_subdirs(key)
            return None
        return 2 + listing.subdirs + self.local_subdirs(key)

    def invalidate(self, *keys: NodeKey) -> None:
        """Forget the cached listings of the directories ``keys``.

        A dataset or one of its folders drops the whole dataset (all its
        folders); a facility drops its investigation-name directories too.
        The next request fetches again. Call after writes (put, delete, mkdir).
        Raises nothing.
        """
        for key in keys:
            self._touch(key)
            for k in self._listings_of(self._unit(key)):
                self._listings.pop(k, None)

    def _listings_of(self, unit: NodeKey) -> list[NodeKey]:
        """The keys of the cached listings that the fetch of ``unit`` makes."""
        if unit.kind is Kind.DATASET:
            return [k for k in self._listings
                    if k.id == unit.id and k.kind in (Kind.DATASET, Kind.FOLDER)]
        if unit.kind is Kind.FACILITY:
            return [k for k in self._listings
                    if k == unit or (k.kind is Kind.NAME and k.id == unit.id)]
        return [unit]

    def _touch(self, key: NodeKey) -> None:
        """Count a change made here to the listings of ``key``'s unit."""
        unit = self._unit(key)
        self._changes[unit] = self._changes.get(unit, 0) + 1

    def _expire(self, unit: NodeKey) -> None:
        """Keep the listings of ``unit`` for their current users, but fetch them again next."""
        for k in self._listings_of(unit):
            listing = self._listings.get(k)
            if listing is not None:
                listing.fetched = float("-inf")

    def invalidate_all(self) -> None:
        """Forget every cached listing. Raises nothing."""
        self._listings.clear()

    # ------------------------------------------------------------------ local entries

    def add_local(self, node: Node) -> None:
        """Show ``node`` (a ``SPOOL`` file or a local ``FOLDER``) in its parent directory.

        It hides an entry of the same name in the ICAT listing. Replaces an
        earlier local entry with the same key (e.g. after a rename). Raises
        nothing.
        """
        self.remove_local(node.key)
        self._local.setdefault(node.parent, {})[node.name] = node
        self._local_keys[node.key] = node
        if node.is_dir:
            self._parents[node.key] = node.parent

    def remove_local(self, key: NodeKey) -> Node | None:
        """Take the local entry ``key`` out of the tree; return it (None if there was none).

        Raises nothing.
        """
        node = self._local_keys.pop(key, None)
        if node is None:
            return None
        siblings = self._local.get(node.parent)
        if siblings is not None:
            if siblings.get(node.name) is node or (
                    node.name in siblings and siblings[node.name].key == key):
                del siblings[node.name]
            if not siblings:
                del self._local[node.parent]
        return node

    def local_node(self, key: NodeKey) -> Node | None:
        """The local entry with key ``key``, or None. Raises nothing."""
        return self._local_keys.get(key)

    def local_children(self, key: NodeKey) -> dict[str, Node]:
        """The local entries of directory ``key`` (file name -> node; a copy).

        Raises nothing.
        """
        return dict(self._local.get(key, {}))

    def is_local(self, key: NodeKey) -> bool:
        """True for a local entry (a file being written, a directory made here).

        Raises nothing.
        """
        return key in self._local_keys

    # ------------------------------------------------------------------ tree facts

    def facility_of(self, key: NodeKey) -> int | None:
        """The facility id above directory ``key`` as far as cached listings show it, else None.

        Raises nothing (callers that get None ask ICAT themselves).
        """
        k = key
        if k.kind in (Kind.FOLDER, Kind.SPOOL):
            k = NodeKey(Kind.DATASET, k.id)
        for _ in range(6):
            if k.kind in (Kind.NAME, Kind.FACILITY):
                return k.id
            parent = self._parents.get(k)
            if parent is None:
                return None
            k = parent
        return None

    # ------------------------------------------------------------------ datafiles changed here

    _DATAFILE_COLUMNS = (
        "SELECT df.id, df.name, df.fileSize, df.modTime, df.datafileModTime, "
        "df.datafileCreateTime, df.checksum, df.location, df.description, df.doi "
        "FROM Datafile df WHERE "
    )

    @staticmethod
    def _record(dataset_id: int, row: Sequence[Any]) -> DatafileRecord:
        did, name, size, mod, dmod, dcreate, checksum, location, description, doi = row
        return DatafileRecord(
            id=did, name=_text(name), dataset_id=dataset_id,
            fileSize=size if isinstance(size, int) and size > 0 else 0,
            modTime=_date(mod), datafileModTime=_date(dmod),
            datafileCreateTime=_date(dcreate), checksum=checksum, location=location,
            description=description, doi=doi,
        )

    async def fetch_datafile(self, dataset_id: int, datafile_id: int) -> DatafileRecord | None:
        """One datafile of a dataset as the listings show it (one ICAT query), or None.

        Raises the ICAT and transport errors of :mod:`idsfs.errors`
        (:class:`~idsfs.errors.ICATResponseError` for a bad date).
        """
        rows = await self._search(
            self._DATAFILE_COLUMNS + f"df.id = {datafile_id} AND df.dataset.id = {dataset_id} "
            "AND df.location IS NOT NULL")
        for row in rows:
            if isinstance(row, tuple) and len(row) == 10:
                return self._record(dataset_id, row)
        return None

    async def datafile_added(self, dataset_id: int, datafile_id: int) -> Node | None:
        """A datafile was created here: put it into the cached listings (one query).

        Returns its node (None if ICAT does not show it). Raises what
        :meth:`fetch_datafile` raises: the ICAT and transport errors of
        :mod:`idsfs.errors` (:class:`~idsfs.errors.ICATResponseError` for a bad date).
        """
        record = await self.fetch_datafile(dataset_id, datafile_id)
        if record is None:
            return None
        return self.insert_datafile(record)

    def insert_datafile(self, record: DatafileRecord) -> Node | None:
        """Add ``record`` to the cached listings of its dataset (none cached: nothing to do).

        Missing directories of its name are added. When its file name is taken
        (a clash that needs the naming rules' suffixes) the dataset's listings
        are dropped instead and fetched again when next needed. Returns the
        node, or None when nothing was cached. Raises nothing (no ICAT call).
        """
        dataset_id = record.dataset_id
        top_key = NodeKey(Kind.DATASET, dataset_id)
        self._touch(top_key)  # also when nothing is cached: a fetch may be under way
        listing = self._listings.get(top_key)
        if listing is None:
            return None
        self.remove_datafile(dataset_id, record.id, keep_dirs=False)
        listing = self._listings.get(top_key)
        if listing is None:
            return None
        parts = naming.split_datafile_name(record.name)
        parent_key = top_key
        new_dirs = 0
        for depth in range(1, len(parts)):
            folder_key = NodeKey(Kind.FOLDER, dataset_id, tuple(parts[:depth]))
            folder = listing.find(folder_key)
            if folder is None:
                local = self._local_keys.get(folder_key)
                file_name = local.name if local is not None else naming.escape_name(
                    parts[depth - 1])
                if listing.get(file_name) is not None:
                    self.invalidate(top_key)
                    return None
                folder = Node(folder_key, parent_key, file_name, mtime_ns=record.mtime_ns,
                              ctime_ns=record.mtime_ns,
                              extra=_extra(name="/".join(parts[:depth]), dataset_id=dataset_id))
                listing._insert(folder)
                self._parents[folder_key] = parent_key
                self._store(Listing(folder_key, (), listing.fetched))
                new_dirs += 1
            child = self._listings.get(folder_key)
            if child is None:
                self.invalidate(top_key)
                return None
            listing, parent_key = child, folder_key
        file_name = naming.escape_name(parts[-1])
        if listing.get(file_name) is not None:
            self.invalidate(top_key)
            return None
        node = Node(NodeKey(Kind.DATAFILE, record.id), parent_key, file_name,
                    size=record.fileSize, mtime_ns=record.mtime_ns, ctime_ns=record.ctime_ns,
                    datafile=record)
        listing._insert(node)
        self._adjust(top_key, record.fileSize, 1, new_dirs)
        return node

    def remove_datafile(self, dataset_id: int, datafile_id: int, *,
                        keep_dirs: bool = True) -> Node | None:
        """Take a datafile deleted or renamed here out of the cached listings.

        With ``keep_dirs`` the directories of its name that are left empty
        become local directories (they stay until ``rmdir``). Returns the
        removed node (None when it was not cached). Raises nothing (no ICAT call).
        """
        key = NodeKey(Kind.DATAFILE, datafile_id)
        self._touch(NodeKey(Kind.DATASET, dataset_id))
        for listing_key, listing in list(self._listings.items()):
            if listing_key.id != dataset_id or listing_key.kind not in (Kind.DATASET,
                                                                        Kind.FOLDER):
                continue
            node = listing._remove(key)
            if node is None:
                continue
            gone_dirs = 0
            current = listing
            while current.key.kind is Kind.FOLDER and not current.entries:
                parent = self._listings.get(_folder_parent(current.key))
                if parent is None:
                    break
                folder = parent._remove(current.key)
                del self._listings[current.key]
                gone_dirs += 1
                if folder is not None and keep_dirs:
                    self.add_local(folder)
                current = parent
            self._adjust(NodeKey(Kind.DATASET, dataset_id), -node.size, -1, -gone_dirs)
            return node
        return None

    def _adjust(self, unit: NodeKey, size: int, files: int, dirs: int) -> None:
        old = self._usage.get(unit)
        if old is None:
            return
        self._account(unit, max(0, old[0] + size), max(0, old[1] + files),
                      max(0, old[2] + dirs))

    async def rename_datafile(self, record: DatafileRecord, new_name: str) -> Node | None:
        """Rename a datafile in ICAT and in the cached listings; return its new node.

        Raises the ICAT and transport errors of the update
        (:mod:`idsfs.errors`: ``ICATObjectExistsError`` when the name is taken
        in the dataset, ``ICATPrivilegesError`` without UPDATE permission).
        Once the update succeeded nothing is raised: when the renamed datafile
        cannot be fetched again (or its row is unusable), the dataset's
        listings are dropped, to be fetched again when next needed, and None
        is returned.
        """
        await self._bridge.run(self._icat.update,
                               {"Datafile": {"id": record.id, "name": new_name}},
                               abandon_on_cancel=False, name="ICAT rename datafile")
        self.remove_datafile(record.dataset_id, record.id)
        return await self.show_datafile(record.dataset_id, record.id)

    async def still_named(self, record: DatafileRecord) -> bool:
        """Whether ICAT still shows datafile ``record`` under its name (one query).

        A listing may be up to the metadata TTL old: a datafile someone else
        renamed or deleted meanwhile must not be deleted or renamed here by the
        old name (the id would hit the file under its new name). When ICAT shows
        it otherwise, the dataset's listings are dropped and False is returned.
        Raises the ICAT and transport errors of :mod:`idsfs.errors`.
        """
        fresh = await self.fetch_datafile(record.dataset_id, record.id)
        if fresh is not None and fresh.name == record.name:
            return True
        log.info("datafile %d is no longer %r in ICAT (renamed or deleted elsewhere): its "
                 "dataset is listed afresh", record.id, record.name)
        self.invalidate(NodeKey(Kind.DATASET, record.dataset_id))
        return False

    async def show_datafile(self, dataset_id: int, datafile_id: int) -> Node | None:
        """Show a datafile stored or changed here in the cached listings; return its node.

        :meth:`datafile_added`, except that when the datafile cannot be fetched
        (or its row is unusable) the dataset's listings are dropped instead, to
        be fetched again when next needed, and None is returned. Never raises
        (the change is done in ICAT already).
        """
        try:
            return await self.datafile_added(dataset_id, datafile_id)
        except IdsfsError as exc:
            log.warning("datafile %d was stored or changed in ICAT, but fetching it failed "
                        "(%s): its dataset is listed afresh", datafile_id, exc)
            self.invalidate(NodeKey(Kind.DATASET, dataset_id))
            return None

    async def set_datafile_mod_time(self, dataset_id: int, datafile_id: int, ms: int) -> None:
        """Set a datafile's ``datafileModTime`` (epoch ms) in ICAT and in the cached listings.

        Raises the ICAT and transport errors of the update (:mod:`idsfs.errors`,
        e.g. ``ICATPrivilegesError`` without UPDATE permission); after it, as
        :meth:`rename_datafile`, nothing.
        """
        seconds, millis = divmod(int(ms), 1000)
        date = _dt.datetime.fromtimestamp(seconds, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        await self._bridge.run(
            self._icat.update,
            {"Datafile": {"id": datafile_id, "datafileModTime": f"{date}.{millis:03d}+00:00"}},
            abandon_on_cancel=False, name="ICAT set datafileModTime")
        self.remove_datafile(dataset_id, datafile_id, keep_dirs=False)
        await self.show_datafile(dataset_id, datafile_id)

    # ------------------------------------------------------------------ datasets changed here

    async def dataset_type_id(self, facility_id: int, name: str) -> int:
        """The id of the facility's DatasetType ``name`` (cached).

        Raises :class:`~idsfs.errors.MissingTypeError` (listing the types the
        facility has) when there is none, and the ICAT and transport errors of
        :mod:`idsfs.errors`.
        """
        known = self._types.get((facility_id, name))
        if known is not None:
            return known
        rows = await self._search(
            f"SELECT t.id FROM DatasetType t WHERE t.facility.id = {facility_id} "
            f"AND t.name = {quote(name)}")
        ids = [r for r in rows if isinstance(r, int) and not isinstance(r, bool)]
        if not ids:
            names = await self._search(
                f"SELECT t.name FROM DatasetType t WHERE t.facility.id = {facility_id} "
                "ORDER BY t.name")
            have = ", ".join(str(n) for n in names)[:400]
            msg = (f"the facility (id {facility_id}) has no dataset type {name!r}; choose one "
                   f"with --dataset-type NAME (it has: {have or 'none'})")
            log.error("%s", msg)
            raise MissingTypeError(msg)
        self._types[(facility_id, name)] = ids[0]
        return ids[0]

    async def create_dataset(self, investigation: Node, name: str, type_name: str) -> Node:
        """Create Dataset ``name`` in the investigation (visit) ``investigation``.

        Returns the new dataset's node: as the visit's listing, fetched again,
        shows it; made from what was sent when that fetch fails or does not
        show it yet (the dataset exists in ICAT then: the visit is listed afresh
        when next needed). Raises :class:`~idsfs.errors.MissingTypeError` when
        the facility has no dataset type ``type_name``;
        :class:`~idsfs.errors.ICATResponseError` when the investigation's
        facility cannot be found; the other ICAT and transport errors of
        :mod:`idsfs.errors` (``ICATObjectExistsError`` for a taken name,
        ``ICATPrivilegesError`` without CREATE permission). Nothing after the
        create raises.
        """
        inv_id = investigation.key.id
        facility_id = self.facility_of(investigation.key)
        if facility_id is None:
            rows = await self._search(
                f"SELECT inv.facility.id FROM Investigation inv WHERE inv.id = {inv_id}")
            if not rows or not isinstance(rows[0], int):
                raise ICATResponseError(f"cannot find the facility of investigation {inv_id}")
            facility_id = int(rows[0])
        type_id = await self.dataset_type_id(facility_id, type_name)
        new_id = await self._bridge.run(
            self._icat.create,
            {"Dataset": {"name": name, "complete": False, "investigation": {"id": inv_id},
                         "type": {"id": type_id}}},
            abandon_on_cancel=False, name="ICAT create dataset")
        self.invalidate(investigation.key)
        key = NodeKey(Kind.DATASET, int(new_id))
        try:
            listing = await self._base_listing(investigation.key)
        except IdsfsError as exc:
            log.warning("dataset %s was created in ICAT, but listing its visit failed (%s): "
                        "it is listed afresh when next needed", new_id, exc)
            listing = None
        node = listing.find(key) if listing else None
        if node is None:
            self.invalidate(investigation.key)
            now = _dt.datetime.now(_dt.UTC).isoformat()
            (node,) = _dataset_nodes(investigation.key, [(key.id, name, None, None, None, now)])
        return node

    async def count_datafiles(self, dataset_id: int) -> int:
        """Datafiles of a dataset in ICAT, those without location included.

        Raises the ICAT and transport errors of :mod:`idsfs.errors`.
        """
        rows = await self._search(
            f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {dataset_id}")
        return int(rows[0]) if rows and isinstance(rows[0], int) else 0

    async def delete_dataset(self, dataset: Node) -> None:
        """Delete the (empty) Dataset ``dataset`` in ICAT and forget its listings.

        Raises the ICAT and transport errors of :mod:`idsfs.errors`
        (``ICATPrivilegesError`` without DELETE permission); the listings are
        kept then.
        """
        await self._bridge.run(self._icat.delete, {"Dataset": {"id": dataset.key.id}},
                               abandon_on_cancel=False, name="ICAT delete dataset")
        self.invalidate(dataset.key)
        self.invalidate(dataset.parent)
        for key in [k for k in self._local_keys if k.id == dataset.key.id
                    and k.kind in (Kind.FOLDER, Kind.SPOOL)]:
            self.remove_local(key)

    async def rename_dataset(self, dataset: Node, new_name: str) -> None:
        """Rename a Dataset in ICAT; its visit's listing is fetched again.

        Raises the ICAT and transport errors of :mod:`idsfs.errors`
        (``ICATObjectExistsError`` when the name is taken, ``ICATPrivilegesError``
        without UPDATE permission).
        """
        await self._bridge.run(self._icat.update,
                               {"Dataset": {"id": dataset.key.id, "name": new_name}},
                               abandon_on_cancel=False, name="ICAT rename dataset")
        self.invalidate(dataset.parent)

    def usage(self) -> Usage:
        """Sizes and counts of what the cached listings hold (for ``statfs``).

        A directory counts with its latest listing until that listing expires
        and is dropped (see the module docstring). Raises nothing.
        """
        size, files, dirs = self._totals
        return Usage(bytes=size, files=files, directories=dirs + 1)

    def stats(self) -> CatalogStats:
        """Return the counters. Raises nothing."""
        return CatalogStats(
            queries=self._queries,
            fetches=self._fetches,
            hits=self._hits,
            misses=self._misses,
            cached=len(self._listings),
        )

    # ------------------------------------------------------------------ cache

    def time_left(self, key: NodeKey) -> float:
        """Seconds until the cached listing of directory ``key`` expires (0 when none).

        What the kernel may cache an answer from that listing for (a name, or
        its absence): never longer than the listing itself. Raises nothing.
        """
        listing = self._listings.get(key)
        if listing is None:
            return 0.0
        return max(0.0, min(self._ttl, listing.fetched + self._ttl - self._clock()))

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
        self._forget_unlisted()

    def _forget_unlisted(self) -> None:
        """Drop the parent links and usage that no cached listing backs any more.

        A parent link stays while the listing that recorded it is cached, or
        while its directory is a local entry; :meth:`resolve` finds a dropped
        one again. A directory's usage stays while its own listing is cached.
        """
        listings = self._listings
        local = self._local_keys
        self._parents = {k: p for k, p in self._parents.items() if p in listings or k in local}
        for unit in [u for u in self._usage if u not in listings]:
            old = self._usage.pop(unit)
            for i in range(3):
                self._totals[i] -= old[i]

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
        Raises ICATResponseError for another row, and for a full page whose
        ids do not go beyond the previous page's (the cursor would not move:
        paging would never end).
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
            last = max(row[0] for row in page)
            if last <= after:
                raise ICATResponseError(
                    f"ICAT answered a query for ids above {after} with a full page of ids up to "
                    f"{last}: paging would not end (query: {template[:60]}...)")
            after = last

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
        nodes = _object_nodes(
            ROOT_KEY, Kind.FACILITY, rows, 1,
            lambda fid, name, full_name, description, _mod: _extra(
                id=fid, name=name, fullName=full_name, description=description))
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
        nodes = _object_nodes(
            key, Kind.INVESTIGATION, rows, 2,
            lambda iid, name, visit, title, doi, _mod: _extra(
                id=iid, name=name, visitId=visit, title=title, doi=doi))
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
        nodes = _dataset_nodes(key, rows)
        self._store(Listing(key, nodes, now))
        self._account(key, 0, 0, len(nodes))

    async def _fetch_dataset(self, dataset_id: int) -> None:
        rows = await self._paged(
            self._DATAFILE_COLUMNS + f"df.dataset.id = {dataset_id} AND df.location IS NOT NULL "
            "AND df.id > {after} ORDER BY df.id LIMIT 0, {count}",
            10,
        )
        now = self._clock()
        records = {row[0]: self._record(dataset_id, row) for row in rows}
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


def _folder_parent(key: NodeKey) -> NodeKey:
    """The directory holding folder ``key``: the folder one level up, or its dataset."""
    if len(key.path) > 1:
        return NodeKey(Kind.FOLDER, key.id, key.path[:-1])
    return NodeKey(Kind.DATASET, key.id)


def _is_id(value: Any) -> bool:
    """Whether ``value`` is an ICAT id (an int, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> str:
    """An ICAT name as text (a missing name becomes the empty name)."""
    return "" if value is None else str(value)


def _dataset_nodes(visit: NodeKey, rows: Sequence[tuple[Any, ...]]) -> list[Node]:
    """The dataset nodes of a visit's listing from rows ``(id, name, description, doi,
    location, modTime)``. Raises ICATResponseError for a bad date."""
    return _object_nodes(
        visit, Kind.DATASET, rows, 1,
        lambda did, name, description, doi, location, _mod: _extra(
            id=did, name=name, description=description, doi=doi, location=location,
            investigation_id=visit.id))


def _object_nodes(
    parent: NodeKey,
    kind: Kind,
    rows: Sequence[tuple[Any, ...]],
    name_column: int,
    extra: Callable[..., tuple[tuple[str, str], ...]],
) -> list[Node]:
    """The directory nodes of ICAT objects listed in ``parent``, in file-name order.

    Each row starts with the object's id and ends with its ``modTime``;
    ``row[name_column]`` is the name the file name is made of (naming rules,
    clashes); ``extra(*row)`` gives the node's xattrs. Raises
    ICATResponseError for a bad date.
    """
    by_id = {row[0]: row for row in rows}
    directory = naming.Directory((_text(row[name_column]), row[0], True) for row in rows)
    nodes = []
    for entry in directory.entries:
        row = by_id[entry.ids[0]]
        t = _ns(_date(row[-1]))
        nodes.append(Node(NodeKey(kind, row[0]), parent, entry.file_name, mtime_ns=t,
                          ctime_ns=t, extra=extra(*row)))
    return nodes

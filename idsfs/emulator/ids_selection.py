"""The IDS emulator's view of the catalogue and the resolution of data selections.

IDS talks to ICAT only through the catalogue's public API (``user_of``, ``search``, ``get``,
``write``, ``delete``) with the caller's user name or the reader account ``READER``, exactly as
the real IDS calls ICAT with the caller's session or its reader session. Searches are paged by
id (``... AND df.id > N ORDER BY df.id LIMIT 0, maxEntities``) so no single query exceeds
ICAT's ``maxEntities`` (ids-protocol.md §3.4 item 6).

Public API:

* :func:`parse_ids` — the id-list parsing rule of ids-protocol.md §3.1.
* :func:`validate_uuid` — the sessionId/preparedId format check of §3.2.
* :class:`Selection` — a resolved selection (datasets, located datafiles, empty datasets,
  the mustZip flag).
* :class:`CatalogueView` — catalogue queries IDS needs; also the storage's
  :class:`~idsfs.emulator.storage.MetadataSource`.

Every method that talks to the catalogue raises ``ICATException`` unless documented to raise
an :class:`~idsfs.emulator.ids_errors.IdsError` (resolution maps errors itself).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from idsfs.emulator.catalogue import READER, ICATException
from idsfs.emulator.datainfo import DfInfo, DsInfo
from idsfs.emulator.ids_errors import BadRequest, Internal, NotFound, from_icat

__all__ = ["CatalogueView", "Selection", "parse_ids", "validate_uuid"]

_UUID_RE = re.compile(r"[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}")
_LONG_RE = re.compile(r"[+-]?[0-9]+")
_SPLIT_RE = re.compile(r"\s*,\s*")
_LONG_MIN = -(2**63)
_LONG_MAX = 2**63 - 1
# ids per IN (...) list, like the reference server's chunks of 500
_IN_CHUNK = 500
_DF_COLUMNS = (
    "df.id, df.name, df.location, df.createId, df.modId, df.datafileModTime, df.modTime, "
    "df.fileSize"
)


def validate_uuid(name: str, value: str | None) -> str:
    """Return ``value`` if it is a lowercase UUID; raise :class:`BadRequest` otherwise."""
    if value is None or not _UUID_RE.fullmatch(value):
        raise BadRequest(f"The {name} parameter '{value}' is not a valid UUID")
    return value


def parse_long(name: str, value: str | None) -> int:
    """Parse ``value`` as a Java long; raise :class:`BadRequest` naming ``name`` otherwise."""
    if value is None or not _LONG_RE.fullmatch(value):
        raise BadRequest(f"The {name} parameter '{value}' is not a valid long")
    number = int(value)
    if not _LONG_MIN <= number <= _LONG_MAX:
        raise BadRequest(f"The {name} parameter '{value}' is not a valid long")
    return number


def parse_ids(name: str, value: str | None) -> list[int]:
    """Parse a comma-separated id list like the reference server (ids-protocol.md §3.1).

    Absent → ``[]``. The value is split on commas with optional surrounding whitespace;
    trailing empty pieces are dropped (Java ``String.split``); every remaining piece must be
    a long (and in range), else it raises :class:`BadRequest`. Duplicates are removed,
    order kept.
    """
    if value is None:
        return []
    pieces = _SPLIT_RE.split(value)
    if len(pieces) > 1:
        while pieces and pieces[-1] == "":
            pieces.pop()
    out: list[int] = []
    seen: set[int] = set()
    for piece in pieces:
        if not _LONG_RE.fullmatch(piece):
            raise BadRequest(
                f"The {name} parameter '{value}' is not a valid string "
                "representation of a comma separated list of longs"
            )
        number = int(piece)
        if not _LONG_MIN <= number <= _LONG_MAX:
            raise BadRequest(f"The {name} parameter '{value}' contains a number out of range")
        if number not in seen:
            seen.add(number)
            out.append(number)
    return out


def parse_time(value: Any) -> float | None:
    """Epoch seconds of an ICAT date string, or None. Never raises."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _chunks(ids: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


@dataclass
class Selection:
    """A resolved selection: every involved dataset, the located datafiles, empty datasets.

    ``must_zip`` is the mustZip rule of ids-protocol.md §3.4 (counts requested ids).

    Constructing one never raises.
    """

    datasets: dict[int, DsInfo] = field(default_factory=dict)
    datafiles: dict[int, DfInfo] = field(default_factory=dict)
    empty: set[int] = field(default_factory=set)
    must_zip: bool = True

    def sorted_files(self) -> list[DfInfo]:
        """The datafiles in ascending id order. Never raises."""
        return [self.datafiles[k] for k in sorted(self.datafiles)]


class CatalogueView:
    """Catalogue queries of the IDS emulator (thread-safe as the catalogue is).

    Constructing one raises ``ValueError`` or ``TypeError`` when ``max_entities`` is not a
    number.
    """

    def __init__(self, catalogue: Any, max_entities: int) -> None:
        """Wrap ``catalogue``; ``max_entities`` bounds every search (ICAT ``maxEntities``)."""
        self.catalogue = catalogue
        self.page = max(1, min(int(max_entities), 10000))

    # ------------------------------------------------------------------ sessions
    def user_of(self, session_id: str | None) -> str:
        """Return the user of ``session_id``; 403 for a SESSION error, 500 otherwise.

        Raises the :class:`~idsfs.emulator.ids_errors.IdsError` of
        :func:`~idsfs.emulator.ids_errors.from_icat`: ``InsufficientPrivileges`` (403) for a
        SESSION error, ``Internal`` (500) for any other.
        """
        try:
            return str(self.catalogue.user_of(session_id))
        except ICATException as exc:
            raise from_icat(exc) from exc

    # ------------------------------------------------------------------ raw helpers
    def _paged(self, user: str, select: str, where: str, key: str) -> Iterator[list[Any]]:
        """Yield rows of ``SELECT <select> ... WHERE <where>`` paged by ``key`` (an id path)."""
        last: int | None = None
        while True:
            cond = where if last is None else f"{where} AND {key} > {last}"
            rows = self.catalogue.search(
                user, f"{select} WHERE {cond} ORDER BY {key} LIMIT 0, {self.page}"
            )
            yield from rows
            if len(rows) < self.page:
                return
            last = int(rows[-1][0])

    @staticmethod
    def _df(row: list[Any], ds_id: int) -> DfInfo:
        mtime = parse_time(row[5])
        if mtime is None:
            mtime = parse_time(row[6]) or 0.0
        return DfInfo(
            id=int(row[0]),
            name=str(row[1]),
            location=str(row[2]),
            create_id=str(row[3] or ""),
            mod_id=str(row[4] or ""),
            ds_id=ds_id,
            mtime=mtime,
            size=int(row[7]) if row[7] is not None else -1,
        )

    # ------------------------------------------------------------------ objects
    def ds_info(self, user: str, ds_id: int) -> DsInfo:
        """Read dataset ``ds_id`` (with investigation and facility) as ``user``.

        Raises the catalogue's ``ICATException`` (NO_SUCH_OBJECT_FOUND for a missing
        dataset, INSUFFICIENT_PRIVILEGES, SESSION).
        """
        d = self.catalogue.get(user, "Dataset ds INCLUDE ds.investigation.facility", ds_id)
        return self._ds_from(d["Dataset"])

    @staticmethod
    def _ds_from(d: dict[str, Any], inv: dict[str, Any] | None = None) -> DsInfo:
        inv = inv if inv is not None else d.get("investigation") or {}
        fac = inv.get("facility") or {}
        return DsInfo(
            id=int(d["id"]),
            inv_id=int(inv.get("id", 0)),
            name=str(d.get("name", "")),
            inv_name=str(inv.get("name", "")),
            visit_id=str(inv.get("visitId", "")),
            facility_name=str(fac.get("name", "")),
        )

    def files_of_dataset(self, user: str, ds_id: int) -> list[DfInfo]:
        """Located datafiles of dataset ``ds_id`` readable by ``user``, ascending id.

        Raises the catalogue's ``ICATException`` (e.g. SESSION, INSUFFICIENT_PRIVILEGES).
        """
        rows = self._paged(
            user,
            f"SELECT {_DF_COLUMNS} FROM Datafile df",
            f"df.dataset.id = {ds_id} AND df.location IS NOT NULL",
            "df.id",
        )
        return [self._df(r, ds_id) for r in rows]

    def dataset_files(self, ds: DsInfo) -> list[DfInfo]:
        """Storage metadata source: located datafiles of ``ds`` read as the IDS reader.

        Raises the catalogue's ``ICATException`` (e.g. SESSION, INSUFFICIENT_PRIVILEGES).
        """
        return self.files_of_dataset(READER, ds.id)

    def files_by_ids(self, user: str, ids: Sequence[int]) -> dict[int, DfInfo]:
        """Located datafiles among ``ids`` readable by ``user`` (missing ones are absent).

        Raises the catalogue's ``ICATException`` (e.g. SESSION, INSUFFICIENT_PRIVILEGES).
        """
        out: dict[int, DfInfo] = {}
        for chunk in _chunks(list(ids), min(_IN_CHUNK, self.page)):
            id_list = ",".join(str(i) for i in chunk)
            rows = self.catalogue.search(
                user,
                f"SELECT {_DF_COLUMNS}, df.dataset.id FROM Datafile df "
                f"WHERE df.id IN ({id_list}) AND df.location IS NOT NULL",
            )
            for row in rows:
                out[int(row[0])] = self._df(row, int(row[8]))
        return out

    def existing_datafiles(self, ids: Sequence[int]) -> set[int]:
        """Which of ``ids`` still exist in ICAT (read as the IDS reader).

        Raises the catalogue's ``ICATException`` (e.g. SESSION, INSUFFICIENT_PRIVILEGES).
        """
        found: set[int] = set()
        for chunk in _chunks(list(ids), min(_IN_CHUNK, self.page)):
            id_list = ",".join(str(i) for i in chunk)
            rows = self.catalogue.search(
                READER, f"SELECT df.id FROM Datafile df WHERE df.id IN ({id_list})"
            )
            found.update(int(r) for r in rows)
        return found

    def size_of(self, user: str, where: str, ids: Sequence[int]) -> int:
        """``SUM(df.fileSize)`` of located datafiles with ``<where> IN (ids)``, chunked.

        Raises the catalogue's ``ICATException`` (e.g. SESSION, INSUFFICIENT_PRIVILEGES).
        """
        total = 0
        for chunk in _chunks(list(ids), _IN_CHUNK):
            id_list = ",".join(str(i) for i in chunk)
            rows = self.catalogue.search(
                user,
                f"SELECT SUM(df.fileSize) FROM Datafile df WHERE {where} IN ({id_list}) "
                "AND df.location IS NOT NULL",
            )
            if rows and rows[0] is not None:
                total += int(rows[0])
        return total

    def datafile_count(self, ds_id: int) -> int:
        """Number of datafiles (with or without location) of dataset ``ds_id`` (reader).

        Raises the catalogue's ``ICATException`` (e.g. SESSION, INSUFFICIENT_PRIVILEGES).
        """
        rows = self.catalogue.search(
            READER, f"SELECT COUNT(df) FROM Datafile df WHERE df.dataset.id = {ds_id}"
        )
        return int(rows[0]) if rows and rows[0] is not None else 0

    def locations_like(self, location: str) -> list[str]:
        """Locations of all datafiles whose location starts with ``location`` (reader).

        Raises the catalogue's ``ICATException`` (e.g. SESSION, INSUFFICIENT_PRIVILEGES).
        """
        escaped = location.replace("'", "''")
        rows = self.catalogue.search(
            READER,
            f"SELECT df.location FROM Datafile df WHERE df.location LIKE '{escaped}%'",
        )
        return [str(r) for r in rows if isinstance(r, str) and r.startswith(location)]

    # ------------------------------------------------------------------ resolution
    def resolve(
        self,
        user: str,
        inv_ids: Iterable[int],
        ds_ids: Iterable[int],
        df_ids: Iterable[int],
    ) -> Selection:
        """Resolve a selection as ``user`` (ids-protocol.md §3.4).

        Raises :class:`IdsError`: 403 for session/privilege errors, 404 for a missing
        dataset/datafile or a datafile without location, 500 for other ICAT errors.
        """
        inv_list, ds_list, df_list = list(inv_ids), list(ds_ids), list(df_ids)
        sel = Selection(
            must_zip=not (len(df_list) == 1 and not ds_list and not inv_list),
        )
        try:
            self._resolve_datafiles(user, df_list, sel)
            self._resolve_datasets(user, ds_list, sel)
            for inv_id in inv_list:
                self._resolve_investigation(user, inv_id, sel)
        except ICATException as exc:
            raise from_icat(exc) from exc
        return sel

    def _dataset(self, user: str, ds_id: int, sel: Selection) -> DsInfo:
        ds = sel.datasets.get(ds_id)
        if ds is None:
            ds = self.ds_info(user, ds_id)
            sel.datasets[ds_id] = ds
        return ds

    def _resolve_datafiles(self, user: str, df_ids: list[int], sel: Selection) -> None:
        if not df_ids:
            return
        found = self.files_by_ids(user, df_ids)
        for df_id in df_ids:
            df = found.get(df_id)
            if df is None:
                # not readable, not existing, or without location: find out which
                got = self.catalogue.get(user, "Datafile", df_id)
                if not got.get("Datafile", {}).get("location"):
                    raise NotFound(f"Datafile {df_id} has no location")
                raise Internal(f"Datafile {df_id} could not be resolved")
            self._dataset(user, df.ds_id, sel)
            sel.datafiles[df_id] = df

    def _resolve_datasets(self, user: str, ds_ids: list[int], sel: Selection) -> None:
        for ds_id in ds_ids:
            self._dataset(user, ds_id, sel)
            files = self.files_of_dataset(user, ds_id)
            if not files:
                sel.empty.add(ds_id)
            for df in files:
                sel.datafiles[df.id] = df

    def _resolve_investigation(self, user: str, inv_id: int, sel: Selection) -> None:
        invs = self.catalogue.search(
            user, f"SELECT inv FROM Investigation inv WHERE inv.id = {inv_id} INCLUDE inv.facility"
        )
        if not invs:
            return  # unknown or unreadable investigations are silently empty
        inv = invs[0]["Investigation"]
        datasets: dict[int, DsInfo] = {}
        for row in self._paged(
            user,
            "SELECT ds.id, ds.name FROM Dataset ds",
            f"ds.investigation.id = {inv_id}",
            "ds.id",
        ):
            ds = self._ds_from({"id": row[0], "name": row[1]}, inv)
            datasets[ds.id] = ds
            sel.datasets.setdefault(ds.id, ds)
        with_files: set[int] = set()
        for row in self._paged(
            user,
            f"SELECT {_DF_COLUMNS}, df.dataset.id FROM Datafile df",
            f"df.dataset.investigation.id = {inv_id} AND df.location IS NOT NULL",
            "df.id",
        ):
            df = self._df(row, int(row[8]))
            with_files.add(df.ds_id)
            sel.datafiles[df.id] = df
        sel.empty.update(set(datasets) - with_files)

"""Prepared-id records of the IDS emulator (ids-protocol.md §3.3, §5.5).

``prepareData`` stores a snapshot of the resolved selection under a new random UUID: the
datafiles (id, name, location, creator ids, dataset, entry time), the datasets with the names
used in zip entries, the ids of empty datasets and the final ``zip``/``compress`` flags. Records
are JSON files in one directory, so they survive restarts; when there are more than
``max_count`` the oldest are removed (a pruned id later gives 404 and clients re-prepare).

Public API:

* :class:`Prepared` — one snapshot (frozen).
* :class:`PreparedStore` — ``create(prepared) -> id``, ``get(id) -> Prepared | None``,
  ``__len__``. Thread-safe.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idsfs.emulator.datainfo import DfInfo, DsInfo

__all__ = ["Prepared", "PreparedStore"]

_CACHE = 256


@dataclass(frozen=True)
class Prepared:
    """Snapshot stored by ``prepareData``; datafiles are kept in ascending id order.

    Constructing one never raises.
    """

    zip: bool
    compress: bool
    datafiles: tuple[DfInfo, ...]
    datasets: tuple[DsInfo, ...]
    empty_datasets: frozenset[int]

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-able form written to disk. Never raises."""
        return {
            "zip": self.zip,
            "compress": self.compress,
            "datafiles": [d.to_json() for d in self.datafiles],
            "datasets": [d.to_json() for d in self.datasets],
            "emptyDatasets": sorted(self.empty_datasets),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Prepared:
        """Parse :meth:`to_json` output; raises ``KeyError``/``TypeError`` when malformed."""
        return cls(
            zip=bool(data["zip"]),
            compress=bool(data["compress"]),
            datafiles=tuple(DfInfo.from_json(d) for d in data["datafiles"]),
            datasets=tuple(DsInfo.from_json(d) for d in data["datasets"]),
            empty_datasets=frozenset(int(i) for i in data["emptyDatasets"]),
        )


class PreparedStore:
    """Prepared records persisted as ``<directory>/<preparedId>`` JSON files.

    Creation order is remembered through a sequence number inside each file, so pruning after
    a restart still removes the oldest first.

    Constructing one raises ``OSError`` when the directory cannot be made or listed.
    """

    def __init__(self, directory: Path, max_count: int) -> None:
        """Open (creating if needed) ``directory``; raises ``OSError`` if it cannot be made."""
        self.directory = directory
        self.max_count = max(1, int(max_count))
        directory.mkdir(parents=True, exist_ok=True)
        self._mutex = threading.Lock()
        self._order: OrderedDict[str, int] = OrderedDict()
        self._cache: OrderedDict[str, Prepared] = OrderedDict()
        self._seq = 0
        found: list[tuple[int, str]] = []
        for p in directory.iterdir():
            if p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                continue
            try:
                seq = int(json.loads(p.read_text("utf-8")).get("seq", 0))
            except (OSError, ValueError, AttributeError):
                continue
            found.append((seq, p.name))
        for seq, name in sorted(found):
            self._order[name] = seq
            self._seq = max(self._seq, seq)
        with self._mutex:
            self._prune_locked()

    def __len__(self) -> int:
        with self._mutex:
            return len(self._order)

    def create(self, prepared: Prepared) -> str:
        """Store ``prepared`` under a new lowercase UUID and return it; raises ``OSError``."""
        prepared_id = str(uuid.uuid4())
        with self._mutex:
            self._seq += 1
            seq = self._seq
        data = prepared.to_json()
        data["seq"] = seq
        tmp = self.directory / f"{prepared_id}.tmp"
        tmp.write_text(json.dumps(data, separators=(",", ":")), "utf-8")
        os.replace(tmp, self.directory / prepared_id)
        with self._mutex:
            self._order[prepared_id] = seq
            self._remember(prepared_id, prepared)
            self._prune_locked()
        return prepared_id

    def get(self, prepared_id: str) -> Prepared | None:
        """Return the record of ``prepared_id`` or ``None`` if unknown (or pruned).

        Never raises: an unreadable record counts as unknown.
        """
        with self._mutex:
            if prepared_id not in self._order:
                return None
            cached = self._cache.get(prepared_id)
            if cached is not None:
                self._cache.move_to_end(prepared_id)
                return cached
        try:
            data = json.loads((self.directory / prepared_id).read_text("utf-8"))
            prepared = Prepared.from_json(data)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        with self._mutex:
            if prepared_id in self._order:
                self._remember(prepared_id, prepared)
        return prepared

    def _remember(self, prepared_id: str, prepared: Prepared) -> None:
        self._cache[prepared_id] = prepared
        self._cache.move_to_end(prepared_id)
        while len(self._cache) > _CACHE:
            self._cache.popitem(last=False)

    def _prune_locked(self) -> None:
        while len(self._order) > self.max_count:
            victim, _ = self._order.popitem(last=False)
            self._cache.pop(victim, None)
            (self.directory / victim).unlink(missing_ok=True)

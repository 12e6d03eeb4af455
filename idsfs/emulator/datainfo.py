"""Descriptions of datasets and datafiles as the IDS emulator's storage and selections see them.

Public API:

* :class:`DsInfo` — a dataset with the names that make up zip entry names and its storage path.
* :class:`DfInfo` — a datafile with a storage location.
* :func:`zip_entry_name` — the default ZipMapper name ``ids/<fac>/<inv>/<visit>/<ds>/<df>``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DfInfo", "DsInfo", "zip_entry_name"]


@dataclass(frozen=True)
class DsInfo:
    """A dataset: ids and the names used for zip entries (facility/investigation/visit/dataset).

    Constructing one never raises.
    """

    id: int
    inv_id: int
    name: str
    inv_name: str
    visit_id: str
    facility_name: str

    def __str__(self) -> str:
        return (
            f"{self.inv_id}/{self.id} "
            f"({self.facility_name}/{self.inv_name}/{self.visit_id}/{self.name})"
        )

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-able dict of the fields. Never raises."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DsInfo:
        """Build from :meth:`to_json` output; raises ``KeyError``/``TypeError`` when malformed."""
        return cls(**data)


@dataclass(frozen=True)
class DfInfo:
    """A datafile with bytes in IDS: id, name, storage location, creator ids, owner dataset.

    ``mtime`` (epoch seconds) is the metadata-derived time stamped on zip entries; ``size`` is
    the ICAT ``fileSize`` when it was read (-1 = unknown or null). Constructing one never raises.
    """

    id: int
    name: str
    location: str
    create_id: str
    mod_id: str
    ds_id: int
    mtime: float
    size: int = -1

    def __str__(self) -> str:
        return self.location

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-able dict of the fields. Never raises."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DfInfo:
        """Build from :meth:`to_json` output; raises ``KeyError``/``TypeError`` when malformed."""
        return cls(**data)


def zip_entry_name(ds: DsInfo, df: DfInfo) -> str:
    """Return the entry name of ``df`` in zips: ``ids/<fac>/<inv>/<visit>/<ds>/<datafile>``.

    Never raises.
    """
    return f"ids/{ds.facility_name}/{ds.inv_name}/{ds.visit_id}/{ds.name}/{df.name}"

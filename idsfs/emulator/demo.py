"""Demo data: a seeded, idempotent generator of a small facility with real files.

:func:`seed` writes through the same interfaces the APIs use: ICAT entities
with ``Catalogue.write`` as a root user, file bytes with ``Storage.put`` (so
locations, sizes and CRC32 checksums are exactly what IDS ``put`` would have
produced). What it creates (facility ``DEMO``):

* investigation types ``experiment``/``calibration``, dataset types
  ``raw``/``processed``, datafile formats ``binary 1``, ``text 1``,
  ``NeXus 4.4``; instruments when the entity model has them (it does not
  today, so none);
* investigations ``DEMO-2024-001`` (two visits, ``1`` and ``2``),
  ``DEMO-2024-002`` (visit ``N/A``) and ``DEMO-2025-003`` (visit ``2025A``),
  each with an InvestigationUser link (role ``INVESTIGATOR``) for every
  configured user, so every user given can read all of it;
* datasets and datafiles whose names contain ``/``, spaces, an apostrophe,
  non-ASCII letters, a 255-character name and a name of more than 255 UTF-8
  bytes; an empty dataset; sizes from 0 bytes up to
  ``settings.demo_large_size`` (``large.bin``); ``fileSize``, ``checksum``
  (lower-case hex CRC32), ``datafileCreateTime``/``datafileModTime`` set.

File contents are deterministic for a given ``settings.seed``: text files are
generated lines, binary files repeat a seeded 1 MiB block whose first 8 bytes
are replaced by the block number (big-endian), so every offset of a large file
has distinct, predictable bytes (:func:`expected_bytes` recomputes them).

On two-level storage the datasets of ``DEMO-2024-001`` visit ``2`` and the
dataset ``processed data`` start archived (present only in archive storage);
everything else is online with an archive copy queued.

Running it again on the same data directory creates only what is missing
(every entity is looked up by its uniqueness key first), so a restart never
duplicates anything; a user added on restart gets the InvestigationUser links.

Raises ValueError when no root user is configured (ICAT writes need one).
"""

from __future__ import annotations

import logging
import random
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from idsfs.emulator.schema import ENTITIES

if TYPE_CHECKING:
    from idsfs.emulator.app import Emulator

logger = logging.getLogger("idsfs.emulator.demo")

FACILITY = "DEMO"
ROLE = "INVESTIGATOR"
_BLOCK = 1 << 20

#: a 255-character datafile name (ICAT's limit) and one of more than 255 UTF-8 bytes
LONG_NAME = "long_" + "n" * 246 + ".dat"
LONG_UTF8_NAME = "é" * 130 + ".dat"


@dataclass(frozen=True)
class FileSpec:
    """One demo datafile: name, size, text or binary, content seed.

    Constructing one never raises.
    """

    name: str
    size: int
    text: bool
    key: int


@dataclass(frozen=True)
class DatasetSpec:
    """One demo dataset: name, type, files, whether it starts archived (two-level).

    Constructing one never raises.
    """

    name: str
    type: str
    files: tuple[FileSpec, ...]
    archived: bool = False


@dataclass(frozen=True)
class InvestigationSpec:
    """One demo investigation (one visit). Constructing one never raises."""

    name: str
    visit_id: str
    title: str
    type: str
    datasets: tuple[DatasetSpec, ...]


@dataclass
class DemoSummary:
    """What :func:`seed` did: counts of entities created now, ids of what exists.

    Constructing one never raises.
    """

    created: dict[str, int] = field(default_factory=dict)
    investigation_ids: list[int] = field(default_factory=list)
    dataset_ids: dict[str, int] = field(default_factory=dict)
    datafile_ids: dict[str, int] = field(default_factory=dict)
    archived_dataset_ids: list[int] = field(default_factory=list)

    def count(self, entity: str) -> None:
        """Note one created entity of type ``entity``. Never raises."""
        self.created[entity] = self.created.get(entity, 0) + 1


# ------------------------------------------------------------------ the plan


def plan(seed: int, large_size: int) -> list[InvestigationSpec]:
    """The deterministic demo content for ``seed`` (sizes capped at ``large_size``).

    Never raises.
    """
    rng = random.Random(seed)
    keys = iter(range(1, 10_000))

    def f(name: str, size: int, text: bool = False) -> FileSpec:
        return FileSpec(name, max(0, min(size, large_size)), text, next(keys))

    def some(prefix: str, n: int, ext: str = ".dat") -> tuple[FileSpec, ...]:
        cap = max(1, min(256 * 1024, large_size))
        return tuple(f(f"{prefix}_{i:04d}{ext}", rng.randint(0, cap)) for i in range(1, n + 1))

    inv1 = InvestigationSpec(
        "DEMO-2024-001",
        "1",
        "Diffraction of protein crystals at low temperature",
        "experiment",
        (
            DatasetSpec(
                "raw",
                "raw",
                (
                    f("empty.dat", 0),
                    f("tiny.txt", 52, text=True),
                    f("large.bin", large_size),
                    f("one byte.bin", 1),
                    f("block.bin", 1 << 20),
                    f("block+1.bin", (1 << 20) + 1),
                    *some("scan", 4, ".nxs"),
                ),
            ),
            DatasetSpec(
                "processed data",
                "processed",
                (
                    f("notes with spaces.txt", 3000, text=True),
                    f("it's mine.txt", 700, text=True),
                    f("sub/dir/result.csv", 5000, text=True),
                    *some("reduced", 3),
                ),
                archived=True,
            ),
            DatasetSpec(
                "calib/run 42",
                "raw",
                (f("a/b.dat", 1234), f("flat field.dat", 65537)),
            ),
            DatasetSpec(
                "O'Brien's samples",
                "raw",
                (f("sample 'A'.txt", 100, text=True), f("Müller & Søn.txt", 200, text=True)),
            ),
            DatasetSpec(
                "Ünïcödé δεδομένα",
                "processed",
                (
                    f("naïve-Grüße-日本語.txt", 1000, text=True),
                    f(LONG_NAME, 2048),
                    f(LONG_UTF8_NAME, 4096),
                ),
            ),
            DatasetSpec("empty", "raw", ()),
        ),
    )
    inv1b = InvestigationSpec(
        "DEMO-2024-001",
        "2",
        "Diffraction of protein crystals at low temperature",
        "experiment",
        (
            DatasetSpec("raw", "raw", some("scan", 5, ".nxs"), archived=True),
            DatasetSpec("processed", "processed", some("map", 2), archived=True),
        ),
    )
    inv2 = InvestigationSpec(
        "DEMO-2024-002",
        "N/A",
        "Detector calibration",
        "calibration",
        (
            DatasetSpec("calibration", "raw", some("dark", 3) + some("bright", 3)),
            DatasetSpec("logs", "processed", (f("run.log", 20000, text=True),)),
        ),
    )
    inv3 = InvestigationSpec(
        "DEMO-2025-003",
        "2025A",
        "Écoulement turbulent — Strömung",
        "experiment",
        (DatasetSpec("raw", "raw", some("frame", 6, ".tif")),),
    )
    return [inv1, inv1b, inv2, inv3]


# ------------------------------------------------------------------ contents


def _rng_for(seed: int, key: int) -> random.Random:
    return random.Random(seed * 1_000_003 + key)


_WORDS = (
    "alpha",
    "beta",
    "gamma",
    "delta",
    "sample",
    "beam",
    "detector",
    "neutron",
    "photon",
    "crystal",
    "lattice",
    "spectrum",
    "energy",
    "flux",
    "intensity",
    "angle",
    "wavelength",
    "temperature",
    "pressure",
    "run",
    "scan",
)


def expected_bytes(seed: int, spec: FileSpec, offset: int = 0, length: int | None = None) -> bytes:
    """The bytes ``[offset, offset+length)`` of the demo file ``spec`` (for tests). Never raises."""
    content = _Content(seed, spec)
    content.pos = min(max(0, offset), spec.size)
    want = spec.size - content.pos if length is None else max(0, length)
    out = bytearray()
    while len(out) < want:
        piece = content.read(want - len(out))
        if not piece:
            break
        out += piece
    return bytes(out)


class _Content:
    """A readable stream of a demo file's deterministic bytes.

    The file is a sequence of blocks of ``len(base)`` bytes: text files repeat
    ``base``; binary files put the block number (8 bytes, big-endian) in front
    of ``base[8:]``.
    """

    def __init__(self, seed: int, spec: FileSpec) -> None:
        self.size = spec.size
        self.pos = 0
        self.text = spec.text
        rng = _rng_for(seed, spec.key)
        if spec.text:
            lines = []
            size = 0
            n = 0
            while size < min(spec.size, _BLOCK):
                n += 1
                words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
                line = f"{n:06d} {words}\n"
                lines.append(line)
                size += len(line)
            self.base = "".join(lines).encode("ascii") or b"\n"
        else:
            self.base = rng.randbytes(min(spec.size, _BLOCK)) if spec.size else b"\0"
        self._index = -1
        self._block = b""

    def _block_at(self, index: int) -> bytes:
        if index != self._index:
            if self.text:
                self._block = self.base
            else:
                head = struct.pack(">Q", index)
                self._block = (head + self.base[len(head) :])[: len(self.base)]
            self._index = index
        return self._block

    def read(self, n: int = -1) -> bytes:
        """Return up to ``n`` bytes (at most to the end of the current block); b"" at EOF."""
        left = self.size - self.pos
        if left <= 0:
            return b""
        blen = len(self.base)
        index, off = divmod(self.pos, blen)
        block = self._block_at(index)
        take = min(blen - off, left)
        if n is not None and n >= 0:
            take = min(take, n)
        self.pos += take
        return block[off : off + take]


# ------------------------------------------------------------------ ICAT helpers


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _date(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}+00:00"


class _Writer:
    """Get-or-create of entities as a root user."""

    def __init__(self, catalogue: Any, root: str, summary: DemoSummary) -> None:
        self.catalogue = catalogue
        self.root = root
        self.summary = summary

    def find(self, entity: str, where: str) -> int | None:
        rows = self.catalogue.search(self.root, f"SELECT x.id FROM {entity} x WHERE {where}")
        return int(rows[0]) if rows else None

    def ensure(self, entity: str, where: str, body: dict[str, Any]) -> int:
        found = self.find(entity, where)
        if found is not None:
            return found
        (new_id,) = self.catalogue.write(self.root, [{entity: body}])
        self.summary.count(entity)
        return int(new_id)


def seed(emulator: Emulator) -> DemoSummary:
    """Create whatever of the demo data is missing; return a :class:`DemoSummary`.

    Raises ValueError without a root user or without a catalogue and storage,
    and what the catalogue or storage raise on failure.
    """
    settings = emulator.settings
    catalogue, storage = emulator.catalogue, emulator.storage
    if catalogue is None or storage is None:
        raise ValueError("demo data needs the catalogue and the storage")
    if not settings.roots:
        raise ValueError("demo data needs at least one root user (--root)")
    root = f"simple/{sorted(settings.roots)[0]}"
    summary = DemoSummary()
    w = _Writer(catalogue, root, summary)

    fac = w.ensure(
        "Facility",
        f"x.name = {_lit(FACILITY)}",
        {
            "name": FACILITY,
            "fullName": "idsfs demonstration facility",
            "description": "Seeded demo data of the idsfs ICAT + IDS emulator",
        },
    )
    facility_ref = {"id": fac}
    inv_types = {
        name: w.ensure(
            "InvestigationType",
            f"x.name = {_lit(name)} AND x.facility.id = {fac}",
            {"name": name, "facility": facility_ref},
        )
        for name in ("experiment", "calibration")
    }
    ds_types = {
        name: w.ensure(
            "DatasetType",
            f"x.name = {_lit(name)} AND x.facility.id = {fac}",
            {"name": name, "facility": facility_ref},
        )
        for name in ("raw", "processed")
    }
    formats = {
        key: w.ensure(
            "DatafileFormat",
            f"x.name = {_lit(key[0])} AND x.version = {_lit(key[1])} AND x.facility.id = {fac}",
            {"name": key[0], "version": key[1], "facility": facility_ref},
        )
        for key in (("binary", "1"), ("text", "1"), ("NeXus", "4.4"))
    }
    if "Instrument" in ENTITIES:  # pragma: no cover - the model has no instruments today
        for name in ("DIFF-1", "SANS-2"):
            w.ensure(
                "Instrument",
                f"x.name = {_lit(name)} AND x.facility.id = {fac}",
                {"name": name, "facility": facility_ref},
            )
    users = {
        name: w.ensure("User", f"x.name = {_lit('simple/' + name)}", {"name": f"simple/{name}"})
        for name in sorted(settings.users)
    }

    base_time = datetime(2024, 3, 1, 9, 0, 0, tzinfo=UTC) + timedelta(days=settings.seed % 97)
    to_archive: list[int] = []
    to_write: list[int] = []
    for n_inv, inv in enumerate(plan(settings.seed, settings.demo_large_size)):
        start = base_time + timedelta(days=40 * n_inv)
        inv_id = w.ensure(
            "Investigation",
            f"x.facility.id = {fac} AND x.name = {_lit(inv.name)} "
            f"AND x.visitId = {_lit(inv.visit_id)}",
            {
                "name": inv.name,
                "visitId": inv.visit_id,
                "title": inv.title,
                "facility": facility_ref,
                "type": {"id": inv_types[inv.type]},
                "startDate": _date(start),
                "endDate": _date(start + timedelta(days=3)),
            },
        )
        summary.investigation_ids.append(inv_id)
        for user_id in users.values():
            w.ensure(
                "InvestigationUser",
                f"x.user.id = {user_id} AND x.investigation.id = {inv_id} "
                f"AND x.role = {_lit(ROLE)}",
                {"role": ROLE, "user": {"id": user_id}, "investigation": {"id": inv_id}},
            )
        for ds in inv.datasets:
            ds_id = w.ensure(
                "Dataset",
                f"x.investigation.id = {inv_id} AND x.name = {_lit(ds.name)}",
                {
                    "name": ds.name,
                    "investigation": {"id": inv_id},
                    "type": {"id": ds_types[ds.type]},
                    "complete": True,
                    "startDate": _date(start),
                },
            )
            key = f"{inv.name}/{inv.visit_id}/{ds.name}"
            summary.dataset_ids[key] = ds_id
            created_any = False
            for n_df, spec in enumerate(ds.files):
                where = f"x.dataset.id = {ds_id} AND x.name = {_lit(spec.name)}"
                df_id = w.find("Datafile", where)
                if df_id is None:
                    df_id = _create_datafile(
                        w,
                        storage,
                        settings.seed,
                        inv_id,
                        ds_id,
                        spec,
                        formats[("text", "1") if spec.text else ("binary", "1")],
                        start + timedelta(hours=n_df),
                    )
                    created_any = True
                summary.datafile_ids[f"{key}/{spec.name}"] = df_id
            if created_any and storage.two_level:
                (to_archive if ds.archived else to_write).append(ds_id)
            if ds.archived and storage.two_level:
                summary.archived_dataset_ids.append(ds_id)
    if storage.two_level:
        _settle_two_level(emulator, to_archive, to_write)
    logger.info(
        "demo data: %s",
        ", ".join(f"{n} {e}" for e, n in sorted(summary.created.items())) or "already present",
    )
    return summary


def _create_datafile(
    w: _Writer,
    storage: Any,
    seed_value: int,
    inv_id: int,
    ds_id: int,
    spec: FileSpec,
    format_id: int,
    when: datetime,
) -> int:
    stored = storage.put(inv_id, ds_id, _Content(seed_value, spec))
    try:
        (df_id,) = w.catalogue.write(
            w.root,
            [
                {
                    "Datafile": {
                        "name": spec.name,
                        "dataset": {"id": ds_id},
                        "datafileFormat": {"id": format_id},
                        "location": stored.location,
                        "fileSize": stored.size,
                        "checksum": f"{stored.crc:x}",
                        "datafileCreateTime": _date(when),
                        "datafileModTime": _date(when + timedelta(minutes=5)),
                    }
                }
            ],
        )
    except BaseException:
        storage.delete(stored.location)
        raise
    w.summary.count("Datafile")
    return int(df_id)


def _settle_two_level(emulator: Emulator, to_archive: list[int], to_write: list[int]) -> None:
    """Archive the datasets that start archived; queue archive copies of the others."""
    from idsfs.emulator.app import _optional_module

    ids_api = _optional_module("ids_api")
    storage_items = getattr(ids_api, "storage_items", None)
    if storage_items is None:
        logger.warning("two-level demo data left online: no ids_api.storage_items")
        return
    from idsfs.emulator.storage import DeferredOp

    if to_write:
        for item in storage_items(emulator.catalogue, emulator.storage, to_write, []):
            emulator.storage.queue(item, DeferredOp.WRITE)
    if to_archive:
        emulator.storage.archive_now(
            storage_items(emulator.catalogue, emulator.storage, to_archive, [])
        )

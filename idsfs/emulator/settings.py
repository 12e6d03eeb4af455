"""Settings of one emulator instance: :class:`EmulatorSettings`.

One frozen dataclass shared by every part of the emulator (HTTP server, ICAT
catalogue, IDS storage, demo generator). The field names are part of the
emulator's internal contract; new fields may be added with defaults.

Passwords live in :attr:`EmulatorSettings.users` and never appear in the
``repr`` of the settings (only the user names do).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

#: storage layouts: single-level, or two-level with storage unit DATASET / DATAFILE
STORAGE_KINDS: tuple[str, ...] = ("single", "dataset", "datafile")

#: default size of the demo's largest file (bytes)
DEFAULT_DEMO_LARGE_SIZE = 64 * 1024 * 1024


@dataclass(frozen=True, repr=False)
class EmulatorSettings:
    """Everything that configures one emulator (immutable; use :meth:`replace`).

    Raises :class:`ValueError` on construction when a value is out of range
    (unknown storage kind, negative delays, a root that is not a user, ...).
    """

    #: address to listen on
    host: str = "127.0.0.1"
    #: TCP port; 0 picks a free one (the real port is on ``Emulator.port``)
    port: int = 0
    #: state directory (SQLite catalogue, main/archive storage); None = a
    #: temporary directory removed when the emulator stops
    data_dir: Path | None = None
    #: plain user name -> password (authenticator mnemonic ``simple``)
    users: Mapping[str, str] = field(default_factory=dict)
    #: plain user names that are ICAT root and IDS rootUserNames
    roots: frozenset[str] = frozenset()
    #: seed demo data at start (idempotent for an existing data dir)
    demo: bool = False
    #: ``single`` | ``dataset`` | ``datafile``
    storage: str = "single"
    #: IDS readOnly: put/delete answer 501
    read_only: bool = False
    #: IDS enableWrite; None means ``not read_only``
    enable_write: bool | None = None
    #: ICAT session lifetime in minutes
    session_minutes: float = 120.0
    #: ICAT maxEntities
    max_entities: int = 10000
    #: IDS linkLifetimeSeconds (0 = getLink answers 501)
    link_lifetime_seconds: int = 0
    #: IDS preparedCount (max stored prepared ids)
    prepared_count: int = 10000
    #: seconds between ticks of the deferred-operation queue
    queue_interval: float = 0.05
    #: IDS delayDatasetWritesSeconds
    dataset_write_delay: float = 0.0
    #: IDS delayDatafileOperationsSeconds
    datafile_op_delay: float = 0.0
    #: extra seconds a restore/archive takes (makes RESTORING observable)
    restore_delay: float = 0.0
    #: bytes of the demo's largest file
    demo_large_size: int = DEFAULT_DEMO_LARGE_SIZE
    #: seed of the demo generator and of the fault injector's random choices
    seed: int = 1
    #: seconds an idle keep-alive connection is kept open
    keepalive_timeout: float = 120.0
    #: fault rules applied from the start (``faults.FaultRule`` objects)
    faults: tuple[Any, ...] = ()
    #: added latency (seconds) for every request, from the start
    latency: float = 0.0
    #: ICAT base URL that IDS reports (getIcatUrl); None until the Emulator
    #: has bound its port and filled it in (``http://host:port/icat``)
    icat_url: str | None = None

    def __post_init__(self) -> None:
        """Normalise containers and validate values; raises ValueError."""
        users = dict(self.users)
        for name, password in users.items():
            if not isinstance(name, str) or not name or "/" in name or ":" in name:
                raise ValueError(f"invalid user name {name!r}")
            if not isinstance(password, str):
                raise ValueError(f"password of user {name!r} must be a string")
        object.__setattr__(self, "users", MappingProxyType(users))
        object.__setattr__(self, "roots", frozenset(self.roots))
        object.__setattr__(self, "faults", tuple(self.faults))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        unknown_roots = sorted(r for r in self.roots if r not in users)
        if unknown_roots:
            raise ValueError(f"root user(s) without an account: {', '.join(unknown_roots)}")
        if self.demo and not self.roots:
            raise ValueError("demo data needs at least one root user (ICAT writes need one)")
        if self.storage not in STORAGE_KINDS:
            raise ValueError(
                f"storage must be one of {', '.join(STORAGE_KINDS)}, not {self.storage!r}"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        for name in (
            "session_minutes",
            "queue_interval",
            "dataset_write_delay",
            "datafile_op_delay",
            "restore_delay",
            "latency",
            "keepalive_timeout",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.queue_interval <= 0:
            raise ValueError("queue_interval must be positive")
        for name in ("max_entities", "prepared_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.demo_large_size < 0 or self.link_lifetime_seconds < 0:
            raise ValueError("demo_large_size and link_lifetime_seconds must not be negative")

    @property
    def two_level(self) -> bool:
        """True when the storage has an archive level (``dataset``/``datafile``). Never raises."""
        return self.storage != "single"

    @property
    def storage_unit(self) -> str | None:
        """``DATASET``/``DATAFILE`` for two-level storage, None for single-level. Never raises."""
        return None if self.storage == "single" else self.storage.upper()

    @property
    def write_enabled(self) -> bool:
        """The effective IDS enableWrite (``enable_write``, default ``not read_only``).

        Never raises.
        """
        return (not self.read_only) if self.enable_write is None else self.enable_write

    def replace(self, **changes: Any) -> EmulatorSettings:
        """Return a copy with ``changes`` applied (validated like the constructor).

        Raises ``ValueError`` for an invalid value and ``TypeError`` for an unknown field.
        """
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        """Show every field except the passwords."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "users":
                value = sorted(value)
            parts.append(f"{f.name}={value!r}")
        return f"EmulatorSettings({', '.join(parts)})"

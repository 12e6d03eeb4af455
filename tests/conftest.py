"""Shared pytest fixtures: emulators started on 127.0.0.1 port 0.

* ``emulator`` — a single-level emulator with the users of :data:`USERS`
  (``root`` is ICAT root and IDS rootUserName), no demo data, a data
  directory under ``tmp_path``, quick queue ticks.
* ``emulator_factory(**overrides)`` — start further emulators with other
  settings (``storage="dataset"``, ``read_only=True``, ``data_dir=...`` to
  restart on the same state, ...); every emulator it started is stopped at
  teardown, also when the test fails.
* ``http`` — a ``requests.Session`` closed at teardown.

The standard fixture of behaviours.md (facility ``F``, investigation ``I``,
ds1..ds3, df1..df4) is provided by the IDS part in its own section below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from idsfs.emulator import Emulator, EmulatorSettings

#: accounts of every test emulator (authenticator mnemonic ``simple``)
USERS: dict[str, str] = {
    "root": "root-secret",
    "alice": "alice-secret",
    "bob": "bob-secret",
    "forbidden": "forbidden-secret",
}
#: ICAT root / IDS rootUserNames
ROOTS: frozenset[str] = frozenset({"root"})


def base_settings(tmp_path: Path, **overrides: Any) -> EmulatorSettings:
    """The settings of the ``emulator`` fixture, with ``overrides`` applied."""
    values: dict[str, Any] = {
        "users": USERS,
        "roots": ROOTS,
        "data_dir": tmp_path / "data",
        "queue_interval": 0.02,
        "demo": False,
        "demo_large_size": 1024 * 1024,
    }
    values.update(overrides)
    return EmulatorSettings(**values)


EmulatorFactory = Callable[..., Emulator]


@pytest.fixture
def emulator_factory(tmp_path: Path) -> Iterator[EmulatorFactory]:
    """Start emulators with ``base_settings`` plus overrides; all stopped at teardown.

    Each call without ``data_dir`` gets its own fresh data directory.
    """
    started: list[Emulator] = []
    counter = 0

    def make(**overrides: Any) -> Emulator:
        nonlocal counter
        counter += 1
        overrides.setdefault("data_dir", tmp_path / f"data{counter}")
        emu = Emulator(base_settings(tmp_path, **overrides))
        started.append(emu)
        emu.start()
        return emu

    try:
        yield make
    finally:
        for emu in reversed(started):
            emu.stop()


@pytest.fixture
def emulator(emulator_factory: EmulatorFactory) -> Emulator:
    """A running single-level emulator (users :data:`USERS`, root ``root``, no demo)."""
    return emulator_factory()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """A requests session, closed at teardown."""
    with requests.Session() as session:
        yield session


# --------------------------------------------------------------------------------------
# Standard fixture of behaviours.md (owned by the IDS part; add fixtures below this line)
# --------------------------------------------------------------------------------------

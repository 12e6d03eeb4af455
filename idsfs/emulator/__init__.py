"""An emulator of ICAT (REST) + IDS, faithful to the wire protocol.

One process serves ICAT under ``/icat`` and IDS under ``/ids`` (plus test hooks
under ``/admin``) from an SQLite catalogue and real files on disk. Tests,
benchmarks and ``idsfs demo`` run against it; ``idsfs emulator`` and
``python -m idsfs.emulator`` start it from the command line.

Python use::

    from idsfs.emulator import Emulator, EmulatorSettings
    with Emulator(EmulatorSettings(users={"root": "pw"}, roots={"root"})) as emu:
        print(emu.icat_url, emu.ids_url)

The package imports nothing from the rest of :mod:`idsfs` (except the version).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from idsfs.emulator.settings import EmulatorSettings

if TYPE_CHECKING:
    from idsfs.emulator.app import Emulator

__all__ = ["Emulator", "EmulatorSettings"]


def __getattr__(name: str) -> Any:
    """Import :class:`Emulator` lazily (keeps ``import idsfs.emulator.http`` light)."""
    if name == "Emulator":
        from idsfs.emulator.app import Emulator

        return Emulator
    raise AttributeError(name)

"""Handler-level harness: :class:`idsfs.fs.Operations` called directly, under trio.

The file system is built exactly as the daemon builds it (ICATClient logged in
over HTTP to an in-process emulator, ThreadBridge, Catalog, Operations). Only
the kernel side is replaced:

* ``RequestContext`` is ``pyfuse3.RequestContext()`` (uid/gid/pid 0), which
  pyfuse3 lets Python create;
* ``pyfuse3.readdir_reply`` is replaced by :func:`fshelp.fake_readdir_reply`,
  which accepts entries into a :class:`fshelp.Token` until its capacity is
  reached, as the kernel's buffer does (the real one needs a kernel request).

Fixtures
--------
``demo_emu``
    Module-wide emulator with demo data, users alice/bob/root; read only
    (tests that count requests reset the counters first).
``fresh_emu``
    The same, per test (for faults and changes).
``odd_emu``
    Module-wide emulator with the odd names of docs/naming.md and permission
    data (:func:`fshelp.populate_odd`); read only. Yields ``(emulator, Odd)``.
``tree``
    Factory ``tree(emulator, user="alice", **options)`` of :class:`fshelp.Tree`.
``wtree``
    Factory ``wtree(emulator, user="alice", *, spool=None, **options)`` of
    :class:`writekit.WriteTree` (the write path; spools under ``tmp_path``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
from fshelp import Odd, Tree, fake_readdir_reply, login, populate_odd, settings
from writekit import WriteTree, write_trees

from idsfs.emulator import Emulator
from idsfs.icat import ICATClient


@pytest.fixture(autouse=True)
def _kernel_side(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyfuse3, "readdir_reply", fake_readdir_reply)


@pytest.fixture
def tree() -> Iterator[Callable[..., Tree]]:
    clients: list[ICATClient] = []

    def make(emu: Emulator, user: str = "alice", *, icat: ICATClient | None = None,
             **options: Any) -> Tree:
        client = icat or login(emu, user)
        clients.append(client)
        return Tree(emu, client, **options)

    try:
        yield make
    finally:
        for client in clients:
            client.close()


# ----------------------------------------------------------------------------- emulators


@pytest.fixture
def wtree(tmp_path: Path) -> Iterator[Callable[..., WriteTree]]:
    """Factory of write-path trees (see the module docstring)."""
    with write_trees(tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def demo_emu() -> Iterator[Emulator]:
    with tempfile.TemporaryDirectory() as tmp:
        emu = Emulator(settings(Path(tmp) / "data", demo=True))
        emu.start()
        try:
            yield emu
        finally:
            emu.stop()


@pytest.fixture
def fresh_emu(tmp_path: Path) -> Iterator[Emulator]:
    """A function-scoped emulator with demo data (for faults and changes)."""
    emu = Emulator(settings(tmp_path / "data", demo=True))
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture(scope="module")
def odd_emu() -> Iterator[tuple[Emulator, Odd]]:
    with tempfile.TemporaryDirectory() as tmp:
        emu = Emulator(settings(Path(tmp) / "data"))
        emu.start()
        try:
            yield emu, populate_odd(emu)
        finally:
            emu.stop()

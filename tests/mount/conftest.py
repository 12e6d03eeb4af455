"""The real-mount harness: every test under tests/mount/ mounts through it.

Requirements and isolation
--------------------------
Mount tests need root and ``/dev/fuse`` (``/dev/fuse`` is mode 0600 here, so
non-root mounts fail); otherwise they are skipped with the reason. When this
conftest is imported, the pytest process moves into a private mount
namespace: ``unshare(CLONE_NEWNS)`` through ctypes, then ``/`` is made
``rprivate``. It runs on the main thread during collection, before any test
starts a thread (and ``unshare`` of a mount namespace moves only the calling
thread anyway, which is the one that runs the tests and forks every child).
Consequences:

* every mount a test makes is invisible to the host and disappears when
  pytest exits, even after ``kill -9`` of a daemon;
* everything the tests run (``ls``, ``cat``, ``cp`` via ``subprocess``, and
  plain ``open``/``os.listdir`` in the test itself) sees the mounts, because
  children inherit the namespace.

If the namespace cannot be created the mount tests are skipped (never mounted
on the host).

Fixtures
--------
``demo_emulator``
    Session-wide emulator child process with demo data (single-level). Shared:
    use it only to read. Tests that inject faults, count requests, expire
    sessions or write must start their own with ``emulator_process``.
``emulator_process(**options)``
    Factory: starts ``python -m idsfs.emulator`` in a child process (closer to
    reality than a thread, and no GIL shared with the test) with users
    :data:`USERS` (``root`` is ICAT root), demo data by default and quick
    queue ticks. Keyword options map to emulator flags: ``storage="dataset"``,
    ``session_minutes=0.05``, ``restore_delay=0.5``, ``demo=False``,
    ``latency=0.01``, ``read_only=True``, ``demo_large_size=...``,
    ``extra=["--fault", "..."]``. Returns an :class:`EmulatorProcess` with
    ``icat_url``, ``ids_url``, ``admin_url``, ``data_dir``, ``seed``,
    ``demo_large_size`` and admin helpers: ``counters()``,
    ``reset_counters()``, ``add_fault(kind, **keys)``, ``clear_faults()``,
    ``expire_sessions()``, ``wait_idle()``, ``admin(method, path, **json)``.
    All are stopped at teardown.
``mount(emulator=None, *args, user="alice", foreground=True, ...)``
    Factory: runs ``idsfs mount`` (``-f`` by default, in a child process) with a
    0600 password file for ``user``, waits until the mount answers (the daemon's
    ``READY=1`` on a NOTIFY_SOCKET the harness creates; background mounts: the
    exit of ``idsfs mount``), and returns a :class:`Mounted` with ``path``,
    ``pid``, ``process`` (the ``Popen`` in the foreground), ``log_text()``,
    ``unmount()`` and ``kill(sig)``. ``args`` are extra ``idsfs mount`` options
    (``"--cache-size", "8M"``, ``"-o", "allow_other"``). ``emulator`` defaults to
    ``demo_emulator`` (any object with ``icat_url``/``ids_url`` works, e.g. an
    in-process ``Emulator`` from tests/conftest.py; pass ``users`` then if its
    passwords are not :data:`USERS`). At teardown every mount is unmounted
    (``idsfs umount``), the daemon waited for, and as a last resort killed with
    SIGKILL and the mount detached with ``fusermount3 -u -z`` - also after a
    failing test. ``mount(emulator, adopt=PATH)`` hands a mount that mount(8)
    or systemd made on PATH to the same teardown (its pid from the control
    socket).
``servers``
    Root's view (:class:`writeharness.Servers`: ICAT rows, stored bytes) of a
    fresh ``emulator_process()`` with demo data, for the write-path tests.

Example::

    import os, subprocess
    import pytest

    pytestmark = pytest.mark.mount

    def test_listing(mount):
        m = mount()                      # demo data, user alice
        assert "DEMO" in os.listdir(m.path)
        subprocess.run(["ls", "-lR", m.path], check=True, capture_output=True, timeout=60)

    def test_archived(mount, emulator_process):
        emu = emulator_process(storage="dataset", restore_delay=0.3)
        m = mount(emu, "--restore-wait", "10s")
        ...

Helpers for tests live in ``tests/mount/mountharness.py`` (import them with
``from mountharness import USERS, is_mounted, idsfs_command, wait_until, ...``;
a module of its own because several test folders have a ``conftest``):
:func:`idsfs_command` (argv prefix of the ``idsfs`` command),
:func:`is_mounted`, :func:`wait_until`, :func:`start_emulator`,
:func:`start_mount`, :func:`teardown_mount`, :func:`demo_files` (every demo
datafile's path in the mount and its spec), :data:`USERS`;
:func:`installed_commands` (the idsfs commands on mount(8)'s search path, in
this namespace only, for fstab tests) and :func:`adopt_mount` (hand a mount
made by mount(8) or by hand to the harness's teardown).

The mount tests run in CI exactly like this: as root, each pytest process in
its own ``unshare`` mount namespace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mountharness import (
    EmulatorProcess,
    Mounted,
    adopt_mount,
    enter_private_namespace,
    start_emulator,
    start_mount,
    teardown_mount,
)
from writeharness import Servers

_SKIP_REASON = enter_private_namespace()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/mount/ ``mount``; skip them when mounting is impossible."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.mount)
            if _SKIP_REASON is not None:
                item.add_marker(pytest.mark.skip(reason=_SKIP_REASON))


@pytest.fixture(scope="session")
def demo_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """A shared single-level emulator with demo data (read only; see the module docstring)."""
    if _SKIP_REASON is not None:
        pytest.skip(_SKIP_REASON)
    emu = start_emulator(tmp_path_factory.mktemp("demo-emulator"))
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def emulator_process(tmp_path: Path) -> Iterator[Callable[..., EmulatorProcess]]:
    """Factory of emulator child processes, all stopped at teardown."""
    started: list[EmulatorProcess] = []

    def make(**options: Any) -> EmulatorProcess:
        emu = start_emulator(tmp_path / f"emulator{len(started) + 1}", **options)
        started.append(emu)
        return emu

    try:
        yield make
    finally:
        for emu in reversed(started):
            emu.stop()


@pytest.fixture
def servers(emulator_process: Callable[..., EmulatorProcess]) -> Iterator[Servers]:
    """Root's view (writeharness.Servers) of a fresh emulator with demo data."""
    s = Servers(emulator_process())
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def mount(tmp_path: Path, request: pytest.FixtureRequest,
          emulator_process: Callable[..., EmulatorProcess],
          emulator_factory: Callable[..., Any]) -> Iterator[Callable[..., Mounted]]:
    """Factory of real mounts (see the module docstring); all removed at teardown.

    It depends on ``emulator_process`` and ``emulator_factory`` (tests/conftest.py)
    so that the emulators a test starts are stopped only after its mounts are gone.
    """
    made: list[Mounted] = []

    def make(emulator: Any = None, *args: str, **options: Any) -> Mounted:
        if emulator is None:
            emulator = request.getfixturevalue("demo_emulator")
        if "adopt" in options:  # mount(emu, adopt=PATH): see adopt_mount
            return adopt_mount(options.pop("adopt"), emulator, made.append, **options)
        work = tmp_path / f"mount{len(made) + 1}"
        while work.exists():
            work = work.with_name(work.name + "x")
        return start_mount(work, emulator, *args, register=made.append, **options)

    try:
        yield make
    finally:
        for m in reversed(made):
            teardown_mount(m)

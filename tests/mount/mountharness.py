"""Helpers of the real-mount harness (the fixtures are in tests/mount/conftest.py).

Import them in mount tests with ``from mountharness import ...`` (tests/mount is
on ``sys.path`` for its test modules). See conftest.py for how to use them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from idsfs import naming
from idsfs.emulator import demo

#: accounts of every harness emulator (``simple`` authenticator); root is ICAT root
USERS: dict[str, str] = {
    "root": "root-" + secrets.token_hex(8),
    "alice": "alice-" + secrets.token_hex(8),
    "bob": "bob-" + secrets.token_hex(8),
}
ROOTS = ("root",)
#: size of the demo's large file in harness emulators (small: tests stay quick)
DEMO_LARGE_SIZE = 3 * 1024 * 1024 + 12345
#: seconds a mount may take to become ready
READY_TIMEOUT = 60.0

_CLONE_NEWNS = 0x00020000
_MS_REC = 16384
_MS_PRIVATE = 1 << 18


_NAMESPACE_STATE: list[str | None] = []


def enter_private_namespace() -> str | None:
    """Move this process into a private mount namespace once; return why not, or None.

    Later calls return the first call's answer without doing anything.
    """
    if _NAMESPACE_STATE:
        return _NAMESPACE_STATE[0]
    reason = _unshare_mounts()
    _NAMESPACE_STATE.append(reason)
    return reason


def _unshare_mounts() -> str | None:
    if sys.platform != "linux":
        return "FUSE mount tests need Linux"
    if os.geteuid() != 0:
        return "FUSE mount tests need root (/dev/fuse is mode 0600 here)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "no fusermount3 (Debian package fuse3)"
    if threading.current_thread() is not threading.main_thread():
        return "the mount namespace must be created on the main thread"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        return f"cannot create a private mount namespace: {os.strerror(err)}"
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        return f"cannot make / private in the new mount namespace: {os.strerror(err)}"
    return None


# ----------------------------------------------------------------------------- systemd


class NotifySocket:
    """A ``$NOTIFY_SOCKET`` like systemd's: records every datagram, in order.

    ``lines()`` are all ``KEY=VALUE`` lines received so far; ``wait_for(line)``
    polls for one. ``on_ready()``, if given, is called the moment ``READY=1``
    arrives and its result kept in ``ready_check`` (to check that the mount
    answers already then).
    """

    def __init__(self, path: Path, on_ready: Callable[[], Any] | None = None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, list[str]]] = []
        self.ready_check: list[Any] = []
        self.on_ready = on_ready
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.sock], [], [], 0.05)[0]:
                continue
            lines = self.sock.recv(65536).decode().splitlines()
            if "READY=1" in lines and self.on_ready is not None:
                # before the lines are recorded: wait_for("READY=1") returns after the check
                self.ready_check.append(self.on_ready())
            self.messages.append((time.monotonic(), lines))

    def lines(self) -> list[str]:
        """Every line received so far."""
        return [line for _, group in self.messages for line in group]

    def wait_for(self, line: str, timeout: float = 60) -> bool:
        """Wait until ``line`` was received; False after ``timeout`` seconds."""
        return wait_until(lambda: line in self.lines(), timeout)

    def close(self) -> None:
        """Stop listening and remove nothing else."""
        self._stop.set()
        self.thread.join(5)
        self.sock.close()



# ----------------------------------------------------------------------------- mount(8)

#: the commands a real installation puts on mount(8)'s and /bin/sh's search paths
INSTALLED_COMMANDS = ("idsfs", "mount.idsfs", "mount.fuse.idsfs")


@contextlib.contextmanager
def installed_commands(directory: Path, names: Sequence[str] = INSTALLED_COMMANDS,
                       ) -> Iterator[Path]:
    """Make ``names`` (this environment's console scripts) appear in ``/sbin``, here only.

    mount(8) looks for ``mount.<type>`` helpers in ``/sbin`` only, and runs
    them (and mount.fuse3 runs ``idsfs``) without ``$PATH``. In the harness's
    private mount namespace an overlay puts symlinks to the console scripts
    of this virtual environment over ``/sbin`` (``/usr/sbin`` on merged-/usr
    systems): what ``ln -s`` into ``/usr/local/sbin`` or ``/sbin`` does in a
    real installation (docs/systemd.md), invisible to the host and undone on
    exit. Skips the test when overlayfs cannot be mounted.
    """
    import pytest

    directory.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    for name in names:
        os.symlink(bindir / name, directory / name)
    target = os.path.realpath("/sbin")
    done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                           f"lowerdir={directory}:{target}", target],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot overlay {target}: {done.stderr.strip()}")
    try:
        yield Path(target)
    finally:
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def adopt_mount(path: Path, emulator: Any, register: Callable[[Mounted], None],
                log_path: Path | None = None, user: str = "alice") -> Mounted:
    """A :class:`Mounted` for a mount made outside the harness (mount(8), systemd).

    The daemon's pid comes from its control socket (``idsfs status``);
    ``register`` gets it so that the harness tears it down like its own.
    """
    from idsfs.mountcli import query_status

    pid = int(query_status(path)["pid"])
    m = Mounted(path, pid, None, emulator, log_path or path.with_name(path.name + ".log"),
                user, [])
    register(m)
    return m


# ----------------------------------------------------------------------------- helpers


def idsfs_command() -> list[str]:
    """The argv prefix that runs the ``idsfs`` command of this environment."""
    script = Path(sys.executable).parent / "idsfs"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from idsfs.cli import main; sys.exit(main())"]


def is_mounted(path: str | Path) -> bool:
    """True when ``path`` is a mount point in this namespace (reads /proc/self/mountinfo)."""
    from idsfs.daemon import find_mount

    return find_mount(path) is not None


def _write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return path


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for children: without IDSFS_* and NOTIFY_SOCKET of the outer one."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("IDSFS_") and k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    env.update(extra)
    return env


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def demo_files(emu: Any) -> dict[Path, demo.FileSpec]:
    """Relative path of every demo datafile of ``emu`` (as naming places it) -> its spec."""
    out = {}
    for inv in demo.plan(emu.seed, emu.demo_large_size):
        for ds in inv.datasets:
            base = Path("DEMO", naming.escape_name(inv.name), naming.escape_name(inv.visit_id),
                        naming.escape_name(ds.name))
            tree = naming.DatafileTree((spec.name, i) for i, spec in enumerate(ds.files))
            for i, spec in enumerate(ds.files):
                path = tree.path_of(i)
                assert path is not None
                out[base.joinpath(*path)] = spec
    return out


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds passed; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# ----------------------------------------------------------------------------- emulator


@dataclass
class EmulatorProcess:
    """An emulator in a child process (see the module docstring)."""

    process: subprocess.Popen[bytes]
    icat_url: str
    ids_url: str
    data_dir: Path
    seed: int
    demo_large_size: int
    users: dict[str, str] = field(default_factory=lambda: dict(USERS))
    _http: requests.Session = field(default_factory=requests.Session)

    @property
    def admin_url(self) -> str:
        """Base URL of the admin API (``.../admin``)."""
        return self.icat_url.rsplit("/icat", 1)[0] + "/admin"

    def admin(self, method: str, path: str, **body: Any) -> Any:
        """Call ``/admin/<path>`` with a JSON body; return the decoded answer (None for 204)."""
        response = self._http.request(method, f"{self.admin_url}/{path.lstrip('/')}",
                                      json=body if body else None, timeout=60)
        response.raise_for_status()
        return response.json() if response.content else None

    def counters(self) -> dict[str, dict[str, int]]:
        """Requests per endpoint: ``{"icat/entityManager": {"requests": n, ...}, ...}``."""
        return dict(self.admin("GET", "counters"))

    def requests_to(self, prefix: str) -> int:
        """Total requests of endpoints starting with ``prefix`` (``"ids/"``, ``"icat/"``)."""
        return sum(c.get("requests", 0) for name, c in self.counters().items()
                   if name.startswith(prefix))

    def reset_counters(self) -> None:
        """Set every counter to zero."""
        self.admin("DELETE", "counters")

    def add_fault(self, kind: str, **keys: Any) -> list[int]:
        """Add a fault rule (keys of ``faults.FaultRule``); returns the rule ids."""
        return list(self.admin("POST", "faults", kind=kind, **keys)["ids"])

    def clear_faults(self) -> None:
        """Remove every fault rule and release stalled streams."""
        self.admin("DELETE", "faults")

    def expire_sessions(self) -> int:
        """Expire every ICAT session now; returns how many."""
        return int(self.admin("POST", "expire")["expired"])

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until the two-level storage queue is empty."""
        return bool(self.admin("GET", f"storage/wait-idle?timeout={timeout}")["idle"])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; idempotent."""
        self._http.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_emulator(directory: Path, *, demo: bool = True, storage: str = "single",
                   session_minutes: float | None = None, restore_delay: float | None = None,
                   latency: float | None = None, read_only: bool = False,
                   demo_large_size: int = DEMO_LARGE_SIZE, seed: int = 1,
                   queue_interval: float = 0.02, extra: Sequence[str] = (),
                   users: dict[str, str] | None = None) -> EmulatorProcess:
    """Start ``python -m idsfs.emulator`` in ``directory``; returns once it is ready."""
    users = dict(USERS if users is None else users)
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "idsfs.emulator", "--port", "0", "--quiet",
           "--data", str(directory / "data"), "--storage", storage, "--seed", str(seed),
           "--queue-interval", str(queue_interval), "--demo-large-size", str(demo_large_size)]
    for name, password in users.items():
        pw = _write_private(directory / f"{name}.password", password)
        cmd += ["--user", f"{name}:@{pw}"]
    for name in ROOTS:
        if name in users:
            cmd += ["--root", name]
    if demo:
        cmd.append("--demo")
    if session_minutes is not None:
        cmd += ["--session-minutes", str(session_minutes)]
    if restore_delay is not None:
        cmd += ["--restore-delay", str(restore_delay)]
    if latency is not None:
        cmd += ["--latency", str(latency)]
    if read_only:
        cmd.append("--read-only")
    cmd += list(extra)
    log = open(directory / "emulator.log", "wb")  # noqa: SIM115 - owned by the child
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                               stdin=subprocess.DEVNULL, env=_clean_env())
    log.close()
    assert process.stdout is not None
    fd = process.stdout.fileno()
    buffer = b""
    deadline = time.monotonic() + 120
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0:
            process.kill()
            process.wait()
            raise RuntimeError("the emulator did not start within 120 s")
        if not select.select([fd], [], [], min(left, 0.5))[0]:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            status = process.wait()
            text = (directory / "emulator.log").read_text(errors="replace")
            raise RuntimeError(f"the emulator exited with status {status}:\n{text}")
        buffer += chunk
    line = buffer.split(b"\n", 1)[0].decode()
    fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
    return EmulatorProcess(process, fields["icat"], fields["ids"], directory / "data", seed,
                           demo_large_size, users)


# ----------------------------------------------------------------------------- mounts


class MountFailed(RuntimeError):
    """``idsfs mount`` did not become ready; the message holds its output."""


@dataclass
class Mounted:
    """A running mount made by the ``mount`` fixture."""

    path: Path
    pid: int | None
    process: subprocess.Popen[bytes] | None
    emulator: Any
    log_path: Path
    user: str
    argv: list[str]

    def log_text(self) -> str:
        """Everything the daemon wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        """True while the daemon process runs."""
        if self.process is not None:
            return self.process.poll() is None
        return self.pid is not None and _pid_alive(self.pid)

    def wait_exit(self, timeout: float = 20.0) -> int | None:
        """Wait for the daemon to end; return its exit status (None: background daemon)."""
        if self.process is not None:
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"daemon still running after {timeout} s") from None
        if not wait_until(lambda: not self.alive(), timeout):
            raise AssertionError(f"daemon {self.pid} still running after {timeout} s")
        return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the daemon."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def unmount(self, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run ``idsfs umount`` on the mount and wait for the daemon to end."""
        done = subprocess.run([*idsfs_command(), "umount", str(self.path)], capture_output=True,
                              text=True, timeout=timeout, check=False, env=_clean_env())
        if done.returncode == 0 and self.alive():
            self.wait_exit(timeout)
        return done


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


def _wait_ready(sock: socket.socket, process: subprocess.Popen[bytes] | None,
                timeout: float) -> dict[str, str]:
    """Collect sd_notify datagrams until ``READY=1``; returns the fields seen."""
    fields: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while "READY" not in fields:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MountFailed(f"not ready within {timeout} s")
        if process is not None and process.poll() is not None:
            raise MountFailed(f"the daemon exited with status {process.returncode}")
        if select.select([sock], [], [], min(left, 0.1))[0]:
            data = sock.recv(65536).decode("utf-8", "replace")
            for line in data.splitlines():
                key, _, value = line.partition("=")
                fields[key] = value
    return fields


def teardown_mount(m: Mounted) -> None:
    """Unmount and stop ``m`` by every means necessary (never raises)."""
    try:
        if is_mounted(m.path) and m.alive():
            with contextlib.suppress(Exception):
                m.unmount(timeout=20)
        if m.alive():
            m.kill(signal.SIGTERM)
            wait_until(lambda: not m.alive(), 10)
        if m.alive():
            m.kill(signal.SIGKILL)
            wait_until(lambda: not m.alive(), 10)
        if m.process is not None:
            with contextlib.suppress(Exception):
                m.process.wait(5)
    finally:
        for _ in range(5):
            if not is_mounted(m.path):
                break
            tool = shutil.which("fusermount3") or "fusermount"
            subprocess.run([tool, "-u", "-z", str(m.path)], capture_output=True, timeout=30,
                           check=False)
            time.sleep(0.05)


def start_mount(work: Path, emulator: Any, *args: str, register: Callable[[Mounted], None],
                user: str = "alice", foreground: bool = True,
                users: dict[str, str] | None = None, env: dict[str, str] | None = None,
                mountpoint: Path | None = None, credentials: bool = True,
                ready_timeout: float = READY_TIMEOUT) -> Mounted:
    """Run ``idsfs mount`` for ``emulator`` with files in the new directory ``work``.

    ``register(mounted)`` is called as soon as the daemon process exists, before
    waiting for it, so the caller can always clean up. Raises :class:`MountFailed`
    (with the daemon's output) when the mount does not become ready.
    """
    settings_users = getattr(getattr(emulator, "settings", None), "users", None)
    passwords = users or getattr(emulator, "users", None) or settings_users or USERS
    work.mkdir()
    mp = mountpoint or work / "mnt"
    mp.mkdir(exist_ok=True)
    argv = [*idsfs_command(), "mount", "--icat", emulator.icat_url, "--ids",
            emulator.ids_url]
    if credentials:
        pw = _write_private(work / "password", passwords[user])
        argv += ["--user", user, "--password-file", str(pw)]
    argv += list(args)
    if not any(a.startswith("--spool-dir") or "spool_dir=" in a for a in args):
        # the test's own spool (root's default is under /var/cache: a failing or
        # killed test would leave uploads there, and every mount an empty directory)
        argv += ["--spool-dir", str(work / "spool")]
    if foreground:
        argv.append("-f")
    argv.append(str(mp))
    log_path = work / "daemon.log"
    notify_path = work / "notify.sock"
    sock = _notify_socket(notify_path)
    child_env = _clean_env(NOTIFY_SOCKET=str(notify_path), **(env or {}))
    try:
        with open(log_path, "wb") as log:
            if foreground:
                process: subprocess.Popen[bytes] | None = subprocess.Popen(
                    argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=child_env)
                assert process is not None
                m = Mounted(mp, process.pid, process, emulator, log_path, user, argv)
                register(m)
                try:
                    _wait_ready(sock, process, ready_timeout)
                except MountFailed as exc:
                    raise MountFailed(f"{exc}; output:\n{m.log_text()}") from None
            else:
                done = subprocess.run(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                      env=child_env, timeout=ready_timeout, check=False)
                if done.returncode != 0:
                    raise MountFailed(f"idsfs mount exited with {done.returncode}:\n"
                                      + log_path.read_text(errors="replace"))
                fields = _wait_ready(sock, None, 5.0)
                m = Mounted(mp, int(fields["MAINPID"]), None, emulator, log_path, user,
                            argv)
                register(m)
    finally:
        sock.close()
    return m

"""The daemon's local control channel: ``idsfs status`` and ``idsfs umount`` talk to it.

Where
-----
Each running daemon listens on a Unix stream socket named after its mount's
device number: ``<st_dev>.sock``, where ``st_dev`` is the device number of
the mount point (the FUSE connection; the same number names it in
``/sys/fs/fuse/connections``). The number is also in
``/proc/self/mountinfo``, so a client finds the socket without touching the
mount (which may hang), and from any mount namespace that shares ``/run``.
The directory (:func:`runtime_dir`):

* ``/run/idsfs`` for a daemon running as root;
* ``$XDG_RUNTIME_DIR/idsfs`` otherwise (``/run/user/<uid>/idsfs``);
* ``/tmp/idsfs-<uid>`` when there is no ``$XDG_RUNTIME_DIR``.

The daemon makes the directory ``0700`` (owner only) before it binds, and the
socket ``0600``; it checks every peer with ``SO_PEERCRED`` (only its own uid
and root are served). The socket is removed when the daemon ends.

Protocol
--------
One JSON object per line, UTF-8, at most :data:`MAX_LINE` bytes. The client
sends one request:

* ``{"request": "status"}`` -> ``{"ok": true, "status": {...}}`` (see
  :meth:`idsfs.daemon.Daemon.status`);
* ``{"request": "stop", "lazy": false}`` -> ``{"ok": true, "event":
  "stopping", "pid": N}``, or ``{"ok": false, "error": "busy", "message":
  ...}`` when the mount is in use and not ``lazy``. With ``"lazy": true`` the
  mount is detached and the answer is ``{"ok": true, "event": "detached",
  "pid": N}``, then end of file: the daemon serves the programs still using
  the detached mount and exits when the last one lets go. After ``stopping`` the
  connection stays open: the daemon sends progress events (``{"event":
  "waiting", "message": ..., "pending": [...]}``) and finally ``{"event":
  "exit", "status": N}`` just before it exits; end of file follows.

Anything else gets ``{"ok": false, "error": "bad request", "message": ...}``.
Nothing secret (passwords, session ids) ever goes over the channel.

Errors: client functions raise :class:`ControlError` (an ``OSError``
subclass is never raised to the caller).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_LINE",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "runtime_dir",
    "socket_candidates",
    "socket_name",
]

log = logging.getLogger("idsfs.control")

#: the longest request or reply line, bytes
MAX_LINE = 1 << 20
#: seconds a connection may take to send its request
REQUEST_TIMEOUT = 5.0
#: connections served at once
MAX_CONNECTIONS = 16


class ControlError(Exception):
    """The control channel cannot be used (no socket, refused, timed out, bad reply).

    ``timed_out`` is True when the daemon did not answer in time (it may still
    be working on the request).

    Raised by :class:`ControlClient` (constructing one, :meth:`~ControlClient.send`,
    :meth:`~ControlClient.receive`, :meth:`~ControlClient.request`,
    :meth:`~ControlClient.events`).
    """

    timed_out: bool = False


# ----------------------------------------------------------------------------- locations


def runtime_dir(uid: int | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The directory of the control sockets of daemons running as ``uid``.

    ``/run/idsfs`` for root, else ``$XDG_RUNTIME_DIR/idsfs``, else
    ``/tmp/idsfs-<uid>``. Never raises.
    """
    uid = os.geteuid() if uid is None else uid
    env = os.environ if environ is None else environ
    if uid == 0:
        return Path("/run/idsfs")
    xdg = env.get("XDG_RUNTIME_DIR", "").strip()
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "idsfs"
    return Path("/tmp") / f"idsfs-{uid}"


def socket_name(st_dev: int) -> str:
    """The socket file name of the mount whose device number is ``st_dev``. Never raises."""
    return f"{st_dev}.sock"


def socket_candidates(st_dev: int, owner_uid: int | None,
                      environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where the socket of a mount (device ``st_dev``, mounted by ``owner_uid``) may be.

    ``owner_uid`` comes from the mount's ``user_id=`` option; None tries the
    caller's own directory and root's. Never raises.
    """
    env = os.environ if environ is None else environ
    me = os.geteuid()
    uids = [owner_uid] if owner_uid is not None else [me, 0]
    dirs: list[Path] = []
    for uid in uids:
        if uid == 0:
            dirs.append(Path("/run/idsfs"))
            continue
        if uid == me:
            dirs.append(runtime_dir(uid, env))
        dirs.append(Path(f"/run/user/{uid}/idsfs"))
        dirs.append(Path("/tmp") / f"idsfs-{uid}")
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return [d / socket_name(st_dev) for d in seen]


def _prepare_dir(directory: Path) -> None:
    """Create ``directory`` (mode 0700) or check an existing one; raises OSError."""
    uid = os.geteuid()
    with contextlib.suppress(FileExistsError):
        directory.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"{directory} is not a directory")
    if st.st_uid != uid:
        raise OSError(errno.EPERM, f"{directory} belongs to uid {st.st_uid}, not {uid}")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), or None.

    Never raises.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return uid


def encode(message: Mapping[str, Any]) -> bytes:
    """One protocol line: compact JSON and a newline.

    Raises ``ValueError`` for a circular structure and ``TypeError`` for a key that is not a
    string, number, bool or None (other values are sent as their ``str``).
    """
    return json.dumps(message, separators=(",", ":"), default=str).encode("utf-8") + b"\n"


# ----------------------------------------------------------------------------- server


class Waiter:
    """A client waiting for the daemon to exit (after ``stop``): a plain blocking socket.

    :meth:`send` is thread-safe and never raises; a client that went away or
    does not read within a second is dropped.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock
        self._lock = threading.Lock()
        sock.setblocking(True)
        sock.settimeout(1.0)

    def send(self, message: Mapping[str, Any]) -> bool:
        """Send one event line; returns False once the client is gone.

        Never raises for a gone or slow client (it returns False); only a message
        :func:`encode` cannot serialise raises.
        """
        with self._lock:
            if self._sock is None:
                return False
            try:
                self._sock.sendall(encode(message))
                return True
            except OSError:
                self._close_locked()
                return False

    def close(self) -> None:
        """Close the connection (the client sees end of file). Never raises."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


class Connection:
    """One accepted client connection, on trio (see :class:`ControlServer`).

    Constructing one never raises.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.detached = False

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one reply line (errors end the connection quietly).

        Never raises for a broken connection; only a message :func:`encode` cannot serialise
        raises.
        """
        import trio

        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.stream.send_all(encode(message))

    def detach(self) -> Waiter:
        """Hand the connection over to a :class:`Waiter` that outlives the trio loop.

        Raises ``OSError`` when the socket cannot be duplicated (out of file
        descriptors).
        """
        fd = os.dup(self.stream.socket.fileno())
        self.detached = True
        return Waiter(socket.socket(fileno=fd))


Handler = Callable[[dict[str, Any], Connection], Awaitable[None]]


class ControlServer:
    """The daemon's side: listens on ``path`` and hands each request to ``handler``.

    ``handler(request, connection)`` runs on the trio thread; it replies with
    ``await connection.send({...})`` and may keep the client with
    ``connection.detach()``. Use ``await nursery.start(server.serve)``;
    :meth:`close` removes the socket file (if it is still ours). Constructing one never raises.
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._inode: tuple[int, int] | None = None
        self._listening: socket.socket | None = None

    def bind(self) -> None:
        """Create the directory and the listening socket (blocking: file system calls).

        The daemon runs it through its thread bridge before :meth:`serve`.
        Raises OSError when the socket cannot be created.
        """
        if self._listening is not None:
            return
        _prepare_dir(self.path.parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a socket left by an earlier daemon of this device
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(MAX_CONNECTIONS)
        except BaseException:
            sock.close()
            raise
        self._listening = sock

    async def serve(self, task_status: Any = None) -> None:
        """Report started (``task_status``), then accept until cancelled.

        Binds first when :meth:`bind` was not called (then blocking for a
        moment). Raises OSError when the socket cannot be created (before
        started).
        """
        import trio

        self.bind()
        sock, self._listening = self._listening, None
        assert sock is not None
        listener = trio.socket.from_stdlib_socket(sock)
        if task_status is not None:
            task_status.started()
        limit = trio.CapacityLimiter(MAX_CONNECTIONS)
        me = os.geteuid()
        with listener:
            async with trio.open_nursery() as nursery:
                while True:
                    sock, _ = await listener.accept()
                    uid = peer_uid(sock)  # type: ignore[arg-type]
                    if uid not in (me, 0):
                        log.warning("control socket: refused a client of uid %s", uid)
                        sock.close()
                        continue
                    nursery.start_soon(self._serve_one, trio.SocketStream(sock), limit)

    async def _serve_one(self, stream: Any, limit: Any) -> None:
        import trio

        conn = Connection(stream)
        try:
            async with limit:
                request: dict[str, Any] | None = None
                buffer = b""
                with trio.move_on_after(REQUEST_TIMEOUT):
                    while b"\n" not in buffer and len(buffer) <= MAX_LINE:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            break
                        buffer += chunk
                line = buffer.split(b"\n", 1)[0]
                try:
                    decoded = json.loads(line.decode("utf-8"))
                    if isinstance(decoded, dict):
                        request = decoded
                except (UnicodeDecodeError, ValueError):
                    request = None
                if request is None:
                    await conn.send({"ok": False, "error": "bad request",
                                     "message": "expected one JSON object per line"})
                    return
                try:
                    await self.handler(request, conn)
                except Exception as exc:  # a bug must not end the daemon
                    log.error("control request %r failed: %s", request.get("request"), exc,
                              exc_info=True)
                    await conn.send({"ok": False, "error": "internal error",
                                     "message": str(exc)})
        finally:
            try:
                await stream.aclose()
            except Exception as exc:  # noqa: BLE001 - the client went away first
                log.debug("control socket: closing a connection: %s", exc)

    def close(self) -> None:
        """Remove the socket file if it is still the one this server bound (never raises)."""
        if self._listening is not None:  # bound, never served
            self._listening.close()
            self._listening = None
        if self._inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        self._inode = None


# ----------------------------------------------------------------------------- client


class ControlClient:
    """A connection to one daemon's control socket (blocking; for the command line).

    Raises :class:`ControlError` when the socket cannot be reached within
    ``timeout`` seconds.
    """

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self._buffer = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Close the connection. Never raises."""
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, message: Mapping[str, Any]) -> None:
        """Send one request line; raises ControlError."""
        try:
            self._sock.sendall(encode(message))
        except OSError as exc:
            raise ControlError(f"sending to {self.path} failed: {exc.strerror or exc}") from exc

    def receive(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next reply line as a dict; None at end of file. Raises ControlError.

        ``timeout`` (seconds) bounds the wait for this line; a timeout raises
        ControlError with ``timed_out = True``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    err = ControlError(f"no answer from {self.path} within {timeout:g} s")
                    err.timed_out = True
                    raise err
                self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise ControlError(f"reading from {self.path} failed: "
                                   f"{exc.strerror or exc}") from exc
            if not chunk:
                if self._buffer:
                    raise ControlError(f"{self.path}: the answer was cut off")
                return None
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise ControlError(f"{self.path}: answer too long")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ControlError(f"{self.path}: not a JSON answer") from exc
        if not isinstance(message, dict):
            raise ControlError(f"{self.path}: not a JSON object")
        return message

    def request(self, message: Mapping[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send ``message`` and return the first reply; raises ControlError."""
        self.send(message)
        reply = self.receive(timeout)
        if reply is None:
            raise ControlError(f"{self.path} closed the connection without an answer")
        return reply

    def events(self, timeout: float) -> Iterator[dict[str, Any]]:
        """Yield the lines that follow until end of file or ``timeout`` seconds in all.

        Raises ControlError (``timed_out``) when the deadline passes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(max(0.0, deadline - time.monotonic()))
            if message is None:
                return
            yield message

"""The mount's lifecycle: connect, mount, serve, refresh the session, unmount.

:func:`mount` is what ``idsfs mount`` runs. In order:

1. **Check the mount point** (an existing directory, not already a FUSE
   mount; a stale mount left by a killed daemon is reported with the command
   that clears it: ``idsfs umount``).
2. **Background or foreground.** Without ``-f`` the process forks before any
   thread or connection exists; the child starts a new session and does the
   rest, and the parent waits on a pipe. The parent exits 0 only once the
   child reports that the mount answers; otherwise it prints the child's error
   and exits non-zero (nothing stays mounted). With ``-f`` everything runs in
   the calling process.
3. **Connect** (:meth:`Daemon.connect`). ICAT: log in with the configured
   authenticator, user and password, or adopt the given session id (checked
   with a session-info call). IDS: ``--ids``, or when absent the rule of
   :func:`default_ids_url`: the ICAT server's scheme, host and port with the
   path ``/ids`` (the reference deployment, and the emulator, serve both
   there), accepted only if ``ping`` answers ``IdsOK``. Without ``--icat`` the
   ICAT URL is the one the IDS reports (``getIcatUrl``).
4. **Build the stack**: :class:`~idsfs.aio.ThreadBridge` (``--max-threads``),
   :class:`~idsfs.blockcache.BlockCache` (``--cache-size``, ``--block-size``),
   ``catalog.Catalog`` (``--metadata-ttl``), ``transfer.Transfer``
   (``--restore-wait``) and ``fs.Operations`` (uid, gid, read-only).
5. **Mount**: ``pyfuse3.init`` with ``fsname=<ICAT URL or -o fsname>``,
   ``subtype=idsfs``, ``default_permissions``, ``ro`` for read-only mounts
   and the ``-o`` VFS options. Datafiles are read through the kernel page
   cache (``direct_io`` only with ``--direct-reads``: it sends every read to
   the daemon and breaks shared mmap); files being written are opened with
   ``direct_io`` unless ``--cached-writes`` (see ``idsfs.fs``, "Writing").
6. **Serve**: ``pyfuse3.main`` runs in ``trio.run`` next to three tasks:
   the readiness probe (``stat`` + ``statvfs`` of the mount point through a
   worker thread; then the kernel readahead of the mount is raised by writing
   ``/sys/class/bdi/<major>:<minor>/read_ahead_kb``, a failure being only a
   warning; then "ready" goes to the waiting parent and ``READY=1`` to
   systemd), the session keeper (refreshes the ICAT session at half its
   lifetime, at most every 30 minutes; logs in again when the session was
   lost and credentials are known; listeners hand the new session id to the
   IDS client) and the signal watcher.
7. **Stop**: SIGINT, SIGTERM or SIGHUP ends the FUSE loop gracefully
   (requests in progress get :data:`STOP_GRACE` seconds, a second signal stops
   at once), then ``pyfuse3.close(unmount=True)``; an unmount from outside
   (``idsfs umount``, ``fusermount3 -u``) ends the loop the same way; a fatal
   error in the loop also unmounts. The daemon then logs out of ICAT when it
   logged in itself (an adopted session is left alone).

systemd: with ``$NOTIFY_SOCKET`` set, :func:`sd_notify` sends ``READY=1`` once
the mount answers (with ``MAINPID`` when forked) and ``STOPPING=1`` when it
begins to unmount (also when unmounted from outside), plus ``STATUS=`` lines.

Control channel (:mod:`idsfs.control`): once the mount answers, and before
"ready" is reported, the daemon serves its control socket (named after the
mount's device number) in the same nursery: ``status`` (:meth:`Daemon.status`,
extended by :meth:`Daemon.add_status_provider`) for ``idsfs status``, and
``stop`` for ``idsfs umount``, which unmounts (refused while busy), stops
like SIGTERM and keeps the client informed (:meth:`Daemon.announce`) until
the exit status (:meth:`Daemon.finish`); a lazy one only detaches the mount,
and the daemon serves the programs still using it until the last lets go.

Logging: one line per event on standard error (foreground), a ``--log-file``,
or syslog in the background; session ids and the password are redacted from
every line, tracebacks included (:class:`RedactingFormatter`). ``--debug``
logs every ICAT/IDS request with its time (the clients' debug lines), every
FUSE request with its result and time (:func:`trace_operations`, logger
``idsfs.fuse``) and pyfuse3's own messages.
Under journald (``$JOURNAL_STREAM``) lines carry ``<N>`` priority prefixes
instead of time stamps.

Exit status of :func:`mount`: 0 after a clean unmount (or, in the parent, once
the background daemon is ready), 1 when mounting failed or the loop died, 2
for a bad mount point.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import logging.handlers
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from idsfs.config import Config, format_size
from idsfs.errors import (
    ICATSessionError,
    IdsfsError,
    IDSResponseError,
    ServerError,
    TransportError,
    redact,
)
from idsfs.icat import ICATClient, SessionInfo
from idsfs.ids import IDSClient

__all__ = [
    "READY_TIMEOUT",
    "STOP_GRACE",
    "Daemon",
    "MountEntry",
    "RedactingFormatter",
    "StartupError",
    "default_ids_url",
    "detach_mount",
    "find_mount",
    "mount",
    "probe_mount",
    "sd_notify",
    "set_readahead",
    "unescape_mount_field",
]

log = logging.getLogger("idsfs.daemon")

#: seconds the mount may take to answer its first stat before start-up fails
READY_TIMEOUT = 30.0
#: seconds requests in progress get to finish after SIGINT/SIGTERM
STOP_GRACE = 5.0
#: seconds the logout at exit may take
LOGOUT_TIMEOUT = 3.0
#: seconds ``idsfs umount`` retries an unmount refused as busy (files closed just before)
BUSY_RETRY = 1.0
#: pyfuse3 worker tasks (must stay above 1: reads run concurrently)
FUSE_MAX_TASKS = 64
#: the longest and shortest interval between session refreshes, seconds
MAX_REFRESH_INTERVAL = 30 * 60.0
MIN_REFRESH_INTERVAL = 0.5
#: Seconds without reads from IDS or writes that make a daemon idle: it then
#: gives the heap memory kept for reuse back to the system (once per idle spell).
IDLE_TRIM_INTERVAL = 30.0


class StartupError(IdsfsError):
    """Mounting failed before the mount answered; the message says why, for the user.

    Raised by :meth:`Daemon.connect`, :meth:`Daemon.build`, :meth:`Daemon.mount` and
    :func:`check_mountpoint`.
    """


# ----------------------------------------------------------------------------- mounts table


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``: mount point, type, source, options, device.

    ``options`` are the super block options (for FUSE: ``user_id=``,
    ``group_id=``, ``default_permissions``...); ``device`` is ``major:minor``.

    Constructing one never raises.
    """

    mountpoint: str
    fstype: str
    source: str
    options: str
    device: str = ""

    @property
    def is_fuse(self) -> bool:
        """True for FUSE mounts (``fuse``, ``fuse.idsfs``, ``fuseblk``...). Never raises."""
        return self.fstype == "fuse" or self.fstype.startswith(("fuse.", "fuseblk"))

    @property
    def st_dev(self) -> int | None:
        """The device number (as ``os.stat().st_dev`` gives it), or None if unknown.

        Never raises.
        """
        major, sep, minor = self.device.partition(":")
        if not sep or not major.isdigit() or not minor.isdigit():
            return None
        return os.makedev(int(major), int(minor))

    @property
    def owner_uid(self) -> int | None:
        """The uid that mounted a FUSE file system (its ``user_id=`` option), or None.

        Never raises.
        """
        for option in self.options.split(","):
            key, _, value = option.partition("=")
            if key == "user_id" and value.isdigit():
                return int(value)
        return None


def unescape_mount_field(text: str) -> str:
    r"""Undo the octal escapes (``\040`` for a space) of a field of /proc/self/mountinfo
    or of an fstab line (they escape alike). Never raises."""
    out = bytearray()
    raw = text.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and raw[i + 1: i + 4].isdigit() and len(raw[i + 1: i + 4]) == 3:
            out.append(int(raw[i + 1: i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def _mount_path(path: str | Path) -> str:
    """Absolute path of a mount point without touching it (a stale mount cannot be stat'ed)."""
    p = os.path.abspath(path)
    parent, name = os.path.split(p)
    return os.path.join(os.path.realpath(parent), name) if name else p


def find_mount(path: str | Path, mountinfo: str = "/proc/self/mountinfo") -> MountEntry | None:
    """Return the topmost mount whose mount point is ``path``, or None.

    The path is made absolute and its parent resolved, but ``path`` itself is
    not touched (so a stale FUSE mount is found without hanging or failing).

    Never raises: an unreadable mount table gives None.
    """
    target = _mount_path(path)
    found: MountEntry | None = None
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        point = unescape_mount_field(fields[4])
        if point == target:
            found = MountEntry(point, rest[0], unescape_mount_field(rest[1]),
                               rest[2] if len(rest) > 2 else "", fields[2])
    return found


_PROBE = r"""
import os, sys
p = sys.argv[1]
try:
    os.statvfs(p)
    os.listdir(p)
except OSError as e:
    print(e.errno)
    sys.exit(3)
print(0)
"""


def probe_mount(path: str | Path, timeout: float = 5.0) -> int | None:
    """Check whether a mount answers: ``statvfs`` and ``listdir`` in a child process.

    Returns 0 when it answers, the errno when it fails (``ENOTCONN`` for a
    mount whose daemon is gone), or None when it did not answer within
    ``timeout`` seconds (the child is killed). A child is used because a
    request to a hung FUSE daemon blocks the caller. Never raises.
    """
    import subprocess

    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path)],
            capture_output=True, text=True, timeout=timeout, check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None
    except OSError as exc:
        return exc.errno or errno.EIO
    try:
        return int(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return errno.EIO


# ----------------------------------------------------------------------------- systemd


def sd_notify(*lines: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``lines`` (``READY=1``, ``STATUS=...``) to systemd's ``$NOTIFY_SOCKET``.

    One datagram, lines joined by newlines. An address starting with ``@`` is
    an abstract socket. Returns True when sent, False when there is no socket
    or sending failed (logged at debug level). Never raises.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address or not lines:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # called on the trio thread: a full queue drops it
            sock.connect(address)
            sock.sendall("\n".join(lines).encode("utf-8"))
        return True
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)
        return False


# ----------------------------------------------------------------------------- logging


class RedactingFormatter(logging.Formatter):
    """A formatter whose output never contains the secrets ``secrets()`` returns.

    Applies :func:`idsfs.errors.redact` (session ids in URLs, forms, JSON,
    ``/session/<id>`` paths) plus every current secret to the whole line,
    traceback included. With ``journal=True`` lines start with the syslog
    priority ``<N>`` that journald understands, instead of a time stamp.

    Constructing one never raises.
    """

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                 logging.CRITICAL: 2}

    def __init__(self, secrets: Callable[[], Iterable[str | None]], *, journal: bool = False,
                 fmt: str | None = None) -> None:
        if fmt is None:
            fmt = ("%(name)s: %(message)s" if journal
                   else "%(asctime)s %(levelname)s %(name)s: %(message)s")
        super().__init__(fmt)
        self._secrets = secrets
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` and remove every secret from the result.

        Raises what :meth:`logging.Formatter.format` raises for a malformed record (e.g.
        ``TypeError`` for arguments that do not fit the message), which the handler reports.
        """
        text = redact(super().format(record), tuple(self._secrets()))
        if self._journal:
            level = max((lv for lv in self._PRIORITY if lv <= record.levelno), default=10)
            text = f"<{self._PRIORITY.get(level, 7)}>{text}"
        return text


def _journal_attached() -> bool:
    """True when stderr is the journald stream systemd connected ($JOURNAL_STREAM)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(2)
        return bool(value) and st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError):
        return False


class _LogSetup:
    """The handlers of one daemon run; the background child switches to syslog when ready.

    The loggers get a :class:`logging.handlers.QueueHandler`: a record is only
    queued by the thread that logs it (the trio thread included, which must
    never wait for a disk or a socket), and one listener thread formats it
    (redacting secrets) and writes it to the real handler (stderr, the log
    file or syslog).
    """

    def __init__(self, config: Config, secrets: Callable[[], Iterable[str | None]],
                 background: bool) -> None:
        self.config = config
        self.secrets = secrets
        self.background = background
        self.handler: logging.Handler | None = None
        self._listener: logging.handlers.QueueListener | None = None
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._queue_handler: logging.Handler | None = logging.handlers.QueueHandler(self._queue)
        self.logger = logging.getLogger("idsfs")
        self.logger.setLevel(config.effective_log_level)
        self.logger.propagate = False
        logging.getLogger("pyfuse3").setLevel(
            logging.DEBUG if config.debug else logging.WARNING)
        logging.getLogger("pyfuse3").propagate = False
        for name in ("idsfs", "pyfuse3"):
            logging.getLogger(name).addHandler(self._queue_handler)
        if config.log_file is not None:
            handler: logging.Handler = logging.FileHandler(config.log_file, encoding="utf-8")
            handler.setFormatter(RedactingFormatter(secrets))
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(RedactingFormatter(secrets, journal=_journal_attached()))
            if background:
                # Until ready, only problems reach the terminal of `idsfs mount`;
                # the fatal start-up error itself travels through the pipe.
                handler.setLevel(logging.WARNING)
        self._install(handler)

    def _install(self, handler: logging.Handler) -> None:
        """Make ``handler`` the one records go to (what was queued before goes to the old one)."""
        if self._listener is not None:
            self._listener.stop()  # writes out what is queued, then ends its thread
        self._listener = logging.handlers.QueueListener(self._queue, handler,
                                                        respect_handler_level=True)
        self._listener.start()
        old, self.handler = self.handler, handler
        if old is not None:
            old.close()

    def detach_terminal(self) -> None:
        """Background child, once ready: log to syslog (if there is one) instead of stderr."""
        if self.config.log_file is not None:
            return
        handler: logging.Handler
        if os.path.exists("/dev/log"):
            try:
                handler = logging.handlers.SysLogHandler(
                    "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
                handler.setFormatter(RedactingFormatter(
                    self.secrets, fmt=f"idsfs[{os.getpid()}]: %(levelname)s %(name)s: "
                                      f"%(message)s"))
            except OSError:
                handler = logging.NullHandler()
        else:
            handler = logging.NullHandler()
        self._install(handler)

    def close(self) -> None:
        """Write out what is queued, remove the handlers and close them."""
        if self._queue_handler is not None:
            for name in ("idsfs", "pyfuse3"):
                logging.getLogger(name).removeHandler(self._queue_handler)
            self._queue_handler = None
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self.handler is not None:
            self.handler.close()
            self.handler = None


# ----------------------------------------------------------------------------- IDS discovery


def default_ids_url(icat_url: str) -> str:
    """The IDS URL tried when ``--ids`` is absent: ICAT's scheme, host and port, path ``/ids``.

    ``https://icat.example.org:8181`` and ``https://icat.example.org:8181/icat``
    both give ``https://icat.example.org:8181/ids``; a deeper path keeps its
    prefix (``https://h/facility/icat`` gives ``https://h/facility/ids``).

    Raises ``ValueError`` for a malformed URL (``urlsplit``'s).
    """
    parts = urlsplit(icat_url)
    path = parts.path.rstrip("/")
    if path.endswith("/icat"):
        path = path[: -len("/icat")]
    return urlunsplit((parts.scheme, parts.netloc, path + "/ids", "", ""))


def _connection_ended(exc: BaseException) -> bool:
    """True when ``exc`` is (a group made only of) the FUSE device's ``ECONNABORTED``."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_connection_ended(e) for e in exc.exceptions)
    return isinstance(exc, ConnectionAbortedError)


def _describe_error(exc: BaseException) -> str:
    """A one-line reason for a start-up failure (no secrets: the clients redact)."""
    if isinstance(exc, ServerError):
        if not exc.message:
            return str(exc)
        code = exc.type or exc.status
        return f"{exc.message} ({code})" if code is not None else exc.message
    text = str(exc) or type(exc).__name__
    return text


# ----------------------------------------------------------------------------- readahead


def set_readahead(st_dev: int, nbytes: int, sysfs: str = "/sys/class/bdi") -> bool:
    """Set ``read_ahead_kb`` of the backing device ``st_dev`` (a FUSE mount's) to ``nbytes``.

    Returns True on success; False (with a warning logged) when the file is
    missing or not writable (e.g. not root). ``nbytes`` 0 does nothing. Never raises.
    """
    if nbytes <= 0:
        return True
    path = Path(sysfs) / f"{os.major(st_dev)}:{os.minor(st_dev)}" / "read_ahead_kb"
    try:
        path.write_text(f"{nbytes // 1024}\n")
    except OSError as exc:
        log.warning("could not raise the kernel readahead to %s (%s: %s); sequential reads "
                    "will be slower", format_size(nbytes), path, exc.strerror or exc)
        return False
    log.info("kernel readahead of the mount: %s", format_size(nbytes))
    return True


# ----------------------------------------------------------------------------- tracing

#: the FUSE handlers ``--debug`` traces (``forget`` and ``init`` are left out)
TRACED_OPERATIONS = (
    "lookup", "getattr", "setattr", "readlink", "opendir", "readdir", "releasedir", "statfs",
    "access", "listxattr", "getxattr", "setxattr", "removexattr", "open", "read", "write",
    "flush", "fsync", "release", "create", "mknod", "mkdir", "unlink", "rmdir", "rename",
    "symlink", "link", "fsyncdir",
)

fuse_log = logging.getLogger("idsfs.fuse")


def _short(value: Any) -> str:
    """A short, one-line form of a handler argument or result for the trace."""
    if isinstance(value, bytes | bytearray | memoryview):
        if len(value) > 64 or isinstance(value, memoryview):
            return f"<{len(value)} bytes>"
        return repr(bytes(value))
    if value is None or isinstance(value, int | float | str | bool | tuple | list):
        text = repr(value)
    elif hasattr(value, "st_ino"):
        text = f"{type(value).__name__}(ino={value.st_ino}, size={getattr(value, 'st_size', '?')})"
    elif hasattr(value, "fh"):
        text = f"{type(value).__name__}(fh={value.fh})"
    else:
        text = type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def trace_operations(operations: Any) -> None:
    """``--debug``: log every FUSE request on ``idsfs.fuse``, one line with its time.

    ``read(12, 0, 131072) -> <131072 bytes> in 0.41 ms`` or ``lookup(1, b'x')
    -> ENOENT in 0.02 ms``. Wraps the handlers of :data:`TRACED_OPERATIONS` on
    the instance; request contexts are left out of the line.

    Raises ``ImportError`` without pyfuse3; the wrapped handlers raise what the
    handlers raise.
    """
    import pyfuse3

    skipped = (pyfuse3.RequestContext, pyfuse3.ReaddirToken)
    for name in TRACED_OPERATIONS:
        handler = getattr(operations, name, None)
        if handler is None:
            continue

        def make(name: str, handler: Callable[..., Any]) -> Callable[..., Any]:
            async def traced(*args: Any) -> Any:
                shown = ", ".join(_short(a) for a in args if not isinstance(a, skipped))
                start = time.perf_counter()
                try:
                    result = await handler(*args)
                except pyfuse3.FUSEError as exc:
                    fuse_log.debug("%s(%s) -> %s in %.2f ms", name, shown,
                                   errno.errorcode.get(exc.errno, exc.errno),
                                   (time.perf_counter() - start) * 1000)
                    raise
                fuse_log.debug("%s(%s) -> %s in %.2f ms", name, shown, _short(result),
                               (time.perf_counter() - start) * 1000)
                return result

            traced.__name__ = name
            return traced

        setattr(operations, name, make(name, handler))


# ----------------------------------------------------------------------------- the daemon


class _Reporter:
    """Tells whoever waits for the mount (parent process, systemd) how start-up went."""

    def __init__(self, ready_fd: int | None, on_ready: Callable[[], None] | None) -> None:
        self.ready_fd = ready_fd
        self.on_ready = on_ready
        self.done = False

    def ready(self) -> None:
        if self.done:
            return
        self.done = True
        if self.on_ready is not None:
            self.on_ready()
        extra = [f"MAINPID={os.getpid()}"] if self.ready_fd is not None else []
        sd_notify("READY=1", "STATUS=mounted", *extra)
        self._send("READY\n")

    def failed(self, message: str) -> None:
        if self.done:
            return
        self.done = True
        self._send("ERROR " + message.replace("\n", " ") + "\n")

    def _send(self, text: str) -> None:
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, text.encode("utf-8", "replace"))
        except OSError as exc:  # the parent is gone: nobody left to tell
            log.debug("cannot report %r to the parent: %s", text.split()[0], exc)
        finally:
            with contextlib.suppress(OSError):
                os.close(self.ready_fd)
            self.ready_fd = None


class Daemon:
    """One mount: the clients, the FUSE stack and its trio main loop.

    Use :meth:`connect`, :meth:`build`, :meth:`mount`, then ``trio.run(daemon.serve,
    reporter)``, and :meth:`close` then :meth:`finish` in a ``finally``;
    :func:`mount` does all of it. ``secrets()`` returns every session id seen
    and the password (for log redaction). Attributes after :meth:`connect`:
    ``icat``, ``ids``, ``owns_session`` (the daemon logged in, so it re-logs in
    and logs out).

    Control channel (:mod:`idsfs.control`): once the mount answers, the daemon
    serves ``status`` and ``stop`` requests on its socket. Parts of the daemon
    plug into ``idsfs status`` and the unmount with :meth:`add_status_provider`
    (e.g. the uploader: ``daemon.add_status_provider("uploads", uploader.stats,
    pending=uploader.pending)``) and report progress while stopping with
    :meth:`announce`. Constructing one never raises.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.icat: ICATClient | None = None
        self.ids: IDSClient | None = None
        self.owns_session = False
        self.mounted = False
        self.fatal: BaseException | None = None
        self.lifetime: float | None = None
        self.operations: Any = None
        self.bridge: Any = None
        self.cache: Any = None
        self.catalog: Any = None
        self.transfer: Any = None
        self.uploader: Any = None
        self.read_only = config.read_only
        self._session_ids: list[str] = []
        self._lock = threading.Lock()
        self._stop_requested = False
        #: monotonic and wall-clock start times (``idsfs status``: uptime)
        self.started = time.monotonic()
        self.started_at = time.time()
        #: the mount's device number, once it answers
        self.st_dev: int | None = None
        self.control: Any = None
        self._waiters: list[Any] = []
        #: held while ``idsfs umount`` is answered: its connection becomes a waiter
        #: before any progress event is sent (the unmount ends the FUSE loop, whose
        #: end announces the uploads it waits for, at once)
        self._replying = threading.Lock()
        self._providers: dict[str, tuple[Callable[[], Any], Callable[[], list[str]] | None]] = {}
        self._nursery: Any = None
        #: (monotonic time, remaining seconds) of the last session check
        self._session_seen: tuple[float, float] | None = None
        self._renewing: Any = None  # a trio.Lock, made on the trio thread when first needed
        self._session_user: str | None = None

    # -------------------------------------------------------------- status hooks

    def add_status_provider(self, name: str, stats: Callable[[], Any],
                            pending: Callable[[], list[str]] | None = None) -> None:
        """Add a section ``name`` to ``idsfs status`` (and to the unmount's report).

        ``stats()`` returns a JSON-serialisable dict (or a dataclass) and is
        called on the trio thread; ``pending()`` (optional) returns one short
        line per piece of work that an unmount would wait for or leave behind
        (e.g. ``"upload of DEMO/.../run.h5 (12 MiB), attempt 3"``). An uploader
        should return ``{"pending": [...], "in_progress": [...], ...}`` from
        ``stats()``; ``idsfs status`` lists those two keys and shows the rest
        as ``key: value``. Never raises.
        """
        self._providers[name] = (stats, pending)

    def pending_work(self) -> list[str]:
        """What the providers' ``pending()`` report (never raises)."""
        out: list[str] = []
        for name, (_stats, pending) in self._providers.items():
            if pending is None:
                continue
            try:
                out.extend(str(item) for item in pending())
            except Exception as exc:  # noqa: BLE001 - a broken provider must not stop the unmount
                log.debug("pending() of %s failed: %s", name, exc)
        return out

    def announce(self, event: str, message: str, **fields: Any) -> None:
        """Send a progress event to every ``idsfs umount`` waiting for this daemon.

        Thread-safe, never raises; also logged at info level. ``fields`` must
        be JSON-serialisable and hold no secrets (e.g. ``pending=[...]``).
        """
        log.info("%s", message)
        with self._replying, self._lock:
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.send({"event": event, "message": message, **fields})

    # -------------------------------------------------------------- secrets

    def secrets(self) -> tuple[str, ...]:
        """Every session id this daemon has used, and the password. Never raises."""
        with self._lock:
            out = list(self._session_ids)
        for secret in (self.config.password, self.config.session):
            if secret is not None:
                out.append(secret.reveal())
        return tuple(out)

    def _remember_session(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                if sid not in self._session_ids:
                    self._session_ids.append(sid)

    def _on_session(self, sid: str | None) -> None:
        """ICAT session listener: a new session id (login, re-login) goes to the IDS client."""
        self._remember_session(sid)
        if self.ids is not None and sid:
            self.ids.sessionId = sid

    # -------------------------------------------------------------- connect

    def connect(self) -> None:
        """Log in (or adopt the session) and find and check the IDS.

        Raises :class:`StartupError` with a message naming the server and the
        reason (refused login, unreachable server, no IDS at the derived URL...).
        """
        cfg = self.config
        if cfg.session is not None:
            self._remember_session(cfg.session.reveal())
        ids_url = cfg.ids_url
        icat_url = cfg.icat_url
        ids: IDSClient | None = None
        if icat_url is None:
            assert ids_url is not None
            ids = self._ids_client(ids_url)
            try:
                icat_url = ids.getIcatUrl().strip()
            except IDSResponseError as exc:  # an answer that is no URL: says what to do
                raise StartupError(f"the IDS at {ids_url}: {_describe_error(exc)}") from exc
            except (IdsfsError, ValueError) as exc:
                raise StartupError(f"the IDS at {ids_url} does not tell its ICAT URL "
                                   f"({_describe_error(exc)}); give --icat URL") from exc
            log.info("ICAT URL from the IDS: %s", icat_url)
        self.icat = icat = self._icat_login(icat_url)
        if ids is None:
            if ids_url is None:
                ids_url = default_ids_url(icat_url)
                try:
                    ids = self._ids_client(ids_url)
                    ids.ping()
                except IdsfsError as exc:
                    cause = exc.__cause__ if isinstance(exc, StartupError) else exc
                    raise StartupError(
                        f"no IDS at {ids_url} ({_describe_error(cause or exc)}), the URL "
                        f"derived from the ICAT URL; give --ids URL") from exc
            else:
                ids = self._ids_client(ids_url)
                try:
                    ids.ping()
                except IdsfsError as exc:
                    raise StartupError(f"{ids_url} is not an IDS: "
                                       f"{_describe_error(exc)}") from exc
        self.ids = ids
        ids.sessionId = icat.sessionId
        icat.add_session_listener(self._on_session)
        try:
            if ids.isReadOnly() and not self.read_only:
                log.warning("the IDS is read-only: mounting read-only")
                self.read_only = True
            two_level = ids.isTwoLevel()
        except IdsfsError as exc:
            raise StartupError(f"IDS at {ids_url}: {_describe_error(exc)}") from exc
        log.info("IDS %s, version %s, %s storage", ids_url, ids.apiversion,
                 "two-level" if two_level else "single-level")

    def _ids_client(self, url: str) -> IDSClient:
        cfg = self.config
        try:
            return IDSClient(url, None, proxy=cfg.proxies, timeout=cfg.http_timeout,
                             verify=cfg.verify)
        except TransportError as exc:
            raise StartupError(f"cannot reach the IDS at {url}: {_describe_error(exc)}") from exc
        except IdsfsError as exc:
            raise StartupError(f"{url} is not an IDS: {_describe_error(exc)}") from exc

    def _icat_login(self, url: str) -> ICATClient:
        cfg = self.config
        try:
            icat = ICATClient(url, timeout=cfg.http_timeout, verify=cfg.verify,
                              proxy=cfg.proxies)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        try:
            if cfg.session is not None:
                icat.sessionId = cfg.session.reveal()
                info = icat.session_info()
                log.info("using the existing ICAT session of %s at %s", info.userName,
                         icat.url)
            else:
                assert cfg.user is not None and cfg.password is not None
                icat.login(cfg.auth, {"username": cfg.user, "password": cfg.password.reveal()})
                self.owns_session = True
                self._remember_session(icat.sessionId)
                info = icat.session_info()
                log.info("logged in to ICAT %s as %s (authenticator %s)", icat.url,
                         info.userName, cfg.auth)
        except ICATSessionError as exc:
            icat.close()
            if cfg.session is not None:
                raise StartupError(f"the ICAT session from {cfg.session.origin} is not valid "
                                   f"at {url} (expired or unknown)") from exc
            raise StartupError(f"login to ICAT at {url} refused for user {cfg.user!r} with "
                               f"authenticator {cfg.auth!r}: {_describe_error(exc)}") from exc
        except TransportError as exc:
            icat.close()
            raise StartupError(f"cannot reach ICAT at {url}: {_describe_error(exc)}") from exc
        except IdsfsError as exc:
            icat.close()
            raise StartupError(f"ICAT at {url}: {_describe_error(exc)}") from exc
        self.lifetime = info.remainingMinutes * 60.0
        self._note_session(info.userName, self.lifetime)
        return icat

    # -------------------------------------------------------------- the stack

    def build(self) -> None:
        """Create the bridge, the block cache, the catalogue, the transfers and the Operations.

        Raises :class:`StartupError` when the spool directory cannot be used (not a
        directory, locked by another daemon), and ``ValueError`` from the parts for settings
        the config has already checked (e.g. a block size that is not a power of two).
        """
        from idsfs import catalog, fs, transfer, upload
        from idsfs.aio import ThreadBridge
        from idsfs.blockcache import BlockCache

        cfg = self.config
        assert self.icat is not None and self.ids is not None
        self.bridge = ThreadBridge(cfg.max_threads)
        self.cache = BlockCache(cfg.cache_size, cfg.block_size)
        self.catalog = catalog.Catalog(self.icat, self.bridge, metadata_ttl=cfg.metadata_ttl)
        self.transfer = transfer.Transfer(self.ids, self.bridge, self.cache,
                                          restore_wait=cfg.restore_wait,
                                          renew_session=self.renew_session,
                                          malloc_tuning=True)
        self.uploader = None
        if not self.read_only:
            # the write path (issue 5): spool, uploads, pending ones from an earlier run
            user = self._session_user or cfg.user
            spool = cfg.spool_dir or upload.default_spool_dir(self.icat.url.rstrip("/"), user,
                                                              cfg.mountpoint)
            self.uploader = upload.Uploader(
                self.ids, self.icat, self.bridge, spool, datafile_format=cfg.datafile_format,
                owner=f"{self.icat.url.rstrip('/')} {user}", retry_delay=cfg.upload_retry,
                online_wait=cfg.restore_wait, renew_session=self.renew_session,
                live_threshold=max(1, cfg.live_upload),
                max_live=upload.DEFAULT_MAX_LIVE if cfg.live_upload else 0)
            try:
                found = self.uploader.open_spool()
            except IdsfsError as exc:
                raise StartupError(str(exc)) from exc
            if found:
                log.info("%d unfinished upload(s) in %s: retrying them", len(found), spool)
            self.add_status_provider("uploads", self.uploader.status,
                                     pending=self.uploader.pending_lines)
        self.operations = fs.Operations(self.catalog, self.transfer, uid=cfg.uid, gid=cfg.gid,
                                        read_only=self.read_only, block_size=cfg.block_size,
                                        uploader=self.uploader, replace=cfg.replace_datafiles,
                                        dataset_type=cfg.dataset_type, notify_kernel=True,
                                        direct_write=not cfg.cached_writes,
                                        direct_read=cfg.direct_reads)
        if cfg.debug:
            trace_operations(self.operations)

    def fuse_options(self) -> set[str]:
        """The option set given to ``pyfuse3.init``. Never raises."""
        cfg = self.config
        opts = {f"fsname={cfg.effective_fsname}", "subtype=idsfs", "default_permissions"}
        opts.add("ro" if self.read_only else "rw")
        if cfg.allow_other:
            opts.add("allow_other")
        opts |= set(cfg.fuse_options)
        return opts

    def mount(self) -> None:
        """``pyfuse3.init``: the kernel mount exists afterwards. Raises StartupError."""
        import pyfuse3

        with contextlib.suppress(OSError), os.scandir(self.config.mountpoint) as entries:
            if next(entries, None) is not None:
                log.warning("the mount point %s is not empty: what it holds is hidden while "
                            "the archive is mounted on it", self.config.mountpoint)
        try:
            pyfuse3.init(self.operations, str(self.config.mountpoint), self.fuse_options())
        except RuntimeError as exc:
            raise StartupError(f"cannot mount on {self.config.mountpoint}: {exc}") from exc
        self.mounted = True
        cfg = self.config
        log.info("mounted %s on %s (%s, cache %s, block %s, metadata ttl %gs, restore wait "
                 "%gs)", cfg.effective_fsname, cfg.mountpoint,
                 "read-only" if self.read_only else "read-write", format_size(cfg.cache_size),
                 format_size(cfg.block_size), cfg.metadata_ttl, cfg.restore_wait)

    # -------------------------------------------------------------- trio main

    async def serve(self, reporter: _Reporter) -> None:
        """Run the FUSE loop with the readiness probe, the session keeper and the signals.

        Returns when the loop ended (signal, unmount from outside, fatal error:
        stored in ``self.fatal``). Must run inside ``trio.run``.

        An error of the FUSE loop is stored in ``self.fatal``, not raised; only an
        unexpected error of one of its helper tasks propagates (as trio reports it).
        """
        import pyfuse3
        import trio

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.transfer.run)
            if self.uploader is not None:
                await nursery.start(self.uploader.run)
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            nursery.start_soon(self._probe_ready, reporter)
            nursery.start_soon(self._keep_session)
            nursery.start_soon(self._release_memory_when_idle)
            try:
                await pyfuse3.main(max_tasks=FUSE_MAX_TASKS)
            except Exception as exc:  # a handler let a non-FUSEError escape
                if _connection_ended(exc) and find_mount(self.config.mountpoint) is None:
                    # the kernel ended a connection whose mount is gone: a lazily
                    # detached mount (umount -l, idsfs umount --lazy) whose last user
                    # let go ends so, not with the usual end of file
                    log.debug("the FUSE connection ended: %s", exc)
                else:
                    self.fatal = exc
                    log.error("the FUSE loop failed: %s", exc, exc_info=True)
            finally:
                if not self._stop_requested:
                    # unmounted from outside (idsfs umount, fusermount3 -u, umount)
                    self._stop_requested = True
                    log.info("%s was unmounted: stopping", self.config.mountpoint)
                    sd_notify("STOPPING=1", "STATUS=unmounted")
                if self.uploader is not None:
                    self.uploader.stop_live()
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await self.transfer.aclose()
                    if self.uploader is not None:
                        await self._finish_uploads()
        if not reporter.done:
            reporter.failed(f"the mount on {self.config.mountpoint} ended before it answered"
                            + (f": {self.fatal}" if self.fatal else ""))

    async def _finish_uploads(self) -> None:
        """After the FUSE loop: give pending uploads ``--upload-wait`` seconds, report the rest."""
        assert self.uploader is not None
        waiting = self.uploader.pending_lines(held=False)  # held ones wait for the user
        wait = self.config.upload_wait
        if waiting:
            await self._announce("waiting",
                                 f"waiting up to {wait:g} s for {len(waiting)} upload(s)",
                                 pending=waiting)
        remaining = await self.uploader.aclose(wait)
        if remaining:
            await self._announce("waiting", f"{len(remaining)} upload(s) not stored; they "
                                 f"stay in {self.uploader.spool_dir} for the next mount",
                                 pending=[up.line() for up in remaining])
        elif waiting:
            await self._announce("waiting", "all uploads finished")

    async def _announce(self, event: str, message: str, **fields: Any) -> None:
        """:meth:`announce` from the trio thread: the socket sends run in a worker thread."""
        await self.bridge.run(functools.partial(self.announce, event, message, **fields),
                              abandon_on_cancel=False, name="announce")

    def _request_stop(self, why: str) -> None:
        import pyfuse3

        if self._stop_requested:
            return
        self._stop_requested = True
        log.info("%s: unmounting %s", why, self.config.mountpoint)
        sd_notify("STOPPING=1", "STATUS=unmounting")
        try:
            pyfuse3.terminate()
        except Exception as exc:  # noqa: BLE001 - no FUSE loop (yet): nothing to end
            log.debug("pyfuse3.terminate: %s", exc)

    def _stop_with_grace(self, why: str) -> None:
        """Stop like SIGTERM does: requests in progress get :data:`STOP_GRACE` seconds."""
        import trio

        if self._stop_requested:
            return
        self._request_stop(why)
        nursery = self._nursery
        if nursery is None:
            return

        async def deadline() -> None:
            await trio.sleep(STOP_GRACE)
            log.info("requests still running after %gs: cancelling them", STOP_GRACE)
            nursery.cancel_scope.cancel()

        nursery.start_soon(deadline)

    async def _watch_signals(self, scope: Any) -> None:
        import trio

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
            async for signum in sigs:
                name = signal.Signals(signum).name
                if self._stop_requested:
                    log.info("%s again: stopping at once", name)
                    scope.cancel()
                    return
                self._request_stop(f"received {name}")
                # Requests in progress get a grace period, then everything is cancelled.
                scope_deadline = trio.current_time() + STOP_GRACE
                async with trio.open_nursery() as inner:
                    async def deadline(d: float = scope_deadline) -> None:
                        await trio.sleep_until(d)
                        log.info("requests still running after %gs: cancelling them",
                                 STOP_GRACE)
                        scope.cancel()

                    inner.start_soon(deadline)
                    async for signum2 in sigs:
                        log.info("%s again: stopping at once", signal.Signals(signum2).name)
                        scope.cancel()
                        return

    async def _probe_ready(self, reporter: _Reporter) -> None:
        import trio

        mp = str(self.config.mountpoint)
        try:
            with trio.fail_after(READY_TIMEOUT):
                st = await self.bridge.run(os.stat, mp, name="ready probe stat")
                await self.bridge.run(os.statvfs, mp, name="ready probe statvfs")
        except trio.TooSlowError:
            msg = f"the mount on {mp} did not answer within {READY_TIMEOUT:g} s"
            log.error("%s", msg)
            await self.bridge.run(reporter.failed, msg, abandon_on_cancel=False,
                                  name="report failure")
            self._request_stop("not ready")
            return
        except OSError as exc:
            msg = f"the mount on {mp} does not answer: {exc.strerror or exc}"
            log.error("%s", msg)
            await self.bridge.run(reporter.failed, msg, abandon_on_cancel=False,
                                  name="report failure")
            self._request_stop("not ready")
            return
        self.st_dev = st.st_dev
        if self.config.readahead:
            await self.bridge.run(set_readahead, st.st_dev, self.config.readahead,
                                  name="set readahead")
        await self._start_control(st.st_dev)
        log.info("ready: %s answers", mp)
        # writes to the parent's pipe, the caller's hook (prints, chdir, log handlers)
        await self.bridge.run(reporter.ready, abandon_on_cancel=False, name="report ready")

    # -------------------------------------------------------------- control channel

    async def _start_control(self, st_dev: int) -> None:
        """Serve the control socket of this mount (a failure is only a warning)."""
        from idsfs import control

        path = control.runtime_dir() / control.socket_name(st_dev)
        server = control.ControlServer(path, self._control_request)
        try:
            await self.bridge.run(server.bind, abandon_on_cancel=False, name="control socket")
            await self._nursery.start(server.serve)
        except OSError as exc:
            log.warning("no control socket at %s (%s): idsfs status cannot reach this daemon",
                        path, exc.strerror or exc)
            return
        self.control = server
        log.debug("control socket: %s", path)

    async def _control_request(self, request: dict[str, Any], conn: Any) -> None:
        """Answer one request of the control channel (see :mod:`idsfs.control`)."""
        kind = request.get("request")
        if kind == "status":
            await conn.send({"ok": True, "status": await self.status()})
        elif kind == "stop":
            await self._control_stop(bool(request.get("lazy")), conn)
        else:
            await conn.send({"ok": False, "error": "bad request",
                             "message": f"unknown request {kind!r}"})

    async def _control_stop(self, lazy: bool, conn: Any) -> None:
        """``idsfs umount``: unmount (refused when busy unless lazy), then stop and exit.

        The connection becomes a waiter first: a plain unmount ends the FUSE
        loop at once, which cancels this task, so the unmount and the reply
        happen together in a worker thread. ``lazy`` only detaches the mount
        and answers ``detached``: the daemon goes on serving the programs
        still using it (open files, working directories) and stops like after
        any unmount once the kernel ends the connection, when the last of them
        lets go.
        """
        waiter = conn.detach()
        stopping = {"ok": True, "event": "stopping", "pid": os.getpid(),
                    "pending": self.pending_work()}
        if lazy and not self._stop_requested:
            mp = str(self.config.mountpoint)

            def detach_and_reply() -> None:
                done, _busy, message = detach_mount(mp, True)
                if done:
                    log.info("%s detached (idsfs umount --lazy): serving the programs still "
                             "using it until they let go", mp)
                    waiter.send({"ok": True, "event": "detached", "pid": os.getpid(),
                                 "pending": stopping["pending"]})
                else:
                    waiter.send({"ok": False, "error": "failed", "message": message})
                waiter.close()

            await self.bridge.run(detach_and_reply, abandon_on_cancel=False,
                                  name="lazy unmount")
            return
        if self._stop_requested:
            # a blocking socket send (up to its 1 s timeout): through the bridge
            await self.bridge.run(waiter.send, stopping, abandon_on_cancel=False,
                                  name="control reply")
            with self._lock:
                self._waiters.append(waiter)
            self._stop_with_grace("idsfs umount")
            return
        mp = str(self.config.mountpoint)

        def unmount_and_reply() -> bool:
            # A file closed just before still pins the mount until the kernel's
            # asynchronous RELEASE is answered: "busy" for a moment is retried.
            deadline = time.monotonic() + BUSY_RETRY
            with self._replying:
                while True:
                    done, busy, message = detach_mount(mp, False)
                    if done or not busy or time.monotonic() >= deadline:
                        break
                    time.sleep(0.05)
                if not done:
                    waiter.send({"ok": False, "error": "busy" if busy else "failed",
                                 "message": message})
                    waiter.close()
                    return False
                waiter.send(stopping)
                with self._lock:
                    self._waiters.append(waiter)
            return True

        if await self.bridge.run(unmount_and_reply, name="unmount"):
            self._stop_with_grace("idsfs umount")

    async def status(self) -> dict[str, Any]:
        """What ``idsfs status`` shows: a JSON-serialisable dict without secrets.

        Keys: ``version``, ``pid``, ``uptime`` (seconds), ``started`` (epoch),
        ``mountpoint``, ``device``, ``fsname``, ``read_only``, ``icat_url``,
        ``ids_url``, ``config`` (section, files), ``session`` (``user``,
        ``remaining`` seconds, ``owned``, ``checked`` live or ``estimated``,
        ``error``), ``cache`` (the block cache counters plus ``hit_rate``),
        ``transfers`` (open ``streams`` with rates, ``restores`` waiting, and
        counters), ``stopping``, and one key per status provider (e.g.
        ``uploads``). Runs on the trio thread.

        Never raises: a failing status provider or session check becomes an
        ``error`` entry (cancellation still propagates).
        """
        import dataclasses

        from idsfs import __version__

        cfg = self.config
        out: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 3),
            "started": self.started_at,
            "mountpoint": str(cfg.mountpoint),
            "device": self.st_dev,
            "fsname": cfg.effective_fsname,
            "read_only": self.read_only,
            "icat_url": self.icat.url if self.icat is not None else cfg.icat_url,
            "ids_url": self.ids.url if self.ids is not None else cfg.ids_url,
            "config": {"section": cfg.config_section,
                       "files": [str(p) for p in cfg.config_files]},
            "session": await self._session_status(),
            "stopping": self._stop_requested,
        }
        if self.transfer is not None:
            stats = dataclasses.asdict(self.transfer.stats())
            cache = stats.pop("cache")
            lookups = cache["hits"] + cache["misses"] + cache["waits"]
            cache["hit_rate"] = cache["hits"] / lookups if lookups else None
            out["cache"] = cache
            out["transfers"] = stats
        for name, (provider, _pending) in self._providers.items():
            try:
                value = provider()
                if dataclasses.is_dataclass(value) and not isinstance(value, type):
                    value = dataclasses.asdict(value)
                out[name] = value
            except Exception as exc:  # noqa: BLE001 - a broken provider must not break status
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return out

    async def _session_status(self) -> dict[str, Any]:
        """The ICAT session: asked live (bounded), else estimated from the last check."""
        import trio

        info: dict[str, Any] = {"owned": self.owns_session, "user": self._session_user}
        if self.icat is None:
            return info
        try:
            with trio.fail_after(3.0):
                current = await self.bridge.run(self.icat.session_info, name="status session")
            self._note_session(current.userName, current.remainingMinutes * 60.0)
            info.update(user=current.userName, checked="live")
        except ICATSessionError as exc:
            # ICAT said so: the session is gone, whatever the estimate says
            info.update(error=_describe_error(exc), checked="live", expired=True)
            self._note_session(None, 0.0)
        except (IdsfsError, trio.TooSlowError) as exc:
            info["error"] = (_describe_error(exc) if isinstance(exc, IdsfsError)
                             else "ICAT did not answer within 3 s")
            info["checked"] = "estimated"
        if self._session_seen is not None:
            when, remaining = self._session_seen
            info["remaining"] = round(max(0.0, remaining - (time.monotonic() - when)), 1)
        return info

    def _note_session(self, user: str | None, remaining: float) -> None:
        """Remember the session's user and remaining lifetime (for ``idsfs status``)."""
        if user:
            self._session_user = user
        self._session_seen = (time.monotonic(), remaining)

    def refresh_interval(self) -> float:
        """Seconds between session refreshes: half the lifetime, 0.5 s to 30 min. Never raises."""
        lifetime = self.lifetime or 2 * MAX_REFRESH_INTERVAL
        return max(MIN_REFRESH_INTERVAL, min(lifetime / 2, MAX_REFRESH_INTERVAL))

    async def _release_memory_when_idle(self) -> None:
        """Every :data:`IDLE_TRIM_INTERVAL` seconds: when nothing was fetched from IDS
        nor written since the last look, give freed heap memory back, once."""
        import trio

        from idsfs.transfer import release_free_memory

        seen: tuple[Any, ...] | None = None
        released = False
        while True:
            await trio.sleep(IDLE_TRIM_INTERVAL)
            activity: tuple[Any, ...] = (self.transfer.stats().bytes_fetched,)
            if self.uploader is not None:
                up = self.uploader.stats()
                activity += (up.stored, up.writing, up.spool_bytes)
            if activity != seen:
                seen, released = activity, False
                continue
            if not released:
                released = True
                await self.bridge.run(release_free_memory, name="release free memory")
                log.debug("idle: free heap memory given back")

    async def _keep_session(self) -> None:
        """Refresh the ICAT session before it expires; log in again if it was lost."""
        import trio

        assert self.icat is not None
        icat = self.icat
        failures = 0
        while True:
            interval = self.refresh_interval()
            await trio.sleep(interval if failures == 0 else min(interval, 5.0 * failures))
            try:
                await self.bridge.run(icat.refresh, name="session refresh")
                failures = 0
                if self.owns_session and self.lifetime:
                    self._note_session(None, self.lifetime)
                log.debug("ICAT session refreshed")
            except ICATSessionError:
                if not self.owns_session:
                    failures = max(failures, 1) + 1
                    log.error("the ICAT session has expired and there are no credentials to "
                              "log in again: the mount answers EACCES; remount with a new "
                              "session")
                    continue
                try:
                    await self._login_again()
                    failures = 0
                    log.info("the ICAT session had expired: logged in again")
                except IdsfsError as exc:
                    failures += 1
                    log.error("logging in to ICAT again failed: %s", _describe_error(exc))
            except IdsfsError as exc:
                failures += 1
                log.warning("refreshing the ICAT session failed: %s", _describe_error(exc))

    async def renew_session(self) -> bool:
        """Called by the transfers when IDS refused the session (403).

        Asks ICAT about the session (the client logs in again by itself on a
        SESSION error when it holds credentials, and the listener passes the
        new id on). Returns True when ``ids.sessionId`` changed, so that the
        refused call is worth repeating once; never raises.
        """
        import trio

        assert self.icat is not None and self.ids is not None
        before = self.ids.sessionId
        if self._renewing is None:
            self._renewing = trio.Lock()
        async with self._renewing:  # one renewal at a time: not one ICAT session per 403
            if self.ids.sessionId != before:
                return True  # renewed by another caller while this one waited
            try:
                await self.bridge.run(self.icat.session_info, name="session check")
            except IdsfsError as exc:
                log.debug("session check failed: %s", exc)
                # A SESSION error means the client's own re-login was refused (it
                # waits before trying again, and said so): no second login here.
                if self.owns_session and not isinstance(exc, ICATSessionError):
                    try:
                        await self._login_again()
                    except IdsfsError as exc2:
                        log.error("logging in to ICAT again failed: %s",
                                  _describe_error(exc2))
        return self.ids.sessionId != before

    async def _login_again(self) -> None:
        """Log in with the configured credentials (in a worker thread); note the new lifetime.

        Raises the client's :class:`~idsfs.errors.IdsfsError` when the login fails.
        """
        cfg = self.config
        icat = self.icat
        assert icat is not None and cfg.user is not None and cfg.password is not None
        password = cfg.password

        def login() -> SessionInfo:
            icat.login(cfg.auth, {"username": cfg.user, "password": password.reveal()})
            return icat.session_info()

        info = await self.bridge.run(login, name="ICAT login")
        # the daemon's own state changes here, on the trio thread
        self.lifetime = info.remainingMinutes * 60.0
        self._note_session(info.userName, self.lifetime)

    # -------------------------------------------------------------- teardown

    def unmount(self) -> None:
        """``pyfuse3.close(unmount=True)`` if mounted (idempotent, never raises)."""
        import pyfuse3

        if not self.mounted:
            return
        self.mounted = False
        try:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", self.config.mountpoint)
        except (RuntimeError, OSError) as exc:
            log.error("unmounting %s failed: %s", self.config.mountpoint, exc)

    def close(self) -> None:
        """Unmount, log out (when the daemon logged in; bounded) and close the clients.

        Never raises.
        """
        self.unmount()
        icat, ids = self.icat, self.ids
        if icat is not None and self.owns_session:
            done = threading.Event()

            def logout() -> None:
                try:
                    icat.logout()
                    log.info("logged out of ICAT")
                except IdsfsError as exc:
                    log.debug("logout failed: %s", exc)
                finally:
                    done.set()

            threading.Thread(target=logout, name="idsfs logout", daemon=True).start()
            if not done.wait(LOGOUT_TIMEOUT):
                log.info("logout did not finish within %gs; leaving the session to expire",
                         LOGOUT_TIMEOUT)
        for client in (ids, icat):
            if client is not None:
                try:
                    client.close()
                except Exception as exc:  # noqa: BLE001 - closing pools; the process ends
                    log.debug("closing %s: %s", type(client).__name__, exc)

    def finish(self, status: int) -> None:
        """Last words: remove the control socket, tell waiting clients the exit status.

        Call after :meth:`close`, just before the process exits (never raises).
        """
        if self.control is not None:
            self.control.close()
            self.control = None
        left = self.pending_work()
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.send({"event": "exit", "status": status, "pending": left})
            waiter.close()


# ----------------------------------------------------------------------------- unmounting


_MNT_DETACH = 2


def detach_mount(path: str, lazy: bool) -> tuple[bool, bool, str]:
    """Unmount ``path`` (``umount2`` as root, else ``fusermount3 -u``); ``-z`` when ``lazy``.

    Returns ``(done, busy, message)``: ``busy`` when a plain unmount was
    refused because the mount is in use. Never raises.
    """
    import ctypes
    import shutil
    import subprocess

    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(path), _MNT_DETACH if lazy else 0) == 0:
            return True, False, ""
        err = ctypes.get_errno()
        return False, err == errno.EBUSY, f"unmounting {path} failed: {os.strerror(err)}"
    tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    try:
        done = subprocess.run([tool, "-u", *(["-z"] if lazy else []), "--", path],
                              capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, False, f"unmounting {path} failed: {exc}"
    if done.returncode == 0:
        return True, False, ""
    text = (done.stderr or done.stdout).strip()
    return False, "busy" in text.lower(), f"unmounting {path} failed: {text}"


# ----------------------------------------------------------------------------- entry point


def check_mountpoint(path: Path) -> None:
    """Raise :class:`StartupError` unless ``path`` is a directory one can mount on."""
    entry = find_mount(path)
    if entry is not None and entry.is_fuse:
        state = probe_mount(path, timeout=3.0)
        if state not in (None, errno.ENOTCONN, errno.ECONNABORTED):
            # it answers, if only with an error (e.g. EACCES: its session expired)
            answer = f", answering {os.strerror(state)}" if state else ""
            raise StartupError(f"{path} is already mounted ({entry.fstype} {entry.source}"
                               f"{answer}); unmount it first: idsfs umount {path}")
        raise StartupError(f"{path} is a stale mount ({entry.fstype}, its daemon is gone or "
                           f"hung); clear it with: idsfs umount {path}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StartupError(f"mount point {path} does not exist") from None
    except OSError as exc:
        raise StartupError(f"mount point {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"mount point {path} is not a directory")


def _redirect_stdio() -> None:
    """Point fds 0, 1 and 2 at /dev/null (background child, once ready)."""
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def _interrupt(signum: int, frame: object) -> None:
    """Signal handler during start-up: interrupt like Ctrl-C does."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run(config: Config, ready_fd: int | None, background: bool,
         when_ready: Callable[[], None] | None = None) -> int:
    """Connect, mount, serve until stopped; the whole life of one daemon. Returns the status."""
    import trio

    daemon = Daemon(config)
    logs = _LogSetup(config, daemon.secrets, background)

    def on_ready() -> None:
        if when_ready is not None:
            when_ready()
        if background:
            os.chdir("/")
            logs.detach_terminal()
            _redirect_stdio()

    reporter = _Reporter(ready_fd, on_ready)
    for note in config.notes:
        log.warning("config: %s", note)
    if config.config_files:
        log.debug("config files: %s%s", ", ".join(str(p) for p in config.config_files),
                  f" (section [{config.config_section}])" if config.config_section else "")
    # Until trio watches the signals, SIGINT/SIGTERM/SIGHUP interrupt start-up
    # through KeyboardInterrupt, so that the finally below still unmounts.
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _interrupt) for sig in stop_signals}
    status = 1
    try:
        try:
            sd_notify("STATUS=connecting")
            daemon.connect()
            daemon.build()
            daemon.mount()
        except StartupError as exc:
            message = redact(str(exc), daemon.secrets())
            if ready_fd is None:
                print(f"idsfs mount: {message}", file=sys.stderr)
                log.debug("start-up failed", exc_info=True)
            else:
                log.debug("start-up failed: %s", message, exc_info=True)
            reporter.failed(message)
            return 1
        try:
            trio.run(daemon.serve, reporter)
        except BaseException as exc:  # e.g. KeyboardInterrupt before the signal watcher ran
            daemon.fatal = daemon.fatal or exc
            log.error("the daemon stopped: %s", exc, exc_info=not isinstance(
                exc, KeyboardInterrupt))
        status = 1 if daemon.fatal is not None else 0
        return status
    finally:
        # The cleanup is short and bounded: let no signal cut it (and leave a mount).
        for sig in stop_signals:
            signal.signal(sig, signal.SIG_IGN)
        try:
            daemon.close()
            reporter.failed("the daemon stopped during start-up")
            daemon.finish(status)
            logs.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def mount(config: Config, *, when_ready: Callable[[], None] | None = None) -> int:
    """Mount as ``config`` says; see the module docstring. Returns the exit status.

    Foreground: returns after the unmount; ``when_ready()`` is called (in a
    worker thread, while the mount already serves) once the mount answers.
    Background: returns in the parent
    once the child's mount answers (0) or failed (1, the reason printed on
    stderr); the child never returns (it ends with ``os._exit``).

    Start-up failures are reported (stderr, the parent's pipe) and give status 1 or
    2. Raises ``OSError`` when the pipe or the fork fails or (foreground) the log
    file cannot be opened, and ``KeyboardInterrupt`` for a signal during a
    foreground start-up (after cleaning up) or while the parent waits.
    """
    try:
        check_mountpoint(config.mountpoint)
    except StartupError as exc:
        print(f"idsfs mount: {exc}", file=sys.stderr)
        return 2
    if config.foreground:
        return _run(config, None, background=False, when_ready=when_ready)

    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        status = 1
        try:
            os.close(read_fd)
            os.setsid()
            status = _run(config, write_fd, background=True)
        except KeyboardInterrupt:  # a signal during start-up; the parent says so
            status = 1
        except BaseException:  # never return into the caller's code in the child
            with contextlib.suppress(Exception):
                log.exception("the daemon failed")
        finally:
            os._exit(status)
    os.close(write_fd)
    return _wait_for_child(pid, read_fd, config.mountpoint)


def _wait_for_child(pid: int, read_fd: int, mountpoint: Path) -> int:
    """Parent side of a background mount: wait for READY or an error from the child."""
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        for chunk in iter(lambda: pipe.read(4096), b""):
            chunks.append(chunk)
    text = b"".join(chunks).decode("utf-8", "replace").strip()
    if text.startswith("READY"):
        return 0
    status: int | None = None
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
            break
        time.sleep(0.02)
    if text.startswith("ERROR "):
        print(f"idsfs mount: {text[6:]}", file=sys.stderr)
    else:
        how = f"status {status}" if status is not None else "no status"
        print(f"idsfs mount: the daemon for {mountpoint} exited during start-up ({how})",
              file=sys.stderr)
    return 1

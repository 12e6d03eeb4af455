"""Writes through the mount: spool files on local disk, ``put`` on close, pending uploads.

A file created (or, with the replace option, re-opened for writing) through the
mount is an :class:`Upload`: its bytes live in a *spool file* on local disk
until IDS has them. :class:`Uploader` creates uploads, sends them with
:meth:`idsfs.ids.IDSClient.put`, retries the ones that failed, and finds them
again after a restart. ``fs.py`` decides *when* to upload (see
docs/semantics.md, "Writing"); this module does the uploading.

The spool directory
-------------------
One directory per mount (``--spool-dir``; :func:`default_spool_dir`), mode
0700, locked with ``flock`` on its ``.lock`` file by the one daemon using it.
Each upload is two files named by a random id:

* ``<id>.data``: the bytes, written in place by ``write`` (random writes,
  truncation and reading back work as on any local file);
* ``<id>.json``: what is needed to finish the upload without the daemon's
  memory (dataset id, ICAT name, datafile format id, create/modification times
  in epoch ms, size, CRC32 once known, state, last error, attempts, the
  replace bookkeeping below, and the ICAT URL and user it belongs to). Always
  written to a temporary file and renamed over the old one, so a crash leaves
  the old or the new version, never a torn one. Before each step whose outcome
  a crash must not lose (a ``put``, a deletion, a rename of the replace steps)
  the record is also ``fsync``-ed; other changes (the state shown to users) are
  not. Saves of one record are serialised (:meth:`Uploader.save`): each writes
  the state as it is when its turn comes, so the newest state is the one that
  stays on disk, and a save that finds a newer one already written is skipped.

Both are deleted once the datafile is in IDS (and no file handle is open).

States
------
``writing``
    open for writing through the mount (some file handle open, not uploaded
    since the last change).
``uploading``
    an attempt is running. Found so at start-up (the daemon died during an
    attempt): treated as ``pending`` whose last attempt may have landed.
``pending``
    the last attempt failed in a way that retrying can cure (server error,
    dropped connection, checksum mismatch, expired session, archived data,
    lock); retried in the background with exponential back-off
    (``retry_delay``, doubling up to ``max_retry_delay``).
``failed``
    retrying cannot help: the file's write failed (e.g. ``ENOSPC`` on the
    spool), the daemon stopped while the file was still open for writing (its
    content is whatever the program had written), the IDS refused the request
    as bad (400) or the dataset is gone (404). Kept, listed, never uploaded by
    itself; delete it (``rm``) or write it again (open with ``O_TRUNC``).
``conflict``
    a *different* datafile of the same name exists in the dataset (someone
    else's, or a replace found the name taken). Kept and listed; nothing is
    overwritten.
``done``
    the datafile is in IDS (``datafile_id``); the spool goes when the last
    handle is closed.

No upload is ever lost and none leaves a half-registered datafile
----------------------------------------------------------------------
* A ``put`` is run through the :class:`~idsfs.aio.ThreadBridge` with
  ``abandon_on_cancel=False``: its outcome is always known to this module.
* Before each attempt the record is saved with ``maybe_landed`` set. After a
  failure whose outcome is ambiguous (the connection broke, the answer was
  unusable, a 500 that may mean "the name exists"), ICAT is asked whether a
  datafile of that name exists in the dataset: with the same size and CRC32 it
  is ours and the upload is done (no second ``put``); with different content it
  is a ``conflict``; without one the attempt did not land. A retry after a
  restart asks the same question first.
* A ``put`` whose answer carries another CRC32 than the bytes sent (the server
  stored something else) registered a wrong datafile: its id (from the answer)
  is deleted through IDS before the next attempt (``cleanup_ids`` in the record,
  so this also survives a crash).

Replacing a datafile
--------------------
With the replace option an existing datafile can be written again. The new
bytes are uploaded under a temporary name (``.idsfs-replace-<id>`` in the
dataset), then the old datafile is deleted through IDS, then the new one is
renamed to the real name in ICAT. Each step is saved in the record before the
next one starts, so after a crash the upload resumes where it stopped. At every
point the newest complete copy exists: before the ``put`` the old datafile is
untouched; between ``put`` and delete both exist; between delete and rename the
new bytes exist under the temporary name (shown as such in the dataset). If the
real name has been taken by someone else meanwhile, the upload becomes a
``conflict`` and keeps the temporary name. The same steps replace this mount's
own earlier upload of a file that was written again before its last close.

Live uploads
------------
A file written sequentially from offset 0 starts its ``put`` while it is being
written, once ``live_threshold`` bytes are in the spool (at most ``max_live``
at once): the request body follows the writer through the spool file, and the
``close`` only waits for the rest. A write anywhere else, a truncation, a
writer pausing for more than ``live_stall`` seconds or an error aborts the live
request before its end (IDS then stores nothing, because the body is
incomplete) and the file is uploaded whole at ``close``.

Errors: :meth:`Uploader.commit` raises :class:`~idsfs.errors.UploadFailedError`
(``EIO``; the upload stays as ``pending``/``failed``/``conflict``); spool I/O
raises :class:`~idsfs.errors.SpoolError` (its errno); a missing datafile format
raises :class:`~idsfs.errors.MissingTypeError` (``ENOTSUP``).

Thread safety: an :class:`Uploader` belongs to one trio run and is used from
the trio thread; every blocking call goes through the
:class:`~idsfs.aio.ThreadBridge`: ``put``, ``delete`` and ICAT queries, and
also every system call on spool files and records (``open``, ``pwrite``,
``pread``, ``ftruncate``, ``fsync``, ``close``, ``unlink``, the record's
write and rename, the CRC32 of a whole spool file), so that a full or slow disk
(dirty-page throttling) stalls only the request that waits for it, never the
FUSE thread. The state an upload keeps in memory (size, generation, CRC32,
live upload, write error, state) is changed only on the trio thread, after the
blocking part returned or failed. Writes and truncations of one upload are
serialised by its ``lock`` (trio's locks are fair: first come, first served),
so concurrent writes are applied in the order they arrived; the spool's file
descriptor is closed only when no call is using it.

Write-behind: while :meth:`Uploader.run` runs, a ``write`` is accepted at once
(size and times change) and queued; one drain task per busy upload writes the
queued bytes in a worker thread, in order, several requests per thread call,
at most ``_WRITE_BEHIND`` bytes behind (a writer waits beyond that). Reads,
truncations, ``fsync``, CRC32 and uploads wait for the queue first. A failed
``pwrite`` marks the upload as failed to write and its error (``ENOSPC``...)
is raised by the next ``write``, ``fsync`` and the close. This keeps the FUSE
request from waiting for a thread hand-off and the disk, which on a busy
machine cost more than the copy itself. The one exception is
:meth:`Uploader.open_spool`, which reads the spool directory once at start-up,
before the file system serves any request.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from idsfs._crc import crc32
from idsfs.aio import ThreadBridge
from idsfs.errors import (
    DataBusyError,
    ICATError,
    IDSBadRequestError,
    IDSDataNotOnlineError,
    IDSError,
    IdsfsError,
    IDSInsufficientPrivilegesError,
    IDSNotFoundError,
    IDSNotImplementedError,
    IDSResponseError,
    MissingTypeError,
    ServerError,
    SpoolError,
    TransportError,
    UploadFailedError,
)
from idsfs.icat import ICATClient, quote
from idsfs.ids import DataSelection, FileChunk, IDSClient

__all__ = [
    "DEFAULT_DATAFILE_FORMAT",
    "DEFAULT_MAX_RETRY_DELAY",
    "DEFAULT_RETRY_DELAY",
    "DEFAULT_UPLOAD_WAIT",
    "STATES",
    "Upload",
    "Uploader",
    "UploaderStats",
    "default_spool_dir",
    "delete_datafile",
    "icat_date",
    "parse_format",
]

log = logging.getLogger("idsfs.upload")

#: the datafile format of new datafiles unless ``--datafile-format`` says otherwise
DEFAULT_DATAFILE_FORMAT = "binary"
#: first delay before retrying a failed upload, seconds (doubles per attempt)
DEFAULT_RETRY_DELAY = 5.0
#: longest delay between retries, seconds
DEFAULT_MAX_RETRY_DELAY = 600.0
#: how long an unmount waits for pending uploads, seconds
DEFAULT_UPLOAD_WAIT = 60.0
#: bytes a sequentially written file needs before its live upload starts
DEFAULT_LIVE_THRESHOLD = 4 << 20
#: live uploads at once
DEFAULT_MAX_LIVE = 2
#: seconds a live upload waits for the writer before giving up (upload at close)
DEFAULT_LIVE_STALL = 10.0
#: block size for reading the spool (put bodies, CRC32)
_BLOCK = 1 << 20
#: bytes of written data a live upload may hold in memory (beyond, it reads the spool)
_LIVE_MEMORY = 64 << 20
#: bytes written through the mount that may wait for their spool ``pwrite`` (write-behind)
_WRITE_BEHIND = 8 << 20
#: how often an ambiguous outcome is checked in ICAT before giving up for now
_RESOLVE_TRIES = 2

WRITING = "writing"
UPLOADING = "uploading"
PENDING = "pending"
FAILED = "failed"
CONFLICT = "conflict"
DONE = "done"
#: every state an upload can be in
STATES: tuple[str, ...] = (WRITING, UPLOADING, PENDING, FAILED, CONFLICT, DONE)
#: the states held until the user acts (never retried by themselves)
_HELD = (FAILED, CONFLICT)

_RECORD_VERSION = 1
_TEMP_PREFIX = ".idsfs-replace-"
_UID_RE = re.compile(r"^[0-9a-f]{32}$")


def parse_format(text: str) -> tuple[str, str | None]:
    """Split ``NAME[:VERSION]`` into ``(name, version or None)``.

    Raises ``ValueError`` for an empty name or version.
    """
    name, sep, version = str(text).strip().partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"a datafile format needs a name: {text!r}")
    if sep:
        version = version.strip()
        if not version:
            raise ValueError(f"empty version after ':' in {text!r}")
        return name, version
    return name, None


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural sort key of a version string (``4.10`` after ``4.9``)."""
    parts = re.findall(r"\d+|[^\W\d_]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def default_spool_dir(icat_url: str | None, user: str | None, mountpoint: str | os.PathLike[str],
                      *, uid: int | None = None,
                      environ: Mapping[str, str] | None = None) -> Path:
    """The spool directory of a mount when ``--spool-dir`` is not given.

    ``/var/cache/idsfs/spool/<mount id>`` for root, else
    ``$XDG_CACHE_HOME/idsfs/spool/<mount id>`` (``~/.cache`` when unset). The
    mount id is ``<ICAT host>-<user>-<hash>``, the hash taken over the ICAT
    URL, the user and the absolute mount point: the same mount finds its
    pending uploads again after a restart, and two mounts never share a spool.
    Nothing is created. Raises ``OSError`` only when ``mountpoint`` is relative
    and the current directory is gone.
    """
    env = os.environ if environ is None else environ
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        base = Path("/var/cache/idsfs")
    else:
        xdg = env.get("XDG_CACHE_HOME", "").strip()
        base = (Path(xdg) if xdg and os.path.isabs(xdg)
                else Path(env.get("HOME") or os.path.expanduser("~")) / ".cache") / "idsfs"
    host = urlsplit(icat_url or "").hostname or "icat"
    who = user or "session"
    digest = hashlib.sha256(
        "\0".join((icat_url or "", who, os.path.abspath(mountpoint))).encode("utf-8",
                                                                             "surrogatepass")
    ).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{host}-{who}")[:80]
    return base / "spool" / f"{safe}-{digest}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _describe(exc: BaseException) -> str:
    """A one-line reason for an upload failure (no secrets: the clients redact)."""
    if isinstance(exc, ServerError):
        kind = exc.type or type(exc).__name__
        return f"{kind}: {exc.message}" if exc.message else kind
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, IdsfsError) else text


class _Fail(Exception):
    """An attempt failed; ``state`` is what the upload becomes (internal signal)."""

    def __init__(self, state: str, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason


class _LiveAborted(Exception):
    """Raised inside a live upload's body to end the request before its end."""


# ----------------------------------------------------------------------------- live uploads


class _LiveStream:
    """The body of a ``put`` that follows a file while it is being written.

    The trio thread reports progress (:meth:`advance`, with the bytes just
    written), the end (:meth:`finish`) or gives up (:meth:`abort`); the worker
    thread running the ``put`` iterates :meth:`body`, which waits for bytes to
    be written. The bytes handed over (up to :data:`_LIVE_MEMORY` of them)
    give the CRC32 without reading the spool file back, and go out as
    :class:`~idsfs.ids.FileChunk` items: on plain HTTP the kernel sends them
    from the spool file with ``sendfile`` (no copy through Python); the rest
    is read back from the spool file.
    """

    def __init__(self, path: Path, stall: float) -> None:
        self.path = path
        self.stall = stall
        self.cond = threading.Condition()
        self.available = 0
        self.final: int | None = None
        self.aborted = False
        self.why = ""
        self.sent = 0
        self.done = trio.Event()
        self.result: int | None = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self._held: deque[tuple[int, bytes]] = deque()
        self._held_bytes = 0

    # trio side
    def advance(self, end: int, data: bytes | None = None) -> None:
        """``end`` bytes are in the spool now; ``data`` are the last ones written."""
        with self.cond:
            if end > self.available:
                if data is not None and len(data) == end - self.available \
                        and self._held_bytes + len(data) <= _LIVE_MEMORY:
                    self._held.append((self.available, data))
                    self._held_bytes += len(data)
                self.available = end
                self.cond.notify_all()

    def abort(self, why: str) -> None:
        with self.cond:
            if not self.aborted and self.final is None:
                self.aborted = True
                self.why = why
            self.cond.notify_all()

    def finish(self, size: int) -> bool:
        """Tell the body its final size; False if the stream cannot deliver it."""
        with self.cond:
            if self.aborted or self.available != size:
                return False
            self.final = size
            self.cond.notify_all()
            return True

    # worker side
    def body(self) -> Iterator[memoryview | FileChunk]:
        spool = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed below
        fd = spool.fileno()
        try:
            buf = bytearray(_BLOCK)
            view = memoryview(buf)
            while True:
                held: bytes | None = None
                with self.cond:
                    while True:
                        if self.aborted:
                            raise _LiveAborted(self.why)
                        if self.available > self.sent:
                            upto = self.available
                            break
                        if self.final is not None and self.sent >= self.final:
                            return
                        if not self.cond.wait(self.stall):
                            self.aborted = True
                            self.why = f"the writer paused for more than {self.stall:g} s"
                            raise _LiveAborted(self.why)
                    while self._held and self._held[0][0] < self.sent:
                        self._held_bytes -= len(self._held.popleft()[1])
                    if self._held and self._held[0][0] == self.sent:
                        held = self._held.popleft()[1]
                        self._held_bytes -= len(held)
                    elif self._held:
                        upto = min(upto, self._held[0][0])
                if held is not None:  # what was just written: CRC32 from memory
                    chunk = FileChunk(held, spool, self.sent)
                    self.sent += len(held)
                    yield chunk
                    continue
                want = min(len(view), upto - self.sent)
                n = os.preadv(fd, [view[:want]], self.sent)
                if n <= 0:
                    raise _LiveAborted("the spool file is shorter than written")
                self.sent += n
                yield view[:n]
        finally:
            spool.close()


# ----------------------------------------------------------------------------- blocking halves
# Run in worker threads through the bridge; they touch no shared state.


def _open_spool_file(path: Path, display: str, create: bool = False) -> int:
    """Open (``create``: make, exclusively) a spool file for reading and writing."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        what = "create a spool file for" if create else "open the spool file of"
        raise SpoolError(f"cannot {what} {display}: {exc.strerror or exc}", exc.errno) from exc


def _pwrite_all(fd: int, offset: int, data: bytes | memoryview) -> tuple[int, OSError | None]:
    """Write all of ``data`` at ``offset``: (bytes written, the error that stopped it)."""
    view = memoryview(data)
    done = 0
    try:
        while done < len(view):
            n = os.pwrite(fd, view[done:] if done else view, offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n
    except OSError as exc:
        return done, exc
    return done, None


async def _nothing() -> None:
    return None


def _save_now(up: Upload) -> None:
    """Blocking save of a record at start-up, logging instead of raising."""
    try:
        up.save()
    except SpoolError as exc:
        log.warning("%s (the upload goes on from memory)", exc)


def _pwrite_crc(fd: int, offset: int, data: bytes | memoryview, crc: tuple[int, int] | None
                ) -> tuple[int, OSError | None, tuple[int, int] | None]:
    """:func:`_pwrite_all` that also carries the running CRC32 (see :func:`_pwrite_batch`)."""
    done, exc = _pwrite_all(fd, offset, data)
    if exc is not None or crc is None or offset != crc[1]:
        return done, exc, None
    return done, None, (crc32(data, crc[0]), crc[1] + done)


def _pwrite_batch(fd: int, items: list[tuple[int, bytes | memoryview]],
                  crc: tuple[int, int] | None = None
                  ) -> tuple[int, OSError | None, int, tuple[int, int] | None]:
    """Write queued ``(offset, data)`` items in order: (items written, the error that
    stopped the next one, the spool file's size after the error, the running CRC32).

    ``crc`` is ``(CRC32, end)`` of the spool's bytes before ``end`` (see
    :attr:`Upload.seq_crc`): it is carried over each item written at ``end``;
    the result is None from the first item written anywhere else.
    """
    for i, (offset, data) in enumerate(items):
        done, exc = _pwrite_all(fd, offset, data)
        if exc is not None:
            try:
                size = os.fstat(fd).st_size
            except OSError:
                size = offset + done
            return i, exc, size, None
        if crc is not None:
            crc = (crc32(data, crc[0]), crc[1] + done) if offset == crc[1] else None
    return len(items), None, 0, crc


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _lock_spool_dir(spool: Path) -> int:
    """Make (0700) and lock the spool directory; its lock file's descriptor.

    Raises SpoolError (``EBUSY`` when another daemon holds it).
    """
    try:
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(spool, 0o700)
        fd = os.open(spool / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SpoolError(f"cannot use the spool directory {spool}: {exc.strerror or exc}",
                         exc.errno) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise SpoolError(f"the spool directory {spool} is used by another idsfs daemon "
                         f"(give this mount its own --spool-dir)", errno.EBUSY) from exc
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


# ----------------------------------------------------------------------------- one upload


class Upload:
    """One file written through the mount: its spool file and its record.

    Attributes (saved in the record): ``uid``, ``dataset_id``, ``name`` (the
    ICAT name to create), ``display`` (the path below the mount point, for
    messages), ``format_id``, ``create_ms``/``mod_ms`` (epoch ms), ``size``,
    ``crc`` (CRC32 once computed, else None), ``state``, ``reason``,
    ``attempts``, ``datafile_id`` (the datafile created, also the temporary one
    of a replace), ``replace_id`` (datafile to delete once the new one is
    stored), ``temp_name`` (set while the new datafile carries the temporary
    name), ``maybe_landed``, ``cleanup_ids``.

    In memory only: ``handles`` (open FUSE file handles), ``writers`` (of them,
    opened for writing), ``generation`` (counts writes and truncations),
    ``uploaded_generation`` (the generation the stored datafile has),
    ``cancelled`` (unlinked), ``lock`` (held during an attempt and by writes
    and truncations), ``record_lock`` (held while the record is written).

    Constructing one never raises (no file is touched).
    """

    def __init__(self, spool: Path, uid: str, *, dataset_id: int, name: str, display: str,
                 format_id: int | None, owner: str) -> None:
        self.spool = spool
        self.uid = uid
        self.dataset_id = dataset_id
        self.name = name
        self.display = display
        self.format_id = format_id
        self.owner = owner
        self.create_ms: int = _now_ms()
        self.mod_ms: int = self.create_ms
        self.size = 0
        self.crc: int | None = None
        self.state = WRITING
        self.reason = ""
        self.attempts = 0
        self.datafile_id: int | None = None
        self.replace_id: int | None = None
        self.temp_name: str | None = None
        self.maybe_landed = False
        self.cleanup_ids: list[int] = []
        self.created = time.time()
        # memory only
        self.fd: int | None = None
        self.handles = 0
        self.writers = 0
        self.generation = 0
        self.uploaded_generation: int | None = None
        self.cancelled = False
        self.write_error: str | None = None
        self.lock = trio.Lock()
        self.next_attempt = 0.0
        self.live: _LiveStream | None = None
        self.live_possible = True
        #: written only by appends from offset 0 so far (a live upload can follow it)
        self.sequential = True
        #: the ``datafileModTime`` the last put sent (None: none sent, as by a live
        #: put, or not known); set in ICAT after the put when ``mod_ms`` differs
        self.sent_mod_ms: int | None = None
        #: datafiles this upload replaced (deleted) since the tree last looked
        self.replaced_ids: list[int] = []
        self.in_progress = False
        self.started_at: float | None = None
        #: serialises the saves of the record (see Uploader.save)
        self.record_lock = trio.Lock()
        self.saves_asked = 0
        self.saves_done = 0
        #: the files were deleted: no save may write the record again
        self.removed = False
        #: calls using ``fd`` right now (it is closed only when none is)
        self.fd_users = 0
        #: write-behind: writes accepted but not in the spool file yet (offset, bytes)
        self.queue: deque[tuple[int, bytes | memoryview]] = deque()
        self.queued_bytes = 0
        #: writes queued and writes done with (written or failed) since the start
        self.queued_count = 0
        self.settled_count = 0
        self.draining = False
        #: set (and replaced) each time the drain task wrote a batch or stopped
        self.drain_progress = trio.Event()
        self.write_errno: int | None = None
        self._stale_fds: list[int] = []
        #: CRC32 of the spool's bytes before ``seq_end``, carried along while the file
        #: is only appended to (computed by the spool writes; None once it is not)
        self.seq_crc: int | None = 0
        self.seq_end = 0
        #: changes each time ``seq_crc`` is given up or restarted (a running spool
        #: write's result then no longer applies)
        self.seq_epoch = 0

    # ------------------------------------------------------------------ paths

    @property
    def data_path(self) -> Path:
        """The spool file holding the bytes. Never raises."""
        return self.spool / f"{self.uid}.data"

    @property
    def meta_path(self) -> Path:
        """The record (JSON). Never raises."""
        return self.spool / f"{self.uid}.json"

    @property
    def landed(self) -> bool:
        """True once a datafile with the current content is in IDS under its real name.

        Never raises.
        """
        return (self.datafile_id is not None and self.temp_name is None
                and self.replace_id is None and self.uploaded_generation == self.generation)

    @property
    def dirty(self) -> bool:
        """True when the spool holds something IDS does not have yet. Never raises."""
        return not self.landed

    def describe_state(self) -> str:
        """``state`` plus the reason, as shown by ``user.idsfs.upload`` and ``idsfs status``.

        Never raises.
        """
        if self.state in (PENDING, FAILED, CONFLICT) and self.reason:
            return f"{self.state}: {self.reason}"
        if self.state == DONE:
            return f"stored: datafile {self.datafile_id}"
        return self.state

    def line(self) -> str:
        """One line for ``idsfs status`` and the unmount report. Never raises."""
        extra = f", attempt {self.attempts}" if self.attempts else ""
        return f"{self.display} ({_size(self.size)}{extra}): {self.describe_state()}"

    # ------------------------------------------------------------------ record

    def to_json(self) -> dict[str, Any]:
        """The record as saved in ``<uid>.json``. Never raises."""
        return {
            "version": _RECORD_VERSION, "uid": self.uid, "owner": self.owner,
            "dataset_id": self.dataset_id, "name": self.name, "display": self.display,
            "format_id": self.format_id, "create_ms": self.create_ms, "mod_ms": self.mod_ms,
            "size": self.size, "crc": self.crc, "state": self.state, "reason": self.reason,
            "attempts": self.attempts, "datafile_id": self.datafile_id,
            "replace_id": self.replace_id, "temp_name": self.temp_name,
            "maybe_landed": self.maybe_landed, "cleanup_ids": list(self.cleanup_ids),
            "created": self.created,
        }

    @classmethod
    def from_json(cls, spool: Path, doc: Mapping[str, Any]) -> Upload:
        """Rebuild an upload from its record.

        Raises ``ValueError`` (unknown version or state, bad upload id or
        number), ``KeyError`` (a required field missing) or ``TypeError`` (a
        field of the wrong type) for a bad record; ``AttributeError`` when
        ``doc`` is not a mapping.
        """
        if doc.get("version") != _RECORD_VERSION:
            raise ValueError(f"unknown record version {doc.get('version')!r}")
        uid = str(doc["uid"])
        if not _UID_RE.match(uid):
            raise ValueError(f"bad upload id {uid!r}")
        up = cls(spool, uid, dataset_id=int(doc["dataset_id"]), name=str(doc["name"]),
                 display=str(doc.get("display") or doc["name"]),
                 format_id=None if doc.get("format_id") is None else int(doc["format_id"]),
                 owner=str(doc.get("owner", "")))
        up.create_ms = int(doc.get("create_ms") or up.create_ms)
        up.mod_ms = int(doc.get("mod_ms") or up.mod_ms)
        up.size = int(doc.get("size") or 0)
        up.crc = None if doc.get("crc") is None else int(doc["crc"])
        up.state = str(doc.get("state", PENDING))
        if up.state not in STATES:
            raise ValueError(f"unknown state {up.state!r}")
        up.reason = str(doc.get("reason") or "")
        up.attempts = int(doc.get("attempts") or 0)
        up.datafile_id = None if doc.get("datafile_id") is None else int(doc["datafile_id"])
        up.replace_id = None if doc.get("replace_id") is None else int(doc["replace_id"])
        up.temp_name = None if doc.get("temp_name") is None else str(doc["temp_name"])
        up.maybe_landed = bool(doc.get("maybe_landed"))
        up.cleanup_ids = [int(i) for i in doc.get("cleanup_ids") or []]
        up.created = float(doc.get("created") or time.time())
        if up.datafile_id is not None:
            up.uploaded_generation = 0  # what is stored is the spool as it is
        up.drop_seq_crc()  # not computed in this run: the bytes are read again for it
        return up

    def record_text(self) -> str:
        """The record as JSON text (take it on the trio thread; write it anywhere).

        Never raises.
        """
        return json.dumps(self.to_json(), ensure_ascii=False, indent=1)

    def save(self, durable: bool = False) -> None:
        """Write the record atomically, blocking (start-up and tests; the daemon uses
        :meth:`Uploader.save`). Raises :class:`~idsfs.errors.SpoolError`."""
        self.write_record(self.record_text(), durable)

    def write_record(self, text: str, durable: bool) -> None:
        """Blocking: write ``text`` as the record (temporary file, rename; ``fsync``
        when ``durable``). Raises :class:`~idsfs.errors.SpoolError`."""
        tmp = self.spool / f".{self.uid}.json.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, text.encode("utf-8", "surrogatepass"))
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.meta_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise SpoolError(f"cannot save the upload record of {self.display}: "
                             f"{exc.strerror or exc}", exc.errno) from exc

    # ------------------------------------------------------------------ the bytes
    # The blocking halves run in worker threads (Uploader.write/read/truncate);
    # the ``note_*`` halves change the state on the trio thread afterwards.

    def close_fd(self) -> None:
        """Blocking: close the spool file descriptor now (start-up and shutdown only;
        the daemon detaches it with :meth:`detach_fd` and closes it in a thread).

        Never raises (a failing ``close`` is ignored).
        """
        for fd in self.detach_fd():
            with contextlib.suppress(OSError):
                os.close(fd)

    def detach_fd(self) -> list[int]:
        """Take the spool file descriptors that nobody uses any more (to be closed).

        A descriptor a running call still uses is closed by the last user
        (see :meth:`Uploader._spool_fd`). Never raises.
        """
        if self.fd is not None:
            self._stale_fds.append(self.fd)
            self.fd = None
        if self.fd_users:
            return []
        fds, self._stale_fds = self._stale_fds, []
        return fds

    def note_written(self, offset: int, done: int, data: bytes | memoryview,
                     *, spooled: bool = True) -> None:
        """Trio side of a write of ``done`` bytes at ``offset``: in the spool file
        (``spooled``) or accepted for it (write-behind; :meth:`note_spooled` follows).

        Never raises (a live upload the write cannot continue is aborted).
        """
        end = offset + done
        appended = offset == self.size
        if not appended:
            self.sequential = False
            self.drop_seq_crc()
            if self.live is not None:
                self.live.abort("the file was not written sequentially")
        if spooled:
            self.note_spooled(offset, done, data)
        self.generation += 1
        self.crc = None
        if end > self.size:
            self.size = end
        self.mod_ms = _now_ms()

    def note_spooled(self, offset: int, done: int, data: bytes | memoryview) -> None:
        """Trio side: ``done`` bytes at ``offset`` are in the spool file now (a live
        upload may send them). Never raises."""
        live = self.live
        if live is not None:
            if offset == live.available:
                live.advance(offset + done, data if isinstance(data, bytes) and done == len(data)
                             else None)
            else:
                live.abort("the file was not written sequentially")

    def spool_error(self) -> SpoolError:
        """The error of the failed write-behind (to report it to the next write).

        Returns the :class:`~idsfs.errors.SpoolError` (its errno, else ``EIO``)
        for the caller to raise; never raises itself.
        """
        return SpoolError(f"cannot write the spool file of {self.display}: "
                          f"{self.write_error}", self.write_errno or errno.EIO)

    def note_write_failed(self, offset: int, done: int, exc: OSError) -> SpoolError:
        """Trio side of a failed spool write: the upload is marked as failed to write
        (:meth:`fail_writes`). Returns the error to raise."""
        self.size = max(self.size, offset + done)
        self.fail_writes(f"writing the spool failed: {exc.strerror or exc}", exc.errno)
        return SpoolError(f"cannot write the spool file of {self.display}: "
                          f"{exc.strerror or exc}", exc.errno)

    def fail_writes(self, reason: str, code: int | None) -> None:
        """Mark the upload as failed to write: not uploaded until written again from the
        start. Its CRC32s are dropped and a live upload is given up. Never raises."""
        self.generation += 1
        self.crc = None
        self.write_error = reason
        self.write_errno = code
        self.drop_seq_crc()
        if self.live is not None:
            self.live.abort(reason)

    def note_truncated(self, size: int) -> None:
        """Trio side of a successful truncation to ``size``. Never raises."""
        if size != self.size:
            if self.live is not None:
                self.live.abort("the file was truncated")
            self.sequential = size == 0 and self.live is None and self.datafile_id is None
        if size == 0:
            self.write_error = None  # written again from the start
            self.write_errno = None
            self.seq_epoch += 1
            self.seq_crc, self.seq_end = 0, 0
        elif size != self.size:
            self.drop_seq_crc()
        self.size = size
        self.generation += 1
        self.crc = None
        self.mod_ms = _now_ms()

    def drop_seq_crc(self) -> None:
        """Give up the running CRC32 (the spool was changed other than by appending).

        Never raises.
        """
        self.seq_epoch += 1
        self.seq_crc = None

    def seq_crc_state(self) -> tuple[int, int] | None:
        """``(CRC32, end)`` to hand to a spool write, or None. Never raises.

        While a live upload runs it is given up: the live ``put`` computes the
        CRC32 itself, and if it is aborted the file is read again at ``close``.
        """
        if self.live is not None and self.seq_crc is not None:
            self.drop_seq_crc()
        return None if self.seq_crc is None else (self.seq_crc, self.seq_end)

    def note_seq_crc(self, epoch: int, state: tuple[int, int] | None) -> None:
        """Trio side: a spool write started at ``epoch`` carried the CRC32 to ``state``.

        Never raises.
        """
        if epoch != self.seq_epoch or self.seq_crc is None:
            return
        if state is None:
            self.drop_seq_crc()
        else:
            self.seq_crc, self.seq_end = state

    @property
    def spool_crc(self) -> int | None:
        """CRC32 of the whole spool file when the writes carried it to its end, else None.

        Only valid once the writes behind are in the spool file. Never raises.
        """
        if self.seq_crc is not None and self.seq_end == self.size:
            return self.seq_crc & 0xFFFFFFFF
        return None

    def compute_crc(self) -> int:
        """Read the whole spool and return its CRC32 (blocking; run it in a thread).

        Raises ``OSError`` when the spool file cannot be opened or read (the
        caller makes the upload ``failed``).
        """
        crc = 0
        buf = bytearray(_BLOCK)
        view = memoryview(buf)
        with open(self.data_path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                crc = crc32(view[:n], crc)
        return crc & 0xFFFFFFFF

    def remove_files(self) -> None:
        """Blocking: close and delete the spool file and the record (never raises)."""
        self.close_fd()
        self.unlink_files()

    def unlink_files(self) -> None:
        """Blocking: delete the spool file and the record (never raises)."""
        for path in (self.data_path, self.meta_path):
            with contextlib.suppress(FileNotFoundError):
                try:
                    os.unlink(path)
                except OSError as exc:
                    log.warning("cannot remove %s: %s", path, exc.strerror or exc)

    def __repr__(self) -> str:
        return f"<Upload {self.uid[:8]} {self.display!r} {self.state} {self.size}B>"


def _size(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------- stats


@dataclass(frozen=True, slots=True)
class UploaderStats:
    """Counters of an :class:`Uploader` (for ``idsfs status``).

    Attributes:
        spool_dir: the spool directory.
        writing: files open for writing.
        in_progress: lines for uploads being sent now (with their rate).
        pending: lines for uploads waiting to be retried.
        held: lines for uploads held until the user acts (failed, conflict).
        stored: uploads that landed since the mount started.
        bytes_stored: their bytes.
        failures: failed attempts since the mount started.
        live_aborted: live uploads given up (the file was then sent at close).
        spool_bytes: bytes in the spool now.
        left_alone: uploads of another owner found in the spool (not touched).

    Constructing one never raises.
    """

    spool_dir: str
    writing: int
    in_progress: tuple[str, ...]
    pending: tuple[str, ...]
    held: tuple[str, ...]
    stored: int
    bytes_stored: int
    failures: int
    live_aborted: int
    spool_bytes: int
    left_alone: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (lists for tuples). Never raises."""
        return {"spool_dir": self.spool_dir, "writing": self.writing,
                "in_progress": list(self.in_progress), "pending": list(self.pending),
                "held": list(self.held), "stored": self.stored,
                "bytes_stored": self.bytes_stored, "failures": self.failures,
                "live_aborted": self.live_aborted, "spool_bytes": self.spool_bytes,
                "left_alone": self.left_alone}


# ----------------------------------------------------------------------------- the uploader


LandedCallback = Callable[[Upload], Awaitable[None]]


class Uploader:
    """Creates spool files, uploads them with ``put``, retries and resumes them.

    Args:
        ids: the IDS client (its ``sessionId`` may change at any time).
        icat: the ICAT client (format look-ups, the landed check, renames).
        bridge: the thread bridge for every blocking call.
        spool_dir: the spool directory (created 0700 if missing).
        datafile_format: ``NAME[:VERSION]`` of the DatafileFormat new datafiles
            get (default :data:`DEFAULT_DATAFILE_FORMAT`); without a version
            the highest version of that name is taken.
        owner: who the uploads belong to (ICAT URL and user); records of
            another owner found in the spool are left alone.
        retry_delay: first delay before a background retry, seconds.
        max_retry_delay: longest delay between retries.
        online_wait: how long ``commit`` retries a ``put`` refused because the
            dataset is archived or busy (503) before giving up for now.
        renew_session: coroutine called after a 403; True when the IDS
            client's session changed (then the ``put`` is repeated at once).
        live_threshold, max_live, live_stall: see "Live uploads" above
            (``max_live=0`` turns live uploads off).
        clock: monotonic clock (tests).

    Raises:
        ValueError: a bad ``datafile_format`` or negative delays.
    """

    def __init__(
        self,
        ids: IDSClient,
        icat: ICATClient,
        bridge: ThreadBridge,
        spool_dir: str | os.PathLike[str],
        *,
        datafile_format: str = DEFAULT_DATAFILE_FORMAT,
        owner: str = "",
        retry_delay: float = DEFAULT_RETRY_DELAY,
        max_retry_delay: float = DEFAULT_MAX_RETRY_DELAY,
        online_wait: float = 60.0,
        renew_session: Callable[[], Awaitable[bool]] | None = None,
        live_threshold: int = DEFAULT_LIVE_THRESHOLD,
        max_live: int = DEFAULT_MAX_LIVE,
        live_stall: float = DEFAULT_LIVE_STALL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.format_name, self.format_version = parse_format(datafile_format)
        if retry_delay < 0 or max_retry_delay < 0 or online_wait < 0 or live_stall <= 0:
            raise ValueError("delays must not be negative")
        self._ids = ids
        self._icat = icat
        self._bridge = bridge
        self.spool_dir = Path(spool_dir)
        self.owner = owner
        self.retry_delay = retry_delay
        self.max_retry_delay = max(max_retry_delay, retry_delay)
        self.online_wait = online_wait
        self._renew_session = renew_session
        self.live_threshold = live_threshold
        self.max_live = max_live
        self.live_stall = live_stall
        self._clock = clock
        self.uploads: dict[str, Upload] = {}
        self._formats: dict[int, int] = {}
        self._facility_of: dict[int, int] = {}
        self._lock_fd: int | None = None
        self._spool_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._wakeup = trio.Event()
        self._closing = False
        self._live_count = 0
        self._stored = 0
        self._bytes_stored = 0
        self._failures = 0
        self._live_aborted = 0
        self._left_alone = 0  # uploads of another owner found in the spool
        #: called (on the trio thread) when an upload landed: the tree shows the datafile
        self.on_landed: LandedCallback | None = None
        #: called when an upload changed state in the background (the tree refreshes it)
        self.on_changed: Callable[[Upload], None] | None = None

    # ------------------------------------------------------------------ spool directory

    def open_spool(self) -> list[Upload]:
        """Lock the spool directory, if it exists, and load the uploads found in it.

        The directory itself is made (mode 0700) by the first file written, so
        a mount that never writes leaves nothing behind. Records of an upload
        that was being written when the daemon stopped become ``failed`` (their
        content is whatever had been written); those of an attempt in progress
        become ``pending`` with ``maybe_landed``. Unreadable records are renamed
        ``<name>.bad`` and reported. Returns the uploads loaded (none ``done``).

        Blocking: called once at start-up, before the file system serves
        requests (the only spool I/O not run through the bridge).

        Raises:
            SpoolError: the directory cannot be used or is locked by another
                daemon.
        """
        spool = self.spool_dir
        if not spool.is_dir():
            if spool.exists():
                raise SpoolError(f"the spool directory {spool} is not a directory",
                                 errno.ENOTDIR)
            return []
        self._ensure_spool()
        loaded: list[Upload] = []
        for meta in sorted(spool.glob("*.json")):
            try:
                doc = json.loads(meta.read_text(encoding="utf-8"))
                if not isinstance(doc, dict):
                    raise ValueError(f"a JSON {type(doc).__name__}, not an object")
                up = Upload.from_json(spool, doc)
                if meta.name != f"{up.uid}.json":
                    raise ValueError("record name and upload id differ")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("unreadable upload record %s (%s): renamed to %s.bad", meta, exc,
                          meta.name)
                with contextlib.suppress(OSError):
                    os.replace(meta, meta.with_name(meta.name + ".bad"))
                continue
            if self.owner and up.owner and up.owner != self.owner:
                log.warning("upload %s in %s belongs to %s, not to this mount: left alone",
                            up.display, spool, up.owner)
                self._left_alone += 1
                continue
            if not up.data_path.exists():
                log.error("upload %s (%s): its spool file is missing; record renamed to .bad",
                          up.display, up.uid)
                with contextlib.suppress(OSError):
                    os.replace(meta, meta.with_name(meta.name + ".bad"))
                continue
            with contextlib.suppress(OSError):
                up.size = os.stat(up.data_path).st_size
            if up.state == DONE:
                up.remove_files()
                continue
            if up.state == WRITING:
                up.state = FAILED
                up.reason = ("the daemon stopped while the file was open for writing; its "
                             "content may be incomplete")
                _save_now(up)
            elif up.state == UPLOADING:
                up.state = PENDING
                up.maybe_landed = True
                _save_now(up)
            self.uploads[up.uid] = up
            loaded.append(up)
            log.info("found upload %s in the spool: %s", up.display, up.describe_state())
        return loaded

    def _ensure_spool(self) -> None:
        """Blocking: make (0700) and lock the spool directory; raises SpoolError."""
        if self._lock_fd is None:
            self._lock_fd = _lock_spool_dir(self.spool_dir)

    async def _ensure_spool_async(self) -> None:
        """:meth:`_ensure_spool` in a worker thread (the first file written)."""
        if self._lock_fd is not None:
            return
        async with self._spool_lock:
            if self._lock_fd is None:
                self._lock_fd = await self._bridge.run(
                    _lock_spool_dir, self.spool_dir, abandon_on_cancel=False,
                    name="lock spool directory")

    def stop_live(self) -> None:
        """Abort every live upload now (before a shutdown cancels their tasks).

        Never raises.
        """
        self._closing = True
        for up in self.uploads.values():
            self._abort_live(up, "the mount is stopping")

    def close_spool(self) -> None:
        """Blocking: close spool files and release the spool directory lock (tests,
        start-up failures; :meth:`aclose` does it in a worker thread).

        Never raises (a failing ``close`` is ignored).
        """
        _close_fds(self._detach_spool_fds())

    def _detach_spool_fds(self) -> list[int]:
        fds: list[int] = []
        for up in self.uploads.values():
            fds += up.detach_fd()
        if self._lock_fd is not None:
            fds.append(self._lock_fd)
            self._lock_fd = None
        return fds

    async def free_space(self) -> tuple[int, int]:
        """:meth:`spool_free` in a worker thread of the bridge (for ``statfs``). Never raises."""
        return await self._bridge.run(self.spool_free, name="spool statvfs")

    def spool_free(self) -> tuple[int, int]:
        """``(free bytes, total bytes)`` of the spool's file system ((0, 0) if unknown).

        Before the spool directory exists, the nearest existing parent is asked.
        Blocking (a ``statvfs``); never raises.
        """
        path = self.spool_dir
        while not path.exists() and path.parent != path:
            path = path.parent
        try:
            st = os.statvfs(path)
        except OSError:
            return 0, 0
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    # ------------------------------------------------------------------ formats

    async def format_id(self, dataset_id: int, facility_id: int | None = None) -> int:
        """The DatafileFormat id new datafiles of this dataset get (cached per facility).

        Raises:
            MissingTypeError: the facility has no such format.
            ICATError, TransportError: the look-up failed.
        """
        if facility_id is None:
            facility_id = self._facility_of.get(dataset_id)
        if facility_id is None:
            rows = await self._search(
                f"SELECT ds.investigation.facility.id FROM Dataset ds WHERE ds.id = {dataset_id}")
            if not rows or not isinstance(rows[0], int):
                raise MissingTypeError(f"dataset {dataset_id} is not readable")
            facility_id = int(rows[0])
            self._facility_of[dataset_id] = facility_id
        known = self._formats.get(facility_id)
        if known is not None:
            return known
        query = (f"SELECT f.id, f.version FROM DatafileFormat f WHERE f.facility.id = "
                 f"{facility_id} AND f.name = {quote(self.format_name)}")
        if self.format_version is not None:
            query += f" AND f.version = {quote(self.format_version)}"
        rows = await self._search(query)
        found = [(r[0], str(r[1] or "")) for r in rows if isinstance(r, tuple) and len(r) == 2]
        if not found:
            names = await self._search(
                f"SELECT f.name, f.version FROM DatafileFormat f WHERE f.facility.id = "
                f"{facility_id} ORDER BY f.name")
            have = ", ".join(f"{r[0]}:{r[1]}" for r in names if isinstance(r, tuple))[:400]
            wanted = self.format_name + (f":{self.format_version}" if self.format_version
                                         else "")
            msg = (f"the facility (id {facility_id}) has no datafile format {wanted!r}; "
                   f"choose one with --datafile-format NAME[:VERSION] (it has: "
                   f"{have or 'none'})")
            log.error("%s", msg)
            raise MissingTypeError(msg)
        found.sort(key=lambda r: _version_key(r[1]))
        fid = int(found[-1][0])
        self._formats[facility_id] = fid
        log.info("new datafiles of facility %d get datafile format %s:%s (id %d)",
                 facility_id, self.format_name, found[-1][1], fid)
        return fid

    # ------------------------------------------------------------------ creating

    async def create(self, *, dataset_id: int, name: str, display: str, format_id: int | None,
                     replace_id: int | None = None) -> Upload:
        """Start a new upload: an empty spool file and its record (state ``writing``).

        ``replace_id`` names the datafile the new one replaces once stored.
        Raises :class:`~idsfs.errors.SpoolError` when the spool cannot be written.
        """
        await self._ensure_spool_async()
        uid = secrets.token_hex(16)
        up = Upload(self.spool_dir, uid, dataset_id=dataset_id, name=name, display=display,
                    format_id=format_id, owner=self.owner)
        up.replace_id = replace_id
        up.fd = await self._bridge.run(_open_spool_file, up.data_path, display, True,
                                       abandon_on_cancel=False, name="create spool file")
        try:
            with trio.CancelScope(shield=True):
                await self.save(up)
        except SpoolError:
            await self._remove_files(up)
            raise
        self.uploads[uid] = up
        return up

    def holds(self, up: Upload) -> bool:
        """Whether ``up`` is still one of this uploader's uploads (not stored and
        forgotten, nor deleted). Never raises."""
        return not up.removed and self.uploads.get(up.uid) is up

    async def adopt_handle(self, up: Upload, *, write: bool) -> None:
        """Count a new file handle on ``up`` (a writer moves it back to ``writing``).

        Raises only ``trio.Cancelled`` (a record that cannot be saved is
        logged, see :meth:`try_save`).
        """
        up.handles += 1
        if write:
            up.writers += 1
            if up.state in (PENDING, FAILED, CONFLICT):
                up.state = WRITING
                await self.try_save(up)

    # ------------------------------------------------------------------ spool I/O

    async def save(self, up: Upload, *, durable: bool = False) -> None:
        """Write the record of ``up`` (in a worker thread; ``fsync`` when ``durable``).

        Saves of one record run one at a time, in the order they were asked
        for; each writes the state as it is when its turn comes, so a save
        that finds a newer state already written (by a save asked for after
        it) has nothing left to do. Nothing is written once the files were
        removed. Raises :class:`~idsfs.errors.SpoolError`.
        """
        up.saves_asked += 1
        mine = up.saves_asked
        async with up.record_lock:
            if up.removed or (up.saves_done >= mine and not durable):
                return
            covers = up.saves_asked
            text = up.record_text()
            await self._bridge.run(up.write_record, text, durable, abandon_on_cancel=False,
                                   name="save upload record")
            up.saves_done = max(up.saves_done, covers)

    async def try_save(self, up: Upload) -> bool:
        """:meth:`save`, logging instead of raising; True when saved.

        Raises only ``trio.Cancelled`` (while waiting for an earlier save of the
        record); a :class:`~idsfs.errors.SpoolError` is logged and gives False.
        """
        try:
            await self.save(up)
            return True
        except SpoolError as exc:
            log.warning("%s (the upload goes on from memory)", exc)
            return False

    async def _save_shielded(self, up: Upload) -> None:
        """:meth:`try_save` that a cancellation does not stop (cleanup paths)."""
        with trio.CancelScope(shield=True):
            await self.try_save(up)

    @contextlib.asynccontextmanager
    async def _spool_fd(self, up: Upload) -> AsyncIterator[int]:
        """The spool file's descriptor (opened in a worker thread if needed), kept open
        until the block ends even if :meth:`_close_fd` is called meanwhile."""
        if up.fd is None:
            fd = await self._bridge.run(_open_spool_file, up.data_path, up.display,
                                        abandon_on_cancel=False, name="open spool file")
            if up.fd is None:
                up.fd = fd
            else:  # opened twice at once: the extra one goes with the next close
                up._stale_fds.append(fd)
        fd = up.fd
        up.fd_users += 1
        try:
            yield fd
        finally:
            up.fd_users -= 1
            if up.fd_users == 0 and up._stale_fds:
                fds, up._stale_fds = up._stale_fds, []
                with trio.CancelScope(shield=True):
                    await self._bridge.run(_close_fds, fds, name="close spool file")

    async def _close_fd(self, up: Upload) -> None:
        """Close the spool file descriptor (reopened when needed), in a worker thread."""
        fds = up.detach_fd()
        if fds:
            with trio.CancelScope(shield=True):
                await self._bridge.run(_close_fds, fds, name="close spool file")

    def _remove_files(self, up: Upload) -> Awaitable[None]:
        """Close and delete the spool file and the record (never raises). No save
        writes the record after this call; the returned awaitable does the I/O (in a
        worker thread) and must be awaited."""
        up.removed = True
        return self._unlink(up, up.detach_fd())

    async def _unlink(self, up: Upload, fds: list[int]) -> None:
        with trio.CancelScope(shield=True):
            async with up.record_lock:  # a save running now ends first
                await self._bridge.run(_close_fds, fds, name="close spool file")
                await self._bridge.run(up.unlink_files, name="remove spool files")

    async def write(self, up: Upload, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset`` into the spool of ``up``; return the bytes written.

        Writes of one upload are applied one at a time, in the order they
        arrived, and never on the trio thread. While :meth:`run` is running
        they are written behind: the write is accepted (size and times change
        at once) and a drain task ``pwrite``-s the queued bytes in a worker
        thread, at most :data:`_WRITE_BEHIND` bytes behind (a write waits while
        more are queued); everything that reads or changes the spool file
        waits for the queue first. Otherwise the write waits for its
        ``pwrite``.

        Raises :class:`~idsfs.errors.SpoolError` (``ENOSPC`` for a full spool
        disk) for this write, or for the next one (and ``fsync``/``close``)
        when a write behind failed; the upload is then marked as failed to
        write and will not be uploaded until it is written again from the
        start.
        """
        async with up.lock:
            nursery = self._nursery
            if nursery is None or self._closing:
                await self._drained(up)
                epoch = up.seq_epoch
                seed = up.seq_crc_state() if offset == up.size else None
                async with self._spool_fd(up) as fd:
                    done, exc, state = await self._bridge.run(
                        _pwrite_crc, fd, offset, data, seed, abandon_on_cancel=False,
                        name="spool write")
                if exc is not None:
                    raise up.note_write_failed(offset, done, exc) from exc
                up.note_seq_crc(epoch, state)
                up.note_written(offset, done, data)
            else:
                if up.write_error is not None and up.write_errno is not None:
                    raise up.spool_error()
                while up.queued_bytes and up.queued_bytes + len(data) > _WRITE_BEHIND:
                    await up.drain_progress.wait()
                    if up.write_error is not None and up.write_errno is not None:
                        raise up.spool_error()
                if not isinstance(data, bytes):
                    data = bytes(data)  # e.g. a view of a cache block that is reused later
                done = len(data)
                up.queue.append((offset, data))
                up.queued_bytes += done
                up.queued_count += 1
                up.note_written(offset, done, data, spooled=False)
                if not up.draining:
                    up.draining = True
                    up.drain_progress = trio.Event()
                    nursery.start_soon(self._drain, up)
            if up.state == DONE:  # written again after it was stored
                up.state = WRITING
                await self.try_save(up)
            return done

    async def _drain(self, up: Upload) -> None:
        """Write the queued bytes of ``up`` into its spool file (a task per busy upload;
        not cancellable: accepted bytes always reach the spool or fail there)."""
        with trio.CancelScope(shield=True):
            try:
                while up.queue:
                    batch = list(up.queue)
                    epoch = up.seq_epoch
                    async with self._spool_fd(up) as fd:
                        written, exc, real_size, state = await self._bridge.run(
                            _pwrite_batch, fd, batch, up.seq_crc_state(),
                            abandon_on_cancel=False, name="spool write")
                    up.note_seq_crc(epoch, state)
                    for offset, data in batch[:written]:
                        up.queue.popleft()
                        up.queued_bytes -= len(data)
                        up.settled_count += 1
                        up.note_spooled(offset, len(data), data)
                    if exc is not None:
                        up.settled_count += len(up.queue)
                        up.queue.clear()
                        up.queued_bytes = 0
                        up.note_write_failed(batch[written][0], 0, exc)
                        up.size = real_size  # what the spool really holds
                        log.warning("%s: writing its spool failed: %s", up.display,
                                    exc.strerror or exc)
                    up.drain_progress.set()
                    up.drain_progress = trio.Event()
            except SpoolError as exc:  # the spool file cannot be opened (gone, no space)
                # reported by the next write, fsync or close; a task of run()'s
                # nursery must not fail: that would stop the daemon
                code = exc.errno or errno.EIO
                self._drop_queue(up, code, f"its spool file cannot be opened "
                                           f"({os.strerror(code)})")
                log.warning("%s: writing its spool failed: %s", up.display, exc)
            except BaseException:
                self._drop_queue(up, errno.EIO, "writing the spool failed")
                raise
            finally:
                up.draining = False
                up.drain_progress.set()

    @staticmethod
    def _drop_queue(up: Upload, code: int, why: str) -> None:
        """The writes queued on ``up`` cannot reach its spool: drop them and mark the
        upload as failed to write (unless it already is)."""
        up.settled_count += len(up.queue)
        up.queue.clear()
        up.queued_bytes = 0
        if up.write_error is None:
            up.fail_writes(why, code)

    async def _drained(self, up: Upload) -> None:
        """Wait until the writes behind of ``up`` queued so far are in its spool file
        (or failed); later writes are not waited for."""
        target = up.queued_count
        while up.draining and up.settled_count < target:
            await up.drain_progress.wait()

    async def read(self, up: Upload, offset: int, size: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` from the spool of ``up`` (short at its
        end), in a worker thread. Raises :class:`~idsfs.errors.SpoolError`."""
        await self._drained(up)
        want = max(0, min(size, up.size - offset))
        async with self._spool_fd(up) as fd:
            try:
                # not abandoned on cancel: the fd may be closed once we leave
                return await self._bridge.run(os.pread, fd, want, offset, name="spool read",
                                              abandon_on_cancel=False)
            except OSError as exc:
                raise SpoolError(f"cannot read the spool file of {up.display}: "
                                 f"{exc.strerror or exc}", exc.errno) from exc

    async def truncate(self, up: Upload, size: int, *, unless_empty: bool = False) -> None:
        """Set the spool's size (``truncate``/``O_TRUNC``), in a worker thread.

        With ``unless_empty`` an empty file is left alone. Raises
        :class:`~idsfs.errors.SpoolError`.
        """
        async with up.lock:
            if unless_empty and not up.size:
                return
            await self._drained(up)
            async with self._spool_fd(up) as fd:
                try:
                    await self._bridge.run(os.ftruncate, fd, size, abandon_on_cancel=False,
                                           name="spool truncate")
                except OSError as exc:
                    raise SpoolError(f"cannot truncate the spool file of {up.display}: "
                                     f"{exc.strerror or exc}", exc.errno) from exc
            up.note_truncated(size)
            if up.state == DONE:
                up.state = WRITING
                await self.try_save(up)

    # ------------------------------------------------------------------ live uploads

    def maybe_start_live(self, up: Upload) -> None:
        """Start the live upload of ``up`` if it qualifies (see the module docstring).

        Never raises: the upload runs as a task of :meth:`run`'s nursery, and
        its failure only means the file is sent whole at ``close``.
        """
        if (up.live is not None or not up.live_possible or self._nursery is None
                or self._closing or self._live_count >= self.max_live
                or up.size < self.live_threshold or up.replace_id is not None
                or up.datafile_id is not None or up.cancelled or up.write_error
                or up.format_id is None):
            return
        if not up.sequential:
            up.live_possible = False
            return
        live = _LiveStream(up.data_path, self.live_stall)
        live.available = up.size - up.queued_bytes  # sequential: the queue is the tail
        up.live = live
        self._live_count += 1
        self._nursery.start_soon(self._live_put, up, live)

    async def _live_put(self, up: Upload, live: _LiveStream) -> None:
        name = up.name
        assert up.format_id is not None
        # The modification time is not known before the end: it is set in ICAT
        # after the upload (see _fix_mod_time).
        call = functools.partial(
            self._ids.put, live.body(), name, up.dataset_id, up.format_id,
            datafileCreateTime=up.create_ms)
        try:
            live.result = await self._bridge.run(call, abandon_on_cancel=False,
                                                 name="IDS put (live)")
        except BaseException as exc:
            live.error = exc
            if isinstance(exc, trio.Cancelled):
                raise
        finally:
            self._live_count -= 1
            live.done.set()
            if live.final is None and not live.aborted:
                live.abort("the live upload ended early")
            if live.error is not None and live.final is None:
                self._live_aborted += 1
                log.debug("live upload of %s given up: %s", up.display,
                          live.why or _describe(live.error))
                if up.live is live:
                    up.live = None
                    up.live_possible = False

    # ------------------------------------------------------------------ committing

    async def commit(self, up: Upload) -> int:
        """Upload ``up`` now (the close the user sees); return the datafile id.

        Does nothing when IDS already has the current content. On failure the
        upload becomes ``pending`` (retried in the background), ``failed`` or
        ``conflict`` (held) and :class:`~idsfs.errors.UploadFailedError` is
        raised (:class:`~idsfs.errors.SpoolError` with its errno when a write
        behind could not be stored in the spool).
        """
        async with up.lock:
            try:
                return await self._commit_locked(up, foreground=True)
            except UploadFailedError as exc:
                if up.write_error and up.write_errno is not None:
                    # a write behind failed: the close reports the spool's error (ENOSPC)
                    raise up.spool_error() from exc
                raise

    async def _commit_locked(self, up: Upload, *, foreground: bool) -> int:
        if up.cancelled:
            raise UploadFailedError(f"{up.display} was deleted", FAILED, "deleted")
        if up.landed:
            return up.datafile_id  # type: ignore[return-value]
        await self._drained(up)
        if up.write_error:
            self._abort_live(up, "write error")
            await self._set(up, FAILED, up.write_error)
            raise UploadFailedError(f"{up.display}: {up.write_error}", FAILED, up.write_error)
        if up.datafile_id is not None and up.uploaded_generation != up.generation \
                and up.temp_name is None and up.replace_id is None:
            # written again after it was stored: replace our own datafile
            up.replace_id = up.datafile_id
            up.datafile_id = None
        if up.replace_id is not None and up.datafile_id is None and up.temp_name is None:
            up.temp_name = f"{_TEMP_PREFIX}{up.uid[:16]}"
        generation = up.generation
        up.state = UPLOADING
        up.attempts += 1
        up.in_progress = True
        up.started_at = self._clock()
        try:
            datafile_id = await self._attempt(up, foreground=foreground)
        except _Fail as fail:
            self._failures += 1
            up.in_progress = False
            if fail.state == PENDING:
                up.next_attempt = self._clock() + self._backoff(up)
            await self._set(up, fail.state, fail.reason)
            log.warning("upload of %s failed (%s, attempt %d): %s", up.display, fail.state,
                        up.attempts, fail.reason)
            self._wakeup.set()
            raise UploadFailedError(f"upload of {up.display} failed: {fail.reason}",
                                    fail.state, fail.reason) from fail.__cause__
        except BaseException:
            up.in_progress = False
            up.state = PENDING
            await self._save_shielded(up)
            raise
        up.in_progress = False
        up.uploaded_generation = generation
        up.state = DONE
        up.reason = ""
        await self.try_save(up)
        if up.sent_mod_ms != up.mod_ms:
            # a live put sends no time, and a touch may come while a put is on its way
            up.sent_mod_ms = up.mod_ms
            await self.set_mod_time(datafile_id, up.mod_ms)
        self._stored += 1
        self._bytes_stored += up.size
        took = self._clock() - (up.started_at or self._clock())
        log.info("stored %s as datafile %d (%s in %.2f s)", up.display, datafile_id,
                 _size(up.size), took)
        if self.on_landed is not None:
            try:
                await self.on_landed(up)
            except Exception:
                log.exception("updating the tree after storing %s failed", up.display)
        return datafile_id

    async def set_mod_time(self, datafile_id: int, mod_ms: int) -> bool:
        """Set ``datafileModTime`` of a datafile in ICAT (after a live upload, ``touch``).

        Returns False (logged) when ICAT refuses; the file itself is stored.
        ICAT and transport errors (and ``OSError``) are not raised; a
        cancellation waits for the call to end.
        """
        try:
            await self._bridge.run(
                self._icat.update,
                {"Datafile": {"id": datafile_id, "datafileModTime": icat_date(mod_ms)}},
                abandon_on_cancel=False, name="ICAT set datafileModTime")
            return True
        except (IdsfsError, OSError) as exc:
            log.warning("cannot set the modification time of datafile %d: %s", datafile_id,
                        _describe(exc))
            return False

    async def settle(self, up: Upload) -> None:
        """Find out whether the last attempt of a pending upload landed (before reopening it).

        When it did, the upload is ``done`` (its datafile is the stored file).
        Raises :class:`~idsfs.errors.UploadFailedError` when ICAT cannot tell now.
        """
        async with up.lock:
            if up.datafile_id is not None or not up.maybe_landed or up.in_progress:
                return
            try:
                found = await self._resolve(up, up.temp_name or up.name)
            except _Fail as fail:
                if fail.state == CONFLICT:
                    await self._set(up, CONFLICT, fail.reason)
                    return
                raise UploadFailedError(fail.reason, up.state, fail.reason) from fail.__cause__
            up.maybe_landed = False
            if found is None:
                await self.try_save(up)
                return
            up.datafile_id = found
            if up.replace_id is None and up.temp_name is None:
                up.uploaded_generation = up.generation
                up.state = DONE
                up.reason = ""
            await self.try_save(up)
            if up.landed and self.on_landed is not None:
                await self.on_landed(up)

    async def _persist(self, up: Upload) -> bool:
        """Save the record durably (``fsync``, in a worker thread) before a step whose
        outcome a crash must not lose; False (logged) when it cannot be saved."""
        try:
            await self.save(up, durable=True)
            return True
        except SpoolError as exc:
            log.warning("%s (the upload goes on from memory)", exc)
            return False

    def _set(self, up: Upload, state: str, reason: str) -> Awaitable[bool]:
        """Change the state now; the returned awaitable saves the record."""
        up.state = state
        up.reason = reason
        if self.on_changed is not None:
            try:
                self.on_changed(up)
            except Exception:
                log.exception("on_changed failed")
        return self.try_save(up)

    def _backoff(self, up: Upload) -> float:
        n = max(0, up.attempts - 1)
        return min(self.max_retry_delay, self.retry_delay * (2 ** min(n, 30)))

    def _abort_live(self, up: Upload, why: str) -> None:
        if up.live is not None:
            up.live.abort(why)

    async def _attempt(self, up: Upload, *, foreground: bool) -> int:
        """Run the steps that remain for ``up``; return the datafile id or raise _Fail."""
        # 1. wrong datafiles registered by earlier attempts go first
        for bad in list(up.cleanup_ids):
            try:
                await self._delete_datafile(bad)
            except IDSNotFoundError:
                pass
            except (IdsfsError, OSError) as exc:
                raise _Fail(PENDING, f"cannot remove the wrong datafile {bad} an earlier "
                                     f"attempt left: {_describe(exc)}") from exc
            up.cleanup_ids.remove(bad)
            await self._persist(up)
        target = up.temp_name or up.name
        # 2. an earlier attempt whose outcome is not known: did it land?
        if up.datafile_id is None and up.maybe_landed:
            self._abort_live(up, "resuming")
            found = await self._resolve(up, target)
            if found is not None:
                up.datafile_id = found
                up.sent_mod_ms = None  # the time it was stored with is not known
                up.maybe_landed = False
                if up.replace_id is not None or up.temp_name is not None:
                    await self._persist(up)
        # 3. the put
        if up.datafile_id is None:
            up.datafile_id = await self._put(up, target, foreground=foreground)
            up.maybe_landed = False
            if up.replace_id is not None or up.temp_name is not None:
                await self._persist(up)  # the replace steps go on from here after a crash
        # 4. a replace: delete the old datafile, then give the new one the real name
        if up.replace_id is not None:
            old = up.replace_id
            try:
                await self._delete_datafile(old)
            except IDSNotFoundError:
                pass  # gone already
            except (IdsfsError, OSError) as exc:
                raise _Fail(PENDING, f"stored as {target!r} (datafile {up.datafile_id}) but "
                                     f"the old datafile {old} could not be deleted: "
                                     f"{_describe(exc)}") from exc
            up.replace_id = None
            up.replaced_ids.append(old)
            await self._persist(up)
        if up.temp_name is not None:
            try:
                await self._bridge.run(
                    self._icat.update, {"Datafile": {"id": up.datafile_id, "name": up.name}},
                    abandon_on_cancel=False, name="ICAT rename datafile")
            except ICATError as exc:
                if exc.type == "OBJECT_ALREADY_EXISTS":
                    raise _Fail(CONFLICT, f"stored as {up.temp_name!r} (datafile "
                                          f"{up.datafile_id}): another datafile is named "
                                          f"{up.name!r} now") from exc
                raise _Fail(PENDING, f"stored as {up.temp_name!r} (datafile {up.datafile_id}) "
                                     f"but renaming it failed: {_describe(exc)}") from exc
            except (TransportError, OSError) as exc:
                raise _Fail(PENDING, f"stored as {up.temp_name!r} (datafile {up.datafile_id}) "
                                     f"but renaming it failed: {_describe(exc)}") from exc
            up.temp_name = None
            await self._persist(up)
        assert up.datafile_id is not None
        return up.datafile_id

    async def _put(self, up: Upload, target: str, *, foreground: bool) -> int:
        """Send the spool (or finish the live upload); classify failures into _Fail."""
        if up.format_id is None:
            try:
                up.format_id = await self.format_id(up.dataset_id)
            except MissingTypeError as exc:
                raise _Fail(FAILED, str(exc)) from exc
            except (IdsfsError, OSError) as exc:
                raise _Fail(PENDING, f"cannot look up the datafile format: "
                                     f"{_describe(exc)}") from exc
        deadline = self._clock() + (self.online_wait if foreground else 0.0)
        delay = 0.25
        renewed = False
        while True:
            used = self._ids.sessionId
            up.maybe_landed = True
            up.state = UPLOADING
            await self._persist(up)  # a crash from here on is checked in ICAT at restart
            try:
                return await self._put_once(up, target)
            except IDSInsufficientPrivilegesError as exc:
                # nothing stored; a renewed session deserves one more try at once
                up.maybe_landed = False
                if not renewed and await self._session_changed(used):
                    renewed = True
                    continue
                raise _Fail(PENDING, _describe(exc)) from exc
            except IDSDataNotOnlineError as exc:
                up.maybe_landed = False
                left = deadline - self._clock()
                if left > 0:
                    await trio.sleep(min(delay, left))
                    delay = min(delay * 2, 5.0)
                    continue
                why = ("the dataset is locked by another operation (Data is busy)" if exc.busy
                       else "the dataset is archived; IDS is restoring it")
                raise _Fail(PENDING, f"{why} ({_describe(exc)})") from exc
            except IDSNotImplementedError as exc:
                up.maybe_landed = False
                raise _Fail(PENDING, f"the IDS does not accept uploads now (read-only?): "
                                     f"{_describe(exc)}") from exc
            except (IDSBadRequestError, IDSNotFoundError) as exc:
                up.maybe_landed = False
                raise _Fail(FAILED, _describe(exc)) from exc
            except IDSResponseError as exc:
                wrong = getattr(exc, "datafile_id", None)
                if isinstance(wrong, int):
                    # registered, but not with our bytes: remove it, then retry later
                    # (the bytes are read again for their CRC32: the one carried along
                    # by the writes is not trusted any more)
                    up.drop_seq_crc()
                    up.crc = None
                    up.maybe_landed = False
                    up.cleanup_ids.append(wrong)
                    await self._persist(up)
                    with contextlib.suppress(IdsfsError, OSError):
                        await self._delete_datafile(wrong)
                        up.cleanup_ids.remove(wrong)
                        await self.try_save(up)
                    raise _Fail(PENDING, _describe(exc)) from exc
                return await self._after_ambiguous(up, target, exc)
            except (TransportError, IDSError, OSError) as exc:
                return await self._after_ambiguous(up, target, exc)

    async def _after_ambiguous(self, up: Upload, target: str, exc: BaseException) -> int:
        """After a failure that may have landed: ask ICAT. Returns the id if it landed.

        Raises _Fail (pending when it did not land, conflict when another
        datafile has the name).
        """
        found = await self._resolve(up, target)
        if found is not None:
            log.info("upload of %s: the answer was lost (%s) but the datafile is there "
                     "(id %d)", up.display, _describe(exc), found)
            return found
        up.maybe_landed = False
        await self.try_save(up)
        raise _Fail(PENDING, _describe(exc)) from exc

    async def _resolve(self, up: Upload, target: str) -> int | None:
        """Does a datafile ``target`` with our size and CRC32 exist? Its id, or None.

        Raises _Fail(CONFLICT) when one with other content exists, _Fail(PENDING)
        when ICAT cannot tell now (``maybe_landed`` stays set).
        """
        query = (f"SELECT df.id, df.fileSize, df.checksum, df.location FROM Datafile df "
                 f"WHERE df.dataset.id = {up.dataset_id} AND df.name = {quote(target)}")
        rows: list[Any] = []
        for attempt in range(_RESOLVE_TRIES):
            try:
                rows = await self._search(query)
                break
            except (IdsfsError, OSError) as exc:
                if attempt + 1 >= _RESOLVE_TRIES:
                    raise _Fail(PENDING, f"the outcome of the last attempt is not known and "
                                         f"ICAT cannot be asked now: {_describe(exc)}") from exc
                await trio.sleep(0.2)
        if not rows:
            return None
        row = rows[0]
        if not isinstance(row, tuple) or len(row) != 4:
            raise _Fail(PENDING, f"unexpected ICAT answer {str(row)[:80]}")
        did, size, checksum, location = row
        if up.crc is None:
            await self._drained(up)
            try:
                up.crc = await self._bridge.run(up.compute_crc, name="spool CRC32")
            except OSError as exc:
                raise _Fail(FAILED, f"cannot read the spool file: {exc.strerror or exc}") \
                    from exc
            await self.try_save(up)
        ours = isinstance(size, int) and size == up.size and location is not None \
            and _same_crc(checksum, up.crc)
        if ours:
            return int(did)
        raise _Fail(CONFLICT, f"a different datafile {target!r} (id {did}, {size} bytes, "
                              f"checksum {checksum}) exists in the dataset; not overwritten")

    async def _put_once(self, up: Upload, target: str) -> int:
        live = up.live
        if live is not None and target == up.name and up.temp_name is None:
            if live.finish(up.size):
                await live.done.wait()
                if live.result is not None:
                    up.live = None
                    up.sent_mod_ms = None
                    return live.result
                if live.error is not None:
                    up.live = None
                    if isinstance(live.error, Exception) and not isinstance(
                            live.error, _LiveAborted):
                        raise live.error
            else:
                live.abort("the file changed")
                await live.done.wait()
                up.live = None
        assert up.format_id is not None
        # The writes carried the CRC32 along (all of them are in the spool: the
        # commit waited for them, and holds the lock that writes need).
        crc = up.spool_crc
        if crc is not None:
            up.crc = crc
        up.sent_mod_ms = up.mod_ms
        call = functools.partial(self._put_file, up.data_path, up.size, target,
                                 up.dataset_id, up.format_id, crc, up.create_ms, up.mod_ms)
        return await self._bridge.run(call, abandon_on_cancel=False, name="IDS put")

    def _put_file(self, path: Path, expected: int, target: str, dataset_id: int,
                  format_id: int, crc: int | None, create_ms: int, mod_ms: int) -> int:
        """Blocking: ``put`` the whole spool file at ``path`` (``expected`` bytes) with
        Content-Length, as ``curl -T`` (sent with ``sendfile``, not read at all when its
        CRC32 ``crc`` is known). The upload's values are passed in: a worker thread
        does not read its state, which the trio thread may change meanwhile."""
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != expected:
                raise OSError(errno.EIO, f"spool file has {size} bytes, {expected} expected")
            body: bytes | io.FileIO = f if size else b""
            return self._ids.put(body, target, dataset_id, format_id,
                                 datafileCreateTime=create_ms, datafileModTime=mod_ms,
                                 crc32=crc if size else None)

    async def _session_changed(self, used: str | None) -> bool:
        if self._ids.sessionId != used:
            return True
        if self._renew_session is None:
            return False
        try:
            return bool(await self._renew_session())
        except Exception:
            log.debug("session renewal failed", exc_info=True)
            return False

    async def _search(self, query: str) -> list[Any]:
        return await self._bridge.run(self._icat.search, query, name="ICAT search")

    async def _delete_datafile(self, datafile_id: int) -> None:
        """IDS ``delete`` of one datafile, retrying "Data is busy" briefly."""
        await delete_datafile(self._ids, self._bridge, datafile_id)

    async def delete(self, datafile_id: int) -> None:
        """Delete a datafile through IDS (``unlink``); see :func:`delete_datafile`.

        Raises the IDS and transport errors of :mod:`idsfs.errors`
        (``IDSNotFoundError`` when it is gone already,
        ``DataBusyError`` when still busy after the retries,
        ``IDSInsufficientPrivilegesError`` without permission).
        """
        await delete_datafile(self._ids, self._bridge, datafile_id)

    async def fsync(self, up: Upload) -> None:
        """``fsync`` the spool file of ``up`` (in a worker thread). Raises SpoolError."""
        if up.removed:
            return
        await self._drained(up)
        if up.write_error is not None and up.write_errno is not None:
            raise up.spool_error()
        async with self._spool_fd(up) as fd:
            try:
                await self._bridge.run(os.fsync, fd, name="spool fsync")
            except OSError as exc:
                raise SpoolError(f"cannot fsync the spool file of {up.display}: "
                                 f"{exc.strerror or exc}", exc.errno) from exc

    async def rename(self, up: Upload, new_name: str, display: str) -> None:
        """Give a file written here another ICAT name (``rename`` within its dataset).

        Its datafile, if stored, is renamed in ICAT too (an attempt whose
        outcome is unknown is settled first). A *conflict* (the name was taken)
        is tried again at once under the new name. Raises ICAT errors
        (``ICATObjectExistsError`` when the name is taken).
        """
        await self.settle(up)
        async with up.lock:
            if up.datafile_id is not None and up.temp_name is None:
                await self._bridge.run(
                    self._icat.update, {"Datafile": {"id": up.datafile_id, "name": new_name}},
                    abandon_on_cancel=False, name="ICAT rename datafile")
            self._abort_live(up, "renamed")
            up.live_possible = False
            up.name = new_name
            up.display = display
            if up.state == CONFLICT:
                up.state = PENDING
                up.reason = "renamed after a conflict: trying again"
                up.next_attempt = self._clock()
                self._wakeup.set()
            await self.try_save(up)

    # ------------------------------------------------------------------ handles closing

    def released(self, up: Upload) -> Awaitable[None]:
        """The last file handle of ``up`` was closed.

        A deleted upload's spool goes; a stored one is finished (spool deleted,
        state ``done``); a file never uploaded or changed since its last upload
        is queued for an upload right away (the close could not report it).
        Every decision and change of state is made in this call, before the
        caller yields (an ``open`` may come in meanwhile); the returned
        awaitable does the spool I/O that follows (in worker threads) and must
        be awaited. The call never raises; the awaitable raises only
        ``trio.Cancelled`` (spool errors are logged).
        """
        if up.handles > 0:
            return _nothing()
        if up.cancelled:
            return self.forget(up)
        if up.landed:
            up.state = DONE
            return self.forget(up)
        if up.write_error:
            self._abort_live(up, "write error")
            saved = self._set(up, FAILED, up.write_error) if up.state != FAILED else _nothing()
            return self._then_close_fd(up, saved)
        if up.state in (WRITING, UPLOADING):
            up.state = PENDING
            if not up.reason:
                up.reason = "waiting for its upload"
            up.next_attempt = self._clock()
            self._wakeup.set()  # retryable now that no handle holds it
            return self._then_close_fd(up, self.try_save(up))
        if up.state == PENDING:
            self._wakeup.set()
        return self._then_close_fd(up, _nothing())

    async def _then_close_fd(self, up: Upload, first: Awaitable[object]) -> None:
        """Await ``first``, then close the spool's descriptor unless a handle was
        opened meanwhile."""
        await first
        if up.handles == 0:
            await self._close_fd(up)

    def forget(self, up: Upload) -> Awaitable[None]:
        """Drop ``up`` and its spool files (after it landed or was deleted).

        ``up.removed`` is set in this call; the returned awaitable deletes the
        files (in a worker thread), then takes ``up`` out of :attr:`uploads`,
        and must be awaited. Neither the call nor the awaitable raises (the
        I/O is shielded from cancellation; a file that cannot be deleted is
        logged).
        """
        self._abort_live(up, "forgotten")
        removal = self._remove_files(up)

        async def remove() -> None:
            try:
                await removal
            finally:
                self.uploads.pop(up.uid, None)

        return remove()

    async def discard(self, up: Upload) -> list[int]:
        """``unlink`` of a file not yet (or just) stored: drop the spool.

        A datafile it already produced (stored, or maybe stored by an attempt
        whose outcome is unknown) is deleted through IDS too, and so is the
        datafile a replacing upload was to replace (the file is deleted, not
        put back as it was). Returns the ids of the datafiles deleted (or found
        gone). Raises the IDS or ICAT error when a deletion fails (the upload
        is then kept).
        """
        self._abort_live(up, "deleted")
        async with up.lock:
            if up.datafile_id is None and up.maybe_landed:
                try:
                    found = await self._resolve(up, up.temp_name or up.name)
                except _Fail as fail:
                    if fail.state != CONFLICT:
                        raise UploadFailedError(fail.reason, up.state,
                                                fail.reason) from fail.__cause__
                    found = None
                up.datafile_id = found
            doomed = [*up.cleanup_ids, *([up.datafile_id] if up.datafile_id else []),
                      *([up.replace_id] if up.replace_id is not None else [])]
            for did in doomed:
                with contextlib.suppress(IDSNotFoundError):
                    await self._delete_datafile(did)
            up.cancelled = True
            if up.handles <= 0 and not up.removed:
                await self.forget(up)
            # else: the open handles keep the spool until the last one is closed
            return doomed

    # ------------------------------------------------------------------ background

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Retry pending uploads in the background until cancelled (start in a nursery).

        Failed attempts are not raised (they change the upload's state). Raises
        ``trio.Cancelled`` when cancelled, its normal end; an unexpected
        exception of an attempt or of a write-behind task (a bug) propagates.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    self._wakeup = trio.Event()  # a wake() from now on is not missed
                    await self._retry_due()
                    wait = self._next_wait()
                    with trio.move_on_after(wait):
                        await self._wakeup.wait()
            finally:
                self._nursery = None

    def _next_wait(self) -> float:
        now = self._clock()
        due = [up.next_attempt - now for up in self.uploads.values()
               if up.state == PENDING and up.handles == 0 and not up.in_progress]
        return max(0.0, min(due)) if due else 3600.0

    async def _retry_due(self) -> None:
        now = self._clock()
        for up in list(self.uploads.values()):
            if (up.state == PENDING and up.handles == 0 and not up.in_progress
                    and not up.cancelled and up.next_attempt <= now):
                await self.retry(up)

    async def retry(self, up: Upload) -> bool:
        """One background attempt for ``up``; True when it landed.

        A failed attempt gives False (the upload is ``pending``, ``failed`` or
        ``conflict``), not an exception. Raises ``trio.Cancelled``, and an
        unexpected exception of the attempt (a bug; the upload stays
        ``pending``).
        """
        if up.lock.locked():
            return False
        async with up.lock:
            if up.state != PENDING or up.handles > 0 or up.cancelled:
                return up.landed
            try:
                await self._commit_locked(up, foreground=False)
            except UploadFailedError:
                return False
        if up.handles == 0 and up.landed and not (up.cancelled or up.removed):
            # (an unlink may have come in right after the lock was let go: its
            # discard deleted the datafile and forgot the upload already)
            up.state = DONE
            removal = self.forget(up)
            if self.on_changed is not None:
                self.on_changed(up)
            await removal
        return True

    def wake(self) -> None:
        """Make the background loop look at the uploads now (e.g. after a retry request).

        Never raises.
        """
        self._wakeup.set()

    async def aclose(self, wait: float = DEFAULT_UPLOAD_WAIT) -> list[Upload]:
        """Try the pending uploads (ignoring back-off) for up to ``wait`` seconds.

        Returns the uploads that remain (logged; they stay in the spool for the
        next mount). Aborts live uploads and closes the spool. Failed attempts
        are not raised; raises only ``trio.Cancelled`` and an unexpected
        exception of an attempt (a bug, see :meth:`retry`).
        """
        self._closing = True
        for up in list(self.uploads.values()):
            self._abort_live(up, "the mount is stopping")
            if up.handles > 0 and not up.cancelled:
                # no FUSE request comes any more: nobody can close these files
                up.handles = 0
                if up.writers > 0 and up.dirty and up.state == WRITING:
                    await self._set(up, FAILED, "the mount stopped while the file was open for "
                                          "writing; its content may be incomplete")
                up.writers = 0
                await self.released(up)
        deadline = self._clock() + wait
        with trio.move_on_after(max(0.0, wait)):
            while True:
                todo = [up for up in self.uploads.values()
                        if up.state in (PENDING, WRITING, UPLOADING) and not up.cancelled]
                if not todo:
                    break
                progressed = False
                for up in todo:
                    if up.state != PENDING:
                        up.state = PENDING
                    up.next_attempt = 0.0
                    if await self.retry(up):
                        progressed = True
                if not progressed:
                    left = deadline - self._clock()
                    if left <= 0:
                        break
                    await trio.sleep(min(left, max(0.2, self.retry_delay)))
        remaining = [up for up in self.uploads.values() if up.state != DONE and not up.cancelled]
        for up in remaining:
            if up.state in (WRITING, UPLOADING):
                up.state = PENDING
                await self._save_shielded(up)
            log.warning("upload not finished, kept in %s for the next mount: %s",
                        self.spool_dir, up.line())
        fds = self._detach_spool_fds()
        await self._bridge.run(_close_fds, fds, name="close spool files")
        return remaining

    # ------------------------------------------------------------------ status

    def stats(self) -> UploaderStats:
        """A snapshot for ``idsfs status``. Never raises."""
        now = self._clock()
        in_progress = []
        pending = []
        held = []
        spool_bytes = 0
        writing = 0
        for up in self.uploads.values():
            spool_bytes += up.size
            if up.in_progress:
                took = max(1e-6, now - (up.started_at or now))
                sent = up.live.sent if up.live is not None else None
                rate = f", {_size(int(sent / took))}/s" if sent else ""
                in_progress.append(f"{up.display} ({_size(up.size)}{rate})")
            elif up.state == WRITING:
                writing += 1
            elif up.state == PENDING:
                pending.append(up.line())
            elif up.state in _HELD:
                held.append(up.line())
        return UploaderStats(str(self.spool_dir), writing, tuple(in_progress), tuple(pending),
                             tuple(held), self._stored, self._bytes_stored, self._failures,
                             self._live_aborted, spool_bytes, self._left_alone)

    def status(self) -> dict[str, Any]:
        """:meth:`stats` as a JSON-able dict (the ``uploads`` section of ``idsfs status``).

        Never raises.
        """
        return self.stats().as_dict()

    def pending_lines(self, *, held: bool = True) -> list[str]:
        """One line per upload an unmount would wait for or leave in the spool
        (without ``held``: only those it waits for, not the failed and
        conflicting ones, which wait for the user). Never raises.
        """
        return [up.line() for up in self.uploads.values()
                if up.state != DONE and not up.cancelled
                and (held or up.state not in _HELD)]


def icat_date(ms: int) -> str:
    """Epoch milliseconds as an ICAT date (``2024-05-01T12:00:00.000+00:00``).

    Raises ``OverflowError`` or ``OSError`` for a time outside the platform's
    range (:func:`time.gmtime`), ``ValueError``/``TypeError`` when ``ms`` is
    not a number.
    """
    seconds, millis = divmod(int(ms), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}+00:00"


def _same_crc(checksum: Any, crc: int | None) -> bool:
    """ICAT's hex checksum (no leading zeros) equals ``crc``."""
    if crc is None or not isinstance(checksum, str):
        return False
    try:
        return int(checksum.strip(), 16) == crc
    except ValueError:
        return False


async def delete_datafile(ids: IDSClient, bridge: ThreadBridge, datafile_id: int,
                          busy_tries: int = 6) -> None:
    """IDS ``delete`` of one datafile, retrying "Data is busy" (503) with back-off.

    A definitive 503 changed nothing, so repeating it is safe. Raises
    :class:`~idsfs.errors.DataBusyError` (``EBUSY``) when it stays busy (e.g.
    someone reads the dataset: an open ``getData`` holds a lock), and the IDS
    error otherwise (``IDSNotFoundError`` when it is gone already).
    """
    selection = DataSelection({"datafileIds": [datafile_id]})
    delay = 0.1
    for attempt in range(busy_tries):
        try:
            await bridge.run(ids.delete, selection, abandon_on_cancel=False, name="IDS delete")
            return
        except IDSDataNotOnlineError as exc:
            if not exc.busy:
                raise
            if attempt + 1 >= busy_tries:
                raise DataBusyError(
                    f"datafile {datafile_id} was not deleted: the IDS reports it busy "
                    f"(locked by another operation, e.g. a read of its dataset in "
                    f"progress)", datafile_id) from exc
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)

"""The one exception tree of idsfs.

Every error that :mod:`idsfs.ids`, :mod:`idsfs.icat` and the layers built on
them raise on purpose derives from :class:`IdsfsError`. A raw ``requests``,
``urllib3`` or socket exception never escapes the client library: it is
translated once, where it happens, into a :class:`TransportError` (the
original stays attached as ``__cause__``)::

    IdsfsError
    ├── ServerError                     the server answered with an error
    │   │                               (.message .type/.code .status .offset)
    │   ├── IDSError                    IDS error; also unknown codes / non-JSON bodies
    │   │   ├── IDSBadRequestError              BadRequestException (400)
    │   │   ├── IDSDataNotOnlineError           DataNotOnlineException (503)
    │   │   ├── IDSInsufficientPrivilegesError  InsufficientPrivilegesException (403)
    │   │   ├── IDSInsufficientStorageError     InsufficientStorageException (500)
    │   │   ├── IDSInternalError                InternalException (500)
    │   │   ├── IDSNotFoundError                NotFoundException (404)
    │   │   ├── IDSNotImplementedError          NotImplementedException (501)
    │   │   └── IDSResponseError        the response is unusable: checksum mismatch,
    │   │       │                       bad body, wrong byte count
    │   │       └── TruncatedStreamError  body ended before its announced length
    │   │                                 (also a ConnectionLostError, see below)
    │   └── ICATError                   ICAT error; also unknown codes / non-JSON bodies
    │       ├── ICATParameterError              BAD_PARAMETER (400)
    │       ├── ICATSessionError                SESSION (403)
    │       ├── ICATPrivilegesError             INSUFFICIENT_PRIVILEGES (403)
    │       ├── ICATNoObjectError               NO_SUCH_OBJECT_FOUND (404)
    │       ├── ICATObjectExistsError           OBJECT_ALREADY_EXISTS (412)
    │       ├── ICATValidationError             VALIDATION (412)
    │       ├── ICATInternalError               INTERNAL (500)
    │       ├── ICATNotImplementedError         NOT_IMPLEMENTED (501)
    │       └── ICATResponseError       the ICAT response is unusable (bad JSON, ...)
    ├── TransferError                   the mount could not deliver a datafile's bytes
    │   │                               (idsfs.transfer; .datafile_id, .errno for FUSE)
    │   ├── RestoreTimeoutError         archived data not online within --restore-wait (ENODATA)
    │   ├── RestoreFailedError          the IDS reports "Restore failed" for it (EIO)
    │   ├── DataBusyError               "Data is busy" (a lock) outlasted the retries (EBUSY)
    │   ├── IncompleteDownloadError     the stream ended early or broke and could not be
    │   │                               resumed within the bound (EIO)
    │   └── ChecksumMismatchError       the bytes read differ from the ICAT CRC32 (EIO)
    ├── UploadError                     a change through the mount could not be made
    │   │                               (idsfs.upload, idsfs.fs; .errno for FUSE)
    │   ├── UploadFailedError           the upload did not land (yet); the spool is kept as a
    │   │                               pending or failed upload (EIO)
    │   ├── SpoolError                  the local spool could not be written (its errno,
    │   │                               e.g. ENOSPC)
    │   └── MissingTypeError            the facility has no DatafileFormat / DatasetType of
    │                                   the configured name (ENOTSUP)
    ├── TransportError                  no (complete) answer from the server
    │   ├── ConnectError                connection refused, name not resolved, proxy
    │   ├── TransportTimeoutError       connect or read timeout (also a TimeoutError)
    │   ├── TLSError                    TLS handshake or certificate failure
    │   └── ConnectionLostError         connection reset / closed in mid-answer
    │       └── TruncatedStreamError    (see above)
    └── VersionMethodError              the server is too old for the called method

The names, and the base relations that python-icat's ``icat.exception`` has,
are kept, so ``except icat.exception.IDSNotFoundError`` becomes
``except idsfs.errors.IDSNotFoundError``. Differences from python-icat:
:class:`IDSResponseError` derives from :class:`IDSError` (python-icat: from
its private base), and an error body that is not JSON or carries an unknown
code gives a plain :class:`IDSError`/:class:`ICATError` with the HTTP status
instead of ``urllib.error.HTTPError``.

No message, ``str()`` or ``repr()`` of these exceptions contains a session
id or a preparedId (whoever holds a preparedId can download its data without
a session): callers build messages through :func:`redact`.
"""

from __future__ import annotations

import errno as _errno
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "ChecksumMismatchError",
    "ConnectError",
    "ConnectionLostError",
    "DataBusyError",
    "ICATError",
    "ICATInternalError",
    "ICATNoObjectError",
    "ICATNotImplementedError",
    "ICATObjectExistsError",
    "ICATParameterError",
    "ICATPrivilegesError",
    "ICATResponseError",
    "ICATSessionError",
    "ICATValidationError",
    "IDSBadRequestError",
    "IDSDataNotOnlineError",
    "IDSError",
    "IDSInsufficientPrivilegesError",
    "IDSInsufficientStorageError",
    "IDSInternalError",
    "IDSNotFoundError",
    "IDSNotImplementedError",
    "IDSResponseError",
    "IdsfsError",
    "IncompleteDownloadError",
    "MissingTypeError",
    "RestoreFailedError",
    "RestoreTimeoutError",
    "ServerError",
    "SpoolError",
    "TLSError",
    "TransferError",
    "TransportError",
    "TransportTimeoutError",
    "TruncatedStreamError",
    "UploadError",
    "UploadFailedError",
    "VersionMethodError",
    "icat_error_from_response",
    "ids_error_from_response",
    "redact",
]


class IdsfsError(Exception):
    """Base class of every exception idsfs raises on purpose.

    ``repeated`` is True on a failure answered again, unchanged, to another
    read of the same range (the read path's hold of a failed read, see
    :mod:`idsfs.transfer`): said once in the log, not once per read.
    """

    repeated: bool = False


# ----------------------------------------------------------------------------
# Redaction


_SECRET_PARAM = re.compile(r"((?:sessionId|preparedId|password)=)[^&\s#\"']*", re.IGNORECASE)
_SESSION_PATH = re.compile(r"(/session/)[^/?\s#\"']+")
_JSON_SECRET = re.compile(r'("(?:sessionId|preparedId|password)"\s*:\s*")[^"]*(")',
                          re.IGNORECASE)
# IDS messages quote the preparedId they were given ("The preparedId <id> is not known")
# (a word with a digit: an id, not "preparedId is" or "preparedId parameter")
_PREPARED_IN_TEXT = re.compile(r"(\bpreparedId\s+)(?=[^\s,;\"']*\d)[^\s,;\"']+",
                               re.IGNORECASE)
REDACTED = "***"


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Return ``text`` with session ids and other secrets replaced by ``***``.

    Removes the values of ``sessionId=``, ``preparedId=`` and ``password=``
    parameters in URLs and form bodies, the id in ICAT ``/session/<id>``
    paths, ``"sessionId"``/``"preparedId"``/``"password"`` values in JSON
    text, an id after the word "preparedId" in prose (IDS: "The preparedId
    <id> is not known"), and every occurrence of each string in ``secrets`` (e.g. the
    current session id, which ICAT quotes in its SESSION error messages, or
    the preparedId a request sent). Never raises.
    """
    out = _SECRET_PARAM.sub(r"\1" + REDACTED, text)
    out = _SESSION_PATH.sub(r"\1" + REDACTED, out)
    out = _JSON_SECRET.sub(r"\1" + REDACTED + r"\2", out)
    out = _PREPARED_IN_TEXT.sub(r"\1" + REDACTED, out)
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = out.replace(secret, REDACTED)
    return out


# ----------------------------------------------------------------------------
# Errors reported by a server


class ServerError(IdsfsError):
    """An error answer from the ICAT or the IDS server.

    Attributes: ``message`` (the server's text, session ids redacted),
    ``type`` (the wire ``code``, e.g. ``"NotFoundException"`` or
    ``"SESSION"``; ``None`` if the body had none), ``code`` (alias of
    ``type``), ``status`` (HTTP status or ``None``) and ``offset`` (ICAT's
    index of the offending entity, else ``None``).

    Construct with a message string, or - as python-icat does - with a
    mapping holding ``code``, ``message`` and optionally ``offset``.

    Constructing one raises ``TypeError`` when ``error`` is neither a string
    nor a mapping.
    """

    def __init__(
        self,
        error: str | Mapping[str, Any],
        status: int | None = None,
        *,
        type: str | None = None,
        offset: int | None = None,
    ) -> None:
        if isinstance(error, Mapping):
            message = str(error.get("message", ""))
            code = error.get("code")
            type = str(code) if code is not None else type
            if offset is None:
                offset = error.get("offset")
        elif isinstance(error, str):
            message = error
        else:
            raise TypeError(f"invalid error argument type {type_name(error)}")
        super().__init__(message)
        self.message: str = message
        self.type: str | None = type
        self.status: int | None = status
        self.offset: int | None = _clean_offset(offset)

    @property
    def code(self) -> str | None:
        """The wire error code (same as :attr:`type`). Never raises."""
        return self.type

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(message={self.message!r}, type={self.type!r}, "
            f"status={self.status!r}, offset={self.offset!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_server_error,
            (self.__class__, self.message, self.status, self.type, self.offset),
        )


def _rebuild_server_error(
    cls: type[ServerError], message: str, status: int | None, typ: str | None, offset: int | None
) -> ServerError:
    exc = cls.__new__(cls)
    ServerError.__init__(exc, message, status, type=typ, offset=offset)
    return exc


def type_name(obj: object) -> str:
    """Return the name of ``obj``'s type, for error messages. Never raises."""
    return type(obj).__name__


def _clean_offset(offset: Any) -> int | None:
    if offset is None:
        return None
    try:
        value = int(offset)
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


class IDSError(ServerError):
    """An error reported by the IDS server (base of all IDS errors).

    Raised as such, with the HTTP status, when the error body is not JSON or
    its ``code`` is not one of the IDS exception names (e.g. the
    ``NOT_IMPLEMENTED`` answer to an unknown path).
    """


class IDSBadRequestError(IDSError):
    """``BadRequestException`` (HTTP 400): a malformed or missing parameter.

    Raised by :class:`~idsfs.ids.IDSClient` calls.
    """


class IDSDataNotOnlineError(IDSError):
    """``DataNotOnlineException`` (HTTP 503): data archived (a restore was
    queued) or locked by another operation ("Data is busy").

    Raised by :class:`~idsfs.ids.IDSClient` calls.
    """

    @property
    def busy(self) -> bool:
        """True for "Data is busy" (a lock that clears by itself), False for data
        that is not online (archived). Never raises."""
        return "busy" in self.message.lower()


class IDSInsufficientPrivilegesError(IDSError):
    """``InsufficientPrivilegesException`` (HTTP 403): access denied or the
    session is unknown/expired. Raised by :class:`~idsfs.ids.IDSClient` calls.
    """


class IDSInsufficientStorageError(IDSError):
    """``InsufficientStorageException``: storage full or quota exceeded.

    Raised by :class:`~idsfs.ids.IDSClient` calls.
    """


class IDSInternalError(IDSError):
    """``InternalException`` (HTTP 500): server failure, also "Restore failed".

    Raised by :class:`~idsfs.ids.IDSClient` calls.
    """


class IDSNotFoundError(IDSError):
    """``NotFoundException`` (HTTP 404): unknown datafile, dataset or preparedId.

    Raised by :class:`~idsfs.ids.IDSClient` calls.
    """


class IDSNotImplementedError(IDSError):
    """``NotImplementedException`` (HTTP 501): feature disabled on this server
    (read-only, single-level storage, links). Raised by :class:`~idsfs.ids.IDSClient` calls.
    """


class IDSResponseError(IDSError):
    """The IDS answered, but the answer cannot be used: a ``put`` checksum or
    size mismatch, a body that is not what the call returns, a byte count
    that differs from the expected size.

    ``datafile_id``: after a ``put`` mismatch, the id of the datafile the
    server registered with the wrong content (so the caller can delete it);
    else ``None``.

    Raised by :class:`~idsfs.ids.IDSClient` calls and the tools built on them
    (:mod:`idsfs.getput`, :mod:`idsfs.download`).
    """

    datafile_id: int | None = None


class ICATError(ServerError):
    """An error reported by the ICAT server (base of all ICAT errors).

    Raised as such, with the HTTP status, when the error body is not JSON or
    its ``code`` is unknown.
    """


class ICATParameterError(ICATError):
    """``BAD_PARAMETER`` (HTTP 400): bad query, unknown field, malformed JSON.

    Raised by :class:`~idsfs.icat.ICATClient` calls.
    """


class ICATSessionError(ICATError):
    """``SESSION`` (HTTP 403): unknown or expired session, failed login.

    Raised by :class:`~idsfs.icat.ICATClient` calls.
    """


class ICATPrivilegesError(ICATError):
    """``INSUFFICIENT_PRIVILEGES`` (HTTP 403): authorisation rules deny it.

    Raised by :class:`~idsfs.icat.ICATClient` calls.
    """


class ICATNoObjectError(ICATError):
    """``NO_SUCH_OBJECT_FOUND`` (HTTP 404): the object does not exist.

    Raised by :class:`~idsfs.icat.ICATClient` calls.
    """


class ICATObjectExistsError(ICATError):
    """``OBJECT_ALREADY_EXISTS`` (HTTP 412): uniqueness constraint violated.

    Raised by :class:`~idsfs.icat.ICATClient` calls.
    """


class ICATValidationError(ICATError):
    """``VALIDATION`` (HTTP 412): missing field, too long, too many results.

    Raised by :class:`~idsfs.icat.ICATClient` calls.
    """


class ICATInternalError(ICATError):
    """``INTERNAL`` (HTTP 500): unexpected server or database failure.

    Raised by :class:`~idsfs.icat.ICATClient` calls.
    """


class ICATNotImplementedError(ICATError):
    """``NOT_IMPLEMENTED`` (HTTP 501): no such operation on this ICAT server.

    Raised by :class:`~idsfs.icat.ICATClient` calls.
    """


class ICATResponseError(ICATError):
    """The ICAT answered, but the answer cannot be used (not JSON, wrong shape).

    Raised by :class:`~idsfs.icat.ICATClient` and :mod:`idsfs.catalog`.
    """


# ----------------------------------------------------------------------------
# Transport errors


class TransportError(IdsfsError):
    """No complete answer could be obtained from the server.

    ``url`` is the request URL with secrets redacted (or ``None``).
    Whether the call may be repeated is the caller's decision; the clients
    already retried idempotent calls before raising this (see docs/client.md).

    Raised (as one of its subclasses) by the ICAT and IDS clients.
    """

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url: str | None = url


class ConnectError(TransportError):
    """The connection could not be opened: refused, unreachable, DNS or proxy
    failure. Nothing reached the server. Raised by the ICAT and IDS clients.
    """


class TransportTimeoutError(TransportError, TimeoutError):
    """A connect or read timeout expired (the server stalled).

    Raised by the ICAT and IDS clients.
    """


class TLSError(TransportError):
    """TLS handshake or certificate verification failed. Raised by the ICAT and IDS clients."""


class ConnectionLostError(TransportError):
    """The connection broke while the request or the answer was in transit
    (reset, closed early, malformed framing). Raised by the ICAT and IDS clients.
    """


class TruncatedStreamError(IDSResponseError, ConnectionLostError):
    """A ``getData`` body ended before the length the server announced.

    Both an :class:`IDSResponseError` (short stream) and a
    :class:`ConnectionLostError` (the cause is a broken connection, so a
    resumed download may succeed). ``received`` and ``expected`` count
    bytes of this response. Raised by the reads of a :class:`~idsfs.ids.DataStream`.
    """

    def __init__(self, message: str, received: int, expected: int | None) -> None:
        IDSResponseError.__init__(self, message)
        self.url = None
        self.received = received
        self.expected = expected


# ----------------------------------------------------------------------------
# Errors of the mount's read path (idsfs.transfer)


class TransferError(IdsfsError):
    """The mount could not deliver the bytes of a datafile.

    Raised by :mod:`idsfs.transfer`; the original server or transport error,
    if any, is the ``__cause__``. ``datafile_id`` names the datafile and the
    class attribute ``errno`` is the error number a FUSE read returns for it.
    Messages never contain session or prepared ids.
    """

    errno: int = _errno.EIO

    def __init__(self, message: str, datafile_id: int | None = None) -> None:
        super().__init__(message)
        self.datafile_id = datafile_id


class RestoreTimeoutError(TransferError):
    """Archived data was still not online after the configured wait
    (``--restore-wait``); the restore goes on in the IDS, so trying again
    later may succeed (``ENODATA``, "No data available"; not ``EAGAIN``, which
    Python's buffered files mistake for "would block" and turn into a short
    read). ``waited`` is the time waited in seconds. Raised by :mod:`idsfs.transfer`.
    """

    errno = _errno.ENODATA

    def __init__(self, message: str, datafile_id: int | None = None, waited: float = 0.0) -> None:
        super().__init__(message, datafile_id)
        self.waited = waited


class RestoreFailedError(TransferError):
    """The IDS recorded that restoring the datafile from archive storage
    failed (IDS 500 ``Restore failed``); ``EIO``. The next read prepares the
    file again, which makes the IDS retry the restore. Raised by :mod:`idsfs.transfer`.
    """

    errno = _errno.EIO


class DataBusyError(TransferError):
    """The IDS kept answering ``Data is busy`` (another operation holds a lock
    on the dataset) beyond the retry bound (``EBUSY``). Raised by :mod:`idsfs.transfer`.
    """

    errno = _errno.EBUSY


class IncompleteDownloadError(TransferError):
    """A download ended before the datafile's size or broke, and resuming it
    at the offset reached did not succeed within the bound (``EIO``).
    ``offset`` is the file offset that could not be read. Raised by :mod:`idsfs.transfer`.
    """

    errno = _errno.EIO

    def __init__(self, message: str, datafile_id: int | None = None, offset: int = 0) -> None:
        super().__init__(message, datafile_id)
        self.offset = offset


class ChecksumMismatchError(TransferError):
    """The CRC32 of a datafile read from start to end differs from its ICAT
    ``checksum`` (``EIO``): the bytes cannot be trusted. ``expected`` and
    ``actual`` are lower-case hex. Raised by :mod:`idsfs.transfer`.
    """

    errno = _errno.EIO

    def __init__(
        self, message: str, datafile_id: int | None = None, expected: str = "", actual: str = ""
    ) -> None:
        super().__init__(message, datafile_id)
        self.expected = expected
        self.actual = actual


# ----------------------------------------------------------------------------
# Errors of the mount's write path (idsfs.upload, idsfs.fs)


class UploadError(IdsfsError):
    """A change through the mount (an upload, a spool write, a new dataset) failed.

    The class attribute ``errno`` is the error number the file system returns
    for it; the original server, transport or OS error, if any, is the
    ``__cause__``. Messages never contain session ids.

    Raised (as one of its subclasses) by :mod:`idsfs.upload` and :mod:`idsfs.fs`.
    """

    errno: int = _errno.EIO


class UploadFailedError(UploadError):
    """An upload did not land in IDS (yet): ``close`` fails with ``EIO``.

    Nothing is lost: the spooled bytes stay on local disk as a pending upload
    (retried in the background) or, when retrying cannot help, as a failed
    one. ``state`` is ``"pending"``, ``"failed"`` or ``"conflict"``;
    ``reason`` says why in words. Raised by :mod:`idsfs.upload`.
    """

    errno = _errno.EIO

    def __init__(self, message: str, state: str = "pending", reason: str = "") -> None:
        super().__init__(message)
        self.state = state
        self.reason = reason or message


class SpoolError(UploadError):
    """The local spool file of a file being written could not be created,
    written or read (full disk, I/O error). ``errno`` is the OS error's
    (``ENOSPC`` for a full spool disk), else ``EIO``. Raised by :mod:`idsfs.upload`.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno:
            self.errno = errno


class MissingTypeError(UploadError):
    """The facility has no DatafileFormat (``--datafile-format``) or DatasetType
    (``--dataset-type``) of the configured name, so nothing can be created
    there (``ENOTSUP``). The message names what is missing and what exists.

    Raised by :mod:`idsfs.upload` and :mod:`idsfs.catalog`.
    """

    errno = _errno.ENOTSUP


# ----------------------------------------------------------------------------
# Client-side version check


class VersionMethodError(IdsfsError):
    """The called method (or this use of it) needs a newer server version.

    Raised by :class:`~idsfs.ids.IDSClient` calls.
    """

    def __init__(self, method: str, version: object = None, service: str = "ICAT") -> None:
        where = f"this {service} version" if version is None else f"{service} version {version}"
        super().__init__(f"{method} is not supported in {where}.")
        self.method = method
        self.version = version
        self.service = service


# ----------------------------------------------------------------------------
# Translation of error responses

IDS_ERROR_TYPES: dict[str, type[IDSError]] = {
    "BadRequestException": IDSBadRequestError,
    "DataNotOnlineException": IDSDataNotOnlineError,
    "InsufficientPrivilegesException": IDSInsufficientPrivilegesError,
    "InsufficientStorageException": IDSInsufficientStorageError,
    "InternalException": IDSInternalError,
    "NotFoundException": IDSNotFoundError,
    "NotImplementedException": IDSNotImplementedError,
}
"""IDS wire ``code`` -> exception class."""

ICAT_ERROR_TYPES: dict[str, type[ICATError]] = {
    "BAD_PARAMETER": ICATParameterError,
    "SESSION": ICATSessionError,
    "INSUFFICIENT_PRIVILEGES": ICATPrivilegesError,
    "NO_SUCH_OBJECT_FOUND": ICATNoObjectError,
    "OBJECT_ALREADY_EXISTS": ICATObjectExistsError,
    "VALIDATION": ICATValidationError,
    "INTERNAL": ICATInternalError,
    "NOT_IMPLEMENTED": ICATNotImplementedError,
}
"""ICAT wire ``code`` -> exception class."""

_MAX_BODY_IN_MESSAGE = 200


def _from_response(
    status: int,
    body: bytes,
    reason: str,
    table: Mapping[str, type[ServerError]],
    base: type[ServerError],
    secrets: Iterable[str | None],
) -> ServerError:
    secrets = tuple(secrets)
    text = body.decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        doc = None
    if isinstance(doc, Mapping) and "message" in doc:
        code = doc.get("code")
        cls = table.get(code, base) if isinstance(code, str) else base
        return cls(
            redact(str(doc["message"]), secrets),
            status,
            type=str(code) if code is not None else None,
            offset=doc.get("offset"),
        )
    snippet = text.strip()
    if len(snippet) > _MAX_BODY_IN_MESSAGE:
        snippet = snippet[:_MAX_BODY_IN_MESSAGE] + "..."
    message = f"HTTP {status} {reason}".rstrip()
    if snippet:
        message += f": {snippet}"
    return base(redact(message, secrets), status)


def ids_error_from_response(
    status: int, body: bytes, reason: str = "", secrets: Iterable[str | None] = ()
) -> IDSError:
    """Build the :class:`IDSError` subclass for an IDS error response.

    ``body`` is decoded as UTF-8 and parsed as JSON whatever the content type;
    a known ``code`` selects the class, anything else gives a plain
    :class:`IDSError` carrying ``status``. Occurrences of ``secrets`` (the
    client passes the session id and the preparedId of the request), session
    ids and preparedIds in the message are redacted. Never raises.
    """
    exc = _from_response(status, body, reason, IDS_ERROR_TYPES, IDSError, secrets)
    assert isinstance(exc, IDSError)
    return exc


def icat_error_from_response(
    status: int, body: bytes, reason: str = "", secrets: Iterable[str | None] = ()
) -> ICATError:
    """Build the :class:`ICATError` subclass for an ICAT error response.

    Same rules as :func:`ids_error_from_response`; ``offset`` is kept when
    the body has a non-negative one. Never raises.
    """
    exc = _from_response(status, body, reason, ICAT_ERROR_TYPES, ICATError, secrets)
    assert isinstance(exc, ICATError)
    return exc

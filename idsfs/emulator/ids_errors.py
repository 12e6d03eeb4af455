"""IDS exceptions of the emulator (ids-protocol.md §2) and the ICAT-to-IDS error mapping.

Every IDS error answers with JSON ``{"code": <Java simple class name>, "message": ...}`` and
the status of its class. :func:`from_icat` translates a catalogue ``ICATException`` by the
general rule of ids-protocol.md §2.3.

Public API: :class:`IdsError` and one subclass per wire code, :func:`from_icat`,
:data:`RESTORE_FAILED`, :data:`DATA_BUSY`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DATA_BUSY",
    "RESTORE_FAILED",
    "BadRequest",
    "DataNotOnline",
    "IdsError",
    "InsufficientPrivileges",
    "InsufficientStorage",
    "Internal",
    "NotFound",
    "NotImplementedYet",
    "from_icat",
]

#: exact message of the recorded-restore-failure condition (clients compare it)
RESTORE_FAILED = "Restore failed"
#: message of the DataNotOnline raised when a dataset lock cannot be obtained
DATA_BUSY = "Data is busy"


class IdsError(Exception):
    """An IDS error: ``code`` (wire value), ``status`` (HTTP) and ``message``.

    Raised by the IDS handlers; the router answers it with :meth:`payload` and
    :attr:`status`. Constructing one never raises.
    """

    code = "InternalException"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def payload(self) -> dict[str, Any]:
        """The JSON error body. Never raises."""
        return {"code": self.code, "message": self.message}


class BadRequest(IdsError):
    """400 ``BadRequestException``. Raised by the IDS handlers."""

    code = "BadRequestException"
    status = 400


class InsufficientPrivileges(IdsError):
    """403 ``InsufficientPrivilegesException``. Raised by the IDS handlers."""

    code = "InsufficientPrivilegesException"
    status = 403


class NotFound(IdsError):
    """404 ``NotFoundException``. Raised by the IDS handlers."""

    code = "NotFoundException"
    status = 404


class Internal(IdsError):
    """500 ``InternalException``. Raised by the IDS handlers."""

    code = "InternalException"
    status = 500


class InsufficientStorage(IdsError):
    """500 ``InsufficientStorageException`` (defined by the protocol, never raised)."""

    code = "InsufficientStorageException"
    status = 500


class NotImplementedYet(IdsError):
    """501 ``NotImplementedException``. Raised by the IDS handlers."""

    code = "NotImplementedException"
    status = 501


class DataNotOnline(IdsError):
    """503 ``DataNotOnlineException``. Raised by the IDS handlers."""

    code = "DataNotOnlineException"
    status = 503


def from_icat(
    exc: Any, *, validation_is_bad_request: bool = False, bad_parameter_is_bad_request: bool = False
) -> IdsError:
    """Translate an ICATException (anything with ``code``/``message``) to an IDS error.

    SESSION and INSUFFICIENT_PRIVILEGES give 403, NO_SUCH_OBJECT_FOUND 404; VALIDATION and
    BAD_PARAMETER give 400 only when asked (``put`` registration, ``getLink``); everything
    else 500 with a message starting with the ICAT type. Never raises.
    """
    code = str(getattr(exc, "code", "INTERNAL"))
    message = str(getattr(exc, "message", exc))
    if code in ("SESSION", "INSUFFICIENT_PRIVILEGES"):
        return InsufficientPrivileges(message)
    if code == "NO_SUCH_OBJECT_FOUND":
        return NotFound(message)
    if code == "VALIDATION" and validation_is_bad_request:
        return BadRequest(message)
    if code == "BAD_PARAMETER" and bad_parameter_is_bad_request:
        return BadRequest(message)
    return Internal(f"{code} {message}")

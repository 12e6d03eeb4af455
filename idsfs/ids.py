"""IDSClient and DataSelection: python-icat's ``icat.ids`` API on ``requests``.

Code written for python-icat works by changing the import::

    from idsfs.ids import DataSelection, IDSClient

    ids = IDSClient("https://ids.example.org/ids", sessionId=session_id)
    sel = DataSelection({"datafileIds": [42]})
    with ids.getData(sel) as stream:
        data = stream.read()

Every method of ``icat.ids.IDSClient`` is here with the same name, parameters,
defaults and return type (see ``ids-protocol.md`` §11); errors are the
classes of :mod:`idsfs.errors` with python-icat's names. Beyond python-icat:
pooled connections, connect/read timeouts (``timeout=``), retries of
idempotent calls (``retries=``), a fast streaming :class:`DataStream` for
``getData``, and session ids redacted from every log line, message and repr.

Thread safety: one IDSClient may be used from several threads at once; the
only mutable state is the ``sessionId`` attribute, which may be replaced at
any time (a call uses the value it read when it started).
"""

from __future__ import annotations

import contextlib
import getpass
import http.client
import io
import json
import logging
import os
import re
import socket
import ssl
import stat
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, BinaryIO
from urllib.parse import urlencode

import requests
import urllib3.exceptions

from idsfs import _http
from idsfs._crc import crc32
from idsfs._http import DEFAULT_BACKOFF, DEFAULT_RETRIES, DEFAULT_TIMEOUT, Timeout
from idsfs.errors import (
    ConnectionLostError,
    IDSDataNotOnlineError,
    IDSError,
    IDSResponseError,
    ServerError,
    TruncatedStreamError,
    VersionMethodError,
    ids_error_from_response,
    redact,
)

__all__ = ["DataSelection", "DataStream", "FileChunk", "IDSClient", "Version"]

log = logging.getLogger("idsfs.ids")

#: Block size for reading getData streams and sending put bodies.
BLOCK_SIZE = 1 << 20

_NO_CACHE = {"Cache-Control": "no-cache", "Pragma": "no-cache"}


# ----------------------------------------------------------------------------
# Version


class Version:
    """A server version such as ``2.1.1`` or ``2.1.2-SNAPSHOT``, comparable
    with other Versions and with version strings (``v < "1.11.0"``).

    A ``-SNAPSHOT`` (or other ``-suffix``) release sorts before the release
    itself, as in python-icat. Raises ``ValueError`` for text without a
    leading dotted number.
    """

    _PATTERN = re.compile(r"^\s*v?(\d+(?:\.\d+)*)(?:[-.]?(.*?))?\s*$")

    def __init__(self, version: str) -> None:
        match = self._PATTERN.match(str(version))
        if not match:
            raise ValueError(f"invalid version {version!r}")
        self.text = str(version).strip()
        numbers = [int(x) for x in match.group(1).split(".")]
        while len(numbers) > 1 and numbers[-1] == 0:
            numbers.pop()
        self._release = tuple(numbers)
        self._pre = match.group(2) or ""

    def _key(self) -> tuple[tuple[int, ...], int, str]:
        return (self._release, 0 if self._pre else 1, self._pre)

    @staticmethod
    def _coerce(other: object) -> Version | None:
        if isinstance(other, Version):
            return other
        if isinstance(other, str):
            return Version(other)
        return None

    def __eq__(self, other: object) -> bool:
        o = self._coerce(other)
        return NotImplemented if o is None else self._key() == o._key()

    def __lt__(self, other: object) -> bool:
        o = self._coerce(other)
        return NotImplemented if o is None else self._key() < o._key()

    def __le__(self, other: object) -> bool:
        o = self._coerce(other)
        return NotImplemented if o is None else self._key() <= o._key()

    def __gt__(self, other: object) -> bool:
        o = self._coerce(other)
        return NotImplemented if o is None else self._key() > o._key()

    def __ge__(self, other: object) -> bool:
        o = self._coerce(other)
        return NotImplemented if o is None else self._key() >= o._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Version({self.text!r})"


# ----------------------------------------------------------------------------
# DataSelection

_SELECTION_KEYS = {"investigationIds": "invIds", "datasetIds": "dsIds", "datafileIds": "dfIds"}


def _as_id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"invalid {what} {value!r}: expected an integer id")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"invalid {what} {value!r}: expected an integer id") from None


class DataSelection:
    """A set of investigation, dataset and datafile ids to pass to IDS calls.

    ``objs`` is passed to :meth:`extend` (and raises what it raises). The
    three sets are the attributes ``invIds``, ``dsIds`` and ``dfIds``.
    """

    def __init__(self, objs: Any = None) -> None:
        self.invIds: set[int] = set()
        self.dsIds: set[int] = set()
        self.dfIds: set[int] = set()
        if objs:
            self.extend(objs)

    def __len__(self) -> int:
        return len(self.invIds) + len(self.dsIds) + len(self.dfIds)

    def __str__(self) -> str:
        return f"{{invIds:{self.invIds}, dsIds:{self.dsIds}, dfIds:{self.dfIds}}}"

    def __repr__(self) -> str:
        return (
            f"DataSelection({{'investigationIds': {sorted(self.invIds)}, "
            f"'datasetIds': {sorted(self.dsIds)}, 'datafileIds': {sorted(self.dfIds)}}})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataSelection):
            return NotImplemented
        return (self.invIds, self.dsIds, self.dfIds) == (other.invIds, other.dsIds, other.dfIds)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def extend(self, objs: Any) -> None:
        """Add ``objs`` to the selection.

        ``objs`` is another DataSelection (union); a mapping with any of the
        keys ``investigationIds``, ``datasetIds``, ``datafileIds`` whose
        values are iterables of integer ids; or an iterable of entity objects
        (anything with ``BeanName`` and ``id``: :mod:`idsfs.model` objects or
        python-icat entities) of type Investigation, Dataset, Datafile or
        DataCollection (which contributes its linked datasets, datafiles and
        investigations). A single entity object is accepted too.

        Raises ``ValueError`` for an unknown entity type, an unknown mapping
        key or an id that is not an integer; ``TypeError`` for an element
        that is not an entity, or any other argument type. Nothing is added
        when an error is raised.
        """
        inv: set[int] = set()
        ds: set[int] = set()
        df: set[int] = set()
        if isinstance(objs, DataSelection):
            inv, ds, df = set(objs.invIds), set(objs.dsIds), set(objs.dfIds)
        elif isinstance(objs, Mapping):
            unknown = set(objs) - set(_SELECTION_KEYS)
            if unknown:
                raise ValueError(
                    f"unknown key(s) {sorted(map(str, unknown))} in selection; expected "
                    "investigationIds, datasetIds, datafileIds"
                )
            targets = {"investigationIds": inv, "datasetIds": ds, "datafileIds": df}
            for key, ids in objs.items():
                if ids is None:
                    continue
                if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
                    ids = [ids]
                targets[key].update(_as_id(i, key[:-1]) for i in ids)
        elif hasattr(objs, "BeanName"):
            self._add_entity(objs, inv, ds, df)
        elif isinstance(objs, str | bytes):
            raise TypeError(
                "objs must be a DataSelection, a dict of ids or a list of entity objects, "
                f"not {type(objs).__name__} (a preparedId is passed to the IDS call directly)"
            )
        elif isinstance(objs, Iterable):
            for obj in objs:
                if not hasattr(obj, "BeanName"):
                    raise TypeError(f"invalid object type {type(obj).__name__!r} in selection")
                self._add_entity(obj, inv, ds, df)
        else:
            raise TypeError(
                "objs must be a DataSelection, a dict of ids or a list of entity objects, "
                f"not {type(objs).__name__}"
            )
        self.invIds |= inv
        self.dsIds |= ds
        self.dfIds |= df

    @staticmethod
    def _add_entity(obj: Any, inv: set[int], ds: set[int], df: set[int]) -> None:
        bean = obj.BeanName
        if bean == "Investigation":
            inv.add(_entity_id(obj))
        elif bean == "Dataset":
            ds.add(_entity_id(obj))
        elif bean == "Datafile":
            df.add(_entity_id(obj))
        elif bean == "DataCollection":
            for link in getattr(obj, "dataCollectionDatasets", None) or ():
                if getattr(link, "dataset", None) is not None:
                    ds.add(_entity_id(link.dataset))
            for link in getattr(obj, "dataCollectionDatafiles", None) or ():
                if getattr(link, "datafile", None) is not None:
                    df.add(_entity_id(link.datafile))
            try:
                links = getattr(obj, "dataCollectionInvestigations", None) or ()
            except AttributeError:  # python-icat entity of an ICAT < 5 schema
                links = ()
            for link in links:
                if getattr(link, "investigation", None) is not None:
                    inv.add(_entity_id(link.investigation))
        else:
            raise ValueError(f"invalid object {bean!r}: not an Investigation, Dataset, "
                             "Datafile or DataCollection")

    def fillParams(self, params: dict[str, Any]) -> None:
        """Add ``investigationIds``/``datasetIds``/``datafileIds`` to ``params``.

        Each non-empty set becomes a comma-joined string of ids (ascending);
        empty sets add nothing. Never raises for a dict (only what
        ``params.__setitem__`` may raise for another mapping).
        """
        if self.invIds:
            params["investigationIds"] = ",".join(str(i) for i in sorted(self.invIds))
        if self.dsIds:
            params["datasetIds"] = ",".join(str(i) for i in sorted(self.dsIds))
        if self.dfIds:
            params["datafileIds"] = ",".join(str(i) for i in sorted(self.dfIds))


def _entity_id(obj: Any) -> int:
    value = getattr(obj, "id", None)
    if value is None:
        raise ValueError(f"{getattr(obj, 'BeanName', type(obj).__name__)} object has no id")
    return _as_id(value, "id")


# ----------------------------------------------------------------------------
# getData stream


def _check_encoding(stream: DataStream, endpoint: str) -> None:
    """Raise IDSResponseError (closing ``stream``) when its body is content-encoded.

    The client asks for ``Accept-Encoding: identity`` and hands the body out
    as the file's bytes: a ``Content-Encoding`` other than ``identity`` (a
    proxy that compresses anyway) would pass gzip or other encoded bytes off as
    the data.
    """
    encoding = (stream.headers.get("Content-Encoding") or "").strip()
    if encoding and any(part.strip().lower() != "identity" for part in encoding.split(",")):
        stream.close()
        raise IDSResponseError(
            f"{endpoint}: the answer has Content-Encoding {redact(encoding[:50])!r}, not the "
            "data's own bytes (identity was asked for; a proxy in between?)"
        )


_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(?:\d+|\*)\s*", re.IGNORECASE)


def _check_range(stream: DataStream, offset: int) -> None:
    """Raise IDSResponseError (closing ``stream``) unless its body starts at ``offset``.

    The IDS answers a ``Range: bytes=N-`` request with 206 (zips too; an offset
    past the end gives an empty 206) and no ``Content-Range``; a 200 carries the
    whole body from byte 0. A ``Content-Range`` (from a proxy or another server)
    must be ``bytes <offset>-<last>/<size or *>``, agreeing with a
    ``Content-Length``.
    """
    problem = None
    if stream.status != 206:
        problem = f"answered {stream.status}, not 206 (the body would start at byte 0)"
    elif (content_range := stream.headers.get("Content-Range")) is not None:
        shown = redact(content_range[:80])
        match = _CONTENT_RANGE.fullmatch(content_range)
        if match is None:
            problem = f"sent a Content-Range that is not a byte range ({shown!r})"
        elif int(match.group(1)) != offset:
            problem = f"sent bytes from {match.group(1)} ({shown!r})"
        elif int(match.group(2)) < offset:
            problem = f"sent an empty or reversed Content-Range ({shown!r})"
        elif (stream.content_length is not None
              and stream.content_length != int(match.group(2)) - offset + 1):
            problem = (f"sent {stream.content_length} bytes (Content-Length) for the range "
                       f"{shown!r}")
    if problem is not None:
        stream.close()
        raise IDSResponseError(f"getData from offset {offset}: the server {problem}")


class DataStream(io.RawIOBase):
    """The body of a ``getData`` answer, read as it arrives.

    A binary file object: ``read(n)``, ``readinto(b)`` (fills ``b``
    completely unless the stream ends), ``readall()``, iteration (yields
    blocks of up to 1 MiB as ``bytes`` - not lines), ``copyto(file)`` and use
    as a context manager. Never holds the whole body in memory. Large reads
    of a plain-HTTP body with a ``Content-Length`` take the bytes from the
    socket directly (one blocking ``recv`` per buffer, see
    :meth:`_readinto_direct`).

    Attributes: ``status`` (200, or 206 for an offset), ``headers``,
    ``content_length`` (``Content-Length`` or ``None`` when chunked),
    ``length`` (bytes left according to ``Content-Length``), ``offset`` (the
    requested start offset) and ``bytes_read``. ``getheader``, ``info`` and
    ``geturl`` mirror ``http.client.HTTPResponse`` as python-icat returns it.

    Errors while reading: :class:`~idsfs.errors.TruncatedStreamError` when
    the body ends before ``Content-Length`` or the chunked framing breaks,
    :class:`~idsfs.errors.TransportTimeoutError` when the server stalls
    longer than the read timeout, :class:`~idsfs.errors.ConnectionLostError`
    on a reset or after :meth:`abort` (which another thread may call to break
    a blocked read off). The connection is closed after an error. Made by
    :meth:`IDSClient.getData`; the constructor never raises.
    """

    def __init__(self, response: requests.Response, offset: int = 0, url: str = "") -> None:
        super().__init__()
        self._response = response
        raw = response.raw
        fp = getattr(raw, "_fp", None)
        # Reading the http.client response directly lets socket data land in the
        # caller's buffer without the copies urllib3's read() makes.
        self._fp: Any = fp if isinstance(fp, http.client.HTTPResponse) else None
        self._raw = raw
        self._url = url
        self.status: int = response.status_code
        self.code: int = self.status
        self.reason: str = response.reason or ""
        self.headers = response.headers
        self.offset = offset
        self.bytes_read = 0
        cl = response.headers.get("Content-Length")
        try:
            self.content_length: int | None = int(cl) if cl is not None else None
        except ValueError:
            self.content_length = None
        self._eof = False  # the body ended, broke or was closed: the connection is not ours
        self._aborted = False
        self._lock = threading.Lock()  # orders abort() against the end of the body
        self._sock = _socket_of(self._fp, raw)
        # Direct reads (see _readinto_direct): "untried", "on" (the socket is
        # blocking, its timeout saved in _saved_timeout) or "off".
        self._direct = "untried"
        self._saved_timeout: float | None = None
        #: Direct reads wait in the kernel until a whole view is filled (``MSG_WAITALL``):
        #: one GIL re-acquisition per view instead of one per ``recv``, which pays off when
        #: other threads keep the GIL busy (the mount sets it); a lone reader does a little
        #: better with plain ``recv`` calls (measured: 0.26-0.29 vs 0.22-0.24 CPU-s/GB).
        self.fill_whole = False

    # -- python-icat / http.client compatibility
    @property
    def length(self) -> int | None:
        """Bytes still to come according to ``Content-Length`` (else ``None``). Never raises."""
        if self.content_length is None:
            return None
        return max(0, self.content_length - self.bytes_read)

    def getheader(self, name: str, default: str | None = None) -> str | None:
        """Return the value of header ``name`` (case-insensitive). Never raises."""
        return self.headers.get(name, default)

    def getheaders(self) -> list[tuple[str, str]]:
        """Return all headers as (name, value) pairs. Never raises."""
        return list(self.headers.items())

    def info(self) -> Any:
        """Return the headers (as ``urllib`` responses do). Never raises."""
        return self.headers

    def geturl(self) -> str:
        """Return the request URL with session and prepared ids redacted. Never raises."""
        return self._url

    def __repr__(self) -> str:
        return (
            f"<DataStream status={self.status} offset={self.offset} "
            f"read={self.bytes_read} length={self.content_length} closed={self.closed}>"
        )

    # -- reading
    def readable(self) -> bool:
        """True: the stream can be read (``io.RawIOBase`` protocol). Never raises."""
        return True

    def readinto(self, b: Any) -> int:
        """Read into the writable buffer ``b``; return the number of bytes.

        Fills ``b`` completely unless the stream ends first; 0 means end of
        stream. Raises ``ValueError`` on a closed stream and a
        :class:`~idsfs.errors.TransportError` subclass as the class docstring
        says: :class:`~idsfs.errors.ConnectionLostError` once :meth:`abort`
        broke the download off (also in a read blocked at that time).
        """
        if self.closed:
            raise ValueError("I/O operation on closed DataStream")
        view = memoryview(b)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if self._aborted:
            raise self._aborted_error()
        if self._eof or not len(view):
            return 0
        try:
            if self._direct != "off" and self._fp is not None:
                n = self._readinto_direct(view)
            elif self._fp is not None:
                n = self._fp.readinto(view)
            else:
                n = self._readinto_urllib3(view)
        except http.client.IncompleteRead as exc:
            self._fail()
            if self._aborted:
                raise self._aborted_error() from exc
            raise TruncatedStreamError(
                f"download ended after {self.bytes_read} bytes: broken stream ({self._url})",
                self.bytes_read,
                self.content_length,
            ) from exc
        except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError,
                requests.RequestException) as exc:
            self._fail()
            if self._aborted:
                raise self._aborted_error() from exc
            if isinstance(exc, urllib3.exceptions.ProtocolError) and "IncompleteRead" in str(exc):
                raise TruncatedStreamError(
                    f"download ended after {self.bytes_read} bytes: broken stream ({self._url})",
                    self.bytes_read,
                    self.content_length,
                ) from exc
            raise _http.translate_exception(exc, self._url) from exc
        if n:
            self.bytes_read += n
            if self.content_length is not None and self.bytes_read >= self.content_length:
                self._finish()
            return n
        if self._aborted:
            self._fail()
            raise self._aborted_error()
        if self.content_length is not None and self.bytes_read < self.content_length:
            self._fail()
            raise TruncatedStreamError(
                f"download ended after {self.bytes_read} of {self.content_length} bytes "
                f"({self._url})",
                self.bytes_read,
                self.content_length,
            )
        self._finish()
        return 0

    def _aborted_error(self) -> ConnectionLostError:
        return ConnectionLostError(
            f"download aborted after {self.bytes_read} bytes ({self._url})", self._url
        )

    def _readinto_direct(self, view: memoryview) -> int:
        """Fill ``view`` with blocking ``recv`` calls on the socket where possible.

        http.client reads a body through a ``BufferedReader`` over the socket:
        one ``recv`` (and one release and re-acquisition of the GIL) per few
        dozen KiB. While another thread of the process is busy in Python, each
        re-acquisition may wait, which throttled the mount's stream threads to
        about 1 ms per MiB. Once the reader's buffer is empty, the bytes of a
        plain-TCP body with a ``Content-Length`` are taken from the socket
        directly, without the ``poll`` a socket timeout costs per call (the
        read timeout becomes the socket's ``SO_RCVTIMEO``); with
        :attr:`fill_whole` the thread blocks in the kernel until the whole
        view is filled (``MSG_WAITALL``) and needs the GIL once per view.
        http.client's ``length`` is kept up to date, and the last bytes of
        the body always go through http.client (the socket's timeout restored
        first), which ends the response as usual, so the connection can go
        back to the pool.
        """
        fp = self._fp
        assert fp is not None
        left = fp.length
        sock = self._sock
        if self._direct == "untried" and (
            left is None or fp.chunked or sock is None or isinstance(sock, ssl.SSLSocket)
            or not hasattr(fp.fp, "readinto1")
        ):
            self._direct = "off"
        if self._direct == "off" or left is None or left <= len(view):
            self._direct_end()
            return int(fp.readinto(view))
        assert sock is not None
        total = 0
        if self._direct == "untried":
            # Empty the reader's buffer first: one call returns the buffered bytes
            # only (fewer than asked: the buffer is empty afterwards), or reads the
            # socket once when nothing is buffered.
            total = fp.fp.readinto1(view)
            if not total:
                return 0  # the body ended early: the caller reports it
            fp.length = left = left - total
            if total == len(view):
                return total  # more may be buffered: try again at the next call
            timeout = sock.gettimeout()
            self._saved_timeout = timeout
            if timeout:
                seconds = int(timeout)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack(
                    "ll", seconds, int((timeout - seconds) * 1e6)))
            sock.settimeout(None)
            self._direct = "on"
        flags = socket.MSG_WAITALL if self.fill_whole else 0
        while total < len(view):
            try:
                n = sock.recv_into(view[total:], 0, flags)
            except BlockingIOError as exc:  # SO_RCVTIMEO expired without a byte
                raise TimeoutError("the server sent nothing within the read timeout") from exc
            if not n:
                break
            total += n
            fp.length = left = left - n
        return total

    def _direct_end(self) -> None:
        """Give the socket its timeout back before http.client reads again."""
        on = self._direct == "on"
        self._direct = "off"
        if not on or self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
            self._sock.settimeout(self._saved_timeout)

    def _readinto_urllib3(self, view: memoryview) -> int:
        total = 0
        while total < len(view):
            chunk = self._raw.read(len(view) - total)
            if not chunk:
                break
            view[total:total + len(chunk)] = chunk
            total += len(chunk)
        return total

    def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes (all remaining bytes if negative/None).

        Fewer bytes only at the end of the stream (``b""`` there). Raises what
        :meth:`readinto` raises: ``ValueError`` on a closed stream, a
        :class:`~idsfs.errors.TransportError` subclass when the body breaks,
        stalls or was aborted.
        """
        if size is None or size < 0:
            return self.readall()
        buf = bytearray(size)
        n = self.readinto(buf)
        del buf[n:]
        return bytes(buf)

    def readall(self) -> bytes:
        """Read everything that is left (this does hold it in memory).

        Raises what :meth:`readinto` raises (the bytes read before are lost).
        """
        parts = []
        while True:
            block = self.read(BLOCK_SIZE)
            if not block:
                return b"".join(parts)
            parts.append(block)

    def __iter__(self) -> Iterator[bytes]:  # type: ignore[override]
        return self

    def __next__(self) -> bytes:
        block = self.read(BLOCK_SIZE)
        if not block:
            raise StopIteration
        return block

    def copyto(
        self,
        fileobj: BinaryIO | Any,
        progress: Any = None,
        blocksize: int = BLOCK_SIZE,
    ) -> int:
        """Write the rest of the stream to ``fileobj``; return the byte count.

        Uses one reused buffer of ``blocksize`` bytes. ``progress(n)`` is
        called with the size of each block written.

        Raises what :meth:`readinto` raises (the blocks before it are
        written), and whatever ``fileobj.write`` or ``progress`` raise,
        unchanged.
        """
        buf = bytearray(blocksize)
        view = memoryview(buf)
        total = 0
        while True:
            n = self.readinto(view)
            if not n:
                return total
            fileobj.write(view[:n])
            total += n
            if progress is not None:
                progress(n)

    # -- closing
    def abort(self) -> None:
        """Break the download off now; safe to call from any thread.

        Shuts the connection's socket down (``SHUT_RDWR``), so that a
        :meth:`readinto` blocked in another thread returns at once, with
        :class:`~idsfs.errors.ConnectionLostError`, as does every later read.
        The connection is never given back to the pool. Does nothing once the
        body ended (its connection may already serve another request) or the
        stream was closed. :meth:`close` is still to be called. Never raises.
        """
        with self._lock:
            if self._eof or self._aborted:
                return
            self._aborted = True
            sock = self._sock
            if sock is None:
                return
            # socket.socket's own shutdown, also for an SSLSocket (whose override
            # would drop its SSL object under a reading thread); OSError: the
            # socket is already closed or not connected any more.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _finish(self) -> None:
        """End of body reached: give the connection back to the pool."""
        with self._lock:
            if self._eof:
                return
            self._eof = True
            aborted = self._aborted
        if aborted or (self._fp is not None and not self._fp.isclosed()):
            self._response.close()
            return
        try:
            self._raw.release_conn()
        except Exception:  # noqa: BLE001 - pool bookkeeping must not fail a read
            self._response.close()

    def _fail(self) -> None:
        with self._lock:
            self._eof = True
        self._response.close()

    def close(self) -> None:
        """Close the stream; an unfinished body closes the connection. Never raises."""
        if self.closed:
            return
        with self._lock:
            unfinished = not self._eof
            self._eof = True
        if unfinished:
            self._response.close()
        super().close()


def _socket_of(fp: http.client.HTTPResponse | None, raw: Any) -> socket.socket | None:
    """The socket a response body is read from (for :meth:`DataStream.abort`), if found."""
    sock = getattr(getattr(getattr(fp, "fp", None), "raw", None), "_sock", None)
    if not isinstance(sock, socket.socket):
        sock = getattr(getattr(raw, "connection", None), "sock", None)
    return sock if isinstance(sock, socket.socket) else None


# ----------------------------------------------------------------------------
# put body


def _shrank(left: int) -> ValueError:
    """The error of a put whose input file turned out ``left`` bytes shorter than expected."""
    return ValueError(f"put input file shrank during the upload ({left} bytes short)")


class FileChunk:
    """A block of a ``put`` body given as an iterable, whose bytes are also in a file.

    ``IDSClient.put`` computes the CRC32 from ``data``; on a plain HTTP
    connection it then sends the bytes from ``file`` (a binary file object
    with ``fileno()``) at ``offset`` with ``sendfile``, which saves copying
    them twice through Python and the socket. Elsewhere (TLS, a proxy) it
    sends ``data``. The file must hold exactly ``data`` at ``offset`` until
    the ``put`` returns; when it turns out shorter the ``put`` fails with
    ``ValueError``. Made by callers of ``put``; never raises.
    """

    __slots__ = ("data", "file", "offset")

    def __init__(self, data: bytes | memoryview, file: Any, offset: int) -> None:
        self.data = data
        self.file = file
        self.offset = offset

    def __len__(self) -> int:
        return len(self.data)

    def __bytes__(self) -> bytes:
        return bytes(self.data)

    def sendfile_to(self, sock: socket.socket) -> None:
        """Send the chunk's bytes on ``sock`` from the file with ``sendfile``.

        Raises ``ValueError`` when the file is shorter than the chunk,
        ``OSError`` (e.g. ``TimeoutError``) when sending fails.
        """
        sent = sock.sendfile(self.file, self.offset, len(self.data))
        if sent < len(self.data):
            raise _shrank(len(self.data) - sent)


class _PutBody:
    """Iterable of body blocks read from the input, computing CRC32 and size.

    A regular file is one :class:`_FileRegion` item (sent with ``sendfile``
    on a plain HTTP connection). ``crc`` is a CRC32 the caller computed for
    such a file: it is taken as the body's CRC32 and the bytes are not read.
    Items of an iterable input that are :class:`FileChunk` pass through as
    they are (after their CRC32 is taken): the connection sends them, framed,
    with ``sendfile`` (``chunks_may_sendfile``, see ``idsfs._http``).
    """

    chunks_may_sendfile = True

    def __init__(self, source: Any, blocksize: int = BLOCK_SIZE,
                 crc: int | None = None) -> None:
        self.source = source
        self.blocksize = blocksize
        self.fixed_crc = crc is not None
        self.crc32 = crc if crc is not None else 0
        self.size = 0
        self.length = _regular_file_length(source)
        #: how many bytes went out through ``sendfile`` (the rest was read here)
        self.sendfile_bytes = 0

    def __len__(self) -> int:
        # Only defined (non-zero) for regular files: requests then sends a
        # Content-Length body (as curl -T does) instead of chunked encoding.
        return self.length or 0

    def __bool__(self) -> bool:
        return True  # requests replaces a falsy body by an empty one

    def __iter__(self) -> Iterator[Any]:
        src = self.source
        if self.length and _is_plain_file(src):
            yield _FileRegion(self, src, src.tell(), self.length)
        elif self.length:  # a wrapper (e.g. reporting progress): read through it
            yield from self._iter_exact(src, self.length)
        elif isinstance(src, bytes | bytearray | memoryview):
            view = memoryview(src).cast("B")
            for start in range(0, len(view), self.blocksize):
                yield self._account(view[start:start + self.blocksize])
        elif hasattr(src, "readinto"):
            # One reused buffer: urllib3 copies each block into its chunk frame
            # before asking for the next one.
            buf = bytearray(self.blocksize)
            view = memoryview(buf)
            while True:
                n = src.readinto(view)
                if not n:
                    break
                yield self._account(view[:n])
        elif hasattr(src, "read"):
            while True:
                block = src.read(self.blocksize)
                if not block:
                    break
                if isinstance(block, str):
                    raise TypeError("put input stream must be binary, got text")
                yield self._account(memoryview(block).cast("B"))
        else:
            for block in src:
                if isinstance(block, str):
                    raise TypeError("put input iterable must yield bytes, got str")
                if isinstance(block, FileChunk):
                    if len(block):
                        self._account(memoryview(block.data).cast("B"))
                        yield block
                elif block:
                    yield self._account(memoryview(block).cast("B"))

    def _iter_exact(self, src: Any, length: int) -> Iterator[memoryview]:
        buf = bytearray(min(self.blocksize, length))
        view = memoryview(buf)
        left = length
        while left:
            n = src.readinto(view[:min(left, len(view))])
            if not n:
                raise _shrank(left)
            left -= n
            yield self._account(view[:n])

    def _account(self, view: memoryview) -> memoryview:
        if not self.fixed_crc:
            self.crc32 = crc32(view, self.crc32)
        self.size += len(view)
        return view


class _FileRegion:
    """The body of a put of a regular file: ``length`` bytes from ``offset``.

    :mod:`idsfs._http`'s plain HTTP connections call :meth:`sendfile_to`,
    which hands the bytes to the kernel with ``sendfile`` (no copy through
    Python). Any other connection (TLS, a foreign ``requests`` session) finds
    no buffer and iterates it instead: blocks read from the file. Either way
    the bytes are accounted in the :class:`_PutBody` (size; CRC32 unless the
    caller gave it). ``ValueError`` when the file turns out shorter than it was.
    """

    def __init__(self, body: _PutBody, file: Any, offset: int, length: int) -> None:
        self.body = body
        self.file = file
        self.offset = offset
        self.length = length

    def __bool__(self) -> bool:
        return True

    def _read_blocks(self) -> Iterator[tuple[int, memoryview]]:
        """(offset, block) read from the file with ``pread``; the file position follows."""
        body = self.body
        fd = self.file.fileno()
        view = memoryview(bytearray(min(body.blocksize, self.length)))
        pos, end = self.offset, self.offset + self.length
        while pos < end:
            n = os.preadv(fd, [view[:min(end - pos, len(view))]], pos)
            if not n:
                raise _shrank(end - pos)
            yield pos, view[:n]
            pos += n

    def __iter__(self) -> Iterator[memoryview]:
        for _, block in self._read_blocks():
            yield self.body._account(block)
        self.file.seek(self.offset + self.length)

    def sendfile_to(self, sock: socket.socket) -> None:
        """Send the region on ``sock`` with ``sendfile`` (plain TCP only).

        With a CRC32 given by the caller the file is not read at all;
        otherwise each block is read (for its CRC32) and then sent from the
        file. Raises ``ValueError`` when the file shrank, ``OSError`` (e.g.
        ``TimeoutError`` after the socket's timeout) when sending fails.
        """
        body = self.body
        if body.fixed_crc:
            sent = sock.sendfile(self.file, self.offset, self.length)
            body.size += sent
            body.sendfile_bytes += sent
            if sent < self.length:
                raise _shrank(self.length - sent)
            return
        for pos, block in self._read_blocks():
            body._account(block)
            sent = sock.sendfile(self.file, pos, len(block))
            body.sendfile_bytes += sent
            if sent < len(block):
                raise _shrank(self.offset + self.length - pos - sent)


def _is_plain_file(source: Any) -> bool:
    """True for a file object of ``open(..., "rb")`` (or ``"r+b"``...): its bytes are
    those of its descriptor, so they may be sent from there (no wrapper that
    watches or changes what is read)."""
    if isinstance(source, io.BufferedReader | io.BufferedRandom):
        source = source.raw
    return isinstance(source, io.FileIO)


def _is_regular_file(source: Any) -> bool:
    """True for a plain binary file object on a regular file (what ``crc32=`` needs)."""
    if not _is_plain_file(source):
        return False
    try:
        return stat.S_ISREG(os.fstat(source.fileno()).st_mode)
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


def _regular_file_length(source: Any) -> int | None:
    """Bytes left in ``source`` if it is a regular file read with readinto."""
    if not hasattr(source, "readinto") or not hasattr(source, "fileno"):
        return None
    try:
        st = os.fstat(source.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        left = st.st_size - source.tell()
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    return left if left > 0 else None


# ----------------------------------------------------------------------------
# IDSClient


def _decode_text(endpoint: str, response: requests.Response) -> str:
    """The body of a text answer; raises IDSResponseError when it is not UTF-8."""
    try:
        return response.content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IDSResponseError(f"{endpoint}: response is not UTF-8 text") from exc


#: How much of an unusable answer an error message quotes.
_EXCERPT = 100
#: A preparedId: printable ASCII without spaces or markup, at most this long (the IDS
#: hands out UUIDs; the client only refuses what cannot be one, e.g. an HTML page).
_PREPARED_ID = re.compile(r"[!-;=-~]{1,256}")


def _excerpt(text: str, secrets: Iterable[str | None] = ()) -> str:
    """A short, redacted quote of an unusable answer for an error message. Never raises."""
    text = text.strip()
    cut = text[:_EXCERPT] + ("..." if len(text) > _EXCERPT else "")
    return repr(redact(cut, secrets))


def _parse_json(endpoint: str, text: str, secrets: Iterable[str | None] = ()) -> Any:
    """``text`` parsed as JSON.

    Raises IDSResponseError (the parser's error as its cause) for text that is
    not JSON, nested too deeply for the parser (``RecursionError``) or holding a
    number Python cannot represent.
    """
    try:
        return json.loads(text)
    except (ValueError, RecursionError, OverflowError) as exc:
        what = "nested too deeply" if isinstance(exc, RecursionError) else "not JSON"
        raise IDSResponseError(
            f"{endpoint}: response is {what}: {_excerpt(text, secrets)}") from exc


def _json_int(value: Any) -> int:
    """A JSON integer (or a string of decimal digits) as an int.

    Raises ``TypeError`` for anything else (``true``, ``1.5``, ``1e400``, ...)
    and ``ValueError`` for a string that is no integer.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"not an integer: {type(value).__name__}")
    return int(value)


def _boolean(endpoint: str, text: str) -> bool:
    """``true``/``false`` (any case, surrounding whitespace allowed) as a bool.

    Raises IDSResponseError for any other answer (an HTML page from a proxy must not
    read as "false").
    """
    word = text.strip().lower()
    if word == "true":
        return True
    if word == "false":
        return False
    raise IDSResponseError(f"{endpoint}: the answer is not true or false: {_excerpt(text)}")


def _is_busy(error: ServerError) -> bool:
    """Retry predicate: a lock conflict or a proxy-level overload.

    ``DataNotOnlineException`` whose message says the data is busy (a lock,
    which clears by itself) and 502/503/504 answers that are not IDS error
    JSON are retried; "data not online" for archived data is not.
    """
    if error.type is None:
        return True
    return isinstance(error, IDSDataNotOnlineError) and error.busy


class IDSClient:
    """A client of the ICAT Data Service (python-icat's ``icat.ids.IDSClient``).

    ``url`` is the IDS base URL (``https://host:8181/ids``). ``sessionId``
    (settable attribute) is the ICAT session used by the calls that need
    one. ``sslContext`` is an ``ssl.SSLContext`` used for HTTPS instead of
    the default verification against the system CA bundle; ``proxy`` is a
    mapping ``{"https": "http://proxy:3128", ...}`` as in python-icat.

    Keyword-only extras: ``timeout`` (seconds, or ``(connect, read)``),
    ``retries`` (for idempotent calls, see docs/client.md), ``backoff``
    (first retry delay), ``verify`` (``False`` or a CA bundle path when no
    ``sslContext`` is given) and ``session`` (a ``requests.Session`` to share).

    The constructor calls ``version`` once and stores the result in
    ``apiversion``; it raises :class:`~idsfs.errors.TransportError` if the
    server cannot be reached and ``ValueError`` for a URL that is not http(s).

    Errors of every call: an IDS error answer raises the
    :class:`~idsfs.errors.IDSError` subclass of its code (a body that is not
    IDS error JSON: a plain IDSError with the status), an answer that cannot
    be used :class:`~idsfs.errors.IDSResponseError`, no answer a
    :class:`~idsfs.errors.TransportError` subclass (after the retries of
    idempotent calls). The methods name the errors particular to them.
    """

    def __init__(
        self,
        url: str,
        sessionId: str | None = None,
        sslContext: ssl.SSLContext | None = None,
        proxy: Mapping[str, str] | None = None,
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        verify: bool | str = True,
        session: requests.Session | None = None,
    ) -> None:
        if not isinstance(url, str) or not re.match(r"^https?://", url):
            raise ValueError(f"IDS URL must start with http:// or https://: {url!r}")
        self.url = url if url.endswith("/") else url + "/"
        self.sessionId: str | None = sessionId
        self._transport = _http.Transport(
            logger=log,
            error_factory=ids_error_from_response,
            secrets=lambda: (self.sessionId,),
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            verify=verify,
            ssl_context=sslContext,
            proxies=proxy,
            session=session,
        )
        self.apiversion = Version(self.version()["version"])

    def __repr__(self) -> str:
        state = "set" if self.sessionId else "none"
        return f"<IDSClient url={self.url!r} apiversion={getattr(self, 'apiversion', None)} " \
               f"sessionId={state}>"

    def close(self) -> None:
        """Close pooled connections. The client must not be used afterwards.

        Never raises.
        """
        self._transport.close()

    def __enter__(self) -> IDSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing
    def _call(
        self,
        method: str,
        endpoint: str,
        params: Mapping[str, Any] | None = None,
        *,
        idempotent: bool,
        stream: bool = False,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        hdrs = dict(_NO_CACHE) if method == "GET" else {}
        if headers:
            hdrs.update(headers)
        form = None
        query = params
        if method == "POST" and data is None:
            form, query = params, None
        return self._transport.request(
            method,
            self.url + endpoint,
            params=query,
            data=form if form is not None else data,
            headers=hdrs,
            stream=stream,
            idempotent=idempotent,
            is_busy=_is_busy,
        )

    def _text(self, endpoint: str, params: Mapping[str, Any] | None = None,
              method: str = "GET") -> str:
        response = self._call(method, endpoint, params, idempotent=method == "GET")
        return _decode_text(endpoint, response)

    def _json(self, endpoint: str, params: Mapping[str, Any] | None = None) -> Any:
        return _parse_json(endpoint, self._text(endpoint, params), (self.sessionId,))

    def _require_session(self) -> str:
        if not self.sessionId:
            raise RuntimeError("Must be logged in to make this call.")
        return self.sessionId

    def _selectionParams(
        self, selection: DataSelection | str, requireSessionId: bool = True
    ) -> dict[str, Any]:
        """Query parameters for a DataSelection (+ sessionId) or a preparedId."""
        if isinstance(selection, DataSelection):
            params: dict[str, Any] = {}
            if self.sessionId:
                params["sessionId"] = self.sessionId
            elif requireSessionId:
                raise RuntimeError("Must be logged in to make this call.")
            selection.fillParams(params)
            return params
        if isinstance(selection, str):
            return {"preparedId": selection}
        raise TypeError("selection must either be a DataSelection or a preparedId")

    def _sessionSelection(self, selection: DataSelection) -> dict[str, Any]:
        """Parameters for calls that take only a DataSelection (archive ...)."""
        if not isinstance(selection, DataSelection):
            raise TypeError(f"selection must be a DataSelection, not {type(selection).__name__}")
        params: dict[str, Any] = {"sessionId": self._require_session()}
        selection.fillParams(params)
        return params

    def _versionMethodError(self, method: str, minversion: str) -> VersionMethodError | None:
        """The error to raise instead of a server error when the server predates ``method``."""
        if self.apiversion < minversion:
            return VersionMethodError(method, version=self.apiversion, service="IDS")
        return None

    # -- discovery
    def ping(self) -> None:
        """Check that the server is alive and is an IDS.

        Raises :class:`~idsfs.errors.IDSResponseError` if the answer is not
        ``IdsOK`` (surrounding whitespace allowed; the message quotes a
        short, redacted excerpt of it), and the errors of every call (see
        :class:`IDSClient`).
        """
        result = self._text("ping")
        if result.strip() != "IdsOK":
            raise IDSResponseError(
                f"ping answered {_excerpt(result, (self.sessionId,))}, not IdsOK")

    def version(self) -> dict[str, Any]:
        """Return the server's version document, e.g. ``{"version": "2.1.1"}``.

        Servers older than 1.8.0 have no ``version`` call; their version is
        then guessed from ``getApiVersion``, ``ping`` and ``isReadOnly``
        (as python-icat does).

        Raises :class:`~idsfs.errors.IDSResponseError` for an unusable answer and the errors of
        every call (see :class:`IDSClient`).
        """
        try:
            doc = self._json("version")
        except IDSError as err:
            try:
                return {"version": self._get_legacy_version()}
            except (IDSError, ValueError):
                raise err from None
        if not isinstance(doc, dict) or not isinstance(doc.get("version"), str):
            raise IDSResponseError(f"unexpected response to version: {doc!r}")
        return doc

    def _get_legacy_version(self) -> str:
        try:
            text = self._text("getApiVersion").strip()
            Version(text)
            return text
        except (IDSError, ValueError):
            pass
        self.ping()
        try:
            self.isReadOnly()
            return "1.2.0"
        except IDSError:
            return "1.0.0"

    def getApiVersion(self) -> str:
        """Return the server version string (emulated through ``version``).

        Raises what :meth:`version` raises.
        """
        return str(self.version()["version"])

    def getIcatUrl(self) -> str:
        """Return the URL of the ICAT server this IDS uses (IDS >= 1.4.0).

        Surrounding whitespace is removed. Raises
        :class:`~idsfs.errors.VersionMethodError` on an older server,
        :class:`~idsfs.errors.IDSResponseError` when the answer is not an
        http(s) URL (the message says it came from the IDS's getIcatUrl), and the
        errors of every call.
        """
        try:
            text = self._text("getIcatUrl")
        except IDSError as exc:
            if isinstance(exc, IDSResponseError):
                raise
            if (too_old := self._versionMethodError("getIcatUrl", "1.4.0")) is not None:
                raise too_old from exc
            raise
        url = text.strip()
        if not re.fullmatch(r"https?://[!-;=?-~]+", url, re.IGNORECASE) or len(url) > 2048:
            raise IDSResponseError(
                f"the IDS's getIcatUrl answered {_excerpt(text, (self.sessionId,))}, "
                "not an http(s) URL; give the ICAT URL yourself (--icat)")
        return url

    def isReadOnly(self) -> bool:
        """Return whether the server is read-only.

        Raises :class:`~idsfs.errors.IDSResponseError` when the answer is not
        ``true``/``false`` (any case), and the errors of every call (see
        :class:`IDSClient`).
        """
        return _boolean("isReadOnly", self._text("isReadOnly"))

    def isTwoLevel(self) -> bool:
        """Return whether the server has archive storage (two-level).

        Raises :class:`~idsfs.errors.IDSResponseError` when the answer is not
        ``true``/``false`` (any case), and the errors of every call (see
        :class:`IDSClient`).
        """
        return _boolean("isTwoLevel", self._text("isTwoLevel"))

    def getServiceStatus(self) -> dict[str, Any]:
        """Return what the IDS is doing (``opsQueue``, ``locks``, ``failures``).

        Needs a session of a user in the IDS ``rootUserNames``; others get
        :class:`~idsfs.errors.IDSInsufficientPrivilegesError`.

        Also raises ``RuntimeError`` without a sessionId,
        :class:`~idsfs.errors.IDSResponseError` for an answer that is not a JSON object, and the
        errors of every call.
        """
        result = self._json("getServiceStatus", {"sessionId": self._require_session()})
        if not isinstance(result, dict):
            raise IDSResponseError("getServiceStatus: response is not a JSON object")
        return result

    # -- information on selections
    def getSize(self, selection: DataSelection | str) -> int:
        """Return the total ICAT ``fileSize`` of the selected datafiles.

        ``selection`` is a DataSelection or a preparedId (IDS >= 1.11.0,
        else :class:`~idsfs.errors.VersionMethodError`). Raises
        ``RuntimeError`` for a DataSelection when no sessionId is set,
        ``TypeError`` for a selection of another type,
        :class:`~idsfs.errors.IDSResponseError` when the answer is not a
        number of bytes (a negative one included), and the errors of every call.
        """
        params = self._selectionParams(selection)
        if "preparedId" in params and self.apiversion < "1.11.0":
            raise VersionMethodError("getSize(preparedId)", version=self.apiversion,
                                     service="IDS")
        text = self._text("getSize", params)
        try:
            size = int(text)
        except ValueError as exc:
            raise IDSResponseError(f"getSize: not a number: {text[:100]!r}") from exc
        if size < 0:
            raise IDSResponseError(f"getSize: not a size: {text[:100]!r}")
        return size

    def getStatus(self, selection: DataSelection | str) -> str:
        """Return ``ONLINE``, ``RESTORING`` or ``ARCHIVED`` for the selection.

        Without a sessionId the parameter is left out and the IDS uses its
        reader account. A preparedId needs IDS >= 1.11.0.

        Raises :class:`~idsfs.errors.VersionMethodError` for a preparedId on an older server,
        ``TypeError`` for a selection of another type, and the errors of every call.
        """
        params = self._selectionParams(selection, requireSessionId=False)
        if "preparedId" in params and self.apiversion < "1.11.0":
            raise VersionMethodError("getStatus(preparedId)", version=self.apiversion,
                                     service="IDS")
        return self._text("getStatus", params)

    def getDatafileIds(self, selection: DataSelection | str) -> list[int]:
        """Return the ids of the datafiles in the selection (IDS >= 1.5.0).

        Raises :class:`~idsfs.errors.VersionMethodError` on an older server,
        :class:`~idsfs.errors.IDSResponseError` when the answer has no list of integer ids,
        ``RuntimeError`` for a DataSelection without a sessionId, ``TypeError`` for a selection
        of another type, and the errors of every call.
        """
        params = self._selectionParams(selection)
        try:
            doc = self._json("getDatafileIds", params)
        except IDSError as exc:
            if isinstance(exc, IDSResponseError):
                raise
            if (too_old := self._versionMethodError("getDatafileIds", "1.5.0")) is not None:
                raise too_old from exc
            raise
        ids = doc.get("ids") if isinstance(doc, dict) else None
        if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise IDSResponseError("getDatafileIds: response has no 'ids' list of integers")
        return list(ids)

    # -- deferred operations
    def archive(self, selection: DataSelection) -> None:
        """Ask the IDS to move the selected data to archive storage.

        Raises ``TypeError`` for anything but a DataSelection, ``RuntimeError`` without a
        sessionId, and the errors of every call (:class:`~idsfs.errors.IDSNotImplementedError`
        on a single-level server).
        """
        self._call("POST", "archive", self._sessionSelection(selection), idempotent=False)

    def restore(self, selection: DataSelection) -> None:
        """Ask the IDS to bring the selected data back online.

        Raises ``TypeError`` for anything but a DataSelection, ``RuntimeError`` without a
        sessionId, and the errors of every call (:class:`~idsfs.errors.IDSNotImplementedError`
        on a single-level server).
        """
        self._call("POST", "restore", self._sessionSelection(selection), idempotent=False)

    def write(self, selection: DataSelection) -> None:
        """Ask the IDS to (re)write the selected data to archive storage
        (IDS >= 1.9.0).

        Raises :class:`~idsfs.errors.VersionMethodError` on an older server, ``TypeError`` for
        anything but a DataSelection, ``RuntimeError`` without a sessionId, and the errors of
        every call.
        """
        params = self._sessionSelection(selection)
        try:
            self._call("POST", "write", params, idempotent=False)
        except IDSError as exc:
            if (too_old := self._versionMethodError("write", "1.9.0")) is not None:
                raise too_old from exc
            raise

    def reset(self, selection: DataSelection | str) -> None:
        """Clear a recorded restore failure of the selection (IDS >= 1.6.0).

        Raises :class:`~idsfs.errors.VersionMethodError` on an older server, ``RuntimeError``
        for a DataSelection without a sessionId, ``TypeError`` for a selection of another
        type, and the errors of every call.
        """
        params = self._selectionParams(selection)
        try:
            self._call("POST", "reset", params, idempotent=False)
        except IDSError as exc:
            if (too_old := self._versionMethodError("reset", "1.6.0")) is not None:
                raise too_old from exc
            raise

    # -- prepared downloads
    def prepareData(
        self, selection: DataSelection, compressFlag: bool = False, zipFlag: bool = False
    ) -> str:
        """Prepare the selection for download; return the preparedId.

        Surrounding whitespace is removed. Raises ``TypeError`` for anything but
        a DataSelection, ``RuntimeError`` without a sessionId,
        :class:`~idsfs.errors.IDSResponseError` for an answer that cannot be a
        preparedId (empty, longer than 256 characters, or holding anything but
        printable ASCII without spaces and ``<``: e.g. an HTML page), and the
        errors of every call.
        """
        params = self._sessionSelection(selection)
        if zipFlag:
            params["zip"] = "true"
        if compressFlag:
            params["compress"] = "true"
        response = self._call("POST", "prepareData", params, idempotent=False)
        text = _decode_text("prepareData", response)
        prepared = text.strip()
        if not _PREPARED_ID.fullmatch(prepared):
            raise IDSResponseError(
                f"prepareData: the answer is not a preparedId: "
                f"{_excerpt(text, (self.sessionId,))}")
        return prepared

    def isPrepared(self, preparedId: str) -> bool:
        """Return whether the data of ``preparedId`` is ready for getData.

        Raises :class:`~idsfs.errors.IDSBadRequestError` for a malformed and
        :class:`~idsfs.errors.IDSNotFoundError` for an unknown preparedId,
        :class:`~idsfs.errors.IDSResponseError` when the answer is not
        ``true``/``false`` (any case), and the errors of every call.
        """
        return _boolean("isPrepared", self._text("isPrepared", {"preparedId": preparedId}))

    def _getDataParams(
        self,
        selection: DataSelection | str,
        compressFlag: bool,
        zipFlag: bool,
        outname: str | None,
        flags_for_prepared: bool,
    ) -> dict[str, Any]:
        params = self._selectionParams(selection)
        if isinstance(selection, DataSelection) or flags_for_prepared:
            if zipFlag:
                params["zip"] = "true"
            if compressFlag:
                params["compress"] = "true"
        if outname:
            params["outname"] = outname
        return params

    def getData(
        self,
        selection: DataSelection | str,
        compressFlag: bool = False,
        zipFlag: bool = False,
        outname: str | None = None,
        offset: int = 0,
    ) -> DataStream:
        """Open the download of the selection; return a :class:`DataStream`.

        ``offset > 0`` sends ``Range: bytes=<offset>-`` (status 206). The
        flags are sent only for a DataSelection (a preparedId has its own).
        The opening request is retried like other idempotent calls; errors
        while reading the body are the stream's (see :class:`DataStream`).

        Raises ``ValueError`` for a negative offset, ``RuntimeError`` for a DataSelection
        without a sessionId, ``TypeError`` for a selection of another type,
        :class:`~idsfs.errors.IDSDataNotOnlineError` for archived data,
        :class:`~idsfs.errors.IDSResponseError` when an answer to an offset does
        not start there (a 200 with the whole body, e.g. from a proxy that drops
        ``Range``, or a ``Content-Range`` elsewhere) or when the body is
        content-encoded (a ``Content-Encoding`` other than ``identity``), and
        the errors of every call.
        """
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer, not {offset!r}")
        params = self._getDataParams(selection, compressFlag, zipFlag, outname, False)
        headers = {"Accept-Encoding": "identity"}
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
        url = self.url + "getData"
        response = self._call(
            "GET", "getData", params, idempotent=True, stream=True, headers=headers
        )
        stream = DataStream(response, offset, self._transport.display_url(url, params))
        _check_encoding(stream, "getData")
        if offset > 0:
            _check_range(stream, offset)
        return stream

    def getDataUrl(
        self,
        selection: DataSelection | str,
        compressFlag: bool = False,
        zipFlag: bool = False,
        outname: str | None = None,
    ) -> str:
        """Return the getData URL for the selection without requesting it.

        The URL contains the session id (or preparedId): treat it as secret.

        Raises ``RuntimeError`` for a DataSelection without a sessionId and ``TypeError`` for a
        selection of another type; makes no request.
        """
        params = self._getDataParams(selection, compressFlag, zipFlag, outname, True)
        return self.url + "getData?" + urlencode(params)

    def getLink(self, datafileId: int, username: str | None = None) -> str:
        """Return the path of a hard link to the datafile (deprecated IDS call).

        ``username`` defaults to the local login name.

        Raises ``RuntimeError`` without a sessionId, ``ValueError``/``TypeError`` for a
        ``datafileId`` that is not an integer id,
        :class:`~idsfs.errors.IDSNotImplementedError` where the server has links disabled, and
        the errors of every call.
        """
        if username is None:
            username = getpass.getuser()
        params = {
            "sessionId": self._require_session(),
            "datafileId": str(_as_id(datafileId, "datafileId")),
            "username": username,
        }
        return _decode_text("getLink", self._call("POST", "getLink", params, idempotent=False))

    # -- writing
    def put(
        self,
        inputStream: Any,
        name: str,
        datasetId: int,
        datafileFormatId: int,
        description: str | None = None,
        doi: str | None = None,
        datafileCreateTime: int | None = None,
        datafileModTime: int | None = None,
        *,
        crc32: int | None = None,
    ) -> int:
        """Upload ``inputStream`` as a new datafile ``name`` in dataset
        ``datasetId``; return the new datafile id.

        ``inputStream`` is a binary file object (``readinto`` or ``read``),
        a bytes-like object, or an iterable of bytes blocks. It is streamed
        with chunked transfer encoding while its CRC32 is computed; the
        server's checksum and size are compared with it and a mismatch raises
        :class:`~idsfs.errors.IDSResponseError` whose ``datafile_id`` attribute
        is the id of the (wrong) datafile the server registered. The times are epoch
        milliseconds. Never retried (a retry could create a second datafile).

        A regular file (opened in binary mode) is sent from its position to
        its end with ``Content-Length``, as ``curl -T`` does; over plain HTTP
        with ``sendfile`` (the bytes do not pass through Python). Beyond
        python-icat, keyword-only ``crc32`` is the CRC32 (as
        :func:`zlib.crc32`) of those bytes, computed beforehand by the
        caller: the file is then not read at all, and the server's checksum
        is compared with ``crc32``, so a file that changes while it is sent,
        or a wrong ``crc32``, raises the mismatch error above.

        Raises ``ValueError`` when ``inputStream`` is None or a regular file
        shrinks while it is sent, or when ``crc32`` is given for anything but
        a regular binary file, ``TypeError`` for text (``str``) input,
        ``ValueError``/``TypeError`` for ids that are not integer ids,
        ``RuntimeError`` without a sessionId,
        :class:`~idsfs.errors.IDSResponseError` for a mismatch (above) or an
        unusable answer, and the errors of every call; an ``OSError`` while
        reading ``inputStream`` reaches the caller as a
        :class:`~idsfs.errors.TransportError` (the HTTP stack wraps it).
        """
        params: dict[str, Any] = {
            "sessionId": self._require_session(),
            "name": name,
            "datasetId": str(_as_id(datasetId, "datasetId")),
            "datafileFormatId": str(_as_id(datafileFormatId, "datafileFormatId")),
        }
        if description:
            params["description"] = description
        if doi:
            params["doi"] = doi
        if datafileCreateTime:
            params["datafileCreateTime"] = str(int(datafileCreateTime))
        if datafileModTime:
            params["datafileModTime"] = str(int(datafileModTime))
        if inputStream is None:
            raise ValueError("Input stream is null")
        if isinstance(inputStream, str):
            raise TypeError("put needs binary data, not str")
        if crc32 is not None:
            if not _is_regular_file(inputStream):
                raise ValueError("put: crc32 is only accepted with a regular file opened "
                                 "in binary mode")
            crc32 = int(crc32) & 0xFFFFFFFF
        body = _PutBody(inputStream, crc=crc32)
        response = self._call(
            "PUT",
            "put",
            params,
            idempotent=False,
            data=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        text = response.content.decode("utf-8", errors="replace")
        doc = _parse_json("put", text, (self.sessionId,))
        try:
            new_id = _json_int(doc["id"])
            checksum = _json_int(doc["checksum"])
        except (ValueError, KeyError, TypeError) as exc:
            raise IDSResponseError(
                f"put: unexpected response {_excerpt(text, (self.sessionId,))}") from exc
        crc = body.crc32 & 0xFFFFFFFF
        mismatch: IDSResponseError | None = None
        if checksum != crc:
            mismatch = IDSResponseError(
                f"checksum error: server computed {checksum:08x}, sent data has {crc:08x}"
                f"{' (given by the caller)' if body.fixed_crc else ''} (datafile id {new_id})"
            )
        size = doc.get("size")
        if mismatch is None and isinstance(size, int) and size != body.size:
            mismatch = IDSResponseError(
                f"size error: server stored {size} bytes, {body.size} were sent "
                f"(datafile id {new_id})"
            )
        if mismatch is not None:
            # The server registered a datafile that differs from what was sent:
            # its id lets the caller remove it (``datafile_id``).
            mismatch.datafile_id = new_id
            raise mismatch
        return new_id

    def delete(self, selection: DataSelection) -> None:
        """Delete the selected datafiles (ICAT objects and stored bytes).

        Raises ``TypeError`` for anything but a DataSelection, ``RuntimeError`` without a
        sessionId, and the errors of every call (:class:`~idsfs.errors.IDSNotImplementedError`
        on a read-only server).
        """
        params = self._sessionSelection(selection)
        self._call("DELETE", "delete", params, idempotent=False)


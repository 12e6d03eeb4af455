"""The IDS REST API of the emulator (ids-protocol.md §4-§8): every endpoint under ``/ids``.

``register(router, catalogue, storage, settings, faults)`` adds the 20 endpoints of §4 to the
router (endpoint names ``ids/<name>``), installs the storage's metadata source (a
:class:`~idsfs.emulator.ids_selection.CatalogueView` reading ICAT as the IDS reader) and returns
the :class:`IdsApi` object. ``app.py`` calls it once.

Behaviour follows the reference server to the status code: validation order of §5, selection
rules of §3, download headers of §6.2 (``Content-Length`` only for an unzipped single file in
sessionId mode, chunked otherwise, never ``Content-Range``), ``Range: bytes=N-`` only, the
two-level rules of §7 and the locks of §8. Raw single files in sessionId mode are sent with
``FileResponse`` (sendfile); SHARED dataset locks taken by ``getData`` are released by the
response's ``on_close`` callback when the stream ends or fails.

Errors: handlers raise :class:`~idsfs.emulator.ids_errors.IdsError` subclasses; the wrapper
installed by :func:`register` turns them into the JSON error body with the class's status.
An ICAT error escaping a handler becomes 500 ``InternalException``; anything else reaches the
router's ``/ids`` error renderer (500 ``InternalException``).

Known deliberate choices (documented in docs/emulator.md):

* ``getIcatUrl`` answers the server root (``http://host:port``), like a real IDS configured
  with ``icat.url = https://host:8181``; ICAT itself is under ``/icat`` of that root.
* The ``getSize`` single-id fast path answers 500 for an invalid/expired session (the reference
  server's SUM query fails with an unmapped ICAT error there).
* ``getLink`` (when ``link_lifetime_seconds`` > 0) makes a hard link under
  ``<data_dir>/links/<uuid>/`` that is removed after the lifetime; no ACL is set (the emulator
  cannot grant rights to arbitrary OS users).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from idsfs.emulator.catalogue import READER, ICATException
from idsfs.emulator.datainfo import DfInfo, DsInfo, zip_entry_name
from idsfs.emulator.http import (
    FileResponse,
    Request,
    Response,
    Router,
    StreamResponse,
    empty_response,
    json_response,
    text_response,
)
from idsfs.emulator.ids_errors import (
    DATA_BUSY,
    RESTORE_FAILED,
    BadRequest,
    DataNotOnline,
    IdsError,
    InsufficientPrivileges,
    Internal,
    NotFound,
    NotImplementedYet,
    from_icat,
)
from idsfs.emulator.ids_selection import (
    CatalogueView,
    Selection,
    parse_ids,
    parse_long,
    validate_uuid,
)
from idsfs.emulator.locks import AlreadyLockedError, LockSet, LockType
from idsfs.emulator.prepared import Prepared
from idsfs.emulator.storage import DeferredOp, Storage, StorageError
from idsfs.emulator.zipstream import ZipSource, skip_bytes, zip_stream

__all__ = ["VERSION", "IdsApi", "register", "storage_items"]

log = logging.getLogger(__name__)

#: the IDS version the emulator reports (>= 1.11.0 so clients enable every call)
VERSION = "2.1.1"
_RANGE_RE = re.compile(r"bytes=([0-9]+)-")
_LONG_MAX = 2**63 - 1
_CHUNK = 1 << 20
_WRAP_PREFIX = '<html><script type="text/javascript">window.name=\''
_WRAP_PADDED_PREFIX = (
    '<html><script type="text/javascript">/*' + " *        \n" * 24 + "*/window.name='"
)
_WRAP_SUFFIX = "';</script></html>"
_PUT_FIELDS = frozenset(
    {
        "sessionId",
        "name",
        "datafileFormatId",
        "datasetId",
        "description",
        "doi",
        "datafileCreateTime",
        "datafileModTime",
        "wrap",
        "padding",
    }
)

Params = Mapping[str, list[str]]


def _arg(params: Params, name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


def _flag(params: Params, name: str) -> bool:
    value = _arg(params, name)
    return value is not None and value.lower() == "true"


def _error(exc: IdsError) -> Response:
    return json_response(exc.payload(), exc.status)


def _icat_date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def escape_location(location: str) -> str:
    """Escape backslashes and single quotes of a location for the ``put`` answer (§5.13).

    Never raises.
    """
    return location.replace("\\", "\\\\").replace("'", "\\'")


def wrap_json(text: str, padding: bool = False) -> str:
    """Wrap a JSON text for the multipart ``put`` with ``wrap=true`` (§5.14). Never raises."""
    prefix = _WRAP_PADDED_PREFIX if padding else _WRAP_PREFIX
    return prefix + text.replace("'", "\\'") + _WRAP_SUFFIX


def _file_chunks(f: BinaryIO, offset: int) -> Iterator[bytes]:
    try:
        f.seek(offset)
        while True:
            block = f.read(_CHUNK)
            if not block:
                return
            yield block
    finally:
        f.close()


class IdsApi:
    """State and handlers of the IDS endpoints (see the module docstring).

    Constructing one never raises (for valid emulator settings). The handlers raise
    :class:`~idsfs.emulator.ids_errors.IdsError` subclasses, which :meth:`wrap` turns into
    the IDS error answer of their class. In their docstrings, *the selection errors* are
    ``BadRequest`` for a malformed sessionId or id list, ``InsufficientPrivileges`` for an
    invalid session or missing rights, ``NotFound`` for a missing dataset or datafile (or a
    datafile without location) and ``Internal`` for other ICAT errors; *the preparedId
    errors* are ``BadRequest`` for a malformed preparedId and ``NotFound`` for an unknown
    one.
    """

    def __init__(
        self,
        catalogue: Any,
        storage: Storage,
        settings: Any,
        faults: Any = None,
    ) -> None:
        """Keep the parts; installs the storage's metadata source."""
        self.catalogue = catalogue
        self.storage = storage
        self.settings = settings
        self.faults = faults
        self.view = CatalogueView(catalogue, int(getattr(settings, "max_entities", 10000)))
        storage.set_metadata(self.view)
        self.read_only = bool(getattr(settings, "read_only", False))
        enable_write = getattr(settings, "enable_write", None)
        self.write_enabled = (not self.read_only) if enable_write is None else bool(enable_write)
        self.roots = {f"simple/{r}" for r in getattr(settings, "roots", ())}
        self.link_lifetime = float(getattr(settings, "link_lifetime_seconds", 0) or 0)
        self.links_dir = storage.data_dir / "links"
        self._busy_prepared: set[str] = set()
        self._mutex = threading.Lock()

    # ------------------------------------------------------------------ registration
    def routes(self) -> list[tuple[str, str, Callable[[Request], Response]]]:
        """(method, endpoint, handler) for every route. Never raises."""
        return [
            ("GET", "ping", self.ping),
            ("GET", "version", self.version),
            ("GET", "isReadOnly", self.is_read_only),
            ("GET", "isTwoLevel", self.is_two_level),
            ("GET", "getIcatUrl", self.get_icat_url),
            ("GET", "getServiceStatus", self.get_service_status),
            ("POST", "prepareData", self.prepare_data),
            ("GET", "isPrepared", self.is_prepared),
            ("GET", "getDatafileIds", self.get_datafile_ids),
            ("GET", "getSize", self.get_size),
            ("GET", "getStatus", self.get_status),
            ("GET", "getData", self.get_data),
            ("PUT", "put", self.put),
            ("POST", "put", self.put_multipart),
            ("DELETE", "delete", self.delete),
            ("POST", "archive", self.archive),
            ("POST", "restore", self.restore),
            ("POST", "write", self.write),
            ("POST", "reset", self.reset),
            ("POST", "getLink", self.get_link),
        ]

    @staticmethod
    def wrap(handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
        """Turn IdsError (and stray ICAT errors) raised by ``handler`` into error responses."""

        def run(request: Request) -> Response:
            try:
                return handler(request)
            except IdsError as exc:
                return _error(exc)
            except ICATException as exc:
                return _error(Internal(f"{exc.code} {exc.message}"))

        run.__name__ = getattr(handler, "__name__", "ids_handler")
        return run

    # ------------------------------------------------------------------ helpers
    def _user(self, session_id: str | None) -> str:
        return self.view.user_of(session_id)

    def _resolve(self, user: str, params: Params) -> Selection:
        inv = parse_ids("investigationIds", _arg(params, "investigationIds"))
        ds = parse_ids("datasetIds", _arg(params, "datasetIds"))
        df = parse_ids("datafileIds", _arg(params, "datafileIds"))
        return self.view.resolve(user, inv, ds, df)

    def _session_selection(self, params: Params) -> tuple[str, Selection]:
        sid = validate_uuid("sessionId", _arg(params, "sessionId"))
        inv = parse_ids("investigationIds", _arg(params, "investigationIds"))
        ds = parse_ids("datasetIds", _arg(params, "datasetIds"))
        df = parse_ids("datafileIds", _arg(params, "datafileIds"))
        user = self._user(sid)
        return user, self.view.resolve(user, inv, ds, df)

    def _prepared(self, params: Params) -> Prepared:
        pid = validate_uuid("preparedId", _arg(params, "preparedId"))
        prepared = self.storage.prepared.get(pid)
        if prepared is None:
            raise NotFound(f"The preparedId {pid} is not known")
        return prepared

    def _items(
        self, datasets: Iterable[DsInfo], datafiles: Iterable[DfInfo]
    ) -> list[DsInfo | DfInfo]:
        items: list[DsInfo | DfInfo] = list(
            datasets if self.storage.unit == "DATASET" else datafiles
        )
        return sorted(items, key=lambda i: i.id)

    def _restore_if_offline(
        self, item: DsInfo | DfInfo, maybe_offline: set[int], empty: Iterable[int] = ()
    ) -> bool:
        """True when ``item`` is offline; queues a restore unless an op is pending for it."""
        if item.id in maybe_offline:
            return True
        if isinstance(item, DsInfo) and item.id in set(empty):
            return False
        if not self.storage.is_online(item):
            self.storage.queue(item, DeferredOp.RESTORE)
            return True
        return False

    def _check_online(
        self, datasets: Iterable[DsInfo], datafiles: Iterable[DfInfo], empty: Iterable[int]
    ) -> None:
        """Two-level: raise DataNotOnline (after queueing restores) if anything is offline."""
        if not self.storage.two_level:
            return
        maybe_offline = self.storage.maybe_offline()
        empty_set = set(empty)
        offline = False
        for item in self._items(datasets, datafiles):
            if self._restore_if_offline(item, maybe_offline, empty_set):
                offline = True
        if offline:
            raise DataNotOnline(
                "Before putting, getting or deleting a datafile, its dataset has to be "
                "restored, restoration requested automatically"
            )

    def _lock(self, ds_ids: Iterable[int], type_: LockType) -> LockSet:
        try:
            return self.storage.locks.lock_all(ds_ids, type_)
        except AlreadyLockedError as exc:
            raise DataNotOnline(DATA_BUSY) from exc

    # ------------------------------------------------------------------ discovery
    def ping(self, request: Request) -> Response:
        """GET ping → ``IdsOK``. Never raises."""
        return text_response("IdsOK")

    def version(self, request: Request) -> Response:
        """GET version → ``{"version": "2.1.1"}``. Never raises."""
        return json_response({"version": VERSION})

    def is_read_only(self, request: Request) -> Response:
        """GET isReadOnly → ``true``/``false``. Never raises."""
        return text_response("true" if self.read_only else "false")

    def is_two_level(self, request: Request) -> Response:
        """GET isTwoLevel → ``true``/``false``. Never raises."""
        return text_response("true" if self.storage.two_level else "false")

    def get_icat_url(self, request: Request) -> Response:
        """GET getIcatUrl → the ICAT server's base URL (without ``/icat``). Never raises."""
        url = getattr(self.settings, "icat_url", None) or ""
        if url.endswith("/icat"):
            url = url[: -len("/icat")]
        return text_response(url)

    def get_service_status(self, request: Request) -> Response:
        """GET getServiceStatus (root users only): opsQueue, locks, failures.

        Raises (answered through :meth:`wrap`) ``InsufficientPrivileges`` for an invalid
        session or a user outside ``rootUserNames``, ``Internal`` for another ICAT error.
        """
        params = request.query
        user = self._user(_arg(params, "sessionId"))
        if user not in self.roots:
            raise InsufficientPrivileges(f"{user} is not included in the ids rootUserNames set.")
        locks = self.storage.locks.info()
        return json_response(
            {
                "opsQueue": self.storage.ops_queue(),
                "lockCount": len(locks),
                "locks": [{"id": i.id, "type": i.type.value, "count": i.count} for i in locks],
                "failures": self.storage.failures(),
            }
        )

    # ------------------------------------------------------------------ preparation
    def prepare_data(self, request: Request) -> Response:
        """POST prepareData → a new preparedId (ids-protocol.md §5.5).

        Raises (answered through :meth:`wrap`) the selection errors, and ``Internal`` when
        the record cannot be written.
        """
        params = request.form()
        _user, sel = self._session_selection(params)
        if self.storage.two_level:
            items = self._items(sel.datasets.values(), sel.datafiles.values())
            for item in items:
                self.storage.clear_failure(item.id)
            maybe_offline = self.storage.maybe_offline()
            for item in items:
                self._restore_if_offline(item, maybe_offline, sel.empty)
        prepared = Prepared(
            zip=_flag(params, "zip") or sel.must_zip,
            compress=_flag(params, "compress"),
            datafiles=tuple(sel.sorted_files()),
            datasets=tuple(sel.datasets[k] for k in sorted(sel.datasets)),
            empty_datasets=frozenset(sel.empty),
        )
        try:
            pid = self.storage.prepared.create(prepared)
        except OSError as exc:
            raise Internal(f"{type(exc).__name__} {exc}") from exc
        return text_response(pid)

    def is_prepared(self, request: Request) -> Response:
        """GET isPrepared: ``true`` when everything is online (queues restores otherwise).

        Raises (answered through :meth:`wrap`) the preparedId errors, and ``Internal``
        (``Restore failed``) after a failed restore.
        """
        pid = validate_uuid("preparedId", request.arg("preparedId"))
        prepared = self.storage.prepared.get(pid)
        if prepared is None:
            raise NotFound(f"The preparedId {pid} is not known")
        if not self.storage.two_level:
            return text_response("true")
        with self._mutex:
            if pid in self._busy_prepared:
                return text_response("false")
            self._busy_prepared.add(pid)
        try:
            ready = True
            maybe_offline = self.storage.maybe_offline()
            for item in self._items(prepared.datasets, prepared.datafiles):
                if self.storage.has_failed(item.id):
                    raise Internal(RESTORE_FAILED)
                if self._restore_if_offline(item, maybe_offline, prepared.empty_datasets):
                    ready = False
            return text_response("true" if ready else "false")
        finally:
            with self._mutex:
                self._busy_prepared.discard(pid)

    def reset(self, request: Request) -> Response:
        """POST reset: forget recorded restore failures of the selection (204).

        Raises (answered through :meth:`wrap`) the preparedId errors or the selection
        errors.
        """
        params = request.form()
        if "preparedId" in params:
            prepared = self._prepared(params)
            items = self._items(prepared.datasets, prepared.datafiles)
        else:
            _, sel = self._session_selection(params)
            items = self._items(sel.datasets.values(), sel.datafiles.values())
        if self.storage.two_level:
            for item in items:
                self.storage.clear_failure(item.id)
        return empty_response()

    # ------------------------------------------------------------------ information
    def get_datafile_ids(self, request: Request) -> Response:
        """GET getDatafileIds: preparedId → zip, compress, ids; sessionId → ids.

        Raises (answered through :meth:`wrap`) the preparedId errors or the selection
        errors.
        """
        params = request.query
        if "preparedId" in params:
            prepared = self._prepared(params)
            return json_response(
                {
                    "zip": prepared.zip,
                    "compress": prepared.compress,
                    "ids": sorted(d.id for d in prepared.datafiles),
                }
            )
        _, sel = self._session_selection(params)
        return json_response({"ids": sorted(sel.datafiles)})

    def get_size(self, request: Request) -> Response:
        """GET getSize: sum of ICAT ``fileSize`` of the located datafiles (§5.10).

        Raises (answered through :meth:`wrap`) the preparedId errors or the selection errors
        (the single-id fast path: ``Internal`` for an invalid session, ``NotFound`` for a
        missing object).
        """
        params = request.query
        if "preparedId" in params:
            prepared = self._prepared(params)
            try:
                size = self.view.size_of(READER, "df.id", [d.id for d in prepared.datafiles])
            except ICATException as exc:
                raise Internal(f"{exc.code} {exc.message}") from exc
            return text_response(str(size))
        sid = validate_uuid("sessionId", _arg(params, "sessionId"))
        df_ids = parse_ids("datafileIds", _arg(params, "datafileIds"))
        ds_ids = parse_ids("datasetIds", _arg(params, "datasetIds"))
        inv_ids = parse_ids("investigationIds", _arg(params, "investigationIds"))
        if len(df_ids) + len(ds_ids) + len(inv_ids) == 1:
            return text_response(str(self._fast_size(sid, inv_ids, ds_ids, df_ids)))
        user = self._user(sid)
        sel = self.view.resolve(user, inv_ids, ds_ids, df_ids)
        try:
            size = self.view.size_of(user, "df.id", sorted(sel.datafiles))
        except ICATException as exc:
            raise Internal(f"{exc.code} {exc.message}") from exc
        return text_response(str(size))

    def _fast_size(self, sid: str, inv_ids: list[int], ds_ids: list[int], df_ids: list[int]) -> int:
        try:
            user = self.catalogue.user_of(sid)
            size = (
                self.view.size_of(user, "df.dataset.investigation.id", inv_ids)
                + self.view.size_of(user, "df.dataset.id", ds_ids)
                + self.view.size_of(user, "df.id", df_ids)
            )
        except ICATException as exc:
            raise Internal(f"{exc.code} {exc.message}") from exc
        if size == 0:
            try:
                if df_ids:
                    got = self.catalogue.get(user, "Datafile", df_ids[0])
                    if not got.get("Datafile", {}).get("location"):
                        raise NotFound("Datafile not found")
                if ds_ids:
                    self.catalogue.get(user, "Dataset", ds_ids[0])
                if inv_ids:
                    self.catalogue.get(user, "Investigation", inv_ids[0])
            except ICATException as exc:
                raise NotFound(exc.message) from exc
        return size

    def get_status(self, request: Request) -> Response:
        """GET getStatus: ONLINE / RESTORING / ARCHIVED (never triggers a restore).

        Raises (answered through :meth:`wrap`) the preparedId errors or the selection
        errors, and ``Internal`` (``Restore failed``) after a failed restore.
        """
        params = request.query
        if "preparedId" in params:
            prepared = self._prepared(params)
            datasets: Iterable[DsInfo] = prepared.datasets
            datafiles: Iterable[DfInfo] = prepared.datafiles
            empty: Iterable[int] = prepared.empty_datasets
        else:
            sid = _arg(params, "sessionId")
            if sid is None:
                user = READER
            else:
                validate_uuid("sessionId", sid)
                user = self._user(sid)
            sel = self._resolve(user, params)
            datasets, datafiles, empty = sel.datasets.values(), sel.datafiles.values(), sel.empty
        if not self.storage.two_level:
            return text_response("ONLINE")
        items = self._items(datasets, datafiles)
        # failures first: a restore that succeeds leaves them and the restoring set at
        # once (storage._done), so read before that set, they are never both missed
        if any(self.storage.has_failed(item.id) for item in items):
            raise Internal(RESTORE_FAILED)
        restoring = self.storage.restoring()
        maybe_offline = self.storage.maybe_offline()
        empty_set = set(empty)
        status = "ONLINE"
        for item in items:
            if item.id in restoring:
                status = "RESTORING"
            elif item.id in maybe_offline:
                return text_response("ARCHIVED")
            elif isinstance(item, DsInfo) and item.id in empty_set:
                continue
            elif not self.storage.is_online(item):
                return text_response("ARCHIVED")
        return text_response(status)

    # ------------------------------------------------------------------ download
    def get_data(self, request: Request) -> Response:
        """GET getData: the selection as raw file or zip, with Range offsets (§5.12, §6).

        Raises (answered through :meth:`wrap`) the preparedId errors or the selection
        errors; ``BadRequest`` for a malformed ``Range``; ``DataNotOnline`` for archived
        data (a restore is queued) or a locked dataset ("Data is busy"); ``NotFound`` for
        datafiles deleted since prepareData; ``Internal`` for an offset beyond a Java long
        or a file that cannot be opened.
        """
        params = request.query
        offset = 0
        rng = request.headers.get("range")
        if rng is not None:
            m = _RANGE_RE.fullmatch(rng)
            if m is None:
                raise BadRequest(f"The range must match bytes=(\\d+)- not {rng!r}")
            offset = int(m.group(1))
            if offset > _LONG_MAX:
                raise Internal(f'NumberFormatException For input string: "{m.group(1)}"')
        session_mode = "preparedId" not in params
        if not session_mode:
            prepared = self._prepared(params)
            zipped, compress = prepared.zip, prepared.compress
            datasets = {d.id: d for d in prepared.datasets}
            files = sorted(prepared.datafiles, key=lambda d: d.id)
            empty: Iterable[int] = prepared.empty_datasets
        else:
            _, sel = self._session_selection(params)
            zipped = _flag(params, "zip") or sel.must_zip
            compress = _flag(params, "compress")
            datasets, files, empty = sel.datasets, sel.sorted_files(), sel.empty
        locks = self._lock(datasets, LockType.SHARED)
        try:
            self._check_online(datasets.values(), files, empty)
            if not session_mode:
                present = self.view.existing_datafiles([d.id for d in files])
                if len(present) < len(files):
                    raise NotFound("One or more datafiles have been deleted since prepareData")
            return self._data_response(
                request, files, datasets, zipped, compress, offset, session_mode, locks
            )
        except BaseException:
            locks.release()
            raise

    def _data_response(
        self,
        request: Request,
        files: list[DfInfo],
        datasets: Mapping[int, DsInfo],
        zipped: bool,
        compress: bool,
        offset: int,
        session_mode: bool,
        locks: LockSet,
    ) -> Response:
        outname = request.arg("outname")
        status = 206 if offset > 0 else 200
        if zipped:
            if outname is None:
                name = time.strftime("%Y-%m-%d_%H-%M-%S") + ".zip"
            else:
                name = outname if outname.rsplit(".", 1)[-1] == "zip" else outname + ".zip"
        else:
            name = outname if outname is not None else files[0].name
        name = name.replace("\r", " ").replace("\n", " ")
        headers = [
            ("Content-Disposition", f'attachment; filename="{name}"'),
            ("Accept-Ranges", "bytes"),
        ]
        if zipped:
            entries = [
                ZipSource(
                    zip_entry_name(datasets[df.ds_id], df),
                    self.storage.main_path(df.location),
                    df.mtime,
                )
                for df in files
            ]
            chunks = skip_bytes(zip_stream(entries, compress), offset)
            return StreamResponse(status, chunks, headers=headers, on_close=locks.release)
        df = files[0]
        try:
            f = self.storage.open(df.location)
        except (OSError, StorageError) as exc:
            raise Internal(f"{type(exc).__name__} {exc}") from exc
        if session_mode:
            size = df.size if df.size >= 0 else os.fstat(f.fileno()).st_size
            return FileResponse(
                status,
                f,
                offset=offset,
                length=max(0, size - offset),
                headers=headers,
                on_close=locks.release,
            )
        return StreamResponse(
            status, _file_chunks(f, offset), headers=headers, on_close=locks.release
        )

    # ------------------------------------------------------------------ upload
    def put(self, request: Request) -> Response:
        """PUT put: store the raw body as a new datafile (201 JSON, §5.13).

        Raises (answered through :meth:`wrap`) ``NotImplementedYet`` on a read-only server,
        ``BadRequest`` for a missing or malformed parameter or a registration ICAT finds
        invalid, ``InsufficientPrivileges``, ``NotFound`` for a missing dataset or format,
        ``DataNotOnline`` for an archived or locked dataset, ``Internal`` when storing fails
        or for other ICAT errors. A malformed body raises ``BadRequestSyntax`` (answered
        400).
        """
        params = request.query
        result = self._put(params, request.body, request.endpoint or "ids/put")
        return json_response(result, 201)

    def put_multipart(self, request: Request) -> Response:
        """POST put (multipart, deprecated): fields first, then one file part (§5.14).

        Raises (answered through :meth:`wrap`) what :meth:`put` raises, and ``BadRequest``
        for a body that is not multipart, an unknown field or no file part; with
        ``wrap=true`` those are answered wrapped in HTML instead.
        """
        wrap = padding = False
        try:
            try:
                parts = request.multipart()
            except ValueError as exc:
                raise BadRequest(f"Multipart content expected: {exc}") from exc
            fields: dict[str, list[str]] = {}
            for part in parts:
                if part.filename is None:
                    if part.name not in _PUT_FIELDS:
                        raise BadRequest(f"Form field {part.name} is not recognised")
                    fields[part.name] = [part.text]
                    if part.name == "wrap":
                        wrap = part.text.lower() == "true"
                    elif part.name == "padding":
                        padding = part.text.lower() == "true"
                    continue
                if "name" not in fields:
                    fields["name"] = [part.filename]
                result = self._put(fields, part.file, request.endpoint or "ids/put")
                text = json.dumps(result, separators=(",", ":"))
                if wrap:
                    return Response(201, wrap_json(text).encode("utf-8"), "text/html")
                return Response(201, text.encode("utf-8"), "application/json")
            raise BadRequest("No file part found in the multipart body")
        except IdsError as exc:
            if not wrap:
                raise
            text = json.dumps(exc.payload(), separators=(",", ":"))
            return Response(exc.status, wrap_json(text, padding).encode("utf-8"), "text/html")

    def _put(self, params: Params, body: BinaryIO, endpoint: str) -> dict[str, Any]:
        if self.read_only:
            raise NotImplementedYet("This operation has been configured to be unavailable")
        sid = validate_uuid("sessionId", _arg(params, "sessionId"))
        name = _arg(params, "name")
        if name is None:
            raise BadRequest("The name parameter must be set")
        fmt_id = parse_long("datafileFormatId", _arg(params, "datafileFormatId"))
        ds_id = parse_long("datasetId", _arg(params, "datasetId"))
        times: dict[str, str] = {}
        for key in ("datafileCreateTime", "datafileModTime"):
            value = _arg(params, key)
            if value is not None:
                times[key] = _icat_date(parse_long(key, value))
        user = self._user(sid)
        try:
            ds = self.view.ds_info(user, ds_id)
        except ICATException as exc:
            raise from_icat(exc) from exc
        lock = self._lock([ds_id], LockType.SHARED)
        try:
            if self.storage.unit == "DATASET" and self.view.datafile_count(ds_id) > 0:
                self._check_online([ds], [], [])
            try:
                stored = self.storage.put(ds.inv_id, ds.id, body)
            except StorageError as exc:
                raise BadRequest(str(exc)) from exc
            except OSError as exc:
                raise Internal(f"{type(exc).__name__} {exc}") from exc
            crc = stored.crc
            if self.faults is not None and self.faults.should_corrupt_checksum(endpoint):
                crc ^= 0xFFFFFFFF
            try:
                df_id = self._register(
                    user, name, ds, fmt_id, stored.location, stored.size, crc, params, times
                )
            except BaseException:
                self.storage.delete(stored.location)
                raise
            if self.storage.two_level:
                if self.storage.unit == "DATASET":
                    self.storage.queue(ds, DeferredOp.WRITE)
                else:
                    df = DfInfo(
                        df_id, name, stored.location, user, user, ds.id, time.time(), stored.size
                    )
                    self.storage.queue(df, DeferredOp.WRITE)
            return {
                "id": df_id,
                "checksum": crc,
                "location": escape_location(stored.location),
                "size": stored.size,
            }
        finally:
            lock.release()

    def _register(
        self,
        user: str,
        name: str,
        ds: DsInfo,
        fmt_id: int,
        location: str,
        size: int,
        crc: int,
        params: Params,
        times: dict[str, str],
    ) -> int:
        try:
            self.catalogue.get(user, "DatafileFormat", fmt_id)
        except ICATException as exc:
            raise from_icat(exc) from exc
        entity: dict[str, Any] = {
            "name": name,
            "dataset": {"id": ds.id},
            "datafileFormat": {"id": fmt_id},
            "location": location,
            "fileSize": size,
            "checksum": f"{crc:x}",
        }
        for key in ("description", "doi"):
            value = _arg(params, key)
            if value is not None:
                entity[key] = value
        entity.update(times)
        try:
            ids = self.catalogue.write(user, [{"Datafile": entity}])
        except ICATException as exc:
            if exc.code in ("SESSION", "INSUFFICIENT_PRIVILEGES"):
                raise InsufficientPrivileges(exc.message) from exc
            if exc.code == "VALIDATION":
                raise BadRequest(exc.message) from exc
            raise Internal(f"{exc.code} {exc.message}") from exc
        return int(ids[0])

    # ------------------------------------------------------------------ delete
    def delete(self, request: Request) -> Response:
        """DELETE delete: remove the selected datafiles from ICAT and storage (204).

        Raises (answered through :meth:`wrap`) ``NotImplementedYet`` on a read-only server,
        the selection errors, and ``DataNotOnline`` for an archived (unit DATASET) or locked
        dataset.
        """
        if self.read_only:
            raise NotImplementedYet("This operation has been configured to be unavailable")
        params = request.query
        user, sel = self._session_selection(params)
        locks = self._lock(sel.datasets, LockType.EXCLUSIVE)
        try:
            if self.storage.unit == "DATASET":
                self._check_online(sel.datasets.values(), [], sel.empty)
            files = sel.sorted_files()
            if files:
                try:
                    self.catalogue.delete(user, [{"Datafile": {"id": df.id}} for df in files])
                except ICATException as exc:
                    raise from_icat(exc) from exc
            for df in files:
                try:
                    shared = self.view.locations_like(df.location)
                except ICATException as exc:
                    raise Internal(f"{exc.code} {exc.message}") from exc
                if shared:
                    continue
                self.storage.delete(df.location)
                if self.storage.unit == "DATAFILE":
                    self.storage.queue(df, DeferredOp.DELETE)
            if self.storage.unit == "DATASET":
                for ds in sel.datasets.values():
                    self.storage.queue(ds, DeferredOp.WRITE)
        finally:
            locks.release()
        return empty_response()

    # ------------------------------------------------------------------ two-level ops
    def archive(self, request: Request) -> Response:
        """POST archive: queue ARCHIVE for the selection (204; 501 on single-level).

        Raises (answered through :meth:`wrap`) ``NotImplementedYet`` on single-level
        storage, or the selection errors.
        """
        return self._queue_op(request, DeferredOp.ARCHIVE)

    def restore(self, request: Request) -> Response:
        """POST restore: queue RESTORE for the selection (204; 501 on single-level).

        Raises (answered through :meth:`wrap`) ``NotImplementedYet`` on single-level
        storage, or the selection errors.
        """
        return self._queue_op(request, DeferredOp.RESTORE)

    def _queue_op(self, request: Request, op: DeferredOp) -> Response:
        params = request.form()
        sid = validate_uuid("sessionId", _arg(params, "sessionId"))
        if not self.storage.two_level:
            raise NotImplementedYet("This operation is unavailable for single level storage")
        user = self._user(sid)
        sel = self._resolve(user, params)
        for item in self._items(sel.datasets.values(), sel.datafiles.values()):
            self.storage.queue(item, op)
        return empty_response()

    def write(self, request: Request) -> Response:
        """POST write: queue writes to archive of online data (§5.17).

        Raises (answered through :meth:`wrap`) ``NotImplementedYet`` when writes are
        disabled or on single-level storage, the selection errors, and ``DataNotOnline`` for
        data not online or a locked dataset.
        """
        if not self.write_enabled:
            raise NotImplementedYet("This operation has been configured to be unavailable")
        params = request.form()
        _, sel = self._session_selection(params)
        locks = self._lock(sel.datasets, LockType.SHARED)
        try:
            if self.storage.two_level:
                items = self._items(sel.datasets.values(), sel.datafiles.values())
                for item in items:
                    if isinstance(item, DsInfo) and item.id in sel.empty:
                        continue
                    if not self.storage.is_online(item):
                        raise DataNotOnline(
                            "Before writing a dataset or datafile it must be online"
                        )
                for item in items:
                    self.storage.queue(item, DeferredOp.WRITE)
            else:
                raise NotImplementedYet("This operation is unavailable for single level storage")
        finally:
            locks.release()
        return empty_response()

    # ------------------------------------------------------------------ getLink
    def get_link(self, request: Request) -> Response:
        """POST getLink (deprecated): a hard link to a datafile; 501 unless enabled.

        Raises (answered through :meth:`wrap`) ``NotImplementedYet`` while links are
        disabled, ``BadRequest`` for a missing or malformed parameter,
        ``InsufficientPrivileges`` or ``NotFound`` as ICAT answers (or for a datafile
        without location), ``DataNotOnline`` for archived or locked data, ``Internal`` when
        the link cannot be made.
        """
        if self.link_lifetime <= 0:
            raise NotImplementedYet("Sorry getLink is disabled")
        params = request.form()
        sid = validate_uuid("sessionId", _arg(params, "sessionId"))
        df_id = parse_long("datafileId", _arg(params, "datafileId"))
        if _arg(params, "username") is None:
            raise BadRequest("The username parameter must be set")
        user = self._user(sid)
        try:
            got = self.catalogue.get(
                user, "Datafile df INCLUDE df.dataset.investigation.facility", df_id
            )
        except ICATException as exc:
            raise from_icat(
                exc, validation_is_bad_request=True, bad_parameter_is_bad_request=True
            ) from exc
        d = got["Datafile"]
        location = d.get("location")
        if not location:
            raise NotFound("Datafile has no location")
        ds = CatalogueView._ds_from(d["dataset"])
        df = DfInfo(df_id, str(d.get("name", "")), str(location), "", "", ds.id, 0.0)
        lock = self._lock([ds.id], LockType.SHARED)
        try:
            self._check_online([ds], [df], [])
            self._expire_links()
            link_dir = self.links_dir / str(uuid.uuid4())
            link_dir.mkdir(parents=True)
            link = link_dir / (Path(df.name).name or "datafile")
            try:
                os.link(self.storage.main_path(df.location), link)
            except OSError as exc:
                shutil.rmtree(link_dir, ignore_errors=True)
                raise Internal(f"{type(exc).__name__} {exc}") from exc
            return text_response(str(link))
        finally:
            lock.release()

    def _expire_links(self) -> None:
        if not self.links_dir.is_dir():
            return
        cutoff = time.time() - self.link_lifetime
        for entry in self.links_dir.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)


def register(
    router: Router,
    catalogue: Any,
    storage: Storage,
    settings: Any,
    faults: Any = None,
) -> IdsApi:
    """Add every IDS endpoint under ``/ids`` to ``router``; return the :class:`IdsApi`.

    Never raises.
    """
    api = IdsApi(catalogue, storage, settings, faults)
    for method, name, handler in api.routes():
        router.add(method, f"/ids/{name}", IdsApi.wrap(handler), f"ids/{name}")
    return api


def storage_items(
    catalogue: Any, storage: Storage, ds_ids: Iterable[int], df_ids: Iterable[int]
) -> list[DsInfo | DfInfo]:
    """Items of the storage unit for the test hooks (admin ``archive``/``restore``).

    Unit DATASET: the datasets named plus the datasets of the datafiles named; unit DATAFILE:
    the datafiles named plus the located datafiles of the datasets named. Read as the IDS
    reader. Raises ``LookupError`` for an unknown id and ``ValueError`` on single-level
    storage.
    """
    if not storage.two_level:
        raise ValueError("storage hooks need two-level storage")
    view = CatalogueView(catalogue, 10000)
    try:
        sel = view.resolve(READER, [], list(ds_ids), list(df_ids))
    except IdsError as exc:
        raise LookupError(exc.message) from exc
    if storage.unit == "DATASET":
        return [sel.datasets[k] for k in sorted(sel.datasets)]
    return sel.sorted_files()

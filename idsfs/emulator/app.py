"""The :class:`Emulator`: one process serving ICAT, IDS and the admin API.

``Emulator(settings).start()`` binds (port 0 = a free port), opens the
catalogue (``<data_dir>/catalogue.sqlite``) and the storage (``<data_dir>/main``,
``archive``, ``prepared``, ...), registers the routes of ``icat_api``,
``ids_api`` and ``admin``, seeds the demo data when asked, then serves in
background threads. ``stop()`` undoes all of it (and removes a temporary data
directory); the emulator is also a context manager.

URL layout: ICAT under ``/icat``, IDS under ``/ids``, test hooks under
``/admin`` (see ``admin.py``). Unknown paths below ``/icat`` and ``/ids``
answer 501 ``NOT_IMPLEMENTED``; uncaught exceptions answer 500 with IDS
``InternalException`` / ICAT ``INTERNAL``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from idsfs.emulator.faults import Counters, FaultInjector, FaultRule
from idsfs.emulator.http import HTTPServer, Request, Response, Router, error_response
from idsfs.emulator.settings import EmulatorSettings

__all__ = ["CATALOGUE_FILE", "Emulator"]

logger = logging.getLogger("idsfs.emulator")

#: file name of the SQLite catalogue inside the data directory
CATALOGUE_FILE = "catalogue.sqlite"


def _optional_module(name: str) -> ModuleType | None:
    """Import ``idsfs.emulator.<name>`` if it exists (parts are built independently)."""
    fullname = f"idsfs.emulator.{name}"
    try:
        return importlib.import_module(fullname)
    except ModuleNotFoundError as exc:
        if exc.name == fullname:
            return None
        raise


def _ids_unknown(request: Request) -> Response:
    return error_response(
        501,
        "NOT_IMPLEMENTED",
        f"Operation {request.method} {request.path} is not implemented by this IDS server",
    )


def _ids_error(request: Request, exc: BaseException) -> Response:
    return error_response(500, "InternalException", f"{type(exc).__name__} {exc}")


def _icat_unknown(request: Request) -> Response:
    return error_response(
        501,
        "NOT_IMPLEMENTED",
        f"Operation {request.method} {request.path} is not implemented by this ICAT server",
    )


def _icat_error(request: Request, exc: BaseException) -> Response:
    return error_response(500, "INTERNAL", f"{type(exc).__name__} {exc}")


def _admin_unknown(request: Request) -> Response:
    return error_response(404, "NOT_FOUND", f"no admin endpoint {request.method} {request.path}")


class Emulator:
    """ICAT + IDS emulator (see the module docstring).

    Attributes after :meth:`start`: ``settings`` (with the real port, data
    directory and ICAT URL filled in), ``port``, ``url``, ``icat_url``,
    ``ids_url``, ``admin_url``, ``data_dir``, ``catalogue``, ``storage``,
    ``faults`` (:class:`FaultInjector`), ``counters`` (:class:`Counters`),
    ``router``.

    Constructing one raises ``ValueError`` for invalid settings (see
    :meth:`start` for later errors).
    """

    def __init__(self, settings: EmulatorSettings | None = None, **kwargs: Any) -> None:
        """Keep the settings (``kwargs`` override fields); nothing starts yet.

        Raises ValueError for invalid settings.
        """
        base = settings if settings is not None else EmulatorSettings()
        self.settings = base.replace(**kwargs) if kwargs else base
        self.counters = Counters()
        self.faults = FaultInjector(self.settings.seed, self.counters)
        self.router = Router()
        self.catalogue: Any = None
        self.storage: Any = None
        self.data_dir: Path | None = None
        self._tmpdir: Path | None = None
        self._server: HTTPServer | None = None
        self._stopped = threading.Event()
        self._started = False
        self.url = self.icat_url = self.ids_url = self.admin_url = ""
        self.port = 0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Bind, open state, register the APIs, seed demo data, serve in the background.

        Raises OSError when the address cannot be bound or the data directory
        cannot be used; anything a part raises while opening propagates after
        the parts already opened were closed again.
        """
        if self._started:
            raise RuntimeError("emulator already started")
        self._started = True
        try:
            self._open()
        except BaseException:
            self.stop()
            raise

    def _open(self) -> None:
        settings = self.settings
        if settings.data_dir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="idsfs-emulator-"))
            data_dir = self._tmpdir
        else:
            data_dir = Path(settings.data_dir)
            data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir

        server = HTTPServer(
            self.router,
            settings.host,
            settings.port,
            hooks=self.faults,
            keepalive_timeout=settings.keepalive_timeout,
        )
        server.bind()
        self._server = server
        self.port = server.port
        self.url = server.base_url
        self.icat_url = f"{self.url}/icat"
        self.ids_url = f"{self.url}/ids"
        self.admin_url = f"{self.url}/admin"
        settings = settings.replace(port=server.port, data_dir=data_dir, icat_url=self.icat_url)
        self.settings = settings

        self.router.prefix("/ids", _ids_unknown, _ids_error)
        self.router.prefix("/icat", _icat_unknown, _icat_error)
        self.router.prefix("/admin", _admin_unknown, None)

        catalogue_mod = _optional_module("catalogue")
        if catalogue_mod is not None:
            self.catalogue = catalogue_mod.Catalogue(data_dir / CATALOGUE_FILE, settings)
            self.faults.expire = self.catalogue.expire
        storage_mod = _optional_module("storage")
        if storage_mod is not None:
            self.storage = storage_mod.Storage(data_dir, settings)

        icat_api = _optional_module("icat_api")
        if icat_api is not None and self.catalogue is not None:
            icat_api.register(self.router, self.catalogue, settings)
        ids_api = _optional_module("ids_api")
        if ids_api is not None and self.catalogue is not None and self.storage is not None:
            ids_api.register(self.router, self.catalogue, self.storage, settings, self.faults)
            if self.storage.two_level:
                self._resume_outstanding_writes(ids_api)
        from idsfs.emulator import admin

        admin.register(self.router, self)

        if settings.latency > 0:
            self.faults.add(FaultRule("latency", None, seconds=settings.latency))
        for rule in settings.faults:
            self.faults.add(rule if isinstance(rule, FaultRule) else FaultRule.parse(str(rule)))

        if settings.demo:
            from idsfs.emulator import demo

            demo.seed(self)

        server.start()
        logger.info("emulator listening: icat=%s ids=%s", self.icat_url, self.ids_url)

    def _resume_outstanding_writes(self, ids_api: Any) -> None:
        """Queue again the writes to archive a previous run left outstanding (its markers).

        An item that no longer exists loses its marker. Never raises (a failure is logged:
        the marker stays, and archive requests for that item stay refused, as before).
        """
        from idsfs.emulator.storage import DeferredOp

        assert self.storage is not None
        try:
            ids = self.storage.outstanding_writes()
        except OSError as exc:
            logger.error("cannot read the write markers: %s", exc)
            return
        by_dataset = self.storage.unit == "DATASET"
        for item_id in ids:
            try:
                items = ids_api.storage_items(self.catalogue, self.storage,
                                              [item_id] if by_dataset else [],
                                              [] if by_dataset else [item_id])
            except LookupError:
                logger.info("write marker of %d: no such item any more; removed", item_id)
                with contextlib.suppress(OSError):
                    self.storage.drop_outstanding_write(item_id)
                continue
            except Exception:
                logger.exception("cannot queue the outstanding write of %d", item_id)
                continue
            for item in items:
                self.storage.queue(item, DeferredOp.WRITE)
        if ids:
            logger.info("queued %d outstanding write(s) to archive again", len(ids))

    def stop(self) -> None:
        """Stop serving and close everything (idempotent); a temporary data dir is removed.

        Never raises (errors while closing are logged).
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.faults.close()
        if self._server is not None:
            self._server.stop()
        for part in (self.storage, self.catalogue):
            closer = getattr(part, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception:
                    logger.exception("closing %s failed", type(part).__name__)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def serve_forever(self) -> None:
        """Start (unless started) and block until :meth:`stop` is called (e.g. by a signal).

        Raises what :meth:`start` raises.
        """
        if not self._started:
            self.start()
        self._stopped.wait()

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`. Never raises."""
        return self._started and not self._stopped.is_set()

    def __enter__(self) -> Emulator:
        """Start and return the emulator."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the emulator."""
        self.stop()

    # ---------------------------------------------------------------- conveniences

    def login(self, user: str) -> str:
        """Return a new ICAT session id of the configured user ``user``.

        Raises KeyError for a user not in ``settings.users``, RuntimeError when
        no catalogue is available, and the catalogue's ICATException if the
        login is refused.
        """
        if self.catalogue is None:
            raise RuntimeError("the emulator has no catalogue")
        password = self.settings.users[user]
        return str(self.catalogue.login("simple", {"username": user, "password": password}))

    def expire_sessions(self, session_id: str | None = None) -> int:
        """Force expiry of one session (or all) now; returns how many expired.

        Raises ``RuntimeError`` without a catalogue (not started) and ``ICATException``
        INTERNAL once the catalogue is closed.
        """
        return self.faults.expire_sessions(session_id)

    def __repr__(self) -> str:
        """URL and state; never passwords."""
        state = "running" if self.running else "stopped" if self._started else "new"
        return f"<Emulator {self.url or '(not bound)'} {state} storage={self.settings.storage}>"

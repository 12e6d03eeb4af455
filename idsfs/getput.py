"""Download from (``idsfs get``) or upload to (``idsfs put``) an ICAT Data Service.

``idsfs get`` writes the data of datafiles, datasets or investigations to a
file (a zip unless it is exactly one datafile), resuming after a dropped
connection. ``idsfs put`` uploads one local file as a new datafile and prints
its id. A progress bar is shown on a terminal for transfers longer than a
moment.

Credentials never go on the command line. Either an existing ICAT session:
``--session-file FILE`` or the environment variable IDSFS_SESSION_ID; or a
login: ``--user NAME`` (``--auth PLUGIN``, default ``simple``) with the
password from ``--password-file FILE``, the environment variable
IDSFS_PASSWORD, or a prompt on a terminal. The ICAT URL for the login is
``--icat`` or else the one the IDS reports.

Existing python-icat users can name a section of their icat.cfg instead:
``--configSection NAME`` takes url, idsurl, auth, username and password from
it (the same configuration code as ``idsfs mount``, see
docs/configuration.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idsfs.config import ClientConfig, ConfigError, Layer, assemble_client, env_layer
from idsfs.download import (
    ProgressCallback,
    download,
    download_to,
    filename_from_headers,
    is_zipped,
    upload,
)
from idsfs.errors import IdsfsError, IDSResponseError
from idsfs.icat import ICATClient
from idsfs.ids import DataSelection, IDSClient

#: one help line per sub-command this module serves
HELP = {
    "get": "download datafiles, datasets or investigations from an IDS",
    "put": "upload a file into a dataset through an IDS",
}

ENV_SESSION = "IDSFS_SESSION_ID"
ENV_PASSWORD = "IDSFS_PASSWORD"
ENV_IDS_URL = "IDSFS_IDS_URL"

log = logging.getLogger("idsfs.getput")

_GET_DESCRIPTION = """Download datafiles, datasets or investigations from an IDS.

One datafile is written as is; anything else arrives as one zip file. The
output name defaults to the name the server gives (in the current directory).
"""

_PUT_DESCRIPTION = """Upload a local file as a new datafile of a dataset; prints the new id."""


def _add_common(parser: argparse.ArgumentParser) -> None:
    conf = parser.add_argument_group("configuration file (python-icat's icat.cfg)")
    conf.add_argument("--configfile", "--config-file", dest="config_file", metavar="FILE",
                      help="read only this config file (default: python-icat's search path; "
                           "see docs/configuration.md)")
    conf.add_argument("--configSection", "--configsection", "--config-section",
                      dest="config_section", metavar="NAME",
                      help="take url, idsurl, auth, username, password... from this section")
    conn = parser.add_argument_group("server and credentials")
    conn.add_argument("--ids", metavar="URL",
                      help=f"IDS base URL, e.g. https://host:8181/ids (default: the config "
                           f"section's idsurl, else ${ENV_IDS_URL})")
    conn.add_argument("--icat", metavar="URL",
                      help="ICAT base URL for --user logins (default: as reported by the IDS)")
    conn.add_argument("--auth", metavar="PLUGIN",
                      help="ICAT authenticator for --user (default: simple)")
    conn.add_argument("--user", metavar="NAME", help="log in to ICAT as NAME")
    conn.add_argument("--password-file", metavar="FILE", type=Path,
                      help=f"file holding the password (else the systemd credential "
                           f"idsfs-password, ${ENV_PASSWORD}, the config section's password, "
                           f"else a prompt)")
    conn.add_argument("--session-file", metavar="FILE", type=Path,
                      help=f"file holding an ICAT session id (else ${ENV_SESSION})")
    conn.add_argument("--timeout", metavar="SECONDS",
                      help="read timeout of each request (default: 120)")
    conn.add_argument("--retries", metavar="N", type=_count, default=5,
                      help="attempts after a dropped connection (default: 5)")
    conn.add_argument("--insecure", action="store_const", const=True, default=None,
                      help="do not verify TLS certificates")
    conn.add_argument("--ca-file", metavar="FILE", help="CA bundle for TLS verification")
    out = parser.add_argument_group("output")
    bar = out.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="always show a progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false",
                     help="never show a progress bar")
    out.add_argument("-v", "--verbose", action="store_true", help="log requests to stderr")


def _count(text: str) -> int:
    """argparse type: a whole number >= 0 (``ArgumentTypeError`` otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``idsfs get`` or ``idsfs put`` (chosen by ``parser.prog``).

    Never raises.
    """
    command = parser.prog.split()[-1]
    if command == "put":
        parser.description = _PUT_DESCRIPTION
        parser.add_argument("file", type=Path, help="local file to upload")
        parser.add_argument("--dataset", metavar="ID", type=int, required=True,
                            help="id of the dataset to add the datafile to")
        parser.add_argument("--format", metavar="ID", type=int, required=True,
                            dest="datafile_format", help="id of the DatafileFormat")
        parser.add_argument("--name", help="datafile name (default: the file's name)")
        parser.add_argument("--description", help="datafile description")
    else:
        parser.description = _GET_DESCRIPTION
        sel = parser.add_argument_group("selection (repeatable, at least one)")
        sel.add_argument("--datafile", metavar="ID", type=int, action="append", default=[])
        sel.add_argument("--dataset", metavar="ID", type=int, action="append", default=[])
        sel.add_argument("--investigation", metavar="ID", type=int, action="append",
                         default=[])
        parser.add_argument("-o", "--output", metavar="PATH",
                            help="output file, '-' for standard output, or a directory")
        parser.add_argument("--zip", action="store_true", help="always return a zip")
        parser.add_argument("--compress", action="store_true", help="compress the zip")
        parser.add_argument("--resume", action="store_true",
                            help="continue an interrupted download (PATH.part)")
        parser.add_argument("-f", "--force", action="store_true",
                            help="overwrite an existing output file")
    _add_common(parser)


# ---------------------------------------------------------------------------------------
# Settings and credentials: the same sources as a mount (idsfs.config)


@dataclass(frozen=True)
class Credentials:
    """Either an existing ``session_id`` or a login (``auth``, ``user``, ``password``).

    ``repr`` never shows the secret values. Constructing one never raises.
    """

    session_id: str | None = None
    auth: str | None = None
    user: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        if self.session_id:
            return "Credentials(session_id=***)"
        return f"Credentials(auth={self.auth!r}, user={self.user!r}, password=***)"


class UsageError(Exception):
    """Bad command line or missing credentials (exit status 2).

    Raised by :func:`client_settings`, :func:`resolve_credentials` and :func:`connect`;
    :func:`run` turns it into exit status 2.
    """


#: command-line attribute -> config field, for the layer of the options given
_ARG_FIELDS = (("config_file", "config_file", "--configfile"),
               ("config_section", "config_section", "--configSection"),
               ("ids", "ids_url", "--ids"), ("icat", "icat_url", "--icat"),
               ("auth", "auth", "--auth"), ("user", "user", "--user"),
               ("password_file", "password_file", "--password-file"),
               ("session_file", "session_file", "--session-file"),
               ("timeout", "timeout", "--timeout"), ("insecure", "insecure", "--insecure"),
               ("ca_file", "ca_file", "--ca-file"))


def client_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ClientConfig:
    """The server, credential and connection settings of ``idsfs get``/``put``.

    Built by :func:`idsfs.config.assemble_client` from the config file
    (``--configfile``/``--configSection``, python-icat's ``icat.cfg``), the
    environment (``$IDSFS_IDS_URL``, ``$IDSFS_PASSWORD``,
    ``$IDSFS_SESSION_ID``, systemd credentials) and the options given, in that
    order of precedence. Raises :class:`UsageError` for bad or missing
    settings (the message names the option).
    """
    env = os.environ if environ is None else environ
    layer: Layer = {}
    for attr, name, flag in _ARG_FIELDS:
        value = getattr(args, attr, None)
        if value is not None:
            layer[name] = (value, flag)
    try:
        return assemble_client([env_layer(env), layer], environ=env)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


def resolve_credentials(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Credentials:
    """Pick the credentials from the options, the environment and the config file.

    Order: ``--session-file`` (or the systemd credential ``idsfs-session``);
    ``--user`` (or the config section's ``username``) with ``--password-file``,
    the systemd credential ``idsfs-password``, ``$IDSFS_PASSWORD``, the config
    section's ``password``, or a terminal prompt; ``$IDSFS_SESSION_ID``.
    Raises :class:`UsageError` when nothing usable is given.
    """
    return _credentials_of(client_settings(args, environ))


def _credentials_of(settings: ClientConfig) -> Credentials:
    if settings.session is not None:
        return Credentials(session_id=settings.session.reveal())
    assert settings.password is not None
    return Credentials(auth=settings.auth, user=settings.user,
                       password=settings.password.reveal())


def connect(settings: ClientConfig, creds: Credentials) -> tuple[IDSClient, ICATClient | None]:
    """Open the IDS client (and log in to ICAT when ``creds`` ask for it).

    Raises :class:`UsageError` without an IDS URL,
    :class:`~idsfs.errors.IDSResponseError` when the ICAT URL the IDS reports
    is not an http(s) URL, and the errors of the clients (e.g.
    :class:`~idsfs.errors.ICATSessionError` for a refused login). Nothing
    stays open when it raises.
    """
    if not settings.ids_url:
        raise UsageError(f"no IDS URL: use --ids, ${ENV_IDS_URL}, or idsurl in the config "
                         f"section")
    ids = IDSClient(settings.ids_url, creds.session_id, proxy=settings.proxies,
                    timeout=settings.http_timeout, verify=settings.verify)
    if creds.session_id is not None:
        return ids, None
    try:
        icat_url = settings.icat_url or ids.getIcatUrl().strip()
        try:
            icat = ICATClient(icat_url, timeout=settings.http_timeout, verify=settings.verify,
                              proxy=settings.proxies)
        except ValueError as exc:
            raise IDSResponseError(f"the IDS reports the ICAT URL {icat_url[:200]!r}, which "
                                   f"is not an http(s) URL; give --icat URL") from exc
    except BaseException:
        ids.close()
        raise
    try:
        assert creds.auth is not None and creds.user is not None and creds.password is not None
        ids.sessionId = icat.login(
            creds.auth, {"username": creds.user, "password": creds.password}, remember=False
        )
    except BaseException:
        icat.close()
        ids.close()
        raise
    return ids, icat


# ---------------------------------------------------------------------------------------
# Progress


class _Bar:
    """A tqdm progress bar behind the ProgressCallback interface."""

    def __init__(self, enabled: bool | None, label: str) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.enabled = enabled
        self.label = label
        self.bar: Any = None

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=self.label, delay=0.5, file=sys.stderr, leave=True)
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------
# Commands


def _run_get(args: argparse.Namespace, ids: IDSClient) -> int:
    selection = DataSelection({
        "datafileIds": args.datafile,
        "datasetIds": args.dataset,
        "investigationIds": args.investigation,
    })
    zipped = is_zipped(ids, selection, args.zip)
    expected = None if zipped else ids.getSize(selection)
    bar = _Bar(args.progress, "get")
    progress: ProgressCallback = bar
    try:
        if args.output == "-":
            # A pipe cannot be rewound: only an unzipped stream can be resumed.
            download_to(
                ids, selection, sys.stdout.buffer, expected_size=expected,
                progress=progress, compressFlag=args.compress, zipFlag=args.zip,
                retries=0 if zipped else args.retries, resumable=not zipped,
            )
            sys.stdout.buffer.flush()
            return 0
        dest = _output_path(ids, selection, args, zipped)
        result = download(
            ids, selection, dest, expected_size=expected, progress=progress,
            compressFlag=args.compress, zipFlag=args.zip, retries=args.retries,
            resume=args.resume, overwrite=args.force,
        )
    finally:
        bar.close()
    print(f"{result.path} ({result.size} bytes)", file=sys.stderr)
    return 0


def _output_path(
    ids: IDSClient, selection: DataSelection, args: argparse.Namespace, zipped: bool
) -> Path:
    """Where ``get`` writes: ``-o FILE``, or the server's file name in ``-o DIR`` / here.

    Raises :class:`UsageError` for a directory that does not exist (``-o new/``
    or the parent of ``-o new/file``) and for an existing file without
    ``-f``.
    """
    if args.output and not Path(args.output).is_dir():
        if args.output.endswith("/"):
            raise UsageError(f"-o {args.output}: no such directory")
        dest = Path(args.output)
        if not dest.parent.is_dir():
            raise UsageError(f"-o {args.output}: no such directory: {dest.parent}")
    else:
        directory = Path(args.output) if args.output else Path.cwd()
        if zipped:
            name = "ids-download.zip"
        else:
            with ids.getData(selection) as probe:
                name = filename_from_headers(probe) or f"datafile-{min(selection.dfIds)}"
        safe = os.path.basename(name.replace("\\", "/")) or "download"
        if safe in (".", ".."):
            safe = "download"
        dest = directory / safe
    if dest.exists() and not args.force:
        raise UsageError(f"{dest} exists: use -f/--force to replace it")
    return dest


def _run_put(args: argparse.Namespace, ids: IDSClient) -> int:
    if not args.file.exists():
        raise UsageError(f"{args.file}: no such file")
    if not args.file.is_file():
        raise UsageError(f"{args.file} is not a regular file")
    if args.name == "":
        raise UsageError("--name '': a datafile name must not be empty")
    bar = _Bar(args.progress, "put")
    try:
        new_id = upload(ids, args.file, args.name, args.dataset, args.datafile_format,
                        description=args.description, progress=bar)
    finally:
        bar.close()
    print(new_id)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``idsfs get`` or ``idsfs put``; return the exit status.

    0 on success, 1 on a server or transfer error, 2 on a usage error.
    Messages go to stderr without session ids or passwords.

    Never raises for a usage, server, transport or OS error: each becomes
    the exit status and a message (and ``KeyboardInterrupt`` status 130).
    """
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    command = getattr(args, "command", None) or ("put" if hasattr(args, "file") else "get")
    icat: ICATClient | None = None
    try:
        if command == "get" and not (args.datafile or args.dataset or args.investigation):
            raise UsageError("select something: --datafile, --dataset or --investigation")
        settings = client_settings(args)
        for note in settings.notes:
            print(f"idsfs {command}: {note}", file=sys.stderr)
        ids, icat = connect(settings, _credentials_of(settings))
        with ids:
            return _run_put(args, ids) if command == "put" else _run_get(args, ids)
    except UsageError as exc:
        print(f"idsfs {command}: {exc}", file=sys.stderr)
        return 2
    except (IdsfsError, OSError) as exc:
        print(f"idsfs {command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"idsfs {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if icat is not None:
            with contextlib.suppress(IdsfsError):
                icat.logout()
            icat.close()

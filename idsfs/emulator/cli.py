"""Run an emulator of ICAT (REST, under /icat) and IDS (under /ids) on one port.

When it listens it prints exactly one line to standard output:

    idsfs emulator ready icat=<ICAT base URL> ids=<IDS base URL>

then serves until SIGINT or SIGTERM. Logs go to standard error (-v: one line
per request, with session and prepared ids hidden). State (SQLite catalogue,
main and archive storage) lives in --data DIR and survives a restart with the
same DIR; without --data a temporary directory is used and removed at exit.

Accounts use the ICAT authenticator mnemonic "simple": log in with
{"plugin": "simple", "credentials": [{"username": NAME}, {"password": PW}]}.
Give passwords as --user NAME:@FILE (first line of FILE) to keep them out of
the process list; NAME:PASSWORD works too (handy in tests) but other users
can read it there, so the emulator warns about it on standard error. Test
hooks (faults, counters, session expiry, storage archive/restore) are under
/admin; see docs/emulator.md.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NamedTuple

from idsfs.emulator.settings import DEFAULT_DEMO_LARGE_SIZE, STORAGE_KINDS, EmulatorSettings

HELP = "run the ICAT + IDS emulator (tests, benchmarks, demo)"

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Parse a byte count such as ``4096``, ``64M``, ``1GiB``; raises ValueError if malformed."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


class Account(NamedTuple):
    """One ``--user`` option.

    Attributes:
        name: the user name.
        password: the password.
        inline: True when the password was given in the argument itself
            (``NAME:PASSWORD``, visible in the process list) rather than
            read from a file (``NAME:@FILE``).

    Constructing one never raises.
    """

    name: str
    password: str
    inline: bool


def _user(text: str) -> Account:
    """Parse ``NAME:PASSWORD`` or ``NAME:@FILE``; never puts the password in messages.

    Raises argparse.ArgumentTypeError for a malformed value or an unreadable file.
    """
    name, sep, secret = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"expected NAME:PASSWORD or NAME:@FILE, got {name or '(empty)'!r}"
            + (":..." if sep else " without ':'")
        )
    if secret.startswith("@"):
        path = Path(secret[1:])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise argparse.ArgumentTypeError(
                f"cannot read the password file of user {name!r}: {exc.strerror}"
            ) from None
        return Account(name, lines[0] if lines else "", inline=False)
    return Account(name, secret, inline=True)


def argv_password_warnings(accounts: Sequence[Account]) -> list[str]:
    """One warning per account whose password was given in argv (no passwords in them).

    Never raises.
    """
    return [
        f"idsfs emulator: warning: the password of user {a.name!r} is on the command line, "
        f"where other users of this machine can read it (ps, /proc/PID/cmdline); "
        f"give it as --user {a.name}:@FILE (the password on the first line of FILE)"
        for a in accounts
        if a.inline
    ]


def _fault(text: str) -> object:
    from idsfs.emulator.faults import FaultRule

    try:
        return FaultRule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's options to ``parser``. Never raises."""
    net = parser.add_argument_group("listening")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    net.add_argument(
        "--port", type=int, default=0, help="TCP port; 0 picks a free one (default %(default)s)"
    )
    state = parser.add_argument_group("state and accounts")
    state.add_argument(
        "--data",
        metavar="DIR",
        type=Path,
        help="state directory; restarting with the same DIR keeps everything "
        "(default: a temporary directory removed at exit)",
    )
    state.add_argument(
        "--user",
        metavar="NAME:PASSWORD",
        type=_user,
        action="append",
        default=[],
        help="an account of the 'simple' authenticator (repeatable); "
        "NAME:@FILE reads the password from the first line of FILE (a password in "
        "the argument itself can be read by other users: a warning says so)",
    )
    state.add_argument(
        "--root",
        metavar="NAME",
        action="append",
        default=[],
        help="a user who is ICAT root and IDS rootUserName (repeatable)",
    )
    state.add_argument(
        "--demo", action="store_true", help="seed demo data readable by every user given"
    )
    state.add_argument(
        "--demo-large-size",
        metavar="SIZE",
        type=_size,
        default=DEFAULT_DEMO_LARGE_SIZE,
        help="size of the demo's largest file, e.g. 64M, 1G (default 64M)",
    )
    state.add_argument(
        "--seed", type=int, default=1, help="seed of the demo data and of random faults"
    )
    ids = parser.add_argument_group("IDS")
    ids.add_argument(
        "--storage",
        choices=STORAGE_KINDS,
        default="single",
        help="single-level, or two-level with storage unit DATASET / DATAFILE "
        "(default %(default)s)",
    )
    ids.add_argument("--read-only", action="store_true", help="IDS readOnly (put/delete: 501)")
    ids.add_argument(
        "--enable-write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="IDS enableWrite (default: on unless --read-only)",
    )
    ids.add_argument(
        "--queue-interval",
        metavar="SECONDS",
        type=_nonneg_float,
        default=0.05,
        help="seconds between ticks of the deferred-operation queue (default %(default)s)",
    )
    ids.add_argument(
        "--restore-delay",
        metavar="SECONDS",
        type=_nonneg_float,
        default=0.0,
        help="extra seconds each restore/archive takes (default %(default)s)",
    )
    ids.add_argument(
        "--dataset-write-delay",
        metavar="SECONDS",
        type=_nonneg_float,
        default=0.0,
        help="IDS delayDatasetWritesSeconds (default %(default)s)",
    )
    ids.add_argument(
        "--datafile-op-delay",
        metavar="SECONDS",
        type=_nonneg_float,
        default=0.0,
        help="IDS delayDatafileOperationsSeconds (default %(default)s)",
    )
    ids.add_argument(
        "--prepared-count",
        metavar="N",
        type=int,
        default=10000,
        help="prepared ids kept before the oldest are dropped (default %(default)s)",
    )
    ids.add_argument(
        "--link-lifetime",
        metavar="SECONDS",
        type=int,
        default=0,
        help="IDS linkLifetimeSeconds; 0 = getLink answers 501 (default %(default)s)",
    )
    icat = parser.add_argument_group("ICAT")
    icat.add_argument(
        "--session-minutes",
        metavar="N",
        type=_nonneg_float,
        default=120.0,
        help="ICAT session lifetime in minutes (default %(default)s)",
    )
    icat.add_argument(
        "--max-entities",
        metavar="N",
        type=int,
        default=10000,
        help="ICAT maxEntities (default %(default)s)",
    )
    faults = parser.add_argument_group("fault injection (also at run time: /admin/faults)")
    faults.add_argument(
        "--latency",
        metavar="SECONDS",
        type=_nonneg_float,
        default=0.0,
        help="added latency of every request (default %(default)s)",
    )
    faults.add_argument(
        "--fault",
        metavar="SPEC",
        type=_fault,
        action="append",
        default=[],
        help="a fault rule KIND[:key=value,...], e.g. error:status=503,endpoint=ids/getData,"
        "probability=0.1 or drop:after_bytes=1000000,count=1 (repeatable; kinds: latency, "
        "error, drop, stall, expire_session, corrupt_checksum)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("-v", "--verbose", action="store_true", help="log every request (debug level)")
    out.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def settings_from_args(args: argparse.Namespace) -> EmulatorSettings:
    """Build :class:`EmulatorSettings` from parsed arguments.

    Raises ``ValueError`` when they are inconsistent (a user given twice, a value the
    settings refuse).
    """
    users: dict[str, str] = {}
    for name, password, _inline in args.user:
        if name in users:
            raise ValueError(f"user {name!r} given twice")
        users[name] = password
    return EmulatorSettings(
        host=args.host,
        port=args.port,
        data_dir=args.data,
        users=users,
        roots=frozenset(args.root),
        demo=args.demo,
        storage=args.storage,
        read_only=args.read_only,
        enable_write=args.enable_write,
        session_minutes=args.session_minutes,
        max_entities=args.max_entities,
        link_lifetime_seconds=args.link_lifetime,
        prepared_count=args.prepared_count,
        queue_interval=args.queue_interval,
        dataset_write_delay=args.dataset_write_delay,
        datafile_op_delay=args.datafile_op_delay,
        restore_delay=args.restore_delay,
        demo_large_size=args.demo_large_size,
        seed=args.seed,
        latency=args.latency,
        faults=tuple(args.fault),
    )


class RedactingFormatter(logging.Formatter):
    """A log formatter that hides session and prepared ids in the whole line,
    tracebacks included (``idsfs.emulator.http.redact``). Never raises."""

    def format(self, record: logging.LogRecord) -> str:
        """The formatted record with its secrets replaced by ``***``.

        Raises what :meth:`logging.Formatter.format` raises for a malformed record (which
        the handler reports).
        """
        from idsfs.emulator.http import redact

        return redact(super().format(record))


def run(args: argparse.Namespace) -> int:
    """Start the emulator, print the ready line, serve until SIGINT/SIGTERM; exit status.

    Bad settings give status 2 and a failed start (``OSError``, ``ValueError``) status 1;
    anything else :meth:`~idsfs.emulator.app.Emulator.start` raises propagates (after the
    emulator was stopped).
    """
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    log = logging.getLogger("idsfs.emulator")
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"idsfs emulator: error: {exc}", file=sys.stderr)
        return 2
    for warning in argv_password_warnings(args.user):
        print(warning, file=sys.stderr)
    if not settings.users:
        log.warning("no --user given: nobody can log in")

    from idsfs.emulator.app import Emulator

    emulator = Emulator(settings)
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            emulator.start()
        except (OSError, ValueError) as exc:
            print(f"idsfs emulator: error: {exc}", file=sys.stderr)
            return 1
        print(f"idsfs emulator ready icat={emulator.icat_url} ids={emulator.ids_url}", flush=True)
        while not stop_requested.wait(3600):
            pass
        log.info("stopping")
        return 0
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser of ``python -m idsfs.emulator``. Never raises."""
    parser = argparse.ArgumentParser(
        prog="python -m idsfs.emulator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m idsfs.emulator``; returns the exit status.

    Raises :class:`SystemExit` (argparse) for bad arguments and ``--help``, and what
    :func:`run` raises.
    """
    return run(build_parser().parse_args(argv))

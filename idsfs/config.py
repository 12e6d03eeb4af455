"""One frozen :class:`Config` for every option of a mount, and the one place it is assembled.

Every mount option is declared once, in :data:`OPTIONS`: its :class:`Config`
field, its long command-line option (``--cache-size``), its key for ``-o``
(``cache_size``), optionally an environment variable, the parser of its text
form and its help. The command line (:mod:`idsfs.mountcli`), ``-o`` mount
options (as fstab will pass them) and the documentation are generated from
that table, so they cannot drift apart.

Sources and precedence
----------------------
:func:`assemble` merges *layers* of raw option values; a later layer wins over
an earlier one, field by field::

    defaults  <  config file  <  environment  <  -o options  <  long options

* defaults: the :class:`Config` field defaults;
* config file: not read yet (issue 6 adds a layer for python-icat's
  ``icat.cfg`` sections and idsfs's own options; it slots in here);
* environment: the variables listed in :data:`OPTIONS` (``IDSFS_ICAT_URL``,
  ``IDSFS_IDS_URL``, ``IDSFS_PASSWORD``, ``IDSFS_SESSION_ID``);
* ``-o KEY[=VALUE],...``: every idsfs option has a ``-o`` key, so an fstab line
  can say everything the command line can (``-o cache_size=1G,ro``);
* long options (``--cache-size 1G``) win over the same key in ``-o``.

Credentials
-----------
Secrets never come from argv. A password comes from ``--password-file`` /
``-o password_file=``, else ``$IDSFS_PASSWORD``, else a prompt on a terminal;
an existing ICAT session id from ``--session-file`` / ``-o session_file=`` or
``$IDSFS_SESSION_ID``. A session file wins over a login; ``--user`` with a
password wins over ``$IDSFS_SESSION_ID`` (the order of ``idsfs get``). The
secrets are read when the Config is assembled and kept in :class:`Secret`
objects whose ``repr``/``str`` show only where they came from.

Errors
------
Every bad value raises :class:`ConfigError` (a ``ValueError``) whose message
names the option as the user wrote it, e.g. ``--cache-size: not a size:
'12X' (use a number with an optional unit: 512K, 256M, 1G)``.
"""

from __future__ import annotations

import dataclasses
import getpass
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_READAHEAD",
    "ENV_PASSWORD",
    "ENV_SESSION",
    "FUSE_PASSTHROUGH",
    "IGNORED_MOUNT_OPTIONS",
    "LOG_LEVELS",
    "OPTIONS",
    "Config",
    "ConfigError",
    "Layer",
    "OptionSpec",
    "Secret",
    "assemble",
    "env_layer",
    "format_size",
    "parse_bool",
    "parse_duration",
    "parse_mount_options",
    "parse_size",
    "split_mount_options",
]

#: environment variable holding an ICAT session id (same as ``idsfs get``)
ENV_SESSION = "IDSFS_SESSION_ID"
#: environment variable holding the password of ``--user`` (same as ``idsfs get``)
ENV_PASSWORD = "IDSFS_PASSWORD"

#: default block cache size: 256 MiB
DEFAULT_CACHE_SIZE = 256 << 20
#: default block size: 1 MiB (see :mod:`idsfs.blockcache`)
DEFAULT_BLOCK_SIZE = 1 << 20
#: default kernel readahead of the mount: 8 MiB (the kernel's own is 128 KiB)
DEFAULT_READAHEAD = 8 << 20

#: accepted ``--log-level`` values
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")

#: generic FUSE/VFS mount options passed to the kernel unchanged
FUSE_PASSTHROUGH: frozenset[str] = frozenset(
    {"nodev", "dev", "nosuid", "suid", "noexec", "exec", "noatime", "atime", "relatime",
     "norelatime", "strictatime", "nodiratime", "dirsync"}
)
#: options that mount(8) and fstab use but that mean nothing to the daemon
IGNORED_MOUNT_OPTIONS: frozenset[str] = frozenset(
    {"defaults", "auto", "noauto", "_netdev", "nofail", "user", "users", "nouser", "owner",
     "group", "sync", "async", "loop"}
)


class ConfigError(ValueError):
    """A mount option is missing, malformed or out of range (the message says which)."""


# ----------------------------------------------------------------------------- secrets


class Secret:
    """A password or session id together with where it came from.

    ``str()``/``repr()`` show only the origin (``"file /etc/idsfs/pw"``,
    ``"environment IDSFS_PASSWORD"``, ``"terminal prompt"``), never the value;
    :meth:`reveal` returns the value. Two Secrets compare equal when origin and
    value are equal.
    """

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str) -> None:
        if not value:
            raise ConfigError(f"the secret from {origin} is empty")
        self._value = value
        self.origin = origin

    def reveal(self) -> str:
        """Return the secret value (never log or print it)."""
        return self._value

    def __repr__(self) -> str:
        return f"<secret from {self.origin}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return (self.origin, self._value) == (other.origin, other._value)

    def __hash__(self) -> int:
        return hash((self.origin, self._value))

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")

    @classmethod
    def from_file(cls, path: Path | str, *, what: str) -> Secret:
        """Read a secret from ``path``: its first line, surrounding whitespace removed.

        Raises :class:`ConfigError` when the file cannot be read or is empty.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {p}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{what}: {p} is not UTF-8 text") from exc
        lines = text.splitlines()
        value = lines[0].strip() if lines else ""
        if not value:
            raise ConfigError(f"{what}: {p} is empty")
        return cls(value, f"file {p}")


# ----------------------------------------------------------------------------- value parsers

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0,
                   "d": 86400.0}


def parse_size(text: str | int) -> int:
    """Parse a byte count: ``4096``, ``512K``, ``256M``, ``1G``, ``1.5GiB`` (binary units).

    Raises ``ValueError`` for anything else (negative numbers included).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"not a size: {text!r}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(
            f"not a size: {text!r} (use a number with an optional unit: 512K, 256M, 1G)"
        )
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if value != int(value):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """Format a byte count with the largest binary unit that divides it (``256M``)."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def parse_duration(text: str | float) -> float:
    """Parse seconds: ``30``, ``2.5``, ``500ms``, ``90s``, ``5m``, ``1h``, ``1d``.

    Raises ``ValueError`` for anything else (negative numbers included).
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _DURATION_RE.match(str(text))
        if not m:
            raise ValueError(
                f"not a duration: {text!r} (use seconds, or a unit: 500ms, 30s, 5m, 1h)"
            )
        value = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower()]
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a duration: {text!r}")
    return value


def parse_bool(text: str | bool) -> bool:
    """Parse ``1/0``, ``yes/no``, ``true/false``, ``on/off`` (case-insensitive)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"not a yes/no value: {text!r}")


def _parse_int(text: str | int) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        return int(str(text).strip(), 10)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None


def _parse_str(text: str) -> str:
    value = str(text).strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _parse_path(text: str | Path) -> Path:
    value = str(text).strip()
    if not value:
        raise ValueError("must not be empty")
    return Path(value).expanduser()


def _parse_url(text: str) -> str:
    value = str(text).strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {value!r}")
    if parts.username or parts.password:
        raise ValueError("URLs must not carry user names or passwords")
    if parts.query or parts.fragment:
        raise ValueError(f"a base URL has no query or fragment: {value!r}")
    return value.rstrip("/")


def _parse_log_level(text: str) -> str:
    value = str(text).strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return value


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class OptionSpec:
    """One mount option: how it is spelled in each source and how its text is parsed.

    Attributes:
        field: the :class:`Config` field it sets (``cache_size``); options that
            only feed the credentials (``password_file``, ``session_file``) name
            a pseudo-field that :func:`assemble` consumes.
        flags: long (and short) command-line spellings, e.g. ``("-f", "--foreground")``.
        okey: the ``-o`` key (``cache_size``); None when ``-o`` cannot set it.
        env: environment variable, or None.
        parse: turns the text form into the value; raises ``ValueError``.
        help: one line for ``--help`` and docs/usage.md.
        metavar: placeholder in ``--help``; None for a switch (no value).
        group: the ``--help`` section.
    """

    field: str
    flags: tuple[str, ...]
    okey: str | None
    parse: Callable[[Any], Any]
    help: str
    metavar: str | None = None
    env: str | None = None
    group: str = "mount"

    @property
    def is_switch(self) -> bool:
        """True for options without a value (``--debug``, ``-o allow_other``)."""
        return self.metavar is None

    @property
    def display(self) -> str:
        """The spelling used in messages: the long option."""
        return self.flags[-1] if self.flags else f"-o {self.okey}"


#: every option of ``idsfs mount``; see the module docstring
OPTIONS: tuple[OptionSpec, ...] = (
    # server and credentials
    OptionSpec("icat_url", ("--icat",), "icat", _parse_url,
               "ICAT base URL, e.g. https://icat.example.org:8181 (default: the URL the "
               "IDS reports)", "URL", env="IDSFS_ICAT_URL", group="server and credentials"),
    OptionSpec("ids_url", ("--ids",), "ids", _parse_url,
               "IDS base URL, e.g. https://icat.example.org:8181/ids (default: /ids on the "
               "ICAT server, checked with ping)", "URL", env="IDSFS_IDS_URL",
               group="server and credentials"),
    OptionSpec("auth", ("--auth",), "auth", _parse_str,
               "ICAT authenticator of the login (default: simple)", "PLUGIN",
               group="server and credentials"),
    OptionSpec("user", ("--user",), "user", _parse_str,
               "log in to ICAT as NAME", "NAME", group="server and credentials"),
    OptionSpec("password_file", ("--password-file",), "password_file", _parse_path,
               f"file whose first line is the password (else ${ENV_PASSWORD}, else a prompt "
               "on a terminal)", "FILE", group="server and credentials"),
    OptionSpec("session_file", ("--session-file",), "session_file", _parse_path,
               f"file holding an existing ICAT session id instead of a login (else "
               f"${ENV_SESSION})", "FILE", group="server and credentials"),
    OptionSpec("timeout", ("--timeout",), "timeout", parse_duration,
               "read timeout of each request to ICAT and IDS (default: 60s)", "SECONDS",
               group="server and credentials"),
    OptionSpec("insecure", ("--insecure",), "insecure", parse_bool,
               "do not verify TLS certificates", group="server and credentials"),
    OptionSpec("ca_file", ("--ca-file",), "ca_file", _parse_path,
               "CA bundle to verify TLS certificates with", "FILE",
               group="server and credentials"),
    # the mount
    OptionSpec("foreground", ("-f", "--foreground"), None, parse_bool,
               "stay in the foreground (default: return once the mount answers and run in "
               "the background)"),
    OptionSpec("read_only", (), "ro", parse_bool,
               "read-only mount (the default until writes exist); -o rw asks for read-write"),
    OptionSpec("allow_other", (), "allow_other", parse_bool,
               "let other users than the mounting one use the mount (see docs/usage.md)"),
    OptionSpec("default_permissions", (), "default_permissions", parse_bool,
               "let the kernel check permissions from the modes (always on)"),
    OptionSpec("fsname", (), "fsname", _parse_str,
               "file system name shown by mount and df (default: the ICAT URL)", "NAME"),
    OptionSpec("uid", ("--uid",), "uid", _parse_int,
               "owner of every file (default: the mounting user)", "UID"),
    OptionSpec("gid", ("--gid",), "gid", _parse_int,
               "group of every file (default: the mounting user's group)", "GID"),
    # caching and transfers
    OptionSpec("cache_size", ("--cache-size",), "cache_size", parse_size,
               f"memory for the block cache, e.g. 512M, 2G (default: "
               f"{format_size(DEFAULT_CACHE_SIZE)})", "SIZE", group="caching and transfers"),
    OptionSpec("block_size", ("--block-size",), "block_size", parse_size,
               f"block size of cache and transfers, a power of two from 4K to 64M (default: "
               f"{format_size(DEFAULT_BLOCK_SIZE)})", "SIZE", group="caching and transfers"),
    OptionSpec("metadata_ttl", ("--metadata-ttl",), "metadata_ttl", parse_duration,
               "how long listings and attributes are cached (default: 60s)", "SECONDS",
               group="caching and transfers"),
    OptionSpec("restore_wait", ("--restore-wait",), "restore_wait", parse_duration,
               "how long a read of archived data waits for its restore before failing with "
               "EAGAIN (default: 60s)", "SECONDS", group="caching and transfers"),
    OptionSpec("readahead", ("--readahead",), "readahead", parse_size,
               f"kernel readahead of the mount (read_ahead_kb), 0 keeps the kernel's "
               f"(default: {format_size(DEFAULT_READAHEAD)})", "SIZE",
               group="caching and transfers"),
    OptionSpec("max_threads", ("--max-threads",), "max_threads", _parse_int,
               "most ICAT/IDS requests running at once (default: 16)", "N",
               group="caching and transfers"),
    # logging
    OptionSpec("debug", ("--debug",), "debug", parse_bool,
               "log every request and FUSE operation (implies --log-level debug)",
               group="logging"),
    OptionSpec("log_level", ("--log-level",), "log_level", _parse_log_level,
               f"one of {', '.join(LOG_LEVELS)} (default: info)", "LEVEL", group="logging"),
    OptionSpec("log_file", ("--log-file",), "log_file", _parse_path,
               "append the log to FILE (default: standard error; in the background: syslog "
               "when /dev/log exists, else nowhere)", "FILE", group="logging"),
)

_BY_FIELD = {spec.field: spec for spec in OPTIONS}
_BY_OKEY = {spec.okey: spec for spec in OPTIONS if spec.okey}
#: pseudo-fields consumed by :func:`assemble` (they become Secrets)
_CREDENTIAL_FIELDS = ("password_file", "session_file")


# ----------------------------------------------------------------------------- Config


def _current_uid() -> int:
    return os.getuid()


def _current_gid() -> int:
    return os.getgid()


@dataclass(frozen=True)
class Config:
    """Every option of one mount, validated (immutable; see :meth:`replace`).

    Build it with :func:`assemble` (or the constructor with typed values);
    construction validates everything and raises :class:`ConfigError`.
    ``repr`` shows where the secrets came from, never their values.
    """

    #: directory to mount on
    mountpoint: Path
    #: ICAT base URL (None: taken from the IDS's getIcatUrl)
    icat_url: str | None = None
    #: IDS base URL (None: ``<ICAT scheme://host:port>/ids``, checked with ping)
    ids_url: str | None = None
    #: ICAT authenticator (plugin mnemonic) of the login
    auth: str = "simple"
    #: ICAT user name of the login (None when a session id is given)
    user: str | None = None
    #: the password of ``user``
    password: Secret | None = field(default=None, compare=False)
    #: an existing ICAT session id to use instead of a login
    session: Secret | None = field(default=None, compare=False)
    #: connect/read timeout of each request, seconds (connect: at most 10 s)
    timeout: float = 60.0
    #: do not verify TLS certificates
    insecure: bool = False
    #: CA bundle for TLS verification
    ca_file: Path | None = None
    #: stay in the foreground
    foreground: bool = False
    #: read-only mount
    read_only: bool = True
    #: FUSE allow_other
    allow_other: bool = False
    #: FUSE default_permissions (kernel checks modes); always on
    default_permissions: bool = True
    #: file system name (mount, df); None = the ICAT URL
    fsname: str | None = None
    #: owner and group of every file
    uid: int = field(default_factory=_current_uid)
    gid: int = field(default_factory=_current_gid)
    #: generic VFS options passed to the kernel (``nodev``, ``noatime``, ...)
    fuse_options: frozenset[str] = frozenset()
    #: block cache capacity, bytes
    cache_size: int = DEFAULT_CACHE_SIZE
    #: block size, bytes (power of two, 4 KiB .. 64 MiB)
    block_size: int = DEFAULT_BLOCK_SIZE
    #: listing/attribute cache lifetime, seconds
    metadata_ttl: float = 60.0
    #: how long a read of archived data waits for the restore, seconds
    restore_wait: float = 60.0
    #: kernel readahead of the mount, bytes (0: keep the kernel's)
    readahead: int = DEFAULT_READAHEAD
    #: most blocking ICAT/IDS calls at once (ThreadBridge size)
    max_threads: int = 16
    #: request tracing
    debug: bool = False
    #: log level name (``debug``/``info``/``warning``/``error``)
    log_level: str = "info"
    #: log file (None: stderr, or syslog in the background)
    log_file: Path | None = None

    def __post_init__(self) -> None:
        """Validate and normalise; raises :class:`ConfigError`."""
        object.__setattr__(self, "mountpoint", Path(os.path.abspath(self.mountpoint)))
        if self.log_file is not None:
            object.__setattr__(self, "log_file", Path(os.path.abspath(self.log_file)))
        if self.ca_file is not None:
            object.__setattr__(self, "ca_file", Path(os.path.abspath(self.ca_file)))
        if not self.default_permissions:
            raise ConfigError("-o default_permissions: cannot be turned off")
        object.__setattr__(self, "fuse_options", frozenset(self.fuse_options))
        if not self.icat_url and not self.ids_url:
            raise ConfigError("no server: give --icat URL (and --ids URL if IDS is not at "
                              "/ids on the same server)")
        for name in ("icat_url", "ids_url"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _check(name, value, _parse_url))
        if self.session is None:
            if not self.user:
                raise ConfigError(
                    f"no credentials: give --user NAME with --password-file FILE (or "
                    f"${ENV_PASSWORD}), or an ICAT session id with --session-file FILE (or "
                    f"${ENV_SESSION})")
            if self.password is None:
                raise ConfigError(f"no password for user {self.user!r}: use --password-file "
                                  f"FILE or ${ENV_PASSWORD}")
        if not self.auth:
            raise ConfigError("--auth: must not be empty")
        if self.timeout <= 0:
            raise ConfigError("--timeout: must be more than 0 seconds")
        if self.cache_size < 0:
            raise ConfigError("--cache-size: must not be negative")
        from idsfs.blockcache import check_block_size

        try:
            check_block_size(self.block_size)
        except ValueError as exc:
            raise ConfigError(f"--block-size: {exc}") from None
        for name in ("metadata_ttl", "restore_wait"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{_BY_FIELD[name].display}: must be 0 or more seconds")
        if self.readahead < 0 or self.readahead % 1024:
            raise ConfigError("--readahead: must be a multiple of 1K (the kernel counts KiB)")
        if self.readahead > 1 << 30:
            raise ConfigError("--readahead: at most 1G")
        if not 1 <= self.max_threads <= 1024:
            raise ConfigError("--max-threads: must be from 1 to 1024")
        for name in ("uid", "gid"):
            value = getattr(self, name)
            if not 0 <= value < 2**32 - 1:
                raise ConfigError(f"--{name}: out of range: {value}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level: must be one of {', '.join(LOG_LEVELS)}")
        if self.fsname is not None and (
            not self.fsname or "," in self.fsname or any(c.isspace() for c in self.fsname)
        ):
            raise ConfigError(f"-o fsname: no commas or white space allowed: {self.fsname!r}")
        unknown = self.fuse_options - FUSE_PASSTHROUGH
        if unknown:
            raise ConfigError(f"-o: not a supported mount option: {', '.join(sorted(unknown))}")

    # ------------------------------------------------------------------ derived values

    @property
    def effective_log_level(self) -> int:
        """The ``logging`` level: DEBUG with ``--debug``, else ``log_level``."""
        if self.debug:
            return logging.DEBUG
        return int(getattr(logging, self.log_level.upper()))

    @property
    def effective_fsname(self) -> str:
        """``fsname``, else the ICAT URL (else the IDS URL)."""
        return self.fsname or self.icat_url or self.ids_url or "idsfs"

    @property
    def verify(self) -> bool | str:
        """The ``verify`` argument of the clients (``False``, a CA file or ``True``)."""
        if self.insecure:
            return False
        return str(self.ca_file) if self.ca_file else True

    @property
    def http_timeout(self) -> tuple[float, float]:
        """``(connect, read)`` timeout of the clients."""
        return (min(10.0, self.timeout), self.timeout)

    def replace(self, **changes: Any) -> Config:
        """Return a copy with ``changes`` applied (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """The options as a plain dict for logs and ``idsfs status``; secrets as origins."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Secret | Path):
                value = str(value)
            elif isinstance(value, frozenset):
                value = sorted(value)
            out[f.name] = value
        return out


def _check(name: str, value: Any, parse: Callable[[Any], Any]) -> Any:
    try:
        return parse(value)
    except ValueError as exc:
        spec = _BY_FIELD.get(name)
        raise ConfigError(f"{spec.display if spec else name}: {exc}") from None


# ----------------------------------------------------------------------------- -o options


def split_mount_options(text: str) -> list[str]:
    """Split ``-o`` text at commas; ``\\,`` is a literal comma and ``\\\\`` a backslash."""
    items: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            current.append(nxt if nxt in (",", "\\") else "\\" + nxt)
        elif ch == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


#: a layer maps Config fields (and the credential pseudo-fields) to raw values;
#: ``(value, source)`` pairs keep the spelling for error messages
Layer = dict[str, tuple[Any, str]]


def parse_mount_options(texts: Iterable[str]) -> Layer:
    """Turn ``-o`` arguments into a layer for :func:`assemble`.

    Accepts every idsfs ``-o`` key of :data:`OPTIONS` (``cache_size=1G``;
    a switch alone means yes: ``allow_other``, ``debug``), ``ro`` / ``rw``,
    the VFS options of :data:`FUSE_PASSTHROUGH`, and ignores those of
    :data:`IGNORED_MOUNT_OPTIONS` given without a value (``user`` alone is
    fstab's; ``user=NAME`` is the ICAT user), ``comment=`` and ``x-*``
    (fstab/systemd markers).
    Raises :class:`ConfigError` for anything else, e.g. ``max_read`` (the
    mount fails with it) or a value on a switch that is not yes/no.
    """
    layer: Layer = {}
    passthrough: set[str] = set()
    for text in texts:
        for item in split_mount_options(text):
            key, sep, value = item.partition("=")
            key = key.strip()
            source = f"-o {key}"
            if key in ("ro", "rw") and not sep:
                layer["read_only"] = (key == "ro", source)
                continue
            if key in FUSE_PASSTHROUGH and not sep:
                passthrough.add(key)
                continue
            if (key in IGNORED_MOUNT_OPTIONS and not sep) or key.startswith("x-") \
                    or key == "comment":
                continue
            if key == "max_read":
                raise ConfigError("-o max_read: not supported (the mount fails with it)")
            if key == "subtype":
                raise ConfigError("-o subtype: fixed to idsfs")
            spec = _BY_OKEY.get(key)
            if spec is None:
                raise ConfigError(f"-o {key}: unknown mount option (see idsfs mount --help)")
            if spec.is_switch:
                layer[spec.field] = (value if sep else True, source)
            else:
                if not sep:
                    raise ConfigError(f"-o {key}: needs a value ({key}={spec.metavar})")
                layer[spec.field] = (value, source)
    if passthrough:
        layer["fuse_options"] = (frozenset(passthrough), "-o")
    return layer


def env_layer(environ: Mapping[str, str]) -> Layer:
    """The layer of the environment variables :data:`OPTIONS` declares (empty ones ignored)."""
    layer: Layer = {}
    for spec in OPTIONS:
        if spec.env and environ.get(spec.env, "").strip():
            layer[spec.field] = (environ[spec.env], f"${spec.env}")
    return layer


# ----------------------------------------------------------------------------- assembly


def assemble(
    mountpoint: str | Path,
    layers: Sequence[Layer],
    *,
    environ: Mapping[str, str] | None = None,
    prompt: Callable[[str], str] | None = None,
) -> Config:
    """Build the :class:`Config` from ``layers`` (lowest precedence first).

    ``layers`` hold raw values (text or already typed) keyed by Config field;
    a later layer overrides an earlier one field by field (the order of the
    module docstring: config file, environment, ``-o``, long options).
    ``environ`` supplies ``$IDSFS_PASSWORD`` / ``$IDSFS_SESSION_ID`` for the
    credentials (default ``os.environ``); ``prompt`` asks for a missing
    password (default: :func:`getpass.getpass` when stdin is a terminal,
    else no prompt). Raises :class:`ConfigError` naming the offending option.
    """
    env = os.environ if environ is None else environ
    merged: dict[str, tuple[Any, str]] = {}
    for layer in layers:
        for key, item in layer.items():
            if key == "fuse_options" and key in merged:
                item = (frozenset(merged[key][0]) | frozenset(item[0]), item[1])
            merged[key] = item

    values: dict[str, Any] = {}
    for key, (raw, source) in merged.items():
        if key in _CREDENTIAL_FIELDS or key == "fuse_options":
            continue
        spec = _BY_FIELD.get(key)
        if spec is None:
            raise ConfigError(f"{source}: unknown option")
        try:
            values[key] = spec.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    if "fuse_options" in merged:
        values["fuse_options"] = frozenset(merged["fuse_options"][0])

    def path_of(key: str) -> tuple[Path, str] | None:
        if key not in merged:
            return None
        raw, source = merged[key]
        try:
            return _parse_path(raw), source
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    session_file = path_of("session_file")
    password_file = path_of("password_file")
    session: Secret | None = None
    password: Secret | None = None
    if session_file is not None:
        session = Secret.from_file(session_file[0], what=session_file[1])
    elif values.get("user"):
        if password_file is not None:
            password = Secret.from_file(password_file[0], what=password_file[1])
        elif env.get(ENV_PASSWORD):
            password = Secret(env[ENV_PASSWORD], f"environment {ENV_PASSWORD}")
        else:
            ask = prompt
            if ask is None and sys.stdin is not None and sys.stdin.isatty():
                ask = getpass.getpass
            if ask is not None:
                password = Secret(ask(f"ICAT password for {values['user']}: "),
                                  "terminal prompt")
    elif env.get(ENV_SESSION, "").strip():
        session = Secret(env[ENV_SESSION].strip(), f"environment {ENV_SESSION}")
    return Config(mountpoint=Path(mountpoint), password=password, session=session, **values)

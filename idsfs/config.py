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
* config file: python-icat's ``icat.cfg`` (:func:`read_config_files`): the
  file of ``--configfile`` (``$ICAT_CFG``), else every file of python-icat's
  search path (:func:`default_config_files`: ``/etc/icat/icat.cfg``,
  ``~/.config/icat/icat.cfg``, ``~/.icat/icat.cfg``, ``./icat.cfg``; later
  files win). Within it, the ``[idsfs]`` section holds idsfs defaults and the
  section named by ``--configSection`` (``$ICAT_CFG_SECTION``) overrides them
  with python-icat's keys (``url``, ``idsurl``, ``auth``, ``username``,
  ``password``, ``checkCert``, proxies) and idsfs's own (the ``-o`` keys,
  ``mountpoint``, ``options``); see :func:`file_layer`. A file is refused
  when it belongs to another user (not root), may be changed by anyone, or
  holds a password while group or others may read it;
* environment: the variables listed in :data:`OPTIONS` (``IDSFS_ICAT_URL``,
  ``IDSFS_IDS_URL``, ``ICAT_CFG``, ``ICAT_CFG_SECTION``) and the credentials
  of :func:`env_layer`;
* ``-o KEY[=VALUE],...``: every idsfs option has a ``-o`` key, so an fstab line
  can say everything the command line can (``-o cache_size=1G,ro``);
* long options (``--cache-size 1G``) win over the same key in ``-o``.

``idsfs get``/``put`` take their server and credentials from the same sources
(:func:`assemble_client`). ``python -m idsfs.config --markdown`` prints the
option reference of docs/configuration.md from :data:`OPTIONS`.

Credentials
-----------
Secrets never come from argv. A password comes from the highest layer that
names one: ``--password-file`` / ``-o password_file=``, the systemd credential
``idsfs-password`` (``$CREDENTIALS_DIRECTORY``), ``$IDSFS_PASSWORD``, the
config section's ``password`` or ``password_file``; else a prompt on a
terminal. An existing ICAT session id comes from ``--session-file`` /
``-o session_file=``, the systemd credential ``idsfs-session``, or
``$IDSFS_SESSION_ID``. A session file or credential wins over a login; a login
(a user with a password) wins over ``$IDSFS_SESSION_ID`` (the order of
``idsfs get``). The secrets are read when the Config is assembled and kept in
:class:`Secret` objects whose ``repr``/``str`` show only where they came from.

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
import stat
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "CLIENT_FIELDS",
    "CONFIG_FILE_NAME",
    "CREDENTIAL_PASSWORD",
    "CREDENTIAL_SESSION",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_DATAFILE_FORMAT",
    "DEFAULT_DATASET_TYPE",
    "DEFAULT_READAHEAD",
    "ENV_CONFIG_FILE",
    "ENV_CONFIG_SECTION",
    "ENV_PASSWORD",
    "ENV_SESSION",
    "FUSE_PASSTHROUGH",
    "IDSFS_SECTION",
    "IGNORED_MOUNT_OPTIONS",
    "LOG_LEVELS",
    "OPTIONS",
    "ClientConfig",
    "Config",
    "ConfigError",
    "ConfigFiles",
    "Layer",
    "OptionSpec",
    "Secret",
    "assemble",
    "assemble_client",
    "default_config_files",
    "env_layer",
    "file_layer",
    "format_size",
    "parse_bool",
    "parse_duration",
    "parse_mount_options",
    "parse_size",
    "read_config_files",
    "render_markdown",
    "split_mount_options",
]

#: environment variable holding an ICAT session id (same as ``idsfs get``)
ENV_SESSION = "IDSFS_SESSION_ID"
#: environment variable holding the password of ``--user`` (same as ``idsfs get``)
ENV_PASSWORD = "IDSFS_PASSWORD"
#: python-icat's environment variables naming the config file and its section
ENV_CONFIG_FILE = "ICAT_CFG"
ENV_CONFIG_SECTION = "ICAT_CFG_SECTION"
#: names of the systemd credentials read from ``$CREDENTIALS_DIRECTORY``
CREDENTIAL_PASSWORD = "idsfs-password"
CREDENTIAL_SESSION = "idsfs-session"
#: the config file section holding idsfs's own defaults (beneath the selected section)
IDSFS_SECTION = "idsfs"
#: python-icat's config file name
CONFIG_FILE_NAME = "icat.cfg"

#: default block cache size: 256 MiB
DEFAULT_CACHE_SIZE = 256 << 20
#: default block size: 1 MiB (see :mod:`idsfs.blockcache`)
DEFAULT_BLOCK_SIZE = 1 << 20
#: default DatafileFormat of new datafiles (idsfs.upload.DEFAULT_DATAFILE_FORMAT)
DEFAULT_DATAFILE_FORMAT = "binary"
#: default DatasetType of datasets made with mkdir (idsfs.fs.DEFAULT_DATASET_TYPE)
DEFAULT_DATASET_TYPE = "processed"
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
    """A mount option is missing, malformed or out of range (the message says which).

    Raised by the parsing and assembling functions of this module (and :class:`Secret` for
    an empty value).
    """


# ----------------------------------------------------------------------------- secrets


class Secret:
    """A password or session id together with where it came from.

    ``str()``/``repr()`` show only the origin (``"file /etc/idsfs/pw"``,
    ``"environment IDSFS_PASSWORD"``, ``"terminal prompt"``), never the value;
    :meth:`reveal` returns the value. Two Secrets compare equal when origin and
    value are equal. Constructing one raises :class:`ConfigError` when ``value`` is empty.
    """

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str) -> None:
        if not value:
            raise ConfigError(f"the secret from {origin} is empty")
        self._value = value
        self.origin = origin

    def reveal(self) -> str:
        """Return the secret value (never log or print it). Never raises."""
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
    def from_file(cls, path: Path | str, *, what: str, origin: str | None = None,
                  private: bool = True) -> Secret:
        """Read a secret from ``path``: its first line, surrounding whitespace removed.

        ``what`` names the option in error messages; ``origin`` is what ``repr``
        shows (default ``"file PATH"``). Raises :class:`ConfigError` when the
        file cannot be read, is empty, or (with ``private``) is a regular file
        its group or others may read (a pipe such as ``<(pass show icat)`` is
        fine). systemd credentials pass ``private=False``: systemd keeps their
        directory private to the service.
        """
        p = Path(path)
        try:
            with open(p, "rb") as f:
                st = os.fstat(f.fileno())
                if private and stat.S_ISREG(st.st_mode) and st.st_mode & 0o044:
                    raise ConfigError(f"{what}: {p} is not private: {_readers(p, st)}")
                text = f.read().decode("utf-8")
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {p}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{what}: {p} is not UTF-8 text") from exc
        lines = text.splitlines()
        value = lines[0].strip() if lines else ""
        if not value:
            raise ConfigError(f"{what}: {p} is empty")
        return cls(value, origin or f"file {p}")


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
    """Format a byte count with the largest binary unit that divides it (``256M``). Never raises."""
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
    """Parse ``1/0``, ``yes/no``, ``y/n``, ``true/false``, ``t/f``, ``on/off`` (any case).

    The same words python-icat's configuration accepts. Raises ``ValueError``
    for anything else.
    """
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "yes", "y", "true", "t", "on"):
        return True
    if value in ("0", "no", "n", "false", "f", "off"):
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
        """True for options without a value (``--debug``, ``-o allow_other``). Never raises."""
        return self.metavar is None

    @property
    def display(self) -> str:
        """The spelling used in messages: the long option. Never raises."""
        return self.flags[-1] if self.flags else f"-o {self.okey}"


def _parse_section(text: str) -> str:
    value = str(text).strip()
    if not value:
        raise ValueError("must not be empty")
    if any(c in value for c in "[]\n"):
        raise ValueError(f"not a section name: {value!r}")
    return value


def _parse_format(text: str) -> str:
    """``NAME[:VERSION]`` of a DatafileFormat (checked here, looked up at the facility)."""
    value = str(text).strip()
    name, sep, version = value.partition(":")
    if not name.strip() or (sep and not version.strip()):
        raise ValueError(f"not NAME[:VERSION]: {text!r}")
    return value


def _parse_proxy(text: str) -> str:
    value = str(text).strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https", "socks5", "socks5h") or not parts.netloc:
        raise ValueError(f"not a proxy URL: {value!r} (e.g. http://proxy.example.org:3128)")
    if parts.username or parts.password:
        raise ValueError("proxy URLs must not carry user names or passwords")
    return value


#: every option of ``idsfs mount``; see the module docstring
OPTIONS: tuple[OptionSpec, ...] = (
    # configuration file
    OptionSpec("config_file", ("--configfile", "--config-file"), "config_file", _parse_path,
               "read only this icat.cfg file (default: python-icat's search path, see "
               "docs/configuration.md)", "FILE", env=ENV_CONFIG_FILE,
               group="configuration file"),
    OptionSpec("config_section", ("--configSection", "--configsection", "--config-section"),
               "config_section", _parse_section,
               "use this section of the config file (python-icat's --configSection); the "
               "[idsfs] section applies beneath it", "NAME", env=ENV_CONFIG_SECTION,
               group="configuration file"),
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
               f"file whose first line is the password (else the systemd credential "
               f"{CREDENTIAL_PASSWORD}, ${ENV_PASSWORD}, the config section's password, or a "
               f"prompt on a terminal)", "FILE", group="server and credentials"),
    OptionSpec("session_file", ("--session-file",), "session_file", _parse_path,
               f"file holding an existing ICAT session id instead of a login (else the "
               f"systemd credential {CREDENTIAL_SESSION}, or ${ENV_SESSION} when no user is "
               f"given)", "FILE", group="server and credentials"),
    OptionSpec("timeout", ("--timeout",), "timeout", parse_duration,
               "read timeout of each request to ICAT and IDS (default: 60s)", "SECONDS",
               group="server and credentials"),
    OptionSpec("insecure", ("--insecure",), "insecure", parse_bool,
               "do not verify TLS certificates", group="server and credentials"),
    OptionSpec("ca_file", ("--ca-file",), "ca_file", _parse_path,
               "CA bundle to verify TLS certificates with", "FILE",
               group="server and credentials"),
    OptionSpec("http_proxy", ("--http-proxy",), "http_proxy", _parse_proxy,
               "proxy for http:// requests (default: $http_proxy)", "URL",
               group="server and credentials"),
    OptionSpec("https_proxy", ("--https-proxy",), "https_proxy", _parse_proxy,
               "proxy for https:// requests (default: $https_proxy)", "URL",
               group="server and credentials"),
    OptionSpec("no_proxy", ("--no-proxy",), "no_proxy", _parse_str,
               "comma-separated hosts reached without a proxy (default: $no_proxy)", "HOSTS",
               group="server and credentials"),
    # the mount
    OptionSpec("foreground", ("-f", "--foreground"), None, parse_bool,
               "stay in the foreground (default: return once the mount answers and run in "
               "the background)"),
    OptionSpec("read_only", (), "ro", parse_bool,
               "read-only mount (default: read-write, -o rw; a read-only IDS always mounts "
               "read-only)"),
    OptionSpec("allow_other", (), "allow_other", parse_bool,
               "let other users than the mounting one use the mount (see docs/usage.md)"),
    OptionSpec("default_permissions", (), "default_permissions", parse_bool,
               "let the kernel check permissions from the modes (always on)"),
    OptionSpec("fsname", (), "fsname", _parse_str,
               "file system name shown by mount and df (default: the ICAT URL given, else the IDS "
               "URL)", "NAME"),
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
               "ENODATA (default: 60s)", "SECONDS", group="caching and transfers"),
    OptionSpec("readahead", ("--readahead",), "readahead", parse_size,
               f"kernel readahead of the mount (read_ahead_kb), 0 keeps the kernel's "
               f"(default: {format_size(DEFAULT_READAHEAD)})", "SIZE",
               group="caching and transfers"),
    OptionSpec("direct_reads", ("--direct-reads",), "direct_reads", parse_bool,
               "read datafiles without the kernel page cache: every read goes to the daemon "
               "(about a third faster for one-pass copies of large files on a machine short "
               "of CPU; no mmap MAP_SHARED of datafiles; see docs/semantics.md)",
               group="caching and transfers"),
    OptionSpec("max_threads", ("--max-threads",), "max_threads", _parse_int,
               "most ICAT/IDS requests running at once (default: 16)", "N",
               group="caching and transfers"),
    # writing
    OptionSpec("spool_dir", ("--spool-dir",), "spool_dir", _parse_path,
               "where files written through the mount wait for their upload, and pending "
               "uploads survive restarts (default: $XDG_CACHE_HOME/idsfs/spool/<mount id>, "
               "~/.cache when unset; /var/cache/idsfs/spool/<mount id> for root)", "DIR",
               group="writing"),
    OptionSpec("datafile_format", ("--datafile-format",), "datafile_format", _parse_format,
               f"DatafileFormat of new datafiles, looked up at the dataset's facility; without "
               f"VERSION the highest version of NAME (default: {DEFAULT_DATAFILE_FORMAT})",
               "NAME[:VERSION]", group="writing"),
    OptionSpec("dataset_type", ("--dataset-type",), "dataset_type", _parse_str,
               f"DatasetType of datasets made with mkdir in a visit directory (default: "
               f"{DEFAULT_DATASET_TYPE})", "NAME", group="writing"),
    OptionSpec("replace_datafiles", ("--replace",), "replace", parse_bool,
               "let existing datafiles be written again: the new version is stored first, "
               "then the old one deleted (default: refused with EACCES)", group="writing"),
    OptionSpec("upload_wait", ("--upload-wait",), "upload_wait", parse_duration,
               "how long an unmount waits for pending uploads; what remains stays in the "
               "spool for the next mount (default: 60s)", "SECONDS", group="writing"),
    OptionSpec("cached_writes", ("--cached-writes",), "cached_writes", parse_bool,
               "let writes go through the kernel page cache (needed only to map a file "
               "being written with mmap MAP_SHARED; cp needs about 3 times the CPU; default: "
               "writes go straight to the daemon)", group="writing"),
    OptionSpec("live_upload", ("--live-upload",), "live_upload", parse_size,
               "start the upload of a file written from its start while it is being "
               "written, once SIZE bytes are in the spool (0: upload only at close; "
               "default: 4M)", "SIZE", group="writing"),
    OptionSpec("upload_retry", ("--upload-retry",), "upload_retry", parse_duration,
               "first delay before a failed upload is retried in the background, doubling "
               "up to 10 minutes (default: 5s)", "SECONDS", group="writing"),
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
#: pseudo-fields consumed by :func:`assemble` (they become Secrets, or select the file)
_CREDENTIAL_FIELDS = ("password_file", "session_file")
_META_FIELDS = ("config_file",)


# ----------------------------------------------------------------------------- Config


def _current_uid() -> int:
    return os.getuid()


def _current_gid() -> int:
    return os.getgid()


class _ClientOptions:
    """The arguments of :class:`~idsfs.ids.IDSClient`/:class:`~idsfs.icat.ICATClient`
    derived from the connection options (shared by :class:`Config` and
    :class:`ClientConfig`)."""

    insecure: bool
    ca_file: Path | None
    timeout: float
    http_proxy: str | None
    https_proxy: str | None
    no_proxy: str | None

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

    @property
    def proxies(self) -> dict[str, str] | None:
        """The ``proxy`` argument of the clients (None: requests' environment variables)."""
        return _proxies(self.http_proxy, self.https_proxy, self.no_proxy)


@dataclass(frozen=True)
class Config(_ClientOptions):
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
    #: proxies of the clients (None: requests' own ``$http_proxy``/``$https_proxy``/``$no_proxy``)
    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: str | None = None
    #: stay in the foreground
    foreground: bool = False
    #: read-only mount
    read_only: bool = False
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
    #: spool directory of files being written (None: :func:`idsfs.upload.default_spool_dir`)
    spool_dir: Path | None = None
    #: ``NAME[:VERSION]`` of the DatafileFormat new datafiles get
    datafile_format: str = DEFAULT_DATAFILE_FORMAT
    #: DatasetType name of datasets made with mkdir
    dataset_type: str = DEFAULT_DATASET_TYPE
    #: existing datafiles may be written again (stored first, old one deleted after)
    replace_datafiles: bool = False
    #: how long an unmount waits for pending uploads, seconds
    upload_wait: float = 60.0
    #: first delay before retrying a failed upload, seconds
    upload_retry: float = 5.0
    #: writes through the kernel page cache instead of straight to the daemon (direct I/O)
    cached_writes: bool = False
    #: datafiles read with direct I/O (no kernel page cache)
    direct_reads: bool = False
    #: bytes in the spool before a sequentially written file's upload starts (0: at close)
    live_upload: int = 4 << 20
    #: request tracing
    debug: bool = False
    #: log level name (``debug``/``info``/``warning``/``error``)
    log_level: str = "info"
    #: log file (None: stderr, or syslog in the background)
    log_file: Path | None = None
    #: the config file section used (None: only the ``[idsfs]`` section, if any)
    config_section: str | None = None
    #: the config files that were read, in order (later ones won)
    config_files: tuple[Path, ...] = ()
    #: warnings found while assembling (e.g. ignored keys); the daemon logs them
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        """Validate and normalise; raises :class:`ConfigError`."""
        object.__setattr__(self, "mountpoint", Path(os.path.abspath(self.mountpoint)))
        if self.log_file is not None:
            object.__setattr__(self, "log_file", Path(os.path.abspath(self.log_file)))
        if self.ca_file is not None:
            object.__setattr__(self, "ca_file", Path(os.path.abspath(self.ca_file)))
        if self.spool_dir is not None:
            object.__setattr__(self, "spool_dir", Path(os.path.abspath(self.spool_dir)))
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
        for name in ("http_proxy", "https_proxy"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _check(name, value, _parse_proxy))
        object.__setattr__(self, "config_files", tuple(self.config_files))
        object.__setattr__(self, "notes", tuple(self.notes))
        _check_credentials(self.user, self.password, self.session)
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
        _check("datafile_format", self.datafile_format, _parse_format)
        if not self.dataset_type.strip():
            raise ConfigError("--dataset-type: must not be empty")
        for name in ("metadata_ttl", "restore_wait", "upload_wait", "upload_retry"):
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
        """The ``logging`` level: DEBUG with ``--debug``, else ``log_level``.

        Never raises (``log_level`` was checked on construction).
        """
        if self.debug:
            return logging.DEBUG
        return int(getattr(logging, self.log_level.upper()))

    @property
    def effective_fsname(self) -> str:
        """``fsname``, else the ICAT URL (else the IDS URL). Never raises."""
        return self.fsname or self.icat_url or self.ids_url or "idsfs"

    def replace(self, **changes: Any) -> Config:
        """Return a copy with ``changes`` applied; raises :class:`ConfigError` like the
        constructor (``TypeError`` for an unknown field)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """The options as a plain dict for logs and ``idsfs status``; secrets as origins.

        Never raises.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Secret | Path):
                value = str(value)
            elif isinstance(value, frozenset):
                value = sorted(value)
            elif isinstance(value, tuple):
                value = [str(v) for v in value]
            out[f.name] = value
        return out


def _proxies(http: str | None, https: str | None, no: str | None) -> dict[str, str] | None:
    out = {key: value for key, value in (("http", http), ("https", https), ("no_proxy", no))
           if value}
    return out or None


def _check_credentials(user: str | None, password: Secret | None, session: Secret | None) -> None:
    """Raise :class:`ConfigError` unless there is a session id or a user with a password."""
    if session is not None:
        return
    if not user:
        raise ConfigError(
            f"no credentials: give --user NAME with --password-file FILE (or "
            f"${ENV_PASSWORD}), or an ICAT session id with --session-file FILE (or "
            f"${ENV_SESSION})")
    if password is None:
        raise ConfigError(f"no password for user {user!r}: use --password-file "
                          f"FILE or ${ENV_PASSWORD}")


def _check(name: str, value: Any, parse: Callable[[Any], Any]) -> Any:
    try:
        return parse(value)
    except ValueError as exc:
        spec = _BY_FIELD.get(name)
        raise ConfigError(f"{spec.display if spec else name}: {exc}") from None


# ----------------------------------------------------------------------------- -o options


def split_mount_options(text: str) -> list[str]:
    """Split ``-o`` text at commas; ``\\,`` is a literal comma and ``\\\\`` a backslash.

    Never raises.
    """
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
            if key in ("password", "session", "session_id", "sessionid"):
                raise ConfigError(f"-o {key}: secrets are never given as options (ps and "
                                  f"/proc/mounts show them to everyone): use "
                                  f"{'password' if key == 'password' else 'session'}_file=FILE")
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
    """The layer of the environment: the variables :data:`OPTIONS` declares, and credentials.

    Credentials (secrets never come from argv):

    * the systemd credentials ``idsfs-password`` and ``idsfs-session`` in
      ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=idsfs-password:...``); the
      password credential wins over ``$IDSFS_PASSWORD``;
    * ``$IDSFS_PASSWORD``;
    * ``$IDSFS_SESSION_ID``: used only when no ICAT user is configured.

    Empty variables are ignored. Raises :class:`ConfigError` when a credential
    file cannot be read or is empty.
    """
    layer: Layer = {}
    for spec in OPTIONS:
        if spec.env and environ.get(spec.env, "").strip():
            layer[spec.field] = (environ[spec.env], f"${spec.env}")
    if environ.get(ENV_PASSWORD):
        layer["password"] = (Secret(environ[ENV_PASSWORD], f"environment {ENV_PASSWORD}"),
                             f"${ENV_PASSWORD}")
    if environ.get(ENV_SESSION, "").strip():
        layer["session_env"] = (Secret(environ[ENV_SESSION].strip(),
                                       f"environment {ENV_SESSION}"), f"${ENV_SESSION}")
    directory = environ.get("CREDENTIALS_DIRECTORY", "").strip()
    if directory:
        for name, key in ((CREDENTIAL_PASSWORD, "password"), (CREDENTIAL_SESSION, "session")):
            path = Path(directory) / name
            if path.exists():
                what = f"systemd credential {name}"
                layer[key] = (Secret.from_file(path, what=what, origin=what, private=False),
                              what)
    return layer


# ----------------------------------------------------------------------------- config files
#
# python-icat's icat.cfg: ini sections selected with --configSection. The keys
# python-icat defines for a login (url, idsurl, auth, username, password,
# checkCert, proxies) are understood; idsfs's own options use their -o keys.

#: python-icat keys -> Config fields (``checkcert`` is inverted into ``insecure``)
_PYICAT_KEYS: dict[str, str] = {
    "url": "icat_url", "idsurl": "ids_url", "auth": "auth", "username": "user",
    "password": "password", "checkcert": "insecure", "http_proxy": "http_proxy",
    "https_proxy": "https_proxy", "no_proxy": "no_proxy",
}
#: python-icat keys idsfs has no use for (credential keys of other authenticators...)
_PYICAT_IGNORED = frozenset({"promptpass", "configdir", "configfile", "configsection"})
#: keys only config files have
_FILE_KEYS = ("mountpoint", "options", "read_only")
_DEFAULT_SECTION = "DEFAULT"


def default_config_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """python-icat's search path for ``icat.cfg``, in reading order (later files win).

    ``/etc/icat/icat.cfg``, ``~/.config/icat/icat.cfg``, ``~/.icat/icat.cfg``
    and ``icat.cfg`` in the working directory; ``~`` is ``$HOME`` (else the
    user's home directory from the password database). Never raises.
    """
    env = os.environ if environ is None else environ
    home = env.get("HOME") or _home_directory()
    files = [Path("/etc/icat") / CONFIG_FILE_NAME]
    if home:
        files += [Path(home) / ".config" / "icat" / CONFIG_FILE_NAME,
                  Path(home) / ".icat" / CONFIG_FILE_NAME]
    files.append(Path(CONFIG_FILE_NAME))
    return files


def _home_directory() -> str | None:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return None


@dataclass(frozen=True)
class ConfigFiles:
    """The merged contents of the config files that were read.

    Attributes:
        read: the files read, in order (absolute paths).
        skipped: ``"PATH: reason"`` for files of the search path that exist but
            could not be read.
        sections: section name -> key (lower case) -> ``(value, file)``; a
            later file overrides an earlier one key by key. ``[DEFAULT]`` is an
            ordinary entry here.

    Constructing one never raises.
    """

    read: tuple[Path, ...] = ()
    skipped: tuple[str, ...] = ()
    sections: Mapping[str, Mapping[str, tuple[str, Path]]] = field(default_factory=dict)


def _readers(path: Path, st: os.stat_result) -> str:
    """The end of the error for a secret file others may read (its mode has 0o044)."""
    who = "group and others" if st.st_mode & 0o044 == 0o044 else \
        "others" if st.st_mode & 0o004 else "its group"
    return (f"{who} may read it (mode {st.st_mode & 0o777:04o}); make it private with: "
            f"chmod 600 {path}")


def _check_trust(path: Path, st: os.stat_result, uid: int) -> None:
    if st.st_uid not in (uid, 0):
        raise ConfigError(f"config file {path} belongs to uid {st.st_uid}, not to you (uid "
                          f"{uid}) or root: refusing to use it")
    if st.st_mode & 0o002:
        raise ConfigError(f"config file {path} may be changed by anyone (mode "
                          f"{st.st_mode & 0o777:04o}): refusing to use it; chmod o-w {path}")


def read_config_files(paths: Sequence[Path | str], *, explicit: bool = False,
                      uid: int | None = None) -> ConfigFiles:
    """Read and merge ``icat.cfg`` files (python-icat's format: ini, no interpolation).

    Missing files are skipped, unless ``explicit`` (``--configfile``), when a
    missing or unreadable file is an error. Key names are case-insensitive, as
    in python-icat (``checkCert`` = ``checkcert``).

    Raises :class:`ConfigError` when a file is malformed, belongs to another
    user than ``uid`` (default: the caller) or root, may be changed by anyone,
    or holds a ``password`` while group or others may read it.
    """
    import configparser

    me = os.getuid() if uid is None else uid
    read: list[Path] = []
    skipped: list[str] = []
    sections: dict[str, dict[str, tuple[str, Path]]] = {}
    for entry in paths:
        path = Path(os.path.abspath(entry))
        try:
            with open(path, encoding="utf-8") as f:
                st = os.fstat(f.fileno())
                text = f.read()
        except FileNotFoundError:
            if explicit:
                raise ConfigError(f"config file {path} does not exist") from None
            continue
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        except OSError as exc:
            if explicit:
                raise ConfigError(f"cannot read config file {path}: "
                                  f"{exc.strerror or exc}") from None
            skipped.append(f"{path}: {exc.strerror or exc}")
            continue
        _check_trust(path, st, me)
        # [DEFAULT] is kept as an ordinary section, so that what a section says
        # itself can be told apart from what it inherits.
        parser = configparser.RawConfigParser(default_section="\0none")
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"config file {path}: {first}") from None
        if st.st_mode & 0o044 and any(parser.has_option(sec, "password")
                                      for sec in parser.sections()):
            raise ConfigError(f"config file {path} holds a password but {_readers(path, st)}")
        for sec in parser.sections():
            target = sections.setdefault(sec, {})
            for key in parser.options(sec):
                target[key] = (parser.get(sec, key), path)
        read.append(path)
    return ConfigFiles(tuple(read), tuple(skipped), sections)


def _icat_url_from_python_icat(value: str) -> str:
    """python-icat's ``url`` (often the SOAP WSDL) as the ICAT base URL idsfs uses.

    ``https://h:8181/ICATService/ICAT?wsdl`` and ``https://h:8181`` both give
    ``https://h:8181``; other values are returned unchanged (and validated later).
    """
    from urllib.parse import urlunsplit

    parts = urlsplit(value.strip())
    path = parts.path.rstrip("/")
    if path.endswith("/ICATService/ICAT"):
        path = path[: -len("/ICATService/ICAT")]
        query = "" if parts.query.lower() in ("", "wsdl") else parts.query
        return urlunsplit((parts.scheme, parts.netloc, path, query, parts.fragment))
    if parts.query.lower() == "wsdl":
        return urlunsplit((parts.scheme, parts.netloc, path, "", parts.fragment))
    return value.strip()


def _close_option(key: str) -> str | None:
    import difflib

    names = [k for k in _BY_OKEY if k not in _META_FIELDS] + list(_FILE_KEYS) + \
        list(_PYICAT_KEYS)
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
    return match[0] if match else None


def _file_entry(layer: Layer, notes: list[str], key: str, value: str, source: str,
                shared: bool, origin: str) -> None:
    """Put one config file key into ``layer`` (or a note, or raise ConfigError)."""
    if key == "password":
        if not value.strip():
            raise ConfigError(f"{source}: the password is empty")
        layer["password"] = (Secret(value.strip(), origin), source)
    elif key == "checkcert":
        try:
            layer["insecure"] = (not parse_bool(value), source)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    elif key == "url":
        layer["icat_url"] = (_icat_url_from_python_icat(value), source)
    elif key in _PYICAT_KEYS:
        layer[_PYICAT_KEYS[key]] = (value, source)
    elif key == "mountpoint":
        layer["mountpoint"] = (value, source)
    elif key == "options":
        try:
            extra = parse_mount_options([value])
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        for name, (raw, _src) in extra.items():
            if name == "fuse_options" and name in layer:
                raw = frozenset(layer[name][0]) | frozenset(raw)
            layer[name] = (raw, source)
    elif key in _META_FIELDS or key == "config_section":
        raise ConfigError(f"{source}: cannot be set in a config file")
    elif key in _BY_OKEY or key == "read_only":
        spec = _BY_OKEY["ro" if key == "read_only" else key]
        layer[spec.field] = (True if spec.is_switch and not value.strip() else value, source)
    elif key in _PYICAT_IGNORED or key.startswith("cred_"):
        pass
    elif not shared:
        hint = _close_option(key)
        raise ConfigError(f"{source}: unknown option"
                          + (f" (did you mean {hint}?)" if hint else "")
                          + "; see docs/configuration.md")
    else:
        # A python-icat section may hold keys of other programs: only a likely
        # typo of an idsfs key is worth a warning.
        hint = _close_option(key)
        if hint:
            notes.append(f"{source}: not an idsfs option, ignored (did you mean {hint}?)")


def file_layer(files: ConfigFiles, section: str | None) -> tuple[Layer, list[str]]:
    """The layer of the config files: ``[idsfs]``, then ``[DEFAULT]`` and ``[SECTION]``.

    ``[idsfs]`` holds idsfs defaults for every mount (unknown keys are errors);
    with a ``section`` (``--configSection``), its keys and the ``[DEFAULT]``
    ones it inherits override them (unknown keys there belong to other
    programs and are ignored; a near miss of an idsfs key gives a note).
    Returns ``(layer, notes)``. Raises :class:`ConfigError` for bad keys or
    a section that is not there.
    """
    layer: Layer = {}
    notes: list[str] = []
    plan: list[tuple[str, bool]] = [(IDSFS_SECTION, False)]
    if section is not None and section != IDSFS_SECTION:
        if section not in files.sections or section == _DEFAULT_SECTION:
            if files.read:
                where = "in " + ", ".join(str(p) for p in files.read)
            else:
                where = "(no config file was found)"
            extra = f"; unreadable: {'; '.join(files.skipped)}" if files.skipped else ""
            raise ConfigError(f"--configSection: no section [{section}] {where}{extra}")
        plan += [(_DEFAULT_SECTION, True), (section, True)]
    for name, shared in plan:
        entries = files.sections.get(name)
        if not entries:
            continue
        # python-icat's spelling first, so that idsfs's own key for the same field wins
        for key, (value, path) in sorted(entries.items(), key=lambda kv: kv[0] not in
                                         _PYICAT_KEYS):
            _file_entry(layer, notes, key, value, f"{path} [{name}] {key}", shared,
                        f"config file {path} [{name}]")
    return layer, notes


# ----------------------------------------------------------------------------- assembly

#: layer keys that share one slot: the later layer's choice wins whichever key it used
_SLOTS = {"password_file": "password", "session_file": "session"}
#: slots that are not plain Config fields
_SPECIAL_SLOTS = frozenset({"password", "session", "session_env", "config_file", "mountpoint",
                            "fuse_options"})

_Merged = dict[str, tuple[str, Any, str]]


def _merge(layers: Sequence[Layer]) -> _Merged:
    """Merge layers (lowest first) into slot -> ``(key, raw value, source)``."""
    merged: _Merged = {}
    for layer in layers:
        for key, (raw, source) in layer.items():
            slot = _SLOTS.get(key, key)
            if slot == "fuse_options" and slot in merged:
                raw = frozenset(merged[slot][1]) | frozenset(raw)
            merged[slot] = (key, raw, source)
    return merged


def _parse_item(item: tuple[str, Any, str], parse: Callable[[Any], Any]) -> Any:
    _key, raw, source = item
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _files_for(layers: Sequence[Layer], environ: Mapping[str, str],
               search_path: Sequence[Path | str] | None) -> tuple[Layer, list[str], ConfigFiles]:
    """Read the config files the layers ask for and build their layer."""
    pre = _merge(layers)
    section = _parse_item(pre["config_section"], _parse_section) \
        if "config_section" in pre else None
    if "config_file" in pre:
        path = _parse_item(pre["config_file"], _parse_path)
        files = read_config_files([path], explicit=True)
    else:
        files = read_config_files(default_config_files(environ) if search_path is None
                                  else search_path)
    layer, notes = file_layer(files, section)
    return layer, notes, files


def _parse_values(merged: _Merged, fields: Iterable[str] | None = None) -> dict[str, Any]:
    """Parse every plain option slot (only ``fields`` when given)."""
    wanted = None if fields is None else set(fields)
    values: dict[str, Any] = {}
    for slot, item in merged.items():
        if slot in _SPECIAL_SLOTS or (wanted is not None and slot not in wanted):
            continue
        spec = _BY_FIELD.get(slot)
        if spec is None:
            raise ConfigError(f"{item[2]}: unknown option")
        values[slot] = _parse_item(item, spec.parse)
    if "fuse_options" in merged and (wanted is None or "fuse_options" in wanted):
        values["fuse_options"] = frozenset(merged["fuse_options"][1])
    return values


def _secret(item: tuple[str, Any, str]) -> Secret:
    """The Secret of a credential slot: given as such, or read from the named file."""
    _key, raw, source = item
    if isinstance(raw, Secret):
        return raw
    path = _parse_item(item, _parse_path)
    return Secret.from_file(path, what=source)


def _credentials(merged: _Merged, user: str | None,
                 prompt: Callable[[str], str] | None) -> tuple[Secret | None, Secret | None]:
    """``(password, session)`` from the merged slots (see the module docstring)."""
    if "session" in merged:
        return None, _secret(merged["session"])
    if not user:
        if "session_env" in merged:
            return None, _secret(merged["session_env"])
        return None, None
    if "password" in merged:
        return _secret(merged["password"]), None
    ask = prompt
    if ask is None and sys.stdin is not None and sys.stdin.isatty():
        ask = getpass.getpass
    if ask is not None:
        return Secret(ask(f"ICAT password for {user}: "), "terminal prompt"), None
    return None, None


def assemble(
    mountpoint: str | Path | None,
    layers: Sequence[Layer],
    *,
    environ: Mapping[str, str] | None = None,
    prompt: Callable[[str], str] | None = None,
    search_path: Sequence[Path | str] | None = None,
    defaults: Layer | None = None,
) -> Config:
    """Build the :class:`Config` from the config files and ``layers`` (lowest precedence first).

    ``layers`` hold raw values (text or already typed) keyed by Config field;
    a later layer overrides an earlier one field by field (the order of the
    module docstring: environment, ``-o``, long options). The config file
    layer is read here, beneath them all: ``--configfile`` (or the
    python-icat search path ``search_path``, default
    :func:`default_config_files`), section ``--configSection`` and
    ``[idsfs]`` (see :func:`file_layer`). ``mountpoint`` None takes the
    ``mountpoint`` key of the config file. ``environ`` locates the home
    directory (default ``os.environ``); ``prompt`` asks for a missing password
    (default: :func:`getpass.getpass` when stdin is a terminal, else no
    prompt). ``defaults`` is a layer beneath the config file (e.g. the ``rw``
    that mount(8) always passes). Raises :class:`ConfigError` naming the
    offending option.
    """
    env = os.environ if environ is None else environ
    flayer, notes, files = _files_for(layers, env, search_path)
    merged = _merge([defaults or {}, flayer, *layers])
    if mountpoint is None:
        if "mountpoint" not in merged:
            raise ConfigError("no mount point: give MOUNTPOINT, or mountpoint = DIR in the "
                              "config file section")
        mountpoint = _parse_item(merged["mountpoint"], _parse_path)
    values = _parse_values(merged)
    password, session = _credentials(merged, values.get("user"), prompt)
    return Config(mountpoint=Path(mountpoint), password=password, session=session,
                  config_files=files.read, notes=tuple(notes), **values)


# ----------------------------------------------------------------------------- clients

#: the options ``idsfs get`` / ``idsfs put`` take from the same sources
CLIENT_FIELDS = ("icat_url", "ids_url", "auth", "user", "timeout", "insecure", "ca_file",
                 "http_proxy", "https_proxy", "no_proxy", "config_section")


@dataclass(frozen=True)
class ClientConfig(_ClientOptions):
    """Server, credentials and connection options of ``idsfs get`` / ``idsfs put``.

    Assembled by :func:`assemble_client` from the same config files,
    environment and credential sources as a mount. ``repr`` never shows the
    secrets' values. Constructing one never raises.
    """

    icat_url: str | None = None
    ids_url: str | None = None
    auth: str = "simple"
    user: str | None = None
    password: Secret | None = field(default=None, compare=False)
    session: Secret | None = field(default=None, compare=False)
    timeout: float = 120.0
    insecure: bool = False
    ca_file: Path | None = None
    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: str | None = None
    config_section: str | None = None
    config_files: tuple[Path, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)


def assemble_client(
    layers: Sequence[Layer],
    *,
    environ: Mapping[str, str] | None = None,
    prompt: Callable[[str], str] | None = None,
    search_path: Sequence[Path | str] | None = None,
    timeout: float = 120.0,
) -> ClientConfig:
    """Build the :class:`ClientConfig` of ``idsfs get``/``put`` like :func:`assemble` does.

    Only the :data:`CLIENT_FIELDS` are taken from the sources (mount options
    in a config section are ignored); ``timeout`` is the default read timeout.
    Raises :class:`ConfigError` for bad values and when there are no
    credentials (no session id and no user with a password).
    """
    env = os.environ if environ is None else environ
    flayer, notes, files = _files_for(layers, env, search_path)
    merged = _merge([flayer, *layers])
    values = _parse_values(merged, CLIENT_FIELDS)
    password, session = _credentials(merged, values.get("user"), prompt)
    _check_credentials(values.get("user"), password, session)
    for name in ("icat_url", "ids_url"):
        if values.get(name):
            values[name] = _check(name, values[name], _parse_url)
    if values.get("ca_file") is not None:
        values["ca_file"] = Path(os.path.abspath(values["ca_file"]))
    values.setdefault("timeout", timeout)
    if values["timeout"] <= 0:
        raise ConfigError("--timeout: must be more than 0 seconds")
    return ClientConfig(password=password, session=session, config_files=files.read,
                        notes=tuple(notes), **values)


# ----------------------------------------------------------------------------- reference


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """The option reference of docs/configuration.md, generated from :data:`OPTIONS`.

    Tables per group: long options, ``-o``/config file key, environment
    variable, meaning; then the python-icat keys a config section may hold. Never raises.
    """
    lines: list[str] = []
    groups: dict[str, list[OptionSpec]] = {}
    for spec in OPTIONS:
        groups.setdefault(spec.group, []).append(spec)
    for group, specs in groups.items():
        lines += [f"### {group[0].upper()}{group[1:]}", "",
                  "| long option | `-o` key = config file key | environment | meaning |",
                  "|---|---|---|---|"]
        for spec in specs:
            if spec.flags:
                value = f" {spec.metavar}" if spec.metavar else ""
                flags = ", ".join(f"`{flag}{value}`" for flag in spec.flags)
            else:
                flags = "—"
            if spec.okey and spec.field in (*_META_FIELDS, "config_section"):
                okey = f"`{spec.okey}={spec.metavar}` (not in a file)"
            elif spec.okey:
                okey = f"`{spec.okey}={spec.metavar}`" if spec.metavar else f"`{spec.okey}`"
            else:
                okey = "—"
            env = f"`${spec.env}`" if spec.env else "—"
            lines.append(f"| {flags} | {okey} | {env} | {_md(spec.help)} |")
        lines.append("")
    lines += [
        "### Keys of a config file section",
        "",
        "Besides the `-o` keys above (`cache_size = 1G`, `allow_other = yes`), a section may "
        "hold:",
        "",
        "| key | meaning |",
        "|---|---|",
        "| `url` | python-icat: the ICAT URL; a SOAP address such as "
        "`https://icat.example.org:8181/ICATService/ICAT?wsdl` is reduced to "
        "`https://icat.example.org:8181` (same as `icat`) |",
        "| `idsurl` | python-icat: the IDS URL (same as `ids`) |",
        "| `auth` | python-icat: the authenticator (same as `auth`) |",
        "| `username` | python-icat: the ICAT user (same as `user`) |",
        "| `password` | python-icat: the password; the file must then be private "
        "(no read access for group or others) |",
        "| `checkCert` | python-icat: `no` is the same as `insecure = yes` |",
        "| `http_proxy`, `https_proxy`, `no_proxy` | python-icat: proxies (same as the options "
        "above) |",
        "| `promptPass`, `cred_*` | python-icat: ignored by idsfs |",
        "| `mountpoint` | where to mount when no MOUNTPOINT is given (systemd, fstab) |",
        "| `options` | more mount options, as for `-o` (`options = allow_other,noatime`) |",
        "| `read_only` | the same as `ro` |",
        "",
        "When a section gives both spellings of one option (`url` and `icat`), idsfs's own "
        "key wins.",
    ]
    return "\n".join(lines) + "\n"


#: the markers around the generated part of docs/configuration.md
BEGIN_MARKER = "<!-- BEGIN GENERATED by `python -m idsfs.config --markdown` -->"
END_MARKER = "<!-- END GENERATED -->"


def splice_markdown(document: str) -> str:
    """Return ``document`` with the text between the markers replaced by :func:`render_markdown`.

    Raises ``ValueError`` when the markers are missing.
    """
    start = document.index(BEGIN_MARKER) + len(BEGIN_MARKER)
    end = document.index(END_MARKER, start)
    return document[:start] + "\n" + render_markdown() + document[end:]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m idsfs.config --markdown [--update FILE | --check FILE]``.

    Prints the generated option reference, or splices it into FILE between
    the markers (``--update``), or exits 1 when FILE is not up to date
    (``--check``).

    Raises :class:`SystemExit` (argparse) for bad arguments and ``OSError``
    when FILE cannot be read or written.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m idsfs.config",
                                     description="Generate idsfs's option reference.")
    parser.add_argument("--markdown", action="store_true", required=True,
                        help="the option tables of docs/configuration.md")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--update", metavar="FILE", type=Path,
                       help="rewrite the generated part of FILE")
    group.add_argument("--check", metavar="FILE", type=Path,
                       help="exit 1 if the generated part of FILE is out of date")
    args = parser.parse_args(argv)
    if args.update is None and args.check is None:
        sys.stdout.write(render_markdown())
        return 0
    path = args.update or args.check
    text = path.read_text(encoding="utf-8")
    try:
        new = splice_markdown(text)
    except ValueError:
        print(f"{path}: the markers are missing:\n{BEGIN_MARKER}\n{END_MARKER}",
              file=sys.stderr)
        return 1
    if args.check is not None:
        if new != text:
            print(f"{path} is out of date: run python -m idsfs.config --markdown --update "
                  f"{path}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

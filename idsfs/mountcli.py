"""Mount an IDS archive as a directory tree.

``idsfs mount [OPTIONS] MOUNTPOINT`` shows the investigations, datasets and
datafiles the ICAT session may read as a directory tree. It returns once the
mount answers and keeps running in the background (``-f`` stays in the
foreground); Ctrl-C, SIGTERM or ``idsfs umount MOUNTPOINT`` unmount it.

Credentials never go on the command line: ``--user NAME`` with the password
in ``--password-file FILE`` (first line), the systemd credential
idsfs-password or ``$IDSFS_PASSWORD``, or an existing ICAT session id in
``--session-file FILE`` or ``$IDSFS_SESSION_ID``. python-icat users can name a
section of their icat.cfg instead: ``--configSection NAME`` takes url,
idsurl, auth, username and password (and idsfs's own options, mountpoint
included) from it. Every long option can also be given as ``-o key=value``
(``-o cache_size=1G``, as fstab does), long options winning. ``idsfs status
MOUNTPOINT`` shows what the daemon does. See docs/usage.md and
docs/configuration.md.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import secrets
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from idsfs.config import (
    ENV_PASSWORD,
    ENV_SESSION,
    OPTIONS,
    Config,
    ConfigError,
    Layer,
    assemble,
    env_layer,
    parse_mount_options,
    parse_size,
)

__all__ = ["ENV_PASSWORD", "ENV_SESSION", "HELP", "add_arguments", "cli_layer",
           "config_from_args", "format_status", "mount_helper", "query_status", "run", "unmount"]

#: one help line per sub-command this module serves
HELP = {
    "mount": "mount an IDS archive as a directory tree",
    "umount": "unmount an idsfs mount (also clears a stale one)",
    "status": "show what a mounted idsfs is doing (cache, transfers, uploads, session)",
    "demo": "start the emulator with demo data and mount it",
}

_UMOUNT_DESCRIPTION = """Unmount an idsfs mount cleanly.

The daemon is asked through its control socket to unmount and stop, and the
command waits (--wait) until it has exited, saying what is still pending. A
mount still in use (open files, a shell inside it) is refused unless --lazy
is given. A mount whose daemon was killed ("Transport endpoint is not
connected") or does not answer is detached lazily instead. Without a control
socket (another user's daemon) fusermount3 -u is used.
"""

_STATUS_DESCRIPTION = """Show what the daemon of an idsfs mount is doing.

Asks the daemon through its control socket: cache size and hit rate,
transfers in flight with their rates, restores waiting, pending uploads, the
ICAT session's remaining time, pid and uptime. --json prints the same as one
JSON object for scripts.
"""

_DEMO_DESCRIPTION = """Try idsfs on demo data: no server or account needed.

Starts the ICAT + IDS emulator with demo data on a free port of 127.0.0.1,
creates a demo user (its password in a private temporary file), mounts the
archive at DIR (default ./ids-demo), prints what to try, and on Ctrl-C
unmounts and stops the emulator. Needs FUSE (root here).
"""

#: where ``idsfs demo`` mounts by default
DEFAULT_DEMO_DIR = "ids-demo"
#: seconds to wait for the demo emulator's ready line
EMULATOR_START_TIMEOUT = 120.0


# ----------------------------------------------------------------------------- parsers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``idsfs mount``, ``umount`` or ``demo`` (chosen by ``parser.prog``).

    Never raises.
    """
    command = parser.prog.split()[-1]
    if command == "umount":
        parser.description = _UMOUNT_DESCRIPTION
        parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="the mount to remove")
        parser.add_argument("-z", "--lazy", action="store_true",
                            help="detach even when busy (the mount goes when no longer used)")
        parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                            help="how long the mount may take to answer before it is "
                                 "treated as hung (default: 5)")
        parser.add_argument("--wait", type=float, default=90.0, metavar="SECONDS",
                            help="how long to wait for the daemon to finish its work (pending "
                                 "uploads get --upload-wait, 60s by default) and exit "
                                 "(default: 90)")
        return
    if command == "status":
        parser.description = _STATUS_DESCRIPTION
        parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="the idsfs mount")
        parser.add_argument("--json", action="store_true",
                            help="print one JSON object (for scripts)")
        parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                            help="how long the daemon may take to answer (default: 10)")
        return
    if command == "demo":
        parser.description = _DEMO_DESCRIPTION
        parser.add_argument("dir", metavar="DIR", nargs="?", default=DEFAULT_DEMO_DIR,
                            help=f"where to mount (default: ./{DEFAULT_DEMO_DIR}; created if "
                                 f"missing, and removed again at the end)")
        parser.add_argument("--storage", choices=("single", "dataset", "datafile"),
                            default="single",
                            help="emulated storage: single-level, or two-level with "
                                 "archived data (default: single)")
        parser.add_argument("--large-size", metavar="SIZE", default="64M",
                            help="size of the demo's largest file (default: 64M)")
        parser.add_argument("--debug", action="store_true",
                            help="log every request and FUSE operation")
        return
    groups: dict[str, Any] = {}
    for spec in OPTIONS:
        if not spec.flags:
            continue
        group = groups.get(spec.group)
        if group is None:
            group = groups[spec.group] = parser.add_argument_group(spec.group)
        extra = f" [-o {spec.okey}]" if spec.okey else ""
        if spec.is_switch:
            group.add_argument(*spec.flags, dest=spec.field, action="store_const", const=True,
                               default=None, help=spec.help + extra)
        else:
            group.add_argument(*spec.flags, dest=spec.field, metavar=spec.metavar,
                               default=None, help=spec.help + extra)
    mount_group = groups.get("mount") or parser.add_argument_group("mount")
    mount_group.add_argument(
        "-o", dest="mount_options", metavar="OPTS", action="append", default=[],
        help="comma-separated mount options: ro, rw, allow_other, fsname=NAME, "
             "nodev/nosuid/noexec/noatime, and every long option above as key=value "
             "(cache_size=1G, password_file=FILE, debug)")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", default=None,
                        help="directory to mount on (default: the mountpoint key of the "
                             "config section)")


def cli_layer(args: argparse.Namespace) -> Layer:
    """The layer of the long options actually given on the command line. Never raises."""
    layer: Layer = {}
    for spec in OPTIONS:
        if not spec.flags:
            continue
        value = getattr(args, spec.field, None)
        if value is not None:
            layer[spec.field] = (value, spec.flags[-1])
    return layer


# ----------------------------------------------------------------------------- mount


def config_from_args(
    args: argparse.Namespace,
    *,
    environ: Mapping[str, str] | None = None,
    prompt: Callable[[str], str] | None = None,
    search_path: Sequence[Path | str] | None = None,
) -> Config:
    """The :class:`~idsfs.config.Config` of ``idsfs mount`` from its parsed arguments.

    Layers, lowest precedence first: the config files, the environment
    (``environ``, default ``os.environ``), ``-o`` options, long options.
    ``prompt`` and ``search_path`` are passed to :func:`idsfs.config.assemble`.
    Raises :class:`~idsfs.config.ConfigError` naming the offending option.
    """
    env = os.environ if environ is None else environ
    return assemble(args.mountpoint, [
        env_layer(env),
        parse_mount_options(args.mount_options),
        cli_layer(args),
    ], environ=env, prompt=prompt, search_path=search_path)


def _run_mount(args: argparse.Namespace) -> int:
    from idsfs import daemon

    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"idsfs mount: {exc}", file=sys.stderr)
        return 2
    return daemon.mount(config)


# ----------------------------------------------------------------------------- umount


def _fusermount(mountpoint: str, lazy: bool) -> subprocess.CompletedProcess[str]:
    """Run ``fusermount3 -u [-z]`` (or ``fusermount``, or ``umount [-l]`` as root)."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is not None:
        cmd = [tool, "-u", *(["-z"] if lazy else []), "--", mountpoint]
    else:
        cmd = ["umount", *(["-l"] if lazy else []), mountpoint]
    return subprocess.run(cmd, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)


def _control_socket(entry: Any) -> Path | None:
    """The control socket of the daemon serving ``entry`` (a MountEntry), if one exists."""
    from idsfs import control

    if entry.st_dev is None:
        return None
    for path in control.socket_candidates(entry.st_dev, entry.owner_uid):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return path
    return None


def _busy_message(path: str) -> str:
    return (f"{path} is busy (open files or a process working in it); close them, or detach "
            f"now with: idsfs umount --lazy {shlex.quote(path)}")


def _detached(path: str) -> str:
    """What ``idsfs umount --lazy`` says once ``path`` is detached. Never raises."""
    return f"detached {path} (it goes away when no longer used)"


class _Hung(Exception):
    """The daemon's control socket took the request but no answer came in time."""


def _stop_through_channel(socket_path: Path, path: str, lazy: bool, timeout: float,
                          wait: float, progress: Any) -> tuple[int, str] | None:
    """Ask the daemon to stop and wait for it; None when the channel cannot be used.

    Raises :class:`_Hung` when the daemon took the request but did not answer
    within ``timeout`` (stopped, or stuck) and the mount is still there.
    """
    from idsfs.control import ControlClient, ControlError

    try:
        client = ControlClient(socket_path, timeout=timeout)
    except ControlError:
        return None
    with client:
        try:
            reply = client.request({"request": "stop", "lazy": lazy}, timeout=timeout)
        except ControlError as exc:
            from idsfs.daemon import find_mount

            if find_mount(path) is None:  # the answer was slow, but the unmount happened
                return 0, ""
            if getattr(exc, "timed_out", False):
                raise _Hung from exc
            return None
        if not reply.get("ok"):
            if reply.get("error") == "busy":
                return 1, _busy_message(path)
            return 1, str(reply.get("message") or reply.get("error") or "the daemon refused")
        pid = reply.get("pid")
        pending: list[str] = list(reply.get("pending") or [])
        if reply.get("event") == "detached":  # lazy: the daemon serves on until unused
            return 0, _detached(path)
        status: int | None = None
        try:
            for event in client.events(wait):
                if event.get("event") == "exit":
                    status = int(event.get("status", 0))
                    pending = list(event.get("pending") or [])
                    break
                if event.get("message") and progress is not None:
                    progress(str(event["message"]))
                if "pending" in event:
                    pending = list(event.get("pending") or [])
        except ControlError as exc:
            if getattr(exc, "timed_out", False):
                what = f": still pending: {'; '.join(pending)}" if pending else ""
                return 1, (f"{path} is unmounted, but its daemon (pid {pid}) is still "
                           f"finishing after {wait:g} s{what}")
            # the connection broke: the daemon is gone (killed?); fall through
    message = ""
    if status not in (None, 0):
        message = f"the daemon of {path} (pid {pid}) exited with status {status}"
    if pending:
        lines = "".join(f"\n  {line}" for line in pending)
        message = (message + "; " if message else "") + \
            f"not stored, kept in the spool (pending ones are resumed at the next mount; " \
            f"failed and conflicting ones wait for you, see docs/semantics.md):{lines}"
    from idsfs.daemon import find_mount

    entry = find_mount(path)
    if entry is not None and entry.is_fuse:
        # e.g. the daemon runs in another mount namespace: clear this one's view
        done = _fusermount(entry.mountpoint, True)
        if done.returncode != 0 and find_mount(path) is not None:
            text = (done.stderr or done.stdout).strip()
            return 1, f"the daemon stopped, but {path} could not be detached here: {text}"
    return (0 if status in (None, 0) and not pending else 1), message


def unmount(mountpoint: str | Path, *, lazy: bool = False, timeout: float = 5.0,
            wait: float = 90.0, progress: Any = None) -> tuple[int, str]:
    """Unmount an idsfs (FUSE) mount; returns ``(exit status, message)``.

    When the daemon's control socket answers, the daemon is asked to unmount
    (refused when busy, unless ``lazy``) and stop, and this waits up to
    ``wait`` seconds for it to exit; ``progress(message)`` receives what it
    reports meanwhile (e.g. uploads it waits for). A status of 1 with a
    message names what is still pending. Without a control socket, a live
    mount is unmounted with ``fusermount3 -u`` (refused when busy, unless
    ``lazy``); a stale one (daemon gone: ENOTCONN, or not answering within
    ``timeout``) is detached with ``fusermount3 -u -z``. The message is empty
    after a plain clean unmount. Never raises for mount problems.
    """
    from idsfs.daemon import find_mount, probe_mount

    path = str(mountpoint)
    entry = find_mount(path)
    if entry is None:
        return 1, f"{path} is not mounted"
    if not entry.is_fuse:
        return 1, f"{path} is not a FUSE mount (it is {entry.fstype}); use umount(8)"
    socket_path = _control_socket(entry)
    hung = False
    if socket_path is not None:
        try:
            result = _stop_through_channel(socket_path, path, lazy, timeout, wait, progress)
        except _Hung:
            result, hung = None, True  # no need to wait for a probe as well
        if result is not None:
            status, message = result
            if lazy and status == 0 and not message:
                message = _detached(path)
            return status, message
    state = None if hung else probe_mount(path, timeout=timeout)
    if state in (0, errno.EACCES, errno.EPERM):
        # EACCES: a live mount of another user (FUSE lets only its owner in
        # without allow_other): unmounted as such, never detached as stale
        done = _fusermount(entry.mountpoint, lazy)
        if done.returncode != 0 and find_mount(path) is None:
            return 0, ""  # unmounted meanwhile (e.g. by the daemon, asked above)
        if done.returncode != 0:
            text = (done.stderr or done.stdout).strip()
            if "busy" in text.lower():
                return 1, _busy_message(path)
            if state != 0:
                return 1, (f"{path} is mounted by another user ({os.strerror(state)}): only "
                           f"they or root can unmount it")
            return 1, f"unmounting {path} failed: {text or 'status ' + str(done.returncode)}"
        return 0, _detached(path) if lazy else ""
    reason = ("its daemon is gone (Transport endpoint is not connected)"
              if state == errno.ENOTCONN else
              f"it did not answer within {timeout:g} s" if state is None else
              f"it answers {os.strerror(state)}")
    done = _fusermount(entry.mountpoint, True)
    if done.returncode != 0:
        text = (done.stderr or done.stdout).strip()
        return 1, f"{path} is stale ({reason}) and could not be cleared: {text}"
    return 0, f"cleared the stale mount on {path}: {reason}"


def _run_umount(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(f"idsfs umount: {message}", file=sys.stderr, flush=True)

    status, message = unmount(args.mountpoint, lazy=args.lazy, timeout=args.timeout,
                              wait=args.wait, progress=progress)
    if message:
        print(f"idsfs umount: {message}", file=sys.stderr)
    return status


# ----------------------------------------------------------------------------- status


class StatusError(Exception):
    """``idsfs status`` cannot get an answer (the message says why).

    Raised by :func:`query_status`.
    """


def query_status(mountpoint: str | Path, timeout: float = 10.0) -> dict[str, Any]:
    """Ask the daemon of ``mountpoint`` for its status (see ``Daemon.status``).

    Raises :class:`StatusError` when it is not an idsfs mount, its daemon has
    no reachable control socket, or it does not answer within ``timeout``.
    """
    from idsfs.control import ControlClient, ControlError
    from idsfs.daemon import find_mount

    path = str(mountpoint)
    entry = find_mount(path)
    if entry is None:
        if not os.path.lexists(path):
            raise StatusError(f"{path} does not exist")
        raise StatusError(f"{path} is not mounted")
    if entry.fstype != "fuse.idsfs":
        raise StatusError(f"{path} is not an idsfs mount (it is {entry.fstype})")
    socket_path = _control_socket(entry)
    if socket_path is None:
        raise StatusError(f"the daemon of {path} has no control socket here (stopped, "
                          f"killed, or another user's); a stale mount is cleared with: "
                          f"idsfs umount {shlex.quote(path)}")
    try:
        with ControlClient(socket_path, timeout=timeout) as client:
            reply = client.request({"request": "status"}, timeout=timeout)
    except ControlError as exc:
        raise StatusError(f"the daemon of {path} does not answer: {exc}") from exc
    if not reply.get("ok") or not isinstance(reply.get("status"), dict):
        raise StatusError(f"the daemon of {path} answered: "
                          f"{reply.get('message') or reply.get('error')}")
    return dict(reply["status"])


def _human_size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                         ("KiB", 1 << 10)):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"


def _human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"


def _describe_items(items: Any) -> list[str]:
    out = []
    for item in items or []:
        if isinstance(item, dict):
            name = item.get("path") or item.get("name") or item.get("datafile_id") or "?"
            extra = ", ".join(f"{k} {v}" for k, v in item.items()
                              if k not in ("path", "name") and v not in (None, ""))
            out.append(f"{name}" + (f" ({extra})" if extra else ""))
        else:
            out.append(str(item))
    return out


def format_status(status: dict[str, Any]) -> str:
    """The human form of a status dict (``idsfs status`` without ``--json``).

    Raises ``TypeError`` or ``AttributeError`` for a dict not shaped as ``Daemon.status``
    makes it (e.g. a number where a dict belongs).
    """
    lines = []
    mode = "read-only" if status.get("read_only") else "read-write"
    lines.append(f"{status.get('mountpoint')}: idsfs {status.get('version')}, pid "
                 f"{status.get('pid')}, up {_human_duration(status.get('uptime'))}, {mode}"
                 + (", stopping" if status.get("stopping") else ""))
    lines.append(f"  ICAT       {status.get('icat_url')}")
    lines.append(f"  IDS        {status.get('ids_url')}")
    session = status.get("session") or {}
    text = f"user {session.get('user') or '?'}"
    if session.get("expired"):
        text += ", EXPIRED"
    elif session.get("remaining") is not None:
        text += f", {_human_duration(session['remaining'])} left"
        if session.get("checked") == "estimated":
            text += " (estimated)"
    text += ", logged in by the daemon" if session.get("owned") else ", adopted session"
    if session.get("expired"):
        text += f" ({session['error']})"
        if not session.get("owned"):
            text += ": remount with a new session"
    elif session.get("error"):
        text += f"; check failed: {session['error']}"
    lines.append(f"  session    {text}")
    config = status.get("config") or {}
    if config.get("files"):
        section = f" [{config['section']}]" if config.get("section") else ""
        lines.append(f"  config     {', '.join(config['files'])}{section}")
    cache = status.get("cache")
    if cache:
        rate = cache.get("hit_rate")
        shown = f"{rate * 100:.1f}%" if rate is not None else "-"
        lines.append(f"  cache      {_human_size(cache.get('bytes'))} of "
                     f"{_human_size(cache.get('capacity'))} in {cache.get('blocks')} blocks; "
                     f"hit rate {shown} ({cache.get('hits')} hits, {cache.get('misses')} "
                     f"misses, {cache.get('waits')} waits)")
    transfers = status.get("transfers")
    if transfers is not None:
        streams = transfers.get("streams") or []
        fetched = _human_size(transfers.get("bytes_fetched"))
        lines.append(f"  transfers  {len(streams)} open, {fetched} read from IDS in all "
                     f"({transfers.get('streams_opened')} streams, "
                     f"{transfers.get('resumes')} resumed, {transfers.get('failures')} failures)")
        for st in streams:
            lines.append(f"    datafile {st.get('datafile_id')}: {st.get('state')} at "
                         f"{_human_size(st.get('offset'))}, {_human_size(st.get('rate'))}/s, "
                         f"{st.get('queued')} blocks queued")
        restores = transfers.get("restores") or []
        lines.append(f"  restores   {len(restores)} waiting" if restores else
                     "  restores   none waiting")
        for r in restores:
            lines.append(f"    datafile {r.get('datafile_id')}: {r.get('readers')} reads "
                         f"waiting for {_human_duration(r.get('seconds'))}")
    known = {"version", "pid", "uptime", "started", "mountpoint", "device", "fsname",
             "read_only", "icat_url", "ids_url", "config", "session", "stopping", "cache",
             "transfers"}
    for name, section in status.items():
        if name in known:
            continue
        label = f"  {name:<10} "
        if isinstance(section, dict):
            listed = ("in_progress", "pending", "held")
            items = {k: _describe_items(section.get(k)) for k in listed}
            rest = {k: v for k, v in section.items() if k not in listed}
            head = ", ".join(f"{len(items[k])} {k.replace('_', ' ')}" for k in
                             ("pending", "held", "in_progress") if k in section)
            extra = ", ".join(f"{k} {_human_size(v) if 'bytes' in k and isinstance(v, int) else v}"
                              for k, v in rest.items())
            lines.append(label + "; ".join(x for x in (head, extra) if x))
            lines += [f"    {item}" for k in listed for item in items[k]]
        else:
            lines.append(label + str(section))
    return "\n".join(lines)


def _run_status(args: argparse.Namespace) -> int:
    try:
        status = query_status(args.mountpoint, timeout=args.timeout)
    except StatusError as exc:
        print(f"idsfs status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return 0


# ----------------------------------------------------------------------------- mount(8)

_HELPER_USAGE = """usage: {prog} SPEC DIR [-sfnv] [-o OPTIONS] [-t TYPE]

The mount helper of idsfs, as mount(8) and mount.fuse3 call it for fstab lines
such as
    idsfs#SECTION  /mnt/ids  fuse        _netdev,ro  0 0
    SECTION        /mnt/ids  fuse.idsfs  _netdev,ro  0 0
SPEC names a section of python-icat's icat.cfg (see docs/configuration.md), or
is an ICAT URL (https://...), or 'none' (everything from -o). OPTIONS are the
-o options of idsfs mount (cache_size=1G, config_file=FILE, user=NAME,
password_file=FILE, allow_other, ...). -f checks everything but does not
mount; -v says what it does; -s drops unknown options instead of failing; -n
is accepted and ignored. See docs/systemd.md.
"""

#: exit status of a mount helper when the mount failed (mount(8): "mount failure")
MOUNT_FAILURE = 32


def _sloppy(texts: list[str]) -> tuple[list[str], list[str]]:
    """Split ``-o`` texts into those idsfs understands and unknown options (mount -s)."""
    from idsfs.config import split_mount_options

    kept: list[str] = []
    dropped: list[str] = []
    for text in texts:
        for item in split_mount_options(text):
            escaped = item.replace("\\", "\\\\").replace(",", "\\,")
            try:
                parse_mount_options([escaped])
            except ConfigError as exc:
                if "unknown mount option" in str(exc):
                    dropped.append(item.partition("=")[0])
                    continue
            kept.append(escaped)
    return ([",".join(kept)] if kept else []), dropped


def _mount_fstab(pid: int) -> str | None:
    """The fstab the mount(8) among the first ancestors of ``pid`` reads, or None.

    mount.fuse3 runs ``idsfs SPEC DIR`` through ``/bin/sh -c`` for the
    ``idsfs#SPEC ... fuse`` and ``SPEC ... fuse.idsfs`` lines alike: only the
    fstab line tells which one it was. ``--fstab FILE``/``-T FILE``, else
    ``$LIBMOUNT_FSTAB``, else /etc/fstab. Never raises.
    """
    for _ in range(4):
        try:
            with open(f"/proc/{pid}/status", encoding="utf-8") as f:
                ppid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
            with open(f"/proc/{ppid}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")]
        except (OSError, StopIteration, ValueError):
            return None
        if argv and os.path.basename(argv[0]) == "mount":
            for i, arg in enumerate(argv[1:], 1):
                if arg in ("--fstab", "-T") and i + 1 < len(argv):
                    return argv[i + 1]
                if arg.startswith("--fstab="):
                    return arg[len("--fstab="):]
                if arg.startswith("-T") and len(arg) > 2:
                    return arg[2:]
            return os.environ.get("LIBMOUNT_FSTAB") or "/etc/fstab"
        pid = ppid
    return None


def _fstab_source(directory: str, fstab: str | None) -> str | None:
    """The source field, as written, of ``fstab``'s idsfs line for ``directory``.

    Never raises (None when there is no such line or the file cannot be read).
    """
    from idsfs.daemon import unescape_mount_field

    if fstab is None:
        return None
    try:
        with open(fstab, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    where = os.path.realpath(directory)
    for line in lines:
        fields = line.split()
        if len(fields) < 3 or fields[0].startswith("#"):
            continue
        source, target, fstype = (unescape_mount_field(x) for x in fields[:3])
        idsfs_line = fstype == "fuse.idsfs" or (fstype == "fuse" and source.startswith("idsfs#"))
        if idsfs_line and os.path.realpath(target) == where:
            return source
    return None


def _spec_layer(spec: str, via_mount_fuse: bool, directory: str = "") -> Layer:
    """What the fstab source says: a config section, an ICAT URL, or nothing.

    The file system name becomes the fstab source as written (``SECTION``, or
    ``idsfs#SECTION``), so that ``mount -a`` recognises the entry as mounted.
    When mount.fuse3 ran ``idsfs SECTION DIR`` (``via_mount_fuse``) the line
    is looked up in mount(8)'s fstab; without one it is ``idsfs#SECTION``.
    """
    value = spec.strip()
    if value.startswith("idsfs#"):
        value = value[len("idsfs#"):]
    if value in ("", "none", "idsfs"):
        return {}
    fsname = value
    if via_mount_fuse:
        written = _fstab_source(directory, _mount_fstab(os.getpid()))
        fsname = written if written in (value, f"idsfs#{value}") else f"idsfs#{value}"
    layer: Layer = {"fsname": (fsname, "mount source")}
    if value.startswith(("http://", "https://")):
        layer["icat_url"] = (value, "mount source")
    else:
        layer["config_section"] = (value, "mount source")
    return layer


def _take_rw(options: list[str]) -> tuple[list[str], bool]:
    """Remove ``rw`` from ``-o`` texts: mount(8) always passes rw or ro."""
    from idsfs.config import split_mount_options

    kept: list[str] = []
    saw = False
    for text in options:
        for item in split_mount_options(text):
            if item == "rw":
                saw = True
                continue
            kept.append(item.replace("\\", "\\\\").replace(",", "\\,"))
    return ([",".join(kept)] if kept else []), saw


def mount_helper(argv: list[str] | None = None, prog: str = "mount.idsfs") -> int:
    """Mount as ``mount.idsfs SPEC DIR [-sfnv] [-o OPTIONS] [-t TYPE]`` (mount(8)'s helper).

    Used for ``mount.idsfs``, ``mount.fuse.idsfs`` and for ``idsfs SPEC DIR -o
    OPTIONS`` as ``mount.fuse3`` runs it for ``idsfs#SPEC`` and ``fuse.idsfs``
    fstab lines. Always mounts in the background and returns once the mount
    answers. Exit status: 0 mounted (or, with ``-f``, would be), 1 bad usage or
    options, 32 the mount failed (mount(8)'s codes).

    Bad usage, bad options and failed mounts are exit statuses; raises only what
    :func:`idsfs.daemon.mount` raises (``OSError`` when the fork fails,
    ``KeyboardInterrupt`` when interrupted while it waits for the mount).
    """
    from idsfs import daemon

    args = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options: list[str] = []
    fake = verbose = sloppy = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            print(_HELPER_USAGE.format(prog=prog))
            return 0
        if arg == "-o" or arg == "-t":
            if i + 1 >= len(args):
                print(f"{prog}: {arg} needs a value", file=sys.stderr)
                return 1
            if arg == "-o":
                options.append(args[i + 1])
            elif args[i + 1] not in ("idsfs", "fuse.idsfs", "fuse"):
                print(f"{prog}: -t {args[i + 1]}: this helper mounts only fuse.idsfs",
                      file=sys.stderr)
                return 1
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg.startswith("-") and len(arg) > 1 and set(arg[1:]) <= set("sfnvr"):
            fake |= "f" in arg
            verbose |= "v" in arg
            sloppy |= "s" in arg
            if "r" in arg:
                options.append("ro")
        elif arg.startswith("-") and len(arg) > 1:
            print(f"{prog}: unknown option {arg}\n" + _HELPER_USAGE.format(prog=prog),
                  file=sys.stderr)
            return 1
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        print(_HELPER_USAGE.format(prog=prog), file=sys.stderr)
        return 1
    spec, directory = positional
    if sloppy:
        options, dropped = _sloppy(options)
        if dropped:
            print(f"{prog}: ignoring unknown options (-s): {', '.join(dropped)}",
                  file=sys.stderr)
    # mount(8) passes "rw" unless the entry says "ro": let a config section's
    # read_only = yes win over that.
    options, saw_rw = _take_rw(options)
    defaults: Layer = {"read_only": (False, "-o rw")} if saw_rw else {}
    try:
        config = assemble(directory, [env_layer(os.environ),
                                      _spec_layer(spec, prog == "idsfs", directory),
                                      parse_mount_options(options),
                                      {"foreground": (False, prog)}], defaults=defaults)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    if verbose:
        where = f" (section [{config.config_section}])" if config.config_section else ""
        print(f"{prog}: mounting {config.effective_fsname}{where} on {config.mountpoint}",
              file=sys.stderr)
    if fake:
        try:
            daemon.check_mountpoint(config.mountpoint)
        except daemon.StartupError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return MOUNT_FAILURE
        return 0
    return 0 if daemon.mount(config) == 0 else MOUNT_FAILURE


# ----------------------------------------------------------------------------- demo


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child before exec
    """Child side: receive SIGTERM when the demo process dies (Linux prctl)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


class DemoEmulator:
    """The emulator child process of ``idsfs demo`` (its own process group: Ctrl-C spares it).

    Constructing one raises ``OSError`` when its password files cannot be written or the
    process cannot be started.
    """

    def __init__(self, workdir: Path, storage: str, large_size: int) -> None:
        self.workdir = workdir
        self.demo_password = workdir / "demo-password"
        root_password = workdir / "root-password"
        _write_private(self.demo_password, secrets.token_urlsafe(18))
        _write_private(root_password, secrets.token_urlsafe(18))
        cmd = [sys.executable, "-m", "idsfs.emulator", "--port", "0", "--demo", "--quiet",
               "--user", f"demo:@{self.demo_password}", "--user", f"root:@{root_password}",
               "--root", "root", "--storage", storage, "--demo-large-size", str(large_size),
               "--data", str(workdir / "data")]
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, process_group=0,
            preexec_fn=_set_pdeathsig)
        self.icat_url = self.ids_url = ""

    def wait_ready(self, timeout: float = EMULATOR_START_TIMEOUT) -> None:
        """Read the ready line; raises RuntimeError when the emulator fails or is too slow."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        buffer = b""
        fd = self.process.stdout.fileno()
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the emulator did not start within {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"the emulator exited (status {self.process.wait()})")
                buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode("utf-8", "replace")
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if not line.startswith("idsfs emulator ready") or "icat" not in fields:
            raise RuntimeError(f"unexpected emulator output: {line!r}")
        self.icat_url, self.ids_url = fields["icat"], fields["ids"]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s. Never raises."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def _demo_hints(shown: str) -> str:
    q = shlex.quote
    base = shown.rstrip("/") or "."
    raw = f"{base}/DEMO/DEMO-2024-001/1/raw"
    return "\n".join([
        "Try, in another terminal:",
        f"  ls -l {q(base + '/DEMO')}",
        f"  ls -lR {q(base)} | less",
        f"  cat {q(raw + '/tiny.txt')}",
        f"  getfattr -d {q(raw + '/large.bin')}",
        f"  cp {q(raw + '/large.bin')} /tmp/ && cmp /tmp/large.bin {q(raw + '/large.bin')}",
        f"  find {q(base)} -name '*.nxs'",
        "Press Ctrl-C here to unmount and stop.",
    ])


def _run_demo(args: argparse.Namespace) -> int:
    from idsfs import daemon

    try:
        large_size = parse_size(args.large_size)
    except ValueError as exc:
        print(f"idsfs demo: --large-size: {exc}", file=sys.stderr)
        return 2
    mountpoint = Path(args.dir).absolute()
    # the directories made here (DIR and missing parents), removed again at the end
    created = [p for p in (mountpoint, *mountpoint.parents) if not p.exists()]
    if created:
        try:
            mountpoint.mkdir(parents=True)
        except OSError as exc:
            print(f"idsfs demo: cannot create {mountpoint}: {exc.strerror}", file=sys.stderr)
            return 1
    workdir = Path(tempfile.mkdtemp(prefix="idsfs-demo-"))
    emulator: DemoEmulator | None = None
    status = 1
    try:
        print("idsfs demo: starting the ICAT + IDS emulator with demo data ...",
              file=sys.stderr, flush=True)
        emulator = DemoEmulator(workdir, args.storage, large_size)
        try:
            emulator.wait_ready()
        except RuntimeError as exc:
            print(f"idsfs demo: {exc}", file=sys.stderr)
            return 1
        layer: Layer = {
            "icat_url": (emulator.icat_url, "demo"),
            "ids_url": (emulator.ids_url, "demo"),
            "user": ("demo", "demo"),
            "password_file": (str(emulator.demo_password), "demo"),
            "foreground": (True, "demo"),
            "fsname": ("idsfs-demo", "demo"),
            # the demo's uploads die with its emulator: spool inside its workdir
            "spool_dir": (workdir / "spool", "demo"),
        }
        if args.debug:
            layer["debug"] = (True, "--debug")
        try:
            config = assemble(mountpoint, [layer], environ={})
        except ConfigError as exc:
            print(f"idsfs demo: {exc}", file=sys.stderr)
            return 2
        shown = args.dir
        icat_url, ids_url = emulator.icat_url, emulator.ids_url

        def ready() -> None:
            print(f"\nidsfs demo: the demo archive is mounted on {mountpoint}\n"
                  f"  ICAT {icat_url}  IDS {ids_url}  user demo\n\n"
                  f"{_demo_hints(shown)}\n", flush=True)

        status = daemon.mount(config, when_ready=ready)
        if status == 0:
            print("idsfs demo: unmounted; stopping the emulator", file=sys.stderr, flush=True)
        return status
    except KeyboardInterrupt:
        return 130
    finally:
        if emulator is not None:
            emulator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        for made in created:  # innermost first; one that is not empty stays
            try:
                made.rmdir()
            except OSError:
                break


# ----------------------------------------------------------------------------- dispatch


def run(args: argparse.Namespace) -> int:
    """Run ``idsfs mount``, ``umount`` or ``demo``; return the exit status.

    0: done; 1: the server, the mount or the unmount failed (message on
    stderr); 2: bad options or mount point; 130: interrupted.

    Usage, server and mount errors become the exit status
    (``KeyboardInterrupt``: 130). Raises ``OSError`` when ``idsfs mount``
    cannot fork or open its log file (see :func:`idsfs.daemon.mount`) and
    when ``idsfs demo`` cannot create its temporary files or start the
    emulator.
    """
    command = getattr(args, "command", None) or "mount"
    try:
        if command == "umount":
            return _run_umount(args)
        if command == "status":
            return _run_status(args)
        if command == "demo":
            return _run_demo(args)
        return _run_mount(args)
    except KeyboardInterrupt:
        print(f"idsfs {command}: interrupted", file=sys.stderr)
        return 130


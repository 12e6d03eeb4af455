"""Mount an IDS archive as a directory tree.

``idsfs mount [OPTIONS] MOUNTPOINT`` shows the investigations, datasets and
datafiles the ICAT session may read as a directory tree. It returns once the
mount answers and keeps running in the background (``-f`` stays in the
foreground); Ctrl-C, SIGTERM or ``idsfs umount MOUNTPOINT`` unmount it.

Credentials never go on the command line: ``--user NAME`` with the password
in ``--password-file FILE`` (first line) or ``$IDSFS_PASSWORD``, or an
existing ICAT session id in ``--session-file FILE`` or ``$IDSFS_SESSION_ID``.
Every long option can also be given as ``-o key=value`` (``-o cache_size=1G``,
as fstab will), long options winning. See docs/usage.md.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from idsfs.config import (
    ENV_PASSWORD,
    ENV_SESSION,
    OPTIONS,
    ConfigError,
    Layer,
    assemble,
    env_layer,
    parse_mount_options,
    parse_size,
)

__all__ = ["ENV_PASSWORD", "ENV_SESSION", "HELP", "add_arguments", "cli_layer", "run", "unmount"]

HELP = "mount an IDS archive (mount), unmount it (umount), or try it on demo data (demo)"

_UMOUNT_DESCRIPTION = """Unmount an idsfs mount cleanly.

A mount whose daemon was killed ("Transport endpoint is not connected") or
does not answer is detached lazily instead. A mount still in use (open files,
a shell inside it) is refused unless --lazy is given.
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
    """Add the options of ``idsfs mount``, ``umount`` or ``demo`` (chosen by ``parser.prog``)."""
    command = parser.prog.split()[-1]
    if command == "umount":
        parser.description = _UMOUNT_DESCRIPTION
        parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="the mount to remove")
        parser.add_argument("-z", "--lazy", action="store_true",
                            help="detach even when busy (the mount goes when no longer used)")
        parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                            help="how long the mount may take to answer before it is "
                                 "treated as hung (default: 5)")
        return
    if command == "demo":
        parser.description = _DEMO_DESCRIPTION
        parser.add_argument("dir", metavar="DIR", nargs="?", default=DEFAULT_DEMO_DIR,
                            help=f"where to mount (default: ./{DEFAULT_DEMO_DIR}; created if "
                                 f"missing)")
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
    """The layer of the long options actually given on the command line."""
    layer: Layer = {}
    for spec in OPTIONS:
        if not spec.flags:
            continue
        value = getattr(args, spec.field, None)
        if value is not None:
            layer[spec.field] = (value, spec.flags[-1])
    return layer


# ----------------------------------------------------------------------------- mount


def _run_mount(args: argparse.Namespace) -> int:
    from idsfs import daemon

    try:
        config = assemble(args.mountpoint, [
            env_layer(os.environ),
            parse_mount_options(args.mount_options),
            cli_layer(args),
        ])
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


def unmount(mountpoint: str | Path, *, lazy: bool = False, timeout: float = 5.0) -> tuple[int, str]:
    """Unmount an idsfs (FUSE) mount; returns ``(exit status, message)``.

    A live mount is unmounted with ``fusermount3 -u`` (refused when busy,
    unless ``lazy``); a stale one (daemon gone: ENOTCONN, or not answering
    within ``timeout``) is detached with ``fusermount3 -u -z``. The message is
    empty after a plain clean unmount. Never raises for mount problems.
    """
    from idsfs.daemon import find_mount, probe_mount

    path = str(mountpoint)
    entry = find_mount(path)
    if entry is None:
        return 1, f"{path} is not mounted"
    if not entry.is_fuse:
        return 1, f"{path} is not a FUSE mount (it is {entry.fstype}); use umount(8)"
    state = probe_mount(path, timeout=timeout)
    if state == 0:
        done = _fusermount(entry.mountpoint, lazy)
        if done.returncode != 0:
            text = (done.stderr or done.stdout).strip()
            if "busy" in text.lower():
                return 1, (f"{path} is busy (open files or a process working in it); close "
                           f"them, or detach now with: idsfs umount --lazy {shlex.quote(path)}")
            return 1, f"unmounting {path} failed: {text or 'status ' + str(done.returncode)}"
        return 0, f"detached {path} (it goes away when no longer used)" if lazy else ""
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
    status, message = unmount(args.mountpoint, lazy=args.lazy, timeout=args.timeout)
    if message:
        print(f"idsfs umount: {message}", file=sys.stderr)
    return status


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
    """The emulator child process of ``idsfs demo`` (its own process group: Ctrl-C spares it)."""

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
        """SIGTERM, then SIGKILL after 10 s."""
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
    created = False
    if not mountpoint.exists():
        try:
            mountpoint.mkdir(parents=True)
        except OSError as exc:
            print(f"idsfs demo: cannot create {mountpoint}: {exc.strerror}", file=sys.stderr)
            return 1
        created = True
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
        if created:
            with contextlib.suppress(OSError):
                mountpoint.rmdir()


# ----------------------------------------------------------------------------- dispatch


def run(args: argparse.Namespace) -> int:
    """Run ``idsfs mount``, ``umount`` or ``demo``; return the exit status.

    0: done; 1: the server, the mount or the unmount failed (message on
    stderr); 2: bad options or mount point; 130: interrupted.
    """
    command = getattr(args, "command", None) or "mount"
    try:
        if command == "umount":
            return _run_umount(args)
        if command == "demo":
            return _run_demo(args)
        return _run_mount(args)
    except KeyboardInterrupt:
        print(f"idsfs {command}: interrupted", file=sys.stderr)
        return 130


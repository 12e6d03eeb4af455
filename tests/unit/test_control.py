"""idsfs.control and the command-line side of it: socket places, protocol, server, client,
the umount wait (with pending work and a bound) and the status text.

The server runs for real on trio in a thread with a scripted handler; the
command line's functions talk to it over the real Unix socket.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from idsfs import control, mountcli
from idsfs.control import ControlClient, ControlError, ControlServer


def test_runtime_dir_rules() -> None:
    assert control.runtime_dir(0, {"XDG_RUNTIME_DIR": "/run/user/0"}) == Path("/run/idsfs")
    assert control.runtime_dir(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == \
        Path("/run/user/1000/idsfs")
    assert control.runtime_dir(1000, {}) == Path("/tmp/idsfs-1000")
    assert control.runtime_dir(1000, {"XDG_RUNTIME_DIR": "relative"}) == Path("/tmp/idsfs-1000")
    assert control.socket_name(52) == "52.sock"


def test_socket_candidates() -> None:
    assert control.socket_candidates(7, 0) == [Path("/run/idsfs/7.sock")]
    found = control.socket_candidates(7, 4242, {})
    assert Path("/run/user/4242/idsfs/7.sock") in found
    assert Path("/tmp/idsfs-4242/7.sock") in found
    assert Path("/run/idsfs/7.sock") not in found


class Served:
    """A ControlServer on trio in a thread; ``handler`` scripts the daemon side."""

    def __init__(self, path: Path, handler: control.Handler) -> None:
        self.server = ControlServer(path, handler)
        self.path = path
        self.token: Any = None
        self.cancel: Any = None
        self.error: BaseException | None = None
        started = threading.Event()

        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self.cancel = scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.server.serve)
                    started.set()

        def run() -> None:
            try:
                trio.run(main)
            except BaseException as exc:
                self.error = exc
            finally:
                started.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(10)
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.cancel is not None and self.thread.is_alive():
            trio.from_thread.run_sync(self.cancel.cancel, trio_token=self.token)
        self.thread.join(10)
        self.server.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[control.Handler], Served]]:
    started: list[Served] = []

    def make(handler: control.Handler, name: str = "52.sock") -> Served:
        s = Served(tmp_path / "ctl" / name, handler)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


async def echo_status(request: dict[str, Any], conn: control.Connection) -> None:
    if request.get("request") == "status":
        await conn.send({"ok": True, "status": {"pid": 1, "echo": request}})
    else:
        await conn.send({"ok": False, "error": "bad request", "message": "unknown"})


def test_request_and_reply(serve, tmp_path: Path) -> None:
    s = serve(echo_status)
    mode = os.stat(s.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(s.path.parent).st_mode) == 0o700
    with ControlClient(s.path) as client:
        reply = client.request({"request": "status"})
    assert reply == {"ok": True, "status": {"pid": 1, "echo": {"request": "status"}}}
    with ControlClient(s.path) as client:
        assert client.request({"request": "frob"})["ok"] is False


def test_bad_requests_get_an_answer(serve) -> None:
    s = serve(echo_status)
    for raw in (b"not json\n", b"[1, 2]\n", b"\xff\xfe\n"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(s.path))
            sock.sendall(raw)
            answer = json.loads(sock.makefile("rb").readline())
        assert answer["ok"] is False and answer["error"] == "bad request"


def test_a_failing_handler_does_not_stop_the_server(serve) -> None:
    async def broken(request: dict[str, Any], conn: control.Connection) -> None:
        raise RuntimeError("boom")

    s = serve(broken)
    for _ in range(2):
        with ControlClient(s.path) as client:
            reply = client.request({"request": "status"})
        assert reply["ok"] is False and reply["error"] == "internal error"


def test_close_removes_only_its_own_socket(serve, tmp_path: Path) -> None:
    s = serve(echo_status)
    s.stop()
    assert not s.path.exists()
    # a socket that another server has bound since is left alone
    s2 = serve(echo_status)
    s.server._inode = (1, 1)
    s.server.close()
    assert s2.path.exists()


def test_a_stale_socket_file_is_replaced(tmp_path: Path, serve) -> None:
    path = tmp_path / "ctl" / "52.sock"
    path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(path))  # left behind by a killed daemon
    s = serve(echo_status)
    with ControlClient(s.path) as client:
        assert client.request({"request": "status"})["ok"] is True


def test_client_errors(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="cannot connect"):
        ControlClient(tmp_path / "nothing.sock")


def test_silent_daemon_times_out(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)  # accepts (in the kernel) but never answers, like a stopped daemon
        with ControlClient(path, timeout=0.3) as client, \
                pytest.raises(ControlError, match="no answer") as info:
            client.request({"request": "status"}, timeout=0.3)
        assert getattr(info.value, "timed_out", False)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to switch users, and a python3 others may run")
def test_other_users_cannot_connect(serve) -> None:
    s = serve(echo_status)
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n"
             "    print(type(e).__name__)\nelse:\n    print('connected')\n")
    done = subprocess.run(["/usr/bin/python3", "-c", probe, str(s.path)], capture_output=True,
                          text=True, timeout=30, user=65534, group=65534, check=False)
    assert done.stdout.strip() == "PermissionError", done.stderr


# ------------------------------------------------------------------ umount's wait


_WAITERS: list[control.Waiter] = []  # kept open like the daemon keeps them


def stopping_daemon(events: list[dict[str, Any]], *, exit_status: int | None,
                    pending: list[str]) -> control.Handler:
    """A daemon that accepts stop, reports ``events``, then exits (or never does)."""
    async def handler(request: dict[str, Any], conn: control.Connection) -> None:
        assert request == {"request": "stop", "lazy": False}
        waiter = conn.detach()
        _WAITERS.append(waiter)
        waiter.send({"ok": True, "event": "stopping", "pid": 4711, "pending": pending})

        def later() -> None:
            for event in events:
                waiter.send(event)
            if exit_status is not None:
                waiter.send({"event": "exit", "status": exit_status, "pending": []})
                waiter.close()
        threading.Thread(target=later, daemon=True).start()
    return handler


def test_umount_waits_for_the_exit_and_reports_progress(serve) -> None:
    s = serve(stopping_daemon([{"event": "waiting", "message": "waiting for 1 upload",
                                "pending": ["upload of a/b.h5"]}], exit_status=0, pending=[]))
    seen: list[str] = []
    result = mountcli._stop_through_channel(s.path, "/nowhere", False, 5.0, 10.0, seen.append)
    assert result == (0, "")
    assert seen == ["waiting for 1 upload"]


def test_umount_wait_is_bounded_and_names_what_is_pending(serve) -> None:
    s = serve(stopping_daemon([{"event": "waiting", "message": "waiting",
                                "pending": ["upload of x.bin (3 MiB), attempt 2"]}],
                              exit_status=None, pending=[]))
    status, message = mountcli._stop_through_channel(s.path, "/mnt/ids", False, 5.0, 0.5, None)
    assert status == 1
    assert "/mnt/ids is unmounted, but its daemon (pid 4711) is still finishing after 0.5 s" \
        in message
    assert "upload of x.bin (3 MiB), attempt 2" in message


def test_umount_reports_a_failed_exit(serve) -> None:
    s = serve(stopping_daemon([], exit_status=1, pending=[]))
    status, message = mountcli._stop_through_channel(s.path, "/mnt/ids", False, 5.0, 5.0, None)
    assert status == 1 and "exited with status 1" in message


def test_umount_busy_answer(serve) -> None:
    async def busy(request: dict[str, Any], conn: control.Connection) -> None:
        await conn.send({"ok": False, "error": "busy", "message": "Device or resource busy"})

    s = serve(busy)
    status, message = mountcli._stop_through_channel(s.path, "/mnt/ids", False, 5.0, 5.0, None)
    assert status == 1 and "is busy" in message and "idsfs umount --lazy /mnt/ids" in message


def test_umount_of_another_users_live_mount_is_not_taken_for_stale(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Without allow_other FUSE lets only the mounting user in: the probe of a
    # healthy mount answers EACCES to everyone else. Their umount must say
    # whose it is, not detach it lazily as "stale" (root's plain unmount works).
    import errno

    from idsfs import daemon

    entry = daemon.MountEntry("/mnt/theirs", "fuse.idsfs", "https://icat", "user_id=1000")
    monkeypatch.setattr(daemon, "find_mount", lambda path: entry)
    monkeypatch.setattr(daemon, "probe_mount", lambda path, timeout: errno.EACCES)
    monkeypatch.setattr(mountcli, "_control_socket", lambda entry: None)
    calls: list[bool] = []

    def refused(mountpoint: str, lazy: bool) -> subprocess.CompletedProcess[str]:
        calls.append(lazy)
        return subprocess.CompletedProcess([], 1, "", "fusermount3: entry not found in /etc/mtab")

    monkeypatch.setattr(mountcli, "_fusermount", refused)
    status, message = mountcli.unmount("/mnt/theirs")
    assert (status, calls) == (1, [False])  # a plain unmount was tried, no lazy detach
    assert message == ("/mnt/theirs is mounted by another user (Permission denied): only they "
                       "or root can unmount it")


# ------------------------------------------------------------------ status text


STATUS: dict[str, Any] = {
    "version": "0.1.0", "pid": 4711, "uptime": 7384.2, "started": 0, "device": 52,
    "mountpoint": "/mnt/ids", "fsname": "https://icat", "read_only": True,
    "icat_url": "https://icat/icat/", "ids_url": "https://icat/ids/",
    "config": {"section": "facility", "files": ["/etc/icat/icat.cfg"]},
    "session": {"user": "simple/alice", "remaining": 5400.0, "owned": True,
                "checked": "live"},
    "stopping": False,
    "cache": {"capacity": 256 << 20, "bytes": 12 << 20, "blocks": 12, "hits": 30, "misses": 10,
              "waits": 0, "hit_rate": 0.75},
    "transfers": {"streams": [{"datafile_id": 17, "offset": 8 << 20, "bytes": 8 << 20,
                               "seconds": 0.1, "rate": 80 << 20, "state": "reading",
                               "queued": 3}],
                  "restores": [{"datafile_id": 23, "readers": 2, "seconds": 14.0}],
                  "bytes_fetched": 20 << 20, "streams_opened": 2, "resumes": 0,
                  "failures": 0},
    "uploads": {"spool_dir": "/var/cache/idsfs/spool/x", "writing": 0,
                "in_progress": ["DEMO/x/big.h5 (2.0 GiB, 80.0 MiB/s)"],
                "pending": ["DEMO/x/run.h5 (1.0 KiB, attempt 3): pending: IDS answered 503"],
                "held": ["DEMO/x/half.bin (4 B): failed: the mount stopped while the file was "
                         "open for writing"],
                "stored": 5, "bytes_stored": 5 << 20, "failures": 3, "live_aborted": 0,
                "spool_bytes": 2 << 30, "left_alone": 1},
}


def test_format_status() -> None:
    text = mountcli.format_status(STATUS)
    assert text.splitlines()[0] == "/mnt/ids: idsfs 0.1.0, pid 4711, up 2h 03m, read-only"
    assert "user simple/alice, 1h 30m left, logged in by the daemon" in text
    assert "12.0 MiB of 256.0 MiB in 12 blocks; hit rate 75.0% (30 hits, 10 misses" in text
    assert "datafile 17: reading at 8.0 MiB, 80.0 MiB/s, 3 blocks queued" in text
    assert "restores   1 waiting" in text and "datafile 23: 2 reads waiting for 14s" in text
    assert ("uploads    1 pending, 1 held, 1 in progress; spool_dir /var/cache/idsfs/spool/x, "
            "writing 0, stored 5, bytes_stored 5.0 MiB, failures 3, live_aborted 0, "
            "spool_bytes 2.0 GiB, left_alone 1") in text
    lines = text.splitlines()
    at = lines.index("    DEMO/x/big.h5 (2.0 GiB, 80.0 MiB/s)")
    assert lines[at + 1] == "    DEMO/x/run.h5 (1.0 KiB, attempt 3): pending: IDS answered 503"
    assert lines[at + 2].startswith("    DEMO/x/half.bin (4 B): failed: the mount stopped")
    assert "/etc/icat/icat.cfg [facility]" in text


def test_format_status_of_a_stopping_daemon_without_stats() -> None:
    short = {k: v for k, v in STATUS.items() if k not in ("cache", "transfers", "uploads")}
    short["stopping"] = True
    short["session"] = {"owned": False, "error": "ICAT did not answer within 3 s",
                        "checked": "estimated", "remaining": 30.0, "user": "bob"}
    text = mountcli.format_status(short)
    assert ", stopping" in text.splitlines()[0]
    assert "30s left (estimated), adopted session; check failed: ICAT did not answer" in text

"""systemd/idsfs@.service run the way systemd runs it (no systemd needed).

systemd itself cannot run in this container, so the test does what the unit
tells systemd to do: it runs the unit's ExecStart= (``%i`` = the instance,
the program path = this environment's ``idsfs``) with the environment systemd
gives a ``Type=notify`` service with ``LoadCredential=`` and
``StandardError=journal``: ``$NOTIFY_SOCKET`` (a socket the test reads),
``$CREDENTIALS_DIRECTORY`` holding ``idsfs-password``, ``$JOURNAL_STREAM``,
a new session, ``/`` as working directory. The config section comes from a
temporary icat.cfg named by ``$ICAT_CFG`` instead of /etc/icat/icat.cfg. Then
it stops it the way ``KillMode=mixed`` does: SIGTERM to the main process.
"""

from __future__ import annotations

import configparser
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mountharness import USERS, NotifySocket, is_mounted

from idsfs import control
from idsfs.daemon import find_mount
from idsfs.mountcli import query_status

UNIT = Path(__file__).parents[2] / "systemd" / "idsfs@.service"


def exec_start(instance: str) -> list[str]:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    argv = parser["Service"]["ExecStart"].replace("%I", instance).replace("%i", instance).split()
    assert argv[0] == "/usr/local/bin/idsfs"
    return [str(Path(sys.executable).parent / "idsfs"), *argv[1:]]


def start_service(tmp_path: Path, emulator, password: str, *, extra: str = ""):
    mp = tmp_path / "mnt"
    mp.mkdir()
    cfg = tmp_path / "icat.cfg"
    cfg.write_text(f"[facility]\nurl = {emulator.icat_url}\nidsurl = {emulator.ids_url}\n"
                   f"username = alice\nmountpoint = {mp}\noptions = allow_other\n{extra}")
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "idsfs-password").write_text(password)  # as LoadCredential= copies it
    journal = tmp_path / "journal"
    def answers() -> object:
        try:
            return os.listdir(mp)
        except OSError as exc:
            return repr(exc)

    notify = NotifySocket(tmp_path / "notify.sock", on_ready=answers)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", "HOME": "/root", "NOTIFY_SOCKET": str(notify.path),
           "CREDENTIALS_DIRECTORY": str(credentials), "ICAT_CFG": str(cfg),
           "INVOCATION_ID": "0123456789abcdef0123456789abcdef"}
    with open(journal, "wb") as out:
        st = os.fstat(out.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen(exec_start("facility"), env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, cwd="/", start_new_session=True)
    return proc, notify, mp, journal


def stop(proc: subprocess.Popen[bytes], notify: NotifySocket, mp: Path) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    notify.close()
    if is_mounted(mp):
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)


def test_service_start_status_stop(demo_emulator, tmp_path: Path) -> None:
    proc, notify, mp, journal = start_service(tmp_path, demo_emulator, USERS["alice"] + "\n")
    try:
        assert notify.wait_for("READY=1", 60), journal.read_text()
        # READY=1 only once the mount answered
        assert notify.ready_check == [["DEMO"]], (notify.ready_check, journal.read_text())
        entry = find_mount(mp)
        assert entry is not None and "allow_other" in entry.options
        status = query_status(mp)
        assert status["pid"] == proc.pid and status["config"]["section"] == "facility"
        sock = control.runtime_dir() / control.socket_name(status["device"])
        before = os.stat(sock)
        ours = (before.st_ino, before.st_ctime_ns)
        # systemctl stop: SIGTERM to the main process (KillMode=mixed)
        proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING=1", 20)
        assert proc.wait(30) == 0  # Restart=on-failure: a clean stop is no failure
        assert not is_mounted(mp)
        # removed (another mount on this machine may reuse the device number at once,
        # and the file system the inode number)
        assert not sock.exists() or (os.stat(sock).st_ino, os.stat(sock).st_ctime_ns) != ours
    finally:
        stop(proc, notify, mp)
    lines = journal.read_text().splitlines()
    assert all(line.startswith(("<3>", "<4>", "<6>", "<7>")) for line in lines), lines
    assert any("logged in to ICAT" in line for line in lines)
    assert USERS["alice"] not in journal.read_text()


def test_service_failure_exits_non_zero_without_ready(demo_emulator, tmp_path: Path) -> None:
    proc, notify, mp, journal = start_service(tmp_path, demo_emulator, "wrong\n")
    try:
        assert proc.wait(60) == 1  # systemd: failed, restarted after RestartSec=
        assert "READY=1" not in notify.lines()
        text = journal.read_text()
        assert "<3>" in text or "refused" in text
        assert "refused for user 'alice'" in text
        assert not is_mounted(mp)
    finally:
        stop(proc, notify, mp)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_other_stop_signals(demo_emulator, tmp_path: Path, signum: int) -> None:
    proc, notify, mp, journal = start_service(tmp_path, demo_emulator, USERS["alice"])
    try:
        assert notify.wait_for("READY=1", 60), journal.read_text()
        proc.send_signal(signum)
        assert proc.wait(30) == 0
        assert not is_mounted(mp)
    finally:
        stop(proc, notify, mp)

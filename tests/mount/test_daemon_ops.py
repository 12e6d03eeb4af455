"""Running a mount for real: idsfs status, the control socket, idsfs umount through it,
the systemd notify protocol, config files and credentials, and the log.

Every test mounts in the harness's private mount namespace (tests/mount/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from mountharness import USERS, NotifySocket, idsfs_command, is_mounted, wait_until

from idsfs import control
from idsfs.daemon import find_mount
from idsfs.mountcli import query_status

RAW = "DEMO/DEMO-2024-001/1/raw"


def run_idsfs(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("IDSFS_", "ICAT_")) and k != "NOTIFY_SOCKET"}
    full_env.update(env or {})
    return subprocess.run([*idsfs_command(), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL, env=full_env)


def socket_of(path: Path) -> Path:
    entry = find_mount(path)
    assert entry is not None and entry.st_dev is not None
    return control.runtime_dir() / control.socket_name(entry.st_dev)


# ----------------------------------------------------------------------------- status


def test_status_shows_cache_session_pid_and_uptime(mount) -> None:
    m = mount(None, "--cache-size", "32M", "-o", "ro")  # rw is the default since issue 5
    data = (m.path / RAW / "large.bin").read_bytes()
    (m.path / RAW / "large.bin").read_bytes()
    done = run_idsfs("status", str(m.path))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith(f"{m.path}: idsfs ")
    assert f"pid {m.pid}," in text and "read-only" in text
    assert "of 32.0 MiB" in text and "hit rate" in text
    assert "user simple/alice" in text and "left, logged in by the daemon" in text
    assert USERS["alice"] not in text

    done = run_idsfs("status", "--json", str(m.path))
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["pid"] == m.pid and status["mountpoint"] == str(m.path)
    assert status["device"] == os.stat(m.path).st_dev
    assert status["uptime"] > 0 and status["read_only"] is True
    cache = status["cache"]
    assert cache["capacity"] == 32 << 20 and cache["bytes"] >= len(data) // 2
    assert cache["misses"] >= 1 and cache["bytes_served"] >= len(data)
    session = status["session"]
    assert session["owned"] is True and session["checked"] == "live"
    assert 0 < session["remaining"] <= 120 * 60 + 1
    assert status["transfers"]["bytes_fetched"] >= len(data)
    assert "sessionId" not in done.stdout


def test_a_file_larger_than_the_cache_passes_through_without_evicting(
        mount, emulator_process) -> None:
    # A 24 MiB file through an 8 MiB cache: its blocks leave the cache once delivered, so
    # a 1 MiB file read before keeps its blocks (the readahead in flight stays well below
    # the room left).
    emu = emulator_process(demo_large_size=24 << 20)
    m = mount(emu, "--cache-size", "8M", "--block-size", "256K", "-o", "ro")
    small = (m.path / RAW / "block.bin").read_bytes()
    assert len(small) == 1 << 20
    before = json.loads(run_idsfs("status", "--json", str(m.path)).stdout)["cache"]
    assert before["bytes"] >= len(small) and before["released"] == 0
    large = (m.path / RAW / "large.bin").read_bytes()
    assert len(large) == 24 << 20
    after = json.loads(run_idsfs("status", "--json", str(m.path)).stdout)["cache"]
    assert after["released"] >= 1
    # the small file stayed cached: reading it again past the kernel's page cache
    # (O_DIRECT) is served by the block cache without a single miss
    done = subprocess.run(["dd", f"if={m.path / RAW / 'block.bin'}", "of=/dev/null",
                           "bs=256K", "iflag=direct"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    again = json.loads(run_idsfs("status", "--json", str(m.path)).stdout)["cache"]
    assert again["misses"] == after["misses"]
    assert again["bytes_served"] >= after["bytes_served"] + len(small)


def test_status_shows_restores_waiting(mount, emulator_process) -> None:
    emu = emulator_process(storage="dataset", restore_delay=1.5)
    m = mount(emu, "--restore-wait", "30s")
    archived = next(p for p in (m.path / "DEMO").rglob("*")
                    if p.is_file() and os.getxattr(p, "user.ids.status") == b"ARCHIVED")
    reader = subprocess.Popen(["cat", str(archived)], stdout=subprocess.DEVNULL)
    try:
        def waiting() -> bool:
            return bool(query_status(m.path)["transfers"]["restores"])
        assert wait_until(waiting, 20, 0.05)
        text = run_idsfs("status", str(m.path)).stdout
        assert "restores   1 waiting" in text and "reads waiting for" in text
        assert reader.wait(60) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
    assert query_status(m.path)["transfers"]["restores"] == []


def test_status_errors(mount, tmp_path: Path) -> None:
    done = run_idsfs("status", str(tmp_path))
    assert done.returncode == 1 and "is not mounted" in done.stderr
    done = run_idsfs("status", str(tmp_path / "nowhere"))
    assert done.returncode == 1 and f"{tmp_path / 'nowhere'} does not exist" in done.stderr
    m = mount()
    m.kill(signal.SIGKILL)
    m.wait_exit(20)
    done = run_idsfs("status", str(m.path), timeout=60)
    assert done.returncode == 1
    assert "does not answer" in done.stderr or "no control socket" in done.stderr
    assert run_idsfs("umount", str(m.path)).returncode == 0
    assert not is_mounted(m.path)


# ----------------------------------------------------------------------------- the socket


def test_control_socket_is_private_and_removed(mount) -> None:
    m = mount()
    path = socket_of(m.path)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert m.unmount().returncode == 0
    # removed (another mount on this machine may reuse the device number at once,
    # and the file system the inode number)
    assert not path.exists() or \
        (os.stat(path).st_ino, os.stat(path).st_ctime_ns) != (st.st_ino, st.st_ctime_ns)


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs /usr/bin/python3")
def test_other_users_cannot_reach_the_daemon(mount) -> None:
    m = mount()
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n"
             "    print(type(e).__name__)\nelse:\n    print('connected')\n")
    done = subprocess.run(["/usr/bin/python3", "-c", probe, str(socket_of(m.path))],
                          capture_output=True, text=True, timeout=30, user=65534, group=65534,
                          check=False)
    assert done.stdout.strip() == "PermissionError", done.stderr


# ----------------------------------------------------------------------------- umount


def test_umount_waits_until_the_daemon_has_exited(mount, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    m = mount(None, "--log-file", str(log), foreground=False)
    assert (m.path / RAW / "tiny.txt").read_bytes()
    done = m.unmount()
    assert done.returncode == 0 and done.stderr == ""
    # returned only after the daemon logged out and exited
    assert "logged out of ICAT" in log.read_text()
    assert wait_until(lambda: not m.alive(), 2.0)
    assert not is_mounted(m.path)


def test_umount_lazy_detaches_and_serves_who_still_uses_it(mount, emulator_process) -> None:
    # umount --lazy: the name goes at once; programs still inside go on reading
    # and writing (as with umount -l), and the daemon exits when they let go
    m = mount(emulator_process())  # its own: the file written here stays stored
    raw = m.path / RAW
    expected = (raw / "tiny.txt").read_bytes()
    reader = open(raw / "tiny.txt", "rb")  # noqa: SIM115 - kept open on purpose
    writer = open(raw / "after-detach.txt", "wb")  # noqa: SIM115 - kept open on purpose
    cwd = os.open(raw, os.O_RDONLY | os.O_DIRECTORY)
    try:
        busy = m.unmount()
        assert busy.returncode == 1 and "is busy" in busy.stderr
        assert m.alive() and is_mounted(m.path)
        done = run_idsfs("umount", "--lazy", str(m.path))
        assert done.returncode == 0, done.stderr
        assert "detached" in done.stderr
        assert not is_mounted(m.path)
        time.sleep(0.5)
        assert m.alive()
        assert reader.read() == expected
        assert "tiny.txt" in os.listdir(cwd)
        writer.write(b"written after the detach\n")
        writer.close()  # stored: the close answers only once IDS has it
    finally:
        reader.close()
        writer.close()
        os.close(cwd)
    # the kernel may end the detached mount's connection with ECONNABORTED instead
    # of an end of file: a normal end, not a failure
    assert m.wait_exit(20) == 0, m.log_text()
    assert "the FUSE loop failed" not in m.log_text()
    assert not is_mounted(m.path)


def test_umount_of_a_stopped_daemon_clears_it(mount) -> None:
    m = mount()
    m.kill(signal.SIGSTOP)  # hung: the socket accepts, nobody answers
    try:
        started = time.monotonic()
        done = run_idsfs("umount", "--timeout", "3", str(m.path), timeout=60)
        assert done.returncode == 0, done.stderr
        assert "cleared the stale mount" in done.stderr
        assert "did not answer within 3 s" in done.stderr
        # one wait of --timeout, as the message says (not one per attempt: 6 s and more)
        assert time.monotonic() - started < 5.5
        assert not is_mounted(m.path)
    finally:
        m.kill(signal.SIGCONT)
        m.kill(signal.SIGKILL)


# ----------------------------------------------------------------------------- systemd notify


def notify_mount(demo_emulator, tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    pw = tmp_path / "pw"
    pw.write_text(USERS["alice"] + "\n")
    pw.chmod(0o600)
    mp = tmp_path / "mnt"
    mp.mkdir()
    return [*idsfs_command(), "mount", "--icat", demo_emulator.icat_url, "--user", "alice",
            "--password-file", str(pw), *extra, str(mp)], mp


def test_notify_foreground(demo_emulator, tmp_path: Path) -> None:
    argv, mp = notify_mount(demo_emulator, tmp_path, "-f")

    def answers() -> object:
        # READY=1 has just arrived: the mount must answer already
        return sorted(os.listdir(mp))

    notify = NotifySocket(tmp_path / "notify.sock", on_ready=answers)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDSFS_")}
    env["NOTIFY_SOCKET"] = str(notify.path)
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert notify.wait_for("READY=1"), notify.lines()
        assert notify.ready_check == [["DEMO"]]
        lines = notify.lines()
        assert lines.index("STATUS=connecting") < lines.index("READY=1")
        assert "STATUS=mounted" in lines
        assert not any(line.startswith("MAINPID=") for line in lines)  # not forked
        assert "STOPPING=1" not in lines
        proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING=1", 20), notify.lines()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)
    assert not is_mounted(mp)


def test_notify_background_reports_the_daemon_pid(demo_emulator, tmp_path: Path) -> None:
    argv, mp = notify_mount(demo_emulator, tmp_path)
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDSFS_")}
    env["NOTIFY_SOCKET"] = str(notify.path)
    try:
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        # `idsfs mount` returned only after READY=1 was sent
        assert "READY=1" in notify.lines()
        mainpid = int(next(line for line in notify.lines()
                           if line.startswith("MAINPID=")).split("=")[1])
        assert query_status(mp)["pid"] == mainpid
        stop = run_idsfs("umount", str(mp))
        assert stop.returncode == 0, stop.stderr
        assert notify.wait_for("STOPPING=1", 20)
    finally:
        notify.close()
        if is_mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True,
                           check=False)


def test_notify_failure_sends_no_ready(demo_emulator, tmp_path: Path) -> None:
    argv, mp = notify_mount(demo_emulator, tmp_path, "-f")
    (tmp_path / "pw").write_text("wrong\n")
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDSFS_")}
    env["NOTIFY_SOCKET"] = str(notify.path)
    try:
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 1 and "refused" in done.stderr
        time.sleep(0.1)
        assert "READY=1" not in notify.lines()
    finally:
        notify.close()
    assert not is_mounted(mp)


# ----------------------------------------------------------------------------- config


def test_mount_from_a_config_section(demo_emulator, mount, tmp_path: Path) -> None:
    home = tmp_path / "home"
    cfg = home / ".config" / "icat" / "icat.cfg"
    cfg.parent.mkdir(parents=True)
    mp = tmp_path / "archive"
    mp.mkdir()
    cfg.write_text(f"[facility]\nurl = {demo_emulator.icat_url.rsplit('/icat', 1)[0]}"
                   f"/ICATService/ICAT?wsdl\nidsurl = {demo_emulator.ids_url}\n"
                   f"auth = simple\nusername = alice\npassword = {USERS['alice']}\n"
                   f"cache_size = 48M\nmountpoint = {mp}\n"
                   f"[idsfs]\nmetadata_ttl = 7s\n")
    cfg.chmod(0o600)
    env = {"HOME": str(home)}
    done = run_idsfs("mount", "--configSection", "facility", env=env)
    assert done.returncode == 0, done.stderr
    try:
        status = query_status(mp)
        assert status["cache"]["capacity"] == 48 << 20
        assert status["config"] == {"section": "facility", "files": [str(cfg)]}
        assert "DEMO" in os.listdir(mp)
        assert USERS["alice"].encode() not in Path(f"/proc/{status['pid']}/cmdline").read_bytes()
    finally:
        assert run_idsfs("umount", str(mp)).returncode == 0
    cfg.chmod(0o644)
    done = run_idsfs("mount", "--configSection", "facility", env=env)
    assert done.returncode == 2
    assert "holds a password but group and others may read it" in done.stderr
    assert not is_mounted(mp)


def test_mount_with_a_systemd_credential(mount, tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "idsfs-password").write_text(USERS["bob"] + "\n")
    m = mount(None, "--user", "bob", user="bob", credentials=False,
              env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert query_status(m.path)["session"]["user"] == "simple/bob"


# ----------------------------------------------------------------------------- the log


def test_debug_traces_requests_and_fuse_operations(mount, tmp_path: Path) -> None:
    m = mount(None, "--debug")
    (m.path / RAW / "tiny.txt").read_bytes()
    os.listdir(m.path / "DEMO")
    assert m.unmount().returncode == 0
    lines = m.log_text().splitlines()
    requests_ = [line for line in lines if " idsfs.icat: " in line or " idsfs.ids: " in line]
    assert any("GET " in line and "-> 200 (" in line and " s)" in line for line in requests_)
    fuse = [line for line in lines if " idsfs.fuse: " in line]
    assert any("lookup(" in line and " ms" in line for line in fuse)
    assert any("read(" in line and "<52 bytes>" in line for line in fuse)
    levels = (" DEBUG ", " INFO ", " WARNING ", " ERROR ")
    for line in lines:  # one event per line, each with time stamp, level and logger
        if line.startswith(("Traceback", " ")):
            continue
        assert line[:4].isdigit() and any(level in line for level in levels), line
    assert USERS["alice"] not in m.log_text()


def test_journald_lines_carry_priorities(demo_emulator, tmp_path: Path) -> None:
    # stderr is a file standing in for journald's stream, and $JOURNAL_STREAM names it
    argv, mp = notify_mount(demo_emulator, tmp_path, "-f")
    journal = tmp_path / "journal"
    notify = NotifySocket(tmp_path / "notify.sock")
    with open(journal, "wb") as out:
        st = os.fstat(out.fileno())
        env = {k: v for k, v in os.environ.items() if not k.startswith("IDSFS_")}
        env.update(NOTIFY_SOCKET=str(notify.path), JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out)
    try:
        assert notify.wait_for("READY=1"), journal.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)
    lines = journal.read_text().splitlines()
    assert lines and all(line[:3] in ("<6>", "<7>", "<4>", "<3>") for line in lines), lines
    assert any(line.startswith("<6>idsfs.daemon: ready: ") for line in lines)
    assert any("logged out of ICAT" in line for line in lines)

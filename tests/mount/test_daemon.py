"""The mount's lifecycle through the real command line: idsfs mount / umount / demo.

Every test mounts for real in the harness's private mount namespace
(tests/mount/conftest.py) against an emulator child process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from mountharness import (
    USERS,
    EmulatorProcess,
    Mounted,
    MountFailed,
    idsfs_command,
    is_mounted,
    wait_until,
)

from idsfs.daemon import find_mount, probe_mount
from idsfs.mountcli import query_status

RAW = "DEMO/DEMO-2024-001/1/raw"


def run_idsfs(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    """Run ``idsfs ARGS`` to completion (stdin closed) and return the result."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("IDSFS_") and k != "NOTIFY_SOCKET"}
    full_env.update(env or {})
    return subprocess.run([*idsfs_command(), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL, env=full_env)


def password_file(tmp_path: Path, text: str, name: str = "pw") -> Path:
    path = tmp_path / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def daemons_for(mountpoint: Path) -> list[int]:
    """Pids of live ``idsfs mount`` processes whose argv ends with ``mountpoint``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state in ("Z", "X"):
            continue
        if b"mount" in argv and str(mountpoint).encode() in argv:
            pids.append(int(entry))
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def login(emu: EmulatorProcess, user: str = "alice") -> str:
    """Log in to the emulator's ICAT directly; returns the session id."""
    import json

    doc = {"plugin": "simple", "credentials": [{"username": user},
                                               {"password": emu.users[user]}]}
    answer = requests.post(emu.icat_url + "/session", data={"json": json.dumps(doc)}, timeout=30)
    answer.raise_for_status()
    return str(answer.json()["sessionId"])


# ----------------------------------------------------------------------------- start-up


def test_background_mount_returns_only_when_ready(mount, emulator_process) -> None:
    # Every request is slowed down, so start-up takes a while: the command
    # must still return only once the mount answers.
    emu = emulator_process(latency=0.05)
    started = time.monotonic()
    m = mount(emu, foreground=False)
    elapsed = time.monotonic() - started
    assert elapsed > 0.3  # login, session info, ping, version... each 50 ms late
    assert is_mounted(m.path)
    assert probe_mount(m.path, timeout=10) == 0
    assert "DEMO" in os.listdir(m.path)
    # the daemon is a different, detached process that keeps running
    assert m.pid is not None and m.pid != os.getpid() and m.alive()
    assert os.getsid(m.pid) == m.pid
    done = m.unmount()
    assert done.returncode == 0, done.stderr
    assert not is_mounted(m.path)
    m.wait_exit(20)


def test_foreground_mount_and_idsfs_umount(mount) -> None:
    m = mount()
    entry = find_mount(m.path)
    assert entry is not None and entry.fstype == "fuse.idsfs"
    assert entry.source == m.emulator.icat_url
    assert "rw" in entry.options.split(",")  # read-write by default (issue 5)
    assert "default_permissions" in entry.options
    assert sorted(os.listdir(m.path / "DEMO"))[:1] == ["DEMO-2024-001"]
    done = m.unmount()
    assert done.returncode == 0 and done.stderr == ""
    assert m.wait_exit(20) == 0
    assert not is_mounted(m.path)
    text = m.log_text()
    assert "ready:" in text and "unmounted" in text and "logged out" in text


@pytest.mark.parametrize("given", ["--icat", "--ids"])
def test_one_server_url_is_enough(demo_emulator, tmp_path: Path, given: str) -> None:
    """--icat alone: the IDS URL is derived (<ICAT>/ids); --ids alone: the IDS names its ICAT."""
    pw = password_file(tmp_path, USERS["alice"])
    mp = tmp_path / "mnt"
    mp.mkdir()
    url = demo_emulator.icat_url if given == "--icat" else demo_emulator.ids_url
    done = run_idsfs("mount", given, url, "--user", "alice", "--password-file", str(pw), str(mp))
    try:
        assert done.returncode == 0, done.stderr
        assert "DEMO" in os.listdir(mp)
    finally:
        umount = run_idsfs("umount", str(mp))
    assert umount.returncode == 0, umount.stderr
    assert wait_until(lambda: not daemons_for(mp), 20)


@pytest.mark.parametrize("foreground", [False, True])
def test_bad_password_fails_clearly(demo_emulator, tmp_path: Path, foreground: bool) -> None:
    pw = password_file(tmp_path, "wrong-password")
    mp = tmp_path / "mnt"
    mp.mkdir()
    done = run_idsfs("mount", "--icat", demo_emulator.icat_url, "--user", "alice",
                     "--password-file", str(pw), *(["-f"] if foreground else []), str(mp))
    assert done.returncode == 1
    assert f"login to ICAT at {demo_emulator.icat_url} refused for user 'alice'" in done.stderr
    assert done.stderr.count("refused") == 1  # said once, not by parent and child
    assert "wrong-password" not in done.stderr + done.stdout
    assert not is_mounted(mp)
    assert not daemons_for(mp)


def test_unreachable_server_fails_clearly(tmp_path: Path) -> None:
    pw = password_file(tmp_path, "whatever")
    mp = tmp_path / "mnt"
    mp.mkdir()
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = run_idsfs("mount", "--icat", url, "--user", "alice", "--password-file", str(pw),
                     str(mp))
    assert done.returncode == 1
    assert f"cannot reach ICAT at {url}" in done.stderr
    assert time.monotonic() - started < 30
    assert not is_mounted(mp)
    assert not daemons_for(mp)


def test_not_an_ids_fails_clearly(demo_emulator, tmp_path: Path) -> None:
    pw = password_file(tmp_path, USERS["alice"])
    mp = tmp_path / "mnt"
    mp.mkdir()
    bad = demo_emulator.icat_url.rsplit("/icat", 1)[0] + "/nothing"
    done = run_idsfs("mount", "--icat", demo_emulator.icat_url, "--ids", bad, "--user",
                     "alice", "--password-file", str(pw), str(mp))
    assert done.returncode == 1
    assert f"{bad} is not an IDS" in done.stderr
    assert not is_mounted(mp)


def test_an_ids_reporting_a_bogus_icat_url_fails_clearly(tmp_path: Path) -> None:
    # --ids alone: the ICAT URL comes from getIcatUrl; an answer that is no URL
    # (a proxy's HTML page) is named as the IDS's, not as an option given wrongly
    import http.server
    import threading

    class Ids(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answers = {"/ids/ping": b"IdsOK", "/ids/getApiVersion": b"2.1.1",
                       "/ids/getIcatUrl": b"<html>captive portal</html>"}
            body = answers.get(self.path.split("?")[0])
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ids)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pw = password_file(tmp_path, "whatever")
    mp = tmp_path / "mnt"
    mp.mkdir()
    ids_url = f"http://127.0.0.1:{server.server_address[1]}/ids"
    try:
        done = run_idsfs("mount", "--ids", ids_url, "--user", "alice", "--password-file",
                         str(pw), str(mp))
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 1
    assert f"the IDS at {ids_url}: " in done.stderr
    assert "getIcatUrl" in done.stderr and "'<html>captive portal</html>'" in done.stderr
    assert "--icat" in done.stderr and "(None)" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert not is_mounted(mp)


def test_invalid_session_fails_clearly(demo_emulator, tmp_path: Path) -> None:
    sid = password_file(tmp_path, "00000000-dead-beef-0000-000000000000", "sid")
    mp = tmp_path / "mnt"
    mp.mkdir()
    done = run_idsfs("mount", "--icat", demo_emulator.icat_url, "--session-file", str(sid),
                     str(mp))
    assert done.returncode == 1
    assert "the ICAT session from file" in done.stderr and "is not valid" in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr  # one line, no warning before it
    assert "dead-beef" not in done.stderr
    assert not is_mounted(mp)


def test_bad_mountpoint_and_options(demo_emulator, tmp_path: Path) -> None:
    pw = password_file(tmp_path, USERS["alice"])
    common = ["mount", "--icat", demo_emulator.icat_url, "--user", "alice", "--password-file",
              str(pw)]
    done = run_idsfs(*common, str(tmp_path / "missing"))
    assert done.returncode == 2 and "does not exist" in done.stderr
    (tmp_path / "file").write_text("x")
    done = run_idsfs(*common, str(tmp_path / "file"))
    assert done.returncode == 2 and "is not a directory" in done.stderr
    done = run_idsfs(*common, "--cache-size", "lots", str(tmp_path))
    assert done.returncode == 2 and "--cache-size: not a size: 'lots'" in done.stderr
    done = run_idsfs(*common, "-o", "max_read=4096", str(tmp_path))
    assert done.returncode == 2 and "max_read" in done.stderr


def test_already_mounted_is_refused(mount, tmp_path: Path) -> None:
    m = mount()
    pw = password_file(tmp_path, USERS["alice"])
    done = run_idsfs("mount", "--icat", m.emulator.icat_url, "--user", "alice",
                     "--password-file", str(pw), str(m.path))
    assert done.returncode == 2
    assert "is already mounted" in done.stderr and "idsfs umount" in done.stderr
    assert probe_mount(m.path) == 0


def check_readahead(m: Mounted, kb: int) -> None:
    """The mount's read_ahead_kb is ``kb``; where /sys is read-only (containers), a warning."""
    st = os.stat(m.path)
    sysfs = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    if os.statvfs("/sys").f_flag & os.ST_RDONLY:
        assert sysfs.read_text().strip() == "128"
        assert wait_until(lambda: "could not raise the kernel readahead" in m.log_text(), 5)
    else:
        assert sysfs.read_text().strip() == str(kb)


def test_mount_options_reach_the_kernel(mount) -> None:
    m = mount(None, "-o", "noexec,noatime,fsname=my-archive", "--readahead", "2M")
    entry = find_mount(m.path)
    assert entry is not None
    assert entry.source == "my-archive"
    check_readahead(m, 2048)
    mountinfo = Path("/proc/self/mountinfo").read_text()
    line = next(x for x in mountinfo.splitlines() if f" {m.path} " in x)
    assert "noexec" in line and "noatime" in line


def test_default_readahead_is_8m(mount) -> None:
    check_readahead(mount(), 8192)


# ----------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(mount, sig: int) -> None:
    m = mount()
    fd = os.open(m.path / RAW / "tiny.txt", os.O_RDONLY)  # a file open while stopping
    try:
        assert os.read(fd, 4)
        m.kill(sig)
        assert m.wait_exit(20) == 0
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the mount is gone
            os.close(fd)
    assert not is_mounted(m.path)
    text = m.log_text()
    assert f"received {signal.Signals(sig).name}: unmounting" in text
    assert "Traceback" not in text


def test_stop_with_a_hung_read(mount, emulator_process) -> None:
    # A read hangs in the IDS: the first signal gives it a grace period, the
    # second one stops at once; the mount is removed either way.
    emu = emulator_process()
    m = mount(emu)
    emu.add_fault("stall", endpoint="ids/getData")
    reader = subprocess.Popen(["cat", str(m.path / RAW / "block.bin")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: emu.requests_to("ids/getData") >= 1, 20)
        time.sleep(0.2)
        assert reader.poll() is None  # the read hangs
        m.kill(signal.SIGTERM)
        time.sleep(0.5)
        assert m.alive()  # waiting for the read, within the grace period
        started = time.monotonic()
        m.kill(signal.SIGINT)
        assert m.wait_exit(20) == 0
        assert time.monotonic() - started < 3
        assert reader.wait(10) != 0  # the hung read failed (ENOTCONN), it did not hang
    finally:
        reader.kill()
        reader.wait()
        emu.clear_faults()
    assert not is_mounted(m.path)
    assert "SIGINT again: stopping at once" in m.log_text()


def test_signal_during_start_up(emulator_process, tmp_path: Path) -> None:
    emu = emulator_process(latency=0.3)
    pw = password_file(tmp_path, USERS["alice"])
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = subprocess.Popen([*idsfs_command(), "mount", "-f", "--icat", emu.icat_url, "--user",
                             "alice", "--password-file", str(pw), str(mp)],
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        # signal while it logs in (every request takes 0.3 s)
        assert wait_until(lambda: emu.counters().get("icat/login", {}).get("requests", 0) > 0,
                          30, interval=0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted" in proc.stderr.read()
    assert not is_mounted(mp)


def test_background_daemon_stops_on_sigterm(mount) -> None:
    m = mount(None, foreground=False)
    m.kill(signal.SIGTERM)
    m.wait_exit(20)
    assert wait_until(lambda: not is_mounted(m.path), 10)


def test_umount_of_busy_mount(mount) -> None:
    m = mount()
    holder = subprocess.Popen(["sleep", "60"], cwd=m.path / "DEMO")
    try:
        done = run_idsfs("umount", str(m.path))
        assert done.returncode == 1
        assert "is busy" in done.stderr and "--lazy" in done.stderr
        assert probe_mount(m.path) == 0
        done = run_idsfs("umount", "--lazy", str(m.path))
        assert done.returncode == 0, done.stderr
        assert not is_mounted(m.path)
    finally:
        holder.kill()
        holder.wait()
    assert m.wait_exit(20) == 0


def test_umount_of_something_not_mounted(tmp_path: Path) -> None:
    done = run_idsfs("umount", str(tmp_path))
    assert done.returncode == 1
    assert f"{tmp_path} is not mounted" in done.stderr
    done = run_idsfs("umount", "/proc")
    assert done.returncode == 1 and "not a FUSE mount" in done.stderr


def test_sigkill_leaves_a_stale_mount_that_umount_clears(mount, tmp_path: Path) -> None:
    m = mount()
    assert "DEMO" in os.listdir(m.path)
    m.kill(signal.SIGKILL)
    assert m.wait_exit(20) == -signal.SIGKILL
    assert is_mounted(m.path)
    assert probe_mount(m.path) == errno.ENOTCONN
    with pytest.raises(OSError) as info:
        os.listdir(m.path)
    assert info.value.errno == errno.ENOTCONN

    # mounting again on it is refused with the way out
    pw = password_file(tmp_path, USERS["alice"])
    done = run_idsfs("mount", "--icat", m.emulator.icat_url, "--user", "alice",
                     "--password-file", str(pw), str(m.path))
    assert done.returncode == 2
    assert "stale mount" in done.stderr and f"idsfs umount {m.path}" in done.stderr

    done = run_idsfs("umount", str(m.path))
    assert done.returncode == 0, done.stderr
    assert "cleared the stale mount" in done.stderr
    assert "Transport endpoint is not connected" in done.stderr
    assert not is_mounted(m.path)
    assert os.listdir(m.path) == []  # the empty directory underneath again

    # and the directory can be mounted again
    m2 = mount(None, mountpoint=m.path)
    assert "DEMO" in os.listdir(m2.path)


# ----------------------------------------------------------------------------- the session


def test_session_refresh_keeps_the_mount_alive(mount, emulator_process) -> None:
    # ICAT sessions live 1.8 s here; the daemon refreshes them every 0.9 s.
    emu = emulator_process(session_minutes=0.03)
    m = mount(emu, "--metadata-ttl", "0")
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        assert "DEMO-2024-001" in os.listdir(m.path / "DEMO")
        time.sleep(0.5)
    counters = emu.counters()
    assert counters["icat/login"]["requests"] == 1  # kept alive, never lost
    assert counters.get("icat/refresh", {}).get("requests", 0) >= 4
    data = (m.path / RAW / "tiny.txt").read_bytes()
    assert len(data) == 52


def test_lost_session_is_replaced(mount, emulator_process) -> None:
    emu = emulator_process()
    m = mount(emu, "--metadata-ttl", "0")
    assert (m.path / RAW / "tiny.txt").read_bytes()
    assert emu.expire_sessions() >= 1
    # ICAT listings and IDS reads both work again with a new session
    assert "DEMO-2024-001" in os.listdir(m.path / "DEMO")
    assert len((m.path / RAW / "one byte.bin").read_bytes()) == 1
    assert emu.counters()["icat/login"]["requests"] >= 2


def test_session_file_mount_keeps_the_session(mount, emulator_process, tmp_path: Path) -> None:
    emu = emulator_process()
    sid = login(emu)
    sid_file = password_file(tmp_path, sid, "sid")
    m = mount(emu, "--session-file", str(sid_file), "--debug", credentials=False)
    assert (m.path / RAW / "tiny.txt").read_bytes()
    assert m.unmount().returncode == 0
    # an adopted session is not logged out: it still works
    info = requests.get(f"{emu.icat_url}/session/{sid}", timeout=30)
    assert info.status_code == 200
    assert sid not in m.log_text()


def test_a_non_empty_mount_point_is_mounted_with_a_warning(mount, tmp_path: Path) -> None:
    # fuse3 mounts over a non-empty directory (hiding it); the log says so
    mp = tmp_path / "busy"
    mp.mkdir()
    (mp / "hidden.txt").write_text("underneath\n")
    m = mount(None, mountpoint=mp)
    assert "DEMO" in os.listdir(mp)
    assert f"the mount point {mp} is not empty" in m.log_text()
    assert m.unmount().returncode == 0
    assert (mp / "hidden.txt").read_text() == "underneath\n"
    quiet = mount(None)
    assert "is not empty" not in quiet.log_text()


def test_an_expired_adopted_session_is_said_at_once(mount, emulator_process,
                                                    tmp_path: Path) -> None:
    # No credentials to log in again: EACCES, one warning in the log when ICAT
    # first refuses (not at the next refresh, up to 30 minutes later), and
    # idsfs status says the session is gone instead of estimating time left.
    emu = emulator_process()
    sid = login(emu)
    sid_file = password_file(tmp_path, sid, "sid")
    m = mount(emu, "--session-file", str(sid_file), "--metadata-ttl", "0", credentials=False)
    assert "DEMO-2024-001" in os.listdir(m.path / "DEMO")
    assert emu.expire_sessions() >= 1
    with pytest.raises(PermissionError):
        os.listdir(m.path / "DEMO")
    with pytest.raises(PermissionError):
        os.listdir(m.path / "DEMO")
    assert wait_until(lambda: "ICAT refuses the session" in m.log_text(), 10)
    assert m.log_text().count("ICAT refuses the session") == 1
    done = run_idsfs("status", str(m.path))
    assert done.returncode == 0, done.stderr
    assert "EXPIRED" in done.stdout and "remount with a new session" in done.stdout
    assert " left" not in done.stdout.split("session", 1)[1].splitlines()[0]
    assert query_status(m.path)["session"]["expired"] is True
    assert sid not in m.log_text() + done.stdout


def test_secrets_never_in_argv_or_logs(mount, emulator_process, tmp_path: Path) -> None:
    emu = emulator_process()
    sid = login(emu, "bob")
    m1 = mount(emu, "--debug", "--log-file", str(tmp_path / "m1.log"), user="alice")
    m2 = mount(emu, "--debug", credentials=False, env={"IDSFS_SESSION_ID": sid})
    for m in (m1, m2):
        (m.path / RAW / "tiny.txt").read_bytes()
        os.listdir(m.path / "DEMO" / "DEMO-2024-002")
    cmdlines = [Path(f"/proc/{m.pid}/cmdline").read_bytes() for m in (m1, m2)]
    for m in (m1, m2):
        assert m.unmount().returncode == 0
    logs = m1.log_text() + (tmp_path / "m1.log").read_text() + m2.log_text()
    assert "GET" in logs or "get" in logs.lower()  # --debug traced requests
    for secret in (USERS["alice"], sid):
        assert secret not in logs
        for cmd in cmdlines:
            assert secret.encode() not in cmd
    # the daemon's own session ids are redacted too (sessionId=*** in traced URLs)
    assert "sessionId=" not in logs.replace("sessionId=***", "")


# ----------------------------------------------------------------------------- demo


def test_demo_starts_shows_data_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    demo_dir = tmp_path / "new" / "ids-demo"  # the demo makes the missing parent too
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDSFS_")}
    spools = Path("/var/cache/idsfs/spool")  # root's default spool base

    def demo_spools() -> set[str]:
        return {p.name for p in spools.glob("*_demo-*")} if spools.is_dir() else set()

    spools_before = demo_spools()
    proc = subprocess.Popen([*idsfs_command(), "demo", "--large-size", "1M", str(demo_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any("Press Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            line = proc.stdout.readline()
            assert line, f"demo ended early: {proc.wait()} {proc.stderr.read()}"
            lines.append(line)
        text = "".join(lines)
        assert f"mounted on {demo_dir}" in text
        assert "cat " in text and "getfattr -d" in text and "ls -l" in text
        icat_url = next(w for w in text.split() if w.endswith("/icat"))
        assert is_mounted(demo_dir)
        tiny = (demo_dir / RAW / "tiny.txt").read_bytes()
        assert len(tiny) == 52
        done = subprocess.run(["ls", "-l", str(demo_dir / RAW)], capture_output=True,
                              text=True, timeout=60, check=True)
        assert "large.bin" in done.stdout
        (demo_dir / RAW / "written by the demo test.txt").write_text("uploaded\n")
        assert (demo_dir / RAW / "written by the demo test.txt").read_text() == "uploaded\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(demo_dir)], check=False,
                           capture_output=True)
    assert not is_mounted(demo_dir)
    assert not (tmp_path / "new").exists()  # it created the directories, so it removed them
    assert demo_spools() == spools_before  # its spool lived and died in its workdir
    with pytest.raises(requests.ConnectionError):
        requests.get(icat_url + "/version", timeout=5)


def test_mount_failed_report_from_harness(mount, emulator_process) -> None:
    emu = emulator_process()
    with pytest.raises(MountFailed, match="refused for user 'alice'"):
        mount(emu, users={"alice": "not-the-password"})


def test_harness_unmounts_after_a_failing_test(mount, tmp_path: Path) -> None:
    # What the harness does at teardown, done by hand: a mount whose daemon was
    # killed and one still running are both gone afterwards.
    from mountharness import teardown_mount

    a: Mounted = mount()
    b: Mounted = mount()
    a.kill(signal.SIGKILL)
    a.wait_exit(20)
    teardown_mount(a)
    teardown_mount(b)
    assert not is_mounted(a.path) and not is_mounted(b.path)
    assert not a.alive() and not b.alive()


def test_mount_of_an_in_process_emulator(mount, emulator_factory) -> None:
    # The harness also mounts emulators started in the test process (tests/conftest.py),
    # with the passwords of their settings.
    emu = emulator_factory(demo=True)
    m = mount(emu, user="bob")
    assert "DEMO" in os.listdir(m.path)

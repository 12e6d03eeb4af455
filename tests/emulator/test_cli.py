"""The command line: ``python -m idsfs.emulator`` / ``idsfs emulator`` as a subprocess.

Checks the ready line, options, clean shutdown on SIGTERM/SIGINT, that
passwords and session ids never reach the output, and restart persistence
through ``--data``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

READY_RE = re.compile(
    r"^idsfs emulator ready icat=(http://127\.0\.0\.1:(\d+)/icat) ids=(http://127\.0\.0\.1:\2/ids)$"
)
SECRET = "file-secret-d41d8cd9"
#: the ``idsfs`` console script, run with this interpreter
IDSFS = [sys.executable, "-c", "import sys; from idsfs.cli import main; sys.exit(main())"]


class Running:
    def __init__(self, proc: subprocess.Popen[str], line: str) -> None:
        self.proc = proc
        m = READY_RE.match(line)
        assert m, f"bad ready line: {line!r}"
        self.icat, self.ids = m.group(1), m.group(3)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, out, err


def start(args: list[str], env: dict[str, str] | None = None) -> Running:
    proc = subprocess.Popen(
        [sys.executable, "-m", "idsfs.emulator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()))
    reader.start()
    reader.join(60)
    if not line or not line[0]:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"no ready line; stderr: {err}")
    return Running(proc, line[0].rstrip("\n"))


@pytest.fixture
def pwfile(tmp_path: Path) -> Path:
    path = tmp_path / "root.pw"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def running(pwfile: Path, tmp_path: Path) -> Iterator[Running]:
    emu = start(
        [
            "--port", "0",
            "--user", f"root:@{pwfile}",
            "--root", "root",
            "--user", "alice:alice-pw",
            "--data", str(tmp_path / "state"),
            "-v",
        ]
    )  # fmt: skip
    try:
        yield emu
    finally:
        if emu.proc.poll() is None:
            emu.proc.kill()
            emu.proc.communicate(timeout=10)


def login(icat: str, user: str, password: str) -> str:
    payload = {"plugin": "simple", "credentials": [{"username": user}, {"password": password}]}
    r = requests.post(icat + "/session", data={"json": json.dumps(payload)})
    assert r.status_code == 200, r.text
    return r.json()["sessionId"]


def test_ready_line_serve_and_sigterm(running):
    assert requests.get(running.ids + "/ping").text == "IdsOK"
    assert requests.get(running.icat + "/version").status_code == 200
    sid = login(running.icat, "root", SECRET)
    r = requests.get(running.icat + f"/session/{sid}")
    assert r.json()["userName"] == "simple/root"
    r = requests.get(running.ids + "/getServiceStatus", params={"sessionId": sid})
    assert r.status_code == 200
    code, out, err = running.stop(signal.SIGTERM)
    assert code == 0
    assert out == ""  # exactly one line was printed (already read)
    assert SECRET not in err and sid not in err
    assert "GET /ids/ping" in err  # -v logs one line per request
    assert "sessionId=***" in err


def test_sigint_stops_cleanly(running):
    code, _, err = running.stop(signal.SIGINT)
    assert code == 0
    assert "Traceback" not in err


def test_restart_with_same_data_dir(pwfile, tmp_path):
    args = [
        "--user", f"root:@{pwfile}", "--root", "root", "--demo",
        "--demo-large-size", "64K", "--data", str(tmp_path / "keep"), "-q",
    ]  # fmt: skip
    first = start(args)
    sid = login(first.icat, "root", SECRET)
    q = {"sessionId": sid, "query": "SELECT df.id FROM Datafile df ORDER BY df.id"}
    ids_before = requests.get(first.icat + "/entityManager", params=q).json()
    assert len(ids_before) > 30
    assert first.stop()[0] == 0
    second = start(args)
    try:
        ids_after = requests.get(second.icat + "/entityManager", params=q).json()
        assert ids_after == ids_before
    finally:
        assert second.stop()[0] == 0


def test_options_are_used(pwfile, tmp_path):
    emu = start(
        [
            "--user", f"root:@{pwfile}", "--root", "root", "--storage", "dataset",
            "--read-only", "--session-minutes", "30", "--queue-interval", "0.02",
            "--fault", "error:status=503,endpoint=ids/getSize,count=1", "-q",
        ]
    )  # fmt: skip
    try:
        assert requests.get(emu.ids + "/isTwoLevel").text == "true"
        assert requests.get(emu.ids + "/isReadOnly").text == "true"
        sid = login(emu.icat, "root", SECRET)
        remaining = requests.get(emu.icat + f"/session/{sid}").json()["remainingMinutes"]
        assert 29 < remaining <= 30
        r = requests.get(emu.ids + "/getSize", params={"sessionId": sid})
        assert r.status_code == 503 and r.json()["code"] == "DataNotOnlineException"
        admin = emu.ids.removesuffix("/ids") + "/admin"
        assert requests.get(admin + "/counters").json()["ids/getSize"]["errors"] == 1
    finally:
        assert emu.stop()[0] == 0


def test_help_lists_every_option():
    out = subprocess.run(
        [*IDSFS, "emulator", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--host", "--port", "--data", "--user", "--root", "--demo", "--storage",
        "--read-only", "--session-minutes", "--latency", "--fault", "--queue-interval",
        "--restore-delay", "--demo-large-size", "--seed",
    ):  # fmt: skip
        assert option in out, option


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--user", "nocolon"], "NAME:PASSWORD"),
        (["--user", ":pw-should-not-leak"], "NAME:PASSWORD"),
        (["--user", "a:@/nonexistent/pwfile"], "password file"),
        (["--user", "a:x", "--root", "b"], "without an account"),
        (["--user", "a:pw-should-not-leak", "--user", "a:other"], "twice"),
        (["--storage", "tape"], "invalid choice"),
        (["--demo-large-size", "lots"], "not a size"),
        (["--fault", "explode"], "unknown fault kind"),
        (["--demo", "--user", "a:pw-should-not-leak"], "root"),
    ],
)
def test_bad_arguments(args, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "idsfs.emulator", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (1, 2)
    assert needle in proc.stderr
    assert "pw-should-not-leak" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "idsfs.emulator", "--port", str(port), "-q"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert "error" in proc.stderr and "Traceback" not in proc.stderr


def test_idsfs_emulator_subcommand(tmp_path):
    env = dict(os.environ)
    proc = subprocess.Popen(
        [*IDSFS, "emulator", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    try:
        running = Running(proc, line.rstrip("\n"))
        assert requests.get(running.ids + "/ping").text == "IdsOK"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_log_lines_hide_session_ids_also_in_tracebacks():
    import logging

    from idsfs.emulator.cli import RedactingFormatter

    sid = "0d9a3706-80d4-4d29-9ff3-4d65d4308a24"
    try:
        raise ValueError(f"no session {sid}")
    except ValueError:
        record = logging.LogRecord("idsfs.emulator.http", logging.ERROR, __file__, 1,
                                   "GET /ids/getData?sessionId=%s failed", (sid,),
                                   sys.exc_info())
    text = RedactingFormatter("%(levelname)s %(message)s").format(record)
    assert sid not in text
    assert "sessionId=***" in text and "ValueError: no session ***" in text


def test_a_password_in_argv_is_warned_about(running):
    # the fixture gives alice's password in argv and root's as @FILE
    assert login(running.icat, "alice", "alice-pw")
    code, out, err = running.stop()
    assert code == 0
    warnings = [line for line in err.splitlines() if "warning: the password of user" in line]
    assert len(warnings) == 1, err
    assert "'alice'" in warnings[0] and "other users" in warnings[0]
    assert "--user alice:@FILE" in warnings[0]
    assert "alice-pw" not in err + out and SECRET not in err + out

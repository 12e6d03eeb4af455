"""Daemon helpers that need no mount: sd_notify, log redaction, IDS URL rule, mount table,
readahead, the start-up checks against a real emulator (no FUSE involved)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest
import trio

from idsfs.aio import ThreadBridge
from idsfs.config import Config, Secret
from idsfs.daemon import (
    Daemon,
    RedactingFormatter,
    StartupError,
    default_ids_url,
    find_mount,
    sd_notify,
    set_readahead,
)

SECRET_SID = "a1b2c3d4-e5f6-session-id"


def test_sd_notify_sends_one_datagram(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert sd_notify("READY=1", "STATUS=mounted", environ={"NOTIFY_SOCKET": str(path)})
        assert sock.recv(4096) == b"READY=1\nSTATUS=mounted"


def test_sd_notify_abstract_socket() -> None:
    name = f"idsfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert sd_notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_sd_notify_without_socket_is_a_no_op(tmp_path: Path) -> None:
    assert sd_notify("READY=1", environ={}) is False
    assert sd_notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "none")}) is False


def test_redacting_formatter_hides_secrets_and_tracebacks() -> None:
    formatter = RedactingFormatter(lambda: [SECRET_SID, None])
    try:
        raise RuntimeError(f"server said: session {SECRET_SID} is unknown")
    except RuntimeError:
        import sys

        exc_info = sys.exc_info()
    record = logging.LogRecord("idsfs.test", logging.ERROR, __file__, 1,
                               "GET http://h/ids/getData?sessionId=%s&x=1 failed", (SECRET_SID,),
                               exc_info)
    text = formatter.format(record)
    assert SECRET_SID not in text
    assert "sessionId=***" in text and "session *** is unknown" in text
    assert "Traceback" in text


def test_journal_format_has_priority_prefix() -> None:
    formatter = RedactingFormatter(lambda: (), journal=True)
    record = logging.LogRecord("idsfs.daemon", logging.WARNING, __file__, 1, "careful", (), None)
    assert formatter.format(record) == "<4>idsfs.daemon: careful"


@pytest.mark.parametrize(("icat", "ids"), [
    ("https://icat.example.org:8181", "https://icat.example.org:8181/ids"),
    ("https://icat.example.org:8181/icat", "https://icat.example.org:8181/ids"),
    ("https://icat.example.org:8181/icat/", "https://icat.example.org:8181/ids"),
    ("http://h/facility/icat", "http://h/facility/ids"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000/ids"),
])
def test_default_ids_url(icat: str, ids: str) -> None:
    assert default_ids_url(icat) == ids


def test_find_mount_parses_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"65 22 0:40 / {tmp_path}/my\\040mnt ro,nosuid,nodev - fuse.idsfs "
        "http://h:1/icat ro,user_id=0,group_id=0,default_permissions\n")
    entry = find_mount(tmp_path / "my mnt", mountinfo=str(info))
    assert entry is not None
    assert entry.fstype == "fuse.idsfs" and entry.is_fuse
    assert entry.source == "http://h:1/icat"
    assert "default_permissions" in entry.options
    assert find_mount(tmp_path / "other", mountinfo=str(info)) is None
    root = find_mount("/", mountinfo=str(info))
    assert root is not None and not root.is_fuse


def test_set_readahead_failure_is_a_warning(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    dev = os.makedev(0, 4242)
    with caplog.at_level(logging.WARNING, logger="idsfs.daemon"):
        assert set_readahead(dev, 8 << 20, sysfs=str(tmp_path)) is False
    assert "could not raise the kernel readahead to 8M" in caplog.text
    (tmp_path / "0:4242").mkdir()
    assert set_readahead(dev, 8 << 20, sysfs=str(tmp_path)) is True
    assert (tmp_path / "0:4242" / "read_ahead_kb").read_text() == "8192\n"
    assert set_readahead(dev, 0, sysfs=str(tmp_path / "missing")) is True


# ----------------------------------------------------------------------------- connect


def config_for(emulator, tmp_path: Path, **changes) -> Config:
    values = {"mountpoint": tmp_path, "icat_url": emulator.icat_url, "user": "alice",
              "password": Secret(emulator.settings.users["alice"], "test")}
    values.update(changes)
    return Config(**values)


def test_connect_logs_in_and_derives_the_ids_url(emulator, tmp_path: Path) -> None:
    daemon = Daemon(config_for(emulator, tmp_path))
    try:
        daemon.connect()
        assert daemon.ids is not None and daemon.icat is not None
        assert daemon.ids.url == emulator.ids_url + "/"
        assert daemon.ids.sessionId == daemon.icat.sessionId
        assert daemon.owns_session
        assert daemon.lifetime and daemon.lifetime > 60
        assert daemon.icat.sessionId in daemon.secrets()
        # a re-login reaches the IDS client through the session listener
        old = daemon.ids.sessionId
        daemon.bridge = ThreadBridge(2)
        trio.run(daemon._login_again)  # the login in a worker thread, the notes on trio
        assert daemon.ids.sessionId == daemon.icat.sessionId != old
        assert old in daemon.secrets()
        interval = daemon.refresh_interval()
        assert 0.5 <= interval <= 30 * 60
    finally:
        daemon.close()


def test_connect_with_the_ids_url_only(emulator, tmp_path: Path) -> None:
    daemon = Daemon(config_for(emulator, tmp_path, icat_url=None, ids_url=emulator.ids_url))
    try:
        daemon.connect()
        assert daemon.icat is not None and daemon.icat.url == emulator.icat_url + "/"
    finally:
        daemon.close()


def test_connect_adopts_a_session(emulator, tmp_path: Path) -> None:
    sid = emulator.login("bob")
    daemon = Daemon(config_for(emulator, tmp_path, user=None, password=None,
                               session=Secret(sid, "test")))
    try:
        daemon.connect()
        assert daemon.ids is not None and daemon.ids.sessionId == sid
        assert not daemon.owns_session
    finally:
        daemon.close()


def test_connect_errors_are_clear(emulator, tmp_path: Path) -> None:
    bad = Daemon(config_for(emulator, tmp_path, password=Secret("nope-nope", "test")))
    with pytest.raises(StartupError, match="refused for user 'alice' with authenticator"):
        bad.connect()
    bad.close()
    wrong_ids = Daemon(config_for(emulator, tmp_path, ids_url=emulator.icat_url + "/x"))
    with pytest.raises(StartupError, match="is not an IDS"):
        wrong_ids.connect()
    wrong_ids.close()
    expired = Daemon(config_for(emulator, tmp_path, user=None, password=None,
                                session=Secret("no-such-session", "file /tmp/sid")))
    with pytest.raises(StartupError, match=r"session from file /tmp/sid is not valid"):
        expired.connect()
    expired.close()


def test_derived_ids_url_that_is_no_ids(emulator, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The emulator serves its IDS at /ids only: point the rule somewhere else.
    import idsfs.daemon

    monkeypatch.setattr(idsfs.daemon, "default_ids_url",
                        lambda url: url.rsplit("/icat", 1)[0] + "/elsewhere/ids")
    daemon = Daemon(config_for(emulator, tmp_path))
    try:
        with pytest.raises(StartupError, match=r"no IDS at .*/elsewhere/ids .*give --ids URL"):
            daemon.connect()
    finally:
        daemon.close()

"""ICATClient: a re-login that ICAT refuses is not repeated for every call."""

from __future__ import annotations

import logging

import pytest

from idsfs import icat as icat_module
from idsfs.errors import ICATSessionError
from idsfs.icat import ICATClient


def _alice(emu) -> ICATClient:
    client = ICATClient(emu.icat_url, backoff=0.01)
    client.login("simple", {"username": "alice", "password": "alice-secret"})
    return client


def test_a_refused_relogin_backs_off_and_warns(world, caplog, monkeypatch) -> None:
    # the password changed (here: every login refused) while the session
    # expired: one login, one warning; the calls that follow fail at once with
    # the refusal until the back-off is over, then one login again
    emu = world.emu
    clock = [1000.0]
    monkeypatch.setattr(icat_module.time, "monotonic", lambda: clock[0])
    icat = _alice(emu)
    try:
        emu.faults.error(403, "icat/login", message="The username and password do not match")
        emu.expire_sessions(icat.sessionId)
        emu.counters.reset()
        caplog.set_level(logging.INFO, "idsfs.icat")
        for _ in range(5):
            with pytest.raises(ICATSessionError) as exc:
                icat.search("SELECT COUNT(ds) FROM Dataset ds")
        assert emu.counters.get("icat/login") == 1
        assert "do not match" in str(exc.value) and "next try in 10 s" in str(exc.value)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "refused to log alice in again" in warnings[0].message
        assert "alice-secret" not in caplog.text
        clock[0] += 11  # past the back-off: tried again, refused again, waits twice as long
        with pytest.raises(ICATSessionError):
            icat.search("SELECT COUNT(ds) FROM Dataset ds")
        assert emu.counters.get("icat/login") == 2
        with pytest.raises(ICATSessionError) as exc:
            icat.search("SELECT COUNT(ds) FROM Dataset ds")
        assert "next try in 20 s" in str(exc.value)
        emu.faults.clear()  # the account works again: the next try logs in
        clock[0] += 21
        assert icat.search("SELECT COUNT(ds) FROM Dataset ds") == [3]
        assert emu.counters.get("icat/login") == 3
    finally:
        icat.close()


def test_an_adopted_session_warns_once_when_lost_not_when_never_valid(world, caplog) -> None:
    emu = world.emu
    caplog.set_level(logging.WARNING, "idsfs.icat")
    bogus = ICATClient(emu.icat_url, sessionId="no-such-session", backoff=0.01)
    with pytest.raises(ICATSessionError):
        bogus.session_info()  # refused at once: the caller reports it (a mount: one line)
    assert "ICAT refuses the session" not in caplog.text
    alice = _alice(emu)
    adopted = ICATClient(emu.icat_url, sessionId=alice.sessionId, backoff=0.01)
    try:
        assert adopted.search("SELECT COUNT(ds) FROM Dataset ds") == [3]
        emu.expire_sessions(alice.sessionId)
        for _ in range(3):
            with pytest.raises(ICATSessionError):
                adopted.search("SELECT COUNT(ds) FROM Dataset ds")
        assert caplog.text.count("ICAT refuses the session") == 1
    finally:
        adopted.close()
        alice.close()
        bogus.close()

"""daemon.check_mountpoint: a FUSE mount already there is live or stale by how it answers."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from idsfs import daemon
from idsfs.daemon import MountEntry, StartupError, check_mountpoint


@pytest.mark.parametrize(("state", "expected"), [
    (0, "is already mounted (fuse.idsfs idsfs); unmount it first"),
    # a live daemon whose session expired answers EACCES: not stale
    (errno.EACCES, "is already mounted (fuse.idsfs idsfs, answering Permission denied)"),
    (errno.EIO, "is already mounted (fuse.idsfs idsfs, answering Input/output error)"),
    (errno.ENOTCONN, "is a stale mount (fuse.idsfs, its daemon is gone or hung)"),
    (errno.ECONNABORTED, "is a stale mount"),
    (None, "is a stale mount"),  # no answer within the probe's timeout: hung
])
def test_a_fuse_mount_there_is_live_or_stale(monkeypatch, tmp_path: Path, state, expected) -> None:
    entry = MountEntry(str(tmp_path), "fuse.idsfs", "idsfs", "rw,user_id=0")
    monkeypatch.setattr(daemon, "find_mount", lambda path: entry)
    monkeypatch.setattr(daemon, "probe_mount", lambda path, timeout: state)
    with pytest.raises(StartupError) as exc:
        check_mountpoint(tmp_path)
    assert expected in str(exc.value) and f"idsfs umount {tmp_path}" in str(exc.value)

"""Unit tests of idsfs.upload without servers: names, spool directory, records."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from idsfs.aio import ThreadBridge
from idsfs.errors import SpoolError
from idsfs.upload import (
    DEFAULT_DATAFILE_FORMAT,
    FAILED,
    PENDING,
    Upload,
    Uploader,
    _version_key,
    default_spool_dir,
    icat_date,
    parse_format,
)


def uploader(spool: Path, owner: str = "http://icat alice") -> Uploader:
    # open_spool and the records need no server: the clients are never called here
    nothing: Any = None
    return Uploader(nothing, nothing, ThreadBridge(), spool, owner=owner)


def test_defaults_match_the_config() -> None:
    from idsfs import config, fs

    assert config.DEFAULT_DATAFILE_FORMAT == DEFAULT_DATAFILE_FORMAT
    assert config.DEFAULT_DATASET_TYPE == fs.DEFAULT_DATASET_TYPE


def test_parse_format_and_versions() -> None:
    assert parse_format("binary") == ("binary", None)
    assert parse_format(" NeXus : 4.4 ") == ("NeXus", "4.4")
    for bad in ("", ":1", "x:"):
        with pytest.raises(ValueError):
            parse_format(bad)
    assert sorted(["4.10", "4.9", "4.4a", "10"], key=_version_key) == ["4.4a", "4.9", "4.10",
                                                                       "10"]


def test_icat_date() -> None:
    assert icat_date(1_500_000_000_123) == "2017-07-14T02:40:00.123+00:00"
    assert icat_date(0) == "1970-01-01T00:00:00.000+00:00"


def test_default_spool_dir() -> None:
    root = default_spool_dir("https://icat.example.org:8181/icat", "db/jdoe", "/mnt/ids", uid=0)
    assert root.parent == Path("/var/cache/idsfs/spool")
    assert root.name.startswith("icat.example.org-db_jdoe-")
    env = {"XDG_CACHE_HOME": "/home/j/.xdg", "HOME": "/home/j"}
    user = default_spool_dir("https://icat.example.org", "jdoe", "/mnt/ids", uid=1000,
                             environ=env)
    assert user.parent == Path("/home/j/.xdg/idsfs/spool")
    plain = default_spool_dir("https://icat.example.org", "jdoe", "/mnt/ids", uid=1000,
                              environ={"HOME": "/home/j"})
    assert plain.parent == Path("/home/j/.cache/idsfs/spool")
    # another mount point, user or server: another spool
    others = {default_spool_dir("https://icat.example.org", "jdoe", "/mnt/other", uid=1000,
                                environ=env),
              default_spool_dir("https://icat.example.org", "jane", "/mnt/ids", uid=1000,
                                environ=env),
              default_spool_dir("https://other.example.org", "jdoe", "/mnt/ids", uid=1000,
                                environ=env)}
    assert user not in others and len(others) == 3


def test_spool_is_made_lazily_and_locked(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    first = uploader(spool)
    assert first.open_spool() == [] and not spool.exists()  # a mount that never writes
    up = first.create(dataset_id=7, name="a/b.dat", display="x/a/b.dat", format_id=3)
    assert spool.stat().st_mode & 0o777 == 0o700
    assert up.data_path.exists() and json.loads(up.meta_path.read_text())["state"] == "writing"
    second = uploader(spool)
    with pytest.raises(SpoolError) as exc:
        second.open_spool()
    assert exc.value.errno == errno.EBUSY and "another idsfs daemon" in str(exc.value)
    first.close_spool()
    assert len(second.open_spool()) == 1
    second.close_spool()


def test_records_found_at_start_up(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()

    def record(uid: str, state: str, owner: str = "http://icat alice", **extra: Any) -> Upload:
        up = Upload(spool, uid, dataset_id=1, name=f"{state}.dat", display=f"ds/{state}.dat",
                    format_id=2, owner=owner)
        up.state = state
        for key, value in extra.items():
            setattr(up, key, value)
        up.data_path.write_bytes(b"data")
        up.save()
        return up

    record("a" * 32, "writing")
    record("b" * 32, "uploading")
    record("c" * 32, "pending", reason="500")
    record("d" * 32, "done", datafile_id=9)
    record("e" * 32, "pending", owner="http://other bob")
    (spool / f"{'f' * 32}.json").write_text("{not json")
    missing = record("0" * 32, "pending")
    missing.data_path.unlink()
    u = uploader(spool)
    found = {up.name: up for up in u.open_spool()}
    assert set(found) == {"writing.dat", "uploading.dat", "pending.dat"}
    writing = found["writing.dat"]
    assert writing.state == FAILED and "open for writing" in writing.reason
    assert found["uploading.dat"].state == PENDING and found["uploading.dat"].maybe_landed
    assert found["pending.dat"].state == PENDING and found["pending.dat"].reason == "500"
    assert not (spool / f"{'d' * 32}.json").exists()  # done: cleaned up
    assert (spool / f"{'e' * 32}.json").exists()  # another owner's: left alone
    assert (spool / f"{'f' * 32}.json.bad").exists()
    assert (spool / f"{'0' * 32}.json.bad").exists()
    assert len(u.pending_lines()) == 3
    assert u.status()["spool_dir"] == str(spool)
    u.close_spool()

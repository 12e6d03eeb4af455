"""``idsfs get`` / ``idsfs put`` against the emulator, and two-level storage
calls (archive, restore, write, DataNotOnline, restore failures)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile

import pytest

from idsfs.errors import IDSDataNotOnlineError, IDSInternalError
from idsfs.ids import DataSelection


def idsfs(*args: str, env: dict[str, str] | None = None, cwd=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IDSFS_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "idsfs.cli", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=120)


def test_get_put_with_session_env(world, tmp_path) -> None:
    env = {"IDSFS_SESSION_ID": world.root, "IDSFS_IDS_URL": world.emu.ids_url}
    src = tmp_path / "upload.bin"
    src.write_bytes(b"uploaded by idsfs put\n" * 1000)
    r = idsfs("put", str(src), "--dataset", str(world.ds3), "--format", str(world.fmt),
              "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    new_id = int(r.stdout.strip())
    out = tmp_path / "back.bin"
    r = idsfs("get", "--datafile", str(new_id), "-o", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()
    r = idsfs("get", "--datafile", str(new_id), "-o", str(out), env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"idsfs get: {out} exists: use -f/--force to replace it"
    out.write_bytes(b"old")
    r = idsfs("get", "--datafile", str(new_id), "-o", str(out), "-f", env=env)
    assert r.returncode == 0 and out.read_bytes() == src.read_bytes()
    r = idsfs("get", "--dataset", str(world.ds1), "--dataset", str(world.ds2), env=env,
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(tmp_path / "ids-download.zip") as z:
        assert len(z.namelist()) == 4
    r = idsfs("get", "--datafile", str(world.df[2]), env=env, cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "df2").read_bytes() == world.content(2)
    r = idsfs("get", "--datafile", str(world.df[3]), "-o", "-", env=env)
    assert r.returncode == 0 and r.stdout.encode() == world.content(3)
    for text in (r.stdout, r.stderr):
        assert world.root not in text


def test_login_with_password_file(world, tmp_path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("alice-secret\n")
    pw.chmod(0o600)
    r = idsfs("get", "--ids", world.emu.ids_url, "--user", "alice", "--password-file", str(pw),
              "--datafile", str(world.df[1]), "-o", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a").read_bytes() == world.content(1)
    pw.write_text("wrong\n")
    r = idsfs("get", "--ids", world.emu.ids_url, "--user", "alice", "--password-file", str(pw),
              "--datafile", str(world.df[1]), "-o", str(tmp_path / "b"))
    assert r.returncode == 1 and "ICATSessionError" in r.stderr and "wrong" not in r.stderr


def test_usage_errors(world, tmp_path) -> None:
    r = idsfs("get", "--ids", world.emu.ids_url, "--datafile", "1")
    assert r.returncode == 2 and "credentials" in r.stderr
    r = idsfs("get", "--ids", world.emu.ids_url, env={"IDSFS_SESSION_ID": world.root})
    assert r.returncode == 2 and "select" in r.stderr
    env = {"IDSFS_SESSION_ID": world.root}
    r = idsfs("put", str(tmp_path / "missing"), "--dataset", "1", "--format", "1",
              "--ids", world.emu.ids_url, env=env)
    assert r.returncode == 2 and r.stderr.strip() == \
        f"idsfs put: {tmp_path / 'missing'}: no such file"
    src = tmp_path / "data.bin"
    src.write_bytes(b"x")
    r = idsfs("put", str(src), "--name", "", "--dataset", "1", "--format", "1",
              "--ids", world.emu.ids_url, env=env)
    assert r.returncode == 2 and "--name '': a datafile name must not be empty" in r.stderr
    # -o into a directory that does not exist: an error, not a file named like it
    for output in (f"{tmp_path}/newdir/", f"{tmp_path}/no/such/file"):
        r = idsfs("get", "--datafile", str(world.df[1]), "-o", output, "--ids",
                  world.emu.ids_url, env=env)
        assert r.returncode == 2 and "no such directory" in r.stderr, r.stderr
        assert not (tmp_path / "newdir").exists() and not (tmp_path / "no").exists()
    r = idsfs("get", "--datafile", "1", "--retries", "-1", "--ids", world.emu.ids_url, env=env)
    assert r.returncode == 2 and "must be 0 or more" in r.stderr


# ------------------------------------------------------------------ two-level storage


def wait(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.mark.parametrize("storage", ["dataset", "datafile"])
def test_two_level(world_factory, storage: str) -> None:
    w = world_factory(storage=storage, archived=True)
    ids = w.ids
    ds1 = DataSelection({"datasetIds": [w.ds1]})
    assert ids.isTwoLevel() is True
    assert ids.getStatus(ds1) == "ARCHIVED"
    with pytest.raises(IDSDataNotOnlineError) as info:  # and a restore is queued
        ids.getData(ds1)
    assert info.value.status == 503
    wait(lambda: ids.getStatus(ds1) == "ONLINE")
    with ids.getData(DataSelection({"datafileIds": [w.df[1]]})) as s:
        assert s.read() == w.content(1)
    w.wait_idle()
    ids.archive(ds1)
    wait(lambda: ids.getStatus(ds1) == "ARCHIVED")
    w.wait_idle()
    ids.restore(ds1)
    wait(lambda: ids.getStatus(ds1) == "ONLINE")
    ids.write(ds1)
    w.wait_idle()
    pid = ids.prepareData(DataSelection({"datasetIds": [w.ds2]}))
    wait(lambda: ids.isPrepared(pid))
    assert ids.getSize(pid) == 104


def test_restore_failure_and_reset(world_factory) -> None:
    w = world_factory(storage="dataset", archived=True)
    ids = w.ids
    ds2 = DataSelection({"datasetIds": [w.ds2]})
    w.emu.storage.fail_next_restores(1)
    ids.restore(ds2)
    wait(lambda: not ids.getServiceStatus()["opsQueue"])
    with pytest.raises(IDSInternalError, match="Restore failed"):
        ids.getStatus(ds2)
    ids.reset(ds2)
    assert ids.getStatus(ds2) == "ARCHIVED"


def test_unusable_icat_url_from_the_ids_is_a_clear_error(canned, tmp_path) -> None:
    canned.answer("/ids/getIcatUrl", 200, "ftp://icat.example.org/icat")
    pw = tmp_path / "pw"
    pw.write_text("alice-secret\n")
    pw.chmod(0o600)
    r = idsfs("get", "--ids", canned.url + "/ids", "--user", "alice", "--password-file",
              str(pw), "--datafile", "1", "-o", str(tmp_path / "a"))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "ftp://icat.example.org/icat" in r.stderr and "--icat" in r.stderr
    assert not (tmp_path / "a").exists()


def test_an_unknown_option_gets_the_sub_commands_usage() -> None:
    for command in ("mount", "get", "emulator"):
        r = idsfs(command, "--bogus")
        assert r.returncode == 2
        assert r.stderr.startswith(f"usage: idsfs {command} ")
        assert r.stderr.rstrip().endswith(
            f"idsfs {command}: error: unrecognized arguments: --bogus")

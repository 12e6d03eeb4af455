"""Writing through a real mount when things go wrong: server faults during the upload,
a daemon killed during an upload, a full spool disk, an unmount with pending uploads.

Nothing may be lost and nothing half-registered may remain: every test ends with
exactly one datafile with the right bytes (size, ICAT checksum and the bytes IDS
serves), or with the bytes still in the spool.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mountharness import idsfs_command, is_mounted, wait_until
from writeharness import RAW, run, spool_records, write_args


def slow_retry(spool: Path, *extra: str) -> tuple[str, ...]:
    """Mount options with a 3 s first retry: time to look at the pending upload."""
    return ("--spool-dir", str(spool), "--upload-retry", "3s", "--upload-wait", "10s", *extra)


def xattr(path: Path, name: str) -> str:
    return run("getfattr", "-n", name, "--only-values", path).stdout


@pytest.mark.parametrize("fault", [
    {"kind": "error", "status": 500},
    {"kind": "corrupt_checksum"},
    {"kind": "expire_session", "count": 2},
])
def test_fault_during_upload_fails_close_then_retry_lands_once(
        mount, servers, tmp_path: Path, fault: dict) -> None:
    spool = tmp_path / "spool"
    m = mount(servers.emu, *slow_retry(spool))
    ds = servers.dataset_id("1", "raw")
    data = os.urandom(3 << 20)
    target = m.path / RAW / "result.h5"
    rule = {"count": 1, **fault}
    servers.emu.add_fault(rule.pop("kind"), endpoint="ids/put", **rule)
    f = open(target, "wb")  # noqa: SIM115 - closed below, where the error is expected
    f.write(data)
    with pytest.raises(OSError) as exc:
        f.close()
    assert exc.value.errno == errno.EIO
    # the spool keeps the bytes as a pending upload, shown in the tree and in idsfs status
    (rec,) = spool_records(spool)
    assert rec["state"] == "pending" and rec["size"] == len(data)
    assert (spool / f"{rec['uid']}.data").read_bytes() == data
    assert xattr(target, "user.idsfs.upload").startswith("pending: ")
    assert "result.h5: pending" in xattr(m.path / RAW, "user.idsfs.upload")
    assert os.stat(target).st_size == len(data)
    status = json.loads(run(*idsfs_command(), "status", "--json", m.path).stdout)
    assert any("result.h5" in line for line in status["uploads"]["pending"])
    text = run(*idsfs_command(), "status", m.path).stdout
    assert "result.h5" in text and "pending" in text
    # nothing half-registered: no datafile of that name now
    assert servers.datafiles(ds, "result.h5") == []
    # the retry lands exactly one datafile with the right bytes
    assert wait_until(lambda: servers.datafiles(ds, "result.h5") != [], 20)
    servers.assert_stored(ds, "result.h5", data)
    assert wait_until(lambda: spool_records(spool) == [], 10)
    assert target.read_bytes() == data


def test_dropped_answer_close_succeeds_without_a_second_put(mount, servers, tmp_path) -> None:
    """The connection breaks after the body was sent: the datafile landed; close says so
    after checking ICAT (same name, size and CRC32), and nothing is uploaded twice."""
    m = mount(servers.emu, *slow_retry(tmp_path / "spool"))
    ds = servers.dataset_id("1", "raw")
    data = os.urandom(1 << 20)
    servers.emu.add_fault("drop", endpoint="ids/put", after_bytes=3, count=1)
    puts = servers.emu.requests_to("ids/put")
    (m.path / RAW / "dropped.bin").write_bytes(data)
    assert servers.emu.requests_to("ids/put") == puts + 1
    servers.assert_stored(ds, "dropped.bin", data)


def test_daemon_killed_during_an_upload_finishes_after_restart(
        mount, servers, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    m = mount(servers.emu, *write_args(spool))
    ds = servers.dataset_id("1", "raw")
    data = os.urandom(12 << 20)
    (tmp_path / "src").write_bytes(data)
    # the IDS takes its time: the upload is in flight when the daemon dies
    servers.emu.add_fault("latency", endpoint="ids/put", seconds=3.0, count=5)
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])",
         str(tmp_path / "src"), str(m.path / RAW / "killed.bin")],
        stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: any(r["state"] == "uploading" for r in spool_records(spool)), 30)
    m.kill(signal.SIGKILL)
    writer.communicate(timeout=30)
    assert writer.returncode != 0  # its close could not succeed
    m.wait_exit(10)
    run(*idsfs_command(), "umount", m.path)  # clears the stale mount
    assert not is_mounted(m.path)
    (rec,) = spool_records(spool)
    assert rec["state"] == "uploading" and rec["name"] == "killed.bin"
    assert (spool / f"{rec['uid']}.data").read_bytes() == data
    servers.emu.clear_faults()
    # a new daemon on the same spool finishes it
    m2 = mount(servers.emu, *write_args(spool))
    assert wait_until(lambda: spool_records(spool) == [], 30), spool_records(spool)
    servers.assert_stored(ds, "killed.bin", data)
    assert (m2.path / RAW / "killed.bin").read_bytes() == data


def test_full_spool_disk_gives_enospc_and_loses_nothing(mount, servers, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", spool)
    try:
        m = mount(servers.emu, *write_args(spool))
        ds = servers.dataset_id("1", "raw")
        target = m.path / RAW / "big.bin"
        done = run("dd", "if=/dev/urandom", f"of={target}", "bs=64k", "count=40",
                   check=False)
        assert done.returncode != 0 and "No space left on device" in done.stderr
        # the file is held, never uploaded: a program saw its write fail
        assert xattr(target, "user.idsfs.upload").startswith("failed: ")
        time.sleep(0.5)
        assert servers.datafiles(ds, "big.bin") == []
        assert servers.emu.requests_to("ids/put") == 0
        kept = os.stat(target).st_size
        assert kept > 0 and sum(p.stat().st_size for p in spool.glob("*.data")) == kept
        # writing it again from the start, small enough now, stores it
        with open(target, "wb") as f:
            f.write(b"fits")
        servers.assert_stored(ds, "big.bin", b"fits")
        assert wait_until(lambda: not list(spool.glob("*.data")), 10)
        # rm of a held file drops its spool
        done = run("dd", "if=/dev/zero", f"of={m.path / RAW / 'again.bin'}", "bs=64k",
                   "count=40", check=False)
        assert "No space left on device" in done.stderr
        run("rm", m.path / RAW / "again.bin")
        assert not list(spool.glob("*.data"))
        assert servers.datafiles(ds, "again.bin") == []
    finally:
        subprocess.run(["umount", "-l", str(spool)], capture_output=True, check=False)


def test_unmount_waits_for_pending_uploads_and_keeps_the_rest(mount, servers, tmp_path) -> None:
    spool = tmp_path / "spool"
    m = mount(servers.emu, "--spool-dir", str(spool), "--upload-retry", "0.3s",
              "--upload-wait", "1.5s")
    ds = servers.dataset_id("1", "raw")
    servers.emu.add_fault("error", endpoint="ids/put", status=500, count=1000)
    with pytest.raises(OSError) as failed, open(m.path / RAW / "stuck.bin", "wb") as f:
        f.write(b"stuck")
    assert failed.value.errno == errno.EIO  # close: the upload did not land (yet)
    started = time.monotonic()
    done = run(*idsfs_command(), "umount", m.path, check=False)
    assert done.returncode == 1, done
    # what the daemon waits for is said while it waits (not only at the end)
    assert "waiting up to 1.5 s for 1 upload(s)" in done.stderr
    assert "not stored, kept in the spool (pending ones are resumed" in done.stderr
    assert "\n  DEMO/" in done.stderr and "stuck.bin" in done.stderr
    assert time.monotonic() - started >= 1.5
    assert not is_mounted(m.path)
    assert "kept in" in m.log_text() and "stuck.bin" in m.log_text()
    (rec,) = spool_records(spool)
    assert rec["state"] == "pending"
    servers.emu.clear_faults()
    mount(servers.emu, *write_args(spool))
    assert wait_until(lambda: spool_records(spool) == [], 20)
    servers.assert_stored(ds, "stuck.bin", b"stuck")


def test_unmount_waits_until_a_pending_upload_lands(mount, servers, tmp_path) -> None:
    spool = tmp_path / "spool"
    m = mount(servers.emu, "--spool-dir", str(spool), "--upload-retry", "30s",
              "--upload-wait", "20s")
    ds = servers.dataset_id("1", "raw")
    servers.emu.add_fault("error", endpoint="ids/put", status=500, count=1)
    with pytest.raises(OSError) as failed, open(m.path / RAW / "late.bin", "wb") as f:
        f.write(b"late")
    assert failed.value.errno == errno.EIO  # close: the upload did not land (yet)
    done = run(*idsfs_command(), "umount", m.path, check=False)
    assert done.returncode == 0, done.stderr   # the unmount retried it at once
    servers.assert_stored(ds, "late.bin", b"late")
    assert spool_records(spool) == []

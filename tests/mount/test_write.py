"""Writing through a real mount: cp, rsync, tar -x, dd, Python file I/O, mkdir, rmdir,
rm, mv, the replace option, read-only mounts; checked against ICAT and IDS."""

from __future__ import annotations

import errno
import io
import mmap
import os
import tarfile
import time
from pathlib import Path

import pytest
from writeharness import DEMO_VISIT, RAW, run, spool_records, write_args


def test_cp_stores_a_datafile_that_shows_at_once(mount, servers, tmp_path: Path) -> None:
    m = mount(servers.emu, *write_args(tmp_path / "spool"))
    ds = servers.dataset_id("1", "raw")
    src = tmp_path / "results.h5"
    data = os.urandom(5 << 20)
    src.write_bytes(data)
    run("ls", "-l", m.path / RAW)  # the listing is cached before the copy
    run("cp", src, m.path / RAW)
    did = servers.assert_stored(ds, "results.h5", data)
    st = os.stat(m.path / RAW / "results.h5")
    assert st.st_size == len(data) and st.st_mode & 0o777 == 0o444
    assert "results.h5" in os.listdir(m.path / RAW)
    got = run("getfattr", "-n", "user.ids.id", "--only-values", m.path / RAW / "results.h5")
    assert got.stdout == str(did)
    assert (m.path / RAW / "results.h5").read_bytes() == data
    assert spool_records(tmp_path / "spool") == []
    # cp onto it again is refused: datafiles are immutable without --replace
    done = run("cp", src, m.path / RAW / "results.h5", check=False)
    assert done.returncode != 0 and "Permission denied" in done.stderr
    assert len(servers.datafiles(ds, "results.h5")) == 1


def test_rsync_tar_and_mkdir(mount, servers, tmp_path: Path) -> None:
    m = mount(servers.emu, *write_args(tmp_path / "spool"))
    tree = tmp_path / "tree"
    files = {"a.txt": b"alpha\n", "sub/b.bin": os.urandom(300_000),
             "sub/deeper/c.dat": os.urandom(70_000), "empty": b""}
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
        os.utime(tree / rel, (1_600_000_000, 1_600_000_000))
    # mkdir in a visit makes a dataset; rsync into it
    run("mkdir", m.path / DEMO_VISIT / "synced")
    ds = servers.dataset_id("1", "synced")
    run("rsync", "-r", "-t", f"{tree}/", m.path / DEMO_VISIT / "synced")
    for rel, data in files.items():
        servers.assert_stored(ds, rel, data)
    assert servers.names(ds) == set(files)  # no rsync temporary names left
    assert os.stat(m.path / DEMO_VISIT / "synced" / "sub/b.bin").st_mtime == 1_600_000_000
    # tar -x into another new dataset
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(tree, arcname=".")
    (tmp_path / "t.tar").write_bytes(archive.getvalue())
    run("mkdir", m.path / DEMO_VISIT / "untarred")
    ds2 = servers.dataset_id("1", "untarred")
    run("tar", "-x", "-f", tmp_path / "t.tar", "-C", m.path / DEMO_VISIT / "untarred",
        "--no-same-owner")
    for rel, data in files.items():
        servers.assert_stored(ds2, rel, data)
    st = os.stat(m.path / DEMO_VISIT / "untarred" / "sub/deeper/c.dat")
    assert st.st_mtime == 1_600_000_000
    rows = servers.icat.search(
        f"SELECT df.datafileModTime FROM Datafile df WHERE df.dataset.id = {ds2} "
        f"AND df.name = 'sub/deeper/c.dat'")
    assert rows[0].startswith("2020-09-13T12:26:40.000")


def test_dd_and_python_random_writes(mount, servers, tmp_path: Path) -> None:
    m = mount(servers.emu, *write_args(tmp_path / "spool"))
    ds = servers.dataset_id("1", "raw")
    target = m.path / RAW / "dd.bin"
    run("dd", "if=/dev/urandom", f"of={target}", "bs=64k", "count=16", "status=none")
    stored = servers.datafiles(ds, "dd.bin")
    assert stored and stored[0][2] == 16 * 65536
    assert servers.content(stored[0][0]) == target.read_bytes()
    # Python: random writes, truncate, append and reading back, all before close
    path = m.path / RAW / "py.dat"
    with open(path, "w+b") as f:
        f.write(b"0123456789")
        f.seek(100)
        f.write(b"tail")
        f.seek(2)
        f.write(b"AB")
        f.flush()
        assert os.fstat(f.fileno()).st_size == 104
        assert os.stat(path).st_size == 104
        f.truncate(50)
        f.seek(0, os.SEEK_END)
        f.write(b"+end")
        f.flush()
        f.seek(0)
        assert f.read(4) == b"01AB"
        with open(path, "rb") as reader:  # a second open sees the same bytes
            assert reader.read()[:10] == b"01AB456789"
    expected = b"01AB456789" + b"\0" * 40 + b"+end"
    servers.assert_stored(ds, "py.dat", expected)
    assert path.read_bytes() == expected
    # a program writing its output through a shell redirection: one upload, no dup garbage
    puts = servers.emu.requests_to("ids/put")
    out = m.path / RAW / "shell.out"
    run("sh", "-c", f"exec 3> '{out}'; echo hello >&3; ls / >&3; exec 3>&-")
    data = out.read_bytes()
    assert data.startswith(b"hello\n") and b"tmp\n" in data
    servers.assert_stored(ds, "shell.out", data)
    # (the shell's restore of its stdout after the builtin echo is a close of a descriptor
    # that wrote: stored then, and again, replacing it, after ls; never two datafiles)
    assert not [n for n in servers.names(ds) if n.startswith(".idsfs-")]
    assert servers.emu.requests_to("ids/put") >= puts + 1
    # appending to a stored datafile is refused without --replace
    done = run("sh", "-c", f"echo more >> '{out}'", check=False)
    assert done.returncode != 0 and "Permission denied" in done.stderr


def test_rm_mv_rmdir_against_icat_and_ids(mount, servers, tmp_path: Path) -> None:
    m = mount(servers.emu, *write_args(tmp_path / "spool"))
    raw = m.path / RAW
    ds = servers.dataset_id("1", "raw")
    (raw / "one.txt").write_bytes(b"one")
    (did,) = [r[0] for r in servers.datafiles(ds, "one.txt")]
    run("mv", raw / "one.txt", raw / "two.txt")
    assert servers.datafiles(ds, "one.txt") == []
    assert [r[0] for r in servers.datafiles(ds, "two.txt")] == [did]
    run("mkdir", raw / "folder")
    run("mv", raw / "two.txt", raw / "folder/")
    assert [r[0] for r in servers.datafiles(ds, "folder/two.txt")] == [did]
    assert os.listdir(raw / "folder") == ["two.txt"]
    # a move to another dataset copies and deletes (EXDEV)
    run("mv", raw / "folder/two.txt", m.path / DEMO_VISIT / "processed data/")
    other = servers.dataset_id("1", "processed data")
    servers.assert_stored(other, "two.txt", b"one")
    assert servers.datafiles(ds, "folder/two.txt") == []
    assert os.listdir(raw / "folder") == []  # still there, empty, until rmdir
    run("rmdir", raw / "folder")
    assert not (raw / "folder").exists()
    # rm deletes through IDS
    deletes = servers.emu.requests_to("ids/delete")
    run("rm", m.path / DEMO_VISIT / "processed data" / "two.txt")
    assert servers.emu.requests_to("ids/delete") == deletes + 1
    assert servers.datafiles(other, "two.txt") == []
    # rmdir: empty datasets only
    run("mkdir", m.path / DEMO_VISIT / "scratch")
    scratch = servers.dataset_id("1", "scratch")
    (m.path / DEMO_VISIT / "scratch" / "x").write_bytes(b"x")
    done = run("rmdir", m.path / DEMO_VISIT / "scratch", check=False)
    assert done.returncode != 0 and "not empty" in done.stderr
    run("rm", "-r", m.path / DEMO_VISIT / "scratch")
    assert not (m.path / DEMO_VISIT / "scratch").exists()
    assert servers.icat.search(f"SELECT ds.id FROM Dataset ds WHERE ds.id = {scratch}") == []
    # what cannot be done says so
    done = run("mkdir", m.path / "DEMO" / "NEW-INVESTIGATION", check=False)
    assert "Operation not permitted" in done.stderr
    done = run("ln", "-s", "x", raw / "link", check=False)
    assert "Operation not permitted" in done.stderr


def test_replace_option(mount, servers, tmp_path: Path) -> None:
    m = mount(servers.emu, *write_args(tmp_path / "spool", "--replace"))
    ds = servers.dataset_id("1", "raw")
    target = m.path / RAW / "tiny.txt"
    (old,) = servers.datafiles(ds, "tiny.txt")
    target.write_bytes(b"replaced content\n")
    (new,) = servers.datafiles(ds, "tiny.txt")
    assert new[0] != old[0]
    servers.assert_stored(ds, "tiny.txt", b"replaced content\n")
    assert servers.icat.search(f"SELECT df.id FROM Datafile df WHERE df.id = {old[0]}") == []
    with open(target, "ab") as f:
        f.write(b"appended\n")
    servers.assert_stored(ds, "tiny.txt", b"replaced content\nappended\n")
    assert target.read_bytes() == b"replaced content\nappended\n"
    assert not [n for n in servers.names(ds) if n.startswith(".idsfs-")]


@pytest.mark.parametrize("cached", [False, True], ids=["direct", "cached-writes"])
def test_writes_bypass_the_page_cache_unless_cached_writes(mount, servers, tmp_path: Path,
                                                            cached: bool) -> None:
    """Files being written are direct I/O: a shared mapping of one is refused (ENODEV),
    a private one works; with --cached-writes a program may write through a shared map."""
    args = ("--cached-writes",) if cached else ()
    m = mount(servers.emu, *write_args(tmp_path / "spool"), *args)
    ds = servers.dataset_id("1", "raw")
    path = m.path / RAW / "mapped.bin"
    data = os.urandom(3 * mmap.PAGESIZE + 100)
    with open(path, "w+b") as f:
        f.truncate(len(data))
        if cached:
            with mmap.mmap(f.fileno(), len(data)) as shared:
                shared[:] = data
                shared.flush()
        else:
            with pytest.raises(OSError) as exc:
                mmap.mmap(f.fileno(), len(data))
            assert exc.value.errno == errno.ENODEV
            f.write(data)
            f.flush()
            with mmap.mmap(f.fileno(), len(data), flags=mmap.MAP_PRIVATE) as private:
                assert private[:] == data
    servers.assert_stored(ds, "mapped.bin", data)
    assert path.read_bytes() == data
    # the datafile it became is read through the page cache: shared maps work
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert mapped[:] == data


@pytest.mark.parametrize("how", ["-o ro", "server"])
def test_read_only_mounts_refuse_every_change(mount, emulator_process, tmp_path: Path,
                                              how: str) -> None:
    emu = emulator_process(read_only=how == "server")
    args = ("-o", "ro") if how == "-o ro" else ()
    m = mount(emu, *write_args(tmp_path / "spool"), *args)
    raw = m.path / RAW
    for argv in (["cp", "/etc/hostname", raw / "new"], ["touch", raw / "new"],
                 ["mkdir", raw / "d"], ["mkdir", m.path / DEMO_VISIT / "ds"],
                 ["rm", "-f", raw / "tiny.txt"], ["rmdir", m.path / DEMO_VISIT / "empty"],
                 ["mv", raw / "tiny.txt", raw / "x"], ["truncate", "-s", "0", raw / "tiny.txt"],
                 ["setfattr", "-n", "user.x", "-v", "1", raw / "tiny.txt"]):
        done = run(*argv, check=False)
        assert done.returncode != 0 and "Read-only file system" in done.stderr, (argv, done)
    with pytest.raises(OSError) as exc:
        open(raw / "tiny.txt", "ab")  # noqa: SIM115
    assert exc.value.errno == errno.EROFS
    assert not (tmp_path / "spool").exists()
    assert emu.requests_to("ids/put") == 0 and emu.requests_to("ids/delete") == 0


def test_names_that_cannot_be_stored(mount, servers, tmp_path: Path) -> None:
    m = mount(servers.emu, *write_args(tmp_path / "spool"))
    raw = m.path / RAW
    for name, message in (("bad%FE1", "Invalid argument"), ("a%2Eb", "Invalid argument")):
        done = run("touch", raw / name, check=False)
        assert done.returncode != 0 and message in done.stderr, done.stderr
    run("mkdir", "-p", raw / ("d" * 200))
    done = run("touch", raw / ("d" * 200) / ("f" * 60), check=False)
    assert "File name too long" in done.stderr
    time.sleep(0.1)  # nothing is uploaded in the background either
    assert servers.emu.requests_to("ids/put") == 0

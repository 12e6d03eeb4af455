"""The tree through a real mount: ls -lR, stat, find, getfattr, odd names, permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import zlib
from pathlib import Path

import pytest
from mountharness import USERS, demo_files

from idsfs.emulator import demo
from idsfs.icat import ICATClient
from idsfs.model import parse_date

pytestmark = pytest.mark.mount

DEMO_VISIT = Path("DEMO/DEMO-2024-001/1")


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120,
                          check=check)


def root_client(emu) -> ICATClient:
    client = ICATClient(emu.icat_url)
    client.login("simple", {"username": "root", "password": USERS["root"]})
    return client


def test_ls_lR_shows_every_file_with_its_size(mount, emulator_process) -> None:
    emu = emulator_process()
    m = mount(emu)
    emu.reset_counters()
    listing = run("ls", "-lR", "--time-style=+%s", m.path).stdout
    counters = emu.counters()
    ids_calls = sum(c["requests"] for name, c in counters.items() if name.startswith("ids/"))
    icat_searches = counters.get("icat/entityManager", {}).get("requests", 0)
    assert ids_calls == 0
    directories = listing.count(":\n")
    assert directories == 23
    assert icat_searches <= directories + 2
    sizes = parse_ls_lR(listing, m.path)
    assert sizes == {rel: spec.size for rel, spec in demo_files(emu).items()}


def parse_ls_lR(text: str, top: Path) -> dict[Path, int]:
    """Regular files of ``ls -lR --time-style=+%s`` output -> size."""
    out: dict[Path, int] = {}
    current = Path()
    for line in text.splitlines():
        if line.endswith(":") and line.startswith(str(top)):
            current = Path(line[:-1]).relative_to(top)
        elif line.startswith("-"):
            fields = line.split(None, 6)
            out[current / fields[6]] = int(fields[4])
    return out


def test_find_and_stat(mount, emulator_process) -> None:
    emu = emulator_process()
    m = mount(emu, "-o", "ro")  # read-write is the default since issue 5
    files = demo_files(emu)
    found = run("find", m.path, "-type", "f").stdout.splitlines()
    assert {Path(f).relative_to(m.path) for f in found} == set(files)
    dirs = run("find", m.path, "-type", "d").stdout.splitlines()
    assert len(dirs) == 23
    # os.walk sees the same (it relies on d_type and stat)
    walked = {Path(d, f).relative_to(m.path) for d, _, fs in os.walk(m.path) for f in fs}
    assert walked == set(files)
    icat = root_client(emu)
    try:
        for rel in (DEMO_VISIT / "raw/tiny.txt", DEMO_VISIT / "processed data/sub/dir/result.csv",
                    DEMO_VISIT / "raw/empty.dat"):
            st = os.stat(m.path / rel)
            (row,) = icat.search(
                "SELECT df.fileSize, df.datafileModTime, df.modTime FROM Datafile df "
                f"WHERE df.name = {naming_quote(files[rel].name)}")
            assert st.st_size == row[0]
            assert st.st_mtime == pytest.approx(parse_date(row[1]).timestamp(), abs=1e-3)
            assert st.st_ctime == pytest.approx(parse_date(row[2]).timestamp(), abs=1e-3)
            assert st.st_atime == st.st_mtime
            assert stat.S_IMODE(st.st_mode) == 0o444 and stat.S_ISREG(st.st_mode)
            assert st.st_nlink == 1
            assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
            assert st.st_blocks == (st.st_size + 511) // 512
    finally:
        icat.close()
    # directories: 0555, nlink = 2 + subdirectories (as stat(1) prints it)
    out = run("stat", "-c", "%h %a %F", m.path, m.path / DEMO_VISIT,
              m.path / DEMO_VISIT / "processed data", m.path / DEMO_VISIT / "raw").stdout
    assert out.splitlines() == ["3 555 directory", "8 555 directory", "3 555 directory",
                                "2 555 directory"]
    # ls -a lists . and ..
    assert run("ls", "-a", m.path / DEMO_VISIT / "empty").stdout.split() == [".", ".."]


def naming_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def test_odd_names(mount) -> None:
    m = mount()
    visit = m.path / DEMO_VISIT
    assert sorted(os.listdir(visit)) == sorted([
        "raw", "processed data", "calib%2Frun 42", "O'Brien's samples", "Ünïcödé δεδομένα",
        "empty"])
    assert (visit / "calib%2Frun 42" / "a" / "b.dat").stat().st_size == 1234
    assert os.listdir(m.path / "DEMO/DEMO-2024-002") == ["N%2FA"]
    names = os.listdir(visit / "Ünïcödé δεδομένα")
    assert demo.LONG_NAME in names
    (short,) = [n for n in names if "%FF" in n]
    assert len(os.fsencode(short)) <= 255
    assert (visit / "Ünïcödé δεδομένα" / short).stat().st_size == 4096
    assert (visit / "O'Brien's samples" / "Müller & Søn.txt").stat().st_size == 200
    assert not (visit / "raw" / "no such file").exists()


def test_getfattr(mount) -> None:
    m = mount()
    tiny = m.path / DEMO_VISIT / "raw/tiny.txt"
    out = run("getfattr", "-d", "--absolute-names", tiny).stdout
    for name in ("user.ids.id", "user.ids.checksum", "user.ids.location", "user.ids.name",
                 "user.ids.status", "user.ids.dataset.id"):
        assert name + "=" in out, out
    assert 'user.ids.name="tiny.txt"' in out
    assert 'user.ids.status="ONLINE"' in out
    checksum = os.getxattr(tiny, "user.ids.checksum").decode()
    content = tiny.read_bytes()  # through the mount
    assert content
    assert checksum == f"{zlib.crc32(content):x}"  # as IDS put stores it: "%x", no padding
    dataset = run("getfattr", "-d", "--absolute-names", m.path / DEMO_VISIT / "raw").stdout
    assert 'user.ids.name="raw"' in dataset and "user.ids.investigation.id=" in dataset
    odd = os.getxattr(m.path / "DEMO/DEMO-2024-002/N%2FA", "user.ids.visitId")
    assert odd == b"N/A"
    with pytest.raises(OSError) as info:
        os.getxattr(tiny, "user.nothing")
    assert info.value.errno == 61  # ENODATA


def test_statfs(mount) -> None:
    m = mount(None, "-o", "ro")  # read-write is the default since issue 5
    run("ls", "-lR", m.path)
    st = os.statvfs(m.path)
    assert st.f_namemax == 255
    assert st.f_bfree == 0 and st.f_bavail == 0
    assert st.f_blocks * st.f_frsize >= sum(s.size for s in demo_files(m.emulator).values())
    assert st.f_files >= 43 + 23
    fields = run("df", "-P", m.path).stdout.splitlines()[1].split()
    assert fields[3] == "0" and fields[2] == fields[1]  # nothing available, all used


def test_read_only(mount) -> None:
    m = mount(None, "-o", "ro")  # read-write is the default since issue 5
    raw = m.path / DEMO_VISIT / "raw"
    for argv in (["touch", raw / "new"], ["mkdir", raw / "d"], ["rm", "-f", raw / "tiny.txt"],
                 ["mv", raw / "tiny.txt", raw / "x"], ["setfattr", "-n", "user.x", "-v", "1",
                                                       raw / "tiny.txt"]):
        done = run(*argv, check=False)
        assert done.returncode != 0
        assert "Read-only file system" in done.stderr, done.stderr


def test_users_see_only_their_investigations(mount, emulator_process) -> None:
    emu = emulator_process()
    icat = root_client(emu)
    try:
        (fac,) = icat.search("SELECT f.id FROM Facility f WHERE f.name = 'DEMO'")
        (itype,) = icat.search("SELECT t.id FROM InvestigationType t WHERE t.name = 'experiment'")
        (alice,) = icat.search("SELECT u.id FROM User u WHERE u.name = 'simple/alice'")
        inv = icat.create({"Investigation": {"name": "PRIVATE", "visitId": "1", "title": "p",
                                             "facility": {"id": fac}, "type": {"id": itype}}})
        icat.create({"InvestigationUser": {"role": "PI", "user": {"id": alice},
                                           "investigation": {"id": inv}}})
    finally:
        icat.close()
    as_alice = mount(emu, user="alice")
    as_bob = mount(emu, user="bob")
    assert "PRIVATE" in os.listdir(as_alice.path / "DEMO")
    assert "PRIVATE" not in os.listdir(as_bob.path / "DEMO")
    assert not (as_bob.path / "DEMO/PRIVATE").exists()
    assert (as_alice.path / "DEMO/PRIVATE/1").is_dir()

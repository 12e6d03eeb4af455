"""fstab and mount(8): ``idsfs#SECTION ... fuse`` and ``SECTION ... fuse.idsfs`` lines.

Each test writes a temporary fstab and runs util-linux's ``mount --fstab FILE``
in the harness's private mount namespace, with the idsfs commands put on
mount(8)'s search path for this namespace only (:func:`installed_commands`):
``mount.fuse.idsfs`` (our helper) and ``idsfs``, which Debian's
``mount.fuse3`` runs for ``idsfs#SECTION`` lines and for ``fuse.idsfs`` lines
when our helper is not installed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from mountharness import (
    INSTALLED_COMMANDS,
    USERS,
    idsfs_command,
    installed_commands,
    is_mounted,
    wait_until,
)

from idsfs.daemon import find_mount
from idsfs.mountcli import query_status


def run(*argv: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("IDSFS_", "ICAT_")) and k != "NOTIFY_SOCKET"}
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL, env=env)


@pytest.fixture
def site(tmp_path: Path, demo_emulator, mount):
    """An icat.cfg with section [facility] for the demo emulator, and a place for fstabs."""

    class Site:
        cfg = tmp_path / "icat.cfg"
        emulator = demo_emulator

        def __init__(self) -> None:
            self.write_section()

        def write_section(self, extra: str = "") -> None:
            self.cfg.write_text(
                f"[facility]\nurl = {demo_emulator.icat_url}\nidsurl = {demo_emulator.ids_url}\n"
                f"auth = simple\nusername = alice\npassword = {USERS['alice']}\n{extra}")
            self.cfg.chmod(0o600)

        def dir(self, name: str) -> Path:
            path = tmp_path / name
            path.mkdir(exist_ok=True)
            return path

        def fstab(self, *lines: str) -> Path:
            path = tmp_path / "fstab"
            path.write_text("# test fstab\n" + "\n".join(lines) + "\n")
            return path

        def adopt(self, path: Path):
            return mount(demo_emulator, adopt=path)

    return Site()


def test_idsfs_hash_section_line_with_mount_a(site) -> None:
    where = site.dir("ids")
    fstab = site.fstab(f"idsfs#facility {where} fuse _netdev,ro,nodev,nosuid,"
                       f"config_file={site.cfg} 0 0")
    with installed_commands(site.dir("sbin")):
        done = run("mount", "--fstab", str(fstab), "-a")
        assert done.returncode == 0, done.stderr
        daemon = site.adopt(where)
        entry = find_mount(where)
        assert entry is not None and entry.fstype == "fuse.idsfs"
        assert entry.source == "idsfs#facility"
        assert "ro" in entry.options.split(",")
        assert "DEMO" in os.listdir(where)
        pid = query_status(where)["pid"]
        # mount -a again: already mounted, nothing happens
        again = run("mount", "--fstab", str(fstab), "-a")
        assert again.returncode == 0, again.stderr
        assert query_status(where)["pid"] == pid
        # umount(8) unmounts it; the daemon notices and exits
        done = run("umount", str(where))
        assert done.returncode == 0, done.stderr
        assert not is_mounted(where)
        assert wait_until(lambda: not daemon.alive(), 20)


def test_fuse_idsfs_line_through_our_helper(site) -> None:
    where = site.dir("ids")
    fstab = site.fstab(f"facility {where} fuse.idsfs _netdev,noauto,allow_other,cache_size=24M,"
                       f"config_file={site.cfg},x-systemd.automount 0 0")
    with installed_commands(site.dir("sbin")):
        done = run("mount", "-v", "--fstab", str(fstab), str(where))
        assert done.returncode == 0, done.stderr
        assert "mount.fuse.idsfs: mounting facility (section [facility])" in done.stderr
        site.adopt(where)
        entry = find_mount(where)
        assert entry is not None and entry.source == "facility"
        assert "allow_other" in entry.options
        status = query_status(where)
        assert status["cache"]["capacity"] == 24 << 20
        assert status["config"]["section"] == "facility"
        # no ro in fstab: mount(8) passes rw, as for any file system
        assert status["read_only"] is False
        done = run(*idsfs_command(), "umount", str(where))
        assert done.returncode == 0, done.stderr


def test_fuse_idsfs_line_through_mount_fuse3(site) -> None:
    where = site.dir("ids")
    fstab = site.fstab(f"facility {where} fuse.idsfs _netdev,ro,config_file={site.cfg} 0 0")
    with installed_commands(site.dir("sbin"), names=("idsfs",)):
        assert not Path("/sbin/mount.fuse.idsfs").exists()
        done = run("mount", "--fstab", str(fstab), str(where))
        assert done.returncode == 0, done.stderr
        site.adopt(where)
        assert "DEMO" in os.listdir(where)
        assert query_status(where)["read_only"] is True
        # mount.fuse3 runs "idsfs facility DIR" for this line as for an
        # "idsfs#facility ... fuse" one: the source is the line's, as written,
        # so that mount -a sees the entry mounted and leaves it alone
        assert find_mount(where).source == "facility"
        pid = query_status(where)["pid"]
        again = run("mount", "--fstab", str(fstab), "-a")
        assert again.returncode == 0, again.stderr
        assert query_status(where)["pid"] == pid


def test_config_section_read_only_beats_mounts_rw(site) -> None:
    site.write_section("read_only = yes\n")
    where = site.dir("ids")
    fstab = site.fstab(f"facility {where} fuse.idsfs rw,config_file={site.cfg} 0 0")
    with installed_commands(site.dir("sbin")):
        done = run("mount", "--fstab", str(fstab), str(where))
        assert done.returncode == 0, done.stderr
        site.adopt(where)
        assert query_status(where)["read_only"] is True


def test_icat_url_as_the_source(site, tmp_path: Path) -> None:
    where = site.dir("ids")
    pw = tmp_path / "pw"
    pw.write_text(USERS["bob"] + "\n")
    pw.chmod(0o600)
    url = site.emulator.icat_url
    fstab = site.fstab(f"{url} {where} fuse.idsfs ro,user=bob,password_file={pw},"
                       f"ids={site.emulator.ids_url} 0 0")
    with installed_commands(site.dir("sbin")):
        done = run("mount", "--fstab", str(fstab), str(where))
        assert done.returncode == 0, done.stderr
        site.adopt(where)
        assert query_status(where)["session"]["user"] == "simple/bob"
        assert find_mount(where).source == url


def test_a_failing_fstab_mount_says_why(site) -> None:
    where = site.dir("ids")
    fstab = site.fstab(f"idsfs#nosuchsection {where} fuse ro,config_file={site.cfg} 0 0")
    with installed_commands(site.dir("sbin")):
        done = run("mount", "--fstab", str(fstab), "-a")
    assert done.returncode != 0
    assert "no section [nosuchsection]" in done.stderr
    assert not is_mounted(where)


# ----------------------------------------------------------------------------- the helper itself


def helper(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return run(str(Path(sys.executable).parent / "mount.idsfs"), *args)


def test_helper_fake_verbose_sloppy(site) -> None:
    where = site.dir("ids")
    opts = f"config_file={site.cfg},ro"
    done = helper("facility", str(where), "-fv", "-o", opts)
    assert done.returncode == 0, done.stderr
    assert "mounting facility (section [facility])" in done.stderr
    assert not is_mounted(where)  # -f: everything checked, nothing mounted

    done = helper("facility", str(where), "-o", opts + ",frobnicate")
    assert done.returncode == 1 and "-o frobnicate: unknown mount option" in done.stderr

    done = helper("facility", str(where), "-s", "-o", opts + ",frobnicate=3", "-n")
    assert done.returncode == 0, done.stderr
    assert "ignoring unknown options (-s): frobnicate" in done.stderr
    site.adopt(where)
    assert query_status(where)["read_only"] is True


def test_helper_usage_errors(site) -> None:
    where = site.dir("ids")
    assert helper("facility").returncode == 1
    done = helper("facility", str(where), "-t", "nfs")
    assert done.returncode == 1 and "only fuse.idsfs" in done.stderr
    done = helper("facility", str(where), "-x")
    assert done.returncode == 1 and "unknown option -x" in done.stderr
    done = helper("facility", str(where / "missing"), "-o", f"config_file={site.cfg}")
    assert done.returncode == 32 and "does not exist" in done.stderr
    done = helper("--help")
    assert done.returncode == 0 and "idsfs#SECTION" in done.stdout


def test_installed_commands_are_the_entry_points() -> None:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[2] / "setup.cfg")
    scripts = cfg["options.entry_points"]["console_scripts"]
    for name in INSTALLED_COMMANDS:
        assert f"{name} = idsfs.cli:" in scripts

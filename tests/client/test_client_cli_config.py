"""``idsfs get`` / ``idsfs put`` configured from python-icat's icat.cfg and credential sources.

The same configuration and credential code as ``idsfs mount`` (idsfs.config):
a ``--configSection`` of an icat.cfg found on python-icat's search path (here
``$HOME/.icat/icat.cfg`` and ``./icat.cfg`` of a temporary HOME and working
directory), ``--configfile``, the systemd credential directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from idsfs.ids import DataSelection

ALICE_PASSWORD = "alice-secret"  # tests/conftest.py USERS


def idsfs(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("IDSFS_", "ICAT_")) and k != "CREDENTIALS_DIRECTORY"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "idsfs.cli", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=120, check=False)


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_get_with_a_python_icat_section(world, tmp_path: Path) -> None:
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    icat_url = world.emu.ids_url.rsplit("/ids", 1)[0]
    write(home / ".icat" / "icat.cfg",
          f"[facility]\nurl = {icat_url}/ICATService/ICAT?wsdl\nidsurl = {world.emu.ids_url}\n"
          f"auth = simple\nusername = alice\npassword = {ALICE_PASSWORD}\n")
    r = idsfs("get", "--configSection", "facility", "--datafile", str(world.df[1]), "-o",
              "out.bin", env={"HOME": str(home)}, cwd=work)
    assert r.returncode == 0, r.stderr
    assert (work / "out.bin").read_bytes() == world.content(1)
    assert ALICE_PASSWORD not in r.stderr + r.stdout

    # ./icat.cfg comes later in the search path and wins key by key
    write(work / "icat.cfg", "[facility]\nusername = nobody\npassword = wrong\n")
    r = idsfs("get", "--configSection", "facility", "--datafile", str(world.df[1]), "-o",
              "again.bin", env={"HOME": str(home)}, cwd=work)
    assert r.returncode == 1 and "ICATSessionError" in r.stderr
    assert "wrong" not in r.stderr

    # a readable file with a password is refused before anything is sent
    (work / "icat.cfg").chmod(0o644)
    r = idsfs("get", "--configSection", "facility", "--datafile", str(world.df[1]),
              env={"HOME": str(home)}, cwd=work)
    assert r.returncode == 2 and "holds a password but group and others may read it" in r.stderr


def test_put_with_configfile_and_systemd_credential(world, tmp_path: Path) -> None:
    cfg = write(tmp_path / "ids.cfg", f"[s]\nidsurl = {world.emu.ids_url}\nusername = alice\n",
                0o644)
    creds = tmp_path / "creds"
    write(creds / "idsfs-password", ALICE_PASSWORD + "\n")
    src = write(tmp_path / "data.bin", "put through a config section\n" * 10, 0o644)
    env = {"CREDENTIALS_DIRECTORY": str(creds), "HOME": str(tmp_path)}
    r = idsfs("put", str(src), "--configfile", str(cfg), "--configSection", "s", "--dataset",
              str(world.ds3), "--format", str(world.fmt), "--no-progress", env=env,
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    new_id = int(r.stdout.strip())
    selection = DataSelection({"datafileIds": [new_id]})
    with world.ids.getData(selection) as stream:
        assert stream.read() == src.read_bytes()


def test_missing_section_is_a_usage_error(world, tmp_path: Path) -> None:
    r = idsfs("get", "--configSection", "nope", "--datafile", "1", env={"HOME": str(tmp_path)},
              cwd=tmp_path)
    assert r.returncode == 2 and "no section [nope]" in r.stderr

"""systemd/*.service, *.mount, *.automount: ``systemd-analyze verify`` and what they must say.

``systemd-analyze verify`` checks that ExecStart's program exists; the units
name ``/usr/local/bin/idsfs`` (where ``pip install`` as root puts it), so the
copy verified here has that one path replaced by this environment's
``idsfs``. Nothing else is changed.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from idsfs import cli

UNITS = Path(__file__).parents[2] / "systemd"
INSTALLED = "/usr/local/bin/idsfs"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (Debian: systemd)")


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def verify(directory: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no",
                           *[str(directory / n) for n in names]],
                          capture_output=True, text=True, timeout=120, check=False,
                          cwd=directory)


@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for path in UNITS.iterdir():
        text = path.read_text()
        shutil.copy(path, tmp_path / path.name)
        (tmp_path / path.name).write_text(
            text.replace(INSTALLED, str(Path(sys.executable).parent / "idsfs")))
    done = verify(tmp_path, "idsfs@facility.service", "mnt-ids.mount", "mnt-ids.automount")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == ""


@needs_analyze
def test_verify_is_not_a_rubber_stamp(tmp_path: Path) -> None:
    bad = (UNITS / "mnt-ids.mount").read_text().replace("Where=/mnt/ids", "Where=/mnt/other")
    (tmp_path / "mnt-ids.mount").write_text(bad)
    done = verify(tmp_path, "mnt-ids.mount")
    assert done.returncode != 0 and "Where=" in done.stdout + done.stderr
    service = (UNITS / "idsfs@.service").read_text()
    (tmp_path / "idsfs@.service").write_text(service)  # /usr/local/bin/idsfs is not here
    if not Path(INSTALLED).exists():
        done = verify(tmp_path, "idsfs@x.service")
        assert done.returncode != 0 and INSTALLED in done.stdout + done.stderr


def test_service_says_what_it_must() -> None:
    svc = unit("idsfs@.service")["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    argv = svc["ExecStart"].split()
    assert argv[0] == INSTALLED and argv[1] == "mount"
    # the instance name as written (%i): %I would unescape idsfs@my-facility to my/facility
    assert "--foreground" in argv and argv[argv.index("--configSection") + 1] == "%i"
    args = cli.build_parser().parse_args(argv[1:])  # the options exist
    assert args.config_section == "%i" and args.foreground is True
    assert args.mountpoint is None  # it comes from the section's mountpoint key
    assert svc["Restart"] == "on-failure"
    assert svc["LoadCredential"] == "idsfs-password:idsfs-%i"  # the same spelling as above
    assert "%I" not in unit("idsfs@.service")["Unit"]["Description"]
    assert svc["DeviceAllow"] == "/dev/fuse rw"
    assert svc["RuntimeDirectory"] == "idsfs" and svc["RuntimeDirectoryPreserve"] == "yes"
    assert svc["KillMode"] == "mixed"
    # nothing that gives the service its own mount namespace (it would hide the mount)
    for option in ("PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices",
                   "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                   "ProtectKernelLogs", "ProtectProc", "ReadOnlyPaths", "InaccessiblePaths",
                   "ReadWritePaths", "TemporaryFileSystem", "BindPaths", "PrivateMounts",
                   "MountFlags", "PrivateUsers", "DynamicUser"):
        assert option not in svc, option


def test_mount_units_say_what_they_must() -> None:
    mount = unit("mnt-ids.mount")["Mount"]
    assert mount["Type"] == "fuse.idsfs" and mount["What"] == "facility"
    assert "_netdev" in mount["Options"].split(",")
    automount = unit("mnt-ids.automount")["Automount"]
    assert automount["Where"] == mount["Where"]
    if shutil.which("systemd-escape"):
        name = subprocess.run(["systemd-escape", "--path", mount["Where"]], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert name == "mnt-ids"

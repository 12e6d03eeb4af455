"""idsfs.config: python-icat config files, credential sources, get/put settings, the reference.

Every test writes its own icat.cfg files into a temporary directory and passes
them as ``search_path`` (or ``--configfile``), so the machine's own files never
take part.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from configkit import mount_config

from idsfs.config import (
    BEGIN_MARKER,
    END_MARKER,
    ConfigError,
    assemble_client,
    default_config_files,
    env_layer,
    read_config_files,
    render_markdown,
)

PASSWORD = "cfg-pa55-w0rd-that-must-not-leak"
SESSION = "cfg-5e55-10n-that-must-not-leak"
ROOT = Path(__file__).parents[2]


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


config = mount_config


FACILITY = f"""
[facility]
url = https://icat.example.org:8181/ICATService/ICAT?wsdl
idsurl = https://ids.example.org:8181/ids
auth = ldap
username = jdoe
password = {PASSWORD}
checkCert = No
promptPass = no
cred_otp = 123456
my_script_setting = whatever
"""


# ------------------------------------------------------------------ python-icat sections


def test_python_icat_section(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", FACILITY)
    cfg = config(["--configSection", "facility", str(tmp_path / "m")], search_path=[cfg_file])
    assert cfg.icat_url == "https://icat.example.org:8181"
    assert cfg.ids_url == "https://ids.example.org:8181/ids"
    assert cfg.auth == "ldap" and cfg.user == "jdoe"
    assert cfg.password is not None and cfg.password.reveal() == PASSWORD
    assert cfg.insecure is True
    assert cfg.config_section == "facility" and cfg.config_files == (cfg_file,)
    assert cfg.notes == ()  # other programs' keys are not worth a warning
    assert str(cfg_file) in repr(cfg.password) and "[facility]" in repr(cfg.password)
    for text in (repr(cfg), str(cfg.describe())):
        assert PASSWORD not in text


@pytest.mark.parametrize("flag", ["--configSection", "--configsection", "--config-section"])
def test_every_spelling_of_the_section_option(tmp_path: Path, flag: str) -> None:
    cfg_file = write(tmp_path / "icat.cfg", FACILITY)
    cfg = config([flag, "facility", str(tmp_path / "m")], search_path=[cfg_file])
    assert cfg.user == "jdoe"


@pytest.mark.parametrize(("url", "icat"), [
    ("https://h:8181", "https://h:8181"),
    ("https://h:8181/", "https://h:8181"),
    ("https://h:8181/ICATService/ICAT?wsdl", "https://h:8181"),
    ("https://h/prefix/ICATService/ICAT", "https://h/prefix"),
    ("https://h:8181/icat", "https://h:8181/icat"),
])
def test_python_icat_url_forms(tmp_path: Path, url: str, icat: str) -> None:
    cfg_file = write(tmp_path / "icat.cfg", f"[s]\nurl = {url}\nusername = u\n"
                                            f"password = p\n")
    cfg = config(["--configSection", "s", str(tmp_path / "m")], search_path=[cfg_file])
    assert cfg.icat_url == icat


def test_search_path_later_file_wins_key_by_key(tmp_path: Path) -> None:
    system = write(tmp_path / "etc" / "icat.cfg",
                   "[s]\nurl = https://old.example.org\nauth = db\nusername = u\n"
                   "[idsfs]\ncache_size = 1G\nmetadata_ttl = 5m\n", 0o644)
    user = write(tmp_path / "home" / ".config" / "icat" / "icat.cfg",
                 "[s]\nurl = https://new.example.org\npassword = pw\n"
                 "[idsfs]\ncache_size = 2G\n")
    cfg = config(["--configSection", "s", str(tmp_path / "m")],
                 search_path=[system, tmp_path / "missing.cfg", user])
    assert cfg.icat_url == "https://new.example.org"
    assert cfg.auth == "db" and cfg.user == "u"
    assert cfg.cache_size == 2 << 30 and cfg.metadata_ttl == 300
    assert cfg.config_files == (system, user)


def test_default_search_path_is_python_icats() -> None:
    assert default_config_files({"HOME": "/home/x"}) == [
        Path("/etc/icat/icat.cfg"), Path("/home/x/.config/icat/icat.cfg"),
        Path("/home/x/.icat/icat.cfg"), Path("icat.cfg")]


def test_explicit_config_file_is_the_only_one(tmp_path: Path) -> None:
    other = write(tmp_path / "other.cfg", "[s]\nurl = https://other\nusername = a\n"
                                          "password = b\n")
    chosen = write(tmp_path / "chosen.cfg", "[s]\nurl = https://chosen\nusername = a\n"
                                            "password = b\n")
    cfg = config(["--configfile", str(chosen), "--configSection", "s", str(tmp_path / "m")],
                 search_path=[other])
    assert cfg.icat_url == "https://chosen" and cfg.config_files == (chosen,)
    with pytest.raises(ConfigError, match=r"config file .*nothere.cfg does not exist"):
        config(["--configfile", str(tmp_path / "nothere.cfg"), "--icat", "http://h",
                "--session-file", str(chosen), str(tmp_path / "m")])
    # python-icat's environment variables name the file and the section
    cfg = config([str(tmp_path / "m")], environ={"ICAT_CFG": str(chosen),
                                                 "ICAT_CFG_SECTION": "s"})
    assert cfg.icat_url == "https://chosen" and cfg.config_section == "s"
    # -o works too (fstab)
    cfg = config(["-o", f"config_file={chosen},config_section=s", str(tmp_path / "m")])
    assert cfg.icat_url == "https://chosen"


def test_precedence_file_env_o_cli(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg",
                     "[idsfs]\ncache_size = 1G\nmetadata_ttl = 1m\nrestore_wait = 2m\n"
                     "readahead = 4M\n"
                     "[s]\nurl = https://file\nusername = u\npassword = p\ncache_size = 3G\n")
    env = {"IDSFS_ICAT_URL": "https://env"}
    cfg = config(["--configSection", "s", "-o", "metadata_ttl=2m,restore_wait=3m",
                  "--restore-wait", "4m", str(tmp_path / "m")], environ=env,
                 search_path=[cfg_file])
    assert cfg.cache_size == 3 << 30          # section beats [idsfs]
    assert cfg.readahead == 4 << 20           # [idsfs] beats the default
    assert cfg.icat_url == "https://env"      # environment beats the file
    assert cfg.metadata_ttl == 120            # -o beats the file
    assert cfg.restore_wait == 240            # long option beats -o


def test_idsfs_section_alone_applies_without_a_section(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", "[idsfs]\ncache_size = 1G\nallow_other = yes\n"
                                            "[DEFAULT]\nurl = https://default\n"
                                            "[s]\nusername = u\npassword = p\n")
    cfg = config(["--icat", "http://h", "--session-file", str(cfg_file), str(tmp_path / "m")],
                 search_path=[cfg_file])
    assert cfg.cache_size == 1 << 30 and cfg.allow_other is True
    assert cfg.icat_url == "http://h" and cfg.user is None  # [DEFAULT] and [s] not used
    cfg = config(["--configSection", "s", str(tmp_path / "m")], search_path=[cfg_file])
    assert cfg.icat_url == "https://default"  # [DEFAULT] is inherited by the section
    assert cfg.user == "u"


def test_own_key_wins_over_python_icat_key(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", "[s]\nicat = https://own\nurl = https://pyicat\n"
                                            "username = pyicat\nuser = own\npassword = p\n")
    cfg = config(["--configSection", "s", str(tmp_path / "m")], search_path=[cfg_file])
    assert cfg.icat_url == "https://own" and cfg.user == "own"


def test_mount_options_in_a_section(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg",
                     "[s]\nurl = https://h\nusername = u\npassword = p\n"
                     f"mountpoint = {tmp_path / 'archive'}\n"
                     "options = allow_other,noatime,nodev\nread_only = yes\n"
                     "debug =\n")
    cfg = config(["--configSection", "s"], search_path=[cfg_file])
    assert cfg.mountpoint == tmp_path / "archive"
    assert cfg.allow_other is True and cfg.fuse_options == {"noatime", "nodev"}
    assert cfg.read_only is True and cfg.debug is True
    # the command line still wins
    cfg = config(["--configSection", "s", "-o", "nosuid", str(tmp_path / "m")],
                 search_path=[cfg_file])
    assert cfg.mountpoint == tmp_path / "m"
    assert cfg.fuse_options == {"noatime", "nodev", "nosuid"}


def test_no_mountpoint_anywhere(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no mount point: give MOUNTPOINT"):
        config(["--icat", "http://h", "--user", "u"], environ={"IDSFS_PASSWORD": "x"})


def test_proxies(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg",
                     "[s]\nurl = https://h\nusername = u\npassword = p\n"
                     "https_proxy = http://proxy.example.org:3128\nno_proxy = .example.org\n")
    cfg = config(["--configSection", "s", str(tmp_path / "m")], search_path=[cfg_file])
    assert cfg.proxies == {"https": "http://proxy.example.org:3128",
                           "no_proxy": ".example.org"}
    cfg = config(["--icat", "http://h", "--session-file", str(cfg_file), str(tmp_path / "m")])
    assert cfg.proxies is None
    with pytest.raises(ConfigError, match="--http-proxy: proxy URLs must not carry user"):
        config(["--icat", "http://h", "--session-file", str(cfg_file), "--http-proxy",
                "http://u:pw@proxy:3128", str(tmp_path / "m")])


# ------------------------------------------------------------------ refusals and errors


@pytest.mark.parametrize(("mode", "who"), [(0o644, "group and others"), (0o604, "others"),
                                           (0o640, "its group")])
def test_readable_file_with_password_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    cfg_file = write(tmp_path / "icat.cfg", FACILITY, mode)
    with pytest.raises(ConfigError) as info:
        config(["--configSection", "facility", str(tmp_path / "m")], search_path=[cfg_file])
    message = str(info.value)
    assert f"holds a password but {who} may read it" in message
    assert f"chmod 600 {cfg_file}" in message and PASSWORD not in message
    # refused even when another section is used: the file is what leaks
    with pytest.raises(ConfigError, match="holds a password"):
        config(["--icat", "http://h", "--session-file", str(cfg_file), str(tmp_path / "m")],
               search_path=[cfg_file])


def test_readable_file_without_password_is_fine(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", "[s]\nurl = https://h\nusername = u\n", 0o644)
    cfg = config(["--configSection", "s", str(tmp_path / "m")], search_path=[cfg_file],
                 environ={"IDSFS_PASSWORD": "from-env"})
    assert cfg.password is not None and cfg.password.reveal() == "from-env"


def test_world_writable_file_is_refused(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", "[idsfs]\ncache_size = 1G\n", 0o666)
    with pytest.raises(ConfigError, match="may be changed by anyone"):
        read_config_files([cfg_file])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away")
def test_file_of_another_user_is_refused(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", "[idsfs]\ncache_size = 1G\n", 0o644)
    os.chown(cfg_file, 4242, 4242)
    with pytest.raises(ConfigError, match="belongs to uid 4242, not to you"):
        read_config_files([cfg_file])
    assert read_config_files([cfg_file], uid=4242).read == (cfg_file,)


def test_file_of_another_user_is_refused_by_uid(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", "[idsfs]\ncache_size = 1G\n", 0o644)
    owner = cfg_file.stat().st_uid
    if owner == 0:
        pytest.skip("files of root are always trusted")
    with pytest.raises(ConfigError, match=f"belongs to uid {owner}"):
        read_config_files([cfg_file], uid=owner + 1)


def test_missing_section(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", "[other]\nurl = https://h\n")
    with pytest.raises(ConfigError, match=r"--configSection: no section \[nope\] in .*icat.cfg"):
        config(["--configSection", "nope", str(tmp_path / "m")], search_path=[cfg_file])
    with pytest.raises(ConfigError, match=r"no section \[nope\] \(no config file was found\)"):
        config(["--configSection", "nope", str(tmp_path / "m")],
               search_path=[tmp_path / "absent.cfg"])


def test_malformed_file(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", "url = no section header\n")
    with pytest.raises(ConfigError, match=r"config file .*icat.cfg: File contains no section"):
        read_config_files([cfg_file])
    dup = write(tmp_path / "dup.cfg", "[s]\nurl = a\nURL = b\n")
    with pytest.raises(ConfigError, match=r"dup\.cfg"):
        read_config_files([dup])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_file_in_search_path_is_reported(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", "[s]\nurl = https://h\n", 0o000)
    files = read_config_files([cfg_file])
    assert files.read == () and "Permission denied" in files.skipped[0]
    with pytest.raises(ConfigError, match=r"unreadable: .*Permission denied"):
        config(["--configSection", "s", str(tmp_path / "m")], search_path=[cfg_file])


@pytest.mark.parametrize(("text", "message"), [
    ("[s]\n[idsfs]\ncache_sise = 1G\n", r"\[idsfs\] cache_sise: unknown option \(did you mean "
                                   r"cache_size\?\)"),
    ("[s]\n[idsfs]\nfrobnicate = 1\n", r"\[idsfs\] frobnicate: unknown option; see"),
    ("[s]\n[idsfs]\ncache_size = lots\n", r"\[idsfs\] cache_size: not a size: 'lots'"),
    ("[s]\ncheckCert = perhaps\n", r"\[s\] checkcert: not a yes/no value"),
    ("[s]\nconfig_file = /x\n", r"\[s\] config_file: cannot be set in a config file"),
    ("[s]\nconfig_section = t\n", r"\[s\] config_section: cannot be set in a config file"),
    ("[s]\noptions = max_read=4096\n", r"\[s\] options: -o max_read: not supported"),
    ("[s]\npassword =\n", r"\[s\] password: the password is empty"),
])
def test_bad_keys_are_named(tmp_path: Path, text: str, message: str) -> None:
    cfg_file = write(tmp_path / "icat.cfg", text)
    with pytest.raises(ConfigError, match=message):
        config(["--configSection", "s", "--icat", "http://h", "--user", "u", str(tmp_path / "m")],
               search_path=[cfg_file], environ={"IDSFS_PASSWORD": "x"})


def test_near_miss_in_a_shared_section_is_a_note(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", "[s]\nurl = https://h\nusername = u\n"
                                            "password = p\nmetadata_tll = 5m\n")
    cfg = config(["--configSection", "s", str(tmp_path / "m")], search_path=[cfg_file])
    assert len(cfg.notes) == 1
    assert "[s] metadata_tll: not an idsfs option, ignored (did you mean metadata_ttl?)" \
        in cfg.notes[0]


# ------------------------------------------------------------------ credential sources


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    write(directory / "idsfs-password", "systemd-password\n")
    return directory


def test_systemd_credential_password(tmp_path: Path, creds: Path) -> None:
    cfg = config(["--icat", "http://h", "--user", "u", str(tmp_path / "m")],
                 environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.password is not None and cfg.password.reveal() == "systemd-password"
    assert cfg.password.origin == "systemd credential idsfs-password"


def test_password_source_order(tmp_path: Path, creds: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", "[s]\nurl = https://h\nusername = u\n"
                                            "password = from-file\n")
    pw = write(tmp_path / "pw", "from-option\n")
    argv = ["--configSection", "s", str(tmp_path / "m")]
    env = {"CREDENTIALS_DIRECTORY": str(creds), "IDSFS_PASSWORD": "from-env"}

    def password(argv: list[str], environ: dict[str, str]) -> str:
        cfg = config(argv, environ=environ, search_path=[cfg_file])
        assert cfg.password is not None
        return cfg.password.reveal()

    assert password(argv, {}) == "from-file"
    assert password(argv, {"IDSFS_PASSWORD": "from-env"}) == "from-env"
    assert password(argv, env) == "systemd-password"
    assert password(["-o", f"password_file={pw}", *argv], env) == "from-option"
    assert password(["--password-file", str(pw), *argv], env) == "from-option"


def test_systemd_credential_session_beats_login(tmp_path: Path, creds: Path) -> None:
    write(creds / "idsfs-session", SESSION + "\n")
    cfg = config(["--icat", "http://h", "--user", "u", str(tmp_path / "m")],
                 environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.session is not None and cfg.session.reveal() == SESSION
    assert cfg.password is None and SESSION not in repr(cfg)


def test_empty_systemd_credential(tmp_path: Path) -> None:
    write(tmp_path / "c" / "idsfs-password", "\n")
    with pytest.raises(ConfigError, match=r"systemd credential idsfs-password: .* is empty"):
        config(["--icat", "http://h", "--user", "u", str(tmp_path / "m")],
               environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "c")})


def test_session_file_in_a_section(tmp_path: Path) -> None:
    sid = write(tmp_path / "sid", SESSION + "\n")
    cfg_file = write(tmp_path / "icat.cfg", f"[s]\nurl = https://h\nsession_file = {sid}\n")
    cfg = config(["--configSection", "s", str(tmp_path / "m")], search_path=[cfg_file])
    assert cfg.session is not None and cfg.session.reveal() == SESSION


# ------------------------------------------------------------------ idsfs get / put


def test_client_settings_from_a_section(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "icat.cfg", FACILITY + "cache_size = 1G\ntimeout = 30\n")
    settings = assemble_client([{"config_section": ("facility", "--configSection")}],
                               environ={}, search_path=[cfg_file])
    assert settings.ids_url == "https://ids.example.org:8181/ids"
    assert settings.icat_url == "https://icat.example.org:8181"
    assert settings.user == "jdoe" and settings.password is not None
    assert settings.verify is False and settings.timeout == 30
    assert settings.http_timeout == (10.0, 30.0)
    assert PASSWORD not in repr(settings)
    plain = assemble_client([env_layer({"IDSFS_SESSION_ID": SESSION,
                                        "IDSFS_IDS_URL": "http://h/ids"})], environ={},
                            search_path=[])
    assert plain.session is not None and plain.timeout == 120.0 and plain.ids_url == \
        "http://h/ids"


def test_client_settings_need_credentials(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no credentials"):
        assemble_client([{"ids_url": ("http://h/ids", "--ids")}], environ={}, search_path=[])
    with pytest.raises(ConfigError, match="no password for user 'u'"):
        assemble_client([{"ids_url": ("http://h/ids", "--ids"), "user": ("u", "--user")}],
                        environ={}, search_path=[])


# ------------------------------------------------------------------ the reference


def test_generated_reference_is_up_to_date() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    start = doc.index(BEGIN_MARKER) + len(BEGIN_MARKER)
    end = doc.index(END_MARKER)
    assert doc[start:end] == "\n" + render_markdown(), \
        "run: python -m idsfs.config --markdown --update docs/configuration.md"
    done = subprocess.run([sys.executable, "-m", "idsfs.config", "--markdown", "--check",
                           str(ROOT / "docs" / "configuration.md")], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_check_reports_a_stale_reference(tmp_path: Path) -> None:
    stale = write(tmp_path / "c.md", f"# x\n{BEGIN_MARKER}\nold\n{END_MARKER}\n")
    cmd = [sys.executable, "-m", "idsfs.config", "--markdown"]
    done = subprocess.run([*cmd, "--check", str(stale)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 1 and "out of date" in done.stderr
    subprocess.run([*cmd, "--update", str(stale)], check=True)
    assert stale.read_text().startswith(f"# x\n{BEGIN_MARKER}\n### Configuration file")
    assert subprocess.run([*cmd, "--check", str(stale)], check=False).returncode == 0

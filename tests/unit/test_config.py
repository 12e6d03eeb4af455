"""idsfs.config: option parsing, units, -o options, precedence, validation, secrets."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
from pathlib import Path

import pytest
from configkit import mount_config

from idsfs import mountcli
from idsfs.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CACHE_SIZE,
    DEFAULT_READAHEAD,
    OPTIONS,
    Config,
    ConfigError,
    Secret,
    assemble,
    format_size,
    parse_bool,
    parse_duration,
    parse_size,
    split_mount_options,
)

PASSWORD = "pa55-w0rd-that-must-not-leak"
SESSION = "5e55-10n-1d-that-must-not-leak"


@pytest.fixture
def pwfile(tmp_path: Path) -> Path:
    path = tmp_path / "pw"
    path.write_text(PASSWORD + "\nsecond line ignored\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def sidfile(tmp_path: Path) -> Path:
    path = tmp_path / "sid"
    path.write_text("  " + SESSION + "  \n")
    path.chmod(0o600)
    return path


def parse_cli(argv: list[str], environ: dict[str, str] | None = None) -> Config:
    """Parse like ``idsfs mount`` does and assemble the Config (no config files)."""
    return mount_config(argv, environ=environ)


def base(pwfile: Path, *more: str) -> list[str]:
    return ["--icat", "http://icat.example.org:8181", "--user", "alice", "--password-file",
            str(pwfile), *more]


# ------------------------------------------------------------------ value parsers


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("4096", 4096), ("512K", 512 << 10), ("512k", 512 << 10), ("256M", 256 << 20),
    ("1G", 1 << 30), ("1GiB", 1 << 30), ("1gb", 1 << 30), ("2T", 2 << 40), ("1.5G", 3 << 29),
    (" 64 M ", 64 << 20), (123, 123),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12X", "-1", "1.3", "M", "1 G B", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size_round_trips() -> None:
    for n in (0, 1, 4096, 512 << 10, 256 << 20, 1 << 30, 3 << 29, 12345):
        assert parse_size(format_size(n)) == n
    assert format_size(256 << 20) == "256M"
    assert format_size(1 << 30) == "1G"


@pytest.mark.parametrize(("text", "value"), [
    ("30", 30.0), ("2.5", 2.5), ("500ms", 0.5), ("90s", 90.0), ("5m", 300.0), ("5min", 300.0),
    ("1h", 3600.0), ("1d", 86400.0), ("0", 0.0), (7, 7.0),
])
def test_parse_duration(text: str, value: float) -> None:
    assert parse_duration(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "-1", "1y", "abc", "nan", "inf"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_bool() -> None:
    for yes in ("1", "yes", "TRUE", "on", True):
        assert parse_bool(yes) is True
    for no in ("0", "no", "false", "Off", False):
        assert parse_bool(no) is False
    with pytest.raises(ValueError):
        parse_bool("maybe")


def test_split_mount_options_escapes() -> None:
    assert split_mount_options("ro,cache_size=1G, allow_other ,,") == [
        "ro", "cache_size=1G", "allow_other"]
    assert split_mount_options(r"fsname=a\,b,x") == ["fsname=a,b", "x"]
    assert split_mount_options(r"a=b\\,c") == ["a=b\\", "c"]


# ------------------------------------------------------------------ the command line


def test_defaults(pwfile: Path, tmp_path: Path) -> None:
    cfg = parse_cli(base(pwfile, str(tmp_path / "mnt")))
    assert cfg.mountpoint == tmp_path / "mnt"
    assert cfg.icat_url == "http://icat.example.org:8181"
    assert cfg.ids_url is None
    assert cfg.auth == "simple"
    assert cfg.user == "alice"
    assert cfg.password is not None and cfg.password.reveal() == PASSWORD
    assert cfg.session is None
    assert cfg.cache_size == DEFAULT_CACHE_SIZE
    assert cfg.block_size == DEFAULT_BLOCK_SIZE
    assert cfg.readahead == DEFAULT_READAHEAD == 8 << 20
    assert cfg.metadata_ttl == 60.0
    assert cfg.restore_wait == 60.0
    assert cfg.max_threads == 16
    assert cfg.read_only is False  # read-write unless -o ro (issue 5)
    assert cfg.foreground is False and cfg.debug is False and cfg.allow_other is False
    assert cfg.uid == os.getuid() and cfg.gid == os.getgid()
    assert cfg.effective_fsname == "http://icat.example.org:8181"
    assert cfg.effective_log_level == logging.INFO
    assert cfg.verify is True
    assert cfg.http_timeout == (10.0, 60.0)


def test_every_long_option(pwfile: Path, tmp_path: Path) -> None:
    cfg = parse_cli(base(
        pwfile, "--ids", "http://ids.example.org/ids/", "--auth", "db", "--timeout", "2m",
        "--insecure", "-f", "--uid", "1000", "--gid", "1001", "--cache-size", "1G",
        "--block-size", "4M", "--metadata-ttl", "5m", "--restore-wait", "10s",
        "--readahead", "2M", "--max-threads", "4", "--debug", "--log-level", "WARNING",
        "--log-file", str(tmp_path / "log"), "--ca-file", str(tmp_path / "ca.pem"),
        str(tmp_path / "mnt")))
    assert cfg.ids_url == "http://ids.example.org/ids"
    assert cfg.auth == "db"
    assert cfg.timeout == 120.0
    assert cfg.insecure is True and cfg.verify is False
    assert cfg.foreground is True
    assert (cfg.uid, cfg.gid) == (1000, 1001)
    assert cfg.cache_size == 1 << 30
    assert cfg.block_size == 4 << 20
    assert cfg.metadata_ttl == 300.0
    assert cfg.restore_wait == 10.0
    assert cfg.readahead == 2 << 20
    assert cfg.max_threads == 4
    assert cfg.debug is True and cfg.log_level == "warning"
    assert cfg.effective_log_level == logging.DEBUG
    assert cfg.log_file == tmp_path / "log"


def test_mount_options_like_long_options(pwfile: Path, tmp_path: Path) -> None:
    cfg = parse_cli([
        "-o", f"icat=http://h:1,user=alice,password_file={pwfile}",
        "-o", "cache_size=512M,block_size=64K,metadata_ttl=2s,restore_wait=1m,readahead=1M",
        "-o", "max_threads=3,debug,allow_other,fsname=myarchive,uid=5,gid=6,rw,noatime,nodev",
        "-o", "_netdev,noauto,x-systemd.automount,defaults,user,comment=x",
        str(tmp_path / "mnt")])
    assert cfg.icat_url == "http://h:1"
    assert cfg.password is not None and cfg.password.reveal() == PASSWORD
    assert cfg.cache_size == 512 << 20 and cfg.block_size == 64 << 10
    assert cfg.metadata_ttl == 2.0 and cfg.restore_wait == 60.0 and cfg.readahead == 1 << 20
    assert cfg.max_threads == 3 and cfg.debug is True and cfg.allow_other is True
    assert cfg.effective_fsname == "myarchive"
    assert (cfg.uid, cfg.gid) == (5, 6)
    assert cfg.read_only is False
    assert cfg.fuse_options == frozenset({"noatime", "nodev"})


def test_long_option_beats_mount_option(pwfile: Path, tmp_path: Path) -> None:
    cfg = parse_cli(base(pwfile, "-o", "cache_size=1G,ro", "--cache-size", "2G",
                         str(tmp_path / "m")))
    assert cfg.cache_size == 2 << 30
    cfg = parse_cli(base(pwfile, "--cache-size", "2G", "-o", "cache_size=1G",
                         str(tmp_path / "m")))
    assert cfg.cache_size == 2 << 30


def test_mount_option_beats_environment(pwfile: Path, tmp_path: Path) -> None:
    env = {"IDSFS_ICAT_URL": "http://from-env:1", "IDSFS_IDS_URL": "http://env:2/ids"}
    cfg = parse_cli(["--user", "alice", "--password-file", str(pwfile), "-o", "icat=http://o:3",
                     str(tmp_path / "m")], env)
    assert cfg.icat_url == "http://o:3"
    assert cfg.ids_url == "http://env:2/ids"


def test_later_layer_wins_field_by_field(pwfile: Path, tmp_path: Path) -> None:
    low = {"icat_url": ("http://a:1", "file"), "cache_size": ("1G", "file"),
           "user": ("alice", "file"), "password_file": (str(pwfile), "file"),
           "fuse_options": (frozenset({"nodev"}), "file")}
    high = {"cache_size": ("2G", "--cache-size"), "fuse_options": (frozenset({"noexec"}), "-o")}
    cfg = assemble(tmp_path / "m", [low, high], environ={})
    assert cfg.icat_url == "http://a:1"
    assert cfg.cache_size == 2 << 30
    assert cfg.fuse_options == frozenset({"nodev", "noexec"})


# ------------------------------------------------------------------ credentials


def test_session_file(sidfile: Path, tmp_path: Path) -> None:
    cfg = parse_cli(["--icat", "http://h", "--session-file", str(sidfile), str(tmp_path / "m")])
    assert cfg.session is not None and cfg.session.reveal() == SESSION
    assert cfg.password is None


def test_session_from_environment(tmp_path: Path) -> None:
    cfg = parse_cli(["--icat", "http://h", str(tmp_path / "m")], {"IDSFS_SESSION_ID": SESSION})
    assert cfg.session is not None and cfg.session.reveal() == SESSION
    assert "IDSFS_SESSION_ID" in cfg.session.origin


def test_password_from_environment(tmp_path: Path) -> None:
    cfg = parse_cli(["--icat", "http://h", "--user", "bob", str(tmp_path / "m")],
                    {"IDSFS_PASSWORD": PASSWORD})
    assert cfg.password is not None and cfg.password.reveal() == PASSWORD


def test_password_prompt(tmp_path: Path) -> None:
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return PASSWORD

    cfg = assemble(tmp_path / "m", [{"icat_url": ("http://h", "--icat"),
                                     "user": ("carol", "--user")}], environ={}, prompt=prompt)
    assert asked == ["ICAT password for carol: "]
    assert cfg.password is not None and cfg.password.reveal() == PASSWORD


def test_user_login_beats_session_environment(pwfile: Path, tmp_path: Path) -> None:
    cfg = parse_cli(base(pwfile, str(tmp_path / "m")), {"IDSFS_SESSION_ID": SESSION})
    assert cfg.session is None and cfg.password is not None


def test_session_file_beats_login(pwfile: Path, sidfile: Path, tmp_path: Path) -> None:
    cfg = parse_cli(base(pwfile, "--session-file", str(sidfile), str(tmp_path / "m")))
    assert cfg.session is not None and cfg.password is None


def test_no_credentials(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no credentials"):
        parse_cli(["--icat", "http://h", str(tmp_path / "m")])


def test_no_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no password for user 'alice'"):
        parse_cli(["--icat", "http://h", "--user", "alice", str(tmp_path / "m")])


def test_unreadable_and_empty_secret_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--password-file: cannot read .*missing"):
        parse_cli(["--icat", "http://h", "--user", "a", "--password-file",
                   str(tmp_path / "missing"), str(tmp_path / "m")])
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        parse_cli(["--icat", "http://h", "--session-file", str(empty), str(tmp_path / "m")])


@pytest.mark.parametrize(("mode", "who"), [(0o644, "group and others"), (0o604, "others"),
                                           (0o640, "its group")])
def test_secret_files_others_may_read_are_refused(tmp_path: Path, mode: int, who: str) -> None:
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(mode)
    for option in ("--password-file", "--session-file"):
        with pytest.raises(ConfigError) as info:
            parse_cli(["--icat", "http://h", "--user", "a", option, str(secret),
                       str(tmp_path / "m")])
        assert str(info.value) == (f"{option}: {secret} is not private: {who} may read it "
                                   f"(mode {mode:04o}); make it private with: chmod 600 {secret}")
        assert PASSWORD not in str(info.value)
    secret.chmod(0o400)  # read-only for its owner is fine
    assert parse_cli(["--icat", "http://h", "--user", "a", "--password-file", str(secret),
                      str(tmp_path / "m")]).password.reveal() == PASSWORD


def test_a_pipe_is_a_secret_file(tmp_path: Path) -> None:
    # --password-file <(pass show icat): a pipe, whatever its mode says
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, (PASSWORD + "\n").encode())
        os.close(write_end)
        config = parse_cli(["--icat", "http://h", "--user", "a", "--password-file",
                            f"/dev/fd/{read_end}", str(tmp_path / "m")])
    finally:
        os.close(read_end)
    assert config.password.reveal() == PASSWORD


def test_password_is_not_an_option() -> None:
    parser = argparse.ArgumentParser(prog="idsfs mount")
    mountcli.add_arguments(parser)
    flags = {f for action in parser._actions for f in action.option_strings}
    assert not any("password" in f and not f.endswith("-file") for f in flags)
    assert not any(f in ("--session", "--session-id", "--sessionid") for f in flags)


def test_secrets_not_in_repr_or_str(pwfile: Path, sidfile: Path, tmp_path: Path) -> None:
    cfg = parse_cli(base(pwfile, str(tmp_path / "m")))
    for text in (repr(cfg), str(cfg), repr(cfg.password), str(cfg.password),
                 repr(cfg.describe()), str(cfg.describe())):
        assert PASSWORD not in text
    assert str(pwfile) in repr(cfg.password)
    cfg2 = parse_cli(["--icat", "http://h", "--session-file", str(sidfile), str(tmp_path / "m")])
    assert SESSION not in repr(cfg2) and SESSION not in str(cfg2.describe())
    env_cfg = parse_cli(["--icat", "http://h", str(tmp_path / "m")],
                        {"IDSFS_SESSION_ID": SESSION})
    assert SESSION not in repr(env_cfg)
    with pytest.raises(TypeError):
        pickle.dumps(cfg.password)


def test_secret_equality_and_errors() -> None:
    assert Secret("a1", "x") == Secret("a1", "x")
    assert Secret("a1", "x") != Secret("a2", "x")
    with pytest.raises(ConfigError, match="empty"):
        Secret("", "environment X")


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(("argv", "message"), [
    (["--cache-size", "12X"], r"--cache-size: not a size: '12X'"),
    (["--cache-size=-5M"], r"--cache-size: not a size"),
    (["--block-size", "3000"], r"--block-size: block size must be a power of two"),
    (["--block-size", "128M"], r"--block-size: block size must be a power of two"),
    (["--block-size", "1K"], r"--block-size"),
    (["--metadata-ttl", "soon"], r"--metadata-ttl: not a duration"),
    (["--restore-wait", "-1"], r"--restore-wait: not a duration"),
    (["--readahead", "1000"], r"--readahead: must be a multiple of 1K"),
    (["--readahead", "2G"], r"--readahead: at most 1G"),
    (["--max-threads", "0"], r"--max-threads: must be from 1 to 1024"),
    (["--max-threads", "many"], r"--max-threads: not an integer"),
    (["--uid", "-1"], r"--uid: out of range"),
    (["--log-level", "loud"], r"--log-level: must be one of debug, info, warning, error"),
    (["--timeout", "0"], r"--timeout: must be more than 0"),
    (["--ids", "ftp://x/ids"], r"--ids: not an http\(s\) URL"),
    (["--ids", "http://u:p@x/ids"], r"--ids: URLs must not carry user names or passwords"),
    (["-o", "max_read=131072"], r"-o max_read: not supported"),
    (["-o", "subtype=foo"], r"-o subtype: fixed to idsfs"),
    (["-o", "frobnicate"], r"-o frobnicate: unknown mount option"),
    (["-o", "password=hunter2"], r"^-o password: secrets are never given as options \(ps "
                                 r"and /proc/mounts show them to everyone\): use "
                                 r"password_file=FILE$"),
    (["-o", "session=abc"], r"^-o session: secrets .*: use session_file=FILE$"),
    (["-o", "cache_size"], r"-o cache_size: needs a value"),
    (["-o", "cache_size=lots"], r"-o cache_size: not a size"),
    (["-o", "debug=perhaps"], r"-o debug: not a yes/no value"),
    (["-o", "fsname=a b"], r"-o fsname: no commas or white space"),
    (["-o", "default_permissions=no"], r"default_permissions: cannot be turned off"),
])
def test_bad_values_are_named(pwfile: Path, tmp_path: Path, argv: list[str],
                              message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_cli(base(pwfile, *argv, str(tmp_path / "m")))


def test_no_server(pwfile: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no server: give --icat URL"):
        parse_cli(["--user", "a", "--password-file", str(pwfile), str(tmp_path / "m")])


def test_ids_alone_is_enough(pwfile: Path, tmp_path: Path) -> None:
    cfg = parse_cli(["--ids", "http://h/ids", "--user", "a", "--password-file", str(pwfile),
                     str(tmp_path / "m")])
    assert cfg.icat_url is None and cfg.ids_url == "http://h/ids"


def test_config_is_frozen_and_replace_validates(pwfile: Path, tmp_path: Path) -> None:
    cfg = parse_cli(base(pwfile, str(tmp_path / "m")))
    with pytest.raises(AttributeError):
        cfg.cache_size = 1  # type: ignore[misc]
    assert cfg.replace(cache_size=1 << 20).cache_size == 1 << 20
    with pytest.raises(ConfigError):
        cfg.replace(block_size=12345)


def test_relative_paths_become_absolute(pwfile: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_cli(base(pwfile, "--log-file", "d.log", "mnt"))
    assert cfg.mountpoint == tmp_path / "mnt"
    assert cfg.log_file == tmp_path / "d.log"


def test_table_is_consistent() -> None:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(Config)}
    okeys = [s.okey for s in OPTIONS if s.okey]
    assert len(okeys) == len(set(okeys))
    for spec in OPTIONS:
        assert spec.field in fields or spec.field in ("password_file", "session_file",
                                                      "config_file")
        assert spec.help
        assert spec.flags or spec.okey


def test_docs_list_every_option() -> None:
    docs = Path(__file__).parents[2] / "docs"
    assert "configuration.md" in (docs / "usage.md").read_text(encoding="utf-8")
    doc = (docs / "configuration.md").read_text(encoding="utf-8")
    for spec in OPTIONS:
        for flag in spec.flags:
            assert f"`{flag}" in doc, flag
        if spec.okey:
            assert f"`{spec.okey}" in doc, spec.okey
        default = spec.help.partition("(default: ")[2].partition(")")[0]
        if default:
            assert default in doc, (spec.field, default)

"""The tree's layout through the handlers: every level, odd names, clashes, permissions."""

from __future__ import annotations

import errno
import hashlib

import pyfuse3
import pytest
from fshelp import DEMO_VISIT, ODD_DATASETS, Odd, Tree

from idsfs import naming
from idsfs.emulator import demo


def test_every_level_of_the_demo(demo_emu, tree) -> None:
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        assert await t.names("") == ["DEMO"]
        assert await t.names("DEMO") == ["DEMO-2024-001", "DEMO-2024-002", "DEMO-2025-003"]
        # investigations of one name share a directory, one subdirectory per visit
        assert await t.names("DEMO/DEMO-2024-001") == ["1", "2"]
        assert await t.names("DEMO/DEMO-2024-002") == ["N%2FA"]
        assert await t.names(DEMO_VISIT) == sorted([
            "raw", "processed data", "calib%2Frun 42", "O'Brien's samples",
            "Ünïcödé δεδομένα", "empty"])
        assert await t.names(f"{DEMO_VISIT}/empty") == []
        assert await t.names(f"{DEMO_VISIT}/processed data") == [
            "it's mine.txt", "notes with spaces.txt", "reduced_0001.dat", "reduced_0002.dat",
            "reduced_0003.dat", "sub"]
        assert await t.names(f"{DEMO_VISIT}/processed data/sub") == ["dir"]
        assert await t.names(f"{DEMO_VISIT}/processed data/sub/dir") == ["result.csv"]
        assert await t.names(f"{DEMO_VISIT}/calib%2Frun 42") == ["a", "flat field.dat"]

    t.run(body)


def test_every_demo_datafile_is_where_naming_puts_it(demo_emu, tree) -> None:
    """Walk to every demo datafile by the path naming.py gives it; check size and name."""
    t = tree(demo_emu)
    plan = demo.plan(demo_emu.settings.seed, demo_emu.settings.demo_large_size)

    async def body(t: Tree) -> None:
        seen = 0
        for inv in plan:
            for ds in inv.datasets:
                dataset_path = ["DEMO", naming.escape_name(inv.name),
                                naming.escape_name(inv.visit_id), naming.escape_name(ds.name)]
                tree = naming.DatafileTree((spec.name, i) for i, spec in enumerate(ds.files))
                for i, spec in enumerate(ds.files):
                    path = tree.path_of(i)
                    assert path is not None
                    attr = await t.walk(dataset_path + list(path))
                    assert attr.st_size == spec.size
                    assert stat_is_file(attr)
                    xattrs = await t.xattrs(attr.st_ino)
                    assert xattrs["user.ids.name"] == spec.name
                    seen += 1
        assert seen == 43

    t.run(body)


def stat_is_file(attr: pyfuse3.EntryAttributes) -> bool:
    return attr.st_mode & 0o170000 == 0o100000


def test_demo_long_names(demo_emu, tree) -> None:
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        names = await t.names(f"{DEMO_VISIT}/Ünïcödé δεδομένα")
        assert demo.LONG_NAME in names  # 255 ASCII characters: shown as is
        short = [n for n in names if naming.SHORTENED_MARK in n]
        assert len(short) == 1
        (name,) = short
        assert len(name.encode()) <= 255
        digest = hashlib.sha256(demo.LONG_UTF8_NAME.encode()).hexdigest()[:16]
        assert name.endswith("%FF" + digest)
        attr = await t.walk(f"{DEMO_VISIT}/Ünïcödé δεδομένα/{name}")
        assert (await t.xattrs(attr.st_ino))["user.ids.name"] == demo.LONG_UTF8_NAME
        assert attr.st_size == 4096

    t.run(body)


@pytest.mark.parametrize(("dataset", "expected"), [
    # a datafile "a" and datafiles "a/b", "a/c": the directory keeps "a"
    ("clash", ["a", "a%FE{clash|a}"]),
    ("slashes", ["%2F", "%2Fabs", "a", "dir%2F", "x%2F%2Fy"]),
    ("percent", ["%252F", "%25FD", "%25FF", "50% done", "my%20file.pdf"]),
    ("nul", ["a%00b"]),
    ("..", ["inside dotdot"]),
    (".", ["inside dot"]),
    ("", ["inside empty"]),
    ("N/A", ["inside slash"]),
])
def test_odd_datafile_names(odd_emu, tree, dataset: str, expected: list[str]) -> None:
    emu, odd = odd_emu
    t = tree(emu)
    want = [e.replace("{clash|a}", str(odd.datafiles["clash|a"])) for e in expected]

    async def body(t: Tree) -> None:
        path = f"ODD/odd/v1/{naming.escape_name(dataset)}"
        assert await t.names(path) == sorted(want)
        for name in want:
            attr = await t.walk(f"{path}/{name}")
            assert attr.st_ino != 0

    t.run(body)


def test_odd_dataset_directory_names(odd_emu, tree) -> None:
    emu, odd = odd_emu
    t = tree(emu)

    async def body(t: Tree) -> None:
        names = await t.names("ODD/odd/v1")
        long_name = "日本" * 100
        escaped = {naming.escape_name(n) for n in ODD_DATASETS if n != long_name}
        assert escaped == {"clash", "slashes", "percent", "nul", "long", "%2E%2E", "%2E",
                           "%FD", "N%2FA"}
        assert escaped <= set(names)
        (short,) = set(names) - escaped
        assert short.endswith("%FF" + hashlib.sha256(long_name.encode()).hexdigest()[:16])
        assert len(short.encode()) <= 255
        attr = await t.walk(f"ODD/odd/v1/{short}")
        x = await t.xattrs(attr.st_ino)
        assert x["user.ids.name"] == long_name
        assert int(x["user.ids.id"]) == odd.datasets[long_name]
        assert await t.names(f"ODD/odd/v1/{short}") == ["inside long"]

    t.run(body)


def test_slashes_inside_datafile_names(odd_emu, tree) -> None:
    emu, odd = odd_emu
    t = tree(emu)

    async def body(t: Tree) -> None:
        base = "ODD/odd/v1/slashes"
        assert await t.names(f"{base}/a") == ["%2E", "%2E%2E", "b%2F"]
        assert await t.names(f"{base}/a/%2E%2E") == ["b"]
        assert await t.names(f"{base}/a/%2E") == ["b"]
        assert await t.names(f"{base}/%2Fabs") == ["path"]
        assert await t.names(f"{base}/%2Fabs/path") == ["x"]
        for icat_name, path in [("a/../b", "a/%2E%2E/b"), ("a/./b", "a/%2E/b"),
                                ("/abs/path/x", "%2Fabs/path/x"), ("a/b/", "a/b%2F"),
                                ("x//y", "x%2F%2Fy"), ("dir/", "dir%2F"), ("/", "%2F")]:
            attr = await t.walk(f"{base}/{path}")
            assert stat_is_file(attr), path
            x = await t.xattrs(attr.st_ino)
            assert x["user.ids.name"] == icat_name
            assert int(x["user.ids.id"]) == odd.datafiles[f"slashes|{icat_name}"]
        # the directory made of a path prefix has no ICAT id
        x = await t.xattrs(await t.ino(f"{base}/%2Fabs/path"))
        assert x == {"user.ids.name": "/abs/path",
                     "user.ids.dataset.id": str(odd.datasets["slashes"])}

    t.run(body)


def test_clash_suffix_names_the_datafile(odd_emu, tree) -> None:
    emu, odd = odd_emu
    t = tree(emu)

    async def body(t: Tree) -> None:
        fid = odd.datafiles["clash|a"]
        attr = await t.walk(f"ODD/odd/v1/clash/a%FE{fid}")
        assert stat_is_file(attr)
        assert (await t.xattrs(attr.st_ino))["user.ids.name"] == "a"
        assert await t.names("ODD/odd/v1/clash/a") == ["b", "c"]

    t.run(body)


def test_long_datafile_names(odd_emu, tree) -> None:
    emu, _ = odd_emu
    t = tree(emu)

    async def body(t: Tree) -> None:
        names = await t.names("ODD/odd/v1/long")
        assert "n" * 255 in names
        shortened = [n for n in names if "%FF" in n]
        assert len(shortened) == 2
        for name in names:
            assert len(name.encode()) <= 255
            attr = await t.walk(f"ODD/odd/v1/long/{name}")
            icat_name = (await t.xattrs(attr.st_ino))["user.ids.name"]
            assert icat_name in ODD_DATASETS["long"]

    t.run(body)


def test_investigation_names_merge_and_escape(odd_emu, tree) -> None:
    emu, odd = odd_emu
    t = tree(emu)

    async def body(t: Tree) -> None:
        names = await t.names("ODD")
        assert "same" in names and "%2E%2E" in names and "odd" in names
        assert await t.names("ODD/same") == ["N%2FA", "a", "b"]
        assert await t.names("ODD/%2E%2E") == ["%2E"]
        x = await t.xattrs(await t.ino("ODD/same"))
        ids = sorted(odd.investigations[f"same|{v}"] for v in ("a", "b", "N/A"))
        assert x == {"user.ids.name": "same",
                     "user.ids.investigation.ids": " ".join(map(str, ids))}
        long_inv = [n for n in names if "%FF" in n]
        assert len(long_inv) == 1 and len(long_inv[0].encode()) <= 255
        assert await t.names(f"ODD/{long_inv[0]}") == ["x"]

    t.run(body)


def test_datafiles_without_location_are_not_shown(odd_emu, tree) -> None:
    emu, _ = odd_emu
    t = tree(emu)

    async def body(t: Tree) -> None:
        assert "no location" not in await t.names("ODD/odd/v1/clash")
        attr = await t.lookup(await t.ino("ODD/odd/v1/clash"), "no location")
        assert attr.st_ino == 0

    t.run(body)


@pytest.mark.parametrize(("user", "sees", "hidden"), [
    ("alice", "alice-only", "bob-only"),
    ("bob", "bob-only", "alice-only"),
])
def test_only_what_the_session_may_read(odd_emu, tree, user: str, sees: str,
                                        hidden: str) -> None:
    emu, _ = odd_emu
    t = tree(emu, user)

    async def body(t: Tree) -> None:
        names = await t.names("ODD")
        assert sees in names
        assert hidden not in names
        assert "nobody" not in names
        facility = await t.ino("ODD")
        assert (await t.lookup(facility, hidden)).st_ino == 0
        with pytest.raises(pyfuse3.FUSEError) as info:
            await t.walk(f"ODD/{hidden}/1")
        assert info.value.errno == errno.ENOENT

    t.run(body)


def test_root_sees_everything(odd_emu, tree) -> None:
    emu, _ = odd_emu
    t = tree(emu, "root")

    async def body(t: Tree) -> None:
        names = await t.names("ODD")
        assert {"alice-only", "bob-only", "nobody"} <= set(names)

    t.run(body)


def test_names_that_are_not_utf8_are_never_found(odd_emu, tree) -> None:
    emu, _ = odd_emu
    t = tree(emu)

    async def body(t: Tree) -> None:
        attr = await t.lookup(await t.ino("ODD"), b"\xff\xfe")
        assert attr.st_ino == 0

    t.run(body)


def test_odd_fixture_is_consistent(odd_emu) -> None:
    _, odd = odd_emu
    assert isinstance(odd, Odd)
    assert len(odd.datasets) == len(ODD_DATASETS)

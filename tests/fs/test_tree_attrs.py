"""Attributes, extended attributes, statfs, inode numbers and lookup counts."""

from __future__ import annotations

import errno
import stat

import pyfuse3
import pytest
from fshelp import DEMO_VISIT, GID, UID, Tree, attrs, login

from idsfs.model import parse_date


def _ns(text: str) -> int:
    dt = parse_date(text)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def _icat_datafile(emu, datafile_id: int) -> dict:
    root = login(emu, "root")
    try:
        (row,) = root.search(
            "SELECT df.fileSize, df.modTime, df.datafileModTime, df.checksum, df.location, "
            f"df.name FROM Datafile df WHERE df.id = {datafile_id}")
    finally:
        root.close()
    keys = ("fileSize", "modTime", "datafileModTime", "checksum", "location", "name")
    return dict(zip(keys, row, strict=True))


def test_file_attributes(demo_emu, tree) -> None:
    t = tree(demo_emu, metadata_ttl=42.0)

    async def body(t: Tree) -> None:
        for path in ("raw/tiny.txt", "raw/empty.dat", "raw/block+1.bin", "raw/large.bin"):
            attr = await t.walk(f"{DEMO_VISIT}/{path}")
            a = attrs(attr)
            df_id = int((await t.xattrs(attr.st_ino))["user.ids.id"])
            icat = _icat_datafile(demo_emu, df_id)
            assert a["st_mode"] == stat.S_IFREG | 0o444
            assert a["st_nlink"] == 1
            assert a["st_uid"] == UID and a["st_gid"] == GID
            assert a["st_size"] == icat["fileSize"]
            assert a["st_blocks"] == (icat["fileSize"] + 511) // 512
            assert a["st_mtime_ns"] == _ns(icat["datafileModTime"])
            assert a["st_atime_ns"] == a["st_mtime_ns"]
            assert a["st_ctime_ns"] == _ns(icat["modTime"])
            assert a["st_blksize"] == 1 << 20
            # the TTL, less the moments since the directory's listing was fetched
            assert 41.0 < a["entry_timeout"] <= 42.0 and 41.0 < a["attr_timeout"] <= 42.0
            # getattr agrees with lookup
            again = attrs(await t.ops.getattr(attr.st_ino, t.ctx))
            for key in ("st_ino", "st_mode", "st_size", "st_mtime_ns", "st_ctime_ns"):
                assert again[key] == a[key]

    t.run(body)


def test_mtime_falls_back_to_modtime(odd_emu, tree) -> None:
    emu, odd = odd_emu
    root = login(emu, "root")
    try:
        did = odd.datasets["nul"]
        fid = root.create({"Datafile": {"name": "no file times", "dataset": {"id": did},
                                        "location": "fake/x", "fileSize": 3}})
    finally:
        root.close()
    t = tree(emu)

    async def body(t: Tree) -> None:
        attr = await t.walk("ODD/odd/v1/nul/no file times")
        icat = _icat_datafile(emu, fid)
        assert icat["datafileModTime"] is None
        assert attr.st_mtime_ns == _ns(icat["modTime"]) == attr.st_ctime_ns

    t.run(body)


@pytest.mark.parametrize(("path", "nlink"), [
    ("", 3),                            # DEMO
    ("DEMO", 5),                        # three investigation names
    ("DEMO/DEMO-2024-001", 4),          # visits 1 and 2
    (DEMO_VISIT, 8),                    # six datasets
    (f"{DEMO_VISIT}/raw", 2),
    (f"{DEMO_VISIT}/processed data", 3),  # sub/
    (f"{DEMO_VISIT}/processed data/sub", 3),
    (f"{DEMO_VISIT}/processed data/sub/dir", 2),
    (f"{DEMO_VISIT}/empty", 2),
])
def test_directory_attributes(demo_emu, tree, path: str, nlink: int) -> None:
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        ino = await t.ino(path)
        a = attrs(await t.ops.getattr(ino, t.ctx))
        assert a["st_mode"] == stat.S_IFDIR | 0o555
        assert a["st_nlink"] == nlink
        assert a["st_uid"] == UID and a["st_gid"] == GID
        assert a["st_size"] == 0 and a["st_blocks"] == 0
        assert a["attr_timeout"] == t.ttl
        # nlink = 2 + the subdirectories readdir shows
        entries = await t.readdir_all(ino)
        subdirs = sum(1 for n, e, _ in entries
                      if n not in (b".", b"..") and stat.S_ISDIR(e.st_mode))
        assert a["st_nlink"] == 2 + subdirs

    t.run(body)


def test_directory_times(demo_emu, tree) -> None:
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        dataset = attrs(await t.ops.getattr(await t.ino(f"{DEMO_VISIT}/processed data"), t.ctx))
        assert dataset["st_mtime_ns"] > 0 and dataset["st_ctime_ns"] == dataset["st_mtime_ns"]
        # a folder made of datafile names is as recent as the newest file below it
        folder = attrs(await t.walk(f"{DEMO_VISIT}/processed data/sub"))
        result = attrs(await t.walk(f"{DEMO_VISIT}/processed data/sub/dir/result.csv"))
        assert folder["st_mtime_ns"] == result["st_mtime_ns"]

    t.run(body)


def test_readdir_attributes_and_timeouts(demo_emu, tree) -> None:
    """readdirplus entries carry full attributes; unknown link counts get timeout 0."""
    t = tree(demo_emu, metadata_ttl=30.0)

    async def body(t: Tree) -> None:
        visit = await t.ino(DEMO_VISIT)
        entries = {n: e for n, e, _ in await t.readdir_all(visit)}
        assert set(entries) >= {b".", b".."}
        assert entries[b"."].st_ino == visit
        assert entries[b".."].st_ino == await t.ino("DEMO/DEMO-2024-001")
        raw = entries[b"raw"]
        assert stat.S_ISDIR(raw.st_mode)
        assert raw.attr_timeout == 0  # its listing was not fetched yet
        assert raw.entry_timeout == 30.0
        await t.names(f"{DEMO_VISIT}/raw")
        entries = {n: e for n, e, _ in await t.readdir_all(visit)}
        assert entries[b"raw"].attr_timeout == 30.0
        assert entries[b"raw"].st_nlink == 2
        files = {n: e for n, e, _ in await t.readdir_all(await t.ino(f"{DEMO_VISIT}/raw"))}
        tiny = files[b"tiny.txt"]
        assert tiny.st_size == 52 and tiny.attr_timeout == 30.0 and tiny.st_nlink == 1
        assert tiny.st_ino == (await t.walk(f"{DEMO_VISIT}/raw/tiny.txt")).st_ino

    t.run(body)


def test_xattrs_of_a_datafile(odd_emu, tree) -> None:
    emu, odd = odd_emu
    t = tree(emu)

    async def body(t: Tree) -> None:
        ino = await t.ino("ODD/odd/v1/percent/50% done")
        fid = odd.datafiles["percent|50% done"]
        x = await t.xattrs(ino)
        assert x == {
            "user.ids.id": str(fid),
            "user.ids.name": "50% done",
            "user.ids.dataset.id": str(odd.datasets["percent"]),
            "user.ids.checksum": "0",
            "user.ids.location": f"fake/{odd.datasets['percent']}/0",
            "user.ids.description": "file 0",
            "user.ids.doi": f"10.0/{odd.datasets['percent']}.0",
        }
        # no transfer: no status attribute
        with pytest.raises(pyfuse3.FUSEError) as info:
            await t.ops.getxattr(ino, b"user.ids.status", t.ctx)
        assert info.value.errno == pyfuse3.ENOATTR
        for name in (b"user.other", b"user.ids.nothing", b"user.ids.\xff"):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await t.ops.getxattr(ino, name, t.ctx)
            assert info.value.errno == pyfuse3.ENOATTR
        # other namespaces are not supported at all (ls -l stops asking after one answer)
        for name in (b"security.selinux", b"system.posix_acl_access", b"trusted.x"):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await t.ops.getxattr(ino, name, t.ctx)
            assert info.value.errno == errno.ENOTSUP

    t.run(body)


def test_xattrs_of_directories(odd_emu, tree) -> None:
    emu, odd = odd_emu
    t = tree(emu)

    async def body(t: Tree) -> None:
        assert await t.xattrs(pyfuse3.ROOT_INODE) == {}
        facility = await t.xattrs(await t.ino("ODD"))
        assert facility == {"user.ids.id": str(odd.facility), "user.ids.name": "ODD"}
        visit = await t.xattrs(await t.ino("ODD/odd/v1"))
        assert visit == {"user.ids.id": str(odd.investigations["odd|v1"]),
                         "user.ids.name": "odd", "user.ids.visitId": "v1",
                         "user.ids.title": "odd v1"}
        dataset = await t.xattrs(await t.ino("ODD/odd/v1/N%2FA"))
        assert dataset == {"user.ids.id": str(odd.datasets["N/A"]), "user.ids.name": "N/A",
                           "user.ids.description": "dataset 'N/A'",
                           "user.ids.investigation.id": str(odd.investigations["odd|v1"])}
        nul = await t.xattrs(await t.ino("ODD/odd/v1/nul/a%00b"))
        assert nul["user.ids.name"] == "a\x00b"

    t.run(body)


def test_statfs_reports_what_was_listed(demo_emu, tree) -> None:
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        before = (await t.ops.statfs(t.ctx)).__getstate__()
        assert before["f_blocks"] == 0 and before["f_files"] == 1  # the root
        total = files = dirs = 0
        stack = [pyfuse3.ROOT_INODE]
        while stack:
            ino = stack.pop()
            dirs += 1
            for name, entry, _ in await t.readdir_all(ino):
                if name in (b".", b".."):
                    continue
                if stat.S_ISDIR(entry.st_mode):
                    stack.append(entry.st_ino)
                else:
                    files += 1
                    total += entry.st_size
        s = (await t.ops.statfs(t.ctx)).__getstate__()
        assert files == 43
        assert s["f_frsize"] == 512
        assert s["f_blocks"] == (total + 511) // 512
        assert s["f_bfree"] == s["f_bavail"] == 0
        assert s["f_files"] == files + dirs
        assert s["f_ffree"] == s["f_favail"] == 0
        assert s["f_namemax"] == 255
        assert s["f_bsize"] == 1 << 20

    t.run(body)


def test_inode_numbers_and_lookup_counts(demo_emu, tree) -> None:
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        raw = await t.ino(f"{DEMO_VISIT}/raw")
        first = await t.lookup(raw, "tiny.txt")
        second = await t.lookup(raw, "tiny.txt")
        ino = first.st_ino
        assert second.st_ino == ino
        assert t.ops.lookup_count(ino) == 2
        # readdir counts each entry it reports
        await t.readdir_all(raw)
        assert t.ops.lookup_count(ino) == 3
        before = t.ops.inode_count
        await t.ops.forget([(ino, 3)])
        assert t.ops.lookup_count(ino) == 0
        assert t.ops.inode_count == before - 1
        with pytest.raises(pyfuse3.FUSEError) as info:
            await t.ops.getattr(ino, t.ctx)
        assert info.value.errno == errno.ENOENT
        # the same node gets the same number again
        assert (await t.lookup(raw, "tiny.txt")).st_ino == ino
        # the root is never forgotten; forgetting unknown inodes is harmless
        await t.ops.forget([(pyfuse3.ROOT_INODE, 5), (987654321, 1)])
        assert (await t.ops.getattr(pyfuse3.ROOT_INODE, t.ctx)).st_ino == pyfuse3.ROOT_INODE

    t.run(body)


def test_inode_numbers_stay_after_refetch(demo_emu, tree) -> None:
    t = tree(demo_emu, metadata_ttl=0.0)  # every request fetches again

    async def body(t: Tree) -> None:
        seen = {}
        for _ in range(2):
            for path in ("DEMO", "DEMO/DEMO-2024-001", DEMO_VISIT,
                         f"{DEMO_VISIT}/processed data/sub", f"{DEMO_VISIT}/raw/tiny.txt"):
                ino = await t.ino(path)
                assert seen.setdefault(path, ino) == ino
        assert len(set(seen.values())) == len(seen)

    t.run(body)


def test_dot_and_dotdot_lookups(demo_emu, tree) -> None:
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        sub = await t.ino(f"{DEMO_VISIT}/processed data/sub")
        assert (await t.lookup(sub, ".")).st_ino == sub
        assert (await t.lookup(sub, "..")).st_ino == await t.ino(f"{DEMO_VISIT}/processed data")
        visit = await t.ino(DEMO_VISIT)
        assert (await t.lookup(visit, "..")).st_ino == await t.ino("DEMO/DEMO-2024-001")
        assert (await t.lookup(pyfuse3.ROOT_INODE, "..")).st_ino == pyfuse3.ROOT_INODE
        tiny = await t.ino(f"{DEMO_VISIT}/raw/tiny.txt")
        with pytest.raises(pyfuse3.FUSEError) as info:
            await t.lookup(tiny, "x")
        assert info.value.errno == errno.ENOTDIR

    t.run(body)


def test_dotdot_of_a_directory_whose_parent_was_forgotten(demo_emu, tree) -> None:
    """NFS-style '..' lookups work when the kernel forgot the parent (catalogue resolves it)."""
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        visit = await t.ino(DEMO_VISIT)
        raw = await t.ino(f"{DEMO_VISIT}/raw")
        await t.ops.forget([(visit, t.ops.lookup_count(visit))])
        assert t.ops.lookup_count(visit) == 0
        assert (await t.lookup(raw, "..")).st_ino == visit

    t.run(body)


def test_read_only_refusals(demo_emu, tree) -> None:
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        raw = await t.ino(f"{DEMO_VISIT}/raw")
        tiny = await t.ino(f"{DEMO_VISIT}/raw/tiny.txt")
        calls = [
            t.ops.mkdir(raw, b"new", 0o755, t.ctx),
            t.ops.create(raw, b"new", 0o644, 0, t.ctx),
            t.ops.unlink(raw, b"tiny.txt", t.ctx),
            t.ops.rmdir(await t.ino(DEMO_VISIT), b"raw", t.ctx),
            t.ops.rename(raw, b"tiny.txt", raw, b"x", 0, t.ctx),
            t.ops.setxattr(tiny, b"user.x", b"1", t.ctx),
            t.ops.removexattr(tiny, b"user.ids.id", t.ctx),
            t.ops.setattr(tiny, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None,
                          t.ctx),
            t.ops.symlink(raw, b"l", b"tiny.txt", t.ctx),
            t.ops.link(tiny, raw, b"l", t.ctx),
            t.ops.mknod(raw, b"n", 0o644, 0, t.ctx),
            t.ops.open(tiny, 1, t.ctx),  # O_WRONLY
        ]
        for call in calls:
            with pytest.raises(pyfuse3.FUSEError) as info:
                await call
            assert info.value.errno == errno.EROFS

    t.run(body)


def test_access(demo_emu, tree) -> None:
    t = tree(demo_emu)

    class Ctx:
        def __init__(self, uid: int, gid: int) -> None:
            self.uid, self.gid, self.pid, self.umask = uid, gid, 0, 0o022

    async def body(t: Tree) -> None:
        raw = await t.ino(f"{DEMO_VISIT}/raw")
        tiny = await t.ino(f"{DEMO_VISIT}/raw/tiny.txt")
        for ctx in (Ctx(UID, GID), Ctx(4242, 4242), Ctx(0, 0)):
            assert await t.ops.access(tiny, 4, ctx) is True
            assert await t.ops.access(raw, 4 | 1, ctx) is True
            assert await t.ops.access(tiny, 1, ctx) is False
            with pytest.raises(pyfuse3.FUSEError) as info:
                await t.ops.access(tiny, 2, ctx)
            assert info.value.errno == errno.EROFS

    t.run(body)

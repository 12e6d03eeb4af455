"""Listing cost and caching: ICAT requests counted by the emulator's counters."""

from __future__ import annotations

import stat

import pyfuse3
import pytest
import trio
from fshelp import DEMO_VISIT, FakeClock, Tree, login


def icat_searches(emu) -> int:
    return emu.counters["icat/entityManager"]


def ids_requests(emu) -> int:
    return emu.counters.total("ids/*")


async def ls_lR(t: Tree, ino: int = pyfuse3.ROOT_INODE) -> tuple[int, int]:
    """What ``ls -lR`` asks: readdir of every directory, getattr where attributes expired.

    Returns (directories listed, files seen).
    """
    dirs = files = 0
    stack = [ino]
    while stack:
        current = stack.pop()
        dirs += 1
        for name, entry, _ in await t.readdir_all(current, capacity=50):
            if name in (b".", b".."):
                continue
            if entry.attr_timeout == 0:  # the kernel would ask getattr for ls -l
                entry = await t.ops.getattr(entry.st_ino, t.ctx)
            if stat.S_ISDIR(entry.st_mode):
                stack.append(entry.st_ino)
            else:
                files += 1
    return dirs, files


def test_listing_n_directories_costs_at_most_n_plus_a_constant(demo_emu, tree) -> None:
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        demo_emu.counters.reset()
        dirs, files = await ls_lR(t)
        searches = icat_searches(demo_emu)
        assert (dirs, files) == (23, 43)
        assert searches <= dirs + 2
        assert ids_requests(demo_emu) == 0
        # a second walk within the TTL asks nothing
        demo_emu.counters.reset()
        await ls_lR(t)
        assert icat_searches(demo_emu) == 0
        assert sum(demo_emu.counters.snapshot().get(k, {}).get("requests", 0)
                   for k in demo_emu.counters.snapshot()) == 0

    t.run(body)


def test_paged_listing_costs_one_query_per_page(fresh_emu, tree) -> None:
    root = login(fresh_emu, "root")
    try:
        (did,) = root.search("SELECT ds.id FROM Dataset ds WHERE ds.name = 'empty'")
        root.create([{"Datafile": {"name": f"f{i:03d}", "dataset": {"id": did},
                                   "location": f"x/{i}", "fileSize": i}} for i in range(25)])
    finally:
        root.close()
    t = tree(fresh_emu, page_size=10)

    async def body(t: Tree) -> None:
        empty = await t.ino(f"{DEMO_VISIT}/empty")
        fresh_emu.counters.reset()
        names = await t.names(f"{DEMO_VISIT}/empty")
        assert names == [f"f{i:03d}" for i in range(25)]
        assert icat_searches(fresh_emu) == 3  # 10 + 10 + 5
        assert t.catalog.stats().queries >= 3
        sizes = {n.decode(): e.st_size for n, e, _ in await t.readdir_all(empty)}
        assert sizes["f024"] == 24

    t.run(body)


def test_page_size_is_bounded_by_max_entities(tmp_path, tree) -> None:
    from fshelp import settings

    from idsfs.emulator import Emulator

    with Emulator(settings(tmp_path / "d", demo=True, max_entities=4)) as emu:
        t = tree(emu, page_size=1000)

        async def body(t: Tree) -> None:
            emu.counters.reset()
            names = await t.names(f"{DEMO_VISIT}/raw")  # 10 datafiles: pages of 4
            assert len(names) == 10
            assert emu.counters.total("icat/properties") == 1

        t.run(body)


def test_ttl_and_negative_entries(demo_emu, tree) -> None:
    clock = FakeClock()
    t = tree(demo_emu, metadata_ttl=10.0, clock=clock)

    async def body(t: Tree) -> None:
        raw = await t.ino(f"{DEMO_VISIT}/raw")
        await t.readdir_all(raw)
        demo_emu.counters.reset()
        # names that exist and names that do not: answered from the cached listing
        for _ in range(3):
            missing = await t.lookup(raw, "no such file")
            assert missing.st_ino == 0
            assert missing.entry_timeout == 10.0  # the kernel may cache the miss too
            assert (await t.lookup(raw, "tiny.txt")).st_ino != 0
        await t.ops.getattr(raw, t.ctx)
        assert icat_searches(demo_emu) == 0
        clock.advance(9.9)
        # near the listing's end: the kernel may keep the answers only that long
        # (else a file added meanwhile stayed unseen for up to twice the TTL)
        missing = await t.lookup(raw, "no such file")
        assert missing.st_ino == 0 and missing.entry_timeout == pytest.approx(0.1)
        found = await t.lookup(raw, "tiny.txt")
        assert found.entry_timeout == pytest.approx(0.1)
        assert found.attr_timeout == pytest.approx(0.1)
        assert icat_searches(demo_emu) == 0
        clock.advance(0.2)  # expired: one listing query, then cached again
        missing = await t.lookup(raw, "no such file")
        assert missing.st_ino == 0 and missing.entry_timeout == 10.0
        assert (await t.lookup(raw, "tiny.txt")).st_ino != 0
        assert icat_searches(demo_emu) == 1

    t.run(body)


def test_changes_appear_after_the_ttl(fresh_emu, tree) -> None:
    clock = FakeClock()
    t = tree(fresh_emu, metadata_ttl=5.0, clock=clock)
    root = login(fresh_emu, "root")

    async def body(t: Tree) -> None:
        assert await t.names(f"{DEMO_VISIT}/empty") == []
        (did,) = root.search("SELECT ds.id FROM Dataset ds WHERE ds.name = 'empty'")
        fid = root.create({"Datafile": {"name": "late.dat", "dataset": {"id": did},
                                        "location": "x/late", "fileSize": 7}})
        assert await t.names(f"{DEMO_VISIT}/empty") == []  # still cached
        empty = await t.ino(f"{DEMO_VISIT}/empty")
        assert (await t.lookup(empty, "late.dat")).st_ino == 0
        clock.advance(5.0)
        assert await t.names(f"{DEMO_VISIT}/empty") == ["late.dat"]
        late = await t.walk(f"{DEMO_VISIT}/empty/late.dat")
        assert late.st_size == 7
        # a change of size shows in getattr once the listing expired
        root.update({"Datafile": {"id": fid, "fileSize": 9}})
        assert (await t.ops.getattr(late.st_ino, t.ctx)).st_size == 7
        clock.advance(5.0)
        assert (await t.ops.getattr(late.st_ino, t.ctx)).st_size == 9
        # a deleted file: gone from lookups; getattr of the known inode keeps its last state
        root.delete({"Datafile": {"id": fid}})
        clock.advance(5.0)
        assert (await t.lookup(empty, "late.dat")).st_ino == 0
        assert (await t.ops.getattr(late.st_ino, t.ctx)).st_size == 9

    try:
        t.run(body)
    finally:
        root.close()


def test_invalidate_drops_listings(fresh_emu, tree) -> None:
    t = tree(fresh_emu)
    root = login(fresh_emu, "root")

    async def body(t: Tree) -> None:
        names = await t.names(f"{DEMO_VISIT}/processed data/sub/dir")
        assert names == ["result.csv"]
        (did,) = root.search("SELECT ds.id FROM Dataset ds WHERE ds.name = 'processed data'")
        root.create({"Datafile": {"name": "sub/dir/new.csv", "dataset": {"id": did},
                                  "location": "x/new", "fileSize": 1}})
        assert await t.names(f"{DEMO_VISIT}/processed data/sub/dir") == ["result.csv"]
        folder = (await t.walk(f"{DEMO_VISIT}/processed data/sub/dir"))
        # invalidating a folder drops its whole dataset
        from idsfs.catalog import Kind, NodeKey

        t.catalog.invalidate(NodeKey(Kind.FOLDER, did, ("sub", "dir")))
        assert await t.names(f"{DEMO_VISIT}/processed data/sub/dir") == ["new.csv",
                                                                       "result.csv"]
        assert (await t.walk(f"{DEMO_VISIT}/processed data/sub/dir")).st_ino == folder.st_ino
        assert await t.names("DEMO/DEMO-2025-003/2025A") == ["raw"]
        (iid,) = root.search("SELECT inv.id FROM Investigation inv WHERE inv.visitId = '2025A'")
        (tid,) = root.search("SELECT t.id FROM DatasetType t WHERE t.name = 'raw'")
        root.create({"Dataset": {"name": "added", "complete": False,
                                 "investigation": {"id": iid}, "type": {"id": tid}}})
        assert await t.names("DEMO/DEMO-2025-003/2025A") == ["raw"]
        t.catalog.invalidate(NodeKey(Kind.INVESTIGATION, iid))
        assert await t.names("DEMO/DEMO-2025-003/2025A") == ["added", "raw"]
        t.catalog.invalidate_all()
        assert t.catalog.stats().cached == 0

    try:
        t.run(body)
    finally:
        root.close()


def test_readdir_offsets_stay_stable_while_the_catalogue_changes(fresh_emu, tree) -> None:
    root = login(fresh_emu, "root")
    (did,) = root.search("SELECT ds.id FROM Dataset ds WHERE ds.name = 'empty'")
    ids = root.create([{"Datafile": {"name": f"f{i:02d}", "dataset": {"id": did},
                                     "location": f"x/{i}", "fileSize": 1}} for i in range(30)])
    clock = FakeClock()
    t = tree(fresh_emu, metadata_ttl=1.0, clock=clock)

    async def body(t: Tree) -> None:
        empty = await t.ino(f"{DEMO_VISIT}/empty")
        fh = await t.ops.opendir(empty, t.ctx)
        first = await t.readdir_from(fh, 0, capacity=12)
        assert [n for n, _, _ in first][:4] == [b".", b"..", b"f00", b"f01"]
        # the catalogue changes: files deleted before and after the offset, new ones added
        root.delete([{"Datafile": {"id": i}} for i in (ids[0], ids[5], ids[20])])
        root.create([{"Datafile": {"name": n, "dataset": {"id": did}, "location": "x/n",
                                   "fileSize": 1}} for n in ("a-new", "f15b", "zz-new")])
        clock.advance(2.0)
        # a second handle sees the change ...
        other = await t.readdir_all(empty)
        other_names = [n.decode() for n, _, _ in other if n not in (b".", b"..")]
        assert "a-new" in other_names and "f00" not in other_names
        # ... while the first one goes on exactly where it stopped, from its snapshot
        rest = await t.readdir_from(fh, first[-1][2], capacity=5, until_end=True)
        names = [n.decode() for n, _, _ in first + rest if n not in (b".", b"..")]
        assert names == [f"f{i:02d}" for i in range(30)]
        # restarting at any offset it gave replays the same entries
        again = await t.readdir_from(fh, first[5][2], capacity=100)
        assert [n for n, _, _ in again] == [n for n, _, _ in (first + rest)[6:]]
        await t.ops.releasedir(fh)
        with pytest.raises(pyfuse3.FUSEError):
            await t.ops.readdir(fh, 0, object())

    try:
        t.run(body)
    finally:
        root.close()


def test_concurrent_requests_share_one_fetch(demo_emu, tree) -> None:
    t = tree(demo_emu)

    async def body(t: Tree) -> None:
        raw = await t.ino(f"{DEMO_VISIT}/processed data")
        t.catalog.invalidate_all()
        demo_emu.counters.reset()
        results = []

        async def one(name: str) -> None:
            results.append((await t.lookup(raw, name)).st_ino)

        async with trio.open_nursery() as nursery:
            for name in ("it's mine.txt", "sub", "nope", "reduced_0001.dat") * 4:
                nursery.start_soon(one, name)
        assert icat_searches(demo_emu) == 1
        assert len(results) == 16 and results.count(0) == 4

    t.run(body)


def test_investigation_name_directory_refetched_by_its_own_query(odd_emu, tree) -> None:
    """An investigation-name listing comes with the facility's, or alone by name (quoted)."""
    from idsfs.catalog import Kind, NodeKey

    emu, odd = odd_emu
    t = tree(emu)

    async def body(t: Tree) -> None:
        assert "O'Neil%00x" in await t.names("ODD")
        emu.counters.reset()
        assert await t.names("ODD/O'Neil%00x") == ["1"]  # filled by the facility listing
        assert icat_searches(emu) == 0
        for name in ("O'Neil\x00x", "same", ".."):
            t.catalog.invalidate(NodeKey(Kind.NAME, odd.facility, (name,)))
        assert await t.names("ODD/O'Neil%00x") == ["1"]
        assert await t.names("ODD/same") == ["N%2FA", "a", "b"]
        assert await t.names("ODD/%2E%2E") == ["%2E"]
        assert icat_searches(emu) == 3
        x = await t.xattrs(await t.ino("ODD/O'Neil%00x/1"))
        assert x["user.ids.name"] == "O'Neil\x00x"

    t.run(body)

"""idsfs.catalog on its own: memory of long-running mounts, keyset paging.

The catalogue talks HTTP to the emulator of the ``emulator`` fixture
(tests/conftest.py) through a real :class:`~idsfs.icat.ICATClient`; a fake
clock moves time past the listing TTL. The tests of the paging cursor against a
misbehaving server use a tiny ICAT stand-in instead (see there why).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from fshelp import FakeClock

from idsfs.aio import ThreadBridge
from idsfs.catalog import ROOT_KEY, Catalog, Kind, Node, NodeKey
from idsfs.errors import ICATResponseError
from idsfs.icat import ICATClient

TTL = 10.0


@dataclass
class Site:
    """Facility ``F`` with investigations ``A`` (visit 1) and ``B`` (visit 2).

    ``A`` holds :data:`DATASETS` datasets ``d00``, ``d01``, ... of three
    datafiles each: ``top.dat``, ``sub/one.dat``, ``sub/deeper/two.dat``.
    """

    icat: ICATClient
    facility: int
    investigations: dict[str, int]
    datasets: list[int]


DATASETS = 12


@pytest.fixture
def site(emulator: Any) -> Any:
    icat = ICATClient(emulator.icat_url, backoff=0.01)
    icat.login("simple", {"username": "root", "password": "root-secret"})
    fac = icat.create({"Facility": {"name": "F"}})
    itype = icat.create({"InvestigationType": {"name": "exp", "facility": {"id": fac}}})
    dtype = icat.create({"DatasetType": {"name": "raw", "facility": {"id": fac}}})
    invs = {name: icat.create({"Investigation": {
        "name": name, "visitId": visit, "title": name, "facility": {"id": fac},
        "type": {"id": itype}}}) for name, visit in (("A", "1"), ("B", "2"))}
    datasets = icat.create([{"Dataset": {"name": f"d{i:02d}", "investigation": {"id": invs["A"]},
                                         "type": {"id": dtype}, "complete": False}}
                            for i in range(DATASETS)])
    icat.create([{"Datafile": {"name": name, "dataset": {"id": ds}, "location": f"{ds}/{n}",
                               "fileSize": 10 + n}}
                 for ds in datasets
                 for n, name in enumerate(("top.dat", "sub/one.dat", "sub/deeper/two.dat"))])
    try:
        yield Site(icat, fac, invs, list(datasets))
    finally:
        icat.close()


def run(icat: Any, body: Callable[[Catalog, FakeClock], Awaitable[Any]], **options: Any) -> Any:
    """Run ``body(catalog, clock)`` under trio with a fresh catalogue on ``icat``."""
    clock = FakeClock()

    async def main() -> Any:
        catalog = Catalog(icat, ThreadBridge(), clock=clock, **options)
        return await body(catalog, clock)

    return trio.run(main)


async def list_down(catalog: Catalog, key: NodeKey) -> int:
    """List ``key`` and every directory below it; return how many were listed."""
    listing = await catalog.listing(key)
    assert listing is not None
    return 1 + sum([await list_down(catalog, node.key) for node in listing.entries
                    if node.is_dir])


# ------------------------------------------------------------------ memory


def test_expired_listings_take_their_parents_and_usage_along(site: Site) -> None:
    async def body(catalog: Catalog, clock: FakeClock) -> None:
        fac = NodeKey(Kind.FACILITY, site.facility)
        name_a = NodeKey(Kind.NAME, site.facility, ("A",))
        inv_a = NodeKey(Kind.INVESTIGATION, site.investigations["A"])
        assert await list_down(catalog, ROOT_KEY) == 1 + 1 + 2 + 2 + DATASETS * 3
        everything = catalog.usage()
        assert everything.files == DATASETS * 3
        # a long-running mount: time passes, one dataset is looked at now and then
        high_parents = high_usage = 0
        for ds in site.datasets:
            clock.advance(TTL + 1)
            assert await list_down(catalog, NodeKey(Kind.DATASET, ds)) == 3
            high_parents = max(high_parents, len(catalog._parents))
            high_usage = max(high_usage, len(catalog._usage))
        # only what the cached listings hold is remembered
        assert set(catalog._listings) == {NodeKey(Kind.DATASET, site.datasets[-1]),
                                          NodeKey(Kind.FOLDER, site.datasets[-1], ("sub",)),
                                          NodeKey(Kind.FOLDER, site.datasets[-1],
                                                  ("sub", "deeper"))}
        assert set(catalog._usage) <= set(catalog._listings)
        assert len(catalog._parents) == 2  # sub and sub/deeper of the last dataset
        assert high_parents <= 2 and high_usage <= 2
        usage = catalog.usage()
        assert (usage.files, usage.bytes) == (3, 10 + 11 + 12)
        # what was forgotten is still found: '..' of a directory whose parents expired
        first = NodeKey(Kind.DATASET, site.datasets[0])
        assert catalog.parent_of(first) is None
        assert catalog.parent_of(inv_a) is None
        node = await catalog.resolve(first)
        assert node is not None and node.name == "d00" and node.parent == inv_a
        node = await catalog.resolve(inv_a)
        assert node is not None and node.name == "1" and node.parent == name_a
        node = await catalog.resolve(name_a)
        assert node is not None and node.name == "A" and node.parent == fac
        node = await catalog.resolve(fac)
        assert node is not None and node.name == "F" and node.parent == ROOT_KEY
        deeper = NodeKey(Kind.FOLDER, site.datasets[1], ("sub", "deeper"))
        node = await catalog.resolve(deeper)
        assert node is not None and node.name == "deeper"
        assert node.parent == NodeKey(Kind.FOLDER, site.datasets[1], ("sub",))

    run(site.icat, body, metadata_ttl=TTL)


def test_local_directories_keep_their_parent_through_pruning(site: Site) -> None:
    async def body(catalog: Catalog, clock: FakeClock) -> None:
        ds = NodeKey(Kind.DATASET, site.datasets[0])
        await list_down(catalog, ds)
        made = NodeKey(Kind.FOLDER, site.datasets[0], ("made here",))
        catalog.add_local(Node(made, ds, "made here"))
        for other in site.datasets[1:4]:
            clock.advance(TTL + 1)
            await list_down(catalog, NodeKey(Kind.DATASET, other))
        assert ds not in catalog._listings
        assert catalog.parent_of(made) == ds
        listing = await catalog.listing(ds)
        assert listing is not None and listing.get("made here") is not None

    run(site.icat, body, metadata_ttl=TTL)


# ------------------------------------------------------------------ keyset paging


class PagingICAT:
    """An ICAT stand-in that answers every facility search with ``pages`` in turn.

    The emulator pages correctly and cannot be made to send ids that do not
    grow; Catalog takes its ICAT client as a parameter, so this object tests
    the cursor logic alone (``properties`` and ``search`` are all it uses).
    A catalogue that keeps asking past ``limit`` searches fails the test
    instead of hanging it.
    """

    def __init__(self, pages: list[list[tuple[Any, ...]]], limit: int = 50) -> None:
        self.pages = pages
        self.queries: list[str] = []
        self.limit = limit

    def properties(self) -> dict[str, Any]:
        return {"maxEntities": 1000}

    def search(self, query: str) -> list[Any]:
        self.queries.append(query)
        if len(self.queries) > self.limit:
            raise AssertionError(f"paging did not end after {self.limit} searches")
        index = min(len(self.queries), len(self.pages)) - 1
        return list(self.pages[index])


def facility(fid: int) -> tuple[Any, ...]:
    return (fid, f"F{fid}", None, None, "2024-01-02T03:04:05+00:00")


@pytest.mark.parametrize("pages", [
    [[facility(1), facility(2), facility(3)]],  # the same full page again and again
    [[facility(1), facility(2), facility(3)], [facility(3), facility(2), facility(1)]],
    [[facility(5), facility(6), facility(7)], [facility(4), facility(7), facility(1)]],
], ids=["same-page", "repeated-ids", "smaller-ids"])
def test_a_full_page_that_does_not_move_the_cursor_is_an_error(pages) -> None:
    icat = PagingICAT(pages)

    async def body(catalog: Catalog, clock: FakeClock) -> None:
        with pytest.raises(ICATResponseError, match="paging would not end"):
            await catalog.listing(ROOT_KEY)

    run(icat, body, page_size=3)
    assert len(icat.queries) == 2
    assert " f.id > 0 " in icat.queries[0]
    after = max(row[0] for row in pages[0])
    assert f" f.id > {after} " in icat.queries[1]


def test_pages_whose_ids_grow_are_all_read() -> None:
    icat = PagingICAT([[facility(1), facility(2), facility(3)],
                       [facility(9), facility(4), facility(8)],
                       [facility(10)]])

    async def body(catalog: Catalog, clock: FakeClock) -> None:
        listing = await catalog.listing(ROOT_KEY)
        assert listing is not None
        assert [n.name for n in listing] == ["F1", "F10", "F2", "F3", "F4", "F8", "F9"]

    run(icat, body, page_size=3)
    assert [q.split(" f.id > ")[1].split()[0] for q in icat.queries] == ["0", "3", "9"]


# ------------------------------------------------------------------ changes during a fetch


class GatedICAT:
    """The real ICAT client, whose searches can be held after ICAT answered them."""

    def __init__(self, icat: ICATClient) -> None:
        self._icat = icat
        self.gate = False
        self.answered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._icat, name)

    def search(self, query: str) -> list[Any]:
        rows = self._icat.search(query)
        if self.gate:
            self.answered.set()
            self.release.wait(30)
        return rows


def test_a_change_made_while_a_listing_is_fetched_is_not_undone(site: Site) -> None:
    # ICAT answers a listing, then a file is deleted here before that answer is
    # stored: the stored answer must not bring the file back for a whole TTL.
    gated = GatedICAT(site.icat)
    key = NodeKey(Kind.DATASET, site.datasets[0])

    async def body(catalog: Catalog, clock: FakeClock) -> None:
        listing = await catalog.listing(key)
        assert listing is not None
        top = listing.get("top.dat")
        assert top is not None
        clock.advance(TTL + 1)  # the next listing is fetched
        gated.gate = True
        seen: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _collect(catalog, key, seen))
            await trio.to_thread.run_sync(gated.answered.wait)
            site.icat.delete({"Datafile": {"id": top.key.id}})  # as unlink does
            catalog.remove_datafile(site.datasets[0], top.key.id)
            gated.gate = False
            gated.release.set()
        # that request's answer predated the delete: it was asked again
        assert seen and seen[0].get("top.dat") is None
        again = await catalog.listing(key)
        assert again is not None and again.get("top.dat") is None
        assert again.get("sub") is not None

    run(gated, body, metadata_ttl=TTL)


async def _collect(catalog: Catalog, key: NodeKey, into: list[Any]) -> None:
    into.append(await catalog.listing(key))


def test_a_file_stored_while_a_listing_is_fetched_is_found(site: Site) -> None:
    # A lookup's listing is answered by ICAT just before a file is stored here:
    # the lookup must find the file (touch right after `: > f` got ENOENT).
    gated = GatedICAT(site.icat)
    key = NodeKey(Kind.DATASET, site.datasets[0])

    async def body(catalog: Catalog, clock: FakeClock) -> None:
        assert await catalog.listing(key) is not None
        clock.advance(TTL + 1)  # the next lookup fetches
        gated.gate = True
        found: list[Any] = []

        async def look() -> None:
            found.append(await catalog.lookup(key, "new.dat"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look)
            await trio.to_thread.run_sync(gated.answered.wait)
            gated.gate = False  # (the lookup's answer stays held)
            new_id = _store(site, "new.dat")  # as an upload landing does
            await catalog.datafile_added(site.datasets[0], new_id)
            gated.release.set()
        assert found and found[0] is not None and found[0].key.id == new_id

    run(gated, body, metadata_ttl=TTL)


def _store(site: Site, name: str) -> int:
    """Register a datafile ``name`` (with a location) in the first dataset; its id."""
    ds = site.datasets[0]
    return int(site.icat.create({"Datafile": {"name": name, "dataset": {"id": ds},
                                              "location": f"{ds}/{name}", "fileSize": 5}}))

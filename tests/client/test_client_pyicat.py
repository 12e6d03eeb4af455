"""Side by side with python-icat's ``icat.ids.IDSClient`` on the same emulator:
the same calls give the same results and the same exception class names."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest

icat_ids = pytest.importorskip("icat.ids")

from idsfs import ids as our_ids  # noqa: E402


@pytest.fixture
def pair(world) -> tuple[Any, Any]:
    theirs = icat_ids.IDSClient(world.emu.ids_url, sessionId=world.root)
    ours = our_ids.IDSClient(world.emu.ids_url, sessionId=world.root)
    return ours, theirs


def both(pair: tuple[Any, Any], call: Callable[[Any, Any], Any]) -> tuple[Any, Any]:
    """Run ``call(client, selection_module)`` on both clients; results or error names."""
    out = []
    for client, module in zip(pair, (our_ids, icat_ids), strict=True):
        try:
            out.append(call(client, module))
        except Exception as exc:  # the class name is what must agree
            out.append(("raised", type(exc).__name__))
    return out[0], out[1]


def test_same_answers(world, pair) -> None:
    inv, ds1, ds3, df1 = world.inv, world.ds1, world.ds3, world.df[1]
    calls: list[Callable[[Any, Any], Any]] = [
        lambda c, m: c.ping(),
        lambda c, m: c.version(),
        lambda c, m: c.getApiVersion(),
        lambda c, m: str(c.apiversion),
        lambda c, m: c.getIcatUrl(),
        lambda c, m: c.isReadOnly(),
        lambda c, m: c.isTwoLevel(),
        lambda c, m: c.getServiceStatus(),
        lambda c, m: c.getSize(m.DataSelection({"investigationIds": [inv]})),
        lambda c, m: c.getSize(m.DataSelection({"datasetIds": [ds1, ds3]})),
        lambda c, m: c.getStatus(m.DataSelection({"datasetIds": [ds1]})),
        lambda c, m: sorted(c.getDatafileIds(m.DataSelection({"investigationIds": [inv]}))),
        lambda c, m: c.isPrepared(c.prepareData(m.DataSelection({"datafileIds": [df1]}))),
        lambda c, m: c.getData(m.DataSelection({"datafileIds": [df1]})).read(),
        lambda c, m: c.getData(m.DataSelection({"datafileIds": [df1]}), offset=7).read(),
        lambda c, m: c.getData(c.prepareData(m.DataSelection({"datafileIds": [df1]})),
                               offset=3).read(),
        lambda c, m: c.getData(m.DataSelection({"datafileIds": [df1]}), offset=500).read(),
        lambda c, m: c.reset(m.DataSelection({"datasetIds": [ds1]})),
        # errors
        lambda c, m: c.isPrepared("-=- INVALID ID -=-"),
        lambda c, m: c.getData(m.DataSelection({"datasetIds": [-11]})),
        lambda c, m: c.getSize("aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"),
        lambda c, m: c.archive(m.DataSelection({"datasetIds": [ds1]})),
        lambda c, m: c.write(m.DataSelection({"datasetIds": [ds1]})),
        lambda c, m: c.getLink(df1),
        lambda c, m: c.getSize([1]),
    ]
    for i, call in enumerate(calls):
        ours, theirs = both(pair, call)
        assert ours == theirs, f"call #{i}: ours {ours!r} != python-icat {theirs!r}"


def test_same_answers_for_other_users(world) -> None:
    sel = {"datafileIds": [world.df[1], world.df[2]]}
    for session in (world.forbidden, world.alice, "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"):
        pair = (our_ids.IDSClient(world.emu.ids_url, session),
                icat_ids.IDSClient(world.emu.ids_url, session))
        for call in (lambda c, m: c.getSize(m.DataSelection(sel)),
                     lambda c, m: c.getServiceStatus(),
                     lambda c, m: c.getStatus(m.DataSelection(sel))):
            ours, theirs = both(pair, call)
            assert ours == theirs


def test_no_session_behaviour(world) -> None:
    pair = (our_ids.IDSClient(world.emu.ids_url), icat_ids.IDSClient(world.emu.ids_url))
    sel = {"datasetIds": [world.ds1]}
    assert both(pair, lambda c, m: c.getStatus(m.DataSelection(sel))) == ("ONLINE", "ONLINE")
    ours, theirs = both(pair, lambda c, m: c.getSize(m.DataSelection(sel)))
    assert ours == theirs == ("raised", "RuntimeError")


def test_zip_downloads_hold_the_same_files(world, pair) -> None:
    import zipfile

    contents = []
    for client, module in zip(pair, (our_ids, icat_ids), strict=True):
        data = client.getData(module.DataSelection({"datasetIds": [world.ds1, world.ds2]}),
                              compressFlag=True).read()
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            contents.append(sorted((n, z.read(n)) for n in z.namelist()))
    assert contents[0] == contents[1] and len(contents[0]) == 4


def test_put_and_delete_agree(world, pair) -> None:
    data = bytes(range(256)) * 4000
    ids = []
    for n, client in enumerate(pair):
        ids.append(client.put(io.BytesIO(data), f"up{n}.bin", world.ds3, world.fmt,
                              description="same", datafileModTime=1_700_000_000_000))
    dfs = [world.icat.get("Datafile", i) for i in ids]
    assert dfs[0].checksum == dfs[1].checksum and dfs[0].fileSize == dfs[1].fileSize
    assert dfs[0].datafileModTime == dfs[1].datafileModTime
    assert dfs[0].description == dfs[1].description == "same"
    # each client reads what the other wrote
    with pair[0].getData(our_ids.DataSelection({"datafileIds": [ids[1]]})) as stream:
        assert stream.read() == data
    response = pair[1].getData(icat_ids.DataSelection({"datafileIds": [ids[0]]}))
    try:
        assert response.read() == data
    finally:
        response.close()
    # the server drops a download's shared lock only after it has sent the last byte,
    # which may be after the client has read it: a delete at once may find "Data is busy"
    world.wait_idle(locks=True)
    pair[0].delete(our_ids.DataSelection({"datafileIds": [ids[1]]}))
    pair[1].delete(icat_ids.DataSelection({"datafileIds": [ids[0]]}))
    for i in ids:
        ours, theirs = both(pair, lambda c, m, i=i: c.getSize(m.DataSelection({"datafileIds":
                                                                                [i]})))
        assert ours == theirs == ("raised", "IDSNotFoundError")


def test_same_data_urls(world, pair) -> None:
    from urllib.parse import parse_qs, urlsplit

    for sel in ({"datafileIds": [world.df[1]]}, {"datasetIds": [world.ds1]}):
        urls = [c.getDataUrl(m.DataSelection(sel), compressFlag=True, zipFlag=True,
                             outname="o") for c, m in zip(pair, (our_ids, icat_ids),
                                                           strict=True)]
        parts = [urlsplit(u) for u in urls]
        assert parts[0].path == parts[1].path
        assert parse_qs(parts[0].query) == parse_qs(parts[1].query)

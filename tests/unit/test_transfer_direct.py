"""DataStream's direct socket reads (the body taken with blocking recv, with
MSG_WAITALL when ``fill_whole`` is set as the transfer's stream threads do, once
http.client's buffer is empty): exact
bytes, the connection given back to the pool with its timeout, read timeouts
and abort() of a blocked read."""

from __future__ import annotations

import threading
import time

import pytest
from transferkit import MiB, World, make_world, random_bytes

from idsfs.errors import ConnectionLostError, TransportTimeoutError
from idsfs.ids import DataSelection


@pytest.fixture
def world(emulator) -> World:
    return make_world(emulator)


def _read_all(ds, chunk: int) -> bytes:
    out = bytearray()
    buf = bytearray(chunk)
    while True:
        n = ds.readinto(buf)
        if not n:
            return bytes(out)
        out += buf[:n]


@pytest.mark.parametrize("fill_whole", [True, False])
@pytest.mark.parametrize("chunk", [1 << 20, 64 << 10, 1000])
def test_direct_reads_give_the_exact_body_and_keep_the_connection(world: World, chunk: int,
                                                                  fill_whole: bool) -> None:
    data = random_bytes(3 * MiB + 12345)
    df = world.put(f"direct-{chunk}-{fill_whole}.bin", data)
    client = world.client(timeout=(5.0, 7.5))
    try:
        sel = DataSelection({"datafileIds": [df.id]})
        ds = client.getData(sel)
        ds.fill_whole = fill_whole
        sock = ds._sock
        assert sock is not None
        port = sock.getsockname()
        assert _read_all(ds, chunk) == data
        # the socket has its read timeout again, and the next request reuses it
        assert sock.gettimeout() == pytest.approx(7.5)
        ds.close()
        ds2 = client.getData(sel, offset=MiB)
        assert ds2._sock is not None and ds2._sock.getsockname() == port
        assert _read_all(ds2, chunk) == data[MiB:]
        ds2.close()
    finally:
        client.close()


@pytest.mark.parametrize("fill_whole", [True, False])
def test_a_stalled_body_times_out_after_the_read_timeout(world: World, fill_whole: bool) -> None:
    data = random_bytes(4 * MiB)
    df = world.put(f"direct-stall-{fill_whole}.bin", data)
    client = world.client(timeout=(5.0, 0.5))
    try:
        world.emu.faults.stall(after_bytes=2 * MiB + 100, endpoint="ids/getData", count=1)
        ds = client.getData(DataSelection({"datafileIds": [df.id]}))
        ds.fill_whole = fill_whole
        buf = bytearray(MiB)
        assert ds.readinto(buf) == MiB and bytes(buf) == data[:MiB]
        assert ds.readinto(buf) == MiB and bytes(buf) == data[MiB:2 * MiB]
        start = time.monotonic()
        with pytest.raises(TransportTimeoutError):
            while ds.readinto(buf):
                pass
        assert time.monotonic() - start < 3.0
        ds.close()
    finally:
        world.emu.faults.release_stalls()
        world.emu.faults.clear()
        client.close()


@pytest.mark.parametrize("fill_whole", [True, False])
def test_abort_breaks_off_a_blocked_direct_read(world: World, fill_whole: bool) -> None:
    data = random_bytes(4 * MiB)
    df = world.put(f"direct-abort-{fill_whole}.bin", data)
    client = world.client(timeout=(5.0, 30.0))
    try:
        world.emu.faults.stall(after_bytes=MiB + 100, endpoint="ids/getData", count=1)
        ds = client.getData(DataSelection({"datafileIds": [df.id]}))
        ds.fill_whole = fill_whole
        buf = bytearray(MiB)
        assert ds.readinto(buf) == MiB  # direct reads are on from here
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                while ds.readinto(buf):
                    pass
            except BaseException as exc:
                errors.append(exc)

        reader = threading.Thread(target=blocked)
        reader.start()
        time.sleep(0.3)
        assert reader.is_alive()  # blocked in the stall
        ds.abort()
        reader.join(5.0)
        assert not reader.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], ConnectionLostError)
        ds.close()
    finally:
        world.emu.faults.release_stalls()
        world.emu.faults.clear()
        client.close()

"""Tests of idsfs.aio: the bounded, counted bridge from trio to blocking calls."""

from __future__ import annotations

import functools
import logging
import threading
import time

import pytest
import trio

from idsfs.aio import DEFAULT_MAX_THREADS, CallTimeoutError, ThreadBridge

WAIT = 10.0  # seconds a blocking test function waits at most for its release


async def wait_until(predicate, timeout: float = WAIT) -> None:
    """Poll ``predicate`` on the trio thread until it is true."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def test_run_returns_result_and_counts() -> None:
    async def main() -> None:
        bridge = ThreadBridge()
        assert bridge.max_threads == DEFAULT_MAX_THREADS
        caller_thread = threading.get_ident()
        worker_threads: list[int] = []

        def add(a: int, b: int) -> int:
            worker_threads.append(threading.get_ident())
            return a + b

        assert await bridge.run(add, 2, 3) == 5
        assert await bridge.run(functools.partial(add, b=4), 1) == 5
        assert all(t != caller_thread for t in worker_threads)
        stats = bridge.stats()
        assert (stats.total, stats.completed, stats.failed, stats.in_flight) == (2, 2, 0, 0)
        assert stats.threads_busy == 0
        assert stats.peak_in_flight == 1

    trio.run(main)


def test_exception_propagates_unchanged() -> None:
    class Boom(Exception):
        pass

    async def main() -> None:
        bridge = ThreadBridge()
        original = Boom("x")

        def fail() -> None:
            raise original

        with pytest.raises(Boom) as info:
            await bridge.run(fail)
        assert info.value is original
        stats = bridge.stats()
        assert (stats.total, stats.failed, stats.completed, stats.abandoned_running) == (1, 1, 0, 0)

    trio.run(main)


def test_concurrency_is_bounded() -> None:
    async def main() -> None:
        bridge = ThreadBridge(max_threads=2)
        release = threading.Event()
        lock = threading.Lock()
        running = 0
        peak = 0

        def work(i: int) -> int:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            try:
                release.wait(WAIT)
                return i
            finally:
                with lock:
                    running -= 1

        results: list[int] = []

        async def one(i: int) -> None:
            results.append(await bridge.run(work, i))

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(one, i)
            await wait_until(lambda: bridge.stats().waiting == 4)
            stats = bridge.stats()
            assert stats.in_flight == 6
            assert stats.threads_busy == 2
            release.set()
        assert sorted(results) == list(range(6))
        assert peak == 2
        assert bridge.stats().peak_in_flight == 6

    trio.run(main)


def test_cancel_abandons_running_call() -> None:
    async def main() -> None:
        bridge = ThreadBridge(max_threads=1)
        started = threading.Event()
        release = threading.Event()
        finished = threading.Event()
        abandoned: list[str] = []

        def block() -> str:
            started.set()
            release.wait(WAIT)
            finished.set()
            return "late"

        with trio.CancelScope() as scope:

            async def cancel_when_started() -> None:
                await wait_until(started.is_set)
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_started)
                await bridge.run(block, on_abandon=lambda: abandoned.append("closed"))
                pytest.fail("the cancelled call returned")  # pragma: no cover
        assert scope.cancelled_caught
        assert abandoned == ["closed"]
        assert not finished.is_set()  # the caller did not wait for the thread
        stats = bridge.stats()
        assert stats.cancelled == 1
        assert stats.in_flight == 0
        assert stats.abandoned_running == 1
        assert stats.threads_busy == 1  # the abandoned thread keeps its slot

        # A new call must wait for the abandoned thread's slot.
        async def later() -> str:
            return await bridge.run(lambda: "next")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(later)
            await wait_until(lambda: bridge.stats().waiting == 1)
            release.set()
        await wait_until(lambda: bridge.stats().abandoned_running == 0)
        assert bridge.stats().threads_busy == 0

    trio.run(main)


def test_timeout_raises_call_timeout_error_without_arguments_in_message() -> None:
    async def main() -> None:
        bridge = ThreadBridge()
        release = threading.Event()

        def block(secret: str) -> str:
            release.wait(WAIT)
            return secret

        t0 = time.monotonic()
        with pytest.raises(CallTimeoutError) as info:
            await bridge.run(block, "session-123", timeout=0.05, name="ids.getData")
        assert time.monotonic() - t0 < WAIT / 2
        assert isinstance(info.value, TimeoutError)
        assert info.value.name == "ids.getData"
        assert info.value.timeout == 0.05
        assert "ids.getData" in str(info.value)
        assert "session-123" not in str(info.value)
        stats = bridge.stats()
        assert (stats.timed_out, stats.cancelled, stats.failed) == (1, 0, 0)
        assert stats.abandoned_running == 1
        release.set()
        await wait_until(lambda: bridge.stats().abandoned_running == 0)

    trio.run(main)


def test_timeout_not_reached_returns_result() -> None:
    async def main() -> None:
        bridge = ThreadBridge()
        assert await bridge.run(lambda: 7, timeout=WAIT) == 7
        assert bridge.stats().timed_out == 0

    trio.run(main)


def test_no_abandon_waits_and_returns_result() -> None:
    async def main() -> None:
        bridge = ThreadBridge()
        started = threading.Event()
        release = threading.Event()
        got: list[str] = []

        def write() -> str:
            started.set()
            release.wait(WAIT)
            return "stored"

        scope = trio.CancelScope()

        async def cancel_then_release() -> None:
            await wait_until(started.is_set)
            scope.cancel()
            await trio.sleep(0.05)
            assert not got  # still waiting for the thread despite the cancel
            release.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_then_release)
            with scope:
                got.append(await bridge.run(write, abandon_on_cancel=False))
                await trio.sleep(0)  # the next checkpoint delivers the cancellation
        assert got == ["stored"]
        assert scope.cancelled_caught
        stats = bridge.stats()
        assert stats.completed == 1
        assert stats.abandoned_running == 0

    trio.run(main)


def test_call_cancelled_while_waiting_for_a_thread_never_runs() -> None:
    async def main() -> None:
        bridge = ThreadBridge(max_threads=1)
        release = threading.Event()
        ran: list[str] = []

        def first() -> None:
            release.wait(WAIT)

        def second() -> None:
            ran.append("second")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge.run, first)
            await wait_until(lambda: bridge.stats().threads_busy == 1)
            with trio.move_on_after(0.05) as scope:
                await bridge.run(second)
            assert scope.cancelled_caught
            release.set()
        await trio.sleep(0.05)
        assert ran == []
        stats = bridge.stats()
        assert stats.cancelled == 1
        assert stats.abandoned_running == 0

    trio.run(main)


def test_on_abandon_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        bridge = ThreadBridge()
        release = threading.Event()

        def bad_close() -> None:
            raise RuntimeError("close failed")

        with pytest.raises(CallTimeoutError):
            await bridge.run(release.wait, WAIT, timeout=0.02, on_abandon=bad_close, name="x")
        release.set()
        await wait_until(lambda: bridge.stats().abandoned_running == 0)

    with caplog.at_level(logging.WARNING, logger="idsfs.aio"):
        trio.run(main)
    assert any("on_abandon of x failed" in r.getMessage() for r in caplog.records)


def test_on_abandon_not_called_for_finished_call() -> None:
    async def main() -> None:
        bridge = ThreadBridge()
        called: list[int] = []
        assert await bridge.run(lambda: 1, on_abandon=lambda: called.append(1)) == 1
        assert called == []

    trio.run(main)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_bad_max_threads(bad: object) -> None:
    with pytest.raises(ValueError, match="max_threads"):
        ThreadBridge(bad)  # type: ignore[arg-type]


def test_set_max_threads() -> None:
    async def main() -> None:
        bridge = ThreadBridge(2)
        bridge.set_max_threads(5)
        assert bridge.max_threads == 5
        assert bridge.stats().max_threads == 5
        with pytest.raises(ValueError):
            bridge.set_max_threads(0)

    trio.run(main)


def test_bad_timeouts() -> None:
    async def main() -> None:
        bridge = ThreadBridge()
        with pytest.raises(ValueError, match="timeout"):
            await bridge.run(lambda: 1, timeout=-1)
        with pytest.raises(ValueError, match="abandon_on_cancel"):
            await bridge.run(lambda: 1, timeout=1, abandon_on_cancel=False)
        assert bridge.stats().total == 0

    trio.run(main)

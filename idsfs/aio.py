"""The one bridge from trio to blocking calls.

The FUSE daemon runs on trio, while the IDS and ICAT clients (:mod:`idsfs.ids`,
:mod:`idsfs.icat`) are blocking code on ``requests``. Every blocking call the
daemon makes goes through a :class:`ThreadBridge`, which runs it in a worker
thread with :func:`trio.to_thread.run_sync`, bounded by one
:class:`trio.CapacityLimiter`. Besides these, the daemon starts only its log
writer thread and a short-lived logout thread at exit, and the modules below
this one (``ids``, ``icat``, ``errors``, ``model``) never import trio.

Cancellation
------------
A thread cannot be interrupted. When the trio task awaiting a call is cancelled
(a FUSE request interrupted, a per-call ``timeout`` expired, the daemon shutting
down), the bridge by default *abandons* the call (trio's ``abandon_on_cancel``):

* the awaiting task gets :class:`trio.Cancelled` (or :class:`CallTimeoutError`
  for a per-call timeout) at once;
* the blocking call keeps running in its thread until it returns by itself; its
  result or exception is dropped (an exception is logged at DEBUG level);
* the thread keeps its slot in the limiter until it really ends, so abandoned
  calls still count against ``max_threads``: the bound on threads holds even
  when callers give up.

For network calls this means: the HTTP request goes on until the server answers
or the client's own connect/read timeout fires, and the connection stays busy
that long. Every network call must therefore carry its own timeout in the
client, so that an abandoned thread always ends. A call that *changes* server
state (``put``, ``delete``, ICAT create/update/delete) may still take effect
after it was abandoned: the caller has to treat the outcome as unknown and check
the server state, or run such calls with ``abandon_on_cancel=False``, which makes
cancellation wait until the call returns and then hands back its result (the
cancellation is delivered at the caller's next checkpoint).

``on_abandon`` lets a caller make an abandoned call end sooner, for example by
closing the response whose body the thread is reading; the callback runs on the
trio thread, only when the call was really abandoned while running.

A call whose caller is cancelled while it waits for a free thread never runs.

Thread safety
-------------
:class:`ThreadBridge` methods must be called from the trio thread. The only state
shared with worker threads is the per-call bookkeeping, guarded by a lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, TypeVarTuple

import trio

__all__ = [
    "DEFAULT_MAX_THREADS",
    "BridgeStats",
    "CallTimeoutError",
    "ThreadBridge",
]

log = logging.getLogger(__name__)

#: Default number of worker threads (blocking calls running at once).
DEFAULT_MAX_THREADS = 16

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class CallTimeoutError(TimeoutError):
    """A blocking call did not finish within the timeout given to :meth:`ThreadBridge.run`.

    The call was abandoned (see the module documentation): its thread may still
    be running. ``name`` is the call's name and ``timeout`` the limit in seconds.
    The message never contains the call's arguments. Raised by :meth:`ThreadBridge.run`.
    """

    def __init__(self, name: str, timeout: float) -> None:
        super().__init__(f"{name} did not finish within {timeout:g} s")
        self.name = name
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class BridgeStats:
    """A snapshot of a :class:`ThreadBridge`'s counters (for ``idsfs status``).

    Attributes:
        max_threads: the limiter's size.
        in_flight: calls awaited by trio tasks right now (waiting for a thread or running).
        waiting: of those, calls still waiting for a free thread.
        threads_busy: worker threads holding a slot, abandoned ones included.
        abandoned_running: abandoned calls whose thread has not ended yet.
        total: calls started since the bridge was made.
        completed: calls that returned a value to their caller.
        failed: calls that raised an exception to their caller.
        cancelled: calls whose caller was cancelled (not counting timeouts).
        timed_out: calls that exceeded their per-call timeout.
        peak_in_flight: the largest ``in_flight`` seen.
    """

    max_threads: int
    in_flight: int
    waiting: int
    threads_busy: int
    abandoned_running: int
    total: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    peak_in_flight: int


class _CallState:
    """Bookkeeping of one call, shared between the trio thread and its worker thread."""

    __slots__ = ("abandoned", "finished", "given_up", "name", "started")

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False  # the worker thread began running the function
        self.finished = False  # the function returned or raised
        self.given_up = False  # the caller stopped waiting (cancel or timeout)
        self.abandoned = False  # given up while the function was running


class _Skipped(Exception):
    """Raised in a worker thread whose caller gave up before the call began."""


class ThreadBridge:
    """Runs blocking calls in worker threads for trio code, bounded and counted.

    Args:
        max_threads: the most blocking calls running at once (default
            :data:`DEFAULT_MAX_THREADS`); further calls wait for a free thread.

    Raises:
        ValueError: if ``max_threads`` is less than 1.
    """

    def __init__(self, max_threads: int = DEFAULT_MAX_THREADS) -> None:
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise ValueError(f"max_threads must be an integer >= 1, not {max_threads!r}")
        self._limiter = trio.CapacityLimiter(max_threads)
        self._lock = threading.Lock()
        self._abandoned_running = 0
        self._in_flight = 0
        self._peak_in_flight = 0
        self._total = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._timed_out = 0

    @property
    def max_threads(self) -> int:
        """The most blocking calls that run at once. Never raises."""
        return int(self._limiter.total_tokens)

    def set_max_threads(self, max_threads: int) -> None:
        """Change the number of worker threads; running calls are not affected.

        Raises:
            ValueError: if ``max_threads`` is less than 1.
        """
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise ValueError(f"max_threads must be an integer >= 1, not {max_threads!r}")
        self._limiter.total_tokens = max_threads

    async def run(
        self,
        fn: Callable[[*Ts], T],
        *args: *Ts,
        timeout: float | None = None,
        abandon_on_cancel: bool = True,
        on_abandon: Callable[[], object] | None = None,
        name: str | None = None,
    ) -> T:
        """Run ``fn(*args)`` in a worker thread and return its result.

        Must be awaited from the trio thread. The call first waits for a free
        thread (at most ``max_threads`` run at once), then runs; the calling
        task sleeps meanwhile and other tasks go on.

        Args:
            fn: the blocking function.
            *args: its positional arguments (use :func:`functools.partial` for
                keyword arguments).
            timeout: seconds after which the caller stops waiting and gets
                :class:`CallTimeoutError`; it covers the wait for a free thread
                and the call itself. ``None`` means no limit here (the client's
                own timeouts still apply).
            abandon_on_cancel: ``True`` (default): a cancelled or timed-out call
                is abandoned as the module documentation describes. ``False``:
                cancellation waits until ``fn`` returns, and the result is
                returned; use it for calls whose outcome must be known (writes).
            on_abandon: called on the trio thread when the call is abandoned
                while running, to make the blocking call end early (e.g. close
                the stream it reads). Its exceptions are logged, not raised.
            name: a short name for logs, thread names and error messages
                (default: ``fn``'s name). Never pass secrets here.

        Returns:
            Whatever ``fn`` returns.

        Raises:
            Exception: whatever ``fn`` raises, unchanged.
            CallTimeoutError: the ``timeout`` expired (call abandoned).
            trio.Cancelled: the calling task was cancelled (call abandoned, or
                never started if it was still waiting for a thread).
            ValueError: ``timeout`` is negative, or given with
                ``abandon_on_cancel=False`` (such a call cannot be timed out).
        """
        if timeout is not None:
            if timeout < 0:
                raise ValueError(f"timeout must be >= 0, not {timeout!r}")
            if not abandon_on_cancel:
                raise ValueError("a timeout needs abandon_on_cancel=True")
        call_name = name or getattr(fn, "__name__", None) or "blocking call"
        state = _CallState(call_name)

        def worker() -> T:
            with self._lock:
                if state.given_up:
                    raise _Skipped
                state.started = True
            try:
                return fn(*args)
            except BaseException as exc:
                if state.abandoned:
                    log.debug("abandoned call %s ended with %s", call_name, type(exc).__name__)
                raise
            finally:
                with self._lock:
                    state.finished = True
                    if state.abandoned:
                        self._abandoned_running -= 1

        self._total += 1
        self._in_flight += 1
        self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        timed_out = False
        try:
            with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
                try:
                    result = await trio.to_thread.run_sync(
                        worker,
                        abandon_on_cancel=abandon_on_cancel,
                        limiter=self._limiter,
                        thread_name=f"idsfs {call_name}",
                    )
                except BaseException:
                    self._give_up(state, on_abandon)
                    raise
            if scope.cancelled_caught:
                timed_out = True
                assert timeout is not None
                raise CallTimeoutError(call_name, timeout)
        except trio.Cancelled:
            self._cancelled += 1
            raise
        except CallTimeoutError:
            if timed_out:
                self._timed_out += 1
            else:
                self._failed += 1
            raise
        except BaseException:
            self._failed += 1
            raise
        else:
            self._completed += 1
            return result
        finally:
            self._in_flight -= 1

    def _give_up(self, state: _CallState, on_abandon: Callable[[], object] | None) -> None:
        """Record that the caller stopped waiting; call ``on_abandon`` if the call still runs."""
        with self._lock:
            if state.finished:
                return  # the call ended with an exception: nothing abandoned
            state.given_up = True
            if state.started:
                state.abandoned = True
                self._abandoned_running += 1
        if state.abandoned:
            log.debug("abandoned call %s (still running in its thread)", state.name)
            if on_abandon is not None:
                try:
                    on_abandon()
                except Exception:  # logged: the cancellation must go on
                    log.warning("on_abandon of %s failed", state.name, exc_info=True)

    def stats(self) -> BridgeStats:
        """Return a snapshot of the counters. Call from the trio thread. Never raises."""
        with self._lock:
            abandoned_running = self._abandoned_running
        return BridgeStats(
            max_threads=self.max_threads,
            in_flight=self._in_flight,
            waiting=self._limiter.statistics().tasks_waiting,
            threads_busy=int(self._limiter.borrowed_tokens),
            abandoned_running=abandoned_running,
            total=self._total,
            completed=self._completed,
            failed=self._failed,
            cancelled=self._cancelled,
            timed_out=self._timed_out,
            peak_in_flight=self._peak_in_flight,
        )

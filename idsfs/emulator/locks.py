"""Dataset locks of the IDS emulator (ids-protocol.md §8).

Locks are per dataset id and of type SHARED or EXCLUSIVE. A SHARED lock is granted when the
dataset is unlocked or SHARED-locked; an EXCLUSIVE lock only when it is not locked at all.
Nobody ever waits: a lock that cannot be granted raises :class:`AlreadyLockedError` at once, which
the IDS API turns into 503 ``DataNotOnlineException`` "Data is busy".

Public API:

* :class:`LockType` — ``SHARED`` / ``EXCLUSIVE``.
* :class:`LockManager` — ``lock(ds_id, type)``, ``lock_all(ds_ids, type)`` (all or nothing),
  ``info()`` (for getServiceStatus).
* :class:`Lock` / :class:`LockSet` — ``release()`` (idempotent, thread-safe); usable as context
  managers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

__all__ = ["AlreadyLockedError", "Lock", "LockInfo", "LockManager", "LockSet", "LockType"]


class LockType(Enum):
    """Kind of dataset lock. ``LockType(value)`` raises ``ValueError`` for an unknown value."""

    SHARED = "SHARED"
    EXCLUSIVE = "EXCLUSIVE"


class AlreadyLockedError(Exception):
    """A lock could not be granted because of a conflicting lock on ``ds_id``.

    Raised by :meth:`LockManager.lock` and :meth:`LockManager.lock_all`.
    """

    def __init__(self, ds_id: int) -> None:
        super().__init__(f"dataset {ds_id} is locked")
        self.ds_id = ds_id


@dataclass(frozen=True)
class LockInfo:
    """Snapshot of one locked dataset: its id, the lock type and how many holders.

    Constructing one never raises.
    """

    id: int
    type: LockType
    count: int


class Lock:
    """One granted lock; :meth:`release` gives it back (a second call does nothing).

    Constructing one never raises (the manager makes them).
    """

    def __init__(self, manager: LockManager, ds_id: int, type_: LockType) -> None:
        self._manager = manager
        self.ds_id = ds_id
        self.type = type_
        self._released = False
        self._guard = threading.Lock()

    def release(self) -> None:
        """Release the lock; idempotent. Never raises."""
        with self._guard:
            if self._released:
                return
            self._released = True
        self._manager._release(self.ds_id)

    def __enter__(self) -> Lock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class LockSet:
    """Locks on several datasets, released together. Constructing one never raises."""

    def __init__(self, locks: list[Lock]) -> None:
        self.locks = locks

    def release(self) -> None:
        """Release every lock of the set; idempotent. Never raises."""
        for lock in self.locks:
            lock.release()

    def __enter__(self) -> LockSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class LockManager:
    """Grants and tracks dataset locks; thread-safe, never blocks. Constructing one never raises."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[int, tuple[LockType, int]] = {}

    def lock(self, ds_id: int, type_: LockType) -> Lock:
        """Lock dataset ``ds_id``; raises :class:`AlreadyLockedError` on a conflict."""
        with self._mutex:
            self._grant(ds_id, type_)
        return Lock(self, ds_id, type_)

    def lock_all(self, ds_ids: Iterable[int], type_: LockType) -> LockSet:
        """Lock every dataset of ``ds_ids`` or none; raises :class:`AlreadyLockedError`."""
        ids = sorted(set(ds_ids))
        granted: list[int] = []
        with self._mutex:
            try:
                for ds_id in ids:
                    self._grant(ds_id, type_)
                    granted.append(ds_id)
            except AlreadyLockedError:
                for ds_id in granted:
                    self._release_locked(ds_id)
                raise
        return LockSet([Lock(self, ds_id, type_) for ds_id in ids])

    def info(self) -> list[LockInfo]:
        """Return the current locks, ordered by dataset id. Never raises."""
        with self._mutex:
            return [LockInfo(k, t, c) for k, (t, c) in sorted(self._locks.items())]

    def is_locked(self, ds_id: int) -> bool:
        """Return whether dataset ``ds_id`` has any lock. Never raises."""
        with self._mutex:
            return ds_id in self._locks

    def _grant(self, ds_id: int, type_: LockType) -> None:
        current = self._locks.get(ds_id)
        if current is None:
            self._locks[ds_id] = (type_, 1)
        elif type_ is LockType.SHARED and current[0] is LockType.SHARED:
            self._locks[ds_id] = (LockType.SHARED, current[1] + 1)
        else:
            raise AlreadyLockedError(ds_id)

    def _release(self, ds_id: int) -> None:
        with self._mutex:
            self._release_locked(ds_id)

    def _release_locked(self, ds_id: int) -> None:
        current = self._locks.get(ds_id)
        if current is None:
            return
        if current[1] <= 1:
            del self._locks[ds_id]
        else:
            self._locks[ds_id] = (current[0], current[1] - 1)

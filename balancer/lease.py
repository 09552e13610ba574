"""
Leases: one slot held on one channel, the handle ``acquire()`` returns, and the
book that issues and tracks them.

A :class:`Lease` is the same type in both facades. The async balancer's leases
are released with ``await lb.release(lease)`` or by leaving ``async with
lb.acquire()``; a :class:`~balancer.SyncBalancer` also makes its leases plain
context managers, so ``with lb.acquire() as lease`` works in a thread.

The internal interface between a lease's handles and the scheduler that grants
it is :class:`LeaseOwner`: :class:`AcquireHandle` and the blocking facade drive
the scheduler through it, never through the balancer's private methods.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, get_args

from ._types import Outcome, ReleaseOutcome

if TYPE_CHECKING:
    from .accounts import Account

__all__ = ["AcquireHandle", "Lease", "LeaseBook", "LeaseOwner", "SyncReleaser", "exit_outcome"]

_OUTCOMES = frozenset(get_args(Outcome))


class SyncReleaser(Protocol):
    """What a lease's plain ``with`` block calls on exit (the blocking facade)."""

    def release_on_exit(self, lease: Lease, exc: BaseException | None) -> None: ...


class Lease:
    """
    One slot on one channel, held from ``acquire()`` until ``release()``.

    :ivar id: unique among every balancer sharing a backend
    :ivar channel: the channel the job must be sent to
    :ivar account: that channel's account (its token included) as of the grant
    :ivar acquired_at: wall-clock time (``time.time()``) of the grant
    :ivar outcome: ``"ok"``, ``"failed"`` or ``"throttled"``; what the
        context-manager form reports on exit. An exception leaving that form
        makes it ``"failed"`` unless the block set it explicitly (a
        cancellation frees the slot without counting a failure against the
        channel, and the lease reads ``"failed"`` afterwards all the same).
    :ivar lost: ``True`` once the backend reclaimed the slot because the lease
        could not be renewed in time; the job no longer owns a slot
    :ivar released: ``True`` once released (here or, with a shared backend, elsewhere)
    """

    __slots__ = (
        "_outcome",
        "_outcome_set",
        "_owner",
        "account",
        "acquired_at",
        "channel",
        "id",
        "lost",
        "released",
    )

    def __init__(self, lease_id: str, account: Account, acquired_at: float, owner: object) -> None:
        self.id = lease_id
        self.channel = account.channel
        self.account = account
        self.acquired_at = acquired_at
        self.lost = False
        self.released = False
        self._outcome: Outcome = "ok"
        self._outcome_set = False
        self._owner = owner

    @property
    def outcome(self) -> Outcome:
        return self._outcome

    @outcome.setter
    def outcome(self, value: Outcome) -> None:
        if value not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(_OUTCOMES)}")
        self._outcome = value
        self._outcome_set = True

    def __enter__(self) -> Self:
        # The blocking facade registers itself on the scheduler that issues its
        # leases (``sync_releaser``): no per-lease field for it.
        if getattr(self._owner, "sync_releaser", None) is None:
            raise TypeError(
                "a lease of the async Balancer is released with `async with lb.acquire()` "
                "or `await lb.release(lease)`, not a plain `with`"
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sync: SyncReleaser | None = getattr(self._owner, "sync_releaser", None)
        if sync is not None:
            sync.release_on_exit(self, exc)

    def __repr__(self) -> str:
        flags = " lost" if self.lost else ""
        flags += " released" if self.released else ""
        return f"<Lease {self.id} channel={self.channel!r} outcome={self._outcome!r}{flags}>"


def exit_outcome(lease: Lease, exc: BaseException | None) -> ReleaseOutcome:
    """
    The outcome a context-manager form releases ``lease`` with, given how its block ended.

    An outcome the block set wins. Otherwise an exception makes the lease
    ``"failed"``; for a cancellation (or another ``BaseException``) the slot
    goes back as ``"abandoned"``, which counts no failure against the channel.
    """
    if exc is None or lease._outcome_set:
        return lease._outcome
    lease._outcome = "failed"
    return "failed" if isinstance(exc, Exception) else "abandoned"


class LeaseOwner(Protocol):
    """The internal interface a scheduler offers to handles and facades."""

    #: The blocking facade whose leases these are, if any: it makes them plain
    #: context managers that release through it.
    sync_releaser: SyncReleaser | None

    async def acquire_lease(self, timeout: float | None, channel: str | None) -> Lease:
        """Take a slot as ``Balancer.acquire()`` documents (arguments already checked)."""
        ...

    async def release_lease(self, lease: Lease, outcome: ReleaseOutcome) -> None:
        """Release a lease this owner issued; idempotent; never raises for the backend."""
        ...


class AcquireHandle:
    """
    What ``Balancer.acquire()`` returns: await it for a :class:`Lease`, or use it
    as an async context manager that releases the lease on exit.
    """

    __slots__ = ("_channel", "_lease", "_owner", "_timeout", "_used")

    def __init__(self, owner: LeaseOwner, timeout: float | None, channel: str | None) -> None:
        self._owner = owner
        self._timeout = timeout
        self._channel = channel
        self._lease: Lease | None = None
        self._used = False

    def _claim(self) -> None:
        if self._used:
            raise RuntimeError("an acquire() handle can be awaited or entered once")
        self._used = True

    def __await__(self) -> Generator[Any, None, Lease]:
        self._claim()
        return self._owner.acquire_lease(self._timeout, self._channel).__await__()

    async def __aenter__(self) -> Lease:
        self._claim()
        self._lease = await self._owner.acquire_lease(self._timeout, self._channel)
        return self._lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease = self._lease
        if lease is None:
            return
        self._lease = None
        await self._owner.release_lease(lease, exit_outcome(lease, exc))


class LeaseBook:
    """
    The leases one balancer issued: their ids, the live ones, and the totals.

    Ids are ``"{owner}-{n}"``: a random prefix per balancer and a counter, so an
    id is unique across every balancer sharing a backend and the book can tell,
    without keeping every id, whether it issued one.
    """

    # Invariants: a lease is in ``live`` from its grant until its release (or
    # until the backend reports it released elsewhere or lost); ``released`` is
    # set on every lease that left ``live``.

    __slots__ = ("_next", "acquired_total", "live", "owner", "released_total", "timeouts_total")

    def __init__(self) -> None:
        self.owner = secrets.token_hex(6)
        self._next = 0
        self.live: dict[str, Lease] = {}
        self.acquired_total = 0
        self.released_total = 0
        self.timeouts_total = 0

    def new_id(self) -> str:
        self._next += 1
        return f"{self.owner}-{self._next}"

    def issue(self, lease_id: str, account: Account, owner: object) -> Lease:
        """Record a grant of ``lease_id`` on ``account``'s channel."""
        lease = Lease(lease_id, account, time.time(), owner)
        self.live[lease_id] = lease
        self.acquired_total += 1
        return lease

    def issued_here(self, lease_id: str) -> bool:
        owner, _, number = lease_id.rpartition("-")
        return owner == self.owner and number.isdigit() and int(number) <= self._next

    def close(self, lease: Lease) -> bool:
        """Mark ``lease`` released; ``False`` when it already was."""
        if lease.released:
            return False
        lease.released = True
        self.live.pop(lease.id, None)
        return True

    def forget(self, lease_id: str, *, lost: bool) -> Lease | None:
        """The backend reports ``lease_id`` released elsewhere (or ``lost``)."""
        lease = self.live.pop(lease_id, None)
        if lease is not None:
            lease.released = True
            lease.lost = lost
            if not lost:
                self.released_total += 1
        return lease

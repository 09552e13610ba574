"""Leases (one slot held on one channel) and the handle ``acquire()`` returns."""

from __future__ import annotations

from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, get_args

from .backends.base import Outcome, ReleaseOutcome

if TYPE_CHECKING:
    from .accounts import Account

__all__ = ["AcquireHandle", "Lease"]

_OUTCOMES = frozenset(get_args(Outcome))


class Lease:
    """
    One slot on one channel, held from ``acquire()`` until ``release()``.

    :ivar id: unique among every balancer sharing a backend
    :ivar channel: the channel the job must be sent to
    :ivar account: that channel's account (its token included) as of the grant
    :ivar acquired_at: wall-clock time (``time.time()``) of the grant
    :ivar outcome: ``"ok"``, ``"failed"`` or ``"throttled"``; what the
        context-manager form reports on exit (an exception makes it ``"failed"``
        unless it was set explicitly)
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

    def __repr__(self) -> str:
        flags = " lost" if self.lost else ""
        flags += " released" if self.released else ""
        return f"<Lease {self.id} channel={self.channel!r} outcome={self._outcome!r}{flags}>"


class _Acquirer(Protocol):
    async def _acquire(self, timeout: float | None, channel: str | None) -> Lease: ...

    async def _release_lease(self, lease: Lease, outcome: ReleaseOutcome) -> None: ...

    def _exit_outcome(self, lease: Lease, exc: BaseException | None) -> ReleaseOutcome: ...


class AcquireHandle:
    """
    What ``Balancer.acquire()`` returns: await it for a :class:`Lease`, or use it
    as an async context manager that releases the lease on exit.
    """

    __slots__ = ("_balancer", "_channel", "_lease", "_timeout", "_used")

    def __init__(self, balancer: _Acquirer, timeout: float | None, channel: str | None) -> None:
        self._balancer = balancer
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
        return self._balancer._acquire(self._timeout, self._channel).__await__()

    async def __aenter__(self) -> Lease:
        self._claim()
        self._lease = await self._balancer._acquire(self._timeout, self._channel)
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
        await self._balancer._release_lease(lease, self._balancer._exit_outcome(lease, exc))

"""
The backend boundary: where in-flight counts and leases live.

A backend owns the per-channel counts (``max_jobs``, ``in_flight``, draining,
cooling, consecutive failures), the leases, and the one atomic step "take a
free slot among these channels". The :class:`~balancer.Balancer` owns the
account map, waiting (FIFO queues, timeouts, cancellation), statistics and
logging of map changes. The same balancer code runs over the in-process
:class:`~balancer.MemoryBackend` and the fleet-wide ``RedisBackend``.

Design notes:

* Lease ids are made by the balancer and handed to :meth:`Backend.try_acquire`,
  so a grant allocates nothing but the lease itself; the backend answers with
  the granted channel id or ``None``.
* A backend whose operations never suspend sets ``immediate = True``. The
  balancer then hands a released slot to the oldest waiter inside ``release``
  itself: no await separates the release from the hand-off, so no other task
  can take the slot in between. A remote backend (``immediate = False``) is
  served by one dispatcher task per balancer, which keeps FIFO order within a
  process while round trips are in flight.
* Wake-ups from elsewhere (another process released a slot, the shared map
  changed) arrive through the ``notify`` callback given to :meth:`Backend.open`.
  It must be cheap, synchronous and safe to call from the event loop thread.
* Counts returned by :meth:`Backend.counts` are "as of the last round trip"; the
  call does no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from .._types import ChannelState, Outcome, ReleaseOutcome, Selection

if TYPE_CHECKING:
    from anyio.abc import TaskGroup


__all__ = [
    "MAX_JOBS_CAP",
    "Backend",
    "BackendConfig",
    "ChannelCounts",
    "ImmediateBackend",
    "Outcome",
    "ReleaseOutcome",
    "ReleaseResult",
    "RenewResult",
    "Selection",
]

#: The most slots a backend keeps for one channel. useapi documents maxJobs as
#: 1-10 and the parser accepts larger values as given, but a typo such as 10**9
#: must not make a backend build a billion-entry index (weighted selection
#: keeps one token per free slot); a larger maxJobs counts as this many.
MAX_JOBS_CAP = 1000


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """
    What a balancer tells its backend when it opens it.

    :ivar owner: a unique id of the balancer instance (prefix of its lease ids)
    :ivar selection: how to pick among channels with a free slot
    :ivar rng: the balancer's seeded random generator (the memory backend uses it
        so that a seed repeats the sequence of choices)
    :ivar lease_ttl: seconds a lease lives without renewal; ``None``: forever
    :ivar cooldown: seconds a channel cools after ``"throttled"``
    :ivar failures_to_cool: consecutive ``"failed"`` outcomes that cool a channel
    """

    owner: str
    selection: Selection
    rng: random.Random = field(compare=False)
    lease_ttl: float | None
    cooldown: float
    failures_to_cool: int


@dataclass(frozen=True, slots=True)
class ChannelCounts:
    """
    One channel as the backend last saw it.

    :ivar max_jobs: the limit in the backend's map
    :ivar in_flight: leases out (cluster-wide for a shared backend)
    :ivar state: ``"active"``, ``"draining"`` or ``"cooling"``
    """

    max_jobs: int
    in_flight: int
    state: ChannelState

    @property
    def free(self) -> int:
        """Slots a new lease could take now; never negative."""
        if self.state != "active":
            return 0
        return max(0, self.max_jobs - self.in_flight)


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    """
    What became of a release.

    :ivar status: ``"released"`` (the slot came back), ``"unknown"`` (no such
        lease: already released, or never issued), ``"lost"`` (the lease had
        expired and its slot was reclaimed before this release)
    :ivar channel: the lease's channel, when the backend knows it
    :ivar cooled: the release put the channel into cooling
    :ivar cooling_for: seconds the channel now cools (``0.0`` unless ``cooled``)
    :ivar removed: the release emptied a draining channel, which is now gone
    """

    status: Literal["released", "unknown", "lost"]
    channel: str | None = None
    cooled: bool = False
    cooling_for: float = 0.0
    removed: bool = False


@dataclass(frozen=True, slots=True)
class RenewResult:
    """
    The outcome of one renewal round.

    :ivar lost: leases that had expired and were reclaimed (their holders must
        learn they no longer own a slot)
    :ivar released: leases released elsewhere (by id, from another process);
        they are no longer renewed and are not counted as lost
    :ivar completed: releases that had failed (the backend was unreachable)
        and that this round completed on the server: the holder released
        them, so they count as released, once. A release that found its
        lease already reclaimed after expiry is not among them.
    """

    lost: frozenset[str] = frozenset()
    released: frozenset[str] = frozenset()
    completed: frozenset[str] = frozenset()


class Backend(Protocol):
    """
    Where in-flight counts and leases live.

    Invariants every implementation keeps:

    * ``in_flight <= max_jobs`` on every channel, unless ``max_jobs`` was lowered
      while leases were out; then no new lease is granted until it is below.
    * ``in_flight`` is never negative: a release of an unknown or reclaimed lease
      changes nothing.
    * A draining channel (absent from the last map) grants nothing, and
      disappears when its last lease is released.
    * A cooling channel grants nothing until its cooldown ends.
    """

    #: ``True`` when no operation ever suspends (see the module docstring).
    immediate: bool
    #: ``True`` when counts are shared between balancers (any of them may then
    #: release a lease by id); ``False`` for one process's private counts.
    shared: bool
    #: The lease lifetime used when the balancer's ``lease_ttl`` is ``None``
    #: (``None``: leases never expire).
    default_lease_ttl: float | None

    async def open(
        self, config: BackendConfig, notify: Callable[[], None], task_group: TaskGroup
    ) -> None:
        """
        Start serving one balancer; ``notify`` is called when capacity may have
        appeared through someone else (another process, a cooldown ending).
        Background work (a pub/sub listener) may be started in ``task_group``;
        on exit the balancer cancels that group first, then calls :meth:`close`.
        :meth:`close` is called only after a successful :meth:`open`.

        Raises:
            BackendUnavailableError: the backend cannot be reached.
        """
        ...

    async def settle(self) -> None:
        """
        Finish what is owed to the server before the balancer stops (a grant in
        doubt, a release that failed), within a bounded time. Called on exit
        while the balancer's task group still runs, before :meth:`close`.
        """
        ...

    async def close(self) -> None:
        """
        Stop serving. Leases still out are left as they are: their jobs may
        still be running, so a shared backend lets them expire after
        ``lease_ttl`` rather than hand their slots to someone else now.
        """
        ...

    async def set_map(self, limits: Mapping[str, int]) -> None:
        """
        Make ``limits`` (channel -> max_jobs) the map; channels missing from it
        drain. Idempotent.
        """
        ...

    async def try_acquire(self, lease_id: str, channel: str | None) -> str | None:
        """
        Atomically take one slot, recording ``lease_id``; return the channel or ``None``.

        With ``channel=None`` the backend picks among active channels with a free
        slot by the configured selection; otherwise only that channel is tried.
        """
        ...

    async def release(self, lease_id: str, outcome: ReleaseOutcome) -> ReleaseResult:
        """Give the lease's slot back and record the outcome. Idempotent."""
        ...

    async def renew(self) -> RenewResult:
        """Extend every live lease this balancer holds (one round trip at most)."""
        ...

    def counts(self) -> Mapping[str, ChannelCounts]:
        """Every known channel's counts, as of the last round trip. No I/O."""
        ...

    def next_wakeup(self) -> float | None:
        """
        Seconds until capacity may appear without any release (a cooldown ends),
        or ``None``. The balancer sleeps that long, then serves its waiters.
        """
        ...


class ImmediateBackend(Backend, Protocol):
    """
    A backend whose operations never suspend (``immediate = True``), with
    synchronous forms the balancer calls on its hot path and inside ``release``.
    """

    def acquire_nowait(self, lease_id: str, channel: str | None) -> str | None:
        """Synchronous :meth:`Backend.try_acquire`."""
        ...

    def release_nowait(self, lease_id: str, outcome: ReleaseOutcome) -> ReleaseResult:
        """Synchronous :meth:`Backend.release`."""
        ...

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """
        Attach an object of the caller's to each channel, returned by
        :meth:`acquire_tag_nowait`: the balancer's per-channel record rides on
        the backend's channel, sparing a lookup per acquire.
        """
        ...

    def acquire_tag_nowait(self, lease_id: str, channel: str | None) -> object:
        """
        :meth:`acquire_nowait` answering the granted channel's tag, or its id
        when it has none; ``None`` when nothing was granted.
        """
        ...

    def transfer_nowait(self, lease_id: str, new_lease_id: str) -> bool:
        """
        Release ``lease_id`` with outcome ``"ok"`` and grant its slot to
        ``new_lease_id`` in one step, counts unchanged; ``False`` (and nothing
        done) when the channel may not grant a new lease now.
        """
        ...

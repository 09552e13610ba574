"""
The scheduler: who gets a slot, when, and what happens to it on the way back.

A :class:`Scheduler` owns the waiters of one balancer (FIFO, with timeouts and
cancellation), the grant of leases through the backend, the release path and
the background wake-ups. The balancer drives it through this one interface;
two implementations differ in how a slot reaches a waiter:

* :class:`~balancer.scheduler.immediate.ImmediateScheduler`, for a backend that
  never suspends (memory): a release hands its slot to the oldest waiter that
  can use it before returning, with no await in between.
* :class:`~balancer.scheduler.remote.RemoteScheduler`, for a backend reached by
  round trips (Redis): one dispatcher serves the waiters in arrival order when
  capacity may have appeared, and polls while anyone waits.

What both share lives here: waiting and the give-back on cancel (the anyio
``CapacityLimiter`` shape: handed a slot and then cancelled means give it back,
which hands it to the next waiter), failing waiters, the release bookkeeping,
the reaction to a map change, and the wake loop.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import structlog

from ..errors import (
    BackendUnavailableError,
    BalancerError,
    LeaseError,
    NoAccountsError,
    NoCapacityError,
)
from .waiters import Waiter, WaitQueue

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .._types import ReleaseOutcome
    from ..backends.base import Backend, ChannelCounts, ReleaseResult
    from ..channels import ChannelInfo, ChannelTable, MapChange
    from ..lease import Lease, LeaseBook, SyncReleaser

__all__ = ["Scheduler"]

logger = structlog.get_logger("balancer")

_NOT_ENTERED = "enter the balancer first: `async with Balancer(...) as lb:`"


class Scheduler(ABC):
    """
    Grants, waits and releases for one balancer over one backend.

    Implements :class:`balancer.lease.LeaseOwner` for the acquire handles and
    the blocking facade.
    """

    # Invariants:
    #   a task sits in ``waiters`` only while it holds no slot; a waiter handed
    #   a lease was removed from the queue in the same step, and the lease is
    #   already counted by the backend and in ``book.live``.
    #   a waiter that leaves (timeout, cancellation) holding a lease gives it
    #   back through ``release_lease``, which serves the next waiter.
    #   in-memory bookkeeping has no await between its read and its write.

    def __init__(
        self,
        backend: Backend,
        book: LeaseBook,
        table: ChannelTable,
        *,
        stale_check: Callable[[], None] | None,
        poll_interval: float = 1.0,
        lease_ttl: float | None = None,
    ) -> None:
        self.backend = backend
        # A remote scheduler's: how often waiters retry without a wake-up, and
        # the lease lifetime its renewals keep up with.
        self._poll_interval = poll_interval
        self._lease_ttl = lease_ttl
        self.book = book
        self.table = table
        self.waiters = WaitQueue()
        self.sync_releaser: SyncReleaser | None = None
        #: set by the balancer between a successful enter and its exit
        self.running = False
        self._stale_check = stale_check
        self._wake = anyio.Event()
        # Per-lease events go through a logger bound once, on start: a lazy
        # proxy re-reads structlog's configuration on every call, which would
        # cost more than the acquire itself when debug is off.
        self._log: Any = logger
        self._debug = False
        self._make_event: Callable[[], anyio.Event] = anyio.Event

    def prepare(self) -> None:
        """Bind to the running event loop and logging; called on enter, before the backend opens."""
        self._log = logger.bind()
        self._debug = _debug_enabled(self._log)
        self._make_event = _event_factory()
        self._wake = anyio.Event()

    def start(self, task_group: TaskGroup) -> None:
        """Start the background work (after the first map is in)."""
        task_group.start_soon(self._wake_loop)

    def close(self) -> None:
        """Fail every waiter: the balancer is closing."""
        self.fail_all(BalancerError("the balancer was closed while waiting"))

    def notify(self) -> None:
        """The backend's callback: capacity may have appeared elsewhere."""
        self._wake.set()

    # -- acquire -----------------------------------------------------------

    def _precheck(self, channel: str | None) -> None:
        if not self.running:
            raise RuntimeError(_NOT_ENTERED)
        if self._stale_check is not None:
            self._stale_check()
        if channel is None:
            if not self.table.accounts:
                raise NoAccountsError("no channel is configured")
        elif channel not in self.table.accounts:
            raise NoAccountsError(f"channel {channel!r} is not in the account map", channel=channel)

    @abstractmethod
    async def acquire_lease(self, timeout: float | None, channel: str | None) -> Lease:
        """Take a slot as ``Balancer.acquire()`` documents (arguments already checked)."""

    def _issue(self, lease_id: str, info: ChannelInfo) -> Lease:
        lease = self.book.issue(lease_id, info.account, self)
        info.acquired_total += 1
        if self._debug:
            self._log.debug("lease_acquired", channel=lease.channel, lease_id=lease_id)
        return lease

    def _no_capacity(self, timeout: float, channel: str | None) -> NoCapacityError:
        self.book.timeouts_total += 1
        return NoCapacityError(timeout, channel=channel)

    @abstractmethod
    def _enqueued(self) -> None:
        """Hook: a waiter was queued (a remote dispatcher wakes to serve it)."""

    async def _wait(
        self, timeout: float | None, channel: str | None, seq: int | None = None
    ) -> Lease:
        waiter = self.waiters.push(channel, self._make_event(), seq)
        started = time.monotonic() if self._debug else 0.0
        self._enqueued()
        try:
            if timeout is None:
                await waiter.event.wait()
            else:
                with anyio.move_on_after(timeout):
                    await waiter.event.wait()
        except BaseException:
            # NOTE: cancelled from outside. A slot handed over in the meantime
            # is ours to give back, to the next waiter.
            self.waiters.remove(waiter)
            if waiter.lease is not None:
                with anyio.CancelScope(shield=True):
                    await self.release_lease(waiter.lease, "abandoned")
            raise
        self.waiters.remove(waiter)
        if waiter.lease is not None:
            # Granted, possibly just as the timeout fired: a slot in hand beats
            # a timeout error.
            if self._debug:
                self._log.debug(
                    "lease_waited",
                    channel=waiter.lease.channel,
                    lease_id=waiter.lease.id,
                    waited_s=round(time.monotonic() - started, 6),
                )
            return waiter.lease
        if waiter.error is not None:
            raise waiter.error
        assert timeout is not None
        raise self._no_capacity(timeout, channel)

    def grant(self, waiter: Waiter, lease: Lease) -> None:
        self.waiters.remove(waiter)
        waiter.lease = lease
        waiter.event.set()

    def fail(self, waiter: Waiter, error: BaseException) -> None:
        self.waiters.remove(waiter)
        waiter.error = error
        waiter.event.set()

    def fail_all(self, error: BaseException) -> None:
        for waiter in list(self.waiters):
            self.fail(waiter, error)

    @abstractmethod
    async def serve(self) -> None:
        """Hand slots to waiters, oldest first, until nothing more can be served."""

    # -- release -----------------------------------------------------------

    @abstractmethod
    async def release_lease(self, lease: Lease, outcome: ReleaseOutcome) -> None:
        """Release a lease this scheduler issued; idempotent."""

    async def release_id(self, lease_id: str, outcome: ReleaseOutcome) -> None:
        """Release a lease id that is not live here (with a shared backend, anyone's)."""
        if self.book.issued_here(lease_id):
            logger.warning("lease_already_released", lease_id=lease_id)
            return
        if not self.backend.shared:
            raise LeaseError(f"unknown lease id {lease_id!r}")
        if not self.running:
            raise RuntimeError(_NOT_ENTERED)
        with anyio.CancelScope(shield=True):
            result = await self.backend.release(lease_id, outcome)
        if result.status == "released":
            self.book.released_total += 1
            self._after_release(result, outcome)
        else:
            logger.warning("lease_already_released", lease_id=lease_id, status=result.status)

    def _already_released(self, lease: Lease) -> bool:
        if self.book.close(lease):
            return False
        if not lease.lost:
            logger.warning("lease_already_released", lease_id=lease.id, channel=lease.channel)
        return True

    def _finish_release(self, lease: Lease, outcome: ReleaseOutcome, result: ReleaseResult) -> None:
        if result.status == "lost":
            lease.lost = True
            logger.warning("lease_lost", lease_id=lease.id, channel=lease.channel)
            return
        self.book.released_total += 1
        if outcome == "failed" or outcome == "throttled":
            self.table.count_failure(lease.channel)
        if self._debug:
            self._log.debug(
                "lease_released", channel=lease.channel, lease_id=lease.id, outcome=outcome
            )
        self._after_release(result, outcome)

    def _after_release(self, result: ReleaseResult, outcome: str) -> None:
        channel = result.channel
        if result.cooled:
            logger.info(
                "channel_cooling", channel=channel, cooldown_s=result.cooling_for, outcome=outcome
            )
            self._wake.set()
        if result.removed and channel is not None:
            self.table.channel_gone(channel)
            logger.info("channel_removed", channel=channel)
        if self.waiters:
            self._slot_freed(result)

    @abstractmethod
    def _slot_freed(self, result: ReleaseResult) -> None:
        """Hook: a release (or a cooldown it started) may let a waiter in."""

    # -- the map -----------------------------------------------------------

    async def set_map(self, change: MapChange) -> Mapping[str, ChannelCounts]:
        """
        Tell the backend the new map; return its counts when channels were removed.

        NOTE: with a remote backend other tasks run during the round trip; they
        already see the new accounts, and a grant of a channel the backend
        still has but the map dropped is given back by the dispatcher.
        """
        await self.backend.set_map(change.limits)
        return self.backend.counts() if change.removed else {}

    async def map_applied(self, removed: list[str]) -> None:
        """Fail the waiters the new map cannot serve, then serve the rest."""
        self._fail_unservable(removed)
        await self.serve()

    def _fail_unservable(self, removed: list[str]) -> None:
        if not self.waiters:
            return
        if not self.table.accounts:
            self.fail_all(NoAccountsError("no channel is configured"))
            return
        for channel in removed:
            for waiter in self.waiters.pinned_to(channel):
                error = NoAccountsError(
                    f"channel {channel!r} left the account map", channel=channel
                )
                self.fail(waiter, error)

    # -- background --------------------------------------------------------

    def _wake_delay(self) -> float | None:
        """Seconds until the wake loop serves waiters even if nobody wakes it."""
        return self.backend.next_wakeup()

    async def _wake_loop(self) -> None:
        """Serve waiters when woken and when a cooldown ends."""
        while True:
            delay = self._wake_delay()
            with anyio.move_on_after(math.inf if delay is None else delay):
                await self._wake.wait()
            self._wake = anyio.Event()
            if not self.waiters:
                continue
            try:
                await self.serve()
            except BackendUnavailableError as exc:
                self.fail_all(exc)

    def wake(self) -> None:
        """Serve the waiters soon (a refresh brought a map, say)."""
        self._wake.set()


def _debug_enabled(log: Any) -> bool:
    """
    Whether per-lease debug events would be emitted.

    Only when the application configured structlog (an unconfigured structlog
    prints every level to stdout, which would spam a worker that never asked
    for structlog at all) and its logger lets debug through.
    """
    if not structlog.is_configured():
        return False
    is_enabled_for = getattr(log, "is_enabled_for", None) or getattr(log, "isEnabledFor", None)
    if is_enabled_for is None:
        return True
    try:
        return bool(is_enabled_for(logging.DEBUG))
    except Exception:  # noqa: BLE001 - an exotic wrapper class: log rather than guess wrong
        return True


def _event_factory() -> Callable[[], anyio.Event]:
    """
    The running event loop's own event class, looked up once.

    ``anyio.Event()`` finds the loop on every call, which costs more than the
    rest of a hand-off; the backend's ``create_event`` is what it ends up
    calling anyway.
    """
    get_backend = getattr(anyio.lowlevel, "get_async_backend", None)
    if get_backend is None:  # anyio without the public lookup
        return anyio.Event
    create: Callable[[], anyio.Event] = get_backend().create_event
    return create

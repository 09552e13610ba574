"""
The balancer: wiring, lifecycle and the public methods.

Design:

* The backend (:mod:`balancer.backends`) owns the counts and the atomic "take a
  free slot". The scheduler (:mod:`balancer.scheduler`) owns waiting, grants,
  releases and wake-ups; it is picked once, by the backend's kind, and driven
  through one interface. The channel table (:mod:`balancer.channels`) owns the
  current map's accounts and per-channel totals; the lease book
  (:mod:`balancer.lease`) the ids, the live leases and the totals. The map
  cache (:mod:`balancer.cache`) fetches and refreshes the map.
* This module checks arguments, enters and leaves the task group, applies each
  new map, and reads statistics.
* Background tasks never raise into user code: a failed refresh keeps the
  last good map and is counted; a failed renewal is retried next round.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast, get_args

import anyio
import anyio.lowlevel
import structlog

from ._checks import check_balancer_arguments, check_positive
from ._types import Outcome, Selection
from .backends.base import Backend, BackendConfig
from .backends.memory import MemoryBackend
from .cache import MapCache
from .channels import ChannelTable
from .errors import LeaseError, describe_error
from .lease import AcquireHandle, Lease, LeaseBook
from .scheduler.immediate import ImmediateScheduler
from .scheduler.remote import RemoteScheduler
from .statistics import BalancerStatistics

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .accounts import ParsedAccounts
    from .lease import LeaseOwner
    from .scheduler.base import Scheduler
    from .sources import AccountSource

__all__ = ["Balancer"]

logger = structlog.get_logger("balancer")

_OUTCOMES = frozenset(get_args(Outcome))


class Balancer:
    """
    Spreads jobs over the channels of an account map without ever running more
    than a channel's ``max_jobs`` at once.

    Picture each channel as a rack of ``max_jobs`` hooks. ``acquire()`` takes a
    free hook on a channel chosen at random among those with one (or the
    pinned channel), and gives back a :class:`Lease` naming the channel and its
    account; ``release()`` puts the hook back. When every hook is taken,
    callers queue and are served in arrival order, each freed hook going
    straight to the oldest caller that can use it.

    Use it as an async context manager: entering fetches the map (raising
    ``AuthError`` and the like unwrapped) and starts the background refresh;
    exiting stops it.

    With the memory backend an uncontended ``acquire()`` is not a checkpoint:
    a free slot is taken without yielding to the event loop (like anyio's
    ``fast_acquire=True``). Waiting is a checkpoint.

    Args:
        source: where the account map comes from (``UseapiAccountSource``,
            ``StaticAccountSource``, or any object with ``async fetch()``).
        backend: where counts live; ``None`` for a new ``MemoryBackend``.
        ttl: seconds the map counts as fresh; it is refreshed before then.
        max_stale: after this many seconds without a good map, ``acquire()``
            raises ``StaleAccountMapError``; ``None`` serves a stale map forever.
        lease_ttl: seconds a lease lives without renewal (the balancer renews
            its leases while it runs); ``None`` takes the backend's default.
        selection: ``"random"`` (uniform among channels with a free slot),
            ``"weighted"`` (proportional to free slots) or ``"p2c"`` (the less
            loaded of two random picks).
        cooldown: seconds a channel takes no new leases after ``"throttled"``.
        failures_to_cool: consecutive ``"failed"`` outcomes that cool a channel.
        seed: seeds the choices; with the memory backend the sequence repeats.
        poll_interval: with a remote backend, how often waiters retry when no
            wake-up arrives.

    Raises:
        ValueError, TypeError: an argument is out of range or of the wrong type.
    """

    # Invariants:
    #   ``_running`` is True from a successful enter until exit begins; the
    #   scheduler's ``running`` flag follows it.
    #   the backend is closed only if its open() succeeded.

    def __init__(
        self,
        source: AccountSource,
        *,
        backend: Backend | None = None,
        ttl: float = 60.0,
        max_stale: float | None = None,
        lease_ttl: float | None = None,
        selection: str = "random",
        cooldown: float = 30.0,
        failures_to_cool: int = 5,
        seed: int | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self._running = False
        self._closed = False
        check_balancer_arguments(source, backend, selection, failures_to_cool, seed)
        check_positive("ttl", ttl)
        if max_stale is not None:
            check_positive("max_stale", max_stale)
        if lease_ttl is not None:
            check_positive("lease_ttl", lease_ttl)
        check_positive("cooldown", cooldown, allow_zero=True)
        check_positive("poll_interval", poll_interval)
        self._source = source
        self._backend: Backend = backend if backend is not None else MemoryBackend()
        self._ttl = float(ttl)
        self._max_stale = max_stale
        self._lease_ttl = lease_ttl if lease_ttl is not None else self._backend.default_lease_ttl
        self._config_args = (cast(Selection, selection), float(cooldown), failures_to_cool)
        self._rng = random.Random(seed)
        self._cache = MapCache(
            source,
            self._apply_map,
            ttl=self._ttl,
            rng=random.Random(None if seed is None else ~seed),
            horizon=max_stale,
        )
        self._table = ChannelTable()
        self._book = LeaseBook()
        kind = ImmediateScheduler if self._backend.immediate else RemoteScheduler
        self._scheduler: Scheduler = kind(
            self._backend,
            self._book,
            self._table,
            stale_check=self._cache.check_usable if max_stale is not None else None,
            poll_interval=poll_interval,
            lease_ttl=self._lease_ttl,
        )
        self._task_group: TaskGroup | None = None

    def __repr__(self) -> str:
        state = "running" if self._running else ("closed" if self._closed else "new")
        if not hasattr(self, "_scheduler"):  # __init__ refused its arguments
            return f"<Balancer {state}>"
        return (
            f"<Balancer {state} channels={len(self._table.accounts)} "
            f"leases={len(self._book.live)} waiting={len(self._scheduler.waiters)} "
            f"backend={type(self._backend).__name__}>"
        )

    @property
    def lease_owner(self) -> LeaseOwner:
        """
        The internal interface (:class:`balancer.lease.LeaseOwner`) that acquire
        handles and :class:`~balancer.SyncBalancer` drive; not for application code.
        """
        return self._scheduler

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._running or self._closed:
            raise RuntimeError("a Balancer can be entered once")
        # NOTE: nothing below raises inside the task group's own exit: the
        # group is left with no exception passed in, so the first fetch's error
        # (AuthError, SourceError, ...) reaches the caller as itself, never
        # wrapped in an ExceptionGroup.
        self._scheduler.prepare()
        opened = False
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        try:
            await self._backend.open(self._backend_config(), self._scheduler.notify, task_group)
            opened = True
            self._set_running(True)
            await self._cache.refresh(empty_on_404=True)
        except BaseException:
            self._set_running(False)
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
            with anyio.CancelScope(shield=True):
                await self._close_quietly(backend=opened)
            raise
        self._task_group = task_group
        task_group.start_soon(self._cache.run)
        self._scheduler.start(task_group)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group = self._task_group
        if task_group is None:
            return
        self._task_group = None
        self._set_running(False)
        self._closed = True
        self._scheduler.close()
        await self._settle_backend()
        task_group.cancel_scope.cancel()
        # NOTE: the group's own scope must be the innermost when it exits, so
        # it is left first; only then is the close shielded.
        await task_group.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            await self._close_quietly()

    async def _settle_backend(self) -> None:
        # NOTE: while the task group still runs: a backend's client may live in it.
        settle = getattr(self._backend, "settle", None)
        if settle is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                await settle()
            except Exception as error:  # noqa: BLE001 - closing must not mask the exit
                logger.warning("backend_settle_failed", error=describe_error(error))

    def _set_running(self, running: bool) -> None:
        self._running = self._scheduler.running = running

    def _backend_config(self) -> BackendConfig:
        selection, cooldown, failures_to_cool = self._config_args
        return BackendConfig(
            owner=self._book.owner,
            selection=selection,
            rng=self._rng,
            lease_ttl=self._lease_ttl,
            cooldown=cooldown,
            failures_to_cool=failures_to_cool,
        )

    async def _close_quietly(self, *, backend: bool = True) -> None:
        # NOTE: a backend whose open() failed is not ours to close: it may be
        # serving another balancer (the reason it refused us).
        closers: list[tuple[str, Callable[[], Any] | None]] = [
            ("backend_close_failed", self._backend.close if backend else None),
            ("source_close_failed", getattr(self._source, "aclose", None)),
        ]
        for event, close in closers:
            if close is None:
                continue
            with anyio.move_on_after(5):
                try:
                    await close()
                except Exception as exc:  # noqa: BLE001 - closing must not mask the exit
                    logger.warning(event, error=describe_error(exc))

    # -- acquire and release ---------------------------------------------------

    def acquire(self, *, timeout: float | None = None, channel: str | None = None) -> AcquireHandle:
        """
        Take a slot; await the result for a :class:`Lease`, or use it as an
        async context manager that releases the lease on exit.

        Picks among active channels with a free slot by the balancer's
        ``selection`` (or takes ``channel``). When none is free the caller
        waits in arrival order; a freed slot goes to the oldest waiter that can
        use it. Cancelling a waiting or holding task never leaks a slot: a slot
        handed over just as the waiter is cancelled is given back to the next.
        In the context-manager form, an exception makes the outcome
        ``"failed"`` (unless ``lease.outcome`` was set), and a cancellation
        returns the slot without counting against the channel.

        With the memory backend, taking a free slot is not a checkpoint (it
        never yields to the event loop); waiting is.

        Args:
            timeout: seconds to wait at most; ``None`` waits as long as it takes,
                ``0`` takes a free slot or fails at once.
            channel: pin the lease to this channel.

        Raises:
            NoCapacityError: nothing freed up within ``timeout``.
            NoAccountsError: no channel is configured, or ``channel`` is unknown
                or draining (waiting for a full or cooling pinned channel is fine).
            StaleAccountMapError: no good map for longer than ``max_stale``.
            BackendUnavailableError: the shared backend cannot be reached.
        """
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise TypeError("timeout must be a number or None")
            if math.isnan(timeout) or timeout < 0:
                raise ValueError("timeout must be >= 0 or None")
        if channel is not None and not isinstance(channel, str):
            raise TypeError("channel must be a str or None")
        return AcquireHandle(self._scheduler, timeout, channel)

    async def release(self, lease: Lease | str, outcome: str = "ok") -> None:
        """
        Give a lease's slot back and report how the job went.

        Idempotent: a second release of the same lease does nothing but log a
        warning. A released slot goes straight to the oldest waiter that can
        use it. ``"throttled"`` cools the channel for ``cooldown`` seconds, as
        do ``failures_to_cool`` consecutive ``"failed"``.

        Args:
            lease: the lease, or its id. With a shared backend any balancer on
                the namespace may release an id; with the memory backend only
                the issuing one.
            outcome: ``"ok"``, ``"failed"`` or ``"throttled"``.

        Raises:
            LeaseError: the lease belongs to another balancer, or (memory
                backend) the id was never issued here.
        """
        if outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(_OUTCOMES)}")
        checked = cast(Outcome, outcome)
        scheduler = self._scheduler
        if isinstance(lease, str):
            found = self._book.live.get(lease)
            if found is None:
                await scheduler.release_id(lease, checked)
                return
            lease = found
        elif not isinstance(lease, Lease):
            raise TypeError(f"release() takes a Lease or a lease id, not {type(lease).__name__}")
        if lease._owner is not scheduler:
            raise LeaseError(f"lease {lease.id} was issued by another balancer")
        await scheduler.release_lease(lease, checked)

    # -- the account map -------------------------------------------------------

    async def refresh(self) -> None:
        """
        Fetch the account map now, sharing a fetch already in progress.

        Raises:
            AuthError, ConfigNotFoundError, SourceError, AccountMapError: that
            fetch's error; the last good map stays in use.
        """
        if not self._running:
            raise RuntimeError("enter the balancer first: `async with Balancer(...) as lb:`")
        await self._cache.refresh()
        self._scheduler.wake()

    async def _apply_map(self, parsed: ParsedAccounts) -> None:
        first = self._cache.fetched_at is None
        change = self._table.apply(parsed)
        counts = await self._scheduler.set_map(change)
        self._table.forget_gone(change.removed, counts)
        self._table.log_change(change, counts, first=first)
        await self._scheduler.map_applied(change.removed)

    # -- statistics ------------------------------------------------------------

    def statistics(self) -> BalancerStatistics:
        """
        Return a snapshot of capacity and history; cheap, no I/O, and only a
        read: taking it never ends a cooldown, grants a lease or wakes a waiter.

        With a shared backend, ``in_flight`` and ``free`` are the cluster-wide
        figures as of the last round trip; ``waiting`` counts this process only.
        """
        channels, capacity, in_flight, free = self._table.figures(self._backend.counts())
        book, cache = self._book, self._cache
        return BalancerStatistics(
            channels=channels,
            capacity=capacity,
            in_flight=in_flight,
            free=free,
            waiting=len(self._scheduler.waiters),
            acquired_total=book.acquired_total,
            released_total=book.released_total,
            timeouts_total=book.timeouts_total,
            map_fetched_at=cache.fetched_at,
            map_age=cache.age(),
            map_stale=cache.is_stale(),
            refresh_errors_total=cache.errors_total,
            last_refresh_error=cache.last_error,
        )

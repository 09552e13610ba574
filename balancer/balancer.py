"""
The balancer: the account map, waiting, timeouts and statistics.

Design:

* The backend (:mod:`balancer.backends`) owns the counts and the atomic "take a
  free slot"; this module owns everything a worker sees: the map (refreshed in
  the background, :mod:`balancer.cache`), the FIFO of waiters
  (:mod:`balancer.waiters`), leases, cooldown wake-ups and statistics.
* With an immediate backend (memory) a release hands its slot to the oldest
  waiter that can use it before returning: no await separates the two, so
  nobody can take the slot in between and nobody else is woken.
* With a remote backend (Redis) one dispatcher task serves the waiters in
  arrival order, one round trip each, when a release, a pub/sub message, a
  map change or a cooldown says capacity may be there, and at least every
  ``poll_interval`` while anyone waits, so a lost message strands nobody.
* Background tasks never raise into user code: a failed refresh keeps the
  last good map and is counted; a failed renewal is retried next round.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from collections.abc import Callable
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Self, cast, get_args

import anyio
import anyio.lowlevel
import structlog

from .backends.base import (
    Backend,
    BackendConfig,
    ImmediateBackend,
    Outcome,
    ReleaseOutcome,
    ReleaseResult,
    Selection,
)
from .backends.memory import MemoryBackend
from .cache import MapCache
from .errors import (
    BackendUnavailableError,
    BalancerError,
    LeaseError,
    NoAccountsError,
    NoCapacityError,
    StaleAccountMapError,
)
from .lease import AcquireHandle, Lease
from .statistics import BalancerStatistics, ChannelStatistics
from .waiters import Waiter, WaitQueue

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .accounts import Account, ParsedAccounts
    from .sources import AccountSource

__all__ = ["Balancer"]

logger = structlog.get_logger("balancer")

_SELECTIONS = frozenset(get_args(Selection))
_OUTCOMES = frozenset(get_args(Outcome))
#: Map changes logged one event per channel up to this many; beyond, only the summary.
_CHANNEL_EVENTS_MAX = 50


class _ChannelInfo:
    """This balancer's view of one channel: its account and local totals."""

    __slots__ = ("account", "acquired_total", "failures_total")

    def __init__(self, account: Account) -> None:
        self.account = account
        self.acquired_total = 0
        self.failures_total = 0


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
        if not callable(getattr(source, "fetch", None)):
            raise TypeError("source must have an async fetch() method")
        if backend is not None and not all(
            hasattr(backend, name) for name in ("immediate", "try_acquire", "release", "set_map")
        ):
            raise TypeError(
                f"backend must be a Backend such as MemoryBackend() or RedisBackend(url), "
                f"not {type(backend).__name__}"
            )
        _check_positive("ttl", ttl)
        if max_stale is not None:
            _check_positive("max_stale", max_stale)
        if lease_ttl is not None:
            _check_positive("lease_ttl", lease_ttl)
        _check_positive("cooldown", cooldown, allow_zero=True)
        _check_positive("poll_interval", poll_interval)
        if selection not in _SELECTIONS:
            raise ValueError(f"selection must be one of {sorted(_SELECTIONS)}")
        if isinstance(failures_to_cool, bool) or not isinstance(failures_to_cool, int):
            raise TypeError("failures_to_cool must be an int")
        if failures_to_cool < 1:
            raise ValueError("failures_to_cool must be at least 1")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError("seed must be an int or None")
        self._source = source
        self._backend: Backend = backend if backend is not None else MemoryBackend()
        self._immediate = cast(ImmediateBackend, self._backend) if self._backend.immediate else None
        self._ttl = float(ttl)
        self._max_stale = max_stale
        self._lease_ttl = lease_ttl if lease_ttl is not None else self._backend.default_lease_ttl
        self._selection = cast(Selection, selection)
        self._cooldown = float(cooldown)
        self._failures_to_cool = failures_to_cool
        self._poll_interval = poll_interval
        self._rng = random.Random(seed)
        self._owner = secrets.token_hex(6)
        self._next_lease = 0
        self._cache = MapCache(
            source,
            self._apply_map,
            ttl=self._ttl,
            rng=random.Random(None if seed is None else ~seed),
            horizon=max_stale,
        )
        self._infos: dict[str, _ChannelInfo] = {}
        self._accounts: dict[str, Account] = {}
        self._leases: dict[str, Lease] = {}
        self._waiters = WaitQueue()
        self._wake = anyio.Event()
        self._task_group: TaskGroup | None = None
        self._serving = False
        self._stale_logged = False
        self._rejected_seen: frozenset[tuple[str, str]] = frozenset()
        self._acquired_total = 0
        self._released_total = 0
        self._timeouts_total = 0
        # Per-lease events go through a logger bound once, on enter: a lazy
        # proxy re-reads structlog's configuration on every call, which would
        # cost more than the acquire itself when debug is off.
        self._log: Any = logger
        self._debug = False
        self._make_event: Callable[[], anyio.Event] = anyio.Event

    def __repr__(self) -> str:
        state = "running" if self._running else ("closed" if self._closed else "new")
        if not hasattr(self, "_waiters"):  # __init__ refused its arguments
            return f"<Balancer {state}>"
        return (
            f"<Balancer {state} channels={len(self._accounts)} leases={len(self._leases)} "
            f"waiting={len(self._waiters)} backend={type(self._backend).__name__}>"
        )

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._running or self._closed:
            raise RuntimeError("a Balancer can be entered once")
        # NOTE: nothing below raises inside the task group's own exit: the
        # group is left with no exception passed in, so the first fetch's error
        # (AuthError, SourceError, ...) reaches the caller as itself, never
        # wrapped in an ExceptionGroup.
        self._log = logger.bind()
        self._debug = _debug_enabled(self._log)
        self._make_event = _event_factory()
        self._wake = anyio.Event()
        opened = False
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        try:
            config = BackendConfig(
                owner=self._owner,
                selection=self._selection,
                rng=self._rng,
                lease_ttl=self._lease_ttl,
                cooldown=self._cooldown,
                failures_to_cool=self._failures_to_cool,
            )
            await self._backend.open(config, self._notify, task_group)
            opened = True
            self._running = True
            await self._cache.refresh(empty_on_404=True)
        except BaseException:
            self._running = False
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
            with anyio.CancelScope(shield=True):
                await self._close_quietly(backend=opened)
            raise
        self._task_group = task_group
        task_group.start_soon(self._refresh_loop)
        task_group.start_soon(self._wake_loop)
        if self._lease_ttl is not None and not self._immediate:
            task_group.start_soon(self._renew_loop)
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
        self._running = False
        self._closed = True
        closed = BalancerError("the balancer was closed while waiting")
        for waiter in list(self._waiters):
            self._fail(waiter, closed)
        task_group.cancel_scope.cancel()
        # NOTE: the group's own scope must be the innermost when it exits, so
        # it is left first; only then is the close shielded.
        await task_group.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            await self._close_quietly()

    async def _close_quietly(self, *, backend: bool = True) -> None:
        # NOTE: a backend whose open() failed is not ours to close: it may be
        # serving another balancer (the reason it refused us).
        if backend:
            with anyio.move_on_after(5):
                try:
                    await self._backend.close()
                except Exception as exc:  # noqa: BLE001 - closing must not mask the exit
                    logger.warning("backend_close_failed", error=_describe(exc))
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            with anyio.move_on_after(5):
                try:
                    await aclose()
                except Exception as exc:  # noqa: BLE001 - closing must not mask the exit
                    logger.warning("source_close_failed", error=_describe(exc))

    # -- acquire -------------------------------------------------------------

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
        return AcquireHandle(self, timeout, channel)

    async def _acquire(self, timeout: float | None, channel: str | None) -> Lease:
        if not self._running:
            raise RuntimeError("enter the balancer first: `async with Balancer(...) as lb:`")
        if self._max_stale is not None:
            self._check_stale()
        if channel is None:
            if not self._accounts:
                raise NoAccountsError("no channel is configured")
        elif channel not in self._accounts:
            raise NoAccountsError(f"channel {channel!r} is not in the account map", channel=channel)
        # NOTE: a free slot is taken without a checkpoint (no trip through the
        # event loop, no cancellation check): the cheapest acquire is the one
        # that does not yield. Waiting, below, is a checkpoint like any other.
        if not self._waiters.ahead_of(channel):
            immediate = self._immediate
            if immediate is not None:
                lease_id = self._new_lease_id()
                got = immediate.acquire_tag_nowait(lease_id, channel)
                if type(got) is _ChannelInfo:
                    lease = self._record_info(lease_id, got)
                elif got is None:
                    lease = None
                else:  # an untagged channel: its id
                    lease = self._record_grant(lease_id, cast(str, got))
            else:
                # The round trip counts against the timeout, like the wait.
                deadline = math.inf if timeout is None else anyio.current_time() + timeout
                lease = await self._take(channel, deadline)
                if timeout is not None:
                    timeout = max(0.0, deadline - anyio.current_time())
            if lease is not None:
                return lease
            if timeout == 0:
                self._timeouts_total += 1
                raise NoCapacityError(0, channel=channel)
        return await self._wait(timeout, channel)

    def _new_lease_id(self) -> str:
        self._next_lease += 1
        return f"{self._owner}-{self._next_lease}"

    def _record_grant(self, lease_id: str, channel: str) -> Lease:
        return self._record_info(lease_id, self._infos[channel])

    def _record_info(self, lease_id: str, info: _ChannelInfo) -> Lease:
        lease = Lease(lease_id, info.account, time.time(), self)
        self._leases[lease_id] = lease
        info.acquired_total += 1
        self._acquired_total += 1
        if self._debug:
            self._log.debug("lease_acquired", channel=lease.channel, lease_id=lease_id)
        return lease

    async def _take(self, channel: str | None, deadline: float = math.inf) -> Lease | None:
        """One attempt at a slot; ``None`` when nothing is free."""
        lease_id = self._new_lease_id()
        immediate = self._immediate
        if immediate is not None:
            got = immediate.acquire_nowait(lease_id, channel)
        else:
            got = await self._remote_acquire(lease_id, channel, deadline)
        if got is None:
            return None
        if got not in self._accounts:
            # A shared backend granted a channel of another process's map that
            # ours lacks (one of us is a refresh behind); without its account we
            # cannot dispatch to it, so give it back.
            await self._give_back_id(lease_id)
            return None
        return self._record_grant(lease_id, got)

    async def _remote_acquire(
        self, lease_id: str, channel: str | None, deadline: float
    ) -> str | None:
        # NOTE: the round trip is shielded so a cancellation cannot cut it at a
        # point where the grant happened but nobody knows of it; if we were
        # cancelled meanwhile, the slot is given back before the cancellation
        # goes on. Only the acquire's own deadline may cut it short: then the
        # backend treats the grant as in doubt and gives it back itself.
        got: str | None = None
        with anyio.CancelScope(shield=True, deadline=deadline) as scope:
            got = await self._backend.try_acquire(lease_id, channel)
        if scope.cancelled_caught:
            raise BackendUnavailableError("the backend did not answer within the acquire's timeout")
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            if got is not None:
                await self._give_back_id(lease_id)
            raise
        return got

    async def _give_back_id(self, lease_id: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self._backend.release(lease_id, "abandoned")
            except BackendUnavailableError as exc:
                logger.warning("lease_release_failed", lease_id=lease_id, error=_describe(exc))

    async def _wait(self, timeout: float | None, channel: str | None) -> Lease:
        waiter = self._waiters.push(channel, self._make_event())
        started = time.monotonic() if self._debug else 0.0
        if self._immediate is None:
            self._wake.set()
        try:
            if timeout is None:
                await waiter.event.wait()
            else:
                with anyio.move_on_after(timeout):
                    await waiter.event.wait()
        except BaseException:
            # NOTE: cancelled from outside. A slot handed over in the meantime
            # is ours to give back, to the next waiter.
            self._waiters.remove(waiter)
            if waiter.lease is not None:
                with anyio.CancelScope(shield=True):
                    await self._release_lease(waiter.lease, "abandoned")
            raise
        self._waiters.remove(waiter)
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
        self._timeouts_total += 1
        assert timeout is not None
        raise NoCapacityError(timeout, channel=channel)

    def _grant(self, waiter: Waiter, lease: Lease) -> None:
        self._waiters.remove(waiter)
        waiter.lease = lease
        waiter.event.set()

    def _fail(self, waiter: Waiter, error: BaseException) -> None:
        self._waiters.remove(waiter)
        waiter.error = error
        waiter.event.set()

    def _serve_now(self) -> None:
        """Immediate backends: :meth:`_serve` without suspending."""
        immediate = self._immediate
        assert immediate is not None
        skip: set[str] = set()
        self._serving = True
        try:
            while (waiter := self._waiters.oldest(False, skip)) is not None:
                lease_id = self._new_lease_id()
                got = immediate.acquire_nowait(lease_id, waiter.channel)
                if got is not None:
                    self._grant(waiter, self._record_grant(lease_id, got))
                elif waiter.channel is None:
                    return
                else:
                    skip.add(waiter.channel)
        finally:
            self._serving = False

    async def _serve(self) -> None:
        """
        Hand slots to waiters, oldest first, until nothing more can be served.

        A failed attempt for an unpinned waiter means nothing is free anywhere;
        for a pinned one, only that its channel is full.
        """
        if self._immediate is not None:
            self._serve_now()
            return
        skip: set[str] = set()
        skip_unpinned = False
        while True:
            waiter = self._waiters.oldest(skip_unpinned, skip)
            if waiter is None:
                return
            lease = await self._take(waiter.channel)
            # NOTE: with a remote backend the waiter may have timed out or been
            # cancelled during the round trip; then the slot goes back.
            if waiter.done:
                if lease is not None:
                    await self._release_lease(lease, "abandoned")
                continue
            if lease is not None:
                self._grant(waiter, lease)
            elif waiter.channel is None:
                return
            else:
                skip.add(waiter.channel)

    # -- release -------------------------------------------------------------

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
        if isinstance(lease, str):
            found = self._leases.get(lease)
            if found is None:
                await self._release_foreign_id(lease, checked)
                return
            lease = found
        elif not isinstance(lease, Lease):
            raise TypeError(f"release() takes a Lease or a lease id, not {type(lease).__name__}")
        if lease._owner is not self:
            raise LeaseError(f"lease {lease.id} was issued by another balancer")
        if self._immediate is not None:
            self._release_now(lease, checked)
        else:
            await self._release_lease(lease, checked)

    async def _release_foreign_id(self, lease_id: str, outcome: Outcome) -> None:
        if self._issued_here(lease_id):
            logger.warning("lease_already_released", lease_id=lease_id)
            return
        if not self._backend.shared:
            raise LeaseError(f"unknown lease id {lease_id!r}")
        if not self._running:
            raise RuntimeError("enter the balancer first: `async with Balancer(...) as lb:`")
        with anyio.CancelScope(shield=True):
            result = await self._backend.release(lease_id, outcome)
        if result.status == "released":
            self._released_total += 1
            self._after_release(result, outcome, lease_id)
        else:
            logger.warning("lease_already_released", lease_id=lease_id, status=result.status)

    def _issued_here(self, lease_id: str) -> bool:
        owner, _, number = lease_id.rpartition("-")
        return owner == self._owner and number.isdigit() and int(number) <= self._next_lease

    async def _release_lease(self, lease: Lease, outcome: ReleaseOutcome) -> None:
        if self._immediate is not None:
            self._release_now(lease, outcome)
            return
        if self._already_released(lease):
            return
        try:
            with anyio.CancelScope(shield=True):
                result = await self._backend.release(lease.id, outcome)
        except BackendUnavailableError as exc:
            # The backend stops renewing the lease, so its slot comes back
            # within lease_ttl; raising here would mask the job's own error.
            logger.warning("lease_release_failed", lease_id=lease.id, error=_describe(exc))
            return
        self._finish_release(lease, outcome, result)

    def _release_now(self, lease: Lease, outcome: ReleaseOutcome) -> None:
        """Immediate backends: release without suspending, handing the slot over."""
        if self._already_released(lease):
            return
        immediate = self._immediate
        assert immediate is not None
        if self._waiters and outcome == "ok":
            # NOTE: direct transfer: the slot stays counted and moves to the
            # oldest waiter that can use it, with no trip through the free
            # index. The backend refuses when the channel may not grant
            # (draining, cooling, over a lowered max_jobs).
            waiter = self._waiters.oldest_for(lease.channel)
            if waiter is not None:
                new_id = self._new_lease_id()
                if immediate.transfer_nowait(lease.id, new_id):
                    self._released_total += 1
                    if self._debug:
                        self._log.debug(
                            "lease_released", channel=lease.channel, lease_id=lease.id, outcome="ok"
                        )
                    self._grant(waiter, self._record_grant(new_id, lease.channel))
                    return
        self._finish_release(lease, outcome, immediate.release_nowait(lease.id, outcome))

    def _already_released(self, lease: Lease) -> bool:
        if lease.released:
            if not lease.lost:
                logger.warning("lease_already_released", lease_id=lease.id, channel=lease.channel)
            return True
        lease.released = True
        self._leases.pop(lease.id, None)
        return False

    def _finish_release(self, lease: Lease, outcome: ReleaseOutcome, result: ReleaseResult) -> None:
        if result.status == "lost":
            lease.lost = True
            logger.warning("lease_lost", lease_id=lease.id, channel=lease.channel)
            return
        self._released_total += 1
        if outcome == "failed" or outcome == "throttled":
            info = self._infos.get(lease.channel)
            if info is not None:
                info.failures_total += 1
        if self._debug:
            self._log.debug(
                "lease_released", channel=lease.channel, lease_id=lease.id, outcome=outcome
            )
        self._after_release(result, outcome, lease.id)

    def _after_release(self, result: ReleaseResult, outcome: str, lease_id: str) -> None:
        channel = result.channel
        if result.cooled:
            logger.info(
                "channel_cooling", channel=channel, cooldown_s=result.cooling_for, outcome=outcome
            )
            self._wake.set()
        if result.removed and channel is not None:
            if channel not in self._accounts:
                self._infos.pop(channel, None)
            logger.info("channel_removed", channel=channel)
        if not self._waiters:
            return
        if self._immediate is not None:
            # The freed slot goes to the oldest waiter that can use it; the
            # same loop also serves anyone a cooldown that just ended unblocked.
            if result.status == "released" and not self._serving:
                self._serve_now()
        else:
            self._wake.set()

    def _exit_outcome(self, lease: Lease, exc: BaseException | None) -> ReleaseOutcome:
        if exc is None or lease._outcome_set:
            return lease.outcome
        if isinstance(exc, Exception):
            return "failed"
        return "abandoned"

    # -- the account map -----------------------------------------------------

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
        self._wake.set()

    async def _apply_map(self, parsed: ParsedAccounts) -> None:
        # One pass over the new map: a 10,000-channel map arrives on every
        # refresh of every worker, so this stays a small multiple of json.loads.
        new = parsed.accounts
        old = self._accounts
        infos = self._infos
        added: list[str] = []
        changed = 0
        limits: dict[str, int] = {}
        for channel, account in new.items():
            limits[channel] = account.max_jobs
            info = infos.get(channel)
            if info is None:
                infos[channel] = _ChannelInfo(account)
                added.append(channel)
                continue
            before = old.get(channel)
            if before is None:
                added.append(channel)  # back from draining
            elif before is not account and _differs(before, account):
                changed += 1
            info.account = account
        # Nothing was removed iff the old map is the new one minus the additions.
        removed = [] if len(old) + len(added) == len(new) else [c for c in old if c not in new]
        self._log_rejected(parsed)
        self._accounts = dict(new)
        # NOTE: with a remote backend other tasks run during this round trip;
        # they already see the new accounts, and a grant of a channel the
        # backend still has but we dropped is given back by _take().
        await self._backend.set_map(limits)
        if self._immediate is not None and added:
            self._immediate.set_tags({channel: infos[channel] for channel in added})
        counts = self._backend.counts() if removed else {}
        for channel in removed:
            if channel not in counts:
                infos.pop(channel, None)
        self._log_map_change(added, removed, changed, counts)
        self._fail_unservable(removed)
        if self._immediate is not None:
            await self._serve()
        else:
            self._wake.set()

    def _fail_unservable(self, removed: list[str]) -> None:
        if not self._waiters:
            return
        if not self._accounts:
            error = NoAccountsError("no channel is configured")
            for waiter in list(self._waiters):
                self._fail(waiter, error)
            return
        for channel in removed:
            for waiter in self._waiters.pinned_to(channel):
                self._fail(
                    waiter,
                    NoAccountsError(f"channel {channel!r} left the account map", channel=channel),
                )

    def _log_rejected(self, parsed: ParsedAccounts) -> None:
        seen = frozenset((r.key, r.reason) for r in parsed.rejected)
        if seen == self._rejected_seen:
            return
        for key, reason in sorted(seen - self._rejected_seen)[:_CHANNEL_EVENTS_MAX]:
            logger.warning("account_rejected", channel=key, reason=reason)
        self._rejected_seen = seen

    def _log_map_change(
        self, added: list[str], removed: list[str], changed: int, counts: Any
    ) -> None:
        first = self._cache.fetched_at is None
        if not first and len(added) + len(removed) <= _CHANNEL_EVENTS_MAX:
            for channel in added:
                logger.info(
                    "channel_added", channel=channel, max_jobs=self._accounts[channel].max_jobs
                )
            for channel in removed:
                if channel in counts:
                    in_flight = counts[channel].in_flight
                    logger.info("channel_draining", channel=channel, in_flight=in_flight)
                else:
                    logger.info("channel_removed", channel=channel)
        if first or added or removed or changed:
            logger.info(
                "map_refreshed",
                channels=len(self._accounts),
                added=len(added),
                removed=len(removed),
                changed=changed,
            )

    def _check_stale(self) -> None:
        if self._max_stale is None:
            return
        age = self._cache.age()
        if age is not None and age <= self._max_stale:
            self._stale_logged = False
            return
        if not self._stale_logged:
            self._stale_logged = True
            logger.error("map_stale", map_age=age, max_stale=self._max_stale)
        raise StaleAccountMapError(age, self._max_stale)

    # -- background work -----------------------------------------------------

    def _notify(self) -> None:
        self._wake.set()
        # NOTE: an immediate backend notifies from inside its own operations
        # (a cooldown found over during an acquire). Serving the waiters right
        # here, before that acquire picks, keeps a newcomer from taking a slot
        # an older waiter was queued for.
        if self._immediate is not None and self._waiters and not self._serving:
            self._serve_now()

    async def _refresh_loop(self) -> None:
        while True:
            await anyio.sleep(self._cache.next_delay())
            try:
                await self._cache.refresh()
            except Exception:  # noqa: BLE001, S110 - counted and logged by the cache
                pass
            if self._max_stale is not None and (self._cache.age() or 0.0) > self._max_stale:
                self._check_stale_quietly()

    def _check_stale_quietly(self) -> None:
        try:
            self._check_stale()
        except StaleAccountMapError:
            pass

    async def _wake_loop(self) -> None:
        """Serve waiters when woken, when a cooldown ends, and by polling (remote)."""
        while True:
            delay = self._backend.next_wakeup()
            if self._waiters and self._immediate is None:
                delay = self._poll_interval if delay is None else min(delay, self._poll_interval)
            with anyio.move_on_after(math.inf if delay is None else delay):
                await self._wake.wait()
            self._wake = anyio.Event()
            if not self._waiters:
                continue
            try:
                await self._serve()
            except BackendUnavailableError as exc:
                for waiter in list(self._waiters):
                    self._fail(waiter, exc)

    async def _renew_loop(self) -> None:
        assert self._lease_ttl is not None
        interval = self._lease_ttl / 3
        while True:
            await anyio.sleep(interval)
            try:
                result = await self._backend.renew()
            except BackendUnavailableError:
                continue
            for lease_id in result.lost:
                lease = self._leases.pop(lease_id, None)
                if lease is not None:
                    lease.lost = True
                    lease.released = True
                    logger.warning("lease_lost", lease_id=lease_id, channel=lease.channel)
            for lease_id in result.released:
                lease = self._leases.pop(lease_id, None)
                if lease is not None:
                    lease.released = True
                    self._released_total += 1
            self._released_total += len(result.completed)

    # -- statistics ----------------------------------------------------------

    def statistics(self) -> BalancerStatistics:
        """
        Return a snapshot of capacity and history; cheap, no I/O.

        With a shared backend, ``in_flight`` and ``free`` are the cluster-wide
        figures as of the last round trip; ``waiting`` counts this process only.
        """
        channels: dict[str, ChannelStatistics] = {}
        capacity = in_flight = free = 0
        for channel, counts in self._backend.counts().items():
            info = self._infos.get(channel)
            channels[channel] = ChannelStatistics(
                channel=channel,
                max_jobs=counts.max_jobs,
                in_flight=counts.in_flight,
                free=counts.free,
                state=counts.state,
                acquired_total=info.acquired_total if info else 0,
                failures_total=info.failures_total if info else 0,
            )
            in_flight += counts.in_flight
            if counts.state == "active":
                capacity += counts.max_jobs
                free += counts.free
        return BalancerStatistics(
            channels=MappingProxyType(channels),
            capacity=capacity,
            in_flight=in_flight,
            free=free,
            waiting=len(self._waiters),
            acquired_total=self._acquired_total,
            released_total=self._released_total,
            timeouts_total=self._timeouts_total,
            map_fetched_at=self._cache.fetched_at,
            map_age=self._cache.age(),
            map_stale=self._cache.is_stale(),
            refresh_errors_total=self._cache.errors_total,
            last_refresh_error=self._cache.last_error,
        )


def _check_positive(name: str, value: object, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, not {value!r}")


def _differs(before: Account, after: Account) -> bool:
    """Whether a channel's account changed (limit, server or token)."""
    return (
        before.max_jobs != after.max_jobs
        or before.server != after.server
        or before.discord.reveal() != after.discord.reveal()
    )


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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"

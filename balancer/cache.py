"""
The account-map cache: TTL, last good map, staleness and single-flight refresh.

The map lives in a one-entry :class:`cachetools.TTLCache`; its expiry is what
"stale" means. The last good map is kept apart from it, because a stale map is
still the best knowledge we have: jobs carry their account's credentials, so
serving from it beats refusing work while useapi has a bad minute.

Concurrent refreshes share one request (single flight): the first caller
fetches and applies, later callers wait for that result. A cancelled leader
does not hand its cancellation to the followers; one of them fetches instead.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import structlog
from cachetools import TTLCache

from .accounts import ParsedAccounts
from .errors import ConfigNotFoundError, StaleAccountMapError, describe_error

if TYPE_CHECKING:
    from .sources import AccountSource

__all__ = ["MapCache"]

logger = structlog.get_logger("balancer")

_KEY = "map"


class _Flight:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: ParsedAccounts | None = None
        self.error: Exception | None = None


class MapCache:
    """
    Fetches the account map, applies it, and knows how old it is.

    Args:
        source: where the map comes from.
        apply: called with each good map, inside the flight (so followers see
            the map applied when their ``refresh()`` returns).
        ttl: seconds a fetched map counts as fresh.
        rng: jitter source for the refresh schedule.
        clock: monotonic clock (injectable for tests).
    """

    # Invariants: ``_fetched_at`` is set iff a good map was applied; at most one
    # fetch is in progress (``_flight``).

    def __init__(
        self,
        source: AccountSource,
        apply: Callable[[ParsedAccounts], Awaitable[None]],
        *,
        ttl: float,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
        horizon: float | None = None,
    ) -> None:
        self._source = source
        #: past this many seconds without a good map, the map is unusable
        self.max_stale = horizon
        self._stale_logged = False
        self._apply = apply
        self._ttl = ttl
        # Refreshes are planned within the shorter of ttl and max_stale: a map
        # must never go "too stale to use" while the upstream is healthy.
        self._horizon = ttl if horizon is None else min(ttl, horizon)
        self._rng = rng
        self._clock = clock
        self._fresh: TTLCache[str, ParsedAccounts] = TTLCache(maxsize=1, ttl=ttl, timer=clock)
        self._flight: _Flight | None = None
        self._fetched_at: float | None = None
        self._fetched_at_wall: float | None = None
        self.errors_total = 0
        self.last_error: str | None = None
        self.consecutive_errors = 0

    @property
    def fetched_at(self) -> float | None:
        """Wall-clock time of the last good fetch."""
        return self._fetched_at_wall

    def age(self) -> float | None:
        """Seconds since the last good fetch, or ``None`` before the first."""
        if self._fetched_at is None:
            return None
        return max(0.0, self._clock() - self._fetched_at)

    def is_stale(self) -> bool:
        """Whether the last good fetch is older than ``ttl`` (or there is none)."""
        return _KEY not in self._fresh

    async def refresh(self, *, empty_on_404: bool = False) -> ParsedAccounts:
        """
        Fetch and apply the map now, sharing a fetch already in progress.

        Args:
            empty_on_404: treat "no account configured" as a good, empty map
                (the balancer does so on its first fetch only).

        Raises:
            the source's error (``AuthError``, ``SourceError``, ...), after
            counting it; the last good map stays applied.
        """
        while True:
            flight = self._flight
            if flight is None:
                return await self._lead(empty_on_404)
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.result is not None:
                return flight.result
            # NOTE: the leader was cancelled before finishing; go round and
            # fetch ourselves rather than report its cancellation as ours.

    async def _lead(self, empty_on_404: bool) -> ParsedAccounts:
        flight = self._flight = _Flight()
        try:
            try:
                parsed = await self._source.fetch()
            except ConfigNotFoundError:
                if not empty_on_404:
                    raise
                parsed = ParsedAccounts({}, [])
            await self._apply(parsed)
            self._fetched_at = self._clock()
            self._fetched_at_wall = time.time()
            self._fresh[_KEY] = parsed
            self.consecutive_errors = 0
            flight.result = parsed
            return parsed
        except Exception as exc:
            self._record_error(exc)
            flight.error = exc
            raise
        finally:
            self._flight = None
            flight.done.set()

    def _record_error(self, exc: Exception) -> None:
        self.errors_total += 1
        self.consecutive_errors += 1
        self.last_error = describe_error(exc)
        logger.warning(
            "map_refresh_failed",
            error=self.last_error,
            consecutive=self.consecutive_errors,
            map_age=self.age(),
        )

    def next_delay(self) -> float:
        """
        Seconds until the next background refresh.

        After a good fetch: at 75-90 % of ``ttl`` (or ``max_stale``, if shorter) from that fetch, so the map is
        replaced before it goes stale and a fleet of workers does not refresh in
        lockstep. After failures: exponential backoff with full jitter, capped.
        """
        if self.consecutive_errors:
            base = min(1.0, self._horizon / 4)
            cap = max(base, min(self._horizon, 30.0))
            ceiling = min(cap, base * 2 ** (self.consecutive_errors - 1))
            return float(ceiling * (0.5 + 0.5 * self._rng.random()))
        age = self.age() or 0.0
        return max(0.0, self._horizon * (0.75 + 0.15 * self._rng.random()) - age)

    def check_usable(self) -> None:
        """
        Raise ``StaleAccountMapError`` once the last good map is older than
        ``max_stale`` (``map_stale`` is logged once per stale spell).
        """
        max_stale = self.max_stale
        if max_stale is None:
            return
        age = self.age()
        if age is not None and age <= max_stale:
            self._stale_logged = False
            return
        if not self._stale_logged:
            self._stale_logged = True
            logger.error("map_stale", map_age=age, max_stale=max_stale)
        raise StaleAccountMapError(age, max_stale)

    async def run(self) -> None:
        """Refresh in the background, forever; never raises (failures are counted)."""
        while True:
            await anyio.sleep(self.next_delay())
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001, S110 - counted and logged by _record_error
                pass
            if self.max_stale is not None and (self.age() or 0.0) > self.max_stale:
                try:
                    self.check_usable()  # logs map_stale once
                except StaleAccountMapError:
                    pass

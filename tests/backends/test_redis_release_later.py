"""
A release that failed while Redis was down, and that a later sync completed, counts.

The balancer forgets a lease whose release raised ``BackendUnavailableError``
(it logs ``lease_release_failed``); the backend keeps the release and runs it
with its next ``SYNC``. The renewal round after that reports it in
``RenewResult.completed``, and ``released_total`` counts it, unless the
release found its lease reclaimed after expiry. Against a real redis-server,
on asyncio and trio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest
import redis
from structlog.testing import capture_logs

from balancer import Balancer, StaticAccountSource
from balancer.backends.redis import RedisBackend
from balancer.testing import make_accounts

if TYPE_CHECKING:
    from balancer.backends.base import RenewResult
    from tests._redis import RedisServer

pytestmark = pytest.mark.redis

#: How Redis comes back after the outage, and ``released_total`` at the end.
COMEBACKS = {
    "with its data": 2,  # the release finds its lease and gives the slot back
    "without its data": 2,  # the lease went with the data: its slot is free too
    "with the lease reclaimed": 1,  # it expired meanwhile: lost, not released
}


class CountedRenewals(RedisBackend):
    """A backend that lets a test wait for the balancer's next renewal round."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._renewed = anyio.Event()

    async def renew(self) -> RenewResult:
        result = await super().renew()
        self._renewed.set()  # NOTE: the balancer takes the result in before our next step
        self._renewed = anyio.Event()
        return result

    async def next_round(self) -> None:
        """Return once a renewal round reached Redis and came back."""
        await self._renewed.wait()


@pytest.mark.parametrize("comeback", list(COMEBACKS))
async def test_release_completed_after_an_outage_counts_as_released(
    private_redis: RedisServer, redis_namespace: str, comeback: str
) -> None:
    """acquired 2, released 2, one of them while Redis was down (unless it was reclaimed)."""
    backend = CountedRenewals(private_redis.url, namespace=redis_namespace, timeout=1.0)
    source = StaticAccountSource(make_accounts(1, max_jobs=2))
    async with Balancer(source, backend=backend, lease_ttl=4) as lb:
        first = await lb.acquire(timeout=5)
        second = await lb.acquire(timeout=5)
        await lb.release(first)
        if comeback != "without its data":
            with redis.Redis.from_url(private_redis.url) as admin:
                admin.save()  # start() loads this snapshot: the lease is still there
        private_redis.kill()
        with capture_logs() as logs:
            await lb.release(second)
        assert [e["event"] for e in logs if e["event"].startswith("lease_")] == [
            "lease_release_failed"
        ]
        private_redis.start()
        if comeback == "with the lease reclaimed":
            # NOTE: no task ran since start(), so no sync yet; the next one
            # reclaims the lease (its upkeep comes first), then runs the release.
            with redis.Redis.from_url(private_redis.url) as admin:
                admin.zadd(f"{{{redis_namespace}}}:leases", {second.id: 1})
        with anyio.fail_after(10):
            while lb.statistics().in_flight:  # until a sync (maybe the checker's) ran it
                await backend.next_round()
            await backend.next_round()  # and a renewal round came after that sync
        stats = lb.statistics()
    assert (stats.acquired_total, stats.released_total) == (2, COMEBACKS[comeback])

"""
Users' reports against RedisBackend (issue #10), each reproduced on a real
redis-server, on asyncio and trio.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis

from balancer import (
    BackendUnavailableError,
    Balancer,
    Lease,
    NoCapacityError,
    RedisBackend,
    StaticAccountSource,
)
from balancer.testing import make_accounts

pytestmark = pytest.mark.redis


@asynccontextmanager
async def balancer(
    url: str, namespace: str, channels: int = 1, max_jobs: int = 1, **options: Any
) -> AsyncIterator[Balancer]:
    options.setdefault("lease_ttl", 30)
    backend = RedisBackend(url, namespace=namespace)
    source = StaticAccountSource(make_accounts(channels, max_jobs=max_jobs))
    async with Balancer(source, backend=backend, ttl=3600, **options) as lb:
        yield lb


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - effects of other connections arrive by polling
            await anyio.sleep(0.005)


def raw_counts(url: str, namespace: str) -> tuple[dict[str, int], int]:
    """The namespace's in-flight counts and lease count, read straight from Redis."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        inf = {str(k): int(v) for k, v in client.hgetall(f"{{{namespace}}}:inf").items()}
        leases = int(client.zcard(f"{{{namespace}}}:leases"))
    finally:
        client.close()
    return inf, leases


class TestFifoWithinAProcess:
    async def test_waiters_are_served_in_call_order(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """Six tasks that call acquire() together are served in call order (#10, item 1)."""
        called: list[int] = []
        served: list[int] = []
        async with (
            balancer(redis_url, redis_namespace, poll_interval=30) as lb,
            anyio.create_task_group() as tg,
        ):
            held = await lb.acquire(timeout=5)

            async def waiter(i: int) -> None:
                # NOTE: no checkpoint between recording and calling: this is
                # the call order, whatever order the event loop ran the tasks.
                called.append(i)
                lease = await lb.acquire(timeout=10)
                served.append(i)
                await lb.release(lease)

            for i in range(6):
                tg.start_soon(waiter, i)
            await eventually(lambda: lb.statistics().waiting == 6)
            await lb.release(held)
            await eventually(lambda: len(served) == 6, timeout=10)
        assert served == called

    async def test_waiters_queued_one_by_one_are_served_in_order(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """Waiters that queued one after another are served in that order."""
        order: list[int] = []
        async with (
            balancer(redis_url, redis_namespace, poll_interval=30) as lb,
            anyio.create_task_group() as tg,
        ):
            held = await lb.acquire(timeout=5)

            async def waiter(i: int) -> None:
                lease = await lb.acquire(timeout=10)
                order.append(i)
                await lb.release(lease)

            for i in range(6):
                tg.start_soon(waiter, i)
                await eventually(lambda n=i + 1: lb.statistics().waiting == n)  # type: ignore[misc]
            await lb.release(held)
            await eventually(lambda: len(order) == 6, timeout=10)
        assert order == [0, 1, 2, 3, 4, 5]

    async def test_a_releaser_that_acquires_again_does_not_jump_the_queue(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """A task that releases and re-acquires at once queues behind the waiter (#10, item 1)."""
        order: list[str] = []
        async with (
            balancer(redis_url, redis_namespace, poll_interval=30) as lb,
            anyio.create_task_group() as tg,
        ):
            held = await lb.acquire(timeout=5)

            async def waiter() -> None:
                lease = await lb.acquire(timeout=10)
                order.append("waiter")
                await lb.release(lease)

            tg.start_soon(waiter)
            await eventually(lambda: lb.statistics().waiting == 1)
            await lb.release(held)
            again = await lb.acquire(timeout=10)
            order.append("releaser")
            await lb.release(again)
        assert order == ["waiter", "releaser"]


class TestTimeoutZero:
    async def test_one_attempt_never_backend_unavailable(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """``acquire(timeout=0)`` on a healthy Redis: a lease or NoCapacityError (#10, item 2)."""
        async with balancer(redis_url, redis_namespace, channels=1, max_jobs=2) as lb:
            got: list[Lease] = []
            refused = 0
            for _ in range(100):
                try:
                    got.append(await lb.acquire(timeout=0))
                except NoCapacityError:
                    refused += 1
                if len(got) == 2:
                    await lb.release(got.pop(0))
            assert refused == 0  # a slot was always free
            for lease in got:
                await lb.release(lease)
            held = [await lb.acquire(timeout=0) for _ in range(2)]
            for _ in range(100):
                with pytest.raises(NoCapacityError):
                    await lb.acquire(timeout=0)
            for lease in held:
                await lb.release(lease)

    async def test_a_tiny_timeout_never_backend_unavailable(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """A timeout shorter than one round trip still makes the attempt (#10, item 2)."""
        async with balancer(redis_url, redis_namespace, channels=1, max_jobs=1) as lb:
            for _ in range(50):
                lease = await lb.acquire(timeout=0.0001)
                await lb.release(lease)
            held = await lb.acquire(timeout=0)
            for _ in range(50):
                with pytest.raises(NoCapacityError):
                    await lb.acquire(timeout=0.0001)
            await lb.release(held)


class TestGrantsInDoubt:
    async def test_a_grant_landing_after_a_cancel_is_handed_back_at_once(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """A grant that lands for a cancelled acquire frees its slot at once (#10, item 3)."""
        admin = redis.Redis.from_url(redis_url)
        try:
            async with balancer(redis_url, redis_namespace, channels=1, max_jobs=1) as lb:
                with anyio.CancelScope() as scope:

                    async def stall_then_cancel() -> None:
                        # The server sleeps while our ACQUIRE is on the wire.
                        await anyio.to_thread.run_sync(admin.execute_command, "DEBUG", "SLEEP", 0.3)

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(stall_then_cancel)
                        await anyio.sleep(0.05)
                        scope.cancel()
                        await lb.acquire(timeout=10)
                started = time.monotonic()
                lease = await lb.acquire(timeout=5)
                assert time.monotonic() - started < 2.0
                await lb.release(lease)
        finally:
            admin.close()
        inf, leases = raw_counts(redis_url, redis_namespace)
        assert (sum(inf.values()), leases) == (0, 0)

    async def test_close_leaves_no_lease_behind(self, redis_url: str, redis_namespace: str) -> None:
        """After a clean shutdown Redis holds no lease, even with a grant in doubt (#10, item 3)."""
        admin = redis.Redis.from_url(redis_url)
        try:
            async with balancer(redis_url, redis_namespace, channels=1, max_jobs=1) as lb:
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(
                            anyio.to_thread.run_sync, admin.execute_command, "DEBUG", "SLEEP", 0.3
                        )
                        await anyio.sleep(0.05)
                        scope.cancel()
                        await lb.acquire(timeout=10)
        finally:
            admin.close()
        inf, leases = raw_counts(redis_url, redis_namespace)
        assert leases == 0
        assert sum(inf.values()) == 0

    async def test_a_grant_cut_by_the_backend_timeout_comes_back_at_once(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """A grant that lands after its round trip timed out is handed back at once (#10, item 3)."""
        async with cut_round_trip(redis_url, redis_namespace, pause_ms=800) as lb:
            # Renewals come every 10 s: only an immediate give-back is this fast.
            await eventually(lambda: raw_counts(redis_url, redis_namespace)[1] == 0, 3)
            lease = await lb.acquire(timeout=0)
            await lb.release(lease)

    async def test_close_settles_a_grant_in_doubt(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """Closing right after a cut round trip still leaves Redis without the lease (#10, item 3)."""
        async with cut_round_trip(redis_url, redis_namespace, pause_ms=500):
            pass
        inf, leases = raw_counts(redis_url, redis_namespace)
        assert (sum(inf.values()), leases) == (0, 0)


@asynccontextmanager
async def cut_round_trip(url: str, namespace: str, *, pause_ms: int) -> AsyncIterator[Balancer]:
    """A running balancer whose one acquire was cut by the backend's 0.3 s timeout."""
    backend = RedisBackend(url, namespace=namespace, timeout=0.3)
    source = StaticAccountSource(make_accounts(1, max_jobs=1))
    admin = redis.Redis.from_url(url)
    try:
        async with Balancer(source, backend=backend, ttl=3600, lease_ttl=30) as lb:
            admin.client_pause(pause_ms, all=True)
            with pytest.raises(BackendUnavailableError):
                await lb.acquire(timeout=5)
            yield lb
    finally:
        admin.close()


class TestFreshStatistics:
    async def test_in_flight_is_zero_once_everything_is_released(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """Concurrent round trips leave the newest figures, not a stale in_flight (#10, item 4)."""
        async with balancer(redis_url, redis_namespace, channels=1, max_jobs=8) as lb:

            async def job() -> None:
                for _ in range(20):
                    lease = await lb.acquire(timeout=5)
                    await anyio.lowlevel.checkpoint()
                    await lb.release(lease)

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(job)
            assert raw_counts(redis_url, redis_namespace)[1] == 0
            stats = lb.statistics()
            assert stats.in_flight == 0
            assert stats.channels["ch0"].in_flight == 0


class TestReleaseByIdStays:
    async def test_a_short_ttl_webhook_release_is_never_undone(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """A lease released by id where ``lease_ttl`` is short never comes back (#10, item 5)."""
        async with (
            balancer(redis_url, redis_namespace, lease_ttl=0.9) as owner,
            Balancer(
                StaticAccountSource({}),
                backend=RedisBackend(redis_url, namespace=redis_namespace),
                lease_ttl=0.3,
            ) as webhook,
        ):
            lease = await owner.acquire(timeout=5)
            await webhook.release(lease.id)
            # Several of the owner's renewal rounds (every 0.3 s), well past the
            # webhook's tombstone (2 x 0.3 s + 10 s would be long enough, but a
            # renewal must not need a tombstone to stay away).
            client = redis.Redis.from_url(redis_url)
            try:
                client.delete(f"{{{redis_namespace}}}:tomb", f"{{{redis_namespace}}}:tombx")
            finally:
                client.close()
            await anyio.sleep(1.2)
            assert raw_counts(redis_url, redis_namespace)[1] == 0
            again = await owner.acquire(timeout=0)
            await owner.release(again)
            assert lease.released

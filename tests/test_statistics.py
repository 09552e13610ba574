"""Statistics are a read: taking them never changes what the balancer does."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from balancer import Balancer, Lease, MemoryBackend, NoCapacityError, StaticAccountSource
from balancer.testing import make_accounts


class TestStatisticsOnlyRead:
    async def test_statistics_never_ends_a_cooldown_or_grants(self) -> None:
        """``statistics()`` after a cooldown ran out neither grants nor wakes a waiter (#9)."""
        now = [1000.0]
        backend = MemoryBackend()
        backend._clock = lambda: now[0]
        source = StaticAccountSource(make_accounts(1, max_jobs=1))
        got: list[Lease] = []

        async def wait_for_slot() -> None:
            got.append(await lb.acquire(channel="ch0"))

        async with (
            Balancer(source, ttl=3600, cooldown=30, backend=backend) as lb,
            anyio.create_task_group() as tg,
        ):
            await lb.release(await lb.acquire(channel="ch0"), outcome="throttled")
            tg.start_soon(wait_for_slot)
            await anyio.wait_all_tasks_blocked()
            now[0] += 31
            for _ in range(3):
                stats = lb.statistics()
                assert stats.waiting == 1
                assert stats.in_flight == 0
                # The read shows the cooldown as over, without acting on it.
                assert stats.channels["ch0"].state == "active"
            assert got == []
            # The acquire path ends the cooldown, and the older waiter goes first.
            with pytest.raises(NoCapacityError):
                await lb.acquire(timeout=0)
            with anyio.fail_after(5):
                while not got:
                    await anyio.lowlevel.checkpoint()
            assert got[0].channel == "ch0"
            await lb.release(got[0])

"""Leases: the one type both facades return, and what the context-manager form reports."""

from __future__ import annotations

import anyio
import pytest

from balancer import Balancer, Lease, StaticAccountSource, SyncBalancer
from balancer.testing import make_accounts


def _source(max_jobs: int = 1) -> StaticAccountSource:
    return StaticAccountSource(make_accounts(1, max_jobs=max_jobs, seed=7))


class Boom(Exception):
    pass


class TestContextManagerOutcome:
    async def test_exception_makes_the_outcome_failed(self) -> None:
        """An exception leaving ``async with lb.acquire()`` leaves ``lease.outcome == "failed"`` (#9)."""
        async with Balancer(_source(), ttl=3600) as lb:
            seen: Lease | None = None
            with pytest.raises(Boom):
                async with lb.acquire(timeout=1) as lease:
                    seen = lease
                    raise Boom
            assert seen is not None
            assert seen.outcome == "failed"
            assert seen.released
            assert lb.statistics().channels[seen.channel].failures_total == 1

    async def test_an_outcome_set_in_the_block_is_kept(self) -> None:
        """An outcome the block set explicitly wins over the exception's "failed"."""
        async with Balancer(_source(), ttl=3600, cooldown=0) as lb:
            with pytest.raises(Boom):
                async with lb.acquire(timeout=1) as lease:
                    lease.outcome = "throttled"
                    raise Boom
            assert lease.outcome == "throttled"

    async def test_a_clean_exit_stays_ok(self) -> None:
        """Leaving the block normally releases with outcome "ok"."""
        async with Balancer(_source(), ttl=3600) as lb:
            async with lb.acquire(timeout=1) as lease:
                pass
            assert lease.outcome == "ok"
            assert lb.statistics().channels[lease.channel].failures_total == 0

    async def test_cancellation_frees_the_slot_without_a_failure(self) -> None:
        """A cancelled block gives its slot back and does not count a failure."""
        async with Balancer(_source(), ttl=3600) as lb:
            with anyio.CancelScope() as scope:
                async with lb.acquire(timeout=1) as lease:
                    scope.cancel()
                    await anyio.sleep(1)
            stats = lb.statistics()
            assert stats.in_flight == 0
            assert stats.channels[lease.channel].failures_total == 0


class TestSyncLease:
    @pytest.fixture(params=["asyncio", "trio"])
    def loop(self, request: pytest.FixtureRequest) -> str:
        name: str = request.param
        return name

    def test_both_forms_return_a_lease(self, loop: str) -> None:
        """``SyncBalancer.acquire()`` gives a :class:`balancer.Lease`, with or without ``with`` (#9)."""
        with SyncBalancer(_source(2), ttl=3600, async_backend=loop) as lb:
            lease = lb.acquire(timeout=1)
            assert isinstance(lease, Lease)
            with lb.acquire(timeout=1) as held:
                assert isinstance(held, Lease)
                assert lb.statistics().in_flight == 2
            lb.release(lease)
            assert lb.statistics().in_flight == 0

    def test_exception_makes_the_outcome_failed(self, loop: str) -> None:
        """An exception leaving ``with lb.acquire()`` leaves ``lease.outcome == "failed"`` (#9)."""
        with SyncBalancer(_source(), ttl=3600, async_backend=loop) as lb:
            with pytest.raises(Boom), lb.acquire(timeout=1) as lease:
                raise Boom
            assert lease.outcome == "failed"
            assert lease.released
            assert lb.statistics().channels[lease.channel].failures_total == 1

    async def test_an_async_lease_refuses_plain_with(self) -> None:
        """A lease from the async balancer is not a sync context manager: the error says why."""
        async with Balancer(_source(), ttl=3600) as lb:
            lease = await lb.acquire(timeout=1)
            with pytest.raises(TypeError, match="async with"), lease:
                pass
            await lb.release(lease)

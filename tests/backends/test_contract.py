"""
The backend contract: one suite that every backend passes.

Every test runs on ``MemoryBackend`` and on ``RedisBackend`` over a real
redis-server (``tests/_redis.py``), each on asyncio and on trio: four runs, in
the manner of trio's ``generic_lock_test`` and cachetools' ``CacheTestMixin``.
The ``backend_factory`` fixture makes fresh backends of the kind under test.
For Redis every backend it makes in one test shares the test's namespace, so
several of them stand for several processes sharing counts; a test that can
use such peers asks for ``backend_factory.peers(n)``: ``n`` backends when they
share counts (``Backend.shared``), else one.

The tests go through the public API (``Balancer`` over a ``StaticAccountSource``)
or the ``Backend`` protocol (``open``, ``set_map``, ``try_acquire``, ``release``,
``renew``, ``counts``, ``next_wakeup``). The memory backend's effects are all
done once ``anyio.wait_all_tasks_blocked()`` returns; Redis's may arrive later
(a round trip in flight, another process's pub/sub message), so :func:`settle`
then polls, bounded by ``anyio.fail_after``. No sleep synchronises anything.

Kept out of the contract, on purpose:

* Redis never publishes an empty map (a process without channels must not
  drain the fleet's), so every map here keeps at least one channel.

Backend-specific behaviour stays elsewhere: ``tests/backends/test_memory.py``
(the fake clock, the model test), ``tests/test_balancer.py`` (waiting,
timeouts, cancellation and the memory backend's direct hand-off) and
``tests/backends/test_redis.py`` (shared counts, lease expiry, faults, epochs,
clients, real processes).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
import structlog.testing
from anyio.abc import TaskGroup

from balancer import (
    Balancer,
    Lease,
    MemoryBackend,
    NoAccountsError,
    NoCapacityError,
    RedisBackend,
    StaticAccountSource,
)
from balancer.backends.base import Backend, BackendConfig, ChannelCounts, ReleaseOutcome
from tests._helpers import (
    Acquirer,
    Wakeups,
    channel_state,
    raw,
    running,
    served,
    settle,
    start,
)

# -- the backends under test ----------------------------------------------------------


class BackendFactory:
    """Makes fresh backends of one kind; called twice on Redis: two processes."""

    def __init__(self, kind: str, make: Callable[[], Backend]) -> None:
        self.kind = kind
        self._make = make
        #: The acquire timeout that means "now": one attempt, with any backend.
        self.no_wait = 0.0

    def __call__(self) -> Backend:
        return self._make()

    def __repr__(self) -> str:
        return f"<BackendFactory {self.kind}>"

    def peers(self, n: int = 2) -> list[Backend]:
        """``n`` backends sharing counts, or one when this kind shares nothing."""
        first = self()
        if not first.shared:
            return [first]
        return [first, *(self() for _ in range(n - 1))]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend_factory(request: pytest.FixtureRequest) -> BackendFactory:
    """A factory of fresh backends: ``MemoryBackend`` or ``RedisBackend``."""
    if request.param == "memory":
        return BackendFactory("memory", MemoryBackend)
    url: str = request.getfixturevalue("redis_url")
    namespace: str = request.getfixturevalue("redis_namespace")
    return BackendFactory("redis", lambda: RedisBackend(url, namespace=namespace))


# -- the protocol, as a balancer drives it -------------------------------------------------


@asynccontextmanager
async def opened(
    factory: BackendFactory,
    limits: Mapping[str, int],
    *,
    peers: int = 1,
    selection: str = "random",
    cooldown: float = 30.0,
    failures_to_cool: int = 5,
) -> AsyncIterator[list[tuple[Backend, Wakeups]]]:
    """
    Backends opened as balancers open them, each with ``limits`` as its map.

    Owner ``p<i>`` makes lease ids ``p<i>-<n>``, as a balancer does; the
    memory backend's choices are seeded.
    """
    async with AsyncExitStack() as stack:
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        found = []
        for i, backend in enumerate(factory.peers(peers)):
            config = BackendConfig(
                owner=f"p{i}",
                selection=selection,  # type: ignore[arg-type]
                rng=random.Random(i),
                lease_ttl=backend.default_lease_ttl,
                cooldown=cooldown,
                failures_to_cool=failures_to_cool,
            )
            wakeups = Wakeups()
            await backend.open(config, wakeups, tg)
            stack.push_async_callback(_close, backend)
            await backend.set_map(limits)
            found.append((backend, wakeups))
        yield found


async def _close(backend: Backend) -> None:
    with anyio.CancelScope(shield=True):
        await backend.close()


def state(backend: Backend, channel: str) -> tuple[int, int, str, int]:
    """One channel's ``(max_jobs, in_flight, state, free)``."""
    counts = backend.counts()[channel]
    return counts.max_jobs, counts.in_flight, counts.state, counts.free


async def acquire_eventually(
    backend: Backend, lease_id: str, channel: str | None = None, *, within: float = 5.0
) -> str:
    """Retry ``try_acquire`` until it grants (a cooldown is ending); bounded by ``within``."""
    with anyio.fail_after(within):
        while (got := await backend.try_acquire(lease_id, channel)) is None:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    return got


class TestCounts:
    async def test_set_map_lists_every_channel_active_and_idle(
        self, backend_factory: BackendFactory
    ):
        """After set_map every channel is active with nothing in flight; set_map is idempotent."""
        expected = {"c1": ChannelCounts(2, 0, "active"), "c2": ChannelCounts(5, 0, "active")}
        async with opened(backend_factory, {"c1": 2, "c2": 5}) as [(b, _)]:
            assert dict(b.counts()) == expected
            await b.set_map({"c1": 2, "c2": 5})
            assert dict(b.counts()) == expected

    async def test_acquire_and_release_count_slots(self, backend_factory: BackendFactory):
        """try_acquire takes one slot (pinned or not) and release gives it back, naming the channel."""
        async with opened(backend_factory, {"a": 2}) as [(b, _)]:
            assert await b.try_acquire("p0-1", None) == "a"
            assert await b.try_acquire("p0-2", "a") == "a"
            assert state(b, "a") == (2, 2, "active", 0)
            assert await b.try_acquire("p0-3", None) is None
            assert await b.try_acquire("p0-4", "a") is None
            assert await b.try_acquire("p0-5", "nope") is None  # an unknown pin grants nothing
            result = await b.release("p0-1", "ok")
            assert (result.status, result.channel, result.cooled, result.removed) == (
                "released",
                "a",
                False,
                False,
            )
            assert state(b, "a") == (2, 1, "active", 1)

    async def test_release_is_idempotent(self, backend_factory: BackendFactory):
        """Releasing an unknown lease, or a lease twice, answers "unknown" and changes nothing."""
        async with opened(backend_factory, {"a": 2}) as [(b, _)]:
            assert (await b.release("p0-99", "ok")).status == "unknown"
            assert await b.try_acquire("p0-1", "a") == "a"
            assert (await b.release("p0-1", "failed")).status == "released"
            second = await b.release("p0-1", "failed")
            assert (second.status, second.channel) == ("unknown", None)
            assert state(b, "a") == (2, 0, "active", 2)

    async def test_grants_fill_every_channel_exactly(self, backend_factory: BackendFactory):
        """However many attempts, from however many processes, no channel takes more than max_jobs."""
        limits = {"a": 1, "b": 2, "c": 3}
        async with opened(backend_factory, limits, peers=2) as peers:
            attempts = [
                await peers[i % len(peers)][0].try_acquire(f"p{i % len(peers)}-{i}", None)
                for i in range(30)
            ]
            assert Counter(got for got in attempts if got is not None) == Counter(limits)
            for b, _ in peers:
                await b.renew()  # counts as of this round trip
                assert all(counts.free == 0 for counts in b.counts().values())

    async def test_concurrent_acquires_never_exceed_max_jobs(self, backend_factory: BackendFactory):
        """Many tasks on every process hammering three channels never exceed any max_jobs."""
        limits = {"c1": 1, "c2": 2, "c3": 3}
        rng = random.Random(7)
        running: Counter[str] = Counter()
        peak: Counter[str] = Counter()
        grants = 0

        async def worker(backend: Backend, owner: str) -> None:
            nonlocal grants
            for n in range(15):
                lease_id = f"{owner}-{n}"
                channel = await backend.try_acquire(lease_id, None)
                if channel is None:
                    await anyio.lowlevel.checkpoint()
                    continue
                running[channel] += 1  # counted after the grant, uncounted before release
                peak[channel] = max(peak[channel], running[channel])
                grants += 1
                for _ in range(rng.randint(0, 3)):  # the job: others run meanwhile
                    await anyio.lowlevel.checkpoint()
                running[channel] -= 1
                await backend.release(lease_id, "ok")

        async with opened(backend_factory, limits, peers=2) as peers:
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for p, (b, _) in enumerate(peers):
                        for i in range(24 // len(peers)):
                            tg.start_soon(worker, b, f"p{p}.{i}")
            assert all(peak[c] <= m for c, m in limits.items()), peak
            assert grants > 50
            for b, _ in peers:
                await b.renew()
                assert {c: n.in_flight for c, n in b.counts().items()} == dict.fromkeys(limits, 0)


class TestSelectionProtocol:
    @pytest.mark.parametrize("selection", ["random", "weighted", "p2c"])
    async def test_picks_only_channels_with_a_free_slot(
        self, backend_factory: BackendFactory, selection: str
    ):
        """Every selection mode picks only active channels with a free slot."""
        limits = {f"c{i}": 2 for i in range(8)}
        async with opened(backend_factory, limits, selection=selection) as [(b, _)]:
            for i in range(6):  # fill c0..c5
                assert await b.try_acquire(f"p0-{i}a", f"c{i}") == f"c{i}"
                assert await b.try_acquire(f"p0-{i}b", f"c{i}") == f"c{i}"
            picks = {await b.try_acquire(f"p0-x{n}", None) for n in range(4)}
            assert picks == {"c6", "c7"}
            assert await b.try_acquire("p0-last", None) is None


class TestMapChangesProtocol:
    async def test_removed_idle_channel_disappears(self, backend_factory: BackendFactory):
        """A channel with nothing in flight disappears as soon as it leaves the map."""
        async with opened(backend_factory, {"a": 1, "b": 1}) as [(b, _)]:
            await b.set_map({"a": 1})
            assert set(b.counts()) == {"a"}

    async def test_removed_busy_channel_drains_then_disappears(
        self, backend_factory: BackendFactory
    ):
        """A removed channel with leases out grants nothing and goes with its last lease."""
        async with opened(backend_factory, {"a": 3, "b": 1}) as [(b, _)]:
            assert await b.try_acquire("p0-1", "a") == "a"
            assert await b.try_acquire("p0-2", "a") == "a"
            await b.set_map({"b": 1})
            assert state(b, "a") == (3, 2, "draining", 0)
            assert await b.try_acquire("p0-3", "a") is None
            assert await b.try_acquire("p0-4", None) == "b"
            first = await b.release("p0-1", "ok")
            assert (first.status, first.removed) == ("released", False)
            assert state(b, "a") == (3, 1, "draining", 0)
            last = await b.release("p0-2", "ok")
            assert (last.status, last.channel, last.removed) == ("released", "a", True)
            assert "a" not in b.counts()
            await b.renew()
            assert "a" not in b.counts()

    async def test_readded_draining_channel_is_active_again(self, backend_factory: BackendFactory):
        """A draining channel that comes back keeps its in-flight count and takes leases again."""
        async with opened(backend_factory, {"a": 2, "b": 1}) as [(b, _)]:
            assert await b.try_acquire("p0-1", "a") == "a"
            await b.set_map({"b": 1})
            assert state(b, "a") == (2, 1, "draining", 0)
            await b.set_map({"a": 2, "b": 1})
            assert state(b, "a") == (2, 1, "active", 1)
            assert await b.try_acquire("p0-2", "a") == "a"
            assert await b.try_acquire("p0-3", "a") is None

    async def test_lowered_max_jobs_admits_no_one_until_under(
        self, backend_factory: BackendFactory
    ):
        """A lowered max_jobs lets holders finish but grants nothing until in_flight < max_jobs."""
        async with opened(backend_factory, {"a": 3}) as [(b, _)]:
            for n in (1, 2, 3):
                assert await b.try_acquire(f"p0-{n}", None) == "a"
            await b.set_map({"a": 1})
            assert state(b, "a") == (1, 3, "active", 0)
            await b.release("p0-1", "ok")
            assert await b.try_acquire("p0-4", None) is None
            await b.release("p0-2", "ok")
            assert state(b, "a") == (1, 1, "active", 0)
            assert await b.try_acquire("p0-5", "a") is None
            await b.release("p0-3", "ok")
            assert await b.try_acquire("p0-6", None) == "a"
            assert await b.try_acquire("p0-7", None) is None

    async def test_raised_max_jobs_grants_at_once_everywhere(self, backend_factory: BackendFactory):
        """A raised max_jobs grants at once, and wakes every other process sharing the counts."""
        async with opened(backend_factory, {"a": 1}, peers=2) as peers:
            (first, _), (last, last_wakeups) = peers[0], peers[-1]
            assert await first.try_acquire("p0-1", None) == "a"
            assert await last.try_acquire("p1-1", None) is None
            woken = last_wakeups.arm()
            await first.set_map({"a": 3})
            if last is not first:
                with anyio.fail_after(5):
                    await woken.wait()
            assert await last.try_acquire("p1-2", None) == "a"
            assert await last.try_acquire("p1-3", None) == "a"
            assert await last.try_acquire("p1-4", None) is None


class TestCoolingProtocol:
    async def test_throttled_cools_for_cooldown_everywhere(self, backend_factory: BackendFactory):
        """A "throttled" release cools the channel, in every process, for ``cooldown``."""
        cooldown = 0.3
        async with opened(backend_factory, {"a": 2}, peers=2, cooldown=cooldown) as peers:
            first = peers[0][0]
            assert await first.try_acquire("p0-1", "a") == "a"
            throttled_at = time.monotonic()
            result = await first.release("p0-1", "throttled")
            assert (result.status, result.cooled) == ("released", True)
            assert result.cooling_for == pytest.approx(cooldown)
            for p, (b, _) in enumerate(peers):
                await b.renew()  # counts as of this round trip
                assert state(b, "a") == (2, 0, "cooling", 0)
                assert await b.try_acquire(f"p{p}-2", None) is None
                assert await b.try_acquire(f"p{p}-3", "a") is None
                wakeup = b.next_wakeup()
                assert wakeup is not None and 0 < wakeup <= cooldown + 0.1
            for p, (b, _) in enumerate(peers):
                assert await acquire_eventually(b, f"p{p}-4", "a") == "a"
                assert time.monotonic() - throttled_at >= cooldown * 0.8
                assert b.counts()["a"].state == "active"

    async def test_consecutive_failures_cool_at_the_last(self, backend_factory: BackendFactory):
        """``failures_to_cool`` consecutive "failed" outcomes cool the channel, at the last one."""
        async with opened(backend_factory, {"a": 5}, failures_to_cool=3) as [(b, _)]:
            for i in range(5):
                assert await b.try_acquire(f"p0-{i}", "a") == "a"
            assert not (await b.release("p0-0", "failed")).cooled
            assert not (await b.release("p0-1", "failed")).cooled
            assert b.counts()["a"].state == "active"
            assert (await b.release("p0-2", "failed")).cooled
            assert b.counts()["a"].state == "cooling"
            assert await b.try_acquire("p0-9", None) is None

    async def test_ok_resets_the_streak_and_abandoned_leaves_it(
        self, backend_factory: BackendFactory
    ):
        """An "ok" starts the failure count again; an "abandoned" neither resets nor extends it."""
        outcomes: list[ReleaseOutcome] = ["failed", "ok", "failed", "abandoned", "failed"]
        async with opened(backend_factory, {"a": 1}, failures_to_cool=2) as [(b, _)]:
            results = []
            for n, outcome in enumerate(outcomes):
                assert await b.try_acquire(f"p0-{n}", None) == "a"
                result = await b.release(f"p0-{n}", outcome)
                results.append((result.status, result.cooled))
            assert results == [("released", False)] * 4 + [("released", True)]
            assert b.counts()["a"].state == "cooling"
            assert await b.try_acquire("p0-x", None) is None

    async def test_abandoned_alone_never_cools(self, backend_factory: BackendFactory):
        """Any number of "abandoned" releases never cools a channel."""
        async with opened(backend_factory, {"a": 1}, failures_to_cool=1) as [(b, _)]:
            for i in range(5):
                assert await b.try_acquire(f"p0-{i}", "a") == "a"
                assert not (await b.release(f"p0-{i}", "abandoned")).cooled
            assert b.counts()["a"].state == "active"

    async def test_draining_wins_over_cooling(self, backend_factory: BackendFactory):
        """A cooling channel that leaves the map reports "draining" and goes with its last lease."""
        async with opened(backend_factory, {"a": 2, "b": 1}) as [(b, _)]:
            assert await b.try_acquire("p0-1", "a") == "a"
            assert await b.try_acquire("p0-2", "a") == "a"
            assert (await b.release("p0-1", "throttled")).cooled
            await b.set_map({"b": 1})
            assert state(b, "a") == (2, 1, "draining", 0)
            assert (await b.release("p0-2", "throttled")).removed
            assert set(b.counts()) == {"b"}

    async def test_throttled_last_lease_of_draining_channel_removes_it(
        self, backend_factory: BackendFactory
    ):
        """Throttling the last lease of a draining channel still removes it, for good."""
        async with opened(backend_factory, {"a": 1, "b": 1}) as [(b, _)]:
            assert await b.try_acquire("p0-1", "a") == "a"
            await b.set_map({"b": 1})
            result = await b.release("p0-1", "throttled")
            assert (result.status, result.removed) == ("released", True)
            await b.renew()
            assert set(b.counts()) == {"b"}

    async def test_cooling_channel_removed_and_readded_starts_fresh(
        self, backend_factory: BackendFactory
    ):
        """A cooling channel that leaves the map idle and comes back is active at once."""
        async with opened(backend_factory, {"a": 1, "b": 1}) as [(b, _)]:
            assert await b.try_acquire("p0-1", "a") == "a"
            assert (await b.release("p0-1", "throttled")).cooled
            await b.set_map({"b": 1})
            assert "a" not in b.counts()
            await b.set_map({"a": 1, "b": 1})
            assert state(b, "a") == (1, 0, "active", 1)
            assert await b.try_acquire("p0-2", "a") == "a"


# -- through the Balancer ----------------------------------------------------------------


async def no_capacity(lb: Balancer, factory: BackendFactory, channel: str | None = None) -> None:
    """Nothing can be granted now (on ``channel``)."""
    with anyio.fail_after(5), pytest.raises(NoCapacityError) as info:
        await lb.acquire(timeout=factory.no_wait, channel=channel)
    assert info.value.channel == channel


class TestBalancerCounts:
    async def test_never_more_than_max_jobs_under_concurrent_acquires(
        self, backend_factory: BackendFactory
    ):
        """Jobs on every balancer sharing the counts never run more than a channel's max_jobs."""
        limits = {"a": 1, "b": 2, "c": 3}
        rng = random.Random(11)
        running_now: Counter[str] = Counter()
        peak: Counter[str] = Counter()
        done: Counter[int] = Counter()

        async def job(lb: Balancer, which: int) -> None:
            async with lb.acquire(timeout=15) as lease:
                running_now[lease.channel] += 1
                peak[lease.channel] = max(peak[lease.channel], running_now[lease.channel])
                for _ in range(rng.randint(0, 3)):  # the job: others run meanwhile
                    await anyio.lowlevel.checkpoint()
                running_now[lease.channel] -= 1
            done[which] += 1

        async with AsyncExitStack() as stack:
            balancers = [
                (await stack.enter_async_context(running(limits, backend=backend)))[0]
                for backend in backend_factory.peers(2)
            ]
            jobs = 60 // len(balancers)
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for which, lb in enumerate(balancers):
                        for _ in range(jobs):
                            tg.start_soon(job, lb, which)
            assert all(0 < peak[c] <= m for c, m in limits.items()), peak
            assert done == dict.fromkeys(range(len(balancers)), jobs)
            for lb in balancers:
                stats = lb.statistics()
                assert (stats.acquired_total, stats.released_total) == (jobs, jobs)
                assert stats.waiting == 0


class TestBalancerSelection:
    async def test_random_is_uniform_among_channels_with_free_slots(
        self, backend_factory: BackendFactory
    ):
        """ "random" picks uniformly among channels with a free slot, ignoring full ones."""
        backend = backend_factory()
        async with running({"a": 1, "b": 3, "full": 2}, backend=backend, seed=1) as (lb, _):
            held = [await lb.acquire(channel="full", timeout=5) for _ in range(2)]
            counts = await picks(lb, 500)
            assert counts["full"] == 0
            # Uniform: 0.5 (sd 0.022); weighted by free slots would give 0.25.
            assert 0.38 < counts["a"] / 500 < 0.62, counts
            for lease in held:
                await lb.release(lease)

    async def test_weighted_is_proportional_to_free_slots(self, backend_factory: BackendFactory):
        """ "weighted" picks a channel with probability proportional to its free slots."""
        backend = backend_factory()
        async with running({"a": 1, "b": 3}, backend=backend, selection="weighted", seed=2) as (
            lb,
            _,
        ):
            counts = await picks(lb, 500)
            # Expected 0.25 (sd 0.019); uniform would give 0.5.
            assert 0.15 < counts["a"] / 500 < 0.35, counts

    async def test_p2c_prefers_less_loaded(self, backend_factory: BackendFactory):
        """ "p2c" takes the less loaded of two samples, favouring the emptier channel."""
        backend = backend_factory()
        async with running({"busy": 4, "idle": 4}, backend=backend, selection="p2c", seed=3) as (
            lb,
            _,
        ):
            held = [await lb.acquire(channel="busy", timeout=5) for _ in range(3)]
            counts = await picks(lb, 500)
            # Sampling with replacement (memory) gives 3/4 (sd 0.019); two distinct
            # samples (Redis) always "idle". Random would give 1/2.
            assert counts["idle"] / 500 > 0.65, counts
            for lease in held:
                await lb.release(lease)

    async def test_channel_pins(self, backend_factory: BackendFactory):
        """channel= always takes that channel, and waits (here: times out) when it is full."""
        async with running({"a": 5, "b": 5}, backend=backend_factory()) as (lb, _):
            leases = [await lb.acquire(channel="b", timeout=5) for _ in range(5)]
            assert {lease.channel for lease in leases} == {"b"}
            await no_capacity(lb, backend_factory, "b")
            assert (await lb.acquire(timeout=5)).channel == "a"


async def picks(lb: Balancer, n: int) -> Counter[str]:
    """The channels of ``n`` acquires, each released before the next."""
    counts: Counter[str] = Counter()
    for _ in range(n):
        lease = await lb.acquire(timeout=5)
        counts[lease.channel] += 1
        await lb.release(lease)
    return counts


class TestBalancerMapChanges:
    async def test_new_channel_usable_at_once_and_wakes_waiters(
        self, backend_factory: BackendFactory
    ):
        """A channel added by a refresh takes leases at once, starting with the waiters."""
        async with (
            running({"a": 1}, backend=backend_factory()) as (lb, source),
            anyio.create_task_group() as tg,
        ):
            held = await lb.acquire(timeout=5)
            waiters = [await start(tg, lb), await start(tg, lb, channel="new")]
            assert isinstance(waiters[1].error, NoAccountsError)  # unknown until the refresh
            source.set(raw({"a": 1, "new": 2}))
            await lb.refresh()
            await settle(lambda: waiters[0].lease is not None)
            assert waiters[0].lease is not None and waiters[0].lease.channel == "new"
            assert (await lb.acquire(channel="new", timeout=5)).channel == "new"
            assert lb.statistics().channels["new"].in_flight == 2
            await lb.release(held)

    async def test_removed_channel_drains_then_disappears(self, backend_factory: BackendFactory):
        """A removed channel takes no new leases, keeps counting its live ones, then disappears."""
        async with running({"a": 2, "b": 2}, backend=backend_factory()) as (lb, source):
            leases = [await lb.acquire(channel="a", timeout=5) for _ in range(2)]
            source.set(raw({"b": 2}))
            await lb.refresh()
            stats = lb.statistics()
            assert stats.channels["a"].state == "draining"
            assert (stats.channels["a"].free, stats.channels["a"].in_flight) == (0, 2)
            assert (stats.capacity, stats.free, stats.in_flight) == (2, 2, 2)
            for _ in range(4):
                lease = await lb.acquire(timeout=5)
                assert lease.channel == "b"
                await lb.release(lease)
            await lb.release(leases[0])
            assert channel_state(lb, "a") == "draining"
            await lb.release(leases[1], outcome="failed")
            assert "a" not in lb.statistics().channels
            assert lb.statistics().in_flight == 0

    async def test_removed_idle_channel_disappears(self, backend_factory: BackendFactory):
        """A removed channel without leases disappears at once."""
        async with running({"a": 2, "b": 2}, backend=backend_factory()) as (lb, source):
            source.set(raw({"b": 2}))
            await lb.refresh()
            assert set(lb.statistics().channels) == {"b"}

    async def test_readded_draining_channel(self, backend_factory: BackendFactory):
        """A draining channel that comes back is active again and keeps its live leases."""
        async with running({"a": 2, "b": 2}, backend=backend_factory()) as (lb, source):
            held = await lb.acquire(channel="a", timeout=5)
            source.set(raw({"b": 2}))
            await lb.refresh()
            source.set(raw({"a": 2, "b": 2}))
            await lb.refresh()
            stats = lb.statistics().channels["a"]
            assert (stats.state, stats.in_flight, stats.free) == ("active", 1, 1)
            await lb.release(held)
            assert lb.statistics().channels["a"].in_flight == 0

    async def test_lowered_max_jobs_admits_no_one_until_under(
        self, backend_factory: BackendFactory
    ):
        """A lowered max_jobs takes no new lease until in_flight is under it; free is never < 0."""
        async with running({"a": 3}, backend=backend_factory()) as (lb, source):
            leases = [await lb.acquire(timeout=5) for _ in range(3)]
            source.set(raw({"a": 1}))
            await lb.refresh()
            stats = lb.statistics()
            assert (stats.capacity, stats.in_flight, stats.free) == (1, 3, 0)
            assert stats.channels["a"].free == 0
            for lease in leases[:2]:
                await lb.release(lease)
                await no_capacity(lb, backend_factory)
            await lb.release(leases[2])
            again = await lb.acquire(timeout=5)
            await no_capacity(lb, backend_factory)
            await lb.release(again)

    async def test_raised_max_jobs_wakes_waiters(self, backend_factory: BackendFactory):
        """A raised max_jobs hands the new slots to waiters at once."""
        async with (
            running({"a": 1}, backend=backend_factory()) as (lb, source),
            anyio.create_task_group() as tg,
        ):
            held, waiters = await raise_max_jobs_under_waiters(lb, source, tg)
            await lb.release(held)
            await settle(lambda: all(served(waiters)))
            assert lb.statistics().in_flight == 3

    async def test_changed_token_used_by_new_leases(self, backend_factory: BackendFactory):
        """A new token is used by new leases; a lease already out keeps its account."""
        async with running({"a": 2}, backend=backend_factory()) as (lb, source):
            old = await lb.acquire(timeout=5)
            source.set(raw({"a": 2}, token="rotated"))
            await lb.refresh()
            new = await lb.acquire(timeout=5)
            assert old.account.discord.reveal() == "tok-a"
            assert new.account.discord.reveal() == "rotated-a"
            await lb.release(old)
            await lb.release(new)
            assert lb.statistics().in_flight == 0

    async def test_refresh_of_same_map_changes_nothing(self, backend_factory: BackendFactory):
        """Refreshing an unchanged map keeps counts and totals."""
        async with running({"a": 2}, backend=backend_factory()) as (lb, source):
            lease = await lb.acquire(timeout=5)
            before = lb.statistics()
            await lb.refresh()
            assert lb.statistics().channels == before.channels
            assert source.fetch_count == 2
            await lb.release(lease)


async def raise_max_jobs_under_waiters(
    lb: Balancer, source: StaticAccountSource, tg: TaskGroup
) -> tuple[Lease, list[Acquirer]]:
    """Hold "a"'s one slot, queue three waiters (the second pinned), raise max_jobs to 3."""
    held = await lb.acquire(timeout=5)
    waiters = [await start(tg, lb), await start(tg, lb, channel="a"), await start(tg, lb)]
    assert lb.statistics().waiting == 3
    source.set(raw({"a": 3}))
    await lb.refresh()
    await settle(lambda: served(waiters).count(True) == 2)
    assert lb.statistics().waiting == 1
    return held, waiters


class TestBalancerCooling:
    async def test_throttled_cools_the_channel(self, backend_factory: BackendFactory):
        """ "throttled" makes the channel "cooling": free 0, out of capacity, not granted."""
        async with running({"a": 2, "b": 1}, backend=backend_factory(), cooldown=60) as (lb, _):
            await lb.release(await lb.acquire(channel="a", timeout=5), outcome="throttled")
            stats = lb.statistics()
            assert stats.channels["a"].state == "cooling"
            assert stats.channels["a"].free == 0
            assert stats.channels["a"].failures_total == 1
            assert (stats.capacity, stats.free) == (1, 1)
            assert (await lb.acquire(timeout=5)).channel == "b"
            await no_capacity(lb, backend_factory)
            await no_capacity(lb, backend_factory, "a")

    async def test_cooling_ends_and_waiters_are_served(self, backend_factory: BackendFactory):
        """When the cooldown ends the channel is active again and its waiters are served."""
        cooldown = 0.3
        async with (
            running({"a": 1, "b": 1}, backend=backend_factory(), cooldown=cooldown) as (lb, _),
            anyio.create_task_group() as tg,
        ):
            for channel in ("a", "b"):
                await lb.release(await lb.acquire(channel=channel, timeout=5), outcome="throttled")
            throttled_at = time.monotonic()
            waiters = [await start(tg, lb, channel="a"), await start(tg, lb)]
            assert served(waiters) == [False, False]
            with anyio.fail_after(5):
                for waiter in waiters:
                    await waiter.done.wait()
            assert time.monotonic() - throttled_at >= cooldown * 0.8
            leases = [waiter.lease for waiter in waiters]
            assert leases[0] is not None and leases[0].channel == "a"
            assert leases[1] is not None and leases[1].channel == "b"
            await lb.release(leases[0])
            await lb.release(leases[1])
            stats = lb.statistics()
            assert {c: (s.state, s.free) for c, s in stats.channels.items()} == {
                "a": ("active", 1),
                "b": ("active", 1),
            }

    async def test_consecutive_failures_cool(self, backend_factory: BackendFactory):
        """failures_to_cool consecutive "failed" outcomes cool the channel; "ok" resets the count."""
        backend = backend_factory()
        async with running({"a": 1}, backend=backend, failures_to_cool=3, cooldown=60) as (lb, _):
            for outcome in ("failed", "failed", "ok", "failed", "failed"):
                await lb.release(await lb.acquire(timeout=5), outcome=outcome)
            assert channel_state(lb, "a") == "active"
            await lb.release(await lb.acquire(timeout=5), outcome="failed")
            stats = lb.statistics().channels["a"]
            assert (stats.state, stats.failures_total) == ("cooling", 5)


class TestBalancerRelease:
    async def test_second_release_is_a_logged_no_op(self, backend_factory: BackendFactory):
        """Releasing a lease twice (or its id) does nothing the second time and logs a warning."""
        with structlog.testing.capture_logs() as logs:
            async with running({"a": 2}, backend=backend_factory()) as (lb, _):
                first, second = await lb.acquire(timeout=5), await lb.acquire(timeout=5)
                await lb.release(first)
                before = lb.statistics()
                await lb.release(first)
                await lb.release(first.id, outcome="failed")
                after = lb.statistics()
                assert (after.in_flight, after.released_total) == (1, 1)
                assert before.channels["a"] == after.channels["a"]
                await lb.release(second)
        warnings = [e for e in logs if e["event"] == "lease_already_released"]
        assert len(warnings) == 2
        assert all(e["log_level"] == "warning" for e in warnings)
        assert all(e["lease_id"] == first.id for e in warnings)

    async def test_release_by_id(self, backend_factory: BackendFactory):
        """A lease can be released by its id string."""
        async with running({"a": 1}, backend=backend_factory()) as (lb, _):
            lease = await lb.acquire(timeout=5)
            await lb.release(lease.id, outcome="ok")
            assert lease.released
            assert lb.statistics().in_flight == 0
            assert (await lb.acquire(timeout=5)).channel == "a"


class TestFifo:
    async def test_grants_in_arrival_order(self, backend_factory: BackendFactory):
        """Waiters are served strictly in arrival order, one per released slot."""
        async with (
            running({"a": 1}, backend=backend_factory()) as (lb, _),
            anyio.create_task_group() as tg,
        ):
            current = await lb.acquire(timeout=5)
            waiters = [await start(tg, lb, str(i)) for i in range(5)]
            assert lb.statistics().waiting == 5
            for i, waiter in enumerate(waiters):
                await lb.release(current)
                await settle(lambda: served(waiters)[i])  # noqa: B023 - awaited here
                assert served(waiters) == [j <= i for j in range(5)]
                assert waiter.lease is not None
                current = waiter.lease
                assert lb.statistics().waiting == 4 - i
            await lb.release(current)
            assert lb.statistics().in_flight == 0

    async def test_raised_max_jobs_serves_the_oldest_first(self, backend_factory: BackendFactory):
        """New slots from a raised max_jobs go to the oldest waiters."""
        async with (
            running({"a": 1}, backend=backend_factory()) as (lb, source),
            anyio.create_task_group() as tg,
        ):
            held, waiters = await raise_max_jobs_under_waiters(lb, source, tg)
            assert served(waiters) == [True, True, False]
            await lb.release(held)
            await settle(lambda: all(served(waiters)))

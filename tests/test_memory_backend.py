from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from balancer.backends.base import Backend, BackendConfig, RenewResult, Selection
from balancer.backends.memory import MemoryBackend
from tests._helpers import FakeClock


class Notified:
    """Counts the backend's "capacity may have appeared" callbacks."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def config(
    *,
    selection: Selection = "random",
    seed: int = 0,
    cooldown: float = 10.0,
    failures_to_cool: int = 3,
) -> BackendConfig:
    return BackendConfig(
        owner="test",
        selection=selection,
        rng=random.Random(seed),
        lease_ttl=None,
        cooldown=cooldown,
        failures_to_cool=failures_to_cool,
    )


@asynccontextmanager
async def opened(
    limits: dict[str, int], **kwargs: object
) -> AsyncIterator[tuple[MemoryBackend, FakeClock, Notified]]:
    """An opened MemoryBackend on a fake clock, with ``limits`` as its map."""
    backend = MemoryBackend()
    clock = FakeClock()
    backend._clock = clock
    notify = Notified()
    # The memory backend starts no background work, so the task group it is
    # given may end at once (and assertion errors then reach pytest unwrapped).
    async with anyio.create_task_group() as tg:
        await backend.open(config(**kwargs), notify, tg)  # type: ignore[arg-type]
    await backend.set_map(limits)
    try:
        yield backend, clock, notify
    finally:
        await backend.close()


def state(backend: Backend, channel: str) -> tuple[int, int, str, int]:
    counts = backend.counts()[channel]
    return counts.max_jobs, counts.in_flight, counts.state, counts.free


class TestMemoryBackendBasics:
    def test_flags(self):
        """The memory backend is immediate, private, and its leases never expire."""
        backend = MemoryBackend()
        assert backend.immediate is True
        assert backend.shared is False
        assert backend.default_lease_ttl is None
        assert "MemoryBackend" in repr(backend)

    async def test_open_twice_raises(self):
        """One backend serves one balancer at a time; it can be reopened after close."""
        async with opened({"a": 1}) as (backend, _, notify), anyio.create_task_group() as tg:
            with pytest.raises(RuntimeError):
                await backend.open(config(), notify, tg)
        async with anyio.create_task_group() as tg:
            await backend.open(config(), notify, tg)
            assert await backend.try_acquire("x", "a") == "a"
            await backend.close()

    async def test_set_map_creates_active_channels(self):
        """set_map makes every channel active with nothing in flight."""
        async with opened({"a": 2, "b": 5}) as (backend, _, _):
            assert state(backend, "a") == (2, 0, "active", 2)
            assert state(backend, "b") == (5, 0, "active", 5)
            await backend.set_map({"a": 2, "b": 5})  # idempotent
            assert set(backend.counts()) == {"a", "b"}

    async def test_acquire_and_release_counts(self):
        """try_acquire takes one slot and release gives it back, reporting the channel."""
        async with opened({"a": 2}) as (backend, _, _):
            assert await backend.try_acquire("l1", None) == "a"
            assert await backend.try_acquire("l2", "a") == "a"
            assert state(backend, "a") == (2, 2, "active", 0)
            assert await backend.try_acquire("l3", None) is None
            assert await backend.try_acquire("l3", "a") is None
            result = await backend.release("l1", "ok")
            assert (result.status, result.channel, result.cooled, result.removed) == (
                "released",
                "a",
                False,
                False,
            )
            assert state(backend, "a") == (2, 1, "active", 1)

    async def test_unknown_pinned_channel_grants_nothing(self):
        """A pin to a channel the backend does not know grants nothing."""
        async with opened({"a": 2}) as (backend, _, _):
            assert await backend.try_acquire("l1", "nope") is None
            assert backend.counts()["a"].in_flight == 0

    async def test_release_unknown_and_twice(self):
        """Releasing an unknown lease, or a lease twice, answers "unknown" and changes nothing."""
        async with opened({"a": 2}) as (backend, _, _):
            assert (await backend.release("never", "ok")).status == "unknown"
            await backend.try_acquire("l1", "a")
            assert (await backend.release("l1", "failed")).status == "released"
            second = await backend.release("l1", "failed")
            assert second.status == "unknown"
            assert second.channel is None
            assert state(backend, "a") == (2, 0, "active", 2)

    async def test_never_exceeds_max_jobs(self):
        """However many attempts, no channel holds more than max_jobs leases."""
        limits = {"a": 1, "b": 2, "c": 3}
        async with opened(limits) as (backend, _, _):
            attempts = [await backend.try_acquire(f"l{i}", None) for i in range(50)]
            granted = Counter(got for got in attempts if got is not None)
            assert granted == Counter(limits)
            assert all(counts.free == 0 for counts in backend.counts().values())

    async def test_renew_is_a_no_op(self):
        """Memory leases never expire, so a renewal round reports nothing."""
        async with opened({"a": 1}) as (backend, _, _):
            await backend.try_acquire("l1", "a")
            assert await backend.renew() == RenewResult()
            assert backend.counts()["a"].in_flight == 1

    async def test_same_seed_same_choices(self):
        """Two backends with equally seeded generators grant the same sequence of channels."""
        limits = {f"c{i}": 3 for i in range(8)}
        runs = []
        for _ in range(2):
            async with opened(limits, seed=5) as (backend, _, _):
                runs.append([await backend.try_acquire(f"l{i}", None) for i in range(24)])
        assert runs[0] == runs[1]
        assert len(set(runs[0])) == 8


class TestMemoryBackendMapChanges:
    async def test_removed_idle_channel_disappears(self):
        """A channel with nothing in flight disappears as soon as it leaves the map."""
        async with opened({"a": 1, "b": 1}) as (backend, _, _):
            await backend.set_map({"a": 1})
            assert set(backend.counts()) == {"a"}

    async def test_removed_busy_channel_drains(self):
        """A removed channel with leases out drains: no new leases, gone after the last release."""
        async with opened({"a": 3, "b": 1}) as (backend, _, _):
            await backend.try_acquire("l1", "a")
            await backend.try_acquire("l2", "a")
            await backend.set_map({"b": 1})
            assert state(backend, "a") == (3, 2, "draining", 0)
            assert await backend.try_acquire("l3", "a") is None
            assert await backend.try_acquire("l3", None) == "b"
            first = await backend.release("l1", "ok")
            assert (first.status, first.removed) == ("released", False)
            assert state(backend, "a") == (3, 1, "draining", 0)
            last = await backend.release("l2", "ok")
            assert (last.status, last.channel, last.removed) == ("released", "a", True)
            assert "a" not in backend.counts()

    async def test_readded_draining_channel_is_active_again(self):
        """A draining channel that comes back keeps its in-flight count and takes leases again."""
        async with opened({"a": 2}) as (backend, _, _):
            await backend.try_acquire("l1", "a")
            await backend.set_map({})
            assert state(backend, "a") == (2, 1, "draining", 0)
            await backend.set_map({"a": 2})
            assert state(backend, "a") == (2, 1, "active", 1)
            assert await backend.try_acquire("l2", None) == "a"
            assert await backend.try_acquire("l3", None) is None

    async def test_lowered_max_jobs_blocks_until_under(self):
        """A lowered max_jobs grants nothing until in_flight is under it."""
        async with opened({"a": 3}) as (backend, _, _):
            for i in range(3):
                await backend.try_acquire(f"l{i}", "a")
            await backend.set_map({"a": 1})
            assert state(backend, "a") == (1, 3, "active", 0)
            await backend.release("l0", "ok")
            assert await backend.try_acquire("x", None) is None
            await backend.release("l1", "ok")
            assert state(backend, "a") == (1, 1, "active", 0)
            assert await backend.try_acquire("x", "a") is None
            await backend.release("l2", "ok")
            assert await backend.try_acquire("x", "a") == "a"

    async def test_raised_max_jobs_grants_more(self):
        """A raised max_jobs makes the new slots available at once."""
        async with opened({"a": 1}) as (backend, _, _):
            await backend.try_acquire("l1", None)
            assert await backend.try_acquire("l2", None) is None
            await backend.set_map({"a": 3})
            assert await backend.try_acquire("l2", None) == "a"
            assert await backend.try_acquire("l3", None) == "a"
            assert await backend.try_acquire("l4", None) is None


class TestMemoryBackendCooling:
    async def test_throttled_cools_for_cooldown(self):
        """A "throttled" release cools the channel for exactly the cooldown, then it is active."""
        async with opened({"a": 2}, cooldown=10.0) as (backend, clock, notify):
            await backend.try_acquire("l1", "a")
            result = await backend.release("l1", "throttled")
            assert (result.status, result.cooled, result.cooling_for) == ("released", True, 10.0)
            assert state(backend, "a") == (2, 0, "cooling", 0)
            assert await backend.try_acquire("l2", None) is None
            assert await backend.try_acquire("l2", "a") is None
            assert backend.next_wakeup() == pytest.approx(10.0)
            clock.advance(9.9)
            assert backend.counts()["a"].state == "cooling"
            assert notify.calls == 0
            clock.advance(0.2)
            # A due cooldown is ended by next_wakeup() itself, never reported
            # as "now" over and over (which made the wake loop spin).
            assert backend.next_wakeup() is None
            assert state(backend, "a") == (2, 0, "active", 2)
            assert notify.calls == 1
            assert await backend.try_acquire("l2", None) == "a"

    async def test_cooling_ends_on_acquire_attempt(self):
        """A grant attempt after the cooldown ends it without anyone reading counts first."""
        async with opened({"a": 1}, cooldown=5.0) as (backend, clock, notify):
            await backend.try_acquire("l1", "a")
            await backend.release("l1", "throttled")
            clock.advance(5.0)
            assert await backend.try_acquire("l2", "a") == "a"
            assert notify.calls == 1

    async def test_throttled_while_cooling_extends(self):
        """A second "throttled" while cooling extends the cooldown without reporting a new one."""
        async with opened({"a": 2}, cooldown=10.0) as (backend, clock, _):
            await backend.try_acquire("l1", "a")
            await backend.try_acquire("l2", "a")
            assert (await backend.release("l1", "throttled")).cooled
            clock.advance(5)
            second = await backend.release("l2", "throttled")
            assert (second.status, second.cooled) == ("released", False)
            clock.advance(6)  # 11 s after the first, 6 s after the second
            assert backend.counts()["a"].state == "cooling"
            clock.advance(4)
            assert backend.counts()["a"].state == "active"

    async def test_consecutive_failures_cool(self):
        """failures_to_cool consecutive "failed" outcomes cool the channel, at the last one."""
        async with opened({"a": 5}, failures_to_cool=3) as (backend, _, _):
            for i in range(5):
                await backend.try_acquire(f"l{i}", "a")
            assert not (await backend.release("l0", "failed")).cooled
            assert not (await backend.release("l1", "failed")).cooled
            assert backend.counts()["a"].state == "active"
            assert (await backend.release("l2", "failed")).cooled
            assert backend.counts()["a"].state == "cooling"

    async def test_ok_resets_failure_streak(self):
        """An "ok" outcome between failures starts the count again."""
        async with opened({"a": 5}, failures_to_cool=3) as (backend, _, _):
            for i in range(5):
                await backend.try_acquire(f"l{i}", "a")
            for lease_id, outcome in [("l0", "failed"), ("l1", "failed"), ("l2", "ok")]:
                await backend.release(lease_id, outcome)  # type: ignore[arg-type]
            assert not (await backend.release("l3", "failed")).cooled
            assert not (await backend.release("l4", "failed")).cooled
            assert backend.counts()["a"].state == "active"

    async def test_abandoned_leaves_streak_untouched(self):
        """An "abandoned" release neither resets nor extends the failure streak."""
        async with opened({"a": 5}, failures_to_cool=3) as (backend, _, _):
            for i in range(5):
                await backend.try_acquire(f"l{i}", "a")
            await backend.release("l0", "failed")
            await backend.release("l1", "failed")
            abandoned = await backend.release("l2", "abandoned")
            assert (abandoned.status, abandoned.cooled) == ("released", False)
            assert backend.counts()["a"].state == "active"
            assert (await backend.release("l3", "failed")).cooled

    async def test_abandoned_alone_never_cools(self):
        """Any number of "abandoned" releases never cools a channel."""
        async with opened({"a": 1}, failures_to_cool=1) as (backend, _, _):
            for i in range(5):
                assert await backend.try_acquire(f"l{i}", "a") == "a"
                assert not (await backend.release(f"l{i}", "abandoned")).cooled
            assert backend.counts()["a"].state == "active"

    async def test_cooling_channel_removed_and_readded_fresh(self):
        """A cooling channel that leaves the map idle and comes back starts fresh and active."""
        async with opened({"a": 1, "b": 1}, cooldown=10.0) as (backend, clock, _):
            await backend.try_acquire("l1", "a")
            await backend.release("l1", "throttled")
            await backend.set_map({"b": 1})
            assert "a" not in backend.counts()
            await backend.set_map({"a": 1, "b": 1})
            assert state(backend, "a") == (1, 0, "active", 1)
            clock.advance(20)  # the old cooldown's heap entry ends harmlessly
            assert state(backend, "a") == (1, 0, "active", 1)

    async def test_draining_state_wins_over_cooling(self):
        """A cooling channel that leaves the map reports "draining" and disappears on release."""
        async with opened({"a": 2}, cooldown=10.0) as (backend, _, _):
            await backend.try_acquire("l1", "a")
            await backend.try_acquire("l2", "a")
            await backend.release("l1", "throttled")
            await backend.set_map({})
            assert state(backend, "a") == (2, 1, "draining", 0)
            assert (await backend.release("l2", "throttled")).removed
            assert backend.counts() == {}

    async def test_throttled_last_lease_of_draining_channel(self):
        """Throttling the last lease of a draining channel still removes it."""
        async with opened({"a": 1}) as (backend, clock, _):
            await backend.try_acquire("l1", "a")
            await backend.set_map({})
            result = await backend.release("l1", "throttled")
            assert (result.status, result.removed) == ("released", True)
            assert backend.counts() == {}
            clock.advance(100)
            assert backend.counts() == {}


class TestMemoryBackendModel:
    @pytest.mark.parametrize("selection", ["random", "weighted", "p2c"])
    async def test_random_operations_match_model(self, selection: Selection):
        """A seeded random mix of grants, releases and map changes never breaks the invariants."""
        rng = random.Random(f"memory-{selection}")
        async with opened({}, selection=selection, failures_to_cool=2) as (backend, clock, _):
            limits: dict[str, int] = {}
            leases: dict[str, str] = {}
            in_flight: Counter[str] = Counter()
            for step in range(1_500):
                roll = rng.random()
                if roll < 0.1:
                    limits = {f"c{i}": rng.randint(1, 4) for i in range(6) if rng.random() < 0.7}
                    before = {c: n.in_flight for c, n in backend.counts().items()}
                    await backend.set_map(limits)
                    counts = backend.counts()
                    assert set(counts) == set(limits) | {c for c, n in before.items() if n}
                elif roll < 0.55 or not leases:
                    pin = rng.choice([None, None, "c0", "c1", "c9"])
                    free_before = {c: n.free for c, n in backend.counts().items()}
                    got = await backend.try_acquire(f"l{step}", pin)
                    if got is None:
                        if pin is None:
                            assert not any(free_before.values())
                        else:
                            assert free_before.get(pin, 0) == 0
                    else:
                        assert free_before[got] > 0
                        assert pin in (None, got)
                        leases[f"l{step}"] = got
                        in_flight[got] += 1
                elif roll < 0.95:
                    lease_id = rng.choice(sorted(leases))
                    outcome = rng.choice(["ok", "ok", "failed", "throttled", "abandoned"])
                    result = await backend.release(lease_id, outcome)  # type: ignore[arg-type]
                    assert result.channel is not None
                    assert (result.status, result.channel) == ("released", leases.pop(lease_id))
                    in_flight[result.channel] -= 1
                else:
                    clock.advance(rng.choice([1.0, 11.0]))
                counts = backend.counts()
                for channel, n in counts.items():
                    assert 0 <= n.in_flight == in_flight[channel]
                    assert 0 <= n.free <= n.max_jobs
                    if n.state == "draining":
                        assert channel not in limits and n.in_flight > 0
                    else:
                        assert limits[channel] == n.max_jobs
                assert {c for c, n in in_flight.items() if n} <= set(counts)
            for lease_id in list(leases):
                await backend.release(lease_id, "ok")
            clock.advance(100)
            counts = backend.counts()
            assert set(counts) == set(limits)
            assert all(n.in_flight == 0 and n.state == "active" for n in counts.values())

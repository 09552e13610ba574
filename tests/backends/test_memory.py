from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from balancer.backends.base import Backend, BackendConfig, RenewResult, Selection
from balancer.backends.memory import MemoryBackend
from balancer.testing import FakeClock


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


class TestMemoryBackendCooling:
    """What the contract suite cannot see without the memory backend's fake clock."""

    async def test_cooldown_ends_exactly_on_time_and_notifies_once(self):
        """A cooldown ends at exactly ``cooldown`` on the clock; next_wakeup() ends a due one."""
        async with opened({"a": 2}, cooldown=10.0) as (backend, clock, notify):
            await backend.try_acquire("l1", "a")
            await backend.release("l1", "throttled")
            assert backend.next_wakeup() == pytest.approx(10.0)
            clock.advance(9.9)
            assert backend.counts()["a"].state == "cooling"
            assert await backend.try_acquire("l2", None) is None
            assert notify.calls == 0
            clock.advance(0.2)
            # A due cooldown is ended by next_wakeup() itself, never reported
            # as "now" over and over (which made the wake loop spin).
            assert backend.next_wakeup() is None
            assert state(backend, "a") == (2, 0, "active", 2)
            assert notify.calls == 1

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

    async def test_stale_cooldowns_end_harmlessly(self):
        """A cooldown whose channel left the map, for good or to come back fresh, ends as a no-op."""
        async with opened({"a": 1, "b": 1, "c": 1}, cooldown=10.0) as (backend, clock, _):
            for lease_id, channel in (("l1", "a"), ("l2", "b")):
                await backend.try_acquire(lease_id, channel)
                await backend.release(lease_id, "throttled")
            await backend.set_map({"c": 1})  # both leave; "a" comes back at once
            await backend.set_map({"a": 1, "c": 1})
            assert await backend.try_acquire("l3", "a") == "a"
            clock.advance(20)  # both old cooldowns' heap entries end now
            assert state(backend, "a") == (1, 1, "active", 0)
            assert set(backend.counts()) == {"a", "c"}


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

"""
A model-based test of the balancer's scheduling on the memory backend.

A hypothesis state machine drives one running :class:`~balancer.Balancer`
through a blocking portal (so one machine runs on asyncio or on trio) with
random steps: non-blocking acquires, waiting acquires that stay queued,
cancellations of queued waiters, releases with every outcome (and repeated
releases), map changes and the end of cooldowns (a fake clock on the backend).
A plain-Python model predicts every count, state and hand-off; after each step
the balancer's statistics must agree with it exactly, no waiter may be
servable while it waits, and no younger waiter may have been served with a
slot an older one could use. Tearing down releases everything and checks that
nothing leaked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from balancer import (
    Balancer,
    BalancerError,
    Lease,
    MemoryBackend,
    NoAccountsError,
    NoCapacityError,
    StaticAccountSource,
)
from balancer.testing import FakeClock

CHANNELS = ("a", "b", "c", "d")
COOLDOWN = 100.0
FAILURES_TO_COOL = 2
MAX_WAITERS = 6

channel_or_none = st.sampled_from((None, *CHANNELS))
limits_strategy = st.dictionaries(
    st.sampled_from(CHANNELS), st.integers(1, 3), min_size=1, max_size=4
)


def raw(limits: dict[str, int]) -> dict[str, dict[str, Any]]:
    return {c: {"channel": c, "discord": f"token-{c}", "maxJobs": n} for c, n in limits.items()}


class WaiterTask:
    """One task blocked in ``acquire()``, run in the portal's task group."""

    def __init__(self, lb: Balancer, channel: str | None, order: int) -> None:
        self.lb = lb
        self.channel = channel
        self.order = order
        self.scope: anyio.CancelScope | None = None
        self.lease: Lease | None = None
        self.error: BalancerError | None = None
        self.finished = False

    async def run(self) -> None:
        self.scope = anyio.CancelScope()
        with self.scope:
            try:
                self.lease = await self.lb.acquire(channel=self.channel)
            except BalancerError as exc:
                self.error = exc
        self.finished = True

    def cancel(self) -> None:
        assert self.scope is not None, "the waiter task never started"
        self.scope.cancel()

    @property
    def cancelled(self) -> bool:
        return self.scope is not None and self.scope.cancelled_caught

    def can_use(self, channel: str) -> bool:
        return self.channel is None or self.channel == channel

    def __repr__(self) -> str:
        return f"WaiterTask(#{self.order}, channel={self.channel!r})"


class ModelChannel:
    """What the model knows of one channel the backend holds."""

    def __init__(self, max_jobs: int) -> None:
        self.max_jobs = max_jobs
        self.in_flight = 0
        self.draining = False
        self.cooling_until = 0.0
        self.failures = 0
        self.acquired_total = 0
        self.failures_total = 0

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        return "cooling" if self.cooling_until else "active"

    @property
    def free(self) -> int:
        return max(0, self.max_jobs - self.in_flight) if self.state == "active" else 0


class SchedulerMachine(RuleBasedStateMachine):
    #: The portal the balancer runs in; set per event loop by :func:`machine_on`.
    portal: ClassVar[BlockingPortal]

    def __init__(self) -> None:
        super().__init__()
        portal = self.portal
        self.clock = FakeClock()
        backend = MemoryBackend()
        backend._clock = self.clock
        initial = {"a": 2, "b": 1}
        self.source = StaticAccountSource(raw(initial))
        self.lb = Balancer(
            self.source,
            backend=backend,
            ttl=3600,
            cooldown=COOLDOWN,
            failures_to_cool=FAILURES_TO_COOL,
            seed=0,
        )
        self.cm: AbstractContextManager[Balancer] = portal.wrap_async_context_manager(self.lb)
        self.cm.__enter__()
        self.entered = True
        self.channels = {c: ModelChannel(n) for c, n in initial.items()}
        self.held: list[Lease] = []
        self.released: list[Lease] = []
        self.waiters: list[WaiterTask] = []
        self.orders = 0
        self.acquired_total = 0
        self.released_total = 0
        self.timeouts_total = 0
        self.prev_in_flight: dict[str, int] = {}

    # -- plumbing -------------------------------------------------------------

    def settle(self) -> None:
        """Let every task run until all are blocked."""
        self.portal.call(anyio.wait_all_tasks_blocked)

    def in_map(self, channel: str) -> bool:
        found = self.channels.get(channel)
        return found is not None and not found.draining

    def someone_ahead(self, channel: str | None) -> bool:
        """Mirror of WaitQueue.ahead_of: would a newcomer jump an older waiter?"""
        if any(w.channel is None for w in self.waiters):
            return True
        return channel is not None and any(w.channel == channel for w in self.waiters)

    def free_channels(self) -> set[str]:
        return {c for c, m in self.channels.items() if m.free > 0}

    def grant(self, lease: Lease) -> None:
        channel = self.channels[lease.channel]
        assert channel.free > 0, f"granted {lease.channel} without a free slot"
        channel.in_flight += 1
        channel.acquired_total += 1
        self.acquired_total += 1
        self.held.append(lease)

    def harvest(self) -> tuple[list[WaiterTask], list[WaiterTask]]:
        """Collect waiters that finished; check that service was first come, first served."""
        served = [w for w in self.waiters if w.finished and w.lease is not None]
        failed = [w for w in self.waiters if w.finished and w.lease is None]
        self.waiters = [w for w in self.waiters if not w.finished]
        for waiter in served:
            assert waiter.lease is not None
            assert waiter.can_use(waiter.lease.channel)
            for older in self.waiters:
                if older.order < waiter.order:
                    assert not older.can_use(waiter.lease.channel), (
                        f"{waiter} was served on {waiter.lease.channel} before {older}"
                    )
        for waiter in sorted(served, key=lambda w: w.order):
            assert waiter.lease is not None
            self.grant(waiter.lease)
        for waiter in failed:
            assert isinstance(waiter.error, NoAccountsError), waiter.error
        return served, failed

    def forget_if_gone(self, name: str) -> None:
        channel = self.channels[name]
        if channel.draining and channel.in_flight == 0:
            del self.channels[name]

    # -- rules ------------------------------------------------------------------

    @rule(channel=channel_or_none, use_cm=st.booleans())
    def acquire_now(self, channel: str | None, use_cm: bool) -> None:
        """acquire(timeout=0): a lease exactly when the model has a usable free slot."""

        async def attempt() -> Lease | BalancerError:
            try:
                if use_cm:
                    # The context-manager form, holding on: exit is exercised elsewhere.
                    handle = self.lb.acquire(timeout=0, channel=channel)
                    return await handle.__aenter__()
                return await self.lb.acquire(timeout=0, channel=channel)
            except BalancerError as exc:
                return exc

        result = self.portal.call(attempt)
        if channel is None and not any(self.in_map(c) for c in self.channels):
            assert isinstance(result, NoAccountsError)
            return
        if channel is not None and not self.in_map(channel):
            assert isinstance(result, NoAccountsError)
            return
        candidates = self.free_channels() if channel is None else self.free_channels() & {channel}
        if self.someone_ahead(channel) or not candidates:
            assert isinstance(result, NoCapacityError), result
            self.timeouts_total += 1
            return
        assert isinstance(result, Lease), result
        assert result.channel in candidates
        assert result.account.channel == result.channel
        assert result.account.max_jobs == self.channels[result.channel].max_jobs
        self.grant(result)

    @rule(channel=channel_or_none)
    def fill(self, channel: str | None) -> None:
        """Take free slots (of one channel, or anywhere) until none is left."""
        for _ in range(12):
            candidates = self.free_channels() & ({channel} if channel else set(self.channels))
            if not candidates or self.someone_ahead(channel):
                return
            self.acquire_now(channel=channel, use_cm=False)

    @precondition(lambda self: len(self.waiters) < MAX_WAITERS)
    @rule(channel=channel_or_none)
    def start_waiter(self, channel: str | None) -> None:
        """A waiting acquire is served at once, refused, or queued, as the model says."""
        self.orders += 1
        waiter = WaiterTask(self.lb, channel, self.orders)
        immediate = (
            not self.someone_ahead(channel)
            and bool(self.free_channels() & ({channel} if channel else set(self.channels)))
            and (channel is None or self.in_map(channel))
        )
        no_accounts = (channel is not None and not self.in_map(channel)) or (
            channel is None and not any(self.in_map(c) for c in self.channels)
        )
        self.waiters.append(waiter)
        self.portal.start_task_soon(waiter.run)
        self.settle()
        served, failed = self.harvest()
        if no_accounts:
            assert (served, failed) == ([], [waiter])
        elif immediate:
            assert (served, failed) == ([waiter], [])
        else:
            assert (served, failed) == ([], [])
            assert waiter in self.waiters

    @precondition(lambda self: len(self.waiters) < MAX_WAITERS)
    @rule(channel=channel_or_none)
    def queue_waiter(self, channel: str | None) -> None:
        """Fill what the waiter could use, then start it: it queues."""
        self.fill(channel=channel)
        self.start_waiter(channel=channel)

    @precondition(lambda self: bool(self.waiters))
    @rule(index=st.integers(0, MAX_WAITERS - 1))
    def cancel_waiter(self, index: int) -> None:
        """Cancelling a queued waiter removes it and changes nothing else."""
        waiter = self.waiters[index % len(self.waiters)]
        self.portal.call(waiter.cancel)
        self.settle()
        assert waiter.finished and waiter.cancelled
        assert waiter.lease is None and waiter.error is None
        self.waiters.remove(waiter)
        assert self.harvest() == ([], [])

    @precondition(lambda self: bool(self.held))
    @rule(
        index=st.integers(0, 100),
        outcome=st.sampled_from(("ok", "ok", "failed", "throttled")),
        by_id=st.booleans(),
    )
    def release(self, index: int, outcome: str, by_id: bool) -> None:
        """A release frees the slot and hands it to the oldest waiter that can use it."""
        lease = self.held.pop(index % len(self.held))
        self.portal.call(self.lb.release, lease.id if by_id else lease, outcome)
        self.released.append(lease)
        self.released_total += 1
        name = lease.channel
        channel = self.channels[name]
        channel.in_flight -= 1
        if outcome == "ok":
            channel.failures = 0
        else:
            channel.failures += 1
            channel.failures_total += 1
            if outcome == "throttled" or channel.failures >= FAILURES_TO_COOL:
                channel.cooling_until = max(channel.cooling_until, self.clock.now + COOLDOWN)
                channel.failures = 0
        self.forget_if_gone(name)
        expected = None
        if name in self.channels and self.channels[name].free > 0:
            usable = [w for w in self.waiters if w.can_use(name)]
            expected = min(usable, key=lambda w: w.order, default=None)
        self.settle()
        served, failed = self.harvest()
        assert failed == []
        assert served == ([] if expected is None else [expected])
        if expected is not None:
            assert expected.lease is not None and expected.lease.channel == name

    @precondition(lambda self: bool(self.released))
    @rule(index=st.integers(0, 100), by_id=st.booleans())
    def release_again(self, index: int, by_id: bool) -> None:
        """A second release of a lease changes nothing."""
        lease = self.released[index % len(self.released)]
        self.portal.call(self.lb.release, lease.id if by_id else lease, "failed")
        self.settle()
        assert self.harvest() == ([], [])

    @rule(limits=limits_strategy)
    def change_map(self, limits: dict[str, int]) -> None:
        """A new map adds, drains, resizes; queued waiters are served or refused as it allows."""
        self.source.set(raw(limits))
        for name in list(self.channels):
            if name not in limits:
                self.channels[name].draining = True
                self.forget_if_gone(name)
        for name, max_jobs in limits.items():
            channel = self.channels.setdefault(name, ModelChannel(max_jobs))
            channel.max_jobs = max_jobs
            channel.draining = False
        if limits:
            doomed = [w for w in self.waiters if w.channel is not None and w.channel not in limits]
        else:
            doomed = list(self.waiters)
        self.portal.call(self.lb.refresh)
        self.settle()
        _, failed = self.harvest()
        assert sorted(failed, key=lambda w: w.order) == doomed

    @precondition(lambda self: bool(self.waiters))
    @rule()
    def empty_map(self) -> None:
        """An empty map drains every channel and refuses every waiter."""
        self.change_map(limits={})

    @precondition(lambda self: any(c.cooling_until for c in self.channels.values()))
    @rule()
    def end_cooldowns(self) -> None:
        """When cooldowns end, cooled channels serve their queued waiters first."""
        self.clock.now += COOLDOWN + 1
        self.portal.call(self.lb.statistics)  # notices the ends, wakes the balancer
        for channel in self.channels.values():
            if channel.cooling_until <= self.clock.now:
                channel.cooling_until = 0.0
        self.settle()
        assert self.harvest()[1] == []

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def statistics_match_model(self) -> None:
        if not self.entered:
            return
        stats = self.portal.call(self.lb.statistics)
        assert set(stats.channels) == set(self.channels)
        for name, model in self.channels.items():
            seen = stats.channels[name]
            assert (seen.max_jobs, seen.in_flight, seen.state, seen.free) == (
                model.max_jobs,
                model.in_flight,
                model.state,
                model.free,
            ), name
            assert (seen.acquired_total, seen.failures_total) == (
                model.acquired_total,
                model.failures_total,
            ), name
            # in_flight never grows past max_jobs; it may exceed it only after a lowering.
            if seen.in_flight > seen.max_jobs:
                assert seen.in_flight <= self.prev_in_flight.get(name, 0)
        active = [m for m in self.channels.values() if m.state == "active"]
        assert stats.capacity == sum(m.max_jobs for m in active)
        assert stats.free == sum(m.free for m in active)
        assert stats.in_flight == sum(m.in_flight for m in self.channels.values())
        assert stats.in_flight == len(self.held)
        assert stats.waiting == len(self.waiters) == len(self.lb._scheduler.waiters)
        assert (stats.acquired_total, stats.released_total, stats.timeouts_total) == (
            self.acquired_total,
            self.released_total,
            self.timeouts_total,
        )
        self.prev_in_flight = {c: m.in_flight for c, m in self.channels.items()}

    @invariant()
    def no_servable_waiter(self) -> None:
        """Nobody waits while a slot they could use is free."""
        free = self.free_channels()
        for waiter in self.waiters:
            assert not any(waiter.can_use(c) for c in free), (waiter, free)

    def teardown(self) -> None:
        try:
            for waiter in self.waiters:
                self.portal.call(waiter.cancel)
            self.settle()
            assert all(w.finished and w.lease is None for w in self.waiters)
            self.waiters = []
            for lease in self.held:
                self.portal.call(self.lb.release, lease)
            self.held = []
            self.end_cooldowns()
            stats = self.portal.call(self.lb.statistics)
            assert stats.in_flight == 0
            assert stats.waiting == 0 and len(self.lb._scheduler.waiters) == 0
            assert all(s.state == "active" for s in stats.channels.values())
            assert set(stats.channels) == {c for c, m in self.channels.items() if not m.draining}
            assert stats.free == stats.capacity
        finally:
            self.entered = False
            self.cm.__exit__(None, None, None)


def machine_on(portal: BlockingPortal) -> type[SchedulerMachine]:
    """The state machine, running its balancer in ``portal``'s event loop."""
    return type("SchedulerMachineOnPortal", (SchedulerMachine,), {"portal": portal})


@pytest.fixture(params=["asyncio", "trio"])
def portal(request: pytest.FixtureRequest) -> Iterator[BlockingPortal]:
    with start_blocking_portal(request.param) as portal:
        yield portal


class TestSchedulerModel:
    def test_scheduler_matches_model(self, portal: BlockingPortal):
        """Random acquire/wait/cancel/release/map-change/cooldown sequences agree with the model."""
        run_state_machine_as_test(
            machine_on(portal),
            settings=settings(
                max_examples=60,
                stateful_step_count=30,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from balancer import (
    Account,
    AuthError,
    Balancer,
    BalancerError,
    BalancerStatistics,
    ConfigNotFoundError,
    Lease,
    LeaseError,
    MemoryBackend,
    NoAccountsError,
    NoCapacityError,
    ParsedAccounts,
    Secret,
    SourceError,
    StaticAccountSource,
)
from balancer.testing import FakeClock, make_accounts
from tests._helpers import channel_state, eventually, raw, running, start

# -- helpers -----------------------------------------------------------------


class FlakySource:
    """A static source that fails on demand (``error``), counting its fetches."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.static = StaticAccountSource(raw(limits))
        self.error: Exception | None = None
        self.calls = 0

    async def fetch(self) -> ParsedAccounts:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        return await self.static.fetch()


def assert_no_waiters(lb: Balancer) -> None:
    """Nothing is left in the internal wait queue."""
    assert lb.statistics().waiting == 0
    assert len(lb._scheduler.waiters) == 0
    assert list(lb._scheduler.waiters) == []
    assert lb._scheduler.waiters.pinned_channels() == []


# -- acquire -------------------------------------------------------------------


class TestAcquireForms:
    async def test_await_form(self):
        """Awaiting acquire() returns a lease that holds a slot until released."""
        async with running({"a": 2}) as (lb, _):
            lease = await lb.acquire(timeout=1)
            assert isinstance(lease, Lease)
            assert lb.statistics().in_flight == 1
            await lb.release(lease, outcome="ok")
            assert lb.statistics().in_flight == 0
            assert lb.statistics().released_total == 1

    async def test_context_manager_form(self):
        """The context-manager form releases the lease on exit with outcome "ok"."""
        async with running({"a": 2}, failures_to_cool=1) as (lb, _):
            async with lb.acquire(timeout=1) as lease:
                assert lease.channel == "a"
                assert lb.statistics().in_flight == 1
            stats = lb.statistics()
            assert (stats.in_flight, stats.released_total) == (0, 1)
            assert stats.channels["a"].failures_total == 0
            assert stats.channels["a"].state == "active"

    async def test_context_manager_exception_fails_lease(self):
        """An exception leaving the context manager releases the lease as "failed" and propagates."""
        async with running({"a": 2}, failures_to_cool=1) as (lb, _):
            with pytest.raises(ZeroDivisionError):
                async with lb.acquire() as lease:
                    1 / 0  # noqa: B018
            assert lease.released
            stats = lb.statistics()
            assert stats.in_flight == 0
            assert stats.channels["a"].failures_total == 1
            assert stats.channels["a"].state == "cooling"

    async def test_explicit_outcome_kept_on_exception(self):
        """An outcome set on the lease wins over the exception's "failed"."""
        async with running({"a": 2}, failures_to_cool=1) as (lb, _):
            with pytest.raises(KeyError):
                async with lb.acquire() as lease:
                    lease.outcome = "ok"
                    raise KeyError("job")
            stats = lb.statistics()
            assert stats.channels["a"].failures_total == 0
            assert stats.channels["a"].state == "active"

    async def test_explicit_outcome_used_without_exception(self):
        """An outcome set on the lease is reported on a clean exit."""
        async with running({"a": 2}) as (lb, _):
            async with lb.acquire() as lease:
                lease.outcome = "throttled"
            assert channel_state(lb, "a") == "cooling"

    async def test_handle_used_once(self):
        """An acquire() handle can be awaited or entered only once."""
        async with running({"a": 2}) as (lb, _):
            handle = lb.acquire()
            lease = await handle
            with pytest.raises(RuntimeError):
                await handle
            await lb.release(lease)

    @pytest.mark.parametrize(
        ("kwargs", "error"),
        [
            ({"timeout": -1}, ValueError),
            ({"timeout": math.nan}, ValueError),
            ({"timeout": "1"}, TypeError),
            ({"timeout": True}, TypeError),
            ({"channel": 5}, TypeError),
        ],
    )
    async def test_bad_arguments(self, kwargs: dict[str, Any], error: type[Exception]):
        """Bad acquire() arguments raise ValueError or TypeError."""
        async with running({"a": 2}) as (lb, _):
            with pytest.raises(error):
                await lb.acquire(**kwargs)


class TestSelection:
    @pytest.mark.parametrize("selection", ["random", "weighted", "p2c"])
    async def test_same_seed_same_sequence(self, selection: str):
        """With the same seed and the memory backend, the sequence of choices repeats."""
        limits = {f"c{i}": 1 + i % 3 for i in range(8)}

        async def choices(seed: int) -> list[str]:
            out = []
            async with running(limits, seed=seed, selection=selection) as (lb, _):
                held: list[Lease] = []
                for i in range(60):
                    lease = await lb.acquire(timeout=0)
                    out.append(lease.channel)
                    held.append(lease)
                    if i % 3 == 2:
                        for lease in held:
                            await lb.release(lease)
                        held.clear()
            return out

        first, second = await choices(7), await choices(7)
        assert first == second
        assert first != await choices(8)


class TestWaiting:
    async def test_hand_off_skips_waiters_pinned_elsewhere(self):
        """A freed slot goes to the oldest waiter that can use it; pinned waiters elsewhere wait on."""
        async with running({"a": 1, "b": 1}) as (lb, _), anyio.create_task_group() as tg:
            hold_a = await lb.acquire(channel="a")
            hold_b = await lb.acquire(channel="b")
            w0 = await start(tg, lb, "w0", channel="b")
            w1 = await start(tg, lb, "w1")
            w2 = await start(tg, lb, "w2", channel="a")
            w3 = await start(tg, lb, "w3", channel="b")
            everyone = [w0, w1, w2, w3]

            def served() -> list[str]:
                return [w.name for w in everyone if w.lease is not None]

            await lb.release(hold_a)
            await anyio.wait_all_tasks_blocked()
            assert served() == ["w1"]
            assert w1.lease is not None and w1.lease.channel == "a"
            await lb.release(hold_b)
            await anyio.wait_all_tasks_blocked()
            assert served() == ["w0", "w1"]
            await lb.release(w1.lease)
            await anyio.wait_all_tasks_blocked()
            assert served() == ["w0", "w1", "w2"]
            assert w0.lease is not None
            await lb.release(w0.lease)
            await anyio.wait_all_tasks_blocked()
            assert served() == ["w0", "w1", "w2", "w3"]
            assert_no_waiters(lb)
            for w in (w2, w3):
                assert w.lease is not None
                await lb.release(w.lease)
            assert lb.statistics().in_flight == 0

    async def test_hand_off_is_direct(self):
        """A release hands its slot over before returning: nothing is left free for a newcomer."""
        async with running({"a": 1}) as (lb, _), anyio.create_task_group() as tg:
            held = await lb.acquire()
            waiter = await start(tg, lb)
            await lb.release(held)
            # No await since the release: the slot already belongs to the waiter.
            stats = lb.statistics()
            assert (stats.in_flight, stats.free, stats.waiting) == (1, 0, 0)
            with pytest.raises(NoCapacityError):
                await lb.acquire(timeout=0)
            await waiter.done.wait()
            assert waiter.lease is not None
            await lb.release(waiter.lease)

    async def test_newcomer_does_not_jump_the_queue(self):
        """While an older waiter can use a channel, a newcomer does not take it first."""
        async with running({"a": 1, "b": 1}) as (lb, _), anyio.create_task_group() as tg:
            hold_a = await lb.acquire(channel="a")
            hold_b = await lb.acquire(channel="b")
            older = await start(tg, lb, channel="a")
            # A newcomer for "a" queues behind the older waiter, even with timeout=0.
            with pytest.raises(NoCapacityError):
                await lb.acquire(channel="a", timeout=0)
            await lb.release(hold_a)
            await older.done.wait()
            assert older.lease is not None and older.lease.channel == "a"
            for lease in (older.lease, hold_b):
                await lb.release(lease)

    async def test_timeout_raises_no_capacity(self):
        """When nothing frees up in time, acquire raises NoCapacityError (a TimeoutError)."""
        async with running({"a": 1}) as (lb, _):
            held = await lb.acquire()
            with anyio.fail_after(5), pytest.raises(NoCapacityError) as info:
                await lb.acquire(timeout=0.05)
            assert isinstance(info.value, TimeoutError)
            assert isinstance(info.value, BalancerError)
            stats = lb.statistics()
            assert (stats.timeouts_total, stats.in_flight) == (1, 1)
            assert_no_waiters(lb)
            await lb.release(held)

    async def test_timeout_in_context_manager_form(self):
        """The context-manager form raises NoCapacityError on timeout and releases nothing."""
        async with running({"a": 1}) as (lb, _):
            held = await lb.acquire()
            with anyio.fail_after(5), pytest.raises(NoCapacityError):
                async with lb.acquire(timeout=0.02):
                    pytest.fail("must not be entered")
            assert lb.statistics().released_total == 0
            await lb.release(held)

    async def test_timeout_zero(self):
        """timeout=0 takes a free slot at once, or raises NoCapacityError at once, counted."""
        async with running({"a": 1}) as (lb, _):
            lease = await lb.acquire(timeout=0)
            with pytest.raises(NoCapacityError):
                await lb.acquire(timeout=0)
            with pytest.raises(NoCapacityError):
                await lb.acquire(timeout=0, channel="a")
            assert lb.statistics().timeouts_total == 2
            assert_no_waiters(lb)
            await lb.release(lease)

    async def test_cancel_waiting_task_leaks_nothing(self):
        """Cancelling a waiting task removes it from the queue and leaks no slot."""
        async with running({"a": 1}) as (lb, _), anyio.create_task_group() as tg:
            held = await lb.acquire()
            waiter = await start(tg, lb)
            pinned = await start(tg, lb, channel="a")
            assert lb.statistics().waiting == 2
            waiter.scope.cancel()
            pinned.scope.cancel()
            await anyio.wait_all_tasks_blocked()
            assert waiter.cancelled and pinned.cancelled
            assert waiter.lease is None and pinned.lease is None
            assert_no_waiters(lb)
            await lb.release(held)
            stats = lb.statistics()
            assert (stats.in_flight, stats.free, stats.acquired_total) == (0, 1, 1)

    async def test_cancel_holding_task_leaks_nothing(self):
        """Cancelling a task inside the context manager gives its slot back, not counted as failed."""
        async with running({"a": 1}, failures_to_cool=1) as (lb, _):
            entered = anyio.Event()

            async def hold() -> None:
                async with lb.acquire():
                    entered.set()
                    await anyio.sleep_forever()

            async with anyio.create_task_group() as tg:
                tg.start_soon(hold)
                await entered.wait()
                assert lb.statistics().in_flight == 1
                tg.cancel_scope.cancel()
            stats = lb.statistics()
            assert (stats.in_flight, stats.released_total) == (0, 1)
            assert stats.channels["a"].state == "active"
            assert stats.channels["a"].failures_total == 0

    async def test_cancel_holding_task_hands_slot_to_waiter(self):
        """A cancelled holder's slot goes to the oldest waiter."""
        async with running({"a": 1}) as (lb, _), anyio.create_task_group() as tg:
            entered = anyio.Event()
            holder_scope = anyio.CancelScope()

            async def hold() -> None:
                with holder_scope:
                    async with lb.acquire():
                        entered.set()
                        await anyio.sleep_forever()

            tg.start_soon(hold)
            await entered.wait()
            waiter = await start(tg, lb)
            holder_scope.cancel()
            await waiter.done.wait()
            assert waiter.lease is not None
            await lb.release(waiter.lease)
            assert lb.statistics().in_flight == 0

    async def test_cancel_right_after_hand_off_passes_slot_on(self):
        """A waiter cancelled just after being handed a slot gives it to the next waiter."""
        async with running({"a": 1}) as (lb, _), anyio.create_task_group() as tg:
            held = await lb.acquire()
            got: list[str] = []

            async def use(name: str, scope: anyio.CancelScope) -> None:
                with scope:
                    async with lb.acquire() as lease:
                        got.append(name)
                        await anyio.sleep_forever()
                    del lease

            first_scope, second_scope = anyio.CancelScope(), anyio.CancelScope()
            tg.start_soon(use, "first", first_scope)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(use, "second", second_scope)
            await anyio.wait_all_tasks_blocked()
            await lb.release(held)  # handed to "first"...
            first_scope.cancel()  # ...which is cancelled before it runs again
            await anyio.wait_all_tasks_blocked()
            assert got in (["second"], ["first", "second"])
            assert got[-1] == "second"
            stats = lb.statistics()
            assert (stats.in_flight, stats.waiting) == (1, 0)
            second_scope.cancel()
            await anyio.wait_all_tasks_blocked()
            assert lb.statistics().in_flight == 0
            assert_no_waiters(lb)

    async def test_pinned_to_full_channel_waits(self):
        """A pin to a full channel waits and gets it when it frees."""
        async with running({"a": 1, "b": 1}) as (lb, _), anyio.create_task_group() as tg:
            held = await lb.acquire(channel="a")
            waiter = await start(tg, lb, channel="a")
            assert waiter.lease is None and lb.statistics().waiting == 1
            other = await lb.acquire(timeout=0)
            assert other.channel == "b"
            await lb.release(held)
            await waiter.done.wait()
            assert waiter.lease is not None and waiter.lease.channel == "a"

    async def test_exit_wakes_waiters_with_balancer_error(self):
        """Leaving the balancer while tasks wait wakes them with a BalancerError."""
        async with anyio.create_task_group() as tg:
            async with running({"a": 1}) as (lb, _):
                await lb.acquire()
                waiters = [await start(tg, lb), await start(tg, lb, channel="a")]
            with anyio.fail_after(5):
                for waiter in waiters:
                    await waiter.done.wait()
        for waiter in waiters:
            assert isinstance(waiter.error, BalancerError)
            assert not isinstance(waiter.error, NoCapacityError)
        assert len(lb._scheduler.waiters) == 0


class TestNoAccounts:
    async def test_empty_map_raises_at_once(self):
        """With no channel configured, acquire raises NoAccountsError without waiting."""
        async with running({}) as (lb, _):
            with anyio.fail_after(1):
                with pytest.raises(NoAccountsError):
                    await lb.acquire()
                with pytest.raises(NoAccountsError):
                    async with lb.acquire(timeout=None):
                        pytest.fail("must not be entered")
            assert lb.statistics().timeouts_total == 0

    async def test_pinned_unknown_raises_at_once(self):
        """A pin to a channel that is not in the map raises NoAccountsError at once."""
        async with running({"a": 1}) as (lb, _):
            with anyio.fail_after(1), pytest.raises(NoAccountsError) as info:
                await lb.acquire(channel="nope")
            assert info.value.channel == "nope"

    async def test_pinned_draining_raises_at_once(self):
        """A pin to a draining channel raises NoAccountsError at once."""
        async with running({"a": 1, "b": 1}) as (lb, source):
            held = await lb.acquire(channel="a")
            source.set(raw({"b": 1}))
            await lb.refresh()
            assert channel_state(lb, "a") == "draining"
            with anyio.fail_after(1), pytest.raises(NoAccountsError):
                await lb.acquire(channel="a")
            await lb.release(held)

    async def test_pinned_to_cooling_times_out_rather_than_failing(self):
        """A pin to a cooling channel waits (here: until its timeout), never NoAccountsError."""
        async with running({"a": 1}, cooldown=60) as (lb, _):
            await lb.release(await lb.acquire(), outcome="throttled")
            with anyio.fail_after(5), pytest.raises(NoCapacityError):
                await lb.acquire(channel="a", timeout=0.02)
            with pytest.raises(NoCapacityError):
                await lb.acquire(timeout=0.02)

    async def test_waiters_fail_when_map_empties(self):
        """Waiters fail with NoAccountsError when the map loses its last channel."""
        async with running({"a": 1}) as (lb, source), anyio.create_task_group() as tg:
            held = await lb.acquire()
            waiter = await start(tg, lb)
            source.set({})
            await lb.refresh()
            await waiter.done.wait()
            assert isinstance(waiter.error, NoAccountsError)
            assert_no_waiters(lb)
            await lb.release(held)

    async def test_pinned_waiters_fail_when_channel_removed(self):
        """A waiter pinned to a channel that leaves the map fails with NoAccountsError."""
        async with running({"a": 1, "b": 1}) as (lb, source), anyio.create_task_group() as tg:
            held = await lb.acquire(channel="a")
            waiter = await start(tg, lb, channel="a")
            source.set(raw({"b": 1}))
            await lb.refresh()
            await waiter.done.wait()
            assert isinstance(waiter.error, NoAccountsError)
            await lb.release(held)
            assert "a" not in lb.statistics().channels


class TestLease:
    async def test_attributes(self):
        """A lease names its id, channel, account and grant time; its outcome defaults to "ok"."""
        async with running({"a": 1, "b": 2}) as (lb, _):
            before = time.time()
            lease = await lb.acquire(channel="b")
            after = time.time()
            assert isinstance(lease.id, str) and lease.id
            assert lease.channel == "b"
            assert isinstance(lease.account, Account)
            assert lease.account.channel == "b"
            assert lease.account.max_jobs == 2
            assert lease.account.discord == Secret("tok-b")
            assert before <= lease.acquired_at <= after
            assert lease.outcome == "ok"
            assert "tok-b" not in repr(lease)

    async def test_ids_unique(self):
        """Every lease gets a distinct id."""
        async with running({"a": 3, "b": 3}) as (lb, _):
            ids = set()
            for _ in range(20):
                lease = await lb.acquire()
                ids.add(lease.id)
                await lb.release(lease)
            assert len(ids) == 20

    async def test_outcome_settable_and_validated(self):
        """lease.outcome accepts "ok", "failed" and "throttled" only."""
        async with running({"a": 1}) as (lb, _):
            lease = await lb.acquire()
            for outcome in ("failed", "throttled", "ok"):
                lease.outcome = outcome
                assert lease.outcome == outcome
            for bad in ("abandoned", "OK", "", None):
                with pytest.raises(ValueError):
                    lease.outcome = bad  # type: ignore[assignment]
            assert lease.outcome == "ok"
            await lb.release(lease)


class TestRelease:
    async def test_release_in_context_after_manual_release(self):
        """A lease released inside the context manager is not released again on exit."""
        async with running({"a": 1}) as (lb, _):
            async with lb.acquire() as lease:
                await lb.release(lease, outcome="throttled")
            stats = lb.statistics()
            assert (stats.released_total, stats.in_flight) == (1, 0)
            assert stats.channels["a"].failures_total == 1

    async def test_lease_of_another_balancer(self):
        """Releasing another balancer's lease (or its id) raises LeaseError and changes nothing."""
        async with running({"a": 1}) as (lb, _), running({"a": 1}) as (other, _):
            lease = await other.acquire()
            with pytest.raises(LeaseError):
                await lb.release(lease)
            with pytest.raises(LeaseError):
                await lb.release(lease.id)
            assert other.statistics().in_flight == 1
            assert lb.statistics().released_total == 0
            await other.release(lease)

    @pytest.mark.parametrize("lease_id", ["nope", "", "abc-1", "-1"])
    async def test_unknown_id(self, lease_id: str):
        """An id this (memory-backed) balancer never issued raises LeaseError."""
        async with running({"a": 1}) as (lb, _):
            with pytest.raises(LeaseError):
                await lb.release(lease_id)

    async def test_bad_arguments(self):
        """An unknown outcome raises ValueError; a non-lease raises TypeError."""
        async with running({"a": 1}) as (lb, _):
            lease = await lb.acquire()
            with pytest.raises(ValueError):
                await lb.release(lease, outcome="abandoned")
            with pytest.raises(TypeError):
                await lb.release(42)  # type: ignore[arg-type]
            assert lb.statistics().in_flight == 1
            await lb.release(lease)


class TestCooling:
    async def test_cooldown_length_on_fake_clock(self):
        """The channel cools for exactly ``cooldown`` seconds of the backend's clock."""
        backend = MemoryBackend()
        clock = FakeClock()
        backend._clock = clock
        async with running({"a": 1}, cooldown=30, backend=backend) as (lb, _):
            await lb.release(await lb.acquire(), outcome="throttled")
            clock.advance(29.9)
            assert channel_state(lb, "a") == "cooling"
            with pytest.raises(NoCapacityError):
                await lb.acquire(timeout=0)
            clock.advance(0.2)
            assert channel_state(lb, "a") == "active"
            await lb.release(await lb.acquire(timeout=0))

    async def test_idle_after_cooldown(self):
        """Once a cooldown ends with nobody waiting, the balancer goes idle instead of spinning."""
        async with running({"a": 1}, cooldown=0.01) as (lb, _):
            calls = 0
            next_wakeup = lb._backend.next_wakeup

            def counting() -> float | None:
                nonlocal calls
                calls += 1
                return next_wakeup()

            lb._backend.next_wakeup = counting  # type: ignore[method-assign]
            await lb.release(await lb.acquire(), outcome="throttled")
            # Let the cooldown end without reading statistics (which would end it for us).
            await anyio.sleep(0.1)
            before = calls
            for _ in range(200):
                await anyio.lowlevel.checkpoint()
            assert calls - before <= 5


class TestCooldownFairness:
    async def test_cooled_channel_goes_to_older_waiter(self):
        """When a cooldown ends, an older pinned waiter gets the channel before a newcomer."""
        backend = MemoryBackend()
        clock = FakeClock()
        backend._clock = clock
        async with (
            running({"a": 1, "b": 1}, cooldown=30, backend=backend) as (lb, _),
            anyio.create_task_group() as tg,
        ):
            hold_b = await lb.acquire(channel="b")
            await lb.release(await lb.acquire(channel="a"), outcome="throttled")
            waiter = await start(tg, lb, channel="a")
            clock.advance(31)
            with pytest.raises(NoCapacityError):
                await lb.acquire(timeout=0)
            await waiter.done.wait()
            assert waiter.lease is not None
            await lb.release(hold_b)


class TestStatistics:
    async def test_fields(self):
        """Statistics count capacity and free over active channels and in_flight over all."""
        async with running({"a": 2, "b": 3, "c": 1}, cooldown=60) as (lb, source):
            a1 = await lb.acquire(channel="a")
            await lb.acquire(channel="b")
            await lb.release(await lb.acquire(channel="c"), outcome="throttled")
            source.set(raw({"b": 3, "c": 1}))
            await lb.refresh()  # "a" drains with one lease out
            stats = lb.statistics()
            assert isinstance(stats, BalancerStatistics)
            assert {c: s.state for c, s in stats.channels.items()} == {
                "a": "draining",
                "b": "active",
                "c": "cooling",
            }
            assert stats.capacity == 3
            assert stats.free == 2
            assert stats.in_flight == 2
            assert stats.waiting == 0
            assert (stats.acquired_total, stats.released_total, stats.timeouts_total) == (3, 1, 0)
            b = stats.channels["b"]
            assert (b.channel, b.max_jobs, b.in_flight, b.free) == ("b", 3, 1, 2)
            assert (b.acquired_total, b.failures_total) == (1, 0)
            assert stats.channels["c"].failures_total == 1
            assert stats.channels["c"].free == 0
            assert stats.channels["a"].free == 0
            await lb.release(a1)
            assert "a" not in lb.statistics().channels

    async def test_no_io(self):
        """statistics() never asks the source for the map."""
        async with running({"a": 1}) as (lb, source):
            fetches = source.fetch_count
            for _ in range(100):
                lb.statistics()
            assert source.fetch_count == fetches

    async def test_frozen_and_read_only(self):
        """Statistics are a frozen dataclass with a read-only channels mapping."""
        async with running({"a": 1}) as (lb, _):
            stats = lb.statistics()
            assert dataclasses.is_dataclass(stats)
            with pytest.raises(dataclasses.FrozenInstanceError):
                stats.capacity = 5  # type: ignore[misc]
            with pytest.raises(dataclasses.FrozenInstanceError):
                stats.channels["a"].in_flight = 5  # type: ignore[misc]
            with pytest.raises(TypeError):
                stats.channels["x"] = stats.channels["a"]  # type: ignore[index]
            await lb.acquire()
            assert stats.channels["a"].in_flight == 0  # a snapshot, not a view

    async def test_waiting_counts_waiters(self):
        """waiting counts the tasks blocked in acquire."""
        async with running({"a": 1}) as (lb, _), anyio.create_task_group() as tg:
            await lb.acquire()
            for i in range(3):
                await start(tg, lb)
                assert lb.statistics().waiting == i + 1
            tg.cancel_scope.cancel()

    async def test_map_fields_after_good_fetch(self):
        """After a good fetch the map is fresh and no refresh error is recorded."""
        before = time.time()
        async with running({"a": 1}) as (lb, _):
            stats = lb.statistics()
            assert stats.map_fetched_at is not None
            assert before <= stats.map_fetched_at <= time.time()
            assert stats.map_age is not None and 0 <= stats.map_age < 5
            assert stats.map_stale is False
            assert stats.refresh_errors_total == 0
            assert stats.last_refresh_error is None

    async def test_map_fields_after_failed_refresh(self):
        """A failed refresh is counted, described, raised by refresh(), and keeps the map."""
        source = FlakySource({"a": 1})
        async with Balancer(source, ttl=3600) as lb:
            fetched_at = lb.statistics().map_fetched_at
            source.error = SourceError("useapi answered HTTP 503", status_code=503)
            with pytest.raises(SourceError):
                await lb.refresh()
            stats = lb.statistics()
            assert stats.refresh_errors_total == 1
            assert stats.last_refresh_error is not None
            assert "SourceError" in stats.last_refresh_error
            assert "503" in stats.last_refresh_error
            assert stats.map_fetched_at == fetched_at
            assert set(stats.channels) == {"a"}
            await lb.release(await lb.acquire(timeout=0))
            source.error = ConfigNotFoundError("no account")
            with pytest.raises(ConfigNotFoundError):
                await lb.refresh()
            assert set(lb.statistics().channels) == {"a"}
            assert lb.statistics().refresh_errors_total == 2

    async def test_map_stale_after_ttl(self):
        """map_stale turns True once the last good fetch is older than ttl."""
        source = FlakySource({"a": 1})
        async with Balancer(source, ttl=0.2) as lb:
            assert lb.statistics().map_stale is False
            source.error = SourceError("down")
            await eventually(lambda: lb.statistics().map_stale)
            stats = lb.statistics()
            assert stats.map_age is not None and stats.map_age >= 0.2
            assert stats.refresh_errors_total >= 1
            # A stale map is still served (max_stale is None).
            await lb.release(await lb.acquire(timeout=0))
            source.error = None
            await eventually(lambda: not lb.statistics().map_stale)


class TestLifecycle:
    @pytest.mark.parametrize(
        ("kwargs", "error"),
        [
            ({"ttl": 0}, ValueError),
            ({"ttl": -1}, ValueError),
            ({"ttl": math.nan}, ValueError),
            ({"ttl": "60"}, TypeError),
            ({"ttl": None}, TypeError),
            ({"selection": "fastest"}, ValueError),
            ({"selection": "Random"}, ValueError),
            ({"max_stale": 0}, ValueError),
            ({"max_stale": "1"}, TypeError),
            ({"lease_ttl": 0}, ValueError),
            ({"cooldown": -1}, ValueError),
            ({"failures_to_cool": 0}, ValueError),
            ({"failures_to_cool": 1.5}, TypeError),
            ({"failures_to_cool": True}, TypeError),
            ({"seed": "x"}, TypeError),
            ({"seed": 1.5}, TypeError),
        ],
    )
    def test_constructor_validation(self, kwargs: dict[str, Any], error: type[Exception]):
        """Bad constructor arguments raise ValueError or TypeError."""
        with pytest.raises(error):
            Balancer(StaticAccountSource({}), **kwargs)

    def test_source_without_fetch(self):
        """A source without fetch() is refused with TypeError."""
        with pytest.raises(TypeError):
            Balancer(object())  # type: ignore[arg-type]

    def test_backend_of_wrong_type(self):
        """A backend that is not a Backend is refused with TypeError."""
        with pytest.raises(TypeError):
            Balancer(StaticAccountSource({}), backend="redis://localhost")  # type: ignore[arg-type]

    def test_defaults_accepted(self):
        """The documented defaults construct a balancer without I/O."""
        lb = Balancer(StaticAccountSource(make_accounts(2)))
        assert "Balancer" in repr(lb)
        assert lb.statistics().channels == {}

    async def test_enter_twice(self):
        """A balancer can be entered once: again while running or after exit is a RuntimeError."""
        lb = Balancer(StaticAccountSource(raw({"a": 1})))
        async with lb:
            with pytest.raises(RuntimeError):
                await lb.__aenter__()
        with pytest.raises(RuntimeError):
            async with lb:
                pass

    async def test_use_before_enter_and_after_exit(self):
        """acquire() and refresh() outside the async with raise RuntimeError."""
        lb = Balancer(StaticAccountSource(raw({"a": 1})))
        with pytest.raises(RuntimeError):
            await lb.acquire()
        with pytest.raises(RuntimeError):
            await lb.refresh()
        async with lb:
            pass
        with pytest.raises(RuntimeError):
            await lb.acquire()

    @pytest.mark.parametrize(
        "error",
        [AuthError("refused"), SourceError("down", status_code=503), ValueError("odd source")],
    )
    async def test_first_fetch_error_raised_unwrapped(self, error: Exception):
        """The first fetch's error leaves `async with` as itself, never in an ExceptionGroup."""
        source = FlakySource({"a": 1})
        source.error = error
        lb = Balancer(source)
        with pytest.raises(Exception) as info:
            async with lb:
                pytest.fail("must not be entered")
        assert info.value is error
        with pytest.raises(RuntimeError):
            await lb.acquire()

    async def test_first_fetch_404_enters_empty(self):
        """A 404 on the first fetch enters with an empty map, and acquire raises NoAccountsError."""
        source = FlakySource({"a": 1})
        source.error = ConfigNotFoundError("no account configured")
        async with Balancer(source) as lb:
            assert lb.statistics().channels == {}
            assert lb.statistics().map_fetched_at is not None
            with pytest.raises(NoAccountsError):
                await lb.acquire()
            source.error = None
            await lb.refresh()
            await lb.release(await lb.acquire(timeout=0))

    async def test_body_exception_propagates_unwrapped(self):
        """An exception raised in the `async with` body leaves it as itself."""
        with pytest.raises(KeyError) as info:
            async with running({"a": 1}) as (lb, _):
                await lb.acquire()
                raise KeyError("user")
        assert type(info.value) is KeyError

    async def test_outer_cancellation_exits_cleanly(self):
        """An outer cancel scope ends the `async with` body and the balancer stops."""
        with anyio.move_on_after(0.05) as scope:
            async with running({"a": 1}) as (lb, _):
                await lb.acquire()
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert "closed" in repr(lb)

    async def test_refused_second_balancer_leaves_backend_alone(self):
        """A balancer refused by a MemoryBackend in use leaves the first balancer working."""
        backend = MemoryBackend()
        async with running({"a": 1}, backend=backend) as (lb, _):
            with pytest.raises(RuntimeError):
                async with running({"a": 1}, backend=backend):
                    pytest.fail("must not be entered")
            await lb.release(await lb.acquire(timeout=0))

    async def test_exit_with_leases_out(self):
        """Leaving the balancer with leases out returns cleanly."""
        async with running({"a": 2}) as (lb, _):
            await lb.acquire()
        assert "closed" in repr(lb)

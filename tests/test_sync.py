"""Tests of :class:`balancer.SyncBalancer`, the blocking, thread-safe facade."""

from __future__ import annotations

import ctypes
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from balancer import (
    AuthError,
    BalancerError,
    Lease,
    LeaseError,
    NoAccountsError,
    NoCapacityError,
    StaticAccountSource,
    SyncBalancer,
)
from balancer.testing import FakeUseapi, make_accounts


@pytest.fixture(params=["asyncio", "trio"])
def loop(request: pytest.FixtureRequest) -> str:
    """The event loop the SyncBalancer runs on."""
    name: str = request.param
    return name


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    """Every test ends with exactly the threads it started with."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(threading.enumerate()) - before == set()


def make(loop: str, max_jobs: int | list[int], n: int = 1, **options: object) -> SyncBalancer:
    source = StaticAccountSource(make_accounts(n, max_jobs=max_jobs))
    return SyncBalancer(source, async_backend=loop, **options)  # type: ignore[arg-type]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a cheap condition (statistics) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def raise_in_thread(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` inside ``thread`` at its next bytecode (as job runners do)."""
    assert thread.ident is not None
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type)
    )
    assert done == 1


class Interrupted(Exception):
    """Raised into a waiting thread by the tests."""


def _wait_then_hold(lb: SyncBalancer, hold: threading.Event) -> None:
    """Acquire, then stay alive until ``hold`` is set, swallowing one Interrupted."""
    try:
        lb.acquire(timeout=30)
        hold.wait(10)
    except Interrupted:
        hold.wait(10)


class TestSyncBalancer:
    def test_both_forms(self, loop: str) -> None:
        """`with lb.acquire()` binds the Lease; `lb.acquire()` + `release()` work too."""
        with make(loop, 2) as lb:
            with lb.acquire(timeout=5) as lease:
                assert isinstance(lease, Lease)
                assert lease.channel == "ch0"
                assert lb.statistics().in_flight == 1
            assert lb.statistics().in_flight == 0
            handle = lb.acquire(timeout=5)
            assert isinstance(handle, Lease)
            assert (handle.channel, handle.account.max_jobs) == ("ch0", 2)
            lb.release(handle)
            lease2 = lb.acquire(timeout=5)
            lb.release(lease2, outcome="ok")
            lease3 = lb.acquire(timeout=5)
            lb.release(lease3.id)
            stats = lb.statistics()
            assert (stats.acquired_total, stats.released_total, stats.in_flight) == (4, 4, 0)

    def test_exception_in_block_fails_the_lease(self, loop: str) -> None:
        """An exception leaving the `with` block releases the slot with outcome "failed"."""
        with make(loop, 1) as lb:
            with pytest.raises(ValueError, match="job"), lb.acquire(timeout=5):
                raise ValueError("job")
            channel = lb.statistics().channels["ch0"]
            assert (channel.in_flight, channel.failures_total) == (0, 1)

    def test_release_errors(self, loop: str) -> None:
        """Unknown ids raise LeaseError; a second release is a no-op."""
        with make(loop, 1) as lb:
            lease = lb.acquire(timeout=5)
            lb.release(lease)
            lb.release(lease)
            with pytest.raises(LeaseError):
                lb.release("no-such-lease")
            with pytest.raises(ValueError, match="outcome"):
                lb.release(lease, outcome="meh")

    def test_sixteen_threads_never_exceed_max_jobs(self, loop: str) -> None:
        """16 threads hammering 3 channels (capacity 6) never exceed any max_jobs."""
        limits = {"ch0": 1, "ch1": 2, "ch2": 3}
        lock = threading.Lock()
        running: Counter[str] = Counter()
        peak: Counter[str] = Counter()
        done: Counter[str] = Counter()
        errors: list[BaseException] = []

        def worker(lb: SyncBalancer) -> None:
            try:
                for _ in range(40):
                    with lb.acquire(timeout=10) as lease:
                        with lock:
                            running[lease.channel] += 1
                            peak[lease.channel] = max(peak[lease.channel], running[lease.channel])
                        time.sleep(0.0005)
                        with lock:
                            running[lease.channel] -= 1
                            done[lease.channel] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        with make(loop, [1, 2, 3], n=3, seed=7) as lb:
            threads = [threading.Thread(target=worker, args=(lb,)) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            stats = lb.statistics()
        assert errors == []
        assert sum(done.values()) == 16 * 40
        for channel, limit in limits.items():
            assert 1 <= peak[channel] <= limit, (channel, peak[channel], limit)
        assert (stats.in_flight, stats.waiting, stats.acquired_total) == (0, 0, 640)

    def test_timeout_raises_no_capacity(self, loop: str) -> None:
        """A full balancer makes acquire raise NoCapacityError after the timeout."""
        with make(loop, 1) as lb:
            held = lb.acquire(timeout=5)
            started = time.monotonic()
            with pytest.raises(NoCapacityError) as info:
                lb.acquire(timeout=0.3)
            assert time.monotonic() - started >= 0.25
            assert isinstance(info.value, TimeoutError)
            with pytest.raises(NoCapacityError):
                lb.acquire(timeout=0)
            assert lb.statistics().timeouts_total == 2
            lb.release(held)

    def test_pinned_unknown_channel(self, loop: str) -> None:
        """Pinning a channel outside the map raises NoAccountsError at once."""
        with make(loop, 1) as lb, pytest.raises(NoAccountsError):
            lb.acquire(timeout=5, channel="nope")

    def test_interrupted_waiter_leaks_no_slot(self, loop: str) -> None:
        """A thread interrupted while waiting gives up its place and leaks no slot."""
        with make(loop, 1) as lb:
            held = lb.acquire(timeout=5)
            outcome: list[BaseException] = []

            def waiter() -> None:
                try:
                    lb.acquire(timeout=30)
                except BaseException as exc:  # noqa: BLE001 - inspected below
                    outcome.append(exc)

            thread = threading.Thread(target=waiter)
            thread.start()
            wait_until(lambda: lb.statistics().waiting == 1)
            raise_in_thread(thread, Interrupted)
            thread.join(5)
            assert len(outcome) == 1 and isinstance(outcome[0], Interrupted)
            wait_until(lambda: lb.statistics().waiting == 0)
            lb.release(held)
            stats = lb.statistics()
            assert (stats.in_flight, stats.free) == (0, 1)
            lb.release(lb.acquire(timeout=0))

    def test_interrupt_racing_a_grant_leaks_no_slot(self, loop: str) -> None:
        """Interrupts landing just as a slot is handed over never leave a slot without a lease."""
        with make(loop, 1) as lb:
            for _ in range(15):
                held = lb.acquire(timeout=5)
                hold = threading.Event()
                thread = threading.Thread(target=_wait_then_hold, args=(lb, hold))
                thread.start()
                wait_until(lambda: lb.statistics().waiting == 1)
                lb.release(held)
                raise_in_thread(thread, Interrupted)
                hold.set()
                thread.join(5)
                # The interrupt may land after acquire() returned: the lease is
                # then alive (and the caller's to release), never orphaned.
                live = lb._call(lambda: list(lb._balancer._book.live))
                assert lb.statistics().in_flight == len(live) <= 1
                for lease_id in live:
                    lb.release(lease_id)
            stats = lb.statistics()
            assert (stats.free, stats.waiting) == (1, 0)

    def test_ctrl_c_in_the_main_thread(self, loop: str) -> None:
        """SIGINT interrupts a main-thread acquire with KeyboardInterrupt, leaking nothing."""
        if threading.current_thread() is not threading.main_thread():
            pytest.skip("signals reach the main thread only")
        with make(loop, 1) as lb:
            held = lb.acquire(timeout=5)
            main = threading.main_thread().ident
            assert main is not None

            def interrupt() -> None:
                wait_until(lambda: lb.statistics().waiting == 1)
                signal.pthread_kill(main, signal.SIGINT)

            helper = threading.Thread(target=interrupt)
            helper.start()
            with pytest.raises(KeyboardInterrupt):
                lb.acquire(timeout=30)
            helper.join(5)
            assert lb.statistics().waiting == 0
            lb.release(held)
            assert lb.statistics().free == 1

    def test_close_wakes_waiting_threads(self, loop: str) -> None:
        """Closing while threads wait wakes each with a clear BalancerError."""
        lb = make(loop, 1).open()
        lb.acquire(timeout=5)
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                lb.acquire(timeout=30)
            except BaseException as exc:  # noqa: BLE001 - inspected below
                errors.append(exc)

        threads = [threading.Thread(target=waiter) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: lb.statistics().waiting == 4)
        lb.close()
        for thread in threads:
            thread.join(5)
        assert len(errors) == 4
        for error in errors:
            assert type(error) is BalancerError
            assert "closed" in str(error)
        with pytest.raises(BalancerError, match="closed"):
            lb.acquire(timeout=1)
        lb.close()  # idempotent

    def test_lifecycle_errors(self, loop: str) -> None:
        """Using it before entering says so; it can be entered once."""
        lb = make(loop, 1)
        with pytest.raises(RuntimeError, match="enter"):
            lb.acquire(timeout=1)
        assert lb.statistics().capacity == 0
        with lb:
            assert lb.statistics().capacity == 1
            with pytest.raises(RuntimeError, match="once"):
                lb.open()
        assert lb.statistics().capacity == 1
        with pytest.raises(RuntimeError, match="once"):
            lb.open()

    def test_bad_arguments_raise_at_construction(self) -> None:
        """Balancer's argument checks run in the constructor, in the caller's thread."""
        source = StaticAccountSource(make_accounts(1))
        with pytest.raises(ValueError, match="ttl"):
            SyncBalancer(source, ttl=0)
        with pytest.raises(ValueError, match="async_backend"):
            SyncBalancer(source, async_backend="curio")
        with SyncBalancer(source) as lb, pytest.raises(TypeError):
            lb.acquire(timeout="soon")  # type: ignore[arg-type]

    def test_first_fetch_error_is_raised_unwrapped(self, loop: str) -> None:
        """A refused token raises AuthError from `with`, and stops the loop thread."""
        with FakeUseapi(make_accounts(1)) as fake:
            source = fake.source()
            fake.set_status(401)
            with pytest.raises(AuthError), SyncBalancer(source, async_backend=loop):
                pytest.fail("entered despite a 401")

    def test_refresh_sees_a_new_map(self, loop: str) -> None:
        """refresh() fetches now; a new channel is usable at once."""
        source = StaticAccountSource(make_accounts(1))
        with SyncBalancer(source, async_backend=loop) as lb:
            source.set(make_accounts(2))
            lb.refresh()
            assert set(lb.statistics().channels) == {"ch0", "ch1"}
            with lb.acquire(timeout=1, channel="ch1") as lease:
                assert lease.channel == "ch1"


@pytest.mark.redis
class TestSyncBalancerOnRedis:
    def test_threads_share_fleet_wide_counts(
        self, loop: str, redis_url: str, redis_namespace: str
    ) -> None:
        """Two SyncBalancers on one namespace, 8 threads each, never exceed max_jobs together."""
        from balancer.backends.redis import RedisBackend

        lock = threading.Lock()
        running: Counter[str] = Counter()
        peak: Counter[str] = Counter()
        errors: list[BaseException] = []

        def worker(lb: SyncBalancer) -> None:
            try:
                for _ in range(10):
                    with lb.acquire(timeout=10) as lease:
                        with lock:
                            running[lease.channel] += 1
                            peak[lease.channel] = max(peak[lease.channel], running[lease.channel])
                        time.sleep(0.002)
                        with lock:
                            running[lease.channel] -= 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        source = StaticAccountSource(make_accounts(2, max_jobs=[1, 2]))
        balancers = [
            SyncBalancer(
                source,
                backend=RedisBackend(redis_url, namespace=redis_namespace),
                async_backend=loop,
            )
            for _ in range(2)
        ]
        with balancers[0] as first, balancers[1] as second:
            threads = [
                threading.Thread(target=worker, args=(lb,))
                for lb in (first, second)
                for _ in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert first.statistics().acquired_total + second.statistics().acquired_total == 160
        assert errors == []
        assert peak["ch0"] <= 1 and peak["ch1"] <= 2

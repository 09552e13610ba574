from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import structlog.testing

from balancer import (
    AccountMapError,
    AuthError,
    Balancer,
    BalancerError,
    ConfigNotFoundError,
    NoAccountsError,
    SourceError,
    StaleAccountMapError,
    StaticAccountSource,
    UseapiAccountSource,
)
from balancer.cache import MapCache
from balancer.testing import FakeUseapi, make_accounts, make_v2_accounts

if TYPE_CHECKING:
    from balancer.accounts import ParsedAccounts

TOKEN = "useapi-REFRESH-token-5f1e2d3c4b5a"


@pytest.fixture
def fake() -> Iterator[FakeUseapi]:
    with FakeUseapi(make_accounts(3, max_jobs=2), token=TOKEN) as server:
        yield server


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - polling a condition nobody signals
            await anyio.sleep(0.01)


def channels(lb: Balancer) -> set[str]:
    return set(lb.statistics().channels)


#: Each fault the fake can inject on a later refresh, and the error refresh() raises.
FAULTS: list[tuple[str, Callable[[FakeUseapi], None], type[BalancerError]]] = [
    ("401", lambda f: f.set_status(401), AuthError),
    ("404", lambda f: f.set_accounts(None), ConfigNotFoundError),
    ("429", lambda f: f.set_status(429), SourceError),
    ("500", lambda f: f.set_status(500), SourceError),
    ("503", lambda f: f.set_status(503, "<html>down</html>"), SourceError),
    ("malformed", lambda f: f.set_body(b'{"ch0": {"maxJobs": '), AccountMapError),
    ("not-object", lambda f: f.set_body(b"[1, 2, 3]"), AccountMapError),
    ("redirect", lambda f: f.set_redirect("http://127.0.0.1:9/elsewhere"), SourceError),
    ("timeout", lambda f: f.set_delay(2), SourceError),
]


class TestFirstFetch:
    async def test_auth_error_raised_unwrapped(self, fake: FakeUseapi):
        """A refused token raises AuthError itself from `async with`, not an ExceptionGroup."""
        source = UseapiAccountSource("wrong-token", base_url=fake.base_url)
        with pytest.raises(BaseException) as info:
            async with Balancer(source):
                pytest.fail("must not be entered")
        assert type(info.value) is AuthError
        assert info.value.status_code == 401

    async def test_forced_401_raised_unwrapped(self, fake: FakeUseapi):
        """A 401 answer on enter raises AuthError itself."""
        fake.set_status(401)
        with pytest.raises(BaseException) as info:
            async with Balancer(fake.source()):
                pass
        assert type(info.value) is AuthError

    @pytest.mark.parametrize("status", [500, 503, 429])
    async def test_server_error_raised_unwrapped(self, fake: FakeUseapi, status: int):
        """A transient error on enter raises SourceError itself, with its status."""
        fake.set_status(status)
        with pytest.raises(BaseException) as info:
            async with Balancer(fake.source()):
                pass
        assert type(info.value) is SourceError
        assert info.value.status_code == status

    async def test_malformed_body_raised_unwrapped(self, fake: FakeUseapi):
        """A 200 that is not a JSON object raises AccountMapError itself on enter."""
        fake.set_body("not json")
        with pytest.raises(BaseException) as info:
            async with Balancer(fake.source()):
                pass
        assert type(info.value) is AccountMapError

    async def test_unreachable_raised_unwrapped(self):
        """A refused connection on enter raises SourceError itself."""
        with FakeUseapi(token=TOKEN) as gone:
            base_url = gone.base_url
        source = UseapiAccountSource(TOKEN, base_url=base_url, timeout=2)
        with pytest.raises(BaseException) as info:
            async with Balancer(source):
                pass
        assert type(info.value) is SourceError

    async def test_404_enters_with_empty_map(self, fake: FakeUseapi):
        """A 404 on enter enters with an empty map; acquire raises NoAccountsError until one appears."""
        fake.set_accounts(None)
        async with Balancer(fake.source(), ttl=3600) as lb:
            stats = lb.statistics()
            assert stats.channels == {}
            assert stats.capacity == 0
            assert stats.refresh_errors_total == 0
            with anyio.fail_after(1), pytest.raises(NoAccountsError):
                await lb.acquire()
            fake.set_accounts(make_accounts(2))
            await lb.refresh()
            assert channels(lb) == {"ch0", "ch1"}
            await lb.release(await lb.acquire(timeout=0))

    async def test_v2_schema(self, fake: FakeUseapi):
        """The v2 endpoint's accounts are keyed by email and carry the jwt as their token."""
        v2 = make_v2_accounts(2, max_jobs=3)
        fake.set_v2_accounts(v2)
        async with Balancer(fake.source(schema="v2"), ttl=3600) as lb:
            assert channels(lb) == set(v2)
            lease = await lb.acquire(channel="user0@example.com")
            assert lease.account.server is None
            assert lease.account.discord.reveal() == v2["user0@example.com"]["jwt"]["token"]
            assert lb.statistics().capacity == 6
            await lb.release(lease)


class TestBackgroundRefresh:
    async def test_refreshes_before_ttl_expires(self, fake: FakeUseapi):
        """The map is refetched in the background before it goes stale."""
        async with Balancer(fake.source(), ttl=0.5) as lb:
            assert fake.requests == 1
            with anyio.fail_after(5):
                while fake.requests < 3:
                    # Refreshes start at 75-90 % of ttl, so the map never goes stale.
                    assert not lb.statistics().map_stale
                    await anyio.sleep(0.01)

    async def test_picks_up_a_new_map(self, fake: FakeUseapi):
        """A change upstream reaches the balancer without anyone calling refresh()."""
        async with Balancer(fake.source(), ttl=0.3) as lb:
            assert channels(lb) == {"ch0", "ch1", "ch2"}
            fake.set_accounts(make_accounts(5, max_jobs=1, prefix="new"))
            await eventually(lambda: "new4" in channels(lb))
            assert lb.statistics().capacity == 5

    async def test_failures_never_raise_into_user_code(self, fake: FakeUseapi):
        """Background refresh failures are counted and logged, never raised into the block."""
        with structlog.testing.capture_logs() as logs:
            async with Balancer(fake.source(), ttl=0.2) as lb:
                fake.set_status(503)
                await eventually(lambda: lb.statistics().refresh_errors_total >= 2)
                assert channels(lb) == {"ch0", "ch1", "ch2"}
                await lb.release(await lb.acquire(timeout=0))
        failures = [e for e in logs if e["event"] == "map_refresh_failed"]
        assert len(failures) >= 2
        assert all(e["log_level"] == "warning" for e in failures)

    async def test_recovers_when_upstream_returns(self, fake: FakeUseapi):
        """After failures, the background refresh fetches a good map again once upstream is back."""
        async with Balancer(fake.source(), ttl=0.3) as lb:
            fake.set_status(500)
            await eventually(lambda: lb.statistics().map_stale)
            fake.clear_fault()
            fake.set_accounts(make_accounts(1))
            await eventually(lambda: not lb.statistics().map_stale)
            assert channels(lb) == {"ch0"}

    async def test_acquire_never_waits_on_http(self, fake: FakeUseapi):
        """With a refresh hanging on a slow upstream, acquire still completes at once."""
        # The whole block, exit included, ends long before the hanging request would.
        with anyio.fail_after(10):
            async with Balancer(fake.source(timeout=60), ttl=0.2) as lb:
                fake.set_delay(30)
                await eventually(lambda: fake.requests >= 2)  # the background fetch hangs now
                with anyio.fail_after(1):
                    for _ in range(10):
                        await lb.release(await lb.acquire())
                    async with lb.acquire(timeout=5) as lease:
                        assert lease.channel in {"ch0", "ch1", "ch2"}


class TestRefreshFailures:
    @pytest.mark.parametrize(("name", "inject", "error"), FAULTS, ids=[f[0] for f in FAULTS])
    async def test_failed_refresh_keeps_last_good_map(
        self,
        fake: FakeUseapi,
        name: str,
        inject: Callable[[FakeUseapi], None],
        error: type[BalancerError],
    ):
        """A failed refresh raises its error from refresh(), is counted, and keeps the map."""
        async with Balancer(fake.source(timeout=0.3), ttl=3600) as lb:
            lease = await lb.acquire()
            before = lb.statistics()
            inject(fake)
            with anyio.fail_after(5), pytest.raises(BalancerError) as info:
                await lb.refresh()
            assert type(info.value) is error
            stats = lb.statistics()
            assert stats.refresh_errors_total == 1
            assert stats.last_refresh_error is not None
            assert stats.last_refresh_error.startswith(error.__name__)
            assert TOKEN not in stats.last_refresh_error
            assert TOKEN[:8] not in stats.last_refresh_error
            assert stats.map_fetched_at == before.map_fetched_at
            assert stats.channels == before.channels
            # The last good map stays usable: its accounts carry their credentials.
            await lb.release(await lb.acquire(timeout=0))
            await lb.release(lease)
            fake.clear_fault()
            fake.set_accounts(make_accounts(2))
            await lb.refresh()
            assert channels(lb) == {"ch0", "ch1"}
            assert lb.statistics().refresh_errors_total == 1

    async def test_later_404_keeps_map(self, fake: FakeUseapi):
        """A 404 after a good map is a failed refresh: refresh() raises ConfigNotFoundError."""
        async with Balancer(fake.source(), ttl=3600) as lb:
            fake.set_accounts(None)
            with pytest.raises(ConfigNotFoundError):
                await lb.refresh()
            assert channels(lb) == {"ch0", "ch1", "ch2"}
            assert lb.statistics().capacity == 6

    async def test_redirect_not_followed(self, fake: FakeUseapi):
        """A redirect is a failed refresh, and the new location is never asked."""
        with FakeUseapi(make_accounts(1), token=TOKEN) as elsewhere:
            async with Balancer(fake.source(), ttl=3600) as lb:
                fake.set_redirect(elsewhere.base_url + "/v1/pixverse/account")
                with pytest.raises(SourceError) as info:
                    await lb.refresh()
                assert info.value.status_code == 302
            assert elsewhere.request_log == []

    async def test_errors_counted_per_fetch(self, fake: FakeUseapi):
        """Each failed fetch counts once, and last_refresh_error names the latest."""
        async with Balancer(fake.source(), ttl=3600) as lb:
            fake.set_status(500)
            with pytest.raises(SourceError):
                await lb.refresh()
            fake.set_status(401)
            with pytest.raises(AuthError):
                await lb.refresh()
            stats = lb.statistics()
            assert stats.refresh_errors_total == 2
            assert stats.last_refresh_error is not None
            assert stats.last_refresh_error.startswith("AuthError")


class TestSingleFlight:
    async def test_concurrent_refreshes_share_one_request(self, fake: FakeUseapi):
        """N concurrent refresh() calls cause exactly one request, and all see its map."""
        async with Balancer(fake.source(), ttl=3600) as lb:
            before = fake.requests
            fake.set_delay(0.3)
            fake.set_accounts(make_accounts(4))
            done: list[int] = []

            async def refresh() -> None:
                await lb.refresh()
                done.append(len(lb.statistics().channels))

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    for _ in range(10):
                        tg.start_soon(refresh)
            assert fake.requests - before == 1
            assert done == [4] * 10

    async def test_concurrent_refreshes_share_one_failure(self, fake: FakeUseapi):
        """When the shared request fails, every waiting refresh() raises its error, counted once."""
        async with Balancer(fake.source(), ttl=3600) as lb:
            before = fake.requests
            fake.set_status(503)
            fake.set_delay(0.3)
            errors: list[BaseException] = []

            async def refresh() -> None:
                try:
                    await lb.refresh()
                except SourceError as exc:
                    errors.append(exc)

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    for _ in range(6):
                        tg.start_soon(refresh)
            assert fake.requests - before == 1
            assert len(errors) == 6
            assert lb.statistics().refresh_errors_total == 1

    async def test_cancelled_leader_does_not_cancel_followers(self, fake: FakeUseapi):
        """If the refresh that leads is cancelled, a follower fetches instead and succeeds."""
        async with Balancer(fake.source(), ttl=3600) as lb:
            fake.set_delay(0.3)
            fake.set_accounts(make_accounts(1))
            results: list[str] = []
            leader_scope = anyio.CancelScope()

            async def leader() -> None:
                with leader_scope:
                    await lb.refresh()
                    results.append("leader")

            async def follower() -> None:
                await lb.refresh()
                results.append("follower")

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(leader)
                    await anyio.wait_all_tasks_blocked()
                    tg.start_soon(follower)
                    await anyio.wait_all_tasks_blocked()
                    leader_scope.cancel()
            assert results == ["follower"]
            assert channels(lb) == {"ch0"}


class TestStaleness:
    async def test_max_stale_raises_then_recovers(self, fake: FakeUseapi):
        """After max_stale without a good map acquire raises StaleAccountMapError, until upstream returns."""

        with structlog.testing.capture_logs() as logs:
            async with Balancer(fake.source(), ttl=0.2, max_stale=0.4) as lb:
                await lb.release(await lb.acquire(timeout=0))
                fake.set_status(503)
                with anyio.fail_after(5):
                    while True:
                        try:
                            lease = await lb.acquire(timeout=0)
                        except StaleAccountMapError as exc:
                            assert exc.max_stale == 0.4
                            assert exc.age is not None and exc.age > 0.4
                            break
                        await lb.release(lease)
                        await anyio.sleep(0.01)
                with pytest.raises(StaleAccountMapError):
                    async with lb.acquire():
                        pass
                assert lb.statistics().map_stale
                fake.clear_fault()
                with anyio.fail_after(5):
                    while True:
                        try:
                            lease = await lb.acquire(timeout=0)
                        except StaleAccountMapError:
                            await anyio.sleep(0.01)
                        else:
                            break
                await lb.release(lease)
                assert not lb.statistics().map_stale
        assert any(e["event"] == "map_stale" and e["log_level"] == "error" for e in logs)

    async def test_max_stale_below_ttl_with_healthy_upstream(self):
        """With max_stale shorter than ttl, a healthy source is refreshed in time: never stale."""
        source = StaticAccountSource(make_accounts(1))
        async with Balancer(source, ttl=5, max_stale=0.2) as lb:
            started = anyio.current_time()
            while anyio.current_time() - started < 0.5:
                await lb.release(await lb.acquire(timeout=0))
                await anyio.sleep(0.02)

    async def test_map_stale_flag_after_ttl(self, fake: FakeUseapi):
        """map_stale turns True once the last good fetch is older than ttl; the map is still served."""
        async with Balancer(fake.source(), ttl=0.2) as lb:
            assert not lb.statistics().map_stale
            fake.set_status(500)
            await eventually(lambda: lb.statistics().map_stale)
            stats = lb.statistics()
            assert stats.map_age is not None and stats.map_age > 0.2
            await lb.release(await lb.acquire(timeout=0))  # max_stale=None: serve it forever


class TestAccountMap:
    async def test_bad_entry_dropped_with_warning(self, fake: FakeUseapi):
        """A bad entry among good ones is dropped with an account_rejected warning; the rest work."""
        accounts: dict[str, Any] = make_accounts(3)
        accounts["bad"] = {"channel": "bad", "discord": "x", "maxJobs": "lots"}
        accounts["zero"] = {"maxJobs": 0}
        fake.set_accounts(accounts)
        with structlog.testing.capture_logs() as logs:
            async with Balancer(fake.source(), ttl=3600) as lb:
                assert channels(lb) == {"ch0", "ch1", "ch2"}
                with pytest.raises(NoAccountsError):
                    await lb.acquire(channel="bad")
                await lb.release(await lb.acquire(timeout=0))
        rejected = {e["channel"]: e for e in logs if e["event"] == "account_rejected"}
        assert set(rejected) == {"bad", "zero"}
        assert all(e["log_level"] == "warning" and e["reason"] for e in rejected.values())

    async def test_ten_thousand_channels(self, fake: FakeUseapi):
        """A 10,000-channel map loads, balances, and shrinks on refresh."""
        fake.set_accounts(make_accounts(10_000, max_jobs=2))
        async with Balancer(fake.source(), ttl=3600, seed=1) as lb:
            stats = lb.statistics()
            assert (len(stats.channels), stats.capacity) == (10_000, 20_000)
            leases = [await lb.acquire(timeout=0) for _ in range(2_000)]
            assert len({lease.channel for lease in leases}) > 1_500
            fake.set_accounts(make_accounts(9_000, max_jobs=2))
            await lb.refresh()
            stats = lb.statistics()
            assert stats.capacity == 18_000
            assert stats.in_flight == 2_000
            for lease in leases:
                await lb.release(lease)
            assert len(lb.statistics().channels) == 9_000
            assert lb.statistics().in_flight == 0


class TestMapCache:
    """The cache's schedule, driven by a fake clock (no balancer, no HTTP)."""

    async def test_next_delay_before_ttl(self):
        """After a good fetch the next refresh is due at 75-90 % of ttl from that fetch."""
        now = [100.0]
        applied: list[ParsedAccounts] = []

        async def apply(parsed: ParsedAccounts) -> None:
            applied.append(parsed)

        cache = MapCache(
            StaticAccountSource(make_accounts(1)),
            apply,
            ttl=60,
            rng=random.Random(0),
            clock=lambda: now[0],
        )
        assert cache.is_stale() and cache.age() is None
        await cache.refresh()
        assert len(applied) == 1
        delays = [cache.next_delay() for _ in range(200)]
        assert all(45 <= d <= 54 for d in delays)
        now[0] += 20
        assert cache.age() == 20
        assert all(25 <= cache.next_delay() <= 34 for _ in range(50))
        assert not cache.is_stale()
        now[0] += 41
        assert cache.is_stale()

    async def test_backoff_after_failures(self):
        """After failures the next attempt backs off, never beyond ttl."""

        class Failing:
            async def fetch(self) -> ParsedAccounts:
                raise SourceError("down")

        async def apply(parsed: ParsedAccounts) -> None:
            pass

        cache = MapCache(Failing(), apply, ttl=8, rng=random.Random(1))
        ceilings = []
        for _ in range(8):
            with pytest.raises(SourceError):
                await cache.refresh()
            ceilings.append(max(cache.next_delay() for _ in range(100)))
        assert cache.errors_total == 8
        assert all(0 < c <= 8 for c in ceilings)
        assert ceilings[-1] > ceilings[0]

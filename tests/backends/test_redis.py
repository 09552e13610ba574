"""
RedisBackend against a real redis-server (never a fake), on asyncio and on trio.

The backend is exercised through the ``Backend`` protocol (two instances on one
namespace stand for two processes) and through ``Balancer``; the last tests run
real OS processes. The server comes from ``tests/_redis.py``: these tests
never skip.

What every backend must do (counts, map changes, selection, cooling, release)
is in the contract suite, ``tests/backends/test_contract.py``, which runs on
Redis too; this file keeps what only a shared, remote backend has: counts
shared between processes, lease expiry and renewal, wake-ups, faults, epochs,
URLs and clients, and real processes.
"""

from __future__ import annotations

import json
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import redis
from structlog.testing import capture_logs

from balancer import BackendUnavailableError, Balancer, StaticAccountSource
from balancer.backends.base import BackendConfig
from balancer.backends.redis import RedisBackend
from balancer.testing import make_accounts
from tests._helpers import Wakeups
from tests._redis import EVENT_PREFIX, RedisServer, dump_redis, spawn_worker

pytestmark = pytest.mark.redis


# -- helpers -----------------------------------------------------------------------


def config(
    owner: str,
    *,
    selection: str = "random",
    lease_ttl: float | None = 5.0,
    cooldown: float = 30.0,
    failures_to_cool: int = 5,
) -> BackendConfig:
    return BackendConfig(
        owner=owner,
        selection=selection,  # type: ignore[arg-type]
        rng=random.Random(0),
        lease_ttl=lease_ttl,
        cooldown=cooldown,
        failures_to_cool=failures_to_cool,
    )


@asynccontextmanager
async def opened(
    url: Any,
    namespace: str,
    owner: str = "a",
    *,
    limits: Mapping[str, int] | None = None,
    backend_kwargs: Mapping[str, Any] | None = None,
    **config_kwargs: Any,
) -> AsyncIterator[tuple[RedisBackend, Wakeups]]:
    """A backend (on a URL or a client) opened as a balancer opens it, in its own task group."""
    backend = RedisBackend(url, namespace=namespace, **(backend_kwargs or {}))
    wakeups = Wakeups()
    async with anyio.create_task_group() as tg:
        await backend.open(config(owner, **config_kwargs), wakeups, tg)
        try:
            if limits is not None:
                await backend.set_map(limits)
            yield backend, wakeups
        finally:
            with anyio.CancelScope(shield=True):
                await backend.close()
            tg.cancel_scope.cancel()


def in_flight(backend: RedisBackend, channel: str) -> int:
    counts = backend.counts().get(channel)
    return counts.in_flight if counts is not None else 0


async def acquire_eventually(
    backend: RedisBackend, lease_id: str, channel: str | None = None, *, within: float = 5.0
) -> str:
    """Retry ``try_acquire`` (riding out outages) until it grants; bounded by ``within``."""
    with anyio.fail_after(within):
        while True:
            try:
                got = await backend.try_acquire(lease_id, channel)
            except BackendUnavailableError:
                got = None
            if got is not None:
                return got
            await anyio.sleep(0.02)


def tokens_of(raw: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [str(entry["discord"]) for entry in raw.values()]


# -- the protocol -------------------------------------------------------------------


class TestCounts:
    def test_flags(self) -> None:
        """The Redis backend is shared, remote, and its leases expire unless renewed."""
        b = RedisBackend("redis://127.0.0.1:6379/0")
        assert b.shared and not b.immediate and b.default_lease_ttl == 60.0

    async def test_two_backends_share_counts(self, redis_url: str, redis_namespace: str) -> None:
        """Two backends on one namespace (two processes) see and respect each other's leases."""
        limits = {"c1": 2}
        async with (
            opened(redis_url, redis_namespace, "a", limits=limits) as (a, _),
            opened(redis_url, redis_namespace, "b", limits=limits) as (b, _),
        ):
            assert await a.try_acquire("a-1", None) == "c1"
            assert await b.try_acquire("b-1", None) == "c1"
            assert await a.try_acquire("a-2", None) is None
            assert await b.try_acquire("b-2", "c1") is None
            await a.renew()
            assert in_flight(a, "c1") == 2
            assert in_flight(b, "c1") == 2
            assert (await b.release("b-1", "ok")).status == "released"
            assert await a.try_acquire("a-3", None) == "c1"


class TestSelection:
    async def test_p2c_samples_two_distinct_channels(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """``p2c`` on Redis samples two distinct channels: with two, the less loaded always wins."""
        async with opened(
            redis_url, redis_namespace, limits={"busy": 4, "idle": 4}, selection="p2c"
        ) as (b, _):
            assert await b.try_acquire("a-1", "busy") == "busy"
            assert await b.try_acquire("a-2", "busy") == "busy"
            # With two channels both are always sampled: the idle one must win.
            assert [await b.try_acquire(f"a-x{n}", None) for n in range(2)] == ["idle", "idle"]


class TestLeases:
    async def test_expired_lease_is_reclaimed(self, redis_url: str, redis_namespace: str) -> None:
        """A lease nobody renews frees its slot after lease_ttl (server clock)."""
        limits = {"c1": 1}
        ttl = 0.5
        async with opened(redis_url, redis_namespace, "b", limits=limits, lease_ttl=ttl) as (b, _):
            async with opened(redis_url, redis_namespace, "a", limits=limits, lease_ttl=ttl) as (
                a,
                _,
            ):
                assert await a.try_acquire("a-1", None) == "c1"
                granted_at = time.monotonic()
            # a's process is gone (closed without releasing): nobody renews a-1.
            assert await b.try_acquire("b-1", None) is None
            assert await acquire_eventually(b, "b-2", within=3) == "c1"
            waited = time.monotonic() - granted_at
            assert ttl * 0.8 <= waited <= ttl + 1.0
            late = await b.release("a-1", "ok")  # the holder's late release
            assert late.status == "lost"
            await b.renew()
            assert in_flight(b, "c1") == 1  # b-2 only: never negative, never double-freed

    async def test_renewal_keeps_a_lease_past_several_ttls(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """A renewed lease outlives several lease_ttls; its slot is never handed out."""
        limits = {"c1": 1}
        ttl = 0.5
        async with (
            opened(redis_url, redis_namespace, "a", limits=limits, lease_ttl=ttl) as (a, _),
            opened(redis_url, redis_namespace, "b", limits=limits, lease_ttl=ttl) as (b, _),
        ):
            assert await a.try_acquire("a-1", None) == "c1"
            started = time.monotonic()
            n = 0
            while time.monotonic() - started < 4 * ttl:
                await anyio.sleep(ttl / 3)
                result = await a.renew()
                assert not result.lost and not result.released
                assert await b.try_acquire(f"b-{n}", None) is None
                n += 1
            assert (await a.release("a-1", "ok")).status == "released"
            assert await b.try_acquire("b-last", None) == "c1"

    async def test_lease_reclaimed_while_unrenewed_is_reported_lost(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """A lease that expired before its renewal is reported lost, and stays gone."""
        limits = {"c1": 1}
        async with (
            opened(redis_url, redis_namespace, "a", limits=limits, lease_ttl=0.4) as (a, _),
            opened(redis_url, redis_namespace, "b", limits=limits, lease_ttl=0.4) as (b, _),
        ):
            assert await a.try_acquire("a-1", None) == "c1"
            assert await acquire_eventually(b, "b-1", within=3) == "c1"  # reclaimed a-1
            result = await a.renew()
            assert result.lost == {"a-1"} and not result.released
            assert (await a.renew()).lost == frozenset()  # reported once
            assert in_flight(a, "c1") == 1

    async def test_release_by_id_from_another_process(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """Any backend on the namespace releases a lease by id; its holder learns "released"."""
        limits = {"c1": 1}
        async with (
            opened(redis_url, redis_namespace, "a", limits=limits) as (a, _),
            opened(redis_url, redis_namespace, "b", limits={}) as (b, _),  # an empty map even
        ):
            assert await a.try_acquire("a-1", None) == "c1"
            result = await b.release("a-1", "ok")
            assert result.status == "released" and result.channel == "c1"
            renewed = await a.renew()
            assert renewed.released == {"a-1"} and not renewed.lost
            assert in_flight(a, "c1") == 0
            assert await a.try_acquire("a-2", None) == "c1"


class TestWakeups:
    async def test_release_wakes_other_processes(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """A slot freed in one process calls ``notify`` in the others (pub/sub)."""
        limits = {"c1": 1}
        async with (
            opened(redis_url, redis_namespace, "a", limits=limits) as (a, _),
            opened(redis_url, redis_namespace, "b", limits=limits) as (b, b_wakeups),
        ):
            assert await a.try_acquire("a-1", None) == "c1"
            woken = b_wakeups.arm()
            await a.release("a-1", "ok")
            with anyio.fail_after(2):
                await woken.wait()
            assert await b.try_acquire("b-1", None) == "c1"


# -- faults ----------------------------------------------------------------------------


class TestFaults:
    async def test_data_loss_is_detected_and_leases_reasserted(
        self, private_redis: RedisServer, redis_namespace: str
    ) -> None:
        """After a restart that lost everything, both processes re-assert their leases."""
        url, limits = private_redis.url, {"c1": 2, "c2": 1}
        kwargs = {"recovery_grace": 0.3}
        async with (
            opened(url, redis_namespace, "a", limits=limits, backend_kwargs=kwargs) as (a, _),
            opened(url, redis_namespace, "b", limits=limits, backend_kwargs=kwargs) as (b, _),
        ):
            assert await a.try_acquire("a-1", "c1") == "c1"
            assert await b.try_acquire("b-1", "c1") == "c1"
            assert await b.try_acquire("b-2", "c2") == "c2"
            private_redis.restart()  # no persistence: every key is gone
            with anyio.fail_after(5):
                while True:
                    try:
                        await a.renew()
                    except BackendUnavailableError:
                        pass
                    else:
                        if in_flight(a, "c1") == 2 and in_flight(a, "c2") == 1:
                            break
                    await anyio.sleep(0.02)
            # The truth is back: nothing free, though Redis itself started empty.
            assert await a.try_acquire("a-2", None) is None
            assert (await b.release("b-2", "ok")).status == "released"
            assert await acquire_eventually(a, "a-3") == "c2"
            assert await a.try_acquire("a-4", None) is None

    async def test_a_lease_gone_without_a_tombstone_is_not_recreated(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """A lease missing from Redis with no tombstone counts as released elsewhere (#10)."""
        async with opened(redis_url, redis_namespace, limits={"c1": 2}) as (b, _):
            assert await b.try_acquire("a-1", None) == "c1"
            assert await b.try_acquire("a-2", None) == "c1"
            tag = f"{{{redis_namespace}}}"
            with redis.Redis.from_url(redis_url) as client:  # released by id, tombstone gone
                client.zrem(f"{tag}:leases", "a-1")
                client.hdel(f"{tag}:lch", "a-1")
                client.hincrby(f"{tag}:inf", "c1", -1)
                client.sadd(f"{tag}:free", "c1")
                client.sadd(f"{tag}:tok", "c1\x002")
            with capture_logs() as logs:
                result = await b.renew()
            assert result.released == {"a-1"} and not result.lost
            assert in_flight(b, "c1") == 1
            assert [e["event"] for e in logs] == []
            assert await b.try_acquire("a-3", None) == "c1"

    async def test_unreachable_redis_raises_quickly_then_recovers(
        self, private_redis: RedisServer, redis_namespace: str
    ) -> None:
        """With Redis down every call raises BackendUnavailableError fast; it recovers alone."""
        url, limits = private_redis.url, {"c1": 2}
        kwargs = {"recovery_grace": 0.2, "timeout": 1.0}
        with capture_logs() as logs:
            async with opened(url, redis_namespace, limits=limits, backend_kwargs=kwargs) as (b, _):
                assert await b.try_acquire("a-1", None) == "c1"
                private_redis.kill()
                for call in (
                    lambda: b.try_acquire("a-2", None),
                    lambda: b.release("a-1", "ok"),
                    b.renew,
                    lambda: b.set_map(limits),
                ):
                    with anyio.fail_after(2), pytest.raises(BackendUnavailableError):
                        await call()
                assert in_flight(b, "c1") == 1  # counts() still answers, without I/O
                private_redis.start()  # empty: the data is lost too
                assert await acquire_eventually(b, "a-3") == "c1"
                await b.renew()
                # a-1's release failed while Redis was down: it was retried by a sync.
                assert in_flight(b, "c1") == 1
        events = [entry["event"] for entry in logs]
        assert events.count("backend_unavailable") == 1
        assert "backend_recovered" in events

    async def test_hung_redis_times_out_and_doubtful_grants_come_back(
        self, private_redis: RedisServer, redis_namespace: str
    ) -> None:
        """A server that stops answering costs ``timeout``; a grant in doubt is given back."""
        url = private_redis.url
        kwargs = {"timeout": 0.3}
        async with opened(url, redis_namespace, limits={"c1": 1}, backend_kwargs=kwargs) as (b, _):
            with redis.Redis.from_url(url) as admin:
                admin.execute_command("CLIENT", "PAUSE", 700, "ALL")
            started = time.monotonic()
            with anyio.fail_after(2), pytest.raises(BackendUnavailableError, match="answer"):
                await b.try_acquire("a-1", None)  # may run on the server once it resumes
            assert time.monotonic() - started < 1.0
            with anyio.fail_after(5):
                while True:
                    try:
                        await b.renew()  # gives a-1 back if it was granted
                        break
                    except BackendUnavailableError:
                        await anyio.sleep(0.05)
            assert in_flight(b, "c1") == 0
            assert await b.try_acquire("a-2", None) == "c1"

    async def test_connection_timeout_is_bounded(self, redis_namespace: str) -> None:
        """A server that accepts but never answers makes open() fail within ``timeout``."""
        with anyio.fail_after(5):
            async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
                port = listener.extra(anyio.abc.SocketAttribute.local_port)
                backend = RedisBackend(f"redis://127.0.0.1:{port}/0", timeout=0.5)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(listener.serve, _silent)
                    started = time.monotonic()
                    with pytest.raises(BackendUnavailableError):
                        await backend.open(config("a"), Wakeups(), tg)
                    assert time.monotonic() - started < 2
                    tg.cancel_scope.cancel()


async def _silent(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        await anyio.sleep(10)


# -- secrets, URLs and clients ---------------------------------------------------------


class TestSecrets:
    async def test_no_credential_is_ever_written_to_redis(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """Every key and value in Redis, after real traffic, holds no token."""
        raw = make_accounts(3, max_jobs=2)
        async with Balancer(
            StaticAccountSource(raw),
            backend=RedisBackend(redis_url, namespace=redis_namespace),
            lease_ttl=5,
        ) as lb:
            for outcome in ("ok", "failed", "throttled"):
                lease = await lb.acquire(timeout=5)
                await lb.release(lease, outcome=outcome)
            held = await lb.acquire(timeout=5)
            rows = dump_redis(redis_url)
            await lb.release(held)
        mine = [row for row in rows if redis_namespace.encode() in row[0]]
        assert {row[1] for row in mine} >= {"hash", "set", "zset"}
        text = repr(rows)
        for token in tokens_of(raw):
            assert token not in text
        assert "discord-token" not in text

    async def test_password_url_is_used_and_never_shown(
        self, private_redis: RedisServer, redis_namespace: str
    ) -> None:
        """``redis://user:password@`` works and the password shows nowhere: repr, logs, errors."""
        password = f"pw-{uuid.uuid4().hex}"
        with redis.Redis.from_url(private_redis.url) as admin:
            admin.execute_command(
                "ACL", "SETUSER", "worker", "on", f">{password}", "~*", "&*", "+@all"
            )
            admin.config_set("requirepass", password)
        host = f"127.0.0.1:{private_redis.port}"
        with capture_logs() as logs:
            for url in (f"redis://:{password}@{host}/0", f"redis://worker:{password}@{host}/0"):
                backend = RedisBackend(url, namespace=redis_namespace)
                assert password not in repr(backend) and "***" in repr(backend)
                async with opened(url, redis_namespace, limits={"c1": 1}) as (b, _):
                    assert await b.try_acquire("a-1", None) == "c1"
                    await b.release("a-1", "ok")
            bad = f"redis://worker:wrong-{password}@{host}/0"
            refused = RedisBackend(bad, namespace=redis_namespace)
            async with anyio.create_task_group() as tg:
                with pytest.raises(BackendUnavailableError) as caught:
                    await refused.open(config("a"), Wakeups(), tg)
        assert password not in str(caught.value)
        assert password not in repr(logs)

    def test_constructor_checks(self) -> None:
        """Bad URLs, namespaces and objects are refused at construction."""
        with pytest.raises(ValueError, match="scheme"):
            RedisBackend("http://localhost")
        with pytest.raises(ValueError, match="namespace"):
            RedisBackend("redis://localhost", namespace="a{b}")
        with pytest.raises(TypeError):
            RedisBackend(object())
        secure = RedisBackend("rediss://u:hunter2@example.com:6380/1", namespace="x")
        assert "hunter2" not in repr(secure) and "rediss://u:***@example.com:6380/1" in repr(secure)


class TestClients:
    async def test_a_client_passed_in_is_used_and_not_closed(
        self, redis_url: str, redis_namespace: str, anyio_backend: str
    ) -> None:
        """A coredis client (either loop) or redis-py client (asyncio) is used as given."""
        import coredis

        client: Any = coredis.Redis.from_url(redis_url)
        async with client:
            async with opened(client, redis_namespace, limits={"c1": 1}) as (b, _):
                assert await b.try_acquire("a-1", None) == "c1"
            assert await client.ping() in (b"PONG", "PONG")  # still open
        if anyio_backend == "asyncio":
            import redis.asyncio

            py_client = redis.asyncio.Redis.from_url(redis_url)
            async with opened(py_client, redis_namespace, limits={"c1": 1}) as (b, _):
                assert await b.try_acquire("a-2", None) is None  # a-1 still holds it
                await b.release("a-1", "ok")
            assert await py_client.ping()
            await py_client.aclose()

    async def test_redis_py_client_under_trio_is_refused(
        self, redis_url: str, redis_namespace: str, anyio_backend: str
    ) -> None:
        """redis-py runs on asyncio only: under trio a clear TypeError says what to pass."""
        if anyio_backend != "trio":
            return
        import redis.asyncio

        backend = RedisBackend(redis.asyncio.Redis.from_url(redis_url), namespace=redis_namespace)
        async with anyio.create_task_group() as tg:
            with pytest.raises(TypeError, match="asyncio only"):
                await backend.open(config("a"), Wakeups(), tg)


# -- through the Balancer -----------------------------------------------------------


class TestBalancer:
    async def test_two_balancers_share_max_jobs(self, redis_url: str, redis_namespace: str) -> None:
        """Entering shows the cluster-wide in_flight; a slot freed in one wakes the other."""
        raw = make_accounts(1, max_jobs=2)

        def new() -> Balancer:
            return Balancer(
                StaticAccountSource(raw),
                backend=RedisBackend(redis_url, namespace=redis_namespace),
                lease_ttl=5,
                poll_interval=30,  # so only a pub/sub wake-up can serve the waiter in time
            )

        async with new() as one:
            first = await one.acquire(timeout=5)
            second = await one.acquire(timeout=5)
            async with new() as two:
                assert two.statistics().in_flight == 2
                assert two.statistics().free == 0

                async def release_soon() -> None:
                    await anyio.wait_all_tasks_blocked()
                    await one.release(first)

                with anyio.fail_after(5):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(release_soon)
                        lease = await two.acquire(timeout=4)
                assert lease.channel == first.channel
                await two.release(lease.id)  # by id
                await one.release(second.id)

    async def test_release_by_id_through_another_balancer(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """A lease id released by another balancer (a webhook) frees the slot."""
        raw = make_accounts(1, max_jobs=1)
        backend_a = RedisBackend(redis_url, namespace=redis_namespace)
        backend_b = RedisBackend(redis_url, namespace=redis_namespace)
        async with (
            Balancer(StaticAccountSource(raw), backend=backend_a, lease_ttl=5) as a,
            Balancer(StaticAccountSource({}), backend=backend_b, lease_ttl=5) as b,
        ):
            lease = await a.acquire(timeout=5)
            await b.release(lease.id)
            again = await a.acquire(timeout=5)
            assert again.channel == lease.channel
            await a.release(again)

    async def test_acquire_raises_backend_unavailable_within_timeout(
        self, private_redis: RedisServer, redis_namespace: str
    ) -> None:
        """With Redis down, acquire raises BackendUnavailableError in time; then recovers."""
        raw = make_accounts(1, max_jobs=1)
        backend = RedisBackend(
            private_redis.url, namespace=redis_namespace, timeout=1.0, recovery_grace=0.2
        )
        async with Balancer(StaticAccountSource(raw), backend=backend, lease_ttl=5) as lb:
            private_redis.kill()
            with anyio.fail_after(3), pytest.raises(BackendUnavailableError):
                await lb.acquire(timeout=2)
            private_redis.start()
            with anyio.fail_after(8):
                while True:
                    try:
                        lease = await lb.acquire(timeout=2)
                        break
                    except BackendUnavailableError:
                        await anyio.sleep(0.05)
            await lb.release(lease)


# -- real OS processes ---------------------------------------------------------------


def _events(proc: Any, want: str, timeout: float) -> dict[str, Any]:
    """Read the worker's JSON lines until one has ``event == want``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker exited (rc={proc.poll()}) before {want!r}")
        if not line.startswith(EVENT_PREFIX):
            continue  # the worker's log lines
        event: dict[str, Any] = json.loads(line.removeprefix(EVENT_PREFIX))
        if event["event"] == want:
            return event
    raise AssertionError(f"no {want!r} from the worker within {timeout}s")


def _reap(proc: Any) -> None:
    """Kill a worker (if still alive), wait for it and close its pipes."""
    proc.kill()
    with proc:  # closes stdin/stdout, then waits
        pass


@pytest.mark.slow
class TestProcesses:
    def test_four_processes_never_exceed_max_jobs(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """4 processes (2 asyncio, 2 trio) x 50 jobs: concurrency per channel, counted in
        Redis itself, never exceeds max_jobs."""
        channels, max_jobs = 3, 2
        procs = [
            spawn_worker("jobs", loop, redis_url, redis_namespace, 50, channels, max_jobs)
            for loop in ("asyncio", "trio", "asyncio", "trio")
        ]
        try:
            done = [_events(proc, "done", 60) for proc in procs]
        finally:
            for proc in procs:
                _reap(proc)
        assert [event["jobs"] for event in done] == [50] * 4
        with redis.Redis.from_url(redis_url) as client:
            check = f"{redis_namespace}-check"
            peaks = {c: int(client.get(f"{check}:max:ch{c}") or 0) for c in range(channels)}
            running = {c: int(client.get(f"{check}:running:ch{c}") or 0) for c in range(channels)}
        assert all(0 < peak <= max_jobs for peak in peaks.values()), peaks
        assert running == dict.fromkeys(range(channels), 0)

    def test_sigkill_holder_slots_come_back_within_lease_ttl(
        self, redis_url: str, redis_namespace: str, request: pytest.FixtureRequest
    ) -> None:
        """A holder killed with SIGKILL loses its slots within lease_ttl of its death."""
        ttl = 1.0
        proc = spawn_worker("hold", "asyncio", redis_url, redis_namespace, 2, ttl)
        try:
            held = _events(proc, "held", 30)
            proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            proc.wait()
        finally:
            _reap(proc)
        assert len(held["leases"]) == 2

        async def main() -> float:
            async with opened(redis_url, redis_namespace, "t", limits={"ch0": 2}) as (b, _):
                assert await acquire_eventually(b, "t-1", within=ttl + 2) == "ch0"
                reclaimed = time.monotonic() - killed
                assert await acquire_eventually(b, "t-2", within=1) == "ch0"
                return reclaimed

        reclaimed = anyio.run(main)
        request.node.user_properties.append(("reclaimed_after_sigkill_s", round(reclaimed, 3)))
        assert reclaimed <= ttl + 0.3

    def test_waiter_is_woken_by_a_release_in_another_process(
        self, redis_url: str, redis_namespace: str, request: pytest.FixtureRequest
    ) -> None:
        """A waiter is served within milliseconds of a release elsewhere, not at the poll."""
        proc = spawn_worker("hold", "trio", redis_url, redis_namespace, 1, 5.0)
        try:
            _events(proc, "held", 30)

            async def main() -> tuple[float, float]:
                async with Balancer(
                    StaticAccountSource(make_accounts(1, max_jobs=1)),
                    backend=RedisBackend(redis_url, namespace=redis_namespace),
                    lease_ttl=5,
                    poll_interval=30,
                ) as lb:

                    async def release_soon() -> None:
                        await anyio.wait_all_tasks_blocked()
                        assert proc.stdin is not None
                        proc.stdin.write("release\n")
                        proc.stdin.flush()

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(release_soon)
                        lease = await lb.acquire(timeout=10)
                        got = time.time()
                    await lb.release(lease)
                releasing = await anyio.to_thread.run_sync(_events, proc, "releasing", 10)
                return got, float(releasing["t"])

            got, released = anyio.run(main)
        finally:
            _reap(proc)
        latency = got - released  # includes the releasing process's own round trip
        request.node.user_properties.append(("cross_process_wakeup_s", round(latency, 4)))
        assert latency < 1.0  # the fallback poll is 30 s away

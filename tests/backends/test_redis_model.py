"""
A model-based test of ``RedisBackend``: several processes, one namespace, a plain-Python model.

A hypothesis state machine drives three ``RedisBackend`` instances on one
namespace of the session's real redis-server (each an independent "process",
opened in its own task group through a blocking portal, so the machine runs on
asyncio with redis-py and on trio with coredis) with random steps:

* acquires from any process, pinned to a channel or not;
* releases (``ok`` / ``failed`` / ``throttled``) by the owner or, by id, by
  another process, and repeated releases; ``throttled`` or two ``failed`` in a
  row cool the channel for every process;
* map changes (channels added, removed so they drain, ``max_jobs`` raised and
  lowered) sent by one or several processes;
* expiry: the "mortal" process (short ``lease_ttl``, renewed every step while
  it lives) dies without releasing; after ``lease_ttl`` its slots come back
  and releasing its leases later finds them ``"lost"``. A new mortal process
  takes its place.

Channel names include a NUL (the separator of the slot tokens) and non-ASCII.
After every step every living process renews (as its balancer does in the
background; none may lose a lease) and its ``counts()`` must equal the model,
and the namespace's keys, read straight from Redis, must agree with the model
exactly: ``in_flight`` per channel (equal to the leases recorded for it, never
negative, never over ``max_jobs`` unless a lowered limit left leases out), the
limits, the draining and cooling sets, the failure streaks, the lease table, and
the documented free-slot index (``P:free``, ``P:tok``). Tearing down releases
every live lease and checks that nothing leaked: every count 0 and every
draining channel gone.

``TestRegressions`` keeps fixed the bugs this model found (an empty map was
never applied, map digests collided, a large ``maxJobs`` blocked Redis).

25 examples of 25 steps per event loop in CI (derandomized); long mode for
release checks: ``BALANCER_FUZZ_LONG=1`` (40x, fresh random examples) or
``BALANCER_FUZZ_LONG=<n>`` (n x), as in ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import pytest
import redis
from anyio.abc import TaskStatus
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

from balancer.backends.base import BackendConfig
from balancer.backends.redis import RedisBackend

if TYPE_CHECKING:
    from tests._redis import RedisServer

pytestmark = pytest.mark.redis

#: ``BALANCER_FUZZ_LONG=1`` (or ``=<n>``): 40x (or n x) the examples, freshly random.
_LONG = os.environ.get("BALANCER_FUZZ_LONG", "")
FACTOR = (int(_LONG) if _LONG.isdigit() and int(_LONG) > 1 else 40) if _LONG else 1

CHANNELS = ("a", "b\x00c", "é 中")  # NUL: the separator of the slot tokens
COOLDOWN = 60.0
FAILURES_TO_COOL = 2
STABLE_TTL = 60.0  # never expires within an example: no renewal needed
MORTAL_TTL = 0.4  # the mortal process's leases; renewed every step while it lives
channel_or_none = st.sampled_from((None, *CHANNELS))
limits_strategy = st.dictionaries(
    st.sampled_from(CHANNELS), st.integers(1, 3), min_size=1, max_size=3
)


@dataclass
class Process:
    """One RedisBackend in its own task group, as one balancer process holds it."""

    name: str
    backend: RedisBackend
    stop: Callable[[], None]
    done: Any  # concurrent.futures.Future of the host task
    mortal: bool
    leases: dict[str, str] = field(default_factory=dict)  # lease id -> channel
    counter: int = 0

    def next_id(self) -> str:
        self.counter += 1
        return f"{self.name}-{self.counter}"


@dataclass
class ModelChannel:
    max_jobs: int
    in_flight: int = 0
    draining: bool = False
    cooling: bool = False  # cooldowns outlast an example: once cooling, until removed
    failures: int = 0

    @property
    def state(self) -> str:
        return "draining" if self.draining else "cooling" if self.cooling else "active"

    @property
    def free(self) -> int:
        return max(0, self.max_jobs - self.in_flight) if self.state == "active" else 0


async def _host(
    backend: RedisBackend, config: BackendConfig, *, task_status: TaskStatus[Callable[[], None]]
) -> None:
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await backend.open(config, lambda: None, tg)
        task_status.started(stop.set)
        await stop.wait()
        tg.cancel_scope.cancel()  # as a balancer exits: background work first, then close
    with anyio.CancelScope(shield=True):
        await backend.close()


class RedisModel(RuleBasedStateMachine):
    portal: ClassVar[BlockingPortal]
    url: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.namespace = f"model-{uuid.uuid4().hex[:10]}"
        self.redis = redis.Redis.from_url(self.url, decode_responses=True)
        self.limits: dict[str, int] = {CHANNELS[0]: 2, CHANNELS[1]: 1}
        self.channels = {c: ModelChannel(n) for c, n in self.limits.items()}
        self.procs: list[Process] = []
        self.spawned = 0
        self.released: list[str] = []  # ids released (a second release changes nothing)
        self.reclaimed: list[str] = []  # ids of a dead process, reclaimed after expiry
        self.expiries = 0
        self.prev_inf: dict[str, int] = {}
        for mortal in (False, False, True):
            self.procs.append(self.spawn(mortal))

    # -- plumbing ---------------------------------------------------------------------

    def spawn(self, mortal: bool) -> Process:
        self.spawned += 1
        name = f"p{self.spawned}{'m' if mortal else 's'}"
        backend = RedisBackend(self.url, namespace=self.namespace, recovery_grace=0)
        config = BackendConfig(
            owner=name,
            selection=("random", "weighted", "p2c")[self.spawned % 3],  # each script path
            rng=random.Random(self.spawned),
            lease_ttl=MORTAL_TTL if mortal else STABLE_TTL,
            cooldown=COOLDOWN,
            failures_to_cool=FAILURES_TO_COOL,
        )
        done, stop = self.portal.start_task(_host, backend, config)
        proc = Process(name, backend, stop, done, mortal)
        self.call(proc, backend.set_map, dict(self.limits))  # a balancer's first refresh
        return proc

    def call(self, proc: Process, func: Callable[..., Any], *args: Any) -> Any:
        async def bounded() -> Any:
            with anyio.fail_after(10):
                return await func(*args)

        return self.portal.call(bounded)

    def kill(self, proc: Process) -> None:
        self.portal.call(proc.stop)
        proc.done.result(timeout=10)
        self.procs.remove(proc)

    def owner_of(self, lease_id: str) -> Process | None:
        return next((p for p in self.procs if lease_id in p.leases), None)

    def all_leases(self) -> dict[str, str]:
        return {i: c for p in self.procs for i, c in p.leases.items()}

    def forget_if_gone(self, name: str) -> None:
        channel = self.channels[name]
        if channel.draining and channel.in_flight == 0:
            del self.channels[name]

    def keys(self) -> dict[str, str]:
        return {
            n: f"{{{self.namespace}}}:{n}"
            for n in ("max", "inf", "drain", "free", "tok", "lch", "cool", "fail")
        }

    # -- rules --------------------------------------------------------------------------

    @rule(who=st.integers(0, 2), channel=channel_or_none)
    def acquire(self, who: int, channel: str | None) -> None:
        """A grant exactly when the model has a free slot the request can use."""
        proc = self.procs[who % len(self.procs)]
        lease_id = proc.next_id()
        got = self.call(proc, proc.backend.try_acquire, lease_id, channel)
        free = {c for c, m in self.channels.items() if m.free > 0}
        usable = free if channel is None else free & {channel}
        if not usable:
            assert got is None, (got, channel, self.channels)
            return
        assert got in usable, (got, usable)
        self.channels[got].in_flight += 1
        proc.leases[lease_id] = got

    @rule(who=st.integers(0, 2), channel=channel_or_none)
    def fill(self, who: int, channel: str | None) -> None:
        """Acquire until the request's channels are full."""
        for _ in range(8):
            self.acquire(who, channel)

    # NOTE: no precondition may depend on which channel Redis picked (server-side
    # randomness): hypothesis needs the same draws to replay a case. Rules that
    # find nothing to do return instead.
    @rule(
        index=st.integers(0, 100),
        by=st.integers(-1, 2),
        outcome=st.sampled_from(("ok", "ok", "failed", "throttled")),
    )
    def release(self, index: int, by: int, outcome: str) -> None:
        """A release, by the owner (by=-1) or by id from any process, frees the slot."""
        live = sorted(self.all_leases().items())
        if not live:
            return
        lease_id, name = live[index % len(live)]
        owner = self.owner_of(lease_id)
        assert owner is not None
        proc = owner if by < 0 else self.procs[by % len(self.procs)]
        result = self.call(proc, proc.backend.release, lease_id, outcome)
        assert result.status == "released", result
        assert result.channel == name
        del owner.leases[lease_id]
        self.released.append(lease_id)
        channel = self.channels[name]
        channel.in_flight -= 1
        was_cooling = channel.cooling
        if outcome == "ok":
            channel.failures = 0
        else:
            channel.failures += 1
            if outcome == "throttled" or channel.failures >= FAILURES_TO_COOL:
                channel.cooling, channel.failures = True, 0
        self.forget_if_gone(name)
        newly = channel.cooling and not was_cooling and name in self.channels
        assert result.cooled == newly, (result, channel)
        assert result.removed == (name not in self.channels), (result, self.channels)

    @rule(index=st.integers(0, 100), by=st.integers(0, 2))
    def release_again(self, index: int, by: int) -> None:
        """Releasing a released or reclaimed lease changes nothing."""
        gone = self.released + self.reclaimed
        if not gone:
            return
        lease_id = gone[index % len(gone)]
        proc = self.procs[by % len(self.procs)]
        result = self.call(proc, proc.backend.release, lease_id, "failed")
        expected = "lost" if lease_id in self.reclaimed else "unknown"
        assert result.status == expected, (lease_id, result)

    @rule(limits=limits_strategy, senders=st.integers(1, 3))
    def change_map(self, limits: dict[str, int], senders: int) -> None:
        """A new map, sent by one or more processes: adds, drains, resizes."""
        self.limits = dict(limits)
        for proc in self.procs[:senders]:
            self.call(proc, proc.backend.set_map, dict(limits))
        for name in list(self.channels):
            if name not in limits:
                self.channels[name].draining = True
                self.forget_if_gone(name)
        for name, max_jobs in limits.items():
            channel = self.channels.setdefault(name, ModelChannel(max_jobs))
            channel.max_jobs = max_jobs
            channel.draining = False

    @precondition(lambda self: self.expiries < 1)  # each costs lease_ttl of waiting
    @rule()
    def expire(self) -> None:
        """The mortal process dies holding its leases; after lease_ttl they are reclaimed."""
        mortal = next(p for p in self.procs if p.mortal)
        self.kill(mortal)
        self.expiries += 1
        self.portal.call(anyio.sleep, MORTAL_TTL + 0.05)
        survivor = self.procs[0]
        result = self.call(survivor, survivor.backend.renew)  # any script reclaims
        assert not result.lost, result
        for lease_id, name in mortal.leases.items():
            self.channels[name].in_flight -= 1
            self.reclaimed.append(lease_id)
            self.forget_if_gone(name)
        self.procs.append(self.spawn(mortal=True))

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def renew_the_living(self) -> None:
        """Every live process renews (the balancer does it in the background); nothing lost."""
        for proc in self.procs:
            result = self.call(proc, proc.backend.renew)
            assert not result.lost, (proc.name, result)
            for lease_id in result.released:  # released by id elsewhere
                assert lease_id not in proc.leases
            # Its view, as of this round trip, is the cluster's.
            seen = {c: (v.max_jobs, v.in_flight, v.state) for c, v in proc.backend.counts().items()}
            assert seen == {c: (m.max_jobs, m.in_flight, m.state) for c, m in self.channels.items()}

    @invariant()
    def redis_matches_model(self) -> None:
        k = self.keys()
        with self.redis.pipeline(transaction=True) as pipe:
            for name in ("max", "inf", "lch", "fail"):
                pipe.hgetall(k[name])
            for name in ("drain", "free", "tok"):
                pipe.smembers(k[name])
            pipe.zrange(k["cool"], 0, -1)
            maxes, infs, lch, fails, drain, free, tok, cool = pipe.execute()
        inf = {c: int(v) for c, v in infs.items()}
        limits = {c: int(v) for c, v in maxes.items()}
        model = self.channels
        assert all(v >= 0 for v in inf.values()), inf
        assert {c: v for c, v in inf.items() if v} == {
            c: m.in_flight for c, m in model.items() if m.in_flight
        }, (inf, model)
        assert set(limits) == set(model), (limits, model)
        assert limits == {c: m.max_jobs for c, m in model.items()}
        assert set(drain) == {c for c, m in model.items() if m.draining}
        assert set(cool) == {c for c, m in model.items() if m.cooling}
        assert {c: int(v) for c, v in fails.items() if int(v)} == {
            c: m.failures for c, m in model.items() if m.failures
        }
        assert lch == self.all_leases()
        per_channel: dict[str, int] = {}
        for channel in lch.values():
            per_channel[channel] = per_channel.get(channel, 0) + 1
        assert per_channel == {c: v for c, v in inf.items() if v}
        for c, n in inf.items():  # over the limit only after a lowering, and never growing
            if n > limits.get(c, 0):
                assert n <= self.prev_inf.get(c, 0), (c, n, limits)
        self.prev_inf = dict(inf)
        active = {c: m for c, m in model.items() if m.state == "active"}
        assert set(free) == {c for c, m in active.items() if m.free > 0}
        expected_tok = {
            f"{c}\0{i}" for c, m in active.items() for i in range(m.in_flight + 1, m.max_jobs + 1)
        }
        assert set(tok) == expected_tok, (tok, model)

    def teardown(self) -> None:
        try:
            for proc in list(self.procs):
                for lease_id in list(proc.leases):
                    result = self.call(proc, proc.backend.release, lease_id, "ok")
                    assert result.status == "released"
                    name = proc.leases.pop(lease_id)
                    self.channels[name].in_flight -= 1
                    self.channels[name].failures = 0  # an "ok" ends the streak
                    self.forget_if_gone(name)
            self.redis_matches_model()
            k = self.keys()
            assert all(int(v) == 0 for v in self.redis.hgetall(k["inf"]).values())
            assert not self.redis.smembers(k["drain"])
            assert not self.redis.hgetall(k["lch"])
            assert set(self.redis.hgetall(k["max"])) == set(self.limits)
        finally:
            for proc in list(self.procs):
                self.kill(proc)
            for key in self.redis.scan_iter(match=f"{{{self.namespace}}}:*"):
                self.redis.delete(key)
            self.redis.close()


@pytest.fixture(params=["asyncio", "trio"])
def portal(request: pytest.FixtureRequest) -> Iterator[BlockingPortal]:
    with start_blocking_portal(request.param) as portal:
        yield portal


class TestRedisModel:
    def test_redis_backend_matches_model(self, portal: BlockingPortal, redis_url: str) -> None:
        """Random multi-process acquire/release/expire/map-change steps agree with the model."""
        machine = type("RedisModelOnPortal", (RedisModel,), {"portal": portal, "url": redis_url})
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=25 * FACTOR,
                stateful_step_count=25,
                deadline=None,
                derandomize=not _LONG,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )


class TestRegressions:
    """Bugs this suite found, each fixed; these keep them fixed."""

    async def test_an_empty_map_is_not_published_to_the_fleet(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        """
        A process whose map becomes empty stops granting, but does not drain the
        fleet's channels: the empty map is not published (a webhook handler with
        no accounts must not stop every worker). Regression: the digest of an
        empty map was sent as "no map" by accident; the rule is now explicit.
        """
        from balancer import Balancer, NoAccountsError, StaticAccountSource

        source = StaticAccountSource({"c1": {"discord": "t", "maxJobs": 2}})
        backend = RedisBackend(redis_url, namespace=redis_namespace)
        async with Balancer(source, backend=backend, ttl=3600) as lb:
            lease = await lb.acquire(timeout=1)
            source.set({})
            await lb.refresh()
            with pytest.raises(NoAccountsError):
                await lb.acquire(timeout=0)
            await lb.release(lease)
            with redis.Redis.from_url(redis_url, decode_responses=True) as client:
                assert client.hgetall(f"{{{redis_namespace}}}:max") == {"c1": "2"}

    async def test_maps_with_colliding_flat_forms_are_both_applied(
        self, redis_url: str, redis_namespace: str
    ) -> None:
        async with anyio.create_task_group() as tg:
            backend = RedisBackend(redis_url, namespace=redis_namespace)
            config = BackendConfig("p", "random", random.Random(0), 5.0, 30.0, 5)
            await backend.open(config, lambda: None, tg)
            try:
                await backend.set_map({"a": 1, "b": 2})
                await backend.set_map({"a\t1\nb": 2})
                counts = dict(backend.counts())
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await backend.close()
        assert set(counts) == {"a\t1\nb"}  # a and b, idle, are removed at once

    async def test_a_large_max_jobs_does_not_block_redis(
        self, private_redis: RedisServer, redis_namespace: str
    ) -> None:
        """maxJobs=300000 (a typo upstream) must not stall the fleet's Redis; 10**9 would hang it."""
        async with anyio.create_task_group() as tg:
            backend = RedisBackend(private_redis.url, namespace=redis_namespace, timeout=10)
            config = BackendConfig("p", "random", random.Random(0), 5.0, 30.0, 5)
            await backend.open(config, lambda: None, tg)
            try:
                started = anyio.current_time()
                await backend.set_map({"c1": 300_000})
                took = anyio.current_time() - started
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await backend.close()
        assert took < 0.25, f"set_map blocked Redis for {took:.2f}s"

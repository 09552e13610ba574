"""
``balancer demo --redis``: several worker processes share one Redis.

The parent starts the fake useapi server (and, without a URL, a throwaway
``redis-server``), then spawns worker processes, each with its own
:class:`~balancer.Balancer` on a :class:`~balancer.backends.redis.RedisBackend`
sharing one namespace. Every job reports to Redis itself, from inside its
lease: an atomic script increments the channel's running count and raises its
peak, so the peak is fleet-wide and measured independently of the balancer.
The parent draws the live view from those keys, and after the run enters a
balancer of its own on the namespace to check that no slot is still held.

Observer keys, under the namespace's hash tag ``{ns}``::

    {ns}:obs:run      hash  channel -> jobs running now (fleet-wide)
    {ns}:obs:peak     hash  channel -> highest value {ns}:obs:run ever had
    {ns}:obs:wait     hash  channel (or "*" unpinned) -> workers waiting
    {ns}:obs:ok / :failed / :throttled   hash  channel -> finished jobs
    {ns}:obs:cool:<channel>   string with the cooldown as expiry ("cooling")
    {ns}:obs:timeouts  counter; {ns}:obs:waits  list of wait times (s)
    {ns}:obs:ready    list, one item per worker process that entered its balancer
    {ns}:obs:go       list, the run's end (unix time), one item per process
    {ns}:obs:end      hash  process index -> when its last job ended (unix time)
"""

from __future__ import annotations

import multiprocessing
import random
import sys
import time
import uuid
from dataclasses import dataclass
from queue import Empty
from typing import TYPE_CHECKING

import anyio

from ...accounts import Secret
from ...balancer import Balancer
from ...sources import UseapiAccountSource
from ..console import error
from ..logs import configure_logging
from .model import ChannelRow, DemoConfig, RunResult, Snapshot, demo_upstream
from .view import Presenter
from .worker import run_worker

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing import Queue

    from redis import Redis
    from redis.asyncio import Redis as AsyncRedis

    from ...testing import FakeUseapi

__all__ = ["FleetError", "run_fleet", "worker_main"]

#: KEYS[1] running hash, KEYS[2] peak hash; ARGV[1] channel. Returns the running count.
_ENTER = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local peak = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if n > peak then redis.call('HSET', KEYS[2], ARGV[1], n) end
return n
"""
_OUTCOMES = ("ok", "failed", "throttled")
FRAME_S = 0.1
READY_TIMEOUT_S = 30.0


class FleetError(Exception):
    """The fleet could not be started or a worker process failed."""


def _key(namespace: str, name: str) -> str:
    return f"{{{namespace}}}:obs:{name}"


@dataclass(frozen=True, slots=True)
class FleetJob:
    """What one worker process needs (pickled to it)."""

    config: DemoConfig
    index: int
    workers: int
    redis_url: Secret
    namespace: str
    base_url: str
    token: Secret
    log_level: str


class RedisObserver:
    """An :class:`~balancer.cli.demo.worker.Observer` that counts in Redis, fleet-wide."""

    def __init__(self, client: AsyncRedis, namespace: str, cooldown: float) -> None:
        self._client = client
        self._ns = namespace
        self._cooldown_ms = max(1, int(cooldown * 1000))
        self._enter = client.register_script(_ENTER)
        self.waits: list[float] = []

    async def waiting(self, channel: str | None, delta: int) -> None:
        await self._client.hincrby(_key(self._ns, "wait"), channel or "*", delta)

    async def started(self, channel: str, waited: float) -> None:
        await self._enter(keys=[_key(self._ns, "run"), _key(self._ns, "peak")], args=[channel])
        self.waits.append(waited)

    async def finished(self, channel: str, outcome: str) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.hincrby(_key(self._ns, "run"), channel, -1)
        if outcome in _OUTCOMES:
            pipe.hincrby(_key(self._ns, outcome), channel, 1)
        if outcome == "throttled":
            pipe.set(_key(self._ns, f"cool:{channel}"), 1, px=self._cooldown_ms)
        await pipe.execute()

    async def timed_out(self) -> None:
        await self._client.incr(_key(self._ns, "timeouts"))

    async def flush(self) -> None:
        if self.waits:
            await self._client.rpush(_key(self._ns, "waits"), *(f"{w:.6f}" for w in self.waits))


# -- a worker process --------------------------------------------------------


def worker_main(job: FleetJob, log_queue: Queue[str]) -> None:
    """Entry point of a worker process; its log lines go to the parent through ``log_queue``."""
    configure_logging(job.log_level, sink=log_queue.put)
    try:
        anyio.run(_worker, job)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports it
        sys.exit(130)


async def _worker(job: FleetJob) -> None:
    import redis.asyncio

    from ...backends.redis import RedisBackend

    client = redis.asyncio.Redis.from_url(job.redis_url.reveal())
    observer = RedisObserver(client, job.namespace, job.config.cooldown)
    seed = None if job.config.seed is None else job.config.seed * 1000 + job.index
    rng = random.Random(seed)
    try:
        source = UseapiAccountSource(job.token.reveal(), base_url=job.base_url)
        backend = RedisBackend(job.redis_url.reveal(), namespace=job.namespace)
        async with Balancer(source, backend=backend, seed=seed, cooldown=job.config.cooldown) as lb:
            await client.rpush(_key(job.namespace, "ready"), job.index)
            got = await client.blpop([_key(job.namespace, "go")], timeout=READY_TIMEOUT_S)
            if got is None:
                return
            stop_at = float(got[1])
            async with anyio.create_task_group() as tg:
                for _ in range(job.workers):
                    worker_rng = random.Random(rng.getrandbits(64))
                    tg.start_soon(
                        run_worker, lb, observer, job.config, worker_rng, stop_at, time.time
                    )
            await client.hset(_key(job.namespace, "end"), str(job.index), repr(time.time()))
        await observer.flush()
    finally:
        await client.aclose()


# -- the parent --------------------------------------------------------------


def run_fleet(
    config: DemoConfig, redis_url: str | None, *, live: bool, log_level: str
) -> RunResult:
    """Run the fleet demo, drawing it as it goes; return what the report showed."""
    try:
        import redis
    except ImportError:
        raise FleetError("--redis needs the redis extra: pip install 'balancer[redis]'") from None
    from ...testing.redis_server import RedisServer

    server = None
    if not redis_url:
        try:
            server = RedisServer().start()
        except RuntimeError as exc:
            raise FleetError(str(exc)) from None
        redis_url = server.url
    try:
        client = redis.Redis.from_url(redis_url)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise FleetError(f"cannot reach Redis: {type(exc).__name__}") from None
        try:
            return _run_fleet(config, client, redis_url, live=live, log_level=log_level)
        finally:
            client.close()
    finally:
        if server is not None:
            server.stop()


def _run_fleet(
    config: DemoConfig, client: Redis, redis_url: str, *, live: bool, log_level: str
) -> RunResult:
    upstream, limits = demo_upstream(config)
    with upstream as fake:
        fleet = _Fleet(config, client, redis_url, fake, log_level)
        title = (
            f"balancer demo --redis · {len(fleet.procs)} processes × ~{fleet.shares[0]} "
            f"workers · {config.channels} channels"
        )
        try:
            with Presenter(live=live, title=title) as presenter:
                fleet.start(lambda: presenter.update(fleet.snapshot(limits, 0.0)))
                started = time.monotonic()
                while fleet.running():
                    presenter.update(fleet.snapshot(limits, time.monotonic() - started))
                    time.sleep(FRAME_S)
                result = fleet.result(limits)
                presenter.update(result.final, final=True)
                presenter.report(result)
            return result
        finally:
            fleet.stop()


class _Fleet:
    """The worker processes of one run, and what they wrote to Redis."""

    def __init__(
        self, config: DemoConfig, client: Redis, redis_url: str, fake: FakeUseapi, log_level: str
    ) -> None:
        self.config = config
        self.client = client
        self.redis_url = redis_url
        self.fake = fake
        self.namespace = f"balancer-demo-{uuid.uuid4().hex[:8]}"
        total = config.worker_count
        n_procs = max(1, min(config.processes, total))
        self.shares = [total // n_procs + (i < total % n_procs) for i in range(n_procs)]
        context = multiprocessing.get_context("spawn")
        self.logs: Queue[str] = context.Queue()
        self.procs = [
            context.Process(
                target=worker_main,
                args=(self._job(i, share, log_level), self.logs),
                name=f"balancer-demo-{i}",
            )
            for i, share in enumerate(self.shares)
        ]
        self.started_wall = 0.0

    def _job(self, index: int, workers: int, log_level: str) -> FleetJob:
        return FleetJob(
            self.config, index, workers, Secret(self.redis_url), self.namespace,
            self.fake.base_url, Secret(self.fake.token), log_level,
        )  # fmt: skip

    def start(self, tick: Callable[[], None]) -> None:
        """Start the processes, wait until each entered its balancer, then say go."""
        for proc in self.procs:
            proc.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.client.llen(_key(self.namespace, "ready")) < len(self.procs):
            self.relay_logs()
            if time.monotonic() > deadline:
                raise FleetError("worker processes did not start in time")
            if not all(proc.is_alive() for proc in self.procs):
                raise FleetError("a worker process exited during start-up (see its log above)")
            tick()
            time.sleep(FRAME_S)
        self.started_wall = time.time()
        stop_at = self.started_wall + self.config.duration
        self.client.rpush(_key(self.namespace, "go"), *[stop_at] * len(self.procs))

    def running(self) -> bool:
        self.relay_logs()
        return any(proc.is_alive() for proc in self.procs)

    def relay_logs(self) -> None:
        """Write the worker processes' log lines to our stderr (above the live view)."""
        while True:
            try:
                line = self.logs.get_nowait()
            except Empty:
                return
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def snapshot(self, limits: dict[str, int], elapsed: float) -> Snapshot:
        return _snapshot(self.client, self.namespace, limits, elapsed, self.config, len(self.procs))

    def result(self, limits: dict[str, int]) -> RunResult:
        """Once every process ended: the report's figures, and the fleet-wide leak check."""
        self.relay_logs()
        failed = [proc.name for proc in self.procs if proc.exitcode != 0]
        if failed:
            raise FleetError(f"worker process(es) failed: {', '.join(failed)}")
        ends: dict[bytes, bytes] = self.client.hgetall(_key(self.namespace, "end"))  # type: ignore[assignment]
        elapsed = max((float(end) for end in ends.values()), default=self.started_wall)
        waits: list[bytes] = self.client.lrange(_key(self.namespace, "waits"), 0, -1)  # type: ignore[assignment]
        return RunResult(
            final=self.snapshot(limits, elapsed - self.started_wall),
            waits=[float(w) for w in waits],
            elapsed=elapsed - self.started_wall,
            seed=self.config.seed,
            mode=f"Redis, shared by {len(self.procs)} worker processes",
            leaked=anyio.run(_fleet_in_flight, self.fake, self.redis_url, self.namespace),
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.pid is None:
                continue  # never started
            if not self.started_wall:
                proc.terminate()  # start-up failed: do not wait for a "go" that never comes
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.relay_logs()
        _delete_namespace(self.client, self.namespace)


def _int_map(client: Redis, namespace: str, name: str) -> dict[str, int]:
    raw: dict[bytes, bytes] = client.hgetall(_key(namespace, name))  # type: ignore[assignment]
    return {key.decode(): int(value) for key, value in raw.items()}


def _snapshot(
    client: Redis,
    namespace: str,
    limits: dict[str, int],
    elapsed: float,
    config: DemoConfig,
    processes: int,
) -> Snapshot:
    running, peak, wait = (_int_map(client, namespace, n) for n in ("run", "peak", "wait"))
    outcomes = {name: _int_map(client, namespace, name) for name in _OUTCOMES}
    cooling = client.mget([_key(namespace, f"cool:{channel}") for channel in limits])
    rows = [
        ChannelRow(
            channel=channel,
            max_jobs=limit,
            in_flight=running.get(channel, 0),
            peak=peak.get(channel, 0),
            waiting=wait.get(channel, 0),
            ok=outcomes["ok"].get(channel, 0),
            failed=outcomes["failed"].get(channel, 0),
            throttled=outcomes["throttled"].get(channel, 0),
            state="cooling" if cool is not None else "active",
        )
        for (channel, limit), cool in zip(limits.items(), cooling, strict=True)
    ]
    timeouts = int(client.get(_key(namespace, "timeouts")) or 0)
    return Snapshot(
        rows,
        elapsed,
        config.duration,
        sum(wait.values()),
        config.worker_count,
        processes=processes,
        timeouts=timeouts,
    )


async def _fleet_in_flight(fake: FakeUseapi, redis_url: str, namespace: str) -> int:
    """Slots still held fleet-wide, as a fresh balancer on the namespace sees them."""
    from ...backends.redis import RedisBackend

    backend = RedisBackend(redis_url, namespace=namespace)
    async with Balancer(fake.source(), backend=backend) as lb:
        return lb.statistics().in_flight


def _delete_namespace(client: Redis, namespace: str) -> None:
    """Best effort: leave a Redis that was passed in as we found it."""
    from redis import RedisError

    try:
        keys = list(client.scan_iter(match=f"{{{namespace}}}:*", count=500))
        if keys:
            client.delete(*keys)
    except RedisError as exc:
        error(f"could not clean up namespace {namespace}: {exc}")

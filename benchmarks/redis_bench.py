"""
Redis scenarios: ``RedisBackend`` against the one-round-trip floor and a
Redis semaphore library, on a throwaway ``redis-server``.

* The floor: one ``EVALSHA`` of a trivial three-command Lua script (``TIME``,
  ``INCR``, ``GET``) is the cheapest atomic server-side step a client can
  make; an acquire+release is two steps, so its floor is two such round trips
  through the same client library the backend uses (redis-py's asyncio client
  on asyncio, coredis on trio).
* The library: ``py-redis-semaphore`` (PyPI), one counting semaphore per
  channel (``limit=maxJobs``), a channel picked at random per job -- what a
  user reaching for a single-key primitive would build. asyncio only.
* Flatness: the balancer's acquire+release at 10,000 channels against 10.

A missing piece (no ``balancer.backends.redis`` yet, no ``redis-server``, no
``py-redis-semaphore``) turns its rows into "not available" with the reason;
the rest still runs.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import random
import uuid
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from balancer import Balancer, StaticAccountSource
from balancer.testing import make_accounts

from .harness import Batch, Samples, Settings, acquire_release, clock, interleave, ratio_of
from .redis_floor import FLOOR_SOURCE, TRIVIAL

if TYPE_CHECKING:
    from .report import Report

__all__ = ["scenario_redis"]

SECTION = "redis"
MAX_JOBS = 3
COUNTS_FULL = (10, 100, 1_000, 10_000)
COUNTS_QUICK = (10, 10_000)

FLOOR = "2× EVALSHA floor"
#: RedisBackend's default round-trip timeout, given to the floor's client too.
BACKEND_TIMEOUT = 5.0
SEMAPHORE = "py-redis-semaphore"

_server: Any = None


def _redis_url() -> str:
    """Start (once per process) a throwaway redis-server; return its URL."""
    global _server
    if _server is None:
        from balancer.testing import RedisServer

        _server = RedisServer().start()
        atexit.register(_server.stop)
    url: str = _server.url
    return url


# -- the floor ---------------------------------------------------------------------


async def _floor_client(loop: str, url: str, stack: AsyncExitStack) -> tuple[Any, Batch]:
    """A client of the backend's library on this loop, and the two-EVALSHA batch."""
    key = f"bench-floor-{uuid.uuid4().hex[:8]}"
    source = FLOOR_SOURCE
    if loop == "asyncio":
        import redis.asyncio

        # Configured as RedisBackend configures its own client (a socket timeout).
        client: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=BACKEND_TIMEOUT, socket_connect_timeout=2.0
        )
        stack.push_async_callback(client.aclose)
        sha = await client.script_load(source)

        async def step() -> Any:
            return await client.evalsha(sha, 1, key)

    else:
        import coredis

        client = await stack.enter_async_context(
            coredis.Redis.from_url(url, stream_timeout=BACKEND_TIMEOUT)
        )
        sha = await client.script_load(source)

        async def step() -> Any:
            return await client.evalsha(sha, keys=[key])

    async def run(n: int) -> float:
        start = clock()
        for _ in range(n):
            await step()
            await step()
        return clock() - start

    return client, run


# -- py-redis-semaphore, one key per channel -----------------------------------------


def _semaphore_batch(client: Any, channels: int, namespace: str, seed: int) -> Batch:
    from redis_semaphore import Semaphore, SemaphoreConfig

    sems = [
        Semaphore(
            client,
            # blpop_timeout below the socket timeout, or it warns (it never blocks here).
            SemaphoreConfig(name=f"ch{i}", limit=MAX_JOBS, namespace=namespace, blpop_timeout=1.0),
        )
        for i in range(channels)
    ]
    rng = random.Random(seed)

    async def run(n: int) -> float:
        start = clock()
        for _ in range(n):
            # A user of one semaphore per channel tries a random channel, and
            # another if it is full (never here: nothing else holds a slot).
            while True:
                sem = sems[int(rng.random() * channels)]
                if (await sem.aacquire(blocking=False)).success:
                    break
            await sem.arelease()
        return clock() - start

    return run


# -- where the gap goes: the balancer's round trips taken apart ---------------------

#: The steps from the floor to the balancer, each adding one layer.
STEPS = (
    (FLOOR, "floor"),
    ("step: + the backend's 12 keys and 8 args", "the trivial script sent with the real keys/args"),
    ("step: + the real Lua scripts", "ACQUIRE + RELEASE through the backend's client"),
    ("step: + RedisBackend", "backend.try_acquire() + backend.release()"),
    ("balancer @10", "Balancer: `async with lb.acquire()`"),
)


def _decomposition(lb: Balancer) -> dict[str, Batch]:
    """
    Batches that rebuild an acquire+release layer by layer (floor -> real
    arguments -> real Lua -> RedisBackend -> Balancer), so each layer's share of
    the gap is a ratio of its own. They reach into RedisBackend's internals
    (``_client``, ``_keys``, ``_common``, ``_epoch``): when those change, the
    rows are skipped.
    """
    try:
        from balancer.backends.redis import scripts

        backend: Any = lb._backend
        client, keys = backend._client, list(backend._keys)
        backend._common(backend._epoch)
        acquire_script, release_script = scripts.ACQUIRE, scripts.RELEASE
    except Exception:  # noqa: BLE001 - internals moved: no decomposition
        return {}
    counter = [f"bench-counter-{uuid.uuid4().hex[:8]}", *keys[1:]]
    new_id = lb._book.new_id

    def acquire_args(lease_id: str) -> list[Any]:
        return [*backend._common(backend._epoch), lease_id, "", "random", 60_000]

    def release_args(lease_id: str) -> list[Any]:
        return [*backend._common(backend._epoch), lease_id, "ok", 30_000, 5]

    async def real_args(n: int) -> float:
        start = clock()
        for _ in range(n):
            await client.run(TRIVIAL, counter, acquire_args("x"))
            await client.run(TRIVIAL, counter, release_args("x"))
        return clock() - start

    async def real_lua(n: int) -> float:
        start = clock()
        for _ in range(n):
            lease_id = new_id()
            await client.run(acquire_script, keys, acquire_args(lease_id))
            await client.run(release_script, keys, release_args(lease_id))
        return clock() - start

    async def real_backend(n: int) -> float:
        start = clock()
        for _ in range(n):
            lease_id = new_id()
            await backend.try_acquire(lease_id, None)
            await backend.release(lease_id, "ok")
        return clock() - start

    return {STEPS[1][0]: real_args, STEPS[2][0]: real_lua, STEPS[3][0]: real_backend}


def _report_steps(samples: Samples, loop: str, report: Report) -> None:
    if not all(name in samples.per_op for name, _ in STEPS):
        return
    for (before, _), (after, what) in itertools.pairwise(STEPS):
        report.info(
            f"… gap, layer by layer: {what}",
            loop,
            samples.ratio(after, before),
            note=f"vs the layer below; {samples.ratio(after, FLOOR)} the floor in all",
            section=SECTION,
        )


# -- server-side time (INFO commandstats) --------------------------------------------


async def _server_side(
    url: str, batches: dict[str, Batch], ops: int, reps: int
) -> dict[str, list[float]]:
    """
    Server CPU microseconds spent in EVALSHA per operation of each batch, by
    Redis's own ``INFO commandstats`` (reset before each phase; phases alternate).
    Unlike wall time, this hardly moves with the load on the client side.
    """
    import redis

    admin = redis.Redis.from_url(url)
    per_op: dict[str, list[float]] = {name: [] for name in batches}
    try:
        for _ in range(reps):
            for name, batch in batches.items():
                admin.config_resetstat()
                await batch(ops)
                stats = admin.info("commandstats").get("cmdstat_evalsha", {})
                per_op[name].append(float(stats.get("usec", 0)) / ops)
    finally:
        admin.close()
    return per_op


# -- the scenario ----------------------------------------------------------------------


async def scenario_redis(loop: str, settings: Settings, report: Report) -> None:
    """Redis rows: see the module docstring."""
    # A round trip costs ~100x an in-process acquire: bigger batches, more rounds.
    settings = dataclasses.replace(
        settings,
        batch_s=0.04 if settings.quick else 0.15,
        rounds=settings.rounds if settings.quick else 15,
    )
    counts = COUNTS_QUICK if settings.quick else COUNTS_FULL
    top = counts[-1]
    t_floor = "≤ 1.2×"
    rows = (
        ("Redis acquire+release vs two EVALSHA floor round trips", t_floor),
        (f"Redis cost at {top:,} channels vs at 10", t_floor),
    )
    try:
        url = _redis_url()
    except Exception as exc:  # noqa: BLE001 - any failure: say why, go on
        for scenario, target in rows:
            report.unavailable(scenario, loop, target, f"no redis-server: {_why(exc)}")
        return
    try:
        from balancer.backends.redis import RedisBackend
    except Exception as exc:  # noqa: BLE001
        backend_error: str | None = f"balancer.backends.redis: {_why(exc)}"
    else:
        backend_error = None

    run_id = uuid.uuid4().hex[:8]
    async with AsyncExitStack() as stack:
        client, floor = await _floor_client(loop, url, stack)
        variants: dict[str, Batch] = {FLOOR: floor}

        semaphore_error: str | None = None
        if loop != "asyncio":
            semaphore_error = "py-redis-semaphore has an asyncio API only"
        else:
            try:
                variants[SEMAPHORE] = _semaphore_batch(
                    client, 10, f"bench-sem-{run_id}", settings.seed
                )
            except ImportError as exc:
                semaphore_error = f"pip install py-redis-semaphore ({_why(exc)})"

        if backend_error is None:
            for n in counts:
                backend = RedisBackend(url, namespace=f"bench-{run_id}-{n}")
                source = StaticAccountSource(make_accounts(n, max_jobs=MAX_JOBS, seed=n))
                try:
                    lb = await stack.enter_async_context(
                        Balancer(source, backend=backend, seed=settings.seed)
                    )
                except Exception as exc:  # noqa: BLE001
                    backend_error = f"RedisBackend failed to start: {_why(exc)}"
                    break
                variants[f"balancer @{n}"] = acquire_release(lb)
                if n == 10 and not settings.quick:
                    variants.update(_decomposition(lb))
        if backend_error is not None:
            variants = {k: v for k, v in variants.items() if not k.startswith("balancer")}

        server: dict[str, list[float]] = {}
        try:
            samples: Samples | None = await interleave(variants, settings, max_n=20_000)
            if backend_error is None:
                server = await _server_side(
                    url,
                    {FLOOR: floor, "balancer @10": variants["balancer @10"]},
                    ops=100 if settings.quick else 400,
                    reps=1 if settings.quick else 3,
                )
        except Exception as exc:  # noqa: BLE001
            samples = None
            backend_error = backend_error or f"failed while measuring: {_why(exc)}"

    if samples is None or backend_error is not None:
        for scenario, target in rows:
            report.unavailable(scenario, loop, target, backend_error or "")
    else:
        report.target(
            rows[0][0],
            loop,
            samples.ratio("balancer @10", FLOOR),
            1.2,
            note="10 channels; `async with lb.acquire()` = one acquire + one release script",
            section=SECTION,
        )
        report.target(
            rows[1][0],
            loop,
            samples.ratio(f"balancer @{top}", "balancer @10"),
            1.2,
            note="uncontended acquire+release",
            section=SECTION,
        )
        if server and all(server[FLOOR]):
            pairs = zip(server["balancer @10"], server[FLOOR], strict=True)
            report.info(
                "… server-side EVALSHA time, balancer acquire+release vs floor",
                loop,
                ratio_of([a / b for a, b in pairs]),
                note="Redis `INFO commandstats` (server CPU µs inside the scripts), "
                "not wall time: how much of the gap is Lua work",
                section=SECTION,
            )
        _report_steps(samples, loop, report)
        lines: dict[str, list[float]] = {
            "balancer": [samples.ratio(f"balancer @{n}", FLOOR).median for n in counts],
            "floor semaphore (2× EVALSHA)": [1.0] * len(counts),
        }
        if SEMAPHORE in variants:
            semaphore = samples.ratio(SEMAPHORE, FLOOR).median
            lines["py-redis-semaphore (10 keys)"] = [semaphore] * len(counts)
        report.series[f"redis/{loop}"] = {
            "x": list(counts),
            "xlabel": "channels (maxJobs 3 each)",
            "ylabel": "cost per acquire+release (× two EVALSHA round trips, same run)",
            "title": f"Redis: acquire+release vs channel count ({loop})",
            "lines": lines,
        }
    if samples is not None and SEMAPHORE in variants:
        note = "one semaphore per channel, random channel; acquire + release + waiter notify"
        report.info(
            "py-redis-semaphore (one key per channel) vs two EVALSHA floor round trips",
            loop,
            samples.ratio(SEMAPHORE, FLOOR),
            note=note,
            section=SECTION,
        )
        if backend_error is None:
            report.info(
                "Redis balancer vs py-redis-semaphore",
                loop,
                samples.ratio("balancer @10", SEMAPHORE),
                section=SECTION,
            )
    elif semaphore_error:
        report.unavailable(
            "py-redis-semaphore (one key per channel) vs floor", loop, "info", semaphore_error
        )


def _why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 160 else text[:157] + "…"

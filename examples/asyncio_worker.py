"""
An asyncio worker: many tasks share one Balancer, each job runs on the channel its lease names.

Run it as is (it starts a fake useapi server on loopback), or against your own
endpoint with USEAPI_BASE_URL and USEAPI_TOKEN set (only the account map is
fetched; the "Discord jobs" below are simulated)::

    python examples/asyncio_worker.py
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from balancer import Balancer, Lease, NoCapacityError, UseapiAccountSource
from balancer.testing import FakeUseapi, make_accounts


class RateLimited(Exception):
    """Discord (through useapi) answered 429."""


@contextmanager
def account_source() -> Iterator[UseapiAccountSource]:
    """Your useapi endpoint when USEAPI_BASE_URL and USEAPI_TOKEN are set, else a fake one."""
    base_url, token = os.environ.get("USEAPI_BASE_URL"), os.environ.get("USEAPI_TOKEN")
    if base_url and token:
        yield UseapiAccountSource(token, base_url=base_url)
        return
    with FakeUseapi(make_accounts(4, max_jobs=[1, 2, 3, 2])) as fake:
        yield fake.source()


async def send_to_discord(lease: Lease, prompt: str) -> str:
    """Stand-in for the real call, which would use lease.channel and the account's token."""
    _token = lease.account.discord.reveal()  # never log or print this
    await asyncio.sleep(random.uniform(0.05, 0.2))
    if random.random() < 0.05:
        raise RateLimited
    return f"{prompt!r} rendered on {lease.channel}"


async def run_job(lb: Balancer, prompt: str, done: Counter[str]) -> None:
    try:
        async with lb.acquire(timeout=30) as lease:
            try:
                await send_to_discord(lease, prompt)
            except RateLimited:
                lease.outcome = "throttled"  # the channel cools down for a while
            done[lease.channel] += 1
    except NoCapacityError:
        print(f"gave up on {prompt!r}: no channel freed up in 30 s")


async def main() -> None:
    # The application, not the library, configures logging: info and up.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    # The application, not the library, configures logging: info and up.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    done: Counter[str] = Counter()
    with account_source() as source:
        # A short cooldown suits a demo; the default (30 s) suits Discord.
        async with Balancer(source, cooldown=0.5) as lb:
            async with asyncio.TaskGroup() as tg:
                for i in range(40):
                    tg.create_task(run_job(lb, f"a red fox #{i}", done))
            stats = lb.statistics()
    print(f"{sum(done.values())} jobs; per channel: {dict(sorted(done.items()))}")
    print(
        f"capacity {stats.capacity}, in flight now {stats.in_flight}, waited out: "
        f"{stats.timeouts_total} timeouts"
    )


if __name__ == "__main__":
    asyncio.run(main())

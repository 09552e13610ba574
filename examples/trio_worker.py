"""
A trio worker: the same Balancer, under trio (a nursery of job tasks).

Run it as is (it starts a fake useapi server on loopback), or with
USEAPI_BASE_URL and USEAPI_TOKEN set::

    python examples/trio_worker.py
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import structlog
import trio

from balancer import Balancer, Lease, UseapiAccountSource
from balancer.testing import FakeUseapi, make_accounts


@contextmanager
def account_source() -> Iterator[UseapiAccountSource]:
    """Your useapi endpoint when USEAPI_BASE_URL and USEAPI_TOKEN are set, else a fake one."""
    base_url, token = os.environ.get("USEAPI_BASE_URL"), os.environ.get("USEAPI_TOKEN")
    if base_url and token:
        yield UseapiAccountSource(token, base_url=base_url)
        return
    with FakeUseapi(make_accounts(3, max_jobs=[1, 2, 3])) as fake:
        yield fake.source()


async def send_to_discord(lease: Lease, prompt: str) -> None:
    """Stand-in for the real call, which would use lease.channel and the account's token."""
    await trio.sleep(random.uniform(0.05, 0.15))


async def main() -> None:
    # The application, not the library, configures logging: info and up.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    # The application, not the library, configures logging: info and up.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    done: Counter[str] = Counter()
    with account_source() as source:
        async with Balancer(source, selection="p2c") as lb:

            async def job(prompt: str) -> None:
                async with lb.acquire(timeout=30) as lease:
                    await send_to_discord(lease, prompt)
                    done[lease.channel] += 1

            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(job, f"a lighthouse #{i}")
            stats = lb.statistics()
    print(f"{sum(done.values())} jobs under trio; per channel: {dict(sorted(done.items()))}")
    print(f"in flight after the run: {stats.in_flight}")


if __name__ == "__main__":
    trio.run(main)

"""
A thread-pool worker: blocking code shares one SyncBalancer from 16 threads.

SyncBalancer runs the balancer on an event loop in one background thread; any
number of threads call it. Run it as is (a fake useapi server on loopback), or
with USEAPI_BASE_URL and USEAPI_TOKEN set::

    python examples/threads_worker.py
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import structlog

from balancer import Lease, SyncBalancer, UseapiAccountSource
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


lock = threading.Lock()
running: Counter[str] = Counter()
peak: Counter[str] = Counter()


def send_to_discord(lease: Lease, prompt: str) -> None:
    """A blocking stand-in for the real call (requests, httpx.Client, ...)."""
    with lock:
        running[lease.channel] += 1
        peak[lease.channel] = max(peak[lease.channel], running[lease.channel])
    time.sleep(random.uniform(0.02, 0.08))
    with lock:
        running[lease.channel] -= 1


def main() -> None:
    # The application, not the library, configures logging: info and up.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    with account_source() as source, SyncBalancer(source) as lb:

        def job(prompt: str) -> str:
            with lb.acquire(timeout=30) as lease:  # blocks this thread only
                send_to_discord(lease, prompt)
                return lease.channel

        with ThreadPoolExecutor(max_workers=16) as pool:
            channels = Counter(pool.map(job, (f"a teapot #{i}" for i in range(80))))
        limits = {name: c.max_jobs for name, c in lb.statistics().channels.items()}
    print(
        f"{sum(channels.values())} jobs from 16 threads; per channel: {dict(sorted(channels.items()))}"
    )
    for channel, limit in sorted(limits.items()):
        print(f"  {channel}: peak {peak[channel]} running at once, maxJobs {limit}")
    assert all(peak[c] <= limit for c, limit in limits.items()), "a limit was exceeded"


if __name__ == "__main__":
    main()

"""
A Celery-style task wrapper, with plain functions (no Celery needed to run it).

Celery and RQ workers run tasks as blocking functions in threads or processes.
Give each worker process one SyncBalancer (opened when the worker starts, as
Celery's ``worker_process_init`` signal would) and wrap tasks with
``@balanced()``: the task receives a lease for a free channel, and a
``RateLimited`` error marks the channel as throttled.

Discord jobs often finish later, through a webhook: ``submit_imagine`` keeps
its slot after it returns and hands back the lease id, and the webhook
handler releases that id when useapi calls back (form 2 of the contract:
``lease = lb.acquire(); lb.release(lease.id)``).

Run it as is (a fake useapi server on loopback), or with USEAPI_BASE_URL and
USEAPI_TOKEN set::

    python examples/celery_style.py
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import structlog

from balancer import Lease, NoCapacityError, SyncBalancer, UseapiAccountSource
from balancer.testing import FakeUseapi, make_accounts

P = ParamSpec("P")
R = TypeVar("R")

_balancer: SyncBalancer | None = None  # one per worker process


class RateLimited(Exception):
    """Discord (through useapi) answered 429."""


class Retry(Exception):
    """What Celery's ``self.retry(countdown=...)`` raises: run the task again later."""

    def __init__(self, countdown: float) -> None:
        super().__init__(f"retry in {countdown:g}s")
        self.countdown = countdown


def worker_process_init(source: UseapiAccountSource) -> SyncBalancer:
    """Open the worker's balancer (Celery: connect this to ``worker_process_init``)."""
    global _balancer
    # A short cooldown suits a demo; the default (30 s) suits Discord.
    _balancer = SyncBalancer(source, cooldown=0.5).open()
    return _balancer


def worker_process_shutdown() -> None:
    global _balancer
    if _balancer is not None:
        _balancer.close()
        _balancer = None


def balanced(*, timeout: float = 30.0) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Run the task holding a lease, passed as its first argument; released on return."""

    def decorate(func: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(func)
        def task(*args: Any, **kwargs: Any) -> R:
            assert _balancer is not None, "worker_process_init() was not called"
            try:
                with _balancer.acquire(timeout=timeout) as lease:
                    try:
                        return func(lease, *args, **kwargs)
                    except RateLimited:
                        lease.outcome = "throttled"  # this channel cools down
                        raise Retry(countdown=1.0) from None
            except NoCapacityError:
                raise Retry(countdown=5.0) from None  # every channel busy: try later

        return task

    return decorate


@balanced(timeout=10)
def describe_image(lease: Lease, url: str) -> str:
    """A synchronous job: done when the task returns, so the slot frees then."""
    time.sleep(random.uniform(0.02, 0.06))
    if random.random() < 0.05:
        raise RateLimited
    return f"{url} described on {lease.channel}"


def submit_imagine(prompt: str) -> str:
    """An asynchronous job: submitted now, finished by a webhook; keeps its slot until then."""
    assert _balancer is not None
    lease = _balancer.acquire(timeout=10)
    # post_to_useapi(lease.channel, lease.account.discord.reveal(), prompt, replyUrl=...)
    return lease.id


def on_webhook(lease_id: str, status: str) -> None:
    """useapi called back: the job finished, so give its slot back."""
    assert _balancer is not None
    _balancer.release(lease_id, outcome="ok" if status == "completed" else "failed")


def run_with_retries(task: Callable[..., R], *args: Any) -> R:
    """What the Celery worker does with Retry (here: sleep, then run again)."""
    while True:
        try:
            return task(*args)
        except Retry as retry:
            time.sleep(min(retry.countdown, 0.2))


@contextmanager
def account_source() -> Iterator[UseapiAccountSource]:
    """Your useapi endpoint when USEAPI_BASE_URL and USEAPI_TOKEN are set, else a fake one."""
    base_url, token = os.environ.get("USEAPI_BASE_URL"), os.environ.get("USEAPI_TOKEN")
    if base_url and token:
        yield UseapiAccountSource(token, base_url=base_url)
        return
    with FakeUseapi(make_accounts(3, max_jobs=[2, 2, 3])) as fake:
        yield fake.source()


def main() -> None:
    # The application, not the library, configures logging: info and up.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    with account_source() as source:
        lb = worker_process_init(source)
        try:
            with ThreadPoolExecutor(max_workers=8) as pool:  # the worker's concurrency
                urls = [f"https://example.com/{i}.png" for i in range(30)]
                results = list(pool.map(lambda u: run_with_retries(describe_image, u), urls))
            print(f"{len(results)} describe tasks done, e.g. {results[0]}")

            ids = [submit_imagine(f"a castle #{i}") for i in range(4)]
            print(f"4 imagine jobs submitted; slots held: {lb.statistics().in_flight}")
            for lease_id in ids:
                on_webhook(lease_id, "completed")
            print(f"webhooks received; slots held: {lb.statistics().in_flight}")
        finally:
            worker_process_shutdown()


if __name__ == "__main__":
    main()

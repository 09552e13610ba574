"""
Helpers shared by the balancer tests and the backend contract suite.

Everything here goes through the public API (``from balancer import ...``), so
it runs unchanged over any backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup

from balancer import Balancer, BalancerError, Lease, StaticAccountSource


def raw(limits: dict[str, int], *, token: str = "tok") -> dict[str, dict[str, Any]]:
    """A raw v1 map with the given channels and limits."""
    return {
        channel: {"server": "1", "channel": channel, "discord": f"{token}-{channel}", "maxJobs": n}
        for channel, n in limits.items()
    }


class Wakeups:
    """The ``notify`` callback: counts calls and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.calls = 0
        self._event = anyio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self._event.set()

    def arm(self) -> anyio.Event:
        """An event set by the next call."""
        self._event = anyio.Event()
        return self._event


@asynccontextmanager
async def running(
    limits: dict[str, int] | None = None, **kwargs: Any
) -> AsyncIterator[tuple[Balancer, StaticAccountSource]]:
    """A running balancer over a StaticAccountSource with ``limits`` (``backend=`` any)."""
    source = StaticAccountSource(raw(limits if limits is not None else {"a": 1}))
    kwargs.setdefault("ttl", 3600)
    async with Balancer(source, **kwargs) as lb:
        yield lb, source


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - polling a condition nobody signals
            await anyio.sleep(0.005)


async def settle(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """
    Wait until ``predicate`` holds once every task has run as far as it can.

    With the memory backend everything is done once ``wait_all_tasks_blocked()``
    returns, so the predicate holds at once and the poll never runs. A remote
    backend's effects (a round trip in flight, another process's release
    arriving by pub/sub) come later: the poll, bounded by ``timeout``, waits for them.
    """
    with anyio.fail_after(timeout):
        await anyio.wait_all_tasks_blocked()
    await eventually(predicate, timeout)


def channel_state(lb: Balancer, channel: str) -> str | None:
    found = lb.statistics().channels.get(channel)
    return None if found is None else found.state


class Acquirer:
    """A task blocked in ``acquire()``: records its lease or error, cancellable."""

    def __init__(self, lb: Balancer, name: str = "", **kwargs: Any) -> None:
        self.lb = lb
        self.name = name
        self.kwargs = kwargs
        self.lease: Lease | None = None
        self.error: BalancerError | None = None
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()

    async def run(self) -> None:
        with self.scope:
            try:
                self.lease = await self.lb.acquire(**self.kwargs)
            except BalancerError as exc:
                self.error = exc
            finally:
                self.done.set()

    @property
    def cancelled(self) -> bool:
        return self.scope.cancelled_caught


async def start(tg: TaskGroup, lb: Balancer, name: str = "", **kwargs: Any) -> Acquirer:
    """Start an acquirer and return once it waits in the balancer's queue, or is done."""
    before = lb.statistics().waiting
    acquirer = Acquirer(lb, name, **kwargs)
    tg.start_soon(acquirer.run)
    await settle(lambda: acquirer.done.is_set() or lb.statistics().waiting > before)
    return acquirer


def served(acquirers: list[Acquirer]) -> list[bool]:
    """Which of ``acquirers`` hold a lease."""
    return [a.lease is not None for a in acquirers]

"""
The balancer a newcomer writes: the baseline the real one must beat.

A dict of in-flight counters, a list comprehension over every channel to find
the free ones, ``random.choice`` among them, and one ``Condition`` whose
``notify_all`` wakes every waiter on each release (they all re-scan; all but
one go back to sleep). It is correct -- never more than ``max_jobs`` per
channel -- just O(channels) per acquire and O(waiters) per release.

It uses the running loop's own ``Condition`` (``asyncio.Condition`` or
``trio.Condition``: what that newcomer would import).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Any

__all__ = ["NaiveBalancer"]


class NaiveBalancer:
    """``acquire() -> channel`` / ``release(channel)`` over per-channel limits."""

    def __init__(self, limits: Mapping[str, int], *, seed: int | None = None) -> None:
        self.limits = dict(limits)
        self.in_flight = dict.fromkeys(self.limits, 0)
        self._rng = random.Random(seed)
        self._cond: Any = None

    def _condition(self) -> Any:
        # Made on first use, inside the running loop.
        if self._cond is None:
            if _on_asyncio():
                self._cond = asyncio.Condition()
            else:
                import trio

                self._cond = trio.Condition()
        return self._cond

    async def acquire(self) -> str:
        cond = self._condition()
        async with cond:
            while True:
                free = [c for c, n in self.in_flight.items() if n < self.limits[c]]
                if free:
                    channel = self._rng.choice(free)
                    self.in_flight[channel] += 1
                    return channel
                await cond.wait()

    async def release(self, channel: str) -> None:
        cond = self._condition()
        async with cond:
            self.in_flight[channel] -= 1
            cond.notify_all()


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True

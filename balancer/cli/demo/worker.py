"""
The demo's workers, and the observers they report to from inside their leases.

Each worker task loops: take a lease (now and then pinned to the channel of its
previous job, as an upscale or a variation must be), "run" a job on that
channel for a random time, and report how it went. Some jobs fail (an
exception inside ``async with lb.acquire()`` makes the outcome ``"failed"``)
and some are answered 429 (the worker sets ``lease.outcome = "throttled"``,
which cools the channel).

An :class:`Observer`, independent of the balancer, counts the jobs actually
running on each channel from inside the lease (after ``acquire`` returned,
before ``release``), and records the peak. :class:`MemoryObserver` counts in
this process; the fleet's counts in Redis (:mod:`balancer.cli.demo.fleet`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

import anyio

from ...errors import NoCapacityError
from .model import ChannelRow, DemoConfig, Snapshot

if TYPE_CHECKING:
    from ...balancer import Balancer
    from ...lease import Lease
    from ...statistics import BalancerStatistics

__all__ = ["MemoryObserver", "Observer", "run_worker"]


class _JobFailed(Exception):
    """A simulated Discord job that failed (the lease's outcome becomes "failed")."""


class Observer(Protocol):
    """What the workers report to, from inside their leases."""

    async def waiting(self, channel: str | None, delta: int) -> None: ...

    async def started(self, channel: str, waited: float) -> None: ...

    async def finished(self, channel: str, outcome: str) -> None: ...

    async def timed_out(self) -> None: ...


async def run_worker(
    lb: Balancer,
    observer: Observer,
    config: DemoConfig,
    rng: random.Random,
    stop_at: float,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run simulated jobs through ``lb`` until ``clock()`` passes ``stop_at``."""
    await _Worker(lb, observer, config, stop_at, clock).run(rng)


@dataclass(frozen=True, slots=True)
class _Worker:
    lb: Balancer
    observer: Observer
    config: DemoConfig
    stop_at: float
    clock: Callable[[], float]

    async def run(self, rng: random.Random) -> None:
        config = self.config
        previous: str | None = None
        while self.clock() < self.stop_at:
            pinned = previous if previous is not None and rng.random() < config.pin_rate else None
            duration = min(rng.expovariate(1 / config.job_mean_s) + 0.03, 2.5 * config.job_mean_s)
            previous = await self._job(pinned, duration, rng.random(), previous)

    async def _job(
        self, pinned: str | None, duration: float, roll: float, previous: str | None
    ) -> str | None:
        """One job; returns the channel the next one may pin to."""
        observer = self.observer
        await observer.waiting(pinned, +1)
        asked = time.monotonic()
        waiting = True
        try:
            # The deadline cancels a wait in progress (the balancer gives back
            # any slot handed over meanwhile: the observer would see a leak),
            # but not a job that got its slot.
            deadline = self.stop_at - self.clock() + anyio.current_time()
            with anyio.CancelScope(deadline=deadline) as scope:
                acquire = self.lb.acquire(timeout=self.config.acquire_timeout, channel=pinned)
                async with acquire as lease:
                    scope.deadline = math.inf
                    waiting = False
                    await observer.waiting(pinned, -1)
                    await observer.started(lease.channel, time.monotonic() - asked)
                    await self._simulate(lease, duration, roll)
                return lease.channel
        except _JobFailed:
            return None
        except NoCapacityError:
            await observer.timed_out()
        finally:
            if waiting:
                with anyio.CancelScope(shield=True):
                    await observer.waiting(pinned, -1)
        return previous

    async def _simulate(self, lease: Lease, duration: float, roll: float) -> None:
        """The Discord job: answered 429, failed (raises), or ok; the observer hears its end."""
        config = self.config
        outcome = "cancelled"
        try:
            if roll < config.throttle_rate:
                await anyio.sleep(0.05)  # Discord answers 429 quickly
                outcome = lease.outcome = "throttled"
            elif roll < config.throttle_rate + config.fail_rate:
                await anyio.sleep(duration / 2)
                outcome = "failed"
                raise _JobFailed
            else:
                await anyio.sleep(duration)
                outcome = "ok"
        finally:
            with anyio.CancelScope(shield=True):
                await self.observer.finished(lease.channel, outcome)


@dataclass(slots=True)
class _Counts:
    max_jobs: int
    in_flight: int = 0
    peak: int = 0
    waiting: int = 0
    ok: int = 0
    failed: int = 0
    throttled: int = 0


@dataclass(slots=True)
class MemoryObserver:
    """Counts jobs running on each channel in this process (an :class:`Observer`)."""

    limits: dict[str, int]
    waits: list[float] = field(default_factory=list)
    waiting_total: int = 0
    timeouts: int = 0
    _counts: dict[str, _Counts] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._counts = {channel: _Counts(limit) for channel, limit in self.limits.items()}

    async def waiting(self, channel: str | None, delta: int) -> None:
        self.waiting_total += delta
        if channel is not None:
            self._counts[channel].waiting += delta

    async def started(self, channel: str, waited: float) -> None:
        counts = self._counts[channel]
        counts.in_flight += 1
        counts.peak = max(counts.peak, counts.in_flight)
        self.waits.append(waited)

    async def finished(self, channel: str, outcome: str) -> None:
        counts = self._counts[channel]
        counts.in_flight -= 1
        if outcome in ("ok", "failed", "throttled"):  # not "cancelled"
            setattr(counts, outcome, getattr(counts, outcome) + 1)

    async def timed_out(self) -> None:
        self.timeouts += 1

    def snapshot(
        self, stats: BalancerStatistics, elapsed: float, duration: float, workers: int
    ) -> Snapshot:
        rows = [
            # _Counts has every field of ChannelRow but the channel and its state.
            ChannelRow(channel=channel, state=self._state(stats, channel), **asdict(counts))
            for channel, counts in self._counts.items()
        ]
        return Snapshot(
            rows, elapsed, duration, self.waiting_total, workers, timeouts=self.timeouts
        )

    @staticmethod
    def _state(stats: BalancerStatistics, channel: str) -> str:
        return stats.channels[channel].state if channel in stats.channels else "removed"

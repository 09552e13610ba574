"""
``balancer demo``: simulated Discord jobs through a real balancer, watched from outside.

The demo starts :class:`~balancer.testing.FakeUseapi` on loopback with channels
of mixed ``maxJobs``, and runs worker tasks that each loop: take a lease (now
and then pinned to the channel of their previous job, as an upscale or a
variation must be), "run" a job on that channel for a random time, and report
how it went. Some jobs fail (an exception inside ``async with lb.acquire()``
makes the outcome ``"failed"``) and some are answered 429 (the worker sets
``lease.outcome = "throttled"``, which cools the channel).

An :class:`Observer`, independent of the balancer, counts the jobs actually
running on each channel from inside the lease (after ``acquire`` returned,
before ``release``), and records the peak: the closing report compares that
peak with ``maxJobs``, and the command fails if it was ever exceeded. With
``--redis`` (:mod:`balancer._demo_redis`) the same workers run in several
processes and the observer counts in Redis itself, fleet-wide.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import anyio

from .errors import NoCapacityError

if TYPE_CHECKING:
    from .balancer import Balancer
    from .statistics import BalancerStatistics

__all__ = [
    "ChannelRow",
    "DemoConfig",
    "MemoryObserver",
    "Observer",
    "RunResult",
    "Snapshot",
    "demo_limits",
    "percentile",
    "run_worker",
]


class _JobFailed(Exception):
    """A simulated Discord job that failed (the lease's outcome becomes "failed")."""


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """Everything that shapes a demo run."""

    duration: float = 8.0
    channels: int = 6
    workers: int | None = None  # None: about 1.5x the total capacity
    seed: int | None = None
    processes: int = 3  # --redis only
    job_mean_s: float = 0.4
    fail_rate: float = 0.06
    throttle_rate: float = 0.03
    pin_rate: float = 0.15
    cooldown: float = 1.5
    acquire_timeout: float = 10.0

    @property
    def limits(self) -> list[int]:
        return demo_limits(self.channels)

    @property
    def capacity(self) -> int:
        return sum(self.limits)

    @property
    def worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        return max(2, math.ceil(self.capacity * 1.5))


def demo_limits(channels: int) -> list[int]:
    """``maxJobs`` of the demo's channels: 1, 2, 3, 4, 1, 2, ..."""
    return [i % 4 + 1 for i in range(channels)]


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
    previous: str | None = None
    while clock() < stop_at:
        pinned = previous if previous is not None and rng.random() < config.pin_rate else None
        duration = min(rng.expovariate(1 / config.job_mean_s) + 0.03, 2.5 * config.job_mean_s)
        roll = rng.random()
        await observer.waiting(pinned, +1)
        asked = time.monotonic()
        waiting = True
        try:
            # The deadline cancels a wait in progress (the balancer gives back
            # any slot handed over meanwhile: the observer would see a leak),
            # but not a job that got its slot.
            with anyio.CancelScope(deadline=stop_at - clock() + anyio.current_time()) as scope:
                async with lb.acquire(timeout=config.acquire_timeout, channel=pinned) as lease:
                    scope.deadline = math.inf
                    waiting = False
                    await observer.waiting(pinned, -1)
                    await observer.started(lease.channel, time.monotonic() - asked)
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
                            await observer.finished(lease.channel, outcome)
                previous = lease.channel
        except _JobFailed:
            previous = None
        except NoCapacityError:
            await observer.timed_out()
        finally:
            if waiting:
                with anyio.CancelScope(shield=True):
                    await observer.waiting(pinned, -1)


@dataclass(frozen=True, slots=True)
class ChannelRow:
    """One channel in the live view and the report."""

    channel: str
    max_jobs: int
    in_flight: int
    peak: int
    waiting: int  # workers pinned to this channel, waiting
    ok: int
    failed: int
    throttled: int
    state: str

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.throttled


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The demo's state at one moment, as the view draws it."""

    rows: list[ChannelRow]
    elapsed: float
    duration: float
    waiting: int  # every waiting worker, pinned or not
    workers: int
    processes: int = 1
    timeouts: int = 0

    @property
    def done(self) -> int:
        return sum(row.done for row in self.rows)

    @property
    def in_flight(self) -> int:
        return sum(row.in_flight for row in self.rows)

    @property
    def capacity(self) -> int:
        return sum(row.max_jobs for row in self.rows)


@dataclass(frozen=True, slots=True)
class RunResult:
    """What the closing report is made of."""

    final: Snapshot
    waits: list[float]
    elapsed: float
    seed: int | None
    mode: str  # e.g. "1 process, memory backend"
    leaked: int  # slots still counted in flight by the balancer after the run

    @property
    def violations(self) -> list[ChannelRow]:
        return [row for row in self.final.rows if row.peak > row.max_jobs]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest-rank; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


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
        rows = []
        for channel, counts in self._counts.items():
            state = stats.channels[channel].state if channel in stats.channels else "removed"
            rows.append(
                ChannelRow(
                    channel=channel,
                    max_jobs=counts.max_jobs,
                    in_flight=counts.in_flight,
                    peak=counts.peak,
                    waiting=counts.waiting,
                    ok=counts.ok,
                    failed=counts.failed,
                    throttled=counts.throttled,
                    state=state,
                )
            )
        return Snapshot(
            rows,
            elapsed,
            duration,
            self.waiting_total,
            workers,
            timeouts=self.timeouts,
        )

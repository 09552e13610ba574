"""
What a ``balancer demo`` run is made of: its configuration, the snapshots the
view draws, and the result the closing report is made of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...testing import FakeUseapi

__all__ = [
    "ChannelRow",
    "DemoConfig",
    "RunResult",
    "Snapshot",
    "demo_limits",
    "demo_upstream",
    "percentile",
]


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


def demo_upstream(config: DemoConfig) -> tuple[FakeUseapi, dict[str, int]]:
    """The fake useapi server of a run (not started yet), and its channels' ``maxJobs``."""
    from ...testing import FakeUseapi, make_accounts, random_token

    raw = make_accounts(config.channels, max_jobs=config.limits, seed=config.seed or 0)
    limits = {channel: int(entry["maxJobs"]) for channel, entry in raw.items()}
    return FakeUseapi(raw, token=random_token("demo-api-token-")), limits


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

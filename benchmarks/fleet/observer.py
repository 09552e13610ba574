"""The Discord side: what actually runs, from the jobs' own messages, and the rules it checks."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

if TYPE_CHECKING:
    from .upstream import FleetConfig, Upstream

__all__ = ["Job", "Observer", "Report"]


@dataclass
class Job:
    worker: int
    channel: str
    lease_id: str
    version: int | None
    acq_start: float
    acq_done: float
    start: float
    end: float | None = None
    outcome: str | None = None
    lost: bool = False
    released: float | None = None


@dataclass
class Report:
    """The figures of a run; ``violations`` must be empty."""

    duration: float = 0.0
    jobs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    client: Counter[str] = field(default_factory=Counter)
    max_over_dispatch: int = 0
    leaked: int = -1
    longest_stall: float = 0.0
    reclaim: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    peak: dict[str, int] = field(default_factory=dict)
    #: Informational: starts at or above the limit of the version effective at
    #: that instant (no propagation window): how much the window is needed.
    over_current: int = 0
    #: Informational: starts that filled the channel to its current limit
    #: (shows the fleet really presses against maxJobs).
    at_limit: int = 0
    #: Informational: the workers' warnings, counted from their logs.
    events: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        faults = " ".join(f"{k}={v}" for k, v in sorted(self.faults.items()))
        client = " ".join(f"{k}={v}" for k, v in sorted(self.client.items()))
        reclaim = ",".join(f"{r:.2f}s" for r in self.reclaim) or "-"
        return (
            f"chaos: {self.duration:.0f}s jobs={self.jobs} "
            f"({' '.join(f'{k}={v}' for k, v in sorted(self.outcomes.items()))}) "
            f"faults[{faults}] clients[{client}] "
            f"max_over_dispatch={self.max_over_dispatch} slots_leaked={self.leaked} "
            f"longest_stall={self.longest_stall:.2f}s reclaim_after_sigkill={reclaim} "
            f"violations={len(self.violations)} "
            f"(info: starts_filling_limit={self.at_limit} "
            f"starts_over_current_limit={self.over_current} "
            f"worker_events[{' '.join(f'{k}={v}' for k, v in sorted(self.events.items()))}])"
        )


class Observer:
    """The Discord side: records what actually runs, from the jobs' own messages."""

    def __init__(self, upstream: Upstream, config: FleetConfig, report: Report) -> None:
        self.upstream = upstream
        self.config = config
        self.report = report
        self.jobs: list[Job] = []
        self.running: dict[str, set[int]] = defaultdict(set)
        self.last_start = time.monotonic()
        self.gaps_from = time.monotonic()
        self.redis_restarts: list[float] = []
        self.port = 0

    def running_of(self, worker: int) -> list[Job]:
        return [
            self.jobs[i]
            for ids in self.running.values()
            for i in ids
            if self.jobs[i].worker == worker
        ]

    def _start(self, fields: list[str]) -> int:
        worker, channel, lease_id, token, acq_start, acq_done = fields
        now = time.monotonic()
        upstream = self.upstream
        version = upstream.version_of(channel, token)
        job = Job(int(worker), channel, lease_id, version, float(acq_start), float(acq_done), now)
        index = len(self.jobs)
        self.jobs.append(job)
        versions = upstream.acceptable(now, self.config.window)
        running = len(self.running[channel])
        limit = upstream.limit(channel, versions)
        if version is None:
            self.report.violations.append(f"job {lease_id} on {channel} used an unknown token")
        elif version not in versions:
            self.report.violations.append(
                f"stale map: job {lease_id} on {channel} used map v{version} at "
                f"{now:.2f}, acceptable {sorted(versions)}"
            )
        current = upstream.acceptable(now, 0.0)
        if running >= upstream.limit(channel, current):
            self.report.over_current += 1
        elif running + 1 == upstream.limit(channel, current):
            self.report.at_limit += 1
        if running >= limit:
            over = running + 1 - limit
            self.report.max_over_dispatch = max(self.report.max_over_dispatch, over)
            self.report.violations.append(
                f"over-dispatch: job {lease_id} started on {channel} with {running} running, "
                f"limit {limit} (versions {sorted(versions)}) at {now:.2f}"
            )
        self.running[channel].add(index)
        self.report.peak[channel] = max(self.report.peak.get(channel, 0), running + 1)
        if self.gaps_from <= self.last_start:
            self.report.longest_stall = max(self.report.longest_stall, now - self.last_start)
        self.last_start = now
        return index

    def _end(self, index: int, outcome: str, lost: bool = False) -> None:
        job = self.jobs[index]
        if job.end is not None:
            return
        job.end = time.monotonic()
        job.outcome = outcome
        job.lost = lost
        self.running[job.channel].discard(index)
        self.report.outcomes[outcome] += 1
        if lost:
            self.report.outcomes["lease_lost"] += 1

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        index: int | None = None
        reader = BufferedByteReceiveStream(stream)
        async with stream:
            try:
                while True:
                    line = (await reader.receive_until(b"\n", 4096)).decode()
                    kind, *fields = line.split()
                    if kind == "S":
                        index = self._start(fields)
                    elif kind == "E" and index is not None:
                        self._end(index, fields[0], fields[1] == "1")
                    elif kind == "R" and index is not None:
                        self.jobs[index].released = float(fields[0])
                    await stream.send(b"k\n")
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
                pass
            finally:
                if index is not None:
                    self._end(index, "killed")

    def check_cooling(self) -> None:
        cooldown = self.config.cooldown
        by_channel: dict[str, list[Job]] = defaultdict(list)
        for job in self.jobs:
            by_channel[job.channel].append(job)
        for job in self.jobs:
            if job.outcome != "throttled" or job.end is None or job.released is None:
                continue
            begin, until = job.released, job.end + cooldown
            lo = job.end - self.config.window
            if any(lo <= t <= until for t in self.redis_restarts):
                continue
            if any(lo <= t <= until for t in self.upstream.removed_at.get(job.channel, [])):
                continue
            for other in by_channel[job.channel]:
                if other.acq_start >= begin and other.acq_done <= until:
                    self.report.violations.append(
                        f"cooling: job {other.lease_id} on {job.channel} acquired "
                        f"[{other.acq_start:.2f}, {other.acq_done:.2f}] while cooling after "
                        f"{job.lease_id} (released {begin:.2f}, cooling until >= {until:.2f})"
                    )

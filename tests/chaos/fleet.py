"""
A fleet of balancer workers under fire, and an independent observer of what runs.

Used by ``tests/chaos/test_chaos.py`` (a bounded run in CI) and by
``benchmarks/soak.py`` (a long run for release checks).

The pieces, all on one machine:

* **Workers**: ``python -m tests.chaos.fleet worker ...`` OS processes, half on
  asyncio and half on trio, each running a :class:`~balancer.Balancer` over a
  ``UseapiAccountSource`` (pointed at the fake upstream) and a
  ``RedisBackend`` (one real ``redis-server`` shared by the fleet). Each runs
  more job tasks than the fleet has slots, so there are always waiters. A job
  acquires a lease, "submits" itself to the Discord side (the observer) with
  its lease's channel and Discord token, runs for a while, reports its end,
  and only then releases. Clients cancel ~30 % of their waits and ~10 % of
  their running jobs; some jobs fail and a few report ``"throttled"``.
* **The fake upstream** (:class:`~balancer.testing.FakeUseapi`) in the
  orchestrating process: its account map changes every 1-2 s (channels added
  and removed, ``maxJobs`` up and down, every token rotated: the token names
  the map version it belongs to), and a fault schedule injects, in turn, 401,
  429, 500, 503, timeouts and malformed bodies.
* **The observer** ("the Discord side"): a TCP server in the orchestrating
  process. A job is one TCP connection: ``S`` (start) when it begins, ``E``
  (end) before its lease is released, ``R`` after the release. A worker that
  is SIGKILLed has its connections closed by the kernel: its jobs end then.
  The observer counts running jobs per channel from these messages alone,
  never from the balancer's counters or Redis.
* **Process faults**: a worker is SIGKILLed while it holds leases, then
  restarted; Redis is SIGKILLed and restarted empty (no persistence).

The rules the observer checks (see :class:`Observer`):

* **Over-dispatch.** Let ``W`` (``FleetConfig.window``) be the propagation
  window: the map TTL, plus the source timeout, plus slack for scheduling
  lag. The *effective* upstream version at instant ``u`` is the map the fake
  served successfully at ``u`` (during an upstream fault, the last one served
  before it: workers keep their last good map). A job that starts on channel
  ``c`` at ``t`` while ``r`` jobs already run on ``c`` is an over-dispatch when
  ``r >= L``, where ``L`` is the largest ``maxJobs`` of ``c`` among the
  versions effective at any instant of ``[t - W, t]`` (0 where ``c`` is
  absent). So jobs started before a lowered ``maxJobs`` may run on, but no job
  may *start* while the channel is at or above every limit a worker could
  still legitimately hold; and no job may start on a channel that has been
  absent from the map for longer than ``W``.
* **Stale map.** The job's token names the map version its worker granted it
  from; that version must be one of those effective during ``[t - W, t]``.
* **Cooling.** After a job on ``c`` ends ``"throttled"`` (end acknowledged at
  ``a``, release returned at ``b``; the cooldown started in Redis in between),
  no job on ``c`` whose ``acquire()`` *began* after ``b`` may have been granted
  (``acquire()`` returned) before ``a + cooldown``. Exempt: windows that
  overlap a Redis restart (cooldowns are lost with the data) or a removal of
  ``c`` from the map (a removed channel forgets its cooldown).
* **Leaks.** After every worker has exited cleanly, Redis holds no lease and
  every in-flight count is 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.buffered import BufferedByteReceiveStream

ROOT = Path(__file__).resolve().parents[2]
EVENT = "@"  # prefix of the workers' event lines on stdout
#: The upstream faults injected in turn (kind, how).
FAULTS: tuple[str, ...] = (
    "401",
    "429",
    "500",
    "503",
    "timeout",
    "malformed-json",
    "malformed-type",
)


@dataclass
class FleetConfig:
    """Knobs of a fleet run; the defaults are the CI chaos run."""

    duration: float = 40.0
    workers: int = 4
    tasks_per_worker: int = 10
    ttl: float = 0.5  # account-map cache TTL
    source_timeout: float = 0.4
    lease_ttl: float = 2.0
    cooldown: float = 1.0
    recovery_grace: float = 1.0
    slack: float = 1.5  # scheduling lag allowed on top of ttl + source timeout
    map_every: tuple[float, float] = (1.0, 2.0)
    fault_on: float = 1.2  # seconds an upstream fault lasts
    fault_off: float = 1.5  # seconds between upstream faults
    kill_at: tuple[float, float] = (5.0, 16.0)  # first SIGKILL, then every
    redis_at: tuple[float, float] = (12.0, 18.0)  # first Redis restart, then every
    redis_down: float = 0.0  # seconds Redis stays down before it restarts (empty)
    p_cancel_wait: float = 0.3
    p_cancel_run: float = 0.1
    p_fail: float = 0.04
    p_throttle: float = 0.01
    #: Jobs that outlive lease_ttl several times over: renewal must keep their slots.
    p_long: float = 0.05
    long_job: tuple[float, float] = (2.5, 6.0)
    seed: int = 0
    log_dir: Path | None = None
    #: Negative control: odd workers use another namespace, so the fleet's
    #: counts are split in two and channels run up to twice their maxJobs.
    split_namespace: bool = False
    faults: bool = True

    @property
    def window(self) -> float:
        return self.ttl + self.source_timeout + self.slack


# -- the account map upstream ---------------------------------------------------------------


class Upstream:
    """The fake upstream's map over time: versions, tokens, and which were effective when."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.version = 0
        self.limits: dict[str, int] = {f"ch{i}": rng.randint(1, 3) for i in range(4)}
        self.next_channel = 4
        self.versions: dict[int, dict[str, int]] = {}
        self.tokens: dict[tuple[int, str], str] = {}
        self.faulting = False
        #: (monotonic time, effective version), in time order.
        self.effective: list[tuple[float, int]] = []
        #: channel -> times it left the map (for the cooling exemption).
        self.removed_at: dict[str, list[float]] = defaultdict(list)
        self._commit()

    def _commit(self) -> None:
        self.versions[self.version] = dict(self.limits)
        for channel in self.limits:
            self.tokens[(self.version, channel)] = (
                f"discord-v{self.version}-{channel}-{self.rng.getrandbits(32):08x}"
            )

    def raw(self) -> dict[str, dict[str, Any]]:
        return {
            channel: {
                "server": "100000000000000000",
                "channel": channel,
                "discord": self.tokens[(self.version, channel)],
                "maxJobs": limit,
            }
            for channel, limit in self.limits.items()
        }

    def mutate(self) -> str:
        """Change the map one way (and rotate every token); return what changed."""
        limits = self.limits
        choices = ["up", "down", "rotate"]
        if len(limits) < 6:
            choices.append("add")
        if len(limits) > 2:
            choices.append("remove")
        kind = self.rng.choice(choices)
        if kind == "add":
            limits[f"ch{self.next_channel}"] = self.rng.randint(1, 4)
            self.next_channel += 1
        elif kind == "remove":
            gone = self.rng.choice(sorted(limits))
            del limits[gone]
            self.removed_at[gone].append(time.monotonic())
        elif kind == "up":
            channel = self.rng.choice(sorted(limits))
            limits[channel] = min(4, limits[channel] + self.rng.randint(1, 2))
        elif kind == "down":
            channel = self.rng.choice(sorted(limits))
            limits[channel] = max(1, limits[channel] - self.rng.randint(1, 2))
        self.version += 1
        self._commit()
        return kind

    def mark_effective(self) -> None:
        if not self.faulting:
            self.effective.append((time.monotonic(), self.version))

    def acceptable(self, t: float, window: float) -> set[int]:
        """Versions effective at some instant of ``[t - window, t]``."""
        found: set[int] = set()
        start = t - window
        before: int | None = None
        for at, version in self.effective:
            if at <= start:
                before = version
            elif at <= t:
                found.add(version)
            else:
                break
        if before is not None:
            found.add(before)
        return found

    def limit(self, channel: str, versions: set[int]) -> int:
        return max((self.versions[v].get(channel, 0) for v in versions), default=0)

    def version_of(self, channel: str, token: str) -> int | None:
        try:
            version = int(token.split("-", 2)[1][1:])
        except (IndexError, ValueError):
            return None
        return version if self.tokens.get((version, channel)) == token else None


# -- the observer ---------------------------------------------------------------------------


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


# -- the orchestrator -------------------------------------------------------------------------


class Worker:
    """One worker process, restartable."""

    def __init__(self, index: int, argv: list[str], log: Any) -> None:
        self.index = index
        self.argv = argv
        self.log = log
        self.process: anyio.abc.Process | None = None
        self.ready = anyio.Event()
        self.summary: dict[str, int] | None = None
        self.generation = 0

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        self.generation += 1
        self.ready = anyio.Event()
        self.summary = None
        argv = [*self.argv, "--seed", str(self.index * 1000 + self.generation)]
        self.process = await anyio.open_process(
            argv, cwd=ROOT, stdin=-1, stdout=-1, stderr=self.log
        )
        tg.start_soon(self._read, self.process)

    async def _read(self, process: anyio.abc.Process) -> None:
        assert process.stdout is not None
        reader = BufferedByteReceiveStream(process.stdout)
        with contextlib.suppress(
            anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError
        ):
            while True:
                line = (await reader.receive_until(b"\n", 1 << 20)).decode()
                if line.startswith(EVENT + "ready"):
                    self.ready.set()
                elif line.startswith(EVENT + "summary "):
                    self.summary = json.loads(line.split(" ", 1)[1])

    async def kill(self) -> None:
        process = self.process
        assert process is not None
        process.send_signal(signal.SIGKILL)
        await process.wait()

    async def stop(self) -> int:
        process = self.process
        assert process is not None and process.stdin is not None
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await process.stdin.send(b"stop\n")
        return await process.wait()


_EVENTS = (
    "backend_unavailable",
    "backend_epoch_changed",
    "leases_reasserted",
    "lease_lost",
    "lease_release_failed",
)


def _open_log(log_dir: Path | None, index: int) -> Any:
    """Where a worker's stderr (its structlog warnings) goes."""
    path = log_dir / f"worker{index}.log" if log_dir is not None else Path(os.devnull)
    return path.open("ab")


async def _redis_call(url: str, *command: Any) -> Any:
    import redis

    def call() -> Any:
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    return await anyio.to_thread.run_sync(call)


async def run_fleet(
    config: FleetConfig,
    redis_server: Any,
    progress: Callable[[Report, Observer], None] | None = None,
    progress_every: float = 5.0,
) -> Report:
    """
    Run the fleet for ``config.duration`` seconds under the fault schedule.

    ``redis_server`` is a ``tests._redis.RedisServer`` (started) that this run may kill.
    """
    from balancer.testing import FakeUseapi

    rng = random.Random(config.seed)
    report = Report()
    upstream = Upstream(rng)
    observer = Observer(upstream, config, report)
    namespace = f"chaos-{os.getpid()}-{rng.getrandbits(32):08x}"
    keys_prefix = f"{{{namespace}}}"
    t0 = time.monotonic()
    log_dir = config.log_dir
    logs: list[Any] = []

    with FakeUseapi(upstream.raw(), token="chaos-api-token-0123456789abcdef") as fake:
        upstream.mark_effective()
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        observer.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        workers: list[Worker] = []
        for i in range(config.workers):
            log = _open_log(log_dir, i)
            logs.append(log)
            argv = [
                sys.executable, "-m", "tests.chaos.fleet", "worker",
                "--index", str(i),
                "--loop", "trio" if i % 2 else "asyncio",
                "--selection", ("random", "weighted", "p2c", "random")[i % 4],
                "--redis", redis_server.url,
                "--namespace", namespace + ("-b" if config.split_namespace and i % 2 else ""),
                "--source", fake.base_url,
                "--token", fake.token,
                "--observer", str(observer.port),
                "--tasks", str(config.tasks_per_worker),
                "--ttl", str(config.ttl),
                "--source-timeout", str(config.source_timeout),
                "--lease-ttl", str(config.lease_ttl),
                "--cooldown", str(config.cooldown),
                "--grace", str(config.recovery_grace),
                "--p-cancel-wait", str(config.p_cancel_wait),
                "--p-cancel-run", str(config.p_cancel_run),
                "--p-fail", str(config.p_fail),
                "--p-throttle", str(config.p_throttle),
                "--p-long", str(config.p_long),
                "--long-min", str(config.long_job[0]),
                "--long-max", str(config.long_job[1]),
            ]  # fmt: skip
            workers.append(Worker(i, argv, log))

        async def change_map() -> None:
            while True:
                await anyio.sleep(rng.uniform(*config.map_every))
                kind = upstream.mutate()
                fake.set_accounts(upstream.raw())
                upstream.mark_effective()
                report.faults[f"map-{kind}"] += 1

        async def upstream_faults() -> None:
            for n in range(1 << 30):
                await anyio.sleep(config.fault_off)
                kind = FAULTS[n % len(FAULTS)]
                upstream.faulting = True
                if kind == "timeout":
                    fake.set_delay(config.source_timeout * 2.5)
                elif kind == "malformed-json":
                    fake.set_body(b'{"ch0": {"maxJobs": 3, "channel": "ch0"')
                elif kind == "malformed-type":
                    fake.set_body(b'["not", "an", "object"]')
                else:
                    fake.set_status(int(kind))
                report.faults[f"http-{kind}"] += 1
                try:
                    await anyio.sleep(config.fault_on)
                finally:
                    fake.clear_fault()
                    upstream.faulting = False
                    upstream.mark_effective()

        async def kill_workers() -> None:
            first, every = config.kill_at
            at = first
            while True:
                await anyio.sleep_until(t0 + at)
                at += every
                if t0 + config.duration - time.monotonic() < 5:
                    return
                victim = workers[rng.randrange(len(workers))]
                with anyio.move_on_after(3):  # kill it while it holds leases
                    while not observer.running_of(victim.index):  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                held = [job.lease_id for job in observer.running_of(victim.index)]
                killed = time.monotonic()
                await victim.kill()
                report.faults["sigkill"] += 1
                tg.start_soon(watch_reclaim, held, killed)
                await anyio.sleep(0.5)
                await victim.start(tg)

        async def watch_reclaim(held: list[str], killed: float) -> None:
            restarts = len(observer.redis_restarts)
            with contextlib.suppress(Exception):  # only leases the dead worker still held
                found = await _redis_call(redis_server.url, "HMGET", f"{keys_prefix}:lch", *held)
                held = [lease for lease, ch in zip(held, found, strict=True) if ch]
            if not held or len(observer.redis_restarts) != restarts:
                return
            with anyio.move_on_after(config.lease_ttl * 4):
                while True:
                    try:
                        found = await _redis_call(
                            redis_server.url, "HMGET", f"{keys_prefix}:lch", *held
                        )
                    except Exception:  # noqa: BLE001 - Redis is being restarted
                        found = [b"?"]
                    if len(observer.redis_restarts) != restarts:
                        return  # the data went with a restart: not a reclamation figure
                    if not any(found):
                        report.reclaim.append(time.monotonic() - killed)
                        return
                    await anyio.sleep(0.05)
            report.violations.append(f"leases of a SIGKILLed worker not reclaimed: {held}")

        async def restart_redis() -> None:
            first, every = config.redis_at
            at = first
            while True:
                await anyio.sleep_until(t0 + at)
                at += every
                if t0 + config.duration - time.monotonic() < 5:
                    return
                observer.redis_restarts.append(time.monotonic())
                await anyio.to_thread.run_sync(redis_server.kill)
                await anyio.sleep(config.redis_down)
                await anyio.to_thread.run_sync(redis_server.start)
                observer.redis_restarts.append(time.monotonic())
                report.faults["redis-restart"] += 1

        async def show_progress() -> None:
            assert progress is not None
            while True:
                await anyio.sleep(progress_every)
                report.duration = time.monotonic() - t0
                report.jobs = len(observer.jobs)
                progress(report, observer)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, observer.handle)
                for worker in workers:
                    await worker.start(tg)
                with anyio.fail_after(30):
                    for worker in workers:
                        await worker.ready.wait()
                t0 = time.monotonic()
                observer.gaps_from = t0
                observer.last_start = t0
                async with anyio.create_task_group() as faults:
                    if config.faults:
                        faults.start_soon(change_map)
                        faults.start_soon(upstream_faults)
                        faults.start_soon(kill_workers)
                        faults.start_soon(restart_redis)
                    if progress is not None:
                        faults.start_soon(show_progress)
                    await anyio.sleep(config.duration)
                    observer.gaps_from = math.inf  # stopping: gaps no longer count
                    faults.cancel_scope.cancel()
                with anyio.fail_after(30):
                    for worker in workers:
                        await worker.ready.wait()  # a just-restarted worker is up
                    codes = [await worker.stop() for worker in workers]
                for worker, code in zip(workers, codes, strict=True):
                    if code != 0:
                        report.violations.append(f"worker {worker.index} exited with {code}")
                    if worker.summary is None:
                        report.violations.append(f"worker {worker.index} gave no summary")
                    else:
                        report.client.update(worker.summary)
                await anyio.sleep(0.1)
                tg.cancel_scope.cancel()
        finally:
            for worker in workers:
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()
            for log in logs:
                log.close()
            await listener.aclose()

    report.duration = time.monotonic() - t0
    report.jobs = len(observer.jobs)
    still = sum(len(ids) for ids in observer.running.values())
    if still:
        report.violations.append(f"{still} jobs never ended")
    in_flight, leases = [], 0
    for prefix in {keys_prefix, keys_prefix.replace("}", "-b}")}:
        in_flight += await _redis_call(redis_server.url, "HVALS", f"{prefix}:inf")
        leases += await _redis_call(redis_server.url, "HLEN", f"{prefix}:lch")
    report.leaked = sum(int(v) for v in in_flight) + int(leases)
    if report.leaked:
        report.violations.append(f"slots leaked: in_flight {in_flight}, leases {leases}")
    observer.check_cooling()
    if log_dir is not None:
        for path in log_dir.glob("worker*.log"):
            for line in path.read_text(errors="replace").splitlines():
                for event in _EVENTS:
                    if event in line:
                        report.events[event] += 1
    if not report.reclaim and report.faults["sigkill"]:
        report.violations.append("no reclamation measured after a SIGKILL")
    return report


# -- the worker process --------------------------------------------------------------------


class _JobFailed(Exception):
    """A simulated job failure (outcome "failed")."""


async def _worker(opts: argparse.Namespace) -> None:
    import structlog

    from balancer import (
        Balancer,
        BalancerError,
        NoCapacityError,
        RedisBackend,
        UseapiAccountSource,
    )

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    rng = random.Random(opts.seed)
    stats: Counter[str] = Counter()
    stop = anyio.Event()

    async def open_balancer(stack: contextlib.AsyncExitStack) -> Balancer:
        while True:
            lb = Balancer(
                UseapiAccountSource(opts.token, base_url=opts.source, timeout=opts.source_timeout),
                backend=RedisBackend(
                    opts.redis,
                    namespace=opts.namespace,
                    timeout=1.0,
                    connect_timeout=1.0,
                    recovery_grace=opts.grace,
                ),
                ttl=opts.ttl,
                lease_ttl=opts.lease_ttl,
                cooldown=opts.cooldown,
                selection=opts.selection,
                poll_interval=0.2,
                seed=opts.seed,
            )
            try:
                return await stack.enter_async_context(lb)
            except (BalancerError, OSError) as exc:
                stats[f"enter_{type(exc).__name__}"] += 1
                await anyio.sleep(0.2)

    async def job(lb: Balancer) -> None:
        cancel_wait = rng.random() < opts.p_cancel_wait
        cancel_run = rng.random() < opts.p_cancel_run
        duration = rng.uniform(0.02, 0.3)
        if rng.random() < opts.p_long:
            duration = rng.uniform(opts.long_min, opts.long_max)
        roll = rng.random()
        stream: anyio.abc.SocketStream | None = None
        reader: BufferedByteReceiveStream | None = None
        granted = False

        async def say(message: str) -> None:
            assert stream is not None and reader is not None
            await stream.send(message.encode() + b"\n")
            await reader.receive_until(b"\n", 64)

        with anyio.CancelScope() as scope:
            if cancel_wait:
                scope.deadline = anyio.current_time() + rng.uniform(0.0, 0.3)
            acq_start = time.monotonic()
            try:
                async with lb.acquire(timeout=3.0) as lease:
                    granted = True
                    acq_done = time.monotonic()
                    scope.deadline = (
                        anyio.current_time() + rng.uniform(0, duration) if cancel_run else math.inf
                    )
                    with anyio.CancelScope(shield=True):
                        stream = await anyio.connect_tcp("127.0.0.1", opts.observer)
                        reader = BufferedByteReceiveStream(stream)
                        await say(
                            f"S {opts.index} {lease.channel} {lease.id} "
                            f"{lease.account.discord.reveal()} {acq_start:.6f} {acq_done:.6f}"
                        )
                    outcome = "ok"
                    try:
                        await anyio.sleep(duration)
                        if roll < opts.p_throttle:
                            lease.outcome = outcome = "throttled"
                        elif roll < opts.p_throttle + opts.p_fail:
                            outcome = "failed"
                            raise _JobFailed
                    except BaseException:
                        if outcome == "ok":
                            outcome = "abandoned"
                        raise
                    finally:
                        with anyio.CancelScope(shield=True):
                            await say(f"E {outcome} {int(lease.lost)}")
                stats["jobs"] += 1
            except _JobFailed:
                stats["jobs"] += 1
            except NoCapacityError:
                stats["no_capacity"] += 1
            except BalancerError as exc:
                stats[type(exc).__name__] += 1
                await anyio.sleep(0.1)
            finally:
                if stream is not None:
                    with anyio.CancelScope(shield=True):
                        with contextlib.suppress(Exception):
                            await say(f"R {time.monotonic():.6f}")
                        await stream.aclose()
        if scope.cancelled_caught:
            stats["cancelled_run" if granted else "cancelled_wait"] += 1

    async def job_loop(lb: Balancer) -> None:
        while True:
            await job(lb)
            await anyio.lowlevel.checkpoint()

    async def read_stdin() -> None:
        await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        stop.set()

    async with contextlib.AsyncExitStack() as stack:
        lb = await open_balancer(stack)
        _emit(EVENT + "ready")
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_stdin)
            for _ in range(opts.tasks):
                tg.start_soon(job_loop, lb)
            await stop.wait()
            tg.cancel_scope.cancel()
    _emit(EVENT + "summary " + json.dumps(dict(stats)))


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.fleet worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--loop", default="asyncio")
    parser.add_argument("--selection", default="random")
    parser.add_argument("--redis", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--observer", type=int, required=True)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-min", type=float, default=2.5)
    parser.add_argument("--long-max", type=float, default=6.0)
    for name in ("ttl", "source-timeout", "lease-ttl", "cooldown", "grace"):
        parser.add_argument(f"--{name}", type=float, required=True)
    for name in ("p-cancel-wait", "p-cancel-run", "p-fail", "p-throttle", "p-long"):
        parser.add_argument(f"--{name}", type=float, required=True)
    opts = parser.parse_args(argv)
    anyio.run(_worker, opts, backend=opts.loop)


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        raise SystemExit("usage: python -m tests.chaos.fleet worker ...")
    _worker_main(sys.argv[2:])

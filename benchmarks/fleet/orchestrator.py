"""
:func:`run_fleet`: start the worker processes, run the fault schedule against
them, and gather the observer's report (see :mod:`benchmarks.fleet`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.buffered import BufferedByteReceiveStream

from .observer import Observer, Report
from .upstream import FAULTS, FleetConfig, Upstream

if TYPE_CHECKING:
    from balancer.testing import FakeUseapi, RedisServer

__all__ = ["EVENT", "Worker", "run_fleet"]

ROOT = Path(__file__).resolve().parents[2]
EVENT = "@"  # prefix of the workers' event lines on stdout


async def run_fleet(
    config: FleetConfig,
    redis_server: RedisServer,
    progress: Callable[[Report, Observer], None] | None = None,
    progress_every: float = 5.0,
) -> Report:
    """
    Run the fleet for ``config.duration`` seconds under the fault schedule.

    ``redis_server`` is a started :class:`~balancer.testing.RedisServer` that
    this run may kill and restart. ``progress`` is called every
    ``progress_every`` seconds with the figures so far.
    """
    from balancer.testing import FakeUseapi

    run = _Run(config, redis_server)
    with FakeUseapi(run.upstream.raw(), token="chaos-api-token-0123456789abcdef") as fake:
        run.upstream.mark_effective()
        await run.serve(fake, progress, progress_every)
    return await run.finish()


class _Run:
    """One fleet run: its processes, its fault schedule, and what it found."""

    tg: anyio.abc.TaskGroup  # the run's, once serve() entered it

    def __init__(self, config: FleetConfig, redis_server: RedisServer) -> None:
        self.config = config
        self.redis_server = redis_server
        self.rng = random.Random(config.seed)
        self.report = Report()
        self.upstream = Upstream(self.rng)
        self.observer = Observer(self.upstream, config, self.report)
        self.namespace = f"chaos-{os.getpid()}-{self.rng.getrandbits(32):08x}"
        self.keys_prefix = f"{{{self.namespace}}}"
        self.t0 = time.monotonic()
        self.logs: list[Any] = []
        self.workers: list[Worker] = []

    def _worker_argv(self, i: int, fake: FakeUseapi, observer_port: int) -> list[str]:
        config = self.config
        return [
            sys.executable, "-m", "benchmarks.fleet.worker",
            "--index", str(i),
            "--loop", "trio" if i % 2 else "asyncio",
            "--selection", ("random", "weighted", "p2c", "random")[i % 4],
            "--redis", self.redis_server.url,
            "--namespace", self.namespace + ("-b" if config.split_namespace and i % 2 else ""),
            "--source", fake.base_url,
            "--token", fake.token,
            "--observer", str(observer_port),
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

    async def serve(
        self,
        fake: FakeUseapi,
        progress: Callable[[Report, Observer], None] | None,
        progress_every: float,
    ) -> None:
        """Start the workers, run the schedule for ``config.duration``, stop them."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.observer.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        for i in range(self.config.workers):
            log = _open_log(self.config.log_dir, i)
            self.logs.append(log)
            self.workers.append(Worker(i, self._worker_argv(i, fake, self.observer.port), log))
        try:
            async with anyio.create_task_group() as tg:
                self.tg = tg
                tg.start_soon(listener.serve, self.observer.handle)
                for worker in self.workers:
                    await worker.start(tg)
                await self._all_ready()
                self.t0 = time.monotonic()
                self.observer.gaps_from = self.t0
                self.observer.last_start = self.t0
                await self._under_fire(fake, progress, progress_every)
                await self._stop_workers()
                await anyio.sleep(0.1)
                tg.cancel_scope.cancel()
        finally:
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()
            for log in self.logs:
                log.close()
            await listener.aclose()

    async def _all_ready(self) -> None:
        with anyio.fail_after(30):
            for worker in self.workers:
                await worker.ready.wait()

    async def _under_fire(
        self,
        fake: FakeUseapi,
        progress: Callable[[Report, Observer], None] | None,
        progress_every: float,
    ) -> None:
        """The run itself: ``config.duration`` seconds, with every fault on a schedule."""
        async with anyio.create_task_group() as faults:
            if self.config.faults:
                faults.start_soon(self._change_map, fake)
                faults.start_soon(self._upstream_faults, fake)
                faults.start_soon(self._kill_workers)
                faults.start_soon(self._restart_redis)
            if progress is not None:
                faults.start_soon(self._show_progress, progress, progress_every)
            await anyio.sleep(self.config.duration)
            self.observer.gaps_from = math.inf  # stopping: gaps no longer count
            faults.cancel_scope.cancel()

    async def _stop_workers(self) -> None:
        report = self.report
        with anyio.fail_after(30):
            for worker in self.workers:
                await worker.ready.wait()  # a just-restarted worker is up
            codes = [await worker.stop() for worker in self.workers]
        for worker, code in zip(self.workers, codes, strict=True):
            if code != 0:
                report.violations.append(f"worker {worker.index} exited with {code}")
            if worker.summary is None:
                report.violations.append(f"worker {worker.index} gave no summary")
            else:
                report.client.update(worker.summary)

    # -- the fault schedule --------------------------------------------------------------

    async def _change_map(self, fake: FakeUseapi) -> None:
        while True:
            await anyio.sleep(self.rng.uniform(*self.config.map_every))
            kind = self.upstream.mutate()
            fake.set_accounts(self.upstream.raw())
            self.upstream.mark_effective()
            self.report.faults[f"map-{kind}"] += 1

    async def _upstream_faults(self, fake: FakeUseapi) -> None:
        config, upstream = self.config, self.upstream
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
            self.report.faults[f"http-{kind}"] += 1
            try:
                await anyio.sleep(config.fault_on)
            finally:
                fake.clear_fault()
                upstream.faulting = False
                upstream.mark_effective()

    async def _every(
        self, schedule: tuple[float, float], action: Callable[[], Awaitable[None]]
    ) -> None:
        """``action()`` at ``first`` s into the run, then every ``every`` s, until 5 s before its end."""
        first, every = schedule
        at = first
        while True:
            await anyio.sleep_until(self.t0 + at)
            at += every
            if self.t0 + self.config.duration - time.monotonic() < 5:
                return
            await action()

    async def _kill_workers(self) -> None:
        await self._every(self.config.kill_at, self._kill_a_worker)

    async def _kill_a_worker(self) -> None:
        observer = self.observer
        victim = self.workers[self.rng.randrange(len(self.workers))]
        with anyio.move_on_after(3):  # kill it while it holds leases
            while not observer.running_of(victim.index):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        held = [job.lease_id for job in observer.running_of(victim.index)]
        killed = time.monotonic()
        await victim.kill()
        self.report.faults["sigkill"] += 1
        self.tg.start_soon(self._watch_reclaim, held, killed)
        await anyio.sleep(0.5)
        await victim.start(self.tg)

    async def _held(self, held: list[str]) -> list[bytes | None]:
        found: list[bytes | None] = await _redis_call(
            self.redis_server.url, "HMGET", f"{self.keys_prefix}:lch", *held
        )
        return found

    async def _watch_reclaim(self, held: list[str], killed: float) -> None:
        observer, report = self.observer, self.report
        restarts = len(observer.redis_restarts)
        with contextlib.suppress(Exception):  # only leases the dead worker still held
            found = await self._held(held)
            held = [lease for lease, ch in zip(held, found, strict=True) if ch]
        if not held or len(observer.redis_restarts) != restarts:
            return
        with anyio.move_on_after(self.config.lease_ttl * 4):
            while True:
                try:
                    found = await self._held(held)
                except Exception:  # noqa: BLE001 - Redis is being restarted
                    found = [b"?"]
                if len(observer.redis_restarts) != restarts:
                    return  # the data went with a restart: not a reclamation figure
                if not any(found):
                    report.reclaim.append(time.monotonic() - killed)
                    return
                await anyio.sleep(0.05)
        report.violations.append(f"leases of a SIGKILLed worker not reclaimed: {held}")

    async def _restart_redis(self) -> None:
        await self._every(self.config.redis_at, self._restart_redis_once)

    async def _restart_redis_once(self) -> None:
        observer, server = self.observer, self.redis_server
        observer.redis_restarts.append(time.monotonic())
        await anyio.to_thread.run_sync(server.kill)
        await anyio.sleep(self.config.redis_down)
        await anyio.to_thread.run_sync(server.start)
        observer.redis_restarts.append(time.monotonic())
        self.report.faults["redis-restart"] += 1

    async def _show_progress(
        self, progress: Callable[[Report, Observer], None], progress_every: float
    ) -> None:
        while True:
            await anyio.sleep(progress_every)
            self.report.duration = time.monotonic() - self.t0
            self.report.jobs = len(self.observer.jobs)
            progress(self.report, self.observer)

    # -- after the run ---------------------------------------------------------------------

    async def finish(self) -> Report:
        """The closing checks: jobs that never ended, leaked slots, cooling, reclamation."""
        report, observer = self.report, self.observer
        report.duration = time.monotonic() - self.t0
        report.jobs = len(observer.jobs)
        still = sum(len(ids) for ids in observer.running.values())
        if still:
            report.violations.append(f"{still} jobs never ended")
        await self._check_leaks()
        observer.check_cooling()
        self._count_events()
        if not report.reclaim and report.faults["sigkill"]:
            report.violations.append("no reclamation measured after a SIGKILL")
        return report

    async def _check_leaks(self) -> None:
        url, report = self.redis_server.url, self.report
        in_flight, leases = [], 0
        for prefix in {self.keys_prefix, self.keys_prefix.replace("}", "-b}")}:
            in_flight += await _redis_call(url, "HVALS", f"{prefix}:inf")
            leases += await _redis_call(url, "HLEN", f"{prefix}:lch")
        report.leaked = sum(int(v) for v in in_flight) + int(leases)
        if report.leaked:
            report.violations.append(f"slots leaked: in_flight {in_flight}, leases {leases}")

    def _count_events(self) -> None:
        if self.config.log_dir is None:
            return
        for path in self.config.log_dir.glob("worker*.log"):
            for line in path.read_text(errors="replace").splitlines():
                for event in _EVENTS:
                    if event in line:
                        self.report.events[event] += 1


# -- the worker processes, seen from here ---------------------------------------------


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

"""
One worker process of the fleet: ``python -m benchmarks.fleet.worker --index N ...``.

It runs a :class:`~balancer.Balancer` over a ``UseapiAccountSource`` (the fake
upstream) and a ``RedisBackend`` (the fleet's redis-server), and ``--tasks``
job loops on it. Each job reports to the observer over a TCP connection of its
own: ``S`` once granted, ``E`` before its lease is released, ``R`` after. It
prints ``@ready`` once its balancer is entered and, when a line arrives on
stdin, stops and prints ``@summary {json}`` (its client-side counts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.buffered import BufferedByteReceiveStream

from balancer import Balancer, BalancerError, NoCapacityError, RedisBackend, UseapiAccountSource

from .orchestrator import EVENT

if TYPE_CHECKING:
    from balancer import Lease


class _JobFailed(Exception):
    """A simulated job failure (outcome "failed")."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one job will do, drawn before it asks for a lease."""

    cancel_wait: bool
    cancel_run: bool
    duration: float
    roll: float


class _ObserverLink:
    """One job's connection to the observer; every message waits for its ack."""

    def __init__(self) -> None:
        self.stream: anyio.abc.SocketStream | None = None
        self.reader: BufferedByteReceiveStream | None = None

    async def open(self, port: int) -> None:
        self.stream = await anyio.connect_tcp("127.0.0.1", port)
        self.reader = BufferedByteReceiveStream(self.stream)

    async def say(self, message: str) -> None:
        assert self.stream is not None and self.reader is not None
        await self.stream.send(message.encode() + b"\n")
        await self.reader.receive_until(b"\n", 64)

    async def close(self) -> None:
        """Say ``R`` (released) if the job ever reached the observer, then hang up."""
        if self.stream is None:
            return
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await self.say(f"R {time.monotonic():.6f}")
            await self.stream.aclose()


class _Client:
    """The worker process's balancer user: job loops, and the counts it reports."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.stats: Counter[str] = Counter()

    async def run(self) -> None:
        stop = anyio.Event()

        async def read_stdin() -> None:
            await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            stop.set()

        async with contextlib.AsyncExitStack() as stack:
            lb = await self._open_balancer(stack)
            _emit(EVENT + "ready")
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_stdin)
                for _ in range(self.opts.tasks):
                    tg.start_soon(self._job_loop, lb)
                await stop.wait()
                tg.cancel_scope.cancel()
        _emit(EVENT + "summary " + json.dumps(dict(self.stats)))

    async def _open_balancer(self, stack: contextlib.AsyncExitStack) -> Balancer:
        opts = self.opts
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
                self.stats[f"enter_{type(exc).__name__}"] += 1
                await anyio.sleep(0.2)

    async def _job_loop(self, lb: Balancer) -> None:
        while True:
            await self._job(lb)
            await anyio.lowlevel.checkpoint()

    def _plan(self) -> _Plan:
        rng, opts = self.rng, self.opts
        cancel_wait = rng.random() < opts.p_cancel_wait
        cancel_run = rng.random() < opts.p_cancel_run
        duration = rng.uniform(0.02, 0.3)
        if rng.random() < opts.p_long:
            duration = rng.uniform(opts.long_min, opts.long_max)
        return _Plan(cancel_wait, cancel_run, duration, rng.random())

    async def _job(self, lb: Balancer) -> None:
        rng, stats, plan = self.rng, self.stats, self._plan()
        link = _ObserverLink()
        granted = False
        with anyio.CancelScope() as scope:
            if plan.cancel_wait:
                scope.deadline = anyio.current_time() + rng.uniform(0.0, 0.3)
            acq_start = time.monotonic()
            try:
                async with lb.acquire(timeout=3.0) as lease:
                    granted = True
                    acq_done = time.monotonic()
                    scope.deadline = (
                        anyio.current_time() + rng.uniform(0, plan.duration)
                        if plan.cancel_run
                        else math.inf
                    )
                    with anyio.CancelScope(shield=True):
                        await link.open(self.opts.observer)
                        await link.say(
                            f"S {self.opts.index} {lease.channel} {lease.id} "
                            f"{lease.account.discord.reveal()} {acq_start:.6f} {acq_done:.6f}"
                        )
                    await self._run(lease, link, plan)
                stats["jobs"] += 1
            except _JobFailed:
                stats["jobs"] += 1
            except NoCapacityError:
                stats["no_capacity"] += 1
            except BalancerError as exc:
                stats[type(exc).__name__] += 1
                await anyio.sleep(0.1)
            finally:
                await link.close()
        if scope.cancelled_caught:
            stats["cancelled_run" if granted else "cancelled_wait"] += 1

    async def _run(self, lease: Lease, link: _ObserverLink, plan: _Plan) -> None:
        """The job on its lease: ok, throttled, failed (raises) or cut short; ``E`` says which."""
        opts = self.opts
        outcome = "ok"
        try:
            await anyio.sleep(plan.duration)
            if plan.roll < opts.p_throttle:
                lease.outcome = outcome = "throttled"
            elif plan.roll < opts.p_throttle + opts.p_fail:
                outcome = "failed"
                raise _JobFailed
        except BaseException:
            if outcome == "ok":
                outcome = "abandoned"
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await link.say(f"E {outcome} {int(lease.lost)}")


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _quiet_logging() -> None:
    """Warnings and above, to stderr (the orchestrator's log file for this worker)."""
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet.worker")
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
    _quiet_logging()
    anyio.run(_Client(opts).run, backend=opts.loop)


if __name__ == "__main__":
    main()

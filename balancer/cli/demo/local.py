"""``balancer demo`` in one process: the memory backend, every worker a task."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

import anyio

from ...balancer import Balancer
from .model import DemoConfig, RunResult, demo_upstream
from .view import Presenter
from .worker import MemoryObserver, run_worker

if TYPE_CHECKING:
    from .model import Snapshot

__all__ = ["run_local"]

#: Seconds between two frames of the live view.
FRAME_S = 0.1


async def run_local(config: DemoConfig, *, live: bool) -> RunResult:
    """Run the demo on this event loop, drawing it as it goes; return what the report showed."""
    upstream, limits = demo_upstream(config)
    workers = config.worker_count
    async with upstream as fake:
        title = (
            f"balancer demo · {config.channels} channels · {workers} workers · "
            f"fake useapi on {fake.base_url.removeprefix('http://')}"
        )
        observer = MemoryObserver(limits)
        async with Balancer(fake.source(), seed=config.seed, cooldown=config.cooldown) as lb:
            with Presenter(live=live, title=title) as presenter:
                elapsed = await _run_workers(lb, observer, config, presenter)
                final = observer.snapshot(lb.statistics(), elapsed, config.duration, workers)
                presenter.update(final, final=True)
                result = RunResult(
                    final=final,
                    waits=observer.waits,
                    elapsed=elapsed,
                    seed=config.seed,
                    mode="memory (one process)",
                    leaked=lb.statistics().in_flight,
                )
                presenter.report(result)
    return result


async def _run_workers(
    lb: Balancer, observer: MemoryObserver, config: DemoConfig, presenter: Presenter
) -> float:
    """Every worker until the last job ended, drawn as it goes; return the seconds it took."""
    rng = random.Random(config.seed)
    workers = config.worker_count
    started = time.monotonic()
    stop_at = started + config.duration

    def snapshot() -> Snapshot:
        elapsed = time.monotonic() - started
        return observer.snapshot(lb.statistics(), elapsed, config.duration, workers)

    async def draw() -> None:
        while True:
            presenter.update(snapshot())
            await anyio.sleep(FRAME_S)

    async with anyio.create_task_group() as view:
        view.start_soon(draw)
        async with anyio.create_task_group() as tg:
            for _ in range(workers):
                seeded = random.Random(rng.getrandbits(64))
                tg.start_soon(run_worker, lb, observer, config, seeded, stop_at)
        view.cancel_scope.cancel()
    return time.monotonic() - started

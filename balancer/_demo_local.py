"""``balancer demo`` in one process: the memory backend, every worker a task."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

import anyio

from ._demo import DemoConfig, MemoryObserver, RunResult, run_worker
from ._demo_view import Presenter
from .balancer import Balancer
from .testing import FakeUseapi, make_accounts, random_token

if TYPE_CHECKING:
    from ._demo import Snapshot

__all__ = ["run_local"]

#: Seconds between two frames of the live view.
FRAME_S = 0.1


async def run_local(config: DemoConfig, *, live: bool) -> RunResult:
    """Run the demo on this event loop, drawing it as it goes; return what the report showed."""
    raw = make_accounts(config.channels, max_jobs=config.limits, seed=config.seed or 0)
    limits = {channel: entry["maxJobs"] for channel, entry in raw.items()}
    rng = random.Random(config.seed)
    workers = config.worker_count
    async with FakeUseapi(raw, token=random_token("demo-api-token-")) as fake:
        title = (
            f"balancer demo · {config.channels} channels · {workers} workers · "
            f"fake useapi on {fake.base_url.removeprefix('http://')}"
        )
        observer = MemoryObserver(limits)
        async with Balancer(fake.source(), seed=config.seed, cooldown=config.cooldown) as lb:
            with Presenter(live=live, title=title) as presenter:
                started = time.monotonic()
                stop_at = started + config.duration

                def snapshot() -> Snapshot:
                    return observer.snapshot(
                        lb.statistics(), time.monotonic() - started, config.duration, workers
                    )

                async with anyio.create_task_group() as view:

                    async def draw() -> None:
                        while True:
                            presenter.update(snapshot())
                            await anyio.sleep(FRAME_S)

                    view.start_soon(draw)
                    async with anyio.create_task_group() as tg:
                        for _ in range(workers):
                            seeded = random.Random(rng.getrandbits(64))
                            tg.start_soon(run_worker, lb, observer, config, seeded, stop_at)
                    view.cancel_scope.cancel()
                elapsed = time.monotonic() - started
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

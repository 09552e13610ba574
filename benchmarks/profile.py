"""
``python -m benchmarks.profile SCENARIO``: cProfile the balancer's side of one scenario.

    python -m benchmarks.profile uncontended          # 10 channels, one task
    python -m benchmarks.profile channels             # 100,000 channels, one task
    python -m benchmarks.profile contended            # 1,000 tasks on 10 x 3
    python -m benchmarks.profile parse                # refresh of a 10,000-channel map
    python -m benchmarks.profile redis                # RedisBackend, 10 channels
    options: --loop trio, --sort cumtime, --top 40

cProfile inflates small Python calls, so read it for *where* the time goes,
and the suite's ratios for *how much*. (Cache misses, the cost behind the
channel-count flatness, are invisible to any profiler: they show up as the
same functions simply running slower at 100,000 channels.)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import uuid
from contextlib import AsyncExitStack
from typing import Any

import anyio

from balancer import Balancer, StaticAccountSource
from balancer.testing import make_accounts

from .harness import quiet_logging
from .memory import BodySource, Fairness, _contended, _cycles

SCENARIOS = ("uncontended", "channels", "contended", "parse", "redis")


async def _run(scenario: str, loop: str, ops: int, profiler: cProfile.Profile) -> None:
    async with AsyncExitStack() as stack:
        if scenario == "parse":
            a, b = (json.dumps(make_accounts(10_000, seed=seed)) for seed in (1, 2))
            lb = await stack.enter_async_context(Balancer(BodySource(a, b)))
            await lb.refresh()
            profiler.enable()
            for _ in range(max(1, ops // 1000)):
                await lb.refresh()
            profiler.disable()
            return
        backend: Any = None
        if scenario == "redis":
            from balancer.backends.redis import RedisBackend

            from .redis_bench import _redis_url

            backend = RedisBackend(_redis_url(), namespace=f"profile-{uuid.uuid4().hex[:8]}")
            ops = min(ops, 5_000)
        channels = 100_000 if scenario == "channels" else 10
        source = StaticAccountSource(make_accounts(channels))
        lb = await stack.enter_async_context(Balancer(source, backend=backend, seed=1))
        if scenario == "contended":
            cycle = _cycles(loop, lb, 1)["balancer"]
            turns = max(1, ops // 1000)
            run = _contended(cycle, 1000, turns, Fairness(1000, turns), 120.0)
            await run(1)
            profiler.enable()
            await run(1)
            profiler.disable()
            return
        acquire = lb.acquire
        for _ in range(min(ops, 1000)):  # warm up
            async with acquire():
                pass
        profiler.enable()
        for _ in range(ops):
            async with acquire():
                pass
        profiler.disable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--loop", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument("--ops", type=int, default=50_000)
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    quiet_logging()
    profiler = cProfile.Profile()
    anyio.run(_run, args.scenario, args.loop, args.ops, profiler, backend=args.loop)
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.strip_dirs().sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
Show that one acquire + release on ``RedisBackend`` costs the same at 10 and 10,000 channels.

Starts its own ``redis-server`` (see ``tests/_redis.py``), publishes maps of 10,
1,000 and 10,000 channels in separate namespaces, then times acquire + release
pairs in interleaved rounds (so drift hits every size alike) and prints the
median per pair, its ratio to the 10-channel figure, and its ratio to a floor:
two ``EVALSHA`` round trips of a trivial three-command Lua script through the
same client. It also counts the round trips each pair makes.

    python benchmarks/redis_flat.py [--rounds 15] [--pairs 200] [--loop asyncio|trio|both]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balancer.backends.base import BackendConfig
from balancer.backends.redis import RedisBackend, scripts
from tests._redis import RedisServer

SIZES = (10, 1_000, 10_000)
SELECTIONS = ("random", "weighted", "p2c")


class Counting:
    """Wraps the backend's client adapter to count round trips."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    async def run(self, script: Any, keys: Any, args: Any) -> Any:
        self.calls += 1
        return await self.inner.run(script, keys, args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def open_backend(url: str, namespace: str, selection: str, size: int, tg: Any) -> Any:
    backend = RedisBackend(url, namespace=namespace)
    config = BackendConfig(
        owner=f"bench{size}",
        selection=selection,  # type: ignore[arg-type]
        rng=random.Random(0),
        lease_ttl=60.0,
        cooldown=30.0,
        failures_to_cool=5,
    )
    await backend.open(config, lambda: None, tg)
    await backend.set_map({f"channel-{i:05d}": 3 for i in range(size)})
    # Some load, so that every size has busy and free channels alike.
    for n in range(size // 4):
        await backend.try_acquire(f"bench{size}-warm{n}", None)
    backend._client = Counting(backend._client)
    return backend


async def time_pairs(backend: Any, prefix: str, pairs: int) -> list[float]:
    samples = []
    for n in range(pairs):
        lease_id = f"{prefix}-{n}"
        started = time.perf_counter()
        channel = await backend.try_acquire(lease_id, None)
        await backend.release(lease_id, "ok")
        samples.append(time.perf_counter() - started)
        assert channel is not None
    return samples


async def time_floor(backend: Any, pairs: int) -> list[float]:
    client = backend._client.inner
    keys = [f"{{{backend.namespace}}}:floor"]
    await client.run(scripts.TRIVIAL, keys, [])  # load it once
    samples = []
    for _ in range(pairs):
        started = time.perf_counter()
        await client.run(scripts.TRIVIAL, keys, [])
        await client.run(scripts.TRIVIAL, keys, [])
        samples.append(time.perf_counter() - started)
    return samples


async def bench(url: str, selection: str, rounds: int, pairs: int) -> None:
    async with anyio.create_task_group() as tg:
        backends = {
            size: await open_backend(url, f"bench-{selection}-{size}", selection, size, tg)
            for size in SIZES
        }
        samples: dict[int | str, list[float]] = {size: [] for size in SIZES}
        samples["floor"] = []
        for r in range(rounds):
            order: list[int | str] = [*SIZES, "floor"]
            random.Random(r).shuffle(order)
            for item in order:
                if item == "floor":
                    samples["floor"] += await time_floor(backends[SIZES[0]], pairs)
                else:
                    size = int(item)
                    samples[size] += await time_pairs(backends[size], f"r{r}", pairs)
        floor = statistics.median(samples["floor"])
        base = statistics.median(samples[SIZES[0]])
        print(f"\nselection={selection}  ({rounds} rounds x {pairs} pairs per size)")
        print(f"  floor: 2 x EVALSHA of a trivial script  {floor * 1e6:8.1f} us")
        for size in SIZES:
            backend = backends[size]
            trips = backend._client.calls / (rounds * pairs)
            median = statistics.median(samples[size])
            print(
                f"  {size:>6} channels: acquire+release {median * 1e6:8.1f} us"
                f"  x{median / base:5.2f} vs 10 channels"
                f"  x{median / floor:5.2f} vs floor"
                f"  ({trips:.2f} round trips per pair)"
            )
        for backend in backends.values():
            await backend.close()
        tg.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--loop", choices=["asyncio", "trio", "both"], default="both")
    parser.add_argument("--selection", choices=[*SELECTIONS, "all"], default="all")
    options = parser.parse_args()
    loops = ["asyncio", "trio"] if options.loop == "both" else [options.loop]
    selections = list(SELECTIONS) if options.selection == "all" else [options.selection]
    with RedisServer() as server:
        for loop in loops:
            client = "redis-py" if loop == "asyncio" else "coredis"
            print(f"== {loop} ({client}), redis-server on {server.url}")
            for selection in selections:
                anyio.run(bench, server.url, selection, options.rounds, options.pairs, backend=loop)


if __name__ == "__main__":
    main()

"""
Timing machinery shared by every scenario.

The machines these run on are shared and noisy, so no absolute time is ever a
result. Each scenario builds its variants (the balancer and its baselines) in
one process, calibrates a batch size per variant, then runs *rounds*: in each
round every variant runs one batch, in a freshly shuffled order. A ratio is
the median over rounds of ``variant / baseline`` within the same round (so a
slow minute on the machine hits both sides of a ratio), and its spread is the
interquartile range of those per-round ratios.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from balancer import Balancer

__all__ = [
    "Batch",
    "Ratio",
    "Samples",
    "Settings",
    "acquire_release",
    "interleave",
    "quiet_logging",
    "ratio_of",
]

#: Runs ``n`` operations and returns the seconds they took.
Batch = Callable[[int], Awaitable[float]]

clock = time.perf_counter


@dataclass(frozen=True)
class Settings:
    """How hard to measure: ``--quick`` trades precision for time."""

    quick: bool
    #: interleaved rounds per scenario
    rounds: int
    #: target seconds of one batch (per variant, per round)
    batch_s: float
    #: event loops to run the in-process scenarios on
    loops: tuple[str, ...]
    seed: int = 5

    @classmethod
    def make(cls, *, quick: bool, loops: tuple[str, ...] | None = None) -> Settings:
        if quick:
            return cls(True, rounds=3, batch_s=0.012, loops=loops or ("asyncio",))
        return cls(False, rounds=9, batch_s=0.04, loops=loops or ("asyncio", "trio"))


@dataclass(frozen=True)
class Ratio:
    """A median of per-round ratios, with its interquartile range."""

    median: float
    low: float
    high: float
    rounds: int

    def __str__(self) -> str:
        return f"{self.median:.2f}×"

    @property
    def spread(self) -> str:
        return f"{self.low:.2f}–{self.high:.2f}"


def ratio_of(values: list[float]) -> Ratio:
    """Summarise per-round ratios: median and interquartile range."""
    if not values:
        raise ValueError("no rounds")
    if len(values) < 4:
        return Ratio(statistics.median(values), min(values), max(values), len(values))
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Ratio(q2, q1, q3, len(values))


@dataclass
class Samples:
    """Seconds per operation of each variant, one value per round."""

    per_op: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.per_op[name])

    def ratio(self, name: str, base: str) -> Ratio:
        """``name`` against ``base``, paired round by round."""
        pairs = zip(self.per_op[name], self.per_op[base], strict=True)
        return ratio_of([a / b for a, b in pairs])

    def worst_ratio(self, names: list[str], base: str) -> Ratio:
        """The slowest of ``names`` in each round, against ``base``."""
        rounds = zip(*(self.per_op[n] for n in names), strict=True)
        return ratio_of([max(r) / b for r, b in zip(rounds, self.per_op[base], strict=True)])


def acquire_release(lb: Balancer) -> Batch:
    """``n`` uncontended ``async with lb.acquire(): pass`` cycles in one task."""

    async def run(n: int) -> float:
        acquire = lb.acquire
        start = clock()
        for _ in range(n):
            async with acquire():
                pass
        return clock() - start

    return run


async def _calibrate(run: Batch, batch_s: float, max_n: int) -> int:
    """Grow ``n`` until a batch takes a sizeable part of ``batch_s``; doubles as warm-up."""
    n = 1
    while True:
        elapsed = await run(n)
        if elapsed >= batch_s / 4 or n >= max_n:
            break
        n = min(max_n, n * 8 if elapsed < batch_s / 64 else n * 2)
    per_op = max(elapsed / n, 1e-9)
    return max(1, min(max_n, round(batch_s / per_op)))


async def interleave(
    variants: Mapping[str, Batch],
    settings: Settings,
    *,
    sizes: Mapping[str, int] | None = None,
    rounds: int | None = None,
    max_n: int = 1_000_000,
    rng: random.Random | None = None,
) -> Samples:
    """
    Run every variant once per round, in a shuffled order, for ``rounds`` rounds.

    Args:
        variants: name -> batch runner.
        settings: rounds and target batch duration.
        sizes: fixed batch sizes (skips calibration; one warm-up batch each).
        rounds: overrides ``settings.rounds``.
        max_n: the largest batch calibration may choose.
        rng: shuffles the order within each round.
    """
    rng = rng or random.Random(settings.seed)
    chosen: dict[str, int] = {}
    for name, run in variants.items():
        if sizes is not None and name in sizes:
            await run(sizes[name])
            chosen[name] = sizes[name]
        else:
            chosen[name] = await _calibrate(run, settings.batch_s, max_n)
    per_op: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    # The fixtures are long-lived (a service that has been up for a while):
    # keep the collector from walking them in the middle of someone's batch.
    gc.collect()
    gc.freeze()
    try:
        for _ in range(rounds or settings.rounds):
            rng.shuffle(order)
            for name in order:
                n = chosen[name]
                per_op[name].append(await variants[name](n) / n)
    finally:
        gc.unfreeze()
    return Samples(per_op)


def quiet_logging() -> None:
    """
    Configure structlog as a production service would: INFO and above, rendered
    to /dev/null (so the cost of formatting the events that *are* on stays in
    the figures, but nothing floods the terminal), DEBUG filtered out.

    Unconfigured, structlog renders every level to stdout, DEBUG included; the
    balancer logs each lease at DEBUG, so leaving it unconfigured would measure
    the terminal, not the balancer.
    """
    import structlog

    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sink),
        cache_logger_on_first_use=False,
    )

"""
In-process scenarios: the balancer on its default ``MemoryBackend``.

Each ``scenario_*`` coroutine runs inside one event loop (``anyio.run``), builds
its variants, interleaves them (:func:`benchmarks.harness.interleave`) and adds
rows and plot series to the :class:`~benchmarks.report.Report`.

Baselines: ``asyncio.Semaphore`` (``trio.Semaphore`` on trio) is the physical
floor of an in-process limiter; ``anyio.CapacityLimiter`` is the best
single-key limiter (its ``async with`` yields to the loop once per acquire, as
anyio's checkpoint rules require); :class:`~benchmarks.naive.NaiveBalancer` is
what a newcomer writes.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from balancer import Balancer, ParsedAccounts, StaticAccountSource, parse_account_map
from balancer.testing import make_accounts

from .harness import Batch, Settings, acquire_release, clock, interleave
from .naive import NaiveBalancer

if TYPE_CHECKING:
    from .report import Report

__all__ = [
    "BodySource",
    "scenario_channels",
    "scenario_contended",
    "scenario_memory",
    "scenario_parse_apply",
]

MAX_JOBS = 3
#: The channel counts of the flatness sweep.
CHANNELS_FULL = (10, 100, 1_000, 10_000, 100_000)
CHANNELS_QUICK = (10, 1_000, 100_000)
#: The concurrency sweep: tasks sharing 10 channels x maxJobs 3.
TASKS_FULL = (1, 3, 10, 30, 100, 300, 1_000)
TASKS_QUICK = (1, 30, 1_000)

FLOOR = "floor semaphore"
LIMITER = "anyio.CapacityLimiter"
BALANCER = "balancer"
NAIVE = "naive balancer"
BALANCER_TIMEOUT = "balancer, acquire(timeout=30)"


# -- fixtures -------------------------------------------------------------------


class BodySource:
    """
    A source that decodes and parses a raw JSON body on every fetch, as
    ``UseapiAccountSource`` does with the HTTP response; with several bodies it
    serves them in turn (so every refresh brings a changed map).
    """

    def __init__(self, *bodies: str) -> None:
        self._bodies = bodies
        self._next = 0

    async def fetch(self) -> ParsedAccounts:
        body = self._bodies[self._next % len(self._bodies)]
        self._next += 1
        return parse_account_map(json.loads(body))


@asynccontextmanager
async def _balancers(
    counts: tuple[int, ...], *, seed: int, **options: Any
) -> AsyncIterator[dict[int, Balancer]]:
    async with AsyncExitStack() as stack:
        found: dict[int, Balancer] = {}
        for n in counts:
            source = StaticAccountSource(make_accounts(n, max_jobs=MAX_JOBS, seed=n))
            found[n] = await stack.enter_async_context(Balancer(source, seed=seed, **options))
        yield found


def _floor_semaphore(loop: str, value: int) -> Any:
    if loop == "asyncio":
        return asyncio.Semaphore(value)
    import trio

    return trio.Semaphore(value)


def _floor_name(loop: str) -> str:
    return "asyncio.Semaphore" if loop == "asyncio" else "trio.Semaphore"


# -- batches: n uncontended acquire+release cycles in one task ---------------------


def _await_release(lb: Any) -> Batch:
    """``await release(await acquire())`` on a Balancer or a NaiveBalancer."""

    async def run(n: int) -> float:
        acquire, release = lb.acquire, lb.release
        start = clock()
        for _ in range(n):
            await release(await acquire())
        return clock() - start

    return run


def _async_with(limiter: Any) -> Batch:
    async def run(n: int) -> float:
        start = clock()
        for _ in range(n):
            async with limiter:
                pass
        return clock() - start

    return run


def _statistics(lb: Balancer) -> Batch:
    async def run(n: int) -> float:
        stats = lb.statistics
        start = clock()
        for _ in range(n):
            stats()
        return clock() - start

    return run


# -- uncontended, channel-count flatness, statistics() -----------------------------


async def scenario_channels(loop: str, settings: Settings, report: Report) -> None:
    """
    Uncontended acquire+release (one task, nothing else running) for the
    balancer and the naive balancer at every channel count, with the floor
    semaphore and ``anyio.CapacityLimiter`` in the same interleaved rounds.
    """
    counts = CHANNELS_QUICK if settings.quick else CHANNELS_FULL
    floor = _floor_name(loop)
    async with _balancers(counts, seed=settings.seed) as lbs:
        variants: dict[str, Batch] = {
            FLOOR: _async_with(_floor_semaphore(loop, 30)),
            LIMITER: _async_with(anyio.CapacityLimiter(30)),
            "balancer (await + release)": _await_release(lbs[10]),
        }
        for n in counts:
            variants[f"{BALANCER} @{n}"] = acquire_release(lbs[n])
            limits = dict.fromkeys((f"ch{i}" for i in range(n)), MAX_JOBS)
            variants[f"{NAIVE} @{n}"] = _await_release(NaiveBalancer(limits, seed=settings.seed))
        samples = await interleave(variants, settings)

        report.target(
            "uncontended acquire+release, 10 channels, vs anyio.CapacityLimiter",
            loop,
            samples.ratio(f"{BALANCER} @10", LIMITER),
            0.5,
            note="`async with lb.acquire()` vs `async with limiter`",
        )
        report.info(
            "… same, `await acquire()` + `await release()` form",
            loop,
            samples.ratio("balancer (await + release)", LIMITER),
        )
        report.info(
            f"uncontended, 10 channels, vs {floor} (the floor)",
            loop,
            samples.ratio(f"{BALANCER} @10", FLOOR),
            note=f"anyio.CapacityLimiter is {samples.ratio(LIMITER, FLOOR)} the floor",
        )
        report.info(
            "uncontended, 10 channels, naive balancer vs anyio.CapacityLimiter",
            loop,
            samples.ratio(f"{NAIVE} @10", LIMITER),
        )
        top = counts[-1]
        report.target(
            f"cost at {top:,} channels vs at 10 channels",
            loop,
            samples.ratio(f"{BALANCER} @{top}", f"{BALANCER} @10"),
            1.3,
            note="uncontended acquire+release",
        )
        report.info(
            f"… naive balancer, {top:,} channels vs 10",
            loop,
            samples.ratio(f"{NAIVE} @{top}", f"{NAIVE} @10"),
            note=f"at {top:,} channels the naive balancer costs "
            f"{samples.ratio(f'{NAIVE} @{top}', f'{BALANCER} @{top}').median:,.0f}× the balancer",
        )

        def vs_floor(name: str) -> float:
            return samples.ratio(name, FLOOR).median

        report.series[f"channels/{loop}"] = {
            "x": list(counts),
            "xlabel": "channels (maxJobs 3 each)",
            "ylabel": "cost per acquire+release (× the loop's one-key Semaphore)",
            "title": f"Uncontended acquire+release vs channel count ({loop})",
            "lines": {
                BALANCER: [vs_floor(f"{BALANCER} @{n}") for n in counts],
                NAIVE: [vs_floor(f"{NAIVE} @{n}") for n in counts],
                LIMITER + " (one key)": [vs_floor(LIMITER)] * len(counts),
                floor + " (one key)": [1.0] * len(counts),
            },
        }

        # statistics(): a full snapshot, O(channels) by design.
        mid = 10_000 if 10_000 in lbs else counts[1]
        stats = await interleave(
            {
                "acquire+release @10": acquire_release(lbs[10]),
                "statistics @10": _statistics(lbs[10]),
                f"statistics @{mid}": _statistics(lbs[mid]),
            },
            settings,
        )
        for n in (10, mid):
            ratio = stats.ratio(f"statistics @{n}", "acquire+release @10")
            report.info(
                f"statistics() at {n:,} channels vs one acquire+release at 10",
                loop,
                ratio,
                note=f"{ratio.median / n:.2f}× per channel",
            )


# -- contended: many tasks on 10 channels x 3 ----------------------------------------


@dataclass
class Fairness:
    """Did every task get its turns? Worst case over every run of one variant."""

    tasks: int
    turns: int
    runs: int = 0
    unfinished: int = 0
    #: fewest turns any task had completed when the first task finished
    min_turns_at_first_finish: int | None = None
    #: last task's completion time / first task's completion time (from the start)
    completion_spread: float = 1.0
    spreads: list[float] = field(default_factory=list)

    def record(self, done_at: list[float], turns_done: list[int], first: list[int] | None) -> None:
        self.runs += 1
        self.unfinished = max(self.unfinished, sum(t < self.turns for t in turns_done))
        if first is not None:
            low = min(first)
            if self.min_turns_at_first_finish is None or low < self.min_turns_at_first_finish:
                self.min_turns_at_first_finish = low
        finished = [t for t in done_at if t > 0]
        if finished:
            spread = max(finished) / min(finished)
            self.spreads.append(spread)
            self.completion_spread = max(self.completion_spread, spread)

    @property
    def starved(self) -> bool:
        """A task never finished, or had under half its share when the first one finished."""
        low = self.min_turns_at_first_finish
        return self.unfinished > 0 or low is None or 2 * low < self.turns

    def describe(self) -> str:
        if self.unfinished:
            return f"STARVED: {self.unfinished}/{self.tasks} tasks did not finish their turns"
        return (
            f"{'STARVED' if self.starved else 'no task starved'}: all {self.tasks} tasks "
            f"did {self.turns} turns; when the first finished, the slowest had "
            f"{self.min_turns_at_first_finish}/{self.turns}; completion spread "
            f"(last/first) ≤ {self.completion_spread:.2f}"
        )


Cycle = Any  # an async callable: one acquire -> checkpoint -> release


def _contended(cycle: Cycle, tasks: int, turns: int, fairness: Fairness, deadline: float) -> Batch:
    """``tasks`` tasks released together, each doing ``turns`` cycles."""

    async def run(n: int) -> float:
        done_at = [0.0] * tasks
        turns_done = [0] * tasks
        first: list[list[int]] = []
        go = anyio.Event()
        start = 0.0

        async def worker(i: int) -> None:
            await go.wait()
            for _ in range(turns):
                await cycle()
                turns_done[i] += 1
            done_at[i] = clock() - start
            if not first:
                first.append(list(turns_done))

        with anyio.move_on_after(deadline):
            async with anyio.create_task_group() as tg:
                for i in range(tasks):
                    tg.start_soon(worker, i)
                await anyio.lowlevel.checkpoint()  # let every worker reach go.wait()
                start = clock()
                go.set()
        elapsed = clock() - start
        fairness.record(done_at, turns_done, first[0] if first else None)
        return elapsed

    return run


def _cycles(loop: str, lb: Balancer, seed: int) -> dict[str, Cycle]:
    limiter = anyio.CapacityLimiter(30)
    floor = _floor_semaphore(loop, 30)
    nb = NaiveBalancer(dict.fromkeys((f"ch{i}" for i in range(10)), MAX_JOBS), seed=seed)
    acquire = lb.acquire
    checkpoint = anyio.sleep

    async def balancer_cycle() -> None:
        async with acquire():
            await checkpoint(0)

    async def balancer_timeout_cycle() -> None:
        async with acquire(timeout=30):
            await checkpoint(0)

    async def limiter_cycle() -> None:
        async with limiter:
            await checkpoint(0)

    async def floor_cycle() -> None:
        async with floor:
            await checkpoint(0)

    async def naive_cycle() -> None:
        channel = await nb.acquire()
        await checkpoint(0)
        await nb.release(channel)

    return {
        BALANCER: balancer_cycle,
        BALANCER_TIMEOUT: balancer_timeout_cycle,
        LIMITER: limiter_cycle,
        FLOOR: floor_cycle,
        NAIVE: naive_cycle,
    }


async def scenario_contended(loop: str, settings: Settings, report: Report) -> None:
    """
    1,000 tasks on 10 channels x maxJobs 3, each doing K acquire -> sleep(0) ->
    release cycles, against ``anyio.CapacityLimiter(30)`` with the same
    workload; then the same workload from 1 to 1,000 tasks (the plot).

    The naive balancer wakes every waiter on every release (O(tasks) per
    cycle), so it gets its own, shorter comparison (full runs only), as does
    the balancer with a timeout (which the limiter lacks).
    """
    tasks, turns = 1_000, (5 if settings.quick else 10)
    deadline = 120.0
    floor = _floor_name(loop)
    async with _balancers((10,), seed=settings.seed) as lbs:
        cycles = _cycles(loop, lbs[10], settings.seed)
        fairness = {name: Fairness(tasks, turns) for name in cycles}
        names = [BALANCER, LIMITER, FLOOR] + ([] if settings.quick else [BALANCER_TIMEOUT])
        variants = {
            name: _contended(cycles[name], tasks, turns, fairness[name], deadline) for name in names
        }
        samples = await interleave(variants, settings, sizes=dict.fromkeys(variants, tasks * turns))
        fair = fairness[BALANCER]
        report.target(
            f"contended: {tasks:,} tasks on 10 channels × maxJobs 3, vs anyio.CapacityLimiter(30)",
            loop,
            samples.ratio(BALANCER, LIMITER),
            1.0,
            ok=not fair.starved,
            note=f"{turns} acquire→sleep(0)→release turns per task; {fair.describe()}",
        )
        report.info(
            "… anyio.CapacityLimiter(30) fairness, same workload",
            loop,
            measured="starved" if fairness[LIMITER].starved else "fair",
            note=fairness[LIMITER].describe(),
        )
        report.info(
            f"… contended, vs {floor}(30) (the floor)",
            loop,
            samples.ratio(BALANCER, FLOOR),
            note=fairness[FLOOR].describe(),
        )
        if not settings.quick:
            report.info(
                "… contended with `acquire(timeout=30)` vs anyio.CapacityLimiter(30)",
                loop,
                samples.ratio(BALANCER_TIMEOUT, LIMITER),
                note="the limiter has no timeout; " + fairness[BALANCER_TIMEOUT].describe(),
            )
            # The naive balancer wakes every waiter on each release: O(tasks) per
            # cycle, so fewer turns and rounds (its fairness is the point).
            naive_turns = 3
            naive_fair = Fairness(tasks, naive_turns)
            naive = await interleave(
                {
                    NAIVE: _contended(cycles[NAIVE], tasks, naive_turns, naive_fair, deadline),
                    LIMITER: _contended(
                        cycles[LIMITER], tasks, naive_turns, Fairness(tasks, naive_turns), deadline
                    ),
                },
                settings,
                sizes=dict.fromkeys((NAIVE, LIMITER), tasks * naive_turns),
                rounds=2,
            )
            report.info(
                "… contended, naive balancer vs anyio.CapacityLimiter(30)",
                loop,
                naive.ratio(NAIVE, LIMITER),
                note=f"{naive_turns} turns per task; {naive_fair.describe()}",
            )

        # Cost per cycle vs concurrency, for the plot.
        counts = TASKS_QUICK if settings.quick else TASKS_FULL
        lines = [BALANCER, LIMITER, FLOOR] if settings.quick else [BALANCER, NAIVE, LIMITER, FLOOR]
        total, least = (300, 3) if settings.quick else (3_000, 3)
        sweep: dict[str, Batch] = {}
        sizes: dict[str, int] = {}
        for n_tasks in counts:
            k = max(least, total // n_tasks)
            for name in lines:
                key = f"{name} x{n_tasks}"
                sweep[key] = _contended(cycles[name], n_tasks, k, Fairness(n_tasks, k), deadline)
                sizes[key] = n_tasks * k
        swept = await interleave(sweep, settings, sizes=sizes, rounds=3)
        unit = f"{FLOOR} x1"
        report.series[f"concurrency/{loop}"] = {
            "x": list(counts),
            "xlabel": "concurrent tasks (10 channels × maxJobs 3 = 30 slots)",
            "ylabel": "cost per cycle (× 1 task on the loop's Semaphore)",
            "title": f"acquire→sleep(0)→release vs concurrency ({loop})",
            "lines": {
                name: [swept.ratio(f"{name} x{n}", unit).median for n in counts] for name in lines
            },
        }
        top = counts[-1]
        report.info(
            f"cost per cycle at {top:,} tasks vs 1 task (balancer)",
            loop,
            swept.ratio(f"{BALANCER} x{top}", f"{BALANCER} x1"),
            note=f"anyio.CapacityLimiter: {swept.ratio(f'{LIMITER} x{top}', f'{LIMITER} x1')}",
        )


# -- parse + apply a 10,000-channel map ------------------------------------------------


async def scenario_parse_apply(loop: str, settings: Settings, report: Report) -> None:
    """
    ``json.loads`` + ``parse_account_map`` + the balancer applying the result
    (``await lb.refresh()`` against a source that serves the raw body), against
    ``json.loads`` of the same body.
    """
    n = 10_000
    body_a = json.dumps(make_accounts(n, max_jobs=MAX_JOBS, seed=1))
    # Same channels, every token and server rotated: each refresh changes every entry.
    body_b = json.dumps(make_accounts(n, max_jobs=MAX_JOBS, seed=2))
    loads = json.loads

    async def json_only(k: int) -> float:
        start = clock()
        for _ in range(k):
            loads(body_a)
        return clock() - start

    async def parse_only(k: int) -> float:
        start = clock()
        for _ in range(k):
            parse_account_map(loads(body_a))
        return clock() - start

    async with (
        Balancer(BodySource(body_a, body_b), seed=settings.seed) as changing,
        Balancer(BodySource(body_a), seed=settings.seed) as same,
    ):

        def refresh(lb: Balancer) -> Batch:
            async def run(k: int) -> float:
                start = clock()
                for _ in range(k):
                    await lb.refresh()
                return clock() - start

            return run

        async def cold(k: int) -> float:
            start = clock()
            for _ in range(k):
                async with Balancer(BodySource(body_a), seed=settings.seed):
                    pass
            return clock() - start

        samples = await interleave(
            {
                "json.loads": json_only,
                "parse": parse_only,
                "refresh (every entry changed)": refresh(changing),
                "refresh (unchanged)": refresh(same),
                "cold start": cold,
            },
            settings,
            max_n=50,
        )
    refreshes = ["refresh (every entry changed)", "refresh (unchanged)"]
    report.target(
        f"parse + apply a {n:,}-channel account map vs json.loads of the same body",
        loop,
        samples.worst_ratio(refreshes, "json.loads"),
        3.0,
        note="`await lb.refresh()` on a source doing json.loads + parse_account_map of the "
        "body; per round the slower of a map with every entry changed and an unchanged map",
    )
    report.info(
        "… parse only (json.loads + parse_account_map)", loop, samples.ratio("parse", "json.loads")
    )
    report.info(
        "… refresh, every entry changed (tokens rotated)",
        loop,
        samples.ratio(refreshes[0], "json.loads"),
    )
    report.info("… refresh, unchanged map", loop, samples.ratio(refreshes[1], "json.loads"))
    report.info(
        "… cold start (enter a new Balancer on that body, exit)",
        loop,
        samples.ratio("cold start", "json.loads"),
    )


# -- memory (tracemalloc) -----------------------------------------------------------------


async def _traced(build: Any) -> tuple[int, Any]:
    """Bytes still allocated after ``await build()`` (its result kept alive), and that result."""
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    kept = await build()
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before, kept


async def scenario_memory(loop: str, settings: Settings, report: Report) -> None:
    """
    Bytes per channel: a balancer entered on a 10,000-channel map minus one on
    an empty map (parsed accounts and their tokens included: they live as long
    as the balancer). Bytes per live lease: 10,000 leases held at once.
    """
    n = 10_000
    body = json.dumps(make_accounts(n, max_jobs=MAX_JOBS))
    empty = json.dumps({})
    reps = 1 if settings.quick else 3
    per_channel: list[float] = []
    per_lease: list[float] = []
    naive_per_channel: list[float] = []
    tracemalloc.start()
    try:
        for _ in range(reps):
            async with AsyncExitStack() as stack:

                async def enter(raw: str, stack: AsyncExitStack = stack) -> Balancer:
                    return await stack.enter_async_context(Balancer(BodySource(raw)))

                base, _ = await _traced(lambda: enter(empty))
                full, lb = await _traced(lambda: enter(body))
                per_channel.append((full - base) / n)

                leases: list[Any] = [None] * n

                async def hold(lb: Balancer = lb, leases: list[Any] = leases) -> None:
                    for i in range(n):
                        leases[i] = await lb.acquire()

                held, _ = await _traced(hold)
                per_lease.append(held / n)
                for lease in leases:
                    await lb.release(lease)

            parsed = parse_account_map(json.loads(body)).accounts

            async def naive(parsed: Any = parsed) -> NaiveBalancer:
                return NaiveBalancer({c: a.max_jobs for c, a in parsed.items()})

            size, _ = await _traced(naive)
            naive_per_channel.append(size / n)
    finally:
        tracemalloc.stop()
    report.target_bytes(
        f"memory per channel ({n:,}-channel map, tracemalloc)",
        loop,
        statistics.median(per_channel),
        1024,
        note="balancer entered on the map minus one on an empty map; parsed accounts, "
        "tokens, backend counts and indexes included",
    )
    report.target_bytes(
        f"memory per live lease ({n:,} leases held)",
        loop,
        statistics.median(per_lease),
        512,
        note="Lease, its id, and every table that tracks it",
    )
    report.info(
        "… naive balancer per channel (dict of counters + limits only, no accounts)",
        loop,
        measured=f"{statistics.median(naive_per_channel):.0f} B",
    )

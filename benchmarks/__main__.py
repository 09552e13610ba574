"""
``python -m benchmarks``: run the suite, print the table, write results and plots.

    python -m benchmarks                 # full run (a few minutes)
    python -m benchmarks --quick         # smoke run, under 20 s
    python -m benchmarks --out DIR       # results.md, results.json, *.png (default benchmarks/results)
    python -m benchmarks --only redis    # some scenarios: channels, contended, parse, memory, redis
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio

from . import memory, plots, redis_bench
from .harness import Settings, quiet_logging
from .report import Report, machine_meta

Scenario = Callable[[str, Settings, Report], Awaitable[None]]

#: name -> (runs on every loop in settings.loops?, coroutine)
SCENARIOS: dict[str, tuple[bool, Scenario]] = {
    "channels": (True, memory.scenario_channels),
    "contended": (True, memory.scenario_contended),
    "parse": (False, memory.scenario_parse_apply),
    "memory": (False, memory.scenario_memory),
    "redis": (True, redis_bench.scenario_redis),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[1]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: under 20 s")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results",
        help="where results.md, results.json and the plots go (default: benchmarks/results)",
    )
    parser.add_argument(
        "--loops",
        default=None,
        help="comma-separated event loops (default: asyncio,trio; --quick: asyncio)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated scenarios among {', '.join(SCENARIOS)} (default: all)",
    )
    args = parser.parse_args(argv)

    loops = tuple(args.loops.split(",")) if args.loops else None
    settings = Settings.make(quick=args.quick, loops=loops)
    only = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [name for name in only if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")

    quiet_logging()
    report = Report(meta=machine_meta())
    report.meta["mode"] = "quick" if settings.quick else "full"
    report.meta["when"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    started = time.perf_counter()
    for name in only:
        every_loop, scenario = SCENARIOS[name]
        for loop in settings.loops if every_loop else settings.loops[:1]:
            t0 = time.perf_counter()
            print(f"· {name} ({loop}) …", end="", flush=True)
            anyio.run(scenario, loop, settings, report, backend=loop)
            print(f" {time.perf_counter() - t0:.1f} s", flush=True)
    report.meta["duration_s"] = time.perf_counter() - started

    why_not = plots.available()
    written: list[str] = []
    args.out.mkdir(parents=True, exist_ok=True)
    if why_not is None:
        written = plots.render(report.series, args.out)
    report.write(args.out, plots=written, plot_note=why_not or "")

    print()
    print(report.markdown())
    print()
    print("Targets of issue 5:")
    print()
    print(report.markdown(targets_only=True))
    print()
    print(report.summary())
    print(f"wrote {args.out / 'results.md'}" + (f" and {', '.join(written)}" if written else ""))
    if why_not:
        print(why_not)
    print(f"total {report.meta['duration_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

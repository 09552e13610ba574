"""
``python -m benchmarks.soak``: the chaos fleet for a long run, with a live summary.

The same fleet and fault schedule as ``tests/chaos`` (4 worker processes on
asyncio and trio, one throwaway redis-server, the fake upstream; upstream
faults in turn, the map changing every 1-2 s, a worker SIGKILLed and Redis
restarted empty at intervals, clients cancelling waits and jobs), checked by
the same independent observer (:mod:`benchmarks.fleet` states its rules).
For release checks; not part of CI::

    python -m benchmarks.soak                  # 10 minutes
    python -m benchmarks.soak --duration 60    # one minute
    python -m benchmarks.soak --logs DIR       # keep the workers' warning logs
    python -m benchmarks.soak --aggressive --redis-down 3 --duration 40
                                               # the known limit: Redis down > lease_ttl

Prints a line of figures every ``--every`` seconds and the final summary; exits
1 when the observer saw any violation (over-dispatch, a stale map, a grant
while cooling, a leaked slot).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import anyio

from balancer.testing import RedisServer

from .fleet import FleetConfig, Observer, Report, run_fleet


def _live(report: Report, observer: Observer) -> None:
    running = sum(len(ids) for ids in observer.running.values())
    faults = sum(report.faults.values())
    rate = report.jobs / report.duration if report.duration else 0.0
    print(
        f"[{report.duration:6.0f}s] jobs={report.jobs} ({rate:.0f}/s) running={running} "
        f"faults={faults} sigkill={report.faults['sigkill']} "
        f"redis_restart={report.faults['redis-restart']} "
        f"max_over_dispatch={report.max_over_dispatch} "
        f"longest_stall={report.longest_stall:.2f}s violations={len(report.violations)}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=10, help="job tasks per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between live lines")
    parser.add_argument("--logs", type=Path, default=None, help="keep worker logs here")
    parser.add_argument(
        "--redis-down",
        type=float,
        default=0.0,
        help="seconds Redis stays down at each restart (above lease_ttl=2 s, leases of "
        "running jobs are lost: the documented limit)",
    )
    parser.add_argument(
        "--aggressive",
        action="store_true",
        help="map change every 0.2-0.6 s, faults every 0.8 s, SIGKILL every 7 s, Redis "
        "restart every 6 s, 5%% throttled and 10%% failed jobs, 16 tasks per worker",
    )
    args = parser.parse_args(argv)
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="balancer-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    config = FleetConfig(
        duration=args.duration,
        workers=args.workers,
        tasks_per_worker=args.tasks,
        seed=args.seed,
        log_dir=log_dir,
        redis_down=args.redis_down,
    )
    if args.aggressive:
        config.map_every = (0.2, 0.6)
        config.fault_on = config.fault_off = 0.8
        config.kill_at, config.redis_at = (3.0, 7.0), (5.0, 6.0)
        config.p_throttle, config.p_fail = 0.05, 0.1
        config.tasks_per_worker = 16
    with RedisServer() as server:
        report = anyio.run(run_fleet, config, server, _live, args.every)
    print(report.summary().replace("chaos:", "soak:", 1))
    for violation in report.violations[:50]:
        print("  " + violation)
    print(f"worker logs: {log_dir}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())

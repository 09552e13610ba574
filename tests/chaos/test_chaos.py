"""
The chaos run: 4 worker processes, one real Redis, the fake upstream, and faults.

See :mod:`benchmarks.fleet` for the fleet, the fault schedule, and the exact
rules the independent observer checks (over-dispatch, stale maps, cooling,
leaks). This test runs the fleet for ``FleetConfig.duration`` seconds and fails
on any violation; the summary line of figures is printed (``pytest -s`` shows
it; it is also in the failure message).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from balancer.testing import RedisServer
from benchmarks.fleet import FleetConfig, run_fleet

pytestmark = [pytest.mark.chaos, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    """The orchestrator runs on asyncio; the workers run on asyncio and trio."""
    return "asyncio"


@pytest.fixture
def chaos_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own: the run kills and restarts it."""
    with RedisServer() as server:
        yield server


@pytest.mark.timeout(150)
async def test_fleet_under_fire(chaos_redis: RedisServer, tmp_path: Path) -> None:
    """
    4 workers (2 asyncio, 2 trio) run jobs for 40 s while, in turn: upstream
    401/429/500/503/timeouts/malformed bodies; the map changes every 1-2 s
    (channels added and removed, maxJobs up and down, every token rotated);
    a worker holding leases is SIGKILLed and restarted; Redis is SIGKILLed
    and restarted empty; clients cancel ~30 % of waits and ~10 % of running
    jobs; 5 % of jobs outlive lease_ttl (renewal must hold their slots).

    The observer is the Discord side: every job is a TCP connection to it,
    opened after the grant (``S``) and ended (``E``) before the release; a
    killed worker's jobs end when the kernel closes its sockets. It counts
    running jobs per channel from those messages only. Rules (W = map ttl +
    source timeout + 1.5 s slack = 2.4 s; the *effective* map at an instant is
    the one the fake served then, or during an upstream fault the last one it
    served before the fault):

    * over-dispatch: a job starting on channel c while r jobs run there, with
      r >= L, L = the largest maxJobs of c among the maps effective at any
      instant of [start - W, start] (0 where c is absent: so a channel removed
      more than W ago takes no job). Jobs started before a lowered maxJobs may
      run on; none may start above every limit a worker could still hold.
    * stale map: the job's Discord token names the map version its worker
      granted it from; that version must be effective within [start - W, start].
    * cooling: no job on a channel is granted between the release of a
      "throttled" lease there and the end of its cooldown, if its acquire()
      began after that release (exempt: a Redis restart or a removal of the
      channel in the window, both of which forget the cooldown).
    * leaks: after all workers exit cleanly, Redis holds no lease and all
      in-flight counts are 0; a SIGKILLed worker's leases are reclaimed within
      about lease_ttl.
    """
    config = FleetConfig(log_dir=tmp_path)
    with anyio.fail_after(config.duration + 90):
        report = await run_fleet(config, chaos_redis)
    line = report.summary()
    sys.stderr.write(line + "\n")
    print(line)  # noqa: T201 - the run's figures, shown with -s
    details = "\n".join(report.violations[:20])
    assert not report.violations, f"{line}\n{details}\nworker logs: {tmp_path}"
    assert report.max_over_dispatch == 0
    assert report.leaked == 0
    assert report.jobs > 200, line
    for kind in ("http-401", "http-429", "http-500", "http-503", "http-timeout"):
        assert report.faults[kind] >= 1, line
    assert report.faults["sigkill"] >= 1 and report.faults["redis-restart"] >= 1, line
    assert report.reclaim and max(report.reclaim) < 2 * config.lease_ttl + 1, line


@pytest.mark.timeout(90)
async def test_observer_catches_a_split_fleet(chaos_redis: RedisServer, tmp_path: Path) -> None:
    """
    Negative control: half the fleet on another namespace enforces maxJobs
    separately, so channels run up to twice their limit. The observer must see it.
    """
    config = FleetConfig(duration=8.0, faults=False, split_namespace=True, log_dir=tmp_path)
    with anyio.fail_after(config.duration + 60):
        report = await run_fleet(config, chaos_redis)
    assert report.max_over_dispatch >= 1, report.summary()
    assert any(v.startswith("over-dispatch") for v in report.violations)
    assert report.leaked == 0, report.summary()

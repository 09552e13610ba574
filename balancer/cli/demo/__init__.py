"""
``balancer demo``: simulated Discord jobs through a real balancer, watched from outside.

The demo starts :class:`~balancer.testing.FakeUseapi` on loopback with channels
of mixed ``maxJobs`` (:mod:`.model`), and runs worker tasks (:mod:`.worker`)
that take leases and "run" jobs on their channels, some failing and some
answered 429. An observer independent of the balancer counts the jobs
actually running on each channel from inside the lease and records the peak:
the closing report (:mod:`.view`) compares that peak with ``maxJobs``, and the
command fails if it was ever exceeded.

In one process (:mod:`.local`) every worker is a task on the memory backend;
with ``--redis`` (:mod:`.fleet`) the same workers run in several processes
sharing one Redis, and the observer counts in Redis itself, fleet-wide.
"""

from __future__ import annotations

from .model import DemoConfig

__all__ = ["DemoConfig", "run_demo"]


def run_demo(config: DemoConfig, *, live: bool, redis: str | None, log_level: str) -> int:
    """
    Run the demo and return the command's exit code: 0 when every limit held
    and no slot leaked, else 1. ``redis`` is None for one process, ``""`` for a
    fleet on a throwaway redis-server, or a Redis URL.
    """
    from ..console import EXIT_FAILED, EXIT_OK, error, has_rich, interrupt_on

    if live and not has_rich():
        error("the live view needs rich: pip install 'balancer[cli]' (plain lines for now)")
        live = False
    # Stopped by a terminal closing or a supervisor: clean up as for Ctrl-C
    # (worker processes, the throwaway redis-server).
    with interrupt_on("SIGTERM", "SIGHUP"):
        if redis is None:
            import anyio

            from .local import run_local

            result = anyio.run(lambda: run_local(config, live=live))
        else:
            from .fleet import FleetError, run_fleet

            try:
                result = run_fleet(config, redis or None, live=live, log_level=log_level)
            except FleetError as exc:
                error(str(exc))
                return EXIT_FAILED
    return EXIT_OK if not result.violations and not result.leaked else EXIT_FAILED

"""
A fleet of balancer workers under fire, and an independent observer of what runs.

Used by ``tests/chaos`` (a bounded run in CI, and the observer's own rules on
hand-made histories) and by ``benchmarks/soak.py`` (a long run for release
checks). It lives here rather than in ``tests/`` so that the benchmarks never
import the test suite; it is not shipped in ``balancer.testing`` because it
reads the Redis backend's private key layout (``{ns}:lch``, ``{ns}:inf``) to
measure reclamation and leaks, which no user should depend on.

Modules: :mod:`.upstream` (the knobs, the fake upstream's map over time),
:mod:`.observer` (the Discord side and its rules), :mod:`.orchestrator`
(:func:`run_fleet`: the processes and the fault schedule) and :mod:`.worker`
(one worker process).

The pieces, all on one machine:

* **Workers**: ``python -m benchmarks.fleet.worker ...`` OS processes, half on
  asyncio and half on trio, each running a :class:`~balancer.Balancer` over a
  ``UseapiAccountSource`` (pointed at the fake upstream) and a
  ``RedisBackend`` (one real ``redis-server`` shared by the fleet). Each runs
  more job tasks than the fleet has slots, so there are always waiters. A job
  acquires a lease, "submits" itself to the Discord side (the observer) with
  its lease's channel and Discord token, runs for a while, reports its end,
  and only then releases. Clients cancel ~30 % of their waits and ~10 % of
  their running jobs; some jobs fail and a few report ``"throttled"``.
* **The fake upstream** (:class:`~balancer.testing.FakeUseapi`) in the
  orchestrating process: its account map changes every 1-2 s (channels added
  and removed, ``maxJobs`` up and down, every token rotated: the token names
  the map version it belongs to), and a fault schedule injects, in turn, 401,
  429, 500, 503, timeouts and malformed bodies.
* **The observer** ("the Discord side"): a TCP server in the orchestrating
  process. A job is one TCP connection: ``S`` (start) when it begins, ``E``
  (end) before its lease is released, ``R`` after the release. A worker that
  is SIGKILLed has its connections closed by the kernel: its jobs end then.
  The observer counts running jobs per channel from these messages alone,
  never from the balancer's counters or Redis.
* **Process faults**: a worker is SIGKILLed while it holds leases, then
  restarted; Redis is SIGKILLed and restarted empty (no persistence).

The rules the observer checks (see :class:`Observer`):

* **Over-dispatch.** Let ``W`` (``FleetConfig.window``) be the propagation
  window: the map TTL, plus the source timeout, plus slack for scheduling
  lag. The *effective* upstream version at instant ``u`` is the map the fake
  served successfully at ``u`` (during an upstream fault, the last one served
  before it: workers keep their last good map). A job that starts on channel
  ``c`` at ``t`` while ``r`` jobs already run on ``c`` is an over-dispatch when
  ``r >= L``, where ``L`` is the largest ``maxJobs`` of ``c`` among the
  versions effective at any instant of ``[t - W, t]`` (0 where ``c`` is
  absent). So jobs started before a lowered ``maxJobs`` may run on, but no job
  may *start* while the channel is at or above every limit a worker could
  still legitimately hold; and no job may start on a channel that has been
  absent from the map for longer than ``W``.
* **Stale map.** The job's token names the map version its worker granted it
  from; that version must be one of those effective during ``[t - W, t]``.
* **Cooling.** After a job on ``c`` ends ``"throttled"`` (end acknowledged at
  ``a``, release returned at ``b``; the cooldown started in Redis in between),
  no job on ``c`` whose ``acquire()`` *began* after ``b`` may have been granted
  (``acquire()`` returned) before ``a + cooldown``. Exempt: windows that
  overlap a Redis restart (cooldowns are lost with the data) or a removal of
  ``c`` from the map (a removed channel forgets its cooldown).
* **Leaks.** After every worker has exited cleanly, Redis holds no lease and
  every in-flight count is 0.
"""

from __future__ import annotations

from .observer import Job, Observer, Report
from .orchestrator import run_fleet
from .upstream import FleetConfig, Upstream

__all__ = ["FleetConfig", "Job", "Observer", "Report", "Upstream", "run_fleet"]

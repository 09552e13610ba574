"""Capacity statistics: frozen snapshots, cheap to take, never doing I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ._types import ChannelState

__all__ = ["BalancerStatistics", "ChannelState", "ChannelStatistics"]


@dataclass(frozen=True, slots=True)
class ChannelStatistics:
    """
    One channel's load.

    :ivar channel: the channel id
    :ivar max_jobs: its limit from the current map (the last one, while draining)
    :ivar in_flight: leases out on it (cluster-wide with a shared backend)
    :ivar free: slots it would grant now; 0 while cooling or draining, never negative
    :ivar state: ``"active"``, ``"draining"`` (removed from the map, leases still
        out) or ``"cooling"`` (throttled or failing; takes no new leases for a while)
    :ivar acquired_total: leases this balancer took on it
    :ivar failures_total: ``"failed"`` and ``"throttled"`` outcomes reported here
    """

    channel: str
    max_jobs: int
    in_flight: int
    free: int
    state: ChannelState
    acquired_total: int
    failures_total: int


@dataclass(frozen=True, slots=True)
class BalancerStatistics:
    """
    A snapshot of a balancer's capacity and history.

    :ivar channels: every known channel (draining ones included), by id
    :ivar capacity: sum of ``max_jobs`` over channels that take new leases
    :ivar in_flight: leases out on every channel, draining ones included
    :ivar free: sum of ``free`` over channels that take new leases
    :ivar waiting: tasks of this process waiting in ``acquire``
    :ivar acquired_total: leases granted by this balancer
    :ivar released_total: leases this balancer released (each counted once)
    :ivar timeouts_total: acquires that ended in ``NoCapacityError``
    :ivar map_fetched_at: wall-clock time (``time.time()``) of the last good fetch
    :ivar map_age: seconds since the last good fetch, or ``None`` before the first
    :ivar map_stale: ``True`` when the last good fetch is older than ``ttl``
    :ivar refresh_errors_total: failed fetches so far
    :ivar last_refresh_error: the last failure as ``"Type: message"``; no secrets
    """

    channels: Mapping[str, ChannelStatistics]
    capacity: int
    in_flight: int
    free: int
    waiting: int
    acquired_total: int
    released_total: int
    timeouts_total: int
    map_fetched_at: float | None
    map_age: float | None
    map_stale: bool
    refresh_errors_total: int
    last_refresh_error: str | None

"""
Prometheus metrics for a balancer (the ``prometheus`` extra).

:class:`BalancerCollector` turns ``statistics()`` into metrics at every
scrape; it never keeps numbers of its own, so it costs nothing between
scrapes and works for :class:`~balancer.Balancer` and
:class:`~balancer.SyncBalancer` alike::

    from prometheus_client import REGISTRY, start_http_server
    from balancer.metrics import BalancerCollector

    REGISTRY.register(BalancerCollector(lb))
    start_http_server(9100)

Exposed (``channel`` label on the per-channel ones; names follow the
Prometheus conventions: ``balancer_`` prefix, ``_total`` counters, seconds):

=====================================  =======  ==========================================
``balancer_channel_max_jobs``          gauge    the channel's ``maxJobs``
``balancer_channel_in_flight``         gauge    leases out on it (fleet-wide with Redis)
``balancer_channel_free``              gauge    slots it would grant now
``balancer_channel_state``             gauge    1 for its ``state`` label (active,
                                                cooling, draining), 0 for the others
``balancer_channel_acquired_total``    counter  leases this balancer took on it
``balancer_channel_failures_total``    counter  "failed" and "throttled" outcomes
``balancer_capacity``                  gauge    summed ``max_jobs`` of active channels
``balancer_in_flight``                 gauge    leases out, every channel
``balancer_free``                      gauge    free slots, active channels
``balancer_waiting``                   gauge    callers waiting in ``acquire`` here
``balancer_acquired_total``            counter  leases granted
``balancer_released_total``            counter  leases released
``balancer_timeouts_total``            counter  acquires that timed out
``balancer_map_age_seconds``           gauge    since the last good map fetch (absent before)
``balancer_map_stale``                 gauge    1 when the map is older than ``ttl``
``balancer_refresh_errors_total``      counter  failed map fetches
=====================================  =======  ==========================================

The per-balancer counters count this process's balancer (``statistics()``
says so); sum them over instances. Nothing here carries a credential.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "balancer.metrics needs prometheus_client: pip install 'balancer[prometheus]'"
    ) from exc

if TYPE_CHECKING:
    from .statistics import BalancerStatistics

__all__ = ["BalancerCollector"]

_Family = GaugeMetricFamily | CounterMetricFamily

_STATES = ("active", "cooling", "draining")


class _HasStatistics(Protocol):
    def statistics(self) -> BalancerStatistics: ...


class BalancerCollector(Collector):
    """
    A Prometheus collector over a balancer's ``statistics()``.

    Args:
        balancer: a :class:`~balancer.Balancer` or :class:`~balancer.SyncBalancer`
            (anything with ``statistics()``).
        labels: constant labels added to every sample, to tell several
            balancers of one process apart (e.g. ``{"pool": "images"}``).

    Raises:
        TypeError: ``balancer`` has no ``statistics()`` method.
        ValueError: a constant label is named ``channel`` or ``state``.
    """

    def __init__(
        self, balancer: _HasStatistics, *, labels: Mapping[str, str] | None = None
    ) -> None:
        if not callable(getattr(balancer, "statistics", None)):
            raise TypeError("balancer must have a statistics() method")
        self._balancer = balancer
        self._labels = dict(labels or {})
        if {"channel", "state"} & self._labels.keys():
            raise ValueError("'channel' and 'state' are reserved label names")

    def describe(self) -> Iterator[Metric]:
        """The metric families, without samples (so registering does not collect)."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """Take one ``statistics()`` snapshot and expose it."""
        stats = self._balancer.statistics()
        families = {family.name: family for family in self._families()}
        const = list(self._labels.values())
        for channel, cs in sorted(stats.channels.items()):
            values = [*const, channel]
            families["balancer_channel_max_jobs"].add_metric(values, cs.max_jobs)
            families["balancer_channel_in_flight"].add_metric(values, cs.in_flight)
            families["balancer_channel_free"].add_metric(values, cs.free)
            for state in _STATES:
                families["balancer_channel_state"].add_metric(
                    [*values, state], 1.0 if cs.state == state else 0.0
                )
            families["balancer_channel_acquired"].add_metric(values, cs.acquired_total)
            families["balancer_channel_failures"].add_metric(values, cs.failures_total)
        for name, value in (
            ("balancer_capacity", stats.capacity),
            ("balancer_in_flight", stats.in_flight),
            ("balancer_free", stats.free),
            ("balancer_waiting", stats.waiting),
            ("balancer_acquired", stats.acquired_total),
            ("balancer_released", stats.released_total),
            ("balancer_timeouts", stats.timeouts_total),
            ("balancer_map_stale", 1.0 if stats.map_stale else 0.0),
            ("balancer_refresh_errors", stats.refresh_errors_total),
        ):
            families[name].add_metric(const, value)
        if stats.map_age is not None:
            families["balancer_map_age_seconds"].add_metric(const, stats.map_age)
        yield from families.values()

    def _families(self) -> list[_Family]:
        const = list(self._labels)
        per_channel = [*const, "channel"]

        def gauge(name: str, doc: str, labels: list[str]) -> _Family:
            return GaugeMetricFamily(name, doc, labels=labels)

        def counter(name: str, doc: str, labels: list[str]) -> _Family:
            # The family is named without "_total"; its sample gets the suffix.
            return CounterMetricFamily(name, doc, labels=labels)

        return [
            gauge("balancer_channel_max_jobs", "The channel's maxJobs.", per_channel),
            gauge("balancer_channel_in_flight", "Leases out on the channel.", per_channel),
            gauge("balancer_channel_free", "Slots the channel would grant now.", per_channel),
            gauge(
                "balancer_channel_state",
                "1 for the channel's current state (active, cooling, draining), else 0.",
                [*per_channel, "state"],
            ),
            counter(
                "balancer_channel_acquired",
                "Leases this balancer took on the channel.",
                per_channel,
            ),
            counter(
                "balancer_channel_failures",
                "Failed and throttled outcomes reported on the channel.",
                per_channel,
            ),
            gauge("balancer_capacity", "Summed max_jobs of active channels.", const),
            gauge("balancer_in_flight", "Leases out on every channel.", const),
            gauge("balancer_free", "Free slots on active channels.", const),
            gauge("balancer_waiting", "Callers waiting in acquire() in this process.", const),
            counter("balancer_acquired", "Leases granted by this balancer.", const),
            counter("balancer_released", "Leases released by this balancer.", const),
            counter("balancer_timeouts", "Acquires that ended in NoCapacityError.", const),
            gauge("balancer_map_age_seconds", "Seconds since the last good map fetch.", const),
            gauge("balancer_map_stale", "1 when the account map is older than ttl.", const),
            counter("balancer_refresh_errors", "Failed account map fetches.", const),
        ]

"""Tests of :mod:`balancer.metrics`, by scraping the text exposition."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from balancer import (
    Balancer,
    NoCapacityError,
    ParsedAccounts,
    SourceError,
    StaticAccountSource,
    SyncBalancer,
    parse_account_map,
)
from balancer.metrics import BalancerCollector
from balancer.testing import make_accounts

RAW = make_accounts(2, max_jobs=[1, 3])
TOKENS = [entry["discord"] for entry in RAW.values()]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class FlakySource:
    """Serves RAW once, then fails every fetch."""

    def __init__(self) -> None:
        self.calls = 0

    async def fetch(self) -> ParsedAccounts:
        self.calls += 1
        if self.calls > 1:
            raise SourceError("useapi answered HTTP 503", status_code=503)
        return parse_account_map(RAW)


def scrape(collector: BalancerCollector) -> tuple[str, Samples]:
    """The exposition text, and every sample as {(name, labels): value}."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


class TestBalancerCollector:
    async def test_exposition(self) -> None:
        """Per-channel and balancer-wide figures are exposed under Prometheus names."""
        async with Balancer(FlakySource(), cooldown=60, seed=1) as lb:
            held = await lb.acquire(channel="ch0")
            throttled = await lb.acquire(channel="ch1")
            await lb.release(throttled, outcome="throttled")  # ch1 cools
            with pytest.raises(NoCapacityError):
                await lb.acquire(timeout=0)  # ch0 full, ch1 cooling
            with pytest.raises(SourceError):
                await lb.refresh()
            text, samples = scrape(BalancerCollector(lb))
            stats = lb.statistics()
            await lb.release(held)
        for name, ch0, ch1 in (
            ("balancer_channel_max_jobs", 1, 3),
            ("balancer_channel_in_flight", 1, 0),
            ("balancer_channel_free", 0, 0),
            ("balancer_channel_acquired_total", 1, 1),
            ("balancer_channel_failures_total", 0, 1),
        ):
            assert value(samples, name, channel="ch0") == ch0, name
            assert value(samples, name, channel="ch1") == ch1, name
        for channel, current in (("ch0", "active"), ("ch1", "cooling")):
            for state in ("active", "cooling", "draining"):
                expected = 1.0 if state == current else 0.0
                assert value(samples, "balancer_channel_state", channel=channel, state=state) == (
                    expected
                )
        assert value(samples, "balancer_capacity") == stats.capacity == 1
        assert value(samples, "balancer_in_flight") == 1
        assert value(samples, "balancer_free") == 0
        assert value(samples, "balancer_waiting") == 0
        assert value(samples, "balancer_acquired_total") == 2
        assert value(samples, "balancer_released_total") == 1
        assert value(samples, "balancer_timeouts_total") == 1
        assert value(samples, "balancer_refresh_errors_total") == 1
        assert value(samples, "balancer_map_stale") == 0
        assert 0 <= value(samples, "balancer_map_age_seconds") < 60
        assert "# TYPE balancer_channel_acquired_total counter" in text
        assert "# TYPE balancer_channel_state gauge" in text
        assert "# TYPE balancer_map_age_seconds gauge" in text
        for token in TOKENS:
            assert token not in text

    def test_naming_conventions(self) -> None:
        """Every name has the balancer_ prefix; counters, and only counters, end in _total."""
        with SyncBalancer(StaticAccountSource(RAW)) as lb:
            registry = CollectorRegistry()
            registry.register(BalancerCollector(lb))
            families = list(text_string_to_metric_families(generate_latest(registry).decode()))
        assert len(families) == 16
        for family in families:
            assert family.name.startswith("balancer_")
            for sample in family.samples:
                assert sample.name.endswith("_total") == (family.type == "counter"), sample.name

    def test_sync_balancer_and_constant_labels(self) -> None:
        """A SyncBalancer is scraped the same way; constant labels go on every sample."""
        with SyncBalancer(StaticAccountSource(RAW)) as lb, lb.acquire(timeout=5, channel="ch1"):
            _, samples = scrape(BalancerCollector(lb, labels={"pool": "images"}))
        assert value(samples, "balancer_channel_in_flight", channel="ch1", pool="images") == 1
        assert value(samples, "balancer_in_flight", pool="images") == 1
        assert all(dict(labels).get("pool") == "images" for _, labels in samples)

    def test_before_the_first_fetch(self) -> None:
        """Before entering there is no channel and no map age, only zeros."""
        lb = Balancer(StaticAccountSource(RAW))
        _, samples = scrape(BalancerCollector(lb))
        assert value(samples, "balancer_capacity") == 0
        assert not any(name.startswith("balancer_channel_") for name, _ in samples)
        assert not any(name == "balancer_map_age_seconds" for name, _ in samples)

    def test_registering_does_not_collect(self) -> None:
        """describe() lists the families without calling statistics()."""

        class Broken:
            def statistics(self) -> object:
                raise AssertionError("statistics() called at registration")

        registry = CollectorRegistry()
        registry.register(BalancerCollector(Broken()))  # type: ignore[arg-type]
        with pytest.raises(AssertionError):
            generate_latest(registry)

    def test_bad_arguments(self) -> None:
        """A non-balancer or a reserved label name is refused."""
        with pytest.raises(TypeError):
            BalancerCollector(object())  # type: ignore[arg-type]
        lb = Balancer(StaticAccountSource(RAW))
        with pytest.raises(ValueError, match="reserved"):
            BalancerCollector(lb, labels={"channel": "x"})

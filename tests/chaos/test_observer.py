"""The observer's rules on hand-made histories: it must flag what it claims to flag."""

from __future__ import annotations

import random
import time

import pytest

from benchmarks.fleet import FleetConfig, Job, Observer, Report, Upstream

pytestmark = pytest.mark.chaos


def _setup() -> tuple[Upstream, Observer, Report]:
    upstream = Upstream(random.Random(1))
    upstream.limits = {"ch0": 2, "ch1": 1}
    upstream.version = 0
    upstream.versions.clear()
    upstream.tokens.clear()
    upstream._commit()
    report = Report()
    observer = Observer(upstream, FleetConfig(), report)
    upstream.effective.append((time.monotonic() - 100, 0))
    return upstream, observer, report


def _start(observer: Observer, upstream: Upstream, channel: str, version: int = 0) -> int:
    token = upstream.tokens[(version, channel)]
    now = time.monotonic()
    return observer._start(["0", channel, f"lease-{now}", token, str(now), str(now)])


def test_jobs_up_to_max_jobs_are_fine_one_more_is_over_dispatch() -> None:
    upstream, observer, report = _setup()
    first = _start(observer, upstream, "ch0")
    _start(observer, upstream, "ch0")
    assert report.violations == []
    observer._end(first, "ok")
    third = _start(observer, upstream, "ch0")
    assert report.violations == []
    _start(observer, upstream, "ch0")
    assert report.max_over_dispatch == 1
    assert report.violations[0].startswith("over-dispatch")
    observer._end(third, "ok")


def test_a_lowered_limit_counts_only_after_the_window() -> None:
    upstream, observer, report = _setup()
    now = time.monotonic()
    window = observer.config.window
    upstream.limits["ch0"] = 1
    upstream.version = 1
    upstream._commit()
    upstream.effective.append((now - window / 2, 1))  # lowered half a window ago
    _start(observer, upstream, "ch0", 1)
    _start(observer, upstream, "ch0", 1)  # v0 (limit 2) may still be in use
    assert report.violations == []
    upstream.effective[-1] = (now - 2 * window, 1)  # lowered long ago
    _start(observer, upstream, "ch0", 1)
    assert report.max_over_dispatch == 2


def test_a_removed_channel_or_a_stale_token_is_flagged() -> None:
    upstream, observer, report = _setup()
    del upstream.limits["ch1"]
    upstream.version = 1
    upstream._commit()
    upstream.effective.append((time.monotonic() - 2 * observer.config.window, 1))
    _start(observer, upstream, "ch1", 0)
    kinds = sorted(v.split(":")[0] for v in report.violations)
    assert kinds == ["over-dispatch", "stale map"]
    observer._start(["0", "ch0", "lease-x", "discord-v0-ch0-forged", "0", "0"])
    assert "unknown token" in report.violations[-1]


def test_a_grant_during_a_cooldown_is_flagged() -> None:
    _, observer, report = _setup()
    cooldown = observer.config.cooldown
    observer.jobs = [
        Job(0, "ch0", "a", 0, 0.0, 0.0, 1.0, end=2.0, outcome="throttled", released=2.1),
        Job(1, "ch0", "b", 0, 2.2, 2.3, 2.4, end=2.5, outcome="ok"),  # during the cooldown
        Job(1, "ch0", "c", 0, 1.5, 2.0 + cooldown + 0.5, 3.5, end=4.0, outcome="ok"),  # after
        Job(1, "ch1", "d", 0, 2.2, 2.3, 2.4, end=2.5, outcome="ok"),  # another channel
    ]
    observer.check_cooling()
    assert len(report.violations) == 1 and "job b" in report.violations[0]
    report.violations.clear()
    observer.redis_restarts.append(2.2)  # the cooldown was lost with Redis's data
    observer.check_cooling()
    assert report.violations == []

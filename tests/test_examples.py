"""Smoke tests: every script in ``examples/`` runs to completion against the fake server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("USEAPI_", "REDIS_"))}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=full_env,
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("asyncio_worker.py", "40 jobs; per channel"),
        ("trio_worker.py", "30 jobs under trio"),
        ("threads_worker.py", "80 jobs from 16 threads"),
        ("celery_style.py", "webhooks received; slots held: 0"),
        ("metrics_endpoint.py", 'balancer_channel_max_jobs{channel="ch1"} 3.0'),
    ],
)
def test_example_runs(name: str, expected: str) -> None:
    """The example exits 0 and prints what it is about."""
    result = run_example(name)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


@pytest.mark.redis
def test_redis_fleet_example(redis_url: str) -> None:
    """The multi-process fleet shares one Redis and never exceeds a limit."""
    result = run_example("redis_fleet.py", REDIS_URL=redis_url)
    assert result.returncode == 0, result.stderr
    assert "fleet-wide: 0" in result.stdout


def test_every_example_is_tested() -> None:
    """A new example gets a smoke test."""
    tested = {
        "asyncio_worker.py", "trio_worker.py", "threads_worker.py", "celery_style.py",
        "metrics_endpoint.py", "redis_fleet.py",
    }  # fmt: skip
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested

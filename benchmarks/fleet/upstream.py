"""The knobs of a fleet run, and the fake upstream's account map over time."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FAULTS", "FleetConfig", "Upstream"]

#: The upstream faults injected in turn (kind, how).
FAULTS: tuple[str, ...] = (
    "401",
    "429",
    "500",
    "503",
    "timeout",
    "malformed-json",
    "malformed-type",
)


@dataclass
class FleetConfig:
    """Knobs of a fleet run; the defaults are the CI chaos run."""

    duration: float = 40.0
    workers: int = 4
    tasks_per_worker: int = 10
    ttl: float = 0.5  # account-map cache TTL
    source_timeout: float = 0.4
    lease_ttl: float = 2.0
    cooldown: float = 1.0
    recovery_grace: float = 1.0
    slack: float = 1.5  # scheduling lag allowed on top of ttl + source timeout
    map_every: tuple[float, float] = (1.0, 2.0)
    fault_on: float = 1.2  # seconds an upstream fault lasts
    fault_off: float = 1.5  # seconds between upstream faults
    kill_at: tuple[float, float] = (5.0, 16.0)  # first SIGKILL, then every
    redis_at: tuple[float, float] = (12.0, 18.0)  # first Redis restart, then every
    redis_down: float = 0.0  # seconds Redis stays down before it restarts (empty)
    p_cancel_wait: float = 0.3
    p_cancel_run: float = 0.1
    p_fail: float = 0.04
    p_throttle: float = 0.01
    #: Jobs that outlive lease_ttl several times over: renewal must keep their slots.
    p_long: float = 0.05
    long_job: tuple[float, float] = (2.5, 6.0)
    seed: int = 0
    log_dir: Path | None = None
    #: Negative control: odd workers use another namespace, so the fleet's
    #: counts are split in two and channels run up to twice their maxJobs.
    split_namespace: bool = False
    faults: bool = True

    @property
    def window(self) -> float:
        return self.ttl + self.source_timeout + self.slack


class Upstream:
    """The fake upstream's map over time: versions, tokens, and which were effective when."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.version = 0
        self.limits: dict[str, int] = {f"ch{i}": rng.randint(1, 3) for i in range(4)}
        self.next_channel = 4
        self.versions: dict[int, dict[str, int]] = {}
        self.tokens: dict[tuple[int, str], str] = {}
        self.faulting = False
        #: (monotonic time, effective version), in time order.
        self.effective: list[tuple[float, int]] = []
        #: channel -> times it left the map (for the cooling exemption).
        self.removed_at: dict[str, list[float]] = defaultdict(list)
        self._commit()

    def _commit(self) -> None:
        self.versions[self.version] = dict(self.limits)
        for channel in self.limits:
            self.tokens[(self.version, channel)] = (
                f"discord-v{self.version}-{channel}-{self.rng.getrandbits(32):08x}"
            )

    def raw(self) -> dict[str, dict[str, Any]]:
        return {
            channel: {
                "server": "100000000000000000",
                "channel": channel,
                "discord": self.tokens[(self.version, channel)],
                "maxJobs": limit,
            }
            for channel, limit in self.limits.items()
        }

    def mutate(self) -> str:
        """Change the map one way (and rotate every token); return what changed."""
        limits = self.limits
        choices = ["up", "down", "rotate"]
        if len(limits) < 6:
            choices.append("add")
        if len(limits) > 2:
            choices.append("remove")
        kind = self.rng.choice(choices)
        if kind == "add":
            limits[f"ch{self.next_channel}"] = self.rng.randint(1, 4)
            self.next_channel += 1
        elif kind == "remove":
            gone = self.rng.choice(sorted(limits))
            del limits[gone]
            self.removed_at[gone].append(time.monotonic())
        elif kind == "up":
            channel = self.rng.choice(sorted(limits))
            limits[channel] = min(4, limits[channel] + self.rng.randint(1, 2))
        elif kind == "down":
            channel = self.rng.choice(sorted(limits))
            limits[channel] = max(1, limits[channel] - self.rng.randint(1, 2))
        self.version += 1
        self._commit()
        return kind

    def mark_effective(self) -> None:
        if not self.faulting:
            self.effective.append((time.monotonic(), self.version))

    def acceptable(self, t: float, window: float) -> set[int]:
        """Versions effective at some instant of ``[t - window, t]``."""
        found: set[int] = set()
        start = t - window
        before: int | None = None
        for at, version in self.effective:
            if at <= start:
                before = version
            elif at <= t:
                found.add(version)
            else:
                break
        if before is not None:
            found.add(before)
        return found

    def limit(self, channel: str, versions: set[int]) -> int:
        return max((self.versions[v].get(channel, 0) for v in versions), default=0)

    def version_of(self, channel: str, token: str) -> int | None:
        try:
            version = int(token.split("-", 2)[1][1:])
        except (IndexError, ValueError):
            return None
        return version if self.tokens.get((version, channel)) == token else None

"""
This balancer's channel table: the accounts of the current map, per-channel
totals, and what changed from one map to the next.

Nothing here awaits or talks to a backend: :meth:`ChannelTable.apply` diffs a
new map against the current one in one pass and says what was added, removed
and changed; the scheduler then tells the backend and wakes or fails waiters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import structlog

from .statistics import ChannelStatistics

if TYPE_CHECKING:
    from .accounts import Account, ParsedAccounts
    from .backends.base import ChannelCounts

__all__ = ["ChannelInfo", "ChannelTable", "MapChange"]

logger = structlog.get_logger("balancer")

#: Map changes logged one event per channel up to this many; beyond, only the summary.
_CHANNEL_EVENTS_MAX = 50


class ChannelInfo:
    """One channel as this balancer knows it: its account and local totals."""

    __slots__ = ("account", "acquired_total", "failures_total")

    def __init__(self, account: Account) -> None:
        self.account = account
        self.acquired_total = 0
        self.failures_total = 0


@dataclass(frozen=True, slots=True)
class MapChange:
    """
    What one map brought.

    :ivar limits: channel -> max_jobs of the new map (what the backend is told)
    :ivar added: channels new to the map (or back from draining)
    :ivar removed: channels the map no longer has
    :ivar changed: how many kept channels changed limit, server or token
    """

    limits: dict[str, int]
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: int = 0


class ChannelTable:
    """
    The accounts of the current map and every channel's totals.

    A removed channel keeps its :class:`ChannelInfo` while the backend still
    counts leases on it (draining), so its totals keep counting.
    """

    # Invariants: every channel in ``accounts`` has an entry in ``infos``
    # holding the same account; ``infos`` may hold draining channels beyond.

    __slots__ = ("_rejected_seen", "accounts", "infos")

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.infos: dict[str, ChannelInfo] = {}
        self._rejected_seen: frozenset[tuple[str, str]] = frozenset()

    def apply(self, parsed: ParsedAccounts) -> MapChange:
        """Make ``parsed`` the current map; return what changed."""
        # One pass over the new map: a 10,000-channel map arrives on every
        # refresh of every worker, so this stays a small multiple of json.loads.
        new = parsed.accounts
        old = self.accounts
        infos = self.infos
        added: list[str] = []
        changed = 0
        limits: dict[str, int] = {}
        for channel, account in new.items():
            limits[channel] = account.max_jobs
            info = infos.get(channel)
            if info is None:
                infos[channel] = ChannelInfo(account)
                added.append(channel)
                continue
            before = old.get(channel)
            if before is None:
                added.append(channel)  # back from draining
            elif before is not account and _differs(before, account):
                changed += 1
            info.account = account
        # Nothing was removed iff the old map is the new one minus the additions.
        removed = [] if len(old) + len(added) == len(new) else [c for c in old if c not in new]
        self._log_rejected(parsed)
        self.accounts = dict(new)
        return MapChange(limits, added, removed, changed)

    def forget_gone(self, removed: list[str], counts: Mapping[str, ChannelCounts]) -> None:
        """Drop the records of removed channels the backend no longer counts."""
        for channel in removed:
            if channel not in counts:
                self.infos.pop(channel, None)

    def channel_gone(self, channel: str) -> None:
        """A draining channel's last lease came back: forget it unless it is back."""
        if channel not in self.accounts:
            self.infos.pop(channel, None)

    def figures(
        self, counts: Mapping[str, ChannelCounts]
    ) -> tuple[Mapping[str, ChannelStatistics], int, int, int]:
        """
        Every channel's statistics from the backend's ``counts`` and our totals,
        with the sums ``capacity``, ``in_flight`` and ``free``: capacity and
        free count active channels only, in_flight every channel.
        """
        channels: dict[str, ChannelStatistics] = {}
        capacity = in_flight = free = 0
        infos = self.infos
        for channel, count in counts.items():
            info = infos.get(channel)
            channels[channel] = ChannelStatistics(
                channel=channel,
                max_jobs=count.max_jobs,
                in_flight=count.in_flight,
                free=count.free,
                state=count.state,
                acquired_total=info.acquired_total if info else 0,
                failures_total=info.failures_total if info else 0,
            )
            in_flight += count.in_flight
            if count.state == "active":
                capacity += count.max_jobs
                free += count.free
        return MappingProxyType(channels), capacity, in_flight, free

    def count_failure(self, channel: str) -> None:
        info = self.infos.get(channel)
        if info is not None:
            info.failures_total += 1

    def log_change(
        self, change: MapChange, counts: Mapping[str, ChannelCounts], *, first: bool
    ) -> None:
        """One event per added or removed channel (up to a bound), then the summary."""
        added, removed = change.added, change.removed
        if not first and len(added) + len(removed) <= _CHANNEL_EVENTS_MAX:
            for channel in added:
                max_jobs = self.accounts[channel].max_jobs
                logger.info("channel_added", channel=channel, max_jobs=max_jobs)
            for channel in removed:
                if channel in counts:
                    in_flight = counts[channel].in_flight
                    logger.info("channel_draining", channel=channel, in_flight=in_flight)
                else:
                    logger.info("channel_removed", channel=channel)
        if first or added or removed or change.changed:
            logger.info(
                "map_refreshed",
                channels=len(self.accounts),
                added=len(added),
                removed=len(removed),
                changed=change.changed,
            )

    def _log_rejected(self, parsed: ParsedAccounts) -> None:
        seen = frozenset((r.key, r.reason) for r in parsed.rejected)
        if seen == self._rejected_seen:
            return
        for key, reason in sorted(seen - self._rejected_seen)[:_CHANNEL_EVENTS_MAX]:
            logger.warning("account_rejected", channel=key, reason=reason)
        self._rejected_seen = seen


def _differs(before: Account, after: Account) -> bool:
    """Whether a channel's account changed (limit, server or token)."""
    return (
        before.max_jobs != after.max_jobs
        or before.server != after.server
        or before.discord.reveal() != after.discord.reveal()
    )

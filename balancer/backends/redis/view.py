"""
What :class:`~balancer.backends.redis.RedisBackend` knows of every channel, without I/O.

Each round trip's reply carries figures (one channel's after an acquire or a
release, every channel's after a ``SYNC``) and the server's clock; the
:class:`ChannelView` keeps them, answers ``counts()`` and ``next_wakeup()``
from them, and turns server instants into local monotonic time.

Time is the server's in every script, so cooldowns and expiries mean the same
to every process whatever their clocks: each reply re-estimates the offset
between the server's clock and ours (half the round trip is the error, hence
``_WAKE_MARGIN``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..base import ChannelCounts
from .scripts import text

if TYPE_CHECKING:
    from ...statistics import ChannelState

__all__ = ["ChannelView"]

_STATES: tuple[ChannelState, ...] = ("active", "draining", "cooling")
#: Seconds added to a server-announced instant before waking for it (clock offset error).
_WAKE_MARGIN = 0.01


@dataclass(slots=True)
class _Channel:
    """A channel's figures as of the last round trip that returned them."""

    max_jobs: int
    in_flight: int
    state: ChannelState
    cooling_until: float  # local monotonic time; 0.0 when not cooling


class ChannelView:
    """Every known channel's figures, the server's clock offset and the next instants due."""

    def __init__(self) -> None:
        self._channels: dict[str, _Channel] = {}
        self._view: Mapping[str, ChannelCounts] | None = None
        self._offset = 0.0  # server seconds minus local monotonic seconds
        self._next_expiry: float | None = None
        self._next_cool_end: float | None = None
        self._cooling_names: set[str] = set()
        self._settle_until = 0.0  # no grant before (data loss was detected); 0.0: none

    # -- the server's clock ---------------------------------------------------------

    def clock(self, server_ms: Any, sent: float) -> None:
        """Re-estimate the server clock's offset from a reply stamped ``server_ms``."""
        self._offset = int(server_ms) / 1000 - (sent + time.monotonic()) / 2

    def local(self, server_ms: int) -> float:
        """A server instant (ms) as local monotonic seconds."""
        return server_ms / 1000 - self._offset

    def settle(self, server_ms: int) -> None:
        """No grant before ``server_ms`` (0: grants are open)."""
        self._settle_until = self.local(server_ms) if server_ms else 0.0

    def nothing_free(self, lease_ms: int, cool_ms: int, settle_ms: int) -> None:
        """An acquire found no slot: when one may come (a lease expiry, a cooldown end)."""
        self._next_expiry = self.local(lease_ms) if lease_ms >= 0 else None
        self.settle(settle_ms)
        self._next_cool_end = self.local(cool_ms) if cool_ms >= 0 else None

    # -- figures ----------------------------------------------------------------------

    def put(self, name: str, max_jobs: int, in_flight: int, state: int, cool_ms: int) -> None:
        till = self.local(cool_ms) if state == 2 and cool_ms else 0.0
        self._channels[name] = _Channel(max_jobs, in_flight, _STATES[state], till)
        if till:
            self._cooling_names.add(name)
        else:
            self._cooling_names.discard(name)
        self._view = None

    def put_figures(self, name: str, figures: list[Any]) -> None:
        """A script's four figures of one channel (``max_jobs`` -1: it is gone)."""
        max_jobs, in_flight, state, cool_ms = (int(v) for v in figures)
        if max_jobs < 0:
            self.drop(name)
        else:
            self.put(name, max_jobs, in_flight, state, cool_ms)

    def drop(self, name: str) -> None:
        self._channels.pop(name, None)
        self._cooling_names.discard(name)
        self._view = None

    def max_jobs(self, name: str) -> int:
        """The channel's last known limit; 1 when unknown (a hint for re-assertion)."""
        channel = self._channels.get(name)
        return channel.max_jobs if channel is not None else 1

    def apply_counts(
        self, maxes: list[Any], infs: list[Any], drains: list[Any], cools: list[Any]
    ) -> None:
        """Every channel's figures, from ``SYNC``'s reply."""
        in_flight = {text(k): int(v) for k, v in zip(infs[::2], infs[1::2], strict=True)}
        draining = {text(ch) for ch in drains}
        cooling = {text(k): int(float(v)) for k, v in zip(cools[::2], cools[1::2], strict=True)}
        channels: dict[str, _Channel] = {}
        self._cooling_names = set()
        for raw, raw_max in zip(maxes[::2], maxes[1::2], strict=True):
            name = text(raw)
            till = self.local(cooling[name]) if name in cooling else 0.0
            state: ChannelState = (
                "draining" if name in draining else "cooling" if till else "active"
            )
            channels[name] = _Channel(int(raw_max), in_flight.get(name, 0), state, till)
            if till:
                self._cooling_names.add(name)
        self._channels = channels
        self._view = None

    # -- answers ----------------------------------------------------------------------

    def counts(self) -> Mapping[str, ChannelCounts]:
        now = time.monotonic()
        ended = [n for n in self._cooling_names if self._channels[n].cooling_until <= now]
        for name in ended:  # a cooldown ended since the last round trip
            channel = self._channels[name]
            if channel.state == "cooling":
                channel.state = "active"
            channel.cooling_until = 0.0
            self._cooling_names.discard(name)
        if self._view is None or ended:
            self._view = MappingProxyType(
                {
                    name: ChannelCounts(ch.max_jobs, ch.in_flight, ch.state)
                    for name, ch in self._channels.items()
                }
            )
        return self._view

    def next_wakeup(self) -> float | None:
        now = time.monotonic()
        events = [ch.cooling_until for ch in self._cooling()]
        events += [t for t in (self._next_expiry, self._next_cool_end, self._settle_until) if t]
        future = [t - now for t in events if t > now]
        return min(future) + _WAKE_MARGIN if future else None

    def _cooling(self) -> list[_Channel]:
        return [self._channels[name] for name in self._cooling_names if name in self._channels]

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

Replies of concurrent round trips (several connections) may arrive in any
order. Every reply is stamped with the server's clock in microseconds, and
scripts run one at a time, so the stamp orders them: a channel's figures are
replaced only by figures stamped later than the ones they replace. Without
that, an older reply applied last showed ``in_flight`` 1-2 after every lease
was released, until the next sync.
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

    # Invariants: ``_stamps[c]`` is the server stamp (us) of the figures held
    # for ``c`` (or of its removal); figures stamped earlier are ignored.

    def __init__(self) -> None:
        self._channels: dict[str, _Channel] = {}
        self._stamps: dict[str, int] = {}
        self._stamp = 0  # the stamp of the reply being taken in
        self._view: Mapping[str, ChannelCounts] | None = None
        self._offset = 0.0  # server seconds minus local monotonic seconds
        self._next_expiry: float | None = None
        self._next_cool_end: float | None = None
        self._cooling_names: set[str] = set()
        self._settle_until = 0.0  # no grant before (data loss was detected); 0.0: none

    # -- the server's clock ---------------------------------------------------------

    def clock(self, server_us: Any, sent: float) -> None:
        """
        Take in a reply stamped ``server_us``: re-estimate the clock offset, and
        stamp the figures that the same reply brings.
        """
        self._stamp = stamp = int(server_us)
        self._offset = stamp / 1_000_000 - (sent + time.monotonic()) / 2

    def _newer(self, name: str) -> bool:
        """Whether the reply being taken in is newer than what is held for ``name``."""
        if self._stamps.get(name, -1) > self._stamp:
            return False
        self._stamps[name] = self._stamp
        return True

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
        if not self._newer(name):
            return
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
        if not self._newer(name):
            return
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
        stamp, stamps, old = self._stamp, self._stamps, self._channels
        channels: dict[str, _Channel] = {}
        for raw, raw_max in zip(maxes[::2], maxes[1::2], strict=True):
            name = text(raw)
            if stamps.get(name, -1) > stamp:
                if name in old:  # NOTE: a later reply already told us more
                    channels[name] = old[name]
                continue
            stamps[name] = stamp
            till = self.local(cooling[name]) if name in cooling else 0.0
            state: ChannelState = (
                "draining" if name in draining else "cooling" if till else "active"
            )
            channels[name] = _Channel(int(raw_max), in_flight.get(name, 0), state, till)
        for name, channel in old.items():
            # Channels the sync did not list are gone, unless a later reply put them.
            if name not in channels and stamps.get(name, -1) > stamp:
                channels[name] = channel
        for name in [n for n in stamps if n not in channels]:
            # Gone as of this sync: a late older reply must not bring it back;
            # forgotten at the next sync (no reply outlives a round trip).
            if stamps[name] < stamp and name not in old:
                del stamps[name]
            else:
                stamps[name] = max(stamps[name], stamp)
        self._channels = channels
        self._cooling_names = {n for n, ch in channels.items() if ch.cooling_until}
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

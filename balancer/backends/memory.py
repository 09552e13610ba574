"""
The in-process backend: counts live in this process's memory.

Every operation completes without suspending, so each one is atomic under
cooperative scheduling without a lock, and the balancer can hand a released
slot to its oldest waiter before any other task runs (``immediate = True``).

Acquire and release are O(1) in the number of channels: the free capacity
is kept in an index (:mod:`balancer.selection`) updated on every change of a
channel's free count, never rebuilt by a scan.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..selection import FreeIndex, make_index
from .base import (
    MAX_JOBS_CAP,
    BackendConfig,
    ChannelCounts,
    ReleaseOutcome,
    ReleaseResult,
    RenewResult,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .._types import ChannelState

__all__ = ["MemoryBackend"]

_UNKNOWN = ReleaseResult("unknown")


class _Channel:
    """One channel's counts."""

    # Invariants: ``in_flight >= 0``; the channel is in the free index with
    # ``free()`` slots; ``draining`` channels with ``in_flight == 0`` are
    # deleted from the backend at once.

    __slots__ = (
        "cooling_until",
        "draining",
        "failures",
        "id",
        "in_flight",
        "index_pos",
        "index_slots",
        "max_jobs",
        "released",
        "tag",
    )

    def __init__(self, channel_id: str, max_jobs: int) -> None:
        self.id = channel_id
        # The common answer to a release, made once: no allocation per release.
        self.released = ReleaseResult("released", channel_id)
        self.index_pos = -1
        self.index_slots: list[int] | None = None
        # Whatever the balancer keeps for this channel (see set_tags).
        self.tag: object = None
        self.max_jobs = max_jobs
        self.in_flight = 0
        self.draining = False
        self.cooling_until = 0.0
        self.failures = 0

    def free(self) -> int:
        if self.draining or self.cooling_until:
            return 0
        free = self.max_jobs - self.in_flight
        return free if free > 0 else 0  # noqa: FURB136 (hot path: max() is slower)


class MemoryBackend:
    """
    Counts and leases in this process; the default backend.

    Use it when every worker that dispatches to the channels runs in one
    process. Leases never expire: the process that counts them is the process
    that holds them, so there is nothing to reclaim after a crash.
    """

    immediate = True
    shared = False
    default_lease_ttl: float | None = None

    def __init__(self) -> None:
        self._channels: dict[str, _Channel] = {}
        self._leases: dict[str, _Channel] = {}
        self._cooling: list[tuple[float, str]] = []
        self._index: FreeIndex = make_index("random")
        self._config: BackendConfig | None = None
        self._clock: Callable[[], float] = time.monotonic
        self._notify: Callable[[], None] = _noop

    def __repr__(self) -> str:
        channels = len(getattr(self, "_channels", ()))
        return f"MemoryBackend(channels={channels}, leases={len(getattr(self, '_leases', ()))})"

    async def open(
        self, config: BackendConfig, notify: Callable[[], None], task_group: TaskGroup
    ) -> None:
        if self._config is not None:
            raise RuntimeError("a MemoryBackend serves one balancer at a time")
        self._config = config
        self._notify = notify
        self._index = make_index(config.selection)
        for channel in self._channels.values():
            channel.index_pos, channel.index_slots = -1, None
            self._index.update(channel, channel.free())

    async def settle(self) -> None:
        pass  # nothing is ever owed: every operation completes in place

    async def close(self) -> None:
        self._config = None
        self._notify = _noop

    async def set_map(self, limits: Mapping[str, int]) -> None:
        channels = self._channels
        index = self._index
        for channel_id, limit in limits.items():
            max_jobs = min(limit, MAX_JOBS_CAP)
            channel = channels.get(channel_id)
            if channel is None:
                channel = channels[channel_id] = _Channel(channel_id, max_jobs)
            else:
                if channel.max_jobs == max_jobs and not channel.draining:
                    continue  # unchanged: its place in the index is right
                channel.max_jobs = max_jobs
                channel.draining = False
            index.update(channel, channel.free())
        if len(channels) == len(limits):
            return  # every channel here is in limits: nothing to drain
        for channel_id in [c for c in channels if c not in limits]:
            channel = channels[channel_id]
            if not channel.draining:
                channel.draining = True
                index.update(channel, 0)
            if channel.in_flight == 0:
                del channels[channel_id]

    async def try_acquire(self, lease_id: str, channel: str | None) -> str | None:
        return self.acquire_nowait(lease_id, channel)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        for channel_id, tag in tags.items():
            channel = self._channels.get(channel_id)
            if channel is not None:
                channel.tag = tag

    def acquire_tag_nowait(self, lease_id: str, channel: str | None) -> object:
        got = self._take(lease_id, channel)
        if got is None:
            return None
        return got.id if got.tag is None else got.tag

    def acquire_nowait(self, lease_id: str, channel: str | None) -> str | None:
        """Synchronous :meth:`try_acquire`, for callers that must not suspend."""
        got = self._take(lease_id, channel)
        return None if got is None else got.id

    def _take(self, lease_id: str, channel: str | None) -> _Channel | None:
        if self._cooling and self._cooling[0][0] <= self._clock():
            self._end_cooling()
        if channel is None:
            picked = self._index.pick(self._rng)
            if picked is None:
                return None
            target: _Channel = picked  # type: ignore[assignment]
        else:
            found = self._channels.get(channel)
            if found is None or found.free() == 0:
                return None
            target = found
        target.in_flight += 1
        self._index.update(target, target.free())
        self._leases[lease_id] = target
        return target

    async def release(self, lease_id: str, outcome: ReleaseOutcome) -> ReleaseResult:
        return self.release_nowait(lease_id, outcome)

    def release_nowait(self, lease_id: str, outcome: ReleaseOutcome) -> ReleaseResult:
        """Synchronous :meth:`release`."""
        channel = self._leases.pop(lease_id, None)
        if channel is None:
            return _UNKNOWN
        channel.in_flight -= 1
        cooled = False
        if outcome == "ok":
            channel.failures = 0
        elif outcome != "abandoned":
            channel.failures += 1
            config = self._config
            if config is not None and (
                outcome == "throttled" or channel.failures >= config.failures_to_cool
            ):
                cooled = self._cool(channel, config.cooldown)
        if channel.draining and channel.in_flight == 0:
            if self._channels.get(channel.id) is channel:
                del self._channels[channel.id]
            return ReleaseResult("released", channel.id, removed=True)
        self._index.update(channel, channel.free())
        if cooled:
            return ReleaseResult("released", channel.id, cooled=True, cooling_for=self._cooldown)
        return channel.released

    def transfer_nowait(self, lease_id: str, new_lease_id: str) -> bool:
        channel = self._leases.get(lease_id)
        if (
            channel is None
            or channel.draining
            or channel.cooling_until
            or channel.in_flight > channel.max_jobs
        ):
            return False
        # in_flight <= max_jobs: once this lease is gone there is a free slot
        # on an active channel, and the new lease takes it.
        del self._leases[lease_id]
        self._leases[new_lease_id] = channel
        channel.failures = 0
        return True

    async def renew(self) -> RenewResult:
        return RenewResult()

    def counts(self) -> Mapping[str, ChannelCounts]:
        # NOTE: a read only. A cooldown that ran out shows as over, but is
        # ended (and waiters served) by the next acquire or wake-up, never by
        # someone looking at statistics.
        now = self._clock() if self._cooling else 0.0
        return {
            channel.id: ChannelCounts(channel.max_jobs, channel.in_flight, _state(channel, now))
            for channel in self._channels.values()
        }

    def next_wakeup(self) -> float | None:
        if not self._cooling:
            return None
        if self._cooling[0][0] <= self._clock():
            # A due cooldown is ended here, not just reported: otherwise the
            # caller would be told "now" again and again until someone acquires.
            self._end_cooling()
            if not self._cooling:
                return None
        return max(0.0, self._cooling[0][0] - self._clock())

    @property
    def _rng(self) -> random.Random:
        assert self._config is not None, "MemoryBackend used before open()"
        return self._config.rng

    @property
    def _cooldown(self) -> float:
        return self._config.cooldown if self._config is not None else 0.0

    def _cool(self, channel: _Channel, cooldown: float) -> bool:
        """Start or extend a cooldown; return whether the channel was not cooling."""
        until = self._clock() + cooldown
        was_cooling = bool(channel.cooling_until)
        channel.cooling_until = max(channel.cooling_until, until)
        channel.failures = 0
        heapq.heappush(self._cooling, (channel.cooling_until, channel.id))
        self._index.update(channel, 0)
        return not was_cooling

    def _end_cooling(self) -> None:
        now = self._clock()
        ended = False
        while self._cooling and self._cooling[0][0] <= now:
            until, channel_id = heapq.heappop(self._cooling)
            channel = self._channels.get(channel_id)
            # NOTE: a channel cooled twice has two heap entries; only the one
            # matching its latest deadline ends the cooldown.
            if channel is None or channel.cooling_until != until:
                continue
            channel.cooling_until = 0.0
            self._index.update(channel, channel.free())
            ended = True
        if ended:
            self._notify()


def _state(channel: _Channel, now: float) -> ChannelState:
    if channel.draining:
        return "draining"
    if channel.cooling_until > now:
        return "cooling"
    return "active"


def _noop() -> None:
    pass
